"""The planner: FLOP counts match the code (FlopCounterMode as the oracle), the choice is the
cheapest, every strategy equals the dense oracle, and plans are cached."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tensorized as tz
from oracles import dense_weight
from tensorized._plan import (
    ANY_BATCH,
    any_batch_strategy,
    gemms,
    make_plan,
    plan_cache_info,
    strategy_cost,
    work,
)
from tensorized.formats import FORMATS, WeightShape

F64 = torch.float64
RANKS = {
    "dense": "same",
    "cp": 5,
    "lowrank": 3,
    "basis": 4,
    "tucker": (2, 3, 2, 3, 4, 2),
    "tt": 3,
    "blocktt": 3,
}
CASES = [
    (fmt, strategy, n_layers)
    for fmt, cls in FORMATS.items()
    for strategy in cls.strategy_names()
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
            w.contract(x, sel, strategy), x @ dense_weight(w, sel).T, rtol=1e-12, atol=1e-12
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
@pytest.mark.parametrize(("training", "cached"), [(False, False), (False, True), (True, False)])
def test_chosen_plan_is_the_cheapest(fmt, batch, training, cached):
    w = FORMATS[fmt]((8, 8, 16), (8, 8, 16), "same" if fmt == "dense" else 0.1)
    kw = {"training": training, "dtype": torch.float32, "device_type": "cpu", "cached": cached}
    plan = make_plan(w, batch, **kw)
    best = min(c.seconds for c in plan.costs.values())
    assert plan.costs[plan.chosen].seconds == best
    assert set(plan.strategies) == set(w.strategy_names())
    assert plan.flops == plan.costs[plan.chosen].forward_flops
    assert plan.chosen in str(plan)


def test_only_kept_operands_are_free_in_inference():
    # The planner costs what is really cached: the rebuild is paid on every call unless the
    # layer keeps its operands (merge()).
    w = FORMATS["tucker"]((4, 4), (4, 4), "same")
    kw = {"dtype": torch.float32, "device_type": "cpu"}
    kept = make_plan(w, 4096, training=False, cached=True, **kw)
    rebuilt = make_plan(w, 4096, training=False, **kw)
    train = make_plan(w, 4096, training=True, cached=True, **kw)  # cached is moot in training
    gemm = 2 * 4096 * 16 * 16
    prepare, _ = gemms(w, "reconstructed", 4096)
    rebuild = sum(2 * m * k * n * c for m, k, n, c in prepare)
    assert kept.costs["reconstructed"].forward_flops == gemm
    assert rebuilt.costs["reconstructed"].forward_flops == gemm + rebuild
    assert train.costs["reconstructed"].forward_flops == gemm + rebuild
    assert kept.costs["reconstructed"].seconds < rebuilt.costs["reconstructed"].seconds


def test_plans_are_shared_by_identical_layers_and_bounded(monkeypatch):
    import tensorized._plan as plan_module

    calls = []
    real = plan_module.make_plan
    monkeypatch.setattr(
        plan_module, "make_plan", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    spec = ((8, 8, 16), (16, 16, 16))
    a = tz.FactorizedLinear(*spec, factorization="tucker", rank=0.1)
    b = tz.FactorizedLinear(*spec, factorization="tucker", rank=0.1)
    a(torch.randn(33, 1024))
    b(torch.randn(33, 1024))  # same signature, batch and mode: planned once for both
    assert calls.count(33) == 1
    assert a.plan(33).chosen == a.implementation_for(33)
    monkeypatch.setattr(plan_module, "PLAN_CACHE_SIZE", 3)
    for batch in range(40, 46):
        a(torch.randn(batch, 1024))
    info = plan_cache_info()
    assert info.currsize <= 3 and info.maxsize == 3
    fixed = tz.FactorizedLinear((4, 4), (4, 4), factorization="tt", implementation="halves")
    assert fixed.plan(8).chosen == "halves" and fixed.implementation_for(8) == "halves"


def test_merged_layer_plans_with_kept_operands():
    layer = tz.FactorizedLinear((8, 8), (8, 8), factorization="blocktt", rank=0.3).eval()
    with torch.no_grad():
        assert layer.plan(4).cached is False
        layer.merge("reconstructed")
        plan = layer.plan(4)
    assert plan.cached is True and plan.chosen == "reconstructed"
    assert "operands kept" in str(plan)
    assert layer.plan(4, training=True).cached is False  # gradients: computed from the factors


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
    shape = WeightShape(*layer.weight.signature_key)
    assert shape.num_params == layer.weight.num_params
    assert (shape.in_features, shape.out_features) == (24, 15)
    for batch, training in [(1, False), (64, True)]:
        kw = {"training": training, "dtype": torch.float32, "device_type": "cpu"}
        assert make_plan(shape, batch, **kw) == make_plan(layer.weight, batch, **kw)
        for strategy in layer.weight.strategy_names():
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
    chosen = w.strategy(strategy)
    # without autograd: in eager training 'reconstructed' defers its rebuild to apply (it
    # depends on the batch there), which would move prepare's element-wise work into apply
    with torch.no_grad():
        operands = chosen.prepare(w, None)
        with _CopyCounter() as counter:
            chosen.apply(w, x, operands, None)
    assert counter.numel == work(WeightShape(*w.signature_key), strategy, 7).copied_numel


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_any_batch_strategy_minimizes_the_worst_slowdown(fmt, training):
    """What a compiled graph with a symbolic batch uses: brute force over the strategies."""
    w = tz.FactorizedLinear((8, 8, 16), (16, 16, 16), factorization=fmt, rank=0.1).weight
    opts = dict(training=training, dtype=torch.float32, device_type="cpu")
    chosen = any_batch_strategy(w, **opts)
    worst = {}
    names = w.strategy_names()
    for s in names:
        ratios = []
        for b in ANY_BATCH:
            costs = {t: strategy_cost(w, t, b, torch.float32, "cpu", training) for t in names}
            ratios.append(costs[s].seconds / min(c.seconds for c in costs.values()))
        worst[s] = max(ratios)
    assert worst[chosen] == min(worst.values())
    assert chosen == any_batch_strategy(WeightShape(*w.signature_key), **opts)
