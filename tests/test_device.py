"""The layer on an accelerator: every format and strategy against a float64 oracle on the same
device, decompositions on the device against the CPU's, training, moves and torch.compile.

Skipped where no CUDA device exists (CI); run on a GPU machine with ``pytest tests/test_device.py``.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorized as tz
from oracles import dense_forward, dense_weight
from tensorized.formats import FORMATS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
F64 = torch.float64
RANK = {"dense": "same", "cp": 6, "lowrank": 3}
CASES = [(fmt, s) for fmt, cls in FORMATS.items() for s in ("auto", *cls.strategy_names())]


def make(fmt, strategy="auto", n_layers=1, dtype=F64, device=CUDA):
    return tz.FactorizedLinear(
        (4, 6),
        (3, 5),
        True,
        fmt,
        RANK.get(fmt, 2),
        n_layers,
        implementation=strategy,
        device=device,
        dtype=dtype,
    )


@pytest.mark.parametrize(("fmt", "strategy"), CASES)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_every_strategy_matches_dense_oracle_on_cuda(fmt, strategy, n_layers):
    layer = make(fmt, strategy, n_layers)
    assert all(p.device.type == "cuda" for p in layer.parameters())
    x = torch.randn(7, 2, 24, dtype=F64, device=CUDA)
    for i in range(n_layers):
        y = layer(x, i)
        assert y.device.type == "cuda"
        torch.testing.assert_close(y, dense_forward(layer, x, i), rtol=1e-12, atol=1e-12)
    layer.eval()
    with torch.no_grad():  # the eval-mode operand cache on the device
        torch.testing.assert_close(layer(x, 0), layer(x, 0), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt", "lowrank"])
def test_decomposition_on_cuda_matches_cpu(fmt):
    src = nn.Linear(64, 48, dtype=F64)
    kw = {"n_iter_max": 50} if fmt == "cp" else {}
    on_cpu = tz.FactorizedLinear.from_linear(src, (4, 4, 4), (4, 3, 4), 0.3, True, fmt, kw)
    on_gpu = tz.FactorizedLinear.from_linear(
        copy.deepcopy(src).to(CUDA), (4, 4, 4), (4, 3, 4), 0.3, True, fmt, kw
    )
    assert on_gpu.weight.to_matrix().device.type == "cuda"
    W = src.weight.detach()
    err_cpu = torch.linalg.norm(W - dense_weight(on_cpu.weight)) / torch.linalg.norm(W)
    err_gpu = torch.linalg.norm(W - dense_weight(on_gpu.weight).cpu()) / torch.linalg.norm(W)
    # The same algorithm in float64: the same truncation error. CP-ALS is not a truncation:
    # rounding differences between cuSOLVER and LAPACK grow over its iterations (on an H100
    # they exceeded 0.1% relative), so it gets a looser band.
    assert abs(err_gpu - err_cpu) <= (2e-2 if fmt == "cp" else 1e-8) * err_cpu
    assert err_gpu < 1


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_fresh_layer_output_scale_matches_nn_linear_on_cuda(fmt):
    layer = tz.FactorizedLinear((8, 8, 16), (8, 8, 16), factorization=fmt, rank=0.1, device=CUDA)
    dense = nn.Linear(1024, 1024, device=CUDA)
    x = torch.randn(512, 1024, device=CUDA)
    with torch.no_grad():
        ratio = (layer(x) - layer.bias).std() / (dense(x) - dense.bias).std()
    assert 0.85 < ratio.item() < 1.15


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_gradients_on_cuda_equal_cpu_gradients(fmt):
    cpu = make(fmt, device="cpu")
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(9, 24, dtype=F64)
    loss_cpu = cpu(x).square().sum()
    loss_gpu = gpu(x.to(CUDA)).square().sum()
    grads_cpu = torch.autograd.grad(loss_cpu, list(cpu.parameters()))
    grads_gpu = torch.autograd.grad(loss_gpu, list(gpu.parameters()))
    for g_cpu, g_gpu in zip(grads_cpu, grads_gpu, strict=True):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-10, atol=1e-10)


def test_training_on_cuda_reduces_loss():
    torch.manual_seed(0)
    teacher = nn.Linear(64, 32, device=CUDA)
    layer = tz.FactorizedLinear((4, 4, 4), (2, 4, 4), factorization="tucker", rank=0.5, device=CUDA)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 64, device=CUDA)
    with torch.no_grad():
        y = teacher(x)
    first = F.mse_loss(layer(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()
    assert F.mse_loss(layer(x), y).item() < first


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt", "lowrank", "dense"])
def test_state_dict_moves_between_cpu_and_cuda(fmt):
    gpu = make(fmt)
    cpu = make(fmt, device="cpu")
    cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    x = torch.randn(5, 24, dtype=F64)
    torch.testing.assert_close(cpu(x), gpu(x.to(CUDA)).cpu(), rtol=1e-12, atol=1e-12)
    back = copy.deepcopy(cpu).to(CUDA)
    torch.testing.assert_close(back(x.to(CUDA)), gpu(x.to(CUDA)), rtol=0, atol=0)


def test_plan_uses_the_device_cost_model():
    layer = tz.FactorizedLinear((8, 8, 16), (8, 8, 16), factorization="tucker", rank=0.1)
    on_cpu = layer.plan(32)
    on_gpu = copy.deepcopy(layer).to(CUDA).plan(32)
    # Same FLOPs (a property of the shapes), different machine model (time estimates).
    assert on_cpu.costs.keys() == on_gpu.costs.keys()
    for name in on_cpu.costs:
        assert on_cpu.costs[name].forward_flops == on_gpu.costs[name].forward_flops
        assert on_gpu.costs[name].seconds < on_cpu.costs[name].seconds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda(dtype):
    layer = make("tucker", dtype=torch.float32)
    x = torch.randn(8, 24, device=CUDA)
    ref = layer(x)
    half = copy.deepcopy(layer).to(dtype)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt"])
def test_inductor_compiles_on_cuda(fmt):
    torch._dynamo.reset()
    layer = make(fmt, dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(16, 24, device=CUDA, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_eager,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
