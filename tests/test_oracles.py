"""The einsum oracles themselves: hand-computed tiny cases, TensorLy's reconstructions, and
agreement with the library's ``to_matrix`` for every format, 1-3 modes per side, 1 or 3 layers."""

import itertools

import numpy as np
import pytest
import tensorly as tl
import torch

from oracles import cp_full, dense_forward, dense_weight, tt_full, tucker_full
from tensorized import FactorizedLinear
from tensorized.formats import FORMATS, get_format

F64 = torch.float64
MODES = {1: (6,), 2: (2, 3), 3: (2, 3, 2)}
OUT_MODES = {1: (4,), 2: (4, 2), 3: (2, 2, 3)}


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def _format(name, ins, outs, rank, n_layers=1, **values):
    """A format module with the given parameter values (``factors.0`` etc. as keywords)."""
    fm = get_format(name)(ins, outs, rank, n_layers, dtype=F64)
    with torch.no_grad():
        for key, value in values.items():
            fm.get_parameter(key.replace("_", ".")).copy_(value)
    return fm


# ---------------------------------------------------------------- by hand


def test_cp_by_hand():
    # W[o, i] = sum_r w_r A[o, r] B[i, r], w = (1, 2), A = [[1, 0], [1, 1]], B = [[1, 2], [0, 1]]
    A, B = _t([[1, 0], [1, 1]]), _t([[1, 2], [0, 1]])
    fm = _format("cp", (2,), (2,), 2, weights=_t([1, 2]), factors_0=A, factors_1=B)
    torch.testing.assert_close(dense_weight(fm), _t([[1, 0], [5, 2]]), rtol=0, atol=0)
    # a layer factor [[1, 1], [0, 1]]: layer 0 scales by (1, 2) (as above), layer 1 by (0, 2)
    joint = _format(
        "cp", (2,), (2,), 2, 2, weights=_t([1, 2]), factors_0=_t([[1, 1], [0, 1]]),
        factors_1=A, factors_2=B,
    )  # fmt: skip
    expected = _t([[[1, 0], [5, 2]], [[0, 0], [4, 2]]])
    torch.testing.assert_close(dense_weight(joint), expected, rtol=0, atol=0)
    torch.testing.assert_close(dense_weight(joint, 1), expected[1], rtol=0, atol=0)


def test_tucker_by_hand():
    # W = U core V^T with U = [[1, 0], [1, 1]], core = [[1, 2], [0, 1]], V = identity
    fm = _format(
        "tucker", (2,), (2,), (2, 2), core=_t([[1, 2], [0, 1]]),
        factors_0=_t([[1, 0], [1, 1]]), factors_1=torch.eye(2, dtype=F64),
    )  # fmt: skip
    torch.testing.assert_close(dense_weight(fm), _t([[1, 2], [1, 3]]), rtol=0, atol=0)


def test_tt_by_hand():
    # rank 2: W[o, i] = sum_r G1[o, r] G2[r, i] = [[1, 1], [0, 2]] @ [[1, 0], [3, 1]]
    g1, g2 = _t([[1, 1], [0, 2]]), _t([[1, 0], [3, 1]])
    fm = _format("tt", (2,), (2,), (2,), cores_0=g1.reshape(1, 2, 2), cores_1=g2.reshape(2, 2, 1))
    torch.testing.assert_close(dense_weight(fm), _t([[4, 1], [6, 2]]), rtol=0, atol=0)


def test_blocktt_by_hand():
    # rank 1: W[(o1, o2), (i1, i2)] = C1[o1, i1] C2[o2, i2], the Kronecker product, written out
    c1, c2 = _t([[1, 2], [3, 4]]), _t([[0, 1], [1, 0]])
    fm = _format(
        "blocktt", (2, 2), (2, 2), (1,),
        cores_0=c1.reshape(1, 2, 2, 1), cores_1=c2.reshape(1, 2, 2, 1),
    )  # fmt: skip
    expected = _t([[0, 1, 0, 2], [1, 0, 2, 0], [0, 3, 0, 4], [3, 0, 4, 0]])
    torch.testing.assert_close(dense_weight(fm), expected, rtol=0, atol=0)


def test_lowrank_and_dense_by_hand():
    fm = _format("lowrank", (2,), (2,), 1, U=_t([[[1], [2]]]), s=_t([[3]]), V=_t([[[1], [-1]]]))
    torch.testing.assert_close(dense_weight(fm), _t([[3, -3], [6, -6]]), rtol=0, atol=0)
    W = _t([[1, 2, 3], [4, 5, 6]])
    fm = _format("dense", (3,), (2,), "same", weight=W)
    torch.testing.assert_close(dense_weight(fm), W, rtol=0, atol=0)


def test_dense_forward_by_hand():
    layer = FactorizedLinear((2,), (2,), True, "cp", 2, dtype=F64)
    with torch.no_grad():
        layer.weight.weights.copy_(_t([1, 2]))
        layer.weight.factors[0].copy_(_t([[1, 0], [1, 1]]))
        layer.weight.factors[1].copy_(_t([[1, 2], [0, 1]]))
        layer.bias.copy_(_t([10, 20]))
    x = _t([[1, 1], [2, -1]])
    # W = [[1, 0], [5, 2]]: x W^T + b
    torch.testing.assert_close(dense_forward(layer, x), _t([[11, 27], [12, 28]]), rtol=0, atol=0)


# ---------------------------------------------------------------- against TensorLy


def test_decomposition_helpers_match_tensorly():
    np.random.seed(0)
    weights, factors = np.random.randn(3), [np.random.randn(n, 3) for n in (2, 3, 4)]
    expected = tl.cp_to_tensor((weights, factors))
    got = cp_full(_Res(weights=torch.from_numpy(weights), factors=_tensors(factors)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)

    core = np.random.randn(2, 3, 2)
    factors = [np.random.randn(n, r) for n, r in zip((4, 5, 3), (2, 3, 2))]
    expected = tl.tucker_to_tensor((core, factors))
    got = tucker_full(_Res(core=torch.from_numpy(core), factors=_tensors(factors)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # a None factor is the identity
    got = tucker_full(_Res(core=torch.from_numpy(core), factors=[None, *_tensors(factors[1:])]))
    np.testing.assert_allclose(got.numpy(), tl.tucker_to_tensor((core, [np.eye(2), *factors[1:]])))

    cores = [np.random.randn(*s) for s in [(1, 3, 2), (2, 4, 3), (3, 2, 1)]]
    np.testing.assert_allclose(tt_full(_tensors(cores)).numpy(), tl.tt_to_tensor(cores), rtol=1e-12)
    cores = [np.random.randn(*s) for s in [(1, 2, 3, 2), (2, 4, 2, 1)]]
    # tt_full keeps TT-matrix modes interleaved (o1, i1, o2, i2); TensorLy's tt_matrix_to_tensor
    # orders them (o1, o2, i1, i2)
    got = tt_full(_tensors(cores)).permute(0, 2, 1, 3).numpy()
    np.testing.assert_allclose(got, tl.tt_matrix_to_tensor(cores), rtol=1e-12)


class _Res:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _tensors(arrays):
    return [torch.from_numpy(a) for a in arrays]


# ---------------------------------------------------------------- against the library

LIBRARY_CASES = [
    (name, n_in, n_out, n_layers)
    for name in FORMATS
    for n_in, n_out in itertools.product((1, 2, 3), repeat=2)
    for n_layers in (1, 3)
    if name != "blocktt" or n_in == n_out
]


@pytest.mark.parametrize(("name", "n_in", "n_out", "n_layers"), LIBRARY_CASES)
def test_oracle_matches_library_to_matrix(name, n_in, n_out, n_layers):
    fm = get_format(name)(MODES[n_in], OUT_MODES[n_out], "same", n_layers, dtype=F64)
    with torch.no_grad():  # no unit weights or exact column norms from the init
        for p in fm.parameters():
            p.copy_(torch.randn_like(p))
    W = dense_weight(fm)
    lead = (n_layers,) if n_layers > 1 else ()
    assert W.dtype == F64 and W.shape == (*lead, fm.out_features, fm.in_features)
    torch.testing.assert_close(W, fm.to_matrix(), rtol=1e-12, atol=1e-12)
    for layer in range(n_layers):
        torch.testing.assert_close(dense_weight(fm, layer), fm.to_matrix(layer))
