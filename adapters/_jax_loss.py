"""The JAX adapter's loss function: the negative log-likelihood of ``apply_fn`` on one batch.

Public through ``fisherbound.adapters.jax`` (``JaxLossFunction``, built by its
``loss_function`` and ``loss_functions``), for ``fisherbound.landscape``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._lib import array_namespace
from fisherbound.adapters._jax_model import Kernels, Model, check_logits, shard_local
from fisherbound.linearization import LossFunctionBase

Array = Any
PyTree = Any

__all__ = ["JaxLossFunction"]


class _LossKernels:
    """The compiled loss, its gradient and Hessian-vector products for one model.

    Every kernel takes θ, the inputs, the labels and a scale (1 or 1/N) as
    arguments, so one compilation serves every batch of the same shapes.
    """

    def __init__(self, apply_fn: Callable[..., Array], kernels: Kernels, family: Any) -> None:
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


def _loss_kernels(apply_fn: Callable[..., Array], kernels: Kernels, family: Any) -> _LossKernels:
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn: compile for this loss function only
        return _LossKernels(apply_fn, kernels, family)
    return _cached_loss_kernels(apply_fn, kernels, family)


@functools.lru_cache(maxsize=16)
def _cached_loss_kernels(
    apply_fn: Callable[..., Array], kernels: Kernels, family: Any
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
        model: Model,
        inputs: PyTree,
        num_inputs: int,
        labels: Array,
        family: Any,
        reduction: str,
    ) -> None:
        self._model = model
        self._inputs = inputs
        self._kernels = _loss_kernels(model.apply_fn, model.kernels, family)
        theta = shard_local(model.theta, inputs)
        z = self._kernels.logits(theta, inputs)
        check_logits(z, num_inputs, model.dtype)
        self._hold_batch(z, labels, family, reduction)
        self._scale = jnp.asarray(self._scale, dtype=model.dtype)
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
        v = shard_local(v, self._inputs)
        return self._kernels.hvp(self._theta, self._inputs, self._labels, self._scale, v)

    def hvp_batch(self, V: Array, /) -> Array:
        """∇²L(θ) V[m] for M vectors ``V`` (M, D); returns (M, D) (vmapped ``hvp``)."""
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        V = shard_local(V, self._inputs)
        return self._kernels.hvp_batch(self._theta, self._inputs, self._labels, self._scale, V)
