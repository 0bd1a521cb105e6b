"""The planner's machine model: fallback constants, constants measured on the device, and
their on-disk cache.

The planner (:mod:`tensorized._plan`) turns each strategy's declared work into a time with
five constants per device type and dtype (:class:`Machine`). The fallback constants were
fitted by hand on a few CPUs and one GPU; a short microbenchmark on the device in use (a
square GEMM, a memory-bound product on reused and on freshly mapped memory, an element-wise
product, a tiny kernel) replaces them the first time a plan is
made there, and the result is kept in the user's cache directory, so it runs once per
machine, dtype and thread count.

Automatic measurement is turned off by the environment variable ``TENSORIZED_CALIBRATE=0``
(the fallback constants are then used, as before), and constants can be set explicitly with
:func:`set_planner_machine` (tests inject them: nothing here is timed in the test suite).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._ops import capturing

__all__ = [
    "FALLBACK_MACHINES",
    "Machine",
    "calibrate_planner",
    "planner_machine",
    "set_planner_machine",
]


@dataclass(frozen=True)
class Machine:
    """A crude machine model: GEMM rate, memory bandwidth and per-call overhead.

    Attributes:
        flops_per_s: rate of a large matrix product (FLOPs: 2 per multiply-add).
        bytes_per_s: operand traffic of a memory-bound matrix product whose operands fit
            the allocator's reused memory (a few MB).
        call_overhead_s: time of one kernel call from Python, work aside.
        elementwise_bytes_per_s: traffic of broadcast element-wise kernels.
        fresh_bytes_per_s: rate of first touching a buffer of at least
            :data:`FRESH_BUFFER_BYTES`, paid on top of the traffic: on the CPU (glibc) such
            buffers are mapped afresh by every allocation and page-faulted in as they are
            written (about 5x slower than traffic on reused memory here); ``None``: no such
            cost (CUDA's caching allocator).
    """

    flops_per_s: float
    bytes_per_s: float
    call_overhead_s: float
    elementwise_bytes_per_s: float
    fresh_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "fresh_bytes_per_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Machine.{f.name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Machine.{f.name} must be finite and > 0, got {value!r}")


#: Buffers this large are mapped afresh by each allocation on the CPU: glibc's largest
#: mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB); smaller ones are
#: reused from the heap once freed.
FRESH_BUFFER_BYTES = 32 * 2**20

#: The constants used where nothing was measured (float32; float64 at half the GEMM rate).
FALLBACK_MACHINES: dict[str, Machine] = {
    "cpu": Machine(120e9, 20e9, 15e-6, elementwise_bytes_per_s=6e9),  # fitted with no fresh term
    "cuda": Machine(40e12, 1.5e12, 8e-6, elementwise_bytes_per_s=1e12),
}

ENV_SWITCH = "TENSORIZED_CALIBRATE"
ENV_CACHE_DIR = "TENSORIZED_CACHE_DIR"
CACHE_FILE = "planner_machines.json"

_explicit: dict[tuple[str, torch.dtype | None], Machine] = {}  # set_planner_machine
_known: dict[str, Machine] = {}  # measured or read from disk, by device key
_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the constants in use may change (plan caches register)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def fallback(device_type: str, dtype: torch.dtype) -> Machine:
    """The fallback constants for ``device_type`` (others: the CPU's) and ``dtype``."""
    machine = FALLBACK_MACHINES.get(device_type, FALLBACK_MACHINES["cpu"])
    if dtype == torch.float64:
        machine = dataclasses.replace(machine, flops_per_s=machine.flops_per_s / 2)
    return machine


def planner_machine(device_type: str, dtype: torch.dtype = torch.float32) -> Machine:
    """The constants the planner uses for ``device_type`` (``'cpu'``, ``'cuda'``) and ``dtype``.

    In order: constants set with :func:`set_planner_machine`; constants measured on this
    machine (read from the cache, or measured now unless ``TENSORIZED_CALIBRATE=0``); the
    fallback constants.
    """
    for key in ((device_type, dtype), (device_type, None)):
        if key in _explicit:
            return _explicit[key]
    if not _calibration_enabled() or device_type not in ("cpu", "cuda"):
        return fallback(device_type, dtype)
    if device_type == "cuda" and not torch.cuda.is_available():
        return fallback(device_type, dtype)
    device_key = _device_key(device_type, dtype)
    machine = _known.get(device_key)
    if machine is None:
        machine = _read_cache().get(device_key)
        if machine is None:
            if not _can_measure(device_type):
                return fallback(device_type, dtype)
            machine = measure_machine(torch.device(device_type), dtype)
            _write_cache(device_key, machine)
        _known[device_key] = machine
    return machine


def set_planner_machine(
    machine: Machine | None, device_type: str = "cpu", dtype: torch.dtype | None = None
) -> None:
    """Use ``machine``'s constants for ``device_type`` (every dtype, or only ``dtype``); with
    ``None``, drop the constants set before. Cached plans are dropped either way."""
    if machine is not None and not isinstance(machine, Machine):
        raise TypeError(f"machine must be a tensorized.Machine or None, got {machine!r}")
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'cpu', got {device_type!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if machine is None:
        _explicit.pop((device_type, dtype), None)
    else:
        _explicit[(device_type, dtype)] = machine
    _changed()


def calibrate_planner(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Machine:
    """Measure the planner's constants on ``device`` for ``dtype`` now (about a second), keep
    them in the cache directory and use them from here on (even with
    ``TENSORIZED_CALIBRATE=0``, for this process).

    Returns:
        The measured :class:`Machine`.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    machine = measure_machine(device, dtype)
    key = _device_key(device.type, dtype, device.index)
    _write_cache(key, machine)
    _known[key] = machine
    _explicit[(device.type, dtype)] = machine
    _changed()
    return machine


# ------------------------------------------------------------------ measurement


def measure_machine(device: torch.device, dtype: torch.dtype) -> Machine:
    """The five constants, from a microbenchmark on ``device`` in ``dtype``, each measured
    the way the cost model uses it (the best of a few timed repetitions):

    - ``flops_per_s``: a square GEMM (512 on the CPU, 4096 on a GPU);
    - ``bytes_per_s``: a product with 16 columns over more rows than the caches hold (8 MB
      operands on a CPU: below :data:`FRESH_BUFFER_BYTES`), its operands' traffic over its
      time;
    - ``call_overhead_s``: one step of a mode-by-mode strategy on tiny operands (a product on
      the last axis, then a view and a transpose): what each declared product costs beyond
      its arithmetic;
    - ``elementwise_bytes_per_s``: a broadcast product like a Khatri-Rao step, ``(n, 1, R)``
      times ``(m, R)``, over more elements than the caches hold, bytes written over time;
    - ``fresh_bytes_per_s`` (CPU only): the same 16-column product with an output above
      :data:`FRESH_BUFFER_BYTES`, its output's bytes over the time beyond its traffic.
    """
    gpu = device.type == "cuda"
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    n = 4096 if gpu else 512
    a, b = torch.randn(n, n, **kw), torch.randn(n, n, **kw)
    flops = 2 * n**3 / _best_time(lambda: a @ b, device)
    rows = 1 << (24 if gpu else 17)
    tall, narrow = torch.randn(rows, 16, **kw), torch.randn(16, 16, **kw)
    itemsize = tall.element_size()
    traffic = (2 * rows * 16 + 16 * 16) * itemsize / _best_time(lambda: tall @ narrow, device)
    fresh = None
    if not gpu:  # an output just above the threshold: every call maps and faults it in
        rows = FRESH_BUFFER_BYTES // (16 * itemsize) + 4096
        tall = torch.randn(rows, 16, **kw)
        seconds = _best_time(lambda: tall @ narrow, device)
        beyond = seconds - (2 * rows * 16 + 16 * 16) * itemsize / traffic
        fresh = rows * 16 * itemsize / max(beyond, 0.1 * seconds)
    t, f = torch.randn(4, 4, **kw), torch.randn(4, 4, **kw)
    overhead = _best_time(
        lambda: torch.mm(t.reshape(-1, 4), f).view(-1, 2, 2).transpose(1, 2), device, calls=50
    )
    left, right = torch.randn(1 << (14 if gpu else 10), 1, 64, **kw), torch.randn(64, 64, **kw)
    written = left.shape[0] * right.numel() * itemsize
    elementwise = written / _best_time(lambda: left * right, device)
    return Machine(
        flops, traffic, overhead, elementwise_bytes_per_s=elementwise, fresh_bytes_per_s=fresh
    )


def _best_time(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    """Seconds per call of ``fn``: the best of five repetitions of ``calls`` calls, after one
    warm-up repetition."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for rep in range(6):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        if rep:
            best = min(best, (time.perf_counter() - start) / calls)
    return max(best, 1e-9)


def _can_measure(device_type: str) -> bool:
    # Never time inside a trace or a CUDA graph capture: the fallback serves until later.
    if capturing():
        return False
    return not (device_type == "cuda" and torch.cuda.is_current_stream_capturing())


def _calibration_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# ------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """``$TENSORIZED_CACHE_DIR``, else ``$XDG_CACHE_HOME/tensorized``, else
    ``~/.cache/tensorized``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tensorized"


def _device_key(device_type: str, dtype: torch.dtype, index: int | None = None) -> str:
    """What the constants depend on: the device's model, the dtype and its math mode, the
    thread count on the CPU, and the torch version."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)
        mode = f"tf32={torch.backends.cuda.matmul.allow_tf32}" if dtype == torch.float32 else ""
    else:
        name, mode = _cpu_name(), f"threads={torch.get_num_threads()}"
    dtype_name = str(dtype).replace("torch.", "")
    # model 2: bytes_per_s measured on reused memory, plus fresh_bytes_per_s
    return f"{device_type}|{name}|{dtype_name}|{mode}|torch {torch.__version__}|model 2"


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _read_cache() -> dict[str, Machine]:
    path = cache_dir() / CACHE_FILE
    try:
        raw = json.loads(path.read_text())
        return {key: Machine(**fields) for key, fields in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        warnings.warn(
            f"tensorized: ignoring the planner's unreadable machine cache {path} ({exc}); "
            "it will be measured again",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}


def _write_cache(key: str, machine: Machine) -> None:
    """Add ``key`` to the cache file (atomically: a temporary file, then a rename); a cache
    that cannot be written is skipped with a warning, never an error."""
    path = cache_dir() / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {k: dataclasses.asdict(m) for k, m in _read_cache().items()}
        entries[key] = dataclasses.asdict(machine)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(
            f"tensorized: could not write the planner's machine cache {path} ({exc})",
            RuntimeWarning,
            stacklevel=3,
        )
