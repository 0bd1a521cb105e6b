"""Tensorized shapes: split feature counts into tensor modes and validate user-given modes.

A linear weight of shape ``(out_features, in_features)`` is viewed as a tensor of shape
``(*out_modes, *in_modes)`` with ``prod(out_modes) == out_features`` and
``prod(in_modes) == in_features`` (row-major, as ``torch.reshape`` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Modes", "factorize", "tensorize_rows", "tensorize_shape", "validate_modes"]

Modes = tuple[int, ...]


# Trial division stops here, so a huge prime (e.g. 2**61 - 1) cannot hang the split: a
# cofactor left above it is kept whole (then it may be composite; the product stays exact).
_TRIAL_LIMIT = 1 << 16


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n and p <= _TRIAL_LIMIT:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, order: int) -> Modes:
    """Split ``n`` into ``order`` integer factors that are as balanced as possible.

    Prime factors are assigned largest first to the currently smallest slot, which keeps
    the factors close to ``n ** (1 / order)``. Slots that get no prime factor stay 1 (only
    when ``n`` has fewer prime factors than ``order``).

    Args:
        n: the number to split, ``n >= 1``.
        order: how many factors, ``order >= 1``.

    Returns:
        A non-increasing tuple of ``order`` ints whose product is ``n``.

    Example:
        >>> factorize(1024, 3)
        (16, 8, 8)
        >>> factorize(768, 2)
        (32, 24)
    """
    _check_positive_int(n, "n")
    _check_positive_int(order, "order")
    slots = [1] * order
    for p in sorted(_prime_factors(n), reverse=True):
        slots[slots.index(min(slots))] *= p
    return tuple(sorted(slots, reverse=True))


def _default_order(n: int) -> int:
    """Order whose balanced factors are about 8 or more (2 for n < 64, at most 4)."""
    return max(2, min(4, len(_prime_factors(n)), round(math.log(n, 8)) if n > 1 else 1))


def tensorize_shape(
    in_features: int, out_features: int, order: int | None = None
) -> tuple[Modes, Modes]:
    """Propose matching in/out tensorizations of the same order.

    Args:
        in_features: number of input features.
        out_features: number of output features.
        order: number of modes for each side. ``None`` picks 2 to 4 modes so that the
            modes are about 8 or larger.

    Returns:
        ``(in_modes, out_modes)``, each of length ``order``; each mode is >= 2 where the
        feature count has enough prime factors (a prime count gets modes of 1).

    Example:
        >>> tensorize_shape(1024, 4096)
        ((8, 8, 4, 4), (8, 8, 8, 8))
    """
    _check_positive_int(in_features, "in_features")
    _check_positive_int(out_features, "out_features")
    if order is None:
        order = max(_default_order(in_features), _default_order(out_features))
    _check_positive_int(order, "order")
    return factorize(in_features, order), factorize(out_features, order)


def tensorize_rows(n: int, order: int) -> Modes:
    """Modes for ``n`` table rows (an embedding's vocabulary), padded where ``n`` factors
    badly.

    The exact balanced split (:func:`factorize`) is kept when its largest mode is at most
    twice ``n ** (1 / order)``; otherwise (30522 = 2 x 3 x 5087) each mode is the ceiling of
    the ``k``-th root of what is left to cover, which gives balanced modes whose product is
    the smallest such cover found, at most a few percent above ``n`` (30522 -> 32 x 31 x 31
    = 30752). Rows beyond ``n`` are padding that a lookup never returns.

    Example:
        >>> tensorize_rows(30522, 3)
        (32, 31, 31)
        >>> tensorize_rows(1000, 3)
        (10, 10, 10)
    """
    _check_positive_int(n, "num_embeddings")
    _check_positive_int(order, "n_tensorized_modes")
    exact = factorize(n, order)
    if exact[0] <= 2 * math.ceil(n ** (1.0 / order)):
        return exact
    modes, left = [], n
    for k in range(order, 0, -1):
        mode = _ceil_root(left, k)
        modes.append(mode)
        left = -(-left // mode)
    return tuple(sorted(modes, reverse=True))


def _ceil_root(n: int, k: int) -> int:
    """The smallest int ``m`` with ``m ** k >= n`` (exact, no float rounding error)."""
    m = max(1, round(n ** (1.0 / k)))
    while m**k < n:
        m += 1
    while m > 1 and (m - 1) ** k >= n:
        m -= 1
    return m


def validate_modes(modes: int | Sequence[int], features: int | None, name: str) -> Modes:
    """Check user-given modes and return them as a tuple of ints.

    Args:
        modes: a sequence of positive ints (an int is accepted as one mode).
        features: the feature count the modes must multiply to, or ``None`` to skip.
        name: the argument name, used in error messages.

    Raises:
        TypeError: if ``modes`` is not a sequence of ints.
        ValueError: if a mode is < 1 or the product does not equal ``features``.
    """
    if isinstance(modes, bool):
        raise TypeError(f"{name} must be a tuple of positive ints, got {modes!r}")
    if isinstance(modes, int):
        modes = (modes,)
    if not isinstance(modes, Sequence) or isinstance(modes, str) or len(modes) == 0:
        raise TypeError(f"{name} must be a non-empty tuple of positive ints, got {modes!r}")
    out = []
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{name} must contain only ints, got {modes!r}")
        if m < 1:
            raise ValueError(f"{name} must contain only positive sizes, got {tuple(modes)!r}")
        out.append(int(m))
    if features is not None and math.prod(out) != features:
        raise ValueError(
            f"{name}={tuple(out)!r} multiplies to {math.prod(out)}, but the layer has "
            f"{features} features; the modes must multiply to exactly {features}"
        )
    return tuple(out)


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def resolve_modes(
    in_spec: int | Sequence[int] | None,
    out_spec: int | Sequence[int] | None,
    order: int | None,
) -> tuple[Modes, Modes]:
    """Modes from user input: a tuple is taken as is, an int is split automatically."""
    for name, spec in (("in_tensorized_features", in_spec), ("out_tensorized_features", out_spec)):
        valid = spec is None or isinstance(spec, int | Sequence)
        if isinstance(spec, bool | str) or not valid:
            hint = ""
            if name.startswith("in") and isinstance(spec, float | str):
                hint = " (tltorch 0.5 moved rank to second place: pass rank=... by keyword)"
            raise TypeError(
                f"{name} must be a tuple of ints (the modes) or an int (auto-tensorize), got "
                f"{type(spec).__name__} {spec!r}{hint}"
            )
    if in_spec is None or out_spec is None:
        raise TypeError(
            "in_tensorized_features and out_tensorized_features are required (a tuple of "
            "modes or an int feature count)"
        )
    if isinstance(in_spec, int) and isinstance(out_spec, int):
        return tensorize_shape(in_spec, out_spec, order)
    if isinstance(in_spec, int):
        # The modes given on one side set how many the int on the other is split into.
        out_modes = validate_modes(out_spec, None, "out_tensorized_features")
        return factorize(in_spec, len(out_modes)), out_modes
    in_modes = validate_modes(in_spec, None, "in_tensorized_features")
    if isinstance(out_spec, int):
        return in_modes, factorize(out_spec, len(in_modes))
    return in_modes, validate_modes(out_spec, None, "out_tensorized_features")
