"""What :func:`~tensorized.tensorize_` did: per-layer rows and totals (plain data)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._config import _convert
from ._ranks import ConcreteRank
from ._shapes import Modes

__all__ = ["LayerReport", "TensorizeReport"]


@dataclass
class LayerReport:
    """One replaced layer, or one joint group (``kind='joint'``); plain data.

    Attributes:
        name: qualified module name; for a joint group its pattern, e.g. ``blocks.*.attn.q``.
        kind: ``'linear'``, ``'joint'`` or ``'embedding'`` (a table: ``out_features`` its
            rows, ``in_features`` its embedding size).
        group: a joint group's member names, joined by ``', '``; else ``None``.
        in_features, out_features, in_modes, out_modes: the shape (of each member).
        rank: the concrete rank of the format.
        old_params, new_params: parameters (weights and biases) of the replaced
            ``nn.Linear`` (s) and of the new layer.
        weight_error: ``||W - W_hat||_F / ||W||_F`` of the final weight(s), in float64.
        output_error_before, output_error_after: relative output error on held-out recorded
            inputs before / after calibration (a group's: the mean over its members), or
            ``None`` without calibration data.
        seconds: time spent decomposing and calibrating.
        factorization: the layer's format (with ``rank_allocation='budget'`` it may differ
            between layers: ``'dense'`` keeps a layer at full size).
        reason: with ``rank_allocation='budget'``, why: the layer's share of its weights and
            each candidate format's estimated error at that share; else ``''``.
        padded_rows: a table's rows added beyond its vocabulary so that it factors well
            (never returned by a lookup); 0 for linear layers.
    """

    name: str
    kind: str
    group: str | None
    in_features: int
    out_features: int
    in_modes: Modes
    out_modes: Modes
    rank: ConcreteRank
    old_params: int
    new_params: int
    weight_error: float
    output_error_before: float | None
    output_error_after: float | None
    seconds: float
    factorization: str = ""
    reason: str = ""
    padded_rows: int = 0


@dataclass
class TensorizeReport:
    """What :func:`tensorize_` did: one :class:`LayerReport` per replaced layer or group.

    ``print(report)`` shows a table and the totals; ``old_params``, ``new_params`` and
    ``compression`` are the totals over the replaced layers, ``model_params_before`` /
    ``model_params_after`` count the whole model (shared parameters once).
    """

    layers: list[LayerReport]
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def old_params(self) -> int:
        return sum(r.old_params for r in self.layers)

    @property
    def new_params(self) -> int:
        return sum(r.new_params for r in self.layers)

    @property
    def compression(self) -> float:
        """``old_params / new_params`` over the replaced layers."""
        return self.old_params / self.new_params if self.new_params else math.inf

    @property
    def overall_compression(self) -> float:
        """``model_params_before / model_params_after``."""
        after = self.model_params_after
        return self.model_params_before / after if after else math.inf

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def to_list(self) -> list[dict[str, Any]]:
        """One dict of plain types (tuples become lists) per row."""
        return [_convert(dataclasses.asdict(r), frozen=False) for r in self.layers]

    def __str__(self) -> str:
        calibrated = any(r.output_error_before is not None for r in self.layers)
        rows = [["name", "in->out", "modes in->out", "format", "rank", "params old -> new"]]
        rows[0] += ["weight err"]
        rows[0] += ["output err before -> after"] * calibrated
        for r in self.layers:
            errors = (r.output_error_before, r.output_error_after)
            rows.append(
                [
                    f"{r.name} (x{r.group.count(',') + 1})" if r.group else r.name,
                    f"{r.in_features}->{r.out_features}",
                    "->".join("x".join(map(str, m)) for m in (r.in_modes, r.out_modes)),
                    r.factorization,
                    str(r.rank),
                    f"{r.old_params:,} -> {r.new_params:,}",
                    f"{r.weight_error:.4f}",
                ]
                + ["-" if None in errors else "{:.4f} -> {:.4f}".format(*errors)] * calibrated
            )
        widths = [max(map(len, column)) for column in zip(*rows)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) for row in rows]
        lines = [f"{row[0].ljust(widths[0])}  {line}" for row, line in zip(rows, lines)]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"total ({len(self.layers)} rows): {self.old_params:,} -> {self.new_params:,} params "
            f"({self.compression:.2f}x); model {self.model_params_before:,} -> "
            f"{self.model_params_after:,} ({self.overall_compression:.2f}x overall)"
        )
        return "\n".join(lines)
