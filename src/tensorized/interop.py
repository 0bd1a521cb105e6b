"""Conversion of a layer's factorized weight to and from TensorLy's tensor objects.

TensorLy is imported only inside these functions (it is not a dependency). The tensor is the
weight viewed as ``([n_layers,] *out_modes, *in_modes)``, as in :class:`FactorizedLinear`:

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

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .shapes import validate_modes

if TYPE_CHECKING:
    from .linear import FactorizedLinear

__all__ = ["from_tensorly", "to_tensorly"]


def _to_backend(t: Tensor) -> Any:
    import tensorly as tl

    t = t.detach()
    if tl.get_backend() == "pytorch":
        return tl.tensor(t.clone())
    return tl.tensor(t.cpu().numpy())


def to_tensorly(layer: FactorizedLinear) -> Any:
    """The layer's weight as a TensorLy object (a detached copy; see the module docstring)."""
    from tensorly.cp_tensor import CPTensor
    from tensorly.tt_matrix import TTMatrix
    from tensorly.tt_tensor import TTTensor
    from tensorly.tucker_tensor import TuckerTensor

    w, fmt, L = layer.weight, layer.factorization, layer.n_layers
    conv = _to_backend
    if fmt == "cp":
        return CPTensor((conv(w.weights), [conv(f) for f in w.factors]))
    if fmt == "tucker":
        factors = [conv(f) for f in w.factors]
        if L > 1:
            eye = torch.eye(L, dtype=w.core.dtype, device=w.core.device)
            factors.insert(0, conv(eye))
        return TuckerTensor((conv(w.core), factors))
    if fmt == "tt":
        return TTTensor([conv(c) for c in w.cores])
    if fmt == "blocktt":
        cores = list(w.cores)
        if L > 1:
            cores[0] = cores[0].unsqueeze(2)
        return TTMatrix([conv(c) for c in cores])
    if fmt == "lowrank":
        if L > 1:
            raise ValueError(
                "a 'lowrank' layer with n_layers > 1 holds independent matrices, not one "
                f"tensor (n_layers={L}); convert layer i with layer.get_linear(i).to_linear()"
            )
        return CPTensor((conv(w.s[0]), [conv(w.U[0]), conv(w.V[0])]))
    modes = _shape(layer.out_tensorized_features, layer.in_tensorized_features, L)
    return conv(w.weight.reshape(modes))


def _shape(out_modes: tuple, in_modes: tuple, n_layers: int) -> tuple[int, ...]:
    return ((n_layers,) if n_layers > 1 else ()) + tuple(out_modes) + tuple(in_modes)


def _torch(a: Any, dtype: torch.dtype | None, device: Any) -> Tensor:
    import tensorly as tl

    t = a if isinstance(a, Tensor) else torch.as_tensor(tl.to_numpy(a))
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone()


def from_tensorly(
    cls: type[FactorizedLinear],
    tensor: Any,
    in_tensorized_features: Sequence[int],
    out_tensorized_features: Sequence[int],
    bias: bool = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> FactorizedLinear:
    """A layer whose weight is ``tensor`` (see :meth:`FactorizedLinear.from_tensorly`)."""
    from tensorly.cp_tensor import CPTensor
    from tensorly.tt_matrix import TTMatrix
    from tensorly.tt_tensor import TTTensor
    from tensorly.tucker_tensor import TuckerTensor

    in_modes = validate_modes(in_tensorized_features, None, "in_tensorized_features")
    out_modes = validate_modes(out_tensorized_features, None, "out_tensorized_features")
    n_in_out = len(in_modes) + len(out_modes)
    known = (CPTensor, TuckerTensor, TTTensor, TTMatrix, Tensor)
    if not (isinstance(tensor, known) or type(tensor).__module__.startswith("numpy")):
        raise TypeError(
            "tensor must be a TensorLy CPTensor, TuckerTensor, TTTensor or TTMatrix, or a "
            f"dense array, got {type(tensor).__name__}"
        )
    shape = tuple(int(n) for n in tensor.shape)
    order = len(shape)
    n_layers = shape[0] if order == n_in_out + 1 else 1
    if isinstance(tensor, TTMatrix):  # shape is (*row modes, *column modes)
        rows, cols = shape[: order // 2], shape[order // 2 :]
        if len(rows) == len(out_modes) + 1 and cols[0] == 1:
            n_layers, rows, cols = rows[0], rows[1:], cols[1:]
        ok = (rows, cols) == (out_modes, in_modes)
    else:
        ok = shape == _shape(out_modes, in_modes, n_layers)
    # an order-2 CP tensor of the matrix's shape is a low-rank matrix: the 'lowrank' format
    matrix = (math.prod(out_modes), math.prod(in_modes))
    lowrank = isinstance(tensor, CPTensor) and shape == matrix and n_in_out > 2
    if not (ok or lowrank):
        raise ValueError(
            f"tensor has shape {shape} but out_tensorized_features={out_modes} and "
            f"in_tensorized_features={in_modes} need ([n_layers,] *out, *in) = "
            f"{_shape(out_modes, in_modes, 1)} with an optional leading layer mode"
        )

    def conv(a: Any) -> Tensor:
        return _torch(a, dtype, device)

    if lowrank:
        s, (u, v) = conv(tensor.weights), (conv(f) for f in tensor.factors)
        params: dict[str, Any] = {"s": s[None], "U": u[None], "V": v[None]}
        fmt, rank = "lowrank", int(s.shape[0])
    elif isinstance(tensor, CPTensor):
        weights, factors = conv(tensor.weights), [conv(f) for f in tensor.factors]
        params = {"weights": weights, "factors": factors}
        fmt, rank = "cp", int(weights.shape[0])
    elif isinstance(tensor, TuckerTensor):
        core, factors = conv(tensor.core), [conv(f) for f in tensor.factors]
        if n_layers > 1:  # absorb the layer factor: the layer mode is kept at full size
            lead = factors.pop(0)
            core = torch.tensordot(lead, core, dims=([1], [0]))
        params, fmt, rank = {"core": core, "factors": factors}, "tucker", tuple(core.shape)
        rank = rank[1:] if n_layers > 1 else rank
    elif isinstance(tensor, TTTensor | TTMatrix):
        cores = [conv(c) for c in tensor.factors]
        if isinstance(tensor, TTMatrix) and n_layers > 1:
            cores[0] = cores[0].squeeze(2)
        fmt = "tt" if isinstance(tensor, TTTensor) else "blocktt"
        params, rank = {"cores": cores}, tuple(int(c.shape[-1]) for c in cores[:-1])
    else:
        dense = conv(tensor).reshape(n_layers, math.prod(out_modes), math.prod(in_modes))
        params, fmt, rank = {"weight": dense if n_layers > 1 else dense[0]}, "dense", "same"
    first = next(iter(params.values()))
    first = first[0] if isinstance(first, list) else first
    new = cls(
        in_modes,
        out_modes,
        bias,
        fmt,
        rank,
        n_layers,
        device=first.device,
        dtype=first.dtype,
        **kwargs,
    )
    return _filled(new, params)


def _filled(layer: FactorizedLinear, params: dict[str, Any]) -> FactorizedLinear:
    """``layer`` with its weight's parameters set to ``params`` and a zero bias."""
    with torch.no_grad():
        for name, value in params.items():
            target = getattr(layer.weight, name)
            pairs = zip(target, value) if isinstance(value, list) else [(target, value)]
            for p, v in pairs:
                if p.shape != v.shape:
                    raise ValueError(
                        f"{layer.factorization} {name} of shape {tuple(v.shape)} does not fit "
                        f"the layer's {tuple(p.shape)}"
                    )
                p.copy_(v)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer
