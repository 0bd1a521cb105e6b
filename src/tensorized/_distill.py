"""Heal a compressed model: end-to-end distillation from the original on unlabeled inputs.

Layer-wise calibration fits each layer to its original's outputs; errors still add up
through the depth of the model. :func:`distill_` trains the compressed model (by default only
its factorized layers) so that its outputs match the original's (Hinton et al., "Distilling
the Knowledge in a Neural Network", 2015; here on the outputs themselves: a relative squared
error, the regression form used for sentence encoders).

The optimizer has to suit every format without tuning. A factorized weight is a product of
``k`` factors (2 for low-rank, up to one per mode for a tensor train), and Adam moves each
entry by about its step size whatever the entry's scale, so a fixed learning rate is far too
large for small factors and multiplied ``k`` times in the product. Each parameter therefore
gets the step ``lr * rms(p) / k``: a *relative* step (as in Adafactor, Shazeer & Stern, 2018)
shared by the ``k`` factors of its product, so a step changes every layer's weight by about
the same relative amount whatever its format. Linear warmup, cosine decay, gradient clipping;
the best held-out state is kept and the model is never left worse than it started.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._config import show_progress
from ._embedding import FactorizedEmbedding
from ._linear import FactorizedLinear
from ._record import _call, _check_data, padding_mask

__all__ = ["DistillReport", "distill_"]

#: The default relative step of :func:`distill_`. On all-MiniLM-L6-v2 at half its encoder
#: weights (3 epochs on 2,000 sentences, ``benchmarks/bench_compress.py``), 0.03 against 0.01
#: took the distilled embedding error of lowrank from 0.099 to 0.089 and of blocktt from
#: 0.235 to 0.198; 0.003 left blocktt at 0.296.
DEFAULT_LR = 0.03

F64 = torch.float64


@dataclass(frozen=True)
class DistillReport:
    """What :func:`distill_` did. Errors are the relative squared error of the outputs,
    ``sum ||y - y_teacher||^2 / sum ||y_teacher||^2`` over the held-out batches (every
    floating output tensor; positions a keyword batch's integer ``attention_mask`` marks as
    padding are left out of outputs shaped like it)."""

    before: float
    after: float
    epochs: int
    steps: int
    best_step: int
    trained_params: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"distill_: held-out output error {self.before:.4g} -> {self.after:.4g} "
            f"({self.steps} steps over {self.epochs} epochs, best at step {self.best_step}; "
            f"{self.trained_params:,} parameters trained; {self.seconds:.1f}s)"
        )


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """The floating tensors of a model output, with their paths (tuples, lists, dicts and
    Hugging Face ``ModelOutput`` s, which are dicts, are walked)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield path or "output", value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, tuple | list):
        for k, v in enumerate(value):
            yield from _leaves(v, f"{path}[{k}]")


def _pairs(student: Any, teacher: Any) -> list[tuple[Tensor, Tensor]]:
    s, t = dict(_leaves(student)), dict(_leaves(teacher))
    if list(s) != list(t) or any(s[k].shape != t[k].shape for k in s):
        shapes = {k: tuple(v.shape) for k, v in s.items()}
        want = {k: tuple(v.shape) for k, v in t.items()}
        raise ValueError(
            f"the model and the teacher disagree on their outputs: model {shapes}, teacher "
            f"{want}; distill_ needs the same floating outputs"
        )
    if not s:
        raise ValueError("the teacher's output holds no floating tensor to match")
    return [(s[k], t[k]) for k in s]


def _squared_errors(
    student: Any, teacher: Any, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(sum ||s - t||^2, sum ||t||^2)`` over the output tensors (in float32 or wider);
    with a padding ``mask`` (see :func:`~tensorized._record.padding_mask`), the entries
    of an output whose leading dims have the mask's shape count only where it is nonzero."""
    errors, norms = [], []
    for s, t in _pairs(student, teacher):
        dtype = torch.promote_types(s.dtype, torch.float32)
        diff, ref = (s.to(dtype) - t.to(dtype)).pow(2), t.to(dtype).pow(2)
        if mask is not None and tuple(t.shape[: mask.ndim]) == tuple(mask.shape):
            keep = (mask != 0).to(device=t.device, dtype=dtype)
            keep = keep.reshape(*mask.shape, *([1] * (t.ndim - mask.ndim)))
            diff, ref = diff * keep, ref * keep
        errors.append(diff.sum())
        norms.append(ref.sum())
    return sum(errors[1:], errors[0]), sum(norms[1:], norms[0])


def _held_out_error(model: nn.Module, teacher: nn.Module, batches: list[Any]) -> float:
    err = norm = 0.0
    with torch.no_grad():
        for k, item in enumerate(batches):
            student, target = _call(model, item, k, "data"), _call(teacher, item, k, "data")
            e, n = _squared_errors(student, target, padding_mask(item))
            err, norm = err + float(e), norm + float(n)
    return err / max(norm, torch.finfo(F64).tiny)


def _trainable(model: nn.Module, train: str) -> dict[nn.Parameter, int]:
    """Parameter -> the number of factors in the product it belongs to."""
    out: dict[nn.Parameter, int] = {}
    for module in model.modules():
        if isinstance(module, FactorizedLinear | FactorizedEmbedding):
            factors = list(module.weight.parameters())
            for p in factors:
                out.setdefault(p, max(1, len(factors)))
            bias = getattr(module, "bias", None)
            if bias is not None:
                out.setdefault(bias, 1)
    if train == "all":
        for p in model.parameters():
            out.setdefault(p, 1)
    return {p: k for p, k in out.items() if p.requires_grad}  # the user's freezing holds


def _check(
    model: Any, teacher: Any, data: Any, epochs: Any, lr: Any, held_out: Any, train: Any
) -> None:
    for name, value in (("model", model), ("teacher", teacher)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    if teacher is model:
        raise ValueError(
            "teacher is the model itself: give the original (uncompressed) model, e.g. a "
            "copy.deepcopy made before tensorize_"
        )
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    if shared:
        raise ValueError(
            f"teacher and model share {len(shared)} parameters: training the model would "
            f"move the teacher too; give an independent copy of the original"
        )
    _check_data(data, "data")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
        raise ValueError(f"lr must be None (the default relative step) or > 0, got {lr!r}")
    if isinstance(held_out, bool) or not isinstance(held_out, int | float):
        raise TypeError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    if train not in ("factorized", "all"):
        raise ValueError(f"train must be 'factorized' or 'all', got {train!r}")


def distill_(
    model: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    lr: float | None = None,
    held_out: float = 0.1,
    train: str = "factorized",
    seed: int = 0,
    progress: bool | None = None,
) -> DistillReport:
    """Train ``model`` in place so that its outputs match ``teacher``'s on ``data``.

    Args:
        model: the compressed model (e.g. after :func:`~tensorized.tensorize_`).
        teacher: the original model (an independent copy); run in eval mode, never trained.
        data: model inputs, as ``calibration_data``: a tensor ``x`` runs ``model(x)``, a
            tuple ``model(*x)``, a dict (a tokenizer's output) ``model(**x)``. Read once
            into a list: the batches are reused every epoch.
        epochs: passes over the training batches.
        lr: relative step size (each parameter moves by about ``lr * rms(p) / k`` per step,
            ``k`` the factors of its product); ``None``: :data:`DEFAULT_LR` (0.03), which suits
            every format.
        held_out: fraction of the batches (at least one) held out to measure the error.
        train: ``'factorized'`` (only the factors and biases of the factorized layers and
            embedding tables) or
            ``'all'`` (every parameter of the model); parameters with
            ``requires_grad=False`` are never trained.
        seed: seed of the held-out split and of the batch order.
        progress: a tqdm bar with the loss; ``None``: only when stderr is a terminal.

    Returns:
        A :class:`DistillReport`: held-out error before and after (``after <= before``),
        steps and time. The model keeps its best held-out state, its training flags and
        its parameters' ``requires_grad`` flags.

    Raises:
        TypeError / ValueError: bad arguments, empty data (or too few batches to hold some
            out), a teacher that is the model or shares its parameters, outputs of
            different structure.
    """
    _check(model, teacher, data, epochs, lr, held_out, train)
    start = time.perf_counter()
    batches = list(data)
    if len(batches) < 2:
        raise ValueError(
            f"data must hold at least 2 batches (one to train on, one held out), got {len(batches)}"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(batches), generator=gen).tolist()
    n_held = max(1, round(held_out * len(batches)))
    held = [batches[i] for i in perm[:n_held]]
    fit = [batches[i] for i in perm[n_held:]]
    factors = _trainable(model, train)
    if not factors:
        raise ValueError(
            f"model holds no parameter to train (train={train!r}: the factorized layers' "
            f"parameters that require gradients)"
        )
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in [*model.modules(), *teacher.modules()]}
    show = show_progress(progress)
    try:
        teacher.eval()
        model.eval()  # dropout off: a deterministic student makes the loss comparable
        before = _held_out_error(model, teacher, held)
        best, best_state, best_step = before, copy.deepcopy(model.state_dict()), 0
        for p in model.parameters():
            p.requires_grad_(p in factors)
        rel = DEFAULT_LR if lr is None else float(lr)
        groups = []
        for p, k in factors.items():
            scale = float(p.detach().float().pow(2).mean().sqrt()) or 1.0
            groups.append({"params": [p], "lr": rel * scale / k, "base": rel * scale / k})
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
        total = epochs * len(fit)
        warmup = max(1, total // 10)
        step = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="distill", disable=not show, leave=False)
        for _ in range(epochs):
            order = torch.randperm(len(fit), generator=gen).tolist()
            for i in order:
                factor = min(1.0, (step + 1) / warmup)
                factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
                for g in opt.param_groups:
                    g["lr"] = g["base"] * max(factor, 0.02)
                with torch.no_grad():
                    target = _call(teacher, fit[i], i, "data")
                student = _call(model, fit[i], i, "data")
                err, norm = _squared_errors(student, target, padding_mask(fit[i]))
                loss = err / norm.clamp_min(torch.finfo(norm.dtype).tiny)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(factors), 1.0)
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            error = _held_out_error(model, teacher, held)
            if error < best:
                best, best_state, best_step = error, copy.deepcopy(model.state_dict()), step
        bar.close()
        model.load_state_dict(best_state)
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.train(flag)
    return DistillReport(
        before=before,
        after=best,
        epochs=epochs,
        steps=step,
        best_step=best_step,
        trained_params=sum(p.numel() for p in factors),
        seconds=time.perf_counter() - start,
    )
