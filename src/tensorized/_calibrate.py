"""Activation-aware compression: fit factorized layers to the outputs on recorded inputs.

A compressed layer should reproduce the original outputs ``X W^T + b`` on the inputs it
really sees, not only its weight: activations are strongly anisotropic, so weight error in
rarely excited input directions hardly matters. :func:`calibrate` fits a
:class:`~tensorized.FactorizedLinear` to the outputs from the streamed statistics of its input
rows (``_statistics``: sums of outer products of the fit and held-out rows, recorded by
``_record``), in memory independent of the number of rows:

1. A closed-form start where it is exact. ``'lowrank'``: the best rank-r ``What`` in the
   norm ``||(W - What) S||_F``, ``S S^T`` the input covariance: the whitened truncated SVD of
   SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
   Language Model Compression", 2024) and ASVD (Yuan et al., "ASVD: Activation-aware Singular
   Value Decomposition for Compressing Large Language Models", 2023), computed as
   ``U_r U_r^T W`` with ``U_r`` the leading eigenvectors of ``W C W^T`` (``S`` is never
   inverted). The tensor formats (Tucker, TT, TT-matrix, CP) have no exact closed form;
   they start from their decomposition in a Kronecker-factored approximation of that norm
   (``S ~ S_1 (x) ... (x) S_d`` over the in modes, from partial traces of ``S S^T``): the
   whitened tensor ``W x_k S_k`` is decomposed and ``S_k^{-1}`` folded back into the factor
   carrying in mode ``k``, which keeps the format (kept only where it lowers the fit loss).
   TT also tries its whitened TT-SVD, exact through its out-side bonds and the middle
   (out | in) bond (``TTFormat.fit_closed_form``); the start with the lower fit loss is kept.
   Any format then gets the least-squares bias.
2. L-BFGS with a strong Wolfe line search (Liu & Nocedal, Math. Programming 45, 1989) on all
   factors and the bias, full batch. The output MSE of the fit rows only depends on their
   mean and Gram matrix ``G`` (``tr(E G E^T)`` plus a mean term, ``E = What - W``), so a step
   costs the reconstruction of ``What`` (and its backward) plus ``E G``, whatever the number
   of rows; a ridge on ``G`` pulls ``What`` towards ``W`` where the rows excite nothing.
3. The held-out error (from the held-out rows' statistics) is measured every few steps and
   the best state kept: never worse than the start on the held-out rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._linear import FactorizedLinear
from ._statistics import InputStatistics

__all__ = ["CalibrationResult", "calibrate", "calibrate_statistics"]

F64 = torch.float64


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class CalibrationResult:
    """Output errors of a calibrated layer.

    Attributes:
        before: per layer index, ``||Y - Yhat||_F / ||Y||_F`` on the held-out rows before
            calibration, with ``Y = X W^T + b``.
        after: the same after calibration; never larger than ``before``.
        steps: optimizer steps actually taken (0 where the closed form is exact).
    """

    before: list[float]
    after: list[float]
    steps: int


class _Problem:
    """One layer index's data: fit-row statistics, held-out statistics, float64 targets.

    With ``E = What - W``, mean ``mu`` and centred Gram matrix ``G`` of the fit rows and
    ``d = What mu + bhat - (W mu + b)``, the fit loss is ``sum_rows ||E x + bhat - b||^2 =
    tr(E G E^T) + n ||d||^2``: it only depends on the mean and the Gram matrix of the rows,
    and its gradient with respect to ``What`` is ``2 E G + 2 n d mu^T`` (``G`` plus a ridge).
    """

    def __init__(
        self, W: Tensor, b: Tensor | None, stats: InputStatistics, dtype: torch.dtype
    ) -> None:
        fit, n_in = stats.fit, stats.n_in
        device = fit.xx.device
        W = W.detach().to(device, F64)
        b = torch.zeros_like(W[:, 0]) if b is None else b.detach().to(device, F64)
        self.held_error = stats.held.error_against(W, b)
        self.held_norm = stats.held.squared_norm(W, b)
        self.n_fit = fit.n
        self.mean = fit.mean()
        self.gram = fit.centred_gram()  # (in, in)
        # A ridge pulls What towards W in the input directions the rows barely excite (and
        # keeps G invertible when there are fewer rows than features): 10% of the mean
        # variance, shrinking as (features / rows)^2 once the rows outnumber the features.
        strength = 0.1 * min(1.0, n_in / self.n_fit) ** 2
        self.ridge = strength * float(self.gram.diagonal().mean())
        self.target_mean = W @ fit.source_mean() + b  # (out,)
        if not stats.paired:  # targets from the same rows: X W^T + b
            self.W, self.b = W, b
            norm_sq = (W @ self.gram * W).sum() + self.n_fit * self.target_mean.pow(2).sum()
        else:
            # Sequential calibration: the rows X are the layer's inputs in the partially
            # compressed model, the targets Y = S W^T + b come from the original inputs S of
            # the same samples. ||X What^T + bhat - Y||^2 + ridge ||What - W||^2 equals, up
            # to a constant, the same loss as above around the ridge regression
            # W* = (Yc^T Xc + ridge W) (G + ridge I)^{-1} with the bias b* = mean(Y) - W* mu:
            # the layer then corrects what the layers before it got wrong.
            eye = torch.eye(n_in, dtype=F64, device=device)
            rhs = fit.centred_cross() @ W.T + self.ridge * W.T  # Xc^T Yc + ridge W^T
            self.W = torch.linalg.solve(self.gram + self.ridge * eye, rhs).T
            self.b = self.target_mean - self.W @ self.mean
            norm_sq = (W @ fit.centred_source_gram() * W).sum()
            norm_sq = norm_sq + self.n_fit * self.target_mean.pow(2).sum()
        self.norm_sq = max(float(norm_sq), torch.finfo(F64).tiny)
        # G = F F^T with few columns makes E G cheap: F from the eigenvectors of G, keeping
        # eigenvalues above a thousandth of the ridge (the others change the loss far less
        # than the ridge does; with fewer rows than features at most n_fit are kept).
        lam, vecs = torch.linalg.eigh(self.gram)
        keep = lam > 1e-3 * self.ridge
        factor = vecs[:, keep] * lam[keep].sqrt()
        self.factor = factor if 2 * factor.shape[1] < n_in else None  # else E @ G is cheaper
        # the operands of the loss, in the working dtype
        self.W_work, self.mean_work = self.W.to(dtype), self.mean.to(dtype)
        self.G_work = (self.gram if self.factor is None else self.factor).to(dtype)
        self.t_mean_work = self.target_mean.to(dtype)

    def held_out_error(self, W_hat: Tensor, b_hat: Tensor | None) -> float:
        """``||Y - Yhat||_F / ||Y||_F`` on the held-out rows, ``Y`` the original outputs."""
        W_hat = W_hat.detach().to(F64)
        b_hat = torch.zeros_like(W_hat[:, 0]) if b_hat is None else b_hat.detach().to(F64)
        error, norm = self.held_error(W_hat, b_hat), self.held_norm
        return math.sqrt(error / norm) if norm > 0 else math.sqrt(error)

    def times_gram(self, E: Tensor) -> Tensor:
        """``E G`` for ``E`` of shape ``(out, in)``."""
        if self.factor is None:
            return E @ self.G_work + self.ridge * E
        return (E @ self.G_work) @ self.G_work.T + self.ridge * E


def _check_calibrate_args(
    layer: FactorizedLinear,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    steps: int,
    lr: float | None,
    holdout: float,
) -> None:
    if not isinstance(layer, FactorizedLinear):
        raise TypeError(f"layer must be a FactorizedLinear, got {type(layer).__name__}")
    L, shape = layer.n_layers, (layer.out_features, layer.in_features)
    for name, seq in (("weights", weights), ("biases", biases), ("inputs", inputs)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence) or len(seq) != L:
            got: str | tuple[int, ...]
            got = f"length {len(seq)}" if isinstance(seq, Sequence) else type(seq).__name__
            raise ValueError(
                f"{name} must be a list with one entry per layer (n_layers={L}), got {got}"
            )
    for i in range(L):
        X = inputs[i]
        for name, value, want in (("weights", weights[i], shape), ("biases", biases[i], shape[:1])):
            if (value is not None or name == "weights") and (
                not isinstance(value, Tensor) or tuple(value.shape) != want
            ):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                none = "None or " if name == "biases" else ""
                raise ValueError(f"{name}[{i}] must be {none}a tensor of shape {want}, got {got}")
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[1] != shape[1] or X.shape[0] < 2:
            got = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(
                f"inputs[{i}] must be a tensor of shape (rows, in_features={shape[1]}) with at "
                f"least 2 rows (one to fit, one held out), got {got}"
            )
        for name, T in (("weights", weights[i]), ("inputs", X)):
            if not T.is_floating_point() or not torch.isfinite(T).all():
                raise ValueError(f"{name}[{i}] must be a finite floating tensor ({T.dtype})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
        raise ValueError(f"lr must be None (automatic) or a number > 0, got {lr!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, float | int) or not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")


def _or_none(items: Sequence[Tensor] | None, n: int) -> Sequence[Tensor | None]:
    return [None] * n if items is None else items


def _check_sources(sources: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    if isinstance(sources, Tensor) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be None or a list of tensors, got {type(sources).__name__}")
    if len(sources) != len(inputs):
        raise ValueError(
            f"sources must have one entry per layer ({len(inputs)}), got {len(sources)}"
        )
    for i, (S, X) in enumerate(zip(sources, inputs)):
        if not isinstance(S, Tensor) or S.shape != X.shape:
            got = tuple(S.shape) if isinstance(S, Tensor) else type(S).__name__
            raise ValueError(
                f"sources[{i}] must be a tensor shaped like inputs[{i}] {tuple(X.shape)} (the "
                f"same rows, in the original model), got {got}"
            )
        if not S.is_floating_point() or not torch.isfinite(S).all():
            raise ValueError(f"sources[{i}] must be a finite floating tensor ({S.dtype})")


def calibrate(
    layer: FactorizedLinear,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    *,
    steps: int = 200,
    lr: float | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    sources: Sequence[Tensor] | None = None,
) -> CalibrationResult:
    """Fit ``layer`` in place so that ``layer(X_i, indices=i) ~= X_i @ W_i.T + b_i`` (or
    ``~= S_i @ W_i.T + b_i`` with ``sources``).

    The rows of each ``inputs[i]`` are split into fit and held-out rows
    (``_statistics.holdout_split``). The fit rows give a closed-form start where one is exact
    ('lowrank': whitened SVD; 'dense': ``W``; any format: the least-squares bias), then, for
    the other formats, up to ``steps`` L-BFGS iterations on ``sum_i ||Y_i - Yhat_i||^2 /
    ||Y_i||^2`` (see the module docstring). The held-out error is checked every ``steps //
    10`` iterations and the best state kept (only states where no layer index got worse).
    Runs in the layer's dtype if float32/float64, else through a float32 copy; the layer keeps
    its dtypes, devices, ``requires_grad`` flags and training mode, and no ``.grad``.

    Args:
        layer: the factorized layer to fit (e.g. from ``FactorizedLinear.from_linear``).
        weights: ``n_layers`` original weights, each ``(out_features, in_features)``.
        biases: ``n_layers`` original biases, each ``(out_features,)`` or ``None``.
        inputs: ``n_layers`` recorded inputs, each ``(rows, in_features)`` with rows >= 2
            (see :func:`record_inputs`).
        steps: L-BFGS iterations (0: only the closed-form start); ignored for 'lowrank' and
            'dense', whose closed form is already optimal.
        lr: L-BFGS step multiplier; ``None`` uses 1 (the quasi-Newton step, scale-free).
        holdout: fraction of the rows held out to measure the error.
        seed: seed of the row split.
        sources: for sequential calibration, ``n_layers`` tensors of the original model's
            inputs ``S_i`` for the same samples (row for row) as ``inputs``, which are then
            the inputs in the partially compressed model: the targets are the original
            outputs ``S_i @ W_i.T + b_i``, so the layer also corrects the error of the
            layers before it. ``None``: the targets come from ``inputs`` themselves.

    Returns:
        A :class:`CalibrationResult` with the held-out errors before and after.
    """
    _check_calibrate_args(layer, weights, biases, inputs, steps, lr, holdout)
    if sources is not None:
        _check_sources(sources, inputs)
    device = next(layer.parameters()).device
    stats = [
        InputStatistics.of_rows(
            X.detach().to(device), None if S is None else S.detach().to(device), holdout, seed
        )
        for X, S in zip(inputs, _or_none(sources, len(inputs)))
    ]
    return calibrate_statistics(layer, weights, biases, stats, steps=steps, lr=lr)


def calibrate_statistics(
    layer: FactorizedLinear,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    statistics: Sequence[InputStatistics],
    *,
    steps: int = 200,
    lr: float | None = None,
) -> CalibrationResult:
    """:func:`calibrate` from streamed statistics of the rows (one per layer index, each with
    at least one fit and one held-out row; paired for sequential calibration)."""
    for i, st in enumerate(statistics):
        if not st.finite():
            raise ValueError(
                f"inputs[{i}] must be a finite floating tensor: its rows hold NaN or Inf"
            )
    params = list(layer.parameters())
    flags = [p.requires_grad for p in params]
    training = layer.training
    dtype = params[0].dtype
    work_dtype = dtype if dtype in (torch.float32, F64) else torch.float32
    problems = [
        _Problem(W, None if b is None else b.detach(), st, work_dtype)
        for W, b, st in zip(weights, biases, statistics)
    ]
    try:
        layer.eval()
        for p in params:
            p.requires_grad_(False)
        original = _snapshot(layer)
        before = _held_out_errors(layer, problems)
        # A lower-precision layer is fitted through a float32 copy, then rounded back.
        work = layer if work_dtype == dtype else copy.deepcopy(layer).to(work_dtype)
        taken = _fit(work, problems, steps, lr, before)
        if work is not layer:
            _restore(layer, _snapshot(work))
        after = _held_out_errors(layer, problems)
        if any(a > b for a, b in zip(after, before)):  # rounding back can only lose a little
            _restore(layer, original)
            after = before
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
        layer.train(training)
    return CalibrationResult(before=before, after=after, steps=taken)


def _snapshot(layer: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in layer.parameters()]


@torch.no_grad()
def _restore(layer: nn.Module, state: list[Tensor]) -> None:
    for p, value in zip(layer.parameters(), state):
        p.copy_(value)


@torch.no_grad()
def _held_out_errors(layer: FactorizedLinear, problems: list[_Problem]) -> list[float]:
    joint = layer.n_layers > 1
    return [
        prob.held_out_error(layer.weight.to_matrix(i if joint else None), _bias(layer, i))
        for i, prob in enumerate(problems)
    ]


def _bias(layer: FactorizedLinear, i: int) -> Tensor | None:
    if layer.bias is None:
        return None
    return layer.bias[i] if layer.n_layers > 1 else layer.bias


@torch.no_grad()
def _closed_form(layer: FactorizedLinear, problems: list[_Problem]) -> None:
    """Data-aware start. A format with an exact closed form in the input-weighted norm
    ('lowrank', 'dense') takes it (``FactorizedMatrix.fit_closed_form_all``). The others try
    their approximate closed form where they have one ('basis': whitened Basis Sharing;
    'tt': whitened TT-SVD) and
    their Kronecker-whitened decomposition of the targets (``fit_kronecker_whitened``: the
    tensor formats), and keep whichever start has the lowest fit loss, the layer's current
    state included. Then the least-squares bias."""
    weight = layer.weight
    joint = layer.n_layers > 1
    grams = []
    for prob in problems:  # the input second moment (centred when the bias absorbs the mean)
        C = prob.gram
        if layer.bias is None:
            C = C + prob.n_fit * torch.outer(prob.mean, prob.mean)
        grams.append(C)
    targets = [prob.W for prob in problems]
    importance = [1 / prob.norm_sq for prob in problems]  # each loss relative to its target
    if type(weight).closed_form_exact:
        weight.fit_closed_form_all(targets, grams, importance)
        _fit_bias(layer, problems)
        return
    _fit_bias(layer, problems)
    best, loss = _snapshot(layer), _fit_loss(layer, problems)
    eye = torch.eye(grams[0].shape[0], dtype=F64, device=grams[0].device)
    ridged = [C + p.ridge * eye for C, p in zip(grams, problems)]  # the fit loss's own norm
    # One Kronecker factorization for all layers: the mean of their normalized grams.
    normalized = [C / C.diagonal().mean() for C in ridged]
    gram = torch.stack(normalized).mean(0)
    stacked = torch.stack(targets) if joint else targets[0]
    attempts = (
        lambda: weight.fit_closed_form_all(targets, ridged, importance),
        lambda: weight.fit_kronecker_whitened(stacked, gram),
    )
    for attempt in attempts:
        if attempt():
            _fit_bias(layer, problems)
            found = _fit_loss(layer, problems)
            if found < loss:
                best, loss = _snapshot(layer), found
    _restore(layer, best)


def _fit_bias(layer: FactorizedLinear, problems: list[_Problem]) -> None:
    """The least-squares bias of each layer index for its current weight."""
    for i, prob in enumerate(problems):
        bias = _bias(layer, i)
        if bias is not None:
            W_hat = layer.weight.to_matrix(i if layer.n_layers > 1 else None).to(F64)
            bias.copy_(prob.target_mean - W_hat @ prob.mean)


def _terms(
    layer: FactorizedLinear, prob: _Problem, i: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(What, E, E G, mean term)`` of layer index ``i``'s fit loss (``What`` carries the
    autograd graph when gradients are enabled)."""
    W_hat = layer.weight.to_matrix(i if layer.n_layers > 1 else None)
    E = W_hat.detach() - prob.W_work
    at_mean = W_hat @ prob.mean_work - prob.t_mean_work
    bias = _bias(layer, i)
    if bias is not None:
        at_mean = at_mean + bias
    return W_hat, E, prob.times_gram(E), prob.n_fit * at_mean.pow(2).sum()


@torch.no_grad()
def _fit_loss(layer: FactorizedLinear, problems: list[_Problem]) -> float:
    """The relative fit loss summed over layer indices (what L-BFGS minimizes)."""
    total = 0.0
    for i, prob in enumerate(problems):
        _, E, EG, mean_term = _terms(layer, prob, i)
        total += float((EG * E).sum() + mean_term) / prob.norm_sq
    return total


def _loss_backward(layer: FactorizedLinear, problems: list[_Problem]) -> Tensor:
    """The relative fit loss summed over layer indices; its gradient is accumulated in the
    parameters' ``.grad``.

    The expensive part, ``E G``, is computed once outside autograd and enters through the
    surrogate ``2 <What, E G>``, whose gradient with respect to ``What`` is exactly that of
    ``tr(E G E^T)``; only the reconstruction of ``What`` is differentiated by autograd.
    """
    value = 0.0
    for i, prob in enumerate(problems):
        W_hat, E, EG, mean_term = _terms(layer, prob, i)
        surrogate = (2 * (W_hat * EG).sum() + mean_term) / prob.norm_sq
        surrogate.backward()
        value += float((EG * E).sum() + mean_term.detach()) / prob.norm_sq
    return torch.tensor(value, dtype=F64)


def _fit(
    layer: FactorizedLinear,
    problems: list[_Problem],
    steps: int,
    lr: float | None,
    before: list[float],
) -> int:
    """Closed-form start, then L-BFGS; keeps the best held-out state. Returns the steps taken."""
    best_state, best = _snapshot(layer), sum(before)

    def consider() -> None:
        nonlocal best_state, best
        errors = _held_out_errors(layer, problems)
        if sum(errors) < best and all(e <= b for e, b in zip(errors, before)):
            best_state, best = _snapshot(layer), sum(errors)

    _closed_form(layer, problems)
    consider()
    taken = 0
    # an exact closed form already minimizes the loss (with a bias to fit)
    offset_free = layer.bias is not None or all(not p.b.any() for p in problems)
    exact = type(layer.weight).closed_form_exact and offset_free
    if steps > 0 and not exact:
        params = list(layer.parameters())
        for p in params:
            p.requires_grad_(True)
        every = max(1, steps // 10)
        opt = torch.optim.LBFGS(
            params, lr=1.0 if lr is None else lr, history_size=20, line_search_fn="strong_wolfe"
        )
        opt.param_groups[0].update(tolerance_grad=0.0, tolerance_change=0.0)  # run all steps

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            return _loss_backward(layer, problems)

        while taken < steps:
            chunk = min(every, steps - taken)
            opt.param_groups[0].update(max_iter=chunk, max_eval=chunk * 5 // 4 + 1)
            loss = opt.step(closure)
            done = opt.state[params[0]]["n_iter"]
            stalled = done == taken
            taken = done
            consider()
            if stalled or not torch.isfinite(loss):
                break
    _restore(layer, best_state)  # calibrate() restores the flags and clears the grads
    return taken
