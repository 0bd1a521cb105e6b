"""Decompositions: exact at full rank, planted structure recovered, error monotone in rank,
and never worse than TensorLy (the reference implementation) by more than 5%."""

import itertools
import math

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly import decomposition as tld

from oracles import cp_full, rel_error, tt_full, ttm_full, tucker_full
from tensorized import decompose as dec

F64 = torch.float64


# ------------------------------------------------------------------ exact at full rank


@pytest.mark.parametrize("shape", [(3, 4), (40, 7), (7, 40), (600, 700)])
def test_truncated_svd_exact_at_full_rank(shape):
    M = torch.randn(*shape, dtype=F64)
    U, S, Vh = dec.truncated_svd(M, min(shape))
    assert rel_error(M, (U * S) @ Vh) < 1e-12


def test_truncated_svd_pads_and_batches():
    M = torch.randn(3, 5, 4, dtype=F64)
    U, S, Vh = dec.truncated_svd(M, 6)
    assert U.shape == (3, 5, 6) and S.shape == (3, 6) and Vh.shape == (3, 6, 4)
    assert torch.all(S[:, 4:] == 0)
    assert rel_error(M, (U * S.unsqueeze(-2)) @ Vh) < 1e-12


def test_randomized_svd_near_optimal_on_decaying_spectrum():
    U0, _ = torch.linalg.qr(torch.randn(1000, 1000, dtype=F64))
    V0, _ = torch.linalg.qr(torch.randn(800, 800, dtype=F64))
    s = 0.9 ** torch.arange(800, dtype=F64)
    M = (U0[:, :800] * s) @ V0.T
    r = 40
    optimal = s[r:].norm() / s.norm()
    U, S, Vh = dec.truncated_svd(M, r, method="randomized")
    assert rel_error(M, (U * S) @ Vh) <= optimal * 1.01


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 2), (10, 12)])
def test_tucker_exact_at_full_rank(shape):
    T = torch.randn(*shape, dtype=F64)
    res = dec.tucker(T, list(shape))
    assert rel_error(T, tucker_full(res)) < 1e-12


def test_tucker_uncompressed_layer_mode():
    T = torch.randn(3, 4, 5, 6, dtype=F64)
    res = dec.tucker(T, [None, 4, 5, 6])
    assert res.factors[0] is None and res.core.shape == (3, 4, 5, 6)
    assert rel_error(T, tucker_full(res)) < 1e-12


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 2, 3), (10, 12)])
def test_tt_exact_at_full_rank(shape):
    T = torch.randn(*shape, dtype=F64)
    caps = [
        min(math.prod(shape[: k + 1]), math.prod(shape[k + 1 :])) for k in range(len(shape) - 1)
    ]
    cores = dec.tensor_train(T, caps)
    assert rel_error(T, tt_full(cores)) < 1e-12


@pytest.mark.parametrize("lead", [(), (3,)])
def test_tt_matrix_exact_at_full_rank(lead):
    outs, ins = (2, 3, 2), (3, 2, 4)
    T = torch.randn(*lead, *outs, *ins, dtype=F64)
    sizes = list(lead) + [o * i for o, i in zip(outs, ins)]
    caps = [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    ]
    cores = dec.tensor_train_matrix(T, 3, caps)
    assert [c.shape[1:3] for c in cores[len(lead) :]] == [(2, 3), (3, 2), (2, 4)]
    assert rel_error(T, ttm_full(cores, 3)) < 1e-12


@pytest.mark.parametrize(("shape", "rank"), [((10, 12), 10), ((2, 3, 4), 6), ((3, 4, 2, 5), 24)])
def test_cp_exact_at_full_rank(shape, rank):
    T = torch.randn(*shape, dtype=F64)
    res = dec.cp_als(T, rank, n_iter_max=500, tol=1e-14)
    assert rel_error(T, cp_full(res)) < 1e-10


def test_lowrank_exact_and_batched():
    M = torch.randn(3, 6, 9, dtype=F64)
    U, S, V = dec.lowrank(M, 6)
    assert rel_error(M, (U * S.unsqueeze(-2)) @ V.mT) < 1e-12


# ------------------------------------------------------------------ planted structure


def test_cp_recovers_planted_low_rank_tensor():
    A = [torch.randn(n, 5, dtype=F64) for n in (6, 7, 8)]
    T = torch.einsum("ar,br,cr->abc", *A)
    res = dec.cp_als(T, 5, n_iter_max=1000, tol=1e-14)
    assert rel_error(T, cp_full(res)) < 1e-10


def test_tucker_recovers_planted_core():
    core = torch.randn(2, 3, 4, dtype=F64)
    factors = [torch.randn(n, r, dtype=F64) for n, r in ((7, 2), (8, 3), (9, 4))]
    T = torch.einsum("abc,ia,jb,kc->ijk", core, *factors)
    assert rel_error(T, tucker_full(dec.tucker(T, [2, 3, 4]))) < 1e-12


def test_tt_and_ttm_recover_planted_trains():
    cores = [torch.randn(1, 6, 2), torch.randn(2, 5, 3), torch.randn(3, 4, 2), torch.randn(2, 6, 1)]
    T = tt_full([c.to(F64) for c in cores])
    assert rel_error(T, tt_full(dec.tensor_train(T, [2, 3, 2]))) < 1e-12
    mcores = [torch.randn(1, 4, 3, 2, dtype=F64), torch.randn(2, 5, 4, 1, dtype=F64)]
    M = ttm_full(mcores, 2)
    assert rel_error(M, ttm_full(dec.tensor_train_matrix(M, 2, [2]), 2)) < 1e-12


def test_lowrank_recovers_planted_rank_on_large_matrix():
    M = torch.randn(1024, 20, dtype=F64) @ torch.randn(20, 900, dtype=F64)
    U, S, V = dec.lowrank(M, 20)  # randomized path
    assert rel_error(M, (U * S) @ V.T) < 1e-10


# ------------------------------------------------------------------ monotone in rank


def test_errors_decrease_as_rank_grows():
    T = torch.randn(8, 8, 8, 8, dtype=F64)
    M = T.reshape(64, 64)
    svd_err = [
        rel_error(M, (lambda r: (r[0] * r[1]) @ r[2])(dec.truncated_svd(M, r)))
        for r in (4, 8, 16, 64)
    ]
    tucker_err = [rel_error(T, tucker_full(dec.tucker(T, [r] * 4))) for r in (2, 4, 6, 8)]
    tt_err = [
        rel_error(T, tt_full(dec.tensor_train(T, [min(r, 8), r, min(r, 8)])))
        for r in (2, 8, 32, 64)
    ]
    ttm_err = [
        rel_error(T, ttm_full(dec.tensor_train_matrix(T, 2, [r]), 2)) for r in (4, 16, 32, 64)
    ]
    cp_err = [rel_error(T, cp_full(dec.cp_als(T, r))) for r in (4, 16, 64, 256)]
    for errs in (svd_err, tucker_err, tt_err, ttm_err, cp_err):
        assert all(a > b for a, b in itertools.pairwise(errs)), errs
        assert errs[-1] < 1e-10 or errs is cp_err


# ------------------------------------------------------------------ against TensorLy


def _tl(t):
    return t.numpy()


def _rel(T, approx_np):
    return float(np.linalg.norm(T.numpy() - approx_np) / np.linalg.norm(T.numpy()))


@pytest.fixture
def weight_tensor():
    # a trained-looking weight: decaying spectrum plus noise, tensorized as (4, 8, 8, 4)
    U, _ = torch.linalg.qr(torch.randn(32, 32, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(32, 32, dtype=F64))
    s = 1.0 / (1 + torch.arange(32, dtype=F64))
    M = (U * s) @ V.T + 0.01 * torch.randn(32, 32, dtype=F64)
    return M.reshape(4, 8, 8, 4)


def test_cp_not_worse_than_tensorly(weight_tensor):
    T = weight_tensor
    for rank in (4, 12):
        ours = rel_error(T, cp_full(dec.cp_als(T, rank, n_iter_max=100, tol=1e-8)))
        ref = tld.parafac(_tl(T), rank, n_iter_max=100, tol=1e-8, init="svd")
        assert ours <= 1.05 * _rel(T, tl.cp_to_tensor(ref)), rank


def test_tucker_not_worse_than_tensorly(weight_tensor):
    T = weight_tensor
    for ranks in ([2, 4, 4, 2], [3, 6, 5, 3]):
        ours = rel_error(T, tucker_full(dec.tucker(T, ranks)))
        ref = tld.tucker(_tl(T), rank=ranks, init="svd", n_iter_max=100)
        assert ours <= 1.05 * _rel(T, tl.tucker_to_tensor(ref)), ranks


def test_tt_not_worse_than_tensorly(weight_tensor):
    T = weight_tensor
    for ranks in ([2, 6, 3], [4, 16, 4]):
        ours = rel_error(T, tt_full(dec.tensor_train(T, ranks)))
        ref = tld.tensor_train(_tl(T), rank=[1, *ranks, 1])
        assert ours <= 1.05 * _rel(T, tl.tt_to_tensor(ref)), ranks


def test_tt_matrix_not_worse_than_tensorly(weight_tensor):
    T = weight_tensor  # (out 4, 8 | in 8, 4)
    for r in (3, 12):
        ours = rel_error(T, ttm_full(dec.tensor_train_matrix(T, 2, [r]), 2))
        ref = tld.tensor_train_matrix(_tl(T), rank=[1, r, 1])
        assert ours <= 1.05 * _rel(T, tl.tt_matrix_to_tensor(ref)), r


def test_lowrank_matches_numpy_svd():
    M = torch.randn(700, 600, dtype=F64)
    U, S, V = dec.lowrank(M, 50)
    s = np.linalg.svd(M.numpy(), compute_uv=False)
    optimal = float(np.sqrt((s[50:] ** 2).sum() / (s**2).sum()))
    assert rel_error(M, (U * S) @ V.T) <= 1.05 * optimal


# ------------------------------------------------------------------ behaviour


def test_deterministic_and_float64_by_default():
    T = torch.randn(6, 7, 8)
    a, b = dec.cp_als(T, 5), dec.cp_als(T, 5)
    assert a.weights.dtype == F64
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    M = torch.randn(900, 800)
    assert torch.equal(dec.truncated_svd(M, 10)[0], dec.truncated_svd(M, 10)[0])


def test_zero_and_rank_deficient_inputs_have_no_nan():
    Z = torch.zeros(4, 5, 6, dtype=F64)
    for out in (
        cp_full(dec.cp_als(Z, 3)),
        tucker_full(dec.tucker(Z, [2, 2, 2])),
        tt_full(dec.tensor_train(Z, [2, 2])),
    ):
        assert torch.isfinite(out).all() and out.abs().max() == 0
    R1 = torch.outer(torch.randn(20, dtype=F64), torch.randn(30, dtype=F64)).reshape(4, 5, 30)
    for out in (cp_full(dec.cp_als(R1, 4)), tt_full(dec.tensor_train(R1, [4, 8]))):
        assert torch.isfinite(out).all() and rel_error(R1, out) < 1e-8


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: dec.cp_als(torch.randn(5), 2), ValueError, r"order >= 2"),
        (lambda: dec.cp_als(torch.randn(3, 3), 0), ValueError, r"rank must be an int >= 1, got 0"),
        (lambda: dec.cp_als(torch.randn(3, 3), 2, init="x"), ValueError, r"init must be"),
        (lambda: dec.cp_als(torch.ones(3, 3, dtype=torch.int32), 2), TypeError, r"floating"),
        (lambda: dec.tucker(torch.randn(3, 3), [2]), ValueError, r"one rank per mode"),
        (lambda: dec.tensor_train(torch.randn(3, 3, 3), [2]), ValueError, r"2 inner ranks"),
        (lambda: dec.truncated_svd(torch.randn(3, 3), 2, method="qr"), ValueError, r"method"),
        (lambda: dec.truncated_svd(torch.tensor([[float("inf")]]), 1), ValueError, r"NaN or Inf"),
        (lambda: dec.tensor_train_matrix(torch.randn(2, 2, 2), 2, [2]), ValueError, r"pairs"),
        (lambda: dec.lowrank([[1.0]], 1), TypeError, r"matrix must be a torch.Tensor"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cp_refuses_hopeless_ranks_with_advice():
    T = torch.randn(16, 16, 16, 16)
    with pytest.raises(ValueError, match=r"CP rank 20000 .* FLOPs per ALS iteration.*'tucker'"):
        dec.cp_als(T, 20000)
