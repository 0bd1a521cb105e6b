"""Plain low-rank format ``W = U diag(s) V^T`` of the untensorized matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .base import FactorizedMatrix, balanced_std, two_gemms


class LowRankMatrix(FactorizedMatrix):
    """``U (L, out, r)``, ``s (L, r)``, ``V (L, in, r)`` with ``L = n_layers`` (always kept).

    The modes are only used for bookkeeping; the matrix is not tensorized.
    """

    name = "lowrank"

    def _build(self, factory: dict) -> None:
        L, r = self.n_layers, self.rank
        self.U = nn.Parameter(torch.empty(L, self.out_features, r, **factory))
        self.s = nn.Parameter(torch.empty(L, r, **factory))
        self.V = nn.Parameter(torch.empty(L, self.in_features, r, **factory))

    def _to_matrix(self, layer: int | None) -> Tensor:
        i = 0 if layer is None else layer
        return (self.U[i] * self.s[i]) @ self.V[i].T

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        i = 0 if layer is None else layer
        return self.V[i] * self.s[i], self.U[i]

    def _apply_factorized(self, x: Tensor, vs: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
        return two_gemms(x, vs, u, bias)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, self.rank, 2)
        nn.init.normal_(self.U, 0.0, sigma)
        nn.init.normal_(self.V, 0.0, sigma)
        nn.init.ones_(self.s)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.s[layer]

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        i = 0 if layer is None else layer
        U, V = self.U[i].double() * self.s[i].double(), self.V[i].double()
        return float(U.sum(0) @ V.sum(0)), float(((U.T @ U) * (V.T @ V)).sum())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        matrix = tensor.reshape(self.n_layers, self.out_features, self.in_features)
        U, S, V = decompose.lowrank(matrix, self.rank, **kwargs)
        return {"U": U, "s": S, "V": V}
