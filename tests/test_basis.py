"""The shared-basis format (Basis Sharing): its fits against float64 oracles built from SVDs
and normal equations, and a joint group compressed by ``tensorize_`` with calibration."""

import pytest
import torch
from torch import nn

import tensorized as tz
from oracles import dense_weight
from tensorized.formats import get_format

F64 = torch.float64
INS, OUTS = (4, 6), (3, 4)  # 24 -> 12


def whitened_loss(fm, weights, grams):
    """``sum_l ||(W_l - What_l) S_l||^2 / ||W_l S_l||^2`` from the einsum oracle."""
    W_hat = dense_weight(fm).detach()
    W_hat = W_hat if W_hat.ndim == 3 else W_hat[None]
    total = 0.0
    for W, Wh, C in zip(weights, W_hat, grams):
        E = W - Wh
        total += float(torch.trace(E @ C @ E.T) / torch.trace(W @ C @ W.T))
    return total


def random_gram(n, generator):
    A = torch.randn(n, 3 * n, dtype=F64, generator=generator)
    return A @ A.T / (3 * n)


def test_parameters_are_one_shared_basis_and_a_coefficient_matrix_per_layer():
    fm = get_format("basis")(INS, OUTS, 5, n_layers=3)
    assert fm.V.shape == (24, 5) and fm.U.shape == (3, 12, 5)
    assert fm.num_params == 5 * (24 + 3 * 12)
    lowrank = get_format("lowrank")(INS, OUTS, 5, n_layers=3)
    assert fm.num_params < lowrank.num_params


def test_decomposition_is_the_truncated_svd_of_the_stacked_layers():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 12, 24, dtype=F64, generator=g)
    fm = get_format("basis").from_matrix(W, INS, OUTS, 7)
    s2 = torch.linalg.svdvals(W.reshape(36, 24)).pow(2)
    err = float((dense_weight(fm).detach() - W).pow(2).sum())
    assert err == pytest.approx(float(s2[7:].sum()), rel=1e-9)
    full = get_format("basis").from_matrix(W, INS, OUTS, 24)  # the cap: every input
    assert torch.allclose(dense_weight(full), W, atol=1e-12)


def test_closed_form_with_equal_grams_is_the_whitened_svd_of_the_stack():
    g = torch.Generator().manual_seed(1)
    Ws = list(torch.randn(3, 12, 24, dtype=F64, generator=g))
    C = random_gram(24, g)
    fm = get_format("basis")(INS, OUTS, 6, n_layers=3, dtype=F64)
    fm.fit_closed_form_all(Ws, [C] * 3)
    # oracle: ||(W - What) S||^2 summed, at its optimum the tail of the stacked W S's spectrum
    lam, vecs = torch.linalg.eigh(C)
    S = vecs * lam.sqrt()
    s2 = torch.linalg.svdvals(torch.cat([W @ S for W in Ws])).pow(2)
    W_hat = dense_weight(fm).detach()
    err = sum(float(((W - Wh) @ S).pow(2).sum()) for W, Wh in zip(Ws, W_hat))
    assert err == pytest.approx(float(s2[6:].sum()), rel=1e-8)


def test_closed_form_coefficients_solve_each_layers_normal_equations():
    # Different grams: the basis is a start, but each U_l is exact for it and its own gram:
    # the gradient (W_l - U_l V^T) C_l V vanishes.
    g = torch.Generator().manual_seed(2)
    Ws = list(torch.randn(3, 12, 24, dtype=F64, generator=g))
    grams = [random_gram(24, g) for _ in Ws]
    fm = get_format("basis")(INS, OUTS, 6, n_layers=3, dtype=F64)
    fm.fit_closed_form_all(Ws, grams)
    V = fm.V.detach()
    for W, Wh, C in zip(Ws, dense_weight(fm).detach(), grams):
        grad = (W - Wh) @ C @ V
        assert grad.abs().max() < 1e-9 * (W @ C @ V).abs().max()
    # and the whitened start beats the plain decomposition in the whitened norm
    plain = get_format("basis").from_matrix(torch.stack(Ws), INS, OUTS, 6)
    assert whitened_loss(fm, Ws, grams) < whitened_loss(plain, Ws, grams)


def planted_model(seed=0, L=4, d=48, k=10, out=32):
    """``L`` layers whose inputs live near one k-dim subspace, with weights that read it."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, k, dtype=F64, generator=g))[0]
    layers = nn.ModuleList()
    for _ in range(L):
        lin = nn.Linear(d, out, dtype=F64)
        with torch.no_grad():
            # the part in the shared subspace is strong; the rest of the weight is noise
            lin.weight.copy_(torch.randn(out, k, dtype=F64, generator=g) @ basis.T)
            lin.weight.add_(0.3 * torch.randn(out, d, dtype=F64, generator=g))
        layers.append(lin)

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return torch.stack([layer(x) for layer in self.layers])

    data = [
        (
            torch.randn(64, k, dtype=F64, generator=g) @ basis.T * 3
            + 0.1 * torch.randn(64, d, dtype=F64, generator=g),
        )
        for _ in range(6)
    ]
    return Blocks(), data


def output_error(model, reference, data):
    with torch.no_grad():
        y = torch.cat([model(*x) for x in data], 1)
        ref = torch.cat([reference(*x) for x in data], 1)
    return float((y - ref).norm() / ref.norm())


def test_tensorize_joint_basis_shares_one_basis_and_beats_independent_lowrank():
    import copy

    original, data = planted_model()
    results = {}
    for fmt in ("basis", "lowrank"):
        model = copy.deepcopy(original)
        cfg = tz.TensorizeConfig(
            factorization=fmt,
            rank=0.3,
            min_params=0,
            joint=True,
            order=2,
            progress=False,
            calibration_steps=20,
        )
        report = tz.tensorize_(model, cfg, calibration_data=data)
        (row,) = list(report)
        assert row.kind == "joint" and row.factorization == fmt
        results[fmt] = (output_error(model, original, data), row.new_params)
    err_basis, params_basis = results["basis"]
    err_lowrank, params_lowrank = results["lowrank"]
    assert params_basis <= params_lowrank * 1.05  # the same budget
    assert err_basis < 0.8 * err_lowrank, results


def test_budget_over_lowrank_and_basis_picks_basis_for_a_shared_subspace():
    original, data = planted_model(seed=3)
    cfg = tz.TensorizeConfig(
        factorization=("lowrank", "basis"),
        rank=0.3,
        min_params=0,
        joint=True,
        order=2,
        rank_allocation="budget",
        progress=False,
        calibration_steps=5,
    )
    report = tz.tensorize_(original, cfg, calibration_data=data)
    (row,) = list(report)
    assert row.factorization == "basis", row.reason
