"""Input checks of the families, with the house error messages."""

from __future__ import annotations

import math
from typing import Any

from fisherbound._lib import (
    array_namespace,
    check_finite,
    check_floating,
    device_of,
    first_indices,
    is_traced,
    sum_is_finite,
)

Array = Any


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, or None if they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def check_same_device(z: Array, other: Array, name: str, z_name: str = "z") -> None:
    if is_traced(z) or is_traced(other):
        return  # traced JAX values (inside jit / shard_map) have no committed device
    dz, do = device_of(z), device_of(other)
    if dz != do and dz is not None and do is not None:  # None: spread over devices
        msg = (
            f"{name} must be on the device of {z_name}; {z_name} is on {dz} but {name} is on "
            f"{do}. Move it with xp.asarray({name}, device=...)."
        )
        raise ValueError(msg)


def check_vector(z: Array, v: Array, name: str, size: int, what: str) -> tuple[Any, Array, Array]:
    """Validate a vector argument of shape (..., size) against logits z (..., C).

    Returns (xp, z, v) with both promoted to their common floating dtype.
    ``what`` says where ``size`` comes from, for the message.
    """
    xp = array_namespace(z, v, names=("z", name))
    check_floating(v, name, xp=xp)
    if v.ndim < 1 or v.shape[-1] != size:
        msg = f"{name} must have shape (..., {size}) to match {what}; got shape {tuple(v.shape)}."
        raise ValueError(msg)
    if broadcast_shapes(tuple(z.shape[:-1]), tuple(v.shape[:-1])) is None:
        msg = (
            f"the leading axes of {name} must broadcast against those of z; got {name} "
            f"of shape {tuple(v.shape)} and z of shape {tuple(z.shape)}."
        )
        raise ValueError(msg)
    check_same_device(z, v, name)
    check_finite(v, name, xp=xp)
    dtype = xp.result_type(z.dtype, v.dtype)
    return xp, xp.astype(z, dtype, copy=False), xp.astype(v, dtype, copy=False)


def check_label_array(
    z: Array, y: Array, *, kind: str, shape: tuple[int, ...], names: tuple[str, str] = ("z", "y")
) -> Any:
    """Namespace, dtype kind and shape of labels ``y``; returns xp.

    ``names``: how the messages name z and y (the caller's arguments).
    """
    zn, yn = names
    xp = array_namespace(z, y, names=names)
    if kind == "integral":
        if not xp.isdtype(y.dtype, "integral"):
            msg = (
                f"{yn} must be an integer array of class indices; got dtype "
                f"{y.dtype}. Convert with xp.astype({yn}, xp.int64) (target "
                f"distributions, soft targets, have the shape of {zn}: (..., C))."
            )
            raise TypeError(msg)
    elif not xp.isdtype(y.dtype, "real floating"):
        msg = (
            f"{yn} must have a real floating-point dtype; got {y.dtype}. "
            f"Convert with xp.astype({yn}, {zn}.dtype)."
        )
        raise TypeError(msg)
    if tuple(y.shape) != shape:
        msg = (
            f"{yn} must have shape {shape} to match {zn} of shape {tuple(z.shape)}; got "
            f"{tuple(y.shape)}."
        )
        raise ValueError(msg)
    check_same_device(z, y, yn, zn)
    return xp


def check_label_support(bad: Array, xp: Any, name: str, support: str, got: str) -> None:
    """Labels ``name`` must lie in the family's ``support``; ``bad`` marks those that do not.

    The ValueError names the first flattened positions of ``bad`` and what came
    there (``got``). Traced labels (JAX jit) pass unchecked. One reduction and one
    host read.
    """
    if not is_traced(bad) and bool(xp.any(bad)):
        msg = (
            f"{name} must hold {support}; got {got} at positions {bad_positions(bad, xp)} "
            "(flattened)."
        )
        raise ValueError(msg)


def bad_positions(mask: Array, xp: Any) -> list[int]:
    """Flattened positions of the first True entries of ``mask``."""
    return first_indices(xp.reshape(mask, (-1,)), xp)


def check_result(out: Array, what: str, xp: Any, inputs: dict[str, Array]) -> Array:
    """``out`` if it is finite, else a ValueError: finite ``inputs`` overflowed in their dtype.

    The fronts check their inputs finite first, so a NaN or inf here comes from an
    intermediate beyond the dtype's range (a square of 1e20 in float32, a sum of two
    entries near its maximum). One reduction and one host read per call; traced
    values (JAX jit) pass.
    """
    if is_traced(out) or bool(sum_is_finite(out, xp)):  # one pass, no boolean temporary
        return out
    bad = ~xp.isfinite(out)
    if not bool(xp.any(bad)):  # finite entries whose sum overflowed
        return out
    where = f" at positions {bad_positions(bad, xp)} (flattened)" if out.ndim else ""
    largest = ", ".join(
        f"largest |{name}| = {float(xp.max(xp.abs(x))):.3g}"
        for name, x in inputs.items()
        if math.prod(x.shape) > 0
    )
    limit = float(xp.finfo(out.dtype).max)
    wider = "" if out.dtype == xp.float64 else ", or compute in float64 (xp.astype(z, xp.float64))"
    msg = (
        f"{what} must be finite; got NaN or inf{where} from finite inputs ({largest}): an "
        f"intermediate overflowed {out.dtype} (largest finite value {limit:.3g}). Rescale "
        f"the inputs{wider}."
    )
    raise ValueError(msg)
