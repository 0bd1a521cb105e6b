"""Calibration: recorded inputs against manual hooks, fitted layers against float64 oracles."""

import copy
import warnings

import pytest
import torch
from torch import nn

import tensorized as tz
from tensorized._calibrate import CalibrationResult, calibrate
from tensorized._record import record_inputs
from tensorized._statistics import InputStatistics, holdout_split

F64 = torch.float64
RANK = {"cp": 0.15, "tucker": 0.3, "tt": 0.3, "blocktt": 0.3, "lowrank": 0.3}


def anisotropic(n, d, decay=0.85, seed=0, dtype=F64):
    """Rows ``Z @ A`` whose covariance has a geometrically decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=F64) * decay ** torch.arange(d, dtype=F64)[:, None]
    return (torch.randn(n, d, generator=gen, dtype=F64) @ A).to(dtype)


def oracle_error(layer, W, b, X, index=0):
    """``||X W^T + b - layer(X)|| / ||X W^T + b||`` in float64."""
    with torch.no_grad():
        Y = X.to(F64) @ W.to(F64).T + b.to(F64)
        Y_hat = layer(X.to(layer.bias.dtype), index).to(F64)
    return float((Y - Y_hat).norm() / Y.norm())


# --------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("fmt", list(RANK))
def test_calibration_reduces_held_out_output_error(fmt):
    src = nn.Linear(64, 48, dtype=F64)
    W, b = src.weight.detach(), src.bias.detach()
    X = anisotropic(512, 64)
    layer = tz.FactorizedLinear.from_linear(src, (8, 8), (6, 8), RANK[fmt], factorization=fmt)
    start = copy.deepcopy(layer)
    result = calibrate(layer, [W], [b], [X], steps=100)
    _, held = holdout_split(512, 0.25, seed=0)
    assert isinstance(result, CalibrationResult)
    assert result.before[0] == pytest.approx(oracle_error(start, W, b, X[held]), rel=1e-9)
    assert result.after[0] == pytest.approx(oracle_error(layer, W, b, X[held]), rel=1e-9)
    assert result.after[0] < result.before[0]
    assert layer.rank == start.rank  # same format and parameter count, only values change
    assert 0 <= result.steps <= 100


def test_lowrank_whitened_start_is_exact_when_inputs_span_few_directions():
    # Inputs in a 5-dim subspace: every output is exactly reproducible at rank 6, although the
    # rank-6 weight error is large. The whitened SVD (SVD-LLM) finds it without any step.
    src = nn.Linear(40, 30, dtype=F64)
    W, b = src.weight.detach(), src.bias.detach()
    X = torch.randn(300, 5, dtype=F64) @ torch.randn(5, 40, dtype=F64) + 0.5
    layer = tz.FactorizedLinear.from_linear(src, rank=6, factorization="lowrank")
    result = calibrate(layer, [W], [b], [X], steps=50)
    # before: the plain rank-6 truncated SVD (Eckart-Young, from torch's SVD) on held-out rows
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W6 = (U[:, :6] * S[:6]) @ Vh[:6]
    _, held = holdout_split(300, 0.25, seed=0)
    Y, Y6 = X[held] @ W.T + b, X[held] @ W6.T + b
    assert result.before[0] == pytest.approx(float((Y - Y6).norm() / Y.norm()), rel=1e-9)
    assert result.after[0] < 1e-10  # exact up to float64 rounding
    assert result.steps == 0  # the closed form is optimal: no refinement


def test_joint_layers_are_fitted_together():
    sources = [nn.Linear(32, 24, dtype=F64) for _ in range(3)]
    layer = tz.FactorizedLinear.from_linear_list(sources, (4, 8), (4, 6), 0.3, factorization="tt")
    W = [s.weight.detach() for s in sources]
    b = [s.bias.detach() for s in sources]
    X = [anisotropic(256, 32, seed=k) for k in range(3)]
    result = calibrate(layer, W, b, X, steps=80)
    _, held = holdout_split(256, 0.25, seed=0)
    assert len(result.before) == len(result.after) == 3
    for i in range(3):
        assert result.after[i] <= result.before[i]
        assert result.after[i] == pytest.approx(oracle_error(layer, W[i], b[i], X[i][held], i))
    assert sum(result.after) < sum(result.before)


def test_calibration_restores_flags_and_leaves_no_gradients():
    src = nn.Linear(32, 16)
    layer = tz.FactorizedLinear.from_linear(src, (4, 8), (4, 4), 0.4, factorization="tucker")
    layer.bias.requires_grad_(False)  # a frozen parameter stays frozen
    layer.train()
    X = anisotropic(128, 32, dtype=torch.float32)
    result = calibrate(layer, [src.weight], [src.bias], [X], steps=20)
    assert result.after[0] <= result.before[0]
    assert layer.training
    assert not layer.bias.requires_grad
    assert all(p.requires_grad for p in layer.weight.parameters())
    assert all(p.grad is None for p in layer.parameters())
    assert all(p.dtype == torch.float32 for p in layer.parameters())


def test_half_precision_layer_is_fitted_through_float32():
    src = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = tz.FactorizedLinear.from_linear(src, (4, 8), (4, 4), (4,), factorization="blocktt")
    X = anisotropic(256, 32, dtype=torch.bfloat16)
    result = calibrate(layer, [src.weight], [src.bias], [X], steps=40)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert result.after[0] < result.before[0]


def test_never_worse_and_zero_steps():
    src = nn.Linear(16, 12, dtype=F64)
    layer = tz.FactorizedLinear.from_linear(src, (4, 4), (3, 4), 0.5, factorization="cp")
    X = torch.randn(6, 16, dtype=F64)  # too few rows to learn anything reliable
    for steps in (0, 30):
        result = calibrate(layer, [src.weight.detach()], [src.bias.detach()], [X], steps=steps)
        assert all(a <= b for a, b in zip(result.after, result.before))
    assert calibrate(layer, [src.weight], [None], [X], steps=0).steps == 0


def test_holdout_split_is_a_seeded_partition():
    fit, held = holdout_split(1000, 0.3, seed=1)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(1000))
    assert abs(len(held) - 300) <= 5  # a low-discrepancy sequence: close to the fraction
    again = holdout_split(1000, 0.3, seed=1)
    assert torch.equal(again[1], held)
    assert not torch.equal(holdout_split(1000, 0.3, seed=2)[1], held)
    assert len(holdout_split(2, 0.01)[1]) == 1 and len(holdout_split(2, 0.99)[0]) == 1
    # a prefix of the rows is split as in the whole: the split streams
    assert torch.equal(holdout_split(400, 0.3, seed=1)[1], held[held < 400])


def test_streamed_statistics_are_the_sums_over_the_split_rows():
    gen = torch.Generator().manual_seed(0)
    X, S = torch.randn(300, 5, generator=gen, dtype=F64), torch.randn(300, 5, generator=gen)
    fit, held = holdout_split(300, 0.25, seed=3)
    streamed = InputStatistics(5, torch.device("cpu"), paired=True, holdout=0.25, seed=3)
    for rows in (slice(0, 1), slice(1, 77), slice(77, 300)):  # any batching
        streamed.add(X[rows], S[rows])
    ones = torch.ones(300, 1, dtype=F64)
    Xa, Sa = torch.cat([X, ones], 1), torch.cat([S.double(), ones], 1)
    for moments, rows in ((streamed.fit, fit), (streamed.held, held)):
        assert moments.n == len(rows)
        for got, A, B in ((moments.xx, Xa, Xa), (moments.xs, Xa, Sa), (moments.ss, Sa, Sa)):
            want = torch.einsum("ni,nj->ij", A[rows], B[rows])
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the squared output error over the held-out rows, from the sums and from the rows
    W_hat, b_hat = torch.randn(4, 5, dtype=F64), torch.randn(4, dtype=F64)
    W, b = torch.randn(4, 5, dtype=F64), torch.randn(4, dtype=F64)
    direct = (X[held] @ W_hat.T + b_hat - (S[held].double() @ W.T + b)).pow(2).sum()
    assert streamed.held.squared_error(W_hat, b_hat, W, b) == pytest.approx(float(direct))


def test_calibrate_rejects_bad_arguments():
    src = nn.Linear(16, 12)
    layer = tz.FactorizedLinear.from_linear(src, (4, 4), (3, 4), 0.5, factorization="tucker")
    W, b, X = src.weight, src.bias, torch.randn(20, 16)
    with pytest.raises(TypeError, match="layer must be a FactorizedLinear"):
        calibrate(src, [W], [b], [X])
    with pytest.raises(ValueError, match=r"weights must be a list .*n_layers=1.*length 2"):
        calibrate(layer, [W, W], [b], [X])
    with pytest.raises(ValueError, match=r"weights\[0\] must be .*\(12, 16\), got \(16, 12\)"):
        calibrate(layer, [W.T], [b], [X])
    with pytest.raises(ValueError, match=r"biases\[0\] must be None or .*\(12,\)"):
        calibrate(layer, [W], [b[:3]], [X])
    with pytest.raises(ValueError, match=r"inputs\[0\] must be .*at least 2 rows.*\(1, 16\)"):
        calibrate(layer, [W], [b], [X[:1]])
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a finite"):
        calibrate(layer, [W], [b], [X * float("nan")])
    with pytest.raises(ValueError, match="steps must be an int >= 0, got -1"):
        calibrate(layer, [W], [b], [X], steps=-1)
    with pytest.raises(ValueError, match=r"lr must be None .* got 0"):
        calibrate(layer, [W], [b], [X], lr=0)
    with pytest.raises(ValueError, match=r"holdout must be a fraction in \(0, 1\), got 1.5"):
        calibrate(layer, [W], [b], [X], holdout=1.5)


# --------------------------------------------------------------------------- record_inputs


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y=None):
        out = self.a(x)
        return out if y is None else out + self.b(y)


def manual_inputs(model, modules, batches):
    """Inputs seen by ``modules``, recorded by plain forward hooks (the oracle)."""
    seen = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0].clone()))
        for n, m in modules.items()
    ]
    with torch.no_grad():
        for item in batches:
            if isinstance(item, dict):
                model(**item)
            elif isinstance(item, tuple):
                model(*item)
            else:
                model(item)
    for h in handles:
        h.remove()
    return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def test_record_inputs_returns_exactly_the_rows_seen():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    modules = {"first": model[0], "last": model[2]}
    batches = [torch.randn(5, 6), torch.randn(3, 2, 6), torch.randn(1, 6)]  # 3-D is flattened
    recorded = record_inputs(model, modules, batches)
    expected = manual_inputs(model, modules, batches)
    for name in modules:
        assert torch.equal(recorded[name], expected[name])
    assert recorded["first"].shape == (12, 6) and recorded["last"].shape == (12, 8)


def test_record_inputs_tuple_and_dict_batches():
    model = TwoInputs()
    modules = {"a": model.a, "b": model.b}
    batches = [
        (torch.randn(4, 6), torch.randn(4, 3)),
        {"x": torch.randn(2, 5, 6), "y": torch.randn(2, 5, 3)},
        [torch.randn(3, 6)],  # a list is positional too; b does not run
    ]
    recorded = record_inputs(model, modules, batches)
    expected = manual_inputs(model, modules, [batches[0], batches[1], tuple(batches[2])])
    for name in modules:
        assert torch.equal(recorded[name], expected[name])
    assert recorded["a"].shape == (17, 6) and recorded["b"].shape == (14, 3)


def test_subsampling_is_uniform_seeded_and_in_order():
    model = nn.Linear(4, 2)
    batches = [torch.randn(50, 4) for _ in range(8)]
    stream = torch.cat(batches)
    got = record_inputs(model, {"lin": model}, batches, max_rows=64, seed=3)["lin"]
    assert got.shape == (64, 4)
    # every kept row is a row of the stream, each at most once, in stream order
    positions = [int((stream == row).all(1).nonzero()) for row in got]
    assert positions == sorted(set(positions))
    assert positions[-1] > 64  # not just the first rows
    same = record_inputs(model, {"lin": model}, batches, max_rows=64, seed=3)["lin"]
    other = record_inputs(model, {"lin": model}, batches, max_rows=64, seed=4)["lin"]
    assert torch.equal(got, same)
    assert not torch.equal(got, other)


def test_hooks_removed_and_modes_restored_when_the_model_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            if x.shape[0] == 7:
                raise RuntimeError("bad batch")
            return self.head(self.lin(x))

    model = Fails().train()
    model.head.eval()  # a per-module flag, restored as it was
    with pytest.raises(RuntimeError, match="bad batch"):
        record_inputs(model, {"lin": model.lin}, [torch.randn(3, 4), torch.randn(7, 4)])
    assert not model.lin._forward_pre_hooks and not model.lin._forward_hooks
    assert model.training and model.lin.training and not model.head.training


def test_record_inputs_module_that_never_ran():
    model = TwoInputs()
    recorded = record_inputs(model, {"b": model.b}, [torch.randn(2, 6)])
    assert recorded["b"].shape == (0, 3)


def test_record_inputs_keeps_a_copy_and_the_layer_dtype():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=F64)

        def forward(self, x):
            y = self.lin(x)
            x.mul_(0)  # later code changes the activation in place
            return y

    x = torch.ones(2, 3, dtype=F64)
    model = InPlace()
    recorded = record_inputs(model, {"lin": model.lin}, [x.clone()])
    assert torch.equal(recorded["lin"], x) and recorded["lin"].dtype == F64


def test_record_inputs_rejects_bad_arguments():
    model = nn.Linear(4, 2)
    mods = {"lin": model}
    with pytest.raises(TypeError, match=r"calibration_data must be an iterable .* got int"):
        record_inputs(model, mods, 5)
    with pytest.raises(TypeError, match=r"got a single Tensor; wrap one batch in a list"):
        record_inputs(model, mods, torch.randn(3, 4))
    with pytest.raises(ValueError, match="calibration_data is empty"):
        record_inputs(model, mods, [])
    with pytest.raises(TypeError, match=r"calibration_data\[1\] must be a Tensor .* got float"):
        record_inputs(model, mods, [torch.randn(2, 4), 1.5])
    with pytest.raises(ValueError, match="max_rows must be an int >= 1, got 0"):
        record_inputs(model, mods, [torch.randn(2, 4)], max_rows=0)
    with pytest.raises(TypeError, match=r"modules must be a mapping of str names to nn\.Module"):
        record_inputs(model, [model], [torch.randn(2, 4)])
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        record_inputs(lambda x: x, mods, [torch.randn(2, 4)])


# --------------------------------------------------------------------------- sequential


def test_sources_fit_the_original_outputs_from_the_shifted_inputs():
    # X = S M^T exactly (M invertible): the layer that maps X to the original outputs
    # S W^T + b is W M^{-1} (the ridge, ~1e-7 of the variance here, barely moves it).
    torch.manual_seed(0)
    n, d = 4096, 8
    S = torch.randn(n, d, dtype=F64)
    M = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, dtype=F64)
    W, b = torch.randn(6, d, dtype=F64), torch.randn(6, dtype=F64)
    layer = tz.FactorizedLinear(d, 6, factorization="dense", rank="same", dtype=F64)
    res = tz.calibrate(layer, [W], [b], [S @ M.T], sources=[S])
    torch.testing.assert_close(
        layer.weight.to_matrix(), W @ torch.linalg.inv(M), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(layer.bias, b, rtol=1e-4, atol=1e-5)
    assert res.after[0] < 1e-4 < res.before[0]
    with pytest.raises(ValueError, match=r"sources\[0\] must be a tensor shaped like inputs\[0\]"):
        tz.calibrate(layer, [W], [b], [S], sources=[S[:10]])


class Chain(nn.Module):
    """a -> tanh -> b, registered in the opposite order (b first) to the forward order."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(16, 16)
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _output_error(model, ref, x):
    with torch.no_grad():
        return float((model(x) - ref).norm() / ref.norm())


def test_sequential_calibration_fits_later_layers_to_the_original_outputs():
    torch.manual_seed(0)
    original = Chain().double()
    x_cal, x_test = torch.randn(2048, 16, dtype=F64), torch.randn(512, 16, dtype=F64)
    with torch.no_grad():
        ref = original(x_test)
    errors, models = {}, {}
    for mode in ("independent", "sequential"):
        model = copy.deepcopy(original)
        cfg = tz.TensorizeConfig(
            factorization="lowrank", rank=4, min_params=0, calibration_mode=mode, progress=False
        )
        tz.tensorize_(model, cfg, calibration_data=list(x_cal.split(256)))
        errors[mode], models[mode] = _output_error(model, ref, x_test), model
    # layer a is fitted first in both modes (forward order), on the same inputs
    torch.testing.assert_close(
        models["sequential"].a.weight.to_matrix(), models["independent"].a.weight.to_matrix()
    )
    assert errors["sequential"] < errors["independent"], errors
    # b was fitted on what the compressed a feeds it, to what the original b gave
    with torch.no_grad():
        shifted = torch.tanh(models["sequential"].a(x_cal))
        exact = tz.FactorizedLinear.from_linear(original.b, factorization="lowrank", rank=4)
        tz.calibrate(exact, [original.b.weight], [original.b.bias], [shifted],
                     sources=[torch.tanh(original.a(x_cal))])  # fmt: skip
    torch.testing.assert_close(
        models["sequential"].b.weight.to_matrix(), exact.weight.to_matrix(), rtol=1e-8, atol=1e-8
    )


def test_sequential_target_is_the_ridge_regression_on_the_shifted_inputs():
    # A hand-computed oracle for the second layer of a -> tanh -> b: its fit rows are those
    # of holdout_split over the whole stream (however it is batched), its inputs those the
    # compressed a feeds it, its targets the original b on the original inputs; the target
    # weight is the ridge regression W* and lowrank's optimum in the fit rows' norm keeps
    # the leading eigenvectors of W* G W*^T, with the least-squares bias.
    torch.manual_seed(1)
    original = Chain().double()
    x = torch.randn(1500, 16, dtype=F64)
    model = copy.deepcopy(original)
    cfg = tz.TensorizeConfig(factorization="lowrank", rank=4, min_params=0, progress=False)
    tz.tensorize_(model, cfg, calibration_data=list(x.split(160)))
    with torch.no_grad():
        X, S = torch.tanh(model.a(x)), torch.tanh(original.a(x))
    fit, _ = holdout_split(1500, 0.25, seed=0)
    W, b = original.b.weight.detach(), original.b.bias.detach()
    Xf, Yf = X[fit], S[fit] @ W.T + b
    Xc, Yc = Xf - Xf.mean(0), Yf - Yf.mean(0)
    G = Xc.T @ Xc
    ridge = 0.1 * min(1.0, 16 / len(fit)) ** 2 * float(G.diagonal().mean())
    W_star = (Yc.T @ Xc + ridge * W) @ torch.linalg.inv(G + ridge * torch.eye(16, dtype=F64))
    _, vecs = torch.linalg.eigh(W_star @ G @ W_star.T)
    U = vecs[:, -4:]
    W_hat = U @ U.T @ W_star
    b_hat = Yf.mean(0) - W_hat @ Xf.mean(0)
    torch.testing.assert_close(model.b.weight.to_matrix(), W_hat, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(model.b.bias.detach(), b_hat, rtol=1e-7, atol=1e-9)


def test_calibration_runs_the_model_only_as_far_as_the_layer_fitted():
    class Tail(nn.Module):
        calls = 0

        def forward(self, x):
            Tail.calls += 1
            return x.sum(-1)

    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), Tail())
    cfg = tz.TensorizeConfig(factorization="lowrank", rank=4, min_params=0, progress=False)
    report = tz.tensorize_(model, cfg, calibration_data=[torch.randn(64, 16) for _ in range(4)])
    assert all(row.output_error_after <= row.output_error_before for row in report)
    assert Tail.calls == 1  # once, to count the calls of each layer; never in a fitting pass


def test_a_layer_called_on_other_rows_after_compression_is_fitted_on_the_originals():
    class Gate(nn.Module):
        """b runs on the rows where a's first output is positive: a compressed a selects
        other rows, which cannot be paired with the original ones."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.tanh(h[h[:, 0] > 0]))

    torch.manual_seed(0)
    original = Gate().double()
    data = [torch.randn(128, 16, dtype=F64) for _ in range(4)]
    fitted = {}
    for mode in ("sequential", "independent"):
        model = copy.deepcopy(original)
        cfg = tz.TensorizeConfig(
            factorization="lowrank", rank=4, min_params=0, calibration_mode=mode, progress=False
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tz.tensorize_(model, cfg, calibration_data=data)
        fitted[mode] = model.b.weight.to_matrix()
        warned = [str(w.message) for w in caught if "do not match" in str(w.message)]
        assert len(warned) == (mode == "sequential") and "'b'" in "".join(warned or ["'b'"])
    torch.testing.assert_close(fitted["sequential"], fitted["independent"], rtol=1e-10, atol=1e-12)


def test_sequential_calibration_reads_a_one_shot_stream_once():
    torch.manual_seed(0)
    model = Chain()
    batches = [torch.randn(64, 16) for _ in range(4)]
    taken = []

    def stream():
        for k, batch in enumerate(batches):
            taken.append(k)
            yield batch

    cfg = tz.TensorizeConfig(factorization="lowrank", rank=4, min_params=0, progress=False)
    report = tz.tensorize_(model, cfg, calibration_data=stream())
    assert taken == [0, 1, 2, 3]  # read once, replayed for the second layer
    assert all(row.output_error_after <= row.output_error_before for row in report)


# --------------------------------------------------------------------------- Kronecker start


def _kron_gram(modes, seed=0):
    """A Kronecker-product covariance over ``modes`` and its factors (each well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for n in modes:
        A = torch.randn(n, n, generator=gen, dtype=F64)
        factors.append(A @ A.T + 0.5 * torch.eye(n, dtype=F64))
    C = factors[0]
    for c in factors[1:]:
        C = torch.kron(C, c)
    return C, factors


def _root(C):
    lam, vecs = torch.linalg.eigh(C)
    return (vecs * lam.sqrt()) @ vecs.T, (vecs / lam.sqrt()) @ vecs.T


def test_kronecker_factors_recover_a_kronecker_product():
    from tensorized._ops import kronecker_factors

    C, factors = _kron_gram((3, 4, 2))
    got = kronecker_factors(C, (3, 4, 2))
    for g, c in zip(got, factors):  # equal up to scale: compare normalized
        torch.testing.assert_close(g / g.norm(), c / c.norm(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize(
    ("fmt", "rank"), [("tucker", (2, 3, 2, 3, 2, 2)), ("tt", 3), ("blocktt", 3)]
)
def test_kronecker_whitened_start_is_the_whitened_decomposition(fmt, rank, n_layers):
    # Oracle: the full whitening S = C^{1/2} (a 24 x 24 matrix, not per mode), the format's
    # plain decomposition of W S (deterministic SVD-based for these formats), times S^{-1}.
    from tensorized.formats import FORMATS

    ins, outs = (3, 4, 2), (2, 5, 3)
    C, _ = _kron_gram(ins)
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(n_layers, 30, 24, generator=gen, dtype=F64)
    W = W if n_layers > 1 else W[0]
    S, S_inv = _root(C)
    oracle = FORMATS[fmt].from_matrix(W @ S, ins, outs, rank)
    fm = FORMATS[fmt](ins, outs, rank, n_layers, dtype=F64)
    assert fm.fit_kronecker_whitened(W, C)
    for i in range(n_layers):
        layer = i if n_layers > 1 else None
        expected = oracle.to_matrix(layer).detach() @ S_inv
        torch.testing.assert_close(fm.to_matrix(layer).detach(), expected, rtol=1e-8, atol=1e-8)


def _correlated_gram(n, seed=0):
    """A covariance with correlations across all in modes (not a Kronecker product)."""
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=F64)


def test_tt_whitened_fit_with_full_side_bonds_is_the_whitened_svd():
    # Oracle: SVD-LLM's whitened truncated SVD at the middle rank (SVD of W S, S = C^{1/2},
    # rank 5, times S^{-1}); TT with full out-side and in-side bonds carries exactly that.
    from tensorized.formats import FORMATS

    ins, outs = (3, 4, 2), (2, 5, 3)
    C = _correlated_gram(24)
    W = torch.randn(30, 24, generator=torch.Generator().manual_seed(1), dtype=F64)
    S, S_inv = _root(C)
    U, s, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    expected = (U[:, :5] * s[:5]) @ Vh[:5] @ S_inv
    fm = FORMATS["tt"](ins, outs, (2, 10, 5, 8, 2), dtype=F64)
    assert fm.fit_closed_form(None, W, C)
    torch.testing.assert_close(fm.to_matrix().detach(), expected, rtol=1e-9, atol=1e-9)


def test_tt_output_curve_is_the_error_its_fit_attains():
    # W S is near a rank-5 matrix for a non-separable C. The budget of ranks (2, 10, 5, 8, 2)
    # (full side bonds) is spent on them, and the output-aware curve's error there is the
    # relative output error that the whitened fit attains (a Kronecker-whitened curve
    # measures another norm).
    from tensorized._allocate import allocate_choices
    from tensorized.formats import FORMATS

    ins, outs, rank = (3, 4, 2), (2, 5, 3), (2, 10, 5, 8, 2)
    C = _correlated_gram(24, seed=3)
    _, S_inv = _root(C)
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(30, 5, generator=gen, dtype=F64) @ torch.randn(5, 24, generator=gen, dtype=F64)
    W = (W + 0.05 * torch.randn(30, 24, generator=gen, dtype=F64)) @ S_inv
    budget = FORMATS["tt"].param_count(ins, outs, rank)
    (choice,) = allocate_choices([W], [(ins, outs)], ["tt"], budget, grams=[C])
    assert choice.rank == rank
    fm = FORMATS["tt"](ins, outs, rank, dtype=F64)
    assert fm.fit_closed_form(None, W, C)
    E = fm.to_matrix().detach() - W
    attained = float(((E @ C) * E).sum() / ((W @ C) * W).sum())
    assert choice.error == pytest.approx(attained, rel=1e-6)


def test_tucker_whitened_start_recovers_a_planted_tucker_weight():
    # W = core x factors exactly (ranks (2, 3, 2, 2, 3, 2)), inputs correlated across modes:
    # the out subspaces of W S, the in subspaces of the Kronecker-whitened W and the
    # least-squares core reproduce W.
    from tensorized.formats import FORMATS

    ins, outs, rank = (3, 4, 2), (2, 5, 3), (2, 3, 2, 2, 3, 2)
    gen = torch.Generator().manual_seed(5)
    core = torch.randn(*rank, generator=gen, dtype=F64)
    factors = [torch.randn(n, r, generator=gen, dtype=F64) for n, r in zip(outs + ins, rank)]
    T = torch.einsum("abcdef,oa,pb,qc,id,je,kf->opqijk", core, *factors)
    W = T.reshape(30, 24)
    C = _correlated_gram(24, seed=6)
    fm = FORMATS["tucker"](ins, outs, rank, dtype=F64)
    assert fm.fit_closed_form(None, W, C)
    torch.testing.assert_close(fm.to_matrix().detach(), W, rtol=1e-8, atol=1e-8)


def test_tucker_whitened_core_solves_the_normal_equations():
    # For the factors it chose, the core is the least-squares one in the whitened norm:
    # U^T (W - What) C V = 0, with U, V the Kronecker products of the out and in factors.
    from tensorized.formats import FORMATS

    ins, outs, rank = (3, 4, 2), (2, 5, 3), (2, 3, 2, 2, 3, 2)
    W = torch.randn(30, 24, generator=torch.Generator().manual_seed(7), dtype=F64)
    C = _correlated_gram(24, seed=8)
    fm = FORMATS["tucker"](ins, outs, rank, dtype=F64)
    assert fm.fit_closed_form(None, W, C)
    f = [x.detach() for x in fm.factors]
    U = torch.einsum("ai,bj,ck->abcijk", f[0], f[1], f[2]).reshape(30, 12)
    V = torch.einsum("ai,bj,ck->abcijk", f[3], f[4], f[5]).reshape(24, 12)
    residual = U.T @ (W - fm.to_matrix().detach()) @ C @ V
    assert float(residual.abs().max()) <= 1e-10 * float((U.T @ W @ C @ V).abs().max())


def test_kronecker_whitened_cp_beats_the_plain_decomposition_in_the_whitened_norm():
    from tensorized.formats import FORMATS

    ins, outs = (3, 4, 2), (2, 5, 3)
    C, _ = _kron_gram(ins)
    W = torch.randn(30, 24, generator=torch.Generator().manual_seed(2), dtype=F64)

    def loss(fm):
        E = fm.to_matrix().detach() - W
        return float(((E @ C) * E).sum())

    fm = FORMATS["cp"](ins, outs, 6, dtype=F64)
    assert fm.fit_kronecker_whitened(W, C)
    assert loss(fm) < loss(FORMATS["cp"].from_matrix(W, ins, outs, 6))


def test_formats_without_per_mode_factors_decline_the_kronecker_start():
    from tensorized.formats import FORMATS

    fm = FORMATS["lowrank"]((4, 6), (4, 6), 3, dtype=F64)
    before = [p.detach().clone() for p in fm.parameters()]
    assert not fm.fit_kronecker_whitened(torch.randn(24, 24, dtype=F64), torch.eye(24, dtype=F64))
    assert all(torch.equal(a, p) for a, p in zip(before, fm.parameters()))


@pytest.mark.parametrize("fmt", ["tucker", "tt", "blocktt", "cp"])
def test_calibration_start_uses_the_kronecker_whitening_of_separable_inputs(fmt):
    # Inputs with a separable covariance across the in modes: the whitened start alone
    # (steps=0) must beat the weight-only decomposition on held-out outputs.
    ins, outs = (4, 4, 4), (4, 4, 4)
    _, factors = _kron_gram(ins, seed=3)
    A = factors[0] @ factors[0]
    for c in factors[1:]:
        A = torch.kron(A, c @ c)  # strongly anisotropic, Kronecker-structured
    X = torch.randn(2048, 64, generator=torch.Generator().manual_seed(4), dtype=F64) @ A
    src = nn.Linear(64, 64, dtype=F64)
    W, b = src.weight.detach(), src.bias.detach()
    layer = tz.FactorizedLinear.from_linear(src, ins, outs, RANK[fmt], factorization=fmt)
    plain = copy.deepcopy(layer)
    with torch.no_grad():  # the plain start's best bias (least squares over all rows)
        W_plain = plain.weight.to_matrix()
        plain.bias.copy_(b + (X @ (W - W_plain).T).mean(0))
    calibrate(layer, [W], [b], [X], steps=0)
    assert oracle_error(layer, W, b, X) < oracle_error(plain, W, b, X)


# --------------------------------------------------------------------------- padding


class _Tokens(nn.Module):
    """A tiny 'encoder' called like a Hugging Face model: ``model(input_ids, attention_mask)``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6, dtype=F64)
        self.proj = nn.Linear(6, 4, dtype=F64)

    def forward(self, input_ids, attention_mask):
        return {"last_hidden_state": self.proj(self.embed(input_ids))}


def test_record_inputs_leaves_out_padding_rows():
    model = _Tokens()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = record_inputs(model, {"proj": model.proj}, [{"input_ids": ids, "attention_mask": mask}])
    expected = model.embed.weight[torch.tensor([1, 2, 3, 4, 5])].detach()  # the real tokens
    torch.testing.assert_close(got["proj"], expected)
    # no mask (positional call): every row
    plain = record_inputs(model, {"proj": model.proj}, [(ids, mask)])
    assert plain["proj"].shape == (8, 6)


def test_distill_ignores_padding_positions():
    teacher = _Tokens()
    student = copy.deepcopy(teacher)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]] * 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]] * 4)
    with torch.no_grad():  # the student differs from the teacher only at the padding token
        student.embed.weight[0] += 1.0
    data = [{"input_ids": ids, "attention_mask": mask}] * 4
    report = tz.distill_(student, teacher, data, epochs=1, train="all", progress=False)
    assert report.before == 0.0
    unmasked = [{"input_ids": ids, "attention_mask": torch.ones_like(mask)}] * 4
    assert tz.distill_(copy.deepcopy(student), teacher, unmasked, epochs=1, train="all",
                       progress=False).before > 0.0  # fmt: skip
