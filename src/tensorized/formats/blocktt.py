"""TT-matrix format (also BlockTT, TTM, MPO): one core per (out_k, in_k) pair.

Core k has shape ``(r_{k-1}, out_k, in_k, r_k)`` with ``r_0 = r_m = 1``; a layer mode is an
extra leading core ``(1, n_layers, r_0')``. Needs as many in modes as out modes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .._ops import prefix_chain, prefix_chain_work, prefix_merges
from .._shapes import Modes
from ._strategy import Gemm, Strategy, WeightShape, Work, reconstructed
from .base import FactorizedMatrix, add_bias
from .tt import (
    TrainFormat,
    _train_from_cores,
    layer_merge_work,
    layer_shapes,
    product,
    train_reconstruction,
)


def _prepare_factorized(w: BlockTTFormat, layer: int | None) -> tuple[Tensor, ...]:
    # Each core (r, o, i, r') as the matrix (o * r', r * i) that the sweep multiplies by.
    return tuple(
        c.permute(1, 3, 0, 2).reshape(c.shape[1] * c.shape[3], c.shape[0] * c.shape[2])
        for c in w.layer_cores(layer)
    )


def _apply_factorized(
    w: BlockTTFormat, x: Tensor, mats: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor:
    # Core by core, each one plain GEMM: t is the matrix (r_{k-1} * in_k * in_>k, columns)
    # whose columns are (batch, out_<k); the product (out_k * r_k, in_>k * columns) then
    # moves out_k behind the columns (one copy), so the next core's (r_k, in_{k+1}) lead.
    # (A batch-first sweep needs broadcast batched GEMMs of batch * out_<k tiny products,
    # several times slower on CPU.) The sizes are bound at construction (``_steps``).
    t = x.T
    cols = x.shape[0]
    for mat, (o, k, rest) in zip(mats, w._steps):
        y = mat @ t.reshape(k, rest * cols)  # (out_k * r_k, in_>k * columns)
        t = y.view(o, -1, cols).permute(1, 2, 0)  # (r_k * in_>k, columns, out_k)
        cols *= o
    return add_bias(t.reshape(x.shape[0], w.out_features), bias)


def _products(s: WeightShape, batch: int) -> list[tuple[int, int, int, int]]:
    out, cols, rest = [], batch, s.in_features
    for r, o, i, r_next in layer_shapes(s):
        rest //= i
        out.append((o * r_next, r * i, rest * cols, 1))
        cols *= o
    return out


def _work_factorized(s: WeightShape, batch: int) -> Work:
    products = _products(s, batch)
    # x.T is copied once to be read as (in_1, in_>1 * batch) when batch > 1; each product
    # is copied once as it moves out_k behind the columns (none when out_k == 1).
    copied = s.in_features * batch if batch > 1 else 0
    shapes = layer_shapes(s)
    copied += sum(m * n for (m, _, n, _), shape in zip(products, shapes) if shape[1] > 1)
    return Work(layer_merge_work(s), products, prepare_numel=s.num_params, copied_numel=copied)


class BlockTTFormat(TrainFormat):
    """``cores``: ``[(1, L, r)]`` with a layer mode, then ``(r_{k-1}, out_k, in_k, r_k)``."""

    name = "blocktt"
    aliases = ("ttm", "tt-matrix", "ttmatrix", "mpo")
    tensorly_type = "TTMatrix"
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            _apply_factorized,
            _work_factorized,
            "core by core, each (out_k, in_k) pair in one batched GEMM",
        ),
        reconstructed(train_reconstruction),
    )

    @classmethod
    def check_modes(cls, in_modes: Modes, out_modes: Modes) -> None:
        if len(in_modes) != len(out_modes):
            raise ValueError(
                f"factorization='blocktt' pairs each out mode with an in mode, so it needs as "
                f"many in modes as out modes; got in modes {tuple(in_modes)} and out modes "
                f"{tuple(out_modes)}"
            )

    @classmethod
    def train_modes(cls, in_modes: Modes, out_modes: Modes, n_layers: int) -> Modes:
        lead = (n_layers,) if n_layers > 1 else ()
        return lead + tuple(o * i for o, i in zip(out_modes, in_modes))

    @classmethod
    def _train_tensor(cls, X: Tensor, n_layers: int, n_out: int) -> Tensor:
        # ([L,] out_1..out_m, in_1..in_m) -> ([L,] out_1, in_1, ..., out_m, in_m)
        lead = 1 if n_layers > 1 else 0
        perm = list(range(lead))
        for k in range(n_out):
            perm += [lead + k, lead + n_out + k]
        return X.permute(perm)

    def _build(self, factory: dict) -> None:
        lead = 1 if self.n_layers > 1 else 0
        ranks = (1, *self.rank, 1)
        shapes: list[tuple[int, ...]] = [(1, self.n_layers, ranks[1])] if lead else []
        for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes)):
            shapes.append((ranks[k + lead], o, i, ranks[k + lead + 1]))
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(s, **factory)) for s in shapes])
        # The factorized sweep over one layer's cores (the layer row absorbed, so the first
        # left rank is 1): (out_k, r_{k-1} * in_k, prod of the in modes after k).
        steps, rest = [], self.in_features
        for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes)):
            rest //= i
            steps.append((o, (ranks[k + lead] if k else 1) * i, rest))
        self._steps = tuple(steps)

    def _to_matrix(self, layer: int | None) -> Tensor:
        m = len(self.out_modes)
        pairs = [n for o, i in zip(self.out_modes, self.in_modes) for n in (o, i)]
        perm = list(range(0, 2 * m, 2)) + list(range(1, 2 * m, 2))
        t = product(self.layer_cores(layer)).reshape(pairs).permute(perm)
        return t.reshape(self.out_features, self.in_features)

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        # Per row, the chain of the cores' slices at its out digits (prefix_chain), run from
        # the end that costs less; from the right, each core's bond axes swap and the row's
        # in digits come out last-first.
        cores, n = self.layer_cores(layer), len(index)
        single = self.host_digits(index)
        if single is not None:  # one row: views of the slices, one product per core
            h = cores[0][0, single[0]]  # (i_1, r_1)
            for c, d in zip(cores[1:], single[1:]):
                h = (h @ c[:, d].reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
            return h.reshape(1, self.in_features)
        digits = self.out_digits(index)
        reverse, merge = _row_plan(self.signature, n)
        if not reverse:
            return prefix_chain([c.transpose(0, 1) for c in cores], digits, merge).reshape(
                n, self.in_features
            )
        flipped = [c.permute(1, 3, 2, 0) for c in reversed(cores)]  # (o, r_k, i, r_{k-1})
        h = prefix_chain(flipped, digits[::-1], merge)
        m = len(cores)
        h = h.reshape(n, *reversed(self.in_modes)).permute(0, *range(m, 0, -1))
        return h.reshape(n, self.in_features)

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        reverse, merge = _row_plan(shape, n)
        products, numel, calls = _chain_work(layer_shapes(shape), n, reverse, merge)
        return Work(layer_merge_work(shape), products, apply_numel=numel, extra_calls=calls)

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        cores = decompose.tensor_train_matrix(tensor, len(self.out_modes), self.rank, **kwargs)
        return {f"cores.{k}": c for k, c in enumerate(cores)}

    def _in_mode_factors(self) -> list[tuple[nn.Parameter, int]]:
        lead = 1 if self.n_layers > 1 else 0
        return [(c, 2) for c in list(self.cores)[lead:]]  # (r, o_k, i_k, r')

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """A ``TTMatrix``; the layer core becomes ``(1, L, 1, r)``: row modes ``(L, *out)``,
        column modes ``(1, *in)``."""
        from tensorly.tt_matrix import TTMatrix

        cores = list(self.cores)
        if self.n_layers > 1:
            cores[0] = cores[0].unsqueeze(2)
        return TTMatrix([convert(c) for c in cores])

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        from tensorly.tt_matrix import TTMatrix

        if not isinstance(obj, TTMatrix):
            return None
        shape = tuple(int(n) for n in obj.shape)  # (*row modes, *column modes)
        rows, cols = shape[: len(shape) // 2], shape[len(shape) // 2 :]
        n_layers = 1
        if len(rows) == len(out_modes) + 1 and cols[0] == 1:
            n_layers, rows, cols = rows[0], rows[1:], cols[1:]
        if (rows, cols) != (tuple(out_modes), tuple(in_modes)):
            return None
        cores = [convert(c) for c in obj.factors]
        if n_layers > 1:
            cores[0] = cores[0].squeeze(2)
        return _train_from_cores(cls, cores, in_modes, out_modes, n_layers)


# Element moves weighed against multiply-adds when choosing a lookup's direction (a copied
# element costs about as much as 16 FLOPs at GEMM rate on the CPUs measured).
_MOVE_FLOPS = 16


def _chain_work(
    shapes: list[tuple[int, ...]], n: int, reverse: bool, merge: tuple[bool, ...]
) -> tuple[list[Gemm], int, int]:
    if not reverse:
        return prefix_chain_work(shapes, n, merge)
    flipped = [(r2, o, i, r) for r, o, i, r2 in reversed(shapes)]
    products, numel, calls = prefix_chain_work(flipped, n, merge)
    # the cores copied to their flipped layout, the rows' in digits put back in order
    numel += sum([math.prod(c) for c in shapes]) + n * math.prod([c[2] for c in shapes])
    return products, numel, calls


@functools.lru_cache(maxsize=1024)
def _row_plan(shape: WeightShape, n: int) -> tuple[bool, tuple[bool, ...]]:
    """``(reverse, merge)`` for a lookup of ``n`` rows of one layer of ``shape``: the chain
    runs from the right when that costs less (FLOPs plus weighed element moves)."""
    shapes, best = layer_shapes(shape), None
    for reverse in (False, True):  # plain loops: dynamo traces this under torch.compile
        modes = [c[1] for c in (reversed(shapes) if reverse else shapes)]
        merge = prefix_merges(modes, n)
        products, numel, _ = _chain_work(shapes, n, reverse, merge)
        cost = sum([2 * m * k * p * c for m, k, p, c in products]) + _MOVE_FLOPS * numel
        if best is None or cost < best[0]:
            best = (cost, reverse, merge)
    assert best is not None
    return best[1], best[2]
