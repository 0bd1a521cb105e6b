"""Cost model and planner for computing ``x @ W.T`` with a factorized weight.

Every strategy of every format is described by the list of matrix products its code runs
(:func:`gemms`), mirroring that code exactly (the tests check the FLOPs against
``torch.utils.flop_counter.FlopCounterMode``). From that list come its FLOPs (2 per
multiply-add), its memory traffic (operands read, results written) and its kernel calls; a
small machine model (a roofline per product plus a per-call overhead) turns them into an
estimated time, and the planner picks the fastest.

Strategies (``FactorizedMatrix.strategies``):

* ``'reconstructed'``: rebuild ``W`` from the factors, then one GEMM.
* ``'factorized'``: contract ``x`` with the factors one at a time: CP through the
  Khatri-Rao products of the in and out factors (two GEMMs), Tucker mode by mode (each on
  the last axis, last mode first), TT in-cores then out-cores, TT-matrix core by core,
  low-rank ``V`` then ``U``.
* ``'kron'`` (Tucker): the Kronecker products of the in- and out-factors, with the core
  folded into the side of larger rank: two GEMMs through ``min(R_in, R_out)``.
* ``'halves'`` (TT): multiply out the in-cores and the out-cores into two matrices
  ``(r, in)`` and ``(out, r)``, then two GEMMs, like a low-rank layer of rank ``r``.
* ``'sequential'`` (CP): mode by mode without Khatri-Rao products: one GEMM on the last in
  mode, element-wise folds of the others, the mirror image on the out side; cheap when
  ``batch * R`` is small.

Each strategy is split into ``prepare`` (work on the weight alone: Khatri-Rao or Kronecker
products, multiplied-out halves, the reconstruction) and ``apply`` (work on the input). In
inference (no autograd) ``FactorizedLinear`` caches the prepared operands until a parameter
changes, so only ``apply`` is paid per call; in training both are. Backward costs about twice
the forward FLOPs for every strategy (each product needs the gradients of both operands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .formats.base import FactorizedMatrix

__all__ = ["MACHINES", "Plan", "StrategyCost", "WeightShape", "gemms", "make_plan"]

# (m, k, n, count): ``count`` products of one (m, k) matrix by a (k, n) matrix each.
Gemm = tuple[int, int, int, int]


@dataclass(frozen=True)
class WeightShape:
    """What the cost model needs of a factorized weight: its shapes, no tensors.

    Plain constants, so that planning while ``torch.compile`` traces sees no module (see
    :attr:`FactorizedMatrix.shape_signature`, of which this is the named form).
    """

    name: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rank: int | tuple[int, ...]
    n_layers: int
    core_shapes: tuple[tuple[int, ...], ...]  # TT / TT-matrix cores; () for other formats
    strategies: tuple[str, ...]
    num_params: int

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)


def _shape_of(weight: FactorizedMatrix | WeightShape) -> WeightShape:
    return weight if isinstance(weight, WeightShape) else WeightShape(*weight.shape_signature)


@dataclass(frozen=True)
class Machine:
    """A crude machine model: GEMM rate, memory bandwidth and per-call overhead."""

    flops_per_s: float
    bytes_per_s: float
    call_overhead_s: float
    elementwise_bytes_per_s: float  # broadcast element-wise kernels (and their backward)


MACHINES: dict[str, Machine] = {
    "cpu": Machine(120e9, 20e9, 15e-6, elementwise_bytes_per_s=6e9),
    "cuda": Machine(40e12, 1.5e12, 8e-6, elementwise_bytes_per_s=1e12),
}


@dataclass(frozen=True)
class StrategyCost:
    """Costs of one strategy at one batch size (forward; backward is about 2x)."""

    name: str
    forward_flops: int
    backward_flops: int
    bytes_moved: int
    kernel_calls: int
    seconds: float

    @property
    def flops(self) -> int:
        return self.forward_flops


@dataclass(frozen=True)
class Plan:
    """The strategy chosen for one (batch size, dtype, device, mode) and what each would cost.

    ``str(plan)`` is a table a person can read.
    """

    factorization: str
    batch_size: int
    training: bool
    dtype: torch.dtype
    device_type: str
    chosen: str
    costs: dict[str, StrategyCost] = field(repr=False)

    @property
    def flops(self) -> int:
        """Forward FLOPs of the chosen strategy."""
        return self.costs[self.chosen].forward_flops

    @property
    def strategies(self) -> tuple[str, ...]:
        return tuple(self.costs)

    def __str__(self) -> str:
        mode = "training" if self.training else "inference"
        lines = [
            f"plan for {self.factorization} at batch {self.batch_size} ({mode}, {self.dtype}, "
            f"{self.device_type}): {self.chosen}",
            "| strategy | fwd MFLOP | bwd MFLOP | MB moved | calls | est. us |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.costs.values():
            mark = " *" if c.name == self.chosen else ""
            lines.append(
                f"| {c.name}{mark} | {c.forward_flops / 1e6:.3g} | {c.backward_flops / 1e6:.3g} "
                f"| {c.bytes_moved / 1e6:.3g} | {c.kernel_calls} | {c.seconds * 1e6:.3g} |"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------ products of each strategy


def _train_shapes(weight: WeightShape) -> list[tuple[int, ...]]:
    """Core shapes of one layer, as ``TrainMatrix._layer_cores`` returns them."""
    shapes = list(weight.core_shapes)
    if weight.n_layers > 1:
        shapes = [(1, *shapes[1][1:]), *shapes[2:]]
    return shapes


def _layer_merge(weight: WeightShape) -> list[Gemm]:
    if weight.n_layers == 1:
        return []
    nxt = weight.core_shapes[1]
    return [(1, nxt[0], math.prod(nxt[1:]), 1)]


def _chain(shapes: list[tuple[int, ...]]) -> list[Gemm]:
    """Multiplying out a train of cores ``(r, *sizes, r')`` left to right."""
    out, rows = [], math.prod(shapes[0][:-1])
    for shape in shapes[1:]:
        r, r_next, inner = shape[0], shape[-1], math.prod(shape[1:-1])
        out.append((rows, r, inner * r_next, 1))
        rows *= inner
    return out


def _reconstruct(weight: WeightShape) -> list[Gemm]:
    name, O, I = weight.name, weight.out_features, weight.in_features
    if name == "dense":
        return []
    if name in ("lowrank", "cp"):
        return [(O, weight.rank, I, 1)]
    if name == "tucker":
        dims, out = list(weight.rank), []
        for k, n in enumerate(weight.out_modes + weight.in_modes):
            out.append((math.prod(dims) // dims[k], dims[k], n, 1))
            dims[k] = n
        return out
    return _layer_merge(weight) + _chain(_train_shapes(weight))


def _tucker_factorized(weight: WeightShape, B: int) -> list[Gemm]:
    """Mode by mode on the last axis, last mode first (``TuckerMatrix._apply_factorized``)."""
    m = len(weight.out_modes)
    r_out, r_in = weight.rank[:m], weight.rank[m:]
    out = []
    for sizes, ranks in ((weight.in_modes, r_in), (r_out, weight.out_modes)):
        done = 1  # product of the sizes already replaced
        for k in reversed(range(len(sizes))):
            rows = B * math.prod(sizes[:k]) * done
            out.append((rows, sizes[k], ranks[k], 1))
            done *= ranks[k]
        if sizes is weight.in_modes:
            out.append((B, math.prod(r_in), math.prod(r_out), 1))
    return out


def _tucker_kron(weight: WeightShape) -> tuple[list[Gemm], int]:
    """Folding the core into one Kronecker side; returns the GEMMs and the middle rank."""
    m = len(weight.out_modes)
    R_out, R_in = math.prod(weight.rank[:m]), math.prod(weight.rank[m:])
    if R_in <= R_out:
        return [(weight.out_features, R_out, R_in, 1)], R_in
    return [(R_out, R_in, weight.in_features, 1)], R_out


def _tt_factorized(weight: WeightShape, B: int) -> list[Gemm]:
    m = len(weight.out_modes)
    cores = _train_shapes(weight)
    out, rows = [], B * weight.in_features
    for r, i, r_next in reversed(cores[m:]):
        rows //= i
        out.append((rows, i * r_next, r, 1))
    rest = B  # the out side runs with the batch as the last axis (plain GEMMs)
    for r, o, r_next in reversed(cores[:m]):
        out.append((r * o, r_next, rest, 1))
        rest *= o
    return out


def _ttm_factorized(weight: WeightShape, B: int) -> list[Gemm]:
    out, done, rest = [], 1, weight.in_features
    for r, o, i, r_next in _train_shapes(weight):
        rest //= i
        out.append((o * r_next, r * i, rest, B * done))
        done *= o
    return out


def gemms(
    weight: FactorizedMatrix | WeightShape, strategy: str, batch: int
) -> tuple[list[Gemm], list[Gemm]]:
    """The matrix products ``(m, k, n, count)`` of ``strategy`` for ``batch`` rows, split
    into the weight-only ``prepare`` step (cacheable in inference) and the ``apply`` step."""
    weight = _shape_of(weight)
    name, O, I, B = weight.name, weight.out_features, weight.in_features, batch
    if strategy not in weight.strategies:
        raise ValueError(
            f"strategy {strategy!r} is not defined for factorization {name!r}; its strategies "
            f"are {weight.strategies}"
        )
    if strategy == "reconstructed" or name == "dense":
        return _reconstruct(weight), [(B, I, O, 1)]
    if strategy == "kron":
        prepare, mid = _tucker_kron(weight)
        return prepare, [(B, I, mid, 1), (B, mid, O, 1)]
    if strategy == "halves":
        m = len(weight.out_modes)
        cores = _train_shapes(weight)
        r = cores[m][0]
        prepare = _layer_merge(weight) + _chain(cores[:m]) + _chain(cores[m:])
        return prepare, [(B, I, r, 1), (B, r, O, 1)]
    if strategy == "sequential":  # CP mode by mode
        R, i_last, o_last = weight.rank, weight.in_modes[-1], weight.out_modes[-1]
        return [], [(B * I // i_last, i_last, R, 1), (B * O // o_last, R, o_last, 1)]
    if name in ("lowrank", "cp"):
        return [], [(B, I, weight.rank, 1), (B, weight.rank, O, 1)]
    if name == "tucker":
        return [], _tucker_factorized(weight, B)
    if name == "tt":
        return _layer_merge(weight), _tt_factorized(weight, B)
    return _layer_merge(weight), _ttm_factorized(weight, B)


def _apply_numel(weight: WeightShape, strategy: str, batch: int) -> int:
    """Elements written by element-wise work in ``apply`` (CP's sequential folds)."""
    if strategy != "sequential":
        return 0
    total, ins, outs = 0, weight.in_modes, weight.out_modes
    for k in range(len(ins) - 1):  # a product of B * prod(ins[:k+1]) * R, then its sum
        total += batch * weight.rank * (math.prod(ins[: k + 1]) + math.prod(ins[:k]))
    for k in range(len(outs) - 1):
        total += batch * weight.rank * math.prod(outs[: k + 1])
    return total


def _copied_numel(weight: WeightShape, strategy: str, batch: int) -> int:
    """Elements copied between products in ``apply`` (the tests count them in the code).

    Tucker's factorized path rotates each mode product's output (``movedim``), so the next
    product (or the final reshape) makes it contiguous once.
    """
    if strategy != "factorized":
        return 0
    if weight.name == "tucker":
        products = _tucker_factorized(weight, batch)
        k_in = len(weight.in_modes)  # products[k_in], the core GEMM, writes contiguously
        return sum(m * n for m, _, n, _ in products[:k_in] + products[k_in + 1 :])
    if weight.name == "blocktt":
        # torch.matmul((m, k), (c, k, n)) folds into one GEMM on transposed copies: the
        # (c, k, n) operand (when c > 1) and the (c, m, n) result; nothing when n == 1.
        return sum(
            (c * k * n if c > 1 else 0) + c * m * n
            for m, k, n, c in _ttm_factorized(weight, batch)
            if n > 1
        )
    return 0


def _prepared_numel(weight: WeightShape, strategy: str) -> int:
    """Elements written by element-wise work in ``prepare`` (Khatri-Rao, Kronecker, copies)."""
    name, O, I = weight.name, weight.out_features, weight.in_features
    if strategy == "reconstructed" or name == "dense":
        return O * I
    if strategy == "sequential":  # hands the factors over as they are
        return 0
    if name in ("cp", "lowrank"):
        return (I + O) * weight.rank
    if strategy == "kron":
        m = len(weight.out_modes)
        return I * math.prod(weight.rank[m:]) + O * math.prod(weight.rank[:m])
    if strategy == "halves":
        return (I + O) * _train_shapes(weight)[len(weight.out_modes)][0]
    return weight.num_params if name == "blocktt" else 0


# ------------------------------------------------------------------ planning


def strategy_cost(
    weight: FactorizedMatrix | WeightShape,
    strategy: str,
    batch: int,
    dtype: torch.dtype,
    device_type: str,
    training: bool = False,
) -> StrategyCost:
    """FLOPs, bytes, calls and estimated seconds of one strategy.

    In inference (``training=False``) the weight-only ``prepare`` step is cached across calls
    and costs nothing per call; in training it is paid every call, with its backward.
    """
    weight = _shape_of(weight)
    prepare, apply = gemms(weight, strategy, batch)
    products = prepare + apply if training else apply
    itemsize = torch.empty((), dtype=dtype).element_size()
    machine = MACHINES.get(device_type, MACHINES["cpu"])
    rate = machine.flops_per_s / (2 if dtype == torch.float64 else 1)
    flops = moved = 0
    seconds = len(products) * machine.call_overhead_s
    for m, k, n, c in products:
        # Roofline per product: bound by arithmetic or by its operands' traffic. With c > 1
        # the (m, k) operand is one matrix broadcast over the batch, read once.
        product_flops = 2 * m * k * n * c
        product_bytes = (m * k + (k * n + m * n) * c) * itemsize
        flops, moved = flops + product_flops, moved + product_bytes
        seconds += max(product_flops / rate, product_bytes / machine.bytes_per_s)
    # Element-wise work is backed by reductions over its broadcast dims in backward, which
    # costs about twice its forward again.
    elementwise = _apply_numel(weight, strategy, batch) * (3 if training else 1)
    # Copies count once in training too: fitted on measured CPU times (three times overshot).
    elementwise += _copied_numel(weight, strategy, batch)
    if strategy == "sequential":  # the folds are element-wise kernels: a multiply and a sum
        seconds += (2 * len(weight.in_modes) + len(weight.out_modes)) * machine.call_overhead_s
    if training:
        elementwise += 2 * _prepared_numel(weight, strategy) * 3
    moved += elementwise * itemsize
    seconds += elementwise * itemsize / machine.elementwise_bytes_per_s
    return StrategyCost(strategy, flops, 2 * flops, moved, len(products), seconds)


def make_plan(
    weight: FactorizedMatrix | WeightShape,
    batch: int,
    *,
    training: bool,
    dtype: torch.dtype,
    device_type: str,
) -> Plan:
    """Cost every strategy of ``weight`` and choose the one with the least estimated time.

    Args:
        weight: the factorized weight, or its :class:`WeightShape`.
        batch: number of rows of ``x`` (all leading dims together).
        training: whether gradients flow (then a reconstruction cannot be cached).
        dtype: compute dtype.
        device_type: ``'cpu'`` or ``'cuda'`` (others use the CPU model).

    Returns:
        The :class:`Plan`.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch!r}")
    weight = _shape_of(weight)
    costs = {
        s: strategy_cost(weight, s, batch, dtype, device_type, training) for s in weight.strategies
    }
    chosen = min(costs.values(), key=lambda c: c.seconds).name
    return Plan(weight.name, batch, training, dtype, device_type, chosen, costs)


#: The batch sizes a graph compiled for every batch size (``torch.compile(dynamic=True)``)
#: is planned over.
ANY_BATCH = (1, 8, 64, 512, 4096)


def any_batch_strategy(
    weight: FactorizedMatrix | WeightShape,
    *,
    training: bool,
    dtype: torch.dtype,
    device_type: str,
) -> str:
    """The strategy for a graph that must serve any batch size: the one whose worst estimated
    slowdown, against the best strategy at each size in :data:`ANY_BATCH`, is least.

    Every strategy computes the same result; only its speed depends on the batch size, so a
    compiled graph with a symbolic batch dimension takes this choice instead of guarding on
    (and recompiling for) each batch size.
    """
    plans = [
        make_plan(weight, b, training=training, dtype=dtype, device_type=device_type)
        for b in ANY_BATCH
    ]

    def worst_slowdown(s: str) -> float:
        return max(p.costs[s].seconds / p.costs[p.chosen].seconds for p in plans)

    return min(plans[0].strategies, key=worst_slowdown)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` at import
    time (about 1 s and 800 modules, for users who never compile): the public decorator only
    sets this marker, which dynamo reads while tracing. tests/test_compile.py checks that the
    marker is the one the public decorator sets, and that compiled planning works."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def planned_strategy(
    signature: tuple, batch: int | None, grad: bool, dtype: torch.dtype, device_type: str
) -> str:
    """The strategy ``FactorizedLinear`` runs for ``batch`` rows (``None``: any batch size,
    for a graph), from the weight's ``shape_signature``; a constant under ``torch.compile``.

    Takes constants, not the module: older torch.compile versions cannot treat a module
    argument as a constant.
    """
    shape = WeightShape(*signature)
    if batch is None:
        return any_batch_strategy(shape, training=grad, dtype=dtype, device_type=device_type)
    return make_plan(shape, batch, training=grad, dtype=dtype, device_type=device_type).chosen
