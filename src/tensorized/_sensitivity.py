"""How much a model's output moves when one layer's output is perturbed: the weights that
turn each layer's own (relative) output error into its share of the model's output error.

A layer's relative output error says little about the model's: an error in a query
projection is damped by the softmax, one in an MLP's output projection goes straight into
the residual stream. :func:`output_sensitivity` measures, for each layer (or group), the
model's relative output change per unit of relative noise added to that layer's output:
``s = (||f(x; y + eps rms(y) z) - f(x)||^2 / ||f(x)||^2) / eps^2`` with ``z`` standard
normal, a random-probe (Hutchinson, "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", Commun. Statist. Simul. Comput. 18(3), 1989)
finite-difference estimate of the squared Frobenius norm of the output's Jacobian. A
compression error of relative size ``e`` in that layer then costs about ``s * e`` of the
model's output; budgeted allocation minimizes the sum of those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice

import torch
from torch import Tensor, nn

from ._distill import _squared_errors
from ._record import _call, padding_mask

__all__ = ["output_sensitivity"]

EPS = 0.05  # relative noise: small enough to stay linear, far above round-off
BATCHES = 4  # calibration batches probed (the estimate averages over their rows)


@torch.no_grad()
def output_sensitivity(
    model: nn.Module,
    groups: Mapping[str, Sequence[nn.Module]],
    data: Iterable,
    *,
    batches: int = BATCHES,
    eps: float = EPS,
    seed: int = 0,
) -> dict[str, float]:
    """``name -> s`` for each group of modules (noise added to all of a group's outputs at
    once), on the first ``batches`` items of ``data``; padding positions (a keyword batch's
    integer ``attention_mask``) are left out of the output change. The model runs in eval
    mode; training flags are restored and the hooks removed, even when it raises."""
    items = list(islice(iter(data), batches))
    if not items:
        return {name: 1.0 for name in groups}  # nothing to probe with: all alike
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        reference = [_call(model, item, k) for k, item in enumerate(items)]
        out: dict[str, float] = {}
        for name, modules in groups.items():
            generator = torch.Generator().manual_seed(seed)

            def perturb(
                module: nn.Module, args: tuple, y: Tensor, generator: torch.Generator = generator
            ) -> Tensor:
                noise = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
                return y + eps * y.pow(2).mean().sqrt() * noise

            handles = [m.register_forward_hook(perturb) for m in modules]
            try:
                err = norm = 0.0
                for k, item in enumerate(items):
                    e, n = _squared_errors(_call(model, item, k), reference[k], padding_mask(item))
                    err, norm = err + float(e), norm + float(n)
            finally:
                for handle in handles:
                    handle.remove()
            out[name] = err / max(norm, torch.finfo(torch.float64).tiny) / eps**2
    finally:
        for module, flag in flags.items():
            module.train(flag)
    return out
