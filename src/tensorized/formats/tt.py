"""Tensor-train format over the modes ``([L,] *out_modes, *in_modes)``.

Core k has shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``; a layer mode is an extra
leading core ``(1, n_layers, r_1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from ..ranks import train_modes
from .base import FactorizedMatrix, add_bias, balanced_std, two_gemms


class TrainMatrix(FactorizedMatrix):
    """Shared machinery of the train formats ('tt' and 'blocktt'): ``cores`` in a chain.

    Subclasses create ``self.cores`` (the first being the layer core ``(1, L, r)`` when
    ``n_layers > 1``) and implement the contraction.
    """

    def _layer_cores(self, layer: int | None) -> list[Tensor]:
        """The cores of one layer: the layer core's row is absorbed into the next core."""
        cores = list(self.cores)
        if self.n_layers == 1:
            return cores
        row = cores[0][0, layer]  # (r,)
        nxt = cores[1]
        merged = (row @ nxt.reshape(nxt.shape[0], -1)).reshape(1, *nxt.shape[1:])
        return [merged, *cores[2:]]

    def _chain(self, layer: int | None) -> Tensor:
        """Product of the train of one layer, as a flat tensor in core order."""
        return _product(self._layer_cores(layer))

    def _init_factors(self, std: float) -> None:
        # Each entry sums prod(ranks) products of len(cores) core entries: the per-core std
        # must shrink with the product of the ranks, not with one rank.
        sigma = balanced_std(std, math.prod(self.rank), len(self.cores))
        for c in self.cores:
            nn.init.normal_(c, 0.0, sigma)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.cores[0][:, layer]

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        # Sweep the train with the all-ones vector (sum) and with itself (sum of squares).
        ones = self.cores[0].new_ones(1, 1, dtype=torch.float64)
        total, gram = ones, ones
        for c in self._layer_cores(layer):
            c = c.double().reshape(c.shape[0], -1, c.shape[-1])
            total = total @ c.sum(1)
            gram = torch.einsum("ab,anc,bnd->cd", gram, c, c)
        return float(total.squeeze()), float(gram.squeeze())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return list(self.cores)


class TTMatrix(TrainMatrix):
    """``cores``: one ``(r_{k-1}, n_k, r_k)`` tensor per mode of ``([L,] *out, *in)``."""

    name = "tt"
    strategies = ("factorized", "reconstructed", "halves")

    def _build(self, factory: dict) -> None:
        modes = train_modes(self.name, self.in_modes, self.out_modes, self.n_layers)
        ranks = (1, *self.rank, 1)
        self.cores = nn.ParameterList(
            [
                nn.Parameter(torch.empty(ranks[k], n, ranks[k + 1], **factory))
                for k, n in enumerate(modes)
            ]
        )

    def _to_matrix(self, layer: int | None) -> Tensor:
        return self._chain(layer).reshape(self.out_features, self.in_features)

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        return tuple(self._layer_cores(layer))

    def _apply_factorized(self, x: Tensor, *cores: Tensor, bias: Tensor | None) -> Tensor:
        m, batch = len(self.out_modes), x.shape[0]
        t = x
        for c in reversed(cores[m:]):  # absorb the in modes, last first: -> (batch, r_m)
            t = t.reshape(-1, c.shape[1] * c.shape[2]) @ c.reshape(c.shape[0], -1).T
        # Expand the out modes, last first, with the batch as the last axis: t is
        # (r_k, out modes done, batch), so each step is one plain GEMM on a contiguous view
        # (a batch-first layout needs a broadcast matmul, which copies its operands).
        t = t.T  # (r_m, batch), a transposed view that the GEMM reads as is
        for c in reversed(cores[:m]):
            t = c.reshape(-1, c.shape[-1]) @ t.reshape(c.shape[-1], -1)
        return add_bias(t.reshape(self.out_features, batch).T, bias)

    def _prepare_halves(self, layer: int | None) -> tuple[Tensor, ...]:
        # Multiply out each half of the train: (in, r_m) and (out, r_m).
        cores = self._layer_cores(layer)
        m = len(self.out_modes)
        out_half = _product(cores[:m]).reshape(self.out_features, -1)
        in_half = _product(cores[m:]).reshape(-1, self.in_features)
        return in_half.T, out_half

    def _apply_halves(self, x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        return two_gemms(x, a, b, bias)

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        cores = decompose.tensor_train(tensor, self.rank, **kwargs)
        return {f"cores.{k}": c for k, c in enumerate(cores)}


def _product(cores: list[Tensor]) -> Tensor:
    """Multiply out a train ``(r_0, ..., r_k)`` left to right -> ``(r_0 * sizes, r_k)``."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return t
