"""Command line: a thin layer over the public API (``tensorized --help``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from ._ops import frobenius_error
from .formats import FORMATS
from .shapes import tensorize_shape


def selfcheck(size: int = 256, fraction: float = 0.25) -> list[dict]:
    """Decompose one random low-rank-plus-noise weight with every format and report.

    Args:
        size: the weight is ``(size, size)``.
        fraction: parameter budget as a fraction of the dense weight.

    Returns:
        One row per format: name, ranks, parameters, relative error, seconds, and the
        largest difference between ``contract`` and the dense product.
    """
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(size, size // 8, generator=gen) @ torch.randn(size // 8, size, generator=gen)
    weight = low / size**0.5 + 0.05 * torch.randn(size, size, generator=gen)
    x = torch.randn(16, size, generator=gen)
    ins, outs = tensorize_shape(size, size)
    rows = []
    for name, cls in FORMATS.items():
        rank = "same" if name == "dense" else fraction
        start = time.perf_counter()
        module = cls.from_matrix(weight, ins, outs, rank)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            gap = (module.contract(x) - x @ module.to_matrix().T).abs().max().item()
            error = frobenius_error(weight, module.to_matrix())
        rows.append(
            {
                "format": name,
                "rank": str(module.rank),
                "params": module.num_params,
                "fraction": module.num_params / module.dense_params,
                "weight error": error,
                "seconds": seconds,
                "contract gap": gap,
            }
        )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Render rows of dicts as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensorized`` command."""
    parser = argparse.ArgumentParser(prog="tensorized", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("selfcheck", help="decompose a random weight with every format")
    check.add_argument("--size", type=int, default=256, help="weight is (size, size)")
    check.add_argument("--rank", type=float, default=0.25, help="parameter fraction")
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        if args.size < 8:
            parser.error(f"--size must be >= 8, got {args.size}")
        if not 0 < args.rank <= 1:
            parser.error(f"--rank must be in (0, 1], got {args.rank}")
        ins, outs = tensorize_shape(args.size, args.size)
        print(
            f"weight {args.size}x{args.size} as out modes {outs} x in modes {ins}, "
            f"budget {args.rank:g} of the dense parameters\n"
        )
        print(format_table(selfcheck(args.size, args.rank)))
    return 0
