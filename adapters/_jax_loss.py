"""The JAX adapter's loss function: the negative log-likelihood of ``apply_fn`` on one batch.

Public through ``fisherbound.adapters.jax`` (``JaxLossFunction``, built by its
``loss_function`` and ``loss_functions``), for ``fisherbound.landscape``.
"""

from __future__ import annotations

from typing import Any

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._finite import check_outputs
from fisherbound._lib import array_namespace, is_traced
from fisherbound.adapters._jax_checks import (
    check_logits,
    check_mask,
    logits_text,
    named_inputs,
    shard_local,
)
from fisherbound.adapters._jax_model import (
    Kernels,
    Model,
    PytreeParams,
    traced_selection,
)
from fisherbound.linearization import LossFunctionBase, masked_label_placeholder

Array = Any
PyTree = Any

__all__ = ["JaxLossFunction", "check_ignore_index"]


class _LossKernels:
    """The compiled loss, its gradient and Hessian-vector products for one model.

    Every kernel takes θ, the pair (inputs, state), the labels, the counted positions (None or
    boolean (N, ∗S)) and a scale (1, or 1 / the number counted) as arguments, so
    one compilation serves every batch of the same shapes.
    """

    def __init__(self, kernels: Kernels, family: Any) -> None:
        model = kernels.model

        def log_likelihoods(z: Array, y: Array, counted: Array | None) -> Array:
            ll = family.unchecked_log_likelihood(z, y, xp=jnp)
            if counted is None:
                return ll
            return jnp.where(counted, ll, jnp.zeros((), dtype=ll.dtype))

        def nll(theta: Array, xs: PyTree, y: Array, counted: Array | None, scale: Array) -> Array:
            z = model(theta, xs)
            return -jnp.sum(log_likelihoods(z, y, counted)) * scale

        def values(
            theta: Array, xs: PyTree, y: Array, counted: Array | None, scale: Array, shifts: Array
        ) -> Array:
            z = jax.vmap(lambda s: model(theta + s, xs))(shifts)
            yb = jnp.broadcast_to(y, (z.shape[0], *y.shape))
            ll = log_likelihoods(z, yb, counted)
            return -jnp.sum(jnp.reshape(ll, (ll.shape[0], -1)), axis=-1) * scale

        grad = jax.grad(nll)

        def hvp(
            theta: Array, xs: PyTree, y: Array, counted: Array | None, scale: Array, v: Array
        ) -> Array:
            return jax.jvp(lambda t: grad(t, xs, y, counted, scale), (theta,), (v,))[1]

        self.logits = jax.jit(model)
        self.values = jax.jit(values)
        self.grad = jax.jit(grad)
        self.hvp = jax.jit(hvp)
        self.hvp_batch = jax.jit(jax.vmap(hvp, in_axes=(None, None, None, None, None, 0)))

    def hessian_product(self, batch: tuple[Any, ...], V: Array) -> Array:
        r""":math:`\nabla^2 L(\theta)\, V` for ``V`` (D, k), pure and traceable.

        ``batch`` holds the kernels' leading arguments; ``hvp`` for one column (as
        ``JaxLossFunction.hvp``), ``hvp_batch`` for more: ``hessian_operator``'s
        ``TraceableProduct``.
        """
        if int(V.shape[1]) == 1:
            return self.hvp(*batch, V[:, 0])[:, None]
        return jnp.matrix_transpose(self.hvp_batch(*batch, jnp.matrix_transpose(V)))


def _loss_kernels(kernels: Kernels, family: Any) -> _LossKernels:
    """The loss kernels of ``family``, built once and kept with the model's ``kernels``."""
    key = ("loss", family)
    if key not in kernels.cache:
        kernels.cache[key] = _LossKernels(kernels, family)
    return kernels.cache[key]


def check_ignore_index(ignore_index: object) -> int | None:
    """``ignore_index`` if it is an int or None; else a TypeError."""
    if ignore_index is None or (
        isinstance(ignore_index, int) and not isinstance(ignore_index, bool)
    ):
        return ignore_index
    msg = (
        "ignore_index must be an int (the label of positions that do not count, "
        f"default -100) or None; got {type(ignore_index).__name__}."
    )
    raise TypeError(msg)


def _labels_classes_last(labels: Any, ndim: int, class_axis: int) -> Any:
    """Labels with a class axis ((N, ∗S, C) in the user's layout) moved as the logits' is."""
    if not isinstance(labels, jax.Array) or labels.ndim != ndim:
        return labels  # class indices (no class axis), or a shape the family reports
    if class_axis in (-1, ndim - 1):
        return labels
    return jnp.moveaxis(labels, class_axis, -1)


class JaxLossFunction(PytreeParams, LossFunctionBase):
    """The negative log-likelihood of ``apply_fn`` on one labelled batch.

    Build it with :func:`loss_function`. ``value`` is ``jax.vmap`` of the forward
    pass over the shifts, ``gradient`` is ``jax.grad``, ``hvp`` / ``hvp_batch`` are
    forward-over-reverse (``jax.jvp`` of ``jax.grad``, vmapped over the vectors);
    every kernel is compiled once per model, family and shapes. ``labels`` are
    held in the logits' layout (classes last), masked and ignored labels replaced
    by 0; ``mask`` are the counted positions and ``num_counted`` their number.
    """

    #: Shifts evaluated per compiled call of ``value`` (a fixed shape: one compilation).
    default_max_shifts: int = 32

    _operand_remedy = "Move it with jax.device_put({name}, loss.device)."

    def _suspects(self) -> tuple[Array, list[tuple[str, Array]]]:
        return self._model.theta, named_inputs(self._inputs)  # state: checked finite on entry

    def __init__(
        self,
        model: Model,
        inputs: PyTree,
        num_inputs: int,
        labels: Array,
        family: Any,
        reduction: str,
        mask: Any = None,
        ignore_index: int | None = -100,
        state: PyTree = None,
    ) -> None:
        self._model = model
        self._inputs = inputs
        self._state = state
        self._kernels = _loss_kernels(model.kernels, family)
        theta = shard_local(model.theta, inputs)
        z = traced_selection(self._kernels.logits, theta, (inputs, state))
        check_logits(z, num_inputs, model.dtype)
        self._blocks = model.blocks
        check_outputs(self, z, "apply_fn(params, inputs)")
        counted = check_mask(mask, z, logits_text(z.ndim), inputs)
        labels = _labels_classes_last(labels, z.ndim, model.logits_fn.class_axis)
        counted = self._counted(labels, counted, ignore_index)
        lead = None if counted is None else tuple(counted.shape)
        if lead is not None and isinstance(labels, jax.Array) and labels.shape[: len(lead)] == lead:
            # Padding may hold any label: masked and ignored ones become a valid one.
            labels = masked_label_placeholder(labels, counted, jnp)
        # The base's own masking reads the count on the host (not under shard_map): the
        # counted positions are set here instead, traced or not.
        self._hold_batch(z, labels, family, reduction)  # checks the labels
        if counted is not None and not is_traced(counted) and not bool(jnp.any(counted)):
            msg = (
                "labels must count at least one position; every label equals "
                f"ignore_index={ignore_index}"
                + (" or is masked by mask" if mask is not None else "")
                + ". Pass labels with real classes, or ignore_index=None."
            )
            raise ValueError(msg)
        self._mask = counted
        if counted is not None:
            self._weights = counted.astype(z.dtype)
            count = jnp.sum(counted)
            if not is_traced(count):
                self._num_counted = int(count)
            # Traced (labels or mask inside jit / shard_map): the host cannot read the
            # count, so n stays N·P from _hold_batch (see num_counted).
        if reduction == "mean":
            self._scale = 1.0 / self._num_counted
        self._scale = jnp.asarray(self._scale, dtype=model.dtype)
        self._theta = theta  # for the kernels: the derivative on this shard
        self._params = model.theta
        self._blocks = model.blocks
        self._xp = array_namespace(z, names=("logits",))

    @staticmethod
    def _counted(labels: Any, counted: Array | None, ignore_index: int | None) -> Array | None:
        """``counted`` (the checked ``mask=``) without the labels equal to ``ignore_index``.

        Only integer labels are compared; None when nothing is masked (labels
        traced inside ``jit`` / ``shard_map`` always give an array).
        """
        if (
            ignore_index is None
            or not isinstance(labels, jax.Array)
            or not jnp.issubdtype(labels.dtype, jnp.integer)
        ):
            return counted
        ignored = labels == ignore_index
        if not is_traced(ignored) and not bool(jnp.any(ignored)):
            return counted
        if counted is None:
            return ~ignored
        if tuple(counted.shape) != tuple(ignored.shape):
            return counted  # labels of the wrong shape: the family's check reports them
        return counted & ~ignored

    def value(self, shifts: Array, /) -> Array:
        r""":math:`L(\theta + \mathrm{shifts}[s])` for shifts (S, D); returns (S,).

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
            out = self._kernels.values(*self._batch(), part)
            pieces.append(out[:rows])
        if not pieces:
            return jnp.zeros((0,), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    def _batch(self) -> tuple[Any, ...]:
        """The kernels' leading arguments: θ, (inputs, state), labels, counted positions, scale."""
        return self._theta, (self._inputs, self._state), self._labels, self._mask, self._scale

    def _traceable_hvp(self) -> tuple[Any, tuple[Any, ...]]:
        """(kernels, batch): the Hessian product and this batch's arrays, for compiled loops.

        ``hessian_operator``'s ``TraceableProduct`` is built from them.
        ``kernels.hessian_product(batch, V)`` is the product of ``hvp`` / ``hvp_batch``;
        the kernels are one object per model and family, so the loss functions of other
        batches of the same shapes share a compiled loop.
        """
        return self._kernels, self._batch()

    def gradient(self) -> Array:
        r""":math:`\nabla L(\theta)`, shape (D,) (``jax.grad``)."""
        return self._kernels.grad(*self._batch())

    def hvp(self, v: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, v` for ``v`` (D,); returns (D,).

        ``jax.jvp`` of ``jax.grad``.
        """
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        v = shard_local(v, self._inputs)
        return self._kernels.hvp(*self._batch(), v)

    def hvp_batch(self, V: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, V[m]` for M vectors ``V`` (M, D); returns (M, D).

        Vmapped ``hvp``.
        """
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        V = shard_local(V, self._inputs)
        return self._kernels.hvp_batch(*self._batch(), V)
