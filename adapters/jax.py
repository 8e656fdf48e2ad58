r"""JAX adapter: any ``apply_fn(params, x) -> logits`` with pytree parameters.

``linearize(apply_fn, params, inputs)`` freezes a pure JAX function at its
parameters on one batch and returns a
:class:`~fisherbound.linearization.LinearizationBase` whose products are
computed by JAX's own transformations.

Shapes: the logits :math:`z` are (N, ∗S, C): N examples, position axes S (tokens,
pixels; none for one output per example) and the C classes last. A model whose
classes are elsewhere names that axis with ``class_axis=`` (e.g. 1 for
segmentation logits (N, C, H, W)); a model returning a pytree (a dict, a tuple,
a Hugging Face output) names the logits with ``output=``. The inputs :math:`x` are any
pytree of arrays sharing the leading axis N, passed to ``apply_fn`` as one
argument (a dict of keyword inputs included: ``lambda p, x: model(**x, params=p)``).
An example is an :math:`x` with all its positions: per-example products sum over them.
``mask=`` (boolean (N, ∗S), a key of dict inputs, or a callable ``inputs -> mask``)
keeps the positions that count; every product uses :math:`\operatorname{diag}(\mathrm{mask})\, J`
(masked positions have zero Jacobian rows), so every Fisher quantity excludes them.
``state=`` holds the variables that are not differentiated (flax ``batch_stats``,
haiku's state, equinox's ``State``): ``apply_fn(params, x, state)`` gets them whole,
as an argument of every compiled kernel.

The products:

- ``jvp`` / ``jvp_batch``: the linear map :math:`v \mapsto J v` of ``jax.linearize``, built
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

Parameter layout: the flat vector :math:`\theta` concatenates the leaves of ``params`` in
JAX's tree-flattening order (``jax.tree_util.tree_flatten``: dict keys sorted,
sequences in order), each leaf raveled row-major, exactly as
``jax.flatten_util.ravel_pytree``. A block is named by its leaf's path: dict keys
and attribute names joined by ``"."``, sequence indices as ``"[i]"``: ``{"dense":
{"kernel": w}}`` gives ``"dense.kernel"``, ``[{"w": w, "b": b}]`` gives ``"[0].b"``
and ``"[0].w"``, a bare array gives ``"params"``. (If two leaves would get the same
name, every block is named by ``jax.tree_util.keystr`` instead.)

Float64 needs ``jax.config.update("jax_enable_x64", True)`` before any array is
created; without it JAX silently computes in float32. Parameters in float16 or
bfloat16 are refused (sums over examples overflow or keep 3 digits); mixed
precision works: a model that computes in half precision from float32 parameters
(flax ``param_dtype=jnp.float32, dtype=jnp.bfloat16``, or casts inside
``apply_fn``) has its half-precision logits upcast to the parameters' dtype, so
the core math and every result are float32 (the Jacobian keeps the model's own
half-precision rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from fisherbound._finite import check_inputs_finite, check_outputs
from fisherbound._lib import (
    array_namespace,
    check_positive_int,
    is_traced,
)
from fisherbound.adapters._jax_checks import (
    check_apply_fn,
    check_inputs,
    check_logits,
    check_mask,
    check_mask_spec,
    check_state,
    named_inputs,
    shard_local,
)
from fisherbound.adapters._jax_loss import JaxLossFunction, check_ignore_index
from fisherbound.adapters._jax_model import (
    Model,
    PytreeParams,
    second_derivative_kernel,
    traced_selection,
)
from fisherbound.families import Family
from fisherbound.linearization import (
    LinearizationBase,
    ReadOnly,
    check_loss_options,
    stream_linearizations,
    stream_loss_functions,
)

Array = Any
PyTree = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "linearize",
    "linearizations",
    "loss_function",
    "loss_functions",
    "JaxLinearization",
    "JaxLossFunction",
]


# ----------------------------------------------------------------------------
# The linearization
# ----------------------------------------------------------------------------


class JaxLinearization(PytreeParams, LinearizationBase):
    r"""A JAX function frozen at its parameters on one batch (see ``linearize``).

    Holds the logits and the linear map :math:`v \mapsto J v` of ``jax.linearize`` (the
    residuals of one forward pass); ``vjp`` is its transpose.
    """

    _operand_remedy = "Move it with jax.device_put({name}, lin.device)."
    _operand_free = "M"
    logits_checked = True  # finite (check_logits on build): the stream need not re-read them

    def __init__(
        self,
        model: Model,
        inputs: PyTree,
        num_inputs: int,
        mask: Any = None,
        state: PyTree = None,
    ) -> None:
        self._model = model
        self._kernels = model.kernels
        self._inputs = inputs
        self._state = state
        self._blocks = model.blocks
        self._theta = shard_local(model.theta, inputs)
        logits, f_jvp, flags = traced_selection(self._kernels.forward, self._theta, self._xs)
        # The inputs and the logits checked finite by the forward kernel: one host read
        # (traced values, inside jit, have none). The messages come from the checks
        # themselves, run only when a flag is down, in their order.
        finite = is_traced(flags) or bool(jax.device_get(flags).all())
        if not finite:
            check_inputs_finite(named_inputs(inputs))
        check_logits(logits, num_inputs, model.dtype)
        if not finite:
            check_outputs(self, logits, "apply_fn(params, inputs)")
        self._logits = logits
        self._f_jvp = f_jvp
        self._xp = array_namespace(logits, names=("logits",))
        self._mask = check_mask(mask, logits, self._output_text(), inputs)
        self._independent: Any = None  # None, a bool, or a traced boolean

    def _suspects(self) -> tuple[Array, list[tuple[str, Array]]]:
        return self._model.theta, named_inputs(self._inputs)  # state: checked finite on entry

    @property
    def _xs(self) -> tuple[PyTree, PyTree]:
        """The kernels' model arguments: the inputs and the state."""
        return self._inputs, self._state

    @property
    def apply_fn(self) -> Callable[..., Array]:
        """The linearized function ``apply_fn(params, x)``, before ``output`` and ``class_axis``."""
        return self._model.apply_fn

    @property
    def output(self) -> Any:
        """The output selector (None, a str, an int or a callable; see ``linearize``)."""
        return self._model.logits_fn.output

    @property
    def class_axis(self) -> int:
        """The class axis of ``apply_fn``'s logits, moved last in ``logits``."""
        return self._model.logits_fn.class_axis

    inputs = ReadOnly[PyTree]("The batch of inputs x (JAX arrays, leading axis N).")

    @property
    def flat_params(self) -> Array:
        r""":math:`\theta` (D,): the parameters flattened in the order of ``blocks``."""
        return self._model.theta

    def _forward_mode(self, kernel: Callable[[Any, Array, Any], Array], v: Array) -> Array:
        try:
            return kernel(self._f_jvp, v, self._mask)
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
        """:math:`J v` for a flat parameter vector ``v`` (D,); returns (N, ∗S, C).

        Evaluates the stored linear map of ``jax.linearize``: about one forward
        pass, no recomputation of the primal. Zero at masked positions.
        """
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        return self._forward_mode(self._kernels.jvp, shard_local(v, self._inputs))

    def jvp_batch(self, V: Array, /) -> Array:
        """:math:`J V[m]` for M parameter vectors ``V`` (M, D); returns (M, N, ∗S, C).

        One vmapped evaluation of the linear map (M tangents at once).
        """
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        return self._forward_mode(self._kernels.jvp_batch, shard_local(V, self._inputs))

    # -- reverse products ---------------------------------------------------------
    def vjp(self, u: Array, /) -> Array:
        r""":math:`J^\top u = \sum_n J_n^\top u_n` for a cotangent ``u`` (N, ∗S, C); returns (D,).

        The transpose of the stored linear map: about one backward pass. The
        cotangent at masked positions is ignored.
        """
        u = self._operand(u, "u", self.output_shape, self._output_text())
        return self._kernels.vjp(self._f_jvp, self._theta, u, self._mask)

    def vjp_batch(self, U: Array, /) -> Array:
        r""":math:`J^\top U[m]` for M cotangents ``U`` (M, N, ∗S, C); returns (M, D).

        One vmapped backward pass for all M cotangents.
        """
        U = self._operand(U, "U", (None, *self.output_shape), self._output_text("M"))
        return self._kernels.vjp_batch(self._f_jvp, self._theta, U, self._mask)

    # -- compiled loops (fisher_operator's TraceableProduct) ----------------------
    def _traceable(self) -> tuple[Any, PyTree]:
        """(key, state): this linearization's arrays, for loops compiled by JAX.

        ``state`` holds every array the batched products read (the residuals of
        ``jax.linearize``, θ, the mask, the logits, the inputs); ``_with_state``
        with traced values gives a linearization whose ``jvp_batch`` and
        ``vjp_batch`` trace through them. Linearizations with equal keys (one model
        structure: one set of kernels) trace alike for states of equal shapes.
        """
        state = (self._f_jvp, self._theta, self._mask, self._logits, self._inputs, self._state)
        return self._kernels, state

    def _with_state(self, state: PyTree) -> JaxLinearization:
        """A copy whose products read ``state`` (see ``_traceable``; None: no arrays)."""
        new = copy.copy(self)
        arrays = (None,) * 6 if state is None else state
        new._f_jvp, new._theta, new._mask, new._logits, new._inputs, new._state = arrays
        new._independent = None
        new.__dict__.pop("_finite_pending", None)  # its own deferred flags, none shared
        new.__dict__.pop("_finite_depth", None)
        return new

    def _compiled_pass(
        self, key: Any, fn: Callable[[JaxLinearization], tuple[PyTree, Array]]
    ) -> tuple[PyTree, Any]:
        """``fn`` on this linearization's arrays as one compiled call; its flags read once.

        ``fn(lin)`` gets a copy whose products trace (``_with_state``) and returns a
        result pytree and a boolean vector of flags; one ``jax.jit`` program
        evaluates it, with the examples' independence (``_independence``, unless this
        linearization knows it already) appended to the flags, and the host reads
        the flags in one transfer. Returns the result (on the device) and the flags
        (a NumPy boolean array, the independence removed); the independence is kept
        for later products. The program is compiled once per ``key``, which must
        determine ``fn`` (every value it reads besides the linearization), and the
        known independence, and kept with the model's kernels (so cached as they are:
        never for another model or another state of ``apply_fn``); batches of one
        shape share its compilation.
        """
        independent = self._independent
        cache_key = ("compiled pass", key, independent)
        program = self._kernels.cache.get(cache_key)
        if program is None:
            skeleton = self._with_state(None)
            # The cached program must not pin this linearization's θ (D numbers kept
            # for as long as the model's kernels) nor read it as a constant.
            skeleton._model = copy.copy(self._model)
            skeleton._model.theta = None

            def run(state: PyTree) -> tuple[PyTree, Array]:
                lin = skeleton._with_state(state)
                lin._independent = independent
                out, flags = fn(lin)
                known = jnp.asarray(lin._independence(), dtype=bool)
                return out, jnp.concatenate([jnp.asarray(flags, dtype=bool), known[None]])

            program = self._kernels.cache[cache_key] = jax.jit(run)
        out, flags = program(self._traceable()[1])
        host = jax.device_get(flags)  # the one read on the host
        if independent is None:
            self._independent = bool(host[-1])
        return out, host[:-1]

    def _cotangents_text(self, lead: str) -> str:
        """The letters of per-example cotangents, e.g. "(n, K, T, C)"."""
        return "(" + ", ".join([lead, "K", *self._output_text()[1:-1].split(", ")[1:]]) + ")"

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
            singles = self._kernels.singles(self._theta, self._xs)
            scale = jnp.maximum(jnp.max(jnp.abs(self._logits)), 1.0)
            tol = 1e3 * jnp.finfo(self.dtype).eps * scale
            flag = jnp.max(jnp.abs(singles - self._logits)) <= tol
            self._independent = flag if isinstance(flag, jax.core.Tracer) else bool(flag)
        return self._independent

    def _branch(
        self,
        fast: Callable[[Array], Array],
        exact: Callable[[Array], Array],
        U: Array,
        *,
        cheap: bool = False,
    ) -> Array:
        """``fast(U)`` for independent examples, else the masked ``exact(U)``.

        Under tracing the choice is made on the device by ``jax.lax.cond``. A
        ``cheap`` fast path (the layer rules: a few gradient steps) is computed
        outside it, and the conditional returns it or computes ``exact(U)``: XLA's
        CPU backend compiles a conditional's branches without the library matrix
        products it fuses elsewhere (plain ``dot`` instructions in the compiled
        HLO), and with the rules inside, the jitted exact diagonal of an MLP
        784-512-256-10 took 27 ms against 9 ms. The per-example vmap stays inside,
        so that a model coupling its examples does not pay for it too.
        """
        flag = self._independence()
        if isinstance(flag, bool):
            return fast(U) if flag else exact(U)
        if cheap:
            return jax.lax.cond(flag, lambda r, _u: r, lambda _r, u: exact(u), fast(U), U)
        return jax.lax.cond(flag, fast, exact, U)

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = None) -> Array:
        r""":math:`J_n^\top U[i, k]` for the examples :math:`n = \text{start} + i` of ``examples``.

        Returns (n, K, D).
        ``U`` has shape (n, K, ∗S, C) with n the length of the slice ``examples``
        (default: all N examples); :math:`J_n^\top U[i, k]` sums over the positions of :math:`x_n`.

        ``jax.vmap`` over examples of the VJP of the single-example function
        :math:`\theta \mapsto \mathrm{apply\_fn}(\mathrm{params}(\theta), x_n[\mathrm{None}])[0]`,
        vmapped over the K cotangents (masked positions' cotangents zeroed first). Cost: N forward
        passes of one example and :math:`N \cdot K` backward passes, vectorised; memory
        :math:`N \cdot K \cdot D` entries (plus the cotangents, :math:`N \cdot K \cdot P \cdot C`).
        ``apply_fn`` must treat examples independently (no batch statistics).
        """
        start, stop = self._examples(examples)
        shape = (stop - start, None, *self.output_shape[1:])
        U = self._operand(U, "U", shape, self._cotangents_text("n"))
        inputs, mask = self._inputs, self._mask
        if (start, stop) != (0, self.num_inputs):
            inputs = jax.tree_util.tree_map(lambda a: a[start:stop], inputs)
            mask = None if mask is None else mask[start:stop]
        return self._branch(
            lambda u: self._kernels.per_example(self._theta, (inputs, self._state), u, mask),
            lambda u: self._kernels.coupled_per_example(
                self._f_jvp, self._theta, u, self._mask, start, self.num_inputs
            ),
            U,
        )

    def sum_squared_per_example_vjp(
        self, U: Array, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Array:
        r""":math:`\sum_n (J_n^\top U[n, k])^2` for cotangents ``U`` (N, K, ∗S, C); returns (K, D).

        ``sum_cotangents=True`` returns the sum over k, shape (D,).

        Per-example VJPs (as in ``per_example_vjp``) squared and summed inside one compiled
        ``lax.scan`` over chunks of :math:`\lfloor \mathrm{max\_vectors} / K \rfloor` examples (and,
        when K > max_vectors, chunks of max_vectors cotangents), so that the per-example gradients
        alive at once number at most ``max_vectors`` D-vectors (default ``default_max_vectors``; the
        squares and their pairwise sum take about as much again). Cost: :math:`N \cdot K` backward
        passes of one example (each through all P positions of the example), vectorised per chunk;
        each chunk shape compiles once. Masked positions' cotangents are zeroed first.

        When every parameter has a layer rule (``fast_path_reasons``), the layer rules instead: K
        batched backward passes through perturbations at the layers' outputs, in chunks of
        max_vectors cotangents (:math:`\lfloor \mathrm{max\_vectors} / N \rfloor` when a layer's
        input has position axes, whose per-example layer gradients are then formed), and per layer
        :math:`(a^2)^\top (\delta^2)`; no per-example gradient of the whole network. Models that
        couple their examples take one batch VJP per example, in a compiled loop.
        """
        shape = (self.num_inputs, None, *self.output_shape[1:])
        U = self._operand(U, "U", shape, self._cotangents_text("N"))
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        n, k = int(U.shape[0]), int(U.shape[1])
        if k == 0:
            shape = (self.num_params,) if sum_cotangents else (0, self.num_params)
            return jnp.zeros(shape, dtype=self.dtype, device=self.device)
        vector_chunk = min(k, budget)
        example_chunk = min(n, max(1, budget // vector_chunk))

        plan = self._layer_plan()
        layers = plan.complete
        # The rules form per-example layer gradients only for inputs with positions.
        layer_chunk = max(1, min(k, budget // n)) if plan.per_example else vector_chunk

        def fast(u: Array) -> Array:
            if layers:  # every parameter by a layer rule: K batched backward passes
                return self._kernels.layer_sum_squared(
                    self._theta, self._xs, u, self._mask, layer_chunk, sum_cotangents
                )
            out = self._kernels.sum_squared(
                self._theta, self._xs, u, self._mask, example_chunk, vector_chunk
            )
            return jnp.sum(out, axis=0) if sum_cotangents else out

        def exact(u: Array) -> Array:
            out = self._kernels.coupled_sum_squared(self._f_jvp, self._theta, u, self._mask)
            return jnp.sum(out, axis=0) if sum_cotangents else out

        return self._branch(fast, exact, U, cheap=layers)

    def _layer_plan(self) -> Any:
        return self._kernels.layer_plan(self._theta, self._xs)

    @property
    def fast_path_reasons(self) -> Mapping[str, str]:
        """Which parameters ``sum_squared_per_example_vjp`` computes by a layer rule.

        A read-only mapping from every block name to ``"fast"`` (a closed-form rule
        for its layer, found in the jaxpr of ``apply_fn``: the kernel of a
        ``dot_general`` over the activation's last axis or of a
        ``conv_general_dilated``, a bias added or a per-channel scale multiplied over
        the last axis, an embedding table whose rows a ``gather`` takes) or the
        reason it has none, e.g. ``"a convolution with batch groups"`` or
        ``"used 2 times in one forward pass (shared)"``. The rules apply when every
        parameter has one (and the examples are independent): then the squared
        per-example sums cost one batched backward pass per cotangent, as for the
        torch layer rules; otherwise every parameter takes the per-example vmap.
        Decided once per model and input
        shapes (one trace of ``apply_fn`` to a jaxpr) and cached.
        """
        plan = self._layer_plan()
        return MappingProxyType(
            {b.name: r for b, r in zip(self._blocks, plan.reasons, strict=True)}
        )

    # -- second derivatives (added for fisherbound.variance) ----------------------
    def output_second_derivative_diagonal(self, /, *, max_vectors: int | None = None) -> Array:
        r""":math:`\partial^2 z_{nc}/\partial\theta_i^2` for every example, output and parameter.

        Returns (N, ∗S, C, D).
        Exact, by forward-over-forward differentiation along each coordinate:
        :math:`\partial^2 z/\partial\theta_i^2 = \frac{d^2}{dt^2} z(\theta + t e_i)` at
        :math:`t = 0` (``jax.jvp`` of ``jax.jvp`` with the tangent :math:`e_i`), vmapped over
        chunks of ``max_vectors`` coordinates (default ``default_max_vectors``) in one compiled
        kernel. Zero at masked positions. Cost: D second-order forward passes of the batch (about
        3 forward passes each); memory: max_vectors :math:`\times` the forward activations and
        the result :math:`N \cdot P \cdot C \cdot D`. Never a :math:`D \times D` Hessian.
        """
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        d = self.num_params
        chunk = min(d, budget)
        kernel = second_derivative_kernel(self._kernels)
        theta = self._theta
        pieces = []
        for start in range(0, d, chunk):
            # Fixed chunk shape (one compilation): indices past D repeat the last one.
            index = jnp.minimum(jnp.arange(start, start + chunk), d - 1)
            piece = kernel(theta, self._xs, self._mask, index)
            pieces.append(piece[: min(chunk, d - start)])
        return jnp.moveaxis(jnp.concatenate(pieces, axis=0), 0, -1)


# ----------------------------------------------------------------------------
# Public fronts
# ----------------------------------------------------------------------------


def linearize(
    apply_fn: Callable[..., Any],
    params: PyTree,
    inputs: PyTree,
    /,
    *,
    state: PyTree = None,
    output: str | int | Callable[[Any], Any] | None = None,
    class_axis: int = -1,
    mask: Array | str | Callable[[Any], Any] | None = None,
) -> JaxLinearization:
    r"""Freeze ``apply_fn`` at ``params`` on one batch of inputs.

    Parameters
    ----------
    apply_fn
        A pure JAX function ``apply_fn(params, x)`` returning logits (N, C), logits
        with position axes (N, ∗S, C) (a language model's (N, T, V)), or a pytree
        holding them (see ``output``); traceable by ``jax.jit`` and ``jax.vmap``
        (a flax module's ``apply`` qualifies), treating the N examples
        independently.
    params
        A pytree (dict, list, tuple, nested flax-style dicts, ...) of real
        floating arrays, all of one dtype; the logits must come out in that
        dtype. :math:`\theta` is their concatenation in tree-flattening order (see ``blocks``).
    inputs
        The batch x: an array (N, ...) or any pytree of arrays sharing the leading
        axis N (a tuple, a dict such as ``{"input_ids": ..., "attention_mask":
        ...}``), passed to ``apply_fn`` as its second argument, as is (NumPy
        arrays are converted to JAX).
    state
        The model's variables that are not differentiated (flax's ``batch_stats``,
        the non-``Param`` part of an nnx model, haiku's ``state``, equinox's
        ``eqx.nn.State``): None (default; ``apply_fn(params, x)`` is called) or a
        pytree of arrays, passed whole (never batched) as a third argument,
        ``apply_fn(params, x, state)``. An argument, not a closed-over value, so
        new values (running statistics after a training step) reuse the compiled
        kernels and can never be confused with old ones. Must be finite.
    output
        Where the logits are in ``apply_fn``'s output: None (default; it is the
        logits array), a str (a dict key, else an attribute such as ``"logits"``
        of a Hugging Face output), an int (an index into a tuple output) or a
        callable ``out -> logits``.
    class_axis
        The axis of the logits holding the C classes (default -1, the last); it
        is moved last, so ``lin.logits`` is (N, ∗S, C): ``class_axis=1`` for
        (N, C, H, W) segmentation logits gives (N, H, W, C). 0 (the examples)
        is refused.
    mask
        None (default: every position counts), a boolean array (N, ∗S) in the
        layout of ``lin.logits`` without its class axis (True: the position
        counts), a str (a key of dict inputs such as ``"attention_mask"``, that
        entry converted with ``!= 0``) or a callable ``mask(inputs)`` (its result
        converted with ``!= 0`` unless boolean). Every product applies it:
        diag(mask) J, zero ``jvp`` at masked positions, their ``vjp`` cotangents
        ignored, so no Fisher quantity sees them; ``lin.logits`` keeps their
        values.

    Returns
    -------
    JaxLinearization
        A :class:`~fisherbound.linearization.LinearizationBase` with logits :math:`z`
        (N, ∗S, C), ``jvp`` (D,) → (N, ∗S, C), ``vjp`` (N, ∗S, C) → (D,) with
        :math:`J^\top u = \sum_n J_n^\top u_n`, their batched forms, ``per_example_vjp``
        (N, K, ∗S, C) → (N, K, D) and ``sum_squared_per_example_vjp``
        (N, K, ∗S, C) → (K, D) (an example's product sums over its positions),
        ``mask``; all JAX arrays on the parameters' device and dtype.
        ``unravel`` maps a flat vector back to a pytree shaped like ``params``.

    Raises
    ------
    TypeError
        If a parameter leaf is not a real floating array, the leaves mix dtypes,
        float64 is requested without ``jax_enable_x64``, the logits are not
        floating or not in the parameters' dtype, ``output`` is not a selector,
        ``class_axis`` is not an int or ``mask`` is not boolean.
    ValueError
        If ``params`` is empty, the inputs disagree on N, ``output`` finds no
        array, ``class_axis`` is 0 or out of range, the logits are not
        (N, ..., C) or not finite (the message names the rows), or ``mask`` is
        not (N, ∗S) or masks every position.

    Notes
    -----
    Cost: one forward pass with ``jax.linearize`` (its residuals, as for a
    gradient step, are kept for the products). Each JVP / VJP then costs about
    one forward / backward pass whatever the number of positions P; a
    per-example product costs one single-example backward pass per cotangent,
    so an exact Fisher quantity costs :math:`P \cdot R` of them per example (R: the
    family's factor rank). Kernels compile once per model, selector and batch
    shape.

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

    A sequence model returning a dict, with padding masked out:

    >>> def lm(params, x):
    ...     return {"logits": x["ids"][..., None] * params, "aux": x["ids"]}
    >>> x = {"ids": jnp.ones((2, 4)), "keep": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])}
    >>> lin = linearize(lm, jnp.ones(3), x, output="logits", mask="keep")
    >>> lin.output_shape, lin.num_positions, lin.jvp(jnp.ones(3))[0, :, 0].tolist()
    ((2, 4, 3), 4, [1.0, 1.0, 1.0, 0.0])
    """
    apply_fn = check_apply_fn(apply_fn)
    model = Model(apply_fn, params, output=output, class_axis=class_axis)
    mask = check_mask_spec(mask)
    x, n = check_inputs(inputs, finite=False)  # checked finite with the logits, in one read
    return JaxLinearization(model, x, n, mask, check_state(state))


def linearizations(
    apply_fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    /,
    *,
    state: PyTree = None,
    output: str | int | Callable[[Any], Any] | None = None,
    class_axis: int = -1,
    mask: str | Callable[[Any], Any] | None = None,
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
    state, output, class_axis
        As in ``linearize``, for every batch.
    mask
        Per batch: None, a str (a key of dict inputs, e.g. ``"attention_mask"``)
        or a callable ``mask(inputs)`` giving each batch's mask (N, ∗S); an array
        (one batch's) is refused.

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
    model = Model(apply_fn, params, output=output, class_axis=class_axis)
    mask = check_mask_spec(mask, stream=True)
    checked_state = check_state(state)

    def build(i: int, batch: Any) -> JaxLinearization:
        del i  # the stream's callback also gets the batch index, for messages
        x, n = check_inputs(batch, finite=False)  # checked finite with the logits
        return JaxLinearization(model, x, n, mask, checked_state)

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


def _loss_builder(
    apply_fn: object,
    params: PyTree,
    family: Any,
    reduction: str,
    output: Any,
    class_axis: int,
    mask: Any,
    ignore_index: object,
    state: PyTree,
    *,
    stream: bool,
) -> Callable[[PyTree, Any], JaxLossFunction]:
    """The options of ``loss_function(s)`` checked once; then (inputs, labels) ↦ the loss.

    ``stream``: the mask is for every batch (an array is refused). NumPy labels
    become JAX arrays, as inputs do.
    """
    apply_fn = check_apply_fn(apply_fn)
    fam = check_loss_options(family, reduction)
    ignore = check_ignore_index(ignore_index)
    model = Model(apply_fn, params, output=output, class_axis=class_axis)
    checked_mask = check_mask_spec(mask, stream=stream)
    checked_state = check_state(state)

    def build(inputs: PyTree, labels: Any) -> JaxLossFunction:
        x, n = check_inputs(inputs)
        y = _as_jax_labels(labels)
        return JaxLossFunction(model, x, n, y, fam, reduction, checked_mask, ignore, checked_state)

    return build


def loss_function(
    apply_fn: Callable[..., Any],
    params: PyTree,
    inputs: PyTree,
    labels: Array,
    /,
    *,
    state: PyTree = None,
    family: Family | None = None,
    reduction: str = "sum",
    output: str | int | Callable[[Any], Any] | None = None,
    class_axis: int = -1,
    mask: Array | str | Callable[[Any], Any] | None = None,
    ignore_index: int | None = -100,
) -> JaxLossFunction:
    r"""The negative log-likelihood of ``apply_fn`` at ``params`` on one labelled batch.

    :math:`L(\theta) = -\sum_n \sum_t m_{nt} \log p(y_{nt} \mid z_{nt}(\theta))` with
    :math:`z = \mathrm{apply\_fn}(\mathrm{params}(\theta), x)`
    (after ``output`` and ``class_axis``), the family's ``log_likelihood`` and
    :math:`m` the counted positions (``mask`` and the labels unequal to
    ``ignore_index``; every position without them). ``reduction="mean"``
    divides by the number of counted positions :math:`\sum m` (N when the logits are
    (N, C) and nothing is masked), as ``torch.nn.CrossEntropyLoss`` does.
    A :class:`~fisherbound.linearization.LossFunction`: ``value(shifts)``
    (S, D) → (S,) (``jax.vmap`` over shifts), ``gradient()``, ``hvp(v)`` /
    ``hvp_batch(V)`` (forward-over-reverse, exact). :math:`\theta` is flattened as in
    ``linearize``. Cost: one forward pass here (to check the labels); ``value``
    costs S forward passes, ``hvp`` about two gradient steps; kernels compile
    once per batch shape.

    Parameters
    ----------
    apply_fn, params, inputs, state, output, class_axis
        As in ``linearize``.
    labels
        Integer class indices (N, ∗S) for ``Categorical()`` (the default), {0, 1}
        floats (N, ∗S, C) for ``Bernoulli()``, targets (N, ∗S, C) for
        ``Gaussian()``, in the layout of ``apply_fn``'s logits (the class axis of
        (N, ∗S, C) labels is ``class_axis`` and moved last with the logits'; NumPy
        arrays are converted to JAX).
    family, reduction
        The output family (default ``Categorical()``) and the reduction,
        ``"sum"`` (default) or ``"mean"`` over the counted positions.
    mask
        As in ``linearize``: None, a boolean (N, ∗S) array, a key of dict inputs
        or a callable ``mask(inputs)``; False positions add nothing to the loss
        (their labels may hold anything: they are replaced by a valid placeholder,
        0 or 1/C for label rows).
    ignore_index
        For integer labels: positions whose label equals it are not counted
        (their label is replaced by 0 before the family sees it); default -100
        (PyTorch's); None counts every label.

    Returns
    -------
    JaxLossFunction

    Raises
    ------
    ValueError
        As ``linearize``; also when the labels do not fit the logits (shape,
        range) or when ``mask`` and ``ignore_index`` leave no position counted.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from fisherbound.adapters.jax import loss_function
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((2, 3))}
    >>> loss = loss_function(apply_fn, params, jnp.ones((4, 2)), jnp.zeros(4, int))
    >>> round(float(loss.value(jnp.zeros((1, 6)))[0]), 5)  # 4 log 3
    4.39445
    >>> y = jnp.array([0, -100, 2, -100])  # two labels ignored: the mean of two
    >>> loss = loss_function(apply_fn, params, jnp.ones((4, 2)), y, reduction="mean")
    >>> round(float(loss.value(jnp.zeros((1, 6)))[0]), 5), loss.num_counted  # log 3
    (1.09861, 2)
    """
    options = (family, reduction, output, class_axis, mask, ignore_index, state)
    build = _loss_builder(apply_fn, params, *options, stream=False)
    return build(inputs, labels)


def loss_functions(
    apply_fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    /,
    *,
    state: PyTree = None,
    family: Family | None = None,
    reduction: str = "sum",
    output: str | int | Callable[[Any], Any] | None = None,
    class_axis: int = -1,
    mask: str | Callable[[Any], Any] | None = None,
    ignore_index: int | None = -100,
) -> Iterator[JaxLossFunction]:
    """``loss_function`` on each ``(inputs, labels)`` batch of ``batches``, lazily.

    The options are ``loss_function``'s, for every batch; ``mask`` is None, a
    key of dict inputs or a callable ``mask(inputs)`` (an array is refused).
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
    options = (family, reduction, output, class_axis, mask, ignore_index, state)
    build = _loss_builder(apply_fn, params, *options, stream=True)
    return stream_loss_functions(
        batches,
        lambda _, inputs, labels: build(inputs, labels),  # the batch index is for messages
        remedy="For one batch use loss_function(apply_fn, params, x, y).",
    )
