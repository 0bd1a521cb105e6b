"""tensorized: tensor-factorized linear layers for PyTorch."""

from .formats import FactorizedMatrix, get_format
from .linear import FactorizedLinear, LinearView
from .plan import Plan
from .ranks import RankBudgetWarning, param_count, resolve_rank
from .serialize import load_config, load_model, save_model
from .shapes import tensorize_shape
from .transform import TensorizeConfig, TensorizeReport, tensorize_

__all__ = [
    "FactorizedLinear",
    "FactorizedMatrix",
    "LinearView",
    "Plan",
    "RankBudgetWarning",
    "TensorizeConfig",
    "TensorizeReport",
    "get_format",
    "load_config",
    "load_model",
    "param_count",
    "resolve_rank",
    "save_model",
    "tensorize_",
    "tensorize_shape",
]

__version__ = "0.1.0"
