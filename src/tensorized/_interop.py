"""Conversion of a factorized weight to and from TensorLy's tensor objects.

TensorLy is imported only inside these functions (it is not a dependency). The tensor is the
weight viewed as ``([n_layers,] *out_modes, *in_modes)``, as in :class:`FactorizedLinear`.
Each format owns its conversion (``FactorizedMatrix.to_tensorly`` / ``from_tensorly``); the
built-in ones:

=========== ============================= =====================================================
format      TensorLy object               notes
=========== ============================= =====================================================
cp          ``CPTensor``                  the layer mode, if any, is its first factor
tucker      ``TuckerTensor``              the layer mode gets an identity factor
tt          ``TTTensor``                  the layer core ``(1, L, r)`` comes first
blocktt     ``TTMatrix``                  the layer core becomes ``(1, L, 1, r)``: row modes
                                          ``(L, *out)``, column modes ``(1, *in)``
lowrank     ``CPTensor`` of order 2       ``n_layers=1`` only (the layers are independent)
dense       a plain tensor
=========== ============================= =====================================================

Arrays are in TensorLy's current backend (torch tensors on the parameters' device for the
``'pytorch'`` backend, NumPy arrays otherwise); the backend is never changed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._shapes import validate_modes
from .formats import FORMATS, FactorizedMatrix

__all__ = ["from_tensorly", "to_tensorly"]


def _to_backend(t: Tensor) -> Any:
    import tensorly as tl

    t = t.detach()
    if tl.get_backend() == "pytorch":
        return tl.tensor(t.clone())
    return tl.tensor(t.cpu().numpy())


def to_tensorly(weight: FactorizedMatrix) -> Any:
    """``weight`` as a TensorLy object (a detached copy; see the module docstring)."""
    return weight.to_tensorly(_to_backend)


def from_tensorly(
    tensor: Any,
    in_tensorized_features: Sequence[int],
    out_tensorized_features: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FactorizedMatrix:
    """The factorized weight holding TensorLy object ``tensor`` (the first registered format
    that recognizes it), on ``device`` with ``dtype`` (default: those of its arrays)."""
    import tensorly as tl

    in_modes = validate_modes(in_tensorized_features, None, "in_tensorized_features")
    out_modes = validate_modes(out_tensorized_features, None, "out_tensorized_features")
    if not hasattr(tensor, "shape"):
        raise TypeError(
            "tensor must be a TensorLy CPTensor, TuckerTensor, TTTensor or TTMatrix, or a "
            f"dense array, got {type(tensor).__name__}"
        )

    def convert(a: Any) -> Tensor:
        t = a if isinstance(a, Tensor) else torch.as_tensor(tl.to_numpy(a))
        return t.detach().to(device=device, dtype=dtype or t.dtype).clone()

    for cls in FORMATS.values():
        module = cls.from_tensorly(tensor, in_modes, out_modes, convert)
        if module is not None:
            return module
    shape = tuple(int(n) for n in tensor.shape)
    body = tuple(out_modes) + tuple(in_modes)
    raise ValueError(
        f"tensor has shape {shape} but out_tensorized_features={out_modes} and "
        f"in_tensorized_features={in_modes} need a TensorLy CPTensor, TuckerTensor, TTTensor, "
        f"TTMatrix or dense array of shape ([n_layers,] *out, *in) = {body} with an optional "
        f"leading layer mode (got a {type(tensor).__name__})"
    )
