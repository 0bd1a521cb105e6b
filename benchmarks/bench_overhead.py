"""Per-call Python overhead of FactorizedLinear.forward, and the memory a served model holds.

    python benchmarks/bench_overhead.py --quick                # about 20 s
    python benchmarks/bench_overhead.py --out /tmp/overhead.md
    python benchmarks/bench_overhead.py --compare-src /tmp/old/src   # old src vs this tree

Overhead, defined without reference to the library's internals: one eval forward at batch 1
under ``torch.no_grad()`` is recorded at the aten level (a ``TorchDispatchMode`` logs every
OpOverload with its args, kwargs and outputs), then replayed as straight-line code that calls
the same OpOverloads in order, feeding each op the outputs of earlier ops where the recorded
args were outputs of earlier ops (matched by tensor identity) and the recorded tensors
(parameters, cached operands, the input) otherwise. ``overhead = t(layer(x)) - t(replay)``:
what the module spends in Python (checks, planning look-ups, cache validation, reshapes
written in Python) on top of the kernels it launches. ``nn.Linear`` of the same dense shape is
measured the same way, in the same interleaved rounds, as the reference. Every callable is
timed in blocks, round-robin (the order rotates each round), single-threaded, with the garbage
collector off; the tables give medians over rounds, and differences and ratios are taken per
round before the median.

Memory: a model of several factorized layers per format runs a few eval forwards under
``torch.no_grad()`` at several batch sizes; then every tensor reachable from it is counted
(parameters, buffers, and any tensor in a module's ``__dict__``, recursively through dicts,
lists, tuples, sets and objects of tensorized's own classes; one count per storage) against
the bytes of its parameters and buffers, with ``len(pickle.dumps(model))`` and the
``torch.save`` size against those of a fresh, never-run model.

Only the public API is used (``FactorizedLinear(in_modes, out_modes, bias=True,
factorization=..., rank=..., n_layers=...)``, ``layer(x)``, ``.eval()``), plus
``layer.merge()`` where the layer has one: then every row is also measured merged.
``--compare-src PATH`` runs the whole measurement in subprocesses, alternately with ``PATH``
and with this tree's ``src`` first on ``PYTHONPATH``, and prints both side by side.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import io
import json
import keyword
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import tensorized as tz

FORMATS = ["cp", "tucker", "tt", "blocktt", "lowrank", "dense"]
MODES = {256: (4, 8, 8), 1024: (8, 8, 16)}
RANK = 0.1
MEMORY_BATCHES = [1, 32, 512]
THIS_SRC = Path(__file__).resolve().parents[1] / "src"

Step = Callable[[], object]


# ------------------------------------------------------------------ recording and replay


class Recorder(TorchDispatchMode):
    """Logs ``(func, args, kwargs, out)`` of every aten op run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def record(fn: Step) -> tuple[list[tuple[Any, tuple, dict, Any]], Any]:
    """The aten ops one call of ``fn`` runs, and its result."""
    with Recorder() as rec:
        result = fn()
    return rec.ops, result


def binding_for(func: Any, args: tuple, kwargs: dict) -> Callable[..., Any]:
    """The public binding (``torch.mm``, ``Tensor.view``, ...) that dispatches exactly
    ``func`` for these args, checked by running it once under a Recorder; ``func`` itself
    when there is none (or the op mutates its inputs or writes an ``out=``)."""
    name = func._schema.name.split("::")[-1]
    if func._schema.is_mutable or "out" in kwargs:
        return func
    for owner in (torch._C._VariableFunctions, torch.Tensor):
        candidate = getattr(owner, name, None)
        if candidate is None:
            continue
        try:
            with Recorder() as rec:
                candidate(*args, **kwargs)
        except Exception:
            continue
        if [op for op, *_ in rec.ops] == [func]:
            return candidate
    return func


def build_replay(
    ops: list[tuple[Any, tuple, dict, Any]],
    result: Any,
    callers: list[Callable[..., Any]] | None = None,
) -> Step:
    """Straight-line code calling the recorded OpOverloads in order; returns what ``fn`` did.

    An arg that is (or contains) a tensor some earlier op returned is replaced by that op's
    new output; every other arg is passed as recorded. The recorded tensors stay alive in
    ``ops`` while this runs, so ``id`` identifies them uniquely. ``callers[i]`` replaces
    op ``i``'s OpOverload (e.g. by its public binding, see :func:`binding_for`).
    """
    names: dict[str, object] = {}
    produced: dict[int, str] = {}  # id(tensor) -> expression of the replay's tensor

    def const(value: object) -> str:
        name = f"c{len(names)}"
        names[name] = value
        return name

    def has_produced(value: object) -> bool:
        if isinstance(value, Tensor):
            return id(value) in produced
        if isinstance(value, (list, tuple)):
            return any(has_produced(v) for v in value)
        return False

    def expr(value: object) -> str:
        if not has_produced(value):
            return const(value)
        if isinstance(value, Tensor):
            return produced[id(value)]
        assert isinstance(value, (list, tuple))
        items = ", ".join(expr(v) for v in value)
        if isinstance(value, tuple):
            return f"({items},)"
        return f"[{items}]"

    def register(value: object, path: str) -> None:
        if isinstance(value, Tensor):
            produced[id(value)] = path  # an in-place op's output: the newest name wins
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                register(v, f"{path}[{i}]")

    lines = ["def replay():"]
    for i, (func, args, kwargs, out) in enumerate(ops):
        cells = [expr(a) for a in args]
        odd = {}
        for key, value in kwargs.items():
            if key.isidentifier() and not keyword.iskeyword(key):
                cells.append(f"{key}={expr(value)}")
            else:
                odd[key] = value
        if odd:
            cells.append(f"**{const(odd)}")
        caller = func if callers is None else callers[i]
        lines.append(f"    o{i} = {const(caller)}({', '.join(cells)})")
        register(out, f"o{i}")
    lines.append(f"    return {expr(result)}")
    namespace: dict[str, Any] = dict(names)
    exec(compile("\n".join(lines), "<replay>", "exec"), namespace)
    return namespace["replay"]


def op_summary(ops: list[tuple[Any, tuple, dict, Any]]) -> str:
    """``'view x3, mm x2, add'``: op names (overload dropped) in order of first use."""
    counts = Counter(str(func).split(".")[1] for func, *_ in ops)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())


def same_result(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return False


# ------------------------------------------------------------------ timing


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def per_call(fn: Step, calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def time_rounds(
    groups: list[dict[str, Step]], rounds: int, block_s: float, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Seconds per call of each step, one sample per round, all steps interleaved.

    Each round times every step in a block of calls lasting about ``block_s``, after one
    untimed call (so every block starts from a warm cache). The steps of a group (a module
    and its replays) run in adjacent blocks, so that they see the same machine state; the
    order of the groups, and within each group, rotates every round. Runs with the garbage
    collector off. ``clock`` is ``time.thread_time`` (this thread's CPU time: time spent
    waiting for a core on a loaded machine is not counted; with one torch thread all the work
    runs on this thread) or ``time.perf_counter``.
    """
    steps = {n: f for g in groups for n, f in g.items()}
    for fn in steps.values():  # warm up
        for _ in range(3):
            fn()
    first = {n: min(per_call(f, 1, time.perf_counter) for _ in range(3)) for n, f in steps.items()}
    calls = {n: max(1, round(block_s / max(t, 1e-7))) for n, t in first.items()}
    samples: dict[str, list[float]] = {n: [] for n in steps}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for group in rotated(groups, r):
                for name in rotated(list(group), r):
                    steps[name]()
                    samples[name].append(per_call(steps[name], calls[name], clock))
    finally:
        if enabled:
            gc.enable()
    return samples


def rotated(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


def med(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------ overhead table


@dataclass(frozen=True)
class Case:
    fmt: str
    in_f: int
    out_f: int
    rank: float | str
    n_layers: int = 1
    index: int = 0  # the layer a joint (n_layers > 1) case calls

    @property
    def label(self) -> str:
        joint = f" n_layers={self.n_layers} [{self.index}]" if self.n_layers > 1 else ""
        return f"{self.fmt} {self.in_f}x{self.out_f} r={self.rank}{joint}"


def cases() -> list[Case]:
    sizes = [256, 1024]
    out = [Case(fmt, n, n, "same" if fmt == "dense" else RANK) for n in sizes for fmt in FORMATS]
    out.append(Case("tt", 1024, 1024, RANK, n_layers=3, index=1))
    return out


def build_layer(case: Case) -> nn.Module:
    torch.manual_seed(0)
    layer = tz.FactorizedLinear(
        MODES[case.in_f],
        MODES[case.out_f],
        bias=True,
        factorization=case.fmt,
        rank=case.rank,
        n_layers=case.n_layers,
    )
    return layer.eval()


def merge(layer: nn.Module) -> str:
    """Call ``layer.merge()``; '' on success, else why not."""
    fn = getattr(layer, "merge", None)
    if not callable(fn):
        return "no merge()"
    try:
        fn()
    except Exception as exc:
        return f"merge() fails: {type(exc).__name__}: {exc}"
    return ""


def forward_call(layer: nn.Module, case: Case, x: Tensor) -> Step:
    if case.n_layers > 1:
        return lambda: layer(x, case.index)
    return lambda: layer(x)


def measure_case(
    case: Case, rounds: int, block_s: float, clock: Callable[[], float]
) -> list[dict[str, Any]]:
    """One row per variant ('default', and 'merged' where the layer has merge())."""
    base = {
        "case": case.label,
        "fmt": case.fmt,
        "shape": f"{case.in_f}x{case.out_f}",
        "rank": str(case.rank),
        "n_layers": case.n_layers,
    }
    try:
        layer = build_layer(case)
    except Exception as exc:
        return [{**base, "variant": "default", "note": f"build fails: {exc}"}]
    variants: dict[str, nn.Module] = {"default": layer}
    merged = copy.deepcopy(layer)
    why = merge(merged)
    if not why:
        variants["merged"] = merged
    linear = nn.Linear(case.in_f, case.out_f).eval()
    x = torch.randn(1, case.in_f)
    groups: dict[str, dict[str, Step]] = {}
    info: dict[str, dict[str, Any]] = {}
    modules: dict[str, tuple[nn.Module, Step]] = {"linear": (linear, lambda: linear(x))}
    modules.update({n: (m, forward_call(m, case, x)) for n, m in variants.items()})
    with torch.no_grad():
        for name, (_, fn) in modules.items():
            try:
                for _ in range(3):  # plans and caches are built before the recorded call
                    fn()
                ops, out = record(fn)
                replay = build_replay(ops, out)
                bindings = [binding_for(f, a, k) for f, a, k, _ in ops]
                fast = build_replay(ops, out, bindings)
                ok = same_result(replay(), fn()) and same_result(fast(), fn())
            except Exception as exc:
                info[name] = {"note": f"fails: {type(exc).__name__}: {exc}"}
                continue
            groups[name] = {name: fn, f"{name}:replay": replay, f"{name}:bindings": fast}
            info[name] = {
                "ops": len(ops),
                "aten_calls": sum(b is f for b, (f, *_) in zip(bindings, ops)),
                "op_summary": op_summary(ops),
                "note": "" if ok else "replay result differs",
            }
            del ops, out
        if "linear" not in groups:
            return [{**base, "variant": "default", "note": info["linear"]["note"]}]
        samples = time_rounds(list(groups.values()), rounds, block_s, clock)

    def overhead(name: str, replay: str) -> float:
        t, rep = samples[name], samples[f"{name}:{replay}"]
        return med([a - b for a, b in zip(t, rep)]) * 1e6

    params = sum(p.numel() for p in layer.parameters())
    lin = samples["linear"]
    rows = []
    for name in variants:
        row = {**base, "variant": name, "params": params, **info[name]}
        if name in groups:
            t = samples[name]
            row.update(
                t_us=med(t) * 1e6,
                replay_us=med(samples[f"{name}:replay"]) * 1e6,
                overhead_us=overhead(name, "replay"),
                bindings_us=med(samples[f"{name}:bindings"]) * 1e6,
                overhead_bindings_us=overhead(name, "bindings"),
                lin_us=med(lin) * 1e6,
                lin_overhead_us=overhead("linear", "replay"),
                lin_overhead_bindings_us=overhead("linear", "bindings"),
                vs_linear=med([a / b for a, b in zip(t, lin)]),
            )
        rows.append(row)
    if why != "no merge()" and why:
        rows.append({**base, "variant": "merged", "note": why})
    return rows


def overhead_rows(rounds: int, block_s: float, clock: str) -> list[dict[str, Any]]:
    rows = []
    for case in cases():
        rows += measure_case(case, rounds, block_s, CLOCKS[clock])
        print(f"  {case.label}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------ memory table


def storage_key(t: Tensor) -> tuple[Any, int] | None:
    try:
        s = t.untyped_storage()
    except Exception:  # sparse and other storage-less tensors
        return None
    return (str(t.device), s.data_ptr()), s.nbytes()


def is_own_object(value: object) -> bool:
    """Objects whose attributes are searched for tensors: tensorized's own and dataclasses."""
    module = type(value).__module__ or ""
    return module.split(".")[0] == "tensorized" or dataclasses.is_dataclass(value)


def reachable_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, storage count) of every tensor reachable from ``model``, one count per
    storage: parameters, buffers, and tensors in module ``__dict__`` values, searched
    recursively through dicts, lists, tuples, sets and tensorized's own objects."""
    storages: dict[Any, int] = {}
    seen: set[int] = set()
    stack: list[object] = [model]
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            key = storage_key(value)
            if key is not None and key[1]:
                storages[key[0]] = key[1]
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack += list(value.keys()) + list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack += list(value)
        elif isinstance(value, nn.Module) or is_own_object(value):
            stack += list(getattr(value, "__dict__", {}).values())
            for slot in getattr(type(value), "__slots__", ()):
                if hasattr(value, slot):
                    stack.append(getattr(value, slot))
    return sum(storages.values()), len(storages)


def declared_bytes(model: nn.Module) -> int:
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        key = storage_key(t)
        if key is not None:
            storages[key[0]] = key[1]
    return sum(storages.values())


def pickled_sizes(model: nn.Module) -> tuple[int | str, int | str]:
    """``len(pickle.dumps(model))`` and the ``torch.save`` size (or why it fails)."""
    try:
        pickled: int | str = len(pickle.dumps(model))
    except Exception as exc:
        pickled = f"fails: {type(exc).__name__}"
    buf = io.BytesIO()
    try:
        torch.save(model, buf)
        saved: int | str = len(buf.getvalue())
    except Exception as exc:
        saved = f"fails: {type(exc).__name__}"
    return pickled, saved


def build_model(fmt: str) -> nn.Module:
    """Three 1024 -> 1024 factorized layers with ReLUs, in eval mode."""
    torch.manual_seed(0)
    rank = "same" if fmt == "dense" else RANK
    layers: list[nn.Module] = []
    for i in range(3):
        layers.append(tz.FactorizedLinear(MODES[1024], MODES[1024], factorization=fmt, rank=rank))
        if i < 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def memory_rows(batches: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for fmt in FORMATS:
        try:
            fresh = build_model(fmt)
        except Exception as exc:
            rows.append({"fmt": fmt, "variant": "default", "note": f"build fails: {exc}"})
            continue
        fresh_bytes, _ = reachable_bytes(fresh)
        fresh_pickle, fresh_save = pickled_sizes(fresh)
        variants = {"default": copy.deepcopy(fresh)}
        merged = copy.deepcopy(fresh)
        whys = {merge(m) for m in merged.modules() if isinstance(m, tz.FactorizedLinear)}
        if whys == {""}:
            variants["merged"] = merged
        elif whys != {"no merge()"}:
            rows.append({"fmt": fmt, "variant": "merged", "note": "; ".join(whys - {""})})
        for name, model in variants.items():
            with torch.no_grad():
                for batch in batches:
                    for _ in range(2):
                        model(torch.randn(batch, 1024))
            served, count = reachable_bytes(model)
            pickled, saved = pickled_sizes(model)
            rows.append(
                {
                    "fmt": fmt,
                    "variant": name,
                    "batches": batches,
                    "declared": declared_bytes(model),
                    "fresh": fresh_bytes,
                    "served": served,
                    "storages": count,
                    "pickle_fresh": fresh_pickle,
                    "pickle_served": pickled,
                    "save_fresh": fresh_save,
                    "save_served": saved,
                    "note": "",
                }
            )
        print(f"  memory {fmt}", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------ report


def cell(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def kib(value: Any) -> str:
    return cell(value / 1024 if isinstance(value, (int, float)) else value, ",.1f")


def table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]


def overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "format",
        "shape",
        "rank",
        "n_layers",
        "variant",
        "params",
        "aten ops",
        "t(layer) us",
        "t(replay) us",
        "overhead us",
        "t(bind replay) us",
        "overhead vs bind us",
        "nn.Linear us",
        "nn.Linear overhead us (aten / bind)",
        "t(layer)/t(nn.Linear)",
        "ops / note",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["fmt"],
                r["shape"],
                r["rank"],
                str(r["n_layers"]),
                r["variant"],
                cell(r.get("params"), ","),
                cell(r.get("ops"), "d"),
                cell(r.get("t_us")),
                cell(r.get("replay_us")),
                cell(r.get("overhead_us")),
                cell(r.get("bindings_us")),
                cell(r.get("overhead_bindings_us")),
                cell(r.get("lin_us")),
                f"{cell(r.get('lin_overhead_us'))} / {cell(r.get('lin_overhead_bindings_us'))}",
                cell(r.get("vs_linear"), ".2f"),
                "; ".join(s for s in (r.get("note", ""), r.get("op_summary", "")) if s),
            ]
        )
    return table(head, body)


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "format",
        "variant",
        "params+buffers KiB",
        "reachable fresh KiB",
        "reachable served KiB",
        "served/params",
        "storages",
        "pickle fresh KiB",
        "pickle served KiB",
        "torch.save fresh KiB",
        "torch.save served KiB",
        "note",
    ]
    body = []
    for r in rows:
        if "served" not in r:
            body.append([r["fmt"], r["variant"], *["-"] * (len(head) - 3), r["note"]])
            continue
        body.append(
            [
                r["fmt"],
                r["variant"],
                kib(r["declared"]),
                kib(r["fresh"]),
                kib(r["served"]),
                cell(r["served"] / r["declared"], ".2f"),
                str(r["storages"]),
                kib(r["pickle_fresh"]),
                kib(r["pickle_served"]),
                kib(r["save_fresh"]),
                kib(r["save_served"]),
                r["note"],
            ]
        )
    return table(head, body)


def machine_lines(args: argparse.Namespace) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), python {platform.python_version()}",
        f"- rounds {args.rounds}, block {args.block_ms} ms, clock {args.clock}; "
        f"date {time.strftime('%Y-%m-%dT%H:%M:%S')}",
    ]


LEGEND = """\
Batch 1, eval, `torch.no_grad()`. `aten ops`: ops the forward dispatches (views included; not
all are kernels). `t(replay)`: the same OpOverloads called directly in order on the same
tensors; `overhead = t(layer) - t(replay)`. Calling an OpOverload from Python costs about 1 us
more than the public binding that dispatches the same op (schema-driven argument parsing), so
that replay overstates the kernels' floor by about 1 us per op and the overhead can come out
negative for long op lists: `t(bind replay)` calls, for each op, the public binding
(`torch.mm`, `Tensor.view`, ...) checked to dispatch exactly that op with these args (the
OpOverload where there is none, e.g. `_unsafe_view`), and `overhead vs bind` is the layer
over that. Overheads and `t(layer)/t(nn.Linear)` (nn.Linear of the same dense shape, same
rounds) are taken per round, then the median over rounds. `merged`: after `layer.merge()`
(only where the method exists)."""

MEMORY_LEGEND = """\
Three 1024x1024 layers (rank 0.1; dense 'same') with ReLUs. `served`: after two eval forwards
under `torch.no_grad()` at each batch size; `fresh`: a never-run copy. `reachable`: every
storage reachable from the model (parameters, buffers, tensors held in module attributes),
counted once each."""


def single_report(data: dict[str, Any], args: argparse.Namespace) -> str:
    parts = [
        "# FactorizedLinear per-call overhead and served memory",
        "",
        f"- tensorized: `{data['source']}`",
        *machine_lines(args),
        "",
        LEGEND,
        "",
        *overhead_table(data["overhead"]),
        "",
        "## Memory of a served eval model",
        "",
        MEMORY_LEGEND,
        f"Batches: {args.memory_batches}.",
        "",
        *memory_table(data["memory"]),
        "",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------ side by side


def run_worker(src: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement in a subprocess with ``src`` first on PYTHONPATH."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--json",
            str(out),
            "--rounds",
            str(args.rounds),
            "--block-ms",
            str(args.block_ms),
            "--clock",
            args.clock,
        ]
        if args.quick:
            cmd.append("--quick")
        subprocess.run(cmd, env=env, check=True)
        data = json.loads(out.read_text())
    if not Path(data["source"]).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"the worker imported {data['source']}, not the package in {src}")
    return data


def ratio_cells(
    runs: dict[str, list[list[dict]]], key: str, variant: str, field: str
) -> list[float]:
    """``field`` of ``variant``'s row of case ``key``, one value per run that has it."""
    values = []
    for rows in runs[key]:
        value = next((r.get(field) for r in rows if r.get("variant") == variant), None)
        if value is not None:
            values.append(value)
    return values


def compare_report(
    runs: dict[str, list[dict[str, Any]]], sources: dict[str, str], args: argparse.Namespace
) -> str:
    """Side-by-side tables from alternating old / new runs (medians over runs; new/old is
    the median over rounds of the per-round quotient of the runs' t(layer)/t(nn.Linear))."""
    by_case: dict[str, dict[str, list[list[dict]]]] = {"old": {}, "new": {}}
    order: list[str] = []
    for side in ("old", "new"):
        for data in runs[side]:
            groups: dict[str, list[dict]] = {}
            for r in data["overhead"]:
                groups.setdefault(r["case"], []).append(r)
                if r["case"] not in order:
                    order.append(r["case"])
            for case, rows in groups.items():
                by_case[side].setdefault(case, []).append(rows)

    def get(side: str, case: str, variant: str, field: str) -> list[float]:
        return ratio_cells(by_case[side], case, variant, field) if case in by_case[side] else []

    def mid(values: list[float], spec: str = ".1f") -> str:
        return cell(med(values), spec) if values else "-"

    def quotient(case: str, variant: str) -> str:
        new = get("new", case, variant, "vs_linear")
        old = get("old", case, "default", "vs_linear")
        pairs = [a / b for a, b in zip(new, old)]
        return cell(med(pairs), ".2f") if pairs else "-"

    head = [
        "case",
        "aten ops old / new / merged",
        "t/lin old",
        "t/lin new",
        "t/lin merged",
        "new/old",
        "merged/old",
        "overhead us (aten / bind) old",
        "overhead us (aten / bind) new",
        "overhead us (aten / bind) merged",
        "nn.Linear overhead us (aten / bind) old; new",
    ]

    def both(case: str, side: str, variant: str, field: str = "overhead_us") -> str:
        bind = field.replace("_us", "_bindings_us")
        return f"{mid(get(side, case, variant, field))} / {mid(get(side, case, variant, bind))}"

    body = []
    for case in order:
        ops = [
            mid(get(s, case, v, "ops"), ".0f")
            for s, v in (("old", "default"), ("new", "default"), ("new", "merged"))
        ]
        body.append(
            [
                case,
                " / ".join(ops),
                mid(get("old", case, "default", "vs_linear"), ".2f"),
                mid(get("new", case, "default", "vs_linear"), ".2f"),
                mid(get("new", case, "merged", "vs_linear"), ".2f"),
                quotient(case, "default"),
                quotient(case, "merged"),
                both(case, "old", "default"),
                both(case, "new", "default"),
                both(case, "new", "merged"),
                f"{both(case, 'old', 'default', 'lin_overhead_us')}; "
                f"{both(case, 'new', 'default', 'lin_overhead_us')}",
            ]
        )
    mem_head = [
        "format",
        "variant",
        "params+buffers KiB old / new",
        "reachable served KiB old / new",
        "served/params old / new",
        "pickle served KiB old / new",
        "torch.save served KiB old / new",
    ]
    last = {
        side: {(r["fmt"], r["variant"]): r for r in runs[side][-1]["memory"]}
        for side in ("old", "new")
    }
    mem_body = []
    for key in dict.fromkeys([*last["old"], *last["new"]]):
        o, n = last["old"].get(key, {}), last["new"].get(key, {})

        def pair(field: str, o: dict = o, n: dict = n) -> str:
            return f"{kib(o.get(field))} / {kib(n.get(field))}"

        def share(r: dict) -> str:
            return cell(r["served"] / r["declared"], ".2f") if "served" in r else "-"

        mem_body.append(
            [
                *key,
                pair("declared"),
                pair("served"),
                f"{share(o)} / {share(n)}",
                pair("pickle_served"),
                pair("save_served"),
            ]
        )
    parts = [
        "# FactorizedLinear overhead and served memory: old vs new, side by side",
        "",
        f"- old: `{sources['old']}`",
        f"- new: `{sources['new']}`",
        *machine_lines(args),
        f"- {len(runs['new'])} alternating runs per side (ABBA order), each a full "
        "measurement in its own process",
        "",
        LEGEND,
        "",
        "`t/lin`: t(layer)/t(nn.Linear) in one run, median over runs; `new/old` and "
        "`merged/old`: median over rounds of new (merged) t/lin over old (default) t/lin of the "
        "same round. The old code cached rebuilt operands implicitly in eval, so `merged/old` "
        "compares like with like.",
        "",
        *table(head, body),
        "",
        "## Memory of a served eval model (last run of each side)",
        "",
        MEMORY_LEGEND,
        "",
        *table(mem_head, mem_body),
        "",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------ entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and memory batches")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 31; 11)")
    p.add_argument("--block-ms", type=float, default=None, help="ms per timed block (5; 2)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (default; robust to a loaded machine); "
        "wall: perf_counter",
    )
    p.add_argument(
        "--compare-src",
        type=Path,
        default=None,
        help="an old src directory: run both side by side in subprocesses",
    )
    p.add_argument(
        "--compare-runs",
        type=int,
        default=None,
        help="alternating runs per side with --compare-src (default 4; quick 2)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the raw rows as JSON")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (11 if args.quick else 31)
    args.block_ms = args.block_ms or (2.0 if args.quick else 5.0)
    args.compare_runs = args.compare_runs or (2 if args.quick else 4)
    args.memory_batches = MEMORY_BATCHES[:2] if args.quick else MEMORY_BATCHES
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")  # rank-budget warnings of the small shapes
    torch.set_num_threads(1)
    if args.compare_src is not None:
        sources = {"old": args.compare_src, "new": THIS_SRC}
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for i in range(args.compare_runs):
            for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                print(f"run {i + 1}/{args.compare_runs}: {side}", file=sys.stderr, flush=True)
                runs[side].append(run_worker(sources[side], args))
        text = compare_report(runs, {k: runs[k][0]["source"] for k in runs}, args)
    else:
        data = {
            "source": str(Path(tz.__file__).resolve().parent),
            "overhead": overhead_rows(args.rounds, args.block_ms / 1e3, args.clock),
            "memory": memory_rows(args.memory_batches),
        }
        if args.json is not None:
            args.json.write_text(json.dumps(data))
            return
        text = single_report(data, args)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
