"""Streamed statistics of a layer's input rows: what calibration fits, in bounded memory.

A layer's output error over a set of rows only depends on sums of outer products of the
rows: with ``x~ = (x, 1)`` and ``s~ = (s, 1)`` (``s`` the original model's input of the same
sample, ``= x`` unless calibration is sequential), ``sum ||What~ x~ - W~ s~||^2 = tr(What~
XX What~^T) - 2 tr(What~ XS W~^T) + tr(W~ SS W~^T)`` with ``What~ = [What, bhat]``,
``W~ = [W, b]``, ``XX = sum x~ x~^T``, ``XS = sum x~ s~^T``, ``SS = sum s~ s~^T``. Those
three ``(in + 1)`` square matrices (the count and the sums are their last row and column) are
accumulated in float64 as rows stream past, for the fit rows and the held-out rows apart, so
memory does not grow with the number of calibration rows.

Rows are split by their position in the stream, so that the split does not depend on how the
stream is batched: row 0 is fitted, row 1 held out (each side has a row as soon as there are
two), and row ``k >= 2`` is held out when ``frac(c + k phi) < holdout``, ``phi`` the golden
ratio's fractional part and ``c`` set by the seed: a Kronecker (Weyl) sequence, whose count
of held-out rows among the first ``n`` stays within a few rows of ``holdout * n``
(Kuipers & Niederreiter, "Uniform Distribution of Sequences", 1974, ch. 1, sec. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["InputStatistics", "Moments", "holdout_split"]

F64 = torch.float64
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def _held_out(start: int, n: int, holdout: float, seed: int, device: torch.device) -> Tensor:
    """Whether rows ``start .. start + n - 1`` of a stream are held out (a bool mask)."""
    k = torch.arange(start, start + n, dtype=F64, device=device)
    offset = math.modf(seed * math.sqrt(2.0))[0]
    held = torch.frac(offset + k * _PHI) < holdout
    held[k == 0] = False
    held[k == 1] = True
    return held


def holdout_split(n_rows: int, holdout: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The seeded split of ``n_rows`` rows that :func:`~tensorized.calibrate` uses.

    Args:
        n_rows: number of rows, at least 2.
        holdout: fraction of held-out rows, in ``(0, 1)``; at least one row on each side.
        seed: selects the split.

    Returns:
        ``(fit, held_out)``: sorted row indices, shapes ``(n_fit,)`` and ``(n_held,)``.
    """
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 2:
        raise ValueError(f"n_rows must be an int >= 2 (one fit and one held-out row), got {n_rows}")
    if isinstance(holdout, bool) or not isinstance(holdout, float | int) or not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    held = _held_out(0, n_rows, float(holdout), seed, torch.device("cpu"))
    return (~held).nonzero().flatten(), held.nonzero().flatten()


class Moments:
    """``XX``, ``XS`` and ``SS`` (see the module docstring) of a set of rows; ``XS`` and
    ``SS`` are ``XX`` itself when the rows are not paired with source rows."""

    def __init__(self, n_in: int, device: torch.device, paired: bool) -> None:
        self.xx = torch.zeros(n_in + 1, n_in + 1, dtype=F64, device=device)
        self.xs = torch.zeros_like(self.xx) if paired else self.xx
        self.ss = torch.zeros_like(self.xx) if paired else self.xx

    @property
    def paired(self) -> bool:
        return self.xs is not self.xx

    @property
    def n(self) -> int:
        return int(self.xx[-1, -1])

    def add(self, x: Tensor, s: Tensor | None) -> None:
        xa = _augmented(x)
        self.xx.addmm_(xa.T, xa)
        if s is not None:
            sa = _augmented(s)
            self.xs.addmm_(xa.T, sa)
            self.ss.addmm_(sa.T, sa)

    def mean(self) -> Tensor:
        """The mean input row ``(in,)``."""
        return self.xx[:-1, -1] / max(self.n, 1)

    def source_mean(self) -> Tensor:
        """The mean source row ``(in,)`` (the mean input row when not paired)."""
        return self.ss[:-1, -1] / max(self.n, 1)

    def centred_gram(self) -> Tensor:
        """``sum (x - mean)(x - mean)^T``, ``(in, in)``."""
        mean = self.mean()
        return self.xx[:-1, :-1] - self.n * torch.outer(mean, mean)

    def centred_cross(self) -> Tensor:
        """``sum (x - mean)(s - source mean)^T``, ``(in, in)``."""
        return self.xs[:-1, :-1] - self.n * torch.outer(self.mean(), self.source_mean())

    def centred_source_gram(self) -> Tensor:
        """``sum (s - source mean)(s - source mean)^T``, ``(in, in)``."""
        mean = self.source_mean()
        return self.ss[:-1, :-1] - self.n * torch.outer(mean, mean)

    def squared_error(self, W_hat: Tensor, b_hat: Tensor, W: Tensor, b: Tensor) -> float:
        """``sum ||What x + bhat - (W s + b)||^2`` over the rows (float64 operands)."""
        return self.error_against(W, b)(W_hat, b_hat)

    def error_against(self, W: Tensor, b: Tensor) -> Callable[[Tensor, Tensor], float]:
        """``(What, bhat) -> sum ||What x + bhat - (W s + b)||^2`` over the rows, with the
        terms that only depend on ``W, b`` computed once."""
        B = torch.cat([W, b[:, None]], 1)
        if not self.paired:  # one quadratic form: no cancellation, only rounding below 0

            def unpaired(W_hat: Tensor, b_hat: Tensor) -> float:
                D = torch.cat([W_hat, b_hat[:, None]], 1) - B
                return max(float(((D @ self.xx) * D).sum()), 0.0)

            return unpaired
        cross = B @ self.xs.T  # (out, in + 1)
        constant = ((B @ self.ss) * B).sum()

        def paired(W_hat: Tensor, b_hat: Tensor) -> float:
            A = torch.cat([W_hat, b_hat[:, None]], 1)
            value = ((A @ self.xx) * A).sum() - 2 * (A * cross).sum() + constant
            return max(float(value), 0.0)

        return paired

    def squared_norm(self, W: Tensor, b: Tensor) -> float:
        """``sum ||W s + b||^2`` over the rows."""
        B = torch.cat([W, b[:, None]], 1)
        return float(((B @ self.ss) * B).sum())


def _augmented(x: Tensor) -> Tensor:
    x = x.to(F64)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


class InputStatistics:
    """The :class:`Moments` of one layer's fit rows and held-out rows, accumulated as rows
    stream past (``add``), split by position in the stream (see the module docstring).

    Args:
        n_in: features per row.
        device: where the float64 sums live (the layer's device).
        paired: whether each row comes with its source row (sequential calibration).
        holdout: fraction of rows held out, in ``(0, 1)``.
        seed: selects the split.
    """

    def __init__(
        self, n_in: int, device: torch.device, paired: bool, holdout: float = 0.25, seed: int = 0
    ) -> None:
        self.n_in, self.holdout, self.seed = n_in, float(holdout), seed
        self.fit = Moments(n_in, device, paired)
        self.held = Moments(n_in, device, paired)
        self.seen = 0

    @property
    def paired(self) -> bool:
        return self.fit.paired

    def finite(self) -> bool:
        """Whether every row seen was finite (a NaN or Inf reaches the sums)."""
        return all(
            bool(torch.isfinite(m).all())
            for part in (self.fit, self.held)
            for m in {id(t): t for t in (part.xx, part.xs, part.ss)}.values()
        )

    def add(self, x: Tensor, s: Tensor | None = None) -> None:
        """Accumulate rows ``x (rows, n_in)`` (with their source rows ``s`` when paired)."""
        device = self.fit.xx.device
        if (s is not None) != self.paired:
            raise ValueError("source rows must be given exactly when the statistics are paired")
        x = x.to(device)
        s = None if s is None else s.to(device)
        held = _held_out(self.seen, x.shape[0], self.holdout, self.seed, device)
        self.seen += x.shape[0]
        for moments, rows in ((self.fit, ~held), (self.held, held)):
            if rows.any():
                moments.add(x[rows], None if s is None else s[rows])

    @classmethod
    def of_rows(
        cls, X: Tensor, S: Tensor | None = None, holdout: float = 0.25, seed: int = 0
    ) -> InputStatistics:
        """The statistics of the rows of ``X`` (paired with those of ``S`` if given)."""
        device = X.device if X.device.type != "mps" else torch.device("cpu")  # no float64
        stats = cls(X.shape[1], device, S is not None, holdout, seed)
        stats.add(X, S)
        return stats
