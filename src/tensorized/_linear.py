"""``FactorizedLinear``: a linear layer whose weight is kept in a tensor-factorized format."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import _convert as convert
from . import _interop as interop
from ._index import normalize_index
from ._merge import Merging
from ._ops import capturing
from ._plan import (
    Plan,
    _plans,
    cached_strategy,
    make_plan,
    planned_strategy,
    signature_id,
)
from ._ranks import ConcreteRank, RankSpec
from ._shapes import Modes, resolve_modes
from ._view import LinearView
from .formats import FactorizedMatrix, Strategy, get_format

__all__ = ["FactorizedLinear", "LinearView"]

TensorizedFeatures = int | Sequence[int]


class FactorizedLinear(Merging):
    """A linear layer ``y = x W^T + b`` whose weight is stored as a factorized tensor.

    The weight ``(out_features, in_features)`` is viewed as the tensor
    ``(*out_tensorized_features, *in_tensorized_features)`` and kept in the format
    ``factorization``. With ``n_layers > 1`` the tensor has a leading layer mode and the layer
    holds that many linear maps that share factors; ``indices`` picks one in :meth:`forward`.

    The layer holds its parameters and nothing larger: every call computes from the factors.
    Keeping the rebuilt operands (e.g. the dense matrix) for faster inference is an explicit,
    reversible choice: :meth:`merge` / :meth:`unmerge`.

    Args:
        in_tensorized_features: modes of the input features, e.g. ``(8, 8, 16)`` for 1024, or
            an int to split automatically.
        out_tensorized_features: modes of the output features, or an int.
        bias: whether to add a learnable bias (one per layer).
        factorization: ``'cp'``, ``'tucker'``, ``'tt'``, ``'blocktt'`` (aliases ``'ttm'``,
            ``'tt-matrix'``), ``'lowrank'``, ``'dense'`` or a registered format;
            case-insensitive.
        rank: ``'same'``, a float (fraction of the dense parameter count), an int or a tuple
            of concrete ranks (see :func:`tensorized.resolve_rank`).
        n_layers: number of layers sharing the factorized tensor.
        implementation: ``'auto'`` (the planner picks, per batch size, dtype, device and
            mode, the strategy with the least estimated time; see :meth:`plan`), or the name
            of a strategy of the format: ``'factorized'`` (contract the input with the
            factors), ``'reconstructed'`` (rebuild the matrix, then one GEMM), or a hybrid
            (``'kron'`` for Tucker, ``'halves'`` for TT, ``'sequential'`` for CP).
        checkpointing: recompute the forward during backward to save activation memory.
        device: device of the parameters (``'meta'`` works).
        dtype: dtype of the parameters.

    Shapes:
        ``x``: ``(..., in_features)`` -> ``(..., out_features)``.

    Example:
        >>> layer = FactorizedLinear((8, 8), (4, 4), factorization="tucker", rank=0.5)
        >>> layer(torch.randn(32, 64)).shape
        torch.Size([32, 16])
    """

    weight: FactorizedMatrix
    bias: nn.Parameter | None

    def __init__(
        self,
        in_tensorized_features: TensorizedFeatures,
        out_tensorized_features: TensorizedFeatures,
        bias: bool = True,
        factorization: str = "cp",
        rank: RankSpec = "same",
        n_layers: int = 1,
        *,
        implementation: str = "auto",
        checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_tensorized_features is None or out_tensorized_features is None:
            raise TypeError(
                "in_tensorized_features and out_tensorized_features are required (a tuple of "
                "modes or an int feature count)"
            )
        in_modes, out_modes = resolve_modes(in_tensorized_features, out_tensorized_features, None)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        fmt = get_format(factorization)
        weight = fmt.empty(in_modes, out_modes, rank, n_layers, device=device, dtype=dtype)
        shape = (n_layers, weight.out_features) if n_layers > 1 else (weight.out_features,)
        b = nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) if bias else None
        self._bind(weight, b, implementation, checkpointing)
        self.reset_parameters()

    @classmethod
    def from_weight(
        cls,
        weight: FactorizedMatrix,
        bias: Tensor | bool | None = None,
        *,
        implementation: str = "auto",
        checkpointing: bool = False,
    ) -> FactorizedLinear:
        """A layer around an already built factorized weight (no initialization is drawn).

        The one construction path that :meth:`from_linear`, :meth:`from_linear_list`,
        :meth:`from_tensorly` and :func:`~tensorized.tensorize_` take.

        Args:
            weight: a :class:`~tensorized.FactorizedMatrix` of any registered format; the
                layer uses this module itself (no copy).
            bias: ``None``/``False`` (no bias), ``True`` (a zero bias) or a tensor of shape
                ``(out_features,)`` (``(n_layers, out_features)`` with a layer mode), copied
                unless it is already an ``nn.Parameter``.
            implementation: as in the constructor.
            checkpointing: as in the constructor.

        Example:
            >>> import torch, tensorized as tz
            >>> tt = tz.formats.get_format("tt")
            >>> w = tt.from_matrix(torch.randn(16, 64), (8, 8), (4, 4), rank=(4, 8, 8))
            >>> tz.FactorizedLinear.from_weight(w, torch.zeros(16)).rank
            (4, 8, 8)
        """
        if not isinstance(weight, FactorizedMatrix):
            raise TypeError(
                f"weight must be a tensorized.FactorizedMatrix, got {type(weight).__name__}"
            )
        ref = next(weight.parameters())
        L, out = weight.n_layers, weight.out_features
        shape = (L, out) if L > 1 else (out,)
        param: nn.Parameter | None = None
        if bias is True:
            param = nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
        elif isinstance(bias, Tensor):
            if tuple(bias.shape) != shape:
                raise ValueError(
                    f"bias must have shape {shape} for this weight, got {tuple(bias.shape)}"
                )
            if not bias.is_floating_point():
                raise TypeError(f"bias must be a floating tensor, got dtype {bias.dtype}")
            if isinstance(bias, nn.Parameter):
                param = bias
            else:
                param = nn.Parameter(bias.detach().to(ref.device, ref.dtype, copy=True))
        elif bias is not None and bias is not False:
            raise TypeError(
                f"bias must be None, a bool or a tensor, got {type(bias).__name__} {bias!r}"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._bind(weight, param, implementation, checkpointing)
        return layer

    def _bind(
        self,
        weight: FactorizedMatrix,
        bias: nn.Parameter | None,
        implementation: str,
        checkpointing: bool,
    ) -> None:
        """Register the weight and bias, and bind once what every forward needs."""
        self.weight = weight
        self.factorization = weight.name
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.implementation = implementation
        self.checkpointing = bool(checkpointing)
        self._merged = None
        self._signature_id = signature_id(weight.signature_key)
        self._bind_weight()

    def _weight_replaced(self, weight: FactorizedMatrix) -> None:
        self._signature_id = signature_id(weight.signature_key)
        self.implementation = self._implementation  # rebinds its strategies to the new weight
        self._merged = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Strategies bound from the implementation are derived: rebound, so that a layer
        # pickled by an earlier version (without the newer ones) runs.
        self.implementation = self._implementation

    def _loaded(self) -> None:
        # kept operands were computed from the old values
        super()._loaded()
        self.unmerge()

    # ------------------------------------------------------------------ attributes

    @property
    def implementation(self) -> str:
        """``'auto'`` or the name of one of the format's strategies."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        _check_implementation(type(self.weight), value)
        self._implementation = value
        # The strategy forward uses without planning: the fixed one, or the format's own.
        name = type(self.weight).unplanned_strategy if value == "auto" else value
        self._unplanned: Strategy | None = None if name is None else self.weight.strategy(name)

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.out_features

    @property
    def in_tensorized_features(self) -> Modes:
        return self.weight.in_modes

    @property
    def out_tensorized_features(self) -> Modes:
        return self.weight.out_modes

    @property
    def tensorized_shape(self) -> Modes:
        """``(*out_tensorized_features, *in_tensorized_features)``, as in tltorch (the layer
        mode, if any, is not included)."""
        return self.out_tensorized_features + self.in_tensorized_features

    @property
    def rank(self) -> ConcreteRank:
        """The concrete ranks of the weight's format."""
        return self.weight.rank

    @property
    def n_layers(self) -> int:
        return self.weight.n_layers

    @property
    def num_params(self) -> int:
        """Stored parameters, bias included."""
        return self.weight.num_params + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        dense = self.n_layers * self.in_features * self.out_features
        ratio = dense / max(self.weight.num_params, 1)
        layers = f", n_layers={self.n_layers}" if self.n_layers > 1 else ""
        merged = ""
        if self._merged is not None:
            merged = f", merged={self._merged.strategy.name!r} (+{self.merged_numel:,} kept)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_tensorized_features={self.in_tensorized_features}, "
            f"out_tensorized_features={self.out_tensorized_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}{layers}, "
            f"bias={self.bias is not None}, implementation={self.implementation!r}{merged}, "
            f"params={self.weight.num_params:,} vs dense {dense:,} ({ratio:.1f}x compression)"
        )

    def __repr__(self) -> str:  # the factorized weight is summarized in extra_repr already
        return f"{type(self).__name__}({self.extra_repr()})"

    # ------------------------------------------------------------------ init

    def reset_parameters(self) -> None:
        """Re-initialize at ``nn.Linear``'s scale.

        The reconstructed weight gets std ``1/sqrt(3 * in_features)`` (that of nn.Linear's
        uniform init) and the bias ``U(-1/sqrt(in_features), 1/sqrt(in_features))``.
        """
        self.unmerge()
        self.weight.reset_parameters(1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ planning

    def plan(
        self,
        batch_size: int,
        *,
        training: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Plan:
        """How ``forward`` computes ``batch_size`` rows, and what every strategy would cost.

        Args:
            batch_size: rows of the input (all leading dims together).
            training: whether autograd records the weight; defaults to what ``forward``
                would see now: grad mode enabled and a factor requiring grad, whatever
                ``self.training`` is (an ``eval()`` layer called outside ``torch.no_grad()``
                still records gradients).
            dtype: compute dtype; defaults to the parameters'.
            device: defaults to the parameters'.

        Returns:
            A :class:`tensorized.Plan`: ``plan.chosen`` is the strategy ``'auto'`` uses
            (or the fixed ``implementation``, or the merged one), ``plan.costs`` has FLOPs,
            bytes, kernel calls and the estimated time of each; ``print(plan)`` shows them
            as a table. Inference costs count the weight-only work on every call unless the
            layer is merged.
        """
        param = self._bound[1][0]
        device_type = torch.device(device).type if device is not None else param.device.type
        grad = self._grad_flows() if training is None else training
        cached = self._merged is not None and not grad
        plan = make_plan(
            self.weight,
            batch_size,
            training=grad,
            dtype=dtype or param.dtype,
            device_type=device_type,
            cached=cached,
        )
        if cached and self._merged is not None:
            plan = dataclasses.replace(plan, chosen=self._merged.strategy.name)
        elif self._unplanned is not None:
            plan = dataclasses.replace(plan, chosen=self._unplanned.name)
        return plan

    def implementation_for(self, batch: int) -> str:
        """The strategy ``forward`` uses for ``batch`` rows in the current mode."""
        param = self._bound[1][0]
        return self._strategy(max(batch, 1), self._grad_flows(), param.dtype, param.device).name

    def _grad_flows(self) -> bool:
        """Whether a forward now records gradients of the weight."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._bound[1])

    def _strategy(self, rows: int, grad: bool, dtype: torch.dtype, device: Any) -> Strategy:
        if self._unplanned is not None:
            return self._unplanned
        key = (self._signature_id, rows, grad, dtype, device)
        name = cached_strategy(
            key, self.weight.signature_key, rows, grad, False, dtype, device.type
        )
        return self.weight._strategies[name]

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, indices: int = 0) -> Tensor:
        """Apply layer ``indices``.

        Args:
            x: ``(..., in_features)``.
            indices: which layer when ``n_layers > 1`` (an int, NumPy integer or one-element
                integer tensor; negative counts from the end).

        Returns:
            ``(..., out_features)``.
        """
        # Everything below runs on every call: plain attribute reads of values bound at
        # construction (module attribute lookups cost about a microsecond each).
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        weight, params = self._bound
        if x.ndim == 0 or x.shape[-1] != weight.in_features:
            raise ValueError(
                f"x must have in_features={weight.in_features} features in its last dim, got "
                f"input shape {tuple(x.shape)}"
            )
        if x.dtype is not params[0].dtype:
            self._check_dtype(x, params[0].dtype)
        n = weight.n_layers
        if type(indices) is int and 0 <= indices < n:  # the common case, checked cheaply
            layer = indices if n > 1 else None
        else:
            i = normalize_index(indices, n)
            layer = i if n > 1 else None
        # A merged layer, or one whose strategy needs no plan, served without autograd runs
        # from here: each call level costs microseconds at batch 1 when the kernel has just
        # evicted the caches.
        merged, unplanned = self._merged, self._unplanned
        if (
            (merged is not None or unplanned is not None)
            and x.ndim == 2
            and not torch.is_grad_enabled()
            and not capturing()
        ):
            bias: Tensor | None = self._parameters["bias"]
            if bias is not None and layer is not None:
                bias = bias[layer]
            if merged is not None:
                return merged.strategy.apply(weight, x, merged.operands[layer], bias)
            assert unplanned is not None
            return unplanned.apply(weight, x, unplanned.prepare(weight, layer), bias)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layer, use_reentrant=False)
        return self._forward(x, layer)

    @staticmethod
    def _check_dtype(x: Tensor, dtype: torch.dtype) -> None:
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x has dtype {x.dtype} but the weight's parameters are {dtype}: convert one "
                f"(x.to({dtype}) or layer.to({x.dtype}))"
            )

    def _forward(self, x: Tensor, layer: int | None) -> Tensor:
        weight, params = self._bound
        bias: Tensor | None = self._parameters["bias"]
        if bias is not None and layer is not None:
            bias = bias[layer]
        x2d = x if x.ndim == 2 else x.reshape(-1, weight.in_features)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        merged = self._merged
        strategy: Strategy | None
        if capturing():
            # A graph is being captured (torch.compile / torch.export, or the TorchScript
            # tracer of the legacy ONNX exporter). Planned while tracing (not traced): the
            # choice is a constant of the graph, made for every batch size (a graph may serve
            # them all: dynamic shapes, ONNX dynamic axes), and computed from the parameters.
            strategy = self._unplanned or weight.strategy(
                planned_strategy(weight.signature_key, None, grad, x.dtype, x.device.type, False)
            )
            y = strategy.apply(weight, x2d, strategy.prepare(weight, layer), bias)
        elif merged is not None and not grad:
            y = merged.strategy.apply(weight, x2d, merged.operands[layer], bias)
        else:
            if merged is not None:  # gradients flow: the parameters are about to change
                self._merged = None
            strategy = self._unplanned
            if strategy is None:
                rows = x2d.shape[0] or 1  # an empty batch costs nothing: planned as one row
                key = (self._signature_id, rows, grad, x.dtype, x.device)
                name = _plans.get(key)
                if name is None:
                    name = cached_strategy(
                        key, weight.signature_key, rows, grad, False, x.dtype, x.device.type
                    )
                strategy = weight._strategies[name]
            y = strategy.apply(weight, x2d, strategy.prepare(weight, layer), bias)
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], weight.out_features)

    # ------------------------------------------------------------------ layers

    def get_linear(self, indices: int) -> LinearView:
        """A module computing layer ``indices`` with the shared parameters (no copy)."""
        return LinearView(self, normalize_index(indices, self.n_layers))

    def __getitem__(self, indices: int) -> LinearView:
        return self.get_linear(indices)

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self) -> Iterator[LinearView]:
        return (self.get_linear(i) for i in range(self.n_layers))

    @torch.no_grad()
    def to_linear(self, indices: int = 0) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of layer ``indices``'s reconstructed weight."""
        i = normalize_index(indices, self.n_layers)
        layer = i if self.n_layers > 1 else None
        W = self.weight.to_matrix(layer)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        linear.weight.copy_(W)
        if self.bias is not None:
            linear.bias.copy_(self.bias if layer is None else self.bias[layer])
        return linear

    # ------------------------------------------------------------------ TensorLy

    def to_tensorly(self) -> Any:
        """The weight as a TensorLy ``CPTensor`` / ``TuckerTensor`` / ``TTTensor`` /
        ``TTMatrix`` (a dense tensor for 'dense') of shape ``([n_layers,] *out, *in)``, in
        TensorLy's current backend; a detached copy. Needs ``tensorly`` (imported here only);
        see the TensorLy section of the docs for the layout of the layer mode."""
        return interop.to_tensorly(self.weight)

    @classmethod
    def from_tensorly(
        cls,
        tensor: Any,
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        implementation: str = "auto",
        checkpointing: bool = False,
    ) -> FactorizedLinear:
        """A layer whose weight is a TensorLy factorized tensor (or a dense array).

        The format and ranks follow ``tensor``'s type and factor shapes; a leading extra
        mode is the layer mode (``n_layers``). The bias, if any, starts at zero.

        Args:
            tensor: shape ``([n_layers,] *out_tensorized_features, *in_tensorized_features)``.
            in_tensorized_features: the input modes.
            out_tensorized_features: the output modes.
            bias: whether the layer has a bias.
            device: defaults to that of ``tensor``'s arrays.
            dtype: defaults to that of ``tensor``'s arrays.
            implementation: as in the constructor.
            checkpointing: as in the constructor.
        """
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        weight = interop.from_tensorly(
            tensor, in_tensorized_features, out_tensorized_features, device=device, dtype=dtype
        )
        return cls.from_weight(
            weight, bias, implementation=implementation, checkpointing=checkpointing
        )

    # ------------------------------------------------------------------ from dense layers

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        in_tensorized_features: TensorizedFeatures | None = None,
        out_tensorized_features: TensorizedFeatures | None = None,
        rank: RankSpec = "same",
        bias: bool = True,
        factorization: str = "CP",
        decomposition_kwargs: dict[str, Any] | None = None,
        *,
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        implementation: str = "auto",
        checkpointing: bool = False,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """Compress a trained ``nn.Linear`` by decomposing its weight.

        Args:
            linear: the source layer (any ``nn.Linear``; it is not modified).
            in_tensorized_features: input modes; ``None`` (or an int) auto-tensorizes.
            out_tensorized_features: output modes; ``None`` (or an int) auto-tensorizes.
            rank: as in the constructor.
            bias: keep a bias; it is copied from the source (zeros if the source has none).
            factorization: the format name.
            decomposition_kwargs: options of the decomposition (e.g. ``n_iter_max``).
            auto_tensorize: allow ``None`` modes to be chosen automatically (explicit modes
                always win).
            n_tensorized_modes: number of modes per side when auto-tensorizing.
            implementation: as in the constructor.
            checkpointing: as in the constructor.
            verbose: print the relative weight error and the time taken.

        Returns:
            A layer on the source's device and dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _check_implementation(factorization, implementation)  # before a long decomposition
        weight, b = convert.decompose_linears(
            [linear],
            in_tensorized_features,
            out_tensorized_features,
            rank,
            bias,
            factorization,
            decomposition_kwargs,
            auto_tensorize=auto_tensorize,
            n_tensorized_modes=n_tensorized_modes,
            verbose=verbose,
            joint=False,
        )
        return cls.from_weight(
            weight, b, implementation=implementation, checkpointing=checkpointing
        )

    @classmethod
    def from_linear_list(
        cls,
        linear_list: Sequence[nn.Linear],
        in_tensorized_features: TensorizedFeatures | None = None,
        out_tensorized_features: TensorizedFeatures | None = None,
        rank: RankSpec = "same",
        bias: bool = True,
        factorization: str = "CP",
        decomposition_kwargs: dict[str, Any] | None = None,
        *,
        auto_tensorize: bool = True,
        n_tensorized_modes: int = 3,
        implementation: str = "auto",
        checkpointing: bool = False,
        verbose: bool = False,
    ) -> FactorizedLinear:
        """Jointly compress same-shaped layers into one tensor with a leading layer mode.

        ``result[i]`` then computes (an approximation of) ``linear_list[i]``. Arguments are
        as in :meth:`from_linear`; ``rank`` counts the parameters of all layers together.
        """
        _check_implementation(factorization, implementation)  # before a long decomposition
        weight, b = convert.decompose_linears(
            convert.check_linear_list(linear_list),
            in_tensorized_features,
            out_tensorized_features,
            rank,
            bias,
            factorization,
            decomposition_kwargs,
            auto_tensorize=auto_tensorize,
            n_tensorized_modes=n_tensorized_modes,
            verbose=verbose,
            joint=True,
        )
        return cls.from_weight(
            weight, b, implementation=implementation, checkpointing=checkpointing
        )


def _check_implementation(factorization: str | type[FactorizedMatrix], implementation: str) -> None:
    fmt = get_format(factorization)
    valid = ("auto", *fmt.strategy_names())
    if not isinstance(implementation, str) or implementation not in valid:
        raise ValueError(
            f"implementation must be one of {valid} for factorization={fmt.name!r}, got "
            f"{implementation!r}"
        )
