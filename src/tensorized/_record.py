"""Recording what a model's layers receive: their input rows, or streamed statistics of them.

Forward pre-hooks (``_Taps``) copy the rows each tapped module receives during one model
call, with the model in eval mode under ``torch.no_grad()`` (padding rows of a tokenizer's
batch left out). :func:`record_inputs` keeps a seeded uniform sample of the rows;
:func:`record_statistics` and :func:`paired_statistics` fold them into
:class:`~tensorized._statistics.InputStatistics` as they come, so that memory does not grow
with the number of rows; the paired form runs each batch through the original model and
through the partially compressed one (sequential calibration) and pairs the rows of the same
samples, stopping each call once the tapped modules have run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._statistics import InputStatistics

__all__ = ["call_counts", "padding_mask", "paired_statistics", "record_inputs", "record_statistics"]

F64 = torch.float64
_EMPTY = object()


class _Reservoir:
    """A seeded uniform sample without replacement of at most ``size`` rows of a stream, in
    bounded memory: each row gets a uniform key and the smallest keys are kept (Efraimidis &
    Spirakis, "Weighted random sampling with a reservoir", Inf. Process. Lett. 97(5), 2006)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Tensor | None = None
        self.keys = torch.empty(0, dtype=F64)
        self.position = torch.empty(0, dtype=torch.long)
        self.seen = 0

    def add(self, rows: Tensor) -> None:
        n = rows.shape[0]
        keys = torch.rand(n, generator=self.generator, dtype=F64)
        position = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
            position = torch.cat([self.position, position])
        if keys.shape[0] > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            rows, keys, position = rows[keep.to(rows.device)], keys[keep], position[keep]
        self.rows, self.keys, self.position = rows, keys, position

    def result(self) -> Tensor | None:
        if self.rows is None:
            return None
        order = torch.argsort(self.position)  # the kept rows in the order they were seen
        return self.rows[order.to(self.rows.device)]


class _Stop(Exception):
    """Raised by a tap once every tapped module has run as often as in a whole model call."""


class _Taps:
    """Forward pre-hooks on ``modules`` that copy the rows each receives during a model call.

    A context manager: on entry the hooks are installed, on exit they are removed and the
    training flag of every module of ``model`` (and of ``also``) is restored, even when the
    model raises. ``calls``: how many times each module runs in one whole model call; once
    all have run that often, the call is cut short (the rest of the model is not needed).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        calls: Mapping[str, int] | None = None,
        also: Iterable[nn.Module] = (),
    ) -> None:
        self.model, self.modules, self.calls = model, modules, calls
        self.flags = {m: m.training for m in [*model.modules(), *modules.values(), *also]}
        self.width: dict[str, int] = {}
        self.rows: dict[str, list[Tensor]] = {}
        self.count: dict[str, int] = {}
        self.order: list[str] = []  # of the first calls in the last run
        self.mask: Tensor | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> _Taps:
        for name, module in self.modules.items():
            hook = self._hook(name, module)
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        for module, flag in self.flags.items():
            module.train(flag)

    def run(self, item: object, k: int) -> dict[str, Tensor]:
        """The rows each tapped module received while the model ran on ``item`` (in the
        order received; modules that did not run are left out)."""
        self.rows = {name: [] for name in self.modules}
        self.count = dict.fromkeys(self.modules, 0)
        self.order = []
        self.mask = padding_mask(item)
        self.model.eval()
        try:
            with torch.no_grad():
                _call(self.model, item, k)
        except _Stop:
            pass
        return {name: torch.cat(rows) for name, rows in self.rows.items() if rows}

    def _hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, tuple, dict], None]:
        param = next(module.parameters(), None)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
            if x is None or x.ndim == 0:
                raise TypeError(f"module {name!r} was called without a tensor input to record")
            width = self.width.setdefault(name, x.shape[-1])
            if width != x.shape[-1]:
                raise ValueError(
                    f"module {name!r} received inputs with {x.shape[-1]} features after "
                    f"inputs with {width}"
                )
            # A copy: the model may later change its activations in place.
            rows = x.detach().reshape(-1, x.shape[-1])
            mask = self.mask
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                rows = rows[mask.reshape(-1).to(rows.device) != 0]  # padding: never attended
            target = param if param is not None else rows
            self.rows[name].append(rows.to(device=target.device, dtype=target.dtype, copy=True))
            if not self.count[name]:
                self.order.append(name)
            self.count[name] += 1
            calls = self.calls
            if calls is not None and all(self.count[n] >= c for n, c in calls.items()):
                raise _Stop

        return hook


def record_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_data: Iterable,
    *,
    max_rows: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Run ``model`` on calibration data and record the inputs of some of its modules.

    Each item of ``calibration_data`` is one model call: a ``Tensor`` ``x`` runs
    ``model(x)``, a tuple or list runs ``model(*x)``, a mapping (e.g. a tokenizer's
    ``BatchEncoding``) runs ``model(**x)``. The model runs under ``torch.no_grad()`` in eval
    mode; every module's training flag is restored afterwards and the hooks are removed, even
    when the model raises.

    Args:
        model: the model to run.
        modules: ``name -> module`` whose first input is recorded (e.g. ``nn.Linear`` s of
            ``model``).
        calibration_data: an iterable of model inputs (a list, a ``DataLoader``, ...).
        max_rows: keep at most this many rows per module (rows of padding tokens left out:
            with a keyword batch holding an integer ``attention_mask`` whose shape is the
            input's leading dims, its zero entries): a uniform random subset without
            replacement (seeded), in the order the rows were seen. Data with a ``len()`` (a
            list, a ``DataLoader``) is read whole and sampled; an iterator or generator
            (which may be endless) is read only until every module that ran holds
            ``max_rows`` rows, and at most ``max_rows`` batches.
        seed: seed of the subsampling.
        progress: show a tqdm bar over the batches.

    Returns:
        ``name -> (rows, in_features)``: the module's inputs with all leading dims flattened,
        in the dtype and on the device of the module's parameters. A module that never ran
        gets ``(0, in_features)`` (``in_features`` from the module, else 0).

    Raises:
        TypeError: for bad ``modules``, a ``calibration_data`` that is not an iterable of
            batches, or an item of the wrong type.
        ValueError: for no batches, bad max_rows.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(modules, Mapping) or not all(
        isinstance(k, str) and isinstance(m, nn.Module) for k, m in modules.items()
    ):
        raise TypeError(
            f"modules must be a mapping of str names to nn.Module, got {type(modules).__name__}"
        )
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    _check_data(calibration_data)
    reservoirs = {name: _Reservoir(max_rows, seed) for name in modules}
    count = 0
    with _Taps(model, modules) as taps:
        sized = _has_length(calibration_data)
        for count, item in enumerate(_batches(calibration_data, progress), 1):
            for name, rows in taps.run(item, count - 1).items():
                reservoirs[name].add(rows)
            full = _full((r.seen for r in reservoirs.values()), max_rows)
            if not sized and (count >= max_rows or full):
                break  # an unsized stream may never end: stop once it has given enough
    if count == 0:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    out: dict[str, Tensor] = {}
    for name, module in modules.items():
        recorded = reservoirs[name].result()
        if recorded is None:  # never ran
            like = next(module.parameters(), torch.empty(0))
            recorded = like.new_empty(0, getattr(module, "in_features", 0))
        out[name] = recorded
    return out


def _batches(data: Iterable, progress: bool, what: str = "recording inputs") -> Iterable:
    if not progress:
        return data
    from tqdm.auto import tqdm

    return tqdm(data, desc=what, leave=False)


def _new_statistics(rows: Tensor, paired: bool, holdout: float, seed: int) -> InputStatistics:
    device = rows.device if rows.device.type != "mps" else torch.device("cpu")  # no float64
    return InputStatistics(rows.shape[1], device, paired, holdout, seed)


def record_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    data: Iterable,
    *,
    max_rows: int = 4096,
    holdout: float = 0.25,
    seed: int = 0,
    progress: bool = False,
    calls: Mapping[str, int] | None = None,
) -> dict[str, InputStatistics | None]:
    """Streamed statistics of the first ``max_rows`` input rows of each of ``modules``
    (``None`` for a module that never ran). The data is read until every module that ran has
    ``max_rows`` rows, and at most ``max_rows`` batches of an unsized stream. ``calls``: as
    for ``_Taps``, to cut each model call short."""
    stats: dict[str, InputStatistics] = {}
    count = 0
    with _Taps(model, modules, calls) as taps:
        sized = _has_length(data)
        for count, item in enumerate(_batches(data, progress), 1):
            for name, rows in taps.run(item, count - 1).items():
                st = stats.get(name)
                if st is None:
                    st = stats[name] = _new_statistics(rows, False, holdout, seed)
                if st.seen < max_rows:
                    st.add(rows[: max_rows - st.seen])
            full = _full((s.seen for s in stats.values()), max_rows)
            if full or (not sized and count >= max_rows):
                break
    if count == 0:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    return {name: stats.get(name) for name in modules}


def paired_statistics(
    model: nn.Module,
    swap: Callable[[], Callable[[], None]],
    modules: Mapping[str, nn.Module],
    data: Iterable,
    *,
    max_rows: int = 4096,
    holdout: float = 0.25,
    seed: int = 0,
    calls: Mapping[str, int] | None = None,
    also: Iterable[nn.Module] = (),
) -> tuple[dict[str, InputStatistics | None], set[str]]:
    """Statistics of the rows each of ``modules`` receives in the partially compressed model,
    paired with the rows it receives in the original model for the same samples.

    Each batch runs through ``model`` as it is (the sources), then with ``swap()`` applied
    (the rows seen; ``swap`` returns the function that undoes it), as far as the tapped
    modules need. ``also``: modules swapped in, whose training flags are restored too.

    Returns:
        ``(statistics, mismatched)``: ``name -> InputStatistics`` (``None`` if it never ran)
        and the names of modules that received a different number of rows in the two models
        (left out of the statistics from then on).
    """
    stats: dict[str, InputStatistics] = {}
    mismatched: set[str] = set()
    count = 0
    with _Taps(model, modules, calls, also) as taps:
        for count, item in enumerate(data, 1):
            sources = taps.run(item, count - 1)
            undo = swap()
            try:
                seen = taps.run(item, count - 1)
            finally:
                undo()
            for name, S in sources.items():
                X = seen.get(name)
                if name in mismatched or X is None or X.shape != S.shape:
                    mismatched.add(name)
                    continue
                st = stats.get(name)
                if st is None:
                    st = stats[name] = _new_statistics(S, True, holdout, seed)
                if st.seen < max_rows:
                    take = max_rows - st.seen
                    st.add(X[:take], S[:take])
            mismatched.update(n for n in seen if n not in sources)
            ready = [s.seen for n, s in stats.items() if n not in mismatched]
            if _full(ready, max_rows) and len(ready) + len(mismatched) >= len(stats):
                break
    if count == 0:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    return {name: stats.get(name) for name in modules}, mismatched


def padding_mask(item: object) -> Tensor | None:
    """The ``attention_mask`` of a keyword batch (a tokenizer's output), else ``None``.

    Rows of a module's input whose leading dims have this shape and whose mask entry is 0
    belong to padding tokens: attention never reads them, so they take no part in the model's
    output and are left out of calibration statistics and distillation losses."""
    if isinstance(item, Mapping):
        mask = item.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim >= 1 and not mask.is_floating_point():
            return mask
    return None


def call_counts(
    model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable
) -> dict[str, int]:
    """How many times the model calls each of ``modules`` on the first item of ``data``, in
    the order of their first calls (eval mode, no gradients; modules it does not call are
    left out)."""
    first = next(iter(data), _EMPTY)
    if first is _EMPTY:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs")
    with _Taps(model, modules) as taps:
        taps.run(first, 0)
    return {name: taps.count[name] for name in taps.order}


def _has_length(data: object) -> bool:
    """Whether ``data`` says how many batches it holds (a ``DataLoader`` over an
    ``IterableDataset`` has ``__len__`` but raises ``TypeError`` from it)."""
    try:
        len(data)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _full(seen: Iterable[int], size: int) -> bool:
    """Every module that ran (``seen`` rows each) has seen ``size`` rows, and one ran."""
    ran = [n for n in seen if n]
    return bool(ran) and all(n >= size for n in ran)


def _check_data(data: object, name: str = "calibration_data") -> None:
    hint = "an iterable of model inputs (e.g. a list of tensors, tuples or dicts, or a DataLoader)"
    if isinstance(data, Tensor | Mapping | str | bytes):
        raise TypeError(
            f"{name} must be {hint}, got a single {type(data).__name__}; wrap one batch in a "
            f"list: {name}=[batch]"
        )
    if not isinstance(data, Iterable):
        raise TypeError(f"{name} must be {hint}, got {type(data).__name__}")


def _call(model: nn.Module, item: object, k: int, what: str = "calibration_data") -> Any:
    """``model`` on one item of ``what``: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(item, Tensor | Mapping | tuple | list):
        try:
            if isinstance(item, Tensor):
                return model(item)
            if isinstance(item, Mapping):
                return model(**item)
            return model(*item)
        except (RuntimeError, ValueError, TypeError) as exc:  # re-raised naming the batch
            message = f"{what}[{k}]: the model raised on this batch: {exc}"
            try:
                new = type(exc)(message)
            except Exception:
                new = RuntimeError(message)
            raise new from exc
    raise TypeError(
        f"{what}[{k}] must be a Tensor (model(x)), a tuple or list of positional inputs "
        f"(model(*x)) or a dict of keyword inputs (model(**x)), got {type(item).__name__}"
    )
