"""state_dict round trips, and save_model / load_model through safetensors in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import tensorized as tz
from oracles import dense_forward
from tensorized.formats import FORMATS

pytestmark = pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")
F64 = torch.float64
RANK = {"dense": "same", "lowrank": 2, "cp": 5}


def _layer(fmt, n_layers, bias=True):
    return tz.FactorizedLinear((2, 3), (3, 2), bias, fmt, RANK.get(fmt, 0.6), n_layers, dtype=F64)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_state_dict_round_trip_every_format_and_n_layers(fmt, n_layers):
    a, b = _layer(fmt, n_layers), _layer(fmt, n_layers)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 6, dtype=F64)
    for i in range(n_layers):
        torch.testing.assert_close(b(x, i), a(x, i), rtol=0, atol=0)
        torch.testing.assert_close(b(x, i), dense_forward(a, x, i))


class Net(nn.Module):
    """Two attention-like blocks (shared-shape q/v, to be factorized jointly) and a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(32, 32), "v": nn.Linear(32, 32, bias=False)})
            for _ in range(2)
        )
        self.head = nn.Linear(32, 48)
        self.norm = nn.LayerNorm(48)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b["q"](x) + b["v"](x))
        return self.norm(self.head(x))


def _compressed(joint: bool, fmt: str = "tucker") -> tuple[Net, tz.TensorizeConfig]:
    net = Net().double()
    cfg = tz.TensorizeConfig(
        factorization=fmt, rank=0.5, order=2, joint=joint, min_params=0, progress=False
    )
    tz.tensorize_(net, cfg)
    with torch.no_grad():  # move the norm so that non-factorized weights are checked too
        net.norm.weight.uniform_(0.5, 1.5)
    return net, cfg


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt", "lowrank"])
def test_save_load_rebuilds_architecture_and_output(tmp_path, fmt, joint):
    net, cfg = _compressed(joint, fmt)
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path, config=cfg, metadata={"task": "test"})
    fresh = tz.load_model(path, base=Net().double())
    x = torch.randn(5, 32, dtype=F64)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    assert tz.load_config(path) == cfg
    for name, module in net.named_modules():
        loaded = fresh.get_submodule(name)
        assert type(loaded) is type(module), name
        if isinstance(module, tz.FactorizedLinear):
            assert (loaded.rank, loaded.n_layers) == (module.rank, module.n_layers)
    if joint:  # the views of one joint layer share one loaded layer again
        q0, q1 = fresh.blocks[0]["q"], fresh.blocks[1]["q"]
        assert isinstance(q0, tz.LinearView) and q0.parent is q1.parent
        assert (q0.indices, q1.indices) == (0, 1)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["task"] == "test"
        stored = set(f.keys())
    # shared parameters are stored once; every state_dict key is recoverable
    unique = {id(p) for p in net.parameters()}
    assert len(stored) == len(unique) + len(list(net.buffers()))


def test_load_in_fresh_process_without_pickle(tmp_path):
    net, cfg = _compressed(joint=True)
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path, config=cfg)
    x = torch.randn(3, 32, dtype=F64)
    torch.save(x, tmp_path / "x.pt")
    torch.save(net(x).detach(), tmp_path / "y.pt")
    # the class definition is source code the fresh process has; nothing is unpickled
    source = textwrap.dedent(
        f"""
        import sys, torch, tensorized as tz
        from torch import nn
        sys.path.insert(0, {str(tmp_path)!r})
        {_class_source()}
        model = tz.load_model({str(path)!r}, base=Net().double())
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        y = torch.load({str(tmp_path / "y.pt")!r}, weights_only=True)
        assert torch.equal(model(x), y), (model(x) - y).abs().max()
        print(tz.load_config({str(path)!r}).factorization)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tucker"


def _class_source() -> str:
    import inspect

    return textwrap.indent(inspect.getsource(Net), " " * 8).lstrip()


def test_save_is_atomic_and_keeps_shared_tensors_once(tmp_path):
    layer = tz.FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=0.5, n_layers=2)
    model = nn.Sequential(layer[0], nn.ReLU(), layer[1])
    path = tmp_path / "m.safetensors"
    tz.save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads(f.metadata()["tensorized.aliases"])
        keys = set(f.keys())
    assert all(k.startswith("2.parent.") for k in aliases)
    assert all(k.startswith("0.parent.") for k in keys)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    tz.load_model(path, fresh)
    x = torch.randn(2, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh[0].parent is fresh[2].parent


def test_load_follows_the_given_models_dtype_and_loads_into_compressed_model(tmp_path):
    net, _ = _compressed(joint=False)
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path)
    fresh = tz.load_model(path, base=Net())  # float32 architecture: weights cast on load
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    again, _ = _compressed(joint=False)
    tz.load_model(again, path)  # safetensors' argument order; into a factorized model
    x = torch.randn(2, 32, dtype=F64)
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


def test_load_errors_leave_model_unchanged(tmp_path):
    net, _ = _compressed(joint=False)
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 64)

    wrong = Wider()
    before = {n: id(m) for n, m in wrong.named_modules()}
    with pytest.raises(ValueError, match=r"'head' is \(64, 32\).*\(48, 32\) in the saved one"):
        tz.load_model(path, base=wrong)
    assert {n: id(m) for n, m in wrong.named_modules()} == before

    class Renamed(Net):
        def __init__(self):
            super().__init__()
            self.norm = nn.Identity()

    renamed = Renamed()
    before = {n: id(m) for n, m in renamed.named_modules()}
    with pytest.raises(ValueError, match=r"(?s)does not fit the given model.*norm.bias"):
        tz.load_model(path, base=renamed)
    assert {n: id(m) for n, m in renamed.named_modules()} == before
    assert all(type(m) is not tz.FactorizedLinear for m in renamed.modules())
    tz.load_model(path, base=Renamed(), strict=False)  # non-strict: the norm's keys are ignored


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda p: None, FileNotFoundError, r"no such file"),
        (lambda p: p.write_bytes(b"\x00" * 7), ValueError, r"cannot read .* as a safetensors"),
        (lambda p: p.write_bytes(b"garbage" * 100), ValueError, r"cannot read"),
        (lambda p: save_file({"w": torch.zeros(2)}, p), ValueError, r"not written by tensorized"),
    ],
    ids=["missing", "short", "random", "foreign"],
)
def test_load_rejects_bad_files(tmp_path, make, exc, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(exc, match=match):
        tz.load_model(path, base=Net())


def test_truncated_file_is_rejected(tmp_path):
    net, _ = _compressed(joint=False)
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read"):
        tz.load_model(path, base=Net().double())


def test_save_model_argument_errors(tmp_path):
    net, _ = _compressed(joint=False)
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got dict"):
        tz.save_model({}, path)
    with pytest.raises(TypeError, match=r"config must be a TensorizeConfig or None, got dict"):
        tz.save_model(net, path, config={"rank": 0.5})
    with pytest.raises(ValueError, match=r"'tensorized.groups' is reserved"):
        tz.save_model(net, path, metadata={"tensorized.groups": "{}"})
    with pytest.raises(TypeError, match=r"metadata must map str to str"):
        tz.save_model(net, path, metadata={"epoch": 3})
    assert not path.exists()
