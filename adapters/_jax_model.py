"""The JAX adapter's model: flattened parameters and compiled kernels.

Private to ``fisherbound.adapters.jax``: ``Model`` (``apply_fn`` with its
parameters flattened to θ, the blocks and the compiled ``Kernels``, cached per
model and parameter layout), ``LogitsFn`` (``apply_fn`` with the output selector
``output=`` and the class axis ``class_axis=``: the logits (N, ∗S, C)) and
``PytreeParams`` (``ravel`` / ``unravel``). The checks of ``apply_fn``, the
parameters, the inputs, the logits and the mask are in ``_jax_checks``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound.adapters import _jax_rules as rules
from fisherbound.adapters._jax_checks import (
    HALF,
    available,
    check_params,
    is_array,
    on_mesh,
    shard_local,
)
from fisherbound.linearization import make_blocks

Array = Any
PyTree = Any

# ----------------------------------------------------------------------------
# Private implementation: compiled kernels, no validation.
# ----------------------------------------------------------------------------


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


def mask_outputs(z: Array, mask: Array | None) -> Array:
    """``z`` (..., N, ∗S, C) with the masked positions zeroed: diag(mask) applied.

    ``mask`` is None (no change) or boolean (N, ∗S), broadcast against the
    trailing axes of ``z``. ``jnp.where``, not a product, so a non-finite value
    at a masked position cannot leak into the result.
    """
    if mask is None:
        return z
    return jnp.where(mask[..., None], z, jnp.zeros((), dtype=z.dtype))


def mask_cotangents(U: Array, mask: Array | None) -> Array:
    """Per-example cotangents ``U`` (n, K, ∗S, C) with the masked positions zeroed.

    J_xᵀ (diag(m_x) U[x, k]) = (diag(m_x) J_x)ᵀ U[x, k]: masking the cotangents is
    masking the Jacobian rows.
    """
    if mask is None:
        return U
    return jnp.where(mask[:, None, ..., None], U, jnp.zeros((), dtype=U.dtype))


def finite_flags(x: PyTree, z: Any) -> Array:
    """Whether each floating input leaf with an example axis, then the logits, are finite.

    A boolean vector: one entry per such leaf of ``x`` (in tree order, as
    ``check_inputs_finite`` reads them), then one for ``z`` (True when ``z`` is not a
    floating array: ``check_logits`` refuses it). Exact (``all(isfinite)``), evaluated
    inside the forward kernel so that the host reads every flag at once.
    """
    flags = [
        jnp.all(jnp.isfinite(a))
        for a in jax.tree_util.tree_leaves(x)
        if is_array(a) and a.ndim and jnp.issubdtype(a.dtype, jnp.floating)
    ]
    floating = is_array(z) and jnp.issubdtype(z.dtype, jnp.floating)
    flags.append(jnp.all(jnp.isfinite(z)) if floating else jnp.asarray(True))
    return jnp.stack(flags)


class Kernels:
    """The compiled products of one model: ``apply_fn`` with one parameter layout.

    Every kernel takes the flat parameters ``theta``, the pair ``xs = (x, state)``
    of the inputs (batched along axis 0) and the model's non-differentiated state
    (None, or a pytree passed whole to ``apply_fn(params, x, state)``), and the mask
    (None or boolean (N, ∗S)) as arguments (never as closed-over constants), so a
    kernel compiled for one batch is reused by every batch (and every state) of the
    same shapes (None and an array compile separately). The mask is applied to the
    outputs of forward products and to the cotangents of reverse ones, which is
    diag(mask) J in every product.
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

        def leaves_of(theta: Array) -> list[Array]:
            # jnp.split, whose transpose is one concatenation (slices would
            # transpose to one D-sized pad per leaf, summed).
            pieces = jnp.split(theta, offsets[1:]) if len(offsets) > 1 else [theta]
            return [jnp.reshape(p, shape) for p, shape in zip(pieces, shapes, strict=True)]

        def unravel(theta: Array) -> PyTree:
            return jax.tree_util.tree_unflatten(treedef, leaves_of(theta))

        # The function of the latest call with this state (``build_kernels`` swaps it
        # in on every cache hit): a later retrace, for new shapes, runs a function
        # whose values are the key's, never an older one whose values have changed.
        self.fn = apply_fn

        def model(theta: Array, xs: tuple[PyTree, PyTree]) -> Array:
            x, state = xs
            params = unravel(theta)
            return self.fn(params, x) if state is None else self.fn(params, x, state)

        def single(theta: Array, xn: PyTree, state: PyTree) -> Array:
            # One example as a batch of one: the logits (*S, C) of x_n.
            one = jax.tree_util.tree_map(lambda a: a[None, ...], xn)
            return model(theta, (one, state))[0, ...]

        def forward(theta: Array, xs: tuple[PyTree, PyTree]) -> tuple[Array, Any, Array]:
            logits, f_jvp = jax.linearize(lambda t: model(t, xs), theta)
            return logits, f_jvp, finite_flags(xs[0], logits)

        def transpose(f_jvp: Any, theta: Array) -> Callable[[Array], Array]:
            # θ's own type: inside shard_map it varies over the mesh axes.
            f_vjp = jax.linear_transpose(f_jvp, theta)
            return lambda u: f_vjp(u)[0]

        def per_example(theta: Array, xs: tuple[PyTree, PyTree], U: Array) -> Array:
            x, state = xs  # the examples are mapped over, the state is shared

            def one(xn: PyTree, Un: Array) -> Array:
                _, pullback = jax.vjp(lambda t: single(t, xn, state), theta)
                return jax.vmap(lambda u: pullback(u)[0])(Un)

            return jax.vmap(one)(x, U)

        def sum_squared(
            theta: Array,
            xs: tuple[PyTree, PyTree],
            U: Array,
            mask: Array | None,
            example_chunk: int,
            vector_chunk: int,
        ) -> Array:
            U = mask_cotangents(U, mask)
            n, k = U.shape[:2]
            out = U.shape[2:]  # (*S, C)
            n_ex = -(-n // example_chunk)
            n_vec = -(-k // vector_chunk)
            # Pad with zero cotangents (whose VJPs are exactly zero) on copies of
            # the last example, so every chunk has one shape and one compilation.
            pad = ((0, n_ex * example_chunk - n), (0, n_vec * vector_chunk - k))
            U = jnp.pad(U, pad + ((0, 0),) * len(out))
            U = jnp.reshape(U, (n_ex, example_chunk, n_vec, vector_chunk, *out))
            U = jnp.moveaxis(U, 2, 1)  # (n_ex, n_vec, example_chunk, vector_chunk, *S, C)
            index = jnp.minimum(jnp.arange(n_ex * example_chunk), n - 1)
            x, state = xs
            chunks = jax.tree_util.tree_map(
                lambda a: jnp.reshape(a[index, ...], (n_ex, example_chunk, *a.shape[1:])), x
            )

            def over_examples(total: Array, chunk: tuple[PyTree, Array]) -> tuple[Array, None]:
                xc, Uc = chunk

                def over_vectors(carry: None, Uk: Array) -> tuple[None, Array]:
                    del carry  # lax.scan's carry: nothing is carried across vector chunks
                    g = per_example(theta, (xc, state), Uk)  # (example_chunk, vector_chunk, D)
                    return None, sum_of_squares(g)

                _, squares = jax.lax.scan(over_vectors, None, Uc)
                return total + squares, None

            total = jnp.zeros((n_vec, vector_chunk, num_params), dtype=theta.dtype)
            total = shard_local(total, theta)  # the scan carry varies as θ does
            total, _ = jax.lax.scan(over_examples, total, (chunks, U))
            return jnp.reshape(total, (n_vec * vector_chunk, num_params))[:k, ...]

        def one_example(f_jvp: Any, theta: Array, u: Array, i: Array, m: Any, n: int) -> Array:
            # J_iᵀ u[k] for the K cotangents u (K, *S, C) of example i, as batch
            # VJPs of cotangents zero off example i: exact whatever the model does
            # across examples (batch statistics); (K, D).
            hot = (jnp.arange(n) == i).astype(u.dtype)
            full = u[:, None, ...] * jnp.reshape(hot, (1, n) + (1,) * (u.ndim - 1))
            return jax.vmap(transpose(f_jvp, theta))(mask_outputs(full, m))

        def coupled_per_example(
            f_jvp: Any, theta: Array, U: Array, m: Any, start: Array, n: int
        ) -> Array:
            index = start + jnp.arange(U.shape[0])
            return jax.lax.map(lambda a: one_example(f_jvp, theta, a[0], a[1], m, n), (U, index))

        def coupled_sum_squared(f_jvp: Any, theta: Array, U: Array, m: Any) -> Array:
            def add(total: Array, a: tuple[Array, Array]) -> tuple[Array, None]:
                g = one_example(f_jvp, theta, a[0], a[1], m, U.shape[0])
                return total + g * g, None

            total = jnp.zeros((U.shape[1], num_params), dtype=theta.dtype)
            total = shard_local(total, theta)
            return jax.lax.scan(add, total, (U, jnp.arange(U.shape[0])))[0]

        def layer_plan_of(leaves: list[Array], xs: tuple[PyTree, PyTree]) -> Any:
            # The jaxpr on the batch, and the plan from it and a trace on N + 1
            # examples (shapes only), which tells the example axis apart.
            fn = jax.make_jaxpr(rules.leaf_function(self.fn, treedef))
            closed = fn(leaves, xs)
            x, state = xs
            n = int(jax.tree_util.tree_leaves(x)[0].shape[0])

            def spec(a: Array, extra: int = 0) -> Any:
                return jax.ShapeDtypeStruct((a.shape[0] + extra, *a.shape[1:]), a.dtype)

            plus = (
                jax.tree_util.tree_map(lambda a: spec(a, 1), x),
                jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state),
            )
            closed_plus = fn([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves], plus)
            return closed, rules.plan(closed, closed_plus, len(leaves), shapes, n)

        def layer_sum_squared(
            theta: Array,
            xs: tuple[PyTree, PyTree],
            U: Array,
            m: Any,
            vector_chunk: int,
            summed: bool,
        ) -> Array:
            leaves = leaves_of(theta)
            closed, plan = layer_plan_of(leaves, xs)
            flat = jax.tree_util.tree_leaves(xs)
            U = mask_cotangents(U, m)
            return rules.sum_squared(
                closed,
                plan,
                leaves,
                flat,
                lambda outs: outs[0],
                U,
                vector_chunk,
                lambda a: shard_local(a, xs[0]),
                summed,
            )

        def layer_plan(theta: Array, xs: tuple[PyTree, PyTree]) -> rules.Plan:
            key = (
                "layer plan",
                jax.tree_util.tree_structure(xs),
                tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(xs)),
            )
            if key not in self.cache:
                self.cache[key] = layer_plan_of(leaves_of(theta), xs)[1]
            return self.cache[key]

        #: The layer rules' plan for inputs like ``xs`` (host, cached per shapes).
        self.layer_plan = layer_plan
        #: Σ_n (J_nᵀ U[n, k])² by the layer rules (every leaf must have one).
        self.layer_sum_squared = jax.jit(layer_sum_squared, static_argnums=(4, 5))
        #: θ ↦ logits (N, *S, C), unmasked: the model the kernels differentiate.
        self.model = model
        #: Kernels built on first use and kept with these (so cached as they are):
        #: the second derivatives, the loss kernels of each family.
        self.cache: dict[Any, Any] = {}
        self.unravel = jax.jit(unravel)
        #: (θ, xs) ↦ (logits, the linear map of ``jax.linearize``, the finite flags of the
        #: inputs and the logits: ``finite_flags``), so that a linearization checks
        #: both with one read on the host.
        self.forward = jax.jit(forward)
        self.jvp = jax.jit(lambda f_jvp, v, m: mask_outputs(f_jvp(v), m))
        self.jvp_batch = jax.jit(lambda f_jvp, V, m: mask_outputs(jax.vmap(f_jvp)(V), m))
        self.vjp = jax.jit(lambda f_jvp, theta, u, m: transpose(f_jvp, theta)(mask_outputs(u, m)))
        self.vjp_batch = jax.jit(
            lambda f_jvp, theta, U, m: jax.vmap(transpose(f_jvp, theta))(mask_outputs(U, m))
        )
        self.per_example = jax.jit(
            lambda theta, x, U, m: per_example(theta, x, mask_cotangents(U, m))
        )
        self.singles = jax.jit(
            lambda theta, xs: jax.vmap(lambda xn: single(theta, xn, xs[1]))(xs[0])
        )
        self.sum_squared = jax.jit(sum_squared, static_argnums=(4, 5))
        #: The per-example products of a model that couples its examples (batch
        #: statistics): one batch VJP per example, in a compiled loop over them
        #: (a Python loop would put N copies of the backward pass into a jit).
        self.coupled_per_example = jax.jit(coupled_per_example, static_argnums=(5,))
        self.coupled_sum_squared = jax.jit(coupled_sum_squared)


def build_kernels(
    apply_fn: Callable[..., Array], treedef: Any, shapes: tuple[tuple[int, ...], ...]
) -> Kernels:
    """The compiled kernels of ``apply_fn``: shared by every call with the same state.

    jax.jit bakes the values a function reads besides its arguments (closed-over
    variables, globals, a partial's arguments, a bound method's object) into the
    trace, so a cache keyed on the function object would return results for old
    values. The key is ``state_key(apply_fn)``: the function's code with the values
    it reads, so a changed value compiles anew, and a fresh lambda or
    ``functools.partial`` with the same code and values per call does not.
    """
    try:
        key = (state_key(apply_fn), treedef, shapes)
        hash(key)
    except TypeError:  # an unhashable pytree node: compile for this model only
        return Kernels(apply_fn, treedef, shapes)
    kernels = _KERNELS.pop(key, None)  # re-inserted last: the least recently used go first
    if kernels is None:
        kernels = Kernels(apply_fn, treedef, shapes)
    else:
        kernels.fn = apply_fn  # its values are the key's: any retrace must read these
    _KERNELS[key] = kernels
    while len(_KERNELS) > MAX_CACHED_KERNELS:  # the least recently used model's kernels go
        _KERNELS.pop(next(iter(_KERNELS)))
    return kernels


#: Compiled kernels kept for this many (apply_fn state, parameter layout) keys.
MAX_CACHED_KERNELS = 16
_KERNELS: dict[Any, Kernels] = {}

#: Packages whose functions are taken as they are (their code and globals do not
#: change while a program runs): their objects are keyed by identity.
_LIBRARIES = frozenset(
    {"jax", "jaxlib", "flax", "equinox", "haiku", "optax", "chex", "numpy", "scipy"}
    | {"fisherbound", "builtins"}
)


class _Same:
    """An object keyed by identity, held so that its id cannot be reused."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def state_key(fn: object, depth: int = 0) -> Any:
    """A hashable key of ``fn`` and of every value it reads besides its arguments.

    Python functions: the code object (equal for the same source) with the keys of
    their closure cells, defaults and referenced globals (functions among them
    recursively, to ``depth`` 4); ``functools.partial``: the function, arguments
    and keywords; bound methods: the function and the object; functions of
    libraries (``_LIBRARIES``) and modules by identity. Values: scalars and
    strings themselves; NumPy arrays by a digest of their content (they can change
    in place); JAX arrays by identity (immutable); tuples, lists and dicts element
    by element; other objects themselves when hashable by value (a frozen
    dataclass such as a flax module), else by their attributes (``__dict__``),
    else by identity. Cost: one pass over what ``fn`` reads (microseconds for a
    plain function; about 1 ms per MB of NumPy arrays read).
    """
    if isinstance(fn, functools.partial):
        args = tuple(_value_key(a, depth) for a in fn.args)
        keywords = tuple(sorted((k, _value_key(v, depth)) for k, v in fn.keywords.items()))
        return ("partial", state_key(fn.func, depth), args, keywords)
    if isinstance(fn, types.MethodType):
        return ("method", state_key(fn.__func__, depth), _value_key(fn.__self__, depth))
    if isinstance(fn, LogitsFn):
        return ("logits", state_key(fn.apply_fn, depth), fn.output, fn.class_axis)
    if isinstance(fn, types.FunctionType):
        if _library(fn) or depth > 4:
            return _Same(fn)
        code = fn.__code__
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(_value_key(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell (a name bound later)
                cells.append(None)
        names = sorted(n for n in _global_names(code) if n in fn.__globals__)
        reads = tuple((n, _value_key(fn.__globals__[n], depth + 1)) for n in names)
        defaults = _value_key(fn.__defaults__, depth + 1)
        kwdefaults = _value_key(fn.__kwdefaults__, depth + 1)
        return ("function", code, tuple(cells), reads, defaults, kwdefaults)
    return _value_key(fn, depth)


def _library(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _LIBRARIES


def _global_names(code: Any) -> set[str]:
    """The global names a code object and the code nested in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _global_names(const)
    return names


def _value_key(value: object, depth: int) -> Any:
    import numpy as np  # the house rule: NumPy imported where it is used

    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return (type(value).__name__, value)
    if isinstance(value, types.ModuleType | type):
        return _Same(value)
    if isinstance(value, np.ndarray) and value.dtype != object:
        # a digest of the content (about 1 ms per MB), not a copy kept in the cache
        digest = hashlib.blake2b(np.ascontiguousarray(value).data, digest_size=16).digest()
        return ("ndarray", value.shape, str(value.dtype), digest)
    if isinstance(value, jax.Array):
        return _Same(value)
    if isinstance(value, types.FunctionType | types.MethodType | functools.partial):
        return state_key(value, depth)
    if isinstance(value, tuple | list):
        return (type(value).__name__, tuple(_value_key(v, depth) for v in value))
    if isinstance(value, dict):
        return (
            "dict",
            tuple((_value_key(k, depth), _value_key(v, depth)) for k, v in value.items()),
        )
    if _library(type(value)):
        return _Same(value)
    by_value = type(value).__eq__ is not object.__eq__
    if by_value:
        try:
            hash(value)
        except TypeError:
            by_value = False
        else:
            return value
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and depth <= 4:  # an object read through its attributes
        return ("object", _Same(type(value)), _value_key(attrs, depth + 1))
    return _Same(value)


class SelectionError(ValueError):
    """A selector or class axis that does not fit the model's output, found at trace time.

    Raised inside ``jax.jit`` tracing, whose traceback filtering appends a note to
    the message; ``traced_selection`` re-raises it as a plain ValueError.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def traced_selection(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)``, a ``SelectionError`` during its tracing re-raised with its own message."""
    try:
        return kernel(*args)
    except SelectionError as err:
        raise ValueError(err.message) from None


def select_output(out: Any, output: Any) -> Any:
    """The logits in the output pytree ``out`` of ``apply_fn``, by the selector ``output``.

    None: ``out`` itself; a str: the dict key (``out[output]``), else the attribute
    (``out.logits`` of a Hugging Face output); an int: the tuple / list index; a
    callable: ``output(out)``. Runs at trace time (the structure is static); a
    selector that finds nothing raises a ValueError naming ``output``.
    """
    if output is None:
        return out
    if callable(output):
        z = output(out)
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            z = out[output]
        elif not isinstance(out, Mapping) and hasattr(out, output):
            z = getattr(out, output)
        else:
            msg = (
                f"output={output!r} names no key or attribute of the model's output; "
                f"got {available(out)}. Pass one of them, or a callable out -> logits."
            )
            raise SelectionError(msg)
    else:
        seq = out.to_tuple() if hasattr(out, "to_tuple") else out
        if not isinstance(seq, tuple | list) or not -len(seq) <= output < len(seq):
            msg = (
                f"output={output!r} indexes a tuple output, but the model's output is "
                f"{available(out)}. Pass an index in range, a key, or a callable out -> logits."
            )
            raise SelectionError(msg)
        z = seq[output]
    if not is_array(z):
        msg = (
            f"output={output!r} must select an array of logits from the model's output; "
            f"it selected {available(z)} from {available(out)}."
        )
        raise SelectionError(msg)
    return z


def check_output(output: object) -> Any:
    """``output`` if it is a selector: None, a str, an int or a callable; else a TypeError."""
    if output is None or callable(output) or isinstance(output, str):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    msg = (
        "output must be None (apply_fn returns the logits), a str (a dict key or an "
        "attribute such as 'logits'), an int (a tuple index) or a callable out -> logits; "
        f"got {type(output).__name__}."
    )
    raise TypeError(msg)


def check_class_axis(class_axis: object) -> int:
    """``class_axis`` if it is an int other than 0; else a TypeError or ValueError."""
    if not isinstance(class_axis, int) or isinstance(class_axis, bool):
        msg = (
            f"class_axis must be an int (the logits' class axis); got {type(class_axis).__name__}."
        )
        raise TypeError(msg)
    if class_axis == 0:
        msg = (
            "class_axis must not be 0: axis 0 of the logits holds the N examples. Give "
            "the class axis of (N, ..., C) outputs, e.g. 1 for (N, C, H, W) or -1 (default)."
        )
        raise ValueError(msg)
    return class_axis


def classes_last(z: Array, class_axis: int) -> Array:
    """``z`` with its class axis ``class_axis`` moved last (trace-time checks of the axis)."""
    ndim = len(z.shape)
    if class_axis in (-1, ndim - 1) or ndim < 2:
        return z  # the logits' own checks report ndim < 2
    if not -ndim <= class_axis < ndim or class_axis % ndim == 0:
        msg = (
            f"class_axis={class_axis} must name an axis of the logits other than 0 (the "
            f"examples); got logits of shape {tuple(z.shape)} (axes {1 - ndim} to "
            f"{ndim - 1}, 0 and {-ndim} excluded)."
        )
        raise SelectionError(msg)
    return jnp.moveaxis(z, class_axis, -1)


@dataclass(frozen=True)
class LogitsFn:
    """``apply_fn`` with the output selector and the class axis: (params, x) ↦ (N, ∗S, C).

    Half-precision logits (float16, bfloat16: a mixed-precision model computing in
    half precision from float32 parameters) are upcast to ``dtype``, the parameters'
    dtype, so every Fisher quantity is computed in it. Frozen and compared by its
    fields, so the kernel caches keyed by it share one compilation between
    linearizations of one model and selector.
    """

    apply_fn: Callable[..., Any]
    output: Any = None
    class_axis: int = -1
    dtype: Any = None

    def __call__(self, params: PyTree, x: PyTree, *state: PyTree) -> Any:
        out = self.apply_fn(params, x, *state)
        if self.output is None and not is_array(out):
            return out  # check_logits reports it, with the hint to pass output=
        z = classes_last(select_output(out, self.output), self.class_axis)
        if self.dtype is not None and is_array(z) and z.dtype in HALF:
            z = z.astype(self.dtype)
        return z


class Model:
    """``apply_fn`` with its parameters flattened: θ, the blocks and the kernels.

    ``logits_fn`` is ``apply_fn`` followed by the output selector and the move of
    the class axis last; every kernel differentiates it.
    """

    def __init__(
        self,
        apply_fn: Callable[..., Array],
        params: PyTree,
        *,
        output: Any = None,
        class_axis: int = -1,
    ) -> None:
        named, treedef = check_params(params)
        leaves = [leaf for _, leaf in named]
        shapes = tuple(tuple(int(s) for s in leaf.shape) for leaf in leaves)
        self.apply_fn = apply_fn
        self.dtype = leaves[0].dtype
        self.logits_fn = LogitsFn(
            apply_fn, check_output(output), check_class_axis(class_axis), self.dtype
        )
        self.theta = flatten(leaves)
        self.blocks = make_blocks(
            (name, shape) for (name, _), shape in zip(named, shapes, strict=True)
        )
        self.treedef = treedef
        self.kernels = build_kernels(self.logits_fn, treedef, shapes)


@jax.jit
def flatten(leaves: list[Array]) -> Array:
    """θ: the leaves raveled and concatenated, in one compiled call (one per layout)."""
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])


def second_derivative_kernel(kernels: Kernels) -> Any:
    """The compiled map (θ, (x, state), mask, indices) ↦ ∂²z/∂θ_i², (k, N, ∗S, C).

    Built on first use and kept with ``kernels`` (so cached as they are). Masked
    positions give zero (their logits are constants of θ in the masked Jacobian).
    """
    kernel = kernels.cache.get("second_derivative")
    if kernel is not None:
        return kernel
    model = kernels.model

    def curvature(
        theta: Array, xs: tuple[PyTree, PyTree], mask: Array | None, index: Array
    ) -> Array:
        def along(i: Array) -> Array:
            e = jnp.zeros_like(theta).at[i].set(1.0)

            def slope(t: Array) -> Array:
                return jax.jvp(lambda s: model(s, xs), (t,), (e,))[1]

            return jax.jvp(slope, (theta,), (e,))[1]

        return mask_outputs(jax.vmap(along)(index), mask)

    kernel = kernels.cache["second_derivative"] = jax.jit(curvature)
    return kernel


class PytreeParams:
    """``unravel`` / ``ravel`` as pytrees like ``params``.

    For the JAX linearizations and loss functions, which both hold the model as
    ``_model``.
    """

    _model: Model
    _role: str
    _inputs: PyTree
    _blocks: tuple[Any, ...]
    num_params: int
    _flat_operand: Callable[[Array], Array]
    _ravel_leaves: Callable[[list[Any], list[str]], Array]

    def _operand(self, x: Any, name: str, shape: tuple[int | None, ...], what: str) -> Array:
        """The shell's operand check, with the remedy for a pytree where a flat array goes."""
        if not is_array(x) and jax.tree_util.tree_leaves(x):
            like = jax.tree_util.tree_structure(x) == self._model.treedef
            var = "loss" if self._role == "loss function" else "lin"
            msg = (
                f"{name} must be a flat array of shape {what} with D = {self.num_params}; got "
                f"a {type(x).__name__}"
                + (
                    f" shaped like params: flatten it with {var}.ravel({name}) "
                    f"(and a result back with {var}.unravel)."
                    if like
                    else f" (a pytree; {var}.ravel flattens one shaped like params)."
                )
            )
            raise TypeError(msg)
        checked = super()._operand(x, name, shape, what)  # type: ignore[misc]
        return on_mesh(checked, self._inputs)

    def unravel(self, v: Array, /) -> PyTree:
        """A flat vector ``v`` (..., D) as a pytree shaped like ``params``.

        The inverse of the flattening: ``lin.unravel(lin.flat_params)`` is
        ``params``; ``lin.unravel(diagonal)`` gives a per-parameter diagonal, a
        loss function's ``loss.unravel(directions)`` one pytree per direction.
        Leading axes are kept: (k, D) gives leaves (k, ∗shape). The inverse of
        ``ravel``.
        """
        v = self._flat_operand(v)
        if v.ndim == 1:
            return self._model.kernels.unravel(v)
        lead = tuple(int(s) for s in v.shape[:-1])
        rows = jax.vmap(self._model.kernels.unravel)(jnp.reshape(v, (-1, self.num_params)))
        return jax.tree_util.tree_map(lambda a: jnp.reshape(a, (*lead, *a.shape[1:])), rows)

    def ravel(self, tree: PyTree, /) -> Array:
        """The inverse of ``unravel``: a pytree like ``params`` (leaves (..., ∗shape)) as (..., D).

        The pytree must have the structure of ``params``; every leaf that
        parameter's shape after the same leading axes. Cost: one concatenation.
        """
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self._model.treedef:
            msg = f"tree must have the structure of params, {self._model.treedef}; got {treedef}."
            raise ValueError(msg)
        return self._ravel_leaves(leaves, [f"the leaf {b.name} of tree" for b in self._blocks])
