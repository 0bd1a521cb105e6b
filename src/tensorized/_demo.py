"""``tensorized demo``: train a small MLP, compress it every way, and chart the trade-off.

The model is a 64-256-256-10 MLP trained on scikit-learn's handwritten digits
(``load_digits``: 1,797 8x8 images shipped with scikit-learn, no download), with a fixed,
seeded split. Its first two layers (97% of the weights) are compressed with
:func:`tensorized.tensorize_` in each format at several budgets, three ways:

* ``plain``: decomposition of the weights only;
* ``calibrated``: plus activation-aware calibration on batches of training inputs;
* ``distilled``: the calibrated model healed by :func:`tensorized.distill_` from the
  uncompressed model on the training inputs (no labels): the full pipeline.

Each row gives the parameters, the compression of the whole model, the test accuracy and
the inference latency of a batch of 256 (median of timed passes, interleaved with the
uncompressed model so that both see the same machine load), as built (every call rebuilds
what its strategy needs from the factors) and merged (``FactorizedLinear.merge``: the
rebuilt operands kept, more memory).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._config import TensorizeConfig
from ._distill import distill_
from ._linear import FactorizedLinear
from ._tensorize import tensorize_

__all__ = [
    "BUDGETS",
    "FORMATS",
    "QUICK_BUDGETS",
    "QUICK_FORMATS",
    "VARIANTS",
    "accuracy",
    "format_rows",
    "load_data",
    "make_mlp",
    "run_demo",
    "train",
    "write_outputs",
    "write_plot",
]

FORMATS = ("tucker", "tt", "blocktt", "cp", "lowrank")
BUDGETS = (0.5, 0.25, 0.1)
QUICK_FORMATS = ("tucker", "blocktt")
QUICK_BUDGETS = (0.5, 0.1)
VARIANTS = ("plain", "calibrated", "distilled")
TARGETS = ("0", "2")  # 64 -> 256 and 256 -> 256; the 10-way head stays dense
LATENCY_BATCH = 256
# CP-ALS at half the parameters has ranks in the hundreds (R^3 solves per iteration): a few
# iterations from the SVD start get most of the way; calibration and distillation do the rest.
DECOMPOSITION_KWARGS = {"cp": {"n_iter_max": 10}}


def load_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits, split 75/25 (seeded) and scaled to ``[0, 1]``.

    Args:
        seed: seed of the random train/test split.

    Returns:
        ``x_train (1348, 64)``, ``y_train (1348,)``, ``x_test (449, 64)``, ``y_test (449,)``;
        float32 inputs and int64 labels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the demo needs scikit-learn (digits data): pip install scikit-learn"
        ) from exc

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 4
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_mlp(hidden: int = 256, seed: int = 0) -> nn.Sequential:
    """The demo's ``64 -> hidden -> hidden -> 10`` ReLU MLP (float32, seeded init)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
    finally:
        torch.random.set_rng_state(gen_state)


def train(
    model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, seed: int
) -> nn.Module:
    """Train ``model`` in place: Adam on the cross-entropy, mini-batches of 64 in a seeded order.

    Args:
        model: maps ``(n, 64)`` inputs to ``(n, 10)`` logits.
        x: ``(n, 64)`` inputs.
        y: ``(n,)`` labels.
        epochs: passes over the data.
        lr: Adam's learning rate.
        seed: seed of the batch order.

    Returns:
        ``model``, in eval mode.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x (n, 64)`` whose arg-max logit is the label ``y (n,)``."""
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _merge_all(model: nn.Module, merge: bool) -> None:
    """Merge (keep the rebuilt operands of) or unmerge every factorized layer of ``model``."""
    for m in model.modules():
        if isinstance(m, FactorizedLinear) and merge:
            m.merge()
        elif isinstance(m, FactorizedLinear):
            m.unmerge()


@torch.no_grad()
def _latency(
    model: nn.Module, reference: nn.Module, x: Tensor, repeats: int
) -> tuple[float, float]:
    """Median seconds of one forward pass of ``model`` and of ``reference`` on ``x``.

    The two are timed alternately, so that both see the same machine load.
    """
    for _ in range(3):  # warm-up: plans, caches of rebuilt weights, allocator
        model(x)
        reference(x)
    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        for m, times in ((model, mine), (reference, theirs)):
            start = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - start)
    return statistics.median(mine), statistics.median(theirs)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(
    out_dir: str | Path | None = "tensorized-demo",
    *,
    seed: int = 0,
    quick: bool = False,
    formats: Sequence[str] | None = None,
    budgets: Sequence[float] | None = None,
    epochs: int = 20,
    distill_epochs: int = 2,
    repeats: int = 15,
    progress: Callable[[str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train the MLP, compress it in every format, budget and variant, and measure each.

    The global torch RNG is left as it was (the run uses its own seeded state).

    Args:
        out_dir: where ``results.md``, ``results.json`` and ``tradeoff.png`` are written
            (created if needed); ``None`` writes nothing.
        seed: seed of the split, the initialization, the training order and the decompositions.
        quick: the reduced grid (:data:`QUICK_FORMATS` x :data:`QUICK_BUDGETS`) for a fast check.
        formats: formats to run; default :data:`FORMATS` (or the quick ones).
        budgets: fractions of the hidden layers' weight parameters to keep; default
            :data:`BUDGETS` (or the quick ones).
        epochs: training epochs of the uncompressed model.
        distill_epochs: epochs of the distilled variant (``distill_``'s default step).
        repeats: timed forward passes per model (the median is reported).
        progress: called with a line of text after each row (e.g. ``print``); ``None``: silent.

    Returns:
        One dict per row, the uncompressed baseline first, with keys ``format``, ``budget``,
        ``variant``, ``params`` (the whole model's), ``compression`` (baseline params /
        params), ``accuracy`` (test, in [0, 1]), ``latency_ms`` (median per batch of 256),
        ``latency_ratio`` (latency / the baseline's measured alongside),
        ``merged_latency_ratio`` (the same with every factorized layer merged), ``seconds`` (time to
        compress, calibrate and distill) and ``warnings``.
    """
    formats = tuple(formats or (QUICK_FORMATS if quick else FORMATS))
    budgets = tuple(budgets or (QUICK_BUDGETS if quick else BUDGETS))
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, float | int) or not 0 < b <= 1:
            raise ValueError(f"budgets must be fractions in (0, 1], got {b!r} in {budgets!r}")
    say = progress or (lambda line: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rows = _run(formats, budgets, seed, epochs, distill_epochs, repeats, say)
    if out_dir is not None:
        write_outputs(rows, out_dir, say)
    return rows


def _run(
    formats: Sequence[str],
    budgets: Sequence[float],
    seed: int,
    epochs: int,
    distill_epochs: int,
    repeats: int,
    say: Callable[[str], Any],
) -> list[dict[str, Any]]:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_data(seed)
    base = train(make_mlp(seed=seed), x_train, y_train, epochs=epochs, lr=2e-3, seed=seed)
    base_params = _params(base)
    x_lat = x_test[:LATENCY_BATCH]
    calibration = list(x_train.split(256))
    lat, _ = _latency(base, base, x_lat, repeats)
    rows: list[dict[str, Any]] = [
        {
            "format": "dense",
            "budget": 1.0,
            "variant": "uncompressed",
            "params": base_params,
            "compression": 1.0,
            "accuracy": accuracy(base, x_test, y_test),
            "latency_ms": 1e3 * lat,
            "latency_ratio": 1.0,
            "merged_latency_ratio": 1.0,
            "seconds": time.perf_counter() - start,
            "warnings": [],
        }
    ]
    say(_line(rows[0]))
    for fmt in formats:
        for budget in budgets:
            config = TensorizeConfig(
                factorization=fmt,
                rank=float(budget),
                target_modules=list(TARGETS),
                decomposition_kwargs=DECOMPOSITION_KWARGS.get(fmt, {}),
                progress=False,
            )
            calibrated = base
            for variant in VARIANTS:
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if variant == "distilled":  # continues from the calibrated model
                        model = copy.deepcopy(calibrated)
                        inputs = list(x_train.split(64))  # unlabeled: the teacher's outputs
                        distill_(model, base, inputs, epochs=distill_epochs, progress=False)
                    else:
                        model = copy.deepcopy(base)
                        data = calibration if variant == "calibrated" else None
                        tensorize_(model, config, calibration_data=data)
                        calibrated = model
                seconds = time.perf_counter() - t0
                if variant == "distilled":
                    seconds += rows[-1]["seconds"]
                mine, theirs = _latency(model, base, x_lat, repeats)
                _merge_all(model, True)
                merged, theirs_merged = _latency(model, base, x_lat, repeats)
                _merge_all(model, False)
                params = _params(model)
                rows.append(
                    {
                        "format": fmt,
                        "budget": float(budget),
                        "variant": variant,
                        "params": params,
                        "compression": base_params / params,
                        "accuracy": accuracy(model, x_test, y_test),
                        "latency_ms": 1e3 * mine,
                        "latency_ratio": mine / theirs,
                        "merged_latency_ratio": merged / theirs_merged,
                        "seconds": seconds,
                        "warnings": sorted({str(w.message) for w in caught}),
                    }
                )
                say(_line(rows[-1]))
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['format']:>8} {row['budget']:>5.2f} {row['variant']:>12}: "
        f"{row['params']:>7,} params ({row['compression']:.1f}x), "
        f"accuracy {100 * row['accuracy']:.1f}%, {row['latency_ms']:.3f} ms/batch "
        f"({row['latency_ratio']:.2f}x dense, merged {row['merged_latency_ratio']:.2f}x), "
        f"{row['seconds']:.2f}s"
    )


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's rows as a markdown table."""
    head = [
        "format",
        "budget",
        "variant",
        "params",
        "compression",
        "test acc %",
        "ms / batch 256",
        "vs dense",
        "merged vs dense",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["format"],
            f"{r['budget']:g}",
            r["variant"],
            f"{r['params']:,}",
            f"{r['compression']:.1f}x",
            f"{100 * r['accuracy']:.1f}",
            f"{r['latency_ms']:.3f}",
            f"{r['latency_ratio']:.2f}x",
            f"{r['merged_latency_ratio']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, say: Callable[[str], Any] | None = None
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and (with matplotlib) ``tradeoff.png``.

    Args:
        rows: :func:`run_demo`'s rows, the baseline first.
        out_dir: the folder (created if needed).
        say: receives a line when the plot is skipped.

    Returns:
        ``name -> path`` of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "results.md", "json": out / "results.json"}
    files["markdown"].write_text(format_rows(rows) + "\n")
    files["json"].write_text(json.dumps(list(rows), indent=2) + "\n")
    plot = out / "tradeoff.png"
    if write_plot(rows, plot, say):
        files["plot"] = plot
    return files


def write_plot(
    rows: Sequence[dict[str, Any]], path: str | Path, say: Callable[[str], Any] | None = None
) -> bool:
    """Test accuracy against parameters (log scale), one line per format and variant, in
    full and zoomed on the top 10 points.

    Returns:
        Whether the PNG was written (``False`` when matplotlib is not installed).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        if say is not None:
            say("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    base = rows[0]
    top = 100 * base["accuracy"]
    # Left: every point; right: the same, zoomed on the last few points of accuracy.
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = dict(zip(FORMATS, ("C0", "C1", "C2", "C3", "C4")))
    styles = {"plain": ":", "calibrated": "--", "distilled": "-"}
    for ax in axes:
        for fmt in dict.fromkeys(r["format"] for r in rows[1:]):
            for variant in VARIANTS:
                sel = sorted(
                    (r for r in rows[1:] if r["format"] == fmt and r["variant"] == variant),
                    key=lambda r: r["params"],
                )
                if sel:
                    ax.plot(
                        [r["params"] for r in sel],
                        [100 * r["accuracy"] for r in sel],
                        styles[variant],
                        marker="o",
                        color=colors.get(fmt),
                        label=f"{fmt} {variant}",
                    )
        ax.axhline(top, color="black", lw=0.8)
        ax.plot([base["params"]], [top], "k*", ms=12, label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (whole model, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    low = min(100 * r["accuracy"] for r in rows)
    axes[0].set_ylim(max(0.0, math.floor(low) - 2), 100.5)
    axes[0].set_title("digits MLP: test accuracy vs parameters")
    axes[1].set_ylim(max(0.0, top - 10), min(100.5, top + 2))
    axes[1].set_title("zoom: within 10 points of the uncompressed model")
    axes[0].legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
