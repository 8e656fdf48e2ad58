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

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from fisherbound._lib import (
    array_namespace,
    check_positive_int,
)
from fisherbound.adapters._jax_loss import JaxLossFunction
from fisherbound.adapters._jax_model import (
    Model,
    check_apply_fn,
    check_inputs,
    check_logits,
    second_derivative_kernel,
    shard_local,
)
from fisherbound.linearization import (
    LinearizationBase,
    ReadOnly,
    check_loss_options,
    stream_linearizations,
    stream_loss_functions,
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
# The linearization
# ----------------------------------------------------------------------------


class JaxLinearization(LinearizationBase):
    """A JAX function frozen at its parameters on one batch (see ``linearize``).

    Holds the logits and the linear map v ↦ J v of ``jax.linearize`` (the
    residuals of one forward pass); ``vjp`` is its transpose.
    """

    _operand_remedy = "Move it with jax.device_put({name}, lin.device)."
    _operand_free = "M"

    def __init__(self, model: Model, inputs: PyTree, num_inputs: int) -> None:
        self._model = model
        self._kernels = model.kernels
        self._inputs = inputs
        self._blocks = model.blocks
        self._theta = shard_local(model.theta, inputs)
        logits, f_jvp = self._kernels.forward(self._theta, inputs)
        check_logits(logits, num_inputs, model.dtype)
        self._logits = logits
        self._f_jvp = f_jvp
        self._xp = array_namespace(logits, names=("logits",))
        self._independent: Any = None  # None, a bool, or a traced boolean

    @property
    def apply_fn(self) -> Callable[..., Array]:
        """The linearized function ``apply_fn(params, x)``."""
        return self._model.apply_fn

    inputs = ReadOnly[PyTree]("The batch of inputs x (JAX arrays, leading axis N).")

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
        return self._forward_mode(self._kernels.jvp, shard_local(v, self._inputs))

    def jvp_batch(self, V: Array, /) -> Array:
        """J V[m] for M parameter vectors ``V`` (M, D); returns (M, N, C).

        One vmapped evaluation of the linear map (M tangents at once).
        """
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        return self._forward_mode(self._kernels.jvp_batch, shard_local(V, self._inputs))

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
        start, stop = self._examples(examples)
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
        kernel = second_derivative_kernel(self._model.apply_fn, self._kernels)
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
    apply_fn = check_apply_fn(apply_fn)
    model = Model(apply_fn, params)
    x, n = check_inputs(inputs)
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
    apply_fn = check_apply_fn(apply_fn)
    model = Model(apply_fn, params)

    def build(i: int, batch: Any) -> JaxLinearization:
        del i  # the stream's callback also gets the batch index, for messages
        x, n = check_inputs(batch)
        return JaxLinearization(model, x, n)

    return stream_linearizations(
        batches,
        build,
        remedy="For a single batch use linearize(apply_fn, params, inputs).",
        single="an inputs array",
    )


# ----------------------------------------------------------------------------
# The loss of a labelled batch (added for fisherbound.landscape)
# ----------------------------------------------------------------------------


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
    family, reduction
        The output family (default ``Categorical()``) and the reduction over the
        batch, ``"sum"`` (default) or ``"mean"``.

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
    apply_fn = check_apply_fn(apply_fn)
    fam = check_loss_options(family, reduction)
    model = Model(apply_fn, params)
    x, n = check_inputs(inputs)
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
    apply_fn = check_apply_fn(apply_fn)
    fam = check_loss_options(family, reduction)
    model = Model(apply_fn, params)

    def build(i: int, inputs: Any, labels: Any) -> JaxLossFunction:
        del i  # the stream's callback also gets the batch index, for messages
        x, n = check_inputs(inputs)
        return JaxLossFunction(model, x, n, _as_jax_labels(labels), fam, reduction)

    return stream_loss_functions(
        batches, build, remedy="For one batch use loss_function(apply_fn, params, x, y)."
    )
