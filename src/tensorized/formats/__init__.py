"""Factorized weight formats and their registry.

Each format is a :class:`FactorizedMatrix` subclass; :func:`get_format` maps a
case-insensitive name (or alias) to its class.
"""

from __future__ import annotations

from .base import FactorizedMatrix
from .cp import CPMatrix
from .dense import DenseMatrix
from .lowrank import LowRankMatrix
from .tt import TTMatrix
from .ttm import TTMMatrix
from .tucker import TuckerMatrix

__all__ = [
    "FORMATS",
    "CPMatrix",
    "DenseMatrix",
    "FactorizedMatrix",
    "LowRankMatrix",
    "TTMMatrix",
    "TTMatrix",
    "TuckerMatrix",
    "canonical_name",
    "get_format",
]

FORMATS: dict[str, type[FactorizedMatrix]] = {
    "cp": CPMatrix,
    "tucker": TuckerMatrix,
    "tt": TTMatrix,
    "blocktt": TTMMatrix,
    "lowrank": LowRankMatrix,
    "dense": DenseMatrix,
}

ALIASES: dict[str, str] = {
    "ttm": "blocktt",
    "tt-matrix": "blocktt",
    "ttmatrix": "blocktt",
    "mpo": "blocktt",
    "low-rank": "lowrank",
    "parafac": "cp",
}


def canonical_name(name: str) -> str:
    """The registry name of a (case-insensitive) format name or alias.

    Raises:
        ValueError: for an unknown name, listing the accepted ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"factorization must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        accepted = ", ".join(repr(n) for n in [*FORMATS, *ALIASES])
        raise ValueError(f"unknown factorization {name!r}; accepted (case-insensitive): {accepted}")
    return key


def get_format(name: str) -> type[FactorizedMatrix]:
    """The format class for a (case-insensitive) name or alias, e.g. ``'TTM'``."""
    return FORMATS[canonical_name(name)]
