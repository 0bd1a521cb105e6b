"""FactorizedLinear against dense oracles: forward, from_linear(_list), views, I/O, errors."""

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tensorized as tz
from oracles import dense_forward, dense_weight
from tensorized._ranks import rank_caps
from tensorized.formats import FORMATS

F64 = torch.float64
FORMAT_NAMES = list(FORMATS)
IMPLS = ["factorized", "reconstructed", "auto"]
RANK = {"dense": "same", "cp": 6, "lowrank": 3}


def make(fmt, n_layers=1, impl="auto", dtype=F64, bias=True, ins=(4, 6), outs=(3, 5)):
    return tz.FactorizedLinear(
        ins, outs, bias, fmt, RANK.get(fmt, 2), n_layers, implementation=impl, dtype=dtype
    )


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_forward_equals_dense_oracle(fmt, impl, n_layers, lead):
    layer = make(fmt, n_layers, impl)
    x = torch.randn(*lead, 24, dtype=F64)
    for i in range(n_layers):
        y = layer(x, i)
        assert y.shape == (*lead, 15)
        torch.testing.assert_close(y, dense_forward(layer, x, i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer[i](x), y, rtol=0, atol=0)


class _Ops(TorchDispatchMode):
    """The aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_dense_layer_serves_like_nn_linear(n_layers):
    # The dense format's one stored GEMM needs no plan: in eval without autograd it runs
    # nn.Linear's ops (after selecting the layer's weight and bias when there is a layer
    # mode) and equals the float64 product.
    torch.manual_seed(0)
    sources = [nn.Linear(12, 10, dtype=torch.float64) for _ in range(n_layers)]
    layer = (
        tz.FactorizedLinear.from_linear(sources[0], rank="same", factorization="dense")
        if n_layers == 1
        else tz.FactorizedLinear.from_linear_list(sources, rank="same", factorization="dense")
    ).eval()
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        for i, source in enumerate(sources):
            with _Ops() as ours:
                y = layer(x, i)
            with _Ops() as reference:
                source(x)
            assert ours.ops == ["select"] * 2 * (n_layers > 1) + reference.ops
            torch.testing.assert_close(y, x @ source.weight.T + source.bias, rtol=0, atol=1e-12)
    assert layer.implementation == "auto"
    assert {layer.plan(b).chosen for b in (1, 64, 4096)} == {layer.implementation_for(1)}


def test_a_layer_pickled_without_its_derived_strategies_still_runs():
    # An earlier version's pickle lacks attributes derived from `implementation`; unpickling
    # rebinds them, and the layer computes what it did.
    import pickle

    layer = tz.FactorizedLinear(12, 10, factorization="dense").eval()
    state = layer.__getstate__()
    del state["_unplanned"]
    old = tz.FactorizedLinear.__new__(tz.FactorizedLinear)
    old.__setstate__(state)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(old))(x), layer(x))
        torch.testing.assert_close(old(x), layer(x))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_from_linear_full_rank_reproduces_source(fmt):
    src = nn.Linear(12, 10, dtype=F64)
    ins, outs = (3, 4), (2, 5)
    rank = {"dense": "same", "cp": (24,)}.get(fmt, rank_caps(fmt, ins, outs))
    kw = {"n_iter_max": 500, "tol": 1e-14} if fmt == "cp" else {}
    layer = tz.FactorizedLinear.from_linear(src, ins, outs, rank, True, fmt, kw)
    x = torch.randn(9, 12, dtype=F64)
    torch.testing.assert_close(layer(x), src(x), rtol=1e-10, atol=1e-10)
    assert layer.factorization == fmt and layer.in_tensorized_features == ins


@pytest.mark.parametrize("fmt", ["cp", "tucker", "tt", "blocktt", "lowrank"])
def test_from_linear_low_rank_error_is_the_decomposition_error(fmt):
    src = nn.Linear(64, 32, dtype=F64)
    layer = tz.FactorizedLinear.from_linear(src, (8, 8), (4, 8), 0.3, factorization=fmt)
    direct = FORMATS[fmt].from_matrix(src.weight.detach(), (8, 8), (4, 8), 0.3)
    torch.testing.assert_close(dense_weight(layer.weight), dense_weight(direct))
    x = torch.randn(5, 64, dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, dense_weight(direct), src.bias))


def test_from_linear_bias_is_copied_and_follows_source_dtype():
    src = nn.Linear(16, 8, dtype=F64)
    layer = tz.FactorizedLinear.from_linear(src, (4, 4), (2, 4), 0.5, factorization="tt")
    assert layer.bias.data_ptr() != src.bias.data_ptr()
    torch.testing.assert_close(layer.bias, src.bias)
    with torch.no_grad():
        layer.bias.add_(1.0)
    assert not torch.allclose(layer.bias, src.bias)
    assert all(p.dtype == F64 for p in layer.parameters())
    no_bias = nn.Linear(16, 8, bias=False)
    layer = tz.FactorizedLinear.from_linear(no_bias, (4, 4), (2, 4), 0.5, factorization="tt")
    assert torch.equal(layer.bias, torch.zeros(8))
    layer = tz.FactorizedLinear.from_linear(src, (4, 4), (2, 4), 0.5, False, "tt")
    assert layer.bias is None


def test_from_linear_auto_tensorize_and_tltorch_extras():
    src = nn.Linear(64, 32)
    layer = tz.FactorizedLinear.from_linear(
        src,
        rank=0.5,
        auto_tensorize=True,
        n_tensorized_modes=2,
        factorization="tucker",
        implementation="factorized",
        checkpointing=False,
        verbose=False,
    )
    assert layer.in_tensorized_features == (8, 8) and layer.out_tensorized_features == (8, 4)
    explicit = tz.FactorizedLinear.from_linear(
        src, (4, 16), (2, 16), 0.5, factorization="tucker", auto_tensorize=True
    )
    assert explicit.in_tensorized_features == (4, 16)  # explicit shapes always win
    with pytest.raises(ValueError, match=r"required when auto_tensorize=False"):
        tz.FactorizedLinear.from_linear(src, rank=0.5, auto_tensorize=False)


def test_from_linear_prints_when_verbose(capsys):
    tz.FactorizedLinear.from_linear(nn.Linear(16, 16), (4, 4), (4, 4), 0.5, verbose=True)
    assert "relative weight error" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_from_linear_list_each_layer_reproduces_its_source(fmt):
    srcs = [nn.Linear(12, 10, dtype=F64) for _ in range(3)]
    ins, outs = (3, 4), (2, 5)
    rank = {"dense": "same", "cp": (72,)}.get(fmt, rank_caps(fmt, ins, outs, 3))
    kw = {"n_iter_max": 1000, "tol": 1e-14} if fmt == "cp" else None
    joint = tz.FactorizedLinear.from_linear_list(srcs, ins, outs, rank, True, fmt, kw)
    assert joint.n_layers == len(joint) == 3
    x = torch.randn(4, 12, dtype=F64)
    for i, view in enumerate(joint):
        torch.testing.assert_close(view(x), srcs[i](x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(joint.to_linear(i)(x), srcs[i](x), rtol=1e-9, atol=1e-9)


def test_views_share_parameters_and_train_the_shared_tensor():
    joint = tz.FactorizedLinear((4, 4), (4, 4), factorization="tt", rank=3, n_layers=2)
    view = joint.get_linear(1)
    assert {id(p) for p in view.parameters()} == {id(p) for p in joint.parameters()}
    before = dense_weight(joint.weight, 1).detach().clone()
    opt = torch.optim.SGD(view.parameters(), lr=0.1)
    view(torch.randn(8, 16)).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(dense_weight(joint.weight, 1), before)
    assert "indices=1 of 2" in repr(view)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_fresh_layer_output_variance_matches_nn_linear(fmt):
    torch.manual_seed(0)
    rank = {"dense": "same", "cp": 0.1, "blocktt": 0.2}.get(fmt, 0.1)
    layer = tz.FactorizedLinear((16, 16, 4), (8, 8, 8), factorization=fmt, rank=rank, bias=False)
    ref = nn.Linear(1024, 512, bias=False)
    x = torch.randn(2048, 1024)
    with torch.no_grad():
        ratio = layer(x).var() / ref(x).var()
    assert abs(ratio.item() - 1) < 0.15, ratio
    bound = 1 / math.sqrt(1024)
    biased = tz.FactorizedLinear((16, 16, 4), (8, 8, 8), factorization=fmt, rank=rank)
    assert biased.bias.abs().max() <= bound and biased.bias.std() > 0.4 * bound


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    for fmt in FORMAT_NAMES:
        plain = make(fmt, 2, "factorized")
        ckpt = copy.deepcopy(plain)
        ckpt.checkpointing = True
        x = torch.randn(6, 24, dtype=F64)
        for layer in (plain, ckpt):
            layer.train()
            (layer(x, 1).sum() + layer(x, 0).pow(2).sum()).backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, (fmt, name)
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_state_dict_deepcopy_and_torch_save_round_trip(fmt):
    a = make(fmt, 3)
    b = make(fmt, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 24, dtype=F64)
    torch.testing.assert_close(b(x, 2), a(x, 2))
    torch.testing.assert_close(copy.deepcopy(a)(x, 1), a(x, 1))
    buffer = io.BytesIO()
    torch.save(a, buffer)
    buffer.seek(0)
    c = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(c(x, 0), a(x, 0))


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_dtypes_and_to(dtype):
    layer = make("tucker", dtype=dtype)
    x = torch.randn(3, 24, dtype=dtype)
    assert layer(x).dtype == dtype
    as64 = copy.deepcopy(layer).to(F64)
    torch.testing.assert_close(as64(x.double()), dense_forward(as64, x))
    tol = {torch.bfloat16: 5e-2, torch.float32: 1e-5, F64: 1e-12}[dtype]
    torch.testing.assert_close(layer(x).double(), as64(x.double()), rtol=tol, atol=tol)


def test_to_linear_round_trip():
    layer = make("tt", 2)
    lin = layer.to_linear(1)
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == F64
    x = torch.randn(5, 24, dtype=F64)
    torch.testing.assert_close(lin(x), layer(x, 1))


def test_attributes_and_repr():
    layer = tz.FactorizedLinear((8, 8, 16), (16, 16, 16), factorization="Tucker", rank=0.1)
    assert layer.in_features == 1024 and layer.out_features == 4096
    assert layer.tensorized_shape == (16, 16, 16, 8, 8, 16)
    assert layer.factorization == "tucker" and layer.n_layers == 1
    assert isinstance(layer.rank, tuple) and len(layer.rank) == 6
    text = repr(layer)
    for piece in ("in_features=1024", "(8, 8, 16)", "'tucker'", "compression", "rank=("):
        assert piece in text
    auto = tz.FactorizedLinear(1024, 4096, factorization="tt", rank=0.1)
    assert math.prod(auto.in_tensorized_features) == 1024


def test_digits_mlp_trains_to_93_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    model = nn.Sequential(
        tz.FactorizedLinear((8, 8), (16, 16), factorization="blocktt", rank=0.25),
        nn.ReLU(),
        tz.FactorizedLinear((16, 16), (2, 5), factorization="tucker", rank=0.5),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        for idx in torch.randperm(len(Xtr), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(Xte).argmax(1) == yte).float().mean().item()
    assert accuracy >= 0.93, accuracy


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"in_tensorized_features": (4, 4), "out_tensorized_features": (4, 0)},
            ValueError,
            r"out_tensorized_features must contain only positive sizes",
        ),
        (
            {"in_tensorized_features": 0.5, "out_tensorized_features": (4,)},
            TypeError,
            r"in_tensorized_features must be a tuple.*got float 0.5.*rank=... by keyword",
        ),
        (
            {"in_tensorized_features": None, "out_tensorized_features": (4,)},
            TypeError,
            r"are required",
        ),
        ({"factorization": "ttt"}, ValueError, r"unknown factorization 'ttt'"),
        ({"rank": -1}, ValueError, r"an int rank must be >= 1"),
        ({"rank": 0.0}, ValueError, r"finite number > 0"),
        ({"rank": 1e9}, ValueError, r"cannot reach"),
        ({"n_layers": 0}, ValueError, r"n_layers must be an int >= 1, got 0"),
        ({"implementation": "fast"}, ValueError, r"implementation must be one of"),
        ({"bias": "yes"}, TypeError, r"bias must be a bool"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    args = {"in_tensorized_features": (4, 4), "out_tensorized_features": (4, 4)} | kwargs
    with pytest.raises(exc, match=match):
        tz.FactorizedLinear(**args)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda l: l(torch.randn(3, 15)), ValueError, r"in_features=16.*got input shape \(3, 15\)"),
        (lambda l: l(torch.ones(3, 16, dtype=torch.long)), TypeError, r"floating dtype"),
        (lambda l: l([1.0] * 16), TypeError, r"x must be a torch.Tensor"),
        (lambda l: l(torch.randn(3, 16), 2), IndexError, r"indices=2 is out of range.*-2 to 1"),
        (lambda l: l(torch.randn(3, 16), -3), IndexError, r"indices=-3 is out of range"),
        (lambda l: l(torch.randn(3, 16), 0.0), TypeError, r"indices must be an int"),
        (lambda l: l.get_linear(5), IndexError, r"indices=5 is out of range"),
        (lambda l: l[2], IndexError, r"out of range"),
        (lambda l: l.to_linear(2), IndexError, r"out of range"),
    ],
)
def test_forward_and_view_errors(call, exc, match):
    layer = tz.FactorizedLinear((4, 4), (4, 4), factorization="cp", rank=3, n_layers=2)
    with pytest.raises(exc, match=match):
        call(layer)


def test_single_layer_accepts_only_index_zero():
    layer = tz.FactorizedLinear((4, 4), (4, 4))
    layer(torch.randn(2, 16), 0)
    with pytest.raises(IndexError, match=r"indices=1 is out of range.*n_layers=1"):
        layer(torch.randn(2, 16), 1)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: tz.FactorizedLinear.from_linear(nn.Conv1d(1, 1, 1), (1,), (1,), 1),
            TypeError,
            r"linear must be a torch.nn.Linear, got Conv1d",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear(nn.Linear(16, 8), (4, 4), (4, 4), 2),
            ValueError,
            r"out_tensorized_features=\(4, 4\) multiplies to 16.*8 features",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear(
                nn.Linear(16, 8), (4, 4), (2, 4), 2, decomposition_kwargs=[1]
            ),
            TypeError,
            r"decomposition_kwargs must be a dict",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear_list([], (4, 4), (4, 4), 2),
            ValueError,
            r"linear_list is empty",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear_list(nn.Linear(4, 4), (4,), (4,), 2),
            TypeError,
            r"linear_list must be a list of nn.Linear",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear_list(
                [nn.Linear(4, 4), nn.ReLU()], (4,), (4,), 2
            ),
            TypeError,
            r"linear_list\[1\] must be an nn.Linear, got ReLU",
        ),
        (
            lambda: tz.FactorizedLinear.from_linear_list(
                [nn.Linear(4, 4), nn.Linear(4, 5)], (4,), (4,), 2
            ),
            ValueError,
            r"same shape.*linear_list\[1\] is \(5, 4\)",
        ),
    ],
)
def test_from_linear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_from_linear_rejects_nan_weights():
    src = nn.Linear(16, 16)
    with torch.no_grad():
        src.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        tz.FactorizedLinear.from_linear(src, (4, 4), (4, 4), 0.5)
