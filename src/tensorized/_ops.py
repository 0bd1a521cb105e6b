"""Small tensor primitives shared by the formats and the decompositions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def capturing() -> bool:
    """Whether a graph is being captured (``torch.compile`` / ``torch.export``, or the
    TorchScript tracer of the legacy ONNX exporter): choices that depend on data, custom
    autograd functions and timing are kept out of graphs."""
    return torch.compiler.is_compiling() or torch._C._is_tracing()


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


def khatri_rao_grad(factors: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """Gradients of the ``factors`` from ``grad`` ``(prod n_k, R)``, the gradient of their
    :func:`khatri_rao` product: each factor's is ``grad`` times the product of the others,
    summed over their modes (one broadcast product and reduction per factor, never more
    than ``grad``'s size at once)."""
    sizes, rank = [f.shape[0] for f in factors], grad.shape[-1]
    g = grad.reshape(*sizes, rank)
    grads = []
    for k in range(len(factors)):
        t = g
        for j, f in enumerate(factors):
            if j != k:  # multiply the other factors in and sum their modes away
                view = [1] * len(sizes) + [rank]
                view[j] = sizes[j]
                t = (t * f.reshape(view)).sum(j, keepdim=True)
        grads.append(t.reshape(sizes[k], rank))
    return grads


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


def kronecker_factors(gram: Tensor, modes: Sequence[int]) -> list[Tensor]:
    """Per-mode factors ``C_k (n_k, n_k)`` with ``gram ~ C_1 (x) ... (x) C_d`` (up to scale),
    for a ``gram`` over ``prod(modes)`` features ordered row-major: the partial traces
    ``C_k = tr_{l != k} gram``, each scaled to a mean diagonal of 1. For a Kronecker-product
    ``gram`` they are its factors exactly; in general they are the one-step estimate of the
    tensor-normal (separable) covariance that the flip-flop algorithm of P. Dutilleul ("The
    MLE algorithm for the matrix normal distribution", J. Statist. Comput. Simul. 64, 1999)
    refines (on MiniLM activations its refinement changed the resulting fits by <1%)."""
    d = len(modes)
    t = gram.reshape(*modes, *modes)
    factors = []
    for k in range(d):
        rows = [chr(97 + j) for j in range(d)]
        cols = [rows[j] if j != k else chr(97 + d + k) for j in range(d)]  # traced unless k
        c = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{rows[k]}{cols[k]}", t)
        factors.append(c / c.diagonal().mean().clamp_min(torch.finfo(c.dtype).tiny))
    return factors


def symmetric_root(c: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(C^{1/2}, C^{-1/2})`` of a symmetric PSD matrix, eigenvalues floored at ``floor``
    times the largest (so the inverse root stays bounded)."""
    lam, vecs = torch.linalg.eigh(c)
    lam = lam.clamp_min(floor * lam.max().clamp_min(torch.finfo(c.dtype).tiny))
    return (vecs * lam.sqrt()) @ vecs.T, (vecs / lam.sqrt()) @ vecs.T


def kronecker_whiten(
    tensor: Tensor, gram: Tensor, modes: Sequence[int], first: int
) -> tuple[Tensor, list[Tensor]]:
    """``tensor`` with its axes ``first, first + 1, ...`` (sizes ``modes``) multiplied by
    ``C_k^{1/2}``, the roots of the Kronecker factors of ``gram``
    (:func:`kronecker_factors`), and the inverse roots ``C_k^{-1/2}`` that undo it."""
    inverses = []
    for k, c in enumerate(kronecker_factors(gram, modes)):
        root, inverse = symmetric_root(c)
        tensor = mode_dot(tensor, root, first + k)
        inverses.append(inverse)
    return tensor, inverses


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


def sliced_matmul(h: Tensor, slices: Tensor, index: Tensor) -> Tensor:
    """``out[b] = h[b] @ slices[index[b]]``: ``h (n, a, r)``, ``slices (o, r, c)`` (or ``(o,
    r, *dims)`` with ``prod(dims) = c``), ``index (n,)`` -> ``(n, a, c)``; the per-row core
    products of a tensor-train lookup.

    With more rows than slices, the rows are sorted by slice and each slice multiplies its
    whole group in one GEMM: nothing of size ``n x r x c`` is copied, the grouped products
    that TT-Rec (Yin et al., MLSys 2021) runs as batched GEMMs over slice pointers. With few
    rows (and under ``torch.compile`` or on ``meta``, where group sizes are unknown) the
    slices are gathered and one ``bmm`` runs.
    """
    (n, a, r), o = h.shape, slices.shape[0]
    c = math.prod(slices.shape[2:])
    grouped = _grouped(n, a, r, c, o)
    if not grouped or h.is_meta or torch.compiler.is_compiling():
        return torch.bmm(h, slices.index_select(0, index).reshape(n, r, c))
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=o).tolist()
    groups = h.index_select(0, order).split(counts)
    # unbind: one backward for all slices (indexing each would allocate and sum o zero-filled
    # gradients of the whole slices tensor)
    # (a slice that is not a view of (r, c) is copied here, one at a time: never all at once)
    done = torch.cat([g @ s.reshape(r, c) for s, g in zip(slices.unbind(0), groups) if len(g)])
    # Back to the rows' order by a gather (index_copy into a fresh tensor is twice as slow).
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return done.index_select(0, inverse)


def sliced_matmul_work(
    n: int, a: int, r: int, c: int, o: int
) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """``(products, element-wise numel, extra calls)`` of :func:`sliced_matmul`."""
    if not _grouped(n, a, r, c, o):
        return [(a, r, c, n)], n * r * c, 0
    return [(n * a, r, c, 1)], n * a * (r + c), min(n, o) + 4


def _grouped(n: int, a: int, r: int, c: int, o: int) -> bool:
    # Grouping copies h twice (sorted in, unsorted out: a (r + c) per row); gathering copies
    # one slice per row (r c). Group when rows outnumber slices and slices are the larger.
    return n > o and r * c > a * (r + c)


def prefix_chain(
    slices: Sequence[Tensor], digits: Sequence[Tensor], merge: Sequence[bool]
) -> Tensor:
    """Row ``b`` of a chain of sliced cores: ``slices[0][d_0] @ slices[1][d_1] @ ...`` with
    ``d_k = digits[k][b]``, each ``slices[k]`` ``(o_k, r_{k-1}, i_k, r_k)`` (``r_0 = 1``) and
    each product's ``i`` axes kept, first most significant: -> ``(n, prod i_k, r_m)``.

    Where ``merge[k]``, rows that share their digits up to ``k`` (a prefix) share its state:
    the step runs once per distinct prefix (the nodes of the rows' prefix tree), not once per
    row. ``merge`` must be ``True`` up to some step and ``False`` after it.
    """
    if digits[0].is_meta or torch.compiler.is_compiling():  # distinct counts are data
        merge = [False] * len(merge)
    first = slices[0][:, 0]  # (o_1, i_1, r_1)
    key, states = digits[0], None  # states: the sorted distinct prefixes, when merged
    if len(merge) > 1 and merge[1]:
        states = torch.unique(key)
        h = first.index_select(0, states)
    else:
        h = first.index_select(0, key)
    # sliced_matmul flattens each slice's (i, r2) where it uses it: a slice that is not a
    # view of (r, i * r2) (the flipped cores) is copied then, never the whole core at once
    for mats, d, shared in zip(slices[1:], digits[1:], merge[1:]):
        o, r2 = mats.shape[0], mats.shape[-1]
        if shared:
            key = key * o + d
            distinct, inverse = torch.unique(key, return_inverse=True)
            assert states is not None
            parent = torch.searchsorted(states, torch.div(distinct, o, rounding_mode="floor"))
            h = sliced_matmul(h.index_select(0, parent), mats, distinct % o)
            states = distinct
        else:
            if states is not None:  # back to one state per row
                h, states = h.index_select(0, inverse), None
            h = sliced_matmul(h, mats, d)
        h = h.reshape(len(h), -1, r2)
    return h if states is None else h.index_select(0, inverse)


def prefix_chain_work(
    shapes: Sequence[Sequence[int]], n: int, merge: Sequence[bool]
) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """``(products, element-wise numel, extra calls)`` of :func:`prefix_chain` over cores
    of ``shapes`` ``(r_{k-1}, o_k, i_k, r_k)``, counting ``min(n, prefixes)`` states at a
    merged step (exact when every prefix occurs; an upper bound otherwise)."""
    prefixes = shapes[0][1]
    states = min(n, prefixes) if len(merge) > 1 and merge[1] else n
    products: list[tuple[int, int, int, int]] = []
    numel, calls, done = states * shapes[0][2] * shapes[0][3], 0, shapes[0][2]
    for (r, o, i, r2), shared in zip(list(shapes)[1:], list(merge)[1:]):
        prefixes *= o
        rows = min(n, prefixes) if shared else n
        gemms, moved, extra = sliced_matmul_work(rows, done, r, i * r2, o)
        products += gemms
        numel += moved + rows * done * r  # the parents' states gathered
        calls += extra + (4 if shared else 0)  # unique, searchsorted, div, remainder
        done *= i
    if merge[-1]:
        numel += n * done * shapes[-1][3]
    return products, numel, calls


def prefix_merges(out_modes: Sequence[int], n: int) -> tuple[bool, ...]:
    """Which steps of a :func:`prefix_chain` over ``n`` rows share prefixes: those with at
    most twice as many possible prefixes as rows (the first step follows the second)."""
    merge, prefixes = [], 1
    for o in out_modes:
        prefixes *= o
        merge.append(2 * n > prefixes)
    if len(merge) == 1:
        return (False,)
    merge[0] = merge[1]
    return tuple(merge)
