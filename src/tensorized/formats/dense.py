"""The dense format: the weight stored as is (the uncompressed reference)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._shapes import Modes
from ._strategy import Strategy, WeightShape, Work
from .base import FactorizedMatrix, Option, layer_count, member


def _prepare(w: DenseFormat, layer: int | None) -> tuple[Tensor, ...]:
    weight = member(w, "weight")
    return (weight if layer is None else weight[layer],)


def _work(s: WeightShape, batch: int) -> Work:
    return Work([], [(batch, s.in_features, s.out_features, 1)])


class DenseFormat(FactorizedMatrix):
    """``weight``: ``(out, in)``, or ``(n_layers, out, in)`` with a layer mode."""

    name = "dense"
    rank_kind = "none"
    closed_form_exact = True
    unplanned_strategy = "factorized"  # both strategies are the one stored GEMM
    strategies = (
        Strategy(
            "factorized",
            _prepare,
            lambda w, x, ops, b: F.linear(x, ops[0], b),
            _work,
            "one GEMM with the stored matrix",
        ),
        Strategy(
            "reconstructed",
            _prepare,
            lambda w, x, ops, b: F.linear(x, ops[0], b),
            _work,
            "the same: the matrix is stored",
        ),
    )

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        return ()

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        return n_layers * math.prod(out_modes) * math.prod(in_modes)

    def _build(self, factory: dict) -> None:
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        self.weight = nn.Parameter(
            torch.empty(*lead, self.out_features, self.in_features, **factory)
        )

    def _to_matrix(self, layer: int | None) -> Tensor:
        return self.weight if layer is None else self.weight[layer]

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        return Work([], [], apply_numel=n * shape.in_features)  # a gather of stored rows

    def _init_factors(self, std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.weight[layer]

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.weight]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        if kwargs:
            raise TypeError(f"the dense format takes no decomposition options, got {kwargs}")
        return {"weight": tensor.reshape(self.weight.shape)}

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
        return [(cls.param_count(in_modes, out_modes, None, n_layers), 0.0, None)]

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """The weight itself (exact)."""
        self._to_matrix(layer).copy_(weight)
        return True

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """A plain tensor ``([L,] *out, *in)``."""
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        return convert(self.weight.reshape(*lead, *self.out_modes, *self.in_modes))

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        is_array = isinstance(obj, Tensor) or type(obj).__module__.startswith("numpy")
        n_layers = layer_count(getattr(obj, "shape", ()), in_modes, out_modes)
        if not is_array or n_layers is None:
            return None
        dense = convert(obj).reshape(n_layers, math.prod(out_modes), math.prod(in_modes))
        module = cls.empty(
            in_modes, out_modes, "same", n_layers, device=dense.device, dtype=dense.dtype
        )
        module.load_values({"weight": dense if n_layers > 1 else dense[0]})
        return module
