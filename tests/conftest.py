"""Shared test settings: float64 oracles, a fixed seed per test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
