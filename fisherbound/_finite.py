"""The finite check on what linearizations and loss functions return.

Every product of an adapter (``jvp``, ``vjp``, the batched and per-example
products, the per-example squares; a loss function's value, gradient and
Hessian-vector products) is checked finite as it returns: its sum, one pass over
the result and no copy (a sum that is not finite is confirmed entry by entry, so a
huge finite result whose sum overflows passes). A non-finite result raises a
ValueError naming the product, the examples or parameter blocks affected, and the
likely cause, found only then by reading the operand, the parameters and the
inputs (``_suspects``): a non-finite operand, parameter or input, an input so large
that its square overflows the dtype, or an intermediate that overflowed or
saturated (0 · inf) in the dtype.

Where reading one boolean back to the host would stall an accelerator (CuPy,
torch off the CPU, JAX on a GPU or TPU), the check is deferred: an exact flag
(``all(isfinite(result))``, no array held) stays on the device and all waiting
flags are read in one go when the data stream moves to the next batch, or once
``PENDING_LIMIT`` of them wait (``flush``), never between two products. Traced
values (JAX inside ``jit``, torch inside ``torch.func`` transforms) have no
value and pass.

The guard wraps the methods a class lists in ``checked_products`` once, when the
class is defined (``guard_class``); nested products (a batched product built
from single ones) are checked once, at the outermost call. Before the outermost
call it also runs the owner's ``_check_current()``, which refuses a product of
state that changed since the owner was built or its last product (the torch
adapter: parameters, buffers or inputs updated in place), and after it
``_mark_current()``; no-ops where the state cannot change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from fisherbound._lib import (
    array_namespace,
    check_finite,
    device_of,
    first_indices,
    index_dtype,
    is_traced,
    sum_is_finite,
    to_host,
)

Array = Any

__all__ = [
    "PENDING_LIMIT",
    "Product",
    "check_inputs_finite",
    "check_outputs",
    "check_parameters_finite",
    "flush",
    "guard_class",
    "is_host_device",
]


class Product(NamedTuple):
    """How to name a product's result and where its examples and parameters are.

    ``label`` names the product in messages ("the JVP J v"); ``example_axis`` is
    the axis of the result that indexes examples (None if none); ``param_axis``
    is True when the last axis is the flat parameter vector (D entries).
    """

    label: str
    example_axis: int | None = None
    param_axis: bool = False


#: Deferred flags read at once when this many wait (a bound on the products between reads).
PENDING_LIMIT = 32


def is_host_device(x: Array) -> bool:
    """Whether reading a flag of ``x`` costs no device sync: False only on accelerators.

    torch tensors off the CPU, CuPy arrays, JAX arrays on a GPU or TPU; everything
    else (NumPy, array-api-strict's devices, torch and JAX on the CPU) is host memory.
    """
    module = type(x).__module__
    if module.startswith("cupy"):
        return False
    if module.startswith("torch"):
        return x.device.type in ("cpu", "meta")
    if module.startswith("jax"):
        dev = device_of(x)
        return getattr(dev, "platform", "cpu") == "cpu"
    return True


def _arrays(out: Any) -> list[Array]:
    """The arrays of a product's result (a tuple's None entries skipped)."""
    if isinstance(out, tuple):
        return [a for a in out if a is not None and hasattr(a, "shape")]
    return [out]


def guard_class(cls: type, products: dict[str, Product]) -> None:
    """Wrap each method of ``cls`` named in ``products`` (defined on ``cls`` itself)."""
    for name, spec in products.items():
        fn = cls.__dict__.get(name)
        if fn is None or getattr(fn, "_finite_guard", False):
            continue
        setattr(cls, name, _guarded(fn, spec))


def _guarded(fn: Callable[..., Any], spec: Product) -> Callable[..., Any]:
    @functools.wraps(fn)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__
        depth = state.get("_finite_depth", 0)
        if depth:
            return fn(self, *args, **kwargs)
        self._check_current()
        state["_finite_depth"] = 1
        try:
            out = fn(self, *args, **kwargs)
        finally:
            state["_finite_depth"] = 0
        self._mark_current()  # the product's own changes (a train-mode norm's statistics)
        examples = kwargs.get("examples")
        offset = (examples.start or 0) if isinstance(examples, slice) else 0
        for a in _arrays(out):
            _check(self, a, spec, offset, args)
        return out

    checked._finite_guard = True  # type: ignore[attr-defined]
    return checked


def _check(owner: Any, a: Array, spec: Product, offset: int, operands: tuple[Any, ...]) -> None:
    if is_traced(a) or math.prod(a.shape) == 0:
        return
    xp = array_namespace(a, names=(spec.label,))
    if not xp.isdtype(a.dtype, ("real floating", "complex floating")):
        return
    # The sum is finite exactly when every entry is, unless it overflows: a sum that
    # is not finite is confirmed entry by entry, so a huge finite result passes.
    ok = sum_is_finite(a, xp)
    if is_traced(ok):
        return
    if is_host_device(a):
        if not bool(ok) and not bool(xp.all(xp.isfinite(a))):
            raise _error(owner, a, spec, offset, xp, operands)
        return
    # Deferred: an exact flag stays on the device (no array held); read at the next batch
    # of a stream, or once PENDING_LIMIT flags wait.
    pending = owner.__dict__.setdefault("_finite_pending", [])
    pending.append((spec, xp.all(xp.isfinite(a))))
    if len(pending) >= PENDING_LIMIT:
        flush(owner)


def flush(owner: Any) -> None:
    """Read the deferred finite flags of ``owner``'s products (one host read in all)."""
    pending = getattr(owner, "__dict__", {}).get("_finite_pending")
    if not pending:
        return
    owner.__dict__["_finite_pending"] = []
    xp = array_namespace(pending[0][1], names=("the finite flags",))
    import numpy as np

    flags = np.asarray(to_host(xp.stack([flag for _, flag in pending])), dtype=bool)
    if bool(flags.all()):
        return
    spec = pending[int(np.flatnonzero(~flags)[0])][0]
    msg = (
        f"{spec.label} of the {owner._role} is not finite (found after it returned, "
        f"where the check waits for the device). {_cause(owner)}"
    )
    raise ValueError(msg)


def _error(
    owner: Any, a: Array, spec: Product, offset: int, xp: Any, operands: tuple[Any, ...]
) -> ValueError:
    bad = ~xp.isfinite(a)
    kinds = [k for k, f in (("NaN", xp.isnan), ("inf", xp.isinf)) if bool(xp.any(f(a)))]
    where = []
    if spec.example_axis is not None and a.ndim > spec.example_axis:
        axis = spec.example_axis
        moved = xp.moveaxis(bad, axis, 0)
        rows = xp.any(xp.reshape(moved, (int(moved.shape[0]), -1)), axis=1)
        where.append(f"examples {[offset + i for i in first_indices(rows, xp)]}")
    if spec.param_axis and int(a.shape[-1]) == owner.num_params:
        flat = xp.any(xp.reshape(bad, (-1, int(a.shape[-1]))), axis=0)
        names = [b.name for b in owner.blocks if bool(xp.any(flat[b.offset : b.offset + b.size]))]
        where.append(f"parameter blocks {names[:10]}" + (" ..." if len(names) > 10 else ""))
    at = f" in {' and '.join(where)}" if where else ""
    count = int(xp.sum(xp.astype(bad, index_dtype(xp, bad))))
    msg = (
        f"{spec.label} of the {owner._role} must be finite; got {' and '.join(kinds)} in "
        f"{count} of {math.prod(a.shape)} entries{at}. {_cause(owner, operands)}"
    )
    return ValueError(msg)


def _cause(owner: Any, operands: tuple[Any, ...] = ()) -> str:
    """The likely cause, from the operands, parameters and inputs (read when a check failed)."""
    params, inputs = owner._suspects()
    found = []
    for i, x in enumerate(operands):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            xp = array_namespace(x, names=("operand",))
            if xp.isdtype(x.dtype, "real floating") and not bool(xp.all(xp.isfinite(x))):
                found.append(f"its operand (argument {i + 1}) is not finite")
    if params is not None:
        xp = array_namespace(params, names=("params",))
        bad = ~xp.isfinite(params)
        names = [b.name for b in owner.blocks if bool(xp.any(bad[b.offset : b.offset + b.size]))]
        if names:
            found.append(f"parameters {names[:10]} are not finite")
    dtype = None
    for name, x in inputs:
        xp = array_namespace(x, names=(name,))
        if not xp.isdtype(x.dtype, "real floating") or x.ndim == 0:
            continue
        dtype = x.dtype
        flat = xp.reshape(x, (int(x.shape[0]), -1))
        rows = xp.any(~xp.isfinite(flat), axis=1)
        if bool(xp.any(rows)):
            found.append(f"{name} is not finite in examples {first_indices(rows, xp)}")
            continue
        limit = math.sqrt(float(xp.finfo(x.dtype).max))
        big = xp.any(xp.abs(flat) > limit, axis=1)
        if bool(xp.any(big)):
            found.append(
                f"{name} has entries above {limit:.3g} in absolute value in examples "
                f"{first_indices(big, xp)}, whose squares overflow {x.dtype}"
            )
    if found:
        return "Likely cause: " + "; ".join(found) + "."
    where = f" in {dtype}" if dtype is not None else ""
    return (
        f"No parameter or input is non-finite, so an intermediate overflowed{where} "
        "(very large inputs or activations, exp of a large pre-activation) or a saturated "
        "unit multiplied 0 by inf; rescale the inputs or compute in float64."
    )


def check_outputs(owner: Any, z: Array, name: str) -> None:
    """``z``, the model's outputs on the batch, checked finite; the message says why not."""
    xp = array_namespace(z, names=(name,))
    try:
        check_finite(z, name, xp=xp)
    except ValueError as e:
        msg = f"{e} {_cause(owner)}"
        raise ValueError(msg) from None


def check_inputs_finite(named: list[tuple[str, Array]]) -> None:
    """Each floating input (N, ...) checked finite, naming the examples (axis 0).

    Integer inputs (token ids) pass. One pass per input; a non-finite one is read
    again for the message.
    """
    for name, x in named:
        xp = array_namespace(x, names=(name,))
        if x.ndim and xp.isdtype(x.dtype, "real floating"):
            try:  # as (N, rest): the rows of the message are the examples
                check_finite(xp.reshape(x, (int(x.shape[0]), -1)), name, xp=xp, what="examples")
            except ValueError as e:
                msg = f"{e} The Jacobian at a non-finite input is undefined (0 · inf)."
                raise ValueError(msg) from None


def check_parameters_finite(named: list[tuple[str, Array]]) -> None:
    """Each parameter array finite, or a ValueError naming the non-finite ones.

    A saturated unit hides an infinite weight from the logits (tanh(inf) = 1), so
    the parameters are checked themselves. Cost: one reduction per array and one
    host read in all.
    """
    if not named or any(is_traced(p) for _, p in named):
        return
    xp = array_namespace(*(p for _, p in named), names=tuple(n for n, _ in named))
    total = None
    for _, p in named:  # one host read: the sum of the sums (finite iff each is)
        total = xp.sum(p) if total is None else total + xp.sum(p)
    ok = sum_is_finite(total, xp)
    if is_traced(ok) or bool(ok):  # inside jit a constant's sum is staged: nothing to read
        return
    bad = [name for name, p in named if not bool(xp.all(xp.isfinite(p)))]
    if not bad:  # finite entries whose sums overflowed
        return
    msg = (
        f"parameters must be finite; got NaN or inf in {bad}. A model with a non-finite "
        "weight (a diverged training run) has no Fisher information; load finite weights."
    )
    raise ValueError(msg)
