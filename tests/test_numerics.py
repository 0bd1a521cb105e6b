"""Numerics: gradients of every format and strategy (gradcheck), float32 forward accuracy at
extreme input scales, and decompositions of degenerate weights (rank-deficient, all-zero,
tiny, huge) that must stay finite and reconstruct the input."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import tensorized as tz
from oracles import cp_full, dense_forward, dense_weight, tt_full, ttm_full, tucker_full
from tensorized import decompose as dec
from tensorized._ops import frobenius_error, khatri_rao
from tensorized.formats import FORMATS

F64 = torch.float64
FORMAT_NAMES = list(FORMATS)
CASES = [(fmt, s) for fmt, cls in FORMATS.items() for s in cls.strategy_names()]
CASE_IDS = [f"{fmt}-{s}" for fmt, s in CASES]


def rank_of(fmt, r):
    return "same" if fmt == "dense" else r


# ------------------------------------------------------------------ gradients


def gradcheck_layer(layer, x, index):
    """gradcheck w.r.t. ``x`` and every parameter, through ``functional_call``."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, index))

    # gradcheck passes vacuously for an input the output ignores: each must matter.
    y = f(x, *params)
    for k, name in enumerate(names):
        moved = [p + 1 if j == k else p for j, p in enumerate(params)]
        assert not torch.allclose(f(x, *moved), y), f"output does not depend on {name}"
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize(("fmt", "strategy"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_input_and_parameters(fmt, strategy, n_layers, bias):
    layer = tz.FactorizedLinear(
        (2, 3), (3, 2), bias, fmt, rank_of(fmt, 2), n_layers, implementation=strategy, dtype=F64
    )
    layer.train()
    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    gradcheck_layer(layer, x, n_layers - 1)  # the last layer, so a layer index is exercised


@pytest.mark.parametrize(("fmt", "strategy"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("view", ["transposed", "strided"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_non_contiguous_inputs(fmt, strategy, view, mode):
    # A transposed or sliced activation is a valid input: results and gradients equal the
    # float64 oracle's on the same values.
    layer = tz.FactorizedLinear(
        (2, 3, 2), (3, 2, 2), True, fmt, rank_of(fmt, 2), 2, implementation=strategy, dtype=F64
    )
    layer.train(mode == "train")
    base = torch.randn(12, 5, dtype=F64) if view == "transposed" else torch.randn(5, 24, dtype=F64)
    x = (base.T if view == "transposed" else base[:, ::2]).requires_grad_(mode == "train")
    assert not x.is_contiguous()
    with torch.set_grad_enabled(mode == "train"):
        y = layer(x, 1)
    want = dense_forward(layer, x, 1)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    if mode == "train":
        g = torch.randn_like(y)
        params = [x, *layer.parameters()]
        ours = torch.autograd.grad(y, params, g)
        for a, b in zip(ours, torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_gradcheck_with_checkpointing(n_layers):
    layer = tz.FactorizedLinear(
        (2, 3), (3, 2), True, "tucker", 2, n_layers, checkpointing=True, dtype=F64
    )
    layer.train()
    x = torch.randn(2, 4, 6, dtype=F64, requires_grad=True)  # extra lead dim: reshapes too
    gradcheck_layer(layer, x, n_layers - 1)


# ------------------------------------------------------------------ float32 at extreme scales

# Bound on the float32 forward's normwise relative error. Unit roundoff u = 2^-24 ~ 6e-8; the
# deepest contraction here (Tucker/TT over (4, 4, 4) -> (4, 4, 4)) accumulates each output
# through ~90 multiply-adds (3 + 3 mode products of length 4, a core GEMM of length <= 64),
# so the worst-case rounding bound is gamma_90 ~ 90 u ~ 5e-6 of sum |terms|, and random
# factors cancel at most ~10x (sum |terms| / |y|): 1e-4 covers it. Observed: ~3e-7.
F32_BOUND = 1e-4
FL_RANK = {"cp": 16, "lowrank": 8}


def oracle(layer, x):
    """Float64 dense reference from the factors (float32 factors are exact in float64, so this
    is the exact weight the float32 layer stores)."""
    with torch.no_grad():
        return dense_forward(layer, x)


def assert_float32_accurate(y, ref):
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    err = (y.double() - ref).norm() / ref.norm()
    assert err < F32_BOUND, f"relative error {float(err):.3g}"


def scaled_input(scale, layer):
    with torch.no_grad():  # the bias at the input's scale, so neither hides the other
        layer.bias.mul_(scale)
    return torch.randn(16, 64) * scale


@pytest.mark.parametrize(("fmt", "strategy"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float32_forward_at_extreme_input_scales(fmt, strategy, scale, mode):
    layer = tz.FactorizedLinear(
        (4, 4, 4), (4, 4, 4), True, fmt, rank_of(fmt, FL_RANK.get(fmt, 4)), implementation=strategy
    )
    x = scaled_input(scale, layer)
    ref = oracle(layer, x)
    if mode == "train":
        y = layer(x)
    else:  # inference from the kept weight-only operands (merge()); a second call reuses them
        layer.eval().merge()
        assert layer.merged
        with torch.no_grad():
            y, again = layer(x), layer(x)
        assert torch.equal(again, y)
    assert_float32_accurate(y, ref)


@pytest.mark.parametrize(("fmt", "strategy"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_float32_forward_of_compressed_layer(fmt, strategy, scale):
    source = nn.Linear(64, 64)
    kwargs = {"n_iter_max": 5} if fmt in ("cp", "tucker") else None  # accuracy is not tested
    layer = tz.FactorizedLinear.from_linear(
        source,
        (4, 4, 4),
        (4, 4, 4),
        rank_of(fmt, FL_RANK.get(fmt, 4)),
        True,
        fmt,
        kwargs,
        implementation=strategy,
    )
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    x = scaled_input(scale, layer)
    assert_float32_accurate(layer(x), oracle(layer, x))
    layer.eval()
    with torch.no_grad():
        assert_float32_accurate(layer(x), oracle(layer, x))


# ------------------------------------------------------------------ degenerate weights

OUT, IN = (4, 4, 4), (4, 4, 4)


def planted_tensor(n_layers, dtype, scale):
    """A CP-rank-3 tensor ``([2,] 4, 4, 4, 4, 4, 4)``, i.e. a 64 x 64 weight per layer.

    CP rank 3 bounds the matrix rank, the multilinear ranks and the TT / TT-matrix ranks by 3,
    so every format is exact at rank >= 3 (a merely rank-3 matrix has larger TT ranks). With
    two layers, layer 0 is all zeros and layer 1 the planted one.
    """
    fs = [torch.randn(4, 3, dtype=F64) for _ in range(6)]
    T = (khatri_rao(fs) * scale).sum(-1).reshape(*OUT, *IN)
    if n_layers == 2:
        T = torch.stack([torch.zeros_like(T), T])
    return T.to(dtype)


def cp_options(dtype):
    # ALS converges linearly: tight enough to get well under exact_tol, in ~15 iterations.
    return {"n_iter_max": 100, "tol": 1e-8 if dtype == F64 else 1e-7}


def run_cp(T, r, lead):
    res = dec.cp_als(T, r, **cp_options(T.dtype))
    return [res.weights, *res.factors], cp_full(res), res.errors


def run_tucker(T, r, lead):
    res = dec.tucker(T, [None] * lead + [min(r, 4)] * 6)
    return [res.core, *(f for f in res.factors if f is not None)], tucker_full(res), res.errors


def run_tt(T, r, lead):
    cores = dec.tensor_train(T, [min(r, 2)] * lead + [r] * 5)
    return cores, tt_full(cores).reshape(T.shape), None


def run_tt_randomized(T, r, lead):
    cores = dec.tensor_train(T, [min(r, 2)] * lead + [r] * 5, method="randomized")
    return cores, tt_full(cores).reshape(T.shape), None


def run_ttm(T, r, lead):
    cores = dec.tensor_train_matrix(T, 3, [min(r, 2)] * lead + [r] * 2)
    return cores, ttm_full(cores, 3), None


def run_lowrank(T, r, lead, method="exact"):
    M = T.reshape(*T.shape[:lead], 64, 64)
    U, S, V = dec.lowrank(M, r, method=method)
    return [U, S, V], ((U * S.unsqueeze(-2)) @ V.mT).reshape(T.shape), None


def run_lowrank_randomized(T, r, lead):
    return run_lowrank(T, r, lead, method="randomized")


DECOMPOSITIONS = {
    "cp_als": run_cp,
    "tucker": run_tucker,
    "tensor_train": run_tt,
    "tensor_train-randomized": run_tt_randomized,
    "tensor_train_matrix": run_ttm,
    "lowrank": run_lowrank,
    "lowrank-randomized": run_lowrank_randomized,
}
# (dtype, scale): the last two float64 scales square to past the float64 range, which the
# Gram matrices and squared norms of CP and Tucker must survive.
SCALES = [
    (torch.float32, 1.0),
    (torch.float32, 1e-30),
    (torch.float32, 1e30),
    (F64, 1.0),
    (F64, 1e-30),
    (F64, 1e30),
    (F64, 1e-200),
    (F64, 1e200),
]
SCALE_IDS = [f"{str(d)[6:]}-{s:g}" for d, s in SCALES]


def rel_err(ref, approx):
    """``||ref - approx|| / ||ref||`` in float64, scaled first: at 1e+-200 the squares in a
    plain norm() overflow or underflow (and 0 / 0 would hide a wrong result)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    peak = ref.abs().max()
    assert peak > 0
    return float((ref / peak - approx / peak).norm() / (ref / peak).norm())


def exact_tol(dtype):
    # A float32 input is only rank 3 up to its own rounding (~6e-8 relative).
    return 1e-5 if dtype == torch.float32 else 1e-7


def assert_clean(tensors, errors):
    for t in tensors:
        assert torch.isfinite(t).all(), "non-finite values in the factors"
    if errors is not None:
        assert all(e == e and 0 <= e < float("inf") for e in errors), errors


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize(("dtype", "scale"), SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize(("rank", "n_layers"), [(3, 1), (3, 2), (5, 1)])  # 5: above the data's
def test_decompositions_of_rank_deficient_tensors_are_exact(name, dtype, scale, rank, n_layers):
    T = planted_tensor(n_layers, dtype, scale)
    lead = n_layers - 1
    factors, rec, errors = DECOMPOSITIONS[name](T, rank, lead)
    assert_clean([*factors, rec], errors)
    assert rel_err(T, rec) < exact_tol(dtype)
    if n_layers == 2:
        assert rec[0].abs().max() <= exact_tol(dtype) * rec[1].abs().max()  # zero layer ~0
    if errors is not None:  # the reported error is the true one, not rounding noise
        assert errors[-1] < exact_tol(dtype)


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_decompositions_of_zeros_are_zeros(name, dtype, n_layers):
    T = torch.zeros(*(2,) * (n_layers - 1), *OUT, *IN, dtype=dtype)
    factors, rec, errors = DECOMPOSITIONS[name](T, 3, n_layers - 1)
    assert_clean(factors, errors)
    assert torch.equal(rec, torch.zeros_like(rec))


def linear_from(W, bias_scale=1.0):
    lin = nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.mul_(bias_scale)
    return lin


def compress(linears, fmt, rank):
    kwargs = cp_options(linears[0].weight.dtype) if fmt == "cp" else None
    rank = rank_of(fmt, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning is acceptable here; NaN never is
        if len(linears) == 1:
            return tz.FactorizedLinear.from_linear(linears[0], IN, OUT, rank, True, fmt, kwargs)
        return tz.FactorizedLinear.from_linear_list(linears, IN, OUT, rank, True, fmt, kwargs)


def check_layer_reproduces(layer, weights, linears, dtype):
    """Finite parameters, each layer's weight reconstructed and its forward right."""
    assert_clean(list(layer.parameters()), None)
    x = torch.randn(5, 64, dtype=dtype)
    for i, (W, lin) in enumerate(zip(weights, linears)):
        index = i if len(weights) > 1 else None
        rec = dense_weight(layer.weight, index).detach()
        if W.abs().max() == 0:
            assert torch.equal(rec, torch.zeros_like(rec))
            y = layer(x, i).detach()
            assert torch.equal(y, lin.bias.detach().expand_as(y))  # zero weight: bias only
            continue
        assert rel_err(W, rec) < exact_tol(dtype) * 10  # float32 factors round too
        ref = F.linear(x.double(), W.double(), lin.bias.detach().double())
        y = layer(x, i).detach()
        assert torch.isfinite(y).all()
        assert rel_err(ref, y) < exact_tol(dtype) * 10


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize(("dtype", "scale"), SCALES, ids=SCALE_IDS)
def test_from_linear_of_degenerate_weights(fmt, dtype, scale):
    for W in (torch.zeros(64, 64, dtype=dtype), planted_tensor(1, dtype, scale).reshape(64, 64)):
        linears = [linear_from(W, scale)]
        check_layer_reproduces(compress(linears, fmt, 3), [W], linears, dtype)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize(("dtype", "scale"), SCALES, ids=SCALE_IDS)
def test_from_linear_list_with_a_zero_and_a_rank_deficient_layer(fmt, dtype, scale):
    weights = list(planted_tensor(2, dtype, scale).reshape(2, 64, 64))
    linears = [linear_from(W, scale) for W in weights]
    check_layer_reproduces(compress(linears, fmt, 3), weights, linears, dtype)


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_frobenius_error_is_scale_free(scale):
    # Squares of 1e200 overflow and of 1e-200 underflow in a plain norm().
    ref = torch.randn(8, 8, dtype=F64)
    err = frobenius_error(ref * scale, ref * scale * (1 + 1e-3))
    assert err == pytest.approx(1e-3, rel=1e-9)
