import math
import sys
import warnings

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tensorized as tz
from tensorized._ranks import RankBudgetWarning, param_count, rank_caps, resolve_rank
from tensorized.formats import FORMATS

TENSOR_FORMATS = ["cp", "tucker", "tt", "blocktt", "lowrank"]
mode = st.integers(2, 9)


@st.composite
def layer_shapes(draw):
    order = draw(st.integers(1, 3))
    ins = tuple(draw(mode) for _ in range(order))
    outs = tuple(draw(mode) for _ in range(order))
    return ins, outs, draw(st.sampled_from([1, 3]))


@settings(max_examples=150, deadline=None)
@given(layer_shapes(), st.sampled_from(TENSOR_FORMATS), st.floats(0.02, 1.0))
def test_float_rank_meets_budget_or_says_why(shape, fmt, fraction):
    ins, outs, n_layers = shape
    dense = n_layers * math.prod(ins) * math.prod(outs)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rank = resolve_rank(fmt, ins, outs, fraction, n_layers)
    except ValueError as err:
        # Only when the fraction is outside what the format can represent at all.
        assert "cannot reach" in str(err) and "spans fractions" in str(err)
        caps = rank_caps(fmt, ins, outs, n_layers)
        smallest = 1 if fmt in ("cp", "lowrank") else (1,) * len(caps)
        largest = caps[0] if fmt in ("cp", "lowrank") else caps
        lo = param_count(fmt, ins, outs, smallest, n_layers)
        hi = param_count(fmt, ins, outs, largest, n_layers)
        assert not 0.95 * lo <= fraction * dense <= 1.05 * hi
        return
    _assert_valid(fmt, ins, outs, rank, n_layers)
    count = param_count(fmt, ins, outs, rank, n_layers)
    off = abs(count - fraction * dense) / (fraction * dense)
    budget_warnings = [w for w in caught if issubclass(w.category, RankBudgetWarning)]
    if off > 0.05:
        # A miss is reported, and no single rank step would have landed closer.
        assert budget_warnings and "coarse steps" in str(budget_warnings[0].message)
        if fmt in ("cp", "lowrank"):
            for r in (rank - 1, rank + 1):
                if 1 <= r <= rank_caps(fmt, ins, outs, n_layers)[0]:
                    other = param_count(fmt, ins, outs, r, n_layers)
                    assert abs(other - fraction * dense) >= abs(count - fraction * dense)
    else:
        assert not budget_warnings


@settings(max_examples=60, deadline=None)
@given(layer_shapes(), st.sampled_from(TENSOR_FORMATS), st.integers(1, 40))
def test_int_rank_is_valid_and_clipped(shape, fmt, r):
    ins, outs, n_layers = shape
    rank = resolve_rank(fmt, ins, outs, r, n_layers)
    _assert_valid(fmt, ins, outs, rank, n_layers)
    values = (rank,) if isinstance(rank, int) else rank
    assert all(v <= r for v in values)


def _assert_valid(fmt, ins, outs, rank, n_layers):
    caps = rank_caps(fmt, ins, outs, n_layers)
    if fmt in ("cp", "lowrank"):
        assert isinstance(rank, int) and 1 <= rank <= caps[0]
    else:
        assert len(rank) == len(caps)
        assert all(1 <= r <= c for r, c in zip(rank, caps))


@settings(max_examples=40, deadline=None)
@given(layer_shapes(), st.sampled_from(TENSOR_FORMATS), st.floats(0.05, 0.9))
def test_param_count_equals_module_parameters(shape, fmt, fraction):
    ins, outs, n_layers = shape
    try:
        module = FORMATS[fmt](ins, outs, fraction, n_layers)
    except ValueError:
        assume(False)
    assert module.num_params == param_count(fmt, ins, outs, module.rank, n_layers)


def test_same_is_about_dense_and_never_fails():
    for fmt in TENSOR_FORMATS:
        for ins, outs in [((3, 5), (7, 2)), ((16, 16), (16, 16)), ((8, 8, 16), (16, 16, 16))]:
            rank = resolve_rank(fmt, ins, outs, "same")
            count = param_count(fmt, ins, outs, rank)
            assert 0.5 * math.prod(ins + outs) <= count <= 1.5 * math.prod(ins + outs)


def test_examples():
    assert resolve_rank("cp", (8, 8), (8, 8), 0.5) == 62
    assert resolve_rank("tt", (4, 4), (4, 4), 2) == (2, 2, 2)
    assert resolve_rank("tucker", (4, 8), (2, 2), 3) == (2, 2, 3, 3)
    assert resolve_rank("tt", (4, 4), (4, 4), (1, 2, 3, 2, 1)) == (2, 3, 2)
    assert resolve_rank("blocktt", (4, 4), (4, 4), (5,)) == (5,)
    assert resolve_rank("lowrank", (4, 4), (4, 4), 100) == 16
    assert resolve_rank("dense", (4, 4), (4, 4), "same") is None
    # a leading layer mode adds one rank to the trains
    assert len(resolve_rank("tt", (4, 4), (4, 4), 0.5, n_layers=3)) == 4
    assert len(resolve_rank("blocktt", (4, 4), (4, 4), 0.5, n_layers=3)) == 2


def test_param_count_by_hand():
    ins, outs = (4, 6), (3, 5)
    assert param_count("dense", ins, outs, None, 2) == 2 * 24 * 15
    assert param_count("lowrank", ins, outs, 3) == 3 * (15 + 24 + 1)
    assert param_count("cp", ins, outs, 2, 3) == 2 * (1 + 3 + 3 + 5 + 4 + 6)
    assert param_count("tucker", ins, outs, (2, 3, 4, 5)) == 120 + 3 * 2 + 5 * 3 + 4 * 4 + 6 * 5
    assert param_count("tt", ins, outs, (2, 3, 4)) == 3 * 2 + 2 * 5 * 3 + 3 * 4 * 4 + 4 * 6
    assert param_count("blocktt", ins, outs, (7,)) == 3 * 4 * 7 + 7 * 5 * 6


@pytest.mark.parametrize(
    ("fmt", "rank", "exc", "match"),
    [
        ("cp", 0, ValueError, r"an int rank must be >= 1, got rank=0"),
        ("cp", -0.5, ValueError, r"finite number > 0, got rank=-0.5"),
        ("cp", float("nan"), ValueError, r"finite number > 0"),
        ("tt", float("inf"), ValueError, r"finite number > 0"),
        ("tucker", 1e6, ValueError, r"asks for .* parameters.*cannot reach.*spans fractions"),
        ("cp", "half", ValueError, r"rank='half' is not valid"),
        ("cp", True, TypeError, r"rank must be 'same', a float, an int or a tuple"),
        ("cp", {"r": 1}, TypeError, r"got dict"),
        ("tucker", (2, 2), ValueError, r"needs 4 ranks \(one per out mode"),
        ("tucker", (2, 2, 2, 9), ValueError, r"out of range .* maximum \(4, 4, 4, 4\)"),
        ("tt", (2, 0, 2), ValueError, r"out of range"),
        ("tt", (2, 2), ValueError, r"needs 3 inner ranks"),
        ("tt", (2, 2.5, 2), TypeError, r"only ints"),
        ("dense", 0.5, ValueError, r"'dense' stores the full matrix"),
        ("blocktt", 0.001, ValueError, r"factorization='blocktt' cannot reach"),
    ],
)
def test_rank_errors(fmt, rank, exc, match):
    with pytest.raises(exc, match=match):
        resolve_rank(fmt, (4, 4), (4, 4), rank)


def test_coarse_budget_warns_with_the_nearest_count():
    # TT-matrix (8, 8) -> (16, 16) has one inner rank worth 256 parameters: 0.1 is 1638.4.
    with pytest.warns(RankBudgetWarning, match=r"rank \(6,\)\) has 1536 \(0.0938 of the dense"):
        assert resolve_rank("blocktt", (8, 8), (16, 16), 0.1) == (6,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankBudgetWarning)
        with pytest.raises(RankBudgetWarning):
            resolve_rank("blocktt", (8, 8), (16, 16), 0.1)
        resolve_rank("blocktt", (8, 8), (16, 16), "same")  # 'same' means "about": no warning


def test_unknown_format_and_mismatched_blocktt():
    with pytest.raises(ValueError, match=r"unknown factorization 'foo'"):
        resolve_rank("foo", (4, 4), (4, 4), 0.5)
    with pytest.raises(ValueError, match=r"as many in modes as out modes.*\(4, 4\).*\(16,\)"):
        resolve_rank("blocktt", (4, 4), (16,), 0.5)


def test_budget_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tz.FactorizedLinear((4, 4), (4, 4), factorization="cp", rank=0.5)
        line = sys._getframe().f_lineno - 1
        tz.FactorizedLinear.from_linear(nn.Linear(16, 16), (4, 4), (4, 4), 0.5)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line), (__file__, line + 2)]
