"""Strategies: one way of computing ``x @ W.T`` for a format, with the work it costs.

A :class:`Strategy` keeps side by side the code that computes (``prepare``: work on the
weight alone; ``apply``: work on the input) and the :class:`Work` the planner counts for it
(the matrix products the code runs, and its element-wise traffic). The planner
(:func:`tensorized.make_plan`) only reads :class:`Work`; the tests check it against the FLOPs
and copies the code really makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .._ops import capturing

if TYPE_CHECKING:
    from .base import FactorizedMatrix

__all__ = ["Gemm", "Strategy", "WeightShape", "Work"]

#: ``(m, k, n, count)``: ``count`` products of one ``(m, k)`` matrix by a ``(k, n)`` matrix.
Gemm = tuple[int, int, int, int]


@dataclass(frozen=True)
class WeightShape:
    """What the cost model needs of a factorized weight: shapes only, no tensors.

    Plain constants (hashable), so that planning under ``torch.compile`` sees no module.

    Attributes:
        name: the registered format name.
        in_modes, out_modes: the tensorized shape.
        rank: the concrete rank.
        n_layers: size of the layer mode.
        param_shapes: ``(parameter name, shape)`` of every parameter, in registration order.
        num_params: total parameters.
    """

    name: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rank: Any
    n_layers: int
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    num_params: int

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    def shapes(self, prefix: str) -> list[tuple[int, ...]]:
        """Shapes of the parameters named ``prefix`` or ``prefix.k`` (a ParameterList)."""
        return [s for n, s in self.param_shapes if n == prefix or n.startswith(prefix + ".")]


@dataclass(frozen=True)
class Work:
    """The work of one strategy at one batch size, as the code does it.

    Attributes:
        prepare: matrix products on the weight alone (paid per call unless the operands
            are cached with :meth:`FactorizedLinear.merge`).
        apply: matrix products on the input.
        prepare_numel: elements written by element-wise work in ``prepare``.
        apply_numel: elements written by element-wise work on the input (its backward
            reduces over the broadcast dims: about twice again).
        copied_numel: elements copied between the products of ``apply``.
        extra_calls: element-wise kernel calls in ``apply`` beyond the products.
        recomputed: products run once more in backward, in training (intermediates
            recomputed there rather than kept for it).
        prepare_buffers: the element count of each buffer that ``prepare``'s element-wise
            work writes, where one may be large (the rebuilt ``W``): the planner adds the
            cost of first touching those of at least ``FRESH_BUFFER_BYTES``.
        apply_buffers: the same for ``apply``'s element-wise work (``apply_numel`` in
            buffers).
    """

    prepare: list[Gemm]
    apply: list[Gemm]
    prepare_numel: int = 0
    apply_numel: int = 0
    copied_numel: int = 0
    extra_calls: int = 0
    recomputed: list[Gemm] = field(default_factory=list)
    prepare_buffers: tuple[int, ...] = ()
    apply_buffers: tuple[int, ...] = ()


Prepare = Callable[[Any, Any], tuple[Tensor, ...]]
Apply = Callable[[Any, Tensor, tuple[Tensor, ...], "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Strategy:
    """One way to compute ``x @ W.T + b`` for a format.

    Attributes:
        name: its name, unique within the format (``'factorized'``, ``'reconstructed'``,
            ``'kron'``, ...); a layer's ``implementation`` names it.
        prepare: ``(weight, layer index or None) -> operands``: the work on the weight alone.
        apply: ``(weight, x (batch, in), operands, bias) -> (batch, out)``.
        work: ``(WeightShape, batch) -> Work``: what the planner counts.
        summary: one line for the docs and ``Plan`` tables.
    """

    name: str
    prepare: Prepare = field(repr=False)
    apply: Apply = field(repr=False)
    work: Callable[[WeightShape, int], Work] = field(repr=False)
    summary: str = ""
    #: The format class that declares it (set when the class is created): strategies are
    #: pickled by reference to it, so modules holding one pickle and deep-copy.
    owner: type | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple:
        if self.owner is None:
            raise TypeError(f"strategy {self.name!r} belongs to no format class: cannot pickle")
        return (_declared, (self.owner, self.name))

    def __call__(
        self, weight: FactorizedMatrix, x: Tensor, layer: int | None, bias: Tensor | None = None
    ) -> Tensor:
        """``x (batch, in) -> (batch, out)`` for a validated ``layer``."""
        return self.apply(weight, x, self.prepare(weight, layer), bias)


def _declared(owner: type, name: str) -> Strategy:
    """The strategy ``name`` declared by format class ``owner`` (unpickling)."""
    return next(s for s in owner.strategies if s.name == name)  # type: ignore[attr-defined]


def reconstructed(reconstruction: Callable[[WeightShape], tuple[list[Gemm], int]]) -> Strategy:
    """The strategy that rebuilds ``W`` (``weight._to_matrix``), then runs one GEMM.

    Args:
        reconstruction: ``WeightShape -> (products, element-wise numel)`` of the format's
            ``_to_matrix``.
    """

    def work(shape: WeightShape, batch: int) -> Work:
        products, numel = reconstruction(shape)
        apply = [(batch, shape.in_features, shape.out_features, 1)]
        rebuilt = rebuilds_in_backward(shape.in_features, shape.out_features, batch)
        return Work(
            products,
            apply,
            prepare_numel=numel + shape.out_features * shape.in_features,
            recomputed=list(products) if rebuilt else [],  # _RebuiltWeight, in training
            prepare_buffers=(shape.out_features * shape.in_features,),
        )

    return Strategy(
        "reconstructed",
        _prepare_rebuilt,
        _apply_rebuilt,
        work,
        "rebuild W from the factors, then one GEMM",
    )


def rebuilds_in_backward(in_features: int, out_features: int, batch: int) -> bool:
    """Whether a training step at ``batch`` rows rebuilds ``W`` in backward rather than
    keeping the reconstruction's intermediates: where the activations reach a quarter of
    ``W``'s size, so that the intermediates (about ``W``'s size) weigh in the saved memory.
    At smaller batches the rebuild would cost most of the step's time (it doubled the
    reconstruction's share at batch 32) for memory that the batch does not need."""
    return 4 * batch * (in_features + out_features) >= in_features * out_features


class _Deferred:
    """``prepare``'s operand in eager training: ``apply`` makes ``W`` knowing the batch."""

    __slots__ = ("layer", "weight")

    def __init__(self, weight: Any, layer: int | None) -> None:
        self.weight, self.layer = weight, layer

    def matrix(self, rows: int) -> Tensor:
        w = self.weight
        params = tuple(w.parameters())
        if rebuilds_in_backward(w.in_features, w.out_features, rows) and any(
            p.requires_grad for p in params
        ):
            return _RebuiltWeight.apply(w, self.layer, *params)
        return w._to_matrix(self.layer)


def _prepare_rebuilt(w: Any, layer: int | None) -> tuple[Any]:
    if torch.is_grad_enabled() and not capturing():
        return (_Deferred(w, layer),)
    return (w._to_matrix(layer),)


def _apply_rebuilt(w: Any, x: Tensor, ops: tuple[Any, ...], bias: Tensor | None) -> Tensor:
    W = ops[0].matrix(x.shape[0]) if isinstance(ops[0], _Deferred) else ops[0]
    return F.linear(x, W, bias)


class _RebuiltWeight(torch.autograd.Function):
    """``W = weight._to_matrix(layer)`` in training without keeping the reconstruction's
    intermediates (partial products of the factors, often as large as ``W`` again): backward
    rebuilds ``W`` from the parameters and runs the reconstruction's backward. What stays
    saved is ``W`` itself, which the GEMM keeps as ``nn.Linear`` keeps its weight."""

    @staticmethod
    def forward(ctx: Any, weight: Any, layer: int | None, *params: Tensor) -> Tensor:
        ctx.weight, ctx.layer = weight, layer
        ctx.save_for_backward(*params)  # nothing copied: in-place changes are still caught
        with torch.no_grad():
            return weight._to_matrix(layer)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[2:]) if need]
        with torch.enable_grad():
            rebuilt = _rebuild_from(ctx.weight, ctx.layer, params)
        found = iter(torch.autograd.grad(rebuilt, wanted, grad, allow_unused=True))
        grads = [next(found) if need else None for need in ctx.needs_input_grad[2:]]
        return (None, None, *grads)


def _rebuild_from(weight: Any, layer: int | None, params: tuple[Tensor, ...]) -> Tensor:
    """``weight._to_matrix(layer)`` from ``params``, the tensors the forward read (under
    ``torch.func.functional_call`` they are not the module's own by the time backward runs):
    each is put in its parameter's slot for the rebuild, then the slot is restored."""
    slots = []
    for (name, _), p in zip(weight.named_parameters(), params):
        owner_name, _, attr = name.rpartition(".")
        owner = weight.get_submodule(owner_name) if owner_name else weight
        slots.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = p
    try:
        return weight._to_matrix(layer)
    finally:
        for owner, attr, old in slots:
            owner._parameters[attr] = old


def two_gemms(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ a) @ b.T + bias``: the apply step of every rank-``r`` factor pair."""
    return F.linear(x @ a, b, bias)


def apply_two_gemms(w: Any, x: Tensor, ops: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
    """``apply`` of a strategy whose operands are ``(a (in, r), b (out, r))``."""
    return F.linear(x @ ops[0], ops[1], bias)


def two_gemm_work(batch: int, shape: WeightShape, mid: int) -> list[Gemm]:
    """The apply products of :func:`apply_two_gemms` through a middle dimension ``mid``."""
    return [(batch, shape.in_features, mid, 1), (batch, mid, shape.out_features, 1)]
