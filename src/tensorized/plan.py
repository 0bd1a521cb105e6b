"""Cost model of the ways to compute ``x @ W.T`` for a factorized weight.

Counts are the FLOPs of the matrix products (2 per multiply-add), which dominate every path;
element-wise work (Khatri-Rao products, scaling) is linear in the data and left out. The counts
mirror the code of each format exactly, which the tests check with
``torch.utils.flop_counter.FlopCounterMode``.

Two strategies:

* ``'reconstructed'``: rebuild ``W`` from the factors, then one GEMM ``x @ W.T``.
* ``'factorized'``: contract ``x`` with the factors one at a time (``FactorizedMatrix.contract``).
"""

from __future__ import annotations

import math

from .formats.base import FactorizedMatrix

__all__ = ["IMPLEMENTATIONS", "choose_implementation", "contract_flops", "reconstruct_flops"]

IMPLEMENTATIONS = ("auto", "factorized", "reconstructed")


def _chain_flops(cores_shapes: list[tuple[int, ...]]) -> int:
    """Matmul FLOPs of multiplying out a train of cores ``(r, *sizes, r')`` left to right."""
    flops, rows = 0, math.prod(cores_shapes[0][:-1])
    for shape in cores_shapes[1:]:
        r, r_next = shape[0], shape[-1]
        inner = math.prod(shape[1:-1])
        flops += 2 * rows * r * inner * r_next
        rows *= inner
    return flops


def _layer_merge_flops(weight: FactorizedMatrix) -> int:
    """Absorbing the layer core's row into the next core (train formats with a layer mode)."""
    if weight.n_layers == 1:
        return 0
    return 2 * weight.cores[1].numel()


def _layer_core_shapes(weight: FactorizedMatrix) -> list[tuple[int, ...]]:
    """Shapes of the cores of one layer, as ``TrainMatrix._layer_cores`` returns them."""
    shapes = [tuple(c.shape) for c in weight.cores]
    if weight.n_layers > 1:
        shapes = [(1, *shapes[1][1:]), *shapes[2:]]
    return shapes


def reconstruct_flops(weight: FactorizedMatrix) -> int:
    """Matmul FLOPs of ``weight.to_matrix(layer)`` for one layer."""
    name, O, I = weight.name, weight.out_features, weight.in_features
    if name == "dense":
        return 0
    if name == "lowrank":
        return 2 * O * weight.rank * I
    if name == "cp":
        return 2 * O * weight.rank * I
    if name == "tucker":
        dims = list(weight.rank)
        flops = 0
        for k, n in enumerate(weight.out_modes + weight.in_modes):
            flops += 2 * math.prod(dims) * n
            dims[k] = n
        return flops
    if name in ("tt", "blocktt"):
        return _layer_merge_flops(weight) + _chain_flops(_layer_core_shapes(weight))
    raise ValueError(f"no cost model for format {name!r}")


def contract_flops(weight: FactorizedMatrix, batch: int) -> int:
    """Matmul FLOPs of ``weight.contract(x, layer)`` for ``batch`` rows of ``x``."""
    name, O, I, B = weight.name, weight.out_features, weight.in_features, batch
    if name == "dense":
        return 2 * B * O * I
    if name in ("lowrank", "cp"):
        return 2 * B * weight.rank * (I + O)
    if name == "tucker":
        m = len(weight.out_modes)
        r_out, r_in = weight.rank[:m], weight.rank[m:]
        flops, dims = 0, list(weight.in_modes)
        for k, r in enumerate(r_in):
            flops += 2 * B * math.prod(dims) * r
            dims[k] = r
        flops += 2 * B * math.prod(r_in) * math.prod(r_out)
        dims = list(r_out)
        for k, o in enumerate(weight.out_modes):
            flops += 2 * B * math.prod(dims) * o
            dims[k] = o
        return flops
    if name == "tt":
        m = len(weight.out_modes)
        cores = _layer_core_shapes(weight)
        flops, rows = _layer_merge_flops(weight), B * I
        for r, i, r_next in reversed(cores[m:]):
            rows //= i
            flops += 2 * rows * i * r_next * r
        rest = 1
        for r, o, r_next in reversed(cores[:m]):
            flops += 2 * B * r * o * r_next * rest
            rest *= o
        return flops
    if name == "blocktt":
        flops, done, rest = _layer_merge_flops(weight), 1, I
        for r, o, i, r_next in _layer_core_shapes(weight):
            rest //= i
            flops += 2 * B * done * o * r_next * r * i * rest
            done *= o
        return flops
    raise ValueError(f"no cost model for format {name!r}")


def choose_implementation(weight: FactorizedMatrix, batch: int) -> str:
    """The cheaper of ``'factorized'`` and ``'reconstructed'`` for ``batch`` rows."""
    dense_gemm = 2 * batch * weight.out_features * weight.in_features
    reconstructed = reconstruct_flops(weight) + dense_gemm
    return "factorized" if contract_flops(weight, batch) <= reconstructed else "reconstructed"
