"""Float64 dense oracles, built from the factor definitions with ``torch.einsum`` only.

Nothing here calls the library (no ``to_matrix``, ``tensorized._ops`` or
``tensorized.decompose``): each format's weight is re-derived from the shapes and names of its
parameters, so a test comparing the library against these fails on a library bug alone.
"""

import math
import string

import torch
from torch.nn import functional as F

F64 = torch.float64
_LETTERS = string.ascii_letters  # torch.einsum takes subscripts in a-zA-Z


def _einsum(operands, subscripts, out):
    """``einsum`` of float64 ``operands`` with per-operand subscript strings."""
    return torch.einsum(",".join(subscripts) + "->" + out, *(t.to(F64) for t in operands))


def _cp(layer, factors, weights):
    """``T[l, n_1..] = sum_r weights[r] * layer[l, r] * prod_k factors[k][n_k, r]``."""
    # Two halves contracted over z last: one einsum over every factor would (without
    # opt_einsum, which torch.einsum only uses when installed) go left to right through
    # (L, n_1..n_d, R), thousands of times the weight's size.
    modes = _LETTERS[1 : 1 + len(factors)]
    h = len(factors) // 2
    head = _einsum(
        [weights, layer, *factors[:h]],
        ["z", "az", *(m + "z" for m in modes[:h])],
        "a" + modes[:h] + "z",
    )
    tail = _einsum(factors[h:], [m + "z" for m in modes[h:]], modes[h:] + "z")
    return _einsum([head, tail], ["a" + modes[:h] + "z", modes[h:] + "z"], "a" + modes)


def _tucker(core, factors):
    """``core (L, *ranks)`` times ``factors[k] (n_k, r_k)`` along mode k (a None is identity)."""
    d = core.ndim - 1
    ranks, modes = _LETTERS[1 : 1 + d], _LETTERS[1 + d : 1 + 2 * d]
    ops, subs = [core], ["a" + ranks]
    for k, f in enumerate(factors):
        if f is not None:
            ops.append(f)
            subs.append(modes[k] + ranks[k])
    out = "".join(modes[k] if f is not None else ranks[k] for k, f in enumerate(factors))
    return _einsum(ops, subs, "a" + out)


def _train(cores):
    """The chain of ``cores (r_{k-1}, *n_k, r_k)`` (any number of middle modes per core),
    modes in core order, the boundary ranks kept: ``(r_0, *n, r_d)``."""
    ranks = iter(_LETTERS)
    left = next(ranks)
    subs, out = [], left
    for c in cores:
        modes = "".join(next(ranks) for _ in range(c.ndim - 2))
        right = next(ranks)
        subs.append(left + modes + right)
        out += modes
        left = right
    return _einsum(cores, subs, out + left)


def _layers(fm):
    """The weight of every layer, ``(L, out, in)`` (``L = 1`` without a layer mode)."""
    L, outs, ins = fm.n_layers, tuple(fm.out_modes), tuple(fm.in_modes)
    out_f, in_f = math.prod(outs), math.prod(ins)
    name = fm.name
    if name == "dense":
        return fm.weight.to(F64).reshape(L, out_f, in_f)
    if name == "lowrank":
        return _einsum([fm.U, fm.s, fm.V], ["aor", "ar", "air"], "aoi")
    if name == "basis":  # a basis V of the inputs shared by the layers' U_l
        return _einsum([fm.U, fm.V], ["aor", "ir"], "aoi")
    if name == "cp":
        factors = list(fm.factors)
        layer = factors.pop(0) if L > 1 else fm.weights.new_ones(1, fm.weights.shape[0])
        t = _cp(layer, factors, fm.weights)
    elif name == "tucker":
        core = fm.core if L > 1 else fm.core.unsqueeze(0)
        t = _tucker(core, list(fm.factors))
    elif name == "tt":
        t = _train(list(fm.cores))  # (1, [L,] *outs, *ins, 1)
    elif name == "blocktt":
        t = ttm_full(list(fm.cores), len(outs))  # ([L,] *outs, *ins)
    else:
        raise ValueError(f"no oracle for format {name!r}")
    return t.reshape(L, out_f, in_f)


def dense_weight(fm, indices=None):
    """The float64 weight of a format module ``fm`` (a ``FactorizedMatrix``).

    Returns ``(out, in)`` for layer ``indices`` (an int) or when ``n_layers == 1``, else
    ``(n_layers, out, in)``.
    """
    W = _layers(fm)
    if indices is None:
        return W if fm.n_layers > 1 else W[0]
    return W[indices] if fm.n_layers > 1 else W[0]


def dense_bias(bias, indices=0):
    """The float64 bias of layer ``indices`` (a joint layer's bias is ``(n_layers, out)``)."""
    if bias is None:
        return None
    return (bias[indices] if bias.ndim == 2 else bias).to(F64)


def dense_forward(layer, x, indices=0):
    """Float64 ``FactorizedLinear`` output: ``x W_i^T + b_i`` from the einsum oracle."""
    n = layer.weight.n_layers
    W = dense_weight(layer.weight, indices if n > 1 else None)
    return F.linear(x.to(F64), W, dense_bias(layer.bias, indices))


def rel_error(ref, approx):
    """``||ref - approx|| / ||ref||`` in float64 (``||approx||`` when ``ref`` is zero), scaled by
    ``ref``'s peak first so that the squares neither overflow nor underflow."""
    ref, approx = ref.detach().to(F64), approx.detach().to(F64)
    peak = ref.abs().max()
    if peak > 0:
        ref, approx = ref / peak, approx / peak
    diff = (ref - approx).norm()
    return float(diff / ref.norm()) if peak > 0 else float(diff)


# ---------------------------------------------------------------- decomposition results


def cp_full(res):
    """The tensor of a CP result (``weights (R,)``, ``factors [(n_k, R)]``)."""
    ones = res.weights.new_ones(1, res.weights.shape[0])
    return _cp(ones, list(res.factors), res.weights)[0]


def tucker_full(res):
    """The tensor of a Tucker result (``core``, ``factors``; a ``None`` factor is identity)."""
    return _tucker(res.core.unsqueeze(0), list(res.factors))[0]


def tt_full(cores):
    """The tensor of a tensor train with cores ``(r, n_k, r')`` (or TT-matrix cores
    ``(r, o_k, i_k, r')``: then the modes come interleaved, ``o_1, i_1, o_2, ...``)."""
    t = _train(list(cores))
    return t.reshape(t.shape[1:-1])


def ttm_full(cores, n_pairs):
    """The tensor of a TT-matrix train whose last ``n_pairs`` cores are ``(r, o_k, i_k, r')``
    (any before them, e.g. a layer core ``(1, L, r)``, are plain): modes ``(lead, *o, *i)``."""
    t = tt_full(cores)
    lead = t.ndim - 2 * n_pairs
    outs = [lead + 2 * k for k in range(n_pairs)]
    return t.permute(*range(lead), *outs, *(k + 1 for k in outs))
