"""Inputs of the command line: saved modules, Hugging Face directories, calibration files.

Kept apart from :mod:`tensorized.cli` (argument parsing and commands) so each stays small.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

TORCH_SUFFIXES = (".pt", ".pth")


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class CLIError(Exception):
    """A problem with the command's input: reported in one line, exit code 2."""


def _torch_load(path: Path, *, weights_only: bool, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not loadable"
        raise CLIError(
            f"cannot load {what} {str(path)!r} with torch.load: {_one_line(exc)}"
        ) from exc


def _transformers(quiet: bool = False) -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise CLIError(
            "loading a Hugging Face model directory needs transformers: pip install transformers"
        ) from None
    if quiet:  # its loading bars and notices
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(path: str | Path, *, quiet: bool = False) -> tuple[nn.Module, Path | None]:
    """Load ``path``: a ``torch.save``'d module file, a folder holding ``model.pt``, or a
    Hugging Face model folder (``config.json``; loaded offline with ``AutoModel``).

    Args:
        path: the file or folder.
        quiet: silence transformers' progress bars and notices.

    Returns:
        The module (in eval mode for Hugging Face models) and, for a Hugging Face folder,
        that folder (where its tokenizer lives), else ``None``.
    """
    p = Path(path)
    if not p.exists():
        raise CLIError(f"model path {str(p)!r} does not exist")
    hf_dir = None
    if p.is_dir():
        if (p / "config.json").is_file():
            transformers = _transformers(quiet)
            try:
                model = transformers.AutoModel.from_pretrained(str(p), local_files_only=True)
            except Exception as exc:
                raise CLIError(
                    f"cannot load Hugging Face model {str(p)!r}: {_one_line(exc)}"
                ) from exc
            hf_dir = p
        elif (p / "model.pt").is_file():
            model = _torch_load(p / "model.pt", weights_only=False, what="model")
        else:
            raise CLIError(
                f"{str(p)!r} is a folder without config.json (Hugging Face model) or model.pt"
            )
    else:
        model = _torch_load(p, weights_only=False, what="model")
    if not isinstance(model, nn.Module):
        raise CLIError(
            f"{str(p)!r} holds a {type(model).__name__}, not an nn.Module: save the whole "
            f"module with torch.save(model, path), not its state_dict"
        )
    return model, hf_dir


def _cast(item: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) to the model's dtype."""
    if isinstance(item, torch.Tensor):
        return item.to(dtype) if item.is_floating_point() else item
    if isinstance(item, dict):
        return {k: _cast(v, dtype) for k, v in item.items()}
    if isinstance(item, tuple | list):
        return type(item)(_cast(v, dtype) for v in item)
    return item


def load_calibration(
    path: str | Path,
    model: nn.Module,
    hf_dir: Path | None,
    *,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[Any]:
    """Calibration batches from ``path``.

    A ``.pt``/``.pth`` file (``torch.load(weights_only=True)``) holds a tensor (its rows are
    split into batches of ``batch_size``), a dict of tensors (split the same way, one keyword
    input each) or a list of batches (tensors, tuples of positional inputs or dicts of
    keyword inputs), used as is. Any other file is text, one input per line, for a Hugging
    Face model: tokenized by the model folder's tokenizer in batches of ``batch_size``.
    """
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"calibration file {str(p)!r} does not exist")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    if p.suffix.lower() not in TORCH_SUFFIXES:
        if hf_dir is None:
            raise CLIError(
                f"text calibration {str(p)!r} needs a Hugging Face model folder (for its "
                f"tokenizer); for a .pt model give a torch.save'd tensor or list (.pt)"
            )
        lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]
        if not lines:
            raise CLIError(f"calibration file {str(p)!r} has no non-empty line")
        try:
            tok = _transformers().AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        except CLIError:
            raise
        except Exception as exc:
            raise CLIError(
                f"cannot load the tokenizer of {str(hf_dir)!r}: {_one_line(exc)}"
            ) from exc
        chunks = [lines[i : i + batch_size] for i in range(0, len(lines), batch_size)]
        options = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return [dict(tok(chunk, **options)) for chunk in chunks]
    data = _torch_load(p, weights_only=True, what="calibration data")
    if isinstance(data, torch.Tensor):
        batches = list(data.split(batch_size)) if data.ndim else []
    elif isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        n = min((len(v) for v in data.values()), default=0)
        batches = [
            {k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)
        ]
    elif isinstance(data, list | tuple):
        batches = list(data)
    else:
        raise CLIError(
            f"calibration file {str(p)!r} holds a {type(data).__name__}; expected a tensor, a "
            f"dict of tensors or a list of batches"
        )
    if not batches:
        raise CLIError(f"calibration file {str(p)!r} holds no batch")
    return [_cast(b, dtype) for b in batches]


# ---------------------------------------------------------------------- commands
