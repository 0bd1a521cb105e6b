"""The ``tensorized`` command: demo, compress, inspect and selfcheck, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tensorized as tz
from oracles import dense_weight
from tensorized import FactorizedLinear, LinearView, TensorizeConfig
from tensorized.cli import CLIError, main, parse_modules, parse_rank

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    """``main(argv)``: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm()).item()


@pytest.fixture
def mlp(tmp_path):
    """A small MLP saved whole with torch.save, and a calibration tensor file."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    torch.save(model, tmp_path / "mlp.pt")
    torch.save(torch.randn(96, 64), tmp_path / "calib.pt")
    return model, tmp_path


def load(path: Path) -> nn.Module:
    return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------- compress


def test_compress_with_calibration_writes_model_config_and_report(mlp, capsys):
    model, tmp = mlp
    out = tmp / "out"
    code, stdout, err = run(
        capsys,
        "compress", tmp / "mlp.pt", "-o", out, "--factorization", "tt", "--rank", "0.3",
        "--calibration", tmp / "calib.pt", "--calibration-steps", "10", "--batch-size", "32",
    )  # fmt: skip
    assert code == 0, err
    for name in ("0", "2", "4"):
        assert f"\n{name} " in stdout
    assert "model.pt" in stdout
    small = load(out / "model.pt")
    config = json.loads((out / "tensorize_config.json").read_text())
    expected = TensorizeConfig(factorization="tt", rank=0.3, calibration_steps=10).to_dict()
    assert config == {**expected, "progress": None}
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == config
    assert [r["name"] for r in report["layers"]] == ["0", "2", "4"]
    for row in report["layers"]:
        new, old = small.get_submodule(row["name"]), model.get_submodule(row["name"])
        assert isinstance(new, FactorizedLinear) and new.factorization == "tt"
        assert row["old_params"] == old.in_features * old.out_features + old.out_features
        assert row["new_params"] == sum(p.numel() for p in new.parameters())
        assert row["rank"] == list(new.rank)
        with torch.no_grad():
            error = rel_error(old.weight, dense_weight(new.weight))
        assert row["weight_error"] == pytest.approx(error, rel=1e-6)
        # The calibration file was used: output errors on held-out rows, never worse.
        assert row["output_error_after"] <= row["output_error_before"]
    totals = report["totals"]
    assert totals["new_params"] == sum(r["new_params"] for r in report["layers"])
    assert totals["model_params_after"] == sum(p.numel() for p in small.parameters())
    assert totals["model_params_before"] == sum(p.numel() for p in model.parameters())
    assert totals["compression"] == pytest.approx(totals["old_params"] / totals["new_params"])
    x = torch.randn(5, 64)
    assert small(x).shape == (5, 10)


def test_compress_json_is_the_report_and_config_file_is_overridden(mlp, capsys):
    _, tmp = mlp
    config = {"factorization": "tucker", "rank": 0.1, "target_modules": ["2"], "min_params": 0}
    (tmp / "cfg.json").write_text(json.dumps(config))
    out = tmp / "out"
    argv = ["compress", tmp / "mlp.pt", "-o", out, "--config", tmp / "cfg.json"]
    code, stdout, err = run(capsys, *argv, "-f", "lowrank", "--rank", "0.5", "--json")
    assert code == 0, err
    printed = json.loads(stdout)  # one JSON object, nothing else on stdout
    assert printed == json.loads((out / "report.json").read_text())
    assert set(printed) >= {"config", "layers", "totals"}
    assert printed["config"]["factorization"] == "lowrank"  # options win over the file
    assert printed["config"]["rank"] == 0.5
    assert printed["config"]["target_modules"] == ["2"]  # the file's value is kept
    small = load(out / "model.pt")
    assert [type(small[i]).__name__ for i in (0, 2, 4)] == ["Linear", "FactorizedLinear", "Linear"]
    # Low rank at half the parameters is the truncated SVD: the Eckart-Young error.
    (row,) = printed["layers"]
    r = row["rank"]
    assert r * (128 + 128 + 1) == pytest.approx(0.5 * 128 * 128, rel=0.05)
    original = load(tmp / "mlp.pt")[2].weight.detach().double().numpy()
    s = np.linalg.svd(original, compute_uv=False)
    assert row["weight_error"] == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), 1e-5)


@pytest.mark.parametrize(
    ("options", "replaced"),
    [
        (["--target-modules", "0,4"], ["0", "4"]),  # a list of names
        (["--target-modules", "[02]"], ["0", "2"]),  # a regex (has a bracket)
        (["--exclude-modules", "4"], ["0", "2"]),
        (["--target-modules", r"\d", "--exclude-modules", "0"], ["2", "4"]),
    ],
)
def test_compress_module_selection(mlp, capsys, options, replaced):
    _, tmp = mlp
    code, stdout, err = run(capsys, "compress", tmp / "mlp.pt", "-o", tmp / "o", *options, "--json")
    assert code == 0, err
    assert [r["name"] for r in json.loads(stdout)["layers"]] == replaced
    small = load(tmp / "o" / "model.pt")
    factorized = [n for n, m in small.named_modules() if isinstance(m, FactorizedLinear)]
    assert factorized == replaced


def test_compress_int_rank_and_budget_allocation(mlp, capsys):
    _, tmp = mlp
    code, stdout, _ = run(
        capsys, "compress", tmp / "mlp.pt", "-o", tmp / "a", "-f", "tt", "-r", "3", "--json"
    )
    assert code == 0
    assert all(max(r["rank"]) <= 3 for r in json.loads(stdout)["layers"])
    argv = ["compress", tmp / "mlp.pt", "-o", tmp / "b", "-f", "tucker", "-r", "0.3"]
    code, stdout, _ = run(capsys, *argv, "--rank-allocation", "budget", "--json")
    assert code == 0
    result = json.loads(stdout)
    weights = sum(r["in_features"] * r["out_features"] for r in result["layers"])
    small = load(tmp / "b" / "model.pt")
    kept = sum(m.weight.num_params for m in small.modules() if isinstance(m, FactorizedLinear))
    assert kept == pytest.approx(0.3 * weights, rel=0.02)  # the budget over all layers


def test_compress_joint_and_inspect_views(tmp_path, capsys):
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(48, 48), nn.Tanh()) for _ in range(3)])
    torch.save(blocks, tmp_path / "blocks.pt")
    argv = ["compress", tmp_path / "blocks.pt", "-o", tmp_path / "j", "-f", "tt", "-r", "0.4"]
    code, stdout, err = run(capsys, *argv, "--joint", "--min-params", "0", "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)["layers"]
    assert row["kind"] == "joint" and row["group"] == "0.0, 1.0, 2.0"
    code, stdout, _ = run(capsys, "inspect", tmp_path / "j", "--json")
    assert code == 0
    info = json.loads(stdout)
    (layer,) = info["factorized"]
    small = load(tmp_path / "j" / "model.pt")
    parent = small.get_submodule(layer["name"])
    assert isinstance(parent, FactorizedLinear) and layer["n_layers"] == 3
    assert [(v["name"], v["index"], v["parent"]) for v in info["views"]] == [
        (f"{i}.0", i, layer["name"]) for i in range(3)
    ]
    assert all(isinstance(small[i][0], LinearView) for i in range(3))
    assert layer["dense_params"] == 3 * (48 * 48 + 48)
    # The dense equivalent of the compressed model is the original model.
    assert info["totals"]["dense_equivalent"] == sum(p.numel() for p in blocks.parameters())
    code, stdout, _ = run(capsys, "inspect", tmp_path / "j")
    assert "3 joint views" in stdout and "0.0" in stdout


# ---------------------------------------------------------------------- inspect


def test_inspect_lists_layers_and_totals(mlp, capsys):
    model, tmp = mlp
    argv = ["compress", tmp / "mlp.pt", "-o", tmp / "out", "-f", "blocktt", "-r", "0.25"]
    assert run(capsys, *argv, "--exclude-modules", "4", "--quiet") == (0, "", "")
    small = load(tmp / "out" / "model.pt")
    code, stdout, _ = run(capsys, "inspect", tmp / "out")
    assert code == 0
    for name in ("| 0 | blocktt", "| 2 | blocktt"):
        assert name in stdout
    code, stdout, _ = run(capsys, "inspect", tmp / "out" / "model.pt", "--json")  # the file too
    assert code == 0
    info = json.loads(stdout)
    assert [r["name"] for r in info["factorized"]] == ["0", "2"]
    for r in info["factorized"]:
        layer = small.get_submodule(r["name"])
        assert r["params"] == layer.weight.num_params + layer.out_features
        assert r["dense_params"] == r["in_features"] * r["out_features"] + r["out_features"]
        assert r["compression"] == pytest.approx(r["dense_params"] / r["params"])
        assert r["rank"] == list(layer.rank)
    t = info["totals"]
    assert t["params"] == sum(p.numel() for p in small.parameters())
    assert t["factorized_params"] == sum(r["params"] for r in info["factorized"])
    assert t["dense_params"] == 128 * 10 + 10  # the excluded head
    assert t["dense_equivalent"] == sum(p.numel() for p in model.parameters())
    assert t["compression"] == pytest.approx(t["dense_equivalent"] / t["params"])


def test_inspect_plain_model(mlp, capsys):
    _, tmp = mlp
    code, stdout, _ = run(capsys, "inspect", tmp / "mlp.pt")
    assert code == 0 and "no FactorizedLinear layer" in stdout
    assert "(1.00x)" in stdout


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{tmp}/missing.pt", "-o", "{tmp}/o"], "does not exist"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--rank", "abc"], "--rank must be"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--rank", "0"], "TensorizeConfig.rank"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "-f", "foo"], "unknown factorization 'foo'"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--target-modules", "enc.*"], "matched no"),
        (["compress", "{tmp}/state.pt", "-o", "{tmp}/o"], "not an nn.Module"),
        (["compress", "{tmp}/junk.pt", "-o", "{tmp}/o"], "cannot load model"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--config", "{tmp}/bad.json"], "valid JSON"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--config", "{tmp}/keys.json"], "'colour'"),
        (
            ["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--calibration", "{tmp}/t.txt"],
            "tokenizer",
        ),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--calibration", "{tmp}/no.pt"], "no.pt"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/state.pt"], "not a folder"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/mlp.pt"], "never writes over its input"),
        (["compress", "{tmp}/mlp.pt"], "required: -o/--output"),
        (["compress", "{tmp}/mlp.pt", "-o", "{tmp}/o", "--bogus"], "unrecognized arguments"),
        (["inspect", "{tmp}/missing"], "does not exist"),
        (["inspect", "{tmp}"], "without model.safetensors or model.pt"),
        (["selfcheck", "--size", "4"], "--size must be in [8, 4096]"),
        (["demo", "--formats", "nope", "-o", "{tmp}/d"], "unknown factorization 'nope'"),
        (["demo", "--budgets", "0.5,2", "-o", "{tmp}/d"], "budgets must be fractions"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_exit_2_with_one_line(mlp, capsys, argv, message):
    model, tmp = mlp
    torch.save(model.state_dict(), tmp / "state.pt")
    (tmp / "junk.pt").write_text("not a pickle")
    (tmp / "bad.json").write_text("{rank: 0.5")
    (tmp / "keys.json").write_text('{"colour": "red"}')
    (tmp / "t.txt").write_text("a sentence\n")
    code, stdout, err = run(capsys, *[a.format(tmp=tmp) for a in argv])
    assert code == 2
    assert stdout == ""
    assert err.count("\n") == 1 and err.startswith("tensorized") and "error:" in err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp / "o").exists()  # nothing written on error


def test_parse_rank_and_modules():
    assert parse_rank("0.5") == 0.5 and parse_rank("8") == 8 and parse_rank("same") == "same"
    assert parse_rank("4,8,8") == (4, 8, 8) and parse_rank("1e-1") == 0.1
    with pytest.raises(CLIError, match=r"--rank must be .* got '4,x'"):
        parse_rank("4,x")
    assert parse_modules("query,value") == ["query", "value"]
    assert parse_modules("attention.self.query") == ["attention.self.query"]  # dots are names
    assert parse_modules(r"encoder\..*") == r"encoder\..*"
    with pytest.raises(CLIError, match="module names"):
        parse_modules(" , ")


# ---------------------------------------------------------------------- other commands


def test_selfcheck(capsys):
    code, stdout, _ = run(capsys, "selfcheck", "--size", "64", "--rank", "0.5")
    assert code == 0
    for fmt in ("cp", "tucker", "tt", "blocktt", "lowrank", "dense"):
        assert f"| {fmt} |" in stdout


def test_help_warns_about_unpickling(capsys):
    code, stdout, _ = run(capsys, "compress", "--help")
    assert code == 0
    assert "UNPICKLES" in stdout and "trust" in stdout


def test_demo_command(tmp_path, capsys):
    argv = ["demo", "-o", tmp_path / "d", "--formats", "LowRank", "--budgets", "0.5", "--json"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    rows = json.loads(stdout)
    assert rows == json.loads((tmp_path / "d" / "results.json").read_text())
    assert [(r["format"], r["variant"]) for r in rows] == [("dense", "uncompressed")] + [
        ("lowrank", v) for v in ("plain", "calibrated", "distilled")
    ]
    assert (tmp_path / "d" / "results.md").is_file()


# ---------------------------------------------------------------------- python -m, HF folders


def test_python_m_tensorized(mlp, capsys):
    _, tmp = mlp
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def python_m(*argv):
        cmd = [sys.executable, "-m", "tensorized", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    done = python_m(
        "compress", tmp / "mlp.pt", "-o", tmp / "out", "-f", "cp", "-r", "0.2", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["name"] for r in result["layers"]] == ["0", "2", "4"]
    code, stdout, _ = run(capsys, "inspect", tmp / "out", "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["totals"]["params"] == result["totals"]["model_params_after"]
    assert [r["format"] for r in info["factorized"]] == ["cp"] * 3
    done = python_m("compress", tmp / "mlp.pt", "-o", tmp / "o2", "--rank", "x")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--rank must be" in done.stderr


@pytest.fixture
def tiny_bert(tmp_path):
    """A 2-block BERT with hidden size 32 and a 21-token vocabulary, saved like a Hub model."""
    transformers = pytest.importorskip("transformers")
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red"]
    words += ["blue", "house", "tree", "big", "small"]
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    texts = ["the cat sat on the mat", "a dog ran fast", "", "the big red house", "small blue tree"]
    (tmp_path / "texts.txt").write_text("\n".join(texts * 4))
    return model, tokenizer, tmp_path


def test_compress_hugging_face_folder_with_text_calibration(tiny_bert, capsys):
    model, tokenizer, tmp = tiny_bert
    argv = ["compress", tmp / "hf", "-o", tmp / "out", "-f", "tucker", "-r", "0.5"]
    argv += ["--target-modules", r"encoder\..*", "--min-params", "0", "--calibration"]
    code, stdout, err = run(capsys, *argv, tmp / "texts.txt", "--calibration-steps", "5", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["layers"]) == 12  # q, k, v, attention output, intermediate, output x 2
    assert all(r["name"].startswith("encoder.layer.") for r in result["layers"])
    assert all(r["output_error_after"] <= r["output_error_before"] for r in result["layers"])
    small = load(tmp / "out" / "model.pt")
    assert type(small).__name__ == "BertModel"
    assert isinstance(small.pooler.dense, nn.Linear)  # outside the regex
    batch = tokenizer(["the cat ran", "a small tree"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = small(**batch).last_hidden_state
        reference = model(**batch).last_hidden_state
    assert hidden.shape == reference.shape == (2, batch["input_ids"].shape[1], 32)
    assert rel_error(reference, hidden) < 1.0
    code, stdout, _ = run(capsys, "inspect", tmp / "out")
    assert code == 0 and "encoder.layer.1.output.dense" in stdout
    # the pickle-free copy: the original architecture, then load_model
    from transformers import AutoModel

    fresh = tz.load_model(tmp / "out" / "model.safetensors", AutoModel.from_pretrained(tmp / "hf"))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).last_hidden_state, hidden)
    assert tz.load_config(tmp / "out" / "model.safetensors") == tz.TensorizeConfig.from_dict(
        result["config"]
    )


def test_hugging_face_folder_needs_transformers(tiny_bert, capsys, monkeypatch):
    _, _, tmp = tiny_bert
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    code, _, err = run(capsys, "compress", tmp / "hf", "-o", tmp / "out")
    assert code == 2 and "needs transformers: pip install transformers" in err


def test_compress_then_distill(mlp, capsys):
    _, tmp = mlp
    torch.save(torch.randn(256, 64), tmp / "heal.pt")
    out = tmp / "healed"
    code, stdout, err = run(
        capsys, "compress", tmp / "mlp.pt", "-o", out, "-f", "tt", "-r", "0.3",
        "--calibration", tmp / "calib.pt", "--distill", tmp / "heal.pt", "--distill-epochs", "3",
        "--batch-size", "16", "--json",
    )  # fmt: skip
    assert code == 0, err
    healed = json.loads(stdout)["distill"]
    assert healed["after"] < healed["before"] and healed["epochs"] == 3
    assert json.loads((out / "report.json").read_text())["distill"] == healed
    code, _, err = run(capsys, "compress", tmp / "mlp.pt", "-o", tmp / "x", "--distill",
                       tmp / "heal.pt", "--distill-epochs", "0")  # fmt: skip
    assert code == 2 and "--distill-epochs must be >= 1" in err
