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
from .base import FactorizedMatrix, add_bias, balanced_std, two_gemms


class TuckerMatrix(FactorizedMatrix):
    """``core ([L,] *out_ranks, *in_ranks)``; ``factors``: out ``(o_k, r_k)``, in ``(i_k, r_k)``."""

    name = "tucker"
    strategies = ("factorized", "reconstructed", "kron")

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

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        m = len(self.out_modes)
        core = self._core(layer).reshape(math.prod(self.rank[:m]), -1)
        return (core, *list(self.factors))  # list(): older torch.compile cannot unpack it

    def _apply_factorized(self, x: Tensor, core: Tensor, *factors: Tensor, bias=None) -> Tensor:
        # Mode by mode, always on the last axis so each step is one plain GEMM; the new axis
        # is then rotated to the front (after the batch), which after all modes restores the
        # original order. (Non-negative dims: the legacy ONNX exporter rejects movedim(-1, .).)
        m, batch = len(self.out_modes), x.shape[0]
        t = x.reshape(batch, *self.in_modes)
        for f in reversed(factors[m:]):  # project onto the in-factors: i_k -> r_k
            t = mode_dot(t, f.T, t.ndim - 1).movedim(t.ndim - 1, 1)
        t = (t.reshape(batch, -1) @ core.T).reshape(batch, *self.rank[:m])
        for f in reversed(factors[:m]):  # expand with the out-factors: r_k -> o_k
            t = mode_dot(t, f, t.ndim - 1).movedim(t.ndim - 1, 1)
        return add_bias(t.reshape(batch, self.out_features), bias)

    def _prepare_kron(self, layer: int | None) -> tuple[Tensor, ...]:
        # Kronecker products of the factors, (in, R_in) and (out, R_out); the core is folded
        # into the side with the larger rank so that the apply step is two GEMMs through
        # min(R_in, R_out).
        m = len(self.out_modes)
        factors = list(self.factors)  # a list, not a ParameterList slice, for torch.compile
        k_in, k_out = _kron(factors[m:]), _kron(factors[:m])
        core = self._core(layer).reshape(k_out.shape[1], k_in.shape[1])
        if k_in.shape[1] <= k_out.shape[1]:
            return k_in, k_out @ core
        return (core @ k_in.T).T, k_out

    def _apply_kron(self, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        return two_gemms(x, a, b, bias)

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


def _kron(factors: list[Tensor]) -> Tensor:
    """Kronecker product of ``(n_k, r_k)`` matrices -> ``(prod n_k, prod r_k)``, row-major."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :, None] * f[None, :, None, :]).reshape(
            out.shape[0] * f.shape[0], out.shape[1] * f.shape[1]
        )
    return out
