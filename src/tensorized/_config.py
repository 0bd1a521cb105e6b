"""``TensorizeConfig``: what :func:`~tensorized.tensorize_` compresses and how (a frozen
dataclass with a dict round trip, as torchao's and PEFT's configs)."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

from .formats import canonical_name, get_format

__all__ = ["TensorizeConfig"]


class _ReadOnlyDict(dict):
    """A dict that refuses changes (the config is frozen); copies, pickles and hashes."""

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("TensorizeConfig.decomposition_kwargs is read-only; use a new config")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __reduce__(self) -> tuple:
        return (_ReadOnlyDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))


def _convert(value: Any, frozen: bool) -> Any:
    """Recursively: lists to tuples and mappings to read-only dicts (``frozen``: immutable and
    hashable), or tuples to lists and mappings to dicts (plain, for JSON)."""
    if isinstance(value, Mapping):
        items = {k: _convert(v, frozen) for k, v in value.items()}
        return _ReadOnlyDict(items) if frozen else items
    if isinstance(value, list | tuple):
        seq = [_convert(v, frozen) for v in value]
        return tuple(seq) if frozen else seq
    return value


def _bad(name: str, value: Any, accepted: str, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"TensorizeConfig.{name} must be {accepted}, got {type(value).__name__} {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, f"an int >= {low}", TypeError)
    if value < low:
        raise _bad(name, value, f"an int >= {low}")


def _check_patterns(name: str, value: Any) -> str | tuple[str, ...] | None:
    accepted = "None, a regex string or a list of module names / name suffixes"
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise _bad(name, value, f"{accepted} (invalid regex: {exc})") from exc
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise _bad(name, value, accepted, TypeError)
    return tuple(value)


def _check_factorization(value: Any, allocation: Any) -> str | tuple[str, ...]:
    """The canonical format name, ``'auto'``, or a tuple of canonical names."""
    several = "'auto' or a list of formats"
    if isinstance(value, str) and value.strip().lower() == "auto":
        value = "auto"
    elif isinstance(value, list | tuple):
        if not value:
            raise _bad("factorization", value, "a format name, 'auto' or a non-empty list")
        try:
            value = tuple(dict.fromkeys(canonical_name(v) for v in value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"TensorizeConfig.factorization: {exc}") from exc
        if len(value) == 1:
            return value[0]
    else:
        try:
            return canonical_name(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"TensorizeConfig.factorization: {exc}") from exc
    if allocation != "budget":
        raise _bad(
            "factorization",
            value,
            f"a single format with rank_allocation={allocation!r} ({several} chooses a "
            f"format per layer from the budget: set rank_allocation='budget')",
        )
    return value


def _check_rank(rank: Any, budget: bool) -> float | int | str | tuple:
    if budget:  # a fraction of the total: the allocation chooses every layer's rank
        if isinstance(rank, bool) or not isinstance(rank, float) or not 0 < rank <= 1:
            raise _bad("rank", rank, "a float in (0, 1] with rank_allocation='budget'")
        return rank
    accepted = "'same', a float > 0, an int >= 1 or a tuple of ints >= 1"
    if isinstance(rank, str) and rank != "same":
        raise _bad("rank", rank, accepted)
    if isinstance(rank, str):
        return rank
    values = tuple(rank) if isinstance(rank, list | tuple) else (rank,)
    kinds = (int,) if isinstance(rank, list | tuple) else (int, float)
    if not values or any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
        raise _bad("rank", rank, accepted, TypeError)
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise _bad("rank", rank, accepted)
    return values if isinstance(rank, list | tuple) else rank


@dataclass(frozen=True)
class TensorizeConfig:
    """What :func:`tensorize_` compresses and how (frozen; ``to_dict``/``from_dict``).

    Attributes:
        factorization: ``'cp'``, ``'tucker'``, ``'tt'``, ``'blocktt'``, ``'lowrank'``,
            ``'dense'`` or an alias (stored canonical); or, with ``rank_allocation='budget'``,
            ``'auto'`` (each layer gets the format among ``'lowrank'``, ``'tucker'``,
            ``'tt'``, ``'blocktt'`` with the least error for its share of the budget) or a
            list of formats to choose among (stored as a tuple).
        rank: per layer as in :class:`~tensorized.FactorizedLinear` (``'same'``, an int, a
            tuple of concrete ranks, or a float: the fraction of the weight parameters kept).
        target_modules: ``None`` (every ``nn.Linear``), a regex that must match the whole
            qualified name, or a list: an entry matches a name equal to it or ending in
            ``"." + entry``.
        exclude_modules: the same rules, applied after ``target_modules``.
        order: modes per side (:func:`~tensorized.tensorize_shape`; ``None``: per layer).
        min_params: layers with fewer weight parameters are left alone.
        implementation: ``'auto'`` or a strategy of the format (see ``FactorizedLinear``).
        joint: factorize together (``from_linear_list``) same-shaped layers whose names
            differ only in numeric parts: ``blocks.0.q`` and ``blocks.1.q`` form ``blocks.*.q``.
        rank_allocation: ``'uniform'`` (``rank`` for each layer) or ``'budget'``: ``rank`` (a
            float in (0, 1]) of all targeted weight parameters, spread over the layers to
            minimize the total error (greedy on each layer's error curve, as
            :func:`tensorized.allocate_ranks`), where a layer may also stay dense. With
            calibration data the errors are the layers' relative output errors on their
            recorded inputs, each weighted by the model's output sensitivity to the layer;
            else weight errors.
        decomposition_kwargs: options of the decompositions (e.g. ``n_iter_max``), kept as a
            read-only copy.
        calibration_steps: optimizer steps per layer (or group) with calibration data.
        calibration_rows: input rows per layer that enter its calibration statistics (the
            first ones seen; the statistics take the same memory whatever this is).
        calibration_mode: ``'sequential'``: layers are fitted in forward order, each on the
            inputs it sees in the partially compressed model, to the outputs the original
            layer gives on the original inputs of the same samples (so a layer corrects the
            error of those before it); ``'independent'``: each layer on the original model's
            inputs.
        progress: show a tqdm bar; ``None``: only when stderr is a terminal.
        embeddings: also compress the plain ``nn.Embedding`` tables that match (as
            :class:`~tensorized.FactorizedEmbedding`; rows and columns split into ``order``
            modes, 3 if ``None``, the vocabulary padded where it factors badly). With
            calibration data a table is fitted to its rows weighted by the observed token
            frequencies, and budgets span linear layers and tables alike. A table tied to
            another module (an output projection sharing its weight) is left dense, with a
            warning. Tables are never grouped by ``joint``.
    """

    factorization: str | tuple[str, ...] = "tucker"
    rank: float | int | str | tuple = 0.5
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    order: int | None = 3
    min_params: int = 1024
    implementation: str = "auto"
    joint: bool = False
    rank_allocation: str = "uniform"
    decomposition_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration_steps: int = 200
    calibration_rows: int = 4096
    calibration_mode: str = "sequential"
    progress: bool | None = None
    embeddings: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("factorization", _check_factorization(self.factorization, self.rank_allocation))
        put("rank", _check_rank(self.rank, self.rank_allocation == "budget"))
        put("target_modules", _check_patterns("target_modules", self.target_modules))
        put("exclude_modules", _check_patterns("exclude_modules", self.exclude_modules))
        for name, low in (("order", 1), ("min_params", 0), ("calibration_steps", 0)):
            if name != "order" or self.order is not None:
                _check_int(name, getattr(self, name), low)
        _check_int("calibration_rows", self.calibration_rows, 1)
        modes = "'sequential' or 'independent'"
        if not isinstance(self.calibration_mode, str):
            raise _bad("calibration_mode", self.calibration_mode, modes, TypeError)
        if self.calibration_mode not in ("sequential", "independent"):
            raise _bad("calibration_mode", self.calibration_mode, modes)
        several = not isinstance(self.factorization, str) or self.factorization == "auto"
        single = None if several else get_format(cast(str, self.factorization))
        strategies = ("auto", *(single.strategy_names() if single else ()))
        if not isinstance(self.implementation, str):
            raise _bad("implementation", self.implementation, f"one of {strategies}", TypeError)
        if self.implementation not in strategies:
            raise _bad("implementation", self.implementation, f"one of {strategies}")
        for name in ("joint", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "a bool", TypeError)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise _bad("progress", self.progress, "None or a bool", TypeError)
        if not isinstance(self.rank_allocation, str):
            raise _bad("rank_allocation", self.rank_allocation, "'uniform' or 'budget'", TypeError)
        if self.rank_allocation not in ("uniform", "budget"):
            raise _bad("rank_allocation", self.rank_allocation, "'uniform' or 'budget'")
        rankless = single is not None and single.rank_kind == "none"
        if self.rank_allocation == "budget" and rankless:
            raise _bad(
                "rank_allocation", "budget", f"'uniform' with factorization={self.factorization!r}"
            )
        if rankless and self.rank not in ("same", 1.0):
            # caught here rather than at the first layer of tensorize_
            accepted = f"'same' (or 1.0) with factorization={self.factorization!r}"
            raise _bad("rank", self.rank, accepted)
        kwargs = self.decomposition_kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise _bad("decomposition_kwargs", kwargs, "a dict with str keys", TypeError)
        put("decomposition_kwargs", _convert(kwargs, frozen=True))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python types (tuples become lists); JSON-able for JSON values."""
        return {
            f.name: _convert(getattr(self, f.name), frozen=False) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorizeConfig:
        """Build a config from :meth:`to_dict`'s output (or a subset of its keys).

        Raises:
            ValueError: for unknown keys, listing them and the valid ones.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a dict of TensorizeConfig fields, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid), key=str)
        if unknown:
            raise ValueError(f"unknown TensorizeConfig keys {unknown}; valid keys: {valid}")
        return cls(**d)


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: ``progress`` itself, or for ``None`` only when stderr
    is a terminal (it may be replaced, e.g. by ``None``)."""
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
