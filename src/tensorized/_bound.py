"""The weight binding shared by the layers that hold a :class:`FactorizedMatrix` as
``weight`` (:class:`~tensorized.FactorizedLinear`, :class:`~tensorized.FactorizedEmbedding`).

Their ``forward`` reads the weight module and its parameters from a plain tuple, ``_bound``,
instead of module attribute lookups and parameter generators (about a microsecond each, most
of a batch-1 call's Python). The tuple is rebound whenever the weight or its parameter
objects may be replaced: ``layer.weight = ...``, ``load_state_dict`` (``assign=True``) and
the conversions of ``_apply`` (``to()``, ``half()``, ``to_empty()``: they make new parameter
objects under ``torch.__future__.set_overwrite_module_params_on_conversion(True)``).
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from .formats import FactorizedMatrix


class BoundWeight(nn.Module):
    """Keeps ``_bound = (weight, its parameters)`` current; subclasses call
    :meth:`_bind_weight` once ``weight`` is set, and extend :meth:`_weight_replaced` and
    :meth:`_loaded` for what else depends on the weight."""

    _bound: tuple[FactorizedMatrix, tuple[nn.Parameter, ...]]

    def _bind_weight(self) -> None:
        self._bind_parameters()
        self.register_load_state_dict_post_hook(_after_load)

    def _bind_parameters(self) -> None:
        weight = cast(FactorizedMatrix, self._modules["weight"])
        self._bound = (weight, tuple(weight.parameters()))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "weight" and "_bound" in self.__dict__:
            if not isinstance(value, FactorizedMatrix):
                raise TypeError(
                    f"weight must be a tensorized.FactorizedMatrix, got {type(value).__name__}"
                )
            self._bind_parameters()
            self._weight_replaced(value)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        super()._apply(fn, recurse)
        self._bind_parameters()
        return self

    def _weight_replaced(self, weight: FactorizedMatrix) -> None:
        """Called after ``layer.weight = weight`` (the tuple already rebound)."""

    def _loaded(self) -> None:
        """Called after ``load_state_dict``, which may have replaced the parameter objects."""
        self._bind_parameters()


def _after_load(module: nn.Module, incompatible: Any) -> None:
    if isinstance(module, BoundWeight):
        module._loaded()
