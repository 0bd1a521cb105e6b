"""Bad-input battery: malformed arguments get a clear error, never a crash, hang or wrong result.

Table-driven: each case builds its own inputs, calls one public entry point (the layer's
constructor, forward, indices and ``get_linear``; the formats; ``from_linear`` and
``from_linear_list``; ``TensorizeConfig`` and ``tensorize_``; the command line; saved files)
and checks the exception type and that the message names the argument and the bad value.
A failed ``tensorize_`` or ``load_model`` must leave the model bit for bit as it was. Cases
that could exhaust memory or run for long (2**40 features, a huge prime feature count, an
absurd rank) run in one child process under an address-space limit, each with an alarm.
"""

import json
import math
import os
import re
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorized as tz
from oracles import dense_forward
from tensorized import FactorizedLinear as FL
from tensorized import TensorizeConfig, tensorize_
from tensorized.cli import main
from tensorized.formats import CPFormat

F64 = torch.float64


def x16(*lead: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*lead, 16, dtype=dtype)


def nan_linear(n_in: int = 16, n_out: int = 16, value: float = float("nan")) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight[1, 2] = value
    return lin


def joint3() -> FL:
    return FL((4, 4), (4, 4), rank=2, n_layers=3)


# ---------------------------------------------------------------------- constructor


def rejecting(table: list[tuple]):
    """A test over ``table``'s ``(id, call, exception type, message regex)`` rows: each
    ``call()`` must raise that exception with a message matching the regex."""

    @pytest.mark.parametrize(
        ("call", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in table]
    )
    def test(call, exc, match):
        with pytest.raises(exc, match=match):
            call()

    return test


CONSTRUCTOR_CASES = [
    # (id, kwargs beyond the modes, in modes, out modes, exception, message pattern)
    ("in-mode-zero", {}, (4, 0), (4, 4), ValueError,
     r"in_tensorized_features must contain only positive sizes, got \(4, 0\)"),
    ("out-mode-negative", {}, (4, 4), (4, -4), ValueError,
     r"out_tensorized_features must contain only positive sizes, got \(4, -4\)"),
    ("in-features-zero", {}, 0, 16, ValueError, r"in_features must be >= 1, got 0"),
    ("out-features-negative", {}, 16, -16, ValueError, r"out_features must be >= 1, got -16"),
    ("modes-empty", {}, (), (4, 4), TypeError,
     r"in_tensorized_features must be a non-empty tuple of positive ints, got \(\)"),
    ("mode-float", {}, (4.0, 4), (4, 4), TypeError,
     r"in_tensorized_features must contain only ints, got \(4\.0, 4\)"),
    ("modes-str", {}, "16", (4, 4), TypeError, r"in_tensorized_features must be .* got str '16'"),
    ("rank-in-modes-place", {}, 0.5, (4, 4), TypeError, r"got float 0\.5 .*pass rank=\.\.\. by"),
    ("modes-none", {}, None, (4, 4), TypeError, r"in_tensorized_features and .* are required"),
    ("rank-int-zero", {"rank": 0}, (4, 4), (4, 4), ValueError, r"must be >= 1, got rank=0"),
    ("rank-int-negative", {"rank": -3}, (4, 4), (4, 4), ValueError, r"got rank=-3"),
    ("rank-tuple-short-tucker", {"factorization": "tucker", "rank": (2, 2, 2)}, (4, 4), (4, 4),
     ValueError, r"'tucker' needs 4 ranks .*got rank=\(2, 2, 2\)"),
    ("rank-tuple-short-tt", {"factorization": "tt", "rank": (2, 2)}, (4, 4), (4, 4), ValueError,
     r"'tt' needs 3 inner ranks .*got rank=\(2, 2\)"),
    ("rank-tuple-long-cp", {"rank": (2, 2)}, (4, 4), (4, 4), ValueError,
     r"'cp' needs 1 rank, got rank=\(2, 2\)"),
    ("rank-tuple-too-big-tucker", {"factorization": "tucker", "rank": (2, 2, 2, 5)}, (4, 4),
     (4, 4), ValueError, r"rank=\(2, 2, 2, 5\) is out of range .*maximum \(4, 4, 4, 4\)"),
    ("rank-tuple-too-big-tt", {"factorization": "tt", "rank": (2, 100, 2)}, (4, 4), (4, 4),
     ValueError, r"rank=\(2, 100, 2\) is out of range for factorization='tt'"),
    ("rank-tuple-zero-blocktt", {"factorization": "blocktt", "rank": (0,)}, (4, 4), (4, 4),
     ValueError, r"rank=\(0,\) is out of range for factorization='blocktt'"),
    ("rank-tuple-float-entry", {"factorization": "tt", "rank": (2, 2.0, 2)}, (4, 4), (4, 4),
     TypeError, r"tuple rank must contain only ints, got rank=\(2, 2\.0, 2\)"),
    ("rank-float-zero", {"rank": 0.0}, (4, 4), (4, 4), ValueError,
     r"finite number > 0, got rank=0\.0"),
    ("rank-float-negative", {"rank": -0.5}, (4, 4), (4, 4), ValueError, r"got rank=-0\.5"),
    ("rank-float-1e9", {"rank": 1e9}, (4, 4), (4, 4), ValueError,
     r"rank=1000000000\.0 asks for \d+ parameters .*cannot reach"),
    ("rank-float-1e-9", {"factorization": "tt", "rank": 1e-9}, (4, 4), (4, 4), ValueError,
     r"rank=1e-09 asks for 0 parameters .*'tt' cannot reach"),
    ("rank-nan", {"rank": float("nan")}, (4, 4), (4, 4), ValueError,
     r"finite number > 0, got rank=nan"),
    ("rank-inf", {"rank": float("inf")}, (4, 4), (4, 4), ValueError, r"got rank=inf"),
    ("rank-str", {"rank": "half"}, (4, 4), (4, 4), ValueError, r"rank='half' is not valid"),
    ("rank-bool", {"rank": True}, (4, 4), (4, 4), TypeError, r"rank must be .* got True"),
    ("rank-tensor", {"rank": torch.tensor(2)}, (4, 4), (4, 4), TypeError, r"got Tensor tensor"),
    ("rank-dense-not-same", {"factorization": "dense", "rank": 2}, 16, 16, ValueError,
     r"factorization='dense' stores the full matrix; .*got 2"),
    ("factorization-unknown", {"factorization": "svd"}, (4, 4), (4, 4), ValueError,
     r"unknown factorization 'svd'; accepted .*'tucker'"),
    ("factorization-none", {"factorization": None}, (4, 4), (4, 4), TypeError,
     r"factorization must be a string, got NoneType None"),
    ("n-layers-zero", {"n_layers": 0}, (4, 4), (4, 4), ValueError,
     r"n_layers must be an int >= 1, got 0"),
    ("n-layers-float", {"n_layers": 2.0}, (4, 4), (4, 4), TypeError,
     r"n_layers must be an int >= 1, got float 2\.0"),
    ("bias-str", {"bias": "yes"}, (4, 4), (4, 4), TypeError, r"bias must be a bool, got str 'yes'"),
    ("implementation-unknown", {"implementation": "fast"}, (4, 4), (4, 4), ValueError,
     r"implementation must be one of \('auto', .*got 'fast'"),
    ("dtype-int", {"dtype": torch.int64}, (4, 4), (4, 4), TypeError,
     r"dtype must be a floating torch\.dtype .*got torch\.int64"),
    ("dtype-complex", {"dtype": torch.complex64}, (4, 4), (4, 4), TypeError,
     r"dtype must be a floating torch\.dtype .*got torch\.complex64"),
    ("blocktt-orders-differ", {"factorization": "blocktt"}, (4, 4), (16,), ValueError,
     r"as many in modes as out modes; got in modes \(4, 4\) and out modes \(16,\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "ins", "outs", "exc", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in CONSTRUCTOR_CASES],
)
def test_constructor_rejects(kwargs, ins, outs, exc, match):
    with pytest.raises(exc, match=match):
        FL(ins, outs, **kwargs)


# ---------------------------------------------------------------------- forward and indices

FORWARD_CASES = [
    ("x-wrong-width", lambda: FL((4, 4), (4, 4), rank=2)(torch.randn(3, 15)), ValueError,
     r"in_features=16 .*got input shape \(3, 15\)"),
    ("x-scalar", lambda: FL((4, 4), (4, 4), rank=2)(torch.tensor(1.0)), ValueError,
     r"input shape \(\)"),
    ("x-int", lambda: FL((4, 4), (4, 4), rank=2)(torch.ones(3, 16, dtype=torch.long)), TypeError,
     r"x must have a floating dtype, got torch\.int64"),
    ("x-bool", lambda: FL((4, 4), (4, 4), rank=2)(torch.ones(3, 16, dtype=torch.bool)),
     TypeError, r"x must have a floating dtype, got torch\.bool"),
    ("x-complex", lambda: FL((4, 4), (4, 4), rank=2)(x16(3, dtype=torch.complex64)), TypeError,
     r"x must have a floating dtype, got torch\.complex64"),
    ("x-list", lambda: FL((4, 4), (4, 4), rank=2)([[1.0] * 16]), TypeError,
     r"x must be a torch\.Tensor, got list"),
    ("x-float64-on-float32", lambda: FL((4, 4), (4, 4), rank=2)(x16(3, dtype=F64)), TypeError,
     r"x has dtype torch\.float64 but the weight's parameters are torch\.float32"),
    ("indices-negative", lambda: joint3()(x16(2), -4), IndexError,
     r"indices=-4 is out of range for n_layers=3 \(valid: -3 to 2\)"),
    ("indices-too-big", lambda: joint3()(x16(2), 3), IndexError, r"indices=3 is out of range"),
    ("indices-float", lambda: joint3()(x16(2), 1.0), TypeError,
     r"indices must be an int layer index, got float 1\.0"),
    ("indices-tensor-several", lambda: joint3()(x16(2), torch.tensor([0, 1])), TypeError,
     r"indices must be an int layer index, got a tensor of shape \(2,\)"),
    ("indices-float-tensor", lambda: joint3()(x16(2), torch.tensor(1.0)), TypeError,
     r"got a tensor of shape \(\) and dtype torch.float32"),
    ("indices-bool", lambda: joint3()(x16(2), True), TypeError, r"got bool True"),
    ("indices-none", lambda: joint3()(x16(2), None), TypeError, r"got NoneType None"),
    ("indices-1-single-layer", lambda: FL((4, 4), (4, 4), rank=2)(x16(2), 1), IndexError,
     r"indices=1 is out of range for n_layers=1"),
    ("get-linear-too-big", lambda: joint3().get_linear(3), IndexError, r"indices=3"),
    ("getitem-negative", lambda: joint3()[-4], IndexError, r"indices=-4"),
    ("getitem-slice", lambda: joint3()[0:2], TypeError, r"got slice slice\(0, 2, None\)"),
    ("to-linear-too-big", lambda: joint3().to_linear(5), IndexError, r"indices=5"),
    ("to-matrix-layer-too-big", lambda: joint3().weight.to_matrix(3), IndexError,
     r"indices=3 is out of range for n_layers=3"),
    ("contract-joint-no-layer", lambda: joint3().weight.contract(x16(2)), ValueError,
     r"n_layers=3 layers; pass indices=i"),
    ("contract-unknown-strategy", lambda: CPFormat((4,), (4,), 2).contract(torch.randn(2, 4),
     strategy="fast"), ValueError, r"strategy must be one of .*got 'fast'"),
    ("reset-std-nan", lambda: CPFormat((4,), (4,), 2).reset_parameters(float("nan")), ValueError,
     r"std must be a finite number >= 0, got nan"),
]  # fmt: skip


test_forward_and_indices_reject = rejecting(FORWARD_CASES)


# ---------------------------------------------------------------------- formats

FORMAT_CASES = [
    ("get-format-unknown", lambda: tz.get_format("foo"), ValueError,
     r"unknown factorization 'foo'; accepted \(case-insensitive\): 'cp'"),
    ("get-format-int", lambda: tz.get_format(3), TypeError,
     r"factorization must be a string, got int 3"),
    ("matrix-modes-str", lambda: CPFormat("44", (4, 4), 2), TypeError,
     r"in_modes must be a non-empty tuple of positive ints, got '44'"),
    ("matrix-n-layers-zero", lambda: CPFormat((4, 4), (4, 4), 2, 0), ValueError,
     r"n_layers must be an int >= 1, got 0"),
    ("from-matrix-list", lambda: CPFormat.from_matrix([[1.0]], (1,), (1,), 1), TypeError,
     r"matrix must be a torch\.Tensor, got list"),
    ("from-matrix-1d", lambda: CPFormat.from_matrix(torch.randn(16), (4, 4), (4, 4), 2),
     ValueError, r"matrix must have shape \(out, in\) or \(n_layers, out, in\), got \(16,\)"),
    ("from-matrix-4d", lambda: CPFormat.from_matrix(torch.randn(1, 1, 4, 4), (4,), (4,), 2),
     ValueError, r"got \(1, 1, 4, 4\)"),
    ("from-matrix-int", lambda: CPFormat.from_matrix(torch.ones(4, 4, dtype=torch.long), (4,),
     (4,), 2), TypeError, r"matrix must have a floating dtype, got torch\.int64"),
    ("from-matrix-complex", lambda: tz.get_format("tt").from_matrix(
     torch.ones(4, 4, dtype=torch.complex64), (4,), (4,), 2), TypeError, r"torch\.complex64"),
    ("from-matrix-modes-mismatch", lambda: tz.get_format("tucker").from_matrix(
     torch.randn(16, 16), (4, 3), (4, 4), 2), ValueError,
     r"in_modes=\(4, 3\) multiplies to 12, but the layer has 16 features"),
    ("from-matrix-nan", lambda: tz.get_format("tucker").from_matrix(
     torch.full((16, 16), float("nan")), (4, 4), (4, 4), 2), ValueError, r"NaN or Inf"),
    ("from-matrix-zero-layers", lambda: tz.get_format("tt").from_matrix(
     torch.randn(0, 16, 16), (4, 4), (4, 4), 2), ValueError,
     r"matrix of shape \(0, 16, 16\) holds no layer"),
    ("param-count-user-rank", lambda: tz.param_count("cp", (4,), (4,), None), TypeError,
     r"param_count needs the concrete rank of factorization='cp'"),
    ("resolve-rank-unknown-format", lambda: tz.resolve_rank("svd", (4,), (4,), 2), ValueError,
     r"unknown factorization 'svd'"),
    ("tensorize-shape-float", lambda: tz.tensorize_shape(16.0, 16), TypeError,
     r"in_features must be an int, got float 16\.0"),
    ("tensorize-shape-order-zero", lambda: tz.tensorize_shape(16, 16, 0), ValueError,
     r"order must be >= 1, got 0"),
]  # fmt: skip


test_formats_reject = rejecting(FORMAT_CASES)


# ---------------------------------------------------------------------- from_linear(_list)


def from_linear(lin=None, ins=(4, 4), outs=(4, 4), **kw):
    return FL.from_linear(nn.Linear(16, 16) if lin is None else lin, ins, outs, **{"rank": 2, **kw})


def from_list(layers, ins=(4, 4), outs=(4, 4), **kw):
    return FL.from_linear_list(layers, ins, outs, **{"rank": 2, **kw})


FROM_LINEAR_CASES = [
    ("in-modes-mismatch", lambda: from_linear(ins=(4, 3)), ValueError,
     r"in_tensorized_features=\(4, 3\) multiplies to 12, but the layer has 16 features"),
    ("out-modes-mismatch", lambda: from_linear(outs=(2, 4)), ValueError,
     r"out_tensorized_features=\(2, 4\) multiplies to 8, but the layer has 16"),
    ("not-linear", lambda: from_linear(nn.Conv1d(1, 1, 1)), TypeError,
     r"linear must be a torch\.nn\.Linear, got Conv1d"),
    ("none", lambda: FL.from_linear(None, (4, 4), (4, 4), 2), TypeError, r"got NoneType"),
    ("nan-weight", lambda: from_linear(nan_linear()), ValueError, r"NaN or Inf"),
    ("inf-weight", lambda: from_linear(nan_linear(value=float("inf")), factorization="tt"),
     ValueError, r"NaN or Inf"),
    ("rank-float-1e9", lambda: from_linear(rank=1e9), ValueError, r"rank=1000000000\.0 asks"),
    ("decomposition-kwargs-list", lambda: from_linear(decomposition_kwargs=[1]), TypeError,
     r"decomposition_kwargs must be a dict, got list"),
    ("decomposition-kwargs-unknown", lambda: from_linear(decomposition_kwargs={"bogus": 1}),
     TypeError, r"unexpected keyword argument 'bogus'"),
    ("decomposition-n-iter-max-negative", lambda: from_linear(
     decomposition_kwargs={"n_iter_max": -1}), ValueError, r"n_iter_max.*-1"),
    ("decomposition-n-iter-max-float", lambda: from_linear(
     factorization="tucker", decomposition_kwargs={"n_iter_max": 2.5}), TypeError,
     r"n_iter_max.*2\.5"),
    ("decomposition-tol-nan", lambda: from_linear(decomposition_kwargs={"tol": float("nan")}),
     ValueError, r"tol.*nan"),
    ("no-modes-without-auto-tensorize", lambda: from_linear(ins=None, outs=None,
     auto_tensorize=False), ValueError, r"required when auto_tensorize=False"),
    ("n-tensorized-modes-zero", lambda: from_linear(ins=None, outs=None, n_tensorized_modes=0),
     ValueError, r"n_tensorized_modes.*0"),
    ("list-empty", lambda: from_list([]), ValueError, r"linear_list is empty"),
    ("list-shapes-differ", lambda: from_list([nn.Linear(16, 16), nn.Linear(16, 8)]), ValueError,
     r"linear_list\[0\] is \(16, 16\) \(out, in\) but linear_list\[1\] is \(8, 16\)"),
    ("list-non-linear-member", lambda: from_list([nn.Linear(16, 16), nn.ReLU()]), TypeError,
     r"linear_list\[1\] must be an nn\.Linear, got ReLU"),
    ("list-is-one-linear", lambda: from_list(nn.Linear(16, 16)), TypeError,
     r"linear_list must be a list of nn\.Linear, got Linear"),
    ("list-generator", lambda: from_list(nn.Linear(16, 16) for _ in range(2)), TypeError,
     r"got generator"),
    ("list-nan-member", lambda: from_list([nn.Linear(16, 16), nan_linear()]), ValueError,
     r"linear_list\[1\].*NaN"),
    ("list-modes-mismatch", lambda: from_list([nn.Linear(16, 16)] * 2, outs=(4, 8)), ValueError,
     r"out_tensorized_features=\(4, 8\) multiplies to 32"),
    ("list-dtypes-differ", lambda: from_list([nn.Linear(16, 16), nn.Linear(16, 16).double()]),
     ValueError, r"linear_list\[0\] is torch\.float32 on cpu but linear_list\[1\] is "
     r"torch\.float64"),
    ("nan-bias", lambda: from_linear(nan_bias_linear()), ValueError, r"linear\.bias .*NaN"),
]  # fmt: skip


def nan_bias_linear() -> nn.Linear:
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.bias[3] = float("nan")
    return lin


test_from_linear_rejects = rejecting(FROM_LINEAR_CASES)


# ---------------------------------------------------------------------- accepted edge inputs


def test_absurd_int_rank_is_clipped_to_an_exact_format():
    """An int rank above every cap is documented as clipped: then Tucker is exact."""
    lin = nn.Linear(16, 12).double()
    layer = FL.from_linear(lin, (4, 4), (3, 4), rank=10**9, factorization="tucker")
    assert layer.rank == (3, 4, 4, 4)
    x = torch.randn(5, 16, dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-10)


def test_numpy_int_rank_is_an_int_rank():
    np = pytest.importorskip("numpy")
    a = FL((4, 4), (4, 4), factorization="tt", rank=np.int64(2))
    assert a.rank == FL((4, 4), (4, 4), factorization="tt", rank=2).rank == (2, 2, 2)


def test_tensor_index_of_one_element_matches_the_int_index():
    layer, x = joint3().double(), x16(4, dtype=F64)
    oracle = dense_forward(layer, x, 2)
    torch.testing.assert_close(layer(x, torch.tensor(2)), oracle)
    torch.testing.assert_close(layer(x, 2), oracle)


@pytest.mark.parametrize("factorization", ["cp", "tucker", "tt", "blocktt", "lowrank", "dense"])
def test_empty_batch_gives_an_empty_output(factorization):
    """nn.Linear maps (0, in) to (0, out); a factorized layer must too (no planner error)."""
    layer = FL((4, 4), (4, 4), factorization=factorization, rank="same", n_layers=2).double()
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.randn(*shape, dtype=F64)
        y = layer(x, 1)
        assert y.shape == (*shape[:-1], 16)
        torch.testing.assert_close(y, dense_forward(layer, x, 1))


# ---------------------------------------------------------------------- TensorizeConfig

CONFIG_CASES = [
    ("factorization", 3, TypeError, r"factorization must be a string, got int 3"),
    ("factorization", "svd", ValueError, r"TensorizeConfig\.factorization: unknown .*'svd'"),
    ("rank", "half", ValueError, r"TensorizeConfig\.rank must be .*got str 'half'"),
    ("rank", None, TypeError, r"TensorizeConfig\.rank must be .*got NoneType None"),
    ("rank", True, TypeError, r"TensorizeConfig\.rank must be .*got bool True"),
    ("rank", {"a": 1}, TypeError, r"TensorizeConfig\.rank must be .*got dict"),
    ("rank", [], TypeError, r"TensorizeConfig\.rank must be .*got list \[\]"),
    ("rank", [2, 0], ValueError, r"TensorizeConfig\.rank must be .*got list \[2, 0\]"),
    ("rank", [2.5], TypeError, r"TensorizeConfig\.rank must be .*got list \[2\.5\]"),
    ("rank", float("nan"), ValueError, r"TensorizeConfig\.rank must be .*got float nan"),
    ("rank", float("-inf"), ValueError, r"TensorizeConfig\.rank must be .*got float -inf"),
    ("rank", 0, ValueError, r"TensorizeConfig\.rank must be .*got int 0"),
    ("rank", -1, ValueError, r"TensorizeConfig\.rank must be .*got int -1"),
    ("target_modules", 3, TypeError, r"TensorizeConfig\.target_modules must be .*got int 3"),
    ("target_modules", "(", ValueError, r"target_modules .*invalid regex.*got str '\('"),
    ("target_modules", ["", "a"], TypeError, r"target_modules must be .*got list \['', 'a'\]"),
    ("target_modules", [1], TypeError, r"target_modules must be .*got list \[1\]"),
    ("exclude_modules", 2.0, TypeError, r"exclude_modules must be .*got float 2\.0"),
    ("order", 0, ValueError, r"TensorizeConfig\.order must be an int >= 1, got int 0"),
    ("order", 2.0, TypeError, r"TensorizeConfig\.order must be an int >= 1, got float 2\.0"),
    ("order", "3", TypeError, r"TensorizeConfig\.order must be an int >= 1, got str '3'"),
    ("order", True, TypeError, r"TensorizeConfig\.order must be an int >= 1, got bool True"),
    ("min_params", -1, ValueError, r"min_params must be an int >= 0, got int -1"),
    ("min_params", 1.5, TypeError, r"min_params must be an int >= 0, got float 1\.5"),
    ("min_params", None, TypeError, r"min_params must be an int >= 0, got NoneType None"),
    ("implementation", "fast", ValueError, r"implementation must be one of .*got str 'fast'"),
    ("implementation", None, TypeError, r"implementation must be one of .*got NoneType None"),
    ("joint", "yes", TypeError, r"TensorizeConfig\.joint must be a bool, got str 'yes'"),
    ("joint", 1, TypeError, r"TensorizeConfig\.joint must be a bool, got int 1"),
    ("rank_allocation", "greedy", ValueError, r"rank_allocation must be .*got str 'greedy'"),
    ("rank_allocation", None, TypeError, r"rank_allocation must be .*got NoneType None"),
    ("decomposition_kwargs", [1], TypeError, r"decomposition_kwargs must be a dict .*got list"),
    ("decomposition_kwargs", None, TypeError, r"decomposition_kwargs must be .*got NoneType"),
    ("decomposition_kwargs", {1: 2}, TypeError, r"decomposition_kwargs must be a dict with str"),
    ("calibration_steps", -1, ValueError, r"calibration_steps must be an int >= 0, got int -1"),
    ("calibration_steps", 2.0, TypeError, r"calibration_steps must be an int >= 0, got float"),
    ("calibration_rows", 0, ValueError, r"calibration_rows must be an int >= 1, got int 0"),
    ("calibration_rows", "10", TypeError, r"calibration_rows must be an int >= 1, got str '10'"),
    ("progress", "yes", TypeError, r"progress must be None or a bool, got str 'yes'"),
    ("progress", 1, TypeError, r"progress must be None or a bool, got int 1"),
]


@pytest.mark.parametrize(
    ("field", "value", "exc", "match"),
    [pytest.param(*c, id=f"{c[0]}={c[1]!r}") for c in CONFIG_CASES],
)
def test_config_field_rejects(field, value, exc, match):
    with pytest.raises(exc, match=match):
        TensorizeConfig(**{field: value})
    with pytest.raises(exc, match=match):  # the dict route validates the same way
        TensorizeConfig.from_dict({field: value})


CONFIG_COMBINATION_CASES = [
    ("unknown-keys", lambda: TensorizeConfig.from_dict({"factorisation": "cp", "rnk": 2}),
     ValueError, r"unknown TensorizeConfig keys \['factorisation', 'rnk'\]; valid keys: "
     r"\['factorization'"),
    ("non-str-key", lambda: TensorizeConfig.from_dict({1: 2}), ValueError,
     r"unknown TensorizeConfig keys \[1\]"),
    ("from-dict-list", lambda: TensorizeConfig.from_dict([("rank", 2)]), TypeError,
     r"d must be a dict of TensorizeConfig fields, got list"),
    ("budget-int-rank", lambda: TensorizeConfig(rank=2, rank_allocation="budget"), ValueError,
     r"rank must be a float in \(0, 1\] with rank_allocation='budget', got int 2"),
    ("budget-rank-above-1", lambda: TensorizeConfig(rank=1.5, rank_allocation="budget"),
     ValueError, r"got float 1\.5"),
    ("dense-with-fraction", lambda: TensorizeConfig(factorization="dense", rank=0.5),
     ValueError, r"rank must be 'same' \(or 1\.0\) with factorization='dense', got float 0\.5"),
    ("implementation-of-other-format", lambda: TensorizeConfig(factorization="tt",
     implementation="kron"), ValueError, r"implementation must be one of .*got str 'kron'"),
]  # fmt: skip


test_config_combination_rejects = rejecting(CONFIG_COMBINATION_CASES)


def test_config_frozen_fields_reject_mutation():
    cfg = TensorizeConfig(decomposition_kwargs={"n_iter_max": 5})
    with pytest.raises(TypeError, match=r"decomposition_kwargs is read-only"):
        cfg.decomposition_kwargs["n_iter_max"] = 6
    with pytest.raises(AttributeError, match=r"cannot assign to field 'rank'"):
        cfg.rank = 3


# ---------------------------------------------------------------------- tensorize_


def mlp(n: int = 4, width: int = 32) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def cfg(**kw) -> TensorizeConfig:
    return TensorizeConfig(**{"rank": 2, "order": 2, "min_params": 0, "progress": False, **kw})


class Poison(nn.Module):
    """Turns its input into NaN: the layers after it record NaN calibration inputs."""

    def forward(self, x):
        return x * float("nan")


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(32, 32)}) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b["q"](x)
        return x


def failing_batches():
    yield torch.randn(8, 32)
    raise RuntimeError("calibration source failed at batch 1")


TENSORIZE_CASES = [
    ("model-none", lambda: tensorize_(None, cfg()), TypeError,
     r"model must be a torch\.nn\.Module, got NoneType"),
    ("config-dict", lambda: tensorize_(mlp(), {"rank": 2}), TypeError,
     r"config must be a TensorizeConfig .*got dict"),
    ("filter-fn-int", lambda: tensorize_(mlp(), cfg(), filter_fn=3), TypeError,
     r"filter_fn must be None or callable, got int"),
    ("no-layer-matched", lambda: tensorize_(mlp(), cfg(target_modules=["nope"])), ValueError,
     r"matched no layer: target_modules=\('nope',\).*'0' \(1024 weights\)"),
    ("rank-float-1e9", lambda: tensorize_(mlp(), cfg(rank=1e9)), ValueError,
     r"failed on layer '0' .*rank=1000000000\.0\).*cannot reach"),
    ("rank-tuple-wrong-length", lambda: tensorize_(mlp(), cfg(factorization="tucker",
     rank=(2, 2))), ValueError, r"failed on layer '0' .*'tucker' needs 4 ranks"),
    ("calibration-not-iterable", lambda: tensorize_(mlp(), cfg(), calibration_data=5),
     TypeError, r"calibration_data must be an iterable of model inputs .*got int"),
    ("calibration-one-tensor", lambda: tensorize_(mlp(), cfg(),
     calibration_data=torch.randn(4, 32)), TypeError, r"got a single Tensor; wrap one batch"),
    ("calibration-empty", lambda: tensorize_(mlp(), cfg(), calibration_data=[]), ValueError,
     r"calibration_data is empty"),
    ("calibration-wrong-width", lambda: tensorize_(mlp(), cfg(),
     calibration_data=[torch.randn(4, 31)]), RuntimeError, r"calibration_data\[0\]"),
]  # fmt: skip


test_tensorize_rejects = rejecting(TENSORIZE_CASES)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bits, NaNs included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model: nn.Module) -> tuple:
    modules = [(n, id(m), m.training) for n, m in model.named_modules(remove_duplicate=False)]
    return modules, {k: bits(v).clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, state = snapshot(model)
    assert modules == before[0]  # same objects at every name, same train/eval flags
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key
    for m in model.modules():  # calibration hooks are gone
        assert not m._forward_pre_hooks and not m._forward_hooks


def nan_at(model: nn.Module, name: str) -> nn.Module:
    with torch.no_grad():
        model.get_submodule(name).weight[0, 0] = float("nan")
    return model


ATOMIC_CASES = [
    # (id, model builder, tensorize_ arguments, exception, message pattern)
    ("first-layer", lambda: nan_at(mlp(), "0"), dict, ValueError,
     r"failed on layer '0' .*NaN or Inf"),
    ("third-layer", lambda: nan_at(mlp(5), "2"), dict, ValueError,
     r"failed on layer '2' .*NaN or Inf"),
    ("budget-allocation", lambda: nan_at(mlp(), "3"),
     lambda: {"config": cfg(rank=0.5, rank_allocation="budget")}, ValueError, r"NaN or Inf"),
    ("joint-group", lambda: nan_at(Blocks(), "blocks.1.q"), lambda: {"config": cfg(joint=True)},
     ValueError, r"failed on joint group 'blocks\.\*\.q' \(3 layers\)"),
    ("calibration-raises-partway", mlp, lambda: {"calibration_data": failing_batches()},
     RuntimeError, r"calibration source failed at batch 1"),
    ("calibration-fails-at-third-layer", lambda: nn.Sequential(*mlp(2), Poison(), *mlp(2)),
     lambda: {"calibration_data": [torch.randn(16, 32)]}, ValueError,
     r"failed on layer '3' .*inputs\[0\] must be a finite"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "arguments", "exc", "match"),
    [pytest.param(*c[1:], id=c[0]) for c in ATOMIC_CASES],
)
def test_failed_tensorize_leaves_the_model_unchanged(build, arguments, exc, match):
    model = build().train()
    next(model.children()).eval()  # mixed train/eval flags must come back as they were
    before = snapshot(model)
    kwargs = arguments()
    config = kwargs.pop("config", cfg(calibration_steps=2))
    with pytest.raises(exc, match=match):
        tensorize_(model, config, **kwargs)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved model, a NaN model, a truncated and a random-bytes file, configs, a state dict."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), d / "m.pt")
    torch.save(nan_at(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), "2"),
               d / "nan.pt")  # fmt: skip
    raw = (d / "m.pt").read_bytes()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (d / "random.pt").write_bytes(os.urandom(2048))
    torch.save({"weight": torch.randn(3)}, d / "state_dict.pt")
    (d / "unknown_key.json").write_text('{"rnk": 2}')
    (d / "broken.json").write_text('{"rank": ')
    (d / "list.json").write_text("[1]")
    (d / "wrong_type.json").write_text('{"order": "three"}')
    (d / "empty_dir").mkdir()
    return d


CLI_CASES = [
    # (id, argv with {d} for the files folder, exit code, stderr pattern)
    ("compress-truncated", ["compress", "{d}/trunc.pt"], 2, r"cannot load model '.*trunc\.pt'"),
    ("compress-random-bytes", ["compress", "{d}/random.pt"], 2,
     r"cannot load model '.*random\.pt' with torch\.load"),
    ("inspect-truncated", ["inspect", "{d}/trunc.pt"], 2, r"cannot load model '.*trunc\.pt'"),
    ("inspect-random-bytes", ["inspect", "{d}/random.pt"], 2, r"cannot load model '.*random"),
    ("inspect-missing", ["inspect", "{d}/missing.pt"], 2,
     r"model path '.*missing\.pt' does not exist"),
    ("inspect-state-dict", ["inspect", "{d}/state_dict.pt"], 2, r"holds a dict, not an nn\.Module"),
    ("inspect-folder-without-model", ["inspect", "{d}/empty_dir"], 2,
     r"'.*empty_dir' is a folder without model\.safetensors or model\.pt"),
    ("compress-missing", ["compress", "{d}/missing.pt"], 2, r"'.*missing\.pt' does not exist"),
    ("rank-word", ["compress", "{d}/m.pt", "--rank", "half"], 2, r"--rank must be .*got 'half'"),
    ("rank-zero", ["compress", "{d}/m.pt", "--rank", "0"], 2, r"TensorizeConfig\.rank .*int 0"),
    ("rank-negative", ["compress", "{d}/m.pt", "--rank", "-2"], 2, r"got float -2\.0"),
    ("rank-nan", ["compress", "{d}/m.pt", "--rank", "nan"], 2, r"got float nan"),
    ("rank-1e9", ["compress", "{d}/m.pt", "--rank", "1e9"], 2,
     r"failed on layer '0' .*cannot reach"),
    ("rank-empty-entry", ["compress", "{d}/m.pt", "--rank", "4,,4"], 2, r"got '4,,4'"),
    ("factorization-unknown", ["compress", "{d}/m.pt", "-f", "svd"], 2,
     r"unknown factorization 'svd'"),
    ("order-zero", ["compress", "{d}/m.pt", "--order", "0"], 2,
     r"order must be an int >= 1, got int 0"),
    ("order-not-int", ["compress", "{d}/m.pt", "--order", "x"], 2,
     r"argument --order: invalid int value: 'x'"),
    ("min-params-negative", ["compress", "{d}/m.pt", "--min-params", "-5"], 2,
     r"min_params must be an int >= 0, got int -5"),
    ("target-matches-nothing", ["compress", "{d}/m.pt", "--target-modules", "nope"], 2,
     r"matched no layer: target_modules=\('nope',\)"),
    ("target-bad-regex", ["compress", "{d}/m.pt", "--target-modules", "("], 2, r"invalid regex"),
    ("config-unknown-key", ["compress", "{d}/m.pt", "--config", "{d}/unknown_key.json"], 2,
     r"unknown TensorizeConfig keys \['rnk'\]"),
    ("config-broken-json", ["compress", "{d}/m.pt", "--config", "{d}/broken.json"], 2,
     r"config file '.*broken\.json' is not valid JSON"),
    ("config-not-object", ["compress", "{d}/m.pt", "--config", "{d}/list.json"], 2,
     r"must hold a JSON object"),
    ("config-wrong-type", ["compress", "{d}/m.pt", "--config", "{d}/wrong_type.json"], 2,
     r"order must be an int >= 1, got str 'three'"),
    ("config-missing", ["compress", "{d}/m.pt", "--config", "{d}/nope.json"], 2,
     r"config file '.*nope\.json' does not exist"),
    ("output-is-a-file", ["compress", "{d}/m.pt", "-o", "{d}/state_dict.pt"], 2,
     r"--output '.*state_dict\.pt' exists and is not a folder"),
    ("output-is-the-input", ["compress", "{d}/m.pt", "-o", "{d}/m.pt"], 2,
     r"--output '.*m\.pt' is the input model .* compress never writes over its input"),
    ("calibration-truncated", ["compress", "{d}/m.pt", "--calibration", "{d}/trunc.pt"], 2,
     r"cannot load calibration data '.*trunc\.pt'"),
    ("calibration-random-bytes", ["compress", "{d}/m.pt", "--calibration", "{d}/random.pt"], 2,
     r"cannot load calibration data '.*random\.pt'"),
    ("calibration-text-for-pt-model", ["compress", "{d}/m.pt", "--calibration",
     "{d}/broken.json"], 2, r"text calibration '.*broken\.json' needs a Hugging Face model"),
    ("batch-size-zero", ["compress", "{d}/m.pt", "--batch-size", "0"], 2,
     r"--batch-size must be >= 1, got 0"),
    ("nan-weights", ["compress", "{d}/nan.pt"], 2, r"failed on layer '2' .*NaN or Inf"),
    ("selfcheck-size", ["selfcheck", "--size", "4"], 2, r"--size must be in \[8, 4096\], got 4"),
    ("selfcheck-rank-nan", ["selfcheck", "--rank", "nan"], 2, r"--rank must be in \(0, 1\]"),
    ("unknown-command", ["bogus"], 2, r"invalid choice: 'bogus'"),
    ("no-command", [], 2, r"required: COMMAND"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "code", "match"), [pytest.param(*c[1:], id=c[0]) for c in CLI_CASES]
)
def test_cli_reports_bad_input(files, capsys, argv, code, match):
    out_dir = files / "out"
    argv = [a.format(d=files) for a in argv]
    if argv and argv[0] == "compress" and "-o" not in argv:
        argv += ["-o", str(out_dir)]
    assert main(argv) == code
    stdout, stderr = capsys.readouterr()
    assert stderr.count("\n") == 1, stderr  # one line, no traceback
    assert stderr.startswith("tensorized"), stderr
    assert re.search(match, stderr), stderr
    assert stdout == ""
    assert not out_dir.exists()  # a failed compress writes nothing


# ---------------------------------------------------------------------- saved files


def small_net(last_out: int = 32, last: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(1)
    tail = last if last is not None else nn.Linear(64, last_out)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), tail, nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tensorized net saved with save_model, and corrupted variants of the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("saved")
    net = small_net()
    tensorize_(net, cfg(rank=0.5, target_modules=["0", "2"]))
    good = d / "net.safetensors"
    tz.save_model(net, good, config=cfg())
    raw = good.read_bytes()
    (d / "header_cut.safetensors").write_bytes(raw[:6])
    (d / "data_cut.safetensors").write_bytes(raw[:-100])
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    save_file({k: v.contiguous() for k, v in small_net().state_dict().items()},
              d / "plain.safetensors")  # fmt: skip
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, d / "bad_json.safetensors", metadata={**meta, "tensorized.groups": "{"})
    groups = json.loads(meta["tensorized.groups"])
    groups["0"]["factorization"] = "svd"
    save_file(tensors, d / "bad_spec.safetensors",
              metadata={**meta, "tensorized.groups": json.dumps(groups)})  # fmt: skip
    save_file({k: v for k, v in tensors.items() if k != "2.bias"},
              d / "missing_tensor.safetensors", metadata=meta)  # fmt: skip
    return d, net


LOAD_CASES = [
    # (id, file name, fresh model builder, exception, message pattern)
    ("missing-path", "nope.safetensors", small_net, FileNotFoundError,
     r"no such file: '.*nope\.safetensors'"),
    ("truncated-header", "header_cut.safetensors", small_net, ValueError,
     r"cannot read '.*header_cut\.safetensors' as a safetensors file .*truncated"),
    ("truncated-data", "data_cut.safetensors", small_net, ValueError,
     r"cannot read '.*data_cut\.safetensors' as a safetensors file"),
    ("random-bytes", "random.safetensors", small_net, ValueError,
     r"cannot read '.*random\.safetensors' as a safetensors file"),
    ("plain-safetensors", "plain.safetensors", small_net, ValueError,
     r"'.*plain\.safetensors' was not written by tensorized\.save_model"),
    ("corrupt-metadata", "bad_json.safetensors", small_net, ValueError,
     r"metadata 'tensorized\.groups' is not valid JSON"),
    ("unknown-format-in-spec", "bad_spec.safetensors", small_net, ValueError,
     r"layer '0': unknown factorization 'svd'"),
    ("model-lacks-layer", "net.safetensors", lambda: nn.Sequential(nn.Linear(32, 64)),
     ValueError, r"factorized layer at '2' but the given model has no submodule there"),
    ("layer-shape-differs", "net.safetensors", lambda: small_net(last_out=16), ValueError,
     r"'2' is \(16, 64\) \(out, in\) in the given model but \(32, 64\) in the saved one"),
    ("layer-not-linear", "net.safetensors", lambda: small_net(last=nn.ReLU()), ValueError,
     r"'2' is a ReLU; expected an nn\.Linear there"),
    ("tensor-missing", "missing_tensor.safetensors", small_net, ValueError,
     r"layer '2': its tensor '2\.bias' is not in the file"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "build", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES]
)
def test_load_model_rejects_and_leaves_the_model_unchanged(saved, name, build, exc, match):
    d, _ = saved
    model = build()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        tz.load_model(d / name, base=model)
    assert_unchanged(model, before)


def test_load_model_round_trip_is_exact(saved):
    """The oracle the failure cases are measured against: the good file loads exactly."""
    d, net = saved
    fresh = tz.load_model(d / "net.safetensors", base=small_net())
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), net(x))
    assert tz.load_config(d / "net.safetensors") == cfg()


SAVE_CASES = [
    ("model-none", lambda p: tz.save_model(None, p), TypeError, r"model must be a torch\.nn"),
    ("config-dict", lambda p: tz.save_model(small_net(), p, config={"rank": 2}), TypeError,
     r"config must be a TensorizeConfig or None, got dict"),
    ("reserved-metadata", lambda p: tz.save_model(small_net(), p,
     metadata={"tensorized.groups": "{}"}), ValueError,
     r"metadata key 'tensorized\.groups' is reserved"),
    ("non-str-metadata", lambda p: tz.save_model(small_net(), p, metadata={"a": 1}), TypeError,
     r"metadata must map str to str, got 'a': int"),
    ("missing-folder", lambda p: tz.save_model(small_net(), p.parent / "nodir" / "x.st"),
     FileNotFoundError, r"nodir"),
    ("load-a-folder", lambda p: tz.load_model(p.parent, base=small_net()), IsADirectoryError,
     r"is a folder; give the \.safetensors file"),
    ("load-model-none", lambda p: tz.load_model(p, base=None), TypeError,
     r"base must be a torch\.nn\.Module \(a fresh instance .*got NoneType"),
    ("load-config-random", lambda p: tz.load_config(p.parent / "random.safetensors"),
     ValueError, r"cannot read '.*random\.safetensors'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in SAVE_CASES]
)
def test_save_and_load_arguments_reject(saved, call, exc, match):
    d, _ = saved
    names = sorted(os.listdir(d))
    with pytest.raises(exc, match=match):
        call(d / "net.safetensors")
    assert sorted(os.listdir(d)) == names  # no stray temporary file


# ---------------------------------------------------------------------- risky: child process

# Each case runs in one child process with a 4 GiB address-space limit (an allocation the
# library fails to refuse raises instead of swapping the machine) and its own alarm (a loop
# that would run for minutes raises TimeoutError). Outcomes come back as JSON lines.
CHILD = textwrap.dedent(
    """
    import json, signal, sys, time
    import torch
    import tensorized as tz
    from torch import nn
    from tensorized import FactorizedLinear as FL

    def timeout(*_):
        raise TimeoutError("still running at the alarm")

    signal.signal(signal.SIGALRM, timeout)
    torch.set_num_threads(1)
    for case_id, expr, seconds in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        start = time.perf_counter()
        signal.alarm(seconds)
        try:
            value = eval(expr)
            out = {"ok": True, "value": repr(getattr(value, "rank", value))}
            if isinstance(value, nn.Module):
                out["params"] = sum(p.numel() for p in value.parameters())
        except BaseException as exc:
            out = {"ok": False, "exc": type(exc).__name__, "msg": str(exc)[:2000]}
        finally:
            signal.alarm(0)
        out["seconds"] = time.perf_counter() - start
        print(json.dumps({"id": case_id, **out}), flush=True)
    """
)

RISKY_CASES = [
    # (id, expression, alarm seconds, expected: exception names or None for success,
    #  message pattern or a check of the result)
    ("2**40-features-cp-same", "FL(2**40, 2**40)", 10, ("ValueError",),
     r"factorization='cp' .*needs 1\.21e\+24 parameters, more than"),
    ("2**40-features-dense", "FL(2**40, 2**40, factorization='dense')", 10, ("ValueError",),
     r"factorization='dense' .*needs 1\.21e\+24 parameters"),
    ("2**40-features-float-rank-1e9", "FL(2**40, 2**40, rank=1e9)", 10, ("ValueError",),
     r"rank=1000000000\.0 asks for .*cannot reach"),
    # Storable in principle (terabytes): torch's allocator must refuse it cleanly.
    ("2**40-features-lowrank-rank-2", "FL(2**40, 2**40, factorization='lowrank', rank=2)", 10,
     ("RuntimeError",), r"can't allocate memory"),
    ("2**40-layers", "FL((4, 4), (4, 4), rank=2, n_layers=2**40)", 10, ("RuntimeError",),
     r"can't allocate memory"),
    # Trial division of a 61-bit prime used to take hours; the split must stay exact.
    ("huge-prime-features", "FL(2**61 - 1, 16)", 10, ("ValueError",),
     r"in modes \(2305843009213693951, 1\), .*parameters, more than"),
    ("huge-prime-tensorize-shape", "tz.tensorize_shape(2**61 - 1, 16)", 10, None,
     r"\(\(2305843009213693951, 1\), \(4, 4\)\)"),
    # Compressible even at 2**40 features: built, with exactly its tiny parameter count.
    ("2**40-features-tt-rank-2", "FL(2**40, 2**40, False, 'tt', 2)", 10, None, r"\(2, 2, 2"),
]  # fmt: skip


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.fixture(scope="module")
def risky_outcomes():
    cases = json.dumps([[c[0], c[1], c[2]] for c in RISKY_CASES])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, cases],
        capture_output=True,
        text=True,
        timeout=120,  # a backstop; each case has its own alarm
        preexec_fn=_limit_memory,
        env=env,
    )
    outcomes = {}
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        outcomes[row["id"]] = row
    return outcomes, proc


@pytest.mark.parametrize(
    ("case_id", "seconds", "expected", "pattern"),
    [pytest.param(c[0], *c[2:], id=c[0]) for c in RISKY_CASES],
)
def test_risky_inputs_fail_fast_in_a_child(risky_outcomes, case_id, seconds, expected, pattern):
    outcomes, proc = risky_outcomes
    assert case_id in outcomes, f"child crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    row = outcomes[case_id]
    if expected is None:
        assert row["ok"], row
        assert re.search(pattern, row["value"]), row
    else:
        assert not row["ok"] and row["exc"] in expected, row
        assert re.search(pattern, row["msg"]), row
    assert row["seconds"] < seconds, row


def test_huge_but_compressible_layer_has_the_exact_parameter_count(risky_outcomes):
    outcomes, _ = risky_outcomes
    row = outcomes["2**40-features-tt-rank-2"]
    ins, outs = tz.tensorize_shape(2**40, 2**40)
    expected = tz.param_count("tt", ins, outs, (2,) * (len(ins) + len(outs) - 1))
    assert row["params"] == expected
    assert expected < 10**5  # a few thousand parameters stand for a 2**40 x 2**40 weight
    assert math.prod(ins) == math.prod(outs) == 2**40
