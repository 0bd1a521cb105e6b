"""The dense format: the weight stored as is (the uncompressed reference)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import FactorizedMatrix


class DenseMatrix(FactorizedMatrix):
    """``weight``: ``(out, in)``, or ``(n_layers, out, in)`` with a layer mode."""

    name = "dense"

    def _build(self, factory: dict) -> None:
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        self.weight = nn.Parameter(
            torch.empty(*lead, self.out_features, self.in_features, **factory)
        )

    def _to_matrix(self, layer: int | None) -> Tensor:
        return self.weight if layer is None else self.weight[layer]

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        return (self._to_matrix(layer),)

    def _apply_factorized(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

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
