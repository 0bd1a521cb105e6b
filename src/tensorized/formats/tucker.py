"""Tucker format: a small core multiplied by one factor matrix per mode.

``W[l] = core[l] x_1 U_1 ... x_{m+n} U_{m+n}``; a leading layer mode is not compressed (the
core has a leading ``n_layers`` dimension and the factors are shared by all layers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .._ops import mode_dot
from .base import FactorizedMatrix, balanced_std


class TuckerMatrix(FactorizedMatrix):
    """``core ([L,] *out_ranks, *in_ranks)``; ``factors``: out ``(o_k, r_k)``, in ``(i_k, r_k)``."""

    name = "tucker"

    def _build(self, factory: dict) -> None:
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        self.core = nn.Parameter(torch.empty(*lead, *self.rank, **factory))
        sizes = self.out_modes + self.in_modes
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, **factory)) for n, r in zip(sizes, self.rank)]
        )

    def _core(self, layer: int | None) -> Tensor:
        return self.core if layer is None else self.core[layer]

    def _to_matrix(self, layer: int | None) -> Tensor:
        t = self._core(layer)
        for k, f in enumerate(self.factors):
            t = mode_dot(t, f, k)
        return t.reshape(self.out_features, self.in_features)

    def _contract(self, x: Tensor, layer: int | None) -> Tensor:
        m = len(self.out_modes)
        t = x.reshape(-1, *self.in_modes)
        for k, f in enumerate(self.factors[m:]):  # project onto the in-factors
            t = mode_dot(t, f.T, k + 1)
        core = self._core(layer).reshape(math.prod(self.rank[:m]), -1)
        t = (t.reshape(t.shape[0], -1) @ core.T).reshape(-1, *self.rank[:m])
        for k, f in enumerate(self.factors[:m]):  # expand with the out-factors
            t = mode_dot(t, f, k + 1)
        return t.reshape(-1, self.out_features)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, math.prod(self.rank), 1 + len(self.factors))
        nn.init.normal_(self.core, 0.0, sigma)
        for f in self.factors:
            nn.init.normal_(f, 0.0, sigma)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.core[layer]

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        core = self._core(layer).double()
        factors = [f.double() for f in self.factors]
        total, projected = core, core
        for k, f in enumerate(factors):
            total = mode_dot(total, f.sum(0, keepdim=True), k)
            projected = mode_dot(projected, f.T @ f, k)
        return float(total.sum()), float((core * projected).sum())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.core, *self.factors]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        lead = [None] if self.n_layers > 1 else []
        result = decompose.tucker(tensor, lead + list(self.rank), **kwargs)
        values = {"core": result.core}
        for k, f in enumerate(result.factors[len(lead) :]):
            values[f"factors.{k}"] = f
        return values
