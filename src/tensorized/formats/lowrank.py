"""Plain low-rank format ``W = U diag(s) V^T`` of the untensorized matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .._shapes import Modes
from . import _curves
from ._strategy import Strategy, WeightShape, Work, apply_two_gemms, reconstructed, two_gemm_work
from .base import FactorizedMatrix, Option, balanced_std, member


def _prepare_factorized(w: LowRankFormat, layer: int | None) -> tuple[Tensor, ...]:
    i = 0 if layer is None else layer
    return member(w, "V")[i] * member(w, "s")[i], member(w, "U")[i]


def _work_factorized(s: WeightShape, batch: int) -> Work:
    R = s.rank
    return Work(
        [],
        two_gemm_work(batch, s, R),
        prepare_numel=(s.in_features + s.out_features) * R,
        prepare_buffers=(s.in_features * R,),  # V * s
    )


def _reconstruction(s: WeightShape) -> tuple[list, int]:
    return [(s.out_features, s.rank, s.in_features, 1)], 0


class LowRankFormat(FactorizedMatrix):
    """``U (L, out, r)``, ``s (L, r)``, ``V (L, in, r)`` with ``L = n_layers`` (always kept).

    The modes are only used for bookkeeping; the matrix is not tensorized.
    """

    name = "lowrank"
    aliases = ("low-rank",)
    rank_kind = "int"
    closed_form_exact = True
    whitened_curve = True
    tensorly_type = "CPTensor"
    rank: int
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            apply_two_gemms,
            _work_factorized,
            "x through V diag(s), then U (two GEMMs)",
        ),
        reconstructed(_reconstruction),
    )

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        from math import prod

        return (min(prod(out_modes), prod(in_modes)),)

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        from math import prod

        return n_layers * int(rank) * (prod(out_modes) + prod(in_modes) + 1)

    def _build(self, factory: dict) -> None:
        L, r = self.n_layers, self.rank
        self.U = nn.Parameter(torch.empty(L, self.out_features, r, **factory))
        self.s = nn.Parameter(torch.empty(L, r, **factory))
        self.V = nn.Parameter(torch.empty(L, self.in_features, r, **factory))

    def _to_matrix(self, layer: int | None) -> Tensor:
        i = 0 if layer is None else layer
        return (self.U[i] * self.s[i]) @ self.V[i].T

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        i = 0 if layer is None else layer
        return (self.U[i].index_select(0, index) * self.s[i]) @ self.V[i].T

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        r = shape.rank
        return Work([], [(n, r, shape.in_features, 1)], apply_numel=2 * n * r)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, self.rank, 2)
        nn.init.normal_(self.U, 0.0, sigma)
        nn.init.normal_(self.V, 0.0, sigma)
        nn.init.ones_(self.s)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.s[layer]

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        i = 0 if layer is None else layer
        U, V = self.U[i].double() * self.s[i].double(), self.V[i].double()
        return float(U.sum(0) @ V.sum(0)), float(((U.T @ U) * (V.T @ V)).sum())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        matrix = tensor.reshape(self.n_layers, self.out_features, self.in_features)
        U, S, V = decompose.lowrank(matrix, self.rank, **kwargs)
        return {"U": U, "s": S, "V": V}

    @classmethod
    def error_curve(
        cls,
        weight: Tensor,
        in_modes: Modes,
        out_modes: Modes,
        n_layers: int,
        fractions: Sequence[float],
        decomposition_kwargs: dict[str, Any],
    ) -> list[Option]:
        """Every rank, with the exact error from the singular values (Eckart-Young-Mirsky;
        summed over the layers of a joint group)."""
        W = weight.to(torch.float64).reshape(n_layers, *weight.shape[-2:])
        s2 = torch.linalg.svdvals(W).pow(2).sum(0)
        return _curves.spectrum(cls, in_modes, out_modes, n_layers, s2)

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """The whitened truncated SVD (SVD-LLM, Wang et al., 2024; ASVD, Yuan et al., 2023):
        the best rank-r ``What`` in ``||(W - What) S||_F`` with ``S S^T = gram`` is
        ``U_r U_r^T W``, ``U_r`` the leading eigenvectors of ``W C W^T`` (``S`` is never
        inverted)."""
        i = 0 if layer is None else layer
        W, C, r = weight.to(torch.float64), gram.to(torch.float64), self.rank
        out_features, in_features = W.shape
        if out_features <= in_features:
            U_r = torch.linalg.eigh(W @ C @ W.T)[1].flip(-1)[:, :r]
        else:
            lam, vecs = torch.linalg.eigh(C)
            S = vecs * lam.clamp_min(0).sqrt()
            U_r = torch.linalg.svd(W @ S, full_matrices=False)[0][:, :r]
        A, sigma, Bh = torch.linalg.svd(U_r.T @ W, full_matrices=False)
        self.U[i].copy_(U_r @ A)
        self.s[i].copy_(sigma)
        self.V[i].copy_(Bh.T)
        return True

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """An order-2 ``CPTensor`` (``n_layers=1`` only: the layers are independent)."""
        from tensorly.cp_tensor import CPTensor

        if self.n_layers > 1:
            raise ValueError(
                "a 'lowrank' layer with n_layers > 1 holds independent matrices, not one "
                f"tensor (n_layers={self.n_layers}); convert layer i with "
                "layer.get_linear(i).to_linear()"
            )
        return CPTensor((convert(self.s[0]), [convert(self.U[0]), convert(self.V[0])]))

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        """An order-2 ``CPTensor`` of the matrix's shape (with more than two modes in all:
        with exactly two, the CP format takes it)."""
        from math import prod

        from tensorly.cp_tensor import CPTensor

        matrix = (prod(out_modes), prod(in_modes))
        if not isinstance(obj, CPTensor) or tuple(obj.shape) != matrix:
            return None
        if len(in_modes) + len(out_modes) <= 2:
            return None
        s, (u, v) = convert(obj.weights), (convert(f) for f in obj.factors)
        module = cls.empty(in_modes, out_modes, int(s.shape[0]), device=s.device, dtype=s.dtype)
        module.load_values({"U": u[None], "s": s[None], "V": v[None]})
        return module
