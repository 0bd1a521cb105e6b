"""The planner's machine model: injected constants change plans, measured constants are
cached on disk and read back, the switch turns measurement off. Nothing here is timed: the
microbenchmark is replaced wherever a test depends on its figures."""

import dataclasses
import json
import math

import pytest
import torch

import tensorized as tz
from tensorized import _embedding, _machine, _plan


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORIZED_CACHE_DIR", str(tmp_path))
    saved = dict(_machine._explicit), dict(_machine._known)
    _machine._explicit.clear()
    _machine._known.clear()
    yield
    _machine._explicit.clear()
    _machine._known.clear()
    _machine._explicit.update(saved[0])
    _machine._known.update(saved[1])
    _machine._changed()


FAKE = tz.Machine(1e9, 1e9, 1e-6, elementwise_bytes_per_s=1e9)


def _count_measurements(monkeypatch):
    calls = []

    def fake(device, dtype):
        calls.append((device.type, dtype))
        return FAKE

    monkeypatch.setattr(_machine, "measure_machine", fake)
    return calls


def test_fallback_constants_without_calibration(monkeypatch):
    calls = _count_measurements(monkeypatch)
    monkeypatch.setenv("TENSORIZED_CALIBRATE", "0")
    cpu = tz.planner_machine("cpu")
    assert cpu == _machine.FALLBACK_MACHINES["cpu"]
    assert tz.planner_machine("cpu", torch.float64).flops_per_s == cpu.flops_per_s / 2
    assert tz.planner_machine("mps") == cpu  # other devices: the CPU model
    assert calls == []


def test_injected_constants_change_the_plan_and_drop_cached_plans():
    layer = tz.FactorizedLinear(256, 256, factorization="tucker", rank=0.1)
    default = layer.plan(32, training=False)
    assert layer.plan(32, training=False).chosen == default.chosen
    # calls nearly free, GEMMs very slow: the plan with the fewest FLOPs wins
    tz.set_planner_machine(tz.Machine(1e6, 1e12, 1e-12, elementwise_bytes_per_s=1e12))
    slow_gemm = layer.plan(32, training=False)
    fewest = min(slow_gemm.costs.values(), key=lambda c: c.forward_flops).name
    assert slow_gemm.chosen == fewest
    # calls very expensive: the plan with the fewest kernel calls wins
    tz.set_planner_machine(tz.Machine(1e15, 1e15, 1.0, elementwise_bytes_per_s=1e15))
    slow_calls = layer.plan(32, training=False)
    assert slow_calls.chosen == min(slow_calls.costs.values(), key=lambda c: c.kernel_calls).name
    assert slow_calls.chosen != slow_gemm.chosen
    table = tz.FactorizedEmbedding(1000, 32, rank=4)
    table(torch.arange(10))
    assert _embedding._plan.cache_info().currsize > 0
    tz.set_planner_machine(None)  # lookups' plans are dropped too
    assert _embedding._plan.cache_info().currsize == 0
    assert layer.plan(32, training=False).chosen == default.chosen


def test_estimates_follow_the_injected_constants_exactly():
    from tensorized.formats import Work

    w = Work([(64, 32, 16, 1)], [(8, 16, 4, 2)], apply_numel=100, extra_calls=3)
    m = tz.Machine(1e9, 2e9, 1e-5, elementwise_bytes_per_s=4e9)
    tz.set_planner_machine(m, "cpu", torch.float32)
    flops, _, calls, seconds = _plan.estimate(w, torch.float32, "cpu")
    assert calls == 2 and flops == 2 * 64 * 32 * 16 + 2 * 2 * 8 * 16 * 4
    prod1 = max(2 * 64 * 32 * 16 / 1e9, (64 * 32 + 32 * 16 + 64 * 16) * 4 / 2e9)
    prod2 = max(2 * 2 * 8 * 16 * 4 / 1e9, (8 * 16 + (16 * 4 + 8 * 4) * 2) * 4 / 2e9)
    expected = (calls + 3) * 1e-5 + prod1 + prod2 + 100 * 4 / 4e9
    assert math.isclose(seconds, expected, rel_tol=1e-12)
    # only float32 was set: float64 keeps the fallback
    assert tz.planner_machine("cpu", torch.float64) != m


def test_fresh_buffers_cost_their_first_touch_on_top_of_their_traffic():
    from tensorized.formats import Work

    big = _machine.FRESH_BUFFER_BYTES // 4  # float32 elements of a buffer at the threshold
    rows = big // 16
    w = Work([], [(rows, 16, 16, 1), (rows - 1, 16, 16, 1)], prepare_buffers=(big, big - 1))
    plain = tz.Machine(1e9, 2e9, 1e-5, elementwise_bytes_per_s=4e9)
    tz.set_planner_machine(plain, "cpu", torch.float32)
    _, _, _, reused = _plan.estimate(w, torch.float32, "cpu")
    tz.set_planner_machine(dataclasses.replace(plain, fresh_bytes_per_s=1e9), "cpu", torch.float32)
    _, _, _, fresh = _plan.estimate(w, torch.float32, "cpu")
    # only the product output and the prepare buffer that reach the threshold pay, once each
    assert math.isclose(fresh - reused, 2 * _machine.FRESH_BUFFER_BYTES / 1e9, rel_tol=1e-9)
    _, _, _, merged = _plan.estimate(w, torch.float32, "cpu", cached=True)
    assert math.isclose(merged - reused, _machine.FRESH_BUFFER_BYTES / 1e9, rel_tol=1e-9)


def test_a_reconstruction_too_large_for_reused_memory_loses_to_factorized():
    # 4096 x 4096 TT-matrix at 2%, batch 32: its rebuilt W (67 MB) is faulted in on every
    # call (measured here: 'reconstructed' 91 ms, 'factorized' 52 ms)
    layer = tz.FactorizedLinear(4096, 4096, factorization="blocktt", rank=0.02, device="meta")
    base = tz.Machine(160e9, 25e9, 4e-6, elementwise_bytes_per_s=25e9)
    plans = {}
    for fresh in (None, 2e9):
        tz.set_planner_machine(dataclasses.replace(base, fresh_bytes_per_s=fresh), "cpu")
        plans[fresh] = layer.plan(32, training=False, device="cpu")
    assert plans[None].chosen == "reconstructed" and plans[2e9].chosen == "factorized"
    cost = {f: {n: c.seconds for n, c in p.costs.items()} for f, p in plans.items()}
    assert cost[2e9]["factorized"] == cost[None]["factorized"]  # no buffer that large
    # at least W twice: written by the chain's last product, then permuted into place
    extra = cost[2e9]["reconstructed"] - cost[None]["reconstructed"]
    assert extra >= 2 * 4096 * 4096 * 4 / 2e9


def test_measured_constants_are_cached_on_disk_and_read_back(monkeypatch, tmp_path):
    calls = _count_measurements(monkeypatch)
    monkeypatch.setenv("TENSORIZED_CALIBRATE", "1")
    assert tz.planner_machine("cpu") == FAKE
    assert tz.planner_machine("cpu") == FAKE
    assert calls == [("cpu", torch.float32)]  # once per process and key
    tz.planner_machine("cpu", torch.bfloat16)
    assert calls[-1] == ("cpu", torch.bfloat16)  # dtype-aware: its own measurement
    cache = json.loads((tmp_path / _machine.CACHE_FILE).read_text())
    assert len(cache) == 2 and all("threads=" in key for key in cache)
    _machine._known.clear()  # a new process: read from disk, not measured again
    assert tz.planner_machine("cpu") == FAKE
    assert len(calls) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another key: measured
    tz.planner_machine("cpu")
    assert len(calls) == 3


def test_unreadable_cache_is_ignored_with_a_warning(monkeypatch, tmp_path):
    calls = _count_measurements(monkeypatch)
    monkeypatch.setenv("TENSORIZED_CALIBRATE", "1")
    (tmp_path / _machine.CACHE_FILE).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable machine cache"):
        assert tz.planner_machine("cpu") == FAKE
    assert len(calls) == 1
    assert json.loads((tmp_path / _machine.CACHE_FILE).read_text())  # rewritten whole


def test_calibrate_planner_measures_and_is_used_even_when_switched_off(monkeypatch):
    calls = _count_measurements(monkeypatch)
    monkeypatch.setenv("TENSORIZED_CALIBRATE", "0")
    assert tz.calibrate_planner("cpu") == FAKE
    assert tz.planner_machine("cpu") == FAKE and len(calls) == 1
    _embedding._plan.cache_clear()
    with pytest.raises(ValueError, match="cpu or cuda"):
        tz.calibrate_planner("meta")
    with pytest.raises(TypeError, match="floating"):
        tz.calibrate_planner("cpu", torch.int64)


def test_no_measurement_while_compiling(monkeypatch):
    calls = _count_measurements(monkeypatch)
    monkeypatch.setenv("TENSORIZED_CALIBRATE", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tz.planner_machine("cpu") == _machine.FALLBACK_MACHINES["cpu"]
    assert calls == []


def test_microbenchmark_returns_sane_constants():
    # Figures are not checked (timing); only that the four constants come out finite,
    # positive and ordered as any machine's are (a large GEMM beats element-wise traffic
    # per byte read).
    m = _machine.measure_machine(torch.device("cpu"), torch.float32)
    fields = dataclasses.asdict(m)
    assert all(math.isfinite(v) and v > 0 for v in fields.values())
    assert m.call_overhead_s < 1e-2


def test_bad_machine_arguments_raise():
    with pytest.raises(ValueError, match="flops_per_s"):
        tz.Machine(0, 1, 1, 1)
    with pytest.raises(TypeError, match="call_overhead_s"):
        tz.Machine(1, 1, "fast", 1)
    with pytest.raises(TypeError, match=r"tensorized\.Machine"):
        tz.set_planner_machine({"flops_per_s": 1})
    with pytest.raises(TypeError, match="dtype"):
        tz.set_planner_machine(FAKE, "cpu", "float32")
