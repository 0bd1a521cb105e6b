import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorized._shapes import factorize, tensorize_shape, validate_modes


@given(st.integers(1, 100_000), st.integers(1, 5))
def test_factorize_product_and_order(n, order):
    modes = factorize(n, order)
    assert len(modes) == order
    assert math.prod(modes) == n
    assert list(modes) == sorted(modes, reverse=True)


@given(st.integers(1, 20), st.integers(1, 4))
def test_factorize_powers_of_two_are_balanced(e, order):
    modes = factorize(2**e, order)
    assert max(modes) <= 2 * min(modes)


@pytest.mark.parametrize(
    ("n", "order", "expected"),
    [(1024, 3, (16, 8, 8)), (768, 2, (32, 24)), (4096, 4, (8, 8, 8, 8)), (7, 2, (7, 1))],
)
def test_factorize_examples(n, order, expected):
    assert factorize(n, order) == expected


@given(st.integers(2, 5000), st.integers(2, 5000))
def test_tensorize_shape_matches_features(n_in, n_out):
    ins, outs = tensorize_shape(n_in, n_out)
    assert math.prod(ins) == n_in and math.prod(outs) == n_out
    assert len(ins) == len(outs) >= 2


def test_tensorize_shape_modes_at_least_two_where_possible():
    ins, outs = tensorize_shape(1024, 4096)
    assert min(ins + outs) >= 2
    assert tensorize_shape(384, 1536, order=3) == ((8, 8, 6), (16, 12, 8))


def test_validate_modes_accepts_good_modes():
    assert validate_modes([8, 8, 16], 1024, "in_tensorized_features") == (8, 8, 16)
    assert validate_modes(12, 12, "x") == (12,)


@pytest.mark.parametrize(
    ("modes", "features", "exc", "match"),
    [
        ((8, 8), 100, ValueError, r"in_modes=\(8, 8\) multiplies to 64.*100 features"),
        ((8, 0), None, ValueError, r"in_modes must contain only positive sizes"),
        ((8, -2), None, ValueError, r"positive sizes"),
        ((8, 2.0), None, TypeError, r"in_modes must contain only ints"),
        ("88", None, TypeError, r"in_modes must be a non-empty tuple"),
        ((), None, TypeError, r"non-empty"),
        (True, None, TypeError, r"in_modes must be a tuple of positive ints"),
    ],
)
def test_validate_modes_errors(modes, features, exc, match):
    with pytest.raises(exc, match=match):
        validate_modes(modes, features, "in_modes")


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((0, 2), ValueError, r"n must be >= 1, got 0"),
        ((8, 0), ValueError, r"order must be >= 1"),
        ((8.0, 2), TypeError, r"n must be an int, got float"),
    ],
)
def test_factorize_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        factorize(*args)


def test_tensorize_shape_errors():
    with pytest.raises(ValueError, match=r"in_features must be >= 1, got -4"):
        tensorize_shape(-4, 8)
    with pytest.raises(TypeError, match=r"out_features must be an int"):
        tensorize_shape(4, "8")
