"""Explicit, reversible caching of a layer's weight-only operands (``merge`` / ``unmerge``).

By default a :class:`~tensorized.FactorizedLinear` holds its parameters and nothing larger.
``merge()`` keeps the ``prepare`` operands of one strategy (e.g. the rebuilt matrix), as PEFT's
``merge()`` folds an adapter and opt_einsum's ``constants=`` precomputes constant operands;
``unmerge()`` drops them. The kept operands are derived tensors, never state: they are
dropped by ``train()`` and ``load_state_dict``, rebuilt by ``to()``, and never pickled.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from ._bound import BoundWeight
from ._plan import any_batch_strategy
from .formats import Strategy

if TYPE_CHECKING:
    from .formats import FactorizedMatrix

__all__ = ["Merging"]

_M = TypeVar("_M", bound="Merging")


class _Merged(NamedTuple):
    """Operands kept by :meth:`FactorizedLinear.merge`: one tuple per layer index."""

    strategy: Strategy
    operands: dict[int | None, tuple[Tensor, ...]]


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Merging(BoundWeight):
    """The ``merge`` / ``unmerge`` half of :class:`~tensorized.FactorizedLinear` (a mixin:
    it needs the layer's ``weight`` and ``implementation``)."""

    _merged: _Merged | None

    if TYPE_CHECKING:  # provided by FactorizedLinear
        weight: FactorizedMatrix

        @property
        def implementation(self) -> str: ...

        @property
        def n_layers(self) -> int: ...

    # ------------------------------------------------------------------ explicit caching

    @torch.no_grad()
    def merge(self: _M, implementation: str | None = None) -> _M:
        """Keep the weight-only operands of one strategy (e.g. the rebuilt dense matrix) so
        that inference without autograd only pays the input side. Reversible
        (:meth:`unmerge`); returns ``self``.

        The kept operands are a snapshot of the parameters: ``train()``, ``load_state_dict``
        and ``reset_parameters`` drop them, ``to()`` rebuilds them, and a forward that
        records gradients computes from the parameters and drops them. After writing to
        parameters by other means (``p.data``, an optimizer step outside a forward), call
        ``merge()`` again. Never saved: state dicts, pickles and files hold parameters only.

        Args:
            implementation: the strategy to keep; ``None``: the fixed ``implementation``, or
                for ``'auto'`` the strategy with the least worst-case estimated slowdown over
                batch sizes 1 to 4096 when its operands are kept.

        Example:
            >>> import tensorized as tz
            >>> layer = tz.FactorizedLinear((8, 8), (8, 8), factorization="blocktt", rank=0.2)
            >>> _ = layer.eval().merge("reconstructed")
            >>> layer.merged_numel  # the dense 64 x 64 matrix
            4096
        """
        name = implementation or self.implementation
        if name == "auto":
            param = self._bound[1][0]
            name = any_batch_strategy(
                self.weight,
                training=False,
                dtype=param.dtype,
                device_type=param.device.type,
                cached=True,
            )
        strategy = self.weight.strategy(name)
        layers: list[int | None] = [None] if self.n_layers == 1 else list(range(self.n_layers))
        with _no_autocast(self._bound[1][0].device.type):
            operands = {
                i: tuple(t.detach() for t in strategy.prepare(self.weight, i)) for i in layers
            }
        self._merged = _Merged(strategy, operands)
        return self

    def unmerge(self: _M) -> _M:
        """Drop the operands kept by :meth:`merge` (the layer then holds its parameters
        only); returns ``self``."""
        self._merged = None
        return self

    @property
    def merged(self) -> bool:
        """Whether :meth:`merge` operands are kept."""
        return self._merged is not None

    @property
    def merged_numel(self) -> int:
        """Elements held by :meth:`merge` beyond the parameters (0 when not merged)."""
        if self._merged is None:
            return 0
        own = {p.untyped_storage().data_ptr() for p in self.parameters()}
        seen, total = set(), 0
        for ops in self._merged.operands.values():
            for t in ops:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in own and ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes() // t.element_size()
        return total

    def train(self: _M, mode: bool = True) -> _M:
        """As ``nn.Module.train``; switching to training drops :meth:`merge` operands."""
        if mode:
            self.unmerge()
        return super().train(mode)

    def _apply(self: _M, fn: Any, recurse: bool = True) -> _M:
        # to(), cuda(), half(), to_empty(): move the parameters, then rebuild kept operands
        # from them (they are derived tensors, not state).
        merged = self._merged
        self._merged = None
        super()._apply(fn, recurse)  # BoundWeight rebinds the parameters
        if merged is not None and not any(p.is_meta for p in self._bound[1]):
            self.merge(merged.strategy.name)
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Pickles (torch.save of a module, deepcopy) hold parameters and buffers only; a
        # merged layer is merged again when unpickled.
        state = self.__dict__.copy()
        merged = state.pop("_merged", None)
        state["_merge_on_load"] = None if merged is None else merged.strategy.name
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        name = state.pop("_merge_on_load", None)
        self.__dict__.update(state)
        self._merged = None
        if name is not None:
            self.merge(name)
