"""Shared-basis format: the layers of a joint group share one basis of their input space.

``W_l = U_l V^T`` with ``V (in, r)`` common to all ``n_layers`` layers and ``U_l (out, r)``
per layer: ``r (in + n_layers * out)`` parameters, against ``n_layers * r (out + in)`` for
independent low-rank layers of the same rank. This is cross-layer Basis Sharing (Wang et
al., 2024, "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model
Compression"): the basis is on the input side, fitted in the input-whitened norm. (On
MiniLM's encoder at half the weights, an output-side basis doubled the whitened error of
independent layers; the input-side one matched or beat them for query, key, value and the
FFN output.) With ``n_layers=1`` it is a plain low-rank matrix ``U V^T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from .. import decompose
from .._ops import symmetric_root
from .._shapes import Modes
from . import _curves
from ._strategy import Strategy, WeightShape, Work, apply_two_gemms, reconstructed, two_gemm_work
from .base import FactorizedMatrix, Option, balanced_std, member


def _prepare_factorized(w: SharedBasisFormat, layer: int | None) -> tuple[Tensor, ...]:
    return member(w, "V"), member(w, "U")[0 if layer is None else layer]


def _work_factorized(s: WeightShape, batch: int) -> Work:
    # no prepare work: the operands are parameters and a slice of one
    return Work([], two_gemm_work(batch, s, s.rank))


def _reconstruction(s: WeightShape) -> tuple[list, int]:
    return [(s.out_features, s.rank, s.in_features, 1)], 0


def _stacked(weight: Tensor, in_features: int) -> Tensor:
    """``[W_1; ...; W_L]``, ``(L * out, in)``, from the weight as a matrix, a stack of them
    or a tensorized weight: its row space is what a shared basis spans."""
    return weight.reshape(-1, in_features)


class SharedBasisFormat(FactorizedMatrix):
    """``V (in, r)`` shared by every layer, ``U (L, out, r)`` per layer (``L = n_layers``)."""

    name = "basis"
    whitened_curve = True
    aliases = ("basis-sharing", "shared-basis")
    rank_kind = "int"
    rank: int
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            apply_two_gemms,
            _work_factorized,
            "x through the shared basis V, then U_l (two GEMMs)",
        ),
        reconstructed(_reconstruction),
    )

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        # beyond in the basis spans every input; beyond L * out, every layer's rows
        return (min(prod(in_modes), n_layers * prod(out_modes)),)

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        return int(rank) * (prod(in_modes) + n_layers * prod(out_modes))

    def _build(self, factory: dict) -> None:
        r = self.rank
        self.U = nn.Parameter(torch.empty(self.n_layers, self.out_features, r, **factory))
        self.V = nn.Parameter(torch.empty(self.in_features, r, **factory))

    def _to_matrix(self, layer: int | None) -> Tensor:
        return self.U[0 if layer is None else layer] @ self.V.T

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        return self.U[0 if layer is None else layer].index_select(0, index) @ self.V.T

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        return Work([], [(n, shape.rank, shape.in_features, 1)], apply_numel=n * shape.rank)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, self.rank, 2)
        nn.init.normal_(self.U, 0.0, sigma)
        nn.init.normal_(self.V, 0.0, sigma)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.U[layer]

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        U, V = self.U[0 if layer is None else layer].double(), self.V.double()
        return float(U.sum(0) @ V.sum(0)), float(((U.T @ U) * (V.T @ V)).sum())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        # The truncated SVD of the layers stacked, [W_1; ...; W_L] = [U_1; ...; U_L] S V^T:
        # the best shared basis in the Frobenius norm summed over the layers.
        # U_l = W_l V (equal to the SVD's U S) keeps a zero layer exactly zero.
        stacked = _stacked(tensor, self.in_features)
        V = decompose.lowrank(stacked[None], self.rank, **kwargs).V[0]
        per_layer = (stacked.to(V.dtype) @ V).reshape(self.n_layers, self.out_features, -1)
        return {"U": per_layer.to(tensor.dtype), "V": V.to(tensor.dtype)}

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
        """Every rank, with the exact error: the tail of the squared singular values of the
        stacked layers (Eckart-Young-Mirsky)."""
        s2 = torch.linalg.svdvals(_stacked(weight.to(torch.float64), prod(in_modes))).pow(2)
        return _curves.spectrum(cls, in_modes, out_modes, n_layers, s2)

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """Layer ``layer``'s best ``U_l`` for the current basis in the norm
        ``||(W - U_l V^T) S||_F`` (``S S^T = gram``): ``W C V (V^T C V)^{-1}``. The basis
        itself is fitted to all layers at once by :meth:`fit_closed_form_all`."""
        W, C, V = weight.double(), gram.double(), self.V.double()
        CV = C @ V
        normal = V.T @ CV
        ridge = 1e-10 * float(normal.diagonal().mean()) + torch.finfo(torch.float64).tiny
        eye = torch.eye(self.rank, dtype=normal.dtype, device=normal.device)
        self.U[0 if layer is None else layer].copy_(
            torch.linalg.solve(normal + ridge * eye, (W @ CV).T).T
        )
        return True

    @torch.no_grad()
    def fit_closed_form_all(
        self,
        weights: Sequence[Tensor],
        grams: Sequence[Tensor],
        importance: Sequence[float] | None = None,
    ) -> bool:
        """The whitened Basis Sharing fit of ``sum_l importance_l ||(W_l - U_l V^T) S_l||_F^2``
        (``S_l S_l^T = grams[l]``): the basis from the truncated SVD of the stacked
        ``sqrt(importance_l) W_l S`` with one whitening ``S S^T = C`` (the mean of the
        layers' grams, each scaled to unit mean variance), mapped back by ``S^{-T}``; then each
        layer's exact ``U_l`` for that basis and its own gram (:meth:`fit_closed_form`).
        Exact for one layer (the whitened truncated SVD) and for equal grams; otherwise a
        start that calibration refines."""
        scales = [1.0] * len(weights) if importance is None else list(importance)
        Cs = [C.double() for C in grams]
        mean = torch.stack([C / C.diagonal().mean().clamp_min(1e-300) for C in Cs]).mean(0)
        root, inverse_root = symmetric_root(mean, floor=1e-12)  # S and S^{-T} = S^{-1}
        stacked = torch.cat([(W.double() @ root) * s**0.5 for W, s in zip(weights, scales)])
        Vr = torch.linalg.svd(stacked, full_matrices=False)[2][: self.rank].T  # (in, r)
        basis = inverse_root @ Vr
        basis = torch.linalg.qr(basis)[0]  # the same span, well conditioned
        self.V.copy_(basis)
        # each layer's U_l for this basis and its own gram: the per-layer default
        return super().fit_closed_form_all(weights, Cs)
