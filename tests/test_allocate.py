"""Budgeted rank allocation: budgets met exactly enough, error no worse than a uniform ratio."""

import warnings

import pytest
import torch

from oracles import dense_weight
from tensorized._allocate import allocate_ranks
from tensorized._ranks import RankBudgetWarning, param_count, resolve_rank
from tensorized._shapes import tensorize_shape
from tensorized.formats import FORMATS

F64 = torch.float64
CP_CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
CP_KWARGS = {"n_iter_max": 8}  # short ALS runs are enough for an error curve


def with_spectrum(out, inp, decay, seed, lead=()):
    """A weight ``U diag(s) V^T`` with ``s_j = decay**j``, scaled to unit Frobenius norm."""
    gen = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    U = torch.linalg.qr(torch.randn(*lead, out, k, generator=gen, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(*lead, inp, k, generator=gen, dtype=F64))[0]
    s = decay ** torch.arange(k, dtype=F64)
    W = (U * s) @ V.mT
    return W / W.norm()


def mixed_layers():
    """Layers of different sizes and spectra, one of them a joint group of 2."""
    weights = [
        with_spectrum(64, 64, 0.80, 0),
        with_spectrum(128, 64, 0.97, 1),
        with_spectrum(128, 256, 0.90, 2),
        with_spectrum(64, 64, 0.95, 3, lead=(2,)),
    ]
    modes = [tensorize_shape(W.shape[-1], W.shape[-2], 2) for W in weights]
    return weights, modes


def n_layers(W):
    return W.shape[0] if W.ndim == 3 else 1


def total_params(fmt, ranks, weights, modes):
    """The exact stored parameter count of the formats built at ``ranks``."""
    return sum(
        FORMATS[fmt](i, o, r, n_layers(W)).num_params for r, W, (i, o) in zip(ranks, weights, modes)
    )


def total_error_sq(fmt, ranks, weights, modes):
    """``sum_k ||W_k - What_k||^2`` of actual decompositions at ``ranks``."""
    err = 0.0
    for r, W, (i, o) in zip(ranks, weights, modes):
        W_hat = dense_weight(FORMATS[fmt].from_matrix(W, i, o, r)).detach()
        err += float((W - W_hat).pow(2).sum())
    return err


def tail_sq(W, r):
    """Eckart-Young: the squared error of the best rank-``r`` approximation of ``W``."""
    return float(torch.linalg.svdvals(W)[r:].pow(2).sum())


def best_lowrank_pair(weights, per_rank, budget):
    """Exhaustive search over the rank pairs within 2% of the budget (``per_rank[k]``
    parameters per unit of rank of layer k): the least total squared error."""
    a_max, b_max = (min(W.shape) for W in weights)
    return min(
        tail_sq(weights[0], a) + tail_sq(weights[1], b)
        for a in range(1, a_max + 1)
        for b in range(1, b_max + 1)
        if 0.98 * budget <= per_rank[0] * a + per_rank[1] * b <= budget
    )


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "blocktt", "cp"])
@pytest.mark.parametrize("fraction", [0.15, 0.4])
def test_budget_is_met_within_two_percent(fmt, fraction):
    weights, modes = mixed_layers()
    dense = sum(W.numel() for W in weights)
    budget = round(fraction * dense)
    kwargs = {"candidates": CP_CANDIDATES, "decomposition_kwargs": CP_KWARGS} if fmt == "cp" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankBudgetWarning)
        ranks = allocate_ranks(weights, modes, fmt, budget, **kwargs)
    assert len(ranks) == len(weights)
    for r, W, (i, o) in zip(ranks, weights, modes):  # concrete ranks the format accepts
        assert resolve_rank(fmt, i, o, r, n_layers(W)) == r
    total = total_params(fmt, ranks, weights, modes)
    warned = [w for w in caught if issubclass(w.category, RankBudgetWarning)]
    if fmt == "cp":  # seven coarse candidates: a closer total may cost error, and is warned
        assert total <= 1.02 * budget
        assert bool(warned) == (total < 0.98 * budget)
    else:
        assert not warned
        assert abs(total - budget) <= 0.02 * budget


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "blocktt"])
def test_fast_decaying_spectrum_gets_the_lower_rank(fmt):
    # Same size and norm; the fast one is nearly exact at a low rank, so the parameters go to
    # the flat one. (With 3 modes per side, TT needs full outer bonds even for a low-rank
    # matrix, and the opposite choice can be the better one: the test uses 2 modes.)
    fast = with_spectrum(64, 64, 0.6, 0)
    flat = with_spectrum(64, 64, 0.99, 1)
    modes = [((8, 8), (8, 8))] * 2
    budget = round(0.3 * 2 * 64 * 64)
    r_fast, r_flat = allocate_ranks([fast, flat], modes, fmt, budget)
    p_fast, p_flat = (param_count(fmt, (8, 8), (8, 8), r) for r in (r_fast, r_flat))
    assert p_fast < p_flat
    if fmt == "lowrank":  # exact error curves: the exhaustive optimum over rank pairs
        best = best_lowrank_pair([fast, flat], [129, 129], budget)  # rank r: r * (64 + 64 + 1)
        assert tail_sq(fast, r_fast) + tail_sq(flat, r_flat) == pytest.approx(best)


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "blocktt"])
def test_allocation_beats_the_uniform_ratio_at_the_same_budget(fmt):
    weights, modes = mixed_layers()
    uniform = [resolve_rank(fmt, i, o, 0.25, n_layers(W)) for W, (i, o) in zip(weights, modes)]
    budget = total_params(fmt, uniform, weights, modes)
    ranks = allocate_ranks(weights, modes, fmt, budget)
    assert total_params(fmt, ranks, weights, modes) <= budget  # never more parameters
    ours = total_error_sq(fmt, ranks, weights, modes)
    theirs = total_error_sq(fmt, uniform, weights, modes)
    assert ours <= theirs
    if fmt == "lowrank":  # the curves are exact here: a strict gain on these spectra
        assert ours < theirs


def test_lowrank_allocation_is_optimal_on_a_small_case():
    # Exhaustive search over all rank pairs within 2% of the budget is the oracle.
    weights = [with_spectrum(12, 10, 0.7, 0), with_spectrum(10, 16, 0.9, 1)]
    modes = [((10,), (12,)), ((16,), (10,))]
    budget = 200
    ranks = allocate_ranks(weights, modes, "lowrank", budget)
    best = best_lowrank_pair(weights, [23, 27], budget)
    assert tail_sq(weights[0], ranks[0]) + tail_sq(weights[1], ranks[1]) == pytest.approx(best)


def test_joint_entry_counts_all_its_layers():
    joint = with_spectrum(32, 32, 0.9, 0, lead=(3,))
    single = with_spectrum(32, 32, 0.9, 1)
    modes = [((4, 8), (4, 8))] * 2
    for fmt in ("lowrank", "tucker", "tt", "blocktt"):
        budget = round(0.3 * (joint.numel() + single.numel()))
        ranks = allocate_ranks([joint, single], modes, fmt, budget)
        total = total_params(fmt, ranks, [joint, single], modes)
        assert abs(total - budget) <= 0.02 * budget, fmt


def test_dense_needs_the_dense_budget():
    W = [torch.randn(8, 8)]
    assert allocate_ranks(W, [((8,), (8,))], "dense", 64) == [None]
    with pytest.raises(ValueError, match=r"budget=32 is outside the reachable range \[64, 64\]"):
        allocate_ranks(W, [((8,), (8,))], "dense", 32)


def test_budget_outside_the_reachable_range_raises():
    weights, modes = mixed_layers()
    dense = sum(W.numel() for W in weights)
    smallest = sum(
        param_count("tucker", i, o, (1,) * 4, n_layers(W)) for W, (i, o) in zip(weights, modes)
    )
    with pytest.raises(ValueError, match=rf"budget=10 is outside .*\[{smallest}, {dense}\]"):
        allocate_ranks(weights, modes, "tucker", 10)
    with pytest.raises(
        ValueError, match=rf"budget={dense + 1} is outside .*\[{smallest}, {dense}\]"
    ):
        allocate_ranks(weights, modes, "tucker", dense + 1)


def test_allocate_rejects_bad_arguments():
    W, m = [torch.randn(8, 8)], [((2, 4), (2, 4))]
    with pytest.raises(ValueError, match="unknown factorization 'svd'"):
        allocate_ranks(W, m, "svd", 30)
    with pytest.raises(ValueError, match=r"modes must give one .* got 2 for 1 weights"):
        allocate_ranks(W, m * 2, "tucker", 30)
    with pytest.raises(ValueError, match=r"weights\[0\] must be a floating .* got shape \(8,\)"):
        allocate_ranks([torch.randn(8)], m, "tucker", 30)
    with pytest.raises(ValueError, match=r"modes\[0\]\[0\] \(in_modes\)=\(3, 4\) multiplies"):
        allocate_ranks(W, [((3, 4), (2, 4))], "tucker", 30)
    with pytest.raises(
        ValueError, match=r"'blocktt' pairs each out mode.*as many in modes as out modes"
    ):
        allocate_ranks(W, [((8,), (2, 4))], "blocktt", 30)
    with pytest.raises(ValueError, match=r"candidates must be fractions in \(0, 1\] .* got 1.5"):
        allocate_ranks(W, m, "tucker", 30, candidates=[0.5, 1.5])
    with pytest.raises(TypeError, match="budget must be a number of parameters"):
        allocate_ranks(W, m, "tucker", "30")
    with pytest.raises(TypeError, match="weights must be a non-empty list"):
        allocate_ranks([], [], "tucker", 30)
    with pytest.raises(TypeError, match="decomposition_kwargs must be a mapping"):
        allocate_ranks(W, m, "cp", 30, decomposition_kwargs=[1])


# --------------------------------------------------------------------------- several formats


def _planted():
    """Four 64 x 64 weights on modes (8, 8) x (8, 8), each exactly representable and cheapest
    in one format: its parameters there (the other formats need several times more)."""
    from tensorized._ops import mode_dot

    gen = torch.Generator().manual_seed(0)
    ins = outs = (8, 8)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    lowrank = rnd(64, 3) @ rnd(3, 64)  # matrix rank 3
    core = rnd(2, 2, 2, 2)  # Tucker ranks (2, 2, 2, 2)
    for k in range(4):
        core = mode_dot(core, rnd(8, 2), k)
    tucker = core.reshape(64, 64)
    cores = [rnd(1, 8, 2), rnd(2, 8, 2), rnd(2, 8, 2), rnd(2, 8, 1)]  # TT ranks (2, 2, 2)
    tt = torch.einsum("aob,bpc,cid,dje->opij", *cores).reshape(64, 64)
    a, b = rnd(1, 8, 8, 2), rnd(2, 8, 8, 1)  # TT-matrix rank 2: sum of 2 Kronecker products
    blocktt = torch.einsum("aoib,bpjc->opij", a, b).reshape(64, 64)
    weights = {"lowrank": lowrank, "tucker": tucker, "tt": tt, "blocktt": blocktt}
    return weights, [(ins, outs)] * 4


def test_auto_picks_the_planted_format_of_each_layer():
    from tensorized._allocate import AUTO_FORMATS, allocate_choices

    planted, modes = _planted()
    exact = {"lowrank": 3, "tucker": (2, 2, 2, 2), "tt": (2, 2, 2), "blocktt": (2,)}
    need = sum(
        FORMATS[f].param_count((8, 8), (8, 8), r) for f, r in exact.items()
    )  # 387 + 80 + 96 + 256
    choices = allocate_choices(list(planted.values()), modes, AUTO_FORMATS, need)
    assert [c.factorization for c in choices] == list(planted)
    assert all(c.error == 0.0 for c in choices)  # exact (below the round-off floor)
    for c, name in zip(choices, planted):
        assert f"{name} 0," in c.reason + "," and "error at that share" in c.reason


def test_a_layer_stays_dense_when_that_spends_the_budget_best():
    from tensorized._allocate import allocate_choices

    gen = torch.Generator().manual_seed(1)
    low = torch.randn(64, 2, generator=gen, dtype=F64) @ torch.randn(
        2, 64, generator=gen, dtype=F64
    )
    full = torch.randn(64, 64, generator=gen, dtype=F64)
    budget = FORMATS["lowrank"].param_count((64,), (64,), 2) + 64 * 64
    choices = allocate_choices([low, full], [((64,), (64,))] * 2, ["lowrank"], budget)
    assert [(c.factorization, c.rank) for c in choices] == [("lowrank", 2), ("dense", None)]
    assert choices[1].error == 0.0


def test_output_aware_budget_follows_the_inputs_not_the_weights():
    # Two weights with the same spectrum; the first only ever sees inputs in a 4-dimensional
    # subspace. By weight error they get about the same rank; by output error the first
    # needs at most 4 and the rest of the budget goes to the second.
    from tensorized._allocate import allocate_choices

    W1, W2 = with_spectrum(64, 64, 0.95, 0), with_spectrum(64, 64, 0.95, 1)
    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(4, 64, generator=gen, dtype=F64)
    X1 = torch.randn(512, 4, generator=gen, dtype=F64) @ basis
    X2 = torch.randn(512, 64, generator=gen, dtype=F64)
    grams = [X1.T @ X1 / 512, X2.T @ X2 / 512]
    modes = [((64,), (64,))] * 2
    budget = 24 * FORMATS["lowrank"].param_count((64,), (64,), 1)
    by_weight = allocate_choices([W1, W2], modes, ["lowrank"], budget)
    by_output = allocate_choices([W1, W2], modes, ["lowrank"], budget, grams=grams)
    assert abs(by_weight[0].rank - by_weight[1].rank) <= 1
    assert by_output[0].rank <= 4 < by_output[1].rank
    assert by_output[1].rank > by_weight[1].rank


def test_more_formats_never_gut_a_layer_to_meet_the_budget():
    # A rank-4 layer and a full-rank one, float32 as a model holds them: with TT's curves
    # beside lowrank's, the allocation keeps the rank-4 layer exact and its total error is
    # no higher than lowrank's alone (the budget's 2% range is not bought with error).
    from tensorized._allocate import allocate_choices

    gen = torch.Generator().manual_seed(0)
    low = (torch.randn(64, 4, generator=gen) @ torch.randn(4, 64, generator=gen)) / 8
    full = torch.randn(64, 64, generator=gen) / 8
    X = torch.randn(256, 64, generator=gen)
    H = torch.relu(X @ low.T)
    grams = [(X.T @ X).double() / 256, (H.T @ H).double() / 256]
    modes = [((8, 8), (8, 8))] * 2
    alone = allocate_choices([low, full], modes, ["lowrank"], 2048, grams=grams)
    both = allocate_choices([low, full], modes, ["lowrank", "tt"], 2048, grams=grams)
    assert both[0].error == 0.0
    assert sum(c.error for c in both) <= sum(c.error for c in alone) + 1e-12


def test_allocate_choices_rejects_bad_formats():
    from tensorized._allocate import allocate_choices

    W = torch.randn(16, 16, dtype=F64)
    with pytest.raises(ValueError, match="distinct formats"):
        allocate_choices([W], [((4, 4), (4, 4))], ["tt", "TT"], 100)
    with pytest.raises(ValueError, match="unknown factorization"):
        allocate_choices([W], [((4, 4), (4, 4))], ["nope"], 100)
    with pytest.raises(ValueError, match="none of the formats"):
        allocate_choices([W], [((16,), (4, 4))], ["blocktt"], 100)


def test_importance_moves_the_budget_to_the_layer_that_matters():
    from tensorized._allocate import allocate_choices

    W1, W2 = with_spectrum(64, 64, 0.95, 0), with_spectrum(64, 64, 0.95, 1)
    modes = [((64,), (64,))] * 2
    budget = 24 * FORMATS["lowrank"].param_count((64,), (64,), 1)
    even = allocate_choices([W1, W2], modes, ["lowrank"], budget)
    tilted = allocate_choices([W1, W2], modes, ["lowrank"], budget, importance=[10.0, 1.0])
    assert abs(even[0].rank - even[1].rank) <= 1
    assert tilted[0].rank > even[0].rank and tilted[1].rank < even[1].rank
