"""The JAX adapter's checks: ``apply_fn``, parameters, inputs, state, logits and masks.

Private to ``fisherbound.adapters.jax``: each check raises with the house
messages (the argument, the requirement, what came) and returns the checked
value; ``shard_local`` and ``on_mesh`` place flat vectors for ``shard_map`` and
jit-style sharding. ``_jax_model`` builds the model and its kernels on these.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._finite import check_inputs_finite, check_parameters_finite
from fisherbound._lib import HALF_PRECISION, is_traced
from fisherbound._shell import MaskWords, check_mask_array
from fisherbound._shell import check_mask_spec as _check_mask_spec
from fisherbound.linearization import mask_source

Array = Any
PyTree = Any


def path_name(path: tuple[Any, ...]) -> str:
    """A readable block name for a leaf path: ``dense.kernel``, ``[0].w``."""
    tu = jax.tree_util
    parts = []
    for entry in path:
        if isinstance(entry, tu.DictKey):
            key = entry.key
            parts.append(f".{key}" if isinstance(key, str) else f"[{key!r}]")
        elif isinstance(entry, tu.GetAttrKey):
            parts.append(f".{entry.name}")
        elif isinstance(entry, tu.SequenceKey):
            parts.append(f"[{entry.idx}]")
        elif isinstance(entry, tu.FlattenedIndexKey):
            parts.append(f"[{entry.key}]")
        else:
            parts.append(str(entry))
    name = "".join(parts)
    name = name.removeprefix(".")
    return name or "params"


def as_jax(x: Any) -> Array:
    """``jnp.asarray(x)``, skipped for a JAX array (which it returns as it is)."""
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def is_array(x: object) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def available(out: object) -> str:
    """What a selector could have named in the output ``out``, for messages."""
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)} outputs"
    if is_array(out):
        return f"an array of shape {tuple(out.shape)}"  # type: ignore[attr-defined]
    names = [n for n in dir(out) if not n.startswith("_") and is_array(getattr(out, n, None))]
    return f"a {type(out).__name__} with array attributes {names}"


#: The half-precision dtypes: refused for parameters, upcast for logits.
HALF = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def check_apply_fn(apply_fn: object) -> Callable[..., Array]:
    if not callable(apply_fn):
        msg = (
            "apply_fn must be a callable apply_fn(params, x) -> logits (N, C); got "
            f"{type(apply_fn).__module__}.{type(apply_fn).__name__}. For a flax module "
            "pass module.apply."
        )
        raise TypeError(msg)
    return apply_fn


def _leaves_with_paths(tree: PyTree, empty: str) -> tuple[list[tuple[Any, Any]], Any]:
    """The (path, leaf) pairs and the treedef of ``tree``; a ValueError ``empty`` if none."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not path_leaves:
        raise ValueError(empty)
    return path_leaves, treedef


def check_params(params: PyTree) -> tuple[list[tuple[str, Array]], Any]:
    """The named leaves (as JAX arrays) and the treedef of ``params``."""
    if isinstance(params, Mapping) and "params" in params:
        # Every other top-level collection of a flax variables dict is state.
        state = [k for k in params if k != "params" and isinstance(params[k], Mapping)]
        if state:
            msg = (
                f"params must hold only what is differentiated; got a flax variables dict "
                f"with the collections {state} besides 'params', which would be counted as "
                "parameters. Pass params=variables['params'] and "
                f"state={{{', '.join(f'{k!r}: variables[{k!r}]' for k in state)}}}, with "
                "apply_fn(params, x, state) calling "
                "model.apply({'params': params, **state}, x, ...)."
            )
            raise ValueError(msg)
    path_leaves, treedef = _leaves_with_paths(
        params,
        "params must hold at least one array leaf; got an empty pytree "
        f"({type(params).__name__}). Pass the parameters apply_fn differentiates.",
    )
    names = [path_name(path) for path, _ in path_leaves]
    if len(set(names)) != len(names):
        names = [jax.tree_util.keystr(path) for path, _ in path_leaves]
    named: list[tuple[str, Array]] = []
    for name, (_, leaf) in zip(names, path_leaves, strict=True):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            msg = (
                f"params leaf {name!r} must be a floating-point array; got "
                f"{type(leaf).__name__}. Wrap it with jnp.asarray, or close over "
                "non-trainable values inside apply_fn."
            )
            raise TypeError(msg)
        if not jnp.issubdtype(dtype, jnp.floating):
            msg = (
                f"params leaf {name!r} must have a real floating-point dtype; got {dtype}. "
                "Move integer or complex values out of params (close over them in "
                "apply_fn) or cast them."
            )
            raise TypeError(msg)
        if jnp.dtype(dtype) in HALF:
            msg = (
                f"params leaf {name!r} must be float32 or float64; got {dtype}. {HALF_PRECISION} "
                "Pass float32 parameters, e.g. "
                "jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params); a model "
                "may still compute in half precision from them (flax: param_dtype="
                "jnp.float32 with dtype=jnp.bfloat16, or casts inside apply_fn): its "
                "half-precision logits are upcast to float32."
            )
            raise TypeError(msg)
        if jnp.dtype(dtype) == jnp.float64 and not x64_enabled():
            msg = (
                f"params leaf {name!r} is float64 but JAX runs in 32-bit mode and would "
                "silently compute in float32. Call jax.config.update('jax_enable_x64', "
                "True) at start-up, or cast the parameters to float32."
            )
            raise TypeError(msg)
        named.append((name, as_jax(leaf)))
    first_name, first = named[0]
    for name, leaf in named[1:]:
        if leaf.dtype != first.dtype:
            msg = (
                "params leaves must all have one dtype; "
                f"{first_name!r} is {first.dtype} but {name!r} is {leaf.dtype}. Cast them, "
                "e.g. jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)."
            )
            raise TypeError(msg)
    _check_finite_once(named)
    return named, treedef


#: id -> weak reference of the JAX arrays already checked finite (immutable: once is
#: enough; the entry leaves with the array).
_FINITE: dict[int, weakref.ref[Any]] = {}


def _forget(key: int, _: object) -> None:
    _FINITE.pop(key, None)


def _check_finite_once(named: list[tuple[str, Array]]) -> None:
    """``check_parameters_finite`` of the leaves not checked before (one read, or none)."""

    def known(a: Array) -> bool:
        ref = _FINITE.get(id(a))
        return ref is not None and ref() is a

    todo = [(name, a) for name, a in named if not known(a)]
    if not todo:
        return
    check_parameters_finite(todo)
    for _, a in todo:
        if is_traced(a):
            continue
        with contextlib.suppress(TypeError):  # not weak-referenceable: checked next time
            _FINITE[id(a)] = weakref.ref(a, functools.partial(_forget, id(a)))


def check_inputs(inputs: PyTree, *, finite: bool = True) -> tuple[PyTree, int]:
    """``inputs`` with its leaves as JAX arrays, and the batch size N they share.

    ``finite=False`` leaves the finite check to the caller (a linearization reads it
    with its logits' from the forward kernel: ``finite_flags``).
    """
    path_leaves, treedef = _leaves_with_paths(
        inputs,
        "inputs must be an array (N, ...) or a pytree of arrays; got an empty "
        f"{type(inputs).__name__}.",
    )
    leaves = []
    sizes = []
    for path, leaf in path_leaves:
        where = "inputs" + jax.tree_util.keystr(path)
        try:
            arr = as_jax(leaf)
        except TypeError as err:
            msg = (
                f"{where} must be an array; got {type(leaf).__module__}."
                f"{type(leaf).__name__}. Convert it with jnp.asarray."
            )
            raise TypeError(msg) from err
        if arr.ndim == 0:
            msg = (
                f"{where} must have a leading batch axis (N, ...); got a 0-d array. "
                "Use x[None] for a single example."
            )
            raise ValueError(msg)
        leaves.append(arr)
        sizes.append((where, int(arr.shape[0])))
    n = sizes[0][1]
    for where, size in sizes[1:]:
        if size != n:
            msg = (
                "every inputs leaf must have the same leading batch size N; "
                f"{sizes[0][0]} has {n} but {where} has {size}."
            )
            raise ValueError(msg)
    if n == 0:
        msg = f"inputs must hold at least one example; got batch size 0 in {sizes[0][0]}."
        raise ValueError(msg)
    if finite:
        check_inputs_finite([(where, leaf) for (where, _), leaf in zip(sizes, leaves, strict=True)])
    return jax.tree_util.tree_unflatten(treedef, leaves), n


def check_state(state: PyTree) -> PyTree:
    """``state`` (None, or any pytree) with its array leaves as JAX arrays.

    The model's variables that are not differentiated (running statistics, caches):
    passed whole to every call ``apply_fn(params, x, state)``, never batched. Its
    leaves must be arrays (NumPy ones are converted); floating leaves must be finite.
    """
    if state is None:
        return None
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = []
    for path, leaf in path_leaves:
        where = "state" + jax.tree_util.keystr(path)
        if not is_array(leaf) or isinstance(leaf, str | bytes):
            msg = (
                f"{where} must be an array (state holds the model's non-differentiated "
                f"arrays, e.g. flax's batch_stats); got {type(leaf).__module__}."
                f"{type(leaf).__name__}. Close over values that are not arrays in apply_fn."
            )
            raise TypeError(msg)
        arr = jnp.asarray(leaf)
        if jnp.issubdtype(arr.dtype, jnp.inexact) and not is_traced(arr):
            bad = int(jnp.sum(~jnp.isfinite(arr)))
            if bad:
                msg = f"{where} must be finite; got {bad} NaN or infinite entries of {arr.size}."
                raise ValueError(msg)
        leaves.append(arr)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def shard_local(theta: Array, inputs: PyTree) -> Array:
    """θ made to vary over the mapped axes its inputs vary over (inside ``shard_map``).

    Inside ``jax.shard_map`` a closed-over θ is invariant across the mesh, and JAX
    sums the cotangent of an invariant value over the devices: every VJP (and every
    per-example VJP, silently mixing the examples of different devices) would come
    back all-reduced. A fisherbound linearization is the derivative on ITS shard;
    the reduction over shards is ``process_group=``'s job. Outside ``shard_map``
    this returns θ unchanged, except with inputs split over several devices by a
    ``NamedSharding`` (jit-style sharding): then θ (or a D-vector operand) is
    replicated over their mesh, so that every kernel meets arrays on one device set.
    """
    varying: set[str] = set()
    leaves = jax.tree_util.tree_leaves(inputs)
    for leaf in leaves:
        varying |= varying_axes(leaf)
    missing = varying - varying_axes(theta)
    if missing:
        return jax.lax.pcast(theta, tuple(sorted(missing)), to="varying")
    return on_mesh(theta, leaves)


def on_mesh(x: Array, inputs: PyTree) -> Array:
    """``x`` replicated over the mesh of inputs split by a ``NamedSharding``, else ``x``.

    Eager values only (under ``jax.jit`` the shardings are the compiler's). Arrays the
    library builds on the inputs' "device" are uncommitted (``device_of`` is None for
    them), but an operand committed to one device would meet the split inputs in a
    kernel, which JAX refuses.
    """
    if is_traced(x):
        return x
    for leaf in jax.tree_util.tree_leaves(inputs):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding) or is_traced(leaf):
            continue
        if len(sharding.device_set) > 1:
            whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return x if x.sharding == whole else jax.device_put(x, whole)
    return x


def varying_axes(x: Array) -> set[str]:
    """The mapped axes a value varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX 0.6 - 0.8
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return set(vma or ())


def check_logits(z: Any, num_inputs: int, dtype: Any) -> None:
    """The logits (N, ∗S, C) after the selector and the class move, checked."""
    name = "apply_fn(params, inputs)"
    if not hasattr(z, "shape") or not hasattr(z, "dtype"):
        msg = (
            f"{name} must return an array of logits (N, C); got {type(z).__name__}. "
            f"To use one part of a structured output pass output= (got {available(z)})."
        )
        raise TypeError(msg)
    if z.ndim < 2:
        msg = (
            f"{name} must return logits of shape (N, C); got shape {tuple(z.shape)}. "
            "Logits need an example axis N and a class axis C, with any position axes S "
            "between them: (N, *S, C). Reshape inside apply_fn, e.g. z.reshape(z.shape[0], -1)."
        )
        raise ValueError(msg)
    if int(z.shape[0]) != num_inputs:
        msg = (
            f"{name} must return one row of logits per example; got shape "
            f"{tuple(z.shape)} for {num_inputs} inputs."
        )
        raise ValueError(msg)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        msg = (
            f"{name} must return real floating-point logits; got dtype {z.dtype}. Return "
            "the logits themselves, before any argmax, rounding or cast."
        )
        raise TypeError(msg)
    if z.dtype != dtype:
        msg = (
            f"{name} must return logits in the parameters' dtype {dtype}; got {z.dtype} "
            "(float16 and bfloat16 logits are upcast, no other dtype is). Cast the logits "
            f"inside apply_fn to {dtype}, or the parameters to {z.dtype}."
        )
        raise TypeError(msg)
    # Finite: checked by the linearization or loss function (``check_outputs``), which
    # can say why not.


def named_inputs(inputs: Any) -> list[tuple[str, Any]]:
    """The array leaves of the inputs pytree, each with how a message names it."""
    leaves = jax.tree_util.tree_leaves_with_path(inputs)
    return [(f"inputs{jax.tree_util.keystr(p)}", x) for p, x in leaves if hasattr(x, "dtype")]


def logits_text(ndim: int) -> str:
    """The letters of logits with ``ndim`` axes, as ``LinearizationBase._output_text``."""
    s = ndim - 2
    positions = ["T"] if s == 1 else [f"T{i + 1}" for i in range(s)]
    return "(" + ", ".join(["N", *positions, "C"]) + ")"


def mask_text(output_text: str) -> str:
    """The letters of a mask's shape from those of the logits: "(N, T, C)" -> "(N, T)"."""
    letters = output_text.strip("()").split(", ")[:-1]
    return "(" + ", ".join(letters) + ("," if len(letters) == 1 else "") + ")"


#: The JAX names in the shared mask checks' messages.
_MASK_WORDS = MaskWords(
    is_array, "array", "mask != 0", "Move it with jax.device_put(mask, lin.device)."
)


def check_mask_spec(mask: object, *, stream: bool = False) -> Any:
    """``mask`` if it is None, an array, a str or a callable; else a TypeError."""
    return _check_mask_spec(mask, _MASK_WORDS, stream=stream)


def check_mask(mask: Any, logits: Array, what: str, inputs: PyTree) -> Array | None:
    """The mask of one batch as a boolean JAX array (N, ∗S) on the logits' device, or None.

    ``mask`` (checked by ``check_mask_spec``) is None, a boolean array (or 0/1
    integers), a key of dict ``inputs`` (that entry, converted with ``!= 0``) or a
    callable ``mask(inputs)`` (its result, converted with ``!= 0`` unless
    boolean); NumPy values become JAX arrays. ``what`` are the letters of the
    logits' shape, e.g. "(N, T, C)". ``check_mask_array`` checks it (in JAX's
    words); a traced mask (inside ``jit`` / ``shard_map``) has no values to check.
    """
    if mask is None:
        return None
    mask, source = mask_source(mask, inputs, is_array=is_array)
    if type(mask).__module__.split(".")[0] == "numpy":
        mask = jnp.asarray(mask)
    checked = check_mask_array(
        mask,
        source,
        logits,
        nonzero=source != "mask",  # a key's entry or a callable's result
        words=_MASK_WORDS,
        letters=mask_text(what),
    )
    if is_traced(logits) and not is_traced(checked):
        # A constant mask inside jax.jit, where JAX stages every operation on it: it
        # is handled as traced from here on (no host-side counts of its positions).
        checked = jnp.logical_and(checked, True)
    return checked
