r"""The Lanczos count of ``local_dimension`` compiled by JAX, on ``_compiled_eigsh``'s steps.

``_count_above`` counts :math:`\#\{\lambda_i(A) > \varepsilon\}` by thick-restart Lanczos
with locking: a run takes steps (and thick restarts) until its Ritz values prove the
count exceeds ``max_count``, or the pairs above :math:`\varepsilon` and the largest one
below have converged; the converged ones are locked (deflated) and a new run starts
from a random vector. For a JAX operator with a ``TraceableProduct`` each run is one
call of a ``jax.jit``-compiled pair of nested ``lax.while_loop``, with the steps and
restarts of the compiled ``eigsh`` (``_krylov_step``, ``_ritz``, ``restart_keeping``)
and the count's test after every step on the device: the Ritz values above
:math:`\varepsilon`, the proof by interlacing, the relative residuals of the pairs the
count needs, the budget, and the Gauss rule of the first run's probe (its first
``probe_steps`` steps, before any restart) that SLQ reuses. The host reads seven
integers when a run returns, locks the converged pairs (a second compiled function:
Gram–Schmidt into a basis of ``min(max_count, n)`` columns held at one shape, zero
beyond the count) and draws the next start vector, as the Python loop does.

The run is on :math:`(I - Y Y^\top) A (I - Y Y^\top)` from the first run on, with
:math:`Y = 0` before anything is locked (the products are then :math:`A`'s, exactly),
so every run of every call is the same program. A breakdown with room left in the
basis stops the loop, the host draws the Gaussian vector from the same generator, at
the same point, and the loop resumes (``_compiled_eigsh._resume``). The count, the
quadrature rule, the warning and the generator's state are therefore the Python
loop's, to the rounding of the operator's dtype (T is held in it; the Python loop
holds T in float64 on the host).

Compilation: once per (``TraceableProduct.fn``, operand shapes, n, p, ``max_count``,
``probe_steps``, dtype); ``eps``, ``tol``, the budget, the count so far and the run do
not recompile, so other seeds, thresholds and batches of the same size and model reuse
the program.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

# Imported by _quadrature only for a JAX operator: importing fisherbound.linalg imports
# no framework.
import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._lib import is_traced, to_host
from fisherbound.linalg._compiled_eigsh import (
    _krylov_step,
    _ritz,
    _start,
    _State,
    after_call,
    relative_residuals,
    restart_keeping,
)
from fisherbound.linalg._lanczos import (
    TRACED_LANCZOS,
    _breakdown_factor,
    _start_vector,
)
from fisherbound.linalg._operator import KeyedProduct

Array = Any

#: How a run ended: still running, more than max_count proven, the exact spectrum
#: (p = n), converged (lock and go on), the budget spent.
_RUNNING, _PROVEN, _EXACT, _CONVERGED, _BUDGET = range(5)


class _Count(NamedTuple):
    """The count's state of a run beside the Krylov decomposition (a pytree).

    ``above``: Ritz values above eps at the last step; ``proven``: more than
    ``max_count`` proven (the run may go on to finish the probe's rule); ``outcome``:
    one of ``_RUNNING`` ... ``_BUDGET``; ``taken``: the probe's Gauss rule ``nodes``,
    ``weights`` (``probe_steps`` each) was captured.
    """

    above: Array
    proven: Array
    outcome: Array
    taken: Array
    nodes: Array
    weights: Array


class _Deflated(KeyedProduct):
    r""":math:`(I - Y Y^\top) A (I - Y Y^\top) V` as a ``TraceableProduct.fn``.

    Its operands are (A's operands, Y, whether Y holds a column); equal when A's ``fn``
    is, so the count's runs share one program whatever Y holds. Before anything is
    locked the projections are skipped (``lax.cond``): two passes over Y (n × max_count)
    cost more than a small model's product.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = self._key = fn

    def __call__(self, operands: Any, V: Array) -> Array:
        inner, Y, locked = operands

        def project(V: Array) -> Array:
            return jax.lax.cond(locked, lambda V: V - Y @ (Y.T @ V), lambda V: V, V)

        return project(self.fn(inner, project(V)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _begin(v: Array, p: int, probe_steps: int) -> tuple[_State, _Count]:
    """A run's start: the Krylov state of ``_compiled_eigsh._start`` and an empty count."""
    rule = jnp.zeros((probe_steps,), dtype=v.dtype)
    false = jnp.asarray(False)
    zero = jnp.asarray(0, dtype=jnp.int32)
    return _start(v, p), _Count(zero, false, zero, false, rule, rule)


def _count_check(
    c: _State,
    s: _Count,
    count: Array,
    first_run: Array,
    eps: Array,
    rtol: Array,
    budget: Array,
    max_count: int,
    probe_steps: int,
) -> tuple[_State, _Count]:
    """``_count_above``'s test after a step: rule, interlacing proof, convergence, budget."""
    p, n = (int(d) for d in c.V.shape)
    j, products = c.j, c.products
    theta, S = _ritz(c.T, j)
    c = c._replace(theta=theta, S=S)
    theta_a = theta * c.scale
    r = jnp.arange(p)
    if probe_steps:  # before any restart T is the probe's tridiagonal: SLQ's Gauss rule
        take = ~s.taken & first_run & (products == j) & (j == probe_steps)
        s = s._replace(
            taken=s.taken | take,
            nodes=jnp.where(take, theta_a[p - probe_steps :], s.nodes),
            weights=jnp.where(take, n * S[0, p - probe_steps :] ** 2, s.weights),
        )
    # The block's Ritz values are the last j of the p (``_ritz``).
    above = jnp.sum((r >= p - j) & (theta_a > eps)).astype(jnp.int32)
    proven = s.proven | (count + above > max_count)
    settled = s.taken | ~first_run if probe_steps else jnp.asarray(True)
    proven_stop = proven & (settled | (products > j) | (j == p) | (j == n))
    # The pairs above eps and the largest below them, most wanted first.
    order = p - 1 - r
    relative = relative_residuals(c, order)
    relative = jnp.where(r < jnp.minimum(above + 1, j), relative, jnp.zeros_like(relative))
    converged = (j > above) & jnp.all(relative <= rtol)
    exact = (j == n) if p == n else jnp.asarray(False)  # the whole space: the spectrum
    outcome = jnp.select(
        [proven_stop, proven, exact, converged, products >= budget],
        [_PROVEN, _RUNNING, _EXACT, _CONVERGED, _BUDGET],
        _RUNNING,
    ).astype(jnp.int32)
    c = c._replace(worst=jnp.max(relative))
    return c, s._replace(above=above, proven=proven, outcome=outcome)


@functools.partial(jax.jit, static_argnames=("fn", "max_count", "probe_steps", "factor"))
def _run(
    fn: Any,
    operands: Any,
    carry: tuple[_State, _Count],
    count: Array,
    first_run: Array,
    eps: Array,
    rtol: Array,
    budget: Array,
    *,
    max_count: int,
    probe_steps: int,
    factor: float,
) -> tuple[_State, _Count, Array]:
    """Steps and thick restarts of one run until an outcome, a NaN / inf, or a breakdown.

    Returns the states and the integers the host reads (finite, done, need_random,
    outcome, products, above, rule taken).
    """
    p = int(carry[0].V.shape[0])
    k = max_count + 1

    def stopped(cs: tuple[_State, _Count]) -> Array:
        c = cs[0]
        return ~c.finite | c.done | c.need_random

    def step(cs: tuple[_State, _Count]) -> tuple[_State, _Count]:
        c = _krylov_step(fn, operands, cs[0], factor)
        c, s = jax.lax.cond(
            c.finite,
            lambda c, s: _count_check(
                c, s, count, first_run, eps, rtol, budget, max_count, probe_steps
            ),
            lambda c, s: (c, s),
            c,
            cs[1],
        )
        return c._replace(done=c.finite & (s.outcome != _RUNNING)), s

    def restart(c: _State, above: Array) -> _State:
        # ``_Krylov.thick_restart`` keeping min(above + 1, k) wanted pairs and half the rest.
        wanted = jnp.minimum(above + 1, k)
        kept = jnp.minimum(p - 1, wanted + (p - wanted) // 2)
        return restart_keeping(c, p - 1 - jnp.arange(p), kept)

    def cycle(cs: tuple[_State, _Count]) -> tuple[_State, _Count]:
        cs = jax.lax.while_loop(lambda cs: ~stopped(cs) & (cs[0].j < p), step, cs)
        c, s = cs
        c = jax.lax.cond(~stopped(cs) & (c.j == p), restart, lambda c, _: c, c, s.above)
        return c, s

    c, s = jax.lax.while_loop(lambda cs: ~stopped(cs), cycle, carry)
    flags = jnp.stack(
        [
            c.finite.astype(jnp.int32),
            c.done.astype(jnp.int32),
            c.need_random.astype(jnp.int32),
            s.outcome,
            c.products,
            s.above,
            s.taken.astype(jnp.int32),
        ]
    )
    return c, s, flags


@jax.jit
def _lock(c: _State, Y: Array, count: Array, above: Array) -> Array:
    """The Ritz vectors of the ``above`` largest Ritz values, locked into Y.

    They are orthonormalised into the columns ``count``, ``count + 1``, ... of Y
    (classical Gram–Schmidt twice). The Python loop takes a QR of [Y, Ritz vectors]:
    the same span, so the same deflation and start vectors to rounding.
    """
    p = int(c.V.shape[0])
    r = jnp.arange(p)
    S = jnp.where(r[None, :] < above, c.S[:, p - 1 - r], jnp.zeros_like(c.S))
    R = S.T @ c.V  # rows: the Ritz vectors, zero from ``above`` on

    def lock(i: Array, Y: Array) -> Array:
        y = jax.lax.dynamic_index_in_dim(R, i, axis=0, keepdims=False)
        for _ in range(2):
            y = y - Y @ (Y.T @ y)
        y = y / jnp.linalg.vector_norm(y)
        return jax.lax.dynamic_update_index_in_dim(Y, y, count + i, axis=1)

    return jax.lax.fori_loop(0, above, lock, Y)


@jax.jit
def _project(Y: Array, v: Array) -> Array:
    """The unit start vector v made orthogonal to the locked columns of Y."""
    v = v - Y @ (Y.T @ v)
    return v / jnp.linalg.vector_norm(v)


def count_above(
    xp: Any,
    op: Any,
    traceable: Any,
    v: Array,
    gen: Any,
    *,
    eps: float,
    max_count: int,
    p: int,
    budget: int,
    tol: float,
    probe_steps: int,
) -> tuple[int | None, tuple[Array, Array] | None, float | None]:
    """``_count_above``'s loop for a JAX operator with a ``TraceableProduct``.

    ``v`` is the first run's unit start vector (the Rademacher probe / √n), ``p`` the
    basis, ``budget`` the most products per run, all as ``_count_above`` set them.
    Returns the count (None: more than ``max_count``), the probe's Gauss rule (nodes,
    weights) of shape (probe_steps,) or None, and the largest relative residual when
    the budget ran out before convergence (``_count_above`` warns), else None.
    """
    if any(is_traced(a) for a in jax.tree_util.tree_leaves(traceable.operands)):
        raise ValueError(TRACED_LANCZOS)
    n, dtype = int(op.shape[0]), op.dtype
    factor = _breakdown_factor(xp, dtype, n)
    fn = _Deflated(traceable.fn)
    Y = None
    limits = (
        jnp.asarray(eps, dtype=dtype),
        jnp.asarray(tol, dtype=dtype),
        jnp.asarray(min(budget, 2**31 - 1), dtype=jnp.int32),
    )
    statics = {"max_count": max_count, "probe_steps": probe_steps, "factor": factor}
    count, first_run = 0, True
    rule = None
    while True:
        c, s = _begin(v, p, probe_steps)
        if Y is None:  # placed as _lock's results are (``_run`` compiles once for both)
            Y = jax.device_put(jnp.zeros((n, min(max_count, n)), dtype=dtype), c.V.sharding)
        run_args = (jnp.asarray(count, dtype=jnp.int32), jnp.asarray(first_run), *limits)
        while True:
            operands = (traceable.operands, Y, jnp.asarray(count > 0))
            c, s, flags = _run(fn, operands, (c, s), *run_args, **statics)
            finite, done, need_random, outcome, products, above, taken = (
                int(f) for f in to_host(flags)
            )
            c, done = after_call(xp, op, gen, c, (finite, done, need_random, products), Y)
            if done:
                break
        if first_run and taken:
            rule = (s.nodes[None, :], s.weights[None, :])
        if outcome == _PROVEN:
            return None, rule, None
        if outcome == _EXACT:
            return count + above, rule, None
        if outcome == _BUDGET:
            return count + above, rule, float(to_host(c.worst))
        if above == 0:
            return count, rule, None
        Y = _lock(c, Y, jnp.asarray(count, dtype=jnp.int32), jnp.asarray(above, dtype=jnp.int32))
        count += above
        if count >= n:
            return count, rule, None
        v = _project(Y, _start_vector(xp, op, None, gen))
        first_run = False
