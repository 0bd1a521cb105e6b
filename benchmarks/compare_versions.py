"""Old vs new source, side by side: bench_linear's ours / nn.Linear ratio for both.

    python benchmarks/compare_versions.py                     # bench_linear's --quick grid
    python benchmarks/compare_versions.py --old-src /tmp/old/src --runs 3 --out /tmp/cmp.md
    python benchmarks/compare_versions.py -- --formats cp,tt --batches 1,32  # bench_linear args

Each run measures the grid of ``bench_linear.py`` (by default its ``--quick`` grid: 1024x1024,
ratio 0.1, every format, batches 1 / 32 / 512, ``fwd`` and ``fwd+bwd``) in a subprocess with
one source first on ``PYTHONPATH``, using bench_linear's own functions (``parse_args``,
``make_step``, ``time_interleaved``: the same warm-up, blocks and medians), and records
ours / nn.Linear per point, both timed interleaved in that process. Runs alternate between the
old and the new source (ABBA order); the table gives each side's median ratio over its runs and
the median over rounds of new / old (the quotient of the two ratios of a round), with the
geomean of new / old and the rows over ``--flag`` (default 1.15) marked.

The old code cached rebuilt operands implicitly in eval; the new default does not (the user
opts in with ``layer.merge()``). So every eval (``fwd``) point also times a copy of the layer
on which ``merge()`` was called, where the method exists: ``merged/lin`` and ``merged/old``.

Differences from ``bench_linear.py`` itself: only ``implementation='auto'`` and nn.Linear are
timed (no fixed strategies, no tltorch, no torch.compile table), all groups run in one process
per run (no per-group process or address-space cap), on the CPU the timer reads this thread's
CPU time by default (``--clock wall``: bench_linear's ``perf_counter``; with one torch thread
all the work runs on this thread, and time spent waiting for a core on a loaded machine is then
not counted), and nothing of the library is used beyond
``tensorize_shape``, ``FactorizedLinear(...)`` and, where they exist, ``merge()`` and
``implementation_for()``, so that it runs against the old and the refactored source alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
OLD_COMMIT = "adbb0ea"
DEFAULT_OLD_TREE = Path("/tmp/old")


# ------------------------------------------------------------------ worker (one source)


def bench_config(bl: Any, args: argparse.Namespace) -> Any:
    """bench_linear's ``Config`` from its parsed args, as its ``main`` builds it."""
    return bl.Config(
        shapes=[(1024, 1024)] if args.quick else bl.parse_shapes(args.shapes),
        ratios=[float(r) for r in args.ratios.split(",")]
        if args.ratios
        else ([0.1] if args.quick else bl.FULL_RATIOS),
        batches=[int(b) for b in args.batches.split(",")] if args.batches else bl.BATCHES,
        budget_s=args.budget or (0.1 if args.quick else 0.3),
        device=torch.device(args.device),
        formats=[f.strip() for f in args.formats.split(",")],
        threads=args.threads,
        limit=args.limit,
    )


def merge(layer: nn.Module) -> str:
    """Call ``layer.merge()``; '' on success, else why not."""
    fn = getattr(layer, "merge", None)
    if not callable(fn):
        return "no merge()"
    try:
        fn()
    except Exception as exc:
        return f"merge() fails: {type(exc).__name__}: {exc}"
    if getattr(layer, "merged", True) is False:
        return "merge() left merged=False"
    return ""


def chosen(layer: nn.Module, batch: int, train: bool) -> str:
    """The strategy the layer reports for this batch and mode ('' if it cannot say)."""
    fn = getattr(layer, "implementation_for", None)
    if fn is None:
        return ""
    was = layer.training
    try:
        layer.train(train)
        with torch.set_grad_enabled(train):
            return str(fn(batch))
    except Exception:
        return ""
    finally:
        if was != layer.training:
            layer.train(was)


def seconds(t: Any) -> float | None:
    return t.seconds if t is not None and t.ok else None


def measure_group(bl: Any, cfg: Any, shape: tuple[int, int], fmt: str, ratio: float) -> list:
    """One row per (batch, mode) of a (shape, format, ratio) group."""
    import tensorized as tz

    in_f, out_f = shape
    base = {"shape": list(shape), "fmt": fmt, "ratio": ratio}
    points = [(b, m) for b in cfg.batches for m in bl.MODES]
    torch.manual_seed(0)
    try:
        in_modes, out_modes = tz.tensorize_shape(in_f, out_f, order=3)
        layer = tz.FactorizedLinear(
            in_modes, out_modes, factorization=fmt, rank=ratio, device=cfg.device
        )
    except ValueError as exc:
        why = bl.first_line(exc)
        return [{**base, "batch": b, "mode": m, "skipped": why} for b, m in points]
    merged = copy.deepcopy(layer)
    sync = bl.synchronizer(cfg.device)
    rows = []
    for batch, mode in points:
        train = mode == "fwd+bwd"
        x = torch.randn(batch, in_f, device=cfg.device)
        linear = nn.Linear(in_f, out_f, device=cfg.device)
        steps = {
            "linear": bl.make_step(linear, x, train),
            "ours": bl.make_step(layer, x, train),
        }
        merge_note = ""
        if not train:
            step = bl.make_step(merged, x, False)  # sets eval(); merge() after that
            merge_note = merge(merged)
            if not merge_note:
                steps["merged"] = step
        t = bl.time_interleaved(steps, cfg.budget_s, sync)
        notes = [f"{n}: {v.note}" for n, v in t.items() if v.note]
        if merge_note and merge_note != "no merge()":
            notes.append(merge_note)
        rows.append(
            {
                **base,
                "batch": batch,
                "mode": mode,
                "skipped": "",
                "linear_s": seconds(t["linear"]),
                "ours_s": seconds(t["ours"]),
                "merged_s": seconds(t.get("merged")),
                "chosen": chosen(layer, batch, train),
                "note": "; ".join(notes),
            }
        )
    return rows


def worker(out: Path, clock: str, bench_argv: list[str]) -> None:
    """Measure the grid with whatever ``tensorized`` imports (PYTHONPATH) and write JSON."""
    sys.path.insert(0, str(BENCHMARKS))
    import bench_linear as bl
    import tensorized as tz

    args = bl.parse_args(bench_argv)
    warnings.simplefilter("ignore", bl.RankBudgetWarning)
    torch.set_num_threads(args.threads)
    cfg = bench_config(bl, args)
    if clock == "cpu" and cfg.device.type == "cpu":
        # bench_linear's timer reads ``time.perf_counter`` through its module global ``time``;
        # rebinding that name in its namespace only makes it read this thread's CPU time.
        bl.time = types.SimpleNamespace(perf_counter=time.thread_time)  # type: ignore[assignment]
    else:
        clock = "wall"
    rows: list[dict[str, Any]] = []
    for shape in cfg.shapes:
        for fmt in cfg.formats:
            for ratio in cfg.ratios:
                if cfg.limit is not None and len(rows) >= cfg.limit:
                    break
                rows += measure_group(bl, cfg, shape, fmt, ratio)
                print(f"  {shape} {fmt} {ratio}", file=sys.stderr, flush=True)
    source = str(Path(tz.__file__).resolve().parent)
    data = {"source": source, "threads": args.threads, "clock": clock, "rows": rows}
    out.write_text(json.dumps(data))


# ------------------------------------------------------------------ parent


def ensure_old_tree(path: Path) -> None:
    """Create a git worktree of the pre-refactor commit at ``path`` if it is missing."""
    if (path / "src" / "tensorized").is_dir():
        return
    print(f"creating a worktree of {OLD_COMMIT} at {path}", file=sys.stderr)
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), OLD_COMMIT],
        check=True,
    )


def run_side(src: Path, clock: str, bench_argv: list[str]) -> dict[str, Any]:
    """One measurement of the grid in a subprocess with ``src`` first on PYTHONPATH."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)]
        cmd += ["--clock", clock, "--"]
        done = subprocess.run([*cmd, *bench_argv], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"worker with {src} failed ({done.returncode}):\n{done.stderr}")
        data = json.loads(out.read_text())
    if not Path(data["source"]).is_relative_to(src.resolve()):
        raise SystemExit(f"the worker imported {data['source']}, not the package in {src}")
    return data


def key(row: dict[str, Any]) -> tuple:
    return (tuple(row["shape"]), row["fmt"], row["ratio"], row["batch"], row["mode"])


def ratio(row: dict[str, Any], field: str) -> float | None:
    if row.get(field) is None or row.get("linear_s") is None:
        return None
    return row[field] / row["linear_s"]


def geomean(values: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def fx(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def med(values: list[float | None]) -> float | None:
    """The median of the values that exist."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def quotient(top: list[float | None], bottom: list[float | None]) -> float | None:
    """The median over rounds of ``top[i] / bottom[i]``."""
    return med([a / b if a is not None and b else None for a, b in zip(top, bottom)])


def summarize(runs: dict[str, list[dict[str, Any]]], flag: float) -> dict[str, Any]:
    """Per grid point: medians over runs and over rounds (see the module docstring)."""
    per_side = {side: [{key(r): r for r in data["rows"]} for data in runs[side]] for side in runs}
    order = list(dict.fromkeys(key(r) for data in runs["new"] + runs["old"] for r in data["rows"]))
    rows = []
    for k in order:
        old_rows = [d.get(k, {}) for d in per_side["old"]]
        new_rows = [d.get(k, {}) for d in per_side["new"]]
        old = [ratio(r, "ours_s") for r in old_rows]
        new = [ratio(r, "ours_s") for r in new_rows]
        merged = [ratio(r, "merged_s") for r in new_rows]

        row: dict[str, Any] = {
            "key": k,
            "old": med(old),
            "new": med(new),
            "merged": med(merged),
            "new/old": quotient(new, old),
            "merged/old": quotient(merged, old),
            "chosen": f"{old_rows[-1].get('chosen') or '-'} / {new_rows[-1].get('chosen') or '-'}",
            "skipped": new_rows[-1].get("skipped") or old_rows[-1].get("skipped") or "",
            "note": "; ".join(
                dict.fromkeys(r.get("note", "") for r in old_rows + new_rows if r.get("note"))
            ),
        }
        row["flags"] = [
            name for name in ("new/old", "merged/old") if row[name] is not None and row[name] > flag
        ]
        rows.append(row)
    return {"rows": rows}


def report(
    summary: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    bench_argv: list[str],
    flag: float,
    wall_s: float,
) -> str:
    rows = summary["rows"]
    head = [
        "shape",
        "format",
        "ratio",
        "batch",
        "mode",
        "strategy old / new",
        "old ours/lin",
        "new ours/lin",
        "new/old",
        "new merged/lin",
        "merged/old",
        "flag",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        (i, o), fmt, rat, batch, mode = r["key"]
        cells = [f"{i}x{o}", fmt, str(rat), str(batch), mode]
        if r["skipped"]:
            cells += ["skipped: " + r["skipped"]] + [""] * (len(head) - 6)
        else:
            cells += [
                r["chosen"],
                fx(r["old"]),
                fx(r["new"]),
                fx(r["new/old"]),
                fx(r["merged"]),
                fx(r["merged/old"]),
                ", ".join(f"**{f} > {flag}**" for f in r["flags"]),
                r["note"].replace("|", "/"),
            ]
        lines.append("| " + " | ".join(cells) + " |")

    def gm(name: str, keep: Any) -> str:
        values = [r[name] for r in rows if r[name] is not None and keep(r)]
        g = geomean(values)
        return f"{fx(g)} over {len(values)} points" if g is not None else "n/a"

    fwd = lambda r: r["key"][4] == "fwd"  # noqa: E731
    flagged = [r for r in rows if r["flags"]]
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        "# FactorizedLinear: old vs new source, ours/nn.Linear side by side",
        "",
        f"- old: `{runs['old'][0]['source']}`",
        f"- new: `{runs['new'][0]['source']}`",
        f"- machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{runs['new'][0]['threads']} thread(s), clock {runs['new'][0]['clock']}, "
        f"python {platform.python_version()}",
        f"- bench_linear args: `{' '.join(bench_argv)}`; {len(runs['new'])} runs per side, "
        f"alternating (ABBA); wall time {wall_s:.0f} s; "
        f"date {time.strftime('%Y-%m-%dT%H:%M:%S')}",
        "",
        "`ours/lin`: our layer ('auto') over nn.Linear, both timed interleaved in one run "
        "(bench_linear's `time_interleaved`), median over runs. `new/old`: median over rounds "
        "of the round's new ratio over its old ratio. `merged`: the new layer after "
        "`merge()` (eval rows only; the old code cached in eval implicitly, so `merged/old` "
        "compares like with like). `strategy`: the default layer's `implementation_for(batch)`, "
        "where it exists (a merged layer runs the strategy `merge()` kept).",
        "",
        *lines,
        "",
        f"- geomean new/old, all points: {gm('new/old', lambda r: True)}",
        f"- geomean new/old, fwd: {gm('new/old', fwd)}; fwd+bwd: "
        f"{gm('new/old', lambda r: not fwd(r))}",
        f"- geomean merged/old, fwd: {gm('merged/old', fwd)}",
        f"- flagged (> {flag}): {len(flagged)}"
        + (
            ": " + "; ".join(f"{label(r)} ({', '.join(r['flags'])})" for r in flagged)
            if flagged
            else ""
        ),
        "",
    ]
    return "\n".join(parts)


def label(r: dict[str, Any]) -> str:
    (i, o), fmt, rat, batch, mode = r["key"]
    return f"{i}x{o} {fmt} r{rat} b{batch} {mode}"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    bench_argv: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, bench_argv = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--old-src",
        type=Path,
        default=None,
        help=f"the old src directory (default {DEFAULT_OLD_TREE}/src, a git worktree of "
        f"{OLD_COMMIT} created there if missing)",
    )
    p.add_argument("--new-src", type=Path, default=REPO / "src", help="default: this tree's src")
    p.add_argument("--runs", type=int, default=5, help="runs per side, alternating (default 5)")
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu (default): bench_linear's timer reads this thread's CPU time, so time spent "
        "waiting for a core on a loaded machine is not counted (CPU device only); wall: "
        "perf_counter, as bench_linear itself",
    )
    p.add_argument("--flag", type=float, default=1.15, help="mark new/old above this")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args, bench_argv or ["--quick"]


def main(argv: list[str] | None = None) -> None:
    args, bench_argv = parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.clock, bench_argv)
        return
    if args.old_src is None:
        ensure_old_tree(DEFAULT_OLD_TREE)
        args.old_src = DEFAULT_OLD_TREE / "src"
    sources = {"old": args.old_src, "new": args.new_src}
    for side, src in sources.items():
        if not (src / "tensorized").is_dir():
            raise SystemExit(f"--{side}-src {src} has no tensorized package")
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for i in range(args.runs):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            print(f"run {i + 1}/{args.runs}: {side}", file=sys.stderr, flush=True)
            runs[side].append(run_side(sources[side], args.clock, bench_argv))
    text = report(
        summarize(runs, args.flag), runs, bench_argv, args.flag, time.perf_counter() - start
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
