"""FactorizedLinear speed: ours ('auto' and every fixed strategy) against nn.Linear and tltorch.

    python benchmarks/bench_linear.py --quick         # 1024 x 1024, ratio 0.1: under 2 minutes
    python benchmarks/bench_linear.py                 # the full grid (long)
    python benchmarks/bench_linear.py --threads 2 --device cuda --no-compile --out /tmp/r.md

Every grid point (shape x format x parameter ratio x batch x mode) times, interleaved in one
loop region, ``nn.Linear``, our layer with ``implementation='auto'``, our layer with each fixed
strategy, and ``tltorch.FactorizedLinear`` with both its implementations. ``fwd`` runs in eval
mode under ``torch.no_grad()``; ``fwd+bwd`` runs in train mode with an input that requires
grad and takes the gradients of ``output.sum()``. Each callable is warmed up (3 calls), then
timed in blocks until a time budget or 200 calls are spent; the median per-call time is
reported. A call slower than 2 s (in practice tltorch's) is timed once and marked; a call
that raises is reported as failing. A separate table times ``torch.compile(layer,
fullgraph=True)`` for each format, and the fwd+bwd rows at batch 512 carry the bytes saved
for backward (plus the output), ours over nn.Linear.

The markdown report (machine, command, tables, and a met / not met summary of the targets)
is printed and written to ``benchmarks/RESULTS.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import resource
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import tensorized as tz

try:
    from tensorized._plan import any_batch_strategy
except ImportError:  # the code before the modules became private (compare_versions.py)
    from tensorized.plan import any_batch_strategy  # type: ignore[no-redef]
from tensorized import RankBudgetWarning

try:
    import tltorch
except ImportError:  # a benchmark-only dependency
    tltorch = None

FORMATS = ["cp", "tucker", "blocktt", "tt"]
FULL_SHAPES = [(1024, 1024), (768, 3072), (4096, 4096)]
FULL_RATIOS = [0.02, 0.1, 0.5]
BATCHES = [1, 32, 512]
MODES = ["fwd", "fwd+bwd"]
TLTORCH_IMPLS = ["factorized", "reconstructed"]
COMPILE_CASE = ((1024, 1024), 0.1, 32)  # shape, ratio, batch of the torch.compile table

WARMUP_CALLS = 3
MAX_CALLS = 200
MIN_SAMPLES = 3
BLOCK_S = 1e-3  # calls faster than this are timed in blocks of several
REWARM_S = 1e-3  # calls faster than this get an untimed call before each block (warm caches)
SLOW_S = 2.0  # a call slower than this (in practice tltorch's) is timed once
TLTORCH_CP_RANK_LIMIT = 4096  # tltorch's CP at rank ~16k ran this 24 GB machine out of memory
MAX_FIXED_BYTES = 4e9  # fixed strategies whose plan moves more than this are not run

Step = Callable[[], object]


# ------------------------------------------------------------------ timing


@dataclass
class Timing:
    """Median seconds per call of one callable (``None`` when it failed)."""

    seconds: float | None
    calls: int = 0
    note: str = ""  # 'fails: ...' or 'single call'

    @property
    def ok(self) -> bool:
        return self.seconds is not None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, shortened for a table cell."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".replace("|", "/")
    return line if len(line) <= 90 else line[:87] + "..."


def user_frame(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame that a torch.compile error names, or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', str(exc))
    return f" ({Path(frames[-1][0]).name}:{frames[-1][1]})" if frames else ""


def timed(fn: Step, calls: int, sync: Callable[[], None]) -> float:
    """Seconds that ``calls`` back-to-back calls of ``fn`` take (device synchronized)."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return time.perf_counter() - start


def time_interleaved(
    steps: dict[str, Step], budget_s: float, sync: Callable[[], None], slow_s: float = SLOW_S
) -> dict[str, Timing]:
    """Time every callable in round-robin blocks so that noise hits them all alike.

    Each is warmed up, then timed in blocks of ``n`` calls (``n`` makes a block last about
    ``BLOCK_S``) until it has spent ``budget_s`` (and has ``MIN_SAMPLES`` blocks) or made
    ``MAX_CALLS`` calls. A callable whose first call raises is reported as failing; one whose
    first call takes longer than ``slow_s`` gets one more call, reported alone: the first call
    can be a cold one (our inference path builds its operand cache there), the second is the
    steady state.
    """
    results: dict[str, Timing] = {}
    state: dict[str, dict] = {}
    for name, fn in steps.items():
        try:
            first = timed(fn, 1, sync)
            if first > slow_s:
                results[name] = Timing(timed(fn, 1, sync), 1, "single call")
                continue
            per_call = min(timed(fn, 1, sync) for _ in range(WARMUP_CALLS - 1))
        except Exception as exc:  # report, never crash the run
            results[name] = Timing(None, 0, f"fails: {first_line(exc)}")
            continue
        block = max(1, min(MAX_CALLS // MIN_SAMPLES, int(BLOCK_S / max(per_call, 1e-9))))
        rewarm = per_call < REWARM_S
        state[name] = {"block": block, "samples": [], "spent": 0.0, "calls": 0, "rewarm": rewarm}
    while state:
        for name in list(state):
            s = state[name]
            if s["rewarm"]:  # undo the cache the previous callable left
                steps[name]()
            seconds = timed(steps[name], s["block"], sync)
            s["samples"].append(seconds / s["block"])
            s["spent"] += seconds
            s["calls"] += s["block"]
            enough = s["spent"] >= budget_s and len(s["samples"]) >= MIN_SAMPLES
            if enough or s["calls"] + s["block"] > MAX_CALLS:
                results[name] = Timing(statistics.median(s["samples"]), s["calls"])
                del state[name]
    return {name: results[name] for name in steps}


def make_step(module: nn.Module, x: Tensor, train: bool) -> Step:
    """One forward (eval, no grad) or forward+backward (train, input requires grad) call."""
    if not train:
        module.eval()

        def forward() -> object:
            with torch.no_grad():
                return module(x)

        return forward
    module.train()
    xg = x.detach().clone().requires_grad_(True)
    inputs = [xg, *(p for p in module.parameters() if p.requires_grad)]

    def forward_backward() -> object:
        return torch.autograd.grad(module(xg).sum(), inputs)

    return forward_backward


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes of the unique storages saved for backward by one train-mode forward, plus the
    output's."""
    module.train()
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x.detach().clone().requires_grad_(True))
    s = out.untyped_storage()
    storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def cuda_step_peak(step: Step, device: torch.device) -> int:
    """Bytes the CUDA allocator holds at its peak during one call of ``step``, above what it
    held before (parameters and input): activations, temporaries and gradients."""
    step()  # caches (plan, operand cache) are built outside the measured call
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ------------------------------------------------------------------ modules


def build_ours(
    shape: tuple[int, int], fmt: str, ratio: float, device: torch.device
) -> dict[str, nn.Module]:
    """Our layer as 'auto' and as each fixed strategy (same weights). Raises ValueError for a
    ratio the format cannot reach."""
    in_modes, out_modes = tz.tensorize_shape(*shape, order=3)
    auto = tz.FactorizedLinear(in_modes, out_modes, factorization=fmt, rank=ratio, device=device)
    layers: dict[str, nn.Module] = {"auto": auto}
    for strategy in auto.weight.strategy_names():
        fixed = copy.deepcopy(auto)
        fixed.implementation = strategy
        layers[strategy] = fixed
    return layers


def build_tltorch(
    shape: tuple[int, int], fmt: str, ratio: float, device: torch.device
) -> dict[str, nn.Module | str]:
    """tltorch's layer per implementation, or the reason it could not be built."""
    if tltorch is None:
        return {impl: "fails: tltorch not installed" for impl in TLTORCH_IMPLS}
    in_modes, out_modes = tz.tensorize_shape(*shape, order=3)
    layers: dict[str, nn.Module | str] = {}
    for impl in TLTORCH_IMPLS:
        try:
            layers[impl] = tltorch.FactorizedLinear(
                in_modes,
                out_modes,
                bias=True,
                factorization=fmt,
                rank=ratio,
                implementation=impl,
                device=device,
            )
        except Exception as exc:
            layers[impl] = f"fails: {first_line(exc)}"
    return layers


# ------------------------------------------------------------------ grid


@dataclass
class Row:
    """One grid point's measurements."""

    shape: tuple[int, int]
    fmt: str
    ratio: float
    batch: int | None = None
    mode: str = ""
    skipped: str = ""
    linear: Timing | None = None
    auto: Timing | None = None
    chosen: str = ""
    fixed: dict[str, Timing] = field(default_factory=dict)
    tl: dict[str, Timing] = field(default_factory=dict)
    plan_flops: int = 0  # of the chosen plan: forward, or forward + backward for fwd+bwd
    plan_fwd_flops: int = 0
    floor_flops: int = 0  # the cheapest strategy's (forward, + backward for fwd+bwd)
    mem_ratio: float | None = None
    peak_ratio: float | None = None  # CUDA only: allocator peak of one step, ours / nn.Linear

    @property
    def train(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def dense_fwd_flops(self) -> int:
        return 2 * (self.batch or 0) * self.shape[0] * self.shape[1]

    @property
    def floor_s(self) -> float | None:
        """The FLOP floor: the cheapest strategy's FLOPs at nn.Linear's measured FLOP rate
        for the same batch and mode."""
        if self.linear is None or not self.linear.ok or not self.floor_flops:
            return None
        dense = self.dense_fwd_flops * (3 if self.train else 1)
        return self.floor_flops * self.linear.seconds / dense

    @property
    def vs_floor(self) -> float | None:
        floor = self.floor_s
        if self.auto is None or not self.auto.ok or floor is None:
            return None
        return self.auto.seconds / floor

    @property
    def best_fixed(self) -> tuple[str, Timing] | None:
        ok = [(n, t) for n, t in self.fixed.items() if t.ok]
        return min(ok, key=lambda nt: nt[1].seconds) if ok else None

    @property
    def best_tl(self) -> tuple[str, Timing] | None:
        ok = [(n, t) for n, t in self.tl.items() if t.ok]
        return min(ok, key=lambda nt: nt[1].seconds) if ok else None

    def ratio_to(self, other: Timing | None) -> float | None:
        if self.auto is None or not self.auto.ok or other is None or not other.ok:
            return None
        return self.auto.seconds / other.seconds

    @property
    def vs_linear(self) -> float | None:
        return self.ratio_to(self.linear)

    @property
    def vs_tl(self) -> float | None:
        best = self.best_tl
        return self.ratio_to(best[1]) if best else None

    @property
    def vs_fixed(self) -> float | None:
        best = self.best_fixed
        return self.ratio_to(best[1]) if best else None

    @property
    def label(self) -> str:
        where = f" b{self.batch} {self.mode}" if self.batch else ""
        return f"{self.shape[0]}x{self.shape[1]} {self.fmt} r{self.ratio}{where}"


@dataclass
class Config:
    shapes: list[tuple[int, int]]
    ratios: list[float]
    batches: list[int]
    budget_s: float
    device: torch.device
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    threads: int = 1
    memory_cap_gb: float | None = None  # address-space cap of each CPU worker process
    limit: int | None = None


def measure_point(
    row: Row, ours: dict[str, nn.Module], tl: dict[str, nn.Module | str], cfg: Config
) -> None:
    """Fill ``row`` (batch and mode set) with interleaved timings of every module."""
    in_f, out_f = row.shape
    x = torch.randn(row.batch, in_f, device=cfg.device)
    linear = nn.Linear(in_f, out_f, device=cfg.device)
    plan = ours["auto"].plan(row.batch, training=row.train)
    # A fixed strategy far off the plan can need tens of GB (e.g. CP 'sequential' at a huge
    # rank and batch 512): those are reported, not run.
    too_big = {
        n: Timing(None, 0, f"not run: moves {plan.costs[n].bytes_moved / 1e9:.0f} GB")
        for n in ours
        if n != "auto" and plan.costs[n].bytes_moved > MAX_FIXED_BYTES
    }
    steps = {"linear": make_step(linear, x, row.train)}
    steps.update(
        {f"ours:{n}": make_step(m, x, row.train) for n, m in ours.items() if n not in too_big}
    )
    failed_tl = {n: Timing(None, 0, m) for n, m in tl.items() if isinstance(m, str)}
    steps.update(
        {f"tl:{n}": make_step(m, x, row.train) for n, m in tl.items() if not isinstance(m, str)}
    )
    timings = time_interleaved(steps, cfg.budget_s, synchronizer(cfg.device))
    row.linear = timings["linear"]
    row.auto = timings["ours:auto"]
    row.fixed = {n: too_big.get(n) or timings[f"ours:{n}"] for n in ours if n != "auto"}
    row.tl = {n: failed_tl.get(n) or timings[f"tl:{n}"] for n in tl}
    cost = plan.costs[plan.chosen]
    row.chosen = plan.chosen
    row.plan_fwd_flops = cost.forward_flops
    row.plan_flops = cost.forward_flops + (cost.backward_flops if row.train else 0)
    row.floor_flops = min(
        c.forward_flops + (c.backward_flops if row.train else 0) for c in plan.costs.values()
    )
    if row.train and row.batch == 512:
        row.mem_ratio = saved_bytes(ours["auto"], x) / saved_bytes(linear, x)
        if cfg.device.type == "cuda":
            row.peak_ratio = cuda_step_peak(steps["ours:auto"], cfg.device) / cuda_step_peak(
                steps["linear"], cfg.device
            )


def group_rows(cfg: Config, shape: tuple[int, int], fmt: str, ratio: float) -> Iterator[Row]:
    """Yield the measured (or skipped) rows of one (shape, format, ratio) group."""
    torch.manual_seed(0)
    try:
        ours = build_ours(shape, fmt, ratio, cfg.device)
    except ValueError as exc:
        yield Row(shape, fmt, ratio, skipped=first_line(exc))
        return
    rank = ours["auto"].rank
    if fmt == "cp" and rank > TLTORCH_CP_RANK_LIMIT:
        reason = f"not run: CP rank {rank} (a run at this size was killed for memory)"
        tl = dict.fromkeys(TLTORCH_IMPLS, reason)
    else:
        tl = build_tltorch(shape, fmt, ratio, cfg.device)
    for batch in cfg.batches:
        for mode in MODES:
            row = Row(shape, fmt, ratio, batch, mode)
            measure_point(row, ours, tl, cfg)
            yield row


def group_worker(cfg: Config, group: tuple, out: mp.Queue) -> None:
    """Process entry point: measure one group and send each row, then ``None``."""
    warnings.simplefilter("ignore", RankBudgetWarning)
    torch.set_num_threads(cfg.threads)
    if cfg.memory_cap_gb and cfg.device.type == "cpu":
        # An allocation over the cap raises (reported as 'fails') instead of waking the
        # kernel's OOM killer, which took the whole run down at 4096x4096 before.
        cap = int(cfg.memory_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for row in group_rows(cfg, *group):
        out.put(row)
    out.put(None)


def run_grid(cfg: Config) -> Iterator[Row]:
    """Yield one measured (or skipped) row per grid point, in order.

    Each (shape, format, ratio) group runs in its own spawned process, so one that dies (out
    of memory, a crash inside a peer library) costs only its own rows, reported as such.
    """
    ctx = mp.get_context("spawn")  # fork deadlocks with OpenMP thread pools
    done = 0
    for shape in cfg.shapes:
        for fmt in cfg.formats:
            for ratio in cfg.ratios:
                if cfg.limit is not None and done >= cfg.limit:
                    return
                results: mp.Queue = ctx.Queue()
                worker = ctx.Process(target=group_worker, args=(cfg, (shape, fmt, ratio), results))
                worker.start()
                expected = [(b, m) for b in cfg.batches for m in MODES]
                while True:
                    try:
                        row = results.get(timeout=5)
                    except queue.Empty:
                        if worker.is_alive():
                            continue
                        # died without its end marker: report the points it did not reach
                        reason = f"worker died (exit code {worker.exitcode}; -9: out of memory)"
                        for b, m in expected:
                            if cfg.limit is not None and done >= cfg.limit:
                                break
                            done += 1
                            yield Row(shape, fmt, ratio, b, m, skipped=reason)
                        break
                    if row is None:
                        break
                    if row.batch is not None:
                        expected.remove((row.batch, row.mode))
                    done += 1
                    yield row
                    if cfg.limit is not None and done >= cfg.limit:
                        worker.kill()
                        break
                worker.join()


# ------------------------------------------------------------------ torch.compile


@dataclass
class CompileRow:
    fmt: str
    mode: str
    compile_s: float | None = None
    linear: Timing | None = None
    eager: Timing | None = None
    compiled: Timing | None = None
    strategies: str = ""  # eager's choice at the batch / the compiled graph's (any batch)
    error: str = ""


def run_compile(cfg: Config) -> list[CompileRow]:
    """Time ``torch.compile(layer, fullgraph=True)`` once per format and mode."""
    (in_f, out_f), ratio, batch = COMPILE_CASE
    in_modes, out_modes = tz.tensorize_shape(in_f, out_f, order=3)
    sync = synchronizer(cfg.device)
    rows = []
    for fmt in FORMATS:
        for mode in MODES:
            row = CompileRow(fmt, mode)
            rows.append(row)
            torch.manual_seed(0)
            torch.compiler.reset()
            kw = {"factorization": fmt, "rank": ratio, "device": cfg.device}
            eager = tz.FactorizedLinear(in_modes, out_modes, **kw)
            compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
            x = torch.randn(batch, in_f, device=cfg.device)
            train = mode == "fwd+bwd"
            step = make_step(compiled, x, train)
            try:
                row.compile_s = timed(step, 1, sync)
            except Exception as exc:  # a failure to compile is a result, not a crash
                row.error = first_line(exc) + user_frame(exc)
                continue
            linear = nn.Linear(in_f, out_f, device=cfg.device)
            steps = {
                "linear": make_step(linear, x, train),
                "eager": make_step(eager, x, train),
                "compiled": step,
            }
            t = time_interleaved(steps, cfg.budget_s, sync)
            row.linear, row.eager, row.compiled = t["linear"], t["eager"], t["compiled"]
            eager.train(train)
            with torch.set_grad_enabled(train):
                chosen = eager.implementation_for(batch)
            graph = any_batch_strategy(
                eager.weight, training=True, dtype=x.dtype, device_type=x.device.type
            )
            row.strategies = f"{chosen} / {graph}"
    return rows


# ------------------------------------------------------------------ report


def fmt_us(t: Timing | None) -> str:
    """A time in microseconds, or the reason there is none."""
    if t is None:
        return "-"
    if not t.ok:
        return t.note
    us = t.seconds * 1e6
    text = f"{us:,.0f}" if us >= 100 else f"{us:.1f}"
    return text + (" (1 call)" if t.note else "")


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main_table(rows: list[Row]) -> list[str]:
    head = [
        "shape",
        "format",
        "ratio",
        "batch",
        "mode",
        "nn.Linear us",
        "auto us (chosen)",
        "best fixed us",
        "tltorch best us",
        "auto/lin",
        "auto/tlt",
        "auto/fixed",
        "plan MFLOP",
        "GFLOP/s",
        "lin GFLOP/s",
        "floor us",
        "auto/floor",
        "mem auto/lin",
        "peak auto/lin",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        if r.skipped:
            batch, mode = (str(r.batch), r.mode) if r.batch else ("-", "-")
            cells = [shape, r.fmt, str(r.ratio), batch, mode, f"skipped: {r.skipped}"]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
            continue
        fixed, tl = r.best_fixed, r.best_tl
        tl_cell = (
            f"{fmt_us(tl[1])} ({tl[0]})"
            if tl
            else "; ".join(dict.fromkeys(fmt_us(t) for t in r.tl.values()))
        )
        dense = r.dense_fwd_flops * (3 if r.train else 1)
        cells = [
            shape,
            r.fmt,
            str(r.ratio),
            str(r.batch),
            r.mode,
            fmt_us(r.linear),
            f"{fmt_us(r.auto)} ({r.chosen})",
            f"{fmt_us(fixed[1])} ({fixed[0]})" if fixed else "-",
            tl_cell,
            fmt_x(r.vs_linear),
            fmt_x(r.vs_tl),
            fmt_x(r.vs_fixed),
            f"{r.plan_flops / 1e6:.3g}",
            f"{r.plan_flops / r.auto.seconds / 1e9:.1f}" if r.auto.ok else "-",
            f"{dense / r.linear.seconds / 1e9:.1f}" if r.linear.ok else "-",
            f"{r.floor_s * 1e6:,.1f}" if r.floor_s is not None else "-",
            fmt_x(r.vs_floor),
            fmt_x(r.mem_ratio),
            fmt_x(r.peak_ratio),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def compile_table(rows: list[CompileRow]) -> list[str]:
    (in_f, out_f), ratio, batch = COMPILE_CASE
    lines = [
        f"`torch.compile(layer, fullgraph=True)`, {in_f}x{out_f}, ratio {ratio}, batch {batch}, "
        "implementation 'auto':",
        "",
        "| format | mode | strategy eager / compiled | first call s | nn.Linear us | eager us "
        "| compiled us | compiled/eager | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.fmt} | {r.mode} | - | - | - | - | - | - | fails: {r.error} |")
            continue
        speedup = r.compiled.seconds / r.eager.seconds if r.compiled.ok and r.eager.ok else None
        lines.append(
            f"| {r.fmt} | {r.mode} | {r.strategies} | {r.compile_s:.1f} | {fmt_us(r.linear)} "
            f"| {fmt_us(r.eager)} "
            f"| {fmt_us(r.compiled)} | {fmt_x(speedup)} | ok |"
        )
    return lines


def verdict(
    title: str, values: list[tuple[float, str]], limit: float, worst: int = 3
) -> tuple[str, bool | None]:
    """``title``: met when every value is within ``limit``; lists the worst offenders."""
    if not values:
        return f"{title}: n/a (no grid point applies)", None
    bad = sorted((v for v in values if v[0] > limit), reverse=True)
    if not bad:
        top = max(values)
        return f"{title}: **met** (worst {top[0]:.2f} at {top[1]})", True
    offenders = "; ".join(f"{v:.2f} at {where}" for v, where in bad[:worst])
    return f"{title}: **not met**, {len(bad)}/{len(values)} over (worst: {offenders})", False


def applies_everywhere(r: Row) -> bool:
    return True


def is_cheap_training(r: Row) -> bool:
    """Target 3's points: fwd+bwd at batch >= 32 with a plan of <= 25% of the dense FLOPs."""
    return r.train and r.batch >= 32 and r.plan_fwd_flops <= 0.25 * r.dense_fwd_flops


def is_batch1_forward(r: Row) -> bool:
    """Target 4's points: batch-1 forward, 1024x1024 at ratio 0.1."""
    return r.shape == (1024, 1024) and r.ratio == 0.1 and r.batch == 1 and r.mode == "fwd"


def collect(
    rows: list[Row], get: Callable[[Row], float | None], keep: Callable[[Row], bool]
) -> list[tuple[float, str]]:
    """``(value, label)`` of every measured row that ``keep`` selects and has a value."""
    values = [(get(r), r.label) for r in rows if not r.skipped and keep(r)]
    return [(v, label) for v, label in values if v is not None]


def summary(rows: list[Row], compile_rows: list[CompileRow] | None) -> list[str]:
    """One met / not met line per target."""
    vs_tl = collect(rows, lambda r: r.vs_tl, applies_everywhere)
    checks = [
        verdict(
            "1. auto <= 1.15x best fixed",
            collect(rows, lambda r: r.vs_fixed, applies_everywhere),
            1.15,
        ),
        verdict("2a. ours <= 0.5x tltorch (each point)", vs_tl, 0.5),
    ]
    title = "2b. geomean ours/tltorch <= 0.2"
    if vs_tl:
        gmean = math.exp(statistics.fmean(math.log(v) for v, _ in vs_tl))
        met = gmean <= 0.2
        state = "**met**" if met else "**not met**"
        checks.append((f"{title}: {state} ({gmean:.3f} over {len(vs_tl)} points)", met))
    else:
        checks.append((f"{title}: n/a (tltorch ran nowhere)", None))
    checks.append(
        verdict(
            "3. plan <= 25% dense FLOPs, fwd+bwd b>=32: < 0.7x nn.Linear",
            collect(rows, lambda r: r.vs_linear, is_cheap_training),
            0.7 - 1e-12,
        )
    )
    checks.append(
        verdict(
            "4. batch-1 fwd 1024x1024 r0.1 <= 2x nn.Linear",
            collect(rows, lambda r: r.vs_linear, is_batch1_forward),
            2.0,
        )
    )
    title = "5. torch.compile fullgraph for every format"
    if compile_rows is None:
        checks.append((f"{title}: n/a (--no-compile)", None))
    else:
        failures = [f"{r.fmt} {r.mode}: {r.error}" for r in compile_rows if r.error]
        state = f"**not met** ({'; '.join(failures)})" if failures else "**met**"
        checks.append((f"{title}: {state}", not failures))
    checks.append(
        verdict(
            "6. fwd+bwd b512 saved bytes auto/nn.Linear <= 1.25",
            collect(rows, lambda r: r.mem_ratio, applies_everywhere),
            1.25,
        )
    )
    peaks = collect(rows, lambda r: r.peak_ratio, applies_everywhere)
    if peaks:
        checks.append(
            verdict("6b. fwd+bwd b512 CUDA step peak auto/nn.Linear <= 1.25", peaks, 1.25)
        )
    checks += speed_targets(rows)
    counts = [sum(ok is value for _, ok in checks) for value in (True, False, None)]
    head = "Checks: {} met, {} not met, {} not applicable".format(*counts)
    return [head, ""] + [f"- {text}" for text, _ in checks]


def geomean_check(
    title: str, values: list[tuple[float, str]], limit: float
) -> tuple[str, bool | None]:
    """``title``: met when the geometric mean of ``values`` is within ``limit``."""
    if not values:
        return f"{title}: n/a (no grid point applies)", None
    gmean = math.exp(statistics.fmean(math.log(v) for v, _ in values))
    met = gmean <= limit
    state = "**met**" if met else "**not met**"
    worst = max(values)
    return (
        f"{title}: {state} ({gmean:.2f} over {len(values)} points; worst {worst[0]:.2f} at "
        f"{worst[1]})",
        met,
    )


def speed_targets(rows: list[Row]) -> list[tuple[str, bool | None]]:
    """The speed issue's targets: ours / floor per format, ours / tltorch on 1024x1024 at
    ratio 0.1."""
    checks = []
    for fmt in dict.fromkeys(r.fmt for r in rows):
        values = collect(rows, lambda r: r.vs_floor, lambda r, f=fmt: r.fmt == f)
        checks.append(geomean_check(f"7. {fmt}: geomean auto/floor <= 2", values, 2.0))

    def grid_10(r: Row) -> bool:
        return r.shape == (1024, 1024) and r.ratio == 0.1

    vs_tl = collect(rows, lambda r: r.vs_tl, grid_10)
    checks.append(verdict("8a. 1024x1024 r0.1: ours <= 0.5x tltorch (each point)", vs_tl, 0.5))
    checks.append(geomean_check("8b. 1024x1024 r0.1: geomean ours/tltorch <= 0.3", vs_tl, 0.3))
    return checks


def gemm_rate(device: torch.device, n: int = 1024) -> float:
    """GFLOP/s of an ``n x n`` float32 matmul, the machine's reference rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = time_interleaved({"mm": lambda: a @ b}, 0.2, synchronizer(device))["mm"]
    return 2 * n**3 / t.seconds / 1e9


def planner_source() -> str:
    """Where the planner's constants come from in this run."""
    if os.environ.get("TENSORIZED_CALIBRATE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "fallback, TENSORIZED_CALIBRATE=0"
    return "measured on this machine at the first plan, cached"


def machine_lines(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    tl = tltorch.__version__ if tltorch is not None else "not installed"
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores{gpu}, device {device}",
        f"- torch {torch.__version__}, tltorch {tl}, {torch.get_num_threads()} thread(s), "
        f"python {platform.python_version()}",
        f"- reference GEMM rate (float32 1024x1024 @ 1024x1024): {gemm_rate(device):.1f} GFLOP/s",
        f"- planner constants (float32; {planner_source()}): {tz.planner_machine(device.type)}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
    ]


LEGEND = """\
Times are medians per call in microseconds; `fwd` is eval mode under `torch.no_grad()`,
`fwd+bwd` is train mode with the gradients of `output.sum()` w.r.t. the input and the
parameters. `auto us (chosen)` is our layer with `implementation='auto'` and the strategy its
plan picks; `best fixed` is the fastest of our fixed strategies; `tltorch best` the faster of
tltorch's `factorized` and `reconstructed`. Ratios are auto's time over the other's (< 1: ours
is faster). `plan MFLOP` is the chosen plan's forward FLOPs (forward + backward for `fwd+bwd`),
`GFLOP/s` those FLOPs over auto's time, `lin GFLOP/s` nn.Linear's dense FLOPs over its time.
`floor us` is the FLOP floor: the cheapest of our strategies' planned FLOPs (forward +
backward for `fwd+bwd`) at nn.Linear's measured FLOP rate for the same batch and mode;
`auto/floor` auto's time over it (1: as fast per FLOP as nn.Linear).
`mem auto/lin` is, at batch 512 fwd+bwd, the bytes of the tensors saved for backward plus the
output, ours over nn.Linear; `peak auto/lin` (CUDA only) is the allocator's peak during one such
step above what it held before the step (parameters and input), ours over nn.Linear.
`(1 call)`: slower than 2 s, timed once after one untimed (cold) call. Each (shape, format,
ratio) group runs in its own process (CPU: with an address-space cap, so an allocation that does
not fit fails cleanly)."""


def report(
    rows: list[Row], compile_rows: list[CompileRow] | None, machine: list[str], wall_s: float
) -> str:
    parts = ["# FactorizedLinear: ours vs nn.Linear vs tltorch", "", *machine]
    parts += [f"- wall time: {wall_s:.0f} s", "", LEGEND, "", *main_table(rows), ""]
    if compile_rows is not None:
        parts += ["## torch.compile", "", *compile_table(compile_rows), ""]
    parts += ["## Targets", "", *summary(rows, compile_rows), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------ entry point


def parse_shapes(text: str | None) -> list[tuple[int, int]]:
    """``'1024x1024,768x3072'`` -> ``[(1024, 1024), (768, 3072)]``; None: the full grid."""
    if text is None:
        return FULL_SHAPES
    try:
        return [tuple(int(v) for v in item.split("x", 1)) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes must look like 1024x1024,768x3072, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1024x1024, ratio 0.1, short budgets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile table")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated INxOUT shapes of the full grid, e.g. 1024x1024,768x3072",
    )
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    p.add_argument("--ratios", default=None, help="comma-separated parameter ratios")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--budget", type=float, default=None, help="seconds per callable and point")
    p.add_argument(
        "--memory-cap-gb",
        type=float,
        default=16.0,
        help="address-space cap of each CPU worker (default 16 GB; 0: none)",
    )
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore", RankBudgetWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = Config(
        shapes=[(1024, 1024)] if args.quick else parse_shapes(args.shapes),
        ratios=[float(r) for r in args.ratios.split(",")]
        if args.ratios
        else ([0.1] if args.quick else FULL_RATIOS),
        batches=[int(b) for b in args.batches.split(",")] if args.batches else BATCHES,
        budget_s=args.budget or (0.1 if args.quick else 0.3),
        device=device,
        formats=[f.strip() for f in args.formats.split(",")],
        threads=args.threads,
        memory_cap_gb=args.memory_cap_gb or None,
        limit=args.limit,
    )
    start = time.perf_counter()
    machine = machine_lines(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # torch.compile first (short), then the grid; the report is rewritten after every row so
    # that an interrupted run still leaves the rows measured so far.
    compile_rows = None if args.no_compile else run_compile(cfg)
    rows = []
    for row in run_grid(cfg):
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.1f}s] {row.label}", file=sys.stderr, flush=True)
        args.out.write_text(report(rows, compile_rows, machine, time.perf_counter() - start))
    text = report(rows, compile_rows, machine, time.perf_counter() - start)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
