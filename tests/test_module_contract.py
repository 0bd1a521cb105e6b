"""The nn.Module contract of FactorizedLinear, its views and its format modules.

apply, meta-device construction, skip_init, to_empty, load_state_dict(assign=True), Hugging
Face weight init, no hidden tensor state, no stale outputs after any parameter write, and
state_dict / deepcopy / pickle round trips; all in float64 against the einsum oracle.
"""

import copy
import dataclasses
import math
import pickle

import pytest
import torch
from torch import Tensor, nn

import tensorized as tz
from oracles import dense_forward

pytestmark = pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")

F64 = torch.float64
FORMAT_NAMES = ["cp", "tucker", "tt", "blocktt", "lowrank", "dense"]
RANK = {"dense": "same", "cp": 6, "lowrank": 3}
INS, OUTS = (4, 6), (3, 5)
LAYERS = [1, 3]
BATCHES = [1, 5, 64]

#: Overrides of nn.Module that a subclass may define (and is meant to).
ALLOWED_OVERRIDES = {
    "__init__", "forward", "extra_repr", "__repr__", "_apply", "train", "__setstate__",
    "__getstate__", "_load_from_state_dict", "_save_to_state_dict", "__getitem__", "__len__",
    "__iter__", "__dir__",
    "__init_subclass__",  # a class-creation hook (format registration), inherited from object
    "__setattr__",  # FactorizedLinear: nn.Module's, then rebinds a replaced weight
}  # fmt: skip
#: Entries every class body gets from Python itself (not definitions of the class).
CLASS_METADATA = {
    "__module__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__qualname__",
    "__firstlineno__", "__static_attributes__",
}  # fmt: skip


def make(fmt, n_layers=1, device=None, ins=INS, outs=OUTS, rank=None):
    rank = RANK.get(fmt, 2) if rank is None else rank
    return tz.FactorizedLinear(ins, outs, True, fmt, rank, n_layers, device=device, dtype=F64)


def shapes(module):
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: tuple(t.shape) for name, t in named}


def check_outputs(layer, x):
    """Every layer (and its view) against the einsum oracle and a fresh ``to_linear``."""
    for i in range(layer.n_layers):
        y = layer(x, i)
        torch.testing.assert_close(y, dense_forward(layer, x, i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, layer.to_linear(i)(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer[i](x), y, rtol=0, atol=0)


def outputs(layer, x):
    return [layer(x, i) for i in range(layer.n_layers)]


def stray_tensors(module):
    """Paths of tensors reachable from ``vars()`` of any submodule (through dicts, lists,
    tuples, sets and dataclasses) that are not registered parameters or buffers."""
    registered = {id(t) for t in (*module.parameters(), *module.buffers())}
    found, seen = [], set()

    def walk(obj, path):
        if isinstance(obj, Tensor):
            if id(obj) not in registered:
                found.append(f"{path}: {tuple(obj.shape)}")
            return
        if isinstance(obj, nn.Module) or id(obj) in seen:
            return  # submodules are walked on their own
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, f"{path}[key {k!r}]")
                walk(v, f"{path}[{k!r}]")
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for j, v in enumerate(obj):
                walk(v, f"{path}[{j}]")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{path}.{f.name}")

    for name, m in module.named_modules():
        for key, value in vars(m).items():
            walk(value, f"{name or '<root>'}.{key}")
    return found


def eval_forwards(layer, ctx):
    layer.eval()
    with ctx():
        for batch in BATCHES:
            x = torch.randn(batch, layer.in_features, dtype=F64)
            for i in range(layer.n_layers):
                layer(x, i)
                layer[i](x)


def module_classes():
    classes = {"FactorizedLinear": tz.FactorizedLinear, "view": type(make("tt", 3)[0])}
    for fmt in FORMAT_NAMES:
        classes[fmt] = type(make(fmt).weight)
    return classes


# ---------------------------------------------------------------- 1. nn.Module methods


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_sequential_apply_visits_every_module(fmt, n_layers):
    seq = nn.Sequential(make(fmt, n_layers), nn.ReLU(), make(fmt, n_layers, ins=OUTS, outs=INS))
    visited = []
    assert seq.apply(visited.append) is seq
    assert {id(m) for m in visited} == {id(m) for m in seq.modules()}
    assert any(isinstance(m, tz.FactorizedMatrix) for m in visited)

    def zero(m):
        for p in m.parameters(recurse=False):
            nn.init.zeros_(p)

    seq.apply(zero)
    assert all(not p.any() for p in seq.parameters())
    view = make(fmt, n_layers)[n_layers - 1]
    visited = []
    view.apply(visited.append)
    assert {id(m) for m in visited} == {id(m) for m in view.modules()}


@pytest.mark.parametrize("name", ["FactorizedLinear", "view", *FORMAT_NAMES])
def test_no_class_attribute_shadows_nn_module(name):
    cls = module_classes()[name]
    module_names = set(dir(nn.Module))
    shadowed = {}
    for k in cls.__mro__[: cls.__mro__.index(nn.Module)]:
        clash = (set(vars(k)) & module_names) - ALLOWED_OVERRIDES - CLASS_METADATA
        if clash:
            shadowed[k.__qualname__] = sorted(clash)
    assert not shadowed, f"{cls.__qualname__} shadows nn.Module attributes: {shadowed}"


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_no_instance_attribute_shadows_nn_module(fmt, n_layers):
    layer = make(fmt, n_layers)
    eval_forwards(layer, torch.no_grad)
    base = set(vars(nn.Module()))  # what nn.Module.__init__ itself sets
    module_names = set(dir(nn.Module))
    for m in [*layer.modules(), layer[0]]:
        clash = (set(vars(m)) - base) & module_names - ALLOWED_OVERRIDES
        assert not clash, f"{type(m).__name__} instance shadows nn.Module attributes: {clash}"


# ---------------------------------------------------------------- 2-5. meta, skip_init, assign


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_meta_construction_and_forward(fmt, n_layers):
    cpu = make(fmt, n_layers)
    meta = make(fmt, n_layers, device="meta")
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert all(p.dtype == F64 for p in meta.parameters())
    assert shapes(meta) == shapes(cpu)
    assert meta.num_params == cpu.num_params
    assert meta.weight.num_params == cpu.weight.num_params
    for lead in [(7,), (2, 5)]:
        x = torch.randn(*lead, 24, device="meta", dtype=F64)
        for i in range(n_layers):
            for y in (meta(x, i), meta[i](x)):
                assert y.is_meta and y.shape == (*lead, 15) and y.dtype == F64


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_skip_init_then_reset_parameters(fmt, n_layers):
    layer = nn.utils.skip_init(
        tz.FactorizedLinear, INS, OUTS, factorization=fmt, rank=RANK.get(fmt, 2),
        n_layers=n_layers, dtype=F64,
    )  # fmt: skip
    assert isinstance(layer, tz.FactorizedLinear)
    assert all(p.device.type == "cpu" for p in layer.parameters())
    assert shapes(layer) == shapes(make(fmt, n_layers))
    layer.reset_parameters()
    target = 1 / math.sqrt(3 * 24)
    for i in range(n_layers):
        std = float(layer.to_linear(i).weight.detach().std())
        # 360 entries drawn through products of factors: only the order of magnitude is
        # certain without relying on an exact rescale.
        assert 0.5 * target <= std <= 2 * target, (i, std, target)
    check_outputs(layer, torch.randn(9, 24, dtype=F64))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_skip_init_reset_std_on_a_larger_layer(fmt):
    ins = outs = (8, 8)
    rank = "same" if fmt == "dense" else 0.5
    layer = nn.utils.skip_init(
        tz.FactorizedLinear, ins, outs, factorization=fmt, rank=rank, dtype=F64
    )
    layer.reset_parameters()
    target = 1 / math.sqrt(3 * 64)
    std = float(layer.to_linear().weight.detach().std())
    # The documented init rescales to this std exactly; even a purely statistical one would
    # be within a few percent on 4096 entries (sample std error ~1/sqrt(2n) = 1.1% for
    # independent entries), so 10% leaves room for the correlation between entries.
    assert abs(std / target - 1) < 0.1, (std, target)
    check_outputs(layer, torch.randn(9, 64, dtype=F64))


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_to_empty_then_reset_parameters(fmt, n_layers):
    layer = make(fmt, n_layers, device="meta")
    assert layer.to_empty(device="cpu") is layer
    layer.reset_parameters()
    assert all(p.device.type == "cpu" and p.isfinite().all() for p in layer.parameters())
    assert shapes(layer) == shapes(make(fmt, n_layers))
    check_outputs(layer, torch.randn(2, 3, 24, dtype=F64))
    layer.train()
    layer(torch.randn(4, 24, dtype=F64), n_layers - 1).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_load_state_dict_assign_onto_meta_layer(fmt, n_layers):
    src = make(fmt, n_layers)
    sd = src.state_dict()
    layer = make(fmt, n_layers, device="meta")
    layer.load_state_dict(sd, assign=True)
    params = dict(layer.named_parameters())
    assert params.keys() == dict(src.named_parameters()).keys()
    for name, p in params.items():
        assert not p.is_meta and p.requires_grad, name
        assert torch.equal(p, sd[name]) and p.data_ptr() == sd[name].data_ptr(), name
    x = torch.randn(6, 24, dtype=F64)
    for mode in ("eval", "train"):
        getattr(src, mode)(), getattr(layer, mode)()
        with torch.no_grad():
            for ys, yl in zip(outputs(src, x), outputs(layer, x)):
                torch.testing.assert_close(yl, ys, rtol=1e-12, atol=1e-12)
    layer.train()
    sum(y.pow(2).sum() for y in outputs(layer, x)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    layer.eval()
    with torch.no_grad():
        outputs(layer, x)  # whatever a forward may keep, the update below must be seen
        next(layer.weight.parameters()).add_(1.0)
        check_outputs(layer, x)


# ---------------------------------------------------------------- 6. Hugging Face


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_hf_bert_weight_init_after_tensorize(fmt):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.BertModel(config).double().eval()
    cfg = tz.TensorizeConfig(
        factorization=fmt, rank="same" if fmt == "dense" else 0.5, order=2, min_params=0,
        progress=False, target_modules=r"encoder\..*",
    )  # fmt: skip
    tz.tensorize_(model, cfg)
    replaced = [m for m in model.modules() if isinstance(m, tz.FactorizedLinear)]
    assert len(replaced) == 12  # q, k, v, attention output, intermediate, output; 2 blocks
    model.post_init()
    if hasattr(model, "init_weights"):
        model.init_weights()
    model.apply(model._init_weights)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 7, 32) and out.isfinite().all()


# ---------------------------------------------------------------- 7. no hidden tensor state


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inf"])
def test_eval_forwards_keep_no_tensor_beyond_parameters(fmt, n_layers, ctx):
    layer = make(fmt, n_layers)
    assert stray_tensors(layer) == []
    eval_forwards(layer, ctx)
    assert stray_tensors(layer) == []
    layer.train()  # nothing made under inference mode may leak into autograd
    x = torch.randn(3, 24, dtype=F64)
    sum(y.sum() for y in outputs(layer, x)).backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_merge_is_an_explicit_cache_and_unmerge_drops_it(fmt, n_layers):
    layer = make(fmt, n_layers)
    if not hasattr(layer, "merge"):
        pytest.skip("no opt-in merge cache")
    layer.eval()
    x = torch.randn(5, 24, dtype=F64)
    with torch.no_grad():
        ref = outputs(layer, x)
        layer.merge()
        for y, r in zip(outputs(layer, x), ref):
            torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)
        layer.unmerge()
        assert stray_tensors(layer) == []
        for y, r in zip(outputs(layer, x), ref):
            torch.testing.assert_close(y, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_pickle_size_does_not_grow_with_forwards(fmt, n_layers):
    layer = make(fmt, n_layers).eval()
    before = len(pickle.dumps(layer))
    eval_forwards(layer, torch.no_grad)
    eval_forwards(layer, torch.inference_mode)
    blob = pickle.dumps(layer)
    assert abs(len(blob) - before) <= 512, (before, len(blob))
    clone = pickle.loads(blob)
    x = torch.randn(4, 24, dtype=F64)
    with torch.no_grad():
        for y, r in zip(outputs(clone, x), outputs(layer, x)):
            torch.testing.assert_close(y, r, rtol=0, atol=0)


# ---------------------------------------------------------------- 8. no stale outputs


def _data_mul(layer, x):
    next(layer.weight.parameters()).data.mul_(2)


def _vector_to_parameters(layer, x):
    v = nn.utils.parameters_to_vector(layer.parameters())
    nn.utils.vector_to_parameters(v + 0.1 * torch.randn_like(v), layer.parameters())


def _fused_adamw(layer, x):
    try:
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"fused AdamW unavailable on CPU: {err}")
    layer.train()
    sum(y.pow(2).sum() for y in outputs(layer, x)).backward()
    opt.step()
    layer.eval()


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
@pytest.mark.parametrize("write", [_data_mul, _vector_to_parameters, _fused_adamw])
def test_outputs_follow_every_kind_of_parameter_write(fmt, n_layers, write):
    layer = make(fmt, n_layers).eval()
    x = torch.randn(5, 24, dtype=F64)
    with torch.no_grad():
        before = outputs(layer, x)
        check_outputs(layer, x)
    write(layer, x)
    with torch.no_grad():
        assert not torch.allclose(dense_forward(layer, x, n_layers - 1), before[-1])
        check_outputs(layer, x)


# ---------------------------------------------------------------- 9. copies


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_state_dict_round_trip_into_a_fresh_layer(fmt, n_layers):
    src = make(fmt, n_layers).eval()
    dst = make(fmt, n_layers).eval()
    x = torch.randn(5, 24, dtype=F64)
    with torch.no_grad():
        outputs(dst, x)  # a forward before loading must not be reused after
        dst.load_state_dict(src.state_dict())
        for y, r in zip(outputs(dst, x), outputs(src, x)):
            torch.testing.assert_close(y, r, rtol=0, atol=0)
        check_outputs(dst, x)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("n_layers", LAYERS)
def test_deepcopy_gives_same_outputs_and_independent_parameters(fmt, n_layers):
    layer = make(fmt, n_layers).eval()
    x = torch.randn(5, 24, dtype=F64)
    with torch.no_grad():
        ref = outputs(layer, x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        for y, r in zip(outputs(clone, x), ref):
            torch.testing.assert_close(y, r, rtol=0, atol=0)
    layer.train(), clone.train()
    for y, r in zip(outputs(clone, x), outputs(layer, x)):
        torch.testing.assert_close(y, r, rtol=0, atol=0)
    ptrs = {p.data_ptr() for p in layer.parameters()}
    assert not ptrs & {p.data_ptr() for p in clone.parameters()}
    layer.eval(), clone.eval()
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
        for y, r in zip(outputs(layer, x), ref):
            torch.testing.assert_close(y, r, rtol=0, atol=0)
        check_outputs(clone, x)
        view = copy.deepcopy(clone[n_layers - 1])
        torch.testing.assert_close(view(x), clone(x, n_layers - 1), rtol=0, atol=0)
