"""Save a model holding factorized layers to safetensors, and rebuild it in a fresh process.

``save_model`` writes the weights (each shared tensor once) and, in the file's text metadata,
the spec of every :class:`~tensorized.FactorizedLinear` (modes, format, concrete ranks,
``n_layers``, bias) and where it sits in the model, plus the :class:`TensorizeConfig` if given.
``load_model`` takes a freshly built *uncompressed* instance of the same architecture, puts
empty factorized layers of the recorded specs at the recorded places (no decomposition, no
pickled code) and loads the weights. safetensors is imported only inside these functions.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ._embedding import EmbeddingView, FactorizedEmbedding
from ._header import FORMAT_VERSION, PREFIX, LayerSpec, Place, config_entry, read_layout
from ._linear import FactorizedLinear, LinearView
from ._tensorize import TensorizeConfig

__all__ = ["load_config", "load_model", "save_model"]


def _spec(layer: FactorizedLinear | FactorizedEmbedding) -> dict[str, Any]:
    """What the constructor needs to rebuild ``layer`` with the same parameter shapes."""
    return LayerSpec.of(layer).to_dict()


def _placements(model: nn.Module) -> tuple[dict[str, dict], list[dict[str, Any]]]:
    """The factorized layers (``groups``, keyed by their first qualified name) and every place
    one is registered (``places``: a layer itself, or a view of it with its index)."""
    groups: dict[str, dict] = {}
    group_of: dict[int, str] = {}
    places: list[dict[str, Any]] = []
    view_parents = set()  # a view's own 'parent' child: not a place of its own
    for name, module in model.named_modules(remove_duplicate=False):  # parents before children
        layer: FactorizedLinear | FactorizedEmbedding
        if isinstance(module, LinearView | EmbeddingView):
            view_parents.add(f"{name}.parent" if name else "parent")
            layer, index = module.parent, module.indices
        elif isinstance(module, FactorizedLinear | FactorizedEmbedding) and (
            name not in view_parents
        ):
            layer, index = module, None
        else:
            continue
        if id(layer) not in group_of:
            group_of[id(layer)] = name
            groups[name] = _spec(layer)
        places.append({"name": name, "group": group_of[id(layer)], "index": index})
    return groups, places


def _unique_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each shared tensor stored once: ``(tensors, aliases)`` where
    ``aliases[key]`` names the stored key holding the same tensor (views of a joint layer
    register its parameters once per view)."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and ident in first:
            aliases[key] = first[ident]
            continue
        first[ident] = key
        # A copy: safetensors refuses tensors that share memory, and it writes from CPU.
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: TensorizeConfig | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``model``'s weights and the specs of its factorized layers to a safetensors file.

    The file is written to a temporary name beside ``path`` and then renamed, so an
    interrupted save never leaves a truncated file at ``path``.

    Args:
        model: any module; its :class:`~tensorized.FactorizedLinear` layers and views (from
            :func:`~tensorized.tensorize_` or built by hand) are recorded.
        path: the ``.safetensors`` file to write.
        config: the :class:`~tensorized.TensorizeConfig` the model was compressed with, kept
            for the record (:func:`load_config` reads it back).
        metadata: extra ``str -> str`` entries for the file header.

    Raises:
        TypeError: for a non-module ``model``, a ``config`` that is not a TensorizeConfig or
            non-string metadata.
        ValueError: for metadata keys starting with ``'tensorized.'`` (reserved).

    Example:
        >>> import tempfile, torch, tensorized as tz
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> _ = tz.tensorize_(net, tz.TensorizeConfig(rank=0.5, order=2, progress=False))
        >>> path = tempfile.mkdtemp() + "/net.safetensors"
        >>> tz.save_model(net, path)
        >>> fresh = tz.load_model(path, base=torch.nn.Sequential(torch.nn.Linear(64, 32)))
        >>> x = torch.randn(3, 64)
        >>> torch.equal(fresh(x), net(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and not isinstance(config, TensorizeConfig):
        raise TypeError(f"config must be a TensorizeConfig or None, got {type(config).__name__}")
    extra = dict(metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k.startswith(PREFIX):
            raise ValueError(f"metadata key {k!r} is reserved: keys starting with {PREFIX!r}")
    from safetensors.torch import save_file

    from . import __version__

    groups, places = _placements(model)
    tensors, aliases = _unique_tensors(model)
    header = {
        **extra,
        PREFIX + "format": FORMAT_VERSION,
        PREFIX + "version": __version__,
        PREFIX + "groups": json.dumps(groups),
        PREFIX + "places": json.dumps(places),
        PREFIX + "aliases": json.dumps(aliases),
    }
    if config is not None:
        try:
            header[PREFIX + "config"] = json.dumps(config.to_dict())
        except TypeError as exc:
            raise TypeError(f"config cannot be written as JSON: {exc}") from exc
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a folder; give a file path")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: no such folder {str(path.parent)!r}")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_config(path: str | os.PathLike) -> TensorizeConfig | None:
    """The :class:`~tensorized.TensorizeConfig` recorded by :func:`save_model`, or ``None``.

    Raises:
        ValueError: as :func:`load_model`, and for a recorded config that is not valid.
    """
    value = config_entry(read_layout(path), path)
    if value is None:
        return None
    try:
        return TensorizeConfig.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r}: the recorded config is not valid: {exc}") from None


def _build_layer(spec: LayerSpec, like: nn.Module) -> FactorizedLinear | FactorizedEmbedding:
    """An empty factorized layer of a checked ``spec`` on ``like``'s device and dtype."""
    param = next(like.parameters(), None)
    return spec.build(  # filled by load_state_dict
        device=None if param is None else param.device,
        dtype=None if param is None else param.dtype,
    )


def _check_target(model: nn.Module, place: Place, spec: LayerSpec) -> nn.Module:
    """The module now at ``place.name``: an ``nn.Linear`` (or factorized layer) of the
    recorded feature counts."""
    name = place.name
    if not name:
        raise ValueError(
            "the saved model is itself a factorized layer: build it with FactorizedLinear(...) "
            "and use load_state_dict (load_model replaces submodules)"
        )
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(
            f"the saved model has a factorized layer at {name!r} but the given model has no "
            f"submodule there: build the same architecture before loading"
        ) from exc
    out_f, in_f = math.prod(spec.out_modes), math.prod(spec.in_modes)
    if spec.kind == "embedding":
        if not isinstance(module, nn.Embedding | FactorizedEmbedding | EmbeddingView):
            raise ValueError(
                f"{name!r} is a {type(module).__name__}; expected an nn.Embedding there"
            )
        got, saved = (module.num_embeddings, module.embedding_dim), (spec.num_embeddings, in_f)
        if got != saved:
            raise ValueError(
                f"{name!r} is {got} (num_embeddings, embedding_dim) in the given model but "
                f"{saved} in the saved one"
            )
        return module
    if not isinstance(module, nn.Linear | FactorizedLinear | LinearView):
        raise ValueError(f"{name!r} is a {type(module).__name__}; expected an nn.Linear there")
    if (module.out_features, module.in_features) != (out_f, in_f):
        raise ValueError(
            f"{name!r} is ({module.out_features}, {module.in_features}) (out, in) in the given "
            f"model but ({out_f}, {in_f}) in the saved one"
        )
    return module


def load_model(
    path: str | os.PathLike | nn.Module,
    base: nn.Module | str | os.PathLike | None = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Load a file written by :func:`save_model` into a fresh instance of the architecture.

    Every recorded place gets a factorized layer of the recorded spec (views of one joint
    layer share it again), then all weights are loaded with ``load_state_dict``. If anything
    fails, the model's modules are put back as they were. The argument order of
    ``safetensors.torch.load_model`` (the module, then the file) is accepted too.

    Args:
        path: a file written by :func:`save_model`.
        base: the same architecture as the saved model, uncompressed (e.g. ``MyNet()``) or
            already holding factorized layers of the same specs; it is changed in place.
        strict: as in ``nn.Module.load_state_dict``: every key must match.

    Returns:
        ``base``, now holding the saved weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TypeError: ``base`` is not a module, or ``path`` is not a file path.
        ValueError: the file is not ours, is corrupt, or does not fit ``base`` (the message
            names the layer and the shapes).

    Example:
        >>> import tempfile, torch, tensorized as tz
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        >>> net = make()
        >>> _ = tz.tensorize_(net, tz.TensorizeConfig(rank=0.5, order=2, progress=False))
        >>> path = tempfile.mkdtemp() + "/net.safetensors"
        >>> tz.save_model(net, path)
        >>> type(tz.load_model(path, base=make())[0]).__name__
        'FactorizedLinear'
    """
    file: str | os.PathLike | nn.Module | None = path
    if isinstance(path, nn.Module) and not isinstance(base, nn.Module):
        file, base = base, path  # safetensors' order: load_model(module, filename)
    if not isinstance(base, nn.Module):
        raise TypeError(
            f"base must be a torch.nn.Module (a fresh instance of the saved architecture, e.g. "
            f"MyNet()), got {type(base).__name__}"
        )
    if not isinstance(file, str | os.PathLike):
        raise TypeError(
            f"path must be a str or os.PathLike (the file written by save_model), got "
            f"{type(file).__name__}"
        )
    path = file
    model = base
    layout = read_layout(path)  # the whole header checked against the tensors' shapes
    built: dict[str, FactorizedLinear | FactorizedEmbedding] = {}
    swaps: list[tuple[str, nn.Module]] = []
    for place in layout.places:
        spec = layout.groups[place.group]
        target = _check_target(model, place, spec)
        if place.group not in built:
            built[place.group] = _build_layer(spec, target)
        layer = built[place.group]
        swaps.append((place.name, layer if place.index is None else spec.view(layer, place.index)))
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read the tensors of {str(path)!r}: {exc}") from exc
    for key, source in layout.aliases.items():
        state[key] = state[source]
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, new in swaps:
            done.append((name, model.get_submodule(name)))
            _set_submodule(model, name, new)
        model.load_state_dict(state, strict=strict)
    except BaseException as exc:
        for name, old in reversed(done):
            _set_submodule(model, name, old)
        if isinstance(exc, RuntimeError):  # load_state_dict's missing/unexpected/size errors
            raise ValueError(f"{str(path)!r} does not fit the given model: {exc}") from exc
        raise
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
