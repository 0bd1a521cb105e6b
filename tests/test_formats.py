"""Every format against a dense float64 oracle: contraction, layers, gradients, init."""

import copy
import math

import pytest
import torch

from oracles import dense_weight
from tensorized._ranks import rank_caps
from tensorized.formats import FORMATS, canonical_name, get_format

F64 = torch.float64
SHAPES = [((4, 6), (3, 5)), ((2, 3, 4), (4, 2, 2)), ((8, 8), (16, 4))]
RANKS = {
    "cp": [3, 0.5],
    "tucker": [2, 0.4],
    "tt": [3, 0.5],
    "blocktt": [2, 0.6],
    "lowrank": [2, 5],
    "dense": ["same"],
}
CASES = [
    (fmt, ins, outs, rank, n_layers)
    for fmt, ranks in RANKS.items()
    for ins, outs in SHAPES
    for rank in ranks
    for n_layers in (1, 3)
]


def _build(fmt, ins, outs, rank, n_layers, dtype=F64):
    return FORMATS[fmt](ins, outs, rank, n_layers, dtype=dtype)


@pytest.mark.parametrize(("fmt", "ins", "outs", "rank", "n_layers"), CASES)
def test_contract_equals_dense_oracle(fmt, ins, outs, rank, n_layers):
    m = _build(fmt, ins, outs, rank, n_layers)
    x = torch.randn(2, 5, math.prod(ins), dtype=F64)
    full = m.to_matrix()
    assert full.shape == ((n_layers,) if n_layers > 1 else ()) + (m.out_features, m.in_features)
    torch.testing.assert_close(full, dense_weight(m), rtol=1e-12, atol=1e-12)
    for layer in range(n_layers):
        W = dense_weight(m, layer)
        torch.testing.assert_close(m.to_matrix(layer), W, rtol=1e-12, atol=1e-12)
        y = m.contract(x, layer)
        assert y.shape == (2, 5, m.out_features)
        torch.testing.assert_close(y, x @ W.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("fmt", "ins", "outs", "rank", "n_layers"), CASES[::3])
def test_gradients_reach_every_parameter(fmt, ins, outs, rank, n_layers):
    m = _build(fmt, ins, outs, rank, n_layers)
    x = torch.randn(4, math.prod(ins), dtype=F64)
    loss = sum(m.contract(x, i).pow(2).sum() for i in range(n_layers))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n_layers", [1, 4])
@pytest.mark.parametrize(("ins", "outs"), [((8, 8, 16), (16, 16, 16)), ((16, 24), (16, 48))])
def test_init_std_matches_request(fmt, n_layers, ins, outs):
    rank = {"dense": "same", "blocktt": 0.1, "cp": 0.05}.get(fmt, 0.1)
    m = FORMATS[fmt](ins, outs, rank, n_layers)
    std = 0.02
    m.reset_parameters(std)
    for layer in range(n_layers):
        W = dense_weight(m, layer)
        assert abs(W.std().item() / std - 1) < 0.15, (fmt, layer, W.std().item())
        assert abs(W.mean().item()) < 0.2 * std


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_default_init_is_nn_linear_scale(fmt):
    # reset_parameters measures the std from the factors and rescales to it exactly: only the
    # float32 rounding of the rescaled factors is left (~1e-7 relative; 1e-5 = ~100 eps)
    m = FORMATS[fmt]((8, 8), (4, 8), "same")
    std = dense_weight(m).std(correction=0).item()
    assert std == pytest.approx(1 / math.sqrt(3 * 64), rel=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n_layers", [1, 3])
def test_from_matrix_exact_at_full_rank(fmt, n_layers):
    ins, outs = (3, 4), (2, 5)
    lead = (n_layers,) if n_layers > 1 else ()
    W = torch.randn(*lead, 10, 12, dtype=F64)
    caps = rank_caps(fmt, ins, outs, n_layers)
    rank = {"dense": "same", "cp": (math.prod(lead + ins + outs) // 5,)}.get(fmt, caps)
    kwargs = {"n_iter_max": 2000, "tol": 1e-14} if fmt == "cp" else {}
    m = FORMATS[fmt].from_matrix(W, ins, outs, rank, **kwargs)
    rel = (dense_weight(m) - W).norm() / W.norm()
    assert rel < 1e-10, (fmt, rel.item())
    for p in m.parameters():
        assert p.dtype == F64


def test_from_matrix_keeps_dtype_and_gives_lower_error_with_more_rank():
    W = torch.randn(32, 48)
    errors = []
    for rank in (0.1, 0.3, 0.6):
        m = FORMATS["tucker"].from_matrix(W, (6, 8), (4, 8), rank)
        assert all(p.dtype == torch.float32 for p in m.parameters())
        errors.append(((dense_weight(m) - W).norm() / W.norm()).item())
    assert errors[0] > errors[1] > errors[2]


def test_state_dict_round_trip_and_deepcopy():
    for fmt in FORMATS:
        a = FORMATS[fmt]((4, 4), (2, 8), "same", 2)
        b = FORMATS[fmt]((4, 4), (2, 8), "same", 2)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(dense_weight(b), dense_weight(a))
        torch.testing.assert_close(dense_weight(copy.deepcopy(a)), dense_weight(a))


def test_bfloat16_and_dtype_conversion():
    m = FORMATS["tt"]((4, 4), (4, 4), 3, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert m.contract(x).dtype == torch.bfloat16
    m64 = m.to(F64)
    torch.testing.assert_close(
        m64.contract(x.double()), x.double() @ dense_weight(m64).T, rtol=1e-12, atol=1e-12
    )


def test_registry_names_are_case_insensitive_with_aliases():
    assert get_format("CP") is FORMATS["cp"]
    assert get_format("TTM") is FORMATS["blocktt"]
    assert get_format("tt-matrix") is FORMATS["blocktt"]
    assert get_format(" Tucker ") is FORMATS["tucker"]
    assert canonical_name("LowRank") == "lowrank"
    with pytest.raises(ValueError, match=r"unknown factorization 'cpp'; accepted.*'cp'.*'ttm'"):
        get_format("cpp")
    with pytest.raises(TypeError, match=r"factorization must be a string, got int"):
        get_format(3)


def test_repr_is_readable():
    text = repr(FORMATS["tucker"]((4, 4), (4, 4), 0.5, 2))
    assert "in_modes=(4, 4)" in text and "n_layers=2" in text and "of dense" in text


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda m: m.contract(torch.randn(2, 15)),
            ValueError,
            r"in_features=16 features.*\(2, 15\)",
        ),
        (lambda m: m.contract(torch.randn(2, 16)), ValueError, r"n_layers=3 layers; pass indices"),
        (lambda m: m.contract(torch.randn(2, 16), 3), IndexError, r"indices=3 is out of range"),
        (lambda m: m.to_matrix(-4), IndexError, r"indices=-4 is out of range"),
        (lambda m: m.to_matrix(1.0), TypeError, r"indices must be an int layer index, got float"),
        (lambda m: m.reset_parameters(-1.0), ValueError, r"std must be a finite number >= 0"),
    ],
)
def test_layer_and_input_errors(call, exc, match):
    m = FORMATS["cp"]((4, 4), (4, 4), 3, 3)
    with pytest.raises(exc, match=match):
        call(m)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(4, 16), (4, 4), (2, 3)), ValueError, r"out_modes=\(2, 3\) multiplies to 6"),
        ((torch.randn(16), (4, 4), (4, 4)), ValueError, r"shape \(out, in\) or \(n_layers"),
        ((torch.ones(4, 4, dtype=torch.int64), (4,), (4,)), TypeError, r"floating dtype"),
        ((torch.full((4, 4), float("nan")), (4,), (4,)), ValueError, r"NaN or Inf"),
        (([[1.0]], (1,), (1,)), TypeError, r"matrix must be a torch.Tensor, got list"),
    ],
)
def test_from_matrix_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        FORMATS["tt"].from_matrix(*args, rank=2)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"n_layers must be an int >= 1, got 0"):
        FORMATS["cp"]((4,), (4,), 2, 0)
    with pytest.raises(ValueError, match=r"in_modes must contain only positive sizes"):
        FORMATS["cp"]((4, 0), (4,), 2)
