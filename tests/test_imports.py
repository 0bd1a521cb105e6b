"""Import hygiene, each check in a fresh interpreter: importing tensorized (or its CLI) loads
no optional dependency, prints nothing, changes no global torch state and never initializes
CUDA (not even when layers are built and run on the CPU); every name in an ``__all__``
resolves and is documented."""

import json
import subprocess
import sys

import pytest

# Test/benchmark-only references and optional extras: the library imports them lazily, if ever.
OPTIONAL = (
    "tensorly",
    "tltorch",
    "matplotlib",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "sklearn",
    "mkdocs",
    "safetensors",
)
ENTRY_POINTS = ["tensorized", "tensorized.cli"]


def run_python(code, *flags):
    """Run ``code`` in a fresh interpreter; returns (stdout, stderr), failing on an error."""
    proc = subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def run_json(code):
    return json.loads(run_python(code)[0])


def test_public_names_and_no_heavy_imports():
    code = (
        "import sys, tensorized as tz; "
        "assert {'FactorizedLinear', 'RankBudgetWarning', 'Plan'} <= set(tz.__all__); "
        "bad = [m for m in ('tensorly', 'tltorch', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


STATE = """
import hashlib, json, sys, torch

def state():
    return {
        "default_dtype": str(torch.get_default_dtype()),
        "default_device": str(torch.get_default_device()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic],
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "rng": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
        "recursion_limit": sys.getrecursionlimit(),
    }

before = state()
import MODULE
loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
print(json.dumps([loaded, before, state()]))
"""


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_import_is_silent_light_and_stateless(module):
    # -W default shows every warning once, DeprecationWarnings included; the only output
    # must be the report printed after the import.
    code = STATE.replace("MODULE", module).replace("OPTIONAL", repr(OPTIONAL))
    out, err = run_python(code, "-W", "default")
    assert err == ""
    assert out.count("\n") == 1, out
    loaded, before, after = json.loads(out)
    assert loaded == [], "optional dependencies imported"
    assert after == before, "global torch state changed"


def test_the_optional_dependency_check_can_fail():
    # The check above reads top-level names in sys.modules: it does see a loaded package.
    loaded = run_json(
        "import json, sys, safetensors; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'safetensors'})))"
    )
    assert loaded == ["safetensors"]


def test_import_adds_no_warning_filter():
    # torch._dynamo (imported by torch.compiler.assume_constant_result) brings sympy, which
    # adds a filter of its own; it is imported first so that only the library's count.
    added = run_json(
        "import json, warnings, torch, torch._dynamo; before = list(warnings.filters); "
        "import tensorized, tensorized.cli; "
        "print(json.dumps([repr(f) for f in warnings.filters if f not in before]))"
    )
    assert added == []


def test_cuda_is_never_initialized():
    # A CPU-only build reports is_initialized() False whatever happens, so torch.cuda's lazy
    # initializer is also spied on: any attempt to start CUDA is counted.
    result = run_json(
        """
import json, torch
from torch import nn
calls = []
_lazy_init = torch.cuda._lazy_init
def spy(*args, **kwargs):
    calls.append(1)
    return _lazy_init(*args, **kwargs)
torch.cuda._lazy_init = spy
import tensorized as tz
from tensorized.formats import FORMATS
after_import = torch.cuda.is_initialized()
for fmt in FORMATS:
    rank = "same" if fmt == "dense" else 2
    layer = tz.FactorizedLinear((2, 3), (3, 2), True, fmt, rank, 2)
    layer(torch.randn(4, 6), 1).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 6), 1)
    str(layer.plan(4))
    tz.FactorizedLinear.from_linear(nn.Linear(6, 6), (2, 3), (3, 2), rank, factorization=fmt)
model = nn.Sequential(nn.Linear(64, 64))
tz.tensorize_(model, tz.TensorizeConfig(order=2, min_params=0, progress=False))
model(torch.randn(2, 64))
print(json.dumps([after_import, torch.cuda.is_initialized(), len(calls)]))
"""
    )
    assert result == [False, False, 0]


def test_spy_on_cuda_initialization_can_fail():
    # The spy above does count an attempt (which raises on a CPU-only build).
    calls = run_json(
        "import json, torch; calls = []; f = torch.cuda._lazy_init\n"
        "torch.cuda._lazy_init = lambda: (calls.append(1), f())\n"
        "try:\n    torch.cuda.current_device()\nexcept Exception:\n    pass\n"
        "print(json.dumps(len(calls)))"
    )
    assert calls == 1


def test_every_name_in_all_resolves_and_is_documented():
    missing = run_json(
        """
import importlib, json, pkgutil
import tensorized, tensorized.formats
names = ["tensorized", "tensorized.formats"]
for pkg in (tensorized, tensorized.formats):
    names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
missing, checked = [], 0
for name in names:
    if name.endswith("__main__"):
        continue  # running it is the CLI
    module = importlib.import_module(name)
    for attr in getattr(module, "__all__", ()):
        checked += 1
        if not hasattr(module, attr):
            missing.append(f"{name}.{attr}")
star = {}
exec("from tensorized import *", star)
missing += [n for n in tensorized.__all__ if n not in star]
undocumented = [
    n for n in tensorized.__all__ if not (getattr(tensorized, n).__doc__ or "").strip()
]
print(json.dumps([missing, checked, undocumented]))
"""
    )
    missing, checked, undocumented = missing
    assert missing == []
    assert checked >= 12  # tensorized.__all__ alone has 12 names
    assert undocumented == []
