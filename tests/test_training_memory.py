"""Training without keeping what can be rebuilt: CP's Khatri-Rao products, the reconstructed
matrix's intermediates, Tucker's in-mode projections. Gradients equal the dense float64
oracle's, the backward FLOPs equal the declared ones (FlopCounterMode as the oracle), and the
tensors saved for backward are the ones the design says (saved_tensors_hooks)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tensorized as tz
from oracles import dense_weight
from tensorized._plan import make_plan
from tensorized.formats import FORMATS

F64 = torch.float64
IN, OUT = (4, 6, 2), (3, 5, 2)  # 48 -> 30
RANKS = {"cp": 40, "tucker": (2, 3, 2, 3, 4, 2), "blocktt": 3, "tt": 3, "lowrank": 3}
CASES = [
    (fmt, strategy, batch)
    for fmt in RANKS
    for strategy in FORMATS[fmt].strategy_names()
    for batch in (2, 200)  # CP's h and Tucker's projection recomputed at 200, kept at 2
]


def _layer(fmt, strategy, n_layers=1):
    w = FORMATS[fmt](IN, OUT, RANKS[fmt], n_layers, dtype=F64)
    return tz.FactorizedLinear.from_weight(w, bias=True, implementation=strategy)


def _saved(layer, x, index=0, skip=frozenset()):
    """Shapes of the distinct storages autograd keeps for backward (but those in ``skip``,
    data pointers)."""
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, index)
    return list(kept.values()), y


@pytest.mark.parametrize(("fmt", "strategy", "batch"), CASES)
def test_gradients_and_backward_flops(fmt, strategy, batch):
    layer = _layer(fmt, strategy, n_layers=2)
    x = torch.randn(batch, 48, dtype=F64, requires_grad=True)
    params = [x, *layer.parameters()]
    y = layer(x, 1)
    g = torch.randn_like(y)
    with FlopCounterMode(display=False) as counter:
        ours = torch.autograd.grad(y, params, g)
    cost = make_plan(layer.weight, batch, training=True, dtype=F64, device_type="cpu")
    assert counter.get_total_flops() == cost.costs[strategy].backward_flops
    oracle = x @ dense_weight(layer.weight, 1).T + layer.bias[1]
    want = torch.autograd.grad(oracle, params, g, allow_unused=True)
    for a, b in zip(ours, want):
        torch.testing.assert_close(
            a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12
        )


def test_cp_keeps_no_khatri_rao_product():
    # rank 40 > 48 * 30 / 78: each Khatri-Rao product (48 x 40, 30 x 40) is larger than W
    layer = _layer("cp", "factorized")
    for batch, h_kept in ((2, True), (200, False)):  # h (batch, 40) kept while <= 48 * 30
        x = torch.randn(batch, 48, dtype=F64, requires_grad=True)
        shapes, _ = _saved(layer, x)
        assert (48, 40) not in shapes and (30, 40) not in shapes
        assert ((batch, 40) in shapes) is h_kept
        assert (batch, 48) in shapes  # x


def test_reconstructed_keeps_the_matrix_not_its_intermediates():
    layer = _layer("blocktt", "reconstructed")
    x = torch.randn(16, 48, dtype=F64, requires_grad=True)
    shapes, _ = _saved(layer, x)
    params = {tuple(p.shape) for p in layer.parameters()}
    # x, W (or the W.T view F.linear keeps) and the parameters only
    assert set(shapes) <= {(16, 48), (30, 48), (48, 30)} | params
    with torch.no_grad():  # inference and merge() rebuild W plainly
        torch.testing.assert_close(layer(x), x @ dense_weight(layer.weight).T + layer.bias)


def test_tucker_projection_is_recomputed_only_for_large_batches():
    layer = _layer("tucker", "factorized")
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def kept_per_row(batch):  # elements per batch row of what is saved, beyond the parameters
        x = torch.randn(batch, 48, dtype=F64, requires_grad=True)
        sizes = [math.prod(s) for s in _saved(layer, x, skip=params)[0]]  # (and their views)
        assert all(n % batch == 0 for n in sizes)
        return sorted(n // batch for n in sizes)

    # modes in (4, 6, 2) -> ranks (3, 4, 2), core (2 * 3 * 2) x (3 * 4 * 2), out ranks (2, 3, 2)
    # -> out modes (3, 5, 2). Each product keeps its input: the projection's (last mode
    # first) are x (48 per row), 2 * 4 * 6 = 48 and 4 * 2 * 4 = 32; the core's 24; the
    # expansion's 12, 3 * 2 * 3 = 18 and 2 * 3 * 5 = 30.
    assert kept_per_row(2) == sorted([48, 48, 32, 24, 12, 18, 30])
    # at batch 200 (activations above a quarter of W) the projection's 48 and 32 are rebuilt
    assert kept_per_row(200) == sorted([48, 24, 12, 18, 30])


@pytest.mark.parametrize("batch", [2, 200])
def test_tucker_parameter_gradients_without_an_input_gradient(batch):
    # The usual first layer: x needs no gradient, so backward stops before forming it.
    layer = _layer("tucker", "factorized", n_layers=2)
    x = torch.randn(batch, 48, dtype=F64)
    params = list(layer.parameters())
    y = layer(x, 1)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, params, g)
    oracle = x @ dense_weight(layer.weight, 1).T + layer.bias[1]
    for a, b in zip(ours, torch.autograd.grad(oracle, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_functional_call_rebuilds_from_the_tensors_it_was_given():
    # torch.func.functional_call swaps the parameters only during the forward: backward must
    # rebuild W from those tensors, not from the module's own
    layer = _layer("blocktt", "reconstructed")
    names = [n for n, _ in layer.named_parameters()]
    fresh = [torch.randn_like(p).requires_grad_() for p in layer.parameters()]
    x = torch.randn(5, 48, dtype=F64)
    y = torch.func.functional_call(layer, dict(zip(names, fresh)), (x,))
    grads = torch.autograd.grad(y.sum(), fresh)
    twin = _layer("blocktt", "reconstructed")
    with torch.no_grad():
        for p, f in zip(twin.parameters(), fresh):
            p.copy_(f)
    want = torch.autograd.grad(twin(x).sum(), list(twin.parameters()))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_in_place_change_before_backward_is_caught():
    layer = _layer("blocktt", "reconstructed")
    y = layer(torch.randn(3, 48, dtype=F64))
    with torch.no_grad():
        layer.weight.cores[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
