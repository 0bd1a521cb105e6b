"""A format defined only in this file, registered with ``tensorized.formats.register_format``
and run through the whole library unchanged.

The format is a sum of ``R`` Kronecker products, ``W = sum_r kron(A_r, B_r)``, for exactly two
modes per side (in ``(i1, i2)``, out ``(o1, o2)``): ``A (R, o1, i1)`` (``(L, R, o1, i1)``
with ``n_layers = L > 1``: the layers share ``B``), ``B (R, o2, i2)``. Every result is checked
against a float64 dense oracle built here with ``torch.kron`` from ``A`` and ``B``, never with
the library's helpers.
"""

import copy
import math
import pickle
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import tensorized as tz
from tensorized._plan import gemms, make_plan, work
from tensorized.formats import FORMATS, FactorizedMatrix, Strategy, WeightShape, Work
from tensorized.formats._strategy import reconstructed
from tensorized.formats.base import add_bias, balanced_std

F64 = torch.float64
NAME = "kron_sum"
IN, OUT, R = (4, 6), (3, 5), 3  # in 24, out 15; rank cap min(3 * 4, 5 * 6) = 12


# --------------------------------------------------------------------------- the format


def _dims(in_modes, out_modes) -> tuple[int, int, int, int]:
    KronSum.check_modes(tuple(in_modes), tuple(out_modes))
    (i1, i2), (o1, o2) = in_modes, out_modes
    return o1, o2, i1, i2


def _a(w: "KronSum", layer: int | None) -> torch.Tensor:
    """``(R, o1, i1)``: the A factors of one layer."""
    return w.A if w.n_layers == 1 else w.A[layer]


def _prepare_factorized(w: "KronSum", layer: int | None) -> tuple[torch.Tensor, ...]:
    o1, o2, i1, i2 = _dims(w.in_modes, w.out_modes)
    R = w.rank
    a = _a(w, layer).permute(1, 2, 0).reshape(o1, i1 * R)  # a copy of R * o1 * i1 elements
    b = w.B.reshape(R * o2, i2)  # a view
    return a, b


def _apply_factorized(w: "KronSum", x: torch.Tensor, ops, bias) -> torch.Tensor:
    # x (N, i1 * i2) -> (N * i1, i2); one GEMM with every B_r: (N, i1, R, o2); then for each
    # row n, A (o1, i1 * R) @ u[n] (i1 * R, o2), summing over r and i1 at once: (N, o1, o2).
    o1, o2, i1, i2 = _dims(w.in_modes, w.out_modes)
    R, N = w.rank, x.shape[0]
    a, b = ops
    u = F.linear(x.reshape(N * i1, i2), b).reshape(N, i1 * R, o2)  # views, no copy
    y = torch.bmm(a.expand(N, o1, i1 * R), u)
    return add_bias(y.reshape(N, o1 * o2), bias)


def _work_factorized(s: WeightShape, batch: int) -> Work:
    o1, o2, i1, i2 = _dims(s.in_modes, s.out_modes)
    R = s.rank
    apply = [(batch * i1, i2, R * o2, 1), (o1, i1 * R, o2, batch)]  # the mm, then the bmm
    return Work([], apply, prepare_numel=R * o1 * i1)  # prepare copies A into (o1, i1 * R)


def _reconstruction(s: WeightShape) -> tuple[list, int]:
    # _to_matrix: one (o1 i1, R) @ (R, o2 i2) product, then a permuting copy of O * I elements
    o1, o2, i1, i2 = _dims(s.in_modes, s.out_modes)
    return [(o1 * i1, s.rank, o2 * i2, 1)], s.out_features * s.in_features


class KronSum(FactorizedMatrix):
    """``W = sum_r kron(A_r, B_r)``: ``A ([L,] R, o1, i1)``, ``B (R, o2, i2)``."""

    name = NAME
    aliases = ("kronecker-sum",)
    rank_kind = "int"
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            _apply_factorized,
            _work_factorized,
            "x through every B_r (one GEMM), then A summed over r (one batched GEMM)",
        ),
        reconstructed(_reconstruction),
    )

    @classmethod
    def check_modes(cls, in_modes, out_modes) -> None:
        if len(in_modes) != 2 or len(out_modes) != 2:
            raise ValueError(
                f"factorization={NAME!r} needs exactly 2 modes per side (W = sum_r kron(A_r, "
                f"B_r)), got in modes {tuple(in_modes)} and out modes {tuple(out_modes)}"
            )

    @classmethod
    def rank_caps(cls, in_modes, out_modes, n_layers: int = 1) -> tuple[int, ...]:
        o1, o2, i1, i2 = _dims(in_modes, out_modes)
        return (min(n_layers * o1 * i1, o2 * i2),)  # the rank of the stacked rearrangement

    @classmethod
    def param_count(cls, in_modes, out_modes, rank, n_layers: int = 1) -> int:
        o1, o2, i1, i2 = _dims(in_modes, out_modes)
        return int(rank) * (n_layers * o1 * i1 + o2 * i2)

    def _build(self, factory: dict) -> None:
        o1, o2, i1, i2 = _dims(self.in_modes, self.out_modes)
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        self.A = nn.Parameter(torch.empty(*lead, self.rank, o1, i1, **factory))
        self.B = nn.Parameter(torch.empty(self.rank, o2, i2, **factory))

    def _to_matrix(self, layer: int | None) -> torch.Tensor:
        o1, o2, i1, i2 = _dims(self.in_modes, self.out_modes)
        R = self.rank
        M = _a(self, layer).reshape(R, o1 * i1).T @ self.B.reshape(R, o2 * i2)
        return M.reshape(o1, i1, o2, i2).permute(0, 2, 1, 3).reshape(o1 * o2, i1 * i2)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, self.rank, 2)
        nn.init.normal_(self.A, 0.0, sigma)
        nn.init.normal_(self.B, 0.0, sigma)

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.A, self.B]

    def _layer_slice(self, layer: int) -> torch.Tensor:
        return self.A[layer]

    def _moments(self, layer: int | None) -> tuple[float, float]:
        # sum W = sum_r sum(A_r) sum(B_r); sum W^2 = sum_{r,s} <A_r, A_s> <B_r, B_s>
        a = _a(self, layer).detach().double().reshape(self.rank, -1)
        b = self.B.detach().double().reshape(self.rank, -1)
        return float(a.sum(1) @ b.sum(1)), float(((a @ a.T) * (b @ b.T)).sum())

    def _decompose(self, tensor: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        # C. F. Van Loan and N. Pitsianis, "Approximation with Kronecker products", in Linear
        # Algebra for Large Scale and Real-Time Applications (M. S. Moonen, G. H. Golub,
        # B. L. R. De Moor, eds.), Kluwer, 1993, pp. 293-314: rearranging W into the
        # (o1 i1, o2 i2) matrix whose row (a, c) is vec of block (a, c) of W makes
        # ||W - sum_r kron(A_r, B_r)||_F = ||R(W) - sum_r vec(A_r) vec(B_r)^T||_F, so the
        # truncated SVD (Eckart-Young) gives the best sum of R Kronecker products. The layers
        # of a joint weight stack their rearrangements (shared B, one A per layer).
        if kwargs:
            raise TypeError(f"factorization={NAME!r} takes no decomposition options: {kwargs}")
        o1, o2, i1, i2 = _dims(self.in_modes, self.out_modes)
        L, R = self.n_layers, self.rank
        T = tensor.to(F64).reshape(L, o1, o2, i1, i2)
        M = T.permute(0, 1, 3, 2, 4).reshape(L * o1 * i1, o2 * i2)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        root = S[:R].sqrt()
        A = (U[:, :R] * root).reshape(L, o1, i1, R).permute(0, 3, 1, 2)
        B = (root[:, None] * Vh[:R]).reshape(R, o2, i2)
        return {"A": (A if L > 1 else A[0]).to(tensor.dtype), "B": B.to(tensor.dtype)}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """Registered while this module's tests run (other modules parametrize over FORMATS at
    collection and may loop over it at run time: they must not see this format)."""
    assert tz.formats.register_format(KronSum) is KronSum
    yield
    # the library has no unregister_format: drop the entries by hand
    FORMATS.pop(NAME, None)
    tz.formats._registry._ALIASES.pop("kronecker-sum", None)


# --------------------------------------------------------------------------- oracles


def kron_oracle(A: torch.Tensor, B: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """``sum_r kron(A_r, B_r)`` in float64 from ``A (R, o1, i1)`` and ``B (R, o2, i2)``."""
    if detach:
        A, B = A.detach(), B.detach()
    A, B = A.to(F64), B.to(F64)
    return sum(torch.kron(A[r], B[r]) for r in range(A.shape[0]))


def layer_oracle(layer: tz.FactorizedLinear, index: int | None = None) -> torch.Tensor:
    w = layer.weight
    return kron_oracle(w.A if index is None else w.A[index], w.B)


def rearranged(W: torch.Tensor, in_modes, out_modes) -> torch.Tensor:
    """Van Loan-Pitsianis rearrangement, block by block: row ``(a, c)`` is the row-major vec
    of block ``(a, c)`` (``o2 x i2``) of ``W``."""
    (i1, i2), (o1, o2) = in_modes, out_modes
    rows = [
        W[a * o2 : (a + 1) * o2, c * i2 : (c + 1) * i2].reshape(-1)
        for a in range(o1)
        for c in range(i1)
    ]
    return torch.stack(rows)


def random_kron_sum(in_modes, out_modes, rank, n_layers=1, dtype=F64):
    """``A``, ``B`` and the dense ``W`` (stacked over layers) of a random sum of krons."""
    (i1, i2), (o1, o2) = in_modes, out_modes
    A = torch.randn(n_layers, rank, o1, i1, dtype=dtype)
    B = torch.randn(rank, o2, i2, dtype=dtype)
    W = torch.stack([kron_oracle(A[k], B) for k in range(n_layers)]).to(dtype)
    return A, B, W


def close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol)


def rel_err(a, b) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm())


def make_mlp(dtype=torch.float32) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16)
    ).to(dtype)


def anisotropic_inputs(rows: int, features: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, features)
    mix = torch.linalg.qr(torch.randn(features, features, generator=g))[0]
    return (torch.randn(rows, features, generator=g) * scales) @ mix.T


def uses_kron_sum(model: nn.Module, allow_dense: bool = False) -> list[tz.FactorizedLinear]:
    """The model's KronSum layers (every replaced layer is one, or with ``allow_dense`` one
    that a budget kept dense)."""
    layers = [m for m in model.modules() if isinstance(m, tz.FactorizedLinear)]
    kron = [m for m in layers if isinstance(m.weight, KronSum)]
    dense = [m for m in layers if m.factorization == "dense"]
    assert kron and len(kron) + (len(dense) if allow_dense else 0) == len(layers)
    assert not any(type(m) is nn.Linear for m in model.modules())
    return kron


# --------------------------------------------------------------------------- registration


def test_registration_is_idempotent_and_guards_the_name():
    assert tz.get_format("KRON_SUM") is KronSum and tz.get_format("Kronecker-Sum") is KronSum
    assert tz.formats.register_format(KronSum) is KronSum  # same class again: fine

    class Impostor(KronSum):
        pass

    with pytest.raises(ValueError, match="already registered to KronSum"):
        tz.formats.register_format(Impostor)
    assert FORMATS[NAME] is KronSum


def test_rank_policy_and_modes():
    assert tz.resolve_rank(NAME, IN, OUT, 5) == 5
    assert tz.resolve_rank(NAME, IN, OUT, 100) == 12  # clipped to the cap
    assert tz.resolve_rank(NAME, IN, OUT, (7,)) == 7
    assert tz.resolve_rank(NAME, IN, OUT, 0.35) == 3  # 0.35 * 360 = 126 = 3 * (12 + 30)
    assert tz.param_count(NAME, IN, OUT, 3) == 3 * (12 + 30)
    assert tz.param_count(NAME, IN, OUT, 3, 4) == 3 * (4 * 12 + 30)
    assert tz.rank_caps(NAME, IN, OUT, 4) == (min(48, 30),)
    with pytest.raises(ValueError, match="out of range"):
        tz.resolve_rank(NAME, IN, OUT, (13,))
    layer = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, n_layers=2)
    assert layer.weight.A.shape == (2, R, 3, 4) and layer.weight.B.shape == (R, 5, 6)
    assert layer.weight.num_params == tz.param_count(NAME, IN, OUT, R, 2)
    for in_modes, out_modes in [((2, 2, 6), OUT), (IN, (15,))]:
        with pytest.raises(ValueError, match="needs exactly 2 modes per side"):
            tz.FactorizedLinear(in_modes, out_modes, factorization=NAME, rank=R)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_init_has_nn_linear_scale_exactly(n_layers):
    w = KronSum(IN, OUT, R, n_layers, dtype=F64)
    target = 1 / math.sqrt(3 * 24)
    for layer in range(n_layers):
        W = kron_oracle(w.A if n_layers == 1 else w.A[layer], w.B)
        assert W.std(correction=0).item() == pytest.approx(target, rel=1e-9)
        moments = w._moments(None if n_layers == 1 else layer)
        assert moments == pytest.approx((W.sum().item(), W.pow(2).sum().item()), rel=1e-9)


# --------------------------------------------------------------------------- 1. the layer


@pytest.mark.parametrize("implementation", ["auto", "factorized", "reconstructed"])
def test_layer_forward_backward_match_the_oracle(implementation):
    layer = tz.FactorizedLinear(
        IN, OUT, factorization=NAME, rank=R, implementation=implementation, dtype=F64
    )
    assert isinstance(layer.weight, KronSum) and layer.rank == R
    assert layer.factorization == NAME
    x = torch.randn(2, 7, 24, dtype=F64)
    W = layer_oracle(layer)
    # training: forward and the factors' gradients against autograd through the oracle
    y = layer(x)
    close(y, x @ W.T + layer.bias)
    (y * y).sum().backward()
    A = layer.weight.A.detach().clone().requires_grad_()
    B = layer.weight.B.detach().clone().requires_grad_()
    ref = x @ kron_oracle(A, B, detach=False).T + layer.bias.detach()
    (ref * ref).sum().backward()
    close(layer.weight.A.grad, A.grad)
    close(layer.weight.B.grad, B.grad)
    layer.eval()
    with torch.no_grad():
        close(layer(x), x @ W.T + layer.bias)
        close(layer(x[0, :1]), x[0, :1] @ W.T + layer.bias)  # one row
    for s in ("factorized", "reconstructed"):
        close(layer.weight.contract(x, None, s), x @ W.T)


def test_joint_layers_match_the_oracle():
    layer = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, n_layers=3, dtype=F64)
    x = torch.randn(5, 24, dtype=F64)
    for s in ("auto", "factorized", "reconstructed"):
        layer.implementation = s
        for i in range(3):
            close(layer(x, i), x @ layer_oracle(layer, i).T + layer.bias[i])
            close(layer[i](x), x @ layer_oracle(layer, i).T + layer.bias[i])


def test_plan_lists_both_strategies_and_repr_names_the_format():
    layer = tz.FactorizedLinear((8, 8), (8, 8), factorization=NAME, rank=4)
    for batch in (1, 64, 4096):
        for training in (False, True):
            plan = layer.plan(batch, training=training)
            assert plan.factorization == NAME
            assert plan.strategies == ("factorized", "reconstructed")
            assert plan.chosen in plan.strategies
            text = str(plan)
            assert "factorized" in text and "reconstructed" in text
    assert layer.implementation_for(32) in ("factorized", "reconstructed")
    fixed = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, implementation="reconstructed")
    assert fixed.plan(8).chosen == "reconstructed"
    assert f"factorization='{NAME}'" in repr(layer) and "rank=4" in repr(layer)
    assert "KronSum(" in repr(layer.weight)
    with pytest.raises(ValueError, match="implementation must be one of"):
        tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, implementation="kron")


class _CopyCounter(TorchDispatchMode):
    """Elements written by copies (``clone`` / ``copy_``) while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.numel += out.numel()
        return out


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("strategy", ["factorized", "reconstructed"])
def test_declared_work_matches_the_code(strategy, n_layers):
    w = KronSum(IN, OUT, R, n_layers, dtype=F64)
    layer = n_layers - 1 if n_layers > 1 else None
    batch = 7
    x = torch.randn(batch, 24, dtype=F64, requires_grad=True)
    declared = work(w, strategy, batch)
    prepare, apply = gemms(w, strategy, batch)
    forward = sum(2 * m * k * n * c for m, k, n, c in prepare + apply)
    with FlopCounterMode(display=False) as counter:
        y = w.contract(x, layer, strategy)
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    cost = make_plan(w, batch, training=True, dtype=F64, device_type="cpu").costs[strategy]
    assert (cost.forward_flops, cost.backward_flops) == (forward, counter.get_total_flops())
    # element-wise copies: prepare's (the reconstructed matrix itself is written by its GEMM)
    s = w.strategy(strategy)
    with torch.no_grad(), _CopyCounter() as copies:
        operands = s.prepare(w, layer)
    written = 24 * 15 if strategy == "reconstructed" else 0
    assert copies.numel == declared.prepare_numel - written
    with torch.no_grad(), _CopyCounter() as copies:
        s.apply(w, x, operands, None)
    assert copies.numel == declared.copied_numel == 0


# --------------------------------------------------------------------------- 2. from_linear


def test_from_linear_is_exact_on_a_sum_of_kronecker_products():
    A, B, W = random_kron_sum(IN, OUT, R)
    linear = nn.Linear(24, 15, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(W[0])
    layer = tz.FactorizedLinear.from_linear(linear, IN, OUT, factorization=NAME, rank=R)
    assert isinstance(layer.weight, KronSum) and layer.rank == R
    assert layer.weight.A.dtype == F64
    close(layer_oracle(layer), kron_oracle(A[0], B))
    x = torch.randn(9, 24, dtype=F64)
    for s in ("auto", "factorized", "reconstructed"):
        layer.implementation = s
        close(layer(x), linear(x))


def test_from_linear_is_the_best_sum_at_a_lower_rank():
    W = torch.randn(15, 24, dtype=F64)
    linear = nn.Linear(24, 15, bias=False, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(W)
    s2 = torch.linalg.svdvals(rearranged(W, IN, OUT)).pow(2)
    for r in (1, 4, 12):
        layer = tz.FactorizedLinear.from_linear(
            linear, IN, OUT, factorization=NAME, rank=r, bias=False
        )
        err2 = (layer_oracle(layer) - W).pow(2).sum()
        assert err2.item() == pytest.approx(s2[r:].sum().item(), rel=1e-9, abs=1e-18)


def test_from_linear_list_shares_b_exactly():
    W = random_kron_sum(IN, OUT, R, n_layers=2)[2]
    linears = [nn.Linear(24, 15, dtype=F64) for _ in range(2)]
    with torch.no_grad():
        for lin, w in zip(linears, W):
            lin.weight.copy_(w)
    joint = tz.FactorizedLinear.from_linear_list(linears, IN, OUT, factorization=NAME, rank=R)
    assert joint.weight.A.shape == (2, R, 3, 4) and joint.rank == R
    x = torch.randn(4, 24, dtype=F64)
    for i, lin in enumerate(linears):
        close(layer_oracle(joint, i), W[i])
        close(joint(x, i), lin(x))


# --------------------------------------------------------------------------- 3. tensorize_


def _calibration():
    x = anisotropic_inputs(512)
    return [x[k : k + 128] for k in range(0, 512, 128)]


def _check_tensorized(model, original, report):
    layers = uses_kron_sum(model, allow_dense=True)
    assert [r.name for r in report] == ["0", "2", "4"]
    x = anisotropic_inputs(20, seed=5)
    rows = [r for r in report if r.factorization == NAME]
    old_layers = [original[int(r.name)] for r in rows]
    for row, layer, old in zip(rows, layers, old_layers, strict=True):
        assert row.rank == layer.rank and row.kind == "linear"
        assert (row.in_modes, row.out_modes) == (
            layer.in_tensorized_features,
            layer.out_tensorized_features,
        )
        assert row.new_params == layer.num_params
        W = layer_oracle(layer)
        assert row.weight_error == pytest.approx(rel_err(W, old.weight), rel=1e-4)
        h = torch.randn(20, layer.in_features)
        with torch.no_grad():
            close(layer(h), h.double() @ W.T + layer.bias.double(), tol=1e-5)
    with torch.no_grad():
        return rel_err(model(x), original(x))


@pytest.mark.parametrize("allocation", ["uniform", "budget"])
def test_tensorize_with_calibration(allocation):
    torch.manual_seed(1)
    original = make_mlp()
    rank = 4 if allocation == "uniform" else 0.5
    config = tz.TensorizeConfig(
        factorization=NAME,
        rank=rank,
        order=2,
        min_params=0,
        progress=False,
        rank_allocation=allocation,
        calibration_steps=50,
    )
    plain, calibrated = copy.deepcopy(original), copy.deepcopy(original)
    plain_report = tz.tensorize_(plain, config)
    report = tz.tensorize_(calibrated, config, calibration_data=_calibration())
    if allocation == "uniform":  # a budget spends by output error with data: other ranks
        assert [r.rank for r in report] == [r.rank for r in plain_report]
    assert {r.factorization for r in report} <= {NAME, "dense"}
    assert all(r.output_error_before is None for r in plain_report)
    for row in report:
        assert row.output_error_after <= row.output_error_before
    assert any(row.output_error_after < 0.9 * row.output_error_before for row in report)
    if allocation == "uniform":
        assert [r.rank for r in report] == [4, 4, 4]
    else:
        dense = sum(original[k].weight.numel() for k in (0, 2, 4))
        kept = sum(
            m.weight.num_params for m in calibrated.modules() if isinstance(m, tz.FactorizedLinear)
        )
        assert abs(kept - 0.5 * dense) <= 0.03 * 0.5 * dense
        assert len({r.rank for r in report}) > 1  # not one rank for all: an allocation
    plain_error = _check_tensorized(plain, original, plain_report)
    calibrated_error = _check_tensorized(calibrated, original, report)
    assert calibrated_error <= plain_error
    assert str(report).splitlines()[-1].startswith("total (3 rows)")


class Blocks(nn.Module):
    """Three same-shaped residual blocks (a joint group) and a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_joint_tensorize_with_budget_calibration_and_reload(tmp_path):
    torch.manual_seed(2)
    original = Blocks()
    model = copy.deepcopy(original)
    config = tz.TensorizeConfig(
        factorization=NAME,
        rank=0.5,
        order=2,
        min_params=0,
        progress=False,
        joint=True,
        rank_allocation="budget",
        calibration_steps=20,
    )
    report = tz.tensorize_(model, config, calibration_data=_calibration())
    assert [(r.name, r.kind) for r in report] == [("blocks.*.*", "joint"), ("head", "linear")]
    joint = model.blocks[0][0].parent
    assert joint.n_layers == 3 and joint.weight.A.shape[0] == 3
    assert all(model.blocks[i][0].parent is joint for i in range(3))
    kept = joint.weight.num_params + model.head.weight.num_params
    assert abs(kept - 0.5 * (3 * 32 * 32 + 16 * 32)) <= 0.03 * 0.5 * (3 * 32 * 32 + 16 * 32)
    for row in report:
        assert row.output_error_after <= row.output_error_before
    h = torch.randn(4, 32)
    with torch.no_grad():
        for i in range(3):
            expected = h.double() @ layer_oracle(joint, i).T + joint.bias[i].double()
            close(model.blocks[i][0](h), expected, tol=1e-5)
    path = tmp_path / "blocks.safetensors"
    tz.save_model(model, path)
    fresh = tz.load_model(path, base=Blocks())
    assert fresh.blocks[2][0].parent is fresh.blocks[0][0].parent
    x = anisotropic_inputs(7, seed=4)
    assert torch.equal(fresh(x), model(x))


def test_tensorize_refuses_modes_the_format_cannot_take():
    model = make_mlp()
    config = tz.TensorizeConfig(factorization=NAME, rank=2, order=3, min_params=0, progress=False)
    with pytest.raises(ValueError, match=r"layer '0'.*needs exactly 2 modes per side"):
        tz.tensorize_(model, config)
    assert not any(isinstance(m, tz.FactorizedLinear) for m in model.modules())


# --------------------------------------------------------------------------- 4. save / load


def _tensorized_mlp(calibrate: bool = False) -> tuple[nn.Module, tz.TensorizeConfig]:
    model = make_mlp()
    config = tz.TensorizeConfig(
        factorization=NAME, rank=4, order=2, min_params=0, progress=False, calibration_steps=10
    )
    tz.tensorize_(model, config, calibration_data=_calibration() if calibrate else None)
    return model, config


def test_save_and_load_are_bit_identical(tmp_path):
    model, config = _tensorized_mlp(calibrate=True)
    path = tmp_path / "mlp.safetensors"
    tz.save_model(model, path, config=config)
    fresh = tz.load_model(path, base=make_mlp())
    assert tz.load_config(path) == config
    for new, old in zip(uses_kron_sum(fresh), uses_kron_sum(model)):
        assert new.rank == old.rank
        assert torch.equal(new.weight.A, old.weight.A) and torch.equal(new.weight.B, old.weight.B)
    x = anisotropic_inputs(11, seed=3)
    assert torch.equal(fresh(x), model(x))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_deepcopy_and_pickle_keep_the_strategies():
    layer = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, implementation="factorized")
    x = torch.randn(3, 24)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.weight.strategy("factorized") == layer.weight.strategy("factorized")
        assert torch.equal(other(x), layer(x))


# --------------------------------------------------------------------------- 5. compile


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("implementation", ["auto", "factorized", "reconstructed"])
def test_compile_fullgraph_matches_eager(implementation):
    model, _ = _tensorized_mlp()
    for m in uses_kron_sum(model):
        m.implementation = implementation
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (3, 17):
        x = torch.randn(batch, 32, requires_grad=True)
        y, y_eager = compiled(x), model(x)
        torch.testing.assert_close(y, y_eager)
        (g,) = torch.autograd.grad(y.pow(2).sum(), x)
        (g_eager,) = torch.autograd.grad(y_eager.pow(2).sum(), x)
        torch.testing.assert_close(g, g_eager)
    model.eval()
    with torch.no_grad():
        x = torch.randn(5, 32)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.usefixtures("_fresh_dynamo")
def test_inductor_matches_eager():
    layer = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R)
    start = time.perf_counter()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 24)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert time.perf_counter() - start < 120  # a small graph: it should compile fast


# --------------------------------------------------------------------------- 6. ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("implementation", ["auto", "factorized", "reconstructed"])
def test_legacy_onnx_export_runs_at_any_batch(tmp_path, implementation):
    model, _ = _tensorized_mlp()
    for m in uses_kron_sum(model):
        m.implementation = implementation
    model.eval()
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(3, 32),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            do_constant_folding=False,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    stored = sum(math.prod(t.dims) for t in graph.graph.initializer)
    assert stored <= sum(p.numel() for p in model.parameters())  # the factors, not W
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (3, 17, 1):
        x = anisotropic_inputs(batch, seed=batch)
        (y,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref = model(x).double().numpy()
        assert y.shape == ref.shape
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


# --------------------------------------------------------------------------- 7. merge


def test_merge_and_unmerge_give_the_same_outputs():
    layer = tz.FactorizedLinear(IN, OUT, factorization=NAME, rank=R, dtype=F64).eval()
    x = torch.randn(6, 24, dtype=F64)
    expected = x @ layer_oracle(layer).T + layer.bias
    with torch.no_grad():
        ref = layer(x)
        close(ref, expected)
        kept = {"factorized": 3 * 4 * R, "reconstructed": 15 * 24}  # the copied A, or W
        for name in (None, "factorized", "reconstructed"):
            layer.merge(name)
            assert layer.merged and f"merged='{layer._merged.strategy.name}'" in repr(layer)
            assert layer.merged_numel == kept[layer._merged.strategy.name]
            assert layer.plan(6).chosen == layer._merged.strategy.name and layer.plan(6).cached
            close(layer(x), expected)
            layer.unmerge()
            assert not layer.merged and layer.merged_numel == 0
            assert torch.equal(layer(x), ref)
    layer.merge("reconstructed")
    y = layer(x)  # gradients flow: computed from the parameters, the merge is dropped
    assert not layer.merged
    close(y, expected)


# --------------------------------------------------------------------------- 8. from_weight


def test_from_weight_wraps_a_decomposed_module():
    A, B, W = random_kron_sum(IN, OUT, R)
    module = KronSum.from_matrix(W[0], IN, OUT, R)
    assert isinstance(module, KronSum) and module.rank == R and module.A.dtype == F64
    close(kron_oracle(module.A, module.B), kron_oracle(A[0], B))
    bias = torch.randn(15, dtype=F64)
    layer = tz.FactorizedLinear.from_weight(module, bias)
    assert layer.weight is module and layer.factorization == NAME
    x = torch.randn(4, 24, dtype=F64)
    for s in ("auto", "factorized", "reconstructed"):
        layer.implementation = s
        close(layer(x), x @ W[0].T + bias)
    joint = KronSum.from_matrix(W.expand(2, -1, -1), IN, OUT, R)
    assert joint.n_layers == 2 and joint.A.shape == (2, R, 3, 4)
    with pytest.raises(TypeError, match="takes no decomposition options"):
        KronSum.from_matrix(W[0], IN, OUT, R, n_iter_max=5)


def test_embedding_table_of_the_registered_format_uses_the_rebuild_fallback():
    # No per-row path is declared: rows are gathered from the rebuilt table, exactly.
    emb = tz.FactorizedEmbedding(
        15,
        24,
        auto_tensorize=False,
        tensorized_num_embeddings=OUT,
        tensorized_embedding_dim=IN,
        factorization=NAME,
        rank=R,
        dtype=F64,
    )
    assert emb.lookup_strategy(4, training=False) == "reconstructed"
    x = torch.tensor([[0, 14, 3], [3, 3, 7]])
    close(emb(x), kron_oracle(emb.weight.A, emb.weight.B)[x])
    emb.implementation = "rows"  # the base class's per-row fallback: also exact
    close(emb(x), kron_oracle(emb.weight.A, emb.weight.B)[x])
