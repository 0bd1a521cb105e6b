"""Small tensor primitives shared by the formats and the decompositions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def khatri_rao(factors: Sequence[Tensor]) -> Tensor:
    """Column-wise Kronecker product of matrices ``(n_k, R)`` -> ``(prod n_k, R)``.

    Rows are ordered row-major (the first factor varies slowest), matching ``reshape`` of a
    tensor whose modes are in the order of ``factors``.
    """
    out = factors[0]
    rank = out.shape[-1]
    for f in factors[1:]:  # (rows so far, 1, R) * (n_k, R): one broadcast product per factor
        out = out.reshape(-1, 1, rank) * f
    return out.reshape(-1, rank)


def mode_dot(tensor: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Multiply mode ``axis`` of ``tensor`` (size n) by ``matrix`` of shape ``(m, n)``.

    The tensor is viewed as ``(before, n, after)`` so the result comes out contiguous
    without moving axes: one GEMM when ``before`` or ``after`` is 1, else a batched one.
    """
    shape = tensor.shape
    n, m = shape[axis], matrix.shape[0]
    before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    if after == 1:
        out = tensor.reshape(before, n) @ matrix.T
    elif before == 1:
        out = matrix @ tensor.reshape(n, after)
    else:
        out = matrix @ tensor.reshape(before, n, after)
    return out.reshape(*shape[:axis], m, *shape[axis + 1 :])


def unfold(tensor: Tensor, axis: int) -> Tensor:
    """Mode-``axis`` unfolding: ``(n_axis, prod of the other sizes)``."""
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def split_point(shape: Sequence[int]) -> int:
    """Index s in [1, d-1] that best balances prod(shape[:s]) against prod(shape[s:])."""
    best, best_cost = 1, None
    total = 1
    for n in shape:
        total *= n
    left = 1
    for s in range(1, len(shape)):
        left *= shape[s - 1]
        cost = max(left, total // left)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def frobenius_error(reference: Tensor, approximation: Tensor) -> float:
    """Relative Frobenius error ``||ref - approx|| / ||ref||`` (0 when both are zero)."""
    ref, approx = reference.to(torch.float64), approximation.to(torch.float64)
    peak = ref.abs().max() if ref.numel() else ref.new_zeros(())
    if peak > 0:  # the ratio is scale-free; the squares in norm() over/underflow past 1e154
        ref, approx = ref / peak, approx / peak
    norm = ref.norm()
    diff = (ref - approx).norm()
    if norm == 0:
        return float(diff)
    return float(diff / norm)
