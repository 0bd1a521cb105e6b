"""ONNX export (dynamo and legacy TorchScript exporters) run with onnxruntime.

The exported graph must compute the PyTorch output within 1e-5 relative error at the export
batch size and at another one (a dynamic batch axis), and must store the factors, not a
rebuilt dense matrix.
"""

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import tensorized as tz
from tensorized.formats import FORMATS

pytestmark = [
    pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]
RANK = {"dense": "same", "cp": 6, "lowrank": 4}
CASES = [(fmt, s) for fmt, cls in FORMATS.items() for s in ("auto", *cls.strategy_names())]


class Net(nn.Module):
    """Two factorized layers, then the two layers of a joint weight through their views."""

    def __init__(self, fmt: str, implementation: str) -> None:
        super().__init__()
        kw = {"factorization": fmt, "rank": RANK.get(fmt, 0.5), "implementation": implementation}
        self.a = tz.FactorizedLinear((4, 6), (4, 8), **kw)
        self.b = tz.FactorizedLinear((4, 8), (4, 8), **kw)
        joint = tz.FactorizedLinear((4, 8), (4, 8), n_layers=2, **kw)
        self.c, self.d = joint[0], joint[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        return self.d(torch.tanh(self.c(h)))


def _export(model: nn.Module, path, dynamo: bool, **kwargs) -> None:
    x = torch.randn(3, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **kwargs
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                **kwargs,
            )


def _check_runs(model: nn.Module, path) -> None:
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (3, 17, 1):  # the export's batch size, then others
        x = torch.randn(batch, 24)
        (y,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            ref = model(x).double().numpy()
        assert y.shape == ref.shape
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert err < 1e-5, (batch, err)


def _stored_numel(path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(math.prod(t.dims) for t in graph.initializer)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize(("fmt", "strategy"), CASES)
def test_export_runs_in_onnxruntime_at_any_batch(tmp_path, fmt, strategy, dynamo):
    model = Net(fmt, strategy).eval()
    with torch.no_grad():
        model(torch.randn(5, 24))  # a filled inference cache must not leak into the graph
    path = tmp_path / "net.onnx"
    _export(model, path, dynamo, **({} if dynamo else {"do_constant_folding": False}))
    _check_runs(model, path)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_exported_file_stores_the_factors(tmp_path, fmt, dynamo):
    # A 1024 x 1024 layer at 10% of the parameters: the file holds about that many numbers,
    # not the matrix. (ONNX optimizers may fold small weight-only subgraphs into constants;
    # the legacy exporter's default constant folding does so for CP at any size, hence
    # do_constant_folding=False here.)
    layer = tz.FactorizedLinear((8, 8, 16), (8, 8, 16), factorization=fmt, rank=0.1).eval()
    path = tmp_path / "layer.onnx"
    x = torch.randn(2, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"dynamo": True} if dynamo else {"dynamo": False, "do_constant_folding": False}
        torch.onnx.export(layer, (x,), str(path), **kw)
    assert _stored_numel(path) <= 1.01 * layer.num_params < 0.11 * 1024 * 1024


def test_legacy_constant_folding_keeps_the_graph_correct(tmp_path):
    # With the legacy exporter's default constant folding, weight-only subgraphs become
    # constants (for CP the Khatri-Rao products, larger than the matrix): still correct.
    model = Net("cp", "auto").eval()
    path = tmp_path / "net.onnx"
    _export(model, path, dynamo=False)
    _check_runs(model, path)


def test_exported_graph_follows_trained_weights(tmp_path):
    model = Net("tucker", "auto").eval()
    with torch.no_grad():
        model(torch.randn(4, 24))
        for p in model.parameters():
            p.mul_(1.5)  # an update after the cache was filled
    path = tmp_path / "net.onnx"
    _export(model, path, dynamo=True)
    _check_runs(model, path)
