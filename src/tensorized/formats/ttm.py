"""TT-matrix format (also BlockTT, TTM, MPO): one core per (out_k, in_k) pair.

Core k has shape ``(r_{k-1}, out_k, in_k, r_k)`` with ``r_0 = r_m = 1``; a layer mode is an
extra leading core ``(1, n_layers, r_0')``. Needs as many in modes as out modes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .base import add_bias
from .tt import TrainMatrix


class TTMMatrix(TrainMatrix):
    """``cores``: ``[(1, L, r)]`` with a layer mode, then ``(r_{k-1}, out_k, in_k, r_k)``."""

    name = "blocktt"

    def _build(self, factory: dict) -> None:
        lead = 1 if self.n_layers > 1 else 0
        ranks = (1, *self.rank, 1)
        shapes = [(1, self.n_layers, ranks[1])] if lead else []
        for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes)):
            shapes.append((ranks[k + lead], o, i, ranks[k + lead + 1]))
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(s, **factory)) for s in shapes])

    def _to_matrix(self, layer: int | None) -> Tensor:
        m = len(self.out_modes)
        pairs = [n for o, i in zip(self.out_modes, self.in_modes) for n in (o, i)]
        perm = list(range(0, 2 * m, 2)) + list(range(1, 2 * m, 2))
        t = self._chain(layer).reshape(pairs).permute(perm)
        return t.reshape(self.out_features, self.in_features)

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        # Each core (r, o, i, r') as the matrix (o * r', r * i) that the sweep multiplies by.
        return tuple(
            c.permute(1, 3, 0, 2).reshape(c.shape[1] * c.shape[3], c.shape[0] * c.shape[2])
            for c in self._layer_cores(layer)
        )

    def _apply_factorized(self, x: Tensor, *mats: Tensor, bias: Tensor | None) -> Tensor:
        # Sweep left to right; t is laid out as (batch, out_<k, r_{k-1}, in_k, in_>k).
        t = x
        rest = self.in_features
        for mat, i in zip(mats, self.in_modes):
            rest //= i
            t = mat @ t.reshape(-1, mat.shape[1], rest)
        return add_bias(t.reshape(x.shape[0], self.out_features), bias)

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        cores = decompose.tensor_train_matrix(tensor, len(self.out_modes), self.rank, **kwargs)
        return {f"cores.{k}": c for k, c in enumerate(cores)}
