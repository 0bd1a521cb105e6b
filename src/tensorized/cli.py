"""Command line: a thin layer over the public API (``tensorized --help``).

Commands: ``demo`` (train, compress and chart a small MLP), ``compress`` (apply
:func:`~tensorized.tensorize_` to a saved model), ``inspect`` (list a saved model's factorized
layers) and ``selfcheck`` (decompose a random weight with every format). Every error, of
usage, of input or while running, prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from ._embedding import EmbeddingView, FactorizedEmbedding
from ._header import LayerSpec, read_layout
from ._linear import FactorizedLinear, LinearView
from ._loading import CLIError, _one_line, load_calibration, load_model
from ._ops import frobenius_error
from ._serialize import save_model
from ._shapes import tensorize_shape
from .formats import FORMATS, get_format

if TYPE_CHECKING:  # imported where used: the CLI starts without loading it
    from ._tensorize import TensorizeConfig

__all__ = [
    "CLIError",
    "format_table",
    "inspect_file",
    "inspect_model",
    "main",
    "parse_rank",
    "selfcheck",
]

REGEX_CHARS = frozenset("\\^$*+?()[]{}|")
MAX_SELFCHECK_SIZE = 4096  # a dense random weight and every format's decomposition of it


def selfcheck(size: int = 256, fraction: float = 0.25) -> list[dict]:
    """Decompose one random low-rank-plus-noise weight with every format and report.

    Args:
        size: the weight is ``(size, size)``.
        fraction: parameter budget as a fraction of the dense weight.

    Returns:
        One row per format: name, ranks, parameters, relative error, seconds, the largest
        difference between ``contract`` and the dense product, and a note (why a format
        was skipped, e.g. a budget it cannot reach at this size; else empty).
    """
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(size, size // 8, generator=gen) @ torch.randn(size // 8, size, generator=gen)
    weight = low / size**0.5 + 0.05 * torch.randn(size, size, generator=gen)
    x = torch.randn(16, size, generator=gen)
    ins, outs = tensorize_shape(size, size)
    rows: list[dict[str, Any]] = []
    for name, cls in FORMATS.items():
        rank = "same" if cls.rank_kind == "none" else fraction
        start = time.perf_counter()
        try:
            module = cls.from_matrix(weight, ins, outs, rank)
        except ValueError as exc:  # e.g. a budget this format cannot reach at this size
            row = dict.fromkeys(("rank", "params", "fraction", "weight error"), "-")
            rows.append({"format": name, **row, "seconds": "-", "contract gap": "-"})
            rows[-1]["note"] = _one_line(exc)
            continue
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
                "note": "",
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


# ---------------------------------------------------------------------- parsing


def parse_rank(text: str) -> float | int | str | tuple[int, ...]:
    """A ``--rank`` value: ``'same'``, a float (``0.5``), an int (``8``) or ints (``4,8,8``).

    Raises:
        CLIError: for anything else.
    """
    t = text.strip()
    try:
        if t == "same":
            return t
        if "," in t:
            return tuple(int(p) for p in t.split(","))
        return int(t) if t.lstrip("+").isdigit() else float(t)
    except ValueError:
        raise CLIError(
            f"--rank must be 'same', a parameter fraction such as 0.5, an int rank such as 8 "
            f"or comma-separated int ranks such as 4,8,8; got {text!r}"
        ) from None


def parse_modules(text: str) -> str | list[str]:
    """A regex if ``text`` has a regex character other than ``.``, else a comma list of names."""
    if any(c in REGEX_CHARS for c in text):
        return text
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise CLIError(f"expected a regex or comma-separated module names, got {text!r}")
    return names


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit code 2), as for the commands' own errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------- loading


def _config(args: argparse.Namespace) -> TensorizeConfig:
    from ._tensorize import TensorizeConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        p = Path(args.config)
        if not p.is_file():
            raise CLIError(f"config file {str(p)!r} does not exist")
        try:
            values = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CLIError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise CLIError(f"config file {str(p)!r} must hold a JSON object (TensorizeConfig)")
    parse = {
        "rank": parse_rank,
        "target_modules": parse_modules,
        "exclude_modules": parse_modules,
        "factorization": lambda v: [f.strip() for f in v.split(",")] if "," in v else v,
    }
    for key in (
        *("factorization", "rank", "target_modules", "exclude_modules", "joint"),
        *("rank_allocation", "order", "min_params", "calibration_steps"),
    ):
        value = getattr(args, key)
        if value is not None:  # given on the command line: overrides the file
            values[key] = parse[key](value) if key in parse else value
    if args.quiet or args.json:
        values["progress"] = False
    return TensorizeConfig.from_dict(values)


def _output_folder(text: str, model: str, overwrite: bool) -> Path:
    """The folder ``compress`` may write: never the input or a folder holding it, and an
    existing non-empty folder only with ``--overwrite``."""
    if not text.strip():
        raise CLIError(f"--output must name a folder, got {text!r}")
    out, source = Path(text).resolve(), Path(model).resolve()
    if out == source or out in source.parents:
        raise CLIError(
            f"--output {text!r} is the input model {model!r} or holds it: compress never "
            f"writes over its input; choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {text!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(
            f"--output {text!r} is a folder that is not empty: give a new folder, or "
            f"--overwrite to replace it"
        )
    if not out.parent.is_dir():
        raise CLIError(f"--output {text!r}: its parent folder {str(out.parent)!r} does not exist")
    return out


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out`` (replacing an old ``out`` only once
    the new one is complete), so ``out`` is never half written."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _compress(args: argparse.Namespace) -> int:
    from ._tensorize import tensorize_

    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = _config(args)
    out = _output_folder(args.output, args.model, args.overwrite)
    model, hf_dir = load_model(args.model, quiet=args.quiet or args.json)
    data = None
    if args.calibration is not None:
        data = load_calibration(
            args.calibration, model, hf_dir, batch_size=args.batch_size, max_length=args.max_length
        )
    teacher, healing = None, None
    if args.distill is not None:
        if args.distill_epochs < 1:
            raise CLIError(f"--distill-epochs must be >= 1, got {args.distill_epochs}")
        healing = load_calibration(
            args.distill, model, hf_dir, batch_size=args.batch_size, max_length=args.max_length
        )
        teacher = copy.deepcopy(model)  # the original, before anything is replaced
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tensorize_(model, config, calibration_data=data)
        distilled = None
        if teacher is not None and healing is not None:
            from ._distill import distill_

            show = not (args.quiet or args.json)
            distilled = distill_(
                model, teacher, healing, epochs=args.distill_epochs, progress=show or None
            )
    notes = list(dict.fromkeys(_one_line(w.message) for w in caught))
    names = ("model.pt", "model.safetensors", "tensorize_config.json", "report.json")
    files = {n: out / n for n in names}
    result = {
        "model": str(args.model),
        "config": config.to_dict(),
        "layers": report.to_list(),
        "totals": {
            "layers": len(report),
            "old_params": report.old_params,
            "new_params": report.new_params,
            "compression": report.compression,
            "model_params_before": report.model_params_before,
            "model_params_after": report.model_params_after,
            "overall_compression": report.overall_compression,
        },
        "warnings": notes,
        "files": {n: str(f) for n, f in files.items()},
    }
    if distilled is not None:
        result["distill"] = dataclasses.asdict(distilled)
    # Everything is written to a fresh folder beside the output, then moved into place:
    # a failure (a full disk, an interrupt) leaves the output as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.save(model, staging / "model.pt")
        save_model(model, staging / "model.safetensors", config=config)  # no pickle
        (staging / "tensorize_config.json").write_text(
            json.dumps(config.to_dict(), indent=2) + "\n"
        )
        (staging / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not args.quiet and not args.json:
        for note in notes:
            print(f"tensorized compress: warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        print(report)
        if distilled is not None:
            print(f"\n{distilled}")
        print(f"\nwrote {', '.join(str(f) for f in files.values())}")
    return 0


def inspect_model(model: nn.Module) -> dict[str, Any]:
    """The factorized layers, joint-layer views and parameter totals of ``model``.

    Returns:
        ``{"factorized": [...], "views": [...], "totals": {...}}``. Each factorized layer has
        ``name, format, in_features, out_features, in_modes, out_modes, rank, n_layers,
        params`` (bias included), ``dense_params`` (its ``n_layers`` ``nn.Linear`` s) and
        ``compression``; each view ``name, index, parent``. The totals count every parameter
        once: ``params`` (the model), ``factorized_params``, ``dense_params`` (all others),
        ``dense_equivalent`` (the model with each factorized layer as ``nn.Linear`` s) and
        ``compression`` (``dense_equivalent / params``).
    """
    names = {id(m): n for n, m in model.named_modules()}
    layers, views = [], []
    for name, m in model.named_modules():
        if isinstance(m, FactorizedLinear | FactorizedEmbedding):
            layers.append(_layer_row(name, LayerSpec.of(m), sum(p.numel() for p in m.parameters())))
        elif isinstance(m, LinearView | EmbeddingView):
            views.append({"name": name, "index": m.indices, "parent": names.get(id(m.parent))})
    factorized = {
        id(p): p.numel() for l_ in layers for p in model.get_submodule(l_["name"]).parameters()
    }
    total = sum(p.numel() for p in model.parameters())
    return _inventory(layers, views, total, sum(factorized.values()))


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """As :func:`inspect_model`, for a file written by :func:`~tensorized.save_model`, read
    from its header alone (no weights loaded, no code run). The totals count stored
    elements (``params``: parameters and buffers) since the header does not tell them apart.
    """
    layout = read_layout(path)
    layers = []
    for group, spec in layout.groups.items():
        fmt = get_format(spec.factorization)
        count = fmt.param_count(spec.in_modes, spec.out_modes, spec.rank, spec.n_layers)
        layers.append(_layer_row(layout.module_name(group), spec, count + spec.bias_params))
    views = [
        {"name": p.name, "index": p.index, "parent": layout.module_name(p.group)}
        for p in layout.places
        if p.index is not None
    ]
    total = sum(math.prod(shape) for shape in layout.shapes.values())
    return _inventory(layers, views, total, sum(r["params"] for r in layers))


def _layer_row(name: str, spec: LayerSpec, params: int) -> dict[str, Any]:
    out_f, in_f = math.prod(spec.out_modes), math.prod(spec.in_modes)
    if spec.kind == "embedding":  # the rows a lookup returns (the modes may cover padding)
        out_f = spec.num_embeddings or out_f
    dense = spec.n_layers * in_f * out_f + spec.bias_params  # its n_layers nn.Linear s
    return {
        "name": name,
        "kind": spec.kind,
        "format": spec.factorization,
        "in_features": in_f,
        "out_features": out_f,
        "in_modes": list(spec.in_modes),
        "out_modes": list(spec.out_modes),
        "rank": list(spec.rank) if isinstance(spec.rank, tuple) else spec.rank,
        "n_layers": spec.n_layers,
        "params": params,
        "dense_params": dense,
        "compression": dense / params,
    }


def _inventory(layers: list[dict], views: list[dict], total: int, fact: int) -> dict[str, Any]:
    """The layers, views and totals (``fact``: the factorized layers' parameters, once)."""
    equivalent = total - fact + sum(r["dense_params"] for r in layers)
    totals = {
        "factorized_layers": len(layers),
        "views": len(views),
        "params": total,
        "factorized_params": fact,
        "dense_params": total - fact,
        "dense_equivalent": equivalent,
        "compression": equivalent / total if total else 1.0,
    }
    return {"factorized": layers, "views": views, "totals": totals}


def _inspect(args: argparse.Namespace) -> int:
    p = Path(args.path)
    if p.is_dir():  # a 'compress' output: its safetensors file needs no unpickling
        found = [p / n for n in ("model.safetensors", "model.pt") if (p / n).is_file()]
        if not found:
            raise CLIError(
                f"{str(p)!r} is a folder without model.safetensors or model.pt (a 'compress' "
                f"output)"
            )
        p = found[0]
    if p.suffix == ".safetensors":
        info, kind = inspect_file(p), "safetensors file"
    else:
        model, _ = load_model(p)
        info, kind = inspect_model(model), type(model).__name__
    if args.json:
        print(json.dumps({"path": str(p), **info}))
        return 0
    t = info["totals"]
    print(f"{p}: {kind}, {t['params']:,} parameters")
    if info["factorized"]:
        rows = [
            {
                "name": r["name"],
                "format": r["format"],
                "in -> out": f"{r['in_features']} -> {r['out_features']}",
                "modes in -> out": " -> ".join(
                    "x".join(map(str, r[k])) for k in ("in_modes", "out_modes")
                ),
                "rank": r["rank"],
                "layers": r["n_layers"],
                "params": f"{r['params']:,}",
                "dense": f"{r['dense_params']:,}",
                "compression": f"{r['compression']:.2f}x",
            }
            for r in info["factorized"]
        ]
        print("\n" + format_table(rows))
    else:
        print("\nno FactorizedLinear layer")
    if info["views"]:
        print("\n" + format_table(info["views"]))
    print(
        f"\nfactorized: {t['factorized_layers']} layers ({t['views']} joint views), "
        f"{t['factorized_params']:,} parameters; other (dense) parameters: {t['dense_params']:,}"
        f"\ntotal {t['params']:,} vs {t['dense_equivalent']:,} uncompressed "
        f"({t['compression']:.2f}x)"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import format_rows, run_demo

    def split(text: str | None, kind: type) -> tuple | None:
        if text is None:
            return None
        try:
            return tuple(kind(p) for p in text.split(",") if p.strip())
        except ValueError:
            raise CLIError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    formats = split(args.formats, str)
    if formats:
        from .formats import canonical_name

        try:
            formats = tuple(canonical_name(f) for f in formats)
        except ValueError as exc:
            raise CLIError(f"--formats: {exc}") from None
    budgets = split(args.budgets, float)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise CLIError(
            "the demo needs scikit-learn (digits data): pip install scikit-learn"
        ) from None
    say = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr))
    start = time.perf_counter()
    try:
        rows = run_demo(
            args.output,
            seed=args.seed,
            quick=args.quick,
            formats=formats,
            budgets=budgets,
            progress=say,
        )
    except ValueError as exc:
        raise CLIError(_one_line(exc)) from None
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(rows))
    elif not args.quiet:
        print(format_rows(rows))
        print(f"\n{len(rows) - 1} compressed models in {seconds:.1f}s; wrote {args.output}/")
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    if not 8 <= args.size <= MAX_SELFCHECK_SIZE:
        raise CLIError(f"--size must be in [8, {MAX_SELFCHECK_SIZE}], got {args.size}")
    if not 0 < args.rank <= 1:
        raise CLIError(f"--rank must be in (0, 1], got {args.rank}")
    ins, outs = tensorize_shape(args.size, args.size)
    print(
        f"weight {args.size}x{args.size} as out modes {outs} x in modes {ins}, "
        f"budget {args.rank:g} of the dense parameters\n"
    )
    print(format_table(selfcheck(args.size, args.rank)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``tensorized`` argument parser with its subcommands."""
    parser = _Parser(
        prog="tensorized",
        description="Compress PyTorch models with tensor-factorized linear layers.",
        epilog=(
            "examples:\n  tensorized demo\n  tensorized compress path/to/hf-model -f tucker "
            "-r 0.5 --calibration texts.txt -o out/\n  tensorized inspect out/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a digits MLP, compress it every way, chart it")
    demo.add_argument(
        "-o", "--output", default="tensorized-demo", metavar="DIR", help="output folder"
    )
    demo.add_argument("--quick", action="store_true", help="2 formats x 2 budgets (seconds)")
    demo.add_argument(
        "--formats", metavar="F,F", help="comma-separated formats (default: all five)"
    )
    demo.add_argument(
        "--budgets", metavar="B,B", help="comma-separated parameter fractions, e.g. 0.5,0.1"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and training")
    demo.add_argument("--json", action="store_true", help="print the rows as JSON")
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    demo.set_defaults(handler=_demo)

    comp = sub.add_parser(
        "compress",
        help="replace a saved model's linear layers by factorized ones",
        description=(
            "Compress MODEL with tensorize_ and save OUT/model.pt, OUT/model.safetensors "
            "(weights and layer specs for tensorized.load_model, no pickle), "
            "OUT/tensorize_config.json and OUT/report.json. MODEL is a torch.save'd "
            "nn.Module (.pt/.pth; this UNPICKLES it, which can run arbitrary code: only use "
            "files you trust), a folder with model.pt, or a Hugging Face model folder "
            "(loaded offline with transformers.AutoModel). Options override --config."
        ),
    )
    comp.add_argument("model", help="a .pt/.pth file or a model folder (trusted files only)")
    comp.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="output folder (new or empty)"
    )
    comp.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it is a folder with files"
    )
    comp.add_argument(
        "--factorization",
        "-f",
        metavar="F",
        help=f"{', '.join(FORMATS)}; with --rank-allocation budget also "
        "auto or a comma-separated list (a format per layer)",
    )
    comp.add_argument(
        "--rank", "-r", metavar="R", help="fraction (0.5), int rank (8), ints (4,8,8) or 'same'"
    )
    comp.add_argument(
        "--target-modules",
        metavar="REGEX|NAMES",
        help="a regex on qualified names (if it has one of \\^$*+?()[]{}|), else "
        "comma-separated names or name suffixes; default: every nn.Linear",
    )
    comp.add_argument(
        "--exclude-modules", metavar="REGEX|NAMES", help="as --target-modules, applied after it"
    )
    comp.add_argument(
        "--joint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="factorize together same-shaped layers of the same name in every block",
    )
    comp.add_argument("--rank-allocation", choices=("uniform", "budget"))
    comp.add_argument(
        "--order", type=int, metavar="N", help="modes per side when tensorizing (default 3)"
    )
    comp.add_argument(
        "--min-params", type=int, metavar="N", help="leave smaller layers dense (default 1024)"
    )
    comp.add_argument(
        "--config", metavar="JSON", help="a JSON file of TensorizeConfig fields (to_dict format)"
    )
    comp.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration inputs: a text file (one input a line, Hugging Face models) or a "
        ".pt/.pth file of a tensor, dict of tensors or list of batches",
    )
    comp.add_argument(
        "--calibration-steps", type=int, metavar="N", help="optimizer steps per layer"
    )
    comp.add_argument(
        "--distill",
        metavar="FILE",
        help="after compressing, distill from the original on these inputs (same forms as "
        "--calibration; use other samples than the calibration's)",
    )
    comp.add_argument(
        "--distill-epochs", type=int, default=1, metavar="N", help="distillation epochs"
    )
    comp.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="calibration batch size"
    )
    comp.add_argument(
        "--max-length", type=int, default=128, metavar="N", help="tokens per text input"
    )
    comp.add_argument("--json", action="store_true", help="print one JSON object, no table")
    comp.add_argument("--quiet", action="store_true", help="print nothing (no progress bar)")
    comp.set_defaults(handler=_compress)

    insp = sub.add_parser("inspect", help="list a saved model's factorized layers and sizes")
    insp.add_argument(
        "path",
        help="a .safetensors file from compress or save_model (read safely, header only), a "
        ".pt file (unpickled: trusted files only) or a compress output folder",
    )
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    insp.set_defaults(handler=_inspect)

    check = sub.add_parser("selfcheck", help="decompose a random weight with every format")
    check.add_argument("--size", type=int, default=256, help="weight is (size, size)")
    check.add_argument("--rank", type=float, default=0.25, help="parameter fraction")
    check.set_defaults(handler=_selfcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tensorized`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return args.handler(args)
    except CLIError as exc:
        error = _one_line(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as exc:  # every failure: one line, exit code 2
        error = f"{type(exc).__name__}: {_one_line(exc)}"
    print(f"tensorized {args.command}: error: {error}", file=sys.stderr)
    return 2
