"""to_tensorly / from_tensorly against TensorLy's own reconstructions and decompositions."""

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, tensor_train, tensor_train_matrix, tucker

import tensorized as tz
from oracles import dense_weight

pytestmark = pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")
F64 = torch.float64
IN, OUT = (2, 3), (3, 2)
RANK = {"dense": "same", "lowrank": 2, "cp": 5}
CASES = [(f, n) for f in ("cp", "tucker", "tt", "blocktt", "dense") for n in (1, 3)]
CASES.append(("lowrank", 1))


def _weights(layer) -> np.ndarray:
    """The float64 oracle: every layer's matrix from the factor definitions, (L, out, in)."""
    W = dense_weight(layer.weight).detach()
    return W.reshape(layer.n_layers, *W.shape[-2:]).numpy()


def _full(obj) -> np.ndarray:
    """TensorLy's own reconstruction of ``obj``."""
    if isinstance(obj, tl.cp_tensor.CPTensor):
        return tl.to_numpy(tl.cp_to_tensor(obj))
    if isinstance(obj, tl.tucker_tensor.TuckerTensor):
        return tl.to_numpy(tl.tucker_to_tensor(obj))
    if isinstance(obj, tl.tt_matrix.TTMatrix):
        return tl.to_numpy(tl.tt_matrix_to_tensor(obj))
    if isinstance(obj, tl.tt_tensor.TTTensor):
        return tl.to_numpy(tl.tt_to_tensor(obj))
    return tl.to_numpy(obj)


@pytest.mark.parametrize(("fmt", "n_layers"), CASES)
def test_to_tensorly_reconstructs_the_weight_and_round_trips(fmt, n_layers):
    layer = tz.FactorizedLinear(IN, OUT, True, fmt, RANK.get(fmt, 0.6), n_layers, dtype=F64)
    obj = layer.to_tensorly()
    expected = {"cp": "CPTensor", "tucker": "TuckerTensor", "tt": "TTTensor"}
    expected |= {"blocktt": "TTMatrix", "lowrank": "CPTensor", "dense": "ndarray"}
    assert type(obj).__name__ == expected[fmt]
    W = _weights(layer)
    np.testing.assert_allclose(_full(obj).reshape(W.shape), W, rtol=1e-12, atol=1e-14)
    back = tz.FactorizedLinear.from_tensorly(obj, IN, OUT)
    assert (back.factorization, back.rank, back.n_layers) == (fmt, layer.rank, n_layers)
    np.testing.assert_allclose(_weights(back), W, rtol=1e-12, atol=1e-14)
    assert back.bias is not None and not back.bias.any()
    assert tl.get_backend() == "numpy"  # never changed


@pytest.mark.parametrize(
    ("decompose", "fmt"),
    [
        (lambda t: parafac(t, 4, init="random", random_state=0), "cp"),
        (lambda t: tucker(t, rank=[2, 2, 2, 2], init="random", random_state=0), "tucker"),
        (lambda t: tensor_train(t, rank=[1, 3, 4, 3, 1]), "tt"),
        (lambda t: tensor_train_matrix(t.reshape(3, 2, 2, 3), rank=[1, 4, 1]), "blocktt"),
    ],
    ids=["parafac", "tucker", "tensor_train", "tensor_train_matrix"],
)
def test_layer_from_tensorly_decomposition_computes_its_tensor(decompose, fmt):
    dense = np.random.default_rng(0).standard_normal((3, 2, 2, 3))
    obj = decompose(dense)
    layer = tz.FactorizedLinear.from_tensorly(obj, IN, OUT, bias=False)
    assert layer.factorization == fmt
    W = torch.as_tensor(_full(obj).reshape(6, 6))
    x = torch.randn(7, 6, dtype=F64)
    torch.testing.assert_close(layer(x), x @ W.T)


def test_pytorch_backend_keeps_torch_tensors_and_the_backend():
    layer = tz.FactorizedLinear(IN, OUT, factorization="tt", rank=0.6, dtype=F64)
    with tl.backend_context("pytorch"):
        obj = layer.to_tensorly()
        assert all(isinstance(c, torch.Tensor) and not c.requires_grad for c in obj.factors)
        full = tl.tt_to_tensor(obj)
        back = tz.FactorizedLinear.from_tensorly(obj, IN, OUT)
    assert tl.get_backend() == "numpy"
    torch.testing.assert_close(full.reshape(6, 6), dense_weight(layer.weight).detach())
    torch.testing.assert_close(dense_weight(back.weight), dense_weight(layer.weight))
    with torch.no_grad():  # a copy: changing it does not touch the layer
        obj.factors[0].zero_()
    assert layer.weight.cores[0].abs().sum() > 0


def test_dtype_and_kwargs_are_passed_on():
    obj = parafac(np.random.default_rng(1).standard_normal((3, 2, 2, 3)), 2, random_state=0)
    layer = tz.FactorizedLinear.from_tensorly(
        obj, IN, OUT, dtype=torch.float32, implementation="reconstructed"
    )
    assert layer.weight.weights.dtype == torch.float32
    assert layer.implementation == "reconstructed"


def test_errors():
    cp = parafac(np.random.default_rng(2).standard_normal((3, 2, 2, 3)), 2, random_state=0)
    with pytest.raises(ValueError, match=r"tensor has shape \(3, 2, 2, 3\) but out_tensorized"):
        tz.FactorizedLinear.from_tensorly(cp, (2, 3), (2, 3))
    with pytest.raises(TypeError, match=r"must be a TensorLy CPTensor.*got list"):
        tz.FactorizedLinear.from_tensorly([1, 2], IN, OUT)
    joint = tz.FactorizedLinear(IN, OUT, factorization="lowrank", rank=2, n_layers=2)
    with pytest.raises(ValueError, match=r"'lowrank' layer with n_layers > 1"):
        joint.to_tensorly()
