"""CP (canonical polyadic) format: a sum of R rank-one tensors.

``W[l, o_1..o_m, i_1..i_n] = sum_r weights[r] * A_layer[l, r] * prod_k A_k[o_k|i_k, r]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .. import decompose
from .._ops import capturing, khatri_rao, khatri_rao_grad
from .._shapes import Modes
from . import _curves
from ._strategy import Strategy, WeightShape, Work, apply_two_gemms, reconstructed, two_gemm_work
from .base import (
    FactorizedMatrix,
    Option,
    add_bias,
    balanced_std,
    layer_count,
    listed,
    member,
    pick,
)


def _sizes(in_modes: Modes, out_modes: Modes, n_layers: int) -> tuple[int, ...]:
    return ((n_layers,) if n_layers > 1 else ()) + tuple(out_modes) + tuple(in_modes)


def _component_scale(w: CPFormat, factors: list[Tensor], layer: int | None) -> Tensor:
    """Per-component scales: the weights, times the layer's row of the layer factor
    (``factors[0]``) in a joint weight."""
    scale: Tensor = member(w, "weights")
    return scale if w.n_layers == 1 else scale * factors[0][layer]


def _split(w: CPFormat, layer: int | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per-component scales, out factors, in factors."""
    factors = listed(member(w, "factors"))
    first = w._first_in
    return _component_scale(w, factors, layer), factors[first - w._n_out : first], factors[first:]


def _few_rows(n: int, in_modes: tuple[int, ...]) -> bool:
    # Per row, the rows path writes about in / in_1 elements per component; the Khatri-Rao
    # product writes in per component once.
    return len(in_modes) > 1 and n < in_modes[0]


def _scaled(w: CPFormat, layer: int | None) -> tuple[list[Tensor], list[Tensor]]:
    """Out and in factors, the per-component scale folded into the smallest in-factor: the
    same operands as scaling a product, a fraction of the elements written."""
    scale, outs, ins = _split(w, layer)
    k = w._smallest_in
    ins[k] = ins[k] * scale
    return outs, ins


def _prepare_factorized(w: CPFormat, layer: int | None) -> tuple[Tensor, ...]:
    # The Khatri-Rao products of the in- and out-factors: (in, R) and (out, R). In training
    # the factors themselves: _KhatriRaoGemms builds the products and rebuilds them in
    # backward rather than keeping them (they outgrow the dense weight once R > in * out /
    # (in + out)).
    outs, ins = _scaled(w, layer)
    if (
        torch.is_grad_enabled() and any(f.requires_grad for f in (*outs, *ins)) and not capturing()
    ):  # eager training (traced graphs keep the products: dynamo splits at the Function)
        return (*ins, *outs)
    return khatri_rao(ins), khatri_rao(outs)


def _apply_factorized(
    w: CPFormat, x: Tensor, ops: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor:
    if len(ops) == 2:  # the Khatri-Rao products (inference, or kept by merge())
        return apply_two_gemms(w, x, ops, bias)
    y = _KhatriRaoGemms.apply(x, w._n_in, *ops)
    return y if bias is None else y + bias.to(y.dtype)  # bf16 under autocast, as F.linear


class _KhatriRaoGemms(torch.autograd.Function):
    """``(x @ KR(ins)) @ KR(outs).T`` keeping for backward only ``x``, the factors and, when
    it is no larger than the dense weight, ``h = x @ KR(ins)`` ``(batch, R)`` (else ``h``
    is recomputed, one more GEMM): the ``(features, R)`` Khatri-Rao products are rebuilt
    there (element-wise work of their size, against the batch-times-larger GEMMs)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, n_in: int, *factors: Tensor) -> Tensor:
        ins, outs = factors[:n_in], factors[n_in:]
        k_in, k_out = khatri_rao(ins), khatri_rao(outs)
        h = x @ k_in
        ctx.n_in, ctx.keep_h = n_in, h.numel() <= k_in.shape[0] * k_out.shape[0]
        ctx.save_for_backward(x, h if ctx.keep_h else None, *factors)
        return h @ k_out.T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, h, *factors = ctx.saved_tensors
        ins, outs = factors[: ctx.n_in], factors[ctx.n_in :]
        dt = grad.dtype  # under autocast the forward ran in a lower precision than the factors
        k_in, k_out = khatri_rao(ins).to(dt), khatri_rao(outs).to(dt)
        if h is None:
            h = x.to(dt) @ k_in
        grad_h = grad @ k_out  # (batch, R)
        grad_x = (grad_h @ k_in.T).to(x.dtype) if ctx.needs_input_grad[0] else None
        grads = khatri_rao_grad(ins, (x.to(dt).T @ grad_h).to(ins[0].dtype))
        grads += khatri_rao_grad(outs, (grad.T @ h.to(dt)).to(outs[0].dtype))
        return (grad_x, None, *grads)


def _work_factorized(s: WeightShape, batch: int) -> Work:
    R = s.rank
    # in training, h = x @ KR(ins) is recomputed in backward when larger than the weight
    again = [(batch, s.in_features, R, 1)] if batch * R > s.in_features * s.out_features else []
    return Work(
        [],
        two_gemm_work(batch, s, R),
        prepare_numel=(s.in_features + s.out_features) * R,
        recomputed=again,
        prepare_buffers=(s.in_features * R, s.out_features * R),
    )


def _prepare_sequential(w: CPFormat, layer: int | None) -> tuple[Tensor, ...]:
    # In the order the apply uses them (bound at construction: the last in-factor, the
    # other in-factors last to first, then the out-factors), the per-component scale folded
    # into the smallest in-factor. Read straight from the registries: at batch 1 this list
    # handling is a fair share of the call.
    factors = listed(member(w, "factors"))
    ops = [factors[k] for k in w._sequential_order]
    at = w._sequential_scaled
    ops[at] = ops[at] * _component_scale(w, factors, layer)
    return tuple(ops)


def _apply_sequential(
    w: CPFormat, x: Tensor, ops: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor:
    # Mode by mode, never forming a Khatri-Rao product: one GEMM on the last in mode,
    # element-wise folds of the other in modes, then the mirror image on the out side.
    # Cheap when batch * R is small (e.g. training at batch 1), costly otherwise. Every
    # reshape leaves the batch to -1 and every size was bound at construction: at batch 1
    # this runs in about as much Python as its kernels' own bindings.
    R, n_in = w.rank, w._n_in
    t = torch.mm(x.reshape(-1, w._last_in), ops[0])  # (B * i_1..i_{n-1}, R)
    for k, size in enumerate(w._folds, 1):  # fold i_k: (B * i_1..i_{k-1}, i_k, R) -> sum
        t = (t.view(-1, size, R) * ops[k]).sum(1)
    for k in range(n_in, len(ops) - 1):  # (B, o_1..o_{j-1}, R) -> (B, o_1..o_j, R)
        t = t.unsqueeze(-2) * ops[k]
    return add_bias(F.linear(t.view(-1, R), ops[-1]).view(-1, w.out_features), bias)


def _work_sequential(s: WeightShape, batch: int) -> Work:
    R, ins, outs, B = s.rank, s.in_modes, s.out_modes, batch
    # a product of B * prod(ins[:k+1]) * R, then its sum; the out side's products
    buffers: list[int] = []
    for k in range(len(ins) - 1):
        buffers += [B * R * math.prod(ins[: k + 1]), B * R * math.prod(ins[:k])]
    for k in range(len(outs) - 1):
        buffers.append(B * R * math.prod(outs[: k + 1]))
    apply = [
        (B * s.in_features // ins[-1], ins[-1], R, 1),
        (B * s.out_features // outs[-1], R, outs[-1], 1),
    ]
    # prepare: the scale folded into the smallest in-factor (and the layer row into it)
    scaled = R * (min(ins) + (1 if s.n_layers > 1 else 0))
    calls = 2 * (len(ins) - 1) + len(outs) - 1  # the folds and the out-side products
    return Work(
        [],
        apply,
        prepare_numel=scaled,
        apply_numel=sum(buffers),
        extra_calls=calls,
        apply_buffers=tuple(buffers),
    )


def _reconstruction(s: WeightShape) -> tuple[list, int]:
    return [(s.out_features, s.rank, s.in_features, 1)], 0


class CPFormat(FactorizedMatrix):
    """``weights (R,)`` and ``factors``: ``[layer (L, R)]``, out ``(o_k, R)``, in ``(i_k, R)``."""

    name = "cp"
    aliases = ("parafac",)
    rank_kind = "int"
    tensorly_type = "CPTensor"
    curve_fraction_limit = 2.0  # ALS costs grow as R^3
    rank: int
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            _apply_factorized,
            _work_factorized,
            "x through the Khatri-Rao products of the in and out factors (two GEMMs)",
        ),
        reconstructed(_reconstruction),
        Strategy(
            "sequential",
            _prepare_sequential,
            _apply_sequential,
            _work_sequential,
            "mode by mode without Khatri-Rao products; cheap when batch * R is small",
        ),
    )

    # ---------------------------------------------------------------- rank policy

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        # prod(all sizes) / max(size): a rank at which CP always represents the tensor
        # exactly (a larger CP rank never helps).
        sizes = _sizes(in_modes, out_modes, n_layers)
        return (math.prod(sizes) // max(sizes),)

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        return int(rank) * (1 + sum(_sizes(in_modes, out_modes, n_layers)))

    # ---------------------------------------------------------------- parameters

    def _build(self, factory: dict) -> None:
        R = self.rank
        self.weights = nn.Parameter(torch.empty(R, **factory))
        sizes = _sizes(self.in_modes, self.out_modes, self.n_layers)
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(n, R, **factory)) for n in sizes])
        self._n_out, self._n_in = len(self.out_modes), len(self.in_modes)
        self._smallest_in = min(range(len(self.in_modes)), key=self.in_modes.__getitem__)
        # bound for the sequential strategy: the first GEMM's mode, then the folded modes
        self._last_in, self._folds = self.in_modes[-1], tuple(self.in_modes[-2::-1])
        # and the order its operands are read in: indices into ``factors``
        first = self._first_in = (1 if self.n_layers > 1 else 0) + self._n_out
        ins = list(range(first, first + self._n_in))[::-1]
        self._sequential_order = (*ins, *range(first - self._n_out, first))
        self._sequential_scaled = self._n_in - 1 - self._smallest_in

    def _to_matrix(self, layer: int | None) -> Tensor:
        scale, outs, ins = _split(self, layer)
        return (khatri_rao(outs) * scale) @ khatri_rao(ins).T

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        # The rows' out-factor entries multiplied together (n, R); then, for many rows, one
        # GEMM with the Khatri-Rao product of the in factors (in, R). For few rows that
        # product outweighs the rows: each row's weights take the in factors after the first
        # ((n, in / in_1, R), never in x R), and one batched GEMM contracts the first.
        scale, outs, ins = _split(self, layer)
        digits, n = self.row_digits(index), len(index)
        h = pick(outs[0], digits[0])
        for f, d in zip(outs[1:], digits[1:]):
            h = h * pick(f, d)
        h = h * scale
        if not _few_rows(n, self.in_modes):
            return h @ khatri_rao(ins).T
        y = h.unsqueeze(1)  # (n, 1, R): in digits appended least significant first
        for f in ins[1:]:
            y = (y.unsqueeze(2) * f).reshape(n, -1, self.rank)
        return torch.matmul(ins[0], y.transpose(1, 2)).reshape(n, self.in_features)

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        R, m, modes = shape.rank, len(shape.out_modes), shape.in_modes
        if _few_rows(n, modes):
            rest = shape.in_features // modes[0]
            grown = sum(math.prod(modes[1 : k + 1]) for k in range(1, len(modes)))
            return Work([], [(modes[0], R, rest, n)], apply_numel=n * R * (m + 1 + grown))
        return Work(
            [],
            [(n, R, shape.in_features, 1)],
            prepare_numel=shape.in_features * R,
            apply_numel=n * R * (m + 1),
        )

    def _init_factors(self, std: float) -> None:
        nn.init.ones_(self.weights)
        sigma = balanced_std(std, self.rank, len(self.factors))
        for f in self.factors:
            nn.init.normal_(f, 0.0, sigma)
            # Exact column norms make the diagonal of ||W||^2 exact, so the std is right
            # even when the rank is too large to measure it afterwards.
            f.mul_(sigma * math.sqrt(f.shape[0]) / f.norm(dim=0).clamp_min(1e-30))

    def _layer_slice(self, layer: int) -> Tensor:
        return self.factors[0][layer]

    def _in_mode_factors(self) -> list[tuple[nn.Parameter, int]]:
        return [(f, 0) for f in list(self.factors)[self._first_in :]]  # (i_k, R)

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        scale, outs, ins = _split(self, layer)
        factors = [f.double() for f in outs + ins]
        if self.rank > 4096:
            return None  # R x R Gram matrices would cost more memory than the init is worth
        scale = scale.double()
        total = (scale * torch.stack([f.sum(0) for f in factors]).prod(0)).sum()
        gram = factors[0].T @ factors[0]
        for f in factors[1:]:
            gram = gram * (f.T @ f)
        return float(total), float(scale @ gram @ scale)

    def _scaled_factors(self) -> list[nn.Parameter]:
        return list(self.factors)

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        result = decompose.cp_als(tensor, self.rank, **kwargs)
        # ALS weights are column norms (>= 0); spread them evenly over the factors so that no
        # factor carries all the scale, which keeps later fine-tuning well conditioned.
        weights, factors = result.weights, result.factors
        share = weights.clamp_min(0) ** (1.0 / len(factors))
        values = {"weights": (weights > 0).to(weights.dtype)}
        for k, f in enumerate(factors):
            values[f"factors.{k}"] = f * share
        return values

    # ---------------------------------------------------------------- compression hooks

    @classmethod
    def error_curve(
        cls,
        weight: Tensor,
        in_modes: Modes,
        out_modes: Modes,
        n_layers: int,
        fractions: Sequence[float],
        decomposition_kwargs: dict[str, Any],
    ) -> list[Option]:
        """The rank at each candidate fraction with the error of a short CP-ALS run (at most
        10 iterations, ``tol=1e-3``): an estimate of what ``from_linear``'s longer ALS
        reaches. Candidates whose ALS would exceed ``cp_als``'s work guard are skipped."""
        lead = (n_layers,) if n_layers > 1 else ()
        X = weight.reshape(*lead, *out_modes, *in_modes)  # float32 stays float32 (2x faster)
        norm_sq = float(X.double().pow(2).sum())
        kwargs = decomposition_kwargs
        options = {"tol": 1e-3, **kwargs, "n_iter_max": min(10, kwargs.get("n_iter_max", 10))}
        curve = []
        for r in sorted({1, *_curves.family(cls, in_modes, out_modes, n_layers, fractions)}):
            try:
                result = decompose.cp_als(X, r, **options)
            except ValueError:
                if r == 1:  # bad options: say so
                    raise
                continue  # a rank too costly to run (cp_als's max_iter_flops)
            error = result.errors[-1] ** 2 * norm_sq
            curve.append((cls.param_count(in_modes, out_modes, r, n_layers), error, r))
        return curve

    # ---------------------------------------------------------------- TensorLy

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """A ``CPTensor``; with a layer mode, its first factor is the layer factor."""
        from tensorly.cp_tensor import CPTensor

        return CPTensor((convert(self.weights), [convert(f) for f in self.factors]))

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        from tensorly.cp_tensor import CPTensor

        n_layers = layer_count(obj.shape, in_modes, out_modes)
        if not isinstance(obj, CPTensor) or n_layers is None:
            return None
        weights, factors = convert(obj.weights), [convert(f) for f in obj.factors]
        module = cls.empty(
            in_modes,
            out_modes,
            int(weights.shape[0]),
            n_layers,
            device=weights.device,
            dtype=weights.dtype,
        )
        values = {"weights": weights, **{f"factors.{k}": f for k, f in enumerate(factors)}}
        module.load_values(values)
        return module
