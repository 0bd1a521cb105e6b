"""distill_: end-to-end distillation of a compressed model from its original."""

import copy

import pytest
import torch
from torch import nn

import tensorized as tz

pytestmark = pytest.mark.filterwarnings("ignore::tensorized.RankBudgetWarning")
F64 = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 8)).double()  # fmt: skip


def data(n=24, rows=32):
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(4, 16, generator=gen, dtype=F64)
    return [
        torch.randn(rows, 4, generator=gen, dtype=F64) @ basis
        + 0.1 * torch.randn(rows, 16, generator=gen, dtype=F64)
        for _ in range(n)
    ]


def compressed(teacher, fmt="lowrank", rank=None):
    student = copy.deepcopy(teacher)
    rank = {"lowrank": 3, "cp": 4}.get(fmt, 0.2) if rank is None else rank
    cfg = tz.TensorizeConfig(factorization=fmt, rank=rank, order=2, min_params=0, progress=False)
    tz.tensorize_(student, cfg)
    return student


def relative_error(model, teacher, batches):
    """The oracle: float64, written out."""
    with torch.no_grad():
        err = sum(float((model(x) - teacher(x)).pow(2).sum()) for x in batches)
        norm = sum(float(teacher(x).pow(2).sum()) for x in batches)
    return err / norm


@pytest.mark.parametrize("fmt", ["lowrank", "tucker", "tt", "blocktt", "cp"])
def test_the_default_step_lowers_the_held_out_error_for_every_format(fmt):
    teacher = mlp()
    student = compressed(teacher, fmt)
    batches = data()
    start = relative_error(student, teacher, batches)
    report = tz.distill_(student, teacher, batches, epochs=4, progress=False)
    assert report.after < report.before, report
    assert relative_error(student, teacher, batches) < start
    assert report.steps == 4 * (len(batches) - round(0.1 * len(batches)))
    assert report.trained_params == sum(
        p.numel() for m in student.modules() if isinstance(m, tz.FactorizedLinear)
        for p in m.parameters()
    )  # fmt: skip


def test_the_report_is_the_held_out_error_and_the_best_state_is_kept():
    teacher = mlp()
    student = compressed(teacher)
    batches = data()
    report = tz.distill_(student, teacher, batches, epochs=2, held_out=0.25, seed=3)
    held = [batches[i] for i in torch.randperm(24, generator=torch.Generator().manual_seed(3))[:6]]
    assert report.after == pytest.approx(relative_error(student, teacher, held), rel=1e-9)


def test_a_diverging_run_leaves_the_model_as_it_started():
    teacher = mlp()
    student = compressed(teacher)
    before = copy.deepcopy(student.state_dict())
    report = tz.distill_(student, teacher, data(), epochs=2, lr=1e4)
    assert report.after == report.before and report.best_step == 0
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_only_factorized_layers_train_by_default_and_flags_come_back():
    teacher = mlp()
    student = compressed(teacher, rank=3)
    student[2] = nn.Linear(64, 64).double()  # a dense layer that must not move
    dense = student[2].weight.detach().clone()
    student.train()
    student[0].weight.U.requires_grad_(False)  # a frozen factor stays frozen
    frozen = student[0].weight.U.detach().clone()
    tz.distill_(student, teacher, data(), epochs=1)
    assert torch.equal(student[2].weight, dense) and torch.equal(student[0].weight.U, frozen)
    assert student.training and teacher.training
    assert not student[0].weight.U.requires_grad and student[0].weight.V.requires_grad
    assert all(p.grad is None for p in student.parameters())
    tz.distill_(student, teacher, data(), epochs=1, train="all")
    assert not torch.equal(student[2].weight, dense)


class Encoder(nn.Module):
    """Returns a dict holding a tuple, like a Hugging Face ModelOutput."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, scale=1.0):
        h = torch.tanh(self.proj(x)) * scale
        return {"last_hidden_state": h, "extra": (self.head(h), 3), "mask": x > 0}


def test_dict_outputs_and_keyword_batches():
    torch.manual_seed(0)
    teacher = Encoder().double()
    student = compressed(teacher, rank=3)
    batches = [{"x": x, "scale": 2.0} for x in data()]
    report = tz.distill_(student, teacher, batches, epochs=3)
    assert report.after < report.before


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda t, s: (t, t, data()), ValueError, r"teacher is the model itself"),
        (lambda t, s: (s, nn.Sequential(s[0]), data()), ValueError, r"share \d+ parameters"),
        (lambda t, s: (s, t, []), ValueError, r"at least 2 batches"),
        (lambda t, s: (s, t, data(1)), ValueError, r"at least 2 batches"),
        (lambda t, s: (s, t, torch.randn(4, 16)), TypeError, r"wrap one batch in a list"),
        (
            lambda t, s: (s, nn.Sequential(nn.Linear(16, 3)).double(), data()),
            ValueError,
            r"disagree on their outputs",
        ),
        (lambda t, s: (mlp(), t, data()), ValueError, r"no parameter to train"),
        (lambda t, s: ("model", t, data()), TypeError, r"model must be a torch.nn.Module"),
    ],
    ids=["self", "shared", "empty", "one-batch", "tensor", "structure", "no-layer", "type"],
)
def test_bad_arguments(make, exc, match):
    teacher = mlp()
    student = compressed(teacher)
    model, t, batches = make(teacher, student)
    with pytest.raises(exc, match=match):
        tz.distill_(model, t, batches)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"epochs must be an int >= 1, got 0"),
        ({"epochs": True}, r"epochs must be an int >= 1, got True"),
        ({"lr": 0}, r"lr must be None .* got 0"),
        ({"held_out": 1.5}, r"held_out must be a fraction in \(0, 1\), got 1.5"),
        ({"train": "some"}, r"train must be 'factorized' or 'all', got 'some'"),
    ],
)
def test_bad_options(kwargs, match):
    teacher = mlp()
    with pytest.raises(ValueError, match=match):
        tz.distill_(compressed(teacher), teacher, data(), **kwargs)
