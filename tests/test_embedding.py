"""FactorizedEmbedding against float64 oracles: tables rebuilt from the factor definitions
with ``torch.einsum`` (``oracles.dense_weight``), never with the library's own helpers."""

import inspect
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tensorized as tz
from oracles import dense_weight
from tensorized import _embedding
from tensorized.formats import FORMATS

F64 = torch.float64
FORMAT_NAMES = sorted(FORMATS)


def _rank(name):
    return "same" if FORMATS[name].rank_kind == "none" else 0.5


def _table(name, num=60, dim=12, n_layers=1, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tz.RankBudgetWarning)
        return tz.FactorizedEmbedding(
            num,
            dim,
            n_tensorized_modes=2,
            factorization=name,
            rank=kw.pop("rank", _rank(name)),
            n_layers=n_layers,
            dtype=F64,
            **kw,
        )


def _full_rank(name, emb_modes):
    """The rank at which format ``name`` holds any table of these modes exactly."""
    rows, cols = emb_modes
    caps = tz.rank_caps(name, cols, rows)
    return "same" if FORMATS[name].rank_kind == "none" else caps if len(caps) > 1 else caps[0]


def _oracle_rows(emb, x, layer=0):
    """Rows ``x`` of the einsum-built table of layer ``layer``."""
    n = emb.weight.n_layers
    table = dense_weight(emb.weight, layer if n > 1 else None)
    return table[x]


# ---------------------------------------------------------------- lookups


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("num", [60, 59])  # 59 is prime: the vocabulary is padded
@pytest.mark.parametrize("implementation", ["auto", "rows", "reconstructed"])
def test_lookup_equals_oracle_rows(name, n_layers, num, implementation):
    emb = _table(name, num, n_layers=n_layers, implementation=implementation)
    x = torch.randint(0, num, (3, 7))
    x[0, :3] = x[1, 4]  # duplicates
    x[2, 0] = num - 1
    for layer in range(n_layers):
        y = emb(x, layer)
        assert y.shape == (3, 7, 12)
        torch.testing.assert_close(y, _oracle_rows(emb, x, layer), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            emb.to_embedding(layer).weight,
            dense_weight(emb.weight, layer)[:num].to(F64)
            if n_layers > 1
            else dense_weight(emb.weight)[:num],
        )


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_many_rows_take_the_grouped_and_chunked_paths(name, monkeypatch):
    # 500 distinct rows of a (8, 8, 8) vocabulary: more rows than slices per mode, so the
    # train formats group rows by slice; a tiny chunk bound splits the lookup as well.
    emb = tz.FactorizedEmbedding(
        512, 24, n_tensorized_modes=3, factorization=name, rank=_rank(name), dtype=F64
    )
    emb.implementation = "rows"
    x = torch.randperm(512)[:500]
    expected = _oracle_rows(emb, x)
    torch.testing.assert_close(emb(x), expected, rtol=1e-10, atol=1e-12)
    _embedding._plan.cache_clear()
    monkeypatch.setattr(_embedding, "CHUNK_NUMEL", 64)
    torch.testing.assert_close(emb(x), expected, rtol=1e-10, atol=1e-12)
    _embedding._plan.cache_clear()


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", [1, 2])
def test_single_and_few_row_lookups_equal_the_oracle(name, n_layers):
    # One CPU index: digits on the host, views of the factor slices; fewer rows than the
    # first in mode (3 < 4 of (4, 4, 3)): CP and Tucker skip the in factors' Kronecker product.
    emb = tz.FactorizedEmbedding(
        3000,
        48,
        factorization=name,
        rank=0.1 if _rank(name) == 0.5 else "same",
        n_layers=n_layers,
        dtype=F64,
    )
    assert emb.weight.in_modes[0] == 4
    for layer in range(n_layers):
        for x in (torch.tensor([0]), torch.tensor([[2999]]), torch.tensor([1234, 7, 7])):
            y = emb(x, layer)
            torch.testing.assert_close(y, _oracle_rows(emb, x, layer), rtol=1e-10, atol=1e-12)
            g = torch.randn_like(y)
            ours = torch.autograd.grad((y * g).sum(), list(emb.parameters()))
            want = torch.autograd.grad(
                (_oracle_rows(emb, x, layer) * g).sum(), list(emb.parameters())
            )
            for a, b in zip(ours, want):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_gradients_equal_the_oracle_tables(name):
    emb = _table(name, 59, padding_idx=5)
    x = torch.tensor([[1, 5, 7, 7], [58, 0, 5, 12]])
    g = torch.randn(2, 4, 12, dtype=F64)
    (emb(x) * g).sum().backward()
    ours = [p.grad.clone() for p in emb.parameters()]
    for p in emb.parameters():
        p.grad = None
    rows = _oracle_rows(emb, x)
    rows = rows * (x != 5).unsqueeze(-1)  # padding rows are zero and pass no gradient
    (rows * g).sum().backward()
    for got, p in zip(ours, emb.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)


def test_only_the_factor_rows_used_get_gradient():
    emb = _table("lowrank", 60)
    x = torch.tensor([3, 17, 17, 40])
    emb(x).sum().backward()
    used = emb.weight.U.grad[0].abs().sum(1) != 0
    assert used.nonzero().flatten().tolist() == [3, 17, 40]
    # blocktt: digits (o_1, o_2) of rows 0 and 13 in (10, 6) rows: slices 0, 2 and 0, 1
    emb = _table("blocktt", 60)
    emb(torch.tensor([0, 13])).sum().backward()
    first, second = emb.weight.cores
    assert (first.grad.abs().sum((0, 2, 3)) != 0).nonzero().flatten().tolist() == [0, 2]
    assert (second.grad.abs().sum((0, 2, 3)) != 0).nonzero().flatten().tolist() == [0, 1]


def test_padding_idx_row_is_zero_and_exported():
    emb = _table("tt", 60, padding_idx=-1)
    assert emb.padding_idx == 59
    assert emb(torch.tensor([59])).abs().max() == 0
    dense = emb.to_embedding()
    assert dense.padding_idx == 59 and dense.weight[59].abs().max() == 0
    x = torch.randint(0, 60, (4, 5))
    torch.testing.assert_close(dense(x), emb(x))


class _Largest(TorchDispatchMode):
    """The largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view of a parameter allocates nothing
            return out
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("name", ["blocktt", "tt", "tucker", "cp", "lowrank"])
def test_lookup_memory_does_not_grow_with_the_table(name):
    # Same modes per side except the vocabulary: 10^3 vs 10^6 rows, same lookup.
    largest = []
    for rows in (10**3, 10**6):
        emb = tz.FactorizedEmbedding(rows, 64, factorization=name, rank=4)
        emb.implementation = "rows"
        x = torch.randint(0, rows, (8, 16))
        with torch.no_grad(), _Largest() as seen:
            emb(x)
        largest.append(seen.numel)
    emb.implementation = "auto"  # the planner keeps the big table's rows path too
    assert emb.lookup_strategy(128, training=False) == "rows"
    # Bounded by the lookup (indices x dim x rank^2), whatever the vocabulary.
    assert largest[1] <= max(2 * largest[0], 128 * 64 * 4**2), largest
    assert largest[1] < 10**6 * 64 / 100


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("std", [1.0, 0.02])
def test_fresh_table_has_embedding_statistics(name, std):
    emb = tz.FactorizedEmbedding(
        2000, 64, factorization=name, rank="same" if name == "dense" else 8, std=std
    )
    table = emb.to_embedding().weight.double()
    assert abs(table.std().item() / std - 1) < 0.1
    assert abs(table.mean().item()) < 0.1 * std


def test_vocabulary_padding_is_reported():
    emb = tz.FactorizedEmbedding(30522, 384, factorization="blocktt", rank=8, device="meta")
    assert emb.tensorized_num_embeddings == (32, 31, 31)
    assert emb.tensorized_embedding_dim == (8, 8, 6)
    assert emb.padded_rows == 32 * 31 * 31 - 30522
    assert "+230 padding rows" in repr(emb)


def test_float_rank_is_a_fraction_of_the_real_table():
    emb = tz.FactorizedEmbedding(30522, 384, factorization="lowrank", rank=0.1, device="meta")
    dense = 30522 * 384
    assert abs(emb.num_params / dense - 0.1) < 0.01


def test_meta_construction_then_to_empty_and_reset():
    emb = tz.FactorizedEmbedding(1000, 32, factorization="tt", rank=4, device="meta")
    assert all(p.is_meta for p in emb.parameters())
    emb = emb.to_empty(device="cpu")
    emb.reset_parameters()
    assert abs(emb.to_embedding().weight.std().item() - 1) < 0.1


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_state_dict_round_trip(name):
    a, b = _table(name, 59), _table(name, 59)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 59, (5,))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_dtype_and_device_moves():
    emb = _table("blocktt", 60).float()
    x = torch.randint(0, 60, (4,))
    assert emb(x).dtype == torch.float32
    assert emb(x.int()).shape == (4, 12)


@pytest.mark.parametrize("cls", ["embedding", "linear"])
def test_conversions_that_replace_parameters_rebind_them(cls, monkeypatch):
    # With overwrite_module_params_on_conversion, .to() makes new parameter objects: forward
    # must read the new ones (their dtype here), not those bound at construction.
    layer = _table("tt", 60).float() if cls == "embedding" else tz.FactorizedLinear(12, 12, rank=2)
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)
    old = list(layer.parameters())
    layer.double()
    assert all(a is not b for a, b in zip(old, layer.parameters()))  # really replaced
    if cls == "embedding":  # an empty lookup is made from the parameters' dtype
        assert layer(torch.zeros(0, dtype=torch.int64)).dtype == torch.float64
    else:  # a float32-bound layer refuses float64 input
        assert layer(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float64


def test_signature_matches_tltorch():
    tltorch = pytest.importorskip("tltorch")
    for ours, theirs in [
        (tz.FactorizedEmbedding.__init__, tltorch.FactorizedEmbedding.__init__),
        (tz.FactorizedEmbedding.from_embedding, tltorch.FactorizedEmbedding.from_embedding),
        (
            tz.FactorizedEmbedding.from_embedding_list,
            tltorch.FactorizedEmbedding.from_embedding_list,
        ),
    ]:
        mine = list(inspect.signature(ours).parameters)
        names = [
            n
            for n, p in inspect.signature(theirs).parameters.items()
            if p.kind is not p.VAR_KEYWORD
        ]
        assert mine[: len(names)] == names
        for n in names:
            a = inspect.signature(ours).parameters[n].default
            b = inspect.signature(theirs).parameters[n].default
            assert a == b or (n == "decomposition_kwargs" and a is None and b == {})


def test_same_lookup_as_tltorch_for_its_own_factors():
    # A tltorch table's full reconstruction, decomposed by us at full rank, gives its rows.
    tltorch = pytest.importorskip("tltorch")
    import tensorly as tl

    with tl.backend_context("pytorch"):  # what importing tltorch sets (conftest restores it)
        theirs = tltorch.FactorizedEmbedding(60, 12, n_tensorized_modes=2, rank=4)
        table = theirs.weight.to_matrix().detach()[:60].double()
        x = torch.randint(0, 60, (3, 4))
        expected = theirs(x).detach().double()
    modes = _embedding.table_modes(60, 12, True, 2, None, None)
    ours = tz.FactorizedEmbedding.from_embedding(
        nn.Embedding(60, 12, _weight=table), rank=_full_rank("tt", modes), factorization="tt"
    )
    # tltorch computes in float32
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- decomposition


@pytest.mark.parametrize("name", ["tt", "blocktt", "tucker", "lowrank", "dense"])
@pytest.mark.parametrize("num", [60, 59])
def test_from_embedding_at_full_rank_reproduces_the_table(name, num):
    source = nn.Embedding(num, 12, padding_idx=2).double()
    modes = _embedding.table_modes(num, 12, True, 2, None, None)
    rank = _full_rank(name, modes)
    emb = tz.FactorizedEmbedding.from_embedding(source, rank=rank, factorization=name)
    assert emb.padding_idx == 2
    x = torch.arange(num)
    torch.testing.assert_close(emb(x), source(x).detach(), rtol=1e-9, atol=1e-9)


def test_from_embedding_recovers_a_planted_cp_table():
    gen = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(n, 3, generator=gen, dtype=F64) for n in (8, 6, 4, 3))
    table = torch.einsum("ar,br,cr,dr->abcd", a, b, c, d).reshape(48, 12)
    emb = tz.FactorizedEmbedding.from_embedding(
        nn.Embedding(48, 12, _weight=table),
        rank=3,
        factorization="cp",
        tensorized_num_embeddings=(8, 6),
        tensorized_embedding_dim=(4, 3),
        decomposition_kwargs={"n_iter_max": 500, "tol": 1e-14},
    )
    rel = (emb(torch.arange(48)) - table).norm() / table.norm()
    assert rel < 1e-6


def test_from_embedding_list_is_joint_and_views_share_it():
    tables = [nn.Embedding(60, 12).double() for _ in range(3)]
    modes = _embedding.table_modes(60, 12, True, 2, None, None)
    caps = tz.rank_caps("tt", modes[1], modes[0], n_layers=3)
    emb = tz.FactorizedEmbedding.from_embedding_list(tables, rank=caps, factorization="tt")
    assert emb.n_layers == 3 and len(emb) == 3
    x = torch.randint(0, 60, (2, 5))
    for i, (view, t) in enumerate(zip(emb, tables)):
        torch.testing.assert_close(view(x), t(x).detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(emb(x, indices=i), t(x).detach(), rtol=1e-9, atol=1e-9)
    assert emb.get_embedding(-1).indices == 2
    assert emb[1].to_embedding().weight.shape == (60, 12)


def test_from_embedding_without_decomposition_is_a_fresh_table():
    source = nn.Embedding(500, 16)
    emb = tz.FactorizedEmbedding.from_embedding(source, decompose_weights=False, rank=4)
    assert abs(emb.to_embedding().weight.std().item() - 1) < 0.15
    assert emb.rank == (4,)


# ---------------------------------------------------------------- bad input


def test_bad_lookups_raise_clear_errors():
    emb = _table("blocktt", 59)  # padded to 64 rows: index 60 exists in the factors
    with pytest.raises(IndexError, match="60"):
        emb(torch.tensor([1, 60]))
    with pytest.raises(IndexError, match="-1"):
        emb(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="float"):
        emb(torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        emb([1, 2])
    with pytest.raises(ValueError, match="meta"):
        emb(torch.tensor([1], device="meta"))
    with pytest.raises(IndexError, match="n_layers"):
        emb(torch.tensor([1]), indices=1)
    assert emb(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 12)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_embeddings": 0}, ValueError, "num_embeddings"),
        ({"num_embeddings": 10.0}, TypeError, "num_embeddings"),
        ({"embedding_dim": True}, TypeError, "embedding_dim"),
        ({"padding_idx": 60}, ValueError, "padding_idx"),
        ({"implementation": "fast"}, ValueError, "implementation"),
        ({"factorization": "nope"}, ValueError, "nope"),
        (
            {"tensorized_num_embeddings": (5, 5), "tensorized_embedding_dim": (3, 4)},
            ValueError,
            "cover",
        ),
        ({"tensorized_num_embeddings": (6, 10)}, ValueError, "both"),
        (
            {"tensorized_num_embeddings": (6, 10), "tensorized_embedding_dim": (5, 3)},
            ValueError,
            "tensorized_embedding_dim",
        ),
    ],
)
def test_bad_construction_raises_clear_errors(kwargs, error, match):
    args = {"num_embeddings": 60, "embedding_dim": 12, "rank": 2, **kwargs}
    with pytest.raises(error, match=match):
        tz.FactorizedEmbedding(**args)


def test_from_embedding_refuses_what_it_cannot_keep():
    with pytest.raises(TypeError, match=r"nn\.Embedding"):
        tz.FactorizedEmbedding.from_embedding(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="max_norm"):
        tz.FactorizedEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ValueError, match=r"\[1\]"):
        tz.FactorizedEmbedding.from_embedding_list([nn.Embedding(10, 4), nn.Embedding(12, 4)])
    with pytest.raises(ValueError, match="empty"):
        tz.FactorizedEmbedding.from_embedding_list([])


def test_planner_rebuilds_only_when_that_is_cheaper():
    small = tz.FactorizedEmbedding(64, 8, factorization="tucker", rank="same")
    big = tz.FactorizedEmbedding(10**5, 64, factorization="blocktt", rank=8, device="meta")
    assert big.lookup_strategy(1, training=False) == "rows"
    assert big.lookup_strategy(2048, training=False) == "rows"
    # Every row of a tiny table with full Tucker ranks: rebuilding is the cheaper way.
    assert small.lookup_strategy(64, training=False) == "reconstructed"
    assert math.prod(small.tensorized_num_embeddings) == 64


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("n", [1, 3, 300])  # one (host digits), fewer and more than slices
def test_row_work_counts_the_flops_the_lookup_runs(name, n):
    from torch.utils.flop_counter import FlopCounterMode

    emb = tz.FactorizedEmbedding(
        512, 24, n_tensorized_modes=3, factorization=name, rank=_rank(name), dtype=F64
    )
    work = FORMATS[name].row_work(emb.weight.signature, n)
    declared = sum(2 * m * k * p * c for m, k, p, c in work.prepare + work.apply)
    # distinct rows whose digit prefixes and suffixes each cover all values once n > 64, so
    # the TT-matrix's shared-prefix steps run on exactly as many states as declared
    index = (torch.arange(n) * 7) % 512
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        emb.weight.rows(index)
    assert counter.get_total_flops() == declared


@pytest.mark.parametrize("merge", [(False, False, False), (True, True, False), (True, True, True)])
def test_prefix_chain_equals_the_per_row_products(merge):
    from tensorized._ops import prefix_chain

    g = torch.Generator().manual_seed(0)
    modes, ins, ranks = (4, 3, 5), (2, 3, 2), (1, 3, 4, 2)
    slices = [
        torch.randn(o, ranks[k], ins[k], ranks[k + 1], dtype=F64, generator=g)
        for k, o in enumerate(modes)
    ]
    digits = [torch.randint(0, o, (40,), generator=g) for o in modes]
    digits = [torch.cat([d, d[:7]]) for d in digits]  # duplicate rows and prefixes
    got = prefix_chain(slices, digits, merge)
    for b in range(len(digits[0])):
        h = slices[0][digits[0][b], 0]  # (i_1, r_1)
        for s, d in zip(slices[1:], digits[1:]):
            h = torch.einsum("ar,rjs->ajs", h, s[d[b]]).reshape(-1, s.shape[-1])
        torch.testing.assert_close(got[b], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n", [5, 400])
def test_blocktt_rows_from_either_end_equal_the_oracle(reverse, n, monkeypatch):
    from tensorized._ops import prefix_merges
    from tensorized.formats import blocktt

    emb = tz.FactorizedEmbedding(
        512,
        24,
        n_tensorized_modes=3,
        factorization="blocktt",
        rank=(2, 3, 4),
        n_layers=2,
        dtype=F64,
    )
    modes = emb.weight.out_modes[::-1] if reverse else emb.weight.out_modes
    monkeypatch.setattr(blocktt, "_row_plan", lambda s, k: (reverse, prefix_merges(modes, k)))
    x = torch.randint(0, 512, (n,))
    g = torch.randn(n, 24, dtype=F64)
    for layer in (0, 1):
        rows = emb.weight.rows(x, layer)
        torch.testing.assert_close(rows, _oracle_rows(emb, x, layer), rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad((rows * g).sum(), list(emb.parameters()))
        want = torch.autograd.grad((_oracle_rows(emb, x, layer) * g).sum(), list(emb.parameters()))
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_row_plan_runs_the_chain_from_the_cheaper_end():
    from tensorized.formats import blocktt

    emb = tz.FactorizedEmbedding(30522, 384, factorization="blocktt", rank=(19, 23), device="meta")
    shape = emb.weight.signature
    cost = {}
    for reverse in (False, True):
        modes = [c[1] for c in blocktt.layer_shapes(shape)]
        merge = blocktt.prefix_merges(modes[::-1] if reverse else modes, 1983)
        products, _, _ = blocktt._chain_work(blocktt.layer_shapes(shape), 1983, reverse, merge)
        cost[reverse] = sum(2 * m * k * p * c for m, k, p, c in products)
    # from the right, the (o_2, o_3) suffixes (961 of them) are shared by 1983 rows
    assert cost[True] < 0.8 * cost[False]
    assert blocktt._row_plan(shape, 1983)[0] is True
    assert blocktt._row_plan(shape, 1) == (False, (False, False, False))


# ---------------------------------------------------------------- ecosystem


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(60, 12, padding_idx=0)
        self.pos = nn.Embedding(60, 12, padding_idx=0)
        self.proj = nn.Linear(12, 8)

    def forward(self, x):
        return self.proj(self.tok(x) + self.pos(x))


def test_save_model_and_load_model_round_trip_tables(tmp_path):
    net = _Encoder().double()
    joint = tz.FactorizedEmbedding.from_embedding_list(
        [net.tok, net.pos], rank=0.5, factorization="tt"
    )
    net.tok, net.pos = joint[0], joint[1]
    net.proj = tz.FactorizedLinear.from_linear(net.proj, rank=0.5, factorization="tucker")
    path = tmp_path / "net.safetensors"
    tz.save_model(net, path)
    fresh = tz.load_model(path, base=_Encoder().double())
    assert isinstance(fresh.tok, tz.EmbeddingView) and fresh.tok.parent is fresh.pos.parent
    assert fresh.tok.parent.padding_idx == 0
    x = torch.randint(0, 60, (3, 5))
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    single = _Encoder().double()
    single.tok = tz.FactorizedEmbedding.from_embedding(single.tok, rank=4)
    tz.save_model(single, path)
    again = tz.load_model(path, base=_Encoder().double())
    assert isinstance(again.tok, tz.FactorizedEmbedding)
    torch.testing.assert_close(again(x), single(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"nn\.Embedding there"):
        base = _Encoder().double()
        base.tok = nn.Linear(3, 3)
        tz.load_model(path, base=base)


def test_inspect_lists_tables():
    from tensorized.cli import inspect_model

    net = _Encoder()
    net.tok = tz.FactorizedEmbedding.from_embedding(net.tok, rank=4)
    rows = inspect_model(net)["factorized"]
    assert [(r["name"], r["kind"], r["out_features"]) for r in rows] == [("tok", "embedding", 60)]
    assert rows[0]["dense_params"] == 60 * 12


@pytest.mark.parametrize(
    "num, shape", [(59, (4, 6)), (512, (20, 20))]
)  # (8, 8, 8): prefixes shared
def test_compile_fullgraph_matches_eager(num, shape):
    emb = _table("blocktt", num, padding_idx=3).float()
    x = torch.randint(0, num, shape)
    compiled = torch.compile(emb, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), emb(x))
    y = compiled(x)
    y.sum().backward()
    assert all(p.grad is not None for p in emb.parameters())


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    emb = _table("tt", 59).float().eval()
    x = torch.randint(0, 59, (2, 7))
    path = tmp_path / "emb.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(emb, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), emb(x).detach(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_lookup():
    emb = _table("blocktt", 60).float()
    x = torch.randint(0, 60, (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = emb(x)
    ref = emb(x)
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_to_tensorly_holds_the_same_table():
    tl = pytest.importorskip("tensorly")
    emb = _table("tt", 60)
    with tl.backend_context("pytorch"):  # the global backend is left as it was
        full = tl.tt_to_tensor(emb.to_tensorly()).reshape(60, 12)
    torch.testing.assert_close(full, dense_weight(emb.weight))


def test_deepcopy_and_pickle():
    import copy
    import pickle

    emb = _table("cp", 59, padding_idx=1)
    x = torch.randint(0, 59, (5,))
    for clone in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb))):
        torch.testing.assert_close(clone(x), emb(x), rtol=0, atol=0)
        assert clone.padding_idx == 1


# ---------------------------------------------------------------- whole models


class _TokenNet(nn.Module):
    """A table, then a linear head; ``tied`` shares the table with the head's weight."""

    def __init__(self, tied=False):
        super().__init__()
        self.tok = nn.Embedding(61, 32)  # 61 is prime: padded to 64 rows
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 61, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, x):
        return self.head(torch.tanh(self.body(self.tok(x))))


def _config(**kw):
    base = {"rank": 0.5, "progress": False, "min_params": 0, "factorization": "tt"}
    return tz.TensorizeConfig(**{**base, **kw})


def test_tensorize_compresses_tables_only_when_asked():
    net = _TokenNet()
    tz.tensorize_(net, _config())
    assert type(net.tok) is nn.Embedding
    net = _TokenNet()
    x = torch.randint(0, 61, (4, 9))
    with torch.no_grad():
        table = net.tok.weight.detach().clone()
    report = tz.tensorize_(net, _config(embeddings=True))
    assert isinstance(net.tok, tz.FactorizedEmbedding)
    row = next(r for r in report if r.name == "tok")
    assert (row.kind, row.out_features, row.in_features) == ("embedding", 61, 32)
    assert row.padded_rows == 3 and math.prod(row.out_modes) == 64
    assert row.old_params == 61 * 32 and row.new_params == net.tok.num_params
    got = (net.tok.to_embedding().weight - table).norm() / table.norm()
    assert abs(got.item() - row.weight_error) < 1e-6
    assert net(x).shape == (4, 9, 61)


def test_tied_table_is_left_dense_with_a_warning():
    net = _TokenNet(tied=True)
    with pytest.warns(UserWarning, match="tied"):
        tz.tensorize_(net, _config(embeddings=True))
    assert type(net.tok) is nn.Embedding and type(net.head) is nn.Linear
    assert net.head.weight is net.tok.weight  # never silently untied


def test_budget_spans_linear_layers_and_tables():
    net = _TokenNet()
    dense = sum(m.weight.numel() for m in (net.tok, net.body, net.head))
    cfg = _config(embeddings=True, rank=0.3, rank_allocation="budget", factorization="auto")
    report = tz.tensorize_(net, cfg)
    assert {r.name for r in report} == {"tok", "body", "head"}
    assert report.new_params <= 0.3 * dense + sum(
        m.bias.numel() for m in (net.body,) if getattr(m, "bias", None) is not None
    )


def test_calibration_weights_table_rows_by_token_frequency():
    # The calibration text uses only rows 0..7: after calibration those rows are fitted
    # better than by the data-free decomposition, at the same ranks.
    torch.manual_seed(0)
    net = _TokenNet()
    table = net.tok.weight.detach().clone()
    data = [torch.randint(0, 8, (4, 16)) for _ in range(4)]
    plain, calibrated = _TokenNet(), _TokenNet()
    plain.load_state_dict(net.state_dict())
    calibrated.load_state_dict(net.state_dict())
    cfg = _config(embeddings=True, rank=0.2, target_modules=["tok"], calibration_steps=50)
    tz.tensorize_(plain, cfg)
    report = tz.tensorize_(calibrated, cfg, calibration_data=data)
    row = report.layers[0]
    assert row.output_error_after < row.output_error_before

    def error(m, rows):
        got = m.tok.to_embedding().weight[rows]
        return ((got - table[rows]).norm() / table[rows].norm()).item()

    seen, unseen = slice(0, 8), slice(8, 61)
    assert error(calibrated, seen) < error(plain, seen)
    assert error(calibrated, seen) < error(calibrated, unseen)
    counts = torch.zeros(61, dtype=F64)
    for x in data:
        counts += torch.bincount(x.reshape(-1), minlength=61).double()
    from tensorized._table_calibrate import record_token_counts

    recorded = record_token_counts(net, {"tok": net.tok}, data)["tok"]
    torch.testing.assert_close(recorded, counts)


def test_token_counts_leave_out_padding_positions():
    from tensorized._table_calibrate import record_token_counts

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            return self.tok(input_ids)

    ids = torch.tensor([[1, 2, 0, 0], [3, 3, 3, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    model = Keyword()
    counts = record_token_counts(
        model, {"tok": model.tok}, [{"input_ids": ids, "attention_mask": mask}]
    )["tok"]
    assert counts.tolist() == [0, 1, 1, 3, 0, 0, 0, 0, 0, 0]


def test_distill_trains_the_table_factors():
    torch.manual_seed(0)
    teacher = _TokenNet()
    student = _TokenNet()
    student.load_state_dict(teacher.state_dict())
    tz.tensorize_(student, _config(embeddings=True, rank=0.3, target_modules=["tok"]))
    before = [p.detach().clone() for p in student.tok.parameters()]
    data = [torch.randint(0, 61, (4, 8)) for _ in range(8)]
    report = tz.distill_(student, teacher, data, epochs=2, progress=False)
    assert any(not torch.equal(b, p) for b, p in zip(before, student.tok.parameters()))
    assert report.after <= report.before
    assert report.trained_params == student.tok.num_params  # the table's factors only
