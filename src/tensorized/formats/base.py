"""The interface every factorized weight format implements."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ranks import ConcreteRank, RankSpec, param_count, resolve_rank
from ..shapes import Modes, validate_modes

#: Parameter counts above this (2**50, about 4 PiB in float32) are refused before allocating.
MAX_PARAMS = 1 << 50


class FactorizedMatrix(nn.Module):
    """A weight of shape ``([n_layers,] out_features, in_features)`` kept in a low-rank format.

    The matrix is viewed as the tensor ``([n_layers,] *out_modes, *in_modes)``. Subclasses
    hold the factors as ``nn.Parameter`` s and implement ``_to_matrix``, the pair
    ``_prepare_factorized`` / ``_apply_factorized`` (and a pair per extra strategy),
    ``_init_factors`` and ``_decompose``.

    Args:
        in_modes: modes of the input features, e.g. ``(8, 8, 16)`` for 1024.
        out_modes: modes of the output features.
        rank: ``'same'``, a float (fraction of the dense parameter count), an int or a tuple
            of concrete ranks (see :mod:`tensorized.ranks`).
        n_layers: size of the leading layer mode (1: a single matrix, no layer mode).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    name: ClassVar[str]
    #: Ways to compute ``x @ W.T`` (see :mod:`tensorized.plan`); a name ``s`` other than
    #: 'factorized' and 'reconstructed' is implemented by a method ``_contract_s``.
    strategies: ClassVar[tuple[str, ...]] = ("factorized", "reconstructed")

    def __init__(
        self,
        in_modes: Modes,
        out_modes: Modes,
        rank: RankSpec = "same",
        n_layers: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_modes = validate_modes(in_modes, None, "in_modes")
        self.out_modes = validate_modes(out_modes, None, "out_modes")
        self.in_features = math.prod(self.in_modes)
        self.out_features = math.prod(self.out_modes)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int):
            raise TypeError(
                f"n_layers must be an int >= 1, got {type(n_layers).__name__} {n_layers!r}"
            )
        if n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        self.n_layers = n_layers
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype (or None), got {dtype!r}")
        self.rank: ConcreteRank = resolve_rank(
            self.name, self.in_modes, self.out_modes, rank, n_layers
        )
        count = param_count(self.name, self.in_modes, self.out_modes, self.rank, n_layers)
        if count > MAX_PARAMS:  # fail before torch's allocator (its sizes overflow at 2**63)
            raise ValueError(
                f"factorization={self.name!r} with in modes {self.in_modes}, out modes "
                f"{self.out_modes}, n_layers={n_layers} and rank={self.rank} needs {count:.3g} "
                f"parameters, more than the {MAX_PARAMS:.3g} any machine can hold: use a "
                f"smaller rank (or a format that compresses more)"
            )
        factory = {"device": device, "dtype": dtype}
        self._build(factory)
        # Shapes never change after construction; kept as plain constants so that planning
        # under torch.compile needs no module (see tensorized.plan.WeightShape).
        cores = getattr(self, "cores", ())
        self.shape_signature: tuple = (
            self.name,
            self.in_modes,
            self.out_modes,
            self.rank,
            self.n_layers,
            tuple(tuple(cores[k].shape) for k in range(len(cores))),
            self.strategies,
            self.num_params,
        )
        self.reset_parameters()

    # ---------------------------------------------------------------- sizes

    @property
    def num_params(self) -> int:
        """Number of stored parameters (equals :func:`tensorized.ranks.param_count`)."""
        return sum(p.numel() for p in self.parameters())

    def any_requires_grad(self) -> bool:
        """Whether any parameter requires a gradient (then nothing may be cached)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def dense_params(self) -> int:
        """Parameters of the same weight stored densely."""
        return self.n_layers * self.out_features * self.in_features

    def extra_repr(self) -> str:
        layers = f", n_layers={self.n_layers}" if self.n_layers > 1 else ""
        return (
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, rank={self.rank}{layers}, "
            f"params={self.num_params} ({self.num_params / self.dense_params:.3g} of dense)"
        )

    # ---------------------------------------------------------------- layers

    def _check_layer(self, layer: int | None) -> int | None:
        """Validate ``layer``; returns None for "all layers" (or the only one)."""
        if layer is None:
            return None
        if isinstance(layer, Tensor) and layer.numel() == 1 and not layer.is_floating_point():
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(
                f"layer={layer} is out of range for a weight with n_layers={self.n_layers}"
            )
        if self.n_layers == 1:
            return None
        return layer % self.n_layers

    # ---------------------------------------------------------------- compute

    def to_matrix(self, layer: int | None = None) -> Tensor:
        """Reconstruct the dense weight.

        Args:
            layer: which layer (``None``: all layers).

        Returns:
            ``(out_features, in_features)``, or ``(n_layers, out_features, in_features)`` when
            ``layer is None`` and ``n_layers > 1``.
        """
        layer = self._check_layer(layer)
        if layer is None and self.n_layers > 1:
            return torch.stack([self._to_matrix(i) for i in range(self.n_layers)])
        return self._to_matrix(layer)

    def contract(self, x: Tensor, layer: int | None = None, strategy: str = "factorized") -> Tensor:
        """Compute ``x @ W.T``, by default without forming ``W``.

        Args:
            x: ``(..., in_features)``.
            layer: which layer; required when ``n_layers > 1``.
            strategy: one of :attr:`strategies` (see :mod:`tensorized.plan`):
                ``'factorized'`` contracts ``x`` with the factors, ``'reconstructed'`` forms
                ``W`` first; some formats have hybrids.

        Returns:
            ``(..., out_features)``.
        """
        if strategy not in self.strategies:
            raise ValueError(
                f"strategy must be one of {self.strategies} for factorization={self.name!r}, "
                f"got {strategy!r}"
            )
        self.check_input(x)
        layer = self._check_layer(layer)
        if layer is None and self.n_layers > 1:
            raise ValueError(
                f"this weight holds n_layers={self.n_layers} layers; pass layer=i to pick one"
            )
        lead = x.shape[:-1]
        operands = self.prepare(strategy, layer)
        y = self.apply(strategy, x.reshape(-1, self.in_features), operands)
        return y.reshape(*lead, self.out_features)

    def check_input(self, x: Tensor) -> None:
        """Raise a ``ValueError`` unless ``x`` is ``(..., in_features)``, a ``TypeError`` if its
        dtype differs from the parameters' (outside autocast, which casts them itself)."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} features in its last dim, got "
                f"input shape {tuple(x.shape)}"
            )
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the weight's parameters are {dtype}: convert one "
                f"(x.to({dtype}) or layer.to({x.dtype}))"
            )

    # Every strategy is split in two: ``prepare`` does the work that depends on the weight
    # only (so inference can cache it), ``apply`` the work on the input.

    def prepare(self, strategy: str, layer: int | None) -> tuple[Tensor, ...]:
        """Weight-only operands of ``strategy`` for a validated ``layer``."""
        if strategy == "reconstructed":
            return (self._to_matrix(layer),)
        return getattr(self, f"_prepare_{strategy}")(layer)

    def apply(
        self, strategy: str, x: Tensor, operands: tuple[Tensor, ...], bias: Tensor | None = None
    ) -> Tensor:
        """``x (batch, in) -> (batch, out)`` (plus ``bias``) from prepared operands."""
        if strategy == "reconstructed":
            return F.linear(x, operands[0], bias)
        return getattr(self, f"_apply_{strategy}")(x, *operands, bias=bias)

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Random factors whose reconstructed weight has standard deviation ``std``.

        Each factor is drawn with a balanced scale (the variance of the product is split
        evenly over the factors, which for TT formats means accounting for the product of
        the ranks), then all scale-carrying factors are rescaled by the same amount so that
        the empirical std of the reconstruction is exactly ``std`` (and each layer's, with a
        layer mode). The std is measured from contractions of the factors, without forming
        the matrix.

        Args:
            std: target std; defaults to ``1 / sqrt(3 * in_features)``, the std of
                ``nn.Linear``'s uniform initialization.
        """
        if std is None:
            std = 1.0 / math.sqrt(3 * self.in_features)
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        self._init_factors(std)
        scaled = self._scaled_factors()
        if std == 0:
            scaled[0].zero_()
            return
        layers = [None] if self.n_layers == 1 else list(range(self.n_layers))
        stds = [self._empirical_std(layer) for layer in layers]
        if any(s is None or s == 0 for s in stds):
            return  # too costly to measure exactly: the balanced draw is right in expectation
        overall = math.sqrt(sum(s * s for s in stds) / len(stds))
        ratio = (std / overall) ** (1.0 / len(scaled))
        for p in scaled:
            p.mul_(ratio)
        if self.n_layers > 1:
            # The common rescale fixes the overall std; each layer is then corrected alone
            # through the slice of the parameters that only it uses.
            for layer, s in zip(layers, stds):
                self._layer_slice(layer).mul_(overall / s)

    @torch.no_grad()
    def _empirical_std(self, layer: int | None) -> float | None:
        """Std of the entries of one layer's weight, from its first two moments."""
        moments = self._moments(layer)
        if moments is None:
            return None
        total, total_sq = moments
        n = self.out_features * self.in_features
        return math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0))

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        """``(sum, sum of squares)`` of one layer's weight entries, or None if too costly.

        This fallback reconstructs the weight; formats override it with contractions of
        the factors that never form the matrix.
        """
        W = self._to_matrix(layer).double()
        return float(W.sum()), float(W.pow(2).sum())

    # ---------------------------------------------------------------- decomposition

    @classmethod
    def from_matrix(
        cls,
        matrix: Tensor,
        in_modes: Modes,
        out_modes: Modes,
        rank: RankSpec = "same",
        **decomposition_kwargs: Any,
    ) -> FactorizedMatrix:
        """Decompose a dense weight into this format.

        Args:
            matrix: ``(out_features, in_features)`` or ``(n_layers, out_features,
                in_features)``.
            in_modes: modes of ``in_features``.
            out_modes: modes of ``out_features``.
            rank: as in the constructor.
            **decomposition_kwargs: passed to the decomposition in
                :mod:`tensorized.decompose` (e.g. ``n_iter_max``, ``tol``, ``generator``).

        Returns:
            A module of this format on the matrix's device and dtype.
        """
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.ndim not in (2, 3):
            raise ValueError(
                f"matrix must have shape (out, in) or (n_layers, out, in), got "
                f"{tuple(matrix.shape)}"
            )
        if matrix.ndim == 3 and matrix.shape[0] == 0:
            raise ValueError(f"matrix of shape {tuple(matrix.shape)} holds no layer (n_layers=0)")
        n_layers = matrix.shape[0] if matrix.ndim == 3 else 1
        out_modes = validate_modes(out_modes, matrix.shape[-2], "out_modes")
        in_modes = validate_modes(in_modes, matrix.shape[-1], "in_modes")
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must have a floating dtype, got {matrix.dtype}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix contains NaN or Inf values; cannot decompose it")
        # The random init is overwritten below: keep it off the caller's RNG stream.
        with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):
            module = cls(
                in_modes, out_modes, rank, n_layers, device=matrix.device, dtype=matrix.dtype
            )
        tensor = matrix.reshape(*((n_layers,) if n_layers > 1 else ()), *out_modes, *in_modes)
        with torch.no_grad():
            factors = module._decompose(tensor.detach(), **decomposition_kwargs)
            for name, value in factors.items():
                module.get_parameter(name).copy_(value)
        return module

    # ---------------------------------------------------------------- to implement

    def _build(self, factory: dict) -> None:
        """Create the parameters (uninitialized) for ``self.rank``."""
        raise NotImplementedError

    def _to_matrix(self, layer: int | None) -> Tensor:
        """The ``(out, in)`` matrix of ``layer`` (``None`` when ``n_layers == 1``)."""
        raise NotImplementedError

    def _prepare_factorized(self, layer: int | None) -> tuple[Tensor, ...]:
        """Weight-only operands of the 'factorized' contraction of ``layer``."""
        raise NotImplementedError

    def _apply_factorized(self, x: Tensor, *operands: Tensor, bias: Tensor | None) -> Tensor:
        """``(batch, in) -> (batch, out)``: contract ``x`` with the prepared factors."""
        raise NotImplementedError

    def _init_factors(self, std: float) -> None:
        """Draw the factors at a balanced scale whose product has std about ``std``."""
        raise NotImplementedError

    def _scaled_factors(self) -> list[nn.Parameter]:
        """The factors that share a final common rescaling in :meth:`reset_parameters`."""
        raise NotImplementedError

    def _layer_slice(self, layer: int) -> Tensor:
        """A view of the parameters that scales only ``layer``'s weight (``n_layers > 1``)."""
        raise NotImplementedError

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        """Decompose the tensorized weight; returns ``{parameter name: value}``."""
        raise NotImplementedError


def balanced_std(std: float, n_terms: int, n_factors: int) -> float:
    """Per-factor std so that a sum of ``n_terms`` products of ``n_factors`` iid normal
    entries has standard deviation ``std``: ``var = n_terms * prod(sigma_k^2)``."""
    return (std**2 / max(n_terms, 1)) ** (1.0 / (2 * n_factors))


def two_gemms(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ a) @ b.T + bias``: the apply step of every rank-``r`` factor pair."""
    return F.linear(x @ a, b, bias)


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    # Under autocast y has the autocast dtype and the bias does not: cast the bias, as
    # F.linear does, rather than promote the output back to the parameters' dtype.
    return y if bias is None else y + bias.to(y.dtype)
