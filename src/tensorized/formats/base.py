"""The interface every factorized weight format implements, and its defaults.

A format owns all its knowledge in its class: the parameters (``_build``), the dense
reconstruction, its rank policy (:meth:`FactorizedMatrix.rank_caps`,
:meth:`~FactorizedMatrix.param_count`, the rank family a budget is searched in), its
strategies (computation and cost side by side, see :mod:`tensorized.formats._strategy`),
its decomposition, its error curve for budgets, its closed-form calibration fit where one
exists, and its TensorLy conversion. The rest of the library is generic over this interface;
:func:`tensorized.formats.register_format` adds a format.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._index import normalize_index
from .._ops import kronecker_whiten, mode_dot
from .._shapes import Modes, validate_modes
from ._strategy import Gemm, Strategy, WeightShape, Work

#: Parameter counts above this (2**50, about 4 PiB in float32) are refused before allocating.
MAX_PARAMS = 1 << 50

#: ``(parameters, squared error, concrete rank)``: one point of an error curve.
Option = tuple[int, float, Any]


class FactorizedMatrix(nn.Module):
    """A weight of shape ``([n_layers,] out_features, in_features)`` kept in a low-rank format.

    The matrix is viewed as the tensor ``([n_layers,] *out_modes, *in_modes)``.

    Args:
        in_modes: modes of the input features, e.g. ``(8, 8, 16)`` for 1024.
        out_modes: modes of the output features.
        rank: ``'same'``, a float (fraction of the dense parameter count), an int or a tuple
            of concrete ranks (see :func:`tensorized.resolve_rank`).
        n_layers: size of the leading layer mode (1: a single matrix, no layer mode).
        device: device of the parameters (``'meta'`` works: nothing is measured there).
        dtype: dtype of the parameters.

    Subclasses set the class attributes below and implement ``_build``, ``_to_matrix``,
    ``_init_factors``, ``_scaled_factors``, ``_layer_slice`` and ``_decompose``; the rank
    policy, error curve, closed-form fit, moments and TensorLy conversion have defaults.
    """

    #: Registered name (lower case) and accepted aliases.
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Ways to compute ``x @ W.T``; the first is the default fixed one.
    strategies: ClassVar[tuple[Strategy, ...]] = ()
    #: A strategy at least as cheap as every other at every batch size, mode, dtype and
    #: device (its ``prepare`` only selects stored parameters): ``'auto'`` uses it without
    #: consulting the planner. ``None``: the planner chooses.
    unplanned_strategy: ClassVar[str | None] = None
    #: ``'int'`` (one rank R), ``'tuple'`` (one rank per entry of :meth:`rank_caps`) or
    #: ``'none'`` (no rank: the dense format).
    rank_kind: ClassVar[str] = "tuple"
    #: Whether :meth:`fit_closed_form` is the exact optimum of the calibration loss (then
    #: calibration runs no iterative refinement).
    closed_form_exact: ClassVar[bool] = False
    #: Whether :meth:`error_curve` of the whitened weight ``W S`` (``S S^T`` the input second
    #: moment) is the format's output-error curve, as for a format whose calibration start
    #: is exact in the whitened norm through its bonds ('lowrank', 'tt', 'basis'); otherwise
    #: budgets measure the Kronecker-whitened weight (see :meth:`fit_kronecker_whitened`).
    whitened_curve: ClassVar[bool] = False
    #: Name of the TensorLy class this format converts to (``None``: no conversion).
    tensorly_type: ClassVar[str | None] = None
    #: Budgeted allocation skips candidate fractions above this multiple of the overall
    #: budget fraction (for formats whose error curve is costly to compute; None: keep all).
    curve_fraction_limit: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "strategies" in cls.__dict__:  # bind each declared strategy to its class
            cls.strategies = tuple(dataclasses.replace(s, owner=cls) for s in cls.strategies)

    def __init__(
        self,
        in_modes: Modes,
        out_modes: Modes,
        rank: Any = "same",
        n_layers: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(in_modes, out_modes, rank, n_layers, device, dtype)
        self.reset_parameters()

    @classmethod
    def empty(
        cls,
        in_modes: Modes,
        out_modes: Modes,
        rank: Any = "same",
        n_layers: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FactorizedMatrix:
        """A module of this format with uninitialized parameters (``torch.empty``), for
        callers that fill them (decompositions, loading); arguments as in the constructor."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(in_modes, out_modes, rank, n_layers, device, dtype)
        return module

    def _setup(
        self,
        in_modes: Modes,
        out_modes: Modes,
        rank: Any,
        n_layers: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        from .._ranks import resolve_rank

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
        self.rank = resolve_rank(type(self), self.in_modes, self.out_modes, rank, n_layers)
        count = self.param_count(self.in_modes, self.out_modes, self.rank, n_layers)
        if count > MAX_PARAMS:  # fail before torch's allocator (its sizes overflow at 2**63)
            raise ValueError(
                f"factorization={self.name!r} with in modes {self.in_modes}, out modes "
                f"{self.out_modes}, n_layers={n_layers} and rank={self.rank} needs {count:.3g} "
                f"parameters, more than the {MAX_PARAMS:.3g} any machine can hold: use a "
                f"smaller rank (or a format that compresses more)"
            )
        self._build({"device": device, "dtype": dtype})
        # Shapes never change after construction: the planner's constants (hashable).
        self.signature = WeightShape(
            self.name,
            self.in_modes,
            self.out_modes,
            self.rank,
            n_layers,
            tuple((n, tuple(p.shape)) for n, p in self.named_parameters()),
            sum(p.numel() for p in self.parameters()),
        )
        self.signature_key: tuple = dataclasses.astuple(self.signature)
        self.num_params: int = self.signature.num_params
        self._strategies = {s.name: s for s in self.strategies}

    # ---------------------------------------------------------------- rank policy

    @classmethod
    def check_modes(cls, in_modes: Modes, out_modes: Modes) -> None:
        """Raise a ``ValueError`` if the format cannot use these modes (default: any)."""

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        """Largest useful value of each concrete rank (the rank at which the format is
        exact); one entry for ``rank_kind='int'``, none for ``'none'``."""
        raise NotImplementedError

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        """Exact number of parameters at concrete ``rank`` (bias not included)."""
        raise NotImplementedError

    @classmethod
    def rank_family(cls, caps: tuple[int, ...]) -> Callable[[float], tuple[int, ...]]:
        """A monotone family ``t -> ranks`` that a parameter budget is searched in (tuple
        ranks; default: one rank everywhere, clipped to each cap)."""
        return lambda t: tuple(min(c, max(1, round(t))) for c in caps)

    @classmethod
    def rank_help(cls, n: int) -> str:
        """What a tuple rank must hold, for error messages."""
        return f"{n} ranks"

    @classmethod
    def normalize_rank_tuple(cls, rank: tuple[int, ...], caps: tuple[int, ...]) -> tuple:
        """A user tuple rank in the format's own layout (default: as given)."""
        return rank

    # ---------------------------------------------------------------- sizes

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

    def strategy(self, name: str) -> Strategy:
        """The :class:`Strategy` called ``name``.

        Raises:
            ValueError: naming the format's strategies.
        """
        found = self._strategies.get(name)
        if found is None:
            raise ValueError(
                f"strategy must be one of {self.strategy_names()} for factorization="
                f"{self.name!r}, got {name!r}"
            )
        return found

    @classmethod
    def strategy_names(cls) -> tuple[str, ...]:
        """Names of :attr:`strategies`, in order."""
        return tuple(s.name for s in cls.strategies)

    # ---------------------------------------------------------------- layers

    def _check_layer(self, indices: Any) -> int | None:
        """Validate a layer index; None for "all layers" (or the only one)."""
        if indices is None:
            return None
        layer = normalize_index(indices, self.n_layers)
        return layer if self.n_layers > 1 else None

    # ---------------------------------------------------------------- compute

    def to_matrix(self, indices: int | None = None) -> Tensor:
        """Reconstruct the dense weight.

        Args:
            indices: which layer (``None``: all layers).

        Returns:
            ``(out_features, in_features)``, or ``(n_layers, out_features, in_features)`` when
            ``indices is None`` and ``n_layers > 1``.
        """
        layer = self._check_layer(indices)
        if layer is None and self.n_layers > 1:
            return torch.stack([self._to_matrix(i) for i in range(self.n_layers)])
        return self._to_matrix(layer)

    def contract(
        self, x: Tensor, indices: int | None = None, strategy: str = "factorized"
    ) -> Tensor:
        """Compute ``x @ W.T``, by default without forming ``W``.

        Args:
            x: ``(..., in_features)``.
            indices: which layer; required when ``n_layers > 1``.
            strategy: the name of one of :attr:`strategies`.

        Returns:
            ``(..., out_features)``.
        """
        chosen = self.strategy(strategy)
        self.check_input(x)
        layer = self._check_layer(indices)
        if layer is None and self.n_layers > 1:
            raise ValueError(
                f"this weight holds n_layers={self.n_layers} layers; pass indices=i to pick one"
            )
        y = chosen(self, x.reshape(-1, self.in_features), layer)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, index: Tensor, layer: int | None = None) -> Tensor:
        """Rows ``index`` of the ``(out, in)`` matrix of ``layer``: an embedding lookup.

        Formats that implement a per-row path compute each row from the factor slices it
        uses (never the whole matrix; see :meth:`row_work`); the others rebuild the matrix
        and gather. Gradients reach only the factor entries the rows use.

        Args:
            index: 1-D integer tensor of row indices in ``[0, out_features)`` (not checked
                here: :class:`tensorized.FactorizedEmbedding` validates them).
            layer: which layer (``None`` when ``n_layers == 1``).

        Returns:
            ``(len(index), in_features)``.
        """
        return self._rows(index, layer)

    def out_digits(self, index: Tensor) -> list[Tensor]:
        """The multi-index ``(o_1, ..., o_m)`` of each flat row index (row-major, as
        ``reshape`` splits ``out_features`` into ``out_modes``)."""
        digits, stride = [], self.out_features
        for k, mode in enumerate(self.out_modes):
            stride //= mode
            d = index // stride if stride > 1 else index
            digits.append(d % mode if k else d)
        return digits

    def host_digits(self, index: Tensor) -> list[int] | None:
        """The digits of a single row index held on the CPU, as Python ints (a few views and
        products then make the row, with no gather kernels); ``None`` otherwise, and always
        under ``torch.compile``."""
        if len(index) != 1 or index.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        value, digits = int(index), []
        for mode in reversed(self.out_modes):
            value, d = divmod(value, mode)
            digits.append(d)
        return digits[::-1]

    def row_digits(self, index: Tensor) -> list[Tensor | int]:
        """:meth:`host_digits` where it applies, else :meth:`out_digits`; read them with
        :func:`pick`."""
        single = self.host_digits(index)
        return list(self.out_digits(index) if single is None else single)

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        """Per-row path; this fallback rebuilds the matrix and gathers (formats override it
        together with :meth:`row_work`)."""
        return self._to_matrix(layer).index_select(0, index)

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work | None:
        """The work of :meth:`_rows` for ``n`` rows: ``prepare`` on the weight alone,
        ``apply`` per row (gathered factor slices count as ``apply_numel``); ``None`` for a
        format without a per-row path (rows are gathered from the rebuilt matrix)."""
        return None

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

    # ---------------------------------------------------------------- init

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Random factors whose reconstructed weight has standard deviation ``std``.

        Each factor is drawn with a balanced scale (the variance of the product is split
        evenly over the factors, which for TT formats means accounting for the product of
        the ranks), then all scale-carrying factors are rescaled by the same amount so that
        the empirical std of the reconstruction is exactly ``std`` (and each layer's, with a
        layer mode). The std is measured from contractions of the factors, without forming
        the matrix; on the ``meta`` device nothing can be measured and the balanced draw
        (right in expectation) is kept.

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
        if any(p.is_meta for p in self.parameters()):
            return
        layers = [None] if self.n_layers == 1 else list(range(self.n_layers))
        measured = [self._empirical_std(layer) for layer in layers]
        stds = [s for s in measured if s is not None and s != 0]
        if len(stds) < len(measured):
            return  # too costly to measure exactly: the balanced draw is right in expectation
        overall = math.sqrt(sum(s * s for s in stds) / len(stds))
        ratio = (std / overall) ** (1.0 / len(scaled))
        for p in scaled:
            p.mul_(ratio)
        if self.n_layers > 1:
            # The common rescale fixes the overall std; each layer is then corrected alone
            # through the slice of the parameters that only it uses.
            for layer, s in enumerate(stds):
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
        rank: Any = "same",
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
            A module of this format on the matrix's device and dtype (no random init is
            drawn: the caller's RNG stream is untouched).
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
        module = cls.empty(
            in_modes, out_modes, rank, n_layers, device=matrix.device, dtype=matrix.dtype
        )
        tensor = matrix.reshape(*((n_layers,) if n_layers > 1 else ()), *out_modes, *in_modes)
        with torch.no_grad():
            factors = module._decompose(tensor.detach(), **decomposition_kwargs)
            module.load_values(factors)
        return module

    @torch.no_grad()
    def load_values(self, values: dict[str, Tensor]) -> None:
        """Copy ``{parameter name: value}`` into the parameters (all of them must be given).

        Raises:
            ValueError: for a missing or unknown name or a value of the wrong shape.
        """
        params = dict(self.named_parameters())
        if set(values) != set(params):
            raise ValueError(
                f"{self.name} parameters are {sorted(params)}, got values for {sorted(values)}"
            )
        for name, value in values.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{self.name} parameter {name!r} has shape {tuple(params[name].shape)}, "
                    f"got a value of shape {tuple(value.shape)}"
                )
            params[name].copy_(value)

    # ---------------------------------------------------------------- compression hooks

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
        """Candidate ``(parameters, squared weight error, rank)`` for budgeted allocation,
        sorted by parameters.

        This default decomposes ``weight`` (``(out, in)`` or ``(L, out, in)``) at the rank
        of each candidate fraction and measures the error; formats override it with exact
        or cheaper curves.
        """
        from . import _curves

        norm_sq = float(weight.double().pow(2).sum())
        options: dict[Any, Option] = {}
        for rank in _curves.family(cls, in_modes, out_modes, n_layers, fractions):
            if rank in options:
                continue
            fitted = cls.from_matrix(weight, in_modes, out_modes, rank, **decomposition_kwargs)
            with torch.no_grad():
                diff = (fitted.to_matrix().double() - weight.double()).pow(2).sum()
            options[rank] = (
                cls.param_count(in_modes, out_modes, rank, n_layers),
                min(float(diff), norm_sq),
                rank,
            )
        return sorted(options.values(), key=lambda o: (o[0], o[1]))

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """Set layer ``layer`` to the best fit of ``weight`` in the norm
        ``||(W - What) S||_F`` (``S S^T = gram``, the input second moment), if the format has
        a closed form. Returns whether it did (default: no closed form)."""
        return False

    @torch.no_grad()
    def fit_closed_form_all(
        self,
        weights: Sequence[Tensor],
        grams: Sequence[Tensor],
        importance: Sequence[float] | None = None,
    ) -> bool:
        """Fit every layer at once: minimize ``sum_l importance_l ||(W_l - What_l) S_l||_F^2``
        (``S_l S_l^T = grams[l]``; ``importance`` defaults to ones), if the format has a
        closed form. This default fits each layer alone by :meth:`fit_closed_form` (the
        layers share no parameter, so the weights of the sum do not matter); a format whose
        layers share parameters overrides it. Returns whether it did."""
        joint = self.n_layers > 1
        fitted = [
            self.fit_closed_form(i if joint else None, W, C)
            for i, (W, C) in enumerate(zip(weights, grams))
        ]
        return all(fitted)

    @torch.no_grad()
    def fit_kronecker_whitened(
        self, weight: Tensor, gram: Tensor, **decomposition_kwargs: Any
    ) -> bool:
        """Set every layer to the format's decomposition of ``weight`` in the norm
        ``||(W - What) S||_F`` with ``S S^T ~ C_1 (x) ... (x) C_d``, a Kronecker-factored
        approximation (:func:`kronecker_factors`) of ``gram`` over the in modes.

        Multiplying the in mode ``k`` of the tensorized weight by ``S_k = C_k^{1/2}`` whitens
        it; the format decomposes the whitened tensor, and ``S_k^{-1}`` goes back into the
        factor that carries in mode ``k`` (:meth:`_in_mode_factors`), so the result keeps the
        format and its ranks. Exact for a Kronecker-product ``gram``; the activation-aware
        start of the tensor formats (the lowrank format's is the exact whitened SVD).

        Args:
            weight: ``(out, in)``, or ``(n_layers, out, in)`` with ``n_layers`` layers.
            gram: ``(in, in)`` input second moment (one for all layers).
            **decomposition_kwargs: for the format's decomposition.

        Returns:
            Whether it did (``False``: the format has no per-in-mode factors).
        """
        if self._in_mode_factors() is None:
            return False
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        tensor = weight.double().reshape(*lead, *self.out_modes, *self.in_modes)
        first = len(lead) + len(self.out_modes)
        tensor, inverses = kronecker_whiten(tensor, gram.double(), self.in_modes, first)
        dtype = next(self.parameters()).dtype
        self.load_values(self._decompose(tensor.to(dtype), **decomposition_kwargs))
        for (param, dim), inverse in zip(self._in_mode_factors() or [], inverses):
            param.copy_(mode_dot(param.double(), inverse, dim))
        return True

    def _in_mode_factors(self) -> list[tuple[nn.Parameter, int]] | None:
        """Per in mode ``k``: ``(parameter, dim)`` such that a mode product of ``dim`` of that
        parameter with a matrix ``M`` is the mode product of in mode ``k`` of the represented
        weight with ``M``; ``None`` for a format without such factors."""
        return None

    # ---------------------------------------------------------------- TensorLy

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """The weight as a TensorLy object; ``convert`` turns a tensor into a backend array.

        Raises:
            ValueError: if the format has no TensorLy equivalent.
        """
        raise ValueError(f"factorization={self.name!r} has no TensorLy equivalent")

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        """A module holding TensorLy object ``obj`` if it is of this format, else ``None``.
        ``convert`` turns a backend array into a tensor of the requested dtype and device."""
        return None

    # ---------------------------------------------------------------- to implement

    def _build(self, factory: dict) -> None:
        """Create the parameters (uninitialized) for ``self.rank``."""
        raise NotImplementedError

    def _to_matrix(self, layer: int | None) -> Tensor:
        """The ``(out, in)`` matrix of ``layer`` (``None`` when ``n_layers == 1``)."""
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
    return float((std**2 / max(n_terms, 1)) ** (1.0 / (2 * n_factors)))


def add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    # Under autocast y has the autocast dtype and the bias does not: cast the bias, as
    # F.linear does, rather than promote the output back to the parameters' dtype.
    if bias is None:
        return y
    return y + (bias if bias.dtype is y.dtype else bias.to(y.dtype))


def member(module: nn.Module, name: str) -> Any:
    """``module.<name>`` for a parameter or submodule, read from nn.Module's registries:
    the attribute itself goes through ``nn.Module.__getattr__`` (about 0.5 us each, most of
    a batch-1 forward's Python). Anything else (a parametrized parameter, a property) is
    read as an attribute."""
    found: nn.Module | Tensor | None = module._parameters.get(name)
    if found is None:
        found = module._modules.get(name)
    return getattr(module, name) if found is None else found


def listed(params: nn.ParameterList) -> list[Tensor]:
    """The members of a ``ParameterList``, in order, read from its registry: iterating the
    list itself costs about a microsecond per member (it formats a string key for each),
    which is most of a batch-1 forward's Python time. Always current: replacing a member
    (``params[k] = ...``, ``load_state_dict(assign=True)``) updates the registry. A member
    under ``torch.nn.utils.parametrize`` leaves the registry (it becomes a computed
    attribute): then the list is read item by item."""
    members = params._parameters
    if len(members) != len(params):
        return list(params)
    return list(members.values())  # type: ignore[arg-type]


def chain_work(shapes: list[tuple[int, ...]]) -> list[Gemm]:
    """Products of multiplying out a train of cores ``(r, *sizes, r')`` left to right."""
    out, rows = [], math.prod(shapes[0][:-1])
    for shape in shapes[1:]:
        r, r_next, inner = shape[0], shape[-1], math.prod(shape[1:-1])
        out.append((rows, r, inner * r_next, 1))
        rows *= inner
    return out


def layer_count(shape: Sequence[int], in_modes: Modes, out_modes: Modes) -> int | None:
    """``n_layers`` if ``shape`` is ``([n_layers,] *out_modes, *in_modes)``, else None."""
    shape = tuple(int(n) for n in shape)
    body = tuple(out_modes) + tuple(in_modes)
    if shape == body:
        return 1
    if len(shape) == len(body) + 1 and shape[1:] == body:
        return shape[0]
    return None


def pick(factor: Tensor, digits: Tensor | int) -> Tensor:
    """Rows ``digits`` of ``factor``: a view for a host digit, else a gather."""
    if isinstance(digits, int):
        return factor[digits : digits + 1]
    return factor.index_select(0, digits)
