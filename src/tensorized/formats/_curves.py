"""Helpers of the formats' error curves (the candidates of budgeted rank allocation).

A curve lists candidate ranks of one weight with their parameter count and squared weight
error. Tucker and train formats build a data-adapted chain from all ranks 1, each step
raising the rank that most lowers the truncation bound ``sum_k tail_k(r_k)`` per added
parameter (``tail_k``: squared singular values of the mode or bond unfolding beyond ``r_k``;
De Lathauwer et al., SIAM J. Matrix Anal. Appl. 21(4), 2000; Oseledets, SIAM J. Sci.
Comput. 33(5), 2011, Thm. 2.2), plus the uniform family at each candidate fraction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._shapes import Modes

__all__ = ["CHAIN_SAMPLES", "chain", "family", "gram", "sample", "spectrum", "tails"]

CHAIN_SAMPLES = 24  # chain members whose error is computed by an actual decomposition


def family(
    fmt: Any, in_modes: Modes, out_modes: Modes, n_layers: int, fractions: Sequence[float]
) -> list:
    """``resolve_rank(fraction)`` of ``fmt`` at each candidate fraction it can reach."""
    from .._ranks import RankBudgetWarning, resolve_rank

    ranks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankBudgetWarning)
        for f in fractions:
            try:
                ranks.append(resolve_rank(fmt, in_modes, out_modes, f, n_layers))
            except ValueError:  # this fraction is outside what the format reaches here
                continue
    return ranks


def gram(M: Tensor) -> Tensor:
    """``M M^T`` or ``M^T M``, whichever is smaller (same nonzero eigenvalues)."""
    return M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M


def tails(s2: Tensor) -> Tensor:
    """``tails[r] = sum(s2[r:])`` for ``r = 0 .. len(s2)``: the error of keeping ``r``."""
    rev = torch.cumsum(s2.flip(0), 0).flip(0)
    return torch.cat([rev, rev.new_zeros(1)])


def spectrum(
    cls: Any, in_modes: Modes, out_modes: Modes, n_layers: int, s2: Tensor
) -> list[tuple[int, float, Any]]:
    """Every int rank ``r = 1 .. len(s2)`` of a format whose squared error at rank ``r`` is
    exactly ``tails(s2)[r]`` (a truncated SVD: Eckart-Young-Mirsky), as curve options
    ``(parameters, squared error, r)``."""
    rest = tails(s2)
    return [
        (cls.param_count(in_modes, out_modes, r, n_layers), float(rest[r]), r)
        for r in range(1, len(s2) + 1)
    ]


def chain(
    tail: list[Tensor], caps: tuple[int, ...], count: Callable[[tuple[int, ...]], int]
) -> list[tuple[int, ...]]:
    """Rank tuples from all 1s to ``caps``, each step raising the rank with the largest
    decrease of the bound ``sum_k tail[k][r_k]`` per added parameter."""
    r = [1] * len(caps)
    out = [tuple(r)]
    current = count(tuple(r))
    while any(v < c for v, c in zip(r, caps)):
        best, best_ratio, best_count = -1, -1.0, 0
        for k, cap in enumerate(caps):
            if r[k] >= cap:
                continue
            r[k] += 1
            added = count(tuple(r))
            r[k] -= 1
            gain = float(tail[k][r[k]] - tail[k][r[k] + 1])
            ratio = gain / max(added - current, 1)
            if ratio > best_ratio:
                best, best_ratio, best_count = k, ratio, added
        r[best] += 1
        current = best_count
        out.append(tuple(r))
    return out


def sample(
    members: list[tuple[int, ...]], count: Callable[[tuple[int, ...]], int], n: int
) -> list[tuple[int, ...]]:
    """At most about ``n`` members spread evenly in log(params), with both ends."""
    if len(members) <= n:
        return members
    logs = [math.log(count(r)) for r in members]
    targets = [logs[0] + (logs[-1] - logs[0]) * j / (n - 1) for j in range(n)]
    picked, i = [], 0
    for t in targets:
        while i + 1 < len(logs) and logs[i + 1] <= t:
            i += 1
        picked.append(members[i])
    return list(dict.fromkeys([*picked, members[-1]]))
