"""The planner: FLOP counts match the code (FlopCounterMode as the oracle), the choice is the
cheapest, every strategy equals the dense oracle, and plans are cached."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tensorized as tz
from tensorized.formats import FORMATS
from tensorized.plan import (
    ANY_BATCH,
    WeightShape,
    _copied_numel,
    any_batch_strategy,
    gemms,
    make_plan,
    strategy_cost,
)

F64 = torch.float64
RANKS = {
    "dense": "same",
    "cp": 5,
    "lowrank": 3,
    "tucker": (2, 3, 2, 3, 4, 2),
    "tt": 3,
    "blocktt": 3,
}
CASES = [
    (fmt, strategy, n_layers)
    for fmt, cls in FORMATS.items()
    for strategy in cls.strategies
    for n_layers in (1, 3)
]


def build(fmt, n_layers):
    return FORMATS[fmt]((4, 6, 2), (3, 5, 2), RANKS[fmt], n_layers, dtype=F64)


@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES)
def test_flops_match_the_code(fmt, strategy, n_layers):
    w = build(fmt, n_layers)
    x = torch.randn(7, 48, dtype=F64)
    layer = n_layers - 1 if n_layers > 1 else None
    with FlopCounterMode(display=False) as counter:
        w.contract(x, layer, strategy)
    prepare, apply = gemms(w, strategy, 7)
    expected = sum(2 * m * k * n * c for m, k, n, c in prepare + apply)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize(("fmt", "strategy", "n_layers"), CASES)
def test_every_strategy_equals_the_dense_oracle(fmt, strategy, n_layers):
    w = build(fmt, n_layers)
    x = torch.randn(2, 5, 48, dtype=F64)
    for layer in range(n_layers):
        sel = layer if n_layers > 1 else None
        torch.testing.assert_close(
            w.contract(x, sel, strategy), x @ w.to_matrix(sel).T, rtol=1e-12, atol=1e-12
        )


def test_flops_by_hand():
    # CP rank 5 on (in 48, out 30): x @ KR_in (2*B*48*5) then @ KR_out.T (2*B*5*30)
    cp = FORMATS["cp"]((4, 6, 2), (3, 5, 2), 5)
    assert (
        make_plan(cp, 10, training=False, dtype=torch.float32, device_type="cpu")
        .costs["factorized"]
        .forward_flops
        == 2 * 10 * 48 * 5 + 2 * 10 * 5 * 30
    )
    # TT-matrix (r=3) cores (1,3,4,3), (3,5,6,3), (3,2,2,1), batch 2:
    # core 1: (3*3, 1*4) @ (2*1, 4, 12) -> 2*9*4*12*2; core 2: (5*3, 3*6) @ (2*3, 18, 2)
    # -> 2*15*18*2*6; core 3: (2*1, 3*2) @ (2*15, 6, 1) -> 2*2*6*1*30
    ttm = FORMATS["blocktt"]((4, 6, 2), (3, 5, 2), 3)
    expected = 2 * 9 * 4 * 12 * 2 + 2 * 15 * 18 * 2 * 6 + 2 * 2 * 6 * 1 * 30
    plan = make_plan(ttm, 2, training=True, dtype=torch.float32, device_type="cpu")
    assert plan.costs["factorized"].forward_flops == expected
    assert plan.costs["factorized"].backward_flops == 2 * expected
    # reconstructed: rebuild (1*12 x 3 x 30*3 then 12*30 x 3 x 4) plus the GEMM 2*2*48*30
    rebuild = 2 * 12 * 3 * 90 + 2 * 360 * 3 * 4
    assert plan.costs["reconstructed"].forward_flops == rebuild + 2 * 2 * 48 * 30


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("batch", [1, 32, 512])
@pytest.mark.parametrize("training", [False, True])
def test_chosen_plan_is_the_cheapest(fmt, batch, training):
    w = FORMATS[fmt]((8, 8, 16), (8, 8, 16), "same" if fmt == "dense" else 0.1)
    plan = make_plan(w, batch, training=training, dtype=torch.float32, device_type="cpu")
    best = min(c.seconds for c in plan.costs.values())
    assert plan.costs[plan.chosen].seconds == best
    assert set(plan.strategies) == set(w.strategies)
    assert plan.flops == plan.costs[plan.chosen].forward_flops
    assert plan.chosen in str(plan)


def test_inference_may_reuse_the_reconstruction():
    w = FORMATS["tucker"]((4, 4), (4, 4), "same")
    infer = make_plan(w, 4096, training=False, dtype=torch.float32, device_type="cpu")
    train = make_plan(w, 4096, training=True, dtype=torch.float32, device_type="cpu")
    gemm = 2 * 4096 * 16 * 16
    assert infer.costs["reconstructed"].forward_flops == gemm
    assert train.costs["reconstructed"].forward_flops > gemm


def test_layer_plan_and_cache():
    layer = tz.FactorizedLinear((8, 8, 16), (16, 16, 16), factorization="tucker", rank=0.1)
    plan = layer.plan(32)
    assert plan.batch_size == 32 and plan.training is True and plan.chosen in plan.costs
    x = torch.randn(32, 1024)
    layer(x)
    assert list(layer._plans) == [(32, True, torch.float32, "cpu")]
    layer(x)
    assert len(layer._plans) == 1  # planned once
    with torch.no_grad():
        layer.eval()
        layer(x)
    assert len(layer._plans) == 2
    fixed = tz.FactorizedLinear((4, 4), (4, 4), factorization="tt", implementation="halves")
    assert fixed.plan(8).chosen == "halves" and fixed.implementation_for(8) == "halves"


def test_eval_cache_is_invalidated_when_parameters_change():
    layer = tz.FactorizedLinear(
        (4, 4), (4, 4), factorization="cp", rank=3, implementation="reconstructed"
    ).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        assert layer._operand_cache
        for p in layer.weight.parameters():
            p.mul_(2.0)
        second = layer(x)
    expected = F.linear(x, layer.weight.to_matrix(), layer.bias)
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(first, second)


def test_eval_cache_keeps_one_entry_per_layer_of_a_joint_weight():
    joint = tz.FactorizedLinear(
        (4, 4), (4, 4), factorization="tt", rank=3, n_layers=3, implementation="reconstructed"
    ).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        for i in (0, 1, 2, 0):
            torch.testing.assert_close(
                joint(x, i), F.linear(x, joint.weight.to_matrix(i), joint.bias[i])
            )
    assert set(joint._operand_cache) == {
        ("reconstructed", 0),
        ("reconstructed", 1),
        ("reconstructed", 2),
    }


def test_unknown_strategy_errors():
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'factorized'"):
        tz.FactorizedLinear((4, 4), (4, 4), factorization="cp", implementation="kron")
    w = FORMATS["cp"]((4, 4), (4, 4), 2)
    with pytest.raises(ValueError, match=r"strategy must be one of"):
        w.contract(torch.randn(2, 16), strategy="halves")
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        make_plan(w, 0, training=False, dtype=torch.float32, device_type="cpu")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_plan_from_shape_signature_equals_plan_from_module(fmt):
    # torch.compile plans from the constant signature; it must describe the module exactly.
    rank = {"dense": "same", "cp": 4, "lowrank": 3}.get(fmt, 2)
    layer = tz.FactorizedLinear((4, 6), (3, 5), factorization=fmt, rank=rank, n_layers=2)
    shape = WeightShape(*layer.weight.shape_signature)
    assert shape.num_params == layer.weight.num_params
    assert (shape.in_features, shape.out_features) == (24, 15)
    for batch, training in [(1, False), (64, True)]:
        kw = {"training": training, "dtype": torch.float32, "device_type": "cpu"}
        assert make_plan(shape, batch, **kw) == make_plan(layer.weight, batch, **kw)
        for strategy in layer.weight.strategies:
            args = (strategy, batch, torch.float32, "cpu", training)
            assert strategy_cost(layer.weight, *args) == strategy_cost(shape, *args)


class _CopyCounter(TorchDispatchMode):
    """Elements written by copies (``clone`` / ``copy_``) while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.numel += out.numel()
        return out


@pytest.mark.parametrize(("fmt", "strategy"), [(f, s) for f, s, n in CASES if n == 1])
def test_copies_match_the_code(fmt, strategy):
    # The cost model's copied elements (Tucker's rotated mode products) against the copies
    # the apply step really makes.
    w = build(fmt, 1)
    x = torch.randn(7, 48, dtype=F64)
    operands = w.prepare(strategy, None)
    with _CopyCounter() as counter:
        w.apply(strategy, x, operands, None)
    assert counter.numel == _copied_numel(WeightShape(*w.shape_signature), strategy, 7)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_any_batch_strategy_minimizes_the_worst_slowdown(fmt, training):
    """What a compiled graph with a symbolic batch uses: brute force over the strategies."""
    w = tz.FactorizedLinear((8, 8, 16), (16, 16, 16), factorization=fmt, rank=0.1).weight
    opts = dict(training=training, dtype=torch.float32, device_type="cpu")
    chosen = any_batch_strategy(w, **opts)
    worst = {}
    for s in w.strategies:
        ratios = []
        for b in ANY_BATCH:
            costs = {
                t: strategy_cost(w, t, b, torch.float32, "cpu", training) for t in w.strategies
            }
            ratios.append(costs[s].seconds / min(c.seconds for c in costs.values()))
        worst[s] = max(ratios)
    assert worst[chosen] == min(worst.values())
    assert chosen == any_batch_strategy(WeightShape(*w.shape_signature), **opts)
