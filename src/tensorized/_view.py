"""``LinearView``: one layer of a joint :class:`~tensorized.FactorizedLinear`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ._index import normalize_index

if TYPE_CHECKING:
    from ._linear import FactorizedLinear

__all__ = ["LinearView"]


class LinearView(nn.Module):
    """Layer ``indices`` of a :class:`FactorizedLinear` with ``n_layers > 1``, sharing its
    parameters: training the view trains the shared tensor.

    Shapes:
        ``x``: ``(..., in_features)`` -> ``(..., out_features)``.
    """

    def __init__(self, parent: FactorizedLinear, indices: int) -> None:
        super().__init__()
        self.parent = parent
        self.indices = normalize_index(indices, parent.n_layers)

    @property
    def in_features(self) -> int:
        return self.parent.in_features

    @property
    def out_features(self) -> int:
        return self.parent.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.parent(x, self.indices)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` copy of this layer."""
        return self.parent.to_linear(self.indices)

    def __repr__(self) -> str:
        p = self.parent
        return (
            f"LinearView(indices={self.indices} of {p.n_layers}, in_features={p.in_features}, "
            f"out_features={p.out_features}, factorization={p.factorization!r})"
        )
