"""What a file written by ``save_model`` claims, checked whole before anything is built.

A safetensors file is a JSON header (tensor names, dtypes, shapes, offsets; checked against
the file's size by safetensors when it is opened) then raw bytes. ``save_model`` adds its own
entries to the header's text metadata: the spec of each factorized layer (``groups``), where
each one sits in the model (``places``) and which state-dict keys share a stored tensor
(``aliases``). A crafted or corrupt file can put anything there, so :func:`read_layout` checks
every entry's type and range, then builds each layer on the ``meta`` device (no memory) and
compares its parameter shapes with the tensors the header lists: a spec that claims
``n_layers=10**6`` beside tensors for 4 layers is refused before a byte is allocated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._embedding import EmbeddingView, FactorizedEmbedding
from ._linear import FactorizedLinear, LinearView
from .formats import canonical_name, get_format

FORMAT_VERSION = "1"
PREFIX = "tensorized."  # metadata keys we own; user metadata may not start with it

MAX_MODES = 64  # modes per side: far more than any weight needs (2**64 features)


@dataclass(frozen=True)
class LayerSpec:
    """What the constructor needs to rebuild a factorized layer (``kind='linear'``) or
    embedding table (``kind='embedding'``) with the saved shapes."""

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    factorization: str
    rank: int | tuple[int, ...] | None
    n_layers: int
    bias: bool
    implementation: str
    checkpointing: bool
    kind: str = "linear"
    num_embeddings: int | None = None  # embeddings: the rows a lookup may return
    padding_idx: int | None = None

    @classmethod
    def of(cls, layer: FactorizedLinear | FactorizedEmbedding) -> LayerSpec:
        """The spec of a built layer or table."""
        if isinstance(layer, FactorizedEmbedding):
            w = layer.weight
            return cls(
                w.in_modes,
                w.out_modes,
                layer.factorization,
                layer.rank,
                layer.n_layers,
                False,
                layer.implementation,
                False,
                "embedding",
                layer.num_embeddings,
                layer.padding_idx,
            )
        return cls(
            layer.in_tensorized_features,
            layer.out_tensorized_features,
            layer.factorization,
            layer.rank,
            layer.n_layers,
            layer.bias is not None,
            layer.implementation,
            layer.checkpointing,
        )

    def build(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FactorizedLinear | FactorizedEmbedding:
        """An empty module of this spec (parameters uninitialized, to be loaded)."""
        weight = get_format(self.factorization).empty(
            self.in_modes, self.out_modes, self.rank, self.n_layers, device=device, dtype=dtype
        )
        if self.kind == "embedding":
            return FactorizedEmbedding.from_weight(
                weight,
                self.num_embeddings,
                padding_idx=self.padding_idx,
                implementation=self.implementation,
            )
        return FactorizedLinear.from_weight(
            weight, self.bias, implementation=self.implementation, checkpointing=self.checkpointing
        )

    def view(self, layer: nn.Module, index: int) -> nn.Module:
        """The view of member ``index`` of a joint ``layer`` built from this spec."""
        if isinstance(layer, FactorizedEmbedding):
            return EmbeddingView(layer, index)
        return LinearView(layer, index)  # type: ignore[arg-type]

    @property
    def bias_params(self) -> int:
        """Elements of the bias: ``(n_layers, out_features)``, or none."""
        return self.n_layers * math.prod(self.out_modes) if self.bias else 0

    def to_dict(self) -> dict[str, Any]:
        rank = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        table = {}
        if self.kind == "embedding":  # linear specs keep the keys older files have
            table = {
                "kind": self.kind,
                "num_embeddings": self.num_embeddings,
                "padding_idx": self.padding_idx,
            }
        return {
            **table,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "factorization": self.factorization,
            "rank": rank,
            "n_layers": self.n_layers,
            "bias": self.bias,
            "implementation": self.implementation,
            "checkpointing": self.checkpointing,
        }


_TABLE_KEYS = frozenset({"kind", "num_embeddings", "padding_idx"})
_SPEC_KEYS = frozenset(f.name for f in fields(LayerSpec)) - _TABLE_KEYS


@dataclass(frozen=True)
class Place:
    """A factorized layer registered at ``name`` (``index=None``), or a view of layer
    ``index`` of it; ``group`` names the layer (its first qualified name)."""

    name: str
    group: str
    index: int | None


@dataclass(frozen=True)
class Layout:
    """A checked header: the layers, their places, the aliases and the stored shapes."""

    groups: dict[str, LayerSpec]
    places: list[Place]
    aliases: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]

    def module_name(self, group: str) -> str:
        """The qualified name of the layer module itself: its first place, or that view's
        child ``parent`` (a view registers the layer it shows under that name)."""
        first = next(p for p in self.places if p.group == group)
        return first.name if first.index is None else f"{first.name}.parent".lstrip(".")


class _Bad(ValueError):
    """One finding about the header; :func:`read_layout` prefixes the file's name."""


def _int(value: Any, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise _Bad(f"{what} must be >= {low}, got {value}")
    return value


def _modes(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MODES:
        raise _Bad(f"{what} must be a list of 1 to {MAX_MODES} positive ints, got {value!r}")
    return tuple(_int(v, what) for v in value)


def _spec(group: str, value: Any) -> LayerSpec:
    where = f"layer {group!r}"
    table = isinstance(value, dict) and value.get("kind") == "embedding"
    expected = _SPEC_KEYS | _TABLE_KEYS if table else _SPEC_KEYS
    if not isinstance(value, dict) or set(value) != expected:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _Bad(
            f"{where}: the spec must be an object with keys {sorted(_SPEC_KEYS)} (and "
            f"{sorted(_TABLE_KEYS)} for an embedding, kind 'embedding'), got {keys}"
        )
    try:
        factorization = canonical_name(value["factorization"])
    except (TypeError, ValueError) as exc:
        raise _Bad(f"{where}: {exc}") from None
    rank = value["rank"]
    if isinstance(rank, list):
        if not 1 <= len(rank) <= 2 * MAX_MODES + 1:
            raise _Bad(f"{where}: rank must list 1 to {2 * MAX_MODES + 1} ints, got {rank!r}")
        rank = tuple(_int(r, f"{where}: rank") for r in rank)
    elif rank is not None:
        rank = _int(rank, f"{where}: rank")
    for key in ("bias", "checkpointing"):
        if not isinstance(value[key], bool):
            raise _Bad(f"{where}: {key} must be true or false, got {value[key]!r}")
    if not isinstance(value["implementation"], str):
        raise _Bad(f"{where}: implementation must be a string, got {value['implementation']!r}")
    extra: tuple = ()
    if table:
        num = _int(value["num_embeddings"], f"{where}: num_embeddings")
        pad = value["padding_idx"]
        if pad is not None:
            pad = _int(pad, f"{where}: padding_idx", low=0)
        extra = ("embedding", num, pad)
    return LayerSpec(
        _modes(value["in_modes"], f"{where}: in_modes"),
        _modes(value["out_modes"], f"{where}: out_modes"),
        factorization,
        rank,
        _int(value["n_layers"], f"{where}: n_layers"),
        value["bias"],
        value["implementation"],
        value["checkpointing"],
        *extra,
    )


def _places(value: Any, groups: Mapping[str, LayerSpec]) -> list[Place]:
    if not isinstance(value, list):
        raise _Bad(f"places must be a list, got {type(value).__name__}")
    places, seen = [], set()
    for item in value:
        if not isinstance(item, dict) or set(item) != {"name", "group", "index"}:
            raise _Bad(f"each place must be an object with keys group, index, name; got {item!r}")
        name, group, index = item["name"], item["group"], item["index"]
        if not isinstance(name, str) or not isinstance(group, str):
            raise _Bad(f"a place's name and group must be strings, got {item!r}")
        if name in seen:
            raise _Bad(f"two places are named {name!r}")
        seen.add(name)
        if group not in groups:
            raise _Bad(f"place {name!r} names an unknown layer {group!r}")
        if index is not None:
            n = groups[group].n_layers
            if _int(index, f"place {name!r}: index", low=0) >= n:
                raise _Bad(f"place {name!r}: index {index} is out of range for {n} layers")
        places.append(Place(name, group, index))
    return places


def _aliases(value: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Bad(f"aliases must be an object, got {type(value).__name__}")
    for key, source in value.items():
        if not isinstance(source, str) or source not in shapes or key in shapes:
            raise _Bad(f"alias {key!r} -> {source!r} does not name one stored tensor")
    return dict(value)


def _json(metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[PREFIX + key])
    except KeyError:
        raise _Bad(f"metadata '{PREFIX}{key}' is missing") from None
    except json.JSONDecodeError as exc:
        raise _Bad(f"metadata '{PREFIX}{key}' is not valid JSON ({exc})") from None


def _prefix(layout: Layout, group: str) -> str:
    """Where the layer's own state-dict keys start."""
    name = layout.module_name(group)
    return f"{name}." if name else ""


def _check_shapes(layout: Layout) -> None:
    """Build each layer on the meta device and compare every parameter's shape with the
    stored tensor of that key (through an alias where the layer's keys repeat)."""
    for group, spec in layout.groups.items():
        if not any(p.group == group for p in layout.places):
            raise _Bad(f"layer {group!r} has no place in the model")
        try:
            layer = spec.build(device="meta")
        except (TypeError, ValueError) as exc:
            raise _Bad(f"layer {group!r}: cannot rebuild it from its spec: {exc}") from None
        if layer.rank != spec.rank:  # a concrete rank must come back exactly
            raise _Bad(f"layer {group!r}: saved rank {spec.rank} rebuilds as {layer.rank}")
        stem = _prefix(layout, group)
        for key, tensor in layer.state_dict().items():
            stored = layout.aliases.get(stem + key, stem + key)
            shape = layout.shapes.get(stored)
            if shape is None:
                raise _Bad(f"layer {group!r}: its tensor {stem + key!r} is not in the file")
            if shape != tuple(tensor.shape):
                raise _Bad(
                    f"layer {group!r}: its spec gives {stem + key!r} the shape "
                    f"{tuple(tensor.shape)} but the file stores {shape}"
                )


def read_layout(path: str | os.PathLike) -> Layout:
    """The checked header of a file written by :func:`~tensorized.save_model`.

    Raises:
        FileNotFoundError / IsADirectoryError: ``path`` is not a file.
        ValueError: the file is not a safetensors file, was not written by ``save_model``,
            or its metadata is malformed or does not match its tensors; the message names
            the file and the entry.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{str(p)!r} is a folder; give the .safetensors file in it")
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {str(p)!r}")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ValueError(
            f"cannot read {str(p)!r} as a safetensors file ({type(exc).__name__}: {exc}); "
            "is it truncated or not a file written by tensorized.save_model?"
        ) from exc
    if metadata.get(PREFIX + "format") != FORMAT_VERSION:
        raise ValueError(
            f"{str(p)!r} was not written by tensorized.save_model (metadata "
            f"'{PREFIX}format' is {metadata.get(PREFIX + 'format')!r}, expected "
            f"{FORMAT_VERSION!r}); a plain safetensors state dict loads with "
            "safetensors.torch.load_model"
        )
    try:
        raw = _json(metadata, "groups")
        if not isinstance(raw, dict):
            raise _Bad(f"groups must be an object, got {type(raw).__name__}")
        groups = {g: _spec(g, v) for g, v in raw.items()}
        places = _places(_json(metadata, "places"), groups)
        aliases = _aliases(_json(metadata, "aliases"), shapes)
        layout = Layout(groups, places, aliases, shapes, metadata)
        _check_shapes(layout)
    except _Bad as exc:
        raise ValueError(f"{str(p)!r}: {exc}") from None
    return layout


def config_entry(layout: Layout, path: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded ``TensorizeConfig`` as a dict, or ``None`` when none was saved."""
    if PREFIX + "config" not in layout.metadata:
        return None
    try:
        value = _json(layout.metadata, "config")
        if not isinstance(value, dict):
            raise _Bad(f"config must be an object, got {type(value).__name__}")
    except _Bad as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None
    return value
