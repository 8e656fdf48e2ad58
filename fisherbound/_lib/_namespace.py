"""Namespace, device and dtype resolution.

Every public function resolves its namespace here, so that mixing array
libraries fails with one clear message everywhere.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

Array = Any


def is_array(x: object) -> bool:
    """True for an array of any array-API library (NumPy, CuPy, torch, JAX, strict)."""
    return bool(array_api_compat.is_array_api_obj(x))


def _library_name(x: object) -> str:
    module = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(module, module)


def check_materialized(x: Array, name: str) -> None:
    """Raise a ValueError if ``x`` is a torch tensor on the "meta" device.

    A meta tensor has a shape and a dtype but no values, and every result of
    fisherbound is computed from values: without this check it fails deep inside
    (``Tensor.item() cannot be called on meta tensors``) or, where no value is
    read on the host, returns meta tensors that look like results. One attribute
    read per array, in ``array_namespace``, which every public function calls.
    """
    if getattr(x, "is_meta", False) is not True:
        return
    msg = (
        f"{name} must hold values: a tensor on the 'meta' device has a shape and a "
        "dtype but no values, and fisherbound computes values; got a meta tensor of "
        f"shape {tuple(x.shape)} and dtype {x.dtype}. Materialise it first: a module "
        "built on the meta device with module.to_empty(device='cpu') (or 'cuda') and "
        "then load_state_dict(...) of its weights; a tensor by creating it on a real "
        "device."
    )
    raise ValueError(msg)


def array_namespace(*arrays: Any, names: tuple[str, ...] | None = None) -> Any:
    """Return the array-API namespace shared by ``arrays``.

    ``None`` entries are ignored. ``names`` (same length as ``arrays``) are the
    argument names used in the error messages.

    Raises
    ------
    TypeError
        If an argument is not an array, or if the arrays come from different
        libraries ("z is a numpy array but v is a torch array").
    ValueError
        If an argument is a torch tensor on the "meta" device, which has no values
        (``check_materialized``).
    """
    if names is None:
        names = tuple(f"argument {i}" for i in range(len(arrays)))
    present = [(n, a) for n, a in zip(names, arrays, strict=True) if a is not None]
    if not present:
        msg = "expected at least one array; got none."
        raise TypeError(msg)
    for name, a in present:
        if not is_array(a):
            msg = (
                f"{name} must be an array of an array-API library (NumPy, CuPy, torch, "
                f"JAX, array-api-strict); got {type(a).__module__}.{type(a).__name__}."
            )
            raise TypeError(msg)
        check_materialized(a, name)
    first_name, first = present[0]
    first_lib = _library_name(first)
    for name, a in present[1:]:
        lib = _library_name(a)
        if lib != first_lib:
            msg = (
                f"all arrays must come from one array library; {first_name} is a "
                f"{first_lib} array but {name} is a {lib} array. Convert one of them "
                "(for example with the library's asarray) before calling."
            )
            raise TypeError(msg)
    try:
        return array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError as err:  # e.g. numpy and numpy-backed strict arrays
        msg = f"all arrays must come from one array library; got {err}"
        raise TypeError(msg) from err


def is_torch_namespace(xp: Any) -> bool:
    """Whether ``xp`` is torch's namespace (for torch-only fused or in-place kernels)."""
    return bool(array_api_compat.is_torch_namespace(xp))


def log_softmax(z: Array, xp: Any) -> Array:
    """The log-softmax over the last axis, z − max z − log Σ exp(z − max z).

    torch's fused kernel where ``xp`` is torch (one pass over z instead of five
    eager ones: a third of the cost at vocabulary scale), else the array-API
    formula; the same values to rounding.
    """
    if is_torch_namespace(xp):
        import torch  # only reached with torch arrays

        return torch.log_softmax(z, dim=-1)
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def device_of(x: Array) -> Any:
    """The device of ``x`` (``array_api_compat.device``); None for a spread JAX array.

    A JAX array spread over several devices (a ``NamedSharding``) has no device. None
    places what is built from it by JAX's default rules (uncommitted), so it meets
    the sharded arrays wherever they are, and device checks against None pass: a
    sharding is no device to build a D-vector on (its batch axis would be split).
    """
    device = array_api_compat.device(x)
    if len(getattr(device, "device_set", ())) > 1:
        return None
    return device


def index_dtype(xp: Any, x: Array | None = None) -> Any:
    """The namespace's default indexing dtype (on ``x``'s device): class indices, counts.

    int64 for NumPy, CuPy and torch; int32 for JAX without ``jax_enable_x64``, where
    asking for int64 would warn on every call and truncate anyway. Namespaces without
    ``__array_namespace_info__`` get int64.
    """
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return xp.int64
    device = None if x is None else device_of(x)
    return info().default_dtypes(device=device)["indexing"]


def is_writeable_array(x: Array) -> bool:
    """Whether ``x`` can be written in place (``array_api_compat.is_writeable_array``)."""
    return bool(array_api_compat.is_writeable_array(x))


def set_row(xp: Any, A: Array, i: int, v: Array) -> Array:
    """``A`` (..., m, n) with row i of its last two axes replaced by ``v`` (..., n).

    Written in place where the array is writeable (NumPy, torch, CuPy,
    array-api-strict: O(n) per row); a JAX array through ``.at[].set`` (a copy,
    outside ``jit``); any other immutable array by ``where`` (O(m n)).
    """
    if is_writeable_array(A):
        A[..., i, :] = v
        return A
    if array_api_compat.is_jax_array(A):
        return A.at[..., i, :].set(v)
    rows = xp.arange(int(A.shape[-2]), device=device_of(A))
    return xp.where((rows == i)[:, None], v[..., None, :], A)


def to_host(x: Array) -> Any:
    """Copy ``x`` to a NumPy array.

    Only for small results that must leave the device (tridiagonal matrices of
    Lanczos, scalars for convergence tests, index lists for error messages);
    never for data in a hot path.
    """
    import numpy as np

    if array_api_compat.is_numpy_array(x):
        return x
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_jax_array(x):
        return np.asarray(x)
    module = type(x).__module__
    if module.startswith("array_api_strict"):
        import array_api_strict

        return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
    return np.asarray(x)
