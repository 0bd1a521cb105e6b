"""FactorizedEmbedding lookups: ours against nn.Embedding and tltorch.FactorizedEmbedding.

    python benchmarks/bench_embedding.py --quick      # 30522 x 384 only, few rounds
    python benchmarks/bench_embedding.py --out benchmarks/EMBEDDING.md

Every grid point (table x parameter ratio x format x index distribution x index batch x mode)
times, interleaved in the same rounds, ``nn.Embedding`` of the table's shape, our
``FactorizedEmbedding`` (``implementation='auto'``) and, for the formats tltorch has
(``blocktt``, ``cp``, ``tucker``), ``tltorch.FactorizedEmbedding`` with the same tensorized
shape and the same concrete ranks (so both hold exactly the same factor shapes; tltorch is
given our padded row count, since it cannot pad a vocabulary that factors badly). ``fwd``
runs in eval mode under ``torch.no_grad()``; ``fwd+bwd`` runs in train mode and takes
``torch.autograd.grad(module(x).sum(), parameters)``. One torch thread; the clock is this
thread's CPU time by default (``--clock wall`` for ``perf_counter``).

Each point also records the peak bytes of the tensors a lookup creates (a
``TorchDispatchMode`` tracks every tensor produced by a non-view, non-mutating aten op until
it is freed), and our planned FLOPs (``FORMATS[name].row_work(signature, n_distinct)``,
the matrix products of prepare and apply), against which our time is set. A last table
looks up the same ranks in tables of 30522, 122088 and 10^6 rows: the lookup memory must
not grow with the row count.

Each (table, ratio, format) group runs in its own spawned process under an address-space cap
(tltorch's Tucker indexing has been reported to ask for hundreds of GB), and is killed after
a wall-clock limit, so that no point can crash or hang the run; what did not run is reported.
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import queue
import re
import resource
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tensorized as tz
from tensorized import RankBudgetWarning
from tensorized.formats import FORMATS as FORMAT_CLASSES

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
import bench_linear as bl  # noqa: E402  (the house helpers: Timing, verdict, machine lines)
from bench_overhead import CLOCKS, rotated  # noqa: E402

tltorch = bl.tltorch

TABLES = [(30522, 384), (122088, 384), (1_000_000, 64)]
RATIOS = [0.1, 0.01]
FORMATS = ["blocktt", "tt", "tucker", "cp", "lowrank"]
TLTORCH_FORMATS = ("blocktt", "tucker", "cp")  # tltorch's TensorizedTensor has no tt, lowrank
BATCHES = [(32, 64), (1, 1)]
MODES = ["fwd", "fwd+bwd"]
DISTS = ["uniform", "zipf"]
ZIPF_S = 1.0  # P(id = k) proportional to 1 / (k + 1)^s
SEED = 0
ROWCOUNT_TABLES = [30522, 122088, 1_000_000]  # the memory-independence check, dim 384
ROWCOUNT_DIM = 384

SLOW_S = 2.0  # a call slower than this is timed once (after the probing call)
SKIP_S = 8.0  # a first call slower than this is reported alone; fwd+bwd is then not run
REWARM_S = 0.01  # calls faster than this get an untimed call before each timed block
MIN_ROUNDS = 3

Step = Callable[[], object]


# ------------------------------------------------------------------ memory


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages created while active and still alive.

    A storage counts from the op that creates it (any op that is not a view, does not
    mutate its inputs and does not return one of its inputs' storages) until the last tensor
    this mode saw on it is freed (views seen later keep it alive). Parameters, inputs and
    anything allocated before the mode started never count; temporaries inside one kernel
    (never returned to the dispatcher) are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nbytes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.nbytes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0:
                continue
            if key in self.refs:
                self.refs[key] += 1
            else:
                if func.is_view or func._schema.is_mutable:
                    continue
                if inputs is None:
                    inputs = {
                        a.untyped_storage().data_ptr()
                        for a in tree_leaves((args, kwargs))
                        if isinstance(a, Tensor)
                    }
                if key in inputs:
                    continue
                self.nbytes[key], self.refs[key] = size, 1
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def peak_bytes(step: Step) -> int:
    """Peak bytes of the tensors one call of ``step`` creates (its result included)."""
    with PeakBytes() as mode:
        step()
    return mode.peak


# ------------------------------------------------------------------ timing


def once(fn: Step, clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def per_call(fn: Step, calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


@dataclass
class Timed:
    """Timings of one point's callables: per-round samples, or one slow call, or why not."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    rounds: int = 0

    def timing(self, name: str) -> bl.Timing | None:
        if name in self.samples:
            s = self.samples[name]
            note = self.notes.get(name, "")
            return bl.Timing(statistics.median(s), len(s), note)
        if name in self.notes:
            return bl.Timing(None, 0, self.notes[name])
        return None

    def ratio(self, a: str, b: str) -> float | None:
        """Median over rounds of ``a``'s time over ``b``'s in the same round (a single slow
        call: its time stands for every round)."""
        sa, sb = self.samples.get(a), self.samples.get(b)
        if not sa or not sb:
            return None
        if len(sa) == len(sb):
            return statistics.median(x / y for x, y in zip(sa, sb))
        return statistics.median(sa) / statistics.median(sb)


def time_point(
    steps: dict[str, Step],
    rounds: int,
    block_s: float,
    budget_s: float,
    clock: Callable[[], float],
) -> Timed:
    """Time every step, interleaved: each round runs each step's block once, in an order that
    rotates every round (ABAB...). A block is as many calls as last about ``block_s``; the
    rounds stop at ``rounds`` or when the blocks have spent about ``budget_s`` (but at least
    ``MIN_ROUNDS``). A step that raises is reported as failing; one slower than ``SLOW_S``
    is timed once after its probing call (a probe slower than ``SKIP_S`` stands alone)."""
    out = Timed()
    fast: dict[str, float] = {}
    for name, fn in steps.items():
        try:
            first = once(fn, time.perf_counter)
            if first > SKIP_S:
                out.samples[name] = [first]
                out.notes[name] = f"1 cold call ({first:.0f} s)"
                continue
            if first > SLOW_S:
                out.samples[name] = [once(fn, clock)]
                out.notes[name] = "1 call"
                continue
            fast[name] = min(once(fn, time.perf_counter) for _ in range(2))
        except Exception as exc:  # a failure is a result, never a crash
            out.notes[name] = f"fails: {bl.first_line(exc)}"
    calls = {n: max(1, round(block_s / max(t, 1e-7))) for n, t in fast.items()}
    round_s = sum(calls[n] * fast[n] for n in fast)
    out.rounds = min(rounds, max(MIN_ROUNDS, int(budget_s / max(round_s, 1e-9)))) if fast else 0
    for name in fast:
        out.samples[name] = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(out.rounds):
            for name in rotated(list(fast), r):
                if fast[name] < REWARM_S:  # start from the caches this callable leaves
                    steps[name]()
                out.samples[name].append(per_call(steps[name], calls[name], clock))
    finally:
        if enabled:
            gc.enable()
    return out


# ------------------------------------------------------------------ modules and steps


def make_step(module: nn.Module, x: Tensor, train: bool) -> Step:
    """One lookup (eval, no grad) or lookup + backward of its sum (train)."""
    if not train:
        module.eval()

        def forward() -> object:
            with torch.no_grad():
                return module(x)

        return forward
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]

    def forward_backward() -> object:
        return torch.autograd.grad(module(x).sum(), params)

    return forward_backward


def tltorch_rank(ours: tz.FactorizedEmbedding) -> Any:
    """The rank argument that gives tltorch exactly our factor shapes."""
    if ours.factorization == "blocktt":
        return (1, *ours.rank, 1)  # tltorch's TT-matrix ranks include the boundary 1s
    return ours.rank  # cp: int; tucker: one rank per mode of (*row modes, *column modes)


def build_tltorch(ours: tz.FactorizedEmbedding) -> nn.Module | str:
    """tltorch's table with our tensorized shape and ranks, or why there is none."""
    if tltorch is None:
        return "n/a: tltorch not installed"
    if ours.factorization not in TLTORCH_FORMATS:
        return f"n/a: tltorch has no {ours.factorization!r} embedding"
    rows, cols = ours.tensorized_shape
    try:
        return tltorch.FactorizedEmbedding(
            math.prod(rows),
            ours.embedding_dim,
            auto_tensorize=False,
            tensorized_num_embeddings=rows,
            tensorized_embedding_dim=cols,
            factorization=ours.factorization,
            rank=tltorch_rank(ours),
        )
    except Exception as exc:
        return f"fails: {bl.first_line(exc)}"


def indices(num: int, shape: tuple[int, ...], dist: str) -> Tensor:
    """Row indices of ``shape`` in ``[0, num)``: uniform, or Zipf-like (id ``k`` drawn with
    probability proportional to ``1 / (k + 1)^ZIPF_S``), from a fixed seed."""
    g = torch.Generator().manual_seed(SEED)
    if dist == "uniform":
        return torch.randint(0, num, shape, generator=g)
    weights = torch.arange(1, num + 1, dtype=torch.float64).pow(-ZIPF_S)
    return torch.multinomial(weights, math.prod(shape), replacement=True, generator=g).view(shape)


def plan_flops(ours: tz.FactorizedEmbedding, strategy: str, n: int) -> int:
    """Forward FLOPs of our lookup of ``n`` distinct rows: the rows path's products
    (``row_work``), or, when the table is rebuilt, the reconstruction's products."""
    sig = ours.weight.signature
    if strategy == "rows":
        w = FORMAT_CLASSES[sig.name].row_work(sig, n)
    else:
        from tensorized._plan import work

        w = work(sig, "reconstructed", 0)
    return sum(2 * m * k * c * p for m, k, c, p in w.prepare + w.apply)


# ------------------------------------------------------------------ grid


@dataclass
class Row:
    """One grid point."""

    table: tuple[int, int]
    ratio: float
    fmt: str
    dist: str = ""
    batch: tuple[int, ...] = ()
    mode: str = ""
    skipped: str = ""
    rank: str = ""
    tl_rank: str = ""
    params: int = 0
    tl_params: int | None = None
    strategy: str = ""
    distinct: int = 0
    rounds: int = 0
    nn: bl.Timing | None = None
    ours: bl.Timing | None = None
    tl: bl.Timing | None = None
    vs_nn: float | None = None
    vs_tl: float | None = None
    flops: int = 0
    peak: dict[str, int | str] = field(default_factory=dict)

    @property
    def train(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def label(self) -> str:
        n, d = self.table
        where = f" {self.dist} {'x'.join(map(str, self.batch))} {self.mode}" if self.mode else ""
        return f"{n}x{d} {self.fmt} r{self.ratio}{where}"


@dataclass
class RowCount:
    """One line of the memory-independence table."""

    fmt: str
    ratio: float
    rows: int
    rank: str = ""
    strategy: str = ""
    distinct: int = 0
    fwd: int | None = None
    fwd_bwd: int | None = None
    grads: int = 0  # bytes of the parameter gradients (dense: the parameters' size)
    note: str = ""

    @property
    def beyond_grads(self) -> int | None:
        return None if self.fwd_bwd is None else self.fwd_bwd - self.grads


@dataclass
class Config:
    tables: list[tuple[int, int]]
    ratios: list[float]
    formats: list[str]
    batches: list[tuple[int, ...]]
    dists: list[str]
    rounds: int
    block_s: float
    budget_s: float
    clock: str
    memory_cap_gb: float | None
    group_timeout_s: float
    rowcount: bool


def measure_point(
    row: Row,
    ours: tz.FactorizedEmbedding,
    tl: nn.Module | str,
    table: nn.Embedding,
    cfg: Config,
    too_slow: dict[str, str],
) -> None:
    """Fill ``row`` with interleaved timings, the plan's FLOPs and the peak bytes."""
    x = indices(row.table[0], row.batch, row.dist)
    row.distinct = len(torch.unique(x))
    row.strategy = ours.lookup_strategy(row.distinct, training=row.train)
    row.flops = plan_flops(ours, row.strategy, row.distinct) * (3 if row.train else 1)
    modules: dict[str, nn.Module] = {"nn": table, "ours": ours}
    if not isinstance(tl, str):
        modules["tl"] = tl
    skip = {n: why for n, why in too_slow.items() if row.train and n in modules}
    steps = {n: make_step(m, x, row.train) for n, m in modules.items() if n not in skip}
    timed = time_point(steps, cfg.rounds, cfg.block_s, cfg.budget_s, CLOCKS[cfg.clock])
    timed.notes.update(skip)
    row.rounds = timed.rounds
    row.nn, row.ours = timed.timing("nn"), timed.timing("ours")
    row.tl = timed.timing("tl") if "tl" in modules else bl.Timing(None, 0, str(tl))
    row.vs_nn, row.vs_tl = timed.ratio("ours", "nn"), timed.ratio("ours", "tl")
    for name, step in steps.items():
        t = timed.timing(name)
        if not row.train and t is not None and t.ok and t.seconds > SKIP_S / 3:
            too_slow[name] = f"not run: fwd took {t.seconds:.1f} s"
        if t is None or not t.ok:
            row.peak[name] = "-"
        elif t.seconds > SKIP_S:
            row.peak[name] = "not measured (slow)"
        else:
            try:
                row.peak[name] = peak_bytes(step)
            except Exception as exc:
                row.peak[name] = f"fails: {bl.first_line(exc)}"


def group_rows(cfg: Config, table_shape: tuple[int, int], fmt: str, ratio: float):
    """Yield the rows of one (table, format, ratio) group."""
    num, dim = table_shape
    torch.manual_seed(SEED)
    try:
        ours = tz.FactorizedEmbedding(num, dim, factorization=fmt, rank=ratio)
    except ValueError as exc:
        yield Row(table_shape, ratio, fmt, skipped=bl.first_line(exc))
        return
    tl = build_tltorch(ours)
    table = nn.Embedding(num, dim)
    base = {
        "rank": str(ours.rank),
        "params": ours.num_params,
        "tl_rank": "" if isinstance(tl, str) else str(tltorch_rank(ours)),
        "tl_params": None if isinstance(tl, str) else sum(p.numel() for p in tl.parameters()),
    }
    too_slow: dict[str, str] = {}  # a callable whose forward was too slow skips fwd+bwd
    for dist in cfg.dists:
        for batch in cfg.batches:
            if dist != "uniform" and math.prod(batch) == 1:
                continue  # one index: the distribution does not matter
            for mode in MODES:
                row = Row(table_shape, ratio, fmt, dist, batch, mode, **base)
                measure_point(row, ours, tl, table, cfg, too_slow)
                yield row


def rowcount_rows(cfg: Config, fmt: str):
    """Yield the memory-independence lines of one format: the ranks of a 30522 x 384 table at
    each ratio, in tables of every row count of ``ROWCOUNT_TABLES``."""
    for ratio in cfg.ratios:
        try:
            ref = tz.FactorizedEmbedding(30522, ROWCOUNT_DIM, factorization=fmt, rank=ratio)
        except ValueError as exc:
            yield RowCount(fmt, ratio, 30522, note=bl.first_line(exc))
            continue
        for rows in ROWCOUNT_TABLES:
            line = RowCount(fmt, ratio, rows, rank=str(ref.rank))
            try:
                torch.manual_seed(SEED)
                emb = tz.FactorizedEmbedding(rows, ROWCOUNT_DIM, factorization=fmt, rank=ref.rank)
                x = indices(rows, BATCHES[0], "uniform")
                line.distinct = len(torch.unique(x))
                line.strategy = emb.lookup_strategy(line.distinct, training=False)
                line.fwd = peak_bytes(make_step(emb, x, False))
                line.fwd_bwd = peak_bytes(make_step(emb, x, True))
                line.grads = sum(p.numel() * p.element_size() for p in emb.parameters())
            except Exception as exc:
                line.note = f"fails: {bl.first_line(exc)}"
            yield line


def worker(cfg: Config, group: tuple, out: mp.Queue) -> None:
    """Process entry point: measure one group, send each row, then ``None``."""
    warnings.simplefilter("ignore", RankBudgetWarning)
    torch.set_num_threads(1)
    if cfg.memory_cap_gb:
        # An allocation over the cap raises (reported as 'fails') instead of waking the
        # kernel's OOM killer.
        cap = int(cfg.memory_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rows = rowcount_rows(cfg, group[1]) if group[0] == "rowcount" else group_rows(cfg, *group)
    for row in rows:
        out.put(row)
    out.put(None)


def run_group(cfg: Config, group: tuple):
    """Yield the rows of ``group`` measured in a spawned process; when the process dies or
    runs past ``cfg.group_timeout_s``, yield ``(None, reason)`` once and stop."""
    ctx = mp.get_context("spawn")  # fork deadlocks with OpenMP thread pools
    results: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(cfg, group, results))
    proc.start()
    deadline = time.perf_counter() + cfg.group_timeout_s
    try:
        while True:
            try:
                row = results.get(timeout=2)
            except queue.Empty:
                if time.perf_counter() > deadline:
                    yield None, f"killed after {cfg.group_timeout_s:.0f} s (group time limit)"
                    return
                if not proc.is_alive():
                    code = proc.exitcode
                    yield None, f"worker died (exit code {code}; -9: killed, e.g. out of memory)"
                    return
                continue
            if row is None:
                return
            yield row, ""
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def expected_points(cfg: Config) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (d, b, m)
        for d in cfg.dists
        for b in cfg.batches
        if d == "uniform" or math.prod(b) > 1
        for m in MODES
    ]


def run_grid(cfg: Config, start: float):
    """Yield every row of the grid, in order (a dead group's missing points as skipped)."""
    for table_shape in cfg.tables:
        for ratio in cfg.ratios:
            for fmt in cfg.formats:
                todo = expected_points(cfg)
                for row, why in run_group(cfg, (table_shape, fmt, ratio)):
                    if row is None:
                        for d, b, m in todo:
                            yield Row(table_shape, ratio, fmt, d, b, m, skipped=why)
                        break
                    if row.mode:
                        todo.remove((row.dist, row.batch, row.mode))
                    elapsed = time.perf_counter() - start
                    print(f"[{elapsed:6.0f}s] {row.label}", file=sys.stderr, flush=True)
                    yield row


def run_rowcount(cfg: Config, start: float) -> list[RowCount]:
    lines: list[RowCount] = []
    for fmt in cfg.formats:
        for line, why in run_group(cfg, ("rowcount", fmt)):
            if line is None:
                lines.append(RowCount(fmt, 0.0, 0, note=why))
                break
            lines.append(line)
            elapsed = time.perf_counter() - start
            print(
                f"[{elapsed:6.0f}s] memory check {fmt} r{line.ratio} rows={line.rows}",
                file=sys.stderr,
                flush=True,
            )
    return lines


# ------------------------------------------------------------------ report


def fmt_time(t: bl.Timing | None) -> str:
    """Microseconds, or why there is no time."""
    if t is None:
        return "-"
    if not t.ok:
        return t.note
    us = t.seconds * 1e6
    text = f"{us:,.0f}" if us >= 100 else f"{us:.1f}"
    return f"{text} ({t.note})" if t.note else text


def fmt_bytes(value: int | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            v = value / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    return f"{value} B"


def main_table(rows: list[Row], gemm: float) -> list[str]:
    head = [
        "table",
        "ratio",
        "format",
        "indices",
        "batch",
        "mode",
        "rank ours (tltorch)",
        "params ours / tltorch",
        "strategy",
        "distinct",
        "rounds",
        "nn.Embedding us",
        "ours us",
        "tltorch us",
        "ours/nn",
        "ours/tltorch",
        "plan MFLOP",
        "ours GFLOP/s",
        "ours/floor",
        "peak ours / nn / tltorch",
        "table MiB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n, d = r.table
        if r.skipped:
            batch = "x".join(map(str, r.batch)) or "-"
            cells = [f"{n}x{d}", str(r.ratio), r.fmt, r.dist or "-", batch, r.mode or "-"]
            cells.append(f"skipped: {r.skipped}")
            lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
            continue
        ok = r.ours is not None and r.ours.ok
        floor_s = r.flops / (gemm * 1e9)
        tl_params = "-" if r.tl_params is None else f"{r.tl_params:,}"
        tl_rank = f" ({r.tl_rank})" if r.tl_rank else ""
        cells = [
            f"{n}x{d}",
            str(r.ratio),
            r.fmt,
            r.dist,
            "x".join(map(str, r.batch)),
            r.mode,
            f"{r.rank}{tl_rank}",
            f"{r.params:,} / {tl_params}",
            r.strategy,
            str(r.distinct),
            str(r.rounds),
            fmt_time(r.nn),
            fmt_time(r.ours),
            fmt_time(r.tl),
            bl.fmt_x(r.vs_nn),
            bl.fmt_x(r.vs_tl),
            f"{r.flops / 1e6:.3g}",
            f"{r.flops / r.ours.seconds / 1e9:.1f}" if ok and r.flops else "-",
            f"{r.ours.seconds / floor_s:.1f}" if ok and r.flops else "-",
            " / ".join(fmt_bytes(r.peak.get(k)) for k in ("ours", "nn", "tl")),
            f"{n * d * 4 / 2**20:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rowcount_table(lines: list[RowCount]) -> list[str]:
    out = [
        "| format | ratio of 30522x384 | ranks | rows | table MiB (dense) | strategy | distinct "
        "| peak fwd | peak fwd+bwd | param grads | fwd+bwd - grads | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in lines:
        dense = f"{c.rows * ROWCOUNT_DIM * 4 / 2**20:,.0f}" if c.rows else "-"
        out.append(
            f"| {c.fmt} | {c.ratio} | {c.rank or '-'} | {c.rows or '-'} | {dense} "
            f"| {c.strategy or '-'} | {c.distinct or '-'} | {fmt_bytes(c.fwd)} "
            f"| {fmt_bytes(c.fwd_bwd)} | {fmt_bytes(c.grads or None)} "
            f"| {fmt_bytes(c.beyond_grads)} | {c.note} |"
        )
    return out


def measured(r: Row) -> bool:
    return not r.skipped


def targets(rows: list[Row], lines: list[RowCount]) -> list[str]:
    """One met / not met line per target of the issue."""
    vs_tl = [(r.vs_tl, r.label) for r in rows if measured(r) and r.vs_tl is not None]
    lookup = [
        (r.vs_nn, r.label)
        for r in rows
        if measured(r)
        and r.vs_nn is not None
        and r.ratio == 0.1
        and r.batch == (32, 64)
        and r.mode == "fwd"
    ]
    checks = [
        bl.verdict("1. ours/tltorch <= 0.2 at every point", vs_tl, 0.2, worst=5),
        bl.verdict("2. (32, 64) fwd lookup at ratio 0.1 <= 3x nn.Embedding", lookup, 3.0, worst=5),
    ]
    title = (
        f"3. lookup (fwd) peak memory independent of the row count: peak at "
        f"{ROWCOUNT_TABLES[-1]:,} rows over peak at {ROWCOUNT_TABLES[0]:,}, same ranks, <= 1.25"
    )
    checks.append(bl.verdict(title, growth(lines, "fwd"), 1.25, worst=5))
    text = [f"- {text}" for text, _ in checks]
    info = growth(lines, "beyond_grads")
    if info:
        worst = sorted(info, reverse=True)[:3]
        text.append(
            "- (information, no target) the same ratio for the fwd+bwd peak less the parameter "
            "gradients: " + "; ".join(f"{v:.2f} at {where}" for v, where in worst)
        )
    return text


def growth(lines: list[RowCount], attr: str) -> list[tuple[float, str]]:
    """Per (format, ratio): ``attr`` at the largest row count over it at the smallest."""
    out = []
    for key in dict.fromkeys((c.fmt, c.ratio) for c in lines if c.rows):
        group = [c for c in lines if (c.fmt, c.ratio) == key and c.rows]
        first, last = group[0], group[-1]
        a, b = getattr(last, attr), getattr(first, attr)
        if len(group) > 1 and a is not None and b:
            out.append((a / b, f"{key[0]} r{key[1]} {last.rows:,} vs {first.rows:,} rows"))
    return out


LEGEND = """\
Columns: `table` rows x embedding_dim; `ratio` the fraction of the dense table's parameters
asked for (`rank=ratio`); `indices` uniform (`torch.randint`) or zipf (id k with probability
proportional to 1/(k+1)^{zipf_s}, ids ordered by frequency), seed {seed}; `batch` the shape of
the index tensor; `fwd` is eval mode under `torch.no_grad()`, `fwd+bwd` train mode with
`torch.autograd.grad(out.sum(), parameters)` (no `.grad` accumulation; nn.Embedding's gradient
is dense, `sparse=False`). `rank ours (tltorch)` our concrete ranks (blocktt/tt: inner bond
ranks; tucker: one per mode, rows first; cp/lowrank: the rank) and the rank argument given
to tltorch, which gets our tensorized shape (rows padded to ours) and so exactly our factor
shapes; `params` the two parameter counts. `strategy` our lookup path ('rows': from the
factor slices, 'reconstructed': the table rebuilt, then gathered); `distinct` the distinct
indices of the batch (ours computes each once). `rounds` the interleaved timing rounds
(ABAB, order rotating each round; each round one block per callable of about {block_ms:g} ms of
calls; rounds stop at {rounds} or after about {budget_s:g} s of blocks, at least {min_rounds}).
Times are medians over rounds of the per-call {clock} time in microseconds; `(1 call)`: slower
than {slow_s:g} s, timed once after one untimed call; `(1 cold call)`: the first call alone took
more than {skip_s:g} s; `not run`: the forward took more than {skip3:g} s, so fwd+bwd was skipped;
`n/a`: tltorch has no such embedding. `ours/nn` and `ours/tltorch` the medians over rounds of
the per-round ratio (< 1: ours faster). `plan MFLOP` our planned FLOPs for the lookup: the sum
of 2*m*k*n*c over the prepare and apply products of `row_work(signature, distinct)` (of the
reconstruction when the strategy is 'reconstructed'; one chunk assumed), x3 for fwd+bwd (each
product's backward is two products of its size); `ours GFLOP/s` those FLOPs over our time;
`ours/floor` our time over the time those FLOPs take at the reference GEMM rate above (1: at
the floor). `peak` the peak bytes of the tensors one call creates and holds at once (a
TorchDispatchMode counts the storage of every tensor a non-view, non-mutating aten op returns,
until freed; the output and, for fwd+bwd, the gradients included; kernel-internal scratch not
seen), for ours / nn.Embedding / tltorch; `table MiB` the dense float32 table."""


def report(
    rows: list[Row],
    lines: list[RowCount] | None,
    cfg: Config,
    machine: list[str],
    gemm: float,
    wall_s: float,
) -> str:
    legend = LEGEND.format(
        zipf_s=ZIPF_S,
        seed=SEED,
        block_ms=cfg.block_s * 1e3,
        rounds=cfg.rounds,
        budget_s=cfg.budget_s,
        min_rounds=MIN_ROUNDS,
        clock="thread CPU (`time.thread_time`)" if cfg.clock == "cpu" else "wall (`perf_counter`)",
        slow_s=SLOW_S,
        skip_s=SKIP_S,
        skip3=SKIP_S / 3,
    )
    cap = f"{cfg.memory_cap_gb:g} GiB" if cfg.memory_cap_gb else "none"
    parts = [
        "# FactorizedEmbedding: ours vs nn.Embedding vs tltorch",
        "",
        *machine,
        f"- clock: {cfg.clock}; rounds: up to {cfg.rounds} per point (budget {cfg.budget_s:g} s, "
        f"blocks of {cfg.block_s * 1e3:g} ms); index distributions: {', '.join(cfg.dists)}",
        f"- each (table, ratio, format) group in its own process: address-space cap {cap}, "
        f"killed after {cfg.group_timeout_s:.0f} s",
        f"- wall time: {wall_s:.0f} s",
        "",
        legend,
        "",
        *main_table(rows, gemm),
        "",
    ]
    if lines is not None:
        parts += [
            "## Lookup memory vs the table's row count",
            "",
            f"The ranks ours picks for 30522 x {ROWCOUNT_DIM} at each ratio, kept fixed in tables "
            f"of {', '.join(f'{n:,}' for n in ROWCOUNT_TABLES)} rows (dim {ROWCOUNT_DIM}); one "
            "(32, 64) uniform lookup each; peak bytes as above. fwd+bwd includes the parameter "
            "gradients (dense, the parameters' size: at fixed ranks the row-mode factors still "
            "grow with the row modes, e.g. lowrank's U is rows x rank), shown apart.",
            "",
            *rowcount_table(lines),
            "",
        ]
    parts += ["## Targets", "", *targets(rows, lines or []), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------ entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="30522 x 384 only, fewer rounds")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--tables", default=None, help="comma-separated ROWSxDIM tables (the grid's)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    p.add_argument("--dists", default=None, help="index distributions (default uniform,zipf)")
    p.add_argument("--rounds", type=int, default=None, help="max rounds per point (15; 5)")
    p.add_argument("--block-ms", type=float, default=None, help="ms per timed block (20; 10)")
    p.add_argument("--budget", type=float, default=None, help="s of blocks per point (1.5; 0.5)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (default; robust to a loaded machine); "
        "wall: perf_counter",
    )
    p.add_argument(
        "--memory-cap-gb",
        type=float,
        default=12.0,
        help="address-space cap of each worker process (default 12; 0: none)",
    )
    p.add_argument(
        "--group-timeout", type=float, default=600.0, help="s per (table, ratio, format) group"
    )
    p.add_argument("--no-rowcount", action="store_true", help="skip the memory table")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 15)
    args.block_ms = args.block_ms or (10.0 if args.quick else 20.0)
    args.budget = args.budget or (0.5 if args.quick else 1.5)
    args.dists = args.dists or ("uniform" if args.quick else ",".join(DISTS))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore", RankBudgetWarning)
    torch.set_num_threads(1)
    cfg = Config(
        tables=bl.parse_shapes(args.tables) if args.tables else TABLES[: 1 if args.quick else 3],
        ratios=RATIOS,
        formats=[f.strip() for f in args.formats.split(",")],
        batches=BATCHES,
        dists=[d.strip() for d in args.dists.split(",")],
        rounds=args.rounds,
        block_s=args.block_ms / 1e3,
        budget_s=args.budget,
        clock=args.clock,
        memory_cap_gb=args.memory_cap_gb or None,
        group_timeout_s=args.group_timeout,
        rowcount=not args.no_rowcount,
    )
    start = time.perf_counter()
    machine = bl.machine_lines(torch.device("cpu"))
    rate = next(re.search(r"GEMM rate .*: ([0-9.]+) GFLOP/s", m) for m in machine if "GEMM" in m)
    gemm = float(rate.group(1))  # the reference GEMM rate of the header, GFLOP/s
    rows: list[Row] = []
    lines = run_rowcount(cfg, start) if cfg.rowcount else None

    def write() -> str:
        text = report(rows, lines, cfg, machine, gemm, time.perf_counter() - start)
        if args.out is not None:
            args.out.write_text(text)
        return text

    for row in run_grid(cfg, start):
        rows.append(row)
        write()  # an interrupted run still leaves the points measured so far
    print(write())
    if args.out is not None:
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
