"""Tucker format: a small core multiplied by one factor matrix per mode.

``W[l] = core[l] x_1 U_1 ... x_{m+n} U_{m+n}``; a leading layer mode is not compressed (the
core has a leading ``n_layers`` dimension and the factors are shared by all layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .. import decompose
from .._ops import (
    capturing,
    kronecker_whiten,
    mode_dot,
    sliced_matmul,
    sliced_matmul_work,
    symmetric_root,
    unfold,
)
from .._shapes import Modes
from . import _curves
from ._strategy import Gemm, Strategy, WeightShape, Work, apply_two_gemms, reconstructed
from .base import (
    FactorizedMatrix,
    Option,
    add_bias,
    balanced_std,
    layer_count,
    listed,
    member,
    pick,
)


def _core(w: TuckerFormat, layer: int | None) -> Tensor:
    core = member(w, "core")
    return core if layer is None else core[layer]


def _prepare_factorized(w: TuckerFormat, layer: int | None) -> tuple[Tensor, ...]:
    core = _core(w, layer).reshape(w._core_rows, -1)
    return (core, *listed(member(w, "factors")))


def _apply_factorized(
    w: TuckerFormat, x: Tensor, ops: tuple[Tensor, ...], bias: Tensor | None
) -> Tensor:
    core, factors = ops[0], ops[1:]
    m = len(w.out_modes)
    outs, ins = factors[:m], factors[m:]
    x = x.contiguous()  # the products view it as (rows, i_n)
    if (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in (*ops, x))
        and not capturing()  # a traced graph records plain products (and differentiates them)
    ):
        recompute = _projection_recomputed(w.in_features, w.out_features, x.shape[0])
        y = _ModeProducts.apply(x, core, recompute, len(ins), *ins, *outs)
    else:
        y = _expand(torch.mm(core, _project(x, ins)[-1].view(core.shape[1], -1)), outs)[-1]
    return add_bias(y.view(x.shape[0], -1), bias)


# Layout. Each mode product is one GEMM that takes its mode from one end of the tensor's
# memory and writes the new one at the other end: the modes rotate through memory and no
# product's output needs a transposing copy (mode by mode on the last axis, as before,
# copied every output: 25-40% of the time at batch 512). The projection takes the in modes
# from the back of x (batch, i_1..i_n), last first, and writes the ranks in front, ending at
# (R_in, batch); the core product writes (R_out, batch); the expansion takes the out ranks
# from the front and writes the out modes at the back, ending at (batch, out). No GEMM has
# both operands transposed: with a mode of 8, that ran 13x slower on this CPU's BLAS.


def _project(x: Tensor, ins: Sequence[Tensor]) -> list[Tensor]:
    """``x (batch, in)`` onto the in-factors: the input of each product (``x`` first), then
    the result ``(r_1, r_2..r_n * batch)``, i.e. ``(R_in, batch)``."""
    ts = [x]
    for v in reversed(ins):  # (r_{k+1}.., batch, i_1..i_k) -> (r_k.., batch, i_1..i_{k-1})
        ts.append(torch.mm(v.T.contiguous(), ts[-1].view(-1, v.shape[0]).T))
    return ts


def _expand(s: Tensor, outs: Sequence[Tensor]) -> list[Tensor]:
    """``s (R_out, batch)`` expanded by the out-factors: the input of each product, then the
    result ``(batch * o_1..o_{m-1}, o_m)``, i.e. ``(batch, out)``."""
    ss = [s]
    for u in outs:  # (q_k.., batch, o_1..o_{k-1}) -> (q_{k+1}.., batch, o_1..o_k)
        ss.append(F.linear(ss[-1].view(u.shape[1], -1).T, u))
    return ss


class _ModeProducts(torch.autograd.Function):
    """The factorized strategy in training, with a backward that keeps the rotated layout.

    Autograd's own backward of the rotated products writes each input's gradient in the
    layout that the product read it in, with GEMMs whose operands are both transposed; here
    each gradient is one GEMM with at most one, written in its tensor's layout. With
    ``recompute`` the projection's intermediates (each about batch x in) are rebuilt from
    ``x`` in backward rather than kept (see ``_projection_recomputed``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, core: Tensor, recompute: bool, n_in: int, *factors: Tensor
    ) -> Tensor:
        ins, outs = factors[:n_in], factors[n_in:]
        ts = _project(x, ins)
        ss = _expand(torch.mm(core, ts[-1].view(core.shape[1], -1)), outs)
        kept = [x, ts[-1]] if recompute else ts
        ctx.save_for_backward(core, *factors, *kept, *ss[:-1])
        ctx.shape = (recompute, n_in, len(kept), x.dtype)
        return ss[-1].view(x.shape[0], -1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        recompute, n_in, n_kept, x_dtype = ctx.shape
        core, *rest = ctx.saved_tensors
        n_factors = len(ctx.needs_input_grad) - 4  # after x, core, recompute, n_in
        factors, kept, ss = rest[:n_factors], rest[n_factors:][:n_kept], rest[n_factors + n_kept :]
        # under autocast the forward ran in a lower precision than the parameters (and x)
        dt, dtypes = g.dtype, [core.dtype] + [f.dtype for f in factors]
        core, factors = core.to(dt), [f.to(dt) for f in factors]
        ins, outs = factors[:n_in], factors[n_in:]
        kept = [t.to(dt) for t in kept]
        ts = [*_project(kept[0], ins[1:]), kept[1]] if recompute else kept
        grads: list[Tensor | None] = [None] * n_factors
        d = g.contiguous()
        for k in reversed(range(len(outs))):  # d: the gradient of ss[k + 1]
            u = outs[k]
            d = d.view(-1, u.shape[0])  # (rest, o_k)
            grads[n_in + k] = torch.mm(d.T, ss[k].view(u.shape[1], -1).T)  # (o_k, q_k)
            d = torch.mm(u.T.contiguous(), d.T)  # (q_k, rest): ss[k]'s layout
        d = d.view(core.shape[0], -1)  # (R_out, batch)
        d_core = torch.mm(d, ts[-1].view(core.shape[1], -1).T)
        d = torch.mm(core.T, d)  # (R_in, batch): the projection's result
        dx = None
        for j in range(n_in, 0, -1):  # d: the gradient of ts[j], made by ins[n_in - j]
            v = ins[n_in - j]
            read = ts[j - 1].view(-1, v.shape[0])  # (rest, i_k)
            d = d.view(v.shape[1], -1)  # (r_k, rest)
            grads[n_in - j] = torch.mm(d, read).T  # (i_k, r_k)
            if j > 1 or ctx.needs_input_grad[0]:
                d = torch.mm(d.T, v.T.contiguous())  # (rest, i_k): ts[j - 1]'s layout
        if ctx.needs_input_grad[0]:
            dx = d.view(g.shape[0], -1).to(x_dtype)
        d_core = d_core.to(dtypes[0])
        grads = [t if t is None else t.to(want) for t, want in zip(grads, dtypes[1:])]
        return (dx, d_core, None, None, *grads)


def _projection_recomputed(in_features: int, out_features: int, batch: int) -> bool:
    # In training with activations of at least a quarter of the weight's size, the in-mode
    # products' intermediates (each about batch * in) are recomputed in backward from x
    # rather than kept: at 1024 x 1024, 10%, batch 512, saved bytes 1.26x -> 1.01x
    # nn.Linear's for about 10% more time. Recomputing the out-mode expansions as well would
    # save as much again but cost 30-60% more time: not done (checkpointing=True does).
    return 4 * batch * (in_features + out_features) >= in_features * out_features


def _factorized_products(s: WeightShape, B: int) -> list[Gemm]:
    """In the order ``_apply_factorized`` runs them: the in modes last to first, the core,
    the out modes first to last; each ``(rest, mode) @ (mode, new)``."""
    m = len(s.out_modes)
    r_out, r_in = s.rank[:m], s.rank[m:]
    out = []
    for k in reversed(range(len(s.in_modes))):
        rows = B * math.prod(s.in_modes[:k]) * math.prod(r_in[k + 1 :])
        out.append((rows, s.in_modes[k], r_in[k], 1))
    out.append((B, math.prod(r_in), math.prod(r_out), 1))
    for k in range(m):
        rows = B * math.prod(r_out[k + 1 :]) * math.prod(s.out_modes[:k])
        out.append((rows, r_out[k], s.out_modes[k], 1))
    return out


def _work_factorized(s: WeightShape, batch: int) -> Work:
    products = _factorized_products(s, batch)
    m = len(s.out_modes)
    # the products write in place; only the in-factors are copied, transposed (i_k * r_k each)
    copied = sum(i * r for i, r in zip(s.in_modes, s.rank[m:]))
    # in backward, from x: the projection up to the last input it needs (all but the last)
    recompute = _projection_recomputed(s.in_features, s.out_features, batch)
    again = products[: len(s.in_modes) - 1] if recompute else []
    return Work([], products, copied_numel=copied, recomputed=again)


def _kron(factors: list[Tensor]) -> Tensor:
    """Kronecker product of ``(n_k, r_k)`` matrices -> ``(prod n_k, prod r_k)``, row-major."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :, None] * f[None, :, None, :]).reshape(
            out.shape[0] * f.shape[0], out.shape[1] * f.shape[1]
        )
    return out


def _prepare_kron(w: TuckerFormat, layer: int | None) -> tuple[Tensor, ...]:
    # Kronecker products of the factors, (in, R_in) and (out, R_out); the core is folded
    # into the side with the larger rank so that the apply step is two GEMMs through
    # min(R_in, R_out).
    m = len(w.out_modes)
    factors = listed(member(w, "factors"))
    k_in, k_out = _kron(factors[m:]), _kron(factors[:m])
    core = _core(w, layer).reshape(k_out.shape[1], k_in.shape[1])
    if k_in.shape[1] <= k_out.shape[1]:
        return k_in, k_out @ core
    return (core @ k_in.T).T, k_out


def _work_kron(s: WeightShape, batch: int) -> Work:
    m = len(s.out_modes)
    R_out, R_in = math.prod(s.rank[:m]), math.prod(s.rank[m:])
    if R_in <= R_out:
        prepare, mid = [(s.out_features, R_out, R_in, 1)], R_in
    else:
        prepare, mid = [(R_out, R_in, s.in_features, 1)], R_out
    apply = [(batch, s.in_features, mid, 1), (batch, mid, s.out_features, 1)]
    return Work(prepare, apply, prepare_numel=s.in_features * R_in + s.out_features * R_out)


def _reconstruction(s: WeightShape) -> tuple[list[Gemm], int]:
    dims, out = list(s.rank), []
    for k, n in enumerate(s.out_modes + s.in_modes):
        out.append((math.prod(dims) // dims[k], dims[k], n, 1))
        dims[k] = n
    return out, 0


class TuckerFormat(FactorizedMatrix):
    """``core ([L,] *out_ranks, *in_ranks)``; ``factors``: out ``(o_k, r_k)``, in ``(i_k, r_k)``."""

    name = "tucker"
    tensorly_type = "TuckerTensor"
    rank: tuple[int, ...]
    strategies = (
        Strategy(
            "factorized",
            _prepare_factorized,
            _apply_factorized,
            _work_factorized,
            "mode by mode, each product one GEMM that rotates the modes through memory (no "
            "copies between them), the core in between",
        ),
        reconstructed(_reconstruction),
        Strategy(
            "kron",
            _prepare_kron,
            apply_two_gemms,
            _work_kron,
            "Kronecker products of the factors, the core folded into the side of larger "
            "rank: two GEMMs through min(R_in, R_out)",
        ),
    )

    # ---------------------------------------------------------------- rank policy

    @classmethod
    def rank_caps(cls, in_modes: Modes, out_modes: Modes, n_layers: int = 1) -> tuple[int, ...]:
        return tuple(out_modes) + tuple(in_modes)

    @classmethod
    def param_count(cls, in_modes: Modes, out_modes: Modes, rank: Any, n_layers: int = 1) -> int:
        sizes = tuple(out_modes) + tuple(in_modes)
        return n_layers * math.prod(rank) + sum(s * r for s, r in zip(sizes, rank))

    @classmethod
    def rank_family(cls, caps: tuple[int, ...]) -> Callable[[float], tuple[int, ...]]:
        """Ranks proportional to the mode sizes: ``r_k = clip(round(t * n_k), 1, n_k)``."""
        return lambda t: tuple(min(c, max(1, round(t * c))) for c in caps)

    @classmethod
    def rank_help(cls, n: int) -> str:
        return f"{n} ranks (one per out mode, then one per in mode)"

    # ---------------------------------------------------------------- parameters

    def _build(self, factory: dict) -> None:
        lead = (self.n_layers,) if self.n_layers > 1 else ()
        self.core = nn.Parameter(torch.empty(*lead, *self.rank, **factory))
        sizes = self.out_modes + self.in_modes
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(n, r, **factory)) for n, r in zip(sizes, self.rank)]
        )
        self._core_rows = math.prod(self.rank[: len(self.out_modes)])  # bound once

    def _to_matrix(self, layer: int | None) -> Tensor:
        t = _core(self, layer)
        for k, f in enumerate(self.factors):
            t = mode_dot(t, f, k)
        return t.reshape(self.out_features, self.in_features)

    def _rows(self, index: Tensor, layer: int | None) -> Tensor:
        # Out modes first, S the product of the in ranks. With fewer rows than the first
        # out mode, each row's first factor row meets the core (n, r_2..r_m S); otherwise the
        # whole first factor does, once (o_1, r_2..r_m S), and each row's second factor row
        # contracts its slice (grouped by first digit: no per-row copy of the core). The
        # other out modes follow row by row; the (n, S) result meets the Kronecker product
        # of the in factors (S, in) in one GEMM.
        m, factors = len(self.out_modes), listed(member(self, "factors"))
        digits, n, rank = self.row_digits(index), len(index), self.rank
        core = _core(self, layer).reshape(rank[0], -1)
        if m == 1 or n < self.out_modes[0] or n == 1:
            h, done = pick(factors[0], digits[0]) @ core, 1
        else:
            C = (factors[0] @ core).reshape(self.out_modes[0], rank[1], -1)
            u = pick(factors[1], digits[1]).unsqueeze(1)  # (n, 1, r_2); n > 1: tensors
            h, done = sliced_matmul(u, C, cast(Tensor, digits[0])), 2
        for f, d in zip(factors[done:m], digits[done:]):
            u = pick(f, d).unsqueeze(1)  # (n, 1, r_k)
            h = torch.bmm(u, h.reshape(n, f.shape[1], -1))
        ins = factors[m:]
        if n < self.in_modes[0]:  # few rows: mode by mode, not the (S, in) Kronecker product
            h = h.reshape(n, *rank[m:])
            for k, f in enumerate(ins):
                h = mode_dot(h, f, k + 1)
            return h.reshape(n, self.in_features)
        kron = ins[0]
        for f in ins[1:]:
            kron = torch.kron(kron, f)
        return h.reshape(n, -1) @ kron.T

    @classmethod
    def row_work(cls, shape: WeightShape, n: int) -> Work:
        m, rank, o1 = len(shape.out_modes), shape.rank, shape.out_modes[0]
        S = math.prod(rank[m:])
        left = math.prod(rank[1:m]) * S  # what remains after each out mode
        numel, calls = n * sum(rank[:m]), 0
        if m == 1 or n < o1 or n == 1:
            prepare, apply, done = [], [(n, rank[0], left, 1)], 1
        else:
            prepare = [(o1, rank[0], left, 1)]
            left //= rank[1]
            apply, moved, calls = sliced_matmul_work(n, 1, rank[1], left, o1)
            numel, done = numel + moved, 2
        for r in rank[done:m]:
            left //= r
            apply.append((1, r, left, n))
        if n >= shape.in_modes[0]:
            apply.append((n, S, shape.in_features, 1))
            return Work(
                prepare,
                apply,
                prepare_numel=S * shape.in_features,
                apply_numel=numel,
                extra_calls=calls,
            )
        before, after = n, S  # mode by mode: (i_k, s_k) times (before, s_k, after)
        for i, r in zip(shape.in_modes, rank[m:]):
            after //= r
            apply.append((i, r, after, before))
            numel += before * i * after
            before *= i
        return Work(prepare, apply, apply_numel=numel, extra_calls=calls)

    def _init_factors(self, std: float) -> None:
        sigma = balanced_std(std, math.prod(self.rank), 1 + len(self.factors))
        nn.init.normal_(self.core, 0.0, sigma)
        for f in self.factors:
            nn.init.normal_(f, 0.0, sigma)

    def _layer_slice(self, layer: int) -> Tensor:
        return self.core[layer]

    def _in_mode_factors(self) -> list[tuple[nn.Parameter, int]]:
        m = len(self.out_modes)
        return [(f, 0) for f in list(self.factors)[m:]]  # (i_k, r_k)

    @torch.no_grad()
    def fit_closed_form(self, layer: int | None, weight: Tensor, gram: Tensor) -> bool:
        """Whitened Tucker start for ``||(W - What) S||_F`` (``S S^T = gram``).

        Out factors: the HOSVD (De Lathauwer et al., SIAM J. Matrix Anal. Appl. 21(4), 2000)
        of the out modes of ``W S``; a projection of the out side commutes with ``W -> W S``,
        so these are the HOSVD subspaces in the whitened norm itself. In factors: the HOSVD
        of the in modes of the Kronecker-whitened weight (see :meth:`fit_kronecker_whitened`),
        mapped back. Core: the exact least-squares core for those factors,
        ``U^T W C V (V^T C V)^{-1}`` (``U``, ``V`` the Kronecker products of the out and in
        factors). Joint layers share the factors: no per-layer closed form (``False``).
        """
        if self.n_layers > 1:
            return False
        m, C = len(self.out_modes), gram.double()
        W = weight.double()
        root, _ = symmetric_root(C)
        whitened = (W @ root).reshape(*self.out_modes, self.in_features)
        outs = [
            decompose._leading_subspace(unfold(whitened, k), r, None)
            for k, r in enumerate(self.rank[:m])
        ]
        tensor = W.reshape(*self.out_modes, *self.in_modes)
        tensor, inverses = kronecker_whiten(tensor, C, self.in_modes, m)
        ins = [
            inverse @ decompose._leading_subspace(unfold(tensor, m + k), r, None)
            for k, (inverse, r) in enumerate(zip(inverses, self.rank[m:]))
        ]
        U, V = _kron(outs), _kron(ins)  # (out, R_out) orthonormal, (in, R_in)
        CV = C @ V
        core = torch.linalg.solve(V.T @ CV, (U.T @ W @ CV).T).T  # (R_out, R_in)
        self.core.copy_(core.reshape(self.core.shape))
        for param, factor in zip(self.factors, outs + ins):
            param.copy_(factor)
        return True

    def _moments(self, layer: int | None) -> tuple[float, float] | None:
        core = _core(self, layer).double()
        factors = [f.double() for f in self.factors]
        total, projected = core, core
        for k, f in enumerate(factors):
            total = mode_dot(total, f.sum(0, keepdim=True), k)
            projected = mode_dot(projected, f.T @ f, k)
        return float(total.sum()), float((core * projected).sum())

    def _scaled_factors(self) -> list[nn.Parameter]:
        return [self.core, *self.factors]

    def _decompose(self, tensor: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        lead = [None] if self.n_layers > 1 else []
        result = decompose.tucker(tensor, lead + list(self.rank), **kwargs)
        values = {"core": result.core}
        for k, f in enumerate(result.factors[len(lead) :]):
            assert f is not None  # every mode after the layer mode has a rank: a factor
            values[f"factors.{k}"] = f
        return values

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
        """Exact error of the truncated HOSVD, ``||W||^2 - ||W x_k U_k^T||^2`` (De Lathauwer
        et al., SIAM J. Matrix Anal. Appl. 21(4), 2000): an upper bound of what the HOOI of
        ``from_linear`` reaches."""
        lead = (n_layers,) if n_layers > 1 else ()
        X = weight.to(torch.float64).reshape(*lead, *out_modes, *in_modes)
        norm_sq = float(X.pow(2).sum())
        caps = cls.rank_caps(in_modes, out_modes, n_layers)

        def count(rank: Any) -> int:
            return cls.param_count(in_modes, out_modes, rank, n_layers)

        offset = len(lead)
        bases, tails = [], []
        for k in range(len(caps)):
            M = unfold(X, offset + k)
            vals, vecs = torch.linalg.eigh(M @ M.T)  # left singular vectors of the unfolding
            bases.append(vecs.flip(-1))
            tails.append(_curves.tails(vals.flip(-1).clamp_min(0)))
        chain = _curves.chain(tails, caps, count)
        members = _curves.sample(chain, count, 4 * _curves.CHAIN_SAMPLES)
        family = _curves.family(cls, in_modes, out_modes, n_layers, fractions)

        def error(rank: Any) -> float:
            core = X
            for k in sorted(range(len(rank)), key=lambda k: rank[k] / bases[k].shape[0]):
                core = mode_dot(core, bases[k][:, : rank[k]].T, offset + k)
            return max(norm_sq - float(core.pow(2).sum()), 0.0)

        ranks = list(dict.fromkeys([*members, *family]))
        return sorted((count(r), error(r), r) for r in ranks)

    # ---------------------------------------------------------------- TensorLy

    def to_tensorly(self, convert: Callable[[Tensor], Any]) -> Any:
        """A ``TuckerTensor``; a layer mode gets an identity factor."""
        from tensorly.tucker_tensor import TuckerTensor

        factors = [convert(f) for f in self.factors]
        if self.n_layers > 1:
            eye = torch.eye(self.n_layers, dtype=self.core.dtype, device=self.core.device)
            factors.insert(0, convert(eye))
        return TuckerTensor((convert(self.core), factors))

    @classmethod
    def from_tensorly(
        cls, obj: Any, in_modes: Modes, out_modes: Modes, convert: Callable[[Any], Tensor]
    ) -> FactorizedMatrix | None:
        from tensorly.tucker_tensor import TuckerTensor

        n_layers = layer_count(obj.shape, in_modes, out_modes)
        if not isinstance(obj, TuckerTensor) or n_layers is None:
            return None
        core, factors = convert(obj.core), [convert(f) for f in obj.factors]
        if n_layers > 1:  # absorb the layer factor: the layer mode is kept at full size
            core = torch.tensordot(factors.pop(0), core, dims=([1], [0]))
        rank = tuple(core.shape[1:] if n_layers > 1 else core.shape)
        module = cls.empty(
            in_modes, out_modes, rank, n_layers, device=core.device, dtype=core.dtype
        )
        module.load_values({"core": core, **{f"factors.{k}": f for k, f in enumerate(factors)}})
        return module
