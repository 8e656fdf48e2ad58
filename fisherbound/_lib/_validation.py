"""Input checks with the house error messages.

Every message names the argument, states the requirement, says what was
received and, where there is one, the remedy:
"z must be finite; got NaN or inf in rows [3, 17]."
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from fisherbound._lib._namespace import array_namespace, device_of

Array = Any


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1, else a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        msg = f"{name} must be an integer >= 1; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    n = int(value)  # type: ignore[call-overload,unused-ignore]
    if n < 1:
        msg = f"{name} must be an integer >= 1; got {n}."
        raise ValueError(msg)
    return n


def check_optional_int(value: object, name: str) -> int | None:
    """None, or ``value`` as an int >= 1 (``check_positive_int``)."""
    return None if value is None else check_positive_int(value, name)


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is True or False, else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        msg = f"{name} must be True or False; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    return value


def check_real(value: object, name: str, *, positive: bool = True) -> float:
    """``value`` as a finite float (> 0 when ``positive``), else a TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    x = float(value)
    if not math.isfinite(x) or (positive and x <= 0.0):
        req = "finite and > 0" if positive else "finite"
        msg = f"{name} must be {req}; got {x!r}."
        raise ValueError(msg)
    return x


def check_target(value: object) -> float | None:
    """``target_relative_error``: None or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = (
            "target_relative_error must be a positive number (e.g. 0.05) or None; got "
            f"{type(value).__name__} {value!r}."
        )
        raise TypeError(msg)
    t = float(value)
    if not (t > 0.0 and math.isfinite(t)):
        msg = f"target_relative_error must be a positive finite number; got {value!r}."
        raise ValueError(msg)
    return t


def check_positive_real(value: object, name: str, remedy: str = "") -> float:
    """``value`` as a positive finite float; ``remedy`` ends the ValueError's message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a positive real number; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    x = float(value)
    if not (0.0 < x < math.inf):
        msg = f"{name} must be a positive finite number; got {x}.{remedy}"
        raise ValueError(msg)
    return x


def check_real_floating(xp: Any, dtype: Any, name: str = "A") -> None:
    """A TypeError unless ``dtype`` is float32 or float64 of ``xp`` (matrices, operators).

    float16 and bfloat16 are refused as everywhere else: their rounding (eps ≈ 1e-3)
    is above every tolerance of the Krylov methods.
    """
    if dtype not in (xp.float32, xp.float64):
        msg = (
            f"{name} must have a real floating-point dtype (float32 or float64); got {dtype}. "
            f"Convert a dense matrix with xp.astype({name}, xp.float64)."
        )
        raise TypeError(msg)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        msg = f"{name} must be one of {allowed}; got {value!r}."
        raise ValueError(msg)
    return value


def check_floating(x: Array, name: str, *, xp: Any = None) -> Any:
    """Check that ``x`` is a real floating-point array; return its namespace."""
    if xp is None:
        xp = array_namespace(x, names=(name,))
    if x.dtype not in (xp.float32, xp.float64):
        msg = (
            f"{name} must have a real floating-point dtype (float32 or float64); "
            f"got {x.dtype}. Convert with xp.astype({name}, xp.float64)."
        )
        raise TypeError(msg)
    return xp


def check_vector(
    x: Array, name: str, expected: str, *, xp: Any = None, size: int | None = None
) -> Any:
    """Check that ``x`` is a 1-D real floating array; return its namespace.

    Its length must be ``size``, or at least 1 when ``size`` is None. The shape
    error reads "{name} must be {expected}; got shape (...)."
    """
    xp = check_floating(x, name, xp=xp)
    if size is None:
        ok = x.ndim == 1 and int(x.shape[0]) > 0
    else:
        ok = tuple(x.shape) == (size,)
    if not ok:
        msg = f"{name} must be {expected}; got shape {tuple(x.shape)}."
        raise ValueError(msg)
    return xp


def first_indices(mask: Array, xp: Any, limit: int = 10) -> list[int]:
    """Indices of the first ``limit`` True entries of a 1-D boolean array."""
    (idx,) = xp.nonzero(mask)
    return [int(idx[i]) for i in range(min(int(idx.shape[0]), limit))]


def is_traced(x: Array) -> bool:
    """True for a value without a concrete value to read on the host.

    An abstract JAX value (a tracer inside jit, grad or shard_map), or a torch tensor
    wrapped by a ``torch.func`` transform (``vmap``'s batched tensors), whose
    ``bool()`` would be data-dependent control flow.
    """
    module = type(x).__module__
    if module.startswith("jax"):
        import jax

        return isinstance(x, jax.core.Tracer)
    if module.startswith("torch"):
        import torch

        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    return False


def known_false(flag: Array) -> bool:
    """True when the 0-d boolean ``flag`` reads False on the host.

    The test of every check on data that must pass for traced values (which have
    nothing to read, ``is_traced``): a failed check reads ``known_false(ok)``.
    One host read.
    """
    return not is_traced(flag) and not bool(flag)


def sum_is_finite(x: Array, xp: Any) -> Array:
    """Whether the sum of ``x`` is finite, as a 0-d boolean array on ``x``'s device.

    True implies every entry is finite; False means a NaN or inf entry, or finite
    entries whose sum overflowed (confirm with ``xp.isfinite(x)``). One pass with no
    boolean temporary: torch's ``isfinite(x).all()`` costs about 7 times as much on
    the CPU.
    """
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):  # NumPy: no warning for inf - inf
        return xp.isfinite(xp.sum(x))


def power_of_two_scale(top: Array, xp: Any) -> Array:
    """A power of two s with top/4 < s ≤ top/2, elementwise (1 where top is 0 or not finite).

    The exact scale factor of the routines that divide by a magnitude to keep squares
    and norms in range (Lanczos on A / s, the exact diagonal's per-example inputs):
    dividing by a power of two changes no rounding. One below the top: log2 of the
    largest float rounds up to the end of the exponent range, whose power overflows.
    """
    ok = xp.isfinite(top) & (top > 0)
    safe = xp.where(ok, top, xp.ones_like(top))
    return xp.where(ok, 2.0 ** (xp.floor(xp.log2(safe)) - 1), xp.ones_like(top))


#: Why float16 and bfloat16 parameters are refused (the adapters' messages).
HALF_PRECISION = (
    "Half precision cannot hold Fisher quantities: float16 overflows above 65504 in the "
    "sums over examples and bfloat16 keeps about 3 significant digits."
)


def check_finite(x: Array, name: str, *, xp: Any, what: str = "rows") -> None:
    """Raise a ValueError naming the offending rows if ``x`` has NaN or inf.

    Values traced by JAX (inside ``jit`` / ``shard_map``) have no value to check on
    the host; they pass, and a NaN propagates to the result instead.
    """
    if is_traced(x):
        return
    ok = sum_is_finite(x, xp)
    if is_traced(ok):  # inside jit even a constant's test is staged: nothing to read
        return
    if bool(ok):
        return
    bad = ~xp.isfinite(x)
    if not bool(xp.any(bad)):  # finite entries whose sum overflowed
        return
    if x.ndim >= 2:
        flat = xp.reshape(bad, (-1, x.shape[-1]))
        rows = first_indices(xp.any(flat, axis=-1), xp)
        where = f" in {what} {rows}" + (" (flattened leading axes)" if x.ndim > 2 else "")
    elif x.ndim == 1:
        where = f" at positions {first_indices(bad, xp)}"
    else:
        where = ""
    kinds = []
    if bool(xp.any(xp.isnan(x))):
        kinds.append("NaN")
    if bool(xp.any(xp.isinf(x))):
        kinds.append("inf")
    msg = f"{name} must be finite; got {' and '.join(kinds)}{where}."
    raise ValueError(msg)


def conform(x: Array, name: str, *, xp: Any, dtype: Any, device: Any, owner: str) -> Array:
    """``x`` checked to be on ``device`` (the device of ``owner``) and finite, cast to ``dtype``.

    The last checks of an array that must match a reference (the parameters, an
    operator's vectors): ``check_device``, then ``check_finite``.
    """
    check_device(x, name, device, owner=owner)
    check_finite(x, name, xp=xp)
    return x if x.dtype == dtype else xp.astype(x, dtype)


def check_logits(z: Array, *, name: str = "z", min_classes: int = 1) -> Any:
    """Validate logits of shape (..., C): a floating array, finite, C >= min_classes.

    Returns the namespace of ``z``.
    """
    xp = array_namespace(z, names=(name,))
    if z.ndim < 1:
        msg = f"{name} must have shape (..., C) with at least one axis; got a 0-d array."
        raise ValueError(msg)
    if z.shape[-1] < min_classes:
        msg = (
            f"{name} must have at least {min_classes} classes on its last axis; "
            f"got shape {tuple(z.shape)}."
        )
        raise ValueError(msg)
    check_floating(z, name, xp=xp)
    check_finite(z, name, xp=xp)
    return xp


def check_device(
    x: Array, name: str, device: Any, *, owner: str, remedy: str | None = None
) -> None:
    """Raise a ValueError unless ``x`` is on ``device`` (the device of ``owner``).

    The message: "{name} must be on {owner} ({device}); got {x's device}. {remedy}",
    the remedy defaulting to moving it with ``xp.asarray``.
    """
    if is_traced(x) or device is None:
        return  # traced JAX values (inside jit / shard_map) have no committed device
    got = device_of(x)
    if got == device:
        return
    if remedy is None:
        remedy = f"Move it with xp.asarray({name}, device=...)."
    msg = f"{name} must be on {owner} ({device}); got {got}. {remedy}"
    raise ValueError(msg)
