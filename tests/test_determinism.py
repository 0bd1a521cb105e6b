"""Determinism: the same seed builds bit-identical layers; from_linear, from_linear_list and
tensorize_ (with the randomized decomposition options too) give bit-identical factors run
after run and process after process, and the decompositions leave the global RNG alone."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import tensorized as tz
from tensorized import decompose as dec
from tensorized.formats import FORMATS

FORMAT_NAMES = list(FORMATS)
RANK = {"dense": "same", "cp": 6}
IN, OUT = (4, 4, 4), (4, 4, 4)

# Decomposition options per format. "seed" stands for a fresh torch.Generator seeded so,
# made per run (a generator shared by two runs would be consumed by the first). Few CP
# iterations: only reproducibility is tested, and ALS on random weights runs to n_iter_max.
# The small oversampling lets the randomized range finder run on these small unfoldings (it
# falls back to the exact SVD unless rank + n_oversamples < min(m, n)).
OPTIONS = {
    "cp": [
        {"n_iter_max": 3},
        {"init": "random", "n_iter_max": 3},
        {"init": "random", "seed": 3, "n_iter_max": 3},
    ],
    "tucker": [{}, {"init": "random"}, {"init": "random", "seed": 3}],
    "tt": [{}, {"method": "randomized", "n_oversamples": 2}],
    "blocktt": [{}, {"method": "randomized", "n_oversamples": 2, "seed": 3}],
    "lowrank": [{}, {"method": "randomized"}, {"method": "randomized", "seed": 3}],
    "basis": [{}, {"method": "randomized"}, {"method": "randomized", "seed": 3}],
    "dense": [{}],
}
CASES = [(fmt, opts) for fmt, variants in OPTIONS.items() for opts in variants]
CASE_IDS = [f"{fmt}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for fmt, o in CASES]
RANDOMIZED = [case for case in CASES if "seed" in case[1]]
RANDOMIZED_IDS = [i for i, case in zip(CASE_IDS, CASES) if "seed" in case[1]]


def kwargs_of(options, seed=None):
    kwargs = {k: v for k, v in options.items() if k != "seed"}
    if "seed" in options:
        kwargs["generator"] = torch.Generator().manual_seed(
            options["seed"] if seed is None else seed
        )
    return kwargs


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def differs(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def sources(n=1, seed=100):
    """Dense layers to compress (full rank, so randomized steps change the result)."""
    torch.manual_seed(seed)
    return [nn.Linear(64, 64) for _ in range(n)]


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_construction_is_bit_identical_under_the_same_seed(fmt, n_layers):
    def build(seed):
        torch.manual_seed(seed)
        return tz.FactorizedLinear((4, 6), (3, 5), True, fmt, RANK.get(fmt, 3), n_layers)

    first = build(7)
    assert not differs(state(first), state(build(7)))
    assert differs(state(first), state(build(8))), "the seed has no effect: the check is void"
    # reset_parameters draws from the same stream, so it reproduces too
    torch.manual_seed(9)
    first.reset_parameters()
    again = build(7)
    torch.manual_seed(9)
    again.reset_parameters()
    assert not differs(state(first), state(again))


# ------------------------------------------------------------------ decompositions


@pytest.mark.parametrize("joint", [False, True], ids=["from_linear", "from_linear_list"])
@pytest.mark.parametrize(("fmt", "options"), CASES, ids=CASE_IDS)
def test_from_linear_is_bit_identical_across_runs(fmt, options, joint):
    def run():
        torch.manual_seed(0)
        rank = RANK.get(fmt, 3)
        args = (IN, OUT, rank, True, fmt, kwargs_of(options))
        if joint:
            return state(tz.FactorizedLinear.from_linear_list(sources(3), *args))
        return state(tz.FactorizedLinear.from_linear(sources()[0], *args))

    assert not differs(run(), run())


@pytest.mark.parametrize(("fmt", "options"), RANDOMIZED, ids=RANDOMIZED_IDS)
def test_randomized_options_depend_on_their_generator(fmt, options):
    # Otherwise the bit-identity checks above would not exercise any random step.
    rank = RANK.get(fmt, 3)
    a, b = (
        state(tz.FactorizedLinear.from_linear(sources()[0], IN, OUT, rank, True, fmt, kw))
        for kw in (kwargs_of(options, seed=3), kwargs_of(options, seed=4))
    )
    assert differs(a, b)


def model():
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)
    )


@pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")  # coarse ranks: fine here
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("joint", [False, True])
def test_tensorize_is_bit_identical_across_runs(fmt, joint):
    rank = "same" if fmt == "dense" else 0.3
    kwargs = {"n_iter_max": 3} if fmt == "cp" else {}
    config = tz.TensorizeConfig(
        factorization=fmt,
        rank=rank,
        order=2,
        min_params=0,
        joint=joint,
        decomposition_kwargs=kwargs,
        progress=False,
    )

    def run():
        torch.manual_seed(0)
        m = model()
        tz.tensorize_(m, config)
        return state(m)

    first = run()
    assert any(".weight." in k for k in first), "nothing was factorized"
    assert not differs(first, run())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_compressed_layers_do_not_depend_on_the_global_seed(fmt):
    # The decompositions draw from their own generator (seeded 0 unless one is passed).
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        rank = RANK.get(fmt, 3)
        kwargs = {"n_iter_max": 3} if fmt == "cp" else None
        layer = tz.FactorizedLinear.from_linear(sources()[0], IN, OUT, rank, True, fmt, kwargs)
        results.append(state(layer))
    assert not differs(*results)


DECOMPOSITIONS = {
    "cp_als-svd": lambda T, M: dec.cp_als(T, 20),  # rank 20 > 4: random extra columns
    "cp_als-random": lambda T, M: dec.cp_als(T, 3, init="random"),
    "tucker-random": lambda T, M: dec.tucker(T, [2, 2, 2, 2], init="random"),
    "tensor_train-randomized": lambda T, M: dec.tensor_train(
        T, [2, 2, 2], method="randomized", n_oversamples=1
    ),
    "tensor_train_matrix-randomized": lambda T, M: dec.tensor_train_matrix(
        T, 2, [3], method="randomized", n_oversamples=1
    ),
    "truncated_svd-randomized": lambda T, M: dec.truncated_svd(M, 3, method="randomized"),
    "lowrank-randomized": lambda T, M: dec.lowrank(M, 3, method="randomized"),
}


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
def test_decompositions_leave_the_global_rng_alone(name):
    T = torch.randn(4, 4, 4, 4, dtype=torch.float64)
    M = torch.randn(64, 64, dtype=torch.float64)
    before = torch.get_rng_state()
    DECOMPOSITIONS[name](T, M)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt", "lowrank", "dense"])
def test_from_linear_and_from_matrix_leave_the_global_rng_alone(fmt):
    lin = nn.Linear(16, 16)
    before = torch.get_rng_state()
    rank = "same" if fmt == "dense" else 3
    tz.FactorizedLinear.from_linear(lin, (4, 4), (4, 4), rank=rank, factorization=fmt)
    FORMATS[fmt].from_matrix(lin.weight.detach(), (4, 4), (4, 4), rank)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ across processes

SCRIPT = """
import hashlib, json, torch
from torch import nn
import tensorized as tz
from tensorized.formats import FORMATS

OPTIONS = {options}

def digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

out = {{}}
for fmt, variants in OPTIONS.items():
    rank = "same" if fmt == "dense" else (6 if fmt == "cp" else 3)
    torch.manual_seed(0)
    out[fmt + "-init"] = digest(tz.FactorizedLinear((4, 4, 4), (4, 4, 4), True, fmt, rank, 2))
    for k, options in enumerate(variants):
        kwargs = {{key: v for key, v in options.items() if key != "seed"}}
        if "seed" in options:
            kwargs["generator"] = torch.Generator().manual_seed(options["seed"])
        torch.manual_seed(100)
        linears = [nn.Linear(64, 64) for _ in range(2)]
        layer = tz.FactorizedLinear.from_linear_list(
            linears, (4, 4, 4), (4, 4, 4), rank, True, fmt, kwargs
        )
        out[f"{{fmt}}-{{k}}"] = digest(layer)
print(json.dumps(out))
"""


def test_bit_identical_across_processes():
    code = SCRIPT.format(options=repr(OPTIONS))
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
        for _ in range(2)
    ]
    first, second = (json.loads(r.stdout) for r in runs)
    assert len(first) == len(FORMAT_NAMES) + len(CASES)
    assert first == second
