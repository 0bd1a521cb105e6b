"""Pure-torch tensor decompositions, computed in float64 by default, on any device.

Algorithms and references:

* truncated SVD, exact (QR first for very rectangular matrices) or randomized with power
  iterations: N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
  SIAM Review 53(2), 2011.
* CP by alternating least squares: T. G. Kolda, B. W. Bader, "Tensor Decompositions and
  Applications", SIAM Review 51(3), 2009. The MTTKRPs are computed from one GEMM per half of
  the modes (split the modes in two balanced groups, contract the tensor with the Khatri-Rao
  product of one group, then finish each mode of the other group on that small partial
  result), so nothing larger than the tensor is ever allocated.
* Tucker by HOSVD then HOOI: L. De Lathauwer, B. De Moor, J. Vandewalle, "A multilinear
  singular value decomposition" and "On the best rank-1 and rank-(R1,...,RN) approximation of
  higher-order tensors", SIAM J. Matrix Anal. Appl. 21(4), 2000.
* TT-SVD: I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
* TT-matrix (MPO): the same sweep on the tensor whose modes are the interleaved pairs
  ``(out_k, in_k)``, Oseledets 2011, section 6.

Every function takes a tensor of any float dtype, works in ``dtype`` (float64 by default) and
returns results in that dtype. A ``generator`` makes random steps reproducible; without one a
generator seeded with 0 is used, so results are deterministic by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._ops import khatri_rao, mode_dot, split_point, unfold

__all__ = [
    "CPTensor",
    "LowRankMatrix",
    "TuckerTensor",
    "cp_als",
    "lowrank",
    "tensor_train",
    "tensor_train_matrix",
    "truncated_svd",
    "tucker",
]


class CPTensor(NamedTuple):
    """``tensor = sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r])``."""

    weights: Tensor
    factors: list[Tensor]
    errors: list[float]


class TuckerTensor(NamedTuple):
    """``tensor = core x_k factors[k]``; ``factors[k] is None`` for an uncompressed mode."""

    core: Tensor
    factors: list[Tensor | None]
    errors: list[float]


class LowRankMatrix(NamedTuple):
    """``matrix = U @ diag(S) @ V.mT``, batched over leading dims."""

    U: Tensor
    S: Tensor
    V: Tensor


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


def _pow2_scale(X: Tensor) -> float:
    """A power of two near ``max |X|`` when that lies outside ``[2^-64, 2^64]``, else 1.

    Dividing by it is exact, and it keeps the squares below (Gram matrices, squared norms)
    from overflowing to Inf or underflowing to 0 on extreme float64 inputs (and float32
    GEMMs out of slow subnormals). Inputs in the usual range are left bit-for-bit alone.
    """
    m = float(torch.linalg.vector_norm(X, math.inf)) if X.numel() else 0.0  # no |X| copy
    if m == 0 or 2.0**-64 <= m <= 2.0**64:
        return 1.0
    return math.ldexp(1.0, min(max(math.frexp(m)[1], -1000), 1000))


def _check_tensor(tensor: object, name: str = "tensor") -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf values; cannot decompose it")


# --------------------------------------------------------------------------- SVD


def truncated_svd(
    matrix: Tensor,
    rank: int,
    *,
    method: str = "auto",
    n_oversamples: int = 10,
    n_power_iter: int = 4,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` SVD ``matrix ~ U @ diag(S) @ Vh``, batched over leading dims.

    Args:
        matrix: ``(..., m, n)``.
        rank: number of singular triplets. If it exceeds ``min(m, n)`` the result is padded
            with zero singular values (so shapes are always as asked).
        method: ``'exact'``, ``'randomized'`` or ``'auto'`` (randomized when the rank is small
            compared to a large matrix, exact otherwise).
        n_oversamples: extra random vectors of the randomized range finder.
        n_power_iter: power iterations of the randomized range finder.
        generator: random generator for the randomized path.
        dtype: compute dtype (``None`` keeps the input's).

    Returns:
        ``U (..., m, rank)``, ``S (..., rank)``, ``Vh (..., rank, n)``.
    """
    _check_tensor(matrix, "matrix")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    M = matrix.to(dtype) if dtype is not None else matrix
    m, n = M.shape[-2:]
    k = min(m, n)
    r = min(rank, k)
    if method == "auto":
        method = "randomized" if k > 512 and 3 * (r + n_oversamples) < k else "exact"
    if method == "randomized" and r + n_oversamples < k:
        U, S, Vh = _randomized_svd(M, r, n_oversamples, n_power_iter, generator)
    else:
        U, S, Vh = _exact_svd(M)
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    if rank > r:  # pad with zero triplets so callers always get the shapes they asked for
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], rank - r)], dim=-1)
        S = torch.cat([S, S.new_zeros(*S.shape[:-1], rank - r)], dim=-1)
        Vh = torch.cat([Vh, Vh.new_zeros(*Vh.shape[:-2], rank - r, n)], dim=-2)
    return U, S, Vh


def _exact_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, n = M.shape[-2:]
    # LAPACK's SVD is slow on very rectangular matrices; a QR first shrinks them exactly.
    if m > 4 * n:
        Q, R = torch.linalg.qr(M)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return Q @ U, S, Vh
    if n > 4 * m:
        Q, R = torch.linalg.qr(M.mT)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return Vh.mT, S, (Q @ U).mT
    return torch.linalg.svd(M, full_matrices=False)


def _randomized_svd(
    M: Tensor, rank: int, n_oversamples: int, n_power_iter: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    gen = _generator(generator, M.device)
    n = M.shape[-1]
    omega = torch.randn(
        (*M.shape[:-2], n, rank + n_oversamples), generator=gen, device=M.device, dtype=M.dtype
    )
    Q, _ = torch.linalg.qr(M @ omega)
    for _ in range(n_power_iter):  # re-orthonormalize each pass to keep small directions
        Q, _ = torch.linalg.qr(M.mT @ Q)
        Q, _ = torch.linalg.qr(M @ Q)
    U, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    return (Q @ U)[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _leading_subspace(matrix: Tensor, rank: int, generator: torch.Generator | None) -> Tensor:
    """Orthonormal ``(m, rank)`` basis of the leading left singular subspace of ``matrix``.

    Through the Gram matrix when ``m`` is small (cheap and exact enough for a subspace),
    otherwise through the truncated SVD.
    """
    m = matrix.shape[0]
    if m <= 2048:
        _, vecs = torch.linalg.eigh(matrix @ matrix.T)
        return vecs.flip(-1)[:, :rank]
    return truncated_svd(matrix, rank, generator=generator, dtype=None)[0]


# --------------------------------------------------------------------------- low rank


def lowrank(
    matrix: Tensor, rank: int, *, dtype: torch.dtype = torch.float64, **svd_kwargs: Any
) -> LowRankMatrix:
    """Truncated SVD of a matrix or a batch of matrices (leading layer mode).

    Args:
        matrix: ``(..., out, in)``.
        rank: the rank ``r``.
        dtype: compute dtype.
        **svd_kwargs: passed to :func:`truncated_svd`.

    Returns:
        ``U (..., out, r)``, ``S (..., r)``, ``V (..., in, r)``.
    """
    U, S, Vh = truncated_svd(matrix, rank, dtype=dtype, **svd_kwargs)
    return LowRankMatrix(U, S, Vh.mT)


# --------------------------------------------------------------------------- CP


def _check_iterations(n_iter_max: object, tol: object) -> None:
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, int):
        raise TypeError(
            f"n_iter_max must be an int >= 0, got {type(n_iter_max).__name__} {n_iter_max!r}"
        )
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be an int >= 0, got {n_iter_max}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")


def cp_als(
    tensor: Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    init: str = "svd",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    max_iter_flops: float | None = 5e11,
) -> CPTensor:
    """CP decomposition by alternating least squares.

    Args:
        tensor: an order >= 2 tensor.
        rank: number of rank-one components R.
        n_iter_max: iteration cap.
        tol: stop when the relative error changes by less than this between iterations.
        init: ``'svd'`` (leading singular vectors of each unfolding, random columns beyond
            the mode size) or ``'random'``.
        generator: random generator (random columns, random init).
        dtype: compute dtype. The two large GEMMs per iteration (tensor times Khatri-Rao
            product) run in float32 when the input is float32; everything else in ``dtype``.
        max_iter_flops: refuse (``ValueError``) ranks whose ALS iteration would cost more
            than this many FLOPs (the ``R x R`` solves grow as ``R^3``), instead of running
            for hours; ``None`` disables the check.

    Returns:
        ``CPTensor(weights (R,), factors [(n_k, R)], errors)`` with unit-norm factor columns;
        ``errors`` holds the relative error after each iteration.
    """
    _check_tensor(tensor)
    if tensor.ndim < 2:
        raise ValueError(f"cp_als needs a tensor of order >= 2, got shape {tuple(tensor.shape)}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    _check_iterations(n_iter_max, tol)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    shape, d = tuple(tensor.shape), tensor.ndim
    iter_flops = 4 * tensor.numel() * rank + d * (rank**3 / 3 + 4 * rank**2 * max(shape))
    if max_iter_flops is not None and iter_flops > max_iter_flops:
        raise ValueError(
            f"CP rank {rank} on a tensor of shape {shape} needs about {iter_flops:.2g} FLOPs "
            f"per ALS iteration (the R x R solves grow as R^3), far more than a useful "
            f"compression: use a smaller rank (e.g. a parameter fraction of 0.1 or less) or "
            f"another format ('tucker', 'tt', 'blocktt'); pass max_iter_flops=None to run anyway"
        )
    X = tensor.to(dtype)
    scale = _pow2_scale(X)
    if scale != 1:
        X = X / scale
    gen = _generator(generator, X.device)
    norm_x = X.norm()
    factors = _cp_init(X, rank, init, gen)
    weights = X.new_ones(rank)
    if norm_x == 0:
        return CPTensor(weights * 0, factors, [0.0])
    s = split_point(shape)
    left, right = math.prod(shape[:s]), math.prod(shape[s:])
    # The two big tensor-times-Khatri-Rao GEMMs dominate the cost; a float32 input has only
    # 7 digits to fit, so they run in its precision (2x faster), the rest in ``dtype``.
    gemm_dtype = tensor.dtype if tensor.dtype == torch.float32 else dtype
    Xm = (tensor if scale == 1 else X).reshape(left, right).to(gemm_dtype)
    # The error expansion below carries the GEMMs' rounding, ~eps / err: near 1e-8 in
    # float64 but 3e-4 in float32 (where it would stall the stopping test on noise), so
    # under this bound the error is measured directly, in the GEMMs' dtype.
    direct_below = 1e-5 if gemm_dtype == torch.float64 else 0.25
    grams = [f.T @ f for f in factors]
    errors: list[float] = []
    for _ in range(n_iter_max):
        for lo, hi in ((0, s), (s, d)):
            # Contract with the other half's factors as they are now (the first half's are
            # already updated when the second half's turn comes).
            if lo == 0:
                partial = Xm @ khatri_rao(factors[s:]).to(gemm_dtype)
            else:
                partial = Xm.T @ khatri_rao(factors[:s]).to(gemm_dtype)
            Z = partial.to(dtype).reshape(*shape[lo:hi], rank)
            # V_k = (new grams before k) * (old grams after k): one running prefix product
            # and suffix products taken once per half, instead of d products per mode.
            suffix: list[Tensor | None] = [None] * (hi - lo)
            acc = _hadamard(grams[hi:]) if hi < d else None
            for k in reversed(range(lo, hi)):
                suffix[k - lo] = acc
                acc = grams[k] if acc is None else acc * grams[k]
            prefix = _hadamard(grams[:lo]) if lo > 0 else None
            for k in range(lo, hi):
                mttkrp = _finish_mttkrp(Z, factors[lo:hi], k - lo)
                parts = [p for p in (prefix, suffix[k - lo]) if p is not None]
                V = _hadamard(parts) if parts else torch.ones_like(grams[k])
                A = _solve_gram(V, mttkrp)
                weights = A.norm(dim=0)
                factors[k] = A / torch.where(weights > 0, weights, torch.ones_like(weights))
                grams[k] = factors[k].T @ factors[k]
                prefix = grams[k] if prefix is None else prefix * grams[k]
        # ||X - Xhat||^2 = ||X||^2 - 2 <X, Xhat> + ||Xhat||^2, from the last mode's MTTKRP.
        inner = (weights * (factors[-1] * mttkrp).sum(0)).sum()
        norm_hat_sq = weights @ _hadamard(grams) @ weights
        err = float((norm_x**2 - 2 * inner + norm_hat_sq).clamp_min(0).sqrt() / norm_x)
        if err < direct_below:  # the expansion above cancels to noise: measure directly
            rec = (khatri_rao(factors[:s]) * weights).to(gemm_dtype)
            rec = rec @ khatri_rao(factors[s:]).to(gemm_dtype).T
            err = float((Xm - rec).to(dtype).norm() / norm_x)  # float32 squares underflow
        errors.append(err)
        if gemm_dtype != dtype and len(errors) > 1 and err > errors[-2] + 1e-5:
            # ALS never raises the error in exact arithmetic: a rise beyond the float32
            # GEMMs' rounding means that rounding drives the iteration (ill-conditioned
            # normal equations, e.g. a rank above the data's, where components blow up and
            # cancel): finish in ``dtype``.
            gemm_dtype, direct_below, Xm = dtype, 1e-5, X.reshape(left, right)
            continue
        if len(errors) > 1 and abs(errors[-2] - err) < tol:
            break
    return CPTensor(weights * scale, factors, errors)


def _cp_init(X: Tensor, rank: int, init: str, gen: torch.Generator) -> list[Tensor]:
    factors = []
    for k, n in enumerate(X.shape):
        if init == "svd":
            basis = _leading_subspace(unfold(X, k), min(n, rank), gen)
            extra = rank - basis.shape[1]
            if extra > 0:
                rand = torch.randn(n, extra, generator=gen, device=X.device, dtype=X.dtype)
                basis = torch.cat([basis, rand / math.sqrt(n)], dim=1)
        else:
            basis = torch.randn(n, rank, generator=gen, device=X.device, dtype=X.dtype)
        norms = basis.norm(dim=0)
        factors.append(basis / torch.where(norms > 0, norms, torch.ones_like(norms)))
    return factors


def _finish_mttkrp(Z: Tensor, factors: Sequence[Tensor], k: int) -> Tensor:
    """MTTKRP for mode k of a partial result ``Z (n_0, ..., n_{s-1}, R)``."""
    out = Z
    # Contract the other modes one at a time, last first, so axis indices stay valid.
    for j in reversed(range(len(factors))):
        if j == k:
            continue
        f = factors[j]
        shape = [1] * out.ndim
        shape[j], shape[-1] = f.shape[0], f.shape[1]
        out = (out * f.reshape(shape)).sum(dim=j)
    return out


def _hadamard(mats: Sequence[Tensor]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = out * m
    return out


def _solve_gram(V: Tensor, rhs: Tensor) -> Tensor:
    """``rhs @ V^+`` for a symmetric PSD ``V``, through a Cholesky factor with a tiny ridge."""
    eye = torch.eye(V.shape[0], dtype=V.dtype, device=V.device)
    ridge = V.diagonal().mean().clamp_min(torch.finfo(V.dtype).tiny) * 1e-13
    L, info = torch.linalg.cholesky_ex(V + ridge * eye)
    if int(info) != 0:
        return rhs @ torch.linalg.pinv(V, hermitian=True)
    return torch.cholesky_solve(rhs.T, L).T


# --------------------------------------------------------------------------- Tucker


def tucker(
    tensor: Tensor,
    ranks: Sequence[int | None],
    *,
    n_iter_max: int = 20,
    tol: float = 1e-5,
    init: str = "svd",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> TuckerTensor:
    """Tucker decomposition: HOSVD initialization refined by HOOI.

    Args:
        tensor: an order-d tensor.
        ranks: one rank per mode; ``None`` leaves that mode uncompressed (no factor), which
            is how a leading layer mode is kept.
        n_iter_max: HOOI iteration cap (0: plain truncated HOSVD).
        tol: stop when the relative error changes by less than this.
        init: ``'svd'`` (truncated HOSVD) or ``'random'`` (random orthonormal factors).
        generator: random generator (random init, randomized SVDs on very large modes).
        dtype: compute dtype.

    Returns:
        ``TuckerTensor(core, factors, errors)``: factors have orthonormal columns; the core
        keeps the size of uncompressed modes.
    """
    _check_tensor(tensor)
    if len(ranks) != tensor.ndim:
        raise ValueError(
            f"ranks={tuple(ranks)} must give one rank per mode of a tensor of "
            f"shape {tuple(tensor.shape)}"
        )
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    _check_iterations(n_iter_max, tol)
    X = tensor.to(dtype)
    scale = _pow2_scale(X)
    if scale != 1:
        X = X / scale
    gen = _generator(generator, X.device)
    mode_ranks = {k: r for k, r in enumerate(ranks) if r is not None}
    modes = list(mode_ranks)
    factors: list[Tensor | None] = [None] * X.ndim
    for k, r in mode_ranks.items():
        if init == "svd":
            factors[k] = _leading_subspace(unfold(X, k), r, gen)
        else:
            rand = torch.randn(X.shape[k], r, generator=gen, device=X.device, dtype=dtype)
            factors[k] = torch.linalg.qr(rand)[0]
    norm_x = X.norm()
    core = _project(X, factors)
    errors = [_tucker_error(core, norm_x)]
    halves = [modes[: len(modes) // 2], modes[len(modes) // 2 :]]
    for _ in range(n_iter_max if modes else 0):
        # Gauss-Seidel sweep, in two halves: while one half's factors are updated, the
        # other half's do not change, so X is projected onto them once per half.
        for half, other in ((halves[0], halves[1]), (halves[1], halves[0])):
            partial = _project(X, [f if k in other else None for k, f in enumerate(factors)])
            for k in half:
                Y = _project(partial, [f if j in half else None for j, f in enumerate(factors)], k)
                factors[k] = last = _leading_subspace(unfold(Y, k), mode_ranks[k], gen)
        core = mode_dot(Y, last.T, k)
        errors.append(_tucker_error(core, norm_x))
        if abs(errors[-2] - errors[-1]) < tol:
            break
    return TuckerTensor(core * scale, factors, errors)


def _project(X: Tensor, factors: Sequence[Tensor | None], skip: int | None = None) -> Tensor:
    """``X x_k factors[k]^T`` over every compressed mode but ``skip``, biggest shrink first."""
    compressed = [(k, f) for k, f in enumerate(factors) if f is not None and k != skip]
    for k, f in sorted(compressed, key=lambda kf: kf[1].shape[1] / kf[1].shape[0]):
        X = mode_dot(X, f.T, k)
    return X


def _tucker_error(core: Tensor, norm_x: Tensor) -> float:
    if norm_x == 0:
        return 0.0
    # Orthonormal factors: ||X - Xhat||^2 = ||X||^2 - ||core||^2.
    return float((norm_x**2 - core.norm() ** 2).clamp_min(0).sqrt() / norm_x)


# --------------------------------------------------------------------------- tensor train


def tensor_train(
    tensor: Tensor,
    ranks: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    **svd_kwargs: Any,
) -> list[Tensor]:
    """TT-SVD: a tensor train with cores ``(r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``.

    Args:
        tensor: an order-d tensor.
        ranks: the ``d - 1`` inner ranks. A rank above what the data can carry is padded
            with zeros, so the cores always have the requested shapes.
        dtype: compute dtype.
        **svd_kwargs: passed to :func:`truncated_svd` (``method``, ``generator``, ...).

    Returns:
        The list of d cores.
    """
    _check_tensor(tensor)
    shape = tuple(tensor.shape)
    if len(ranks) != len(shape) - 1:
        raise ValueError(
            f"ranks={tuple(ranks)} must give {len(shape) - 1} inner ranks for a "
            f"tensor of shape {shape}"
        )
    C = tensor.to(dtype)
    cores, r_prev = [], 1
    for k, r in enumerate(ranks):
        C = C.reshape(r_prev * shape[k], -1)
        U, S, Vh = truncated_svd(C, r, dtype=None, **svd_kwargs)
        cores.append(U.reshape(r_prev, shape[k], r))
        C = S.unsqueeze(-1) * Vh
        r_prev = r
    cores.append(C.reshape(r_prev, shape[-1], 1))
    return cores


def tensor_train_matrix(
    tensor: Tensor,
    n_pairs: int,
    ranks: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    **svd_kwargs: Any,
) -> list[Tensor]:
    """TT-matrix SVD of a tensor ``([L,] out_1..out_m, in_1..in_m)``.

    The out and in modes are interleaved into pairs ``(out_k, in_k)``; a leading layer mode,
    if present, becomes an extra first core ``(1, L, r_0)``.

    Args:
        tensor: shape ``(*lead, out_1, ..., out_m, in_1, ..., in_m)`` with at most one
            leading mode.
        n_pairs: m, the number of (out, in) pairs.
        ranks: inner ranks of the train (``m - 1``, plus one for a leading layer mode).
        dtype: compute dtype.
        **svd_kwargs: passed to :func:`truncated_svd`.

    Returns:
        Cores: ``[(1, L, r_0)]`` if there is a layer mode, then ``(r, out_k, in_k, r')``.
    """
    _check_tensor(tensor)
    lead = tensor.ndim - 2 * n_pairs
    if lead not in (0, 1):
        raise ValueError(
            f"tensor of shape {tuple(tensor.shape)} does not hold {n_pairs} "
            f"(out, in) pairs plus at most one layer mode"
        )
    outs = tensor.shape[lead : lead + n_pairs]
    ins = tensor.shape[lead + n_pairs :]
    perm = list(range(lead))
    for k in range(n_pairs):
        perm += [lead + k, lead + n_pairs + k]
    merged = tensor.permute(perm).reshape(*tensor.shape[:lead], *(o * i for o, i in zip(outs, ins)))
    cores = tensor_train(merged, ranks, dtype=dtype, **svd_kwargs)
    head, pairs = cores[:lead], cores[lead:]
    return head + [c.reshape(c.shape[0], o, i, c.shape[-1]) for c, o, i in zip(pairs, outs, ins)]
