"""tensorize_ against dense oracles: matching, swapping, report numbers, joint groups, atomicity."""

import copy
import dataclasses
import json
import pickle
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import tensorized as tz
from oracles import dense_weight
from tensorized import FactorizedLinear, LinearView, TensorizeConfig, tensorize_
from tensorized._shapes import tensorize_shape
from tensorized._statistics import InputStatistics

F64 = torch.float64
FAST = {"cp": {"n_iter_max": 3}}  # ALS iterations do not change shapes or counts


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, h):
        return self.o(self.q(h) * torch.sigmoid(self.k(h)) + self.v(h))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, h):
        h = h + self.attn(h)
        return h + self.mlp(h)


class Net(nn.Module):
    """Names like ``blocks.0.attn.q`` (ModuleList), ``blocks.0.mlp.0`` (Sequential),
    ``heads.cls`` (ModuleDict); ``embed`` and the heads are below the default min_params."""

    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(d, 4), "reg": nn.Linear(d, 2)})

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return torch.cat([self.heads["cls"](h), self.heads["reg"](h)], dim=-1)


BLOCK_LAYERS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2"]
DEFAULT_TARGETS = {f"blocks.{i}.{s}" for i in range(2) for s in BLOCK_LAYERS}


def config(**kw):
    kw.setdefault("progress", False)
    return TensorizeConfig(**kw)


def linear_ids(model):
    return {n: id(m) for n, m in model.named_modules()}


def new_matrix(module):
    """(W, b) of a replaced module, from its factors."""
    if isinstance(module, LinearView):
        p, i = module.parent, module.indices
        return dense_weight(p.weight, i), None if p.bias is None else p.bias[i]
    return dense_weight(module.weight), module.bias


@torch.no_grad()
def dense_oracle(original, replaced_names, model):
    """The original model with each replaced Linear's weight set to the new layer's matrix."""
    ref = copy.deepcopy(original)
    for name in replaced_names:
        W, b = new_matrix(model.get_submodule(name))
        lin = ref.get_submodule(name)
        lin.weight.copy_(W)
        if b is not None:
            lin.bias.copy_(b)
    return ref


def rel_error(W, What):
    W, What = W.detach().to(F64), What.detach().to(F64)
    return float(torch.linalg.norm(W - What) / torch.linalg.norm(W))


# --------------------------------------------------------------------------- config


def test_config_round_trip_is_json_and_equal():
    c = TensorizeConfig(
        factorization="TT-matrix",
        rank=[2, 3],
        target_modules=["q", "k"],
        exclude_modules=r"blocks\.1\..*",
        order=2,
        min_params=0,
        implementation="factorized",
        joint=True,
        decomposition_kwargs={"n_iter_max": 5, "init": "svd", "extra": [1, 2]},
        calibration_steps=3,
        calibration_rows=10,
        progress=False,
    )
    assert c.factorization == "blocktt" and c.rank == (2, 3) and c.target_modules == ("q", "k")
    d = c.to_dict()
    assert d["rank"] == [2, 3] and d["target_modules"] == ["q", "k"]
    assert d["decomposition_kwargs"] == {"n_iter_max": 5, "init": "svd", "extra": [1, 2]}
    assert type(d["decomposition_kwargs"]) is dict
    back = TensorizeConfig.from_dict(json.loads(json.dumps(d)))
    assert back == c and hash(back) == hash(c)
    assert TensorizeConfig.from_dict(TensorizeConfig().to_dict()) == TensorizeConfig()
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown TensorizeConfig keys \['bogus', 'ranks'\].*"):
        TensorizeConfig.from_dict({"rank": 0.5, "ranks": 2, "bogus": 1})
    with pytest.raises(ValueError, match=r"valid keys: \['factorization', 'rank'"):
        TensorizeConfig.from_dict({"bogus": 1})
    with pytest.raises(TypeError, match="dict of TensorizeConfig fields"):
        TensorizeConfig.from_dict([("rank", 0.5)])


@pytest.mark.parametrize(
    "field, value, exc, match",
    [
        ("factorization", "svd", ValueError, r"factorization: unknown factorization 'svd'"),
        ("factorization", 3, TypeError, r"factorization"),
        ("rank", "half", ValueError, r"rank must be 'same'.*got str 'half'"),
        ("rank", True, TypeError, r"rank must be .*got bool True"),
        ("rank", None, TypeError, r"rank must be .*got NoneType None"),
        ("rank", -0.5, ValueError, r"rank must be .*float > 0.*-0.5"),
        ("rank", 0, ValueError, r"rank must be .*int >= 1.*got int 0"),
        ("rank", float("nan"), ValueError, r"rank must be .*nan"),
        ("rank", (2, 0), ValueError, r"rank must be .*tuple of ints >= 1.*\(2, 0\)"),
        ("rank", (2, 1.5), TypeError, r"rank must be .*\(2, 1.5\)"),
        ("rank", (), TypeError, r"rank must be .*got tuple \(\)"),
        ("target_modules", 5, TypeError, r"target_modules must be None, a regex.*got int 5"),
        ("target_modules", "(", ValueError, r"target_modules must be .*invalid regex"),
        ("target_modules", ["q", 3], TypeError, r"target_modules must be .*\['q', 3\]"),
        ("exclude_modules", [""], TypeError, r"exclude_modules must be .*\[''\]"),
        ("order", 0, ValueError, r"order must be an int >= 1, got int 0"),
        ("order", 2.0, TypeError, r"order must be an int >= 1, got float 2.0"),
        ("min_params", -1, ValueError, r"min_params must be an int >= 0, got int -1"),
        ("implementation", "fast", ValueError, r"implementation must be one of \('auto'"),
        ("joint", "yes", TypeError, r"joint must be a bool, got str 'yes'"),
        ("rank_allocation", "greedy", ValueError, r"rank_allocation must be 'uniform' or"),
        ("decomposition_kwargs", [("a", 1)], TypeError, r"decomposition_kwargs must be a dict"),
        ("decomposition_kwargs", {1: 2}, TypeError, r"decomposition_kwargs must be a dict"),
        ("calibration_steps", -1, ValueError, r"calibration_steps must be an int >= 0"),
        ("calibration_rows", 0, ValueError, r"calibration_rows must be an int >= 1, got int 0"),
        ("progress", "no", TypeError, r"progress must be None or a bool, got str 'no'"),
    ],
)
def test_config_validates_each_field(field, value, exc, match):
    with pytest.raises(exc, match=match):
        TensorizeConfig(**{field: value})


@pytest.mark.parametrize("rank", [1.5, 4, 0.0, "same", (2, 2)])
def test_config_budget_needs_a_fraction(rank):
    with pytest.raises(ValueError, match=r"rank must be a float in \(0, 1\] with rank_alloc"):
        TensorizeConfig(rank_allocation="budget", rank=rank)


def test_config_budget_needs_ranks_to_allocate():
    with pytest.raises(ValueError, match=r"rank_allocation must be 'uniform' with .*'dense'"):
        TensorizeConfig(factorization="dense", rank=0.5, rank_allocation="budget")
    assert TensorizeConfig(rank_allocation="budget", rank=1.0).rank == 1.0


def test_config_is_never_mutated(monkeypatch):
    user_kwargs = {"n_iter_max": 2}
    cfg = config(factorization="cp", rank=0.3, order=2, decomposition_kwargs=user_kwargs)
    user_kwargs["n_iter_max"] = 1  # the caller's dict was copied on the way in
    assert cfg.decomposition_kwargs == {"n_iter_max": 2}
    with pytest.raises(TypeError, match="read-only"):
        cfg.decomposition_kwargs["n_iter_max"] = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 0.1
    snapshot = copy.deepcopy(cfg)
    original = FactorizedLinear.from_linear
    seen = []

    def greedy_callee(linear, *args, **kw):  # a callee that mutates what it is given
        layer = original(linear, *args, **kw)
        seen.append(dict(kw["decomposition_kwargs"]))
        kw["decomposition_kwargs"].clear()
        return layer

    monkeypatch.setattr(FactorizedLinear, "from_linear", greedy_callee)
    tensorize_(Net(), cfg)
    assert seen == [{"n_iter_max": 2}] * len(DEFAULT_TARGETS)
    assert cfg == snapshot and cfg.decomposition_kwargs == {"n_iter_max": 2}


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "kw, filter_fn, expected",
    [
        ({}, None, DEFAULT_TARGETS),
        (
            {"target_modules": r"blocks\.\d+\.attn\.(q|v)"},
            None,
            {"blocks.0.attn.q", "blocks.1.attn.q", "blocks.0.attn.v", "blocks.1.attn.v"},
        ),
        ({"target_modules": ["q"]}, None, {"blocks.0.attn.q", "blocks.1.attn.q"}),
        ({"target_modules": ("attn.q",)}, None, {"blocks.0.attn.q", "blocks.1.attn.q"}),
        ({"target_modules": ["blocks.0.attn.q"]}, None, {"blocks.0.attn.q"}),
        (
            {"target_modules": ["mlp.0", "mlp.2"], "exclude_modules": r"blocks\.1\..*"},
            None,
            {"blocks.0.mlp.0", "blocks.0.mlp.2"},
        ),
        (
            {"exclude_modules": ["o", "k"]},
            None,
            DEFAULT_TARGETS - {f"blocks.{i}.attn.{s}" for i in range(2) for s in "ok"},
        ),
        (
            {"target_modules": r".*"},
            lambda m, n: m.out_features == 64,
            {"blocks.0.mlp.0", "blocks.1.mlp.0"},
        ),
        (
            {"target_modules": ["cls", "heads.reg", "embed"], "min_params": 0},
            None,
            {"heads.cls", "heads.reg", "embed"},
        ),
        ({"min_params": 2048}, None, {f"blocks.{i}.mlp.{j}" for i in range(2) for j in (0, 2)}),
    ],
)
def test_matching_rules_replace_exactly_the_matched_layers(kw, filter_fn, expected):
    model = Net()
    before = linear_ids(model)
    report = tensorize_(
        model, config(factorization="dense", rank="same", **kw), filter_fn=filter_fn
    )
    assert {row.name for row in report} == expected
    for name, module in model.named_modules():
        if name in expected:
            assert type(module) is FactorizedLinear
            assert all(p.dtype == torch.float32 for p in module.parameters())
        elif name in before:
            assert id(module) == before[name]  # everything else is the same object


@pytest.mark.parametrize("target", ["attn", r"blocks\.0", ["ttn.q"], ["blocks.0"]])
def test_nothing_matched_lists_the_linear_layers(target):
    model = Net()
    with pytest.raises(ValueError, match=r"matched no layer.*'embed' \(256 weights\).*'blocks"):
        tensorize_(model, config(target_modules=target))
    with pytest.raises(ValueError, match=r"matched no layer.*filter_fn"):
        tensorize_(model, config(), filter_fn=lambda m, n: False)
    assert isinstance(model.blocks[0].attn.q, nn.Linear)


def test_only_plain_linears_and_shared_modules_everywhere():
    class MyLinear(nn.Linear):  # a subclass may have its own forward: left alone
        pass

    shared = nn.Linear(32, 32)
    model = nn.Sequential(MyLinear(32, 32), shared, nn.ReLU(), shared)
    model.add_module("mha", nn.MultiheadAttention(32, 4))  # out_proj is a Linear subclass
    report = tensorize_(model, config(order=2))
    assert [row.name for row in report] == ["1"]
    assert isinstance(model[1], FactorizedLinear) and model[3] is model[1]
    assert type(model[0]) is MyLinear and type(model.mha.out_proj) is not FactorizedLinear
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        tensorize_("model", config())
    with pytest.raises(TypeError, match=r"config must be a TensorizeConfig .*from_dict.*dict"):
        tensorize_(model, {"rank": 0.5})
    with pytest.raises(TypeError, match="filter_fn must be None or callable, got int"):
        tensorize_(model, config(), filter_fn=3)


# --------------------------------------------------------------------------- swap and report


@pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")  # small layers: coarse
@pytest.mark.parametrize("fmt", ["tucker", "tt", "blocktt", "cp", "lowrank"])
def test_swapped_model_equals_dense_oracle_and_report_is_exact(fmt):
    model = Net().to(F64)
    original = copy.deepcopy(model)
    cfg = config(
        factorization=fmt,
        rank=0.3,
        order=2,
        min_params=0,
        exclude_modules=["reg"],
        decomposition_kwargs=FAST.get(fmt, {}),
    )
    report = tensorize_(model, cfg)
    names = [row.name for row in report]
    assert set(names) == DEFAULT_TARGETS | {"embed", "heads.cls"}
    x = torch.randn(5, 3, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), dense_oracle(original, names, model)(x), rtol=1e-10, atol=1e-10
        )
    for row in report:
        old, new = original.get_submodule(row.name), model.get_submodule(row.name)
        assert row.kind == "linear" and row.group is None
        assert all(p.dtype == F64 for p in new.parameters())
        assert (row.in_features, row.out_features) == (old.in_features, old.out_features)
        assert (row.in_modes, row.out_modes) == tensorize_shape(
            old.in_features, old.out_features, 2
        )
        assert row.in_modes == new.in_tensorized_features and row.rank == new.rank
        assert row.old_params == old.weight.numel() + old.bias.numel()
        assert row.new_params == sum(p.numel() for p in new.parameters())
        assert row.weight_error == pytest.approx(rel_error(old.weight, dense_weight(new.weight)))
        assert row.output_error_before is None and row.output_error_after is None
        assert row.seconds >= 0
    assert report.old_params == sum(r.old_params for r in report)
    assert report.new_params == sum(r.new_params for r in report)
    assert report.compression == pytest.approx(report.old_params / report.new_params)
    assert report.model_params_before == sum(p.numel() for p in original.parameters())
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert len(report) == len(names) and report.to_list()[0]["name"] == names[0]


@pytest.mark.parametrize("fmt", ["tucker", "tt", "blocktt", "cp", "lowrank"])
def test_float_rank_is_the_fraction_of_the_targeted_weights(fmt):
    model = Net(d=64)
    dense = sum(model.get_submodule(n).weight.numel() for n in DEFAULT_TARGETS)
    kw = FAST.get(fmt, {})
    tensorize_(model, config(factorization=fmt, rank=0.25, order=2, decomposition_kwargs=kw))
    factorized = sum(model.get_submodule(n).weight.num_params for n in DEFAULT_TARGETS)
    assert abs(factorized - 0.25 * dense) <= 0.05 * 0.25 * dense


def test_rank_warnings_name_the_layer_and_can_be_errors():
    model = Net()
    ids = linear_ids(model)
    cfg = config(factorization="lowrank", rank=0.3, target_modules=["blocks.0.attn.q"])
    with pytest.warns(tz.RankBudgetWarning, match=r"^layer 'blocks\.0\.attn\.q': rank=0.3 asks"):
        tensorize_(copy.deepcopy(model), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tz.RankBudgetWarning)
        with pytest.raises(tz.RankBudgetWarning, match=r"layer 'blocks\.0\.attn\.q'"):
            tensorize_(model, cfg)
    assert linear_ids(model) == ids


def test_joint_groups_share_one_factorized_layer():
    model = Net().to(F64)
    original = copy.deepcopy(model)
    cfg = config(
        factorization="tt",
        rank=0.4,
        order=2,
        joint=True,
        min_params=0,
        target_modules=["attn.q", "attn.k", "embed"],
    )
    report = tensorize_(model, cfg)
    assert [(r.name, r.kind) for r in report] == [
        ("embed", "linear"),
        ("blocks.*.attn.q", "joint"),
        ("blocks.*.attn.k", "joint"),
    ]
    q0, q1, k0 = model.blocks[0].attn.q, model.blocks[1].attn.q, model.blocks[0].attn.k
    assert isinstance(q0, LinearView) and (q0.indices, q1.indices) == (0, 1)
    assert q0.parent is q1.parent and q0.parent is not k0.parent and q0.parent.n_layers == 2
    n_unique = len({id(p) for p in model.parameters()})
    assert n_unique == sum(1 for _ in model.parameters())  # the shared tensor counted once
    names = ["embed"] + [f"blocks.{i}.attn.{s}" for i in range(2) for s in "qk"]
    x = torch.randn(4, 8, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), dense_oracle(original, names, model)(x), rtol=1e-10, atol=1e-10
        )
    row = report.layers[1]
    olds = [original.blocks[i].attn.q for i in range(2)]
    assert row.group == "blocks.0.attn.q, blocks.1.attn.q"
    assert row.old_params == sum(m.weight.numel() + m.bias.numel() for m in olds)
    assert row.new_params == sum(p.numel() for p in q0.parent.parameters())
    W = torch.stack([m.weight for m in olds])
    assert row.weight_error == pytest.approx(rel_error(W, dense_weight(q0.parent.weight)))
    assert row.rank == q0.parent.rank
    text = str(report)
    for r in report:
        assert r.name in text
    assert "blocks.*.attn.q (x2)" in text


def test_report_str_and_to_list():
    model = Net()
    report = tensorize_(model, config(order=2))
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == len(DEFAULT_TARGETS) + 3  # header, rule, rows, totals
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned columns
    for name in DEFAULT_TARGETS:
        assert name in text
    assert f"{report.old_params:,} -> {report.new_params:,}" in lines[-1]
    assert f"{report.compression:.2f}x" in lines[-1] and "overall" in lines[-1]
    rows = report.to_list()
    json.dumps(rows)
    assert rows[0]["in_modes"] == list(report.layers[0].in_modes)
    assert set(rows[0]) == {f.name for f in dataclasses.fields(tz.LayerReport)}
    assert [r.name for r in report] == [r["name"] for r in rows]


# --------------------------------------------------------------------------- atomic failure


def test_failure_on_a_late_layer_leaves_the_model_unchanged():
    model = Net()
    ids = linear_ids(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # heads.reg (32 -> 2) gets out modes (2, 1): no Tucker rank 3 there; it is the last built
    # (the filter keeps out embed and heads.cls, which would fail first)
    cfg = config(rank=(3, 3, 3, 3), order=2, min_params=0)
    keep = lambda module, name: name not in ("embed", "heads.cls")  # noqa: E731
    with pytest.raises(ValueError, match=r"layer 'heads\.reg' \(weight \(2, 32\) \(out, in\)") as e:
        tensorize_(model, cfg, filter_fn=keep)
    assert "out of range" in str(e.value) and isinstance(e.value.__cause__, ValueError)
    assert linear_ids(model) == ids
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_other_exceptions_become_runtime_errors_and_nothing_is_swapped(monkeypatch):
    model = Net()
    ids = linear_ids(model)
    original, calls = FactorizedLinear.from_linear, []

    def flaky(linear, *args, **kw):
        calls.append(linear)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(linear, *args, **kw)

    monkeypatch.setattr(FactorizedLinear, "from_linear", flaky)
    with pytest.raises(RuntimeError, match=r"'blocks\.0\.attn\.v' \(weight \(32, 32\).*disk") as e:
        tensorize_(model, config(order=2))
    assert isinstance(e.value.__cause__, OSError)
    assert linear_ids(model) == ids


def test_joint_group_failure_names_the_group():
    model = Net()
    cfg = config(factorization="tucker", rank=(9, 9, 9, 9), order=2, joint=True)
    with pytest.raises(ValueError, match=r"joint group 'blocks\.\*\.attn\.q' \(2 layers\)"):
        tensorize_(model, cfg)
    assert type(model.blocks[0].attn.q) is nn.Linear


# --------------------------------------------------------------------------- progress


def test_progress_bar_only_when_asked(capsys):
    tensorize_(Net(), config(order=2, progress=False))
    assert capsys.readouterr().err == ""
    tensorize_(Net(), TensorizeConfig(order=2))  # None: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    tensorize_(Net(), config(order=2, progress=True))
    err = capsys.readouterr().err
    assert "tensorize" in err and f"{len(DEFAULT_TARGETS)}/{len(DEFAULT_TARGETS)}" in err


# --------------------------------------------------------------------------- calibration
# The call contract, with stand-ins for tensorized._calibrate / tensorized._allocate ...


def test_calibration_contract(monkeypatch):
    model, calls = Net(), []
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    recorded = {}

    def record_statistics(model_, modules, data, *, max_rows=4096, progress=False, **kwargs):
        assert all(type(model_.get_submodule(n)) is nn.Linear for n in modules)  # original
        calls.append(("record", set(modules), data, max_rows, progress))
        for n, m in modules.items():
            assert m is originals[n]
            recorded[n] = InputStatistics.of_rows(torch.randn(7, m.in_features))
        return dict(recorded)

    def calibrate_statistics(layer, weights, biases, statistics, *, steps=200, lr=None):
        calls.append(("calibrate", layer, weights, biases, statistics, steps))
        return types.SimpleNamespace(
            before=[0.5 + i for i in range(len(weights))], after=[0.25] * len(weights), steps=steps
        )

    from tensorized import _record as real

    recording = types.SimpleNamespace(
        record_statistics=record_statistics,
        _check_data=real._check_data,
        call_counts=real.call_counts,
    )
    fitting = types.SimpleNamespace(calibrate_statistics=calibrate_statistics)
    monkeypatch.setitem(sys.modules, "tensorized._record", recording)
    monkeypatch.setitem(sys.modules, "tensorized._calibrate", fitting)
    data = [torch.randn(2, 8)]
    cfg = config(
        order=2,
        joint=True,
        target_modules=["q", "embed"],
        min_params=0,
        calibration_steps=17,
        calibration_rows=33,
        calibration_mode="independent",
    )
    report = tensorize_(model, cfg, calibration_data=data)
    assert calls[0] == ("record", {"embed", "blocks.0.attn.q", "blocks.1.attn.q"}, data, 33, False)
    assert [c[0] for c in calls] == ["record", "calibrate", "calibrate"]
    _, layer, weights, biases, inputs, steps = calls[2]  # the joint group
    assert steps == 17 and layer is model.blocks[0].attn.q.parent
    assert inputs[0] is recorded["blocks.0.attn.q"] and inputs[1] is recorded["blocks.1.attn.q"]
    assert torch.equal(weights[1], originals["blocks.1.attn.q"].weight)
    assert torch.equal(biases[0], originals["blocks.0.attn.q"].bias)
    assert (report.layers[0].output_error_before, report.layers[0].output_error_after) == (
        0.5,
        0.25,
    )
    assert report.layers[1].output_error_before == 1.0  # the mean over the group's members
    assert "0.5000 -> 0.2500" in str(report)


def test_budget_allocation_contract(monkeypatch):
    from tensorized import _allocate

    model, seen = Net(), {}

    def allocate_choices(
        weights,
        modes,
        formats,
        budget,
        *,
        grams=None,
        importance=None,
        decomposition_kwargs=None,
        candidates=None,
    ):
        seen.update(
            shapes=[tuple(w.shape) for w in weights],
            modes=modes,
            budget=budget,
            formats=tuple(formats),
            grams=grams,
            importance=importance,
            kwargs=decomposition_kwargs,
        )
        return [
            _allocate.Choice("tucker", (2, 2, 2, 2), 0.1, "why 0"),
            _allocate.Choice("tucker", (3, 3, 3, 3), 0.2, "why 1"),
        ]

    stub = types.SimpleNamespace(
        allocate_choices=allocate_choices, Choice=_allocate.Choice, AUTO_FORMATS=()
    )
    monkeypatch.setitem(sys.modules, "tensorized._allocate", stub)
    cfg = config(
        rank=0.3,
        rank_allocation="budget",
        order=2,
        joint=True,
        min_params=0,
        target_modules=["embed", "q"],
        decomposition_kwargs={"n_iter_max": 3},
    )
    report = tensorize_(model, cfg)
    assert seen == {
        "shapes": [(32, 8), (2, 32, 32)],
        "modes": [((4, 2), (8, 4)), ((8, 4), (8, 4))],
        "budget": round(0.3 * (8 * 32 + 2 * 32 * 32)),
        "formats": ("tucker",),
        "grams": None,  # no calibration data: weight errors
        "importance": None,
        "kwargs": {"n_iter_max": 3},
    }
    assert [r.rank for r in report] == [(2, 2, 2, 2), (3, 3, 3, 3)]
    assert [r.reason for r in report] == ["why 0", "why 1"]
    assert model.embed.rank == (2, 2, 2, 2) and model.blocks[1].attn.q.parent.rank == (3, 3, 3, 3)


# ... and end to end with the real modules.


def correlated_batches(n_batches, rows=64, seed=0):
    """Inputs on a 3-dimensional subspace of the 8 input features, plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, 8, generator=torch.Generator().manual_seed(123))
    return [
        torch.randn(rows, 3, generator=gen) @ basis + 0.01 * torch.randn(rows, 8, generator=gen)
        for _ in range(n_batches)
    ]


def test_calibration_reduces_output_error_end_to_end():
    model = Net()
    original = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    cfg = config(
        factorization="lowrank",
        rank=2,
        target_modules=["q", "mlp.0"],
        calibration_steps=20,
        calibration_rows=256,
    )
    report = tensorize_(model, cfg, calibration_data=correlated_batches(4))
    tensorize_(plain, cfg)
    for row in report:
        assert row.output_error_before is not None
        assert row.output_error_after <= row.output_error_before + 1e-9
    assert any(r.output_error_after < r.output_error_before for r in report)
    x = torch.cat(correlated_batches(2, seed=1))  # fresh inputs from the same distribution
    with torch.no_grad():
        y = original(x)
        calibrated = rel_error(y, model(x))
        uncalibrated = rel_error(y, plain(x))
    assert calibrated < uncalibrated
    assert all(type(model.get_submodule(r.name)) is FactorizedLinear for r in report)


def test_calibration_skips_a_layer_the_data_never_reaches():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.used(x)

    model = TwoPaths()
    cfg = config(factorization="lowrank", rank=4, calibration_steps=5)
    with pytest.warns(UserWarning, match=r"layer 'unused': under 2 calibration input rows"):
        report = tensorize_(model, cfg, calibration_data=[torch.randn(16, 32)])
    used, unused = report.layers
    assert used.output_error_after <= used.output_error_before
    assert unused.output_error_before is None and unused.output_error_after is None
    assert str(report).splitlines()[3].endswith("  -")
    assert isinstance(model.unused, FactorizedLinear)


def test_budget_allocation_beats_uniform_at_the_same_budget():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(64, 2, generator=gen) @ torch.randn(2, 64, generator=gen)  # rank 2
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(F64)
    with torch.no_grad():
        model[0].weight.copy_(low)
        model[1].weight.copy_(torch.randn(64, 64, generator=gen))
    originals = [copy.deepcopy(m) for m in model]

    def run(allocation):
        m = copy.deepcopy(model)
        tensorize_(m, config(factorization="lowrank", rank=0.25, rank_allocation=allocation))
        params = sum(layer.weight.num_params for layer in m)
        sq = [
            rel_error(o.weight, dense_weight(n.weight)) ** 2 * o.weight.detach().norm() ** 2
            for o, n in zip(originals, m)
        ]
        return params, float(sum(sq)), [layer.rank for layer in m]

    params, budget_err, ranks = run("budget")
    _, uniform_err, uniform_ranks = run("uniform")
    assert abs(params - 0.25 * 2 * 64 * 64) <= 0.02 * 0.25 * 2 * 64 * 64
    assert ranks[0] < uniform_ranks[0] and ranks[1] > uniform_ranks[1]
    # Each layer is its truncated SVD, so each error is the Eckart-Young tail at its rank
    # (from torch's singular values), and layer 0 (rank 2) needs no more than rank 2.
    for err, rs in ((budget_err, ranks), (uniform_err, uniform_ranks)):
        tails = [
            torch.linalg.svdvals(o.weight.detach())[r:].pow(2).sum() for o, r in zip(originals, rs)
        ]
        assert err == pytest.approx(float(sum(tails)), rel=1e-9)
    assert ranks[0] == 2
    assert budget_err < uniform_err


@pytest.mark.parametrize("fmt", ["tucker", "tt"])
def test_budget_allocation_with_joint_groups_meets_the_budget(fmt):
    model = Net()
    dense = sum(model.get_submodule(n).weight.numel() for n in DEFAULT_TARGETS)
    cfg = config(factorization=fmt, rank=0.3, rank_allocation="budget", order=2, joint=True)
    report = tensorize_(model, cfg)
    assert {r.kind for r in report} == {"joint"} and len(report) == len(BLOCK_LAYERS)
    parents = {
        id(model.get_submodule(n).parent): model.get_submodule(n).parent for n in DEFAULT_TARGETS
    }
    total = sum(p.weight.num_params for p in parents.values())
    assert abs(total - round(0.3 * dense)) <= 0.02 * 0.3 * dense


# --------------------------------------------------------------------------- formats per layer


def test_auto_chooses_a_format_per_layer_within_the_budget():
    model = Net()
    original = copy.deepcopy(model)
    cfg = config(factorization="auto", rank=0.4, rank_allocation="budget", order=2, min_params=0)
    report = tensorize_(model, cfg, calibration_data=correlated_batches(4))
    weights = sum(m.weight.numel() for m in original.modules() if isinstance(m, nn.Linear))
    new_weights = sum(
        m.weight.num_params for m in model.modules() if isinstance(m, FactorizedLinear)
    )
    assert new_weights <= 1.02 * round(0.4 * weights)
    for row in report:
        module = model.get_submodule(row.name)
        assert row.factorization == module.factorization
        assert row.factorization in ("lowrank", "tucker", "tt", "blocktt", "dense")
        assert "error at that share" in row.reason
    x = correlated_batches(1, seed=5)[0]
    with torch.no_grad():  # the compressed model runs and stays close on its input subspace
        ref, out = original(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert "format" in str(report).splitlines()[0]


def test_a_list_of_formats_limits_the_choice():
    model = Net()
    cfg = config(
        factorization=["tt", "TTM"], rank=0.5, rank_allocation="budget", order=2, min_params=0
    )
    assert cfg.factorization == ("tt", "blocktt")
    report = tensorize_(model, cfg)
    assert {r.factorization for r in report} <= {"tt", "blocktt", "dense"}
    assert TensorizeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factorization": "auto"}, "rank_allocation='budget'"),
        ({"factorization": ["tt", "cp"]}, "rank_allocation='budget'"),
        ({"factorization": [], "rank_allocation": "budget"}, "non-empty list"),
        ({"factorization": ["tt", "nope"], "rank_allocation": "budget"}, "unknown factorization"),
        (
            {"factorization": "auto", "rank_allocation": "budget", "implementation": "kron"},
            "implementation",
        ),
    ],
)
def test_several_formats_need_a_budget(kwargs, match):
    kwargs.setdefault("rank", 0.5)
    with pytest.raises(ValueError, match=match):
        TensorizeConfig(**kwargs)
