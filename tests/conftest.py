"""Shared test settings: float64 oracles, a fixed seed per test, the planner's fallback
machine constants (no measurement: plans are the same on every machine)."""

import importlib.util
import os

os.environ["TENSORIZED_CALIBRATE"] = "0"  # before tensorized is imported anywhere

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _keep_tensorly_backend():
    """Importing tltorch sets TensorLy's global backend to 'pytorch' (and a test may set it):
    every test leaves it as it found it, for the tests that run after it on the same worker."""
    if importlib.util.find_spec("tensorly") is None:
        yield
        return
    import tensorly

    before = tensorly.get_backend()
    yield
    tensorly.set_backend(before)
