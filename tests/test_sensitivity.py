"""Output sensitivity: the random-probe estimate against its closed form on a linear model."""

import torch
from torch import nn

from tensorized._sensitivity import output_sensitivity

F64 = torch.float64


class Parallel(nn.Module):
    """``f(x) = a(x) + 0.1 * b(x)``: noise in a layer's output reaches f unchanged (a) or
    scaled by 0.1 (b), so ``s = ||y||^2 / ||f||^2`` times 1 or 0.01."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32, dtype=F64)
        self.b = nn.Linear(16, 32, dtype=F64)

    def forward(self, x):
        return self.a(x) + 0.1 * self.b(x)


def test_sensitivity_matches_the_linear_closed_form():
    torch.manual_seed(0)
    model = Parallel()
    data = [torch.randn(256, 16, dtype=F64) for _ in range(4)]
    s = output_sensitivity(model, {"a": [model.a], "b": [model.b], "ab": [model.a, model.b]}, data)
    with torch.no_grad():
        x = torch.cat(data)
        f, ya, yb = model(x), model.a(x), model.b(x)
    norm = f.pow(2).sum()
    # E||eps rms(y) z||^2 = eps^2 ||y||^2 per batch; 32k probe entries: a relative spread of
    # about sqrt(2 / 32768) < 1%, so 5% is a loose bound.
    expected = {
        "a": float(ya.pow(2).sum() / norm),
        "b": float(0.01 * yb.pow(2).sum() / norm),
    }
    expected["ab"] = expected["a"] + expected["b"]  # independent noises add
    for name, value in expected.items():
        assert abs(s[name] - value) <= 0.05 * value, (name, s[name], value)
    assert model.training  # flags restored, hooks gone
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_sensitivity_without_data_is_neutral():
    model = Parallel()
    assert output_sensitivity(model, {"a": [model.a]}, []) == {"a": 1.0}
