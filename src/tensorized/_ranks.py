"""Rank policy: turn a user's ``rank`` into concrete ranks for a format, and count parameters.

Concrete ranks per format (``m`` out modes, ``n`` in modes, ``L = n_layers``):

========== ============================================================================
format     concrete rank
========== ============================================================================
dense      ``None``
lowrank    ``int`` r: ``U (L, O, r)``, ``s (L, r)``, ``V (L, I, r)``
cp         ``int`` R: weights ``(R,)``, one factor ``(size, R)`` per mode (layer mode too)
tucker     ``tuple`` of ``m + n`` ranks, one per out/in mode; the layer mode is not
           compressed (the core has a leading layer dimension)
tt         ``tuple`` of the ``d - 1`` inner ranks of a tensor train over
           ``([L,] *out_modes, *in_modes)`` (``d`` modes)
blocktt    ``tuple`` of the inner ranks of a TT-matrix whose cores are
           ``([1, L, r],) + ((r, out_k, in_k, r'),) * m``
========== ============================================================================

A user ``rank`` is ``'same'`` (as many parameters as the dense weight), a float (that fraction
of the dense parameter count, met within 5% wherever the format's integer ranks allow it; where
they do not, the nearest count is used and a :class:`RankBudgetWarning` says so; a fraction the
format cannot reach at all is a ``ValueError``), an int (the same rank everywhere, clipped to
what each mode can carry) or a tuple of concrete ranks.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Union

from ._shapes import Modes
from .formats._registry import get_format

if TYPE_CHECKING:
    from .formats.base import FactorizedMatrix

__all__ = [
    "ConcreteRank",
    "RankBudgetWarning",
    "RankSpec",
    "param_count",
    "rank_caps",
    "resolve_rank",
]

RankSpec = str | float | int | Sequence[int] | None
ConcreteRank = int | tuple[int, ...] | None
Format = Union[str, "type[FactorizedMatrix]"]

BUDGET_TOLERANCE = 0.05


class RankBudgetWarning(UserWarning):
    """A float rank could not be met within 5%: the nearest count is used and reported.

    Make it an error with ``warnings.simplefilter("error", RankBudgetWarning)``.
    """


def rank_caps(fmt: Format, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
    """Largest useful value of each concrete rank of ``fmt`` (a name or a format class): the
    rank at which the format is exact.

    For ``cp`` the cap is ``prod(all sizes) / max(size)``, a rank at which CP can always
    represent the tensor exactly (a larger CP rank never helps).
    """
    return get_format(fmt).rank_caps(tuple(in_modes), tuple(out_modes), n_layers)


def param_count(
    fmt: Format, in_modes: Modes, out_modes: Modes, rank: ConcreteRank, n_layers: int = 1
) -> int:
    """Exact number of parameters of ``fmt`` at concrete ``rank`` (bias not included)."""
    cls = get_format(fmt)
    if rank is None and cls.rank_kind != "none":  # a user rank ('same', a float) is not concrete
        raise TypeError(
            f"param_count needs the concrete rank of factorization={cls.name!r} (resolve_rank "
            f"gives it), got rank=None"
        )
    return cls.param_count(tuple(in_modes), tuple(out_modes), rank, n_layers)


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside this package, so that a
    warning points at the user's line whichever public function was called."""
    package = os.path.dirname(os.path.abspath(__file__))
    level = 2  # 1 would be our caller (the function that warns)
    frame: FrameType | None = sys._getframe(level)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def resolve_rank(
    fmt: Format, in_modes: Modes, out_modes: Modes, rank: RankSpec, n_layers: int = 1
) -> ConcreteRank:
    """Turn a user rank into the concrete rank of ``fmt`` (see the module docstring).

    Args:
        fmt: a registered format name (or alias), or a format class.
        in_modes: input modes, e.g. ``(8, 8, 16)``.
        out_modes: output modes.
        rank: ``'same'``, a float > 0, an int >= 1, or a tuple of concrete ranks.
        n_layers: size of the leading layer mode (1: no layer mode).

    Returns:
        The concrete rank: ``None`` (dense), an int (cp, lowrank) or a tuple (tucker, tt,
        blocktt).

    Raises:
        ValueError: for an invalid rank, or a float budget outside what the format can reach.
        TypeError: for a rank of the wrong type.

    Warns:
        RankBudgetWarning: when the nearest parameter count is more than 5% off a float rank.

    Example:
        >>> resolve_rank("cp", (8, 8), (8, 8), 0.5)
        62
        >>> resolve_rank("tt", (4, 4), (4, 4), 2)
        (2, 2, 2)
    """
    cls = get_format(fmt)
    name = cls.name
    cls.check_modes(tuple(in_modes), tuple(out_modes))
    strict = True
    if rank is None or (isinstance(rank, str) and rank == "same"):
        rank, strict = 1.0, False  # 'same' means "about as many": the nearest count is fine
    if isinstance(rank, str):
        raise ValueError(f"rank={rank!r} is not valid; expected 'same', a float, an int or a tuple")
    if cls.rank_kind == "none":
        if rank == 1.0 and not isinstance(rank, bool):
            return None
        raise ValueError(
            f"factorization={name!r} stores the full matrix; rank must be 'same' (or 1.0), "
            f"got {rank!r}"
        )
    caps = cls.rank_caps(tuple(in_modes), tuple(out_modes), n_layers)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        rank = int(rank)  # e.g. numpy.int64
    if isinstance(rank, bool):
        raise TypeError(f"rank must be 'same', a float, an int or a tuple, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"an int rank must be >= 1, got rank={rank}")
        return _from_int(cls, rank, caps)
    if isinstance(rank, float):
        if not math.isfinite(rank) or rank <= 0:
            raise ValueError(
                f"a float rank is a fraction of the dense parameter count and must be a "
                f"finite number > 0, got rank={rank}"
            )
        return _from_budget(cls, tuple(in_modes), tuple(out_modes), rank, n_layers, caps, strict)
    if isinstance(rank, Sequence):
        return _from_tuple(cls, tuple(rank), caps)
    raise TypeError(
        f"rank must be 'same', a float, an int or a tuple, got {type(rank).__name__} {rank!r}"
    )


def _from_int(cls: type[FactorizedMatrix], rank: int, caps: tuple[int, ...]) -> ConcreteRank:
    if cls.rank_kind == "int":
        return min(rank, caps[0])
    return tuple(min(rank, c) for c in caps)


def _from_tuple(cls: type[FactorizedMatrix], rank: tuple, caps: tuple[int, ...]) -> ConcreteRank:
    if any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in rank):
        raise TypeError(f"a tuple rank must contain only ints, got rank={rank!r}")
    rank = tuple(int(r) for r in rank)
    rank = tuple(cls.normalize_rank_tuple(rank, caps))
    if len(rank) != len(caps):
        what = "1 rank" if cls.rank_kind == "int" else cls.rank_help(len(caps))
        raise ValueError(f"factorization={cls.name!r} needs {what}, got rank={rank!r}")
    for r, cap in zip(rank, caps):
        if r < 1 or r > cap:
            raise ValueError(
                f"rank={rank!r} is out of range for factorization={cls.name!r}: each rank must "
                f"be between 1 and its maximum {caps}"
            )
    return rank[0] if cls.rank_kind == "int" else rank


def _from_budget(
    cls: type[FactorizedMatrix],
    in_modes: Modes,
    out_modes: Modes,
    fraction: float,
    n_layers: int,
    caps: tuple[int, ...],
    strict: bool = True,
) -> ConcreteRank:
    fmt = cls.name
    dense = n_layers * math.prod(in_modes) * math.prod(out_modes)
    target = fraction * dense

    def count(r: ConcreteRank) -> int:
        return cls.param_count(in_modes, out_modes, r, n_layers)

    if cls.rank_kind == "int":
        best: ConcreteRank = min(max(1, round(target / count(1))), caps[0])
    else:
        best = _fit_vector(cls.rank_family(caps), count, target, caps)
    got = count(best)
    lo_count = count(smallest_rank(cls, caps))
    hi_count = count(caps[0] if cls.rank_kind == "int" else caps)
    span = (
        f"for in modes {tuple(in_modes)} and out modes {tuple(out_modes)} this format spans "
        f"fractions {lo_count / dense:.3g} to {hi_count / dense:.3g}"
    )
    if target < (1 - BUDGET_TOLERANCE) * lo_count or target > (1 + BUDGET_TOLERANCE) * hi_count:
        raise ValueError(
            f"rank={fraction} asks for {target:.0f} parameters ({fraction:g} of the dense "
            f"{dense}), which factorization={fmt!r} cannot reach: {span}"
        )
    if strict and abs(got - target) > BUDGET_TOLERANCE * target:
        warnings.warn(
            f"rank={fraction} asks for {target:.0f} parameters but the nearest "
            f"factorization={fmt!r} (rank {best}) has {got} ({got / dense:.3g} of the dense "
            f"{dense}): its ranks move the count in coarse steps here; {span}. Give explicit "
            f"ranks to choose another point",
            RankBudgetWarning,
            stacklevel=_user_stacklevel(),
        )
    return best


def smallest_rank(cls: type[FactorizedMatrix], caps: tuple[int, ...]) -> ConcreteRank:
    """All ranks 1 in the format's layout (``None`` for a format without ranks)."""
    if cls.rank_kind == "none":
        return None
    return 1 if cls.rank_kind == "int" else (1,) * len(caps)


def _fit_vector(
    family: Callable[[float], tuple[int, ...]],
    count: Callable[[tuple[int, ...]], int],
    target: float,
    caps: tuple[int, ...],
) -> tuple[int, ...]:
    """Ranks whose parameter count is closest to ``target``.

    Bisection over the scale of a monotone, balanced rank family finds the largest member
    under the target; a local search then moves single ranks by +-1, or one up and another
    down, while that brings the count closer to the target (integer ranks on small modes
    move the count in coarse steps, which the balanced family alone cannot fine-tune).
    """
    if not caps:  # a train of one core: nothing to choose
        return ()
    lo, hi = 0.0, float(max(caps)) + 1.0
    if count(family(hi)) <= target:
        return family(hi)
    for _ in range(64):
        mid = (lo + hi) / 2
        if count(family(mid)) <= target:
            lo = mid
        else:
            hi = mid
    best = min(family(lo), family(hi), key=lambda r: abs(count(r) - target))
    gap = abs(count(best) - target)
    d = len(caps)
    for _ in range(4 * d + 16):  # each accepted move strictly shrinks the gap
        moves: list[tuple[tuple[int, int], ...]] = [((k, s),) for k in range(d) for s in (-1, 1)]
        moves += [((k, 1), (j, -1)) for k in range(d) for j in range(d) if j != k]
        candidates = []
        for mv in moves:
            r = list(best)
            for k, step in mv:
                r[k] += step
            if all(1 <= v <= c for v, c in zip(r, caps)):
                candidates.append(tuple(r))
        if not candidates:
            break
        trial = min(candidates, key=lambda r: abs(count(r) - target))
        trial_gap = abs(count(trial) - target)
        if trial_gap >= gap:
            break
        best, gap = trial, trial_gap
    return best
