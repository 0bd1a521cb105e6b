"""Cost model and planner for computing ``x @ W.T`` with a factorized weight.

Every strategy of every format declares, beside its code, the :class:`Work` it does: the
matrix products it runs (the tests check their FLOPs against
``torch.utils.flop_counter.FlopCounterMode``) and its element-wise traffic. From that come its
FLOPs (2 per multiply-add), its memory traffic (operands read, results written) and its kernel
calls; a small machine model (a roofline per product plus a per-call overhead) turns them into
an estimated time, and the planner picks the fastest. The planner knows no format: it reads
the format's strategies from the registry.

Each strategy is split into ``prepare`` (work on the weight alone: Khatri-Rao or Kronecker
products, multiplied-out halves, the reconstruction) and ``apply`` (work on the input). By
default both are paid on every call; a layer whose prepared operands are kept
(:meth:`FactorizedLinear.merge`, the user's explicit choice) pays only ``apply`` in
inference. In training ``prepare`` is paid with its backward. Backward costs about twice the
forward FLOPs for every strategy (each product needs the gradients of both operands).

Plans are cached in one bounded table shared by every layer, keyed by the weight's shape
signature: identical layers share their plans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from ._machine import FALLBACK_MACHINES, FRESH_BUFFER_BYTES, on_change, planner_machine
from .formats import FactorizedMatrix, get_format
from .formats._strategy import Gemm, WeightShape, Work

__all__ = [
    "ANY_BATCH",
    "MACHINES",
    "Plan",
    "PlanCacheInfo",
    "StrategyCost",
    "any_batch_strategy",
    "estimate",
    "gemms",
    "make_plan",
    "plan_cache_info",
    "strategy_cost",
    "work",
]


def _shape_of(weight: FactorizedMatrix | WeightShape) -> WeightShape:
    return weight if isinstance(weight, WeightShape) else weight.signature


#: The fallback machine constants (see :mod:`tensorized._machine`).
MACHINES = FALLBACK_MACHINES


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
    cached: bool = False

    @property
    def flops(self) -> int:
        """Forward FLOPs of the chosen strategy."""
        return self.costs[self.chosen].forward_flops

    @property
    def strategies(self) -> tuple[str, ...]:
        return tuple(self.costs)

    def __str__(self) -> str:
        mode = "training" if self.training else "inference"
        if not self.training:
            mode += ", operands kept (merged)" if self.cached else ", operands rebuilt per call"
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


def work(weight: FactorizedMatrix | WeightShape, strategy: str, batch: int) -> Work:
    """The :class:`Work` of ``strategy`` for ``batch`` rows, as the format declares it."""
    shape = _shape_of(weight)
    fmt = get_format(shape.name)
    names = fmt.strategy_names()
    if strategy not in names:
        raise ValueError(
            f"strategy {strategy!r} is not defined for factorization {shape.name!r}; its "
            f"strategies are {names}"
        )
    found = next(s for s in fmt.strategies if s.name == strategy)
    return found.work(shape, batch)


def gemms(
    weight: FactorizedMatrix | WeightShape, strategy: str, batch: int
) -> tuple[list[Gemm], list[Gemm]]:
    """The matrix products ``(m, k, n, count)`` of ``strategy`` for ``batch`` rows, split
    into the weight-only ``prepare`` step and the ``apply`` step."""
    w = work(weight, strategy, batch)
    return w.prepare, w.apply


# ------------------------------------------------------------------ planning


def strategy_cost(
    weight: FactorizedMatrix | WeightShape,
    strategy: str,
    batch: int,
    dtype: torch.dtype,
    device_type: str,
    training: bool = False,
    cached: bool = False,
) -> StrategyCost:
    """FLOPs, bytes, calls and estimated seconds of one strategy at ``batch`` rows.

    ``prepare`` is paid on every call, with its backward in training, unless ``cached``
    (inference with operands kept by :meth:`FactorizedLinear.merge`): then only ``apply``.
    """
    weight = _shape_of(weight)
    w = work(weight, strategy, batch)
    flops, moved, calls, seconds = estimate(w, dtype, device_type, training, cached)
    again = sum(2 * m * k * n * c for m, k, n, c in w.recomputed) if training else 0
    return StrategyCost(strategy, flops, 2 * flops + again, moved, calls, seconds)


def estimate(
    w: Work, dtype: torch.dtype, device_type: str, training: bool = False, cached: bool = False
) -> tuple[int, int, int, float]:
    """``(forward FLOPs, bytes moved, kernel calls, estimated seconds)`` of one :class:`Work`
    on the machine model of ``device_type`` (``prepare`` not paid when ``cached`` in
    inference)."""
    pays_prepare = training or not cached
    products = w.prepare + w.apply if pays_prepare else w.apply
    itemsize = torch.empty((), dtype=dtype).element_size()
    machine = planner_machine(device_type, dtype)
    rate, fresh = machine.flops_per_s, machine.fresh_bytes_per_s
    flops = moved = 0
    seconds = (len(products) + w.extra_calls) * machine.call_overhead_s
    # Products recomputed in backward weigh a third of a product here: each product's time
    # stands for its forward and backward together.
    weighed = [(p, 1.0) for p in products] + [(p, 1 / 3) for p in w.recomputed if training]
    for (m, k, n, c), weight in weighed:
        # Roofline per product: bound by arithmetic or by its operands' traffic. With c > 1
        # the (m, k) operand is one matrix broadcast over the batch, read once.
        product_flops = 2 * m * k * n * c
        product_bytes = (m * k + (k * n + m * n) * c) * itemsize
        seconds += weight * max(product_flops / rate, product_bytes / machine.bytes_per_s)
        written = m * n * c * itemsize
        if fresh is not None and written >= FRESH_BUFFER_BYTES:
            seconds += weight * written / fresh  # a fresh buffer, faulted in as written
        if weight == 1.0:
            flops, moved = flops + product_flops, moved + product_bytes
    # Element-wise work is backed by reductions over its broadcast dims in backward, which
    # costs about twice its forward again.
    elementwise = w.apply_numel * (3 if training else 1)
    # Copies count once in training too: fitted on measured CPU times (three times overshot).
    elementwise += w.copied_numel
    if pays_prepare:  # written and read again; in training also its backward
        elementwise += 2 * w.prepare_numel * (3 if training else 1)
    moved += elementwise * itemsize
    seconds += elementwise * itemsize / machine.elementwise_bytes_per_s
    if fresh is not None:  # e.g. the rebuilt W of 'reconstructed'
        buffers = (w.prepare_buffers if pays_prepare else ()) + w.apply_buffers
        big = [n * itemsize for n in buffers if n * itemsize >= FRESH_BUFFER_BYTES]
        seconds += sum(big) / fresh
    return flops, moved, len(products), seconds


def make_plan(
    weight: FactorizedMatrix | WeightShape,
    batch: int,
    *,
    training: bool,
    dtype: torch.dtype,
    device_type: str,
    cached: bool = False,
) -> Plan:
    """Cost every strategy of ``weight`` and choose the one with the least estimated time.

    Args:
        weight: the factorized weight, or its :class:`WeightShape`.
        batch: number of rows of ``x`` (all leading dims together).
        training: whether gradients flow to the weight.
        dtype: compute dtype.
        device_type: ``'cpu'`` or ``'cuda'`` (others use the CPU model).
        cached: whether the prepared operands are kept (a merged layer in inference).

    Returns:
        The :class:`Plan`.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch!r}")
    shape = _shape_of(weight)
    cached = cached and not training
    costs = {
        s: strategy_cost(shape, s, batch, dtype, device_type, training, cached)
        for s in get_format(shape.name).strategy_names()
    }
    chosen = min(costs.values(), key=lambda c: c.seconds).name
    return Plan(shape.name, batch, training, dtype, device_type, chosen, costs, cached)


#: The batch sizes a graph compiled for every batch size (``torch.compile(dynamic=True)``)
#: is planned over.
ANY_BATCH = (1, 8, 64, 512, 4096)


def any_batch_strategy(
    weight: FactorizedMatrix | WeightShape,
    *,
    training: bool,
    dtype: torch.dtype,
    device_type: str,
    cached: bool = False,
) -> str:
    """The strategy for a graph that must serve any batch size: the one whose worst estimated
    slowdown, against the best strategy at each size in :data:`ANY_BATCH`, is least.

    Every strategy computes the same result; only its speed depends on the batch size, so a
    compiled graph with a symbolic batch dimension takes this choice instead of guarding on
    (and recompiling for) each batch size.
    """
    plans = [
        make_plan(weight, b, training=training, dtype=dtype, device_type=device_type, cached=cached)
        for b in ANY_BATCH
    ]

    def worst_slowdown(s: str) -> float:
        return max(p.costs[s].seconds / p.costs[p.chosen].seconds for p in plans)

    return min(plans[0].strategies, key=worst_slowdown)


_F = TypeVar("_F", bound=Callable[..., Any])


def _assume_constant_result(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` at import
    time (about 1 s and 800 modules, for users who never compile): the public decorator only
    sets this marker, which dynamo reads while tracing. tests/test_compile.py checks that the
    marker is the one the public decorator sets, and that compiled planning works."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]  # a function attribute
    return fn


#: Plans of every layer, keyed by ``(signature id, batch, grad, cached, dtype, device)``;
#: bounded (the oldest entry is dropped past :data:`PLAN_CACHE_SIZE`). Identical layers have
#: the same signature id, so they share their plans.
PLAN_CACHE_SIZE = 4096
_plans: dict[tuple, str] = {}
_signature_ids: dict[tuple, int] = {}
_misses = [0]


class PlanCacheInfo(NamedTuple):
    """Statistics of the shared plan table (as ``functools.lru_cache``'s ``cache_info``)."""

    misses: int
    maxsize: int
    currsize: int


def _drop_plans() -> None:
    _plans.clear()


on_change(_drop_plans)  # plans made with other machine constants would be stale


def plan_cache_info() -> PlanCacheInfo:
    """How many plans were made, the table's bound and its current size."""
    return PlanCacheInfo(_misses[0], PLAN_CACHE_SIZE, len(_plans))


def signature_id(signature: tuple) -> int:
    """A small int standing for a weight's shape signature (``dataclasses.astuple`` of its
    :class:`WeightShape`): cheap to hash on every call."""
    return _signature_ids.setdefault(signature, len(_signature_ids))


def cached_strategy(
    key: tuple,
    signature: tuple,
    batch: int | None,
    grad: bool,
    cached: bool,
    dtype: torch.dtype,
    device_type: str,
) -> str:
    """The planned strategy for ``key = (signature id, batch, grad, cached, dtype, device)``,
    from the shared table, planning it on a miss."""
    choice = _plans.get(key)
    if choice is None:
        _misses[0] += 1
        shape = WeightShape(*signature)
        if batch is None:
            choice = any_batch_strategy(
                shape, training=grad, dtype=dtype, device_type=device_type, cached=cached
            )
        else:
            choice = make_plan(
                shape, batch, training=grad, dtype=dtype, device_type=device_type, cached=cached
            ).chosen
        while _plans and len(_plans) >= PLAN_CACHE_SIZE:
            del _plans[next(iter(_plans))]
        _plans[key] = choice
    return choice


@_assume_constant_result
def planned_strategy(
    signature: tuple,
    batch: int | None,
    grad: bool,
    dtype: torch.dtype,
    device_type: str,
    cached: bool = False,
) -> str:
    """The strategy ``FactorizedLinear`` runs for ``batch`` rows (``None``: any batch size,
    for a graph), from the weight's signature tuple; a constant under ``torch.compile``.

    Takes constants, not the module: torch.compile cannot treat a module argument (or a
    dataclass) as a constant.
    """
    key = (signature_id(signature), batch, grad, cached, dtype, device_type)
    return cached_strategy(key, signature, batch, grad, cached, dtype, device_type)
