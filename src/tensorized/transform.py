"""Model-wide compression: swap a model's ``nn.Linear`` layers for factorized ones, in place.

:func:`tensorize_` follows ``torchao.quantize_`` (a frozen config, an optional ``filter_fn``,
in place) and PEFT's module matching; it returns a :class:`TensorizeReport`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._ops import frobenius_error
from .formats import canonical_name, get_format
from .linear import FactorizedLinear
from .ranks import ConcreteRank
from .shapes import Modes, tensorize_shape

__all__ = ["LayerReport", "TensorizeConfig", "TensorizeReport", "tensorize_"]


class _ReadOnlyDict(dict):
    """A dict that refuses changes (the config is frozen); copies, pickles and hashes."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("TensorizeConfig.decomposition_kwargs is read-only; use a new config")

    __setitem__ = __delitem__ = __ior__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly

    def __reduce__(self) -> tuple:
        return (_ReadOnlyDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))


def _convert(value: Any, frozen: bool) -> Any:
    """Recursively: lists to tuples and mappings to read-only dicts (``frozen``: immutable and
    hashable), or tuples to lists and mappings to dicts (plain, for JSON)."""
    if isinstance(value, Mapping):
        items = {k: _convert(v, frozen) for k, v in value.items()}
        return _ReadOnlyDict(items) if frozen else items
    if isinstance(value, list | tuple):
        seq = [_convert(v, frozen) for v in value]
        return tuple(seq) if frozen else seq
    return value


def _bad(name: str, value: Any, accepted: str, exc: type[Exception] = ValueError) -> Exception:
    return exc(f"TensorizeConfig.{name} must be {accepted}, got {type(value).__name__} {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, f"an int >= {low}", TypeError)
    if value < low:
        raise _bad(name, value, f"an int >= {low}")


def _check_patterns(name: str, value: Any) -> str | tuple[str, ...] | None:
    accepted = "None, a regex string or a list of module names / name suffixes"
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise _bad(name, value, f"{accepted} (invalid regex: {exc})") from exc
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise _bad(name, value, accepted, TypeError)
    return tuple(value)


def _check_rank(rank: Any, budget: bool) -> float | int | str | tuple:
    if budget:  # a fraction of the total: the allocation chooses every layer's rank
        if isinstance(rank, bool) or not isinstance(rank, float) or not 0 < rank <= 1:
            raise _bad("rank", rank, "a float in (0, 1] with rank_allocation='budget'")
        return rank
    accepted = "'same', a float > 0, an int >= 1 or a tuple of ints >= 1"
    if isinstance(rank, str) and rank != "same":
        raise _bad("rank", rank, accepted)
    if isinstance(rank, str):
        return rank
    values = tuple(rank) if isinstance(rank, list | tuple) else (rank,)
    kinds = (int,) if isinstance(rank, list | tuple) else (int, float)
    if not values or any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
        raise _bad("rank", rank, accepted, TypeError)
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise _bad("rank", rank, accepted)
    return values if isinstance(rank, list | tuple) else rank


@dataclass(frozen=True)
class TensorizeConfig:
    """What :func:`tensorize_` compresses and how (frozen; ``to_dict``/``from_dict``).

    Attributes:
        factorization: ``'cp'``, ``'tucker'``, ``'tt'``, ``'blocktt'``, ``'lowrank'``,
            ``'dense'`` or an alias (stored canonical).
        rank: per layer as in :class:`~tensorized.FactorizedLinear` (``'same'``, an int, a
            tuple of concrete ranks, or a float: the fraction of the weight parameters kept).
        target_modules: ``None`` (every ``nn.Linear``), a regex that must match the whole
            qualified name, or a list: an entry matches a name equal to it or ending in
            ``"." + entry``.
        exclude_modules: the same rules, applied after ``target_modules``.
        order: modes per side (:func:`~tensorized.tensorize_shape`; ``None``: per layer).
        min_params: layers with fewer weight parameters are left alone.
        implementation: ``'auto'`` or a strategy of the format (see ``FactorizedLinear``).
        joint: factorize together (``from_linear_list``) same-shaped layers whose names
            differ only in numeric parts: ``blocks.0.q`` and ``blocks.1.q`` form ``blocks.*.q``.
        rank_allocation: ``'uniform'`` (``rank`` for each layer) or ``'budget'``: ``rank`` (a
            float in (0, 1]) of all targeted weight parameters, spread over the layers by
            :func:`tensorized.allocate.allocate_ranks` to minimize the total error.
        decomposition_kwargs: options of the decompositions (e.g. ``n_iter_max``), kept as a
            read-only copy.
        calibration_steps: optimizer steps per layer (or group) with calibration data.
        calibration_rows: input rows recorded per layer for calibration.
        progress: show a tqdm bar; ``None``: only when stderr is a terminal.
    """

    factorization: str = "tucker"
    rank: float | int | str | tuple = 0.5
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    order: int | None = 3
    min_params: int = 1024
    implementation: str = "auto"
    joint: bool = False
    rank_allocation: str = "uniform"
    decomposition_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration_steps: int = 200
    calibration_rows: int = 4096
    progress: bool | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        try:
            put("factorization", canonical_name(self.factorization))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"TensorizeConfig.factorization: {exc}") from exc
        put("rank", _check_rank(self.rank, self.rank_allocation == "budget"))
        put("target_modules", _check_patterns("target_modules", self.target_modules))
        put("exclude_modules", _check_patterns("exclude_modules", self.exclude_modules))
        for name, low in (("order", 1), ("min_params", 0), ("calibration_steps", 0)):
            if name != "order" or self.order is not None:
                _check_int(name, getattr(self, name), low)
        _check_int("calibration_rows", self.calibration_rows, 1)
        strategies = ("auto", *get_format(self.factorization).strategy_names())
        if not isinstance(self.implementation, str):
            raise _bad("implementation", self.implementation, f"one of {strategies}", TypeError)
        if self.implementation not in strategies:
            raise _bad("implementation", self.implementation, f"one of {strategies}")
        if not isinstance(self.joint, bool):
            raise _bad("joint", self.joint, "a bool", TypeError)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise _bad("progress", self.progress, "None or a bool", TypeError)
        if not isinstance(self.rank_allocation, str):
            raise _bad("rank_allocation", self.rank_allocation, "'uniform' or 'budget'", TypeError)
        if self.rank_allocation not in ("uniform", "budget"):
            raise _bad("rank_allocation", self.rank_allocation, "'uniform' or 'budget'")
        if self.rank_allocation == "budget" and self.factorization == "dense":
            raise _bad("rank_allocation", "budget", "'uniform' with factorization='dense'")
        if self.factorization == "dense" and self.rank not in ("same", 1.0):
            # caught here rather than at the first layer of tensorize_
            raise _bad("rank", self.rank, "'same' (or 1.0) with factorization='dense'")
        kwargs = self.decomposition_kwargs
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise _bad("decomposition_kwargs", kwargs, "a dict with str keys", TypeError)
        put("decomposition_kwargs", _convert(kwargs, frozen=True))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python types (tuples become lists); JSON-able for JSON values."""
        return {
            f.name: _convert(getattr(self, f.name), frozen=False) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorizeConfig:
        """Build a config from :meth:`to_dict`'s output (or a subset of its keys).

        Raises:
            ValueError: for unknown keys, listing them and the valid ones.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a dict of TensorizeConfig fields, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid), key=str)
        if unknown:
            raise ValueError(f"unknown TensorizeConfig keys {unknown}; valid keys: {valid}")
        return cls(**d)


@dataclass
class LayerReport:
    """One replaced layer, or one joint group (``kind='joint'``); plain data.

    Attributes:
        name: qualified module name; for a joint group its pattern, e.g. ``blocks.*.attn.q``.
        kind: ``'linear'`` or ``'joint'``.
        group: a joint group's member names, joined by ``', '``; else ``None``.
        in_features, out_features, in_modes, out_modes: the shape (of each member).
        rank: the concrete rank of the format.
        old_params, new_params: parameters (weights and biases) of the replaced
            ``nn.Linear`` (s) and of the new layer.
        weight_error: ``||W - W_hat||_F / ||W||_F`` of the final weight(s), in float64.
        output_error_before, output_error_after: relative output error on held-out recorded
            inputs before / after calibration (a group's: the mean over its members), or
            ``None`` without calibration data.
        seconds: time spent decomposing and calibrating.
    """

    name: str
    kind: str
    group: str | None
    in_features: int
    out_features: int
    in_modes: Modes
    out_modes: Modes
    rank: ConcreteRank
    old_params: int
    new_params: int
    weight_error: float
    output_error_before: float | None
    output_error_after: float | None
    seconds: float


@dataclass
class TensorizeReport:
    """What :func:`tensorize_` did: one :class:`LayerReport` per replaced layer or group.

    ``print(report)`` shows a table and the totals; ``old_params``, ``new_params`` and
    ``compression`` are the totals over the replaced layers, ``model_params_before`` /
    ``model_params_after`` count the whole model (shared parameters once).
    """

    layers: list[LayerReport]
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def old_params(self) -> int:
        return sum(r.old_params for r in self.layers)

    @property
    def new_params(self) -> int:
        return sum(r.new_params for r in self.layers)

    @property
    def compression(self) -> float:
        """``old_params / new_params`` over the replaced layers."""
        return self.old_params / self.new_params if self.new_params else math.inf

    @property
    def overall_compression(self) -> float:
        """``model_params_before / model_params_after``."""
        after = self.model_params_after
        return self.model_params_before / after if after else math.inf

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def to_list(self) -> list[dict[str, Any]]:
        """One dict of plain types (tuples become lists) per row."""
        return [_convert(dataclasses.asdict(r), frozen=False) for r in self.layers]

    def __str__(self) -> str:
        calibrated = any(r.output_error_before is not None for r in self.layers)
        rows = [["name", "in->out", "modes in->out", "rank", "params old -> new", "weight err"]]
        rows[0] += ["output err before -> after"] * calibrated
        for r in self.layers:
            errors = (r.output_error_before, r.output_error_after)
            rows.append(
                [
                    f"{r.name} (x{r.group.count(',') + 1})" if r.group else r.name,
                    f"{r.in_features}->{r.out_features}",
                    "->".join("x".join(map(str, m)) for m in (r.in_modes, r.out_modes)),
                    str(r.rank),
                    f"{r.old_params:,} -> {r.new_params:,}",
                    f"{r.weight_error:.4f}",
                ]
                + ["-" if None in errors else "{:.4f} -> {:.4f}".format(*errors)] * calibrated
            )
        widths = [max(map(len, column)) for column in zip(*rows)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) for row in rows]
        lines = [f"{row[0].ljust(widths[0])}  {line}" for row, line in zip(rows, lines)]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"total ({len(self.layers)} rows): {self.old_params:,} -> {self.new_params:,} params "
            f"({self.compression:.2f}x); model {self.model_params_before:,} -> "
            f"{self.model_params_after:,} ({self.overall_compression:.2f}x overall)"
        )
        return "\n".join(lines)


@dataclass
class _Unit:
    """A layer, or a joint group, to compress: members are ``(name, linear)``."""

    name: str
    members: list[tuple[str, nn.Linear]]
    in_modes: Modes = ()
    out_modes: Modes = ()

    @property
    def joint(self) -> bool:
        return len(self.members) > 1

    def weight(self) -> Tensor:
        """``(out, in)``, or ``(L, out, in)`` for a joint group (detached)."""
        ws = [m.weight.detach() for _, m in self.members]
        return torch.stack(ws) if self.joint else ws[0]


def _matches(name: str, patterns: str | tuple[str, ...]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _find_targets(
    model: nn.Module, config: TensorizeConfig, filter_fn: Callable | None
) -> list[tuple[str, nn.Linear]]:
    """Plain ``nn.Linear`` modules (not subclasses, whose forward may differ) that match."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n]
    targets = [
        (n, m)
        for n, m in linears
        if m.weight.numel() >= config.min_params
        and (config.target_modules is None or _matches(n, config.target_modules))
        and not (config.exclude_modules is not None and _matches(n, config.exclude_modules))
        and (filter_fn is None or filter_fn(m, n))
    ]
    if not targets:
        found = ", ".join(f"{n!r} ({m.weight.numel()} weights)" for n, m in linears[:8])
        found = found + ", ..." if len(linears) > 8 else found or "none"
        raise ValueError(
            f"tensorize_ matched no layer: target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, min_params={config.min_params}"
            f"{', filter_fn' if filter_fn else ''}. The model's plain nn.Linear modules "
            f"(the model itself excluded): {found}"
        )
    return targets


def _units(targets: list[tuple[str, nn.Linear]], joint: bool) -> list[_Unit]:
    """One unit per layer, or per group of layers differing only in numeric name parts."""
    if not joint:
        return [_Unit(n, [(n, m)]) for n, m in targets]
    groups: dict[tuple, _Unit] = {}
    for n, m in targets:
        pattern = ".".join("*" if p.isascii() and p.isdigit() else p for p in n.split("."))
        w = m.weight
        key = (pattern, w.shape, w.dtype, w.device)
        groups.setdefault(key, _Unit(pattern, [])).members.append((n, m))
    return [u if u.joint else _Unit(u.members[0][0], u.members) for u in groups.values()]


def _failure(exc: Exception, unit: _Unit, rank: Any, config: TensorizeConfig) -> Exception:
    """``exc`` re-made naming the layer: ValueError, TypeError, RuntimeError and warnings keep
    their type (their base class if the subclass cannot be built), others become RuntimeError."""
    n = len(unit.members)
    what = f"joint group {unit.name!r} ({n} layers)" if n > 1 else f"layer {unit.name!r}"
    message = (
        f"tensorize_ failed on {what} (weight {tuple(unit.members[0][1].weight.shape)} "
        f"(out, in), modes in {unit.in_modes} out {unit.out_modes}, factorization="
        f"{config.factorization!r}, rank={rank!r}): {type(exc).__name__}: {exc}"
    )
    for base in (ValueError, TypeError, RuntimeError, Warning):
        if isinstance(exc, base):
            try:
                return type(exc)(message)
            except Exception:
                return base(message)
    return RuntimeError(message)


def tensorize_(
    model: nn.Module,
    config: TensorizeConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration_data: Iterable | None = None,
) -> TensorizeReport:
    """Replace a model's ``nn.Linear`` layers by :class:`~tensorized.FactorizedLinear`, in place.

    Each targeted weight ``(out_features, in_features)`` is tensorized as
    ``tensorize_shape(in_features, out_features, config.order)`` and decomposed on its own
    device and dtype (a joint group by ``from_linear_list``, member ``i`` replaced by the view
    ``joint[i]``). All replacements are built before any is put in place: a failure leaves the
    model unchanged. A module registered at several places is replaced at all of them.

    Args:
        model: the model; its plain ``nn.Linear`` submodules (not subclasses, whose forward
            may differ) are the candidates.
        config: what to compress and how.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, applied after the config's
            matching; false leaves the layer alone.
        calibration_data: optional iterable of model inputs (a tensor ``x`` -> ``model(x)``,
            a tuple -> ``model(*x)``, a dict -> ``model(**x)``). The targets' inputs are
            recorded on the original model first (:func:`tensorized.calibrate.record_inputs`),
            then each new layer or group is fitted to its original's outputs on them
            (:func:`tensorized.calibrate.calibrate`, ``config.calibration_steps`` steps).

    Returns:
        A :class:`TensorizeReport`, one row per layer or joint group (weight errors are those
        of the final, calibrated, weights).

    Raises:
        ValueError: if no layer matched (the message lists the model's linear layers), and,
            like TypeError and RuntimeError, a layer's failure naming the layer and its shape.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import tensorized as tz
        >>> model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> cfg = tz.TensorizeConfig(factorization="tucker", rank=0.5, order=2, progress=False)
        >>> report = tz.tensorize_(model, cfg)
        >>> [row.name for row in report], type(model[0]).__name__
        (['0', '2'], 'FactorizedLinear')
        >>> model(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, TensorizeConfig):
        raise TypeError(
            f"config must be a TensorizeConfig (TensorizeConfig.from_dict builds one from a "
            f"dict), got {type(config).__name__}"
        )
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be None or callable, got {type(filter_fn).__name__}")
    units = _units(_find_targets(model, config, filter_fn), config.joint)
    for u in units:
        out_features, in_features = u.members[0][1].weight.shape
        u.in_modes, u.out_modes = tensorize_shape(in_features, out_features, config.order)
    show = config.progress
    if show is None:  # a bar only on a terminal (stderr may be replaced, e.g. by None)
        show = bool(getattr(sys.stderr, "isatty", lambda: False)())
    inputs = None
    if calibration_data is not None:  # recorded before anything is built
        from .calibrate import record_inputs

        modules = {n: m for u in units for n, m in u.members}
        rows = config.calibration_rows
        inputs = record_inputs(model, modules, calibration_data, max_rows=rows, progress=show)
    ranks = _ranks(units, config)
    params_before = sum(p.numel() for p in model.parameters())
    from tqdm import tqdm

    built, report = [], []
    for unit, rank in tqdm(list(zip(units, ranks)), "tensorize", unit="layer", disable=not show):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                new, row = _build(unit, rank, config, inputs)
            except Exception as exc:
                raise _failure(exc, unit, rank, config) from exc
        for w in caught:  # re-issued naming the layer; the user's warning filters apply
            warnings.warn(f"layer {unit.name!r}: {w.message}", w.category, stacklevel=2)
        built.append((unit, new))
        report.append(row)
    _swap(model, built)
    params_after = sum(p.numel() for p in model.parameters())
    return TensorizeReport(report, params_before, params_after)


def _ranks(units: list[_Unit], config: TensorizeConfig) -> list[Any]:
    """The rank of each unit: the config's, or a budgeted allocation over all units."""
    if config.rank_allocation == "uniform":
        return [config.rank] * len(units)
    from .allocate import allocate_ranks

    weights = [u.weight() for u in units]
    budget = round(config.rank * sum(w.numel() for w in weights))
    modes = [(u.in_modes, u.out_modes) for u in units]
    kwargs = dict(config.decomposition_kwargs)
    fmt = config.factorization
    return list(allocate_ranks(weights, modes, fmt, budget, decomposition_kwargs=kwargs))


def _build(
    unit: _Unit, rank: Any, config: TensorizeConfig, inputs: Mapping[str, Tensor] | None
) -> tuple[FactorizedLinear, LayerReport]:
    """Decompose (and calibrate) one unit; the model is not touched."""
    start = time.perf_counter()
    linears = [m for _, m in unit.members]
    options = dict(
        rank=rank,
        bias=any(m.bias is not None for m in linears),
        factorization=config.factorization,
        decomposition_kwargs=dict(config.decomposition_kwargs),  # a fresh copy each time
        implementation=config.implementation,
    )
    if unit.joint:
        new = FactorizedLinear.from_linear_list(linears, unit.in_modes, unit.out_modes, **options)
    else:
        new = FactorizedLinear.from_linear(linears[0], unit.in_modes, unit.out_modes, **options)
    new.train(linears[0].training)
    errors: tuple[float | None, float | None] = (None, None)
    if inputs is not None:
        xs = [inputs.get(n) for n, _ in unit.members]
        if any(x is None or x.shape[0] < 2 for x in xs):  # never called on calibration_data
            warnings.warn("under 2 calibration input rows recorded: not calibrated", stacklevel=2)
        else:
            from .calibrate import calibrate

            biases = [None if m.bias is None else m.bias.detach() for m in linears]
            weights = [m.weight.detach() for m in linears]
            res = calibrate(new, weights, biases, xs, steps=config.calibration_steps)
            errors = (sum(res.before) / len(res.before), sum(res.after) / len(res.after))
    with torch.no_grad():
        error = frobenius_error(unit.weight(), new.weight.to_matrix())
    old = {id(p): p.numel() for m in linears for p in m.parameters()}  # shared ones once
    row = LayerReport(
        name=unit.name,
        kind="joint" if unit.joint else "linear",
        group=", ".join(n for n, _ in unit.members) if unit.joint else None,
        in_features=new.in_features,
        out_features=new.out_features,
        in_modes=tuple(unit.in_modes),
        out_modes=tuple(unit.out_modes),
        rank=new.rank,
        old_params=sum(old.values()),
        new_params=sum(p.numel() for p in new.parameters()),
        weight_error=error,
        output_error_before=errors[0],
        output_error_after=errors[1],
        seconds=time.perf_counter() - start,
    )
    return new, row


def _swap(model: nn.Module, built: list[tuple[_Unit, FactorizedLinear]]) -> None:
    """Put each replacement at every place its original is registered; undone on failure."""
    new_for = {
        id(linear): new[i] if unit.joint else new
        for unit, new in built
        for i, (_, linear) in enumerate(unit.members)
    }
    places = [  # every (parent, child name) edge: each parent is visited once
        (parent, child_name, new_for[id(child)])
        for _, parent in model.named_modules()
        for child_name, child in parent._modules.items()
        if child is not None and id(child) in new_for
    ]
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent, child_name, new in places:
            done.append((parent, child_name, parent._modules[child_name]))
            setattr(parent, child_name, new)
    except BaseException:
        for parent, child_name, old in reversed(done):
            setattr(parent, child_name, old)
        raise
