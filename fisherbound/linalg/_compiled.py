"""Lanczos compiled by JAX: the steps of ``_lanczos`` in one ``lax.while_loop`` on the device.

A JAX operator with a ``TraceableProduct`` (dense JAX matrices, the Fisher
operators of JAX linearizations) runs its B Lanczos runs as one call of a
``jax.jit``-compiled loop: the product, the two Gram–Schmidt passes against the
whole basis V (B, m, n) (rows beyond the step are zero, so every step has one
shape), the breakdown test and the finite test all stay on the device, and the host
reads two integers when the loop returns. The maths are ``_lanczos``'s own helpers
(``_residual``, ``_next_vectors``, ``_power_of_two_scale``, ``_breakdown_factor``),
so both paths take the same steps.

A breakdown (β below the tolerance in some run) stops the loop at that step; the
host draws the Gaussian restart vectors from the same generator, in the same order,
as the Python loop does, a second compiled function finishes the step, and the loop
resumes. The results therefore match the Python loop's to rounding, breakdowns
included, and no restart vectors are drawn or stored unless a run breaks down
(the memory is the basis, B m n numbers, as in the Python loop).

Compilation: once per (``TraceableProduct.fn``, operand shapes, B, m, n, dtype):
``jax.jit`` keeps the compiled loop, so later calls with the same shapes, on the same
operator or on another whose ``fn`` compares equal, do not recompile; the step index
is an argument, so resuming after a breakdown does not recompile either.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

# Imported by _lanczos only for a JAX operator: importing fisherbound.linalg imports no
# framework.
import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._lib import probes, to_host
from fisherbound.linalg._lanczos import (
    _breakdown_factor,
    _next_vectors,
    _not_finite,
    _power_of_two_scale,
    _residual,
    _tridiagonal_eigh,
)

Array = Any

#: The loop's status: still running or done, stopped at a breakdown, stopped at a
#: NaN or inf (in α or β of the step ``j``).
_RUNNING, _BREAKDOWN, _NOT_FINITE = 0, 1, 2


class _Carry(NamedTuple):
    """The state of B Lanczos runs between steps (a pytree: the loop's carry).

    ``j`` is the step whose product comes next; on a breakdown stop, ``w``, ``b``
    and ``broke`` are that step's residual, its norm and the runs that broke down.
    ``beta`` has m entries per run, the last unused.
    """

    j: Array
    status: Array
    V: Array
    alpha: Array
    beta: Array
    q: Array
    q_prev: Array
    beta_prev: Array
    norm_t: Array
    scale: Array
    w: Array
    b: Array
    broke: Array


@functools.partial(jax.jit, static_argnums=1)
def _start(V0: Array, m: int) -> _Carry:
    B, n = (int(s) for s in V0.shape)
    xp, dtype = jnp, V0.dtype
    zeros = xp.zeros((B,), dtype=dtype)
    return _Carry(
        j=xp.asarray(0, dtype=xp.int32),
        status=xp.asarray(_RUNNING, dtype=xp.int32),
        V=xp.zeros((B, m, n), dtype=dtype).at[:, 0, :].set(V0),
        alpha=xp.zeros((B, m), dtype=dtype),
        beta=xp.zeros((B, m), dtype=dtype),
        q=V0,
        q_prev=xp.zeros_like(V0),
        beta_prev=zeros,
        norm_t=zeros,
        scale=xp.ones((B,), dtype=dtype),
        w=xp.zeros_like(V0),
        b=zeros,
        broke=xp.zeros((B,), dtype=xp.bool_),
    )


def _advance(c: _Carry, q_next: Array, b: Array, ok: Array) -> _Carry:
    """Where ``ok``: record β = b at step j, q_next as basis row j + 1, and go to j + 1.

    At the last step (j = m − 1) there is no row j + 1: only j moves on (to m).
    """
    xp = jnp
    m = int(c.alpha.shape[1])
    row = xp.minimum(c.j + 1, m - 1)
    old_row = jax.lax.dynamic_index_in_dim(c.V, row, axis=1, keepdims=False)
    new_row = xp.where(ok & (c.j + 1 < m), q_next, old_row)
    V = jax.lax.dynamic_update_index_in_dim(c.V, new_row, row, axis=1)
    old_b = jax.lax.dynamic_index_in_dim(c.beta, c.j, axis=1, keepdims=False)
    beta = jax.lax.dynamic_update_index_in_dim(c.beta, xp.where(ok, b, old_b), c.j, axis=1)
    return c._replace(
        j=xp.where(ok, c.j + 1, c.j),
        V=V,
        beta=beta,
        q=xp.where(ok, q_next, c.q),
        q_prev=xp.where(ok, c.q, c.q_prev),
        beta_prev=xp.where(ok, b, c.beta_prev),
    )


@functools.partial(jax.jit, static_argnames=("fn", "factor"))
def _steps(fn: Any, operands: Any, carry: _Carry, factor: float) -> _Carry:
    """Lanczos steps from ``carry.j`` until step m, a breakdown, or a NaN / inf."""
    xp = jnp
    m = int(carry.alpha.shape[1])

    def running(c: _Carry) -> Array:
        return (c.j < m) & (c.status == _RUNNING)

    def step(c: _Carry) -> _Carry:
        w = xp.matrix_transpose(fn(operands, xp.matrix_transpose(c.q)))
        # Each run on A / s_b, s_b from its first product (see _power_of_two_scale).
        scale = xp.where(c.j == 0, _power_of_two_scale(xp, w), c.scale)
        w = w / scale[:, None]
        a, w, b, norm_t, broke = _residual(xp, c.V, c.q, c.q_prev, w, c.beta_prev, c.norm_t, factor)
        last = c.j == m - 1  # the last step needs α only
        finite = xp.all(xp.isfinite(a)) & (last | xp.all(xp.isfinite(b)))
        stop = ~last & xp.any(broke)
        status = xp.where(finite, xp.where(stop, _BREAKDOWN, _RUNNING), _NOT_FINITE)
        c = c._replace(
            status=status.astype(xp.int32),
            alpha=jax.lax.dynamic_update_index_in_dim(c.alpha, a, c.j, axis=1),
            norm_t=norm_t,
            scale=scale,
            w=w,
            b=b,
            broke=broke,
        )
        ok = finite & ~stop
        # Past a breakdown test (ok and not last), b > 0 in every run: w / b is safe.
        safe = xp.where(ok & ~last, b, xp.ones_like(b))
        return _advance(c, w / safe[:, None], b, ok)

    return jax.lax.while_loop(running, step, carry)


@jax.jit
def _resume(carry: _Carry, r: Array) -> _Carry:
    """Finish the step that stopped at a breakdown, with the restart vectors ``r`` (B, n)."""
    q_next, b = _next_vectors(jnp, carry.V, carry.w, carry.b, carry.broke, r)
    ok = jnp.asarray(True)
    return _advance(carry._replace(status=jnp.asarray(_RUNNING, dtype=jnp.int32)), q_next, b, ok)


def lanczos(
    xp: Any, op: Any, traceable: Any, V0: Array, m: int, gen: Any
) -> tuple[Array, Array, Array]:
    """``_lanczos`` for a JAX operator with a ``TraceableProduct``: same arguments, results.

    One compiled call runs all m steps; the host reads the step and the status once
    per call (and a ``_not_finite`` ValueError names the step whose α or β is NaN or
    inf, as the Python loop does). A breakdown costs one more call.
    """
    B, n = (int(s) for s in V0.shape)
    dtype, device = op.dtype, op.device
    factor = _breakdown_factor(xp, dtype, n)
    carry = _start(V0, m)
    while True:
        carry = _steps(traceable.fn, traceable.operands, carry, factor=factor)
        j, status = (int(x) for x in to_host(xp.stack([carry.j, carry.status])))
        if status == _NOT_FINITE:
            raise _not_finite(xp, dtype, j + 1)
        if status == _RUNNING:
            break
        r = probes(gen, (B, n), distribution="gaussian", xp=xp, dtype=dtype, device=device)
        carry = _resume(carry, r)
    return _finish(carry)


@jax.jit
def _finish(c: _Carry) -> tuple[Array, Array, Array]:
    """Alpha (B, m), beta (B, m − 1) in A's units, and the bases Q (B, n, m)."""
    m = int(c.alpha.shape[1])
    scale = c.scale[:, None]
    return c.alpha * scale, c.beta[:, : m - 1] * scale, jnp.matrix_transpose(c.V)


@jax.jit
def gauss_rules(alpha: Array, beta: Array) -> tuple[Array, Array]:
    """The Ritz values θ (B, m) and squared first components S₁ⱼ² of the B tridiagonals.

    ``_tridiagonal_eigh`` compiled as one function (a dozen operations, each compiled
    on its own on a first call otherwise).
    """
    theta, S = _tridiagonal_eigh(jnp, alpha, beta)
    return theta, S[:, 0, :] ** 2
