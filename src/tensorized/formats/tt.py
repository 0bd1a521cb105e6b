"""Tensor-train format over the modes ``([L,] *out_modes, *in_modes)``.

Core k has shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``; a layer mode is an extra
leading core ``(1, n_layers, r_1)``. :class:`TrainFormat` holds what the plain tensor train
('tt') and the TT-matrix ('blocktt') share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import decompose
from .._ops import (
    kronecker_whiten,
    mode_dot,
    sliced_matmul,
    sliced_matmul_work,
    symmetric_root,
)
from .._shapes import Modes
from . import _curves
from ._strategy import Gemm, Strategy, WeightShape, Work, apply_two_gemms, reconstructed
from .base import (
    FactorizedMatrix,
    Option,
    add_bias,
    balanced_std,
    chain_work,
    layer_count,
    listed,
    member,
)


def product(cores: list[Tensor]) -> Tensor:
    """Multiply out a train ``(r_0, ..., r_k)`` left to right -> ``(r_0 * sizes, r_k)``."""
    t = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return t


def layer_shapes(s: WeightShape) -> list[tuple[int, ...]]:
    """Core shapes of one layer, as :meth:`TrainFormat.layer_cores` returns them."""
    shapes = s.shapes("cores")
    if s.n_layers > 1:
        shapes = [(1, *shapes[1][1:]), *shapes[2:]]
    return shapes


def layer_merge_work(s: WeightShape) -> list[Gemm]:
    """The product that absorbs the layer core's row into the next core."""
    if s.n_layers == 1:
        return []
    nxt = s.shapes("cores")[1]
    return [(1, nxt[0], math.prod(nxt[1:]), 1)]


def train_reconstruction(s: WeightShape) -> tuple[list[Gemm], int]:
    return layer_merge_work(s) + chain_work(layer_shapes(s)), 0


class TrainFormat(FactorizedMatrix):
    """Shared machinery of the train formats: ``cores`` in a chain, the first being the
    layer core ``(1, L, r)`` when ``n_layers > 1``; ranks are the inner bond ranks."""

    rank_kind = "tuple"
    rank: tuple[int, ...]
    cores: nn.ParameterList

    @classmethod
    def train_modes(cls, in_modes: Modes, out_modes: Modes, n_layers: int) -> Modes:
        """Mode sizes along the train (the layer mode first, if any)."""
        raise NotImplementedError

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        modes = cls.train_modes(in_modes, out_modes, n_layers)
        return tuple(
            min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :])) for k in range(len(modes) - 1)
        )

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        modes = cls.train_modes(in_modes, out_modes, n_layers)
        full = (1, *rank, 1)
        return sum(full[k] * modes[k] * full[k + 1] for k in range(len(modes)))

    @classmethod
    def rank_help(cls, n: int) -> str:
        return f"{n} inner ranks (or {n + 2} with the boundary 1s)"

    @classmethod
    def normalize_rank_tuple(cls, rank: tuple[int, ...], caps: tuple[int, ...]) -> tuple:
        if len(rank) == len(caps) + 2 and rank[0] == rank[-1] == 1:
            return rank[1:-1]  # the boundary ranks (1, r_1, ..., r_{d-1}, 1)
        return rank

    def layer_cores(self, layer: int | None) -> list[Tensor]:
        """The cores of one layer: the layer core's row is absorbed into the next core."""
        cores = listed(member(self, "cores"))
        if self.n_layers == 1:
            return cores
        row = cores[0][0, layer]  # (r,)
        nxt = cores[1]
        merged = (row @ nxt.reshape(nxt.shape[0], -1)).reshape(1, *nxt.shape[1:])
        return [merged, *cores[2:]]

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
        for c in self.layer_cores(layer):
            c = c.double().reshape(c.shape[0], -1, c.shape[-1])
            total = total @ c.sum(1)
            gram = torch.einsum("ab,anc,bnd->cd", gram, c, c)
        return float(total.squeeze()), float(gram.squeeze())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return list(self.cores)

    @classmethod
    def _train_tensor(cls, X: Tensor, n_layers: int, n_out: int) -> Tensor:
        """The tensorized weight ``([L,] *out, *in)`` in train order."""
        return X

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
        """Exact error of the TT-SVD that ``from_linear`` runs (Oseledets, SIAM J. Sci.
        Comput. 33(5), 2011): the sum of the energies discarded at each step of the sweep,
        each step from the eigendecomposition of the smaller Gram matrix of the unfolding."""
        lead = (n_layers,) if n_layers > 1 else ()
        X = weight.to(torch.float64).reshape(*lead, *out_modes, *in_modes)
        norm_sq = float(X.pow(2).sum())
        sizes = cls.train_modes(in_modes, out_modes, n_layers)
        T = cls._train_tensor(X, n_layers, len(out_modes)).reshape(sizes)
        # Float32 sweeps are 3x faster and precise enough for a curve, unless W is float64.
        T = T.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        caps = cls.rank_caps(in_modes, out_modes, n_layers)

        def count(rank: Any) -> int:
            return cls.param_count(in_modes, out_modes, rank, n_layers)

        tails = []
        for k in range(len(caps)):
            M = T.reshape(math.prod(sizes[: k + 1]), -1)
            vals = torch.linalg.eigvalsh(_curves.gram(M)).flip(-1).clamp_min(0)
            tails.append(_curves.tails(vals))
        members = _curves.sample(_curves.chain(tails, caps, count), count, _curves.CHAIN_SAMPLES)
        family = _curves.family(cls, in_modes, out_modes, n_layers, fractions)
        ranks = list(dict.fromkeys([*members, *family]))
        return sorted((count(r), _tt_svd_error_sq(T, r, norm_sq), r) for r in ranks)


def _tt_svd_error_sq(T: Tensor, rank: tuple[int, ...], norm_sq: float) -> float:
    """Squared error of the TT-SVD of ``T`` (train layout) at ``rank``: each step only needs
    the leading singular subspace and the discarded energy."""
    sizes, C, kept, error = T.shape, T, 1, 0.0
    for k, r in enumerate(rank):
        C = C.reshape(kept * sizes[k], -1)
        left = C.shape[0] <= C.shape[1]
        vals, vecs = torch.linalg.eigh(C @ C.T if left else C.T @ C)
        kept = min(r, len(vals))
        error += float(vals[: len(vals) - kept].clamp_min(0).sum())
        top, vals = vecs[:, len(vals) - kept :], vals[len(vals) - kept :]
        # U_r^T C, (kept, rest): with right singular vectors V_r it is diag(s_r) V_r^T
        C = top.T @ C if left else (top * vals.clamp_min(0).sqrt()).T
    return min(error, norm_sq)


# ---------------------------------------------------------------- the plain tensor train


def _prepare_factorized(w: TTFormat, layer: int | None) -> tuple[Tensor, ...]:
    return tuple(w.layer_cores(layer))


def _apply_factorized(
    w: TTFormat, x: Tensor, cores: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor:
    # The sizes come bound from construction (``_in_steps``/``_out_steps``).
    t = x
    for k, cols, r in w._in_steps:  # absorb the in modes, last first: -> (batch, r_m)
        t = F.linear(t.reshape(-1, cols), cores[k].view(r, cols))
    # Expand the out modes, last first, with the batch as the last axis: t is
    # (r_k, out modes done, batch), so each step is one plain GEMM on a contiguous view
    # (a batch-first layout needs a broadcast matmul, which copies its operands).
    t = t.T  # (r_m, batch), a transposed view that the GEMM reads as is
    for k, rows, r in w._out_steps:
        t = torch.mm(cores[k].view(rows, r), t.reshape(r, -1))
    return add_bias(t.reshape(w.out_features, -1).T, bias)


def _work_factorized(s: WeightShape, batch: int) -> Work:
    m = len(s.out_modes)
    cores = layer_shapes(s)
    out, rows = [], batch * s.in_features
    for r, i, r_next in reversed(cores[m:]):
        rows //= i
        out.append((rows, i * r_next, r, 1))
    rest = batch  # the out side runs with the batch as the last axis (plain GEMMs)
    for r, o, r_next in reversed(cores[:m]):
        out.append((r * o, r_next, rest, 1))
        rest *= o
    return Work(layer_merge_work(s), out)


def _prepare_halves(w: TTFormat, layer: int | None) -> tuple[Tensor, ...]:
    # Multiply out each half of the train: (in, r_m) and (out, r_m).
    cores = w.layer_cores(layer)
    m = len(w.out_modes)
    out_half = product(cores[:m]).reshape(w.out_features, -1)
    in_half = product(cores[m:]).reshape(-1, w.in_features)
    return in_half.T, out_half


def _work_halves(s: WeightShape, batch: int) -> Work:
    m = len(s.out_modes)
    cores = layer_shapes(s)
    r = cores[m][0]
    prepare = layer_merge_work(s) + chain_work(cores[:m]) + chain_work(cores[m:])
    apply = [(batch, s.in_features, r, 1), (batch, r, s.out_features, 1)]
    return Work(prepare, apply, prepare_numel=(s.in_features + s.out_features) * r)


class TTFormat(TrainFormat):
    """``cores``: one ``(r_{k-1}, n_k, r_k)`` tensor per mode of ``([L,] *out, *in)``."""

    name = "tt"
    tensorly_type = "TTTensor"
    whitened_curve = True
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            _apply_factorized,
            _work_factorized,
            "absorb the in-cores, last first, then expand the out-cores",
        ),
        reconstructed(train_reconstruction),
        Strategy(
            "halves",
            _prepare_halves,
            apply_two_gemms,
            _work_halves,
            "multiply out the in-cores and the out-cores, then two GEMMs (a low-rank layer)",
        ),
    )

    @classmethod
    def train_modes(cls, in_modes: Modes, out_modes: Modes, n_layers: int) -> Modes:
        lead = (n_layers,) if n_layers > 1 else ()
        return lead + tuple(out_modes) + tuple(in_modes)

    def _build(self, factory: dict) -> None:
        modes = self.train_modes(self.in_modes, self.out_modes, self.n_layers)
        ranks = (1, *self.rank, 1)
        self.cores = nn.ParameterList(
            [
                nn.Parameter(torch.empty(ranks[k], n, ranks[k + 1], **factory))
                for k, n in enumerate(modes)
            ]
        )
        # The factorized strategy's products over one layer's cores (the layer core, if
        # any, is absorbed into the next): (core index, columns or rows, rank it contracts).
        shapes = [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(modes)][
            -len(self.in_modes) - len(self.out_modes) :
        ]
        m = len(self.out_modes)
        self._in_steps = tuple(
            (k, shapes[k][1] * shapes[k][2], shapes[k][0]) for k in reversed(range(m, len(shapes)))
        )
        self._out_steps = tuple(
            (k, (shapes[k][0] if k else 1) * shapes[k][1], shapes[k][2]) for k in reversed(range(m))
        )

    def _to_matrix(self, layer: int | None) -> Tensor:
        return product(self.layer_cores(layer)).reshape(self.out_features, self.in_features)

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        # Per row, the chain of the out cores' slices at its digits (batched products of
        # (1, r) by (r, r')), then one GEMM with the multiplied-out in cores (r_m, in).
        cores, m = self.layer_cores(layer), len(self.out_modes)
        digits = self.out_digits(index)
        h = cores[0][0].index_select(0, digits[0]).unsqueeze(1)  # (n, 1, r_1)
        for c, d in zip(cores[1:m], digits[1:]):
            h = sliced_matmul(h, c.transpose(0, 1), d)
        h = h.squeeze(1)
        right = product(cores[m:]).reshape(cores[m].shape[0], self.in_features)
        return h @ right

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        shapes, m = layer_shapes(shape), len(shape.out_modes)
        prepare = layer_merge_work(shape) + chain_work(shapes[m:])
        apply: list[Gemm] = []
        numel, calls = n * shapes[0][2], 0
        for c in shapes[1:m]:
            products, moved, extra = sliced_matmul_work(n, 1, c[0], c[2], c[1])
            apply, numel, calls = apply + products, numel + moved, calls + extra
        apply.append((n, shapes[m][0], shape.in_features, 1))
        return Work(prepare, apply, apply_numel=numel, extra_calls=calls)

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        cores = decompose.tensor_train(tensor, self.rank, **kwargs)
        return {f"cores.{k}": c for k, c in enumerate(cores)}

    def _in_mode_factors(self) -> list[tuple[nn.Parameter, int]]:
        return [(c, 1) for c in list(self.cores)[-len(self.in_modes) :]]  # (r, i_k, r')

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """Whitened TT-SVD, exact through the out-side bonds and the middle (out | in) bond.

        The train's bonds up to the middle one project the rows of the unfoldings, and a
        projection of rows commutes with ``W -> W S`` (``S = gram^{1/2}``): a TT-SVD sweep of
        ``W S`` over the out modes (Oseledets 2011) truncates each of those bonds in the
        norm ``||(W - What) S||_F`` that calibration minimizes, the middle one by the
        whitened truncated SVD of SVD-LLM (Wang et al., 2024). What remains right of the
        middle bond, ``(r_m, in) S^{-1}``, is split over the in modes in the
        Kronecker-whitened norm (see :meth:`fit_kronecker_whitened`); exact when those bonds
        are full. With full side bonds the fit is the whitened SVD at the middle rank. Joint
        layers share the cores: no per-layer closed form (``False``).
        """
        if self.n_layers > 1:
            return False
        m = len(self.out_modes)
        root, inverse = symmetric_root(gram.double())
        whitened = (weight.double() @ root).reshape(*self.out_modes, self.in_features)
        left = decompose.tensor_train(whitened, self.rank[:m])  # m out cores, (r_m, in, 1)
        middle = self.rank[m - 1]
        rest = (left[-1].reshape(middle, self.in_features) @ inverse).reshape(
            middle, *self.in_modes
        )
        rest, inverses = kronecker_whiten(rest, gram.double(), self.in_modes, 1)
        right = decompose.tensor_train(rest, (middle, *self.rank[m:]))  # (1, r_m, r_m) first
        cores = left[:-1]
        cores[-1] = cores[-1] @ right[0].reshape(middle, middle)
        cores += [mode_dot(c, inv, 1) for c, inv in zip(right[1:], inverses)]
        for param, core in zip(self.cores, cores):
            param.copy_(core)
        return True

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """A ``TTTensor``; a layer core ``(1, L, r)`` comes first."""
        from tensorly.tt_tensor import TTTensor

        return TTTensor([convert(c) for c in self.cores])

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        from tensorly.tt_tensor import TTTensor

        n_layers = layer_count(obj.shape, in_modes, out_modes)
        if not isinstance(obj, TTTensor) or n_layers is None:
            return None
        return _train_from_cores(
            cls, [convert(c) for c in obj.factors], in_modes, out_modes, n_layers
        )


def _train_from_cores(
    cls: type[TrainFormat], cores: list[Tensor], in_modes: Modes, out_modes: Modes, n_layers: int
) -> FactorizedMatrix:
    rank = tuple(int(c.shape[-1]) for c in cores[:-1])
    module = cls.empty(
        in_modes, out_modes, rank, n_layers, device=cores[0].device, dtype=cores[0].dtype
    )
    module.load_values({f"cores.{k}": c for k, c in enumerate(cores)})
    return module
