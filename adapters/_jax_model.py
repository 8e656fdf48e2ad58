"""The JAX adapter's model: flattened parameters, compiled kernels and the checks.

Private to ``fisherbound.adapters.jax``: ``Model`` (``apply_fn`` with its
parameters flattened to θ, the blocks and the compiled ``Kernels``, cached per
model and parameter layout), the validation of ``apply_fn``, the parameters, the
inputs and the logits with the house messages, and ``shard_local`` for
``shard_map``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._lib import check_finite
from fisherbound.linearization import make_blocks

Array = Any
PyTree = Any

# ----------------------------------------------------------------------------
# Private implementation: compiled kernels, no validation.
# ----------------------------------------------------------------------------


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


def sum_of_squares(g: Array) -> Array:
    """Σ_n g[n]², summed pairwise over the leading axis.

    XLA on CPU reduces a leading (non-minor) axis an order of magnitude slower
    than it adds contiguous halves, and pairwise sums round better; log₂ n
    additions of halves cost at most twice the memory traffic of one pass.
    """
    g = g * g
    while g.shape[0] > 1:
        half = g.shape[0] // 2
        g = jnp.concatenate([g[:half, ...] + g[half : 2 * half, ...], g[2 * half :, ...]], axis=0)
    return g[0, ...]


class Kernels:
    """The compiled products of one model: ``apply_fn`` with one parameter layout.

    Every kernel takes the flat parameters ``theta`` and the inputs ``x`` as
    arguments (never as closed-over constants), so a kernel compiled for one
    batch is reused by every batch of the same shapes.
    """

    def __init__(
        self,
        apply_fn: Callable[..., Array],
        treedef: Any,
        shapes: tuple[tuple[int, ...], ...],
    ) -> None:
        sizes = [math.prod(s) for s in shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        num_params = sum(sizes)

        def unravel(theta: Array) -> PyTree:
            # jnp.split, whose transpose is one concatenation (slices would
            # transpose to one D-sized pad per leaf, summed).
            pieces = jnp.split(theta, offsets[1:]) if len(offsets) > 1 else [theta]
            leaves = [jnp.reshape(p, shape) for p, shape in zip(pieces, shapes, strict=True)]
            return jax.tree_util.tree_unflatten(treedef, leaves)

        def model(theta: Array, x: PyTree) -> Array:
            return apply_fn(unravel(theta), x)

        def single(theta: Array, xn: PyTree) -> Array:
            # One example as a batch of one: the logits row (C,) of x_n.
            return model(theta, jax.tree_util.tree_map(lambda a: a[None, ...], xn))[0, ...]

        def forward(theta: Array, x: PyTree) -> tuple[Array, Any]:
            return jax.linearize(lambda t: model(t, x), theta)

        def transpose(f_jvp: Any, theta: Array) -> Callable[[Array], Array]:
            # θ's own type: inside shard_map it varies over the mesh axes.
            f_vjp = jax.linear_transpose(f_jvp, theta)
            return lambda u: f_vjp(u)[0]

        def per_example(theta: Array, x: PyTree, U: Array) -> Array:
            def one(xn: PyTree, Un: Array) -> Array:
                _, pullback = jax.vjp(lambda t: single(t, xn), theta)
                return jax.vmap(lambda u: pullback(u)[0])(Un)

            return jax.vmap(one)(x, U)

        def sum_squared(
            theta: Array, x: PyTree, U: Array, example_chunk: int, vector_chunk: int
        ) -> Array:
            n, k, c = U.shape
            n_ex = -(-n // example_chunk)
            n_vec = -(-k // vector_chunk)
            # Pad with zero cotangents (whose VJPs are exactly zero) on copies of
            # the last example, so every chunk has one shape and one compilation.
            U = jnp.pad(U, ((0, n_ex * example_chunk - n), (0, n_vec * vector_chunk - k), (0, 0)))
            U = jnp.reshape(U, (n_ex, example_chunk, n_vec, vector_chunk, c))
            U = jnp.moveaxis(U, 2, 1)  # (n_ex, n_vec, example_chunk, vector_chunk, C)
            index = jnp.minimum(jnp.arange(n_ex * example_chunk), n - 1)
            xs = jax.tree_util.tree_map(
                lambda a: jnp.reshape(a[index, ...], (n_ex, example_chunk, *a.shape[1:])), x
            )

            def over_examples(total: Array, chunk: tuple[PyTree, Array]) -> tuple[Array, None]:
                xc, Uc = chunk

                def over_vectors(carry: None, Uk: Array) -> tuple[None, Array]:
                    del carry  # lax.scan's carry: nothing is carried across vector chunks
                    g = per_example(theta, xc, Uk)  # (example_chunk, vector_chunk, D)
                    return None, sum_of_squares(g)

                _, squares = jax.lax.scan(over_vectors, None, Uc)
                return total + squares, None

            total = jnp.zeros((n_vec, vector_chunk, num_params), dtype=theta.dtype)
            total = shard_local(total, theta)  # the scan carry varies as θ does
            total, _ = jax.lax.scan(over_examples, total, (xs, U))
            return jnp.reshape(total, (n_vec * vector_chunk, num_params))[:k, ...]

        self.unravel = jax.jit(unravel)
        self.forward = jax.jit(forward)
        self.jvp = jax.jit(lambda f_jvp, v: f_jvp(v))
        self.jvp_batch = jax.jit(lambda f_jvp, V: jax.vmap(f_jvp)(V))
        self.vjp = jax.jit(lambda f_jvp, theta, u: transpose(f_jvp, theta)(u))
        self.vjp_batch = jax.jit(lambda f_jvp, theta, U: jax.vmap(transpose(f_jvp, theta))(U))
        self.per_example = jax.jit(per_example)
        self.singles = jax.jit(lambda theta, x: jax.vmap(lambda xn: single(theta, xn))(x))
        self.sum_squared = jax.jit(sum_squared, static_argnums=(3, 4))


def build_kernels(
    apply_fn: Callable[..., Array], treedef: Any, shapes: tuple[tuple[int, ...], ...]
) -> Kernels:
    try:
        hash((apply_fn, treedef))
    except TypeError:  # an unhashable apply_fn or pytree node: compile for this model only
        return Kernels(apply_fn, treedef, shapes)
    return _cached_kernels(apply_fn, treedef, shapes)


@functools.lru_cache(maxsize=16)
def _cached_kernels(
    apply_fn: Callable[..., Array], treedef: Any, shapes: tuple[tuple[int, ...], ...]
) -> Kernels:
    # One Kernels per model structure; jax.jit traces once per dtype and shape.
    return Kernels(apply_fn, treedef, shapes)


class Model:
    """``apply_fn`` with its parameters flattened: θ, the blocks and the kernels."""

    def __init__(self, apply_fn: Callable[..., Array], params: PyTree) -> None:
        named, treedef = check_params(params)
        leaves = [leaf for _, leaf in named]
        shapes = tuple(tuple(int(s) for s in leaf.shape) for leaf in leaves)
        self.apply_fn = apply_fn
        self.dtype = leaves[0].dtype
        self.theta = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
        self.blocks = make_blocks(
            (name, shape) for (name, _), shape in zip(named, shapes, strict=True)
        )
        self.kernels = build_kernels(apply_fn, treedef, shapes)


# ----------------------------------------------------------------------------
# Validation with the house messages
# ----------------------------------------------------------------------------


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
        if jnp.dtype(dtype) == jnp.float64 and not x64_enabled():
            msg = (
                f"params leaf {name!r} is float64 but JAX runs in 32-bit mode and would "
                "silently compute in float32. Call jax.config.update('jax_enable_x64', "
                "True) at start-up, or cast the parameters to float32."
            )
            raise TypeError(msg)
        named.append((name, jnp.asarray(leaf)))
    first_name, first = named[0]
    for name, leaf in named[1:]:
        if leaf.dtype != first.dtype:
            msg = (
                "params leaves must all have one dtype; "
                f"{first_name!r} is {first.dtype} but {name!r} is {leaf.dtype}. Cast them, "
                "e.g. jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)."
            )
            raise TypeError(msg)
    return named, treedef


def check_inputs(inputs: PyTree) -> tuple[PyTree, int]:
    """``inputs`` with its leaves as JAX arrays, and the batch size N they share."""
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
            arr = jnp.asarray(leaf)
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
    return jax.tree_util.tree_unflatten(treedef, leaves), n


def shard_local(theta: Array, inputs: PyTree) -> Array:
    """θ made to vary over the mapped axes its inputs vary over (inside ``shard_map``).

    Inside ``jax.shard_map`` a closed-over θ is invariant across the mesh, and JAX
    sums the cotangent of an invariant value over the devices: every VJP (and every
    per-example VJP, silently mixing the examples of different devices) would come
    back all-reduced. A fisherbound linearization is the derivative on ITS shard;
    the reduction over shards is ``process_group=``'s job. Outside ``shard_map``
    this returns θ unchanged.
    """
    varying: set[str] = set()
    for leaf in jax.tree_util.tree_leaves(inputs):
        varying |= varying_axes(leaf)
    missing = varying - varying_axes(theta)
    if not missing:
        return theta
    return jax.lax.pcast(theta, tuple(sorted(missing)), to="varying")


def varying_axes(x: Array) -> set[str]:
    """The mapped axes a value varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX 0.6 - 0.8
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return set(vma or ())


def check_logits(z: Any, num_inputs: int, dtype: Any) -> None:
    name = "apply_fn(params, inputs)"
    if not hasattr(z, "shape") or not hasattr(z, "dtype"):
        msg = f"{name} must return an array of logits (N, C); got {type(z).__name__}."
        raise TypeError(msg)
    if z.ndim != 2:
        msg = (
            f"{name} must return logits of shape (N, C); got shape {tuple(z.shape)}. "
            "Reshape inside apply_fn, e.g. z.reshape(z.shape[0], -1)."
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
            f"{name} must return logits in the parameters' dtype {dtype}; got {z.dtype}. "
            "Cast the parameters (or the logits inside apply_fn) to one dtype."
        )
        raise TypeError(msg)
    try:
        check_finite(z, name, xp=jnp)
    except ValueError as err:
        msg = f"{err} Check the parameters and inputs for NaN, inf or overflowing values."
        raise ValueError(msg) from err


def second_derivative_kernel(apply_fn: Callable[..., Array], kernels: Kernels) -> Any:
    """The compiled map (θ, x, indices) ↦ ∂²z/∂θ_i² for i in indices, (k, N, C)."""
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn: compile for this call only
        return _build_second_derivative_kernel(apply_fn, kernels)
    return _cached_second_derivative_kernel(apply_fn, kernels)


def _build_second_derivative_kernel(apply_fn: Callable[..., Array], kernels: Kernels) -> Any:
    unravel = kernels.unravel

    def curvature(theta: Array, x: PyTree, index: Array) -> Array:
        def along(i: Array) -> Array:
            e = jnp.zeros_like(theta).at[i].set(1.0)

            def slope(t: Array) -> Array:
                return jax.jvp(lambda s: apply_fn(unravel(s), x), (t,), (e,))[1]

            return jax.jvp(slope, (theta,), (e,))[1]

        return jax.vmap(along)(index)

    return jax.jit(curvature)


@functools.lru_cache(maxsize=16)
def _cached_second_derivative_kernel(apply_fn: Callable[..., Array], kernels: Kernels) -> Any:
    return _build_second_derivative_kernel(apply_fn, kernels)
