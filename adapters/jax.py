"""JAX adapter: any ``apply_fn(params, x) -> logits`` with pytree parameters.

``linearize(apply_fn, params, inputs)`` freezes a pure JAX function at its
parameters on one batch and returns a
:class:`~fisherbound.linearization.LinearizationBase` whose products are
computed by JAX's own transformations:

- ``jvp`` / ``jvp_batch``: the linear map v ↦ J v of ``jax.linearize``, built
  once per linearization (the forward pass and its residuals are kept) and
  vmapped over tangents;
- ``vjp`` / ``vjp_batch``: ``jax.linear_transpose`` of that same linear map (what
  ``jax.vjp`` does internally), so forward and reverse products share one set of
  residuals and are exactly adjoint; M cotangents go through one vmapped
  backward pass;
- ``per_example_vjp``: ``jax.vmap`` over examples of the VJP of the single-example
  function ``θ ↦ apply_fn(params(θ), x_n[None])[0]``, vmapped over cotangents;
- ``sum_squared_per_example_vjp``: the same per-example VJPs squared and summed
  inside one compiled ``lax.scan`` over chunks of examples (and of cotangents),
  so that the per-example gradients of at most ``max_vectors`` (example,
  cotangent) pairs are alive at once.

Every kernel is ``jax.jit``-compiled once per (``apply_fn``, parameter
structure, shapes) and reused across linearizations, so streaming a data set
with ``linearizations(apply_fn, params, batches)`` compiles once per batch shape.

Parameter layout: the flat vector θ concatenates the leaves of ``params`` in
JAX's tree-flattening order (``jax.tree_util.tree_flatten``: dict keys sorted,
sequences in order), each leaf raveled row-major, exactly as
``jax.flatten_util.ravel_pytree``. A block is named by its leaf's path: dict keys
and attribute names joined by ``"."``, sequence indices as ``"[i]"``: ``{"dense":
{"kernel": w}}`` gives ``"dense.kernel"``, ``[{"w": w, "b": b}]`` gives ``"[0].b"``
and ``"[0].w"``, a bare array gives ``"params"``. (If two leaves would get the same
name, every block is named by ``jax.tree_util.keystr`` instead.)

Float64 needs ``jax.config.update("jax_enable_x64", True)`` before any array is
created; without it JAX silently computes in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from fisherbound._lib import (
    array_namespace,
    check_positive_int,
)
from fisherbound._lib._validation import check_finite
from fisherbound.linearization import (
    LinearizationBase,
    LossFunctionBase,
    check_batches,
    check_loss_labels,
    check_loss_options,
    example_range,
    make_blocks,
    stream_inputs,
    stream_pairs,
)

Array = Any
PyTree = Any

__all__ = [
    "JaxLinearization",
    "JaxLossFunction",
    "linearize",
    "linearizations",
    "loss_function",
    "loss_functions",
]


# ----------------------------------------------------------------------------
# Private implementation: compiled kernels, no validation.
# ----------------------------------------------------------------------------


def _path_name(path: tuple[Any, ...]) -> str:
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


def _sum_of_squares(g: Array) -> Array:
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


class _Kernels:
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
        dtype: Any,
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
                    g = per_example(theta, xc, Uk)  # (example_chunk, vector_chunk, D)
                    return None, _sum_of_squares(g)

                _, squares = jax.lax.scan(over_vectors, None, Uc)
                return total + squares, None

            total = jnp.zeros((n_vec, vector_chunk, num_params), dtype=theta.dtype)
            total = _shard_local(total, theta)  # the scan carry varies as θ does
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


def _build_kernels(
    apply_fn: Callable[..., Array], treedef: Any, shapes: tuple[tuple[int, ...], ...], dtype: Any
) -> _Kernels:
    try:
        hash((apply_fn, treedef))
    except TypeError:  # an unhashable apply_fn or pytree node: compile for this model only
        return _Kernels(apply_fn, treedef, shapes, dtype)
    return _cached_kernels(apply_fn, treedef, shapes, dtype)


@functools.lru_cache(maxsize=16)
def _cached_kernels(
    apply_fn: Callable[..., Array], treedef: Any, shapes: tuple[tuple[int, ...], ...], dtype: Any
) -> _Kernels:
    return _Kernels(apply_fn, treedef, shapes, dtype)


class _Model:
    """``apply_fn`` with its parameters flattened: θ, the blocks and the kernels."""

    def __init__(self, apply_fn: Callable[..., Array], params: PyTree) -> None:
        named, treedef = _check_params(params)
        leaves = [leaf for _, leaf in named]
        shapes = tuple(tuple(int(s) for s in leaf.shape) for leaf in leaves)
        self.apply_fn = apply_fn
        self.dtype = leaves[0].dtype
        self.theta = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
        self.blocks = make_blocks(
            (name, shape) for (name, _), shape in zip(named, shapes, strict=True)
        )
        self.kernels = _build_kernels(apply_fn, treedef, shapes, self.dtype)


# ----------------------------------------------------------------------------
# Validation with the house messages
# ----------------------------------------------------------------------------


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _check_apply_fn(apply_fn: object) -> Callable[..., Array]:
    if not callable(apply_fn):
        msg = (
            "apply_fn must be a callable apply_fn(params, x) -> logits (N, C); got "
            f"{type(apply_fn).__module__}.{type(apply_fn).__name__}. For a flax module "
            "pass module.apply."
        )
        raise TypeError(msg)
    return apply_fn


def _check_params(params: PyTree) -> tuple[list[tuple[str, Array]], Any]:
    """The named leaves (as JAX arrays) and the treedef of ``params``."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not path_leaves:
        msg = (
            "params must hold at least one array leaf; got an empty pytree "
            f"({type(params).__name__}). Pass the parameters apply_fn differentiates."
        )
        raise ValueError(msg)
    names = [_path_name(path) for path, _ in path_leaves]
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
        if jnp.dtype(dtype) == jnp.float64 and not _x64_enabled():
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


def _check_inputs(inputs: PyTree) -> tuple[PyTree, int]:
    """``inputs`` with its leaves as JAX arrays, and the batch size N they share."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(inputs)
    if not path_leaves:
        msg = (
            "inputs must be an array (N, ...) or a pytree of arrays; got an empty "
            f"{type(inputs).__name__}."
        )
        raise ValueError(msg)
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


def _shard_local(theta: Array, inputs: PyTree) -> Array:
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
        varying |= _varying_axes(leaf)
    missing = varying - _varying_axes(theta)
    if not missing:
        return theta
    return jax.lax.pcast(theta, tuple(sorted(missing)), to="varying")


def _varying_axes(x: Array) -> set[str]:
    """The mapped axes a value varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX 0.6 - 0.8
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return set(vma or ())


def _check_logits(z: Any, num_inputs: int, dtype: Any) -> None:
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


# ----------------------------------------------------------------------------
# The linearization
# ----------------------------------------------------------------------------


class JaxLinearization(LinearizationBase):
    """A JAX function frozen at its parameters on one batch (see ``linearize``).

    Holds the logits and the linear map v ↦ J v of ``jax.linearize`` (the
    residuals of one forward pass); ``vjp`` is its transpose.
    """

    _operand_remedy = "Move it with jax.device_put({name}, lin.device)."
    _operand_free = "M"

    def __init__(self, model: _Model, inputs: PyTree, num_inputs: int) -> None:
        self._model = model
        self._kernels = model.kernels
        self._inputs = inputs
        self._blocks = model.blocks
        self._theta = _shard_local(model.theta, inputs)
        logits, f_jvp = self._kernels.forward(self._theta, inputs)
        _check_logits(logits, num_inputs, model.dtype)
        self._logits = logits
        self._f_jvp = f_jvp
        self._xp = array_namespace(logits, names=("logits",))
        self._independent: Any = None  # None, a bool, or a traced boolean

    @property
    def apply_fn(self) -> Callable[..., Array]:
        """The linearized function ``apply_fn(params, x)``."""
        return self._model.apply_fn

    @property
    def inputs(self) -> PyTree:
        """The batch of inputs x (JAX arrays, leading axis N)."""
        return self._inputs

    @property
    def flat_params(self) -> Array:
        """θ (D,): the parameters flattened in the order of ``blocks``."""
        return self._model.theta

    def unravel(self, v: Array, /) -> PyTree:
        """A flat vector ``v`` (D,) as a pytree shaped like ``params``.

        The inverse of the flattening: ``lin.unravel(lin.flat_params)`` is
        ``params``; ``lin.unravel(diagonal)`` gives a per-parameter diagonal.
        """
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        return self._kernels.unravel(v)

    def _forward_mode(self, kernel: Callable[[Any, Array], Array], v: Array) -> Array:
        try:
            return kernel(self._f_jvp, v)
        except TypeError as err:
            if "custom_vjp" not in str(err):
                raise
            msg = (
                "jvp is unavailable: apply_fn uses a jax.custom_vjp function, which has no "
                "forward-mode derivative. Reverse products (vjp, vjp_batch, per-example "
                "VJPs) still work; for forward products give that function a "
                "jax.custom_jvp rule instead."
            )
            raise NotImplementedError(msg) from err

    # -- forward products ---------------------------------------------------------
    def jvp(self, v: Array, /) -> Array:
        """J v for a flat parameter vector ``v`` (D,); returns (N, C).

        Evaluates the stored linear map of ``jax.linearize``: about one forward
        pass, no recomputation of the primal.
        """
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        return self._forward_mode(self._kernels.jvp, _shard_local(v, self._inputs))

    def jvp_batch(self, V: Array, /) -> Array:
        """J V[m] for M parameter vectors ``V`` (M, D); returns (M, N, C).

        One vmapped evaluation of the linear map (M tangents at once).
        """
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        return self._forward_mode(self._kernels.jvp_batch, _shard_local(V, self._inputs))

    # -- reverse products ---------------------------------------------------------
    def vjp(self, u: Array, /) -> Array:
        """Jᵀ u = Σ_n J_nᵀ u_n for a cotangent ``u`` (N, C); returns (D,).

        The transpose of the stored linear map: about one backward pass.
        """
        u = self._operand(u, "u", (self.num_inputs, self.num_outputs), "(N, C)")
        return self._kernels.vjp(self._f_jvp, self._theta, u)

    def vjp_batch(self, U: Array, /) -> Array:
        """Jᵀ U[m] for M cotangents ``U`` (M, N, C); returns (M, D).

        One vmapped backward pass for all M cotangents.
        """
        U = self._operand(U, "U", (None, self.num_inputs, self.num_outputs), "(M, N, C)")
        return self._kernels.vjp_batch(self._f_jvp, self._theta, U)

    @property
    def examples_independent(self) -> bool:
        """Whether each example's logits depend on that example alone.

        Checked once per linearization: ``apply_fn`` on each example as a batch of
        one must reproduce the batch's logits (to 1e3·eps relative). A model that
        couples examples (batch statistics, a mean over the batch) fails the check,
        and the per-example products then use the exact but slower masked
        batch VJPs (one batched backward pass per example) instead of the
        single-example vmap, which would be silently wrong for it.
        """
        return bool(self._independence())

    def _independence(self) -> Any:
        """The check of ``examples_independent``, cached.

        A bool, or a traced boolean inside ``jit`` / ``shard_map`` (then both
        paths are compiled, see ``_branch``).
        """
        if self._independent is None:
            singles = self._kernels.singles(self._theta, self._inputs)
            scale = jnp.maximum(jnp.max(jnp.abs(self._logits)), 1.0)
            tol = 1e3 * jnp.finfo(self.dtype).eps * scale
            flag = jnp.max(jnp.abs(singles - self._logits)) <= tol
            self._independent = flag if isinstance(flag, jax.core.Tracer) else bool(flag)
        return self._independent

    def _branch(
        self, fast: Callable[[Array], Array], exact: Callable[[Array], Array], U: Array
    ) -> Array:
        """``fast(U)`` for independent examples, else the masked ``exact(U)``.

        Under tracing the choice is made on the device by ``jax.lax.cond``.
        """
        flag = self._independence()
        if isinstance(flag, bool):
            return fast(U) if flag else exact(U)
        return jax.lax.cond(flag, fast, exact, U)

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = None) -> Array:
        """J_nᵀ U[i, k] for the examples n = start + i of ``examples``; returns (n, K, D).

        ``U`` has shape (n, K, C) with n the length of the slice ``examples``
        (default: all N examples).

        ``jax.vmap`` over examples of the VJP of the single-example function
        θ ↦ apply_fn(params(θ), x_n[None])[0], vmapped over the K cotangents.
        Cost: N forward passes of one example and N·K backward passes, vectorised;
        memory N·K·D entries. ``apply_fn`` must treat examples independently
        (no batch statistics).
        """
        start, stop = example_range(examples, self.num_inputs)
        U = self._operand(U, "U", (stop - start, None, self.num_outputs), "(n, K, C)")
        inputs = self._inputs
        if (start, stop) != (0, self.num_inputs):
            inputs = jax.tree_util.tree_map(lambda a: a[start:stop], inputs)
        return self._branch(
            lambda u: self._kernels.per_example(self._theta, inputs, u),
            lambda u: LinearizationBase.per_example_vjp(self, u, examples=examples),
            U,
        )

    def sum_squared_per_example_vjp(
        self, U: Array, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Array:
        """Σ_n (J_nᵀ U[n, k])² for cotangents ``U`` (N, K, C); returns (K, D).

        ``sum_cotangents=True`` returns the sum over k, shape (D,).

        Per-example VJPs (as in ``per_example_vjp``) squared and summed inside one
        compiled ``lax.scan`` over chunks of ⌊max_vectors / K⌋ examples (and, when
        K > max_vectors, chunks of max_vectors cotangents), so that the
        per-example gradients alive at once number at most ``max_vectors``
        D-vectors (default ``default_max_vectors``; the squares and their
        pairwise sum take about as much again). Cost: N·K backward passes of one
        example, vectorised per chunk; each chunk shape compiles once.
        """
        U = self._operand(U, "U", (self.num_inputs, None, self.num_outputs), "(N, K, C)")
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        n, k = int(U.shape[0]), int(U.shape[1])
        if k == 0:
            shape = (self.num_params,) if sum_cotangents else (0, self.num_params)
            return jnp.zeros(shape, dtype=self.dtype, device=self.device)
        vector_chunk = min(k, budget)
        example_chunk = min(n, max(1, budget // vector_chunk))

        def fast(u: Array) -> Array:
            out = self._kernels.sum_squared(
                self._theta, self._inputs, u, example_chunk, vector_chunk
            )
            return jnp.sum(out, axis=0) if sum_cotangents else out

        def exact(u: Array) -> Array:
            return LinearizationBase.sum_squared_per_example_vjp(
                self, u, max_vectors=budget, sum_cotangents=sum_cotangents
            )

        return self._branch(fast, exact, U)

    # -- second derivatives (added for fisherbound.variance) ----------------------
    def output_second_derivative_diagonal(self, /, *, max_vectors: int | None = None) -> Array:
        """∂²z_nc/∂θ_i² for every example, output and parameter; returns (N, C, D).

        Exact, by forward-over-forward differentiation along each coordinate:
        ∂²z/∂θ_i² = d²/dt² z(θ + t e_i) at t = 0 (``jax.jvp`` of ``jax.jvp`` with
        the tangent e_i), vmapped over chunks of ``max_vectors`` coordinates
        (default ``default_max_vectors``) in one compiled kernel. Cost: D
        second-order forward passes of the batch (about 3 forward passes each);
        memory: max_vectors × the forward activations. Never a D × D Hessian.
        """
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        d = self.num_params
        chunk = min(d, budget)
        kernel = _second_derivative_kernel(self._model.apply_fn, self._kernels)
        theta = self._theta
        pieces = []
        for start in range(0, d, chunk):
            # Fixed chunk shape (one compilation): indices past D repeat the last one.
            index = jnp.minimum(jnp.arange(start, start + chunk), d - 1)
            pieces.append(kernel(theta, self._inputs, index)[: min(chunk, d - start)])
        return jnp.moveaxis(jnp.concatenate(pieces, axis=0), 0, -1)


# ----------------------------------------------------------------------------
# Public fronts
# ----------------------------------------------------------------------------


def linearize(
    apply_fn: Callable[..., Array], params: PyTree, inputs: PyTree, /
) -> JaxLinearization:
    """Freeze ``apply_fn`` at ``params`` on one batch of inputs.

    Parameters
    ----------
    apply_fn
        A pure JAX function ``apply_fn(params, x) -> logits`` of shape (N, C),
        traceable by ``jax.jit`` and ``jax.vmap`` (a flax module's ``apply``
        qualifies), which treats the N examples independently.
    params
        A pytree (dict, list, tuple, nested flax-style dicts, ...) of real
        floating arrays, all of one dtype; the logits must come out in that
        dtype. θ is their concatenation in tree-flattening order (see ``blocks``).
    inputs
        The batch x: an array (N, ...) or a pytree of arrays sharing the leading
        axis N, passed to ``apply_fn`` as is (NumPy arrays are converted to JAX).

    Returns
    -------
    JaxLinearization
        A :class:`~fisherbound.linearization.LinearizationBase` with logits z (N, C),
        ``jvp`` (D,) → (N, C), ``vjp`` (N, C) → (D,) with Jᵀ u = Σ_n J_nᵀ u_n,
        their batched forms, ``per_example_vjp`` (N, K, C) → (N, K, D) and
        ``sum_squared_per_example_vjp`` (N, K, C) → (K, D); all JAX arrays on the
        parameters' device and dtype. ``unravel`` maps a flat vector back to a
        pytree shaped like ``params``.

    Raises
    ------
    TypeError
        If a parameter leaf is not a real floating array, the leaves mix dtypes,
        float64 is requested without ``jax_enable_x64``, or the logits are not
        floating or not in the parameters' dtype.
    ValueError
        If ``params`` is empty, the inputs disagree on N, or the logits are not
        (N, C) or not finite (the message names the rows).

    Notes
    -----
    Cost: one forward pass with ``jax.linearize`` (its residuals, as for a
    gradient step, are kept for the products). Each JVP / VJP then costs about
    one forward / backward pass; kernels compile once per model and batch shape.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fisherbound.adapters.jax import linearize
    >>> def apply_fn(params, x):
    ...     return jnp.tanh(x @ params["dense"]["kernel"]) @ params["out"]
    >>> params = {"dense": {"kernel": jnp.ones((4, 8)) / 4}, "out": jnp.ones((8, 3))}
    >>> lin = linearize(apply_fn, params, jnp.ones((5, 4)))
    >>> [b.name for b in lin.blocks], lin.num_params
    (['dense.kernel', 'out'], 56)
    >>> lin.jvp(jnp.ones(56)).shape, lin.vjp(jnp.ones((5, 3))).shape
    ((5, 3), (56,))
    """
    apply_fn = _check_apply_fn(apply_fn)
    model = _Model(apply_fn, params)
    x, n = _check_inputs(inputs)
    return JaxLinearization(model, x, n)


def linearizations(
    apply_fn: Callable[..., Array], params: PyTree, batches: Iterable[Any], /
) -> Iterator[JaxLinearization]:
    """Linearize ``apply_fn`` at ``params`` on each batch of ``batches``, lazily.

    Parameters
    ----------
    apply_fn, params
        As in ``linearize`` (checked and flattened now, once for all batches).
    batches
        An iterable of batches. A tuple or list batch contributes its first
        element as the inputs (as a DataLoader yields ``(x, y)``); any other batch
        (an array, a dict, ...) is the inputs itself. So a pytree of inputs that
        is a tuple must be wrapped: ``((x1, x2), y)``.

    Returns
    -------
    Iterator[JaxLinearization]
        One linearization per batch, built when it is requested, so a data set is
        streamed; batches of one shape share one compilation.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fisherbound.adapters.jax import linearizations
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> data = [(jnp.ones((4, 2)), jnp.zeros(4)), (jnp.ones((3, 2)), jnp.zeros(3))]
    >>> [lin.num_inputs for lin in linearizations(apply_fn, {"w": jnp.ones((2, 3))}, data)]
    [4, 3]
    """
    apply_fn = _check_apply_fn(apply_fn)
    batches = check_batches(
        batches,
        what="batches (arrays, or tuples whose first element is the inputs)",
        remedy="For a single batch use linearize(apply_fn, params, inputs).",
    )
    model = _Model(apply_fn, params)

    def build(i: int, batch: Any) -> JaxLinearization:
        x, n = _check_inputs(batch)
        return JaxLinearization(model, x, n)

    return stream_inputs(batches, build, single="an inputs array")


def _second_derivative_kernel(apply_fn: Callable[..., Array], kernels: _Kernels) -> Any:
    """The compiled map (θ, x, indices) ↦ ∂²z/∂θ_i² for i in indices, (k, N, C)."""
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn: compile for this call only
        return _build_second_derivative_kernel(apply_fn, kernels)
    return _cached_second_derivative_kernel(apply_fn, kernels)


def _build_second_derivative_kernel(apply_fn: Callable[..., Array], kernels: _Kernels) -> Any:
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
def _cached_second_derivative_kernel(apply_fn: Callable[..., Array], kernels: _Kernels) -> Any:
    return _build_second_derivative_kernel(apply_fn, kernels)


# ----------------------------------------------------------------------------
# The loss of a labelled batch (added for fisherbound.landscape)
# ----------------------------------------------------------------------------


class _LossKernels:
    """The compiled loss, its gradient and Hessian-vector products for one model.

    Every kernel takes θ, the inputs, the labels and a scale (1 or 1/N) as
    arguments, so one compilation serves every batch of the same shapes.
    """

    def __init__(self, apply_fn: Callable[..., Array], kernels: _Kernels, family: Any) -> None:
        unravel = kernels.unravel

        def nll(theta: Array, x: PyTree, y: Array, scale: Array) -> Array:
            z = apply_fn(unravel(theta), x)
            return -jnp.sum(family.unchecked_log_likelihood(z, y, xp=jnp)) * scale

        def values(theta: Array, x: PyTree, y: Array, scale: Array, shifts: Array) -> Array:
            z = jax.vmap(lambda s: apply_fn(unravel(theta + s), x))(shifts)
            yb = jnp.broadcast_to(y, (z.shape[0], *y.shape))
            return -jnp.sum(family.unchecked_log_likelihood(z, yb, xp=jnp), axis=-1) * scale

        grad = jax.grad(nll)

        def hvp(theta: Array, x: PyTree, y: Array, scale: Array, v: Array) -> Array:
            return jax.jvp(lambda t: grad(t, x, y, scale), (theta,), (v,))[1]

        self.logits = jax.jit(lambda theta, x: apply_fn(unravel(theta), x))
        self.values = jax.jit(values)
        self.grad = jax.jit(grad)
        self.hvp = jax.jit(hvp)
        self.hvp_batch = jax.jit(jax.vmap(hvp, in_axes=(None, None, None, None, 0)))


def _loss_kernels(apply_fn: Callable[..., Array], kernels: _Kernels, family: Any) -> _LossKernels:
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn: compile for this loss function only
        return _LossKernels(apply_fn, kernels, family)
    return _cached_loss_kernels(apply_fn, kernels, family)


@functools.lru_cache(maxsize=16)
def _cached_loss_kernels(
    apply_fn: Callable[..., Array], kernels: _Kernels, family: Any
) -> _LossKernels:
    return _LossKernels(apply_fn, kernels, family)


class JaxLossFunction(LossFunctionBase):
    """The negative log-likelihood of ``apply_fn`` on one labelled batch.

    Build it with :func:`loss_function`. ``value`` is ``jax.vmap`` of the forward
    pass over the shifts, ``gradient`` is ``jax.grad``, ``hvp`` / ``hvp_batch`` are
    forward-over-reverse (``jax.jvp`` of ``jax.grad``, vmapped over the vectors);
    every kernel is compiled once per model, family and shapes.
    """

    #: Shifts evaluated per compiled call of ``value`` (a fixed shape: one compilation).
    default_max_shifts: int = 32

    _operand_remedy = "Move it with jax.device_put({name}, loss.device)."

    def __init__(
        self,
        model: _Model,
        inputs: PyTree,
        num_inputs: int,
        labels: Array,
        family: Any,
        reduction: str,
    ) -> None:
        self._model = model
        self._inputs = inputs
        self._kernels = _loss_kernels(model.apply_fn, model.kernels, family)
        theta = _shard_local(model.theta, inputs)
        z = self._kernels.logits(theta, inputs)
        _check_logits(z, num_inputs, model.dtype)
        check_loss_labels(family, z, labels)
        self._logits = z
        self._labels = labels
        self._family = family
        self._reduction = reduction
        self._num_inputs = num_inputs
        scale = 1.0 / num_inputs if reduction == "mean" else 1.0
        self._scale = jnp.asarray(scale, dtype=model.dtype)
        self._theta = theta  # for the kernels: the derivative on this shard
        self._params = model.theta
        self._blocks = model.blocks
        self._xp = array_namespace(z, names=("logits",))

    def value(self, shifts: Array, /) -> Array:
        """L(θ + shifts[s]) for shifts (S, D); returns (S,).

        ``jax.vmap`` of the forward pass over chunks of ``default_max_shifts``
        shifts (the last chunk padded to the same shape, so one compilation).
        """
        shifts = self._operand(shifts, "shifts", (None, self.num_params), "(S, D)")
        s_total = int(shifts.shape[0])
        chunk = min(max(s_total, 1), self.default_max_shifts)
        pieces = []
        for start in range(0, s_total, chunk):
            part = shifts[start : start + chunk]
            rows = int(part.shape[0])
            if rows < chunk:
                part = jnp.pad(part, ((0, chunk - rows), (0, 0)))
            out = self._kernels.values(self._theta, self._inputs, self._labels, self._scale, part)
            pieces.append(out[:rows])
        if not pieces:
            return jnp.zeros((0,), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def gradient(self) -> Array:
        """∇L(θ), shape (D,) (``jax.grad``)."""
        return self._kernels.grad(self._theta, self._inputs, self._labels, self._scale)

    def hvp(self, v: Array, /) -> Array:
        """∇²L(θ) v for ``v`` (D,); returns (D,) (``jax.jvp`` of ``jax.grad``)."""
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        v = _shard_local(v, self._inputs)
        return self._kernels.hvp(self._theta, self._inputs, self._labels, self._scale, v)

    def hvp_batch(self, V: Array, /) -> Array:
        """∇²L(θ) V[m] for M vectors ``V`` (M, D); returns (M, D) (vmapped ``hvp``)."""
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        V = _shard_local(V, self._inputs)
        return self._kernels.hvp_batch(self._theta, self._inputs, self._labels, self._scale, V)


def _as_jax_labels(labels: Any) -> Any:
    """NumPy labels become JAX arrays (as inputs do); anything else is left as it is."""
    if type(labels).__module__.split(".")[0] == "numpy":
        return jnp.asarray(labels)
    return labels


def loss_function(
    apply_fn: Callable[..., Array],
    params: PyTree,
    inputs: PyTree,
    labels: Array,
    /,
    *,
    family: Any = None,
    reduction: str = "sum",
) -> JaxLossFunction:
    """The negative log-likelihood of ``apply_fn`` at ``params`` on one labelled batch.

    L(θ) = −Σ_n log p(y_n | z_n(θ)) with z = apply_fn(params(θ), x) and the
    family's ``log_likelihood`` (``reduction="mean"`` divides by N), as a
    :class:`~fisherbound.linearization.LossFunction`: ``value(shifts)`` (S, D) →
    (S,) (``jax.vmap`` over shifts), ``gradient()``, ``hvp(v)`` / ``hvp_batch(V)``
    (forward-over-reverse, exact). θ is flattened as in ``linearize``. Cost: one
    forward pass here (to check the labels); ``value`` costs S forward passes,
    ``hvp`` about two gradient steps; kernels compile once per batch shape.

    Parameters
    ----------
    apply_fn, params, inputs
        As in ``linearize``.
    labels
        Integer class indices (N,) for ``Categorical()`` (the default), {0, 1}
        floats (N, C) for ``Bernoulli()``, targets (N, C) for ``Gaussian()``
        (NumPy arrays are converted to JAX).
    family
        The output family (default ``Categorical()``).
    reduction
        ``"sum"`` over the batch (default) or ``"mean"``.

    Returns
    -------
    JaxLossFunction

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fisherbound.adapters.jax import loss_function
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((2, 3))}
    >>> loss = loss_function(apply_fn, params, jnp.ones((4, 2)), jnp.zeros(4, int))
    >>> round(float(loss.value(jnp.zeros((1, 6)))[0]), 5)  # 4 log 3
    4.39445
    """
    apply_fn = _check_apply_fn(apply_fn)
    fam = check_loss_options(family, reduction)
    model = _Model(apply_fn, params)
    x, n = _check_inputs(inputs)
    return JaxLossFunction(model, x, n, _as_jax_labels(labels), fam, reduction)


def loss_functions(
    apply_fn: Callable[..., Array],
    params: PyTree,
    batches: Iterable[Any],
    /,
    *,
    family: Any = None,
    reduction: str = "sum",
) -> Iterator[JaxLossFunction]:
    """``loss_function`` on each ``(inputs, labels)`` batch of ``batches``, lazily.

    Batches of one shape share one compilation.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fisherbound.adapters.jax import loss_functions
    >>> data = [(jnp.ones((4, 2)), jnp.zeros(4, int))] * 2
    >>> losses = loss_functions(lambda p, x: x @ p, jnp.ones((2, 3)), data)
    >>> [loss.num_inputs for loss in losses]
    [4, 4]
    """
    apply_fn = _check_apply_fn(apply_fn)
    fam = check_loss_options(family, reduction)
    batches = check_batches(
        batches,
        what="(inputs, labels) pairs",
        remedy="For one batch use loss_function(apply_fn, params, x, y).",
    )
    model = _Model(apply_fn, params)

    def build(i: int, inputs: Any, labels: Any) -> JaxLossFunction:
        x, n = _check_inputs(inputs)
        return JaxLossFunction(model, x, n, _as_jax_labels(labels), fam, reduction)

    return stream_pairs(batches, build)
