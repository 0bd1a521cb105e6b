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

from .shapes import Modes

__all__ = [
    "FORMAT_NAMES",
    "ConcreteRank",
    "RankBudgetWarning",
    "RankSpec",
    "param_count",
    "rank_caps",
    "resolve_rank",
]

FORMAT_NAMES = ("cp", "tucker", "tt", "blocktt", "lowrank", "dense")
RankSpec = str | float | int | Sequence[int] | None
ConcreteRank = int | tuple[int, ...] | None

BUDGET_TOLERANCE = 0.05


class RankBudgetWarning(UserWarning):
    """A float rank could not be met within 5%: the nearest count is used and reported.

    Make it an error with ``warnings.simplefilter("error", RankBudgetWarning)``.
    """


def _layer_modes(n_layers: int) -> Modes:
    return (n_layers,) if n_layers > 1 else ()


def train_modes(fmt: str, in_modes: Modes, out_modes: Modes, n_layers: int) -> Modes:
    """Mode sizes of the train for 'tt' (all modes) or 'blocktt' (merged out*in pairs)."""
    if fmt == "tt":
        return _layer_modes(n_layers) + tuple(out_modes) + tuple(in_modes)
    return _layer_modes(n_layers) + tuple(o * i for o, i in zip(out_modes, in_modes))


def rank_caps(fmt: str, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
    """Largest useful value of each concrete rank (the rank at which the format is exact).

    For ``cp`` the cap is ``prod(all sizes) / max(size)``, a rank at which CP can always
    represent the tensor exactly (a larger CP rank never helps).
    """
    sizes = _layer_modes(n_layers) + tuple(out_modes) + tuple(in_modes)
    if fmt == "cp":
        return (math.prod(sizes) // max(sizes),)
    if fmt == "lowrank":
        return (min(math.prod(out_modes), math.prod(in_modes)),)
    if fmt == "tucker":
        return tuple(out_modes) + tuple(in_modes)
    if fmt in ("tt", "blocktt"):
        modes = train_modes(fmt, in_modes, out_modes, n_layers)
        return tuple(
            min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :])) for k in range(len(modes) - 1)
        )
    if fmt == "dense":
        return ()
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMAT_NAMES}")


def param_count(
    fmt: str, in_modes: Modes, out_modes: Modes, rank: ConcreteRank, n_layers: int = 1
) -> int:
    """Exact number of parameters of a format at concrete ``rank`` (bias not included)."""
    if rank is None and fmt != "dense":  # a user rank ('same', a float) is not concrete
        raise TypeError(
            f"param_count needs the concrete rank of factorization={fmt!r} (resolve_rank "
            f"gives it), got rank=None"
        )
    n_in, n_out = math.prod(in_modes), math.prod(out_modes)
    if fmt == "dense":
        return n_layers * n_out * n_in
    if fmt == "lowrank":
        return n_layers * rank * (n_out + n_in + 1)
    if fmt == "cp":
        sizes = _layer_modes(n_layers) + tuple(out_modes) + tuple(in_modes)
        return rank * (1 + sum(sizes))
    if fmt == "tucker":
        sizes = tuple(out_modes) + tuple(in_modes)
        return n_layers * math.prod(rank) + sum(s * r for s, r in zip(sizes, rank))
    if fmt in ("tt", "blocktt"):
        modes = train_modes(fmt, in_modes, out_modes, n_layers)
        full = (1, *rank, 1)
        return sum(full[k] * modes[k] * full[k + 1] for k in range(len(modes)))
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMAT_NAMES}")


def _user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside this package, so that a
    warning points at the user's line whichever public function was called."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(2)  # 1 would be our caller (the function that warns)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def resolve_rank(
    fmt: str, in_modes: Modes, out_modes: Modes, rank: RankSpec, n_layers: int = 1
) -> ConcreteRank:
    """Turn a user rank into the concrete rank of ``fmt`` (see the module docstring).

    Args:
        fmt: canonical format name, one of ``FORMAT_NAMES``.
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
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMAT_NAMES}")
    if fmt == "blocktt" and len(in_modes) != len(out_modes):
        raise ValueError(
            f"factorization='blocktt' pairs each out mode with an in mode, so it needs as many "
            f"in modes as out modes; got in modes {tuple(in_modes)} and out modes "
            f"{tuple(out_modes)}"
        )
    strict = True
    if rank is None or (isinstance(rank, str) and rank == "same"):
        rank, strict = 1.0, False  # 'same' means "about as many": the nearest count is fine
    if isinstance(rank, str):
        raise ValueError(f"rank={rank!r} is not valid; expected 'same', a float, an int or a tuple")
    if fmt == "dense":
        if rank == 1.0 and not isinstance(rank, bool):
            return None
        raise ValueError(
            f"factorization='dense' stores the full matrix; rank must be 'same' (or 1.0), "
            f"got {rank!r}"
        )
    caps = rank_caps(fmt, in_modes, out_modes, n_layers)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
        rank = int(rank)  # e.g. numpy.int64
    if isinstance(rank, bool):
        raise TypeError(f"rank must be 'same', a float, an int or a tuple, got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"an int rank must be >= 1, got rank={rank}")
        return _from_int(fmt, rank, caps)
    if isinstance(rank, float):
        if not math.isfinite(rank) or rank <= 0:
            raise ValueError(
                f"a float rank is a fraction of the dense parameter count and must be a "
                f"finite number > 0, got rank={rank}"
            )
        return _from_budget(fmt, in_modes, out_modes, rank, n_layers, caps, strict)
    if isinstance(rank, Sequence):
        return _from_tuple(fmt, tuple(rank), caps)
    raise TypeError(
        f"rank must be 'same', a float, an int or a tuple, got {type(rank).__name__} {rank!r}"
    )


def _from_int(fmt: str, rank: int, caps: tuple[int, ...]) -> ConcreteRank:
    if fmt in ("cp", "lowrank"):
        return min(rank, caps[0])
    return tuple(min(rank, c) for c in caps)


def _from_tuple(fmt: str, rank: tuple, caps: tuple[int, ...]) -> ConcreteRank:
    if any(isinstance(r, bool) or not isinstance(r, int) for r in rank):
        raise TypeError(f"a tuple rank must contain only ints, got rank={rank!r}")
    if fmt in ("tt", "blocktt") and len(rank) == len(caps) + 2 and rank[0] == rank[-1] == 1:
        rank = rank[1:-1]  # accept the boundary ranks (1, r_1, ..., r_{d-1}, 1)
    if len(rank) != len(caps):
        what = {
            "cp": "1 rank",
            "lowrank": "1 rank",
            "tucker": f"{len(caps)} ranks (one per out mode, then one per in mode)",
            "tt": f"{len(caps)} inner ranks (or {len(caps) + 2} with the boundary 1s)",
            "blocktt": f"{len(caps)} inner ranks (or {len(caps) + 2} with the boundary 1s)",
        }[fmt]
        raise ValueError(f"factorization={fmt!r} needs {what}, got rank={rank!r}")
    for r, cap in zip(rank, caps):
        if r < 1 or r > cap:
            raise ValueError(
                f"rank={rank!r} is out of range for factorization={fmt!r}: each rank must be "
                f"between 1 and its maximum {caps}"
            )
    return rank[0] if fmt in ("cp", "lowrank") else rank


def _from_budget(
    fmt: str,
    in_modes: Modes,
    out_modes: Modes,
    fraction: float,
    n_layers: int,
    caps: tuple[int, ...],
    strict: bool = True,
) -> ConcreteRank:
    dense = param_count("dense", in_modes, out_modes, None, n_layers)
    target = fraction * dense

    def count(r: ConcreteRank) -> int:
        return param_count(fmt, in_modes, out_modes, r, n_layers)

    if fmt in ("cp", "lowrank"):
        best = min(max(1, round(target / count(1))), caps[0])
    else:
        family = _tucker_family(caps) if fmt == "tucker" else _train_family(caps)
        best = _fit_vector(family, count, target, caps)
    got = count(best)
    lo_count = count(_smallest(fmt, caps))
    hi_count = count(_largest(fmt, caps))
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


def _smallest(fmt: str, caps: tuple[int, ...]) -> ConcreteRank:
    return 1 if fmt in ("cp", "lowrank") else (1,) * len(caps)


def _largest(fmt: str, caps: tuple[int, ...]) -> ConcreteRank:
    return caps[0] if fmt in ("cp", "lowrank") else caps


def _tucker_family(caps: tuple[int, ...]) -> Callable[[float], tuple[int, ...]]:
    """Ranks proportional to the mode sizes: r_k = clip(round(t * n_k), 1, n_k)."""
    return lambda t: tuple(min(c, max(1, round(t * c))) for c in caps)


def _train_family(caps: tuple[int, ...]) -> Callable[[float], tuple[int, ...]]:
    """One rank everywhere, clipped to what each bond can carry: r_k = min(round(t), cap_k)."""
    return lambda t: tuple(min(c, max(1, round(t))) for c in caps)


def _fit_vector(family, count, target: float, caps: tuple[int, ...]) -> tuple[int, ...]:
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
        moves = [(k, s) for k in range(d) for s in (-1, 1)]
        moves += [((k, 1), (j, -1)) for k in range(d) for j in range(d) if j != k]
        candidates = []
        for mv in moves:
            r = list(best)
            for k, step in mv if isinstance(mv[0], tuple) else (mv,):
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
