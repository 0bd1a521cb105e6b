"""CP (canonical polyadic) format: a sum of R rank-one tensors.

``W[l, o_1..o_m, i_1..i_n] = sum_r weights[r] * A_layer[l, r] * prod_k A_k[o_k|i_k, r]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import decompose
from .._ops import khatri_rao
from .base import FactorizedMatrix, add_bias, balanced_std, two_gemms


class CPMatrix(FactorizedMatrix):
    """``weights (R,)`` and ``factors``: ``[layer (L, R)]``, out ``(o_k, R)``, in ``(i_k, R)``."""

    name = "cp"
    strategies = ("factorized", "reconstructed", "sequential")

    def _build(self, factory: dict) -> None:
        R = self.rank
        self.weights = nn.Parameter(torch.empty(R, **factory))
        sizes = self._sizes()
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(n, R, **factory)) for n in sizes])

    def _sizes(self) -> tuple[int, ...]:
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        return lead + self.out_modes + self.in_modes

    def _split(self, layer: int | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Per-component scales (weights times the layer's row), out factors, in factors."""
        factors = list(self.factors)
        scale = self.weights
        if self.n_layers > 1:
            scale = scale * factors.pop(0)[layer]
        m = len(self.out_modes)
        return scale, factors[:m], factors[m:]

    def _to_matrix(self, layer: int | None) -> Tensor:
        scale, outs, ins = self._split(layer)
        return (khatri_rao(outs) * scale) @ khatri_rao(ins).T

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        # The Khatri-Rao products of the in- and out-factors: (in, R) and (out, R).
        scale, outs, ins = self._split(layer)
        return khatri_rao(ins) * scale, khatri_rao(outs)

    def _apply_factorized(self, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        return two_gemms(x, a, b, bias)

    def _prepare_sequential(self, layer: int | None) -> tuple[Tensor, ...]:
        scale, outs, ins = self._split(layer)
        return (scale, *ins, *outs)

    def _apply_sequential(self, x: Tensor, scale: Tensor, *factors: Tensor, bias=None) -> Tensor:
        # Mode by mode, never forming a Khatri-Rao product: one GEMM on the last in mode,
        # element-wise folds of the other in modes, then the mirror image on the out side.
        # Cheap when batch * R is small (e.g. training at batch 1), costly otherwise.
        n, R, B = len(self.in_modes), self.rank, x.shape[0]
        ins, outs = factors[:n], factors[n:]
        t = (x.reshape(-1, self.in_modes[-1]) @ ins[-1]).reshape(B, -1, R)
        for k in reversed(range(n - 1)):
            t = (t.reshape(B, -1, self.in_modes[k], R) * ins[k]).sum(2)
        u = (t.reshape(B, R) * scale).reshape(B, 1, R)
        for f in outs[:-1]:
            u = (u.unsqueeze(2) * f).reshape(B, -1, R)
        return add_bias(F.linear(u.reshape(-1, R), outs[-1]).reshape(B, -1), bias)

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

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        scale, outs, ins = self._split(layer)
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
