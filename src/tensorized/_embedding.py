"""``FactorizedEmbedding``: an embedding table kept in a tensor-factorized format.

The table ``(num_embeddings, embedding_dim)`` is a :class:`~tensorized.FactorizedMatrix`
whose rows are the "out" side (``out_modes`` split the vocabulary) and whose columns are the
"in" side. A lookup computes only the rows it is asked for, from the factor slices those
rows use (:meth:`FactorizedMatrix.rows`), each distinct index once; the table is never built
unless rebuilding is cheaper (many indices into a small table).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._bound import BoundWeight
from ._index import normalize_index
from ._machine import on_change
from ._plan import estimate, work
from ._ranks import ConcreteRank, RankSpec
from ._shapes import Modes, factorize, tensorize_rows, validate_modes
from .formats import FactorizedMatrix, get_format
from .formats._strategy import WeightShape, Work

__all__ = ["EmbeddingView", "FactorizedEmbedding"]

#: Lookup strategies: per-row from the factor slices, or rebuild the table and gather.
LOOKUPS = ("rows", "reconstructed")

#: Rows are computed in chunks whose temporaries stay below this many elements (the
#: TT-matrix's gathered core slices grow as rows x rank^2 x mode).
CHUNK_NUMEL = 1 << 24
# Lookups of at most this many indices skip the dedup and, on the CPU, check their range on
# the host: a few kernels of fixed cost weigh more than the rows themselves.
_FEW = 16


class FactorizedEmbedding(BoundWeight):
    """An embedding table stored as a factorized tensor; a drop-in for ``nn.Embedding`` and
    ``tltorch.FactorizedEmbedding``.

    The table ``(num_embeddings, embedding_dim)`` is viewed as the tensor
    ``(*tensorized_num_embeddings, *tensorized_embedding_dim)`` and kept in the format
    ``factorization``. A vocabulary that factors badly (30522 = 2 x 3 x 5087) is padded to a
    well-factored size (30752 = 32 x 31 x 31); padding rows are never returned
    (:attr:`padded_rows` says how many). A lookup computes only the distinct rows it needs
    from the factors, so its memory grows with the number of distinct indices, not with the
    table, and gradients reach only the factor entries those rows use.

    Args:
        num_embeddings: rows of the table (the vocabulary).
        embedding_dim: columns (the embedding size).
        auto_tensorize: split both sizes into ``n_tensorized_modes`` modes automatically;
            ``False`` takes ``tensorized_num_embeddings`` and ``tensorized_embedding_dim``.
        n_tensorized_modes: number of modes of each side when auto-tensorizing.
        tensorized_num_embeddings: row modes (their product may exceed ``num_embeddings``:
            the extra rows are padding).
        tensorized_embedding_dim: column modes (their product must equal
            ``embedding_dim``).
        factorization: ``'blocktt'`` (the TT-matrix of TT-Rec, default), ``'tt'``,
            ``'cp'``, ``'tucker'``, ``'lowrank'``, ``'dense'`` or a registered format.
        rank: as for :class:`~tensorized.FactorizedLinear`: an int or tuple of concrete
            ranks, ``'same'``, or a float, the fraction of ``num_embeddings *
            embedding_dim`` to keep.
        n_layers: number of tables sharing one factorized tensor (``forward(x, indices=i)``).
        device: device of the parameters (``'meta'`` works).
        dtype: floating dtype of the parameters.
        padding_idx: a row that is always zero and gets no gradient, as in ``nn.Embedding``.
        implementation: ``'auto'`` (per lookup size, the cheaper of the two by the cost
            model), ``'rows'`` (from the factor slices) or ``'reconstructed'`` (rebuild the
            table, then gather).
        std: standard deviation of the fresh table's entries (``nn.Embedding``'s is 1).

    Shapes:
        ``input``: integer tensor of any shape ``(*)`` -> ``(*, embedding_dim)``.

    Example:
        >>> emb = FactorizedEmbedding(30522, 384, factorization="blocktt", rank=16)
        >>> emb(torch.tensor([[101, 2023, 102]])).shape
        torch.Size([1, 3, 384])
    """

    weight: FactorizedMatrix

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        tensorized_num_embeddings: Sequence[int] | None = None,
        tensorized_embedding_dim: Sequence[int] | None = None,
        factorization: str = "blocktt",
        rank: RankSpec = 8,
        n_layers: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        padding_idx: int | None = None,
        implementation: str = "auto",
        std: float = 1.0,
    ) -> None:
        super().__init__()
        row_modes, col_modes = table_modes(
            num_embeddings,
            embedding_dim,
            auto_tensorize,
            n_tensorized_modes,
            tensorized_num_embeddings,
            tensorized_embedding_dim,
        )
        fmt = get_format(factorization)
        rank = _table_rank(rank, num_embeddings, math.prod(row_modes))
        weight = fmt.empty(col_modes, row_modes, rank, n_layers, device=device, dtype=dtype)
        self._bind(weight, num_embeddings, padding_idx, implementation)
        self.reset_parameters(std)

    @classmethod
    def from_weight(
        cls,
        weight: FactorizedMatrix,
        num_embeddings: int | None = None,
        *,
        padding_idx: int | None = None,
        implementation: str = "auto",
    ) -> FactorizedEmbedding:
        """A table around an already built factorized weight (no initialization drawn): the
        construction path of :meth:`from_embedding` and :meth:`from_embedding_list`.

        Args:
            weight: a :class:`~tensorized.FactorizedMatrix` of shape ``(rows, embedding_dim)``
                (``out_modes`` split the rows); used as is, no copy.
            num_embeddings: the rows a lookup may ask for (default: all of ``weight``'s; fewer
                leaves the rest as padding).
            padding_idx: as in the constructor.
            implementation: as in the constructor.
        """
        if not isinstance(weight, FactorizedMatrix):
            raise TypeError(
                f"weight must be a tensorized.FactorizedMatrix, got {type(weight).__name__}"
            )
        table = cls.__new__(cls)
        nn.Module.__init__(table)
        rows = weight.out_features if num_embeddings is None else num_embeddings
        table._bind(weight, rows, padding_idx, implementation)
        return table

    def _bind(
        self,
        weight: FactorizedMatrix,
        num_embeddings: int,
        padding_idx: int | None,
        implementation: str,
    ) -> None:
        _check_int(num_embeddings, "num_embeddings", 1)
        if num_embeddings > weight.out_features:
            raise ValueError(
                f"num_embeddings={num_embeddings} exceeds the weight's {weight.out_features} rows"
            )
        self.weight = weight
        self.num_embeddings = num_embeddings
        self.padding_idx = _check_padding_idx(padding_idx, num_embeddings)
        self.implementation = implementation
        self._std = 1.0
        self._bind_weight()

    # ------------------------------------------------------------------ attributes

    @property
    def implementation(self) -> str:
        """``'auto'``, ``'rows'`` or ``'reconstructed'``."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value != "auto" and value not in LOOKUPS:
            raise ValueError(
                f"implementation must be 'auto' or one of {LOOKUPS} for an embedding, got {value!r}"
            )
        self._implementation = value

    @property
    def embedding_dim(self) -> int:
        return self.weight.in_features

    @property
    def factorization(self) -> str:
        return self.weight.name

    @property
    def tensorized_num_embeddings(self) -> Modes:
        return self.weight.out_modes

    @property
    def tensorized_embedding_dim(self) -> Modes:
        return self.weight.in_modes

    @property
    def tensorized_shape(self) -> tuple[Modes, Modes]:
        """``(tensorized_num_embeddings, tensorized_embedding_dim)``, as in tltorch."""
        return self.tensorized_num_embeddings, self.tensorized_embedding_dim

    @property
    def tensor_shape(self) -> tuple[Modes, Modes]:
        """tltorch's name for :attr:`tensorized_shape`."""
        return self.tensorized_shape

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(num_embeddings, embedding_dim)``, as in tltorch."""
        return self.num_embeddings, self.embedding_dim

    @property
    def padded_rows(self) -> int:
        """Rows of the factorized tensor beyond ``num_embeddings`` (never returned)."""
        return self.weight.out_features - self.num_embeddings

    @property
    def rank(self) -> ConcreteRank:
        return self.weight.rank

    @property
    def n_layers(self) -> int:
        return self.weight.n_layers

    @property
    def num_params(self) -> int:
        return self.weight.num_params

    def extra_repr(self) -> str:
        dense = self.n_layers * self.num_embeddings * self.embedding_dim
        layers = f", n_layers={self.n_layers}" if self.n_layers > 1 else ""
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        padded = f" (+{self.padded_rows} padding rows)" if self.padded_rows else ""
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, tensorized_shape="
            f"{self.tensorized_shape}{padded}, factorization={self.factorization!r}, "
            f"rank={self.rank}{layers}, implementation={self.implementation!r}, "
            f"params={self.num_params:,} vs dense {dense:,} "
            f"({dense / max(self.num_params, 1):.1f}x compression)"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # ------------------------------------------------------------------ init

    def reset_parameters(self, std: float | None = None) -> None:
        """Re-initialize so that the table's entries have standard deviation ``std``
        (default: the constructor's, 1 as in ``nn.Embedding``), measured exactly from the
        factors (see :meth:`FactorizedMatrix.reset_parameters`)."""
        if std is not None:
            if isinstance(std, bool) or not isinstance(std, int | float):
                raise TypeError(f"std must be a number, got {type(std).__name__} {std!r}")
            self._std = float(std)
        self.weight.reset_parameters(self._std)

    # ------------------------------------------------------------------ lookup

    def lookup_strategy(self, n_rows: int, *, training: bool | None = None) -> str:
        """The strategy a lookup of ``n_rows`` distinct rows uses: ``'rows'`` or
        ``'reconstructed'`` (the fixed ``implementation``, or the planner's choice)."""
        if self._implementation != "auto":
            return self._implementation
        weight, params = self._bound
        grad = (
            (torch.is_grad_enabled() and params[0].requires_grad) if training is None else training
        )
        return _plan(weight.signature, n_rows, params[0].dtype, params[0].device.type, grad)[0]

    def forward(self, input: Tensor, indices: int = 0) -> Tensor:
        """Rows ``input`` of table ``indices``.

        Args:
            input: integer (int64 or int32) tensor of row indices in
                ``[0, num_embeddings)``, any shape, on the parameters' device.
            indices: which table when ``n_layers > 1`` (as in ``FactorizedLinear``).

        Returns:
            ``(*input.shape, embedding_dim)``.
        """
        # Runs on every call: plain attribute reads of values bound at construction.
        weight, params = self._bound
        n = weight.n_layers
        if type(indices) is int and 0 <= indices < n:  # the common case, checked cheaply
            layer = indices if n > 1 else None
        elif n > 1:
            layer = normalize_index(indices, n)
        else:  # the same rule as with layers: only 0 or -1
            normalize_index(indices, 1)
            layer = None
        flat = self._check_input(input, params[0])
        if flat.numel() == 0:
            return params[0].new_zeros(*input.shape, weight.in_features)
        if flat.numel() <= _FEW or flat.is_meta or torch.compiler.is_compiling():
            rows = self._lookup(flat, layer)
        else:  # each distinct row once
            unique, inverse = torch.unique(flat, return_inverse=True)
            rows = self._lookup(unique, layer).index_select(0, inverse)
        return rows.reshape(*input.shape, weight.in_features)

    def _lookup(self, index: Tensor, layer: int | None) -> Tensor:
        weight, params = self._bound
        n = len(index)
        if self._implementation == "rows" and n <= _FEW:
            strategy, chunk = "rows", n
        else:
            grad = torch.is_grad_enabled() and params[0].requires_grad
            strategy, chunk = _plan(
                weight.signature, n, params[0].dtype, params[0].device.type, grad
            )
            if self._implementation != "auto":
                strategy = self._implementation
        if strategy == "reconstructed":
            rows = weight.to_matrix(layer).index_select(0, index)
        elif n <= chunk:
            rows = weight.rows(index, layer)
        else:
            rows = torch.cat([weight.rows(part, layer) for part in index.split(chunk)])
        if self.padding_idx is not None:  # a zero row; masked_fill passes it no gradient
            rows = rows.masked_fill((index == self.padding_idx).unsqueeze(-1), 0)
        return rows

    def _check_input(self, input: Tensor, param: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"input must be a torch.Tensor of row indices, got {type(input).__name__}"
            )
        if input.dtype is not torch.int64 and input.dtype is not torch.int32:
            raise TypeError(
                f"input must hold integer row indices (torch.int64 or torch.int32), got "
                f"dtype {input.dtype}"
            )
        if input.device != param.device and not param.is_meta:
            raise ValueError(
                f"input is on {input.device} but the embedding's parameters are on "
                f"{param.device}: move one (input.to({str(param.device)!r}))"
            )
        flat = input.reshape(-1)
        if flat.numel() == 0 or flat.is_meta:
            return flat
        if torch.compiler.is_compiling():
            torch._assert_async(
                ((flat >= 0) & (flat < self.num_embeddings)).all(),
                "FactorizedEmbedding: index out of range",
            )
            return flat
        if flat.numel() <= _FEW and flat.device.type == "cpu":  # on the host: no kernels
            values = flat.tolist()
            low_v, high_v = min(values), max(values)
        else:
            low, high = torch.aminmax(flat)
            low_v, high_v = int(low), int(high)
        if low_v < 0 or high_v >= self.num_embeddings:
            bad = low_v if low_v < 0 else high_v
            raise IndexError(
                f"input holds row index {bad}, outside [0, {self.num_embeddings}) for "
                f"num_embeddings={self.num_embeddings} (negative indices are not accepted)"
            )
        return flat

    # ------------------------------------------------------------------ layers

    def get_embedding(self, indices: int) -> EmbeddingView:
        """A module looking up table ``indices`` with the shared parameters (no copy)."""
        return EmbeddingView(self, normalize_index(indices, self.n_layers))

    def __getitem__(self, indices: int) -> EmbeddingView:
        return self.get_embedding(indices)

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self) -> Iterator[EmbeddingView]:
        return (self.get_embedding(i) for i in range(self.n_layers))

    @torch.no_grad()
    def to_embedding(self, indices: int = 0) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding a copy of table ``indices`` (rebuilt in full)."""
        i = normalize_index(indices, self.n_layers)
        table = self.weight.to_matrix(i if self.n_layers > 1 else None)[: self.num_embeddings]
        table = table.detach().clone()
        if self.padding_idx is not None:
            table[self.padding_idx] = 0
        return nn.Embedding(
            self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, _weight=table
        )

    # ------------------------------------------------------------------ conversion

    def to_tensorly(self) -> Any:
        """The table as a TensorLy object of shape ``([n_layers,] *tensorized_num_embeddings,
        *tensorized_embedding_dim)`` (padding rows included), as
        :meth:`FactorizedLinear.to_tensorly`; needs ``tensorly``."""
        from . import _interop

        return _interop.to_tensorly(self.weight)

    @classmethod
    def from_embedding(
        cls,
        embedding_layer: nn.Embedding,
        rank: RankSpec = 8,
        factorization: str = "blocktt",
        n_tensorized_modes: int = 2,
        decompose_weights: bool = True,
        auto_tensorize: bool = True,
        decomposition_kwargs: dict[str, Any] | None = None,
        *,
        tensorized_num_embeddings: Sequence[int] | None = None,
        tensorized_embedding_dim: Sequence[int] | None = None,
        implementation: str = "auto",
    ) -> FactorizedEmbedding:
        """Compress a trained ``nn.Embedding`` (tltorch's signature).

        Args:
            embedding_layer: the table to compress; its ``padding_idx`` is kept.
            rank: as in the constructor (a float: the fraction of the table's parameters).
            factorization: as in the constructor.
            n_tensorized_modes: modes per side when auto-tensorizing.
            decompose_weights: decompose the table (``False``: a fresh random table of the
                same shape).
            auto_tensorize: as in the constructor.
            decomposition_kwargs: passed to the format's decomposition.
            tensorized_num_embeddings: as in the constructor.
            tensorized_embedding_dim: as in the constructor.
            implementation: as in the constructor.
        """
        if not isinstance(embedding_layer, nn.Embedding):
            raise TypeError(
                f"embedding_layer must be a torch.nn.Embedding, got "
                f"{type(embedding_layer).__name__}"
            )
        return cls.from_embedding_list(
            [embedding_layer],
            rank,
            factorization,
            n_tensorized_modes,
            decompose_weights,
            auto_tensorize,
            decomposition_kwargs,
            tensorized_num_embeddings=tensorized_num_embeddings,
            tensorized_embedding_dim=tensorized_embedding_dim,
            implementation=implementation,
        )

    @classmethod
    def from_embedding_list(
        cls,
        embedding_layer_list: Sequence[nn.Embedding],
        rank: RankSpec = 8,
        factorization: str = "blocktt",
        n_tensorized_modes: int = 2,
        decompose_weights: bool = True,
        auto_tensorize: bool = True,
        decomposition_kwargs: dict[str, Any] | None = None,
        *,
        tensorized_num_embeddings: Sequence[int] | None = None,
        tensorized_embedding_dim: Sequence[int] | None = None,
        implementation: str = "auto",
    ) -> FactorizedEmbedding:
        """Factorize several same-shaped tables jointly into one tensor with a leading table
        mode (``n_layers = len(embedding_layer_list)``); arguments as in
        :meth:`from_embedding`."""
        tables = list(embedding_layer_list)
        if not tables:
            raise ValueError("embedding_layer_list is empty: give at least one nn.Embedding")
        for k, e in enumerate(tables):
            if not isinstance(e, nn.Embedding):
                raise TypeError(
                    f"embedding_layer_list[{k}] must be a torch.nn.Embedding, got "
                    f"{type(e).__name__}"
                )
            if e.max_norm is not None:
                raise ValueError(
                    f"nn.Embedding with max_norm={e.max_norm} renormalizes rows at lookup, "
                    f"which a factorized table cannot do; set max_norm=None first"
                )
        first = tables[0]
        for k, e in enumerate(tables[1:], start=1):
            if e.weight.shape != first.weight.shape or e.padding_idx != first.padding_idx:
                raise ValueError(
                    f"embedding_layer_list[{k}] has shape {tuple(e.weight.shape)} and "
                    f"padding_idx={e.padding_idx}, but [0] has {tuple(first.weight.shape)} and "
                    f"{first.padding_idx}: joint tables must match"
                )
        num, dim = first.weight.shape
        row_modes, col_modes = table_modes(
            num,
            dim,
            auto_tensorize,
            n_tensorized_modes,
            tensorized_num_embeddings,
            tensorized_embedding_dim,
        )
        fmt = get_format(factorization)
        rank = _table_rank(rank, num, math.prod(row_modes))
        weight_ref = first.weight
        if not decompose_weights:
            weight = fmt.empty(
                col_modes,
                row_modes,
                rank,
                len(tables),
                device=weight_ref.device,
                dtype=weight_ref.dtype,
            )
            weight.reset_parameters(1.0)
        else:
            with torch.no_grad():
                stacked = torch.stack([e.weight.detach() for e in tables])
                if first.padding_idx is not None:
                    stacked[:, first.padding_idx] = 0  # the row a lookup always returns as 0
                pad = math.prod(row_modes) - num
                if pad:  # zero rows: the decomposition spends nothing to fit them
                    stacked = torch.cat([stacked, stacked.new_zeros(len(tables), pad, dim)], 1)
                matrix = stacked if len(tables) > 1 else stacked[0]
            weight = fmt.from_matrix(
                matrix, col_modes, row_modes, rank, **(decomposition_kwargs or {})
            )
        return cls.from_weight(
            weight, num, padding_idx=first.padding_idx, implementation=implementation
        )


class EmbeddingView(nn.Module):
    """Table ``indices`` of a :class:`FactorizedEmbedding` with ``n_layers > 1``, sharing its
    parameters."""

    def __init__(self, parent: FactorizedEmbedding, indices: int) -> None:
        super().__init__()
        self.parent = parent
        self.indices = normalize_index(indices, parent.n_layers)

    @property
    def num_embeddings(self) -> int:
        return self.parent.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.parent.embedding_dim

    def forward(self, input: Tensor) -> Tensor:
        return self.parent(input, self.indices)

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` copy of this table."""
        return self.parent.to_embedding(self.indices)

    def __repr__(self) -> str:
        p = self.parent
        return (
            f"EmbeddingView(indices={self.indices} of {p.n_layers}, {p.num_embeddings}, "
            f"{p.embedding_dim}, factorization={p.factorization!r})"
        )


# ---------------------------------------------------------------------- helpers


def table_modes(
    num_embeddings: int,
    embedding_dim: int,
    auto_tensorize: bool,
    n_tensorized_modes: int,
    tensorized_num_embeddings: Sequence[int] | None,
    tensorized_embedding_dim: Sequence[int] | None,
) -> tuple[Modes, Modes]:
    """``(row modes, column modes)`` of a table; row modes may cover padding rows."""
    _check_int(num_embeddings, "num_embeddings", 1)
    _check_int(embedding_dim, "embedding_dim", 1)
    if not isinstance(auto_tensorize, bool):
        raise TypeError(f"auto_tensorize must be a bool, got {auto_tensorize!r}")
    given = tensorized_num_embeddings is not None or tensorized_embedding_dim is not None
    if not auto_tensorize or given:
        if tensorized_num_embeddings is None or tensorized_embedding_dim is None:
            raise ValueError(
                "give both tensorized_num_embeddings and tensorized_embedding_dim (or "
                "auto_tensorize=True)"
            )
        rows = validate_modes(tensorized_num_embeddings, None, "tensorized_num_embeddings")
        cols = validate_modes(tensorized_embedding_dim, embedding_dim, "tensorized_embedding_dim")
        if math.prod(rows) < num_embeddings:
            raise ValueError(
                f"tensorized_num_embeddings={rows} multiplies to {math.prod(rows)}, fewer than "
                f"num_embeddings={num_embeddings}; the modes must cover every row"
            )
        if len(rows) != len(cols):
            raise ValueError(
                f"tensorized_num_embeddings={rows} and tensorized_embedding_dim={cols} must "
                f"have as many modes"
            )
        return rows, cols
    _check_int(n_tensorized_modes, "n_tensorized_modes", 1)
    return tensorize_rows(num_embeddings, n_tensorized_modes), factorize(
        embedding_dim, n_tensorized_modes
    )


def _table_rank(rank: RankSpec, num_embeddings: int, padded: int) -> RankSpec:
    # A float rank is a fraction of the real table, not of the padded one.
    if isinstance(rank, float) and padded != num_embeddings:
        return rank * num_embeddings / padded
    return rank


def _check_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_padding_idx(padding_idx: object, num_embeddings: int) -> int | None:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(
            f"padding_idx must be an int or None, got {type(padding_idx).__name__} {padding_idx!r}"
        )
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"padding_idx={padding_idx} is out of range for num_embeddings={num_embeddings}"
        )
    return padding_idx % num_embeddings  # negative counts from the end, as in nn.Embedding


def _work_numel(w: Work) -> int:
    return w.apply_numel + sum(m * n * c for m, _, n, c in w.apply)


@functools.lru_cache(maxsize=4096)
def _plan(
    shape: WeightShape, n: int, dtype: torch.dtype, device_type: str, training: bool
) -> tuple[str, int]:
    """``(strategy, chunk)`` for a lookup of ``n`` distinct rows: per row from the factors
    unless rebuilding the table and gathering is cheaper by the cost model; rows per chunk so
    that a chunk's temporaries stay under :data:`CHUNK_NUMEL`."""
    fmt = get_format(shape.name)
    rows = fmt.row_work(shape, n)
    if rows is None:
        return "reconstructed", n
    # Temporaries per row: the growth of the work's elements from n rows to 2n.
    double = fmt.row_work(shape, 2 * n)
    per_row = max(1, (_work_numel(double) - _work_numel(rows)) // n) if double else 1
    chunk = max(1, CHUNK_NUMEL // per_row)
    if "reconstructed" not in fmt.strategy_names():
        return "rows", chunk
    built = work(shape, "reconstructed", 0)
    rebuild = Work(
        built.prepare,
        [],
        prepare_numel=built.prepare_numel,
        apply_numel=n * shape.in_features,
    )
    t_rows = estimate(rows, dtype, device_type, training)[3]
    t_rebuild = estimate(rebuild, dtype, device_type, training)[3]
    return ("rows" if t_rows <= t_rebuild else "reconstructed"), chunk


on_change(_plan.cache_clear)  # lookups planned with other machine constants
