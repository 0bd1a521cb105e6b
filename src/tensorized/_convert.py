"""Decomposing trained ``nn.Linear`` layers: the validation and decomposition behind
``FactorizedLinear.from_linear`` and ``from_linear_list`` (which wrap the result with
``FactorizedLinear.from_weight``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._ops import frobenius_error
from ._shapes import resolve_modes, validate_modes
from .formats import FactorizedMatrix, get_format


def check_linear_list(linear_list: Any) -> list[nn.Linear]:
    """``linear_list`` as a list of same-shaped, same-dtype ``nn.Linear`` (clear errors)."""
    if isinstance(linear_list, nn.Linear) or not isinstance(linear_list, Sequence | nn.ModuleList):
        raise TypeError(
            f"linear_list must be a list of nn.Linear, got {type(linear_list).__name__}"
        )
    linear_list = list(linear_list)
    if not linear_list:
        raise ValueError("linear_list is empty; give at least one nn.Linear")
    source = linear_list[0].weight
    for k, lin in enumerate(linear_list):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"linear_list[{k}] must be an nn.Linear, got {type(lin).__name__}")
        if lin.weight.shape != linear_list[0].weight.shape:
            raise ValueError(
                f"all layers must have the same shape: linear_list[0] is "
                f"{tuple(linear_list[0].weight.shape)} (out, in) but linear_list[{k}] is "
                f"{tuple(lin.weight.shape)}"
            )
        if (lin.weight.dtype, lin.weight.device) != (source.dtype, source.device):
            raise ValueError(
                f"all layers must have the same dtype and device: linear_list[0] is "
                f"{source.dtype} on {source.device} but linear_list[{k}] is "
                f"{lin.weight.dtype} on {lin.weight.device}"
            )
    return linear_list


def decompose_linears(
    linears: list[nn.Linear],
    in_spec: Any,
    out_spec: Any,
    rank: Any,
    bias: bool,
    factorization: str,
    decomposition_kwargs: dict[str, Any] | None,
    *,
    auto_tensorize: bool,
    n_tensorized_modes: int,
    verbose: bool,
    joint: bool,
) -> tuple[FactorizedMatrix, Tensor | bool]:
    """Decompose the stacked (``joint``) or single weight.

    Returns:
        The factorized weight and the bias for ``FactorizedLinear.from_weight``: the
        source's (stacked for ``joint``; zeros where a source has none) or ``False``.
    """
    source = linears[0].weight
    out_features, in_features = source.shape
    if (in_spec is None or out_spec is None) and not auto_tensorize:
        raise ValueError(
            "in_tensorized_features and out_tensorized_features are required when "
            "auto_tensorize=False"
        )
    modes = n_tensorized_modes
    if isinstance(modes, bool) or not isinstance(modes, int) or modes < 1:
        raise ValueError(f"n_tensorized_modes must be an int >= 1, got {modes!r}")
    if decomposition_kwargs is not None and not isinstance(decomposition_kwargs, dict):
        raise TypeError(
            f"decomposition_kwargs must be a dict, got {type(decomposition_kwargs).__name__}"
        )
    in_modes, out_modes = resolve_modes(
        in_features if in_spec is None else in_spec,
        out_features if out_spec is None else out_spec,
        n_tensorized_modes,
    )
    validate_modes(in_modes, in_features, "in_tensorized_features")
    validate_modes(out_modes, out_features, "out_tensorized_features")
    for k, lin in enumerate(linears):
        where = f"linear_list[{k}]" if joint else "linear"
        if not torch.isfinite(lin.weight).all():
            raise ValueError(f"{where}.weight contains NaN or Inf values; cannot decompose it")
        if bias and lin.bias is not None and not torch.isfinite(lin.bias).all():
            raise ValueError(f"{where}.bias contains NaN or Inf values")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
    W = torch.stack([lin.weight.detach() for lin in linears]) if joint else source.detach()
    start = time.perf_counter()
    fmt = get_format(factorization)
    weight = fmt.from_matrix(W, in_modes, out_modes, rank, **(decomposition_kwargs or {}))
    b: Tensor | bool = False
    if bias:
        with torch.no_grad():
            biases = [
                lin.bias.detach() if lin.bias is not None else torch.zeros_like(source[:, 0])
                for lin in linears
            ]
            b = torch.stack(biases) if joint else biases[0]
    if verbose:
        err = frobenius_error(W, weight.to_matrix().detach())
        print(
            f"FactorizedLinear.from_linear{'_list' if joint else ''}: {fmt.name} "
            f"rank={weight.rank}, relative weight error {err:.4g}, "
            f"{time.perf_counter() - start:.2f}s"
        )
    return weight, b
