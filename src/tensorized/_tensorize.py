"""Model-wide compression: swap a model's ``nn.Linear`` layers (and ``nn.Embedding`` tables)
for factorized ones, in place.

:func:`tensorize_` follows ``torchao.quantize_`` (a frozen config, an optional ``filter_fn``,
in place) and PEFT's module matching; the configuration is :class:`tensorized.TensorizeConfig`,
the report :class:`tensorized.TensorizeReport`.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._allocate import Choice
from ._config import TensorizeConfig, show_progress
from ._embedding import FactorizedEmbedding, table_modes
from ._linear import FactorizedLinear
from ._ops import frobenius_error
from ._record import _has_length
from ._report import LayerReport, TensorizeReport
from ._shapes import Modes, tensorize_shape
from ._statistics import InputStatistics

__all__ = ["LayerReport", "TensorizeConfig", "TensorizeReport", "tensorize_"]


@dataclass
class _Unit:
    """A layer, a joint group or an embedding table to compress: members are ``(name,
    module)``."""

    name: str
    members: list[tuple[str, nn.Module]]
    in_modes: Modes = ()
    out_modes: Modes = ()

    @property
    def joint(self) -> bool:
        return len(self.members) > 1

    @property
    def table(self) -> bool:
        return isinstance(self.members[0][1], nn.Embedding)

    def weight(self) -> Tensor:
        """``(out, in)``, or ``(L, out, in)`` for a joint group (detached); a table's
        ``(num_embeddings, embedding_dim)``."""
        ws = [cast(Tensor, m.weight).detach() for _, m in self.members]
        return torch.stack(ws) if self.joint else ws[0]

    def padded_weight(self, row_weights: Tensor | None = None) -> Tensor:
        """:meth:`weight`, a table's with zero padding rows up to its row modes and each
        row scaled by the square root of ``row_weights`` (its frequency weight)."""
        w = self.weight()
        if not self.table:
            return w
        pad = math.prod(self.out_modes) - w.shape[0]
        if pad:
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
        if row_weights is not None:
            w = w * row_weights.to(w.device, w.dtype).sqrt().unsqueeze(1)
        return w


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _find_targets(
    model: nn.Module, config: TensorizeConfig, filter_fn: Callable | None
) -> list[tuple[str, nn.Module]]:
    """Plain ``nn.Linear`` modules (not subclasses, whose forward may differ) that match, and
    plain ``nn.Embedding`` tables with ``config.embeddings``."""
    kinds: tuple[type, ...] = (nn.Linear, nn.Embedding) if config.embeddings else (nn.Linear,)
    linears: list[tuple[str, nn.Module]] = [
        (n, m) for n, m in model.named_modules() if type(m) in kinds and n
    ]
    targets = [
        (n, m)
        for n, m in linears
        if cast(Tensor, m.weight).numel() >= config.min_params
        and (config.target_modules is None or _matches(n, config.target_modules))
        and not (config.exclude_modules is not None and _matches(n, config.exclude_modules))
        and (filter_fn is None or filter_fn(m, n))
    ]
    tied = _ties(model, targets)
    for n, others in tied.items():
        warnings.warn(
            f"layer {n!r} is left dense: its parameters are tied to {', '.join(others)} "
            f"(factorizing it would break the tie and add parameters). To compress it, untie "
            f"it first, e.g. model.{n}.weight = nn.Parameter(model.{n}.weight.detach().clone())",
            UserWarning,
            stacklevel=3,
        )
    targets = [(n, m) for n, m in targets if n not in tied]
    if not targets:
        found = ", ".join(
            f"{n!r} ({cast(Tensor, m.weight).numel()} weights)" for n, m in linears[:8]
        )
        found = found + ", ..." if len(linears) > 8 else found or "none"
        raise ValueError(
            f"tensorize_ matched no layer: target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}, min_params={config.min_params}"
            f"{', filter_fn' if filter_fn else ''}{', untied' if tied else ''}. The model's "
            f"plain nn.Linear{' and nn.Embedding' if config.embeddings else ''} modules (the "
            f"model itself excluded): {found}"
        )
    return targets


def _ties(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """Targets whose weight or bias is also held by another module (the same parameter,
    e.g. an output projection tied to the input embedding, or a tensor starting at the same
    memory): ``name -> the other holders' parameter names``. A module registered under two
    names is one holder (it is replaced everywhere at once)."""
    holders: dict[object, list[tuple[nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is None:
                continue
            where = (module, f"{name}.{pname}" if name else pname)
            holders.setdefault(id(p), []).append(where)
            if p.numel() and p.device.type != "meta":  # same first element: same memory
                holders.setdefault(("ptr", p.device, p.data_ptr()), []).append(where)
    tied: dict[str, list[str]] = {}
    for n, m in targets:
        others: dict[str, None] = {}
        for p in (m.weight, getattr(m, "bias", None)):
            if not isinstance(p, Tensor):
                continue
            keys: list[object] = [id(p)]
            if p.numel() and p.device.type != "meta":
                keys.append(("ptr", p.device, p.data_ptr()))
            for key in keys:
                others.update({f"{q!r}": None for mod, q in holders.get(key, []) if mod is not m})
        if others:
            tied[n] = list(others)
    return tied


def _units(targets: list[tuple[str, nn.Module]], joint: bool) -> list[_Unit]:
    """One unit per layer, or per group of layers differing only in numeric name parts (an
    embedding table is always a unit of its own)."""
    if not joint:
        return [_Unit(n, [(n, m)]) for n, m in targets]
    groups: dict[tuple, _Unit] = {}
    for n, m in targets:
        if isinstance(m, nn.Embedding):
            groups[(n,)] = _Unit(n, [(n, m)])
            continue
        pattern = ".".join("*" if p.isascii() and p.isdigit() else p for p in n.split("."))
        w = cast(Tensor, m.weight)
        key = (pattern, w.shape, w.dtype, w.device)
        groups.setdefault(key, _Unit(pattern, [])).members.append((n, m))
    return [u if u.joint else _Unit(u.members[0][0], u.members) for u in groups.values()]


def _failure(exc: Exception, unit: _Unit, choice: Choice, config: TensorizeConfig) -> Exception:
    """``exc`` re-made naming the layer: ValueError, TypeError, RuntimeError and warnings keep
    their type (their base class if the subclass cannot be built), others become RuntimeError."""
    n = len(unit.members)
    what = f"joint group {unit.name!r} ({n} layers)" if n > 1 else f"layer {unit.name!r}"
    message = (
        f"tensorize_ failed on {what} (weight "
        f"{tuple(cast(Tensor, unit.members[0][1].weight).shape)} "
        f"(out, in), modes in {unit.in_modes} out {unit.out_modes}, factorization="
        f"{choice.factorization!r}, rank={choice.rank!r}): {type(exc).__name__}: {exc}"
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
    """Replace a model's ``nn.Linear`` layers by :class:`~tensorized.FactorizedLinear` (and,
    with ``config.embeddings``, its ``nn.Embedding`` tables by
    :class:`~tensorized.FactorizedEmbedding`), in place.

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
            a tuple -> ``model(*x)``, a dict -> ``model(**x)``). Each new layer or group is
            fitted to its original's outputs (:func:`tensorized.calibrate`,
            ``config.calibration_steps`` steps) from streamed statistics of its inputs (sums
            of outer products of the rows, ``config.calibration_rows`` rows per layer): by
            default (``config.calibration_mode='sequential'``) in forward order, each on the
            inputs it sees with the layers before it already replaced, paired with the
            original model's inputs for the same samples (the data is read once and replayed
            for each layer); with ``'independent'``, on the original inputs.
            Tables are fitted to their rows weighted by how often the data looks them up.

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
        out_features, in_features = u.weight().shape[-2:]
        if u.table:
            per_side = config.order or 3
            u.out_modes, u.in_modes = table_modes(
                out_features, in_features, True, per_side, None, None
            )
        else:
            u.in_modes, u.out_modes = tensorize_shape(in_features, out_features, config.order)
    show = show_progress(config.progress)
    inputs: dict[str, InputStatistics | None] | None = None
    counts: dict[str, Tensor] = {}
    data: Iterable = () if calibration_data is None else calibration_data
    order = list(range(len(units)))
    sequential = calibration_data is not None and config.calibration_mode == "sequential"
    calls: dict[str, int] = {}
    if calibration_data is not None:  # recorded before anything is built
        from ._record import _check_data, call_counts, record_statistics

        _check_data(data)
        if sequential or config.rank_allocation == "budget":
            # replayed (sequential: once per layer; a budget: to probe the output's
            # sensitivity): the same samples, in the same order, even from a stream
            data = _Replay(data)
        modules = {n: m for u in units for n, m in u.members}
        linears = {n: m for n, m in modules.items() if not isinstance(m, nn.Embedding)}
        tables = {n: m for n, m in modules.items() if isinstance(m, nn.Embedding)}
        rows = config.calibration_rows
        if not sequential or config.rank_allocation == "budget":
            inputs = record_statistics(model, linears, data, max_rows=rows, progress=show)
        if tables:
            from ._table_calibrate import record_token_counts

            counts = record_token_counts(model, tables, data)
        if sequential:
            calls = call_counts(model, modules, data)
            position = {n: k for k, n in enumerate(calls)}
            last = len(position)
            order.sort(key=lambda k: min(position.get(n, last) for n, _ in units[k].members))
    choices = _choices(units, config, inputs, model, data, counts)
    params_before = sum(p.numel() for p in model.parameters())
    from tqdm import tqdm

    done: dict[int, nn.Module] = {}
    rows_of: dict[int, LayerReport] = {}
    for k in tqdm(order, "tensorize", unit="layer", disable=not show):
        unit, choice = units[k], choices[k]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                stats = inputs
                if sequential and not unit.table:
                    built_so_far = [(units[j], done[j]) for j in done]
                    stats = _sequential_statistics(model, built_so_far, unit, data, config, calls)
                new: nn.Module
                if unit.table:
                    new, row = _build_table(unit, choice, config, counts.get(unit.name))
                else:
                    new, row = _build(unit, choice, config, stats)
            except Exception as exc:
                raise _failure(exc, unit, choice, config) from exc
        for w in caught:  # re-issued naming the layer; the user's warning filters apply
            warnings.warn(f"layer {unit.name!r}: {w.message}", w.category, stacklevel=2)
        done[k], rows_of[k] = new, row
    built = [(units[k], done[k]) for k in range(len(units))]
    report = [rows_of[k] for k in range(len(units))]
    _swap(model, built)
    params_after = sum(p.numel() for p in model.parameters())
    return TensorizeReport(report, params_before, params_after)


def _choices(
    units: list[_Unit],
    config: TensorizeConfig,
    inputs: Mapping[str, InputStatistics | None] | None,
    model: nn.Module,
    data: Iterable,
    counts: Mapping[str, Tensor] | None = None,
) -> list[Choice]:
    """Each unit's format and rank: the config's, or a budgeted allocation over all units
    (with calibration data: by each unit's relative output error on its recorded inputs,
    weighted by the model's output sensitivity to that unit; a table's rows weighted by their
    observed frequencies)."""
    from ._allocate import AUTO_FORMATS, Choice, allocate_choices

    if config.rank_allocation == "uniform":
        fmt = cast(str, config.factorization)  # TensorizeConfig allows one format here
        rank = cast(Any, config.rank)  # a fraction, int, tuple or 'same': resolved per layer
        return [Choice(fmt, rank, math.nan, "") for _ in units]
    from ._table_calibrate import row_weights

    weights = []
    for u in units:
        observed = (counts or {}).get(u.name)
        rows = math.prod(u.out_modes)
        w = None if observed is None else row_weights(observed, rows)
        weights.append(u.padded_weight(w))
    fraction = cast(float, config.rank)  # TensorizeConfig checks it for 'budget'
    budget = round(fraction * sum(u.weight().numel() for u in units))
    modes = [(u.in_modes, u.out_modes) for u in units]
    formats = config.factorization
    if formats == "auto":
        formats = AUTO_FORMATS
    elif isinstance(formats, str):
        formats = (formats,)
    grams = importance = None
    if inputs is not None:
        from ._sensitivity import output_sensitivity

        grams = [_gram(u, inputs) for u in units]
        groups = {u.name: [m for _, m in u.members] for u in units}
        found = output_sensitivity(model, groups, data)
        importance = [found[u.name] for u in units]
    kwargs = dict(config.decomposition_kwargs)
    return allocate_choices(
        weights,
        modes,
        formats,
        budget,
        grams=grams,
        importance=importance,
        decomposition_kwargs=kwargs,
    )


def _gram(unit: _Unit, inputs: Mapping[str, InputStatistics | None]) -> Tensor | None:
    """The unit's input second moment ``X^T X / rows`` in float64 (a joint group's: the mean
    of its members', each scaled to unit trace), or ``None`` without recorded rows."""
    grams = []
    for name, _ in unit.members:
        st = inputs.get(name)
        if st is None or st.seen < 2:
            return None
        C = st.fit.xx[:-1, :-1] + st.held.xx[:-1, :-1]
        grams.append(C / C.trace().clamp_min(torch.finfo(torch.float64).tiny))
    return torch.stack(grams).mean(0)


def _build(
    unit: _Unit,
    choice: Choice,
    config: TensorizeConfig,
    inputs: Mapping[str, InputStatistics | None] | None,
) -> tuple[FactorizedLinear, LayerReport]:
    """Decompose (and calibrate) one unit; the model is not touched. ``inputs``: the
    statistics of the members' inputs (paired with the original model's inputs for
    sequential calibration), or ``None``."""
    start = time.perf_counter()
    linears = [cast(nn.Linear, m) for _, m in unit.members]
    options: dict[str, Any] = dict(
        rank=choice.rank,
        bias=any(m.bias is not None for m in linears),
        factorization=choice.factorization,
        decomposition_kwargs=dict(config.decomposition_kwargs),  # a fresh copy each time
        implementation=config.implementation
        if choice.factorization == config.factorization
        else "auto",
    )
    if unit.joint:
        new = FactorizedLinear.from_linear_list(linears, unit.in_modes, unit.out_modes, **options)
    else:
        new = FactorizedLinear.from_linear(linears[0], unit.in_modes, unit.out_modes, **options)
    new.train(linears[0].training)
    errors: tuple[float | None, float | None] = (None, None)
    if inputs is not None:
        stats = [inputs.get(n) for n, _ in unit.members]
        if any(st is None or st.fit.n < 1 or st.held.n < 1 for st in stats):
            warnings.warn("under 2 calibration input rows recorded: not calibrated", stacklevel=2)
        else:
            from ._calibrate import calibrate_statistics

            biases = [None if m.bias is None else m.bias.detach() for m in linears]
            weights = [m.weight.detach() for m in linears]
            steps = config.calibration_steps
            found = cast(list[InputStatistics], stats)
            res = calibrate_statistics(new, weights, biases, found, steps=steps)
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
        factorization=choice.factorization,
        reason=choice.reason,
    )
    return new, row


def _build_table(
    unit: _Unit, choice: Choice, config: TensorizeConfig, counts: Tensor | None
) -> tuple[FactorizedEmbedding, LayerReport]:
    """Decompose one embedding table (then fit it to its frequency-weighted rows)."""
    start = time.perf_counter()
    name, table = unit.members[0]
    table = cast(nn.Embedding, table)
    new = FactorizedEmbedding.from_embedding(
        table,
        rank=choice.rank,
        factorization=choice.factorization,
        decomposition_kwargs=dict(config.decomposition_kwargs),
        tensorized_num_embeddings=unit.out_modes,
        tensorized_embedding_dim=unit.in_modes,
    )
    new.train(table.training)
    errors: tuple[float | None, float | None] = (None, None)
    if counts is not None:
        from ._table_calibrate import calibrate_table

        errors = calibrate_table(new, table.weight, counts, config.calibration_steps)
    with torch.no_grad():
        rows = new.weight.to_matrix()[: new.num_embeddings]
        error = frobenius_error(table.weight.detach(), rows)
    row = LayerReport(
        name=name,
        kind="embedding",
        group=None,
        in_features=new.embedding_dim,
        out_features=new.num_embeddings,
        in_modes=tuple(unit.in_modes),
        out_modes=tuple(unit.out_modes),
        rank=new.rank,
        old_params=table.weight.numel(),
        new_params=new.num_params,
        weight_error=error,
        output_error_before=errors[0],
        output_error_after=errors[1],
        seconds=time.perf_counter() - start,
        factorization=choice.factorization,
        reason=choice.reason,
        padded_rows=new.padded_rows,
    )
    return new, row


def _swap(
    model: nn.Module, built: list[tuple[_Unit, nn.Module]]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each replacement at every place its original is registered (undone on failure);
    returns what :func:`_unswap` needs to put the originals back."""
    new_for = {
        id(linear): cast(FactorizedLinear, new)[i] if unit.joint else new
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
        _unswap(done)
        raise
    return done


def _unswap(done: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child_name, old in reversed(done):
        setattr(parent, child_name, old)


def _sequential_statistics(
    model: nn.Module,
    built: list[tuple[_Unit, nn.Module]],
    unit: _Unit,
    data: Iterable,
    config: TensorizeConfig,
    calls: Mapping[str, int],
) -> dict[str, InputStatistics | None]:
    """Statistics of the inputs ``unit``'s members see with the ``built`` layers in place,
    paired with the original model's inputs of the same samples (the model is put back as it
    was); unpaired statistics of the original inputs where nothing is built yet, or for a
    member the compressed model calls differently (with a warning)."""
    from ._record import paired_statistics, record_statistics

    members = dict(unit.members)
    # cut each call short once the members have run (unless one did not run on the first
    # sample: then it may run only on others, and every call is run whole)
    mine = {n: calls[n] for n in members} if all(n in calls for n in members) else None
    rows = config.calibration_rows
    if not built:
        return record_statistics(model, members, data, max_rows=rows, calls=mine)
    stats, mismatched = paired_statistics(
        model,
        lambda: functools.partial(_unswap, _swap(model, built)),
        members,
        data,
        max_rows=rows,
        calls=mine,
        also=[m for _, m in built],
    )
    if mismatched:
        warnings.warn(
            "its inputs in the partially compressed model do not match the original rows: "
            "calibrated on the original model's inputs",
            stacklevel=2,
        )
        originals = record_statistics(model, members, data, max_rows=rows, calls=mine)
        stats.update({n: originals[n] for n in mismatched})
    return stats


class _Replay(Iterable):
    """Calibration data read once, then replayed: every pass sees the same batches in the
    same order (a shuffling DataLoader would not), and a one-shot iterator can be read again.
    The data is read lazily, only as far as the furthest pass has gone."""

    def __init__(self, data: Iterable) -> None:
        self.data: Iterator | None = None
        self.source, self.exhausted = data, False
        self.items: list[Any] = []
        self.length = len(data) if _has_length(data) else None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        k = 0
        while True:
            if k == len(self.items):
                if self.exhausted:
                    return
                if self.data is None:
                    self.data = iter(self.source)
                try:
                    self.items.append(next(self.data))
                except StopIteration:
                    self.exhausted = True
                    return
            yield self.items[k]
            k += 1

    def __len__(self) -> int:
        if self.length is not None:
            return self.length
        if not self.exhausted:
            raise TypeError("a stream")  # readers then treat it as a bounded stream
        return len(self.items)
