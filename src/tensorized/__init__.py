"""tensorized: tensor-factorized linear layers and embedding tables for PyTorch.

Public modules: ``tensorized`` (this namespace), :mod:`tensorized.formats` (the formats,
their strategies and :func:`~tensorized.formats.register_format`) and
:mod:`tensorized.decompose` (the decompositions); every other module is private.
"""

from ._allocate import allocate_ranks
from ._calibrate import CalibrationResult, calibrate
from ._config import TensorizeConfig
from ._distill import DistillReport, distill_
from ._embedding import EmbeddingView, FactorizedEmbedding
from ._linear import FactorizedLinear
from ._machine import Machine, calibrate_planner, planner_machine, set_planner_machine
from ._plan import Plan, StrategyCost, make_plan, plan_cache_info
from ._ranks import RankBudgetWarning, param_count, rank_caps, resolve_rank
from ._record import record_inputs
from ._report import LayerReport, TensorizeReport
from ._serialize import load_config, load_model, save_model
from ._shapes import tensorize_shape
from ._tensorize import tensorize_
from ._view import LinearView
from .formats import FactorizedMatrix, get_format, register_format

__all__ = [
    "CalibrationResult",
    "DistillReport",
    "EmbeddingView",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "FactorizedMatrix",
    "LayerReport",
    "LinearView",
    "Machine",
    "Plan",
    "RankBudgetWarning",
    "StrategyCost",
    "TensorizeConfig",
    "TensorizeReport",
    "allocate_ranks",
    "calibrate",
    "calibrate_planner",
    "distill_",
    "get_format",
    "load_config",
    "load_model",
    "make_plan",
    "param_count",
    "plan_cache_info",
    "planner_machine",
    "rank_caps",
    "record_inputs",
    "register_format",
    "resolve_rank",
    "save_model",
    "set_planner_machine",
    "tensorize_",
    "tensorize_shape",
]

__version__ = "0.1.0"
