"""Activation-aware compression: record layer inputs, then fit factorized layers to outputs.

A compressed layer should reproduce the original outputs ``X W^T + b`` on the inputs it
really sees, not only its weight: activations are strongly anisotropic, so weight error in
rarely excited input directions hardly matters. :func:`record_inputs` hooks modules and keeps
their inputs; :func:`calibrate` fits a :class:`~tensorized.FactorizedLinear` to the outputs:

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
   Any format then gets the least-squares bias.
2. L-BFGS with a strong Wolfe line search (Liu & Nocedal, Math. Programming 45, 1989) on all
   factors and the bias, full batch. The output MSE of the fit rows only depends on their
   mean and Gram matrix ``G`` (``tr(E G E^T)`` plus a mean term, ``E = What - W``), so a step
   costs the reconstruction of ``What`` (and its backward) plus ``E G``, whatever the number
   of rows; a ridge on ``G`` pulls ``What`` towards ``W`` where the rows excite nothing.
3. The held-out error is measured every few steps and the best state kept: never worse than
   the start on the held-out rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._linear import FactorizedLinear
from ._ops import frobenius_error

__all__ = ["CalibrationResult", "calibrate", "holdout_split", "record_inputs"]

F64 = torch.float64


# --------------------------------------------------------------------------- recording


class _Reservoir:
    """A seeded uniform sample without replacement of at most ``size`` rows of a stream, in
    bounded memory: each row gets a uniform key and the smallest keys are kept (Efraimidis &
    Spirakis, "Weighted random sampling with a reservoir", Inf. Process. Lett. 97(5), 2006)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys = torch.empty(0, dtype=F64)
        self.position = torch.empty(0, dtype=torch.long)
        self.seen = 0

    def add(self, rows: Tensor) -> None:
        n = rows.shape[0]
        keys = torch.rand(n, generator=self.generator, dtype=F64)
        position = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
            position = torch.cat([self.position, position])
        if keys.shape[0] > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            rows, keys, position = rows[keep.to(rows.device)], keys[keep], position[keep]
        self.rows, self.keys, self.position = rows, keys, position

    def result(self) -> Tensor | None:
        if self.rows is None:
            return None
        order = torch.argsort(self.position)  # the kept rows in the order they were seen
        return self.rows[order.to(self.rows.device)]


def record_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_data: Iterable,
    *,
    max_rows: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Run ``model`` on calibration data and record the inputs of some of its modules.

    Each item of ``calibration_data`` is one model call: a ``Tensor`` ``x`` runs
    ``model(x)``, a tuple or list runs ``model(*x)``, a mapping (e.g. a tokenizer's
    ``BatchEncoding``) runs ``model(**x)``. The model runs under ``torch.no_grad()`` in eval
    mode; every module's training flag is restored afterwards and the hooks are removed, even
    when the model raises.

    Args:
        model: the model to run.
        modules: ``name -> module`` whose first input is recorded (e.g. ``nn.Linear`` s of
            ``model``).
        calibration_data: an iterable of model inputs (a list, a ``DataLoader``, ...).
        max_rows: keep at most this many rows per module (rows of padding tokens left out:
            with a keyword batch holding an integer ``attention_mask`` whose shape is the
            input's leading dims, its zero entries): a uniform random subset without
            replacement (seeded), in the order the rows were seen. Data with a ``len()`` (a
            list, a ``DataLoader``) is read whole and sampled; an iterator or generator
            (which may be endless) is read only until every module that ran holds
            ``max_rows`` rows, and at most ``max_rows`` batches.
        seed: seed of the subsampling.
        progress: show a tqdm bar over the batches.

    Returns:
        ``name -> (rows, in_features)``: the module's inputs with all leading dims flattened,
        in the dtype and on the device of the module's parameters. A module that never ran
        gets ``(0, in_features)`` (``in_features`` from the module, else 0).

    Raises:
        TypeError: for bad ``modules``, a ``calibration_data`` that is not an iterable of
            batches, or an item of the wrong type.
        ValueError: for no batches, bad max_rows.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(modules, Mapping) or not all(
        isinstance(k, str) and isinstance(m, nn.Module) for k, m in modules.items()
    ):
        raise TypeError(
            f"modules must be a mapping of str names to nn.Module, got {type(modules).__name__}"
        )
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    _check_data(calibration_data)
    reservoirs = {name: _Reservoir(max_rows, seed) for name in modules}
    flags = {m: m.training for m in [*model.modules(), *modules.values()]}
    handles = []

    def hook_for(name: str, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        param = next(module.parameters(), None)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
            if x is None or x.ndim == 0:
                raise TypeError(f"module {name!r} was called without a tensor input to record")
            held = reservoirs[name].rows
            if held is not None and held.shape[1] != x.shape[-1]:
                raise ValueError(
                    f"module {name!r} received inputs with {x.shape[-1]} features after "
                    f"inputs with {held.shape[1]}"
                )
            # A copy: the model may later change its activations in place.
            rows = x.detach().reshape(-1, x.shape[-1])
            mask = current_mask[0]
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                rows = rows[mask.reshape(-1).to(rows.device) != 0]  # padding: never attended
            target = param if param is not None else rows
            reservoirs[name].add(rows.to(device=target.device, dtype=target.dtype, copy=True))

        return hook

    count = 0
    current_mask: list[Tensor | None] = [None]
    try:
        for name, module in modules.items():
            handles.append(
                module.register_forward_pre_hook(hook_for(name, module), with_kwargs=True)
            )
        model.eval()
        batches = calibration_data
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="recording inputs", leave=False)
        sized = _has_length(calibration_data)
        with torch.no_grad():
            for count, item in enumerate(batches, 1):
                current_mask[0] = padding_mask(item)
                _call(model, item, count - 1)
                if not sized and (count >= max_rows or _full(reservoirs.values())):
                    break  # an unsized stream may never end: stop once it has given enough
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.train(flag)
    if count == 0:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    results = {name: reservoirs[name].result() for name in modules}
    out: dict[str, Tensor] = {}
    for name, module in modules.items():
        recorded = results[name]
        if recorded is None:  # never ran
            like = next(module.parameters(), torch.empty(0))
            recorded = like.new_empty(0, getattr(module, "in_features", 0))
        out[name] = recorded
    return out


def padding_mask(item: object) -> Tensor | None:
    """The ``attention_mask`` of a keyword batch (a tokenizer's output), else ``None``.

    Rows of a module's input whose leading dims have this shape and whose mask entry is 0
    belong to padding tokens: attention never reads them, so they take no part in the model's
    output and are left out of calibration statistics and distillation losses."""
    if isinstance(item, Mapping):
        mask = item.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim >= 1 and not mask.is_floating_point():
            return mask
    return None


def call_order(model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable) -> list[str]:
    """The names of ``modules`` in the order the model first calls them on the first item
    of ``data`` (eval mode, no gradients; modules it does not call are left out)."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, n=n: order.append(n) if n not in order else None
        )
        for n, m in modules.items()
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call(model, next(iter(data)), 0)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.train(flag)
    return order


def _has_length(data: object) -> bool:
    """Whether ``data`` says how many batches it holds (a ``DataLoader`` over an
    ``IterableDataset`` has ``__len__`` but raises ``TypeError`` from it)."""
    try:
        len(data)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _full(reservoirs: Iterable[_Reservoir]) -> bool:
    """Every module that ran has seen ``size`` rows (and at least one ran)."""
    ran = [r for r in reservoirs if r.seen]
    return bool(ran) and all(r.seen >= r.size for r in ran)


def _check_data(data: object, name: str = "calibration_data") -> None:
    hint = "an iterable of model inputs (e.g. a list of tensors, tuples or dicts, or a DataLoader)"
    if isinstance(data, Tensor | Mapping | str | bytes):
        raise TypeError(
            f"{name} must be {hint}, got a single {type(data).__name__}; wrap one batch in a "
            f"list: {name}=[batch]"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"{name} must be {hint}, got {type(data).__name__}")


def _call(model: nn.Module, item: object, k: int, what: str = "calibration_data") -> Any:
    """``model`` on one item of ``what``: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(item, Tensor | Mapping | tuple | list):
        try:
            if isinstance(item, Tensor):
                return model(item)
            if isinstance(item, Mapping):
                return model(**item)
            return model(*item)
        except (RuntimeError, ValueError, TypeError) as exc:  # re-raised naming the batch
            message = f"{what}[{k}]: the model raised on this batch: {exc}"
            try:
                new = type(exc)(message)
            except Exception:
                new = RuntimeError(message)
            raise new from exc
    raise TypeError(
        f"{what}[{k}] must be a Tensor (model(x)), a tuple or list of positional inputs "
        f"(model(*x)) or a dict of keyword inputs (model(**x)), got {type(item).__name__}"
    )


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


def holdout_split(n_rows: int, holdout: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The seeded split of ``n_rows`` rows that :func:`calibrate` uses.

    Args:
        n_rows: number of rows, at least 2.
        holdout: fraction of held-out rows, in ``(0, 1)``; at least one row on each side.
        seed: seed of the random permutation.

    Returns:
        ``(fit, held_out)``: sorted row indices, shapes ``(n_fit,)`` and ``(n_held,)``.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 2:
        raise ValueError(f"n_rows must be an int >= 2 (one fit and one held-out row), got {n_rows}")
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    n_held = min(n_rows - 1, max(1, round(holdout * n_rows)))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


class _Problem:
    """One layer index's data: fit-row statistics and held-out rows with float64 targets.

    With ``E = What - W``, mean ``mu``, centred fit rows ``Xc`` and ``d = What mu + bhat -
    (W mu + b)``, the fit loss is ``sum_rows ||E x + bhat - b||^2 = tr(E G E^T) + n ||d||^2``
    with ``G = Xc^T Xc``: it only depends on the mean and the Gram matrix of the rows, and its
    gradient with respect to ``What`` is ``2 E G + 2 n d mu^T`` (``G`` plus a ridge).
    """

    def __init__(
        self,
        W: Tensor,
        b: Tensor | None,
        X: Tensor,
        held_out: float,
        seed: int,
        dtype: torch.dtype,
        source: Tensor | None = None,
    ) -> None:
        fit, held = (i.to(X.device) for i in holdout_split(X.shape[0], held_out, seed))
        W = W.detach().to(F64)
        b = torch.zeros_like(W[:, 0]) if b is None else b.detach().to(F64)
        Xf = X[fit].to(F64)
        self.n_fit, n_in = Xf.shape
        self.mean = Xf.mean(0)
        centred = Xf - self.mean  # (n_fit, in)
        self.gram = centred.T @ centred  # (in, in)
        # A ridge pulls What towards W in the input directions the rows barely excite (and
        # keeps G invertible when there are fewer rows than features): 10% of the mean
        # variance, shrinking as (features / rows)^2 once the rows outnumber the features.
        strength = 0.1 * min(1.0, n_in / self.n_fit) ** 2
        self.ridge = strength * float(self.gram.diagonal().mean())
        if source is None:  # targets from the same rows: X W^T + b
            self.W, self.b = W, b
            self.target_mean = W @ self.mean + b  # (out,)
            norm_sq = (W @ self.gram * W).sum() + self.n_fit * self.target_mean.pow(2).sum()
            self.Y_held = X[held].to(F64) @ W.T + b
        else:
            # Sequential calibration: the rows X are the layer's inputs in the partially
            # compressed model, the targets Y = S W^T + b come from the original inputs S of
            # the same samples. ||X What^T + bhat - Y||^2 + ridge ||What - W||^2 equals, up
            # to a constant, the same loss as above around the ridge regression
            # W* = (Yc^T Xc + ridge W) (G + ridge I)^{-1} with the bias b* = mean(Y) - W* mu:
            # the layer then corrects what the layers before it got wrong.
            S = source.to(F64)
            Yf = S[fit] @ W.T + b
            self.target_mean = Yf.mean(0)
            Yc = Yf - self.target_mean
            eye = torch.eye(n_in, dtype=F64, device=X.device)
            rhs = centred.T @ Yc + self.ridge * W.T  # (in, out)
            self.W = torch.linalg.solve(self.gram + self.ridge * eye, rhs).T
            self.b = self.target_mean - self.W @ self.mean
            norm_sq = Yc.pow(2).sum() + self.n_fit * self.target_mean.pow(2).sum()
            self.Y_held = S[held] @ W.T + b
        self.norm_sq = max(float(norm_sq), torch.finfo(F64).tiny)
        # G = F F^T with few columns makes E G cheap: F from the eigenvectors of the smaller
        # Gram matrix, keeping eigenvalues above a thousandth of the ridge (the others change
        # the loss far less than the ridge does).
        small = self.n_fit <= n_in
        lam, vecs = torch.linalg.eigh(centred @ centred.T if small else self.gram)
        keep = lam > 1e-3 * self.ridge
        factor = centred.T @ vecs[:, keep] if small else vecs[:, keep] * lam[keep].sqrt()
        self.factor = factor if 2 * factor.shape[1] < n_in else None  # else E @ G is cheaper
        self.X_held = X[held]
        # the operands of the loss, in the working dtype
        self.W_work, self.mean_work = self.W.to(dtype), self.mean.to(dtype)
        self.G_work = (self.gram if self.factor is None else self.factor).to(dtype)
        self.t_mean_work = self.target_mean.to(dtype)

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
    (:func:`holdout_split`). The fit rows give a closed-form start where one is exact
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
    params = list(layer.parameters())
    flags = [p.requires_grad for p in params]
    training = layer.training
    dtype = params[0].dtype
    work_dtype = dtype if dtype in (torch.float32, F64) else torch.float32
    device = params[0].device
    problems = [
        _Problem(
            W.to(device),
            None if b is None else b.detach().to(device),
            X.detach().to(device),
            float(holdout),
            seed,
            work_dtype,
            None if S is None else S.detach().to(device),
        )
        for W, b, X, S in zip(weights, biases, inputs, _or_none(sources, len(inputs)))
    ]
    try:
        layer.eval()
        for p in params:
            p.requires_grad_(False)
        original = _snapshot(layer)
        before = _held_out_errors(layer, problems, dtype)
        # A lower-precision layer is fitted through a float32 copy, then rounded back.
        work = layer if work_dtype == dtype else copy.deepcopy(layer).to(work_dtype)
        taken = _fit(work, problems, steps, lr, before)
        if work is not layer:
            _restore(layer, _snapshot(work))
        after = _held_out_errors(layer, problems, dtype)
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
def _held_out_errors(
    layer: FactorizedLinear, problems: list[_Problem], dtype: torch.dtype
) -> list[float]:
    return [
        frobenius_error(prob.Y_held, layer(prob.X_held.to(dtype), i))
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
    their approximate closed form where they have one ('basis': whitened Basis Sharing) and
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
    dtype = next(layer.parameters()).dtype
    best_state, best = _snapshot(layer), sum(before)

    def consider() -> None:
        nonlocal best_state, best
        errors = _held_out_errors(layer, problems, dtype)
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
