"""The registry of formats: case-insensitive names and aliases -> format classes.

Kept apart from the format classes so that the rank policy and the planner can look a
format up by name without importing every format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import FactorizedMatrix

__all__ = ["FORMATS", "canonical_name", "get_format", "register_format"]

#: Registered formats by canonical name, in registration order.
FORMATS: dict[str, type[FactorizedMatrix]] = {}
_ALIASES: dict[str, str] = {}


def register_format(cls: type[FactorizedMatrix]) -> type[FactorizedMatrix]:
    """Register a :class:`~tensorized.FactorizedMatrix` subclass under ``cls.name`` and
    ``cls.aliases`` (usable as a class decorator).

    After registration ``FactorizedLinear(..., factorization=cls.name)``, the planner,
    ``tensorize_`` (with calibration and budgets), ``save_model``/``load_model``,
    ``torch.compile`` and ONNX export all work with the format.

    Raises:
        TypeError: if ``cls`` is not a FactorizedMatrix subclass with a str ``name``.
        ValueError: if the name or an alias is taken by another class.
    """
    from .base import FactorizedMatrix

    if not (isinstance(cls, type) and issubclass(cls, FactorizedMatrix)):
        raise TypeError(f"register_format needs a FactorizedMatrix subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip() or name != name.strip().lower():
        raise TypeError(f"{cls.__name__}.name must be a non-empty lower-case str, got {name!r}")
    if not cls.strategies or not all(isinstance(s.name, str) for s in cls.strategies):
        raise TypeError(f"{cls.__name__}.strategies must be a non-empty tuple of Strategy")
    keys = [name, *(a.strip().lower() for a in cls.aliases)]
    for key in keys:
        owner = FORMATS.get(_ALIASES.get(key, key))
        if owner is not None and owner is not cls and owner.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"format name {key!r} is already registered to {owner.__qualname__}; choose "
                f"another name for {cls.__qualname__}"
            )
    FORMATS[name] = cls
    for alias in keys[1:]:
        _ALIASES[alias] = name
    return cls


def canonical_name(name: str) -> str:
    """The registry name of a (case-insensitive) format name or alias.

    Raises:
        TypeError: for a non-string.
        ValueError: for an unknown name, listing the accepted ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"factorization must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        accepted = ", ".join(repr(n) for n in [*FORMATS, *_ALIASES])
        raise ValueError(f"unknown factorization {name!r}; accepted (case-insensitive): {accepted}")
    return key


def get_format(name: str | type[FactorizedMatrix]) -> type[FactorizedMatrix]:
    """The format class for a (case-insensitive) name or alias, e.g. ``'TTM'``; a format
    class is returned as is."""
    if isinstance(name, type):
        return name
    return FORMATS[canonical_name(name)]
