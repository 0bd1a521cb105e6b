"""all-MiniLM-L6-v2 compressed with its word embedding: the table joins the budget.

    python benchmarks/bench_minilm_tables.py --out benchmarks/COMPRESS_tables.md
    python benchmarks/bench_minilm_tables.py --quick          # a smoke test (prints only)

The model holds 11.7M of its 22.7M parameters in the 30522 x 384 word embedding, more than
its 36 encoder linear layers (10.6M weights). For each total ``T`` (a fraction of the linear
weights plus the word embedding), two variants of :func:`tensorized.tensorize_` with
``rank_allocation='budget'`` and ``factorization='auto'``:

- ``linears only``: the encoder's linear layers at the budget that gives the same total with
  the table kept dense, ``(T (L + E) - E) / L`` (impossible below ``E / (L + E) = 0.52``);
- ``linears + table``: the linear layers and the word embedding under one budget ``T``
  (``TensorizeConfig(embeddings=True)``: the table calibrated by the calibration text's token
  frequencies, the allocator weighing its frequency-weighted error with the layers' output
  errors).

Each is calibrated on the calibration sentences, then distilled (:func:`tensorized.distill_`,
which trains the tables' factors too) on the distillation sentences; scores on the held-out
sentences (``1 - cos`` of the sentence embeddings to the original's) and the Lee document
similarity correlation, with the disjoint splits of ``bench_compress.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tensorized as tz

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compress import (
    TARGET,
    Evaluator,
    batches,
    distill,
    eprint,
    load,
    sentence_splits,
    targeted_weights,
)

TABLE = "embeddings.word_embeddings"


def factorized_params(model: nn.Module) -> int:
    """Weights of the targeted modules as they are now (linear layers' weights, tables)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, tz.FactorizedLinear | tz.FactorizedEmbedding):
            total += m.weight.num_params
        elif (isinstance(m, nn.Linear) and name.startswith("encoder.")) or name == TABLE:
            total += m.weight.numel()
    return total


def summary(report: tz.TensorizeReport) -> str:
    """The table's format and rank, and the linear layers' formats."""
    table = [r for r in report if r.kind == "embedding"]
    formats: dict[str, int] = {}
    for r in report:
        if r.kind != "embedding":
            formats[r.factorization] = formats.get(r.factorization, 0) + 1
    layers = ", ".join(f"{k} x{v}" for k, v in sorted(formats.items()))
    if not table:
        return f"table dense; layers {layers}"
    t = table[0]
    return (
        f"table {t.factorization} rank {t.rank} ({t.new_params:,} params, padded +"
        f"{t.padded_rows}, weighted error {t.output_error_before:.3f} -> "
        f"{t.output_error_after:.3f}); layers {layers}"
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    original, tokenizer = load()
    for p in original.parameters():
        p.requires_grad_(False)
    splits = sentence_splits(args.calibration, args.distill_sentences, args.eval)
    cal = batches(tokenizer, splits["calibration"])
    dis = batches(tokenizer, splits["distillation"])
    evaluate = Evaluator(original, tokenizer, splits["evaluation"])
    L = targeted_weights(original)
    E = original.get_submodule(TABLE).weight.numel()
    rows: list[dict[str, Any]] = [
        {"total": 1.0, "variant": "original", "stage": "-", "params": L + E, **evaluate(original)}
    ]
    for total in args.totals:
        budget_linear = (total * (L + E) - E) / L
        variants = [
            ("linears only", TARGET, False, budget_linear),
            ("linears + table", rf"{TARGET}|{TABLE}", True, total),
        ]
        for variant, target, tables, budget in variants:
            if not 0 < budget <= 1:
                rows.append(
                    {
                        "total": total,
                        "variant": variant,
                        "stage": "-",
                        "note": f"impossible: the linear layers would need budget {budget:.3f}",
                    }
                )
                continue
            eprint(f"T={total}: {variant} (budget {budget:.3f}) ...")
            config = tz.TensorizeConfig(
                factorization="auto",
                rank=round(budget, 6),
                rank_allocation="budget",
                target_modules=target,
                embeddings=tables,
                calibration_steps=args.steps,
                progress=False,
            )
            torch.manual_seed(0)
            small = copy.deepcopy(original)
            t = time.perf_counter()
            report = tz.tensorize_(small, config, calibration_data=cal)
            seconds = time.perf_counter() - t
            params = factorized_params(small)
            common = {"total": total, "variant": variant, "budget": budget, "params": params}
            note = summary(report)
            rows.append(
                {
                    **common,
                    "stage": "calibrated",
                    "seconds": seconds,
                    "note": note,
                    **evaluate(small),
                }
            )
            t = time.perf_counter()
            dreport = distill(small, original, dis, args.distill_epochs)
            rows.append(
                {
                    **common,
                    "stage": "distilled",
                    "seconds": time.perf_counter() - t,
                    "note": f"distill_ held-out error {dreport.before:.4g} -> {dreport.after:.4g}",
                    **evaluate(small),
                }
            )
            eprint(f"  {rows[-2]['error']:.4f} calibrated, {rows[-1]['error']:.4f} distilled")
    return rows


def markdown(rows: Sequence[dict[str, Any]], command: str, started: str) -> str:
    lines = [
        "# all-MiniLM-L6-v2 with its word embedding compressed",
        "",
        f"- command: `{command}`",
        f"- started {started}; torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "`total`: the targeted parameters kept, as a fraction of the encoder's linear weights "
        "plus the word embedding (22,337,280); `params`: those parameters after compression. "
        "`1 - cos`: mean over held-out sentences of one minus the cosine of the sentence "
        "embedding to the original's (lower is better); `p01 cos`: its 1st percentile; "
        "`Lee r`: Pearson correlation of document similarities with human judgements.",
        "",
        "| total | variant | stage | params | 1 - cos | p01 cos | Lee r | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" not in r:
            lines.append(f"| {r['total']} | {r['variant']} | - | - | - | - | - | - | {r['note']} |")
            continue
        lines.append(
            f"| {r['total']} | {r['variant']} | {r['stage']} | {r['params']:,} | "
            f"{r['error']:.4f} | {r['p01_cos']:.4f} | {r['lee']:.3f} | "
            f"{r.get('seconds', 0):.0f} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--totals", default="0.6,0.5", help="comma-separated totals T")
    p.add_argument("--steps", type=int, default=50, help="calibration steps per layer")
    p.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    p.add_argument("--distill-sentences", type=int, default=1000)
    p.add_argument("--distill-epochs", type=int, default=1)
    p.add_argument("--eval", type=int, default=256, help="held-out sentences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sets, T=0.6 only")
    p.add_argument("--out", help="markdown file to write")
    args = p.parse_args(argv)
    args.totals = [float(t) for t in args.totals.split(",")]
    if args.quick:
        args.totals, args.steps = [0.6], 5
        args.calibration, args.distill_sentences, args.eval = 32, 32, 32
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    rows = run(args)
    text = markdown(rows, "python " + " ".join(sys.argv), started)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
