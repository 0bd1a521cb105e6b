"""Budgeted rank allocation: spend a total parameter budget where it lowers the error most.

One ratio for every layer wastes parameters: a weight with a fast decaying spectrum loses
little at a low rank, a flat one needs more. :func:`allocate_ranks` picks one concrete rank
per weight to minimize the total squared weight error ``sum_k ||W_k - What_k||_F^2`` under a
total parameter count:

1. **Error curves**: candidate ranks of each weight with their parameters and squared error.

   * ``'lowrank'``: every rank, exact error from the singular values (Eckart-Young-Mirsky;
     summed over the layers of a joint group).
   * ``'tucker'``: exact error of the truncated HOSVD, ``||W||^2 - ||W x_k U_k^T||^2``
     (De Lathauwer et al., SIAM J. Matrix Anal. Appl. 21(4), 2000), an upper bound of what
     the HOOI of ``from_linear`` reaches.
   * ``'tt'`` / ``'blocktt'``: exact error of the TT-SVD that ``from_linear`` runs
     (Oseledets, SIAM J. Sci. Comput. 33(5), 2011).
   * ``'cp'``: the rank at each candidate fraction up to twice the overall budget fraction
     (ALS costs grow as R^3), with the error of a short CP-ALS run (at most 10 iterations,
     ``tol=1e-3``), an estimate of what the longer ALS of ``from_linear`` reaches.

   Tucker and train candidates: ``resolve_rank(fraction)`` at each candidate fraction, plus
   a data-adapted chain from all ranks 1, each step raising the rank that most lowers the
   truncation bound ``sum_k tail_k(r_k)`` per added parameter (``tail_k``: squared singular
   values of the mode or bond unfolding beyond ``r_k``; De Lathauwer et al. 2000, Oseledets
   2011, Thm. 2.2).
2. **Greedy marginal allocation** on the lower convex hull of each curve: from the smallest
   ranks, repeatedly take the step with the largest error decrease per added parameter that
   fits the budget. This solves the LP relaxation of the multiple-choice knapsack (P. Sinha,
   A. A. Zoltners, Operations Research 27(3), 1979); the same greedy selects ranks for
   whole-network low-rank acceleration in X. Zhang et al., "Accelerating Very Deep
   Convolutional Networks for Classification and Detection", TPAMI 38(10), 2016.
3. **Polish**: a local search (one weight to any candidate, or an exchange between two)
   brings the total within 2% under the budget (2% over it if the steps are too coarse) and
   lowers the error further where it can.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import decompose
from ._ops import mode_dot, unfold
from .formats import canonical_name
from .ranks import (
    ConcreteRank,
    RankBudgetWarning,
    param_count,
    rank_caps,
    resolve_rank,
    train_modes,
)
from .shapes import Modes, validate_modes

__all__ = ["DEFAULT_CANDIDATES", "allocate_ranks"]

F64 = torch.float64
TOLERANCE = 0.02
#: Default candidate fractions of each weight's dense parameter count.
DEFAULT_CANDIDATES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
CHAIN_SAMPLES = 24  # chain members whose error is computed by an actual decomposition
REACH = 3  # how far (in candidates) each of two weights moves in one exchange of _polish

Option = tuple[int, float, ConcreteRank]  # (parameters, squared error, concrete rank)


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
        are too coarse; if even that fails, the nearest total and a ``RankBudgetWarning``).

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
    fmt = canonical_name(factorization)
    entries = _check_entries(weights, modes, fmt)
    fractions = _check_candidates(candidates)
    if decomposition_kwargs is not None and not isinstance(decomposition_kwargs, Mapping):
        raise TypeError(
            f"decomposition_kwargs must be a mapping, got {type(decomposition_kwargs).__name__}"
        )
    kwargs = dict(decomposition_kwargs or {})
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise TypeError(f"budget must be a number of parameters (an int), got {budget!r}")
    dense_total = sum(math.prod(W.shape) for W, *_ in entries)
    min_total = dense_total
    if fmt != "dense":  # all ranks 1
        ones = [
            1 if fmt in ("cp", "lowrank") else (1,) * len(rank_caps(fmt, i, o, L))
            for _, i, o, L in entries
        ]
        min_total = sum(param_count(fmt, i, o, r, L) for (_, i, o, L), r in zip(entries, ones))
    if not min_total <= budget <= dense_total:
        raise ValueError(
            f"budget={budget} is outside the reachable range [{min_total}, {dense_total}] for "
            f"factorization={fmt!r}: the smallest ranks give {min_total} parameters and the "
            f"dense weights have {dense_total}"
        )
    if fmt == "dense":
        return [None] * len(entries)
    if fmt == "cp":  # ALS cost grows as R^3: skip fractions far above the overall one
        fractions = tuple(f for f in fractions if f <= 2 * budget / dense_total) or fractions[:1]
    curves = [_curve(fmt, W, i, o, L, fractions, kwargs) for W, i, o, L in entries]
    choice = _allocate(curves, float(budget))
    total = sum(curve[j][0] for curve, j in zip(curves, choice))
    if abs(total - budget) > TOLERANCE * budget:
        warnings.warn(
            f"budget={budget}: the nearest total that factorization={fmt!r} reaches with these "
            f"candidate ranks is {total} ({total / budget - 1:+.1%}); pass finer candidates",
            RankBudgetWarning,
            stacklevel=2,
        )
    return [curve[j][2] for curve, j in zip(curves, choice)]


# --------------------------------------------------------------------------- validation


def _check_entries(weights, modes, fmt: str) -> list[tuple[Tensor, Modes, Modes, int]]:
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
        if fmt == "blocktt" and len(in_modes) != len(out_modes):
            raise ValueError(
                f"factorization='blocktt' needs as many in modes as out modes; modes[{k}] is "
                f"{(in_modes, out_modes)}"
            )
        entries.append((W.detach(), in_modes, out_modes, W.shape[0] if W.ndim == 3 else 1))
    return entries


def _check_candidates(candidates) -> tuple[float, ...]:
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


# --------------------------------------------------------------------------- error curves


def _curve(fmt, W, in_modes, out_modes, n_layers, fractions, kwargs) -> list[Option]:
    """Candidate ``(params, squared error, rank)`` of one weight, sorted by params."""
    lead = (n_layers,) if n_layers > 1 else ()
    X = W.to(F64).reshape(*lead, *out_modes, *in_modes)
    norm_sq = float(X.pow(2).sum())

    def count(rank: ConcreteRank) -> int:
        return param_count(fmt, in_modes, out_modes, rank, n_layers)

    if fmt == "lowrank":
        s2 = torch.linalg.svdvals(W.to(F64).reshape(n_layers, *W.shape[-2:])).pow(2).sum(0)
        tails = _tails(s2)
        return [(count(r), float(tails[r]), r) for r in range(1, len(s2) + 1)]
    family = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankBudgetWarning)
        for f in fractions:
            try:
                family.append(resolve_rank(fmt, in_modes, out_modes, f, n_layers))
            except ValueError:  # this fraction is outside what the format reaches here
                continue
    if fmt == "cp":
        ranks = sorted({1, *family})
        options = []
        for r in ranks:
            # float32 weights: cp_als runs its big GEMMs in float32 (twice as fast)
            error = _cp_error_sq(X.to(W.dtype), r, norm_sq, kwargs)
            if error is not None:
                options.append((count(r), error, r))
        return options
    caps = rank_caps(fmt, in_modes, out_modes, n_layers)
    if fmt == "tucker":
        offset = len(lead)
        bases, tails = [], []
        for k in range(len(caps)):
            M = unfold(X, offset + k)
            vals, vecs = torch.linalg.eigh(M @ M.T)  # left singular vectors of the unfolding
            bases.append(vecs.flip(-1))
            tails.append(_tails(vals.flip(-1).clamp_min(0)))
        chain = _sample(_chain(tails, caps, count), count, 4 * CHAIN_SAMPLES)

        def error(rank: ConcreteRank) -> float:
            return _tucker_error_sq(X, bases, rank, offset, norm_sq)

    else:
        sizes = train_modes(fmt, in_modes, out_modes, n_layers)
        T = (X if fmt == "tt" else _pairs(X, len(lead), len(out_modes))).reshape(sizes)
        # Float32 sweeps are 3x faster and precise enough for a curve, unless W is float64.
        T = T.to(F64 if W.dtype == F64 else torch.float32)
        tails = []
        for k in range(len(caps)):
            M = T.reshape(math.prod(sizes[: k + 1]), -1)
            tails.append(_tails(torch.linalg.eigvalsh(_gram(M)).flip(-1).clamp_min(0)))
        chain = _sample(_chain(tails, caps, count), count, CHAIN_SAMPLES)

        def error(rank: ConcreteRank) -> float:
            return _train_error_sq(T, rank, norm_sq)

    ranks = list(dict.fromkeys([*chain, *family]))
    return sorted((count(r), error(r), r) for r in ranks)


def _gram(M: Tensor) -> Tensor:
    """``M M^T`` or ``M^T M``, whichever is smaller (same nonzero eigenvalues)."""
    return M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M


def _tails(s2: Tensor) -> Tensor:
    """``tails[r] = sum(s2[r:])`` for ``r = 0 .. len(s2)``: the error of keeping ``r``."""
    rev = torch.cumsum(s2.flip(0), 0).flip(0)
    return torch.cat([rev, rev.new_zeros(1)])


def _chain(tails: list[Tensor], caps: tuple[int, ...], count) -> list[tuple[int, ...]]:
    """Rank tuples from all 1s to ``caps``, each step raising the rank with the largest
    decrease of the bound ``sum_k tails[k][r_k]`` per added parameter."""
    r = [1] * len(caps)
    chain = [tuple(r)]
    current = count(tuple(r))
    while any(v < c for v, c in zip(r, caps)):
        best, best_ratio, best_count = -1, -1.0, 0
        for k, cap in enumerate(caps):
            if r[k] >= cap:
                continue
            r[k] += 1
            added = count(tuple(r))
            r[k] -= 1
            gain = float(tails[k][r[k]] - tails[k][r[k] + 1])
            ratio = gain / max(added - current, 1)
            if ratio > best_ratio:
                best, best_ratio, best_count = k, ratio, added
        r[best] += 1
        current = best_count
        chain.append(tuple(r))
    return chain


def _sample(chain: list[tuple[int, ...]], count, n: int) -> list[tuple[int, ...]]:
    """At most about ``n`` members spread evenly in log(params), with both ends."""
    if len(chain) <= n:
        return chain
    logs = [math.log(count(r)) for r in chain]
    targets = [logs[0] + (logs[-1] - logs[0]) * j / (n - 1) for j in range(n)]
    picked, i = [], 0
    for t in targets:
        while i + 1 < len(logs) and logs[i + 1] <= t:
            i += 1
        picked.append(chain[i])
    return list(dict.fromkeys([*picked, chain[-1]]))


def _tucker_error_sq(X: Tensor, bases: list[Tensor], rank, offset: int, norm_sq: float) -> float:
    core = X
    for k in sorted(range(len(rank)), key=lambda k: rank[k] / bases[k].shape[0]):
        core = mode_dot(core, bases[k][:, : rank[k]].T, offset + k)
    return max(norm_sq - float(core.pow(2).sum()), 0.0)


def _pairs(X: Tensor, lead: int, m: int) -> Tensor:
    """``([L,] out_1..out_m, in_1..in_m) -> ([L,] out_1, in_1, ..., out_m, in_m)``."""
    perm = list(range(lead))
    for k in range(m):
        perm += [lead + k, lead + m + k]
    return X.permute(perm)


def _train_error_sq(T: Tensor, rank: tuple[int, ...], norm_sq: float) -> float:
    """Squared error of the TT-SVD of ``T`` (train layout) at ``rank``.

    The sweep of :func:`tensorized.decompose.tensor_train`, but each step only needs the
    leading singular subspace and the discarded energy, taken from the eigendecomposition of
    the smaller Gram matrix of the unfolding (much cheaper than its SVD): the TT-SVD error is
    exactly the sum of the energies discarded at each step.
    """
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


def _cp_error_sq(X: Tensor, rank: int, norm_sq: float, kwargs) -> float | None:
    # Short runs by design: the options of the final decomposition may ask for many more.
    options = {"tol": 1e-3, **kwargs, "n_iter_max": min(10, kwargs.get("n_iter_max", 10))}
    try:
        result = decompose.cp_als(X, rank, **options)
    except ValueError:
        if rank == 1:  # bad options: say so
            raise
        return None  # a rank too costly to run (cp_als's max_iter_flops): not a candidate
    return result.errors[-1] ** 2 * norm_sq


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
    while heap:
        _, k = heapq.heappop(heap)
        nxt = hulls[k][step[k] + 1]
        added = curves[k][nxt][0] - curves[k][choice[k]][0]
        if total + added > budget:
            continue  # this weight stops here: its later steps come after this one
        total += added
        step[k] += 1
        choice[k] = nxt
        push(k)
    choice = _polish(curves, choice, budget * (1 - TOLERANCE), budget)
    total = sum(c[j][0] for c, j in zip(curves, choice))
    if total < budget * (1 - TOLERANCE):  # coarse steps: allow up to 2% above the budget
        choice = _polish(curves, choice, budget * (1 - TOLERANCE), budget * (1 + TOLERANCE))
    return choice


def _polish(curves: list[list[Option]], choice: list[int], lo: float, hi: float) -> list[int]:
    """Local search: move one weight to any candidate, or two weights by up to ``REACH``
    candidates each, while that brings the total closer to ``[lo, hi]`` or, inside it,
    lowers the total error."""
    choice = list(choice)
    total = sum(c[j][0] for c, j in zip(curves, choice))
    error = sum(c[j][1] for c, j in zip(curves, choice))

    def key(t: float, e: float) -> tuple[float, float]:
        return (max(lo - t, t - hi, 0.0), e)

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
