r"""``eigsh`` compiled by JAX: the thick-restart Lanczos of ``_Krylov`` in ``lax`` loops.

A JAX operator with a ``TraceableProduct`` (dense JAX matrices, the Fisher operators
of JAX linearizations) runs ``eigsh`` as one call of a ``jax.jit``-compiled pair of
nested ``lax.while_loop``: the inner loop takes Lanczos steps until the basis of
:math:`p` rows is full, the wanted Ritz pairs have converged, the budget is spent or a
breakdown needs a random vector; the outer loop restarts thickly and goes on. Every
step stays on the device: the product, the Gram–Schmidt pass against the whole basis
V (p, n) (rows beyond the step are zero, so every step has one shape), the DGKS
second pass on cancellation (``lax.cond``), the column of the projected matrix T
(p, p), the breakdown and finite tests, and at the points where the Python loop
checks convergence, the eigendecomposition of T and the relative residuals of the
wanted Ritz pairs. The host reads five integers when the loop returns.

The mathematics are ``_Krylov``'s and ``eigsh``'s, step for step: the power-of-two
scale of the first product, convergence checked at the same points by the same
relative residuals, the restart keeping the wanted pairs and half of the rest, the
budget and its RuntimeWarning, and the residual floor of the result. T is held in the
operator's dtype (the Python loop holds it in float64 on the host), so the results
agree to the rounding of that dtype. The leading :math:`j \times j` block of T is
solved at the static shape :math:`p \times p`: the rows and columns from :math:`j` on
carry a diagonal below the Gershgorin bound of the block, so its eigenvalues come
first in the ascending order and the block's Ritz values are the last :math:`j`.

A breakdown (an invariant subspace) with room left in the basis stops the loop; the
host draws the Gaussian vector from the same generator, at the same point, as the
Python loop does, a second compiled function orthogonalises it against the basis,
and the loop resumes. The results therefore match the Python loop's to rounding,
breakdowns and the generator's state afterwards included.

The steps (``_krylov_step``) and restarts (``restart_keeping``) also serve the Lanczos
count of ``local_dimension`` (``_compiled_count``), with its own test after each step.

Compilation: once per (``TraceableProduct.fn``, operand shapes, n, p, the wanted pairs,
``which``, dtype); ``tol`` and ``num_matvecs`` are arguments, so other values, other
operators whose ``fn`` compares equal (the Fisher operators of other batches of one
model) and resuming after a breakdown do not recompile.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

# Imported by _lanczos only for a JAX operator: importing fisherbound.linalg imports no
# framework.
import jax  # noqa: TID253
import jax.numpy as jnp  # noqa: TID253

from fisherbound._lib import is_traced, probes, to_host
from fisherbound.linalg._lanczos import (
    _DGKS,
    TRACED_LANCZOS,
    EigshResult,
    _breakdown_factor,
    _not_finite,
    _power_of_two_scale,
    first_check,
    warn_budget,
)

Array = Any


class _State(NamedTuple):
    """The Krylov–Schur decomposition between steps (a pytree: the loops' carry).

    ``V`` (p, n) holds the basis as rows, ``j`` of them filled (the others zero); ``T``
    (p, p) is Vᵀ A V / ``scale`` on the filled block; ``q`` the next basis vector with
    its coupling ``beta`` (0 after a breakdown). ``theta`` (p,) and ``S`` (p, p) are the
    eigenpairs of the last convergence check (ascending, T's units, the block's the
    last ``j``; the rows of ``S`` from ``j`` on zero), ``worst`` its largest relative
    residual. ``need_random``: a breakdown wants a random vector from the host;
    ``q_none``: the last step broke down with the basis full (a restart then wants one).
    """

    V: Array
    T: Array
    q: Array
    j: Array
    products: Array
    beta: Array
    norm_t: Array
    scale: Array
    theta: Array
    S: Array
    worst: Array
    finite: Array
    done: Array
    converged: Array
    need_random: Array
    q_none: Array


@functools.partial(jax.jit, static_argnums=1)
def _start(v: Array, p: int) -> _State:
    n, dtype = int(v.shape[0]), v.dtype
    zero = jnp.zeros((), dtype=dtype)
    false = jnp.asarray(False)
    return _State(
        V=jnp.zeros((p, n), dtype=dtype),
        T=jnp.zeros((p, p), dtype=dtype),
        q=v,
        j=jnp.asarray(0, dtype=jnp.int32),
        products=jnp.asarray(0, dtype=jnp.int32),
        beta=zero,
        norm_t=zero,
        scale=jnp.ones((), dtype=dtype),
        theta=jnp.zeros((p,), dtype=dtype),
        S=jnp.zeros((p, p), dtype=dtype),
        worst=zero,
        finite=jnp.asarray(True),
        done=false,
        converged=false,
        need_random=false,
        q_none=false,
    )


def _order(which: str, count: int, p: int, j: Array) -> Array:
    """The indices of the Ritz values from most to least wanted (the first ``count``).

    The block's Ritz values are the last j of the ascending p (``_ritz``), so rank r of
    ``_ranking`` is index p − 1 − r ("largest"), p − j + r ("smallest"), and for
    "both" the largest, the smallest, the second largest, ... in turn.
    """
    r = jnp.arange(count, dtype=jnp.int32)
    if which == "largest":
        return p - 1 - r
    if which == "smallest":
        return p - j + r
    return jnp.where(r % 2 == 0, p - 1 - r // 2, p - j + r // 2)


def _ritz(T: Array, j: Array) -> tuple[Array, Array]:
    """Eigenpairs of T's leading j × j block at the static shape p × p.

    The trailing block becomes c I with c below the Gershgorin bound of the leading
    one, so its eigenvalues come first (ascending) and are separated from the block's
    by at least the bound plus 1; the rows of S from j on are set to zero.
    """
    p = int(T.shape[0])
    inside = jnp.arange(p) < j
    block = inside[:, None] & inside[None, :]
    T = jnp.where(block, T, jnp.zeros_like(T))
    c = -(2.0 * jnp.max(jnp.sum(jnp.abs(T), axis=1)) + 1.0)
    T = T + jnp.diag(jnp.where(inside, jnp.zeros_like(c), c))
    theta, S = jnp.linalg.eigh(T)
    return theta, jnp.where(inside[:, None], S, jnp.zeros_like(S))


def _residuals(c: _State) -> Array:
    """β |S[j−1, i]| in the units of A / s: the Krylov residuals of the last check's pairs.

    Multiplied by s on the host (``eigsh``): in A's units they underflow near the bottom
    of the range, where XLA flushes subnormals to 0 (A ~ 1e-300).
    """
    last = jax.lax.dynamic_index_in_dim(c.S, c.j - 1, axis=0, keepdims=False)
    return c.beta * jnp.abs(last)


def relative_residuals(c: _State, order: Array) -> Array:
    """β |S[j−1, i]| / max(|θ_i|, √ε max |θ|) for the pairs ``order``: what ``tol`` bounds.

    In the units of A / s (``_residuals``), where the ratio is the same: a residual
    flushed to 0 would pass the test unconverged.
    """
    dtype = c.T.dtype
    sqrt_eps = math.sqrt(float(jnp.finfo(dtype).eps))
    scale = jnp.maximum(jnp.abs(c.theta[order]), sqrt_eps * _block_max(c, c.theta))
    return _residuals(c)[order] / jnp.maximum(scale, jnp.finfo(dtype).tiny)


def _block_max(c: _State, theta: Array) -> Array:
    """Max |θ| over the block's Ritz values (the last j of the p)."""
    p = int(theta.shape[0])
    return jnp.max(jnp.where(jnp.arange(p) >= p - c.j, jnp.abs(theta), jnp.zeros_like(theta)))


def _check(c: _State, which: str, wanted: int, rtol: Array, exhausted: Array) -> _State:
    """``eigsh``'s convergence test: Ritz pairs, the wanted ones' relative residuals."""
    p = int(c.T.shape[0])
    theta, S = _ritz(c.T, c.j)
    c = c._replace(theta=theta, S=S)
    order = _order(which, wanted, p, c.j)
    relative = relative_residuals(c, order)
    relative = jnp.where(jnp.arange(wanted) < c.j, relative, jnp.zeros_like(relative))
    converged = exhausted | (jnp.all(relative <= rtol) & (c.j >= wanted))
    return c._replace(worst=jnp.max(relative), converged=converged)


def _krylov_step(fn: Any, operands: Any, c: _State, factor: float) -> _State:
    """``_Krylov.step``: append q as row j, one product, one Gram–Schmidt pass.

    Two passes on cancellation; column j of T; ``need_random`` / ``q_none`` on a
    breakdown. Shared by ``eigsh`` (``_step``) and the Lanczos count (``_compiled_count``).
    """
    p, n = (int(s) for s in c.V.shape)
    j = c.j
    V = jax.lax.dynamic_update_index_in_dim(c.V, c.q, j, axis=0)
    w = fn(operands, c.q[:, None])[:, 0]
    # The run is on A / s, s from the first product (see _power_of_two_scale).
    scale = jnp.where(c.products == 0, _power_of_two_scale(jnp, w), c.scale)
    w = w / scale
    norm_before = jnp.linalg.vector_norm(w)
    h = V @ w
    w = w - h @ V
    norm_after = jnp.linalg.vector_norm(w)
    finite = jnp.all(jnp.isfinite(h)) & jnp.isfinite(norm_before) & jnp.isfinite(norm_after)

    def twice(hw: tuple[Array, Array]) -> tuple[Array, Array, Array]:
        # Cancellation: a second pass (Daniel, Gragg, Kaufman & Stewart; ARPACK's test).
        h, w = hw
        h2 = V @ w
        w = w - h2 @ V
        return h + h2, w, jnp.linalg.vector_norm(w)

    def once(hw: tuple[Array, Array]) -> tuple[Array, Array, Array]:
        return hw[0], hw[1], norm_after

    h, w, b = jax.lax.cond(norm_after < _DGKS * norm_before, twice, once, (h, w))
    # Rows of V beyond j are zero, so h is zero beyond j: column and row j of T.
    T = c.T.at[:, j].set(h).at[j, :].set(h)
    norm_t = jnp.maximum(c.norm_t, jnp.sum(jnp.abs(h)) + b)
    j = j + 1
    ok = b > factor * norm_t
    # Breakdown: span(V) is invariant; the host draws the next q while there is room.
    need_random = ~ok & (j < min(p, n))
    return c._replace(
        V=V,
        T=T,
        q=jnp.where(ok, w / jnp.where(ok, b, jnp.ones_like(b)), c.q),
        j=j,
        products=c.products + 1,
        beta=jnp.where(ok, b, jnp.zeros_like(b)),
        norm_t=norm_t,
        scale=scale,
        finite=finite,
        need_random=need_random,
        q_none=~ok & ~need_random,
    )


def _step(
    fn: Any,
    operands: Any,
    c: _State,
    budget: Array,
    rtol: Array,
    which: str,
    wanted: int,
    factor: float,
) -> _State:
    """``_Krylov.step`` and the convergence check ``eigsh`` makes after it."""
    p, n = (int(s) for s in c.V.shape)
    c = _krylov_step(fn, operands, c, factor)
    j, products, finite = c.j, c.products, c.finite
    full, exhausted, out_of_budget = j == p, j == n, products >= budget
    check = full | exhausted | out_of_budget
    if p < n:
        check_from = first_check(p, wanted)
        check = check | (j >= check_from) | (products > j)  # the latter: restarted
    c = jax.lax.cond(
        check & finite,
        lambda c: _check(c, which, wanted, rtol, exhausted),
        lambda c: c._replace(converged=jnp.asarray(False)),
        c,
    )
    return c._replace(done=check & finite & (c.converged | out_of_budget))


def restart_keeping(c: _State, keep: Array, kept: Array | int) -> _State:
    """``_Krylov.restart`` of a full basis, keeping the Ritz pairs ``keep[:kept]``.

    They (of the last check) become the first ``kept`` rows of V and the diagonal of
    T; q comes next. ``keep`` (p,) lists Ritz indices from most to least wanted;
    ``kept`` may be traced (the count keeps a number that depends on its Ritz values):
    the rows from ``kept`` on are zero, so every restart has one shape.
    """
    p = int(c.V.shape[0])
    inside = jnp.arange(p) < kept
    S = jnp.where(inside[None, :], c.S[:, keep], jnp.zeros_like(c.S))
    theta = jnp.where(inside, c.theta[keep], jnp.zeros_like(c.theta))
    return c._replace(
        V=S.T @ c.V,
        T=jnp.diag(theta),
        j=jnp.asarray(kept, dtype=jnp.int32),
        need_random=c.q_none,  # the last step broke down: a random q after the restart
        q_none=jnp.asarray(False),
    )


def _restart(c: _State, which: str, wanted: int) -> _State:
    """``_Krylov.thick_restart`` of a full basis: the wanted Ritz pairs and half the rest."""
    p = int(c.V.shape[0])
    kept = min(p - 1, wanted + (p - wanted) // 2)
    keep = _order(which, p, p, jnp.asarray(p))
    return restart_keeping(c, keep, kept)


@functools.partial(jax.jit, static_argnames=("fn", "which", "wanted", "factor"))
def _run(
    fn: Any,
    operands: Any,
    c: _State,
    budget: Array,
    rtol: Array,
    *,
    which: str,
    wanted: int,
    factor: float,
) -> tuple[_State, Array, tuple[Array, Array, Array]]:
    """Steps and thick restarts until done, a NaN / inf, or a breakdown wanting a vector.

    Returns the state, the flags the host reads (finite, done, need_random, converged,
    products) and the result of ``_finish`` (used once done): one compiled function
    for all, since each compiles in tenths of a second on a first call.
    """
    p = int(c.V.shape[0])

    def stopped(c: _State) -> Array:
        return ~c.finite | c.done | c.need_random

    def steps(c: _State) -> _State:
        return jax.lax.while_loop(
            lambda c: ~stopped(c) & (c.j < p),
            lambda c: _step(fn, operands, c, budget, rtol, which, wanted, factor),
            c,
        )

    def cycle(c: _State) -> _State:
        c = steps(c)
        return jax.lax.cond(
            ~stopped(c) & (c.j == p), lambda c: _restart(c, which, wanted), lambda c: c, c
        )

    c = jax.lax.while_loop(lambda c: ~stopped(c), cycle, c)
    flags = jnp.stack([c.finite, c.done, c.need_random, c.converged]).astype(jnp.int32)
    flags = jnp.concat([flags, c.products[None]])
    return c, flags, _finish(c, which, wanted)


@jax.jit
def _resume(c: _State, r: Array) -> _State:
    """``_Krylov._random_orthogonal``: q from the Gaussian ``r``, orthogonal to the basis."""
    for _ in range(2):
        r = r - (c.V @ r) @ c.V
    return c._replace(q=r / jnp.linalg.vector_norm(r), need_random=jnp.asarray(False))


def _finish(c: _State, which: str, wanted: int) -> tuple[Array, Array, Array]:
    """The wanted Ritz pairs, ascending, with their residuals floored at ε max |θ|.

    Eigenvalues and residuals in the units of A / s (the host multiplies them by s).
    """
    p = int(c.V.shape[0])
    sel = jnp.sort(_order(which, wanted, p, c.j))
    Y = (c.S[:, sel].T @ c.V).T
    Y = Y / jnp.linalg.vector_norm(Y, axis=0)
    # LAPACK deflates couplings below rounding, so β|s| can be exactly 0; the residual
    # of a computed Ritz pair is not below ε‖T‖: report at least that.
    floor = float(jnp.finfo(c.V.dtype).eps) * _block_max(c, c.theta)
    return c.theta[sel], Y, jnp.maximum(_residuals(c)[sel], floor)


def step_vector(c: _State) -> Array:
    """The vector of the last step (row j − 1 of V): whose product was the last taken."""
    return c.V[int(to_host(c.j)) - 1]


def after_call(
    xp: Any,
    op: Any,
    gen: Any,
    c: _State,
    flags: tuple[int, int, int, int],
    locked: Array | None = None,
) -> tuple[_State, bool]:
    """The host's part after a compiled call of eigsh's or the count's loop.

    ``flags`` = (finite, done, need_random, products). A NaN or inf raises the Python
    loop's error for the step's vector (projected off the count's ``locked`` basis); a
    breakdown wanting a vector draws it where the Python loop draws it, even when the
    run is done, and resumes unless done. Returns the state and whether the run is done.
    """
    finite, done, need_random, products = flags
    if not finite:
        q = step_vector(c)
        raise_not_finite(xp, op, q if locked is None else q - locked @ (locked.T @ q), products)
    if need_random:
        n, dtype = int(op.shape[0]), op.dtype
        r = probes(gen, (n,), distribution="gaussian", xp=xp, dtype=dtype, device=op.device)
        if not done:
            return _resume(c, r), False
    return c, bool(done)


def raise_not_finite(xp: Any, op: Any, q: Array, products: int) -> None:
    """The Python loop's error for a step whose product or Gram–Schmidt pass is NaN or inf.

    The Python loop applies ``op.matvec`` to the step's vector ``q``, and an operator that
    checks its results (the Fisher and Hessian operators of the adapters, which name the
    blocks and the likely cause) raises there; the compiled loop applies it once more,
    on the host, to raise the same error, and else ``_not_finite`` (an overflow in the
    Gram–Schmidt pass, or an operator that does not check).
    """
    op.matvec(q)
    raise _not_finite(xp, op.dtype, products)


def eigsh(
    xp: Any,
    op: Any,
    traceable: Any,
    v: Array,
    gen: Any,
    p: int,
    wanted: int,
    which: str,
    budget: int,
    rtol: float,
) -> EigshResult:
    """``eigsh``'s loop for a JAX operator with a ``TraceableProduct``: the same result.

    ``v`` is the unit start vector, ``p`` the basis size, ``wanted`` the number of
    Ritz pairs, ``budget`` the most products and ``rtol`` the tolerance, all checked
    by ``eigsh``. One compiled call runs to convergence; a breakdown with room left
    in the basis costs one host draw and one more call.
    """
    if any(is_traced(a) for a in jax.tree_util.tree_leaves(traceable.operands)):
        raise ValueError(TRACED_LANCZOS)
    n, dtype = int(op.shape[0]), op.dtype
    factor = _breakdown_factor(xp, dtype, n)
    c = _start(v, p)
    limits = (jnp.asarray(min(budget, 2**31 - 1), dtype=jnp.int32), jnp.asarray(rtol, dtype=dtype))
    while True:
        c, flags, result = _run(
            traceable.fn, traceable.operands, c, *limits, which=which, wanted=wanted, factor=factor
        )
        finite, done, need_random, converged, products = (int(f) for f in to_host(flags))
        c, done = after_call(xp, op, gen, c, (finite, done, need_random, products))
        if done:
            break
    if not converged and rtol > 0.0:
        warn_budget(budget, float(to_host(c.worst)), rtol, stacklevel=3)
    theta, Y, res = result
    # Times s on the host: XLA would flush a subnormal eigenvalue or residual to 0.
    s = float(to_host(c.scale))
    theta, res = (jnp.asarray(to_host(a).astype("float64") * s, dtype=dtype) for a in (theta, res))
    return EigshResult(theta, Y, res)
