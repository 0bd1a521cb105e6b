"""Budgeted rank allocation: spend a total parameter budget where it lowers the error most.

One ratio for every layer wastes parameters: a weight with a fast decaying spectrum loses
little at a low rank, a flat one needs more. :func:`allocate_ranks` picks one concrete rank
per weight to minimize the total squared weight error ``sum_k ||W_k - What_k||_F^2`` under a
total parameter count:

1. **Error curves**: candidate ranks of each weight with their parameters and squared error,
   from the format's ``error_curve`` (each format documents its own: exact Eckart-Young tails
   for 'lowrank', truncated-HOSVD errors for 'tucker', TT-SVD errors for the train formats,
   short CP-ALS runs for 'cp'; a registered format without one is decomposed at each
   candidate fraction).
2. **Greedy marginal allocation** on the lower convex hull of each curve: from the smallest
   ranks, repeatedly take the step with the largest error decrease per added parameter that
   fits the budget. This solves the LP relaxation of the multiple-choice knapsack (P. Sinha,
   A. A. Zoltners, Operations Research 27(3), 1979); the same greedy selects ranks for
   whole-network low-rank acceleration in X. Zhang et al., "Accelerating Very Deep
   Convolutional Networks for Classification and Detection", TPAMI 38(10), 2016.
3. **Polish**: a local search (one weight to any candidate, or an exchange between two)
   lowers the total error further, counting each parameter short of 2% under the budget at
   the greedy's price of a parameter (the best error per parameter the budget could not pay
   for); the total lands within 2% under the budget (2% over it if the steps are too
   coarse) unless getting there would cost more error than those parameters are worth.

:func:`allocate_choices` (what ``tensorize_`` uses with ``rank_allocation='budget'``) runs
the same allocation over several formats at once and the option of keeping a weight dense:
each weight's curve is the union of its formats' curves, so a layer gets the format (and
rank) that lowers the total error most for its parameters. With calibration statistics the
errors are *output* errors, ``||(W - What) S||^2 / ||W S||^2`` with ``S S^T`` the layer's
input second moment: each format's curve is measured on the whitened weight it is fitted to
(``W S`` for the formats with a whitened closed form: for 'lowrank' the curve is then the
exact whitened-SVD tail of SVD-LLM, for 'tt' exact through its out-side and middle bonds; the
Kronecker-whitened tensor ``W x_k S_k`` for the other tensor formats, see
``FactorizedMatrix.fit_kronecker_whitened``), relative to the layer's output energy so that
every layer counts alike.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._ops import kronecker_whiten, symmetric_root
from ._ranks import ConcreteRank, RankBudgetWarning, smallest_rank
from ._shapes import Modes, validate_modes
from .formats import FactorizedMatrix, get_format
from .formats.base import Option

__all__ = ["AUTO_FORMATS", "DEFAULT_CANDIDATES", "Choice", "allocate_choices", "allocate_ranks"]

#: The formats ``factorization='auto'`` chooses among ('cp' is left out: its ALS curves
#: cost far more than the others'; name it in a list to include it).
AUTO_FORMATS = ("lowrank", "tucker", "tt", "blocktt")

TOLERANCE = 0.02
#: Default candidate fractions of each weight's dense parameter count.
DEFAULT_CANDIDATES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
REACH = 3  # how far (in candidates) each of two weights moves in one exchange of _polish


def allocate_ranks(
    weights: Sequence[Tensor],
    modes: Sequence[tuple[Modes, Modes]],
    factorization: str,
    budget: int,
    *,
    decomposition_kwargs: Mapping | None = None,
    candidates: Sequence[float] | None = None,
) -> list[ConcreteRank]:
    """Choose one rank per weight so that their total parameter count meets ``budget``.

    See the module docstring for the error curves and the greedy allocation.

    Args:
        weights: ``(out, in)`` matrices, or ``(L, out, in)`` for a joint group (factorized
            with a leading layer mode, ``n_layers = L``).
        modes: per weight, ``(in_modes, out_modes)`` (e.g. from ``tensorize_shape``).
        factorization: the format name (case-insensitive; aliases allowed).
        budget: total parameters of all factorized weights (biases not counted), between the
            total at the smallest ranks and the dense total.
        decomposition_kwargs: ``cp_als`` options for the 'cp' curves (other formats' curves
            need none; extra keys are ignored).
        candidates: fractions of each weight's dense parameter count at which the uniform
            rank family is evaluated (default :data:`DEFAULT_CANDIDATES`).

    Returns:
        One concrete rank per weight, as ``resolve_rank`` returns them (an int for 'cp' and
        'lowrank', a tuple for 'tucker', 'tt' and 'blocktt', ``None`` for 'dense'); their
        total ``param_count`` is within 2% under ``budget`` (2% over it if the rank steps
        are too coarse). Where landing in that range would raise the total error (every
        step left costs more than the parameters left, and freeing them means taking
        another weight down), the total stays lower and a ``RankBudgetWarning`` says so.

    Raises:
        ValueError: for a budget outside the reachable range (the message gives it), or
            invalid weights, modes or candidates.
        TypeError: for arguments of the wrong type.

    Example:
        A rank-2 weight needs only rank 2; the rest of the budget goes to the full-rank one:

        >>> g = torch.Generator().manual_seed(0)
        >>> low = torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g)
        >>> full = torch.randn(32, 32, generator=g)
        >>> allocate_ranks([low, full], [((32,), (32,))] * 2, "lowrank", 20 * 65)
        [2, 18]
    """
    cls = get_format(factorization)
    fmt = cls.name
    entries = _check_entries(weights, modes, cls)
    fractions = _check_candidates(candidates)
    if decomposition_kwargs is not None and not isinstance(decomposition_kwargs, Mapping):
        raise TypeError(
            f"decomposition_kwargs must be a mapping, got {type(decomposition_kwargs).__name__}"
        )
    kwargs = dict(decomposition_kwargs or {})
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise TypeError(f"budget must be a number of parameters (an int), got {budget!r}")
    dense_total = sum(math.prod(W.shape) for W, *_ in entries)
    min_total = sum(  # all ranks 1
        cls.param_count(i, o, smallest_rank(cls, cls.rank_caps(i, o, L)), L)
        for _, i, o, L in entries
    )
    if not min_total <= budget <= dense_total:
        raise ValueError(
            f"budget={budget} is outside the reachable range [{min_total}, {dense_total}] for "
            f"factorization={fmt!r}: the smallest ranks give {min_total} parameters and the "
            f"dense weights have {dense_total}"
        )
    if cls.rank_kind == "none":
        return [None] * len(entries)
    limit = cls.curve_fraction_limit  # a costly curve: skip fractions far above the budget's
    if limit is not None:
        kept = tuple(f for f in fractions if f <= limit * budget / dense_total)
        fractions = kept or fractions[:1]
    curves = [_pareto(cls.error_curve(W, i, o, L, fractions, kwargs)) for W, i, o, L in entries]
    choice = _allocate(curves, float(budget))
    total = sum(curve[j][0] for curve, j in zip(curves, choice))
    if abs(total - budget) > TOLERANCE * budget:
        warnings.warn(
            f"budget={budget}: with these candidate ranks, factorization={fmt!r} spends "
            f"{total} ({total / budget - 1:+.1%}) at the least error found (closer totals "
            f"cost error); pass finer candidates",
            RankBudgetWarning,
            stacklevel=2,
        )
    return [curve[j][2] for curve, j in zip(curves, choice)]


@dataclass(frozen=True)
class Choice:
    """What :func:`allocate_choices` chose for one weight.

    Attributes:
        factorization: the format ('dense': kept at full size).
        rank: its concrete rank.
        error: the estimated relative squared error of the choice (output error with
            calibration statistics, else weight error).
        reason: one line: the share of the weight's parameters and each candidate format's
            error at that share.
    """

    factorization: str
    rank: ConcreteRank
    error: float
    reason: str


def allocate_choices(
    weights: Sequence[Tensor],
    modes: Sequence[tuple[Modes, Modes]],
    formats: Sequence[str],
    budget: int,
    *,
    grams: Sequence[Tensor | None] | None = None,
    importance: Sequence[float] | None = None,
    decomposition_kwargs: Mapping | None = None,
    candidates: Sequence[float] | None = None,
) -> list[Choice]:
    """One ``(format, rank)`` per weight, or dense, so that the total parameters meet
    ``budget`` at the least total error (see the module docstring).

    Args:
        weights: ``(out, in)`` or ``(L, out, in)`` matrices.
        modes: per weight, ``(in_modes, out_modes)``.
        formats: the candidate formats (names or aliases); a weight whose modes a format
            does not accept (e.g. 'blocktt' with unequal mode counts) skips that format.
        budget: total parameters of all weights (biases not counted).
        grams: per weight, its input second moment ``(in, in)`` (a joint group's: one for
            all its layers), or ``None`` for a weight without one (then its relative weight
            error); ``None`` for all: absolute squared weight errors, as
            :func:`allocate_ranks`.
        importance: per weight, a factor on its errors (e.g. ``output_sensitivity``: how
            much of the model's output error a unit of the weight's own relative error
            costs); ``None``: all 1.
        decomposition_kwargs: options for the curves' decompositions.
        candidates: fractions of each weight's parameters for the curves.

    Returns:
        One :class:`Choice` per weight (``error`` includes its importance).
    """
    classes = [get_format(f) for f in formats]
    if not classes or len({c.name for c in classes}) != len(classes):
        raise ValueError(f"formats must name distinct formats, got {list(formats)!r}")
    fractions = _check_candidates(candidates)
    kwargs = dict(decomposition_kwargs or {})
    dense_total = sum(math.prod(W.shape) for W in weights)
    curves: list[list[Option]] = []
    per_format: list[dict[str, list[Option]]] = []
    for k, (W, pair) in enumerate(zip(weights, modes)):
        C = None if grams is None else grams[k]
        by_format: dict[str, list[Option]] = {}
        for cls in classes:
            try:
                cls.check_modes(tuple(pair[0]), tuple(pair[1]))
            except (TypeError, ValueError):
                continue  # modes this format does not take (the check below names bad ones)
            ((W_k, in_modes, out_modes, L),) = _check_entries([W], [pair], cls)
            if cls.rank_kind == "none":
                continue  # dense: the keep-dense option below
            scope = fractions
            limit = cls.curve_fraction_limit
            if limit is not None:
                scope = tuple(f for f in fractions if f <= limit * budget / dense_total)
                scope = scope or fractions[:1]
            target, norm_sq = _curve_target(cls, W_k, in_modes, out_modes, C)
            curve = cls.error_curve(target, in_modes, out_modes, L, scope, kwargs)
            scale = 1.0 / norm_sq if grams is not None else 1.0  # relative: layers alike
            scale *= 1.0 if importance is None else float(importance[k])
            # Below the float64 round-off of a decomposition an error is zero: no parameter
            # is spent to lower it further.
            floor = 1e-12 * norm_sq
            by_format[cls.name] = [
                (p, 0.0 if e <= floor else e * scale, (cls.name, r)) for p, e, r in curve
            ]
        if not by_format:
            names = [c.name for c in classes]
            raise ValueError(f"weights[{k}]: none of the formats {names} accepts modes {pair}")
        dense = (math.prod(W.shape), 0.0, (get_format("dense").name, None))  # kept whole
        options = sorted([o for c in by_format.values() for o in c] + [dense], key=_by_cost)
        curves.append(_pareto(options))
        per_format.append(by_format)
    low = sum(c[0][0] for c in curves)
    if not low <= budget <= dense_total:
        raise ValueError(
            f"budget={budget} is outside the reachable range [{low}, {dense_total}] for "
            f"formats {[c.name for c in classes]}"
        )
    choice = _allocate(curves, float(budget))
    out = []
    for curve, j, by_format, W in zip(curves, choice, per_format, weights):
        params, error, (name, rank) = curve[j]
        share = params / math.prod(W.shape)
        others = []
        for fmt, c in by_format.items():
            fits = [e for p, e, _ in c if p <= params]
            others.append(f"{fmt} {min(fits):.3g}" if fits else f"{fmt} -")
        why = f"{share:.0%} of its weights; error at that share: {', '.join(others)}"
        out.append(Choice(name, rank, error, why))
    return out


def _by_cost(option: Option) -> tuple[int, float]:
    return (option[0], option[1])


def _pareto(curve: list[Option]) -> list[Option]:
    """The options no other beats on both parameters and error (sorted by parameters, the
    error strictly decreasing): meeting the budget then never trades a layer's error up for
    parameters, as moving to a dominated option (more parameters, more error) would."""
    kept: list[Option] = []
    for option in sorted(curve, key=_by_cost):
        if not kept or option[1] < kept[-1][1]:
            kept.append(option)
    return kept


def _curve_target(
    cls: type[FactorizedMatrix], W: Tensor, in_modes: Modes, out_modes: Modes, C: Tensor | None
) -> tuple[Tensor, float]:
    """The weight whose plain error curve is the format's output-error curve with input
    second moment ``C`` (see the module docstring), and its squared norm."""
    if C is None:
        return W, float(W.double().pow(2).sum())
    C = C.to(device=W.device, dtype=torch.float64)
    if cls.whitened_curve or cls.closed_form_exact:
        # 'lowrank': the exact whitened SVD; 'tt': whitened TT-SVD; 'basis': whitened
        # Basis Sharing
        target = W.double() @ symmetric_root(C)[0]
    elif cls._in_mode_factors is not FactorizedMatrix._in_mode_factors:
        lead = W.shape[:-2]
        tensor = W.double().reshape(*lead, *out_modes, *in_modes)
        first = len(lead) + len(out_modes)
        target = kronecker_whiten(tensor, C, in_modes, first)[0].reshape(W.shape)
    else:  # a format without per-mode factors: its weight error, relative
        target = W.double()
    return target.to(W.dtype), max(float(target.pow(2).sum()), torch.finfo(torch.float64).tiny)


# --------------------------------------------------------------------------- validation


def _check_entries(
    weights: Sequence[Tensor], modes: Sequence, cls: type[FactorizedMatrix]
) -> list[tuple[Tensor, Modes, Modes, int]]:
    for name, seq in (("weights", weights), ("modes", modes)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise TypeError(f"{name} must be a non-empty list, got {type(seq).__name__}")
    if len(modes) != len(weights):
        raise ValueError(
            f"modes must give one (in_modes, out_modes) pair per weight: got {len(modes)} for "
            f"{len(weights)} weights"
        )
    entries = []
    for k, (W, pair) in enumerate(zip(weights, modes)):
        if not isinstance(W, Tensor) or W.ndim not in (2, 3) or not W.is_floating_point():
            got = f"shape {tuple(W.shape)}" if isinstance(W, Tensor) else type(W).__name__
            raise ValueError(
                f"weights[{k}] must be a floating (out, in) or (L, out, in) tensor, got {got}"
            )
        if not torch.isfinite(W).all():
            raise ValueError(f"weights[{k}] contains NaN or Inf values")
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"modes[{k}] must be a pair (in_modes, out_modes), got {pair!r}")
        in_modes = validate_modes(pair[0], W.shape[-1], f"modes[{k}][0] (in_modes)")
        out_modes = validate_modes(pair[1], W.shape[-2], f"modes[{k}][1] (out_modes)")
        try:
            cls.check_modes(in_modes, out_modes)
        except ValueError as exc:
            raise ValueError(f"modes[{k}] = {(in_modes, out_modes)}: {exc}") from None
        entries.append((W.detach(), in_modes, out_modes, W.shape[0] if W.ndim == 3 else 1))
    return entries


def _check_candidates(candidates: Sequence[float] | None) -> tuple[float, ...]:
    if candidates is None:
        return DEFAULT_CANDIDATES
    if isinstance(candidates, str) or not isinstance(candidates, Sequence) or not candidates:
        raise TypeError(f"candidates must be a non-empty list of fractions, got {candidates!r}")
    for c in candidates:
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c <= 1:
            raise ValueError(
                f"candidates must be fractions in (0, 1] of each weight's parameters, got {c!r}"
            )
    return tuple(float(c) for c in candidates)


# --------------------------------------------------------------------------- allocation


def _hull(curve: list[Option]) -> list[int]:
    """Indices of the lower convex hull of ``(params, error)``, params increasing."""
    hull: list[int] = []
    for j, (p, e, _) in enumerate(curve):
        if hull and (p == curve[hull[-1]][0] or e >= curve[hull[-1]][1]):
            continue  # dominated (sorted by params, then error)
        while len(hull) >= 2:
            (p1, e1, _), (p2, e2, _) = curve[hull[-2]], curve[hull[-1]]
            # drop the middle point if it lies on or above the segment to the new one
            if (e2 - e1) * (p - p1) >= (e - e1) * (p2 - p1):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _allocate(curves: list[list[Option]], budget: float) -> list[int]:
    """Greedy marginal allocation on the hulls, then :func:`_polish`."""
    hulls = [_hull(c) for c in curves]
    step = [0] * len(curves)
    choice = [h[0] for h in hulls]
    total = sum(c[j][0] for c, j in zip(curves, choice))
    heap: list[tuple[float, int]] = []

    def push(k: int) -> None:
        if step[k] + 1 < len(hulls[k]):
            (p0, e0, _), (p1, e1, _) = curves[k][choice[k]], curves[k][hulls[k][step[k] + 1]]
            heapq.heappush(heap, (-(e0 - e1) / (p1 - p0), k))

    for k in range(len(curves)):
        push(k)
    rates: list[float] = []  # error per parameter of the accepted steps
    skipped: list[float] = []  # ... and of the steps the budget could not pay for
    while heap:
        rate, k = heapq.heappop(heap)
        nxt = hulls[k][step[k] + 1]
        added = curves[k][nxt][0] - curves[k][choice[k]][0]
        if total + added > budget:
            skipped.append(-rate)
            continue  # this weight stops here: its later steps come after this one
        total += added
        rates.append(-rate)
        step[k] += 1
        choice[k] = nxt
        push(k)
    # The price of a parameter at the greedy optimum (what one short of the budget is worth
    # in error): the best rate the budget could not pay for, else the last one it did.
    price = max(skipped) if skipped else min(rates, default=0.0)
    choice = _polish(curves, choice, budget * (1 - TOLERANCE), budget, price)
    total = sum(c[j][0] for c, j in zip(curves, choice))
    if total < budget * (1 - TOLERANCE):  # coarse steps: allow up to 2% above the budget
        choice = _polish(curves, choice, budget * (1 - TOLERANCE), budget * (1 + TOLERANCE), price)
    return choice


def _polish(
    curves: list[list[Option]], choice: list[int], lo: float, hi: float, price: float
) -> list[int]:
    """Local search: move one weight to any candidate, or two weights by up to ``REACH``
    candidates each, while that brings a total above ``hi`` down or, at most ``hi``, lowers
    the total error plus ``price`` per parameter short of ``lo``. Priced, not first: a
    total that only looks closer to the budget is not worth gutting one layer's error to
    give its parameters to another."""
    choice = list(choice)
    total = sum(c[j][0] for c, j in zip(curves, choice))
    error = sum(c[j][1] for c, j in zip(curves, choice))

    def key(t: float, e: float) -> tuple[float, float]:
        return (max(t - hi, 0.0), e + price * max(lo - t, 0.0))

    for _ in range(100 * len(curves)):
        best, best_key = None, key(total, error)
        moves = [[(k, j)] for k, c in enumerate(curves) for j in range(len(c))]
        near = [
            [(k, j) for j in range(max(0, choice[k] - REACH), min(len(c), choice[k] + REACH + 1))]
            for k, c in enumerate(curves)
        ]
        moves += [
            [a, b]
            for ka in range(len(curves))
            for kb in range(ka)
            for a in near[ka]
            for b in near[kb]
        ]
        for move in moves:
            t, e = total, error
            for k, j in move:
                t += curves[k][j][0] - curves[k][choice[k]][0]
                e += curves[k][j][1] - curves[k][choice[k]][1]
            if key(t, e) < best_key:
                best, best_key = move, key(t, e)
        if best is None:
            break
        for k, j in best:
            total += curves[k][j][0] - curves[k][choice[k]][0]
            error += curves[k][j][1] - curves[k][choice[k]][1]
            choice[k] = j
    return choice
