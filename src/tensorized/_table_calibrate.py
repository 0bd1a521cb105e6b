"""Calibration of embedding tables: the observed token frequencies weight the rows.

A lookup's output is a row of the table, so the expected squared output error over the
calibration tokens is ``sum_i p_i ||E_i - E_hat_i||^2`` with ``p_i`` the frequency of row
``i``: frequent rows matter more, rows never seen hardly at all. :func:`row_weights` turns
counts into weights (smoothed, so that unseen rows still keep their shape for text the
calibration set did not hold) and :func:`calibrate_table` refines a factorized table on that
weighted loss with L-BFGS from its data-free decomposition, keeping the start if the
refinement does not improve it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice

import torch
from torch import Tensor, nn

from ._embedding import FactorizedEmbedding
from ._record import _call, padding_mask

__all__ = ["calibrate_table", "record_token_counts", "row_weights"]

#: Weight of a row relative to the mean row, mixed into every row's frequency weight: unseen
#: rows keep this share (a table calibrated on little text must still serve all of it).
SMOOTHING = 0.1


@torch.no_grad()
def record_token_counts(
    model: nn.Module,
    tables: Mapping[str, nn.Embedding],
    data: Iterable,
    *,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """How often each row of each table is looked up on ``data`` (float64 counts of shape
    ``(num_embeddings,)``); positions a keyword batch's integer ``attention_mask`` marks as
    padding are not counted. The model runs in eval mode; flags and hooks are restored."""
    counts = {n: torch.zeros(t.num_embeddings, dtype=torch.float64) for n, t in tables.items()}
    mask: list[Tensor | None] = [None]

    def hook(name: str) -> object:
        def count(module: nn.Module, args: tuple) -> None:
            index = args[0]
            m = mask[0]
            if m is not None and tuple(m.shape) == tuple(index.shape):
                index = index[m.to(index.device) != 0]
            found = torch.bincount(index.reshape(-1).cpu(), minlength=len(counts[name]))
            counts[name] += found[: len(counts[name])].double()

        return count

    handles = [t.register_forward_pre_hook(hook(n)) for n, t in tables.items()]  # type: ignore[arg-type]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for k, item in enumerate(islice(iter(data), max_batches)):
            mask[0] = padding_mask(item)
            _call(model, item, k)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.train(flag)
    return counts


def row_weights(counts: Tensor, rows: int | None = None) -> Tensor:
    """Per-row weights with mean 1 over the real rows: the frequencies mixed with
    :data:`SMOOTHING` of the uniform weight; padding rows (beyond ``len(counts)``, up to
    ``rows``) get 0."""
    total = float(counts.sum())
    n = len(counts)
    freq = counts / total * n if total > 0 else torch.ones_like(counts)
    w = (1 - SMOOTHING) * freq + SMOOTHING
    if rows is not None and rows > n:
        w = torch.cat([w, w.new_zeros(rows - n)])
    return w


def _weighted_error(table: FactorizedEmbedding, target: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i ||E_hat_i - E_i||^2 / sum_i w_i ||E_i||^2`` over the real rows."""
    rows = table.weight.to_matrix()[: table.num_embeddings]
    diff = (rows.double() - target).pow(2).sum(1)
    return (w * diff).sum() / (w * target.pow(2).sum(1)).sum().clamp_min(1e-300)


def calibrate_table(
    table: FactorizedEmbedding, target: Tensor, counts: Tensor, steps: int
) -> tuple[float, float]:
    """Refine ``table`` towards ``target`` ``(num_embeddings, dim)`` in the frequency-weighted
    norm (``steps`` L-BFGS iterations). Returns the relative weighted error ``(before,
    after)``; the result is never worse than the start."""
    target = target.detach().double()
    if table.padding_idx is not None:
        target = target.clone()
        target[table.padding_idx] = 0  # served as zero whatever the factors hold
    w = row_weights(counts.to(target.device))[: table.num_embeddings]
    params = list(table.parameters())
    with torch.no_grad():
        before = float(_weighted_error(table, target, w))
    if steps <= 0:
        return before, before
    start = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )
    opt.param_groups[0].update(tolerance_grad=0.0, tolerance_change=0.0)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = _weighted_error(table, target, w)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
    with torch.no_grad():
        after = float(_weighted_error(table, target, w))
        if not after < before:  # no better (or not finite): keep the start
            for p, s in zip(params, start):
                p.copy_(s)
            after = before
    return before, after
