"""The demo: trains the digits MLP, compresses it, measures and writes the trade-off."""

import json
import math
import sys

import pytest
import torch

from tensorized import _demo as demo

pytest.importorskip("sklearn")

DENSE = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10  # the MLP's parameters
TARGETED = 64 * 256 + 256 * 256  # weights of the two hidden layers
KEPT = DENSE - TARGETED  # their biases and the head stay as they are


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    rows = demo.run_demo(out, quick=True, progress=lines.append)
    return rows, out, lines


def test_rows_cover_the_quick_grid(quick):
    rows, _, lines = quick
    assert (rows[0]["format"], rows[0]["variant"]) == ("dense", "uncompressed")
    grid = [
        (f, b, v) for f in demo.QUICK_FORMATS for b in demo.QUICK_BUDGETS for v in demo.VARIANTS
    ]
    assert [(r["format"], r["budget"], r["variant"]) for r in rows[1:]] == grid
    assert len(lines) == len(rows)  # one progress line per row


def test_parameter_counts_meet_the_budgets(quick):
    rows, _, _ = quick
    assert rows[0]["params"] == DENSE
    for r in rows[1:]:
        # The budget is a fraction of the targeted weights (resolve_rank: within 5%).
        assert (r["params"] - KEPT) / TARGETED == pytest.approx(r["budget"], rel=0.05)
        assert r["compression"] == pytest.approx(DENSE / r["params"])
        assert r["warnings"] == []


def test_accuracies(quick):
    rows, _, _ = quick
    base = rows[0]["accuracy"]
    assert base >= 0.95  # the digits MLP trains well
    n_test = 1797 // 4
    for r in rows:
        assert math.isclose(r["accuracy"] * n_test, round(r["accuracy"] * n_test), abs_tol=1e-3)
    # The least aggressive budget stays within 2 points of the uncompressed model once
    # calibrated or distilled.
    top = max(demo.QUICK_BUDGETS)
    for fmt in demo.QUICK_FORMATS:
        acc = {
            r["variant"]: r["accuracy"] for r in rows if (r["format"], r["budget"]) == (fmt, top)
        }
        assert acc["distilled"] >= base - 0.02, (fmt, acc, base)
        assert max(acc["calibrated"], acc["distilled"]) >= base - 0.02
        # Calibration recovers part of what plain decomposition loses at that budget.
        assert acc["calibrated"] >= acc["plain"]
    # Distillation recovers from the harshest budget.
    low = min(demo.QUICK_BUDGETS)
    for fmt in demo.QUICK_FORMATS:
        acc = {
            r["variant"]: r["accuracy"] for r in rows if (r["format"], r["budget"]) == (fmt, low)
        }
        assert acc["distilled"] > acc["plain"]


def test_baseline_accuracy_recomputed(quick):
    rows, _, _ = quick
    x_train, y_train, x_test, y_test = demo.load_data(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = demo.train(demo.make_mlp(seed=0), x_train, y_train, epochs=20, lr=2e-3, seed=0)
    with torch.no_grad():
        predicted = model(x_test).argmax(1)
    assert (predicted == y_test).double().mean().item() == pytest.approx(rows[0]["accuracy"])


def test_latency_is_measured(quick):
    rows, _, _ = quick
    # Speed targets live in benchmarks/; here: measured, finite, for both ways of serving.
    assert rows[0]["latency_ratio"] == rows[0]["merged_latency_ratio"] == 1.0
    for r in rows:
        assert 0 < r["latency_ms"] < 1e3
        assert 0 < r["latency_ratio"] < math.inf and 0 < r["merged_latency_ratio"] < math.inf
        assert r["seconds"] >= 0


def test_files_written(quick):
    rows, out, _ = quick
    assert json.loads((out / "results.json").read_text()) == rows
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == len(rows) + 2
    assert table[2].startswith("| dense | 1 | uncompressed | 85,002 | 1.0x |")
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = pytest.importorskip("matplotlib.image").imread(out / "tradeoff.png")
    assert image.shape[0] > 300 and image.shape[1] > 500


def test_load_data_is_a_split_of_the_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x_train, y_train, x_test, y_test = demo.load_data(0)
    assert x_train.shape == (1348, 64) and x_test.shape == (449, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    digits = datasets.load_digits()
    both = torch.cat([x_train, x_test]) * 16
    labels = torch.cat([y_train, y_test])
    # Every image appears once: same multiset of (image, label) rows as the data set.
    full = torch.cat([torch.as_tensor(digits.data), torch.as_tensor(digits.target)[:, None]], 1)
    ours = torch.cat([both.double(), labels[:, None].double()], 1)
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, full.double().tolist()))
    assert demo.load_data(0)[0].equal(x_train) and not demo.load_data(1)[0].equal(x_train)


def test_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    kwargs = dict(formats=["lowrank"], budgets=[0.25], epochs=3, repeats=1)
    first = demo.run_demo(None, **kwargs)
    assert torch.random.get_rng_state().equal(state)
    second = demo.run_demo(None, **kwargs)
    keys = ("format", "budget", "variant", "params", "accuracy")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]


def test_bad_budgets():
    with pytest.raises(ValueError, match=r"budgets must be fractions in \(0, 1\], got 1.5"):
        demo.run_demo(None, budgets=[0.5, 1.5])


def test_plot_skipped_without_matplotlib(quick, tmp_path, monkeypatch):
    rows, _, _ = quick
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    said: list[str] = []
    files = demo.write_outputs(rows, tmp_path, said.append)
    assert set(files) == {"markdown", "json"}
    assert not (tmp_path / "tradeoff.png").exists()
    assert said == ["matplotlib is not installed: skipping the plot (pip install matplotlib)"]
