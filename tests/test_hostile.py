"""Hostile inputs and faults, one section per class of failure (issue 12).

1. results that could go stale (parameters written behind the layer's back);
2. state leaking into files;
3. crashes where nn.Linear works (inference mode);
4. layer indices, one rule at every entry point;
5. crafted or corrupt saved files: the whole header checked before anything is allocated;
6. tensorize_: tied weights, endless calibration streams;
7. the command line: never over its input, atomic output, one line and exit code 2.

Outputs are checked against the float64 einsum oracle (``oracles.dense_forward``).
"""

import itertools
import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

import tensorized as tz
from oracles import dense_forward
from tensorized.cli import inspect_file, inspect_model, main

pytestmark = pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")

F64 = torch.float64
FORMATS = list(tz.formats.FORMATS)  # every registered format
RANK = {"dense": "same", "cp": 6, "lowrank": 3}


def make(fmt, n_layers=1, **kw):
    return tz.FactorizedLinear(
        (4, 6), (3, 5), True, fmt, RANK.get(fmt, 0.5), n_layers, dtype=F64, **kw
    )


def x24(batch=5):
    return torch.randn(batch, 24, dtype=F64)


def assert_oracle(layer, x):
    with torch.no_grad():
        for i in range(layer.n_layers):
            torch.testing.assert_close(layer(x, i), dense_forward(layer, x, i))


# ---------------------------------------------------------------- 1. nothing goes stale


def _list_member(layer):
    w = layer.weight
    return next((getattr(w, n) for n in ("factors", "cores") if hasattr(w, n)), None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_follow_a_swapped_data_tensor(fmt):
    layer = make(fmt, 2).eval()
    x = x24()
    assert_oracle(layer, x)
    p = next(layer.weight.parameters())
    p.data = torch.randn_like(p)  # a new storage behind the same Parameter
    assert_oracle(layer, x)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_outputs_follow_a_replaced_list_member_and_a_parametrization(fmt):
    layer = make(fmt).eval()
    x = x24()
    members = _list_member(layer)
    members[0] = nn.Parameter(torch.randn_like(members[0]))
    assert_oracle(layer, x)
    with torch.no_grad():
        before = layer(x)

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    parametrize.register_parametrization(members, "0", Double())
    with torch.no_grad():
        assert not torch.allclose(layer(x), before)
    assert_oracle(layer, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_functional_call_uses_the_given_parameters(fmt):
    layer, other = make(fmt).eval(), make(fmt).eval()
    x = x24()
    given = dict(other.named_parameters())
    with torch.no_grad():
        y = torch.func.functional_call(layer, given, (x,))
        torch.testing.assert_close(y, dense_forward(other, x, 0))
        torch.testing.assert_close(layer(x), dense_forward(layer, x, 0))  # put back


@pytest.mark.parametrize("fmt", ["cp", "tt", "lowrank"])
def test_a_training_step_drops_a_merge(fmt):
    layer = make(fmt).eval()
    x = x24()
    with torch.no_grad():
        layer.merge()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()  # a forward that records gradients: merge dropped
    opt.step()
    assert not layer.merged
    assert_oracle(layer, x)


# ---------------------------------------------------------------- 2. nothing leaks into files


@pytest.mark.parametrize("fmt", ["cp", "tt", "blocktt", "lowrank"])
def test_merged_model_saves_only_its_parameters(tmp_path, fmt):
    fresh = make(fmt, 2).eval()
    merged = make(fmt, 2).eval()
    merged.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        merged.merge()
        merged(x24())
    assert merged.merged_numel > 0
    torch.save(fresh, tmp_path / "a.pt")
    torch.save(merged, tmp_path / "b.pt")
    a, b = (os.path.getsize(tmp_path / n) for n in ("a.pt", "b.pt"))
    assert abs(a - b) <= 512, (a, b)
    assert abs(len(pickle.dumps(fresh)) - len(pickle.dumps(merged))) <= 512


# ---------------------------------------------------------------- 3. inference mode


@pytest.mark.parametrize("fmt", FORMATS)
def test_built_under_inference_mode_runs_everywhere(fmt):
    with torch.inference_mode():
        layer = make(fmt, 2).eval()
        x = x24()
        y = layer(x, 1)
    torch.testing.assert_close(y, dense_forward(layer, x, 1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, 1), y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_frozen_layer_after_inference_mode_backpropagates_to_its_input(fmt):
    layer = make(fmt).eval().requires_grad_(False)
    with torch.inference_mode():
        layer(x24())
    x = x24().requires_grad_()
    layer(x).sum().backward()
    # d(sum(W x + b))/dx = column sums of W, from the oracle
    w = dense_forward(layer, torch.eye(24, dtype=F64), 0) - layer.bias
    torch.testing.assert_close(x.grad, w.sum(1).expand_as(x))


# ---------------------------------------------------------------- 4. indices


def _entry_points(layer, index, x):
    return {
        "forward": lambda: layer(x, index),
        "get_linear": lambda: layer.get_linear(index)(x),
        "getitem": lambda: layer[index](x),
        "to_linear": lambda: layer.to_linear(index)(x),
    }


@pytest.mark.parametrize(
    "index", [np.int64(1), np.int32(1), torch.tensor(1), torch.tensor([1]), -2, 1]
)
def test_every_entry_point_accepts_the_same_indices(index):
    layer = make("tt", 3).eval()
    x = x24(2)
    ref = dense_forward(layer, x, 1)
    for name, call in _entry_points(layer, index, x).items():
        with torch.no_grad():
            torch.testing.assert_close(call(), ref, msg=name)


@pytest.mark.parametrize(
    ("index", "exc"),
    [
        (True, TypeError),
        (np.bool_(True), TypeError),
        (torch.tensor(True), TypeError),
        (1.0, TypeError),
        (torch.tensor(1.0), TypeError),
        (torch.tensor([0, 1]), TypeError),
        ("1", TypeError),
        (3, IndexError),
        (-4, IndexError),
    ],
    ids=["bool", "np-bool", "0d-bool", "float", "0d-float", "2-elem", "str", "3", "-4"],
)
def test_every_entry_point_refuses_the_same_indices(index, exc):
    layer = make("tt", 3).eval()
    for name, call in _entry_points(layer, index, x24(2)).items():
        with pytest.raises(exc, match=r"indices"):
            call()
        assert name


def test_a_view_made_with_a_tensor_index_saves_and_loads(tmp_path):
    net = nn.Sequential(nn.Linear(24, 15))
    layer = make("tt", 3)
    net[0] = layer.get_linear(torch.tensor(2))
    assert type(net[0].indices) is int and net[0].indices == 2
    tz.save_model(net, tmp_path / "v.safetensors")
    base = nn.Sequential(nn.Linear(24, 15)).double()
    fresh = tz.load_model(tmp_path / "v.safetensors", base=base)
    x = x24(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), dense_forward(layer, x, 2))
    torch.save(net, tmp_path / "v.pt")  # the index pickles as a plain int


# ---------------------------------------------------------------- 5. crafted files


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(24, 24) for _ in range(2))
        self.head = nn.Linear(24, 15)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model with a joint TT layer (two views) and a Tucker head, saved by save_model."""
    torch.manual_seed(0)
    net = Net().double()
    tz.tensorize_(
        net,
        tz.TensorizeConfig(
            factorization="tt", rank=0.5, order=2, joint=True, min_params=0, progress=False
        ),
        filter_fn=lambda m, n: n.startswith("blocks"),
    )
    net.head = tz.FactorizedLinear.from_linear(net.head, factorization="tucker", rank=0.6)
    path = tmp_path_factory.mktemp("saved") / "net.safetensors"
    tz.save_model(net, path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return path, meta, load_file(str(path)), net


def _rewrite(tmp_path, saved, tensors=None, **changes):
    """The saved file with some metadata entries replaced (JSON-encoded unless a str)."""
    _, meta, stored, _ = saved
    meta = dict(meta)
    for key, value in changes.items():
        key = "tensorized." + key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    path = tmp_path / "crafted.safetensors"
    save_file(stored if tensors is None else tensors, str(path), metadata=meta)
    return path


def _groups(saved):
    return json.loads(saved[1]["tensorized.groups"])


def _places(saved):
    return json.loads(saved[1]["tensorized.places"])


def _spec_with(saved, group, **fields):
    groups = _groups(saved)
    groups[group] = {**groups[group], **fields}
    return groups


TT, HEAD = "blocks.0", "head"


def _crafted_cases():
    """(id, function of saved -> metadata changes, message pattern)."""
    return [
        ("groups-not-json", lambda s: {"groups": "{not json"}, r"groups' is not valid JSON"),
        ("groups-missing", lambda s: {"groups": None}, r"groups' is missing"),
        ("groups-list", lambda s: {"groups": []}, r"groups must be an object"),
        ("spec-not-object", lambda s: {"groups": {TT: 3}}, r"spec must be an object"),
        ("spec-extra-key", lambda s: {"groups": _spec_with(s, TT, evil=1)}, r"keys"),
        ("modes-str", lambda s: {"groups": _spec_with(s, TT, in_modes="46")}, r"in_modes"),
        ("modes-zero", lambda s: {"groups": _spec_with(s, TT, in_modes=[0, 6])}, r">= 1"),
        ("modes-bool", lambda s: {"groups": _spec_with(s, TT, in_modes=[True, 24])}, r"int"),
        ("modes-many", lambda s: {"groups": _spec_with(s, TT, in_modes=[1] * 100)}, r"1 to 64"),
        ("rank-str", lambda s: {"groups": _spec_with(s, TT, rank="big")}, r"rank must be"),
        ("rank-float", lambda s: {"groups": _spec_with(s, TT, rank=[1.5, 2])}, r"rank must be"),
        ("n-layers-str", lambda s: {"groups": _spec_with(s, TT, n_layers="2")}, r"n_layers"),
        ("n-layers-0", lambda s: {"groups": _spec_with(s, TT, n_layers=0)}, r"n_layers"),
        ("format-unknown", lambda s: {"groups": _spec_with(s, TT, factorization="x")}, r"'x'"),
        ("format-int", lambda s: {"groups": _spec_with(s, TT, factorization=7)}, r"layer"),
        ("bias-str", lambda s: {"groups": _spec_with(s, HEAD, bias="yes")}, r"bias must be"),
        ("impl-int", lambda s: {"groups": _spec_with(s, HEAD, implementation=3)}, r"implem"),
        ("impl-unknown", lambda s: {"groups": _spec_with(s, HEAD, implementation="x")}, r"'x'"),
        ("ckpt-int", lambda s: {"groups": _spec_with(s, HEAD, checkpointing=1)}, r"checkpoint"),
        ("shape-mismatch", lambda s: {"groups": _spec_with(s, HEAD, rank=[1] * 6)},
         r"shape .* but the file stores"),
        ("layers-mismatch", lambda s: {"groups": _spec_with(s, TT, n_layers=10**6)},
         r"shape .* but the file stores"),
        ("places-dict", lambda s: {"places": {}}, r"places must be a list"),
        ("place-keys", lambda s: {"places": [{"name": "head"}]}, r"keys group, index, name"),
        ("place-name-int", lambda s: {"places": [{"name": 1, "group": HEAD, "index": None}]},
         r"must be strings"),
        ("place-unknown-group", lambda s: {"places": [{"name": "head", "group": "zz",
                                                        "index": None}]}, r"unknown layer"),
        ("place-duplicate", lambda s: {"places": _places(s) + _places(s)[-1:]}, r"two places"),
        ("index-out-of-range", lambda s: {"places": [
            {**p, "index": 7} if p["index"] == 1 else p for p in _places(s)]},
         r"index 7 is out of range for 2 layers"),
        ("index-negative", lambda s: {"places": [
            {**p, "index": -1} if p["index"] == 1 else p for p in _places(s)]}, r">= 0"),
        ("index-bool", lambda s: {"places": [
            {**p, "index": True} if p["index"] == 1 else p for p in _places(s)]}, r"int"),
        ("group-without-place", lambda s: {"places": [p for p in _places(s)
                                                      if p["group"] != HEAD]}, r"no place"),
        ("aliases-list", lambda s: {"aliases": []}, r"aliases must be an object"),
        ("alias-to-nothing", lambda s: {"aliases": {"x": "nowhere"}}, r"alias 'x'"),
        ("version", lambda s: {"format": "2"}, r"not written by tensorized"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"),
    [c[1:] for c in _crafted_cases()],
    ids=[c[0] for c in _crafted_cases()],
)
def test_crafted_headers_give_one_value_error_and_leave_the_model(tmp_path, saved, change, match):
    path = _rewrite(tmp_path, saved, **change(saved))
    base = Net().double()
    before = {n: id(m) for n, m in base.named_modules()}
    with pytest.raises(ValueError, match=match):
        tz.load_model(path, base=base)
    assert {n: id(m) for n, m in base.named_modules()} == before
    with pytest.raises(ValueError, match=match):
        inspect_file(path)


def test_a_huge_claim_is_refused_before_any_allocation(tmp_path, saved):
    # 5e11 float64 elements (4 TB): allocating them first would fail in the allocator
    # (a RuntimeError) or exhaust the machine; checked against the stored shapes first.
    core = math.prod(_groups(saved)[HEAD]["rank"])
    groups = _spec_with(saved, HEAD, n_layers=5 * 10**11 // core + 1)
    path = _rewrite(tmp_path, saved, groups=groups)
    with pytest.raises(ValueError, match=r"shape .* but the file stores"):
        tz.load_model(path, base=Net().double())


def test_a_tensor_missing_from_the_file_is_named(tmp_path, saved):
    stored = dict(saved[2])
    key = next(k for k in stored if k.startswith("head.weight"))
    del stored[key]
    path = _rewrite(tmp_path, saved, tensors=stored)
    with pytest.raises(ValueError, match=rf"'{key}' is not in the file"):
        tz.load_model(path, base=Net().double())


def test_bad_recorded_config_is_a_value_error(tmp_path, saved):
    for config, match in (("{", r"not valid JSON"), ("[1]", r"config must be an object"),
                          ('{"rank": "lots"}', r"recorded config is not valid")):  # fmt: skip
        path = _rewrite(tmp_path, saved, config=config)
        with pytest.raises(ValueError, match=match):
            tz.load_config(path)


def test_the_untouched_file_still_loads(tmp_path, saved):
    path = _rewrite(tmp_path, saved)
    fresh = tz.load_model(path, base=Net().double())
    x = x24(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), saved[3](x), rtol=0, atol=0)


# ---------------------------------------------------------------- 6. tensorize_


class Tied(nn.Module):
    """A language-model head tied to its input embedding, and two tied projections."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(96, 48)
        self.body = nn.Linear(48, 48)
        self.a = nn.Linear(48, 48)
        self.b = nn.Linear(48, 48)
        self.b.weight = self.a.weight
        self.head = nn.Linear(48, 96, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.body(h)) + self.a(h) + self.b(h)
        return self.head(h)


def test_tied_layers_are_left_dense_and_stay_tied():
    model = Tied()
    before = sum(p.numel() for p in model.parameters())
    cfg = tz.TensorizeConfig(factorization="tt", rank=0.25, min_params=0, progress=False)
    with pytest.warns(UserWarning, match=r"'head' is left dense: .*tied to 'embed.weight'"):
        report = tz.tensorize_(model, cfg)
    assert [row.name for row in report] == ["body"]
    assert model.head.weight is model.embed.weight and model.a.weight is model.b.weight
    assert type(model.head) is nn.Linear and type(model.a) is nn.Linear
    assert sum(p.numel() for p in model.parameters()) < before


def test_only_tied_layers_is_an_error_naming_the_tie():
    model = Tied()
    cfg = tz.TensorizeConfig(rank=0.25, min_params=0, target_modules=["head"], progress=False)
    with pytest.warns(UserWarning, match=r"tied"), pytest.raises(ValueError, match=r"untied"):
        tz.tensorize_(model, cfg)
    assert type(model.head) is nn.Linear


def test_a_module_registered_twice_is_not_a_tie():
    shared = nn.Linear(48, 48)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(4, 48)
    cfg = tz.TensorizeConfig(factorization="lowrank", rank=48, min_params=0, progress=False)
    with torch.no_grad():
        ref = model(x)
    tz.tensorize_(model, cfg)
    assert model[0] is model[2] and isinstance(model[0], tz.FactorizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_an_endless_calibration_stream_stops_at_calibration_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    taken = []

    def stream():
        for k in itertools.count():
            taken.append(k)
            yield torch.randn(16, 32)

    cfg = tz.TensorizeConfig(
        factorization="lowrank", rank=0.5, min_params=0, calibration_rows=100, progress=False
    )
    tz.tensorize_(model, cfg, calibration_data=stream())
    assert len(taken) == 7  # ceil(100 / 16) batches fill every layer's 100 rows
    recorded = tz.record_inputs(model, {"0": model[0]}, itertools.repeat(torch.ones(3, 32)),
                                max_rows=10)  # fmt: skip
    assert recorded["0"].shape == (10, 32)


def test_an_endless_iterable_dataset_behind_a_data_loader_stops():
    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield torch.randn(32)

    model = nn.Sequential(nn.Linear(32, 8))
    loader = torch.utils.data.DataLoader(Endless(), batch_size=8)
    recorded = tz.record_inputs(model, {"0": model[0]}, loader, max_rows=20)
    assert recorded["0"].shape == (20, 32)


def test_save_model_to_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"it is a folder"):
        tz.save_model(nn.Sequential(make("tt")), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_sized_calibration_set_is_read_whole():
    model = nn.Sequential(nn.Linear(32, 8))
    batches = [torch.full((4, 32), float(k)) for k in range(10)]
    recorded = tz.record_inputs(model, {"0": model[0]}, batches, max_rows=8)
    seen = set(recorded["0"][:, 0].tolist())
    assert len(recorded["0"]) == 8 and max(seen) > 1  # sampled from all ten batches


# ---------------------------------------------------------------- 7. the command line


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mlp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(model, folder / "model.pt")
    return folder


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("source", "output", "match"),
    [
        (lambda m: m, lambda m: m, r"is the input model .* or holds it"),
        (lambda m: m / "model.pt", lambda m: m / "model.pt", r"is the input model .* or holds"),
        (lambda m: m / "model.pt", lambda m: m, r"is the input model .* or holds it"),
        (lambda m: m, lambda m: m.parent, r"is the input model .* or holds it"),
        (lambda m: m, lambda m: "", r"--output must name a folder"),
        (lambda m: m, lambda m: " ", r"--output must name a folder"),
    ],
    ids=["same-folder", "same-file", "file-in-it", "parent", "empty", "blank"],
)
def test_compress_never_writes_over_its_input(mlp, capsys, source, output, match):
    before = _tree(mlp.parent)
    code, _, err = run(capsys, "compress", source(mlp), "-o", output(mlp), "--quiet")
    assert code == 2 and err.count("\n") == 1 and re.search(match, err), err
    assert _tree(mlp.parent) == before


def test_compress_refuses_a_full_folder_unless_overwrite(mlp, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "compress", mlp, "-o", out, "--quiet")
    assert code == 2 and "not empty" in err and _tree(out) == {"notes.txt": b"mine"}
    code, _, err = run(capsys, "compress", mlp, "-o", out, "--quiet", "--overwrite")
    assert code == 0, err
    assert sorted(_tree(out)) == [
        "model.pt", "model.safetensors", "report.json", "tensorize_config.json",
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_write_leaves_no_output_and_no_temporary_files(mlp, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run(capsys, "compress", mlp, "-o", out, "--quiet")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # an existing output is kept whole when the replacement fails
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, _ = run(capsys, "compress", mlp, "-o", out, "--quiet", "--overwrite")
    assert code == 2 and _tree(out) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_compressed_files_hold_only_the_model(mlp, tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(64, 64), calib)
    out = tmp_path / "out"
    options = ("-f", "tt", "-r", "0.3", "--calibration-steps", "5", "--min-params", "0")
    code, _, err = run(capsys, "compress", mlp, "-o", out, "--quiet", "--calibration", calib,
                       *options)  # fmt: skip
    assert code == 0, err
    pt, st = (os.path.getsize(out / n) for n in ("model.pt", "model.safetensors"))
    params = sum(p.numel() for p in torch.load(out / "model.pt", weights_only=False).parameters())
    assert st < 4 * params + 16_384 and pt < 4 * params + 32_768, (pt, st, params)


def test_inspect_reads_the_safetensors_file_without_unpickling(mlp, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "compress", mlp, "-o", out, "--quiet", "--min-params", "0")[0] == 0
    model = torch.load(out / "model.pt", weights_only=False)
    from_file, from_model = inspect_file(out / "model.safetensors"), inspect_model(model)
    assert from_file["factorized"] == from_model["factorized"]
    assert from_file["totals"] == from_model["totals"]
    (out / "model.pt").unlink()  # the folder is inspected through its safetensors file
    code, stdout, err = run(capsys, "inspect", out)
    assert code == 0, err
    assert "safetensors file" in stdout and "FactorizedLinear" not in err
    code, stdout, _ = run(capsys, "inspect", out / "model.safetensors", "--json")
    assert json.loads(stdout)["factorized"] == from_model["factorized"]


@pytest.mark.parametrize("argv", [("--size", "257"), ("--size", "64", "--rank", "0.005")])
def test_selfcheck_reports_formats_it_cannot_run_instead_of_failing(capsys, argv):
    code, stdout, err = run(capsys, "selfcheck", *argv)
    assert code == 0, err
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(FORMATS)  # the header and one row per format
    assert "cannot reach" in stdout


@pytest.mark.parametrize(
    "argv",
    [
        ("selfcheck", "--size", "100000"),
        ("selfcheck", "--size", "4"),
        ("selfcheck", "--rank", "0"),
        ("inspect", "nowhere.safetensors"),
        ("compress", "nowhere.pt", "-o", "out"),
    ],
)
def test_every_failure_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("tensorized ")
