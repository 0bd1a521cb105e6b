"""``FactorizedLinear``: a linear layer whose weight is kept in a tensor-factorized format."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .convert import check_linear_list, from_weights
from .formats import canonical_name, get_format
from .formats.base import FactorizedMatrix
from .plan import Plan, make_plan, planned_strategy
from .ranks import ConcreteRank, RankSpec
from .shapes import Modes, resolve_modes

__all__ = ["FactorizedLinear", "LinearView"]

TensorizedFeatures = int | Sequence[int]


def _tracing() -> bool:
    """Whether a graph is being captured (torch.compile / torch.export, or the TorchScript
    tracer of the legacy ONNX exporter)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class FactorizedLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` whose weight is stored as a factorized tensor.

    The weight ``(out_features, in_features)`` is viewed as the tensor
    ``(*out_tensorized_features, *in_tensorized_features)`` and kept in the format
    ``factorization``. With ``n_layers > 1`` the tensor has a leading layer mode and the layer
    holds that many linear maps that share factors; ``indices`` picks one in :meth:`forward`.

    Args:
        in_tensorized_features: modes of the input features, e.g. ``(8, 8, 16)`` for 1024, or
            an int to split automatically.
        out_tensorized_features: modes of the output features, or an int.
        bias: whether to add a learnable bias (one per layer).
        factorization: ``'cp'``, ``'tucker'``, ``'tt'``, ``'blocktt'`` (aliases ``'ttm'``,
            ``'tt-matrix'``), ``'lowrank'`` or ``'dense'``; case-insensitive.
        rank: ``'same'``, a float (fraction of the dense parameter count), an int or a tuple
            of concrete ranks (see :mod:`tensorized.ranks`).
        n_layers: number of layers sharing the factorized tensor.
        implementation: ``'auto'`` (the planner picks, per batch size, dtype, device and
            mode, the strategy with the least estimated time; see :meth:`plan`), or a fixed
            strategy: ``'factorized'`` (contract the input with the factors),
            ``'reconstructed'`` (rebuild the matrix, then one GEMM), or a format's hybrid
            (``'kron'`` for Tucker, ``'halves'`` for TT). In inference (no autograd) the
            weight-only part of the strategy (e.g. the rebuilt matrix) is cached until a
            parameter changes.
        checkpointing: recompute the forward during backward to save activation memory.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shapes:
        ``x``: ``(..., in_features)`` -> ``(..., out_features)``.

    Example:
        >>> layer = FactorizedLinear((8, 8), (4, 4), factorization="tucker", rank=0.5)
        >>> layer(torch.randn(32, 64)).shape
        torch.Size([32, 16])
    """

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
        self.factorization = canonical_name(factorization)
        self.weight: FactorizedMatrix = get_format(self.factorization)(
            in_modes, out_modes, rank, n_layers, device=device, dtype=dtype
        )
        self.implementation = implementation
        self.checkpointing = bool(checkpointing)
        if bias:
            shape = (n_layers, self.out_features) if n_layers > 1 else (self.out_features,)
            self.bias = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ attributes

    @property
    def implementation(self) -> str:
        """``'auto'`` or a fixed strategy name from ``self.weight.strategies``."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        valid = ("auto", *self.weight.strategies)
        if value not in valid:
            raise ValueError(
                f"implementation must be one of {valid} for factorization="
                f"{self.factorization!r}, got {value!r}"
            )
        self._implementation = value
        self._plans: dict[tuple, str] = {}
        self._operand_cache: dict[tuple, tuple] = {}

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
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        dense = self.n_layers * self.in_features * self.out_features
        ratio = dense / max(self.weight.num_params, 1)
        layers = f", n_layers={self.n_layers}" if self.n_layers > 1 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_tensorized_features={self.in_tensorized_features}, "
            f"out_tensorized_features={self.out_tensorized_features}, "
            f"factorization={self.factorization!r}, rank={self.rank}{layers}, "
            f"bias={self.bias is not None}, implementation={self.implementation!r}, "
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
        self.weight.reset_parameters(1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ forward

    def _layer(self, indices: int) -> int | None:
        if isinstance(indices, Tensor) and indices.numel() == 1 and not indices.is_floating_point():
            indices = int(indices)
        if isinstance(indices, bool) or not isinstance(indices, int):
            raise TypeError(
                f"indices must be an int layer index, got {type(indices).__name__} {indices!r}"
            )
        if not 0 <= indices < self.n_layers:
            raise IndexError(
                f"indices={indices} is out of range: this layer holds n_layers={self.n_layers} "
                f"(valid: 0 to {self.n_layers - 1})"
            )
        return indices if self.n_layers > 1 else None

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
            training: whether autograd records the weight (then nothing can be cached);
                defaults to what ``forward`` would see now: grad mode enabled and a factor
                requiring grad, whatever ``self.training`` is (an ``eval()`` layer called
                outside ``torch.no_grad()`` still records gradients).
            dtype: compute dtype; defaults to the parameters'.
            device: defaults to the parameters'.

        Returns:
            A :class:`tensorized.plan.Plan`: ``plan.chosen`` is the strategy ``'auto'`` uses
            (or the fixed ``implementation``), ``plan.costs`` has FLOPs, bytes, kernel calls
            and the estimated time of each; ``print(plan)`` shows them as a table.
        """
        param = next(self.weight.parameters())
        device_type = torch.device(device).type if device is not None else param.device.type
        plan = make_plan(
            self.weight,
            batch_size,
            training=self._grad_flows() if training is None else training,
            dtype=dtype or param.dtype,
            device_type=device_type,
        )
        if self.implementation != "auto":
            plan = dataclasses.replace(plan, chosen=self.implementation)
        return plan

    def implementation_for(self, batch: int) -> str:
        """The strategy ``forward`` uses for ``batch`` rows in the current mode."""
        param = next(self.weight.parameters())
        return self._strategy(batch, self._grad_flows(), param.dtype, param.device.type)

    def _grad_flows(self) -> bool:
        """Whether a forward now records gradients of the weight (then nothing is cached)."""
        return torch.is_grad_enabled() and self.weight.any_requires_grad()

    def _strategy(self, batch: int, grad: bool, dtype, device_type) -> str:
        if self.implementation != "auto":
            return self.implementation
        if _tracing():
            # Planned while tracing (not traced): the choice is a constant of the graph. A
            # graph cannot keep the eager cache, so plan as if nothing is reused; and it may
            # serve every batch size (dynamic=True, dynamo's automatic dynamic shapes after a
            # second size, ONNX dynamic axes; traced code cannot tell a symbolic batch from a
            # concrete one), so plan for all sizes: no guard on the batch, no recompile.
            signature = self.weight.shape_signature
            return planned_strategy(signature, None, True, dtype, device_type)
        batch = max(batch, 1)  # an empty batch costs nothing: plan it like one row
        key = (batch, grad, dtype, device_type)
        choice = self._plans.get(key)
        if choice is None:  # planned once per key; later calls are a dict lookup
            choice = planned_strategy(self.weight.shape_signature, batch, grad, dtype, device_type)
            self._plans[key] = choice
        return choice

    def forward(self, x: Tensor, indices: int = 0) -> Tensor:
        """Apply layer ``indices``.

        Args:
            x: ``(..., in_features)``.
            indices: which layer when ``n_layers > 1`` (must be 0 otherwise).

        Returns:
            ``(..., out_features)``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        self.weight.check_input(x)
        layer = self._layer(indices)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, layer, use_reentrant=False)
        return self._forward(x, layer)

    def _forward(self, x: Tensor, layer: int | None) -> Tensor:
        bias = self.bias
        if bias is not None and layer is not None:
            bias = bias[layer]
        weight = self.weight
        grad = self._grad_flows()
        x2d = x if x.ndim == 2 else x.reshape(-1, weight.in_features)
        strategy = self._strategy(x2d.shape[0], grad, x.dtype, x.device.type)
        if grad or _tracing():  # a graph computes the operands from the parameters
            operands = weight.prepare(strategy, layer)
        else:
            operands = self._cached_operands(strategy, layer)
        y = weight.apply(strategy, x2d, operands, bias)
        return y if x.ndim == 2 else y.reshape(*x.shape[:-1], weight.out_features)

    def _cached_operands(self, strategy: str, layer: int | None) -> tuple[Tensor, ...]:
        """The strategy's weight-only operands, reused while no parameter changes.

        Only used without autograd. One entry per (strategy, layer), so the layers of a
        joint weight do not evict each other; each is valid while the parameters' identity,
        storage and version counters (bumped by every in-place update, optimizer steps
        included) are unchanged.
        """
        versions = tuple((id(p), p.data_ptr(), p._version) for p in self.weight.parameters())
        entry = self._operand_cache.get((strategy, layer))
        if entry is None or entry[0] != versions:
            # Prepared at the parameters' precision, outside any autocast, so one entry
            # serves float32 and autocast forwards alike (apply's products still autocast).
            device_type = next(self.weight.parameters()).device.type
            off = (
                torch.autocast(device_type, enabled=False)
                if torch.amp.is_autocast_available(device_type)
                else contextlib.nullcontext()
            )
            with off:
                entry = (versions, self.weight.prepare(strategy, layer))
            self._operand_cache[(strategy, layer)] = entry
        return entry[1]

    # ------------------------------------------------------------------ layers

    def get_linear(self, indices: int) -> LinearView:
        """A module computing layer ``indices`` with the shared parameters (no copy)."""
        self._layer(indices)
        return LinearView(self, indices)

    def __getitem__(self, indices: int) -> LinearView:
        return self.get_linear(indices)

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self) -> Iterator[LinearView]:
        return (self.get_linear(i) for i in range(self.n_layers))

    @torch.no_grad()
    def to_linear(self, indices: int = 0) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of layer ``indices``'s reconstructed weight."""
        layer = self._layer(indices)
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
        see :mod:`tensorized.interop` for the layout of the layer mode."""
        from .interop import to_tensorly

        return to_tensorly(self)

    @classmethod
    def from_tensorly(
        cls,
        tensor: Any,
        in_tensorized_features: Sequence[int],
        out_tensorized_features: Sequence[int],
        bias: bool = True,
        **kwargs: Any,
    ) -> FactorizedLinear:
        """A layer whose weight is a TensorLy factorized tensor (or a dense array).

        The format and ranks follow ``tensor``'s type and factor shapes; a leading extra
        mode is the layer mode (``n_layers``). The bias, if any, starts at zero.

        Args:
            tensor: shape ``([n_layers,] *out_tensorized_features, *in_tensorized_features)``.
            in_tensorized_features: the input modes.
            out_tensorized_features: the output modes.
            bias: whether the layer has a bias.
            **kwargs: ``device``, ``dtype`` (default: those of ``tensor``'s arrays),
                ``implementation``, ``checkpointing``.
        """
        from .interop import from_tensorly

        return from_tensorly(
            cls, tensor, in_tensorized_features, out_tensorized_features, bias, **kwargs
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
        return from_weights(
            cls,
            [linear],
            in_tensorized_features,
            out_tensorized_features,
            rank,
            bias,
            factorization,
            decomposition_kwargs,
            auto_tensorize=auto_tensorize,
            n_tensorized_modes=n_tensorized_modes,
            implementation=implementation,
            checkpointing=checkpointing,
            verbose=verbose,
            joint=False,
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
        linear_list = check_linear_list(linear_list)
        return from_weights(
            cls,
            linear_list,
            in_tensorized_features,
            out_tensorized_features,
            rank,
            bias,
            factorization,
            decomposition_kwargs,
            auto_tensorize=auto_tensorize,
            n_tensorized_modes=n_tensorized_modes,
            implementation=implementation,
            checkpointing=checkpointing,
            verbose=verbose,
            joint=True,
        )


class LinearView(nn.Module):
    """Layer ``index`` of a :class:`FactorizedLinear` with ``n_layers > 1``, sharing its
    parameters: training the view trains the shared tensor.

    Shapes:
        ``x``: ``(..., in_features)`` -> ``(..., out_features)``.
    """

    def __init__(self, parent: FactorizedLinear, index: int) -> None:
        super().__init__()
        self.parent = parent
        self.index = index

    @property
    def in_features(self) -> int:
        return self.parent.in_features

    @property
    def out_features(self) -> int:
        return self.parent.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.parent(x, self.index)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` copy of this layer."""
        return self.parent.to_linear(self.index)

    def __repr__(self) -> str:
        p = self.parent
        return (
            f"LinearView(index={self.index} of {p.n_layers}, in_features={p.in_features}, "
            f"out_features={p.out_features}, factorization={p.factorization!r})"
        )
