"""Factorized weight formats and their registry.

Each format is a :class:`FactorizedMatrix` subclass that owns its knowledge (parameters,
reconstruction, rank policy, strategies with their costs, decomposition, error curve,
closed-form calibration fit, TensorLy conversion); :func:`get_format` maps a
case-insensitive name (or alias) to its class and :func:`register_format` adds one.

============ ================== ===========================================
name         class              aliases
============ ================== ===========================================
``cp``       :class:`CPFormat`       ``parafac``
``tucker``   :class:`TuckerFormat`
``tt``       :class:`TTFormat`       (the plain tensor train)
``blocktt``  :class:`BlockTTFormat`  ``ttm``, ``tt-matrix``, ``ttmatrix``, ``mpo``
``lowrank``  :class:`LowRankFormat`  ``low-rank``
``basis``    :class:`SharedBasisFormat` ``basis-sharing``, ``shared-basis`` (one basis
                                    shared by the layers of a joint group)
``dense``    :class:`DenseFormat`
============ ================== ===========================================
"""

from __future__ import annotations

from ._registry import FORMATS, canonical_name, get_format, register_format
from ._strategy import Strategy, WeightShape, Work
from .base import FactorizedMatrix
from .basis import SharedBasisFormat
from .blocktt import BlockTTFormat
from .cp import CPFormat
from .dense import DenseFormat
from .lowrank import LowRankFormat
from .tt import TTFormat
from .tucker import TuckerFormat

__all__ = [
    "FORMATS",
    "BlockTTFormat",
    "CPFormat",
    "DenseFormat",
    "FactorizedMatrix",
    "LowRankFormat",
    "SharedBasisFormat",
    "Strategy",
    "TTFormat",
    "TuckerFormat",
    "WeightShape",
    "Work",
    "canonical_name",
    "get_format",
    "register_format",
]

for _cls in (
    CPFormat,
    TuckerFormat,
    TTFormat,
    BlockTTFormat,
    LowRankFormat,
    SharedBasisFormat,
    DenseFormat,
):
    register_format(_cls)
del _cls
