"""Mixed precision: FactorizedLinear under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

For every format, every strategy and 'auto', one and two layers, training and inference:
the autocast forward is within bfloat16 accuracy of the float64 dense oracle and has the
dtype autocast gives ``nn.Linear``; parameters and their gradients stay float32 and the
gradients are within bfloat16 accuracy; and the inference cache does not carry operands
prepared under autocast into a float32 forward, or the other way round.
"""

import copy

import pytest
import torch
from torch import nn

import tensorized as tz
from oracles import dense_forward
from tensorized.formats import FORMATS

BF16 = torch.bfloat16
F64 = torch.float64
CASES = [
    (fmt, strategy, n_layers)
    for fmt, cls in FORMATS.items()
    for strategy in ("auto", *cls.strategy_names())
    for n_layers in (1, 2)
]
IDS = [f"{fmt}-{s}-L{n}" for fmt, s, n in CASES]
RANK = {"dense": "same", "cp": 4, "lowrank": 3}

# bfloat16 keeps 8 significant bits: unit roundoff U = 2^-8. Each product rounds its
# operands or result once, so a chain of k roundings has relative error up to about k * U.
# The forward here rounds at most ~6 times (input, up to 4 cores plus the layer core, the
# output); the backward about as many again on top of the forward's.
U = 2.0**-8
FWD_TOL = 6 * U  # ~2.3e-2, relative Frobenius error
GRAD_TOL = 12 * U  # ~4.7e-2, per parameter
F32_TOL = 1e-5  # what a float32 forward gets (same shapes, no autocast)


def _layer(fmt: str, strategy: str, n_layers: int) -> tz.FactorizedLinear:
    return tz.FactorizedLinear(
        (4, 4),
        (2, 4),
        factorization=fmt,
        rank=RANK.get(fmt, 2),
        n_layers=n_layers,
        implementation=strategy,
    )


def _oracle(layer: tz.FactorizedLinear, x: torch.Tensor, index: int) -> torch.Tensor:
    """float64 dense ``x W^T + b`` of layer ``index``, from the factor definitions."""
    with torch.no_grad():
        return dense_forward(layer, x, index)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().to(F64) - ref).norm() / ref.norm())


def _forward(layer, x, index, *, training: bool, autocast: bool) -> torch.Tensor:
    layer.train(training)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        return layer(x, index)


def _plain_linear_dtype(linear: nn.Linear, training: bool) -> torch.dtype:
    linear.train(training)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=BF16):
        return linear(torch.randn(3, 16)).dtype


MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


@MODES
@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES, ids=IDS)
def test_autocast_forward_within_bf16_tolerance(fmt, strategy, n_layers, training):
    layer = _layer(fmt, strategy, n_layers)
    x = torch.randn(2, 3, 16)
    index = n_layers - 1
    y = _forward(layer, x, index, training=training, autocast=True)
    assert y.shape == (2, 3, 8)
    err = _rel(y, _oracle(layer, x, index))
    # Below bf16 accuracy, and above float32's: the forward really ran in bfloat16.
    assert F32_TOL < err < FWD_TOL


def test_bf16_tolerance_tells_layers_apart():
    # A wrong result (here: the other layer of a joint weight) is far outside FWD_TOL.
    layer = _layer("tt", "factorized", 2)
    x = torch.randn(5, 16)
    assert _rel(_oracle(layer, x, 0), _oracle(layer, x, 1)) > 10 * FWD_TOL


@MODES
@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES, ids=IDS)
def test_autocast_output_dtype_matches_nn_linear(fmt, strategy, n_layers, training):
    layer = _layer(fmt, strategy, n_layers)
    y = _forward(layer, torch.randn(5, 16), n_layers - 1, training=training, autocast=True)
    expected = _plain_linear_dtype(nn.Linear(16, 8), training)
    assert y.dtype == expected, (
        f"{fmt}/{layer.implementation_for(5)} returns {y.dtype} under autocast, nn.Linear "
        f"returns {expected}"
    )


@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES, ids=IDS)
def test_autocast_backward_float32_params_and_grads(fmt, strategy, n_layers):
    layer = _layer(fmt, strategy, n_layers)
    reference = copy.deepcopy(layer).to(F64)
    x, g = torch.randn(6, 16), torch.randn(6, 8)
    index = n_layers - 1
    y = _forward(layer, x, index, training=True, autocast=True)
    # The loss and backward run after leaving autocast, as in the usual AMP recipe; a
    # random projection keeps the gradients from cancelling.
    (y.float() * g).sum().backward()
    (reference(x.to(F64), index) * g.to(F64)).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert _rel(p.grad, q.grad) < GRAD_TOL, name


@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES, ids=IDS)
def test_cache_autocast_then_float32_forward_is_float32_accurate(fmt, strategy, n_layers):
    # An inference forward under autocast fills the operand cache; a later float32 forward
    # must not reuse bfloat16 operands from it.
    layer = _layer(fmt, strategy, n_layers)
    x = torch.randn(5, 16)
    index = n_layers - 1
    _forward(layer, x, index, training=False, autocast=True)
    y = _forward(layer, x, index, training=False, autocast=False)
    assert y.dtype == torch.float32
    assert _rel(y, _oracle(layer, x, index)) < F32_TOL


@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES, ids=IDS)
def test_cache_float32_then_autocast_forward_is_an_autocast_forward(fmt, strategy, n_layers):
    # The other order: float32 operands cached first; the autocast forward must still give
    # what a fresh layer gives under autocast (dtype) at bfloat16 accuracy, and a float32
    # forward after both is float32-accurate again.
    layer = _layer(fmt, strategy, n_layers)
    fresh = copy.deepcopy(layer)
    x = torch.randn(5, 16)
    index = n_layers - 1
    ref = _oracle(layer, x, index)
    _forward(layer, x, index, training=False, autocast=False)
    y = _forward(layer, x, index, training=False, autocast=True)
    expected = _forward(fresh, x, index, training=False, autocast=True)
    assert y.dtype == expected.dtype
    assert _rel(y, ref) < FWD_TOL
    y = _forward(layer, x, index, training=False, autocast=False)
    assert y.dtype == torch.float32
    assert _rel(y, ref) < F32_TOL
