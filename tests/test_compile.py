"""torch.compile(fullgraph=True) works for every format and strategy, forward and backward."""

import pytest
import torch

import tensorized as tz
from tensorized.formats import FORMATS

CASES = [(fmt, s) for fmt, cls in FORMATS.items() for s in ("auto", *cls.strategy_names())]
RANK = {"dense": "same", "cp": 4, "lowrank": 3}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("fmt", "strategy"), CASES)
def test_compiled_forward_and_backward_match_eager(fmt, strategy):
    layer = tz.FactorizedLinear(
        (4, 4),
        (2, 4),
        factorization=fmt,
        rank=RANK.get(fmt, 2),
        n_layers=2,
        implementation=strategy,
    )
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16, requires_grad=True)
    y_eager = layer(x, 1)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y = compiled(x, 1)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(g, g_eager)
    with torch.no_grad():
        layer.eval()
        torch.testing.assert_close(compiled(x, 0), layer(x, 0))


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_inductor_backend_compiles(fmt):
    layer = tz.FactorizedLinear((4, 4), (2, 4), factorization=fmt, rank=RANK.get(fmt, 2))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("fmt", "strategy"), CASES)
def test_dynamic_batch_compiles_once_forward_and_backward(fmt, strategy):
    layer = tz.FactorizedLinear(
        (4, 4), (2, 4), factorization=fmt, rank=RANK.get(fmt, 2), implementation=strategy
    )
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.utils.counters.clear()
    for batch in (3, 5, 17, 64):
        x = torch.randn(batch, 16, requires_grad=True)
        y = compiled(x)
        (g,) = torch.autograd.grad((y * y).sum(), x)
        y_eager = layer(x)
        (g_eager,) = torch.autograd.grad((y_eager * y_eager).sum(), x)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(g, g_eager)
    assert _graphs() == 1


def test_default_compile_goes_dynamic_on_the_second_batch_size():
    # dynamo's automatic dynamic shapes: the second batch size recompiles with a symbolic
    # batch; the planner must not break fullgraph or force one graph per size after that.
    layer = tz.FactorizedLinear((4, 4), (2, 4), factorization="tucker", rank=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    for batch in (3, 5, 9, 33):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(compiled(x), layer(x))
    assert _graphs() == 2
    x = torch.randn(2, 7, 16)  # leading dims are flattened into the (symbolic) batch
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("fmt", ["cp", "tt"])
def test_inductor_dynamic_batch_with_marked_dim(fmt):
    layer = tz.FactorizedLinear((4, 4), (2, 4), factorization=fmt, rank=RANK.get(fmt, 2))
    compiled = torch.compile(layer, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for batch in (4, 6, 11):
        x = torch.randn(batch, 16)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert _graphs() == 1


def test_planner_carries_the_marker_of_the_public_decorator():
    from tensorized._plan import planned_strategy

    def probe():
        return 0

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    marker = set(vars(probe)) - before
    assert marker and all(getattr(planned_strategy, k) == getattr(probe, k) for k in marker)
