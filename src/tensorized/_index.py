"""The one rule for a layer index (``indices``) of a weight with a layer mode."""

from __future__ import annotations

import operator
from typing import SupportsIndex, cast

import torch
from torch import Tensor

__all__ = ["normalize_index"]


def normalize_index(indices: object, n_layers: int, name: str = "indices") -> int:
    """``indices`` as an int in ``[0, n_layers)``.

    Accepted: a Python or NumPy integer, or a one-element integer tensor; negative values
    count from the end, as in Python (``-1`` is the last layer). Booleans (Python, NumPy or
    tensor) and floats are refused.

    Raises:
        TypeError: for a value that is not an integer.
        IndexError: for an integer outside ``[-n_layers, n_layers)``.
    """
    value = indices
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"{name} must be an int layer index, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int layer index, got a bool tensor {value!r}")
        value = int(value.item())
    elif isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be an int layer index, got {type(value).__name__} {value!r}")
    else:
        try:
            value = operator.index(cast(SupportsIndex, value))  # int, numpy integers
        except TypeError:
            raise TypeError(
                f"{name} must be an int layer index, got {type(indices).__name__} {indices!r}"
            ) from None
    if not -n_layers <= value < n_layers:
        raise IndexError(
            f"{name}={value} is out of range for n_layers={n_layers} (valid: {-n_layers} to "
            f"{n_layers - 1})"
        )
    return value % n_layers
