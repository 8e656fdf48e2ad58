"""The secular equation of the categorical core metric, solved without forming it.

The eigenvalues of I_Δ = diag(p) − p pᵀ other than 0 and the tied values solve
Σ_i p_i² / (p_i − λ) = 1. Since Σ_i p_i = 1, p_i² / (p_i − λ) = p_i + λ p_i / (p_i − λ),
so for λ ≠ 0 the equation is equivalent to the deflated form

    h(λ) = Σ_i p_i / (p_i − λ) = 0,

which has no constant term to cancel against (the constant 1 of the first form
swallows the O(p_(1)) information when p is nearly one-hot) and whose weights are
p_i, not p_i² (which would underflow for p_i < 1e-154). h increases strictly
between consecutive distinct poles, from −∞ to +∞: exactly one root per gap.

Each root is computed relative to the nearer pole o (chosen from the sign of h
at the midpoint of its gap), λ = o + L τ, so that p_j − λ = L ((p_j − o)/L − τ)
is free of cancellation and tiny eigenvalues keep their relative accuracy, as in
LAPACK's dlaed4. The length unit L is the natural scale of the root (the gap, or
the left pole when that is smaller, since a root next to a small pole p_(g) lies
within about p_(g) of it), so the terms and their derivatives neither overflow
nor underflow when every probability is 1e-300. The iteration is dlaed4's
"middle way": the sums over the poles left and right of the gap are each
replaced by a constant plus one simple pole (matching value and derivative) and
the quadratic for the zero of that model is solved without cancellation; a
step that leaves the current bracket falls back to bisection, so the bracket
always shrinks and the iteration always terminates.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fisherbound._lib import is_traced

Array = Any

#: Largest number of (row, root, pole) triples evaluated at once: 1 MiB per float64
#: temporary (about eight are alive), small enough to stay in cache, which makes
#: it faster than larger chunks as well as lighter.
CHUNK_ELEMENTS = 1 << 17
MAX_ITERATIONS = 60
#: Chunks at least this large drop their finished roots mid-way (smaller ones are
#: cheaper to finish whole, and keep their shapes, which JAX's dispatch caches).
COMPACT_ELEMENTS = 1 << 14
#: |h| below NOISE · eps · Σ|terms| is rounding noise: the root is as good as it gets.
NOISE = 8.0


class SecularRoots(NamedTuple):
    """Roots λ = origin + scale · tau of h in the gaps (p_(g), p_(g+1)).

    ``origin`` is the nearer pole, ``tau`` the offset from it in units of ``scale``
    (so p_j − λ = scale · ((p_j − origin) / scale − tau) without cancellation);
    ``fixed`` marks roots that are a tied value or sit on a zero-probability pole
    (there λ = origin = p_(g) and tau = 0).
    """

    eigenvalue: Array
    origin: Array
    tau: Array
    scale: Array
    fixed: Array


def secular_roots(
    p_sorted: Array, first_gap: int, last_gap: int, xp: Any, *, chunk: int | None = None
) -> SecularRoots:
    """Roots of h in gaps ``first_gap .. last_gap − 1`` for every row of ``p_sorted``.

    ``p_sorted`` is (N, C), ascending along the last axis; gap g lies between
    sorted positions g and g + 1. Returns arrays of shape (N, last_gap − first_gap).
    Work O(N · G · C) per iteration; memory O(chunk).
    """
    if chunk is None:
        chunk = CHUNK_ELEMENTS
    n, c = int(p_sorted.shape[0]), int(p_sorted.shape[1])
    num = last_gap - first_gap
    rows_per_chunk = max(1, chunk // max(num * c, 1))
    gaps_per_chunk = max(1, min(num, chunk // c)) if rows_per_chunk == 1 else num
    per_rows: list[SecularRoots] = []
    for r0 in range(0, n, rows_per_chunk):
        rows = p_sorted[r0 : min(n, r0 + rows_per_chunk), ...]
        pieces = [
            _solve_chunk(rows, g0, min(last_gap, g0 + gaps_per_chunk), xp)
            for g0 in range(first_gap, last_gap, gaps_per_chunk)
        ]
        per_rows.append(_concat(pieces, 1, xp))
    return _concat(per_rows, 0, xp)


def _concat(parts: list[SecularRoots], axis: int, xp: Any) -> SecularRoots:
    if len(parts) == 1:
        return parts[0]
    return SecularRoots(*(xp.concat([p[k] for p in parts], axis=axis) for k in range(5)))


def _solve_chunk(p: Array, g0: int, g1: int, xp: Any) -> SecularRoots:
    """All roots of the gaps g0 .. g1 − 1 of the rows p (nb, C), iterated together."""
    from fisherbound._lib import device_of

    dtype = p.dtype
    finfo = xp.finfo(dtype)
    eps = float(finfo.eps)
    # Smallest length unit: 1/unit ≤ max/1e4 for poles at distance ≤ 1.
    floor = 1e4 / float(finfo.max)
    device = device_of(p)
    c = int(p.shape[-1])
    gaps = xp.arange(g0, g1, device=device)
    left = xp.arange(c, device=device)[None, :] <= gaps[:, None]  # (r, C)
    left_f = xp.astype(left, dtype)
    right_f = xp.astype(~left, dtype)
    pc = p[:, None, :]  # (nb, 1, C)

    dl = xp.take(p, gaps, axis=1)  # (nb, r)
    dr = xp.take(p, gaps + 1, axis=1)
    gap = dr - dl
    half = gap / 2.0
    # A tie is an eigenvalue (a value repeated k times gives k − 1 of them); a
    # zero-probability left pole carries no weight, so its root collapses onto it.
    fixed = (dl == dr) | (dl == 0.0) | (half == 0.0)

    # Which pole is nearer: the sign of h at the midpoint (lengths in units of the
    # gap, so every denominator is at least 1/2; fixed roots at −1, left of all poles).
    unit = xp.maximum(gap, floor)
    mid = xp.where(fixed, -1.0, half / unit)
    h_mid = xp.sum(pc / ((pc - dl[..., None]) / unit[..., None] - mid[..., None]), axis=-1)
    from_right = (h_mid < 0.0) & ~fixed
    origin = xp.where(from_right, dr, dl)
    unit = xp.where(from_right, unit, xp.maximum(xp.minimum(gap, dl), floor))
    if is_traced(unit):
        # Fixed roots' units may be the floor (1e-304): the derivative of 1 / unit
        # overflows there, and 0 · inf is NaN even where the result does not use it.
        import jax  # traced: JAX is what traced it

        unit = xp.where(fixed, jax.lax.stop_gradient(unit), unit)
    delta = (pc - origin[..., None]) / unit[..., None]  # exactly 0 at the origin pole
    half_u = half / unit
    # Start at the midpoint, or one unit right of a small left pole (λ = 2 p_(g)).
    tau = xp.where(fixed, -1.0, xp.where(from_right, -half_u, xp.minimum(half_u, 1.0)))
    st = {
        "tau": tau,
        "lo": xp.where(from_right, -half_u, 0.0),
        "hi": xp.where(from_right, 0.0, half_u),
        "pole_l": (dl - origin) / unit,
        "pole_r": (dr - origin) / unit,
        "done": fixed,
        "prev_rel": xp.zeros_like(tau),
        "prev_ok": fixed,
        "fixed": fixed,
        "dl": dl,
        "origin": origin,
        "unit": unit,
        "column": gaps - g0,
    }
    finished: list[dict[str, Array]] = []
    h, psi, dpsi, dphi = _evaluate(pc, delta, tau, left_f, right_f, xp)
    if is_traced(tau):
        # Traced by JAX (jit, grad, shard_map): one lax.fori_loop (a Python loop would
        # be unrolled MAX_ITERATIONS times into the program), no compaction; converged
        # entries are frozen by the masks, so the result is the eager one.
        st = _iterate_traced(st, (h, psi, dpsi, dphi), pc, delta, left_f, right_f, eps)
        st["tau"] = _implicit(st["tau"], st["fixed"], pc, delta, left_f, right_f)
    for _ in range(0 if is_traced(tau) else MAX_ITERATIONS):
        st = _check(st, h, psi, eps, xp)
        if bool(xp.all(st["done"])):
            break
        st = _advance(st, h, dpsi, dphi, eps, xp)
        column_done = xp.all(st["done"], axis=0)
        num_done = int(xp.sum(xp.astype(column_done, xp.int32)))
        if num_done == int(column_done.shape[0]):
            break
        if 2 * num_done >= int(column_done.shape[0]) and math.prod(delta.shape) >= COMPACT_ELEMENTS:
            # Drop the finished gaps so that the stragglers iterate alone.
            (keep,) = xp.nonzero(~column_done)
            (gone,) = xp.nonzero(column_done)
            finished.append({k: xp.take(v, gone, axis=-1) for k, v in st.items()})
            st = {k: xp.take(v, keep, axis=-1) for k, v in st.items()}
            delta = xp.take(delta, keep, axis=1)
            left_f = xp.take(left_f, keep, axis=0)
            right_f = xp.take(right_f, keep, axis=0)
        h, psi, dpsi, dphi = _evaluate(pc, delta, st["tau"], left_f, right_f, xp)

    if finished:
        finished.append(st)
        st = {k: xp.concat([f[k] for f in finished], axis=-1) for k in st}
        order = xp.argsort(st["column"])
        st = {k: xp.take(v, order, axis=-1) for k, v in st.items()}
    fixed, tau = st["fixed"], st["tau"]
    tau = xp.where(fixed, 0.0, tau)
    eigenvalue = xp.where(fixed, st["dl"], st["origin"] + tau * st["unit"])
    return SecularRoots(eigenvalue, st["origin"], tau, st["unit"], fixed)


#: The entries of the iteration state that change from one iteration to the next.
_MOVING = ("tau", "lo", "hi", "done", "prev_rel", "prev_ok")


def _check(st: dict[str, Array], h: Array, psi: Array, eps: float, xp: Any) -> dict[str, Array]:
    """Shrink the brackets with the sign of h at τ; mark the roots that are done."""
    st = dict(st)
    active = ~st["done"]
    st["lo"] = xp.where(active & (h < 0.0), st["tau"], st["lo"])
    st["hi"] = xp.where(active & (h > 0.0), st["tau"], st["hi"])
    lo, hi = st["lo"], st["hi"]
    at_noise = xp.abs(h) <= NOISE * eps * (h - 2.0 * psi)  # h − 2ψ = Σ|terms|
    narrow = (hi - lo) <= 2.0 * eps * xp.maximum(xp.abs(lo), xp.abs(hi))
    st["done"] = st["done"] | at_noise | narrow
    return st


def _advance(
    st: dict[str, Array], h: Array, dpsi: Array, dphi: Array, eps: float, xp: Any
) -> dict[str, Array]:
    """One rational step (bisection where it leaves the bracket) for the roots not done."""
    st = dict(st)
    lo, hi, tau = st["lo"], st["hi"], st["tau"]
    new, ok = _rational_step(h, dpsi, dphi, tau, st["pole_l"], st["pole_r"], lo, hi, xp)
    new = xp.where(ok, new, _bisect(lo, hi, xp))
    # The iteration converges quadratically, e_next ≈ K e²: with K estimated from
    # the last two steps, a step whose successor would be below rounding is
    # accepted without another evaluation.
    rel = xp.minimum(xp.abs(new - tau) / xp.where(new == 0.0, 1.0, xp.abs(new)), 1.0)
    prev = st["prev_rel"]
    ratio = xp.minimum(rel / xp.where(prev == 0.0, 1.0, prev), 1e10)
    predicted = rel * ratio * ratio
    small = ok & ((rel <= 4.0 * eps) | (st["prev_ok"] & (prev > 0.0) & (predicted <= eps)))
    done = st["done"]
    st["prev_rel"] = xp.where(done, prev, rel)
    st["prev_ok"] = ok
    st["tau"] = xp.where(done, tau, new)
    st["done"] = done | small
    return st


def _implicit(
    tau: Array, fixed: Array, pc: Array, delta: Array, left_f: Array, right_f: Array
) -> Array:
    """τ with the derivative of the root: τ + (s − stop_gradient(s)), s = −h(τ)/h'(τ).

    Its value is τ's; its derivative with respect to the probabilities is the
    implicit function theorem's, −(∂h/∂p)/(∂h/∂τ) at h(τ) = 0 (one Newton step,
    differentiated). The iteration itself runs on constants (``_iterate_traced``):
    differentiating through it would give NaN through its masked branches. Fixed
    roots (ties, zero probabilities) keep derivative 0 in τ.
    """
    import jax  # traced: JAX is what traced it
    import jax.numpy as jnp

    safe = jnp.where(fixed, -1.0, tau)  # fixed roots: a point left of every pole
    h, _, dpsi, dphi = _evaluate(pc, delta, safe, left_f, right_f, jnp)
    step = jnp.where(fixed, 0.0, -h / jnp.where(fixed, 1.0, dpsi + dphi))
    return tau + (step - jax.lax.stop_gradient(step))


def _iterate_traced(
    st: dict[str, Array],
    sums: tuple[Array, Array, Array, Array],
    pc: Array,
    delta: Array,
    left_f: Array,
    right_f: Array,
    eps: float,
) -> dict[str, Array]:
    """The iteration as one ``jax.lax.fori_loop`` of MAX_ITERATIONS steps.

    A fixed count (a ``scan``), not a ``while_loop`` stopping when all are done, so
    that ``jax.grad`` can differentiate through it (reverse mode has no rule for a
    ``while_loop``); converged roots are frozen by the masks.
    """
    import jax  # traced: JAX is what traced it
    import jax.numpy as jnp

    sg = jax.lax.stop_gradient  # the iteration on constants (see _implicit)
    live = {k: v for k, v in st.items() if k not in _MOVING}  # origin, unit: differentiable
    st = {k: sg(v) for k, v in st.items()}
    sums = tuple(sg(a) for a in sums)
    pc, delta = sg(pc), sg(delta)
    fixed = {k: v for k, v in st.items() if k not in _MOVING}

    def body(_: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        moving, (h, psi, dpsi, dphi) = carry
        now = _check({**fixed, **moving}, h, psi, eps, jnp)
        now = _advance(now, h, dpsi, dphi, eps, jnp)
        sums = _evaluate(pc, delta, now["tau"], left_f, right_f, jnp)
        return {k: now[k] for k in _MOVING}, sums

    moving = {k: st[k] for k in _MOVING}
    moving, (h, psi, _, _) = jax.lax.fori_loop(0, MAX_ITERATIONS, body, (moving, sums))
    # The last evaluation's own check, as the eager loop's before it stops.
    final = _check({**fixed, **moving}, h, psi, eps, jnp)
    return {**live, **{k: final[k] for k in _MOVING}}


def _bisect(lo: Array, hi: Array, xp: Any) -> Array:
    """A point inside (lo, hi), geometric when the bracket spans scales.

    So a root next to the origin is reached in O(log log) rather than O(log)
    halvings.
    """
    geometric = (lo > 0.0) & (hi > 4.0 * lo)
    root = xp.sqrt(xp.where(geometric, lo, 1.0)) * xp.sqrt(xp.where(geometric, hi, 1.0))
    toward_zero = (lo == 0.0) & (hi > 0.0)
    return xp.where(geometric, root, xp.where(toward_zero, hi / 16.0, (lo + hi) / 2.0))


def _evaluate(
    pc: Array, delta: Array, tau: Array, left_f: Array, right_f: Array, xp: Any
) -> tuple[Array, Array, Array, Array]:
    """The secular sum h = Σ t_j, t_j = p_j / (δ_j − τ); ψ = Σ_left t_j; ψ', φ' of the two parts.

    ψ' and φ' are the derivatives in τ of the left and right parts of h.
    """
    den = delta - tau[..., None]
    t = pc / den
    t2 = t / den
    return (
        xp.sum(t, axis=-1),
        xp.vecdot(t, left_f),
        xp.vecdot(t2, left_f),
        xp.vecdot(t2, right_f),
    )


def _sqrt_disc(a: Array, b: Array, c: Array, xp: Any) -> Array:
    """√|a² − 4bc| without squaring a (which under- or overflows at extreme scales)."""
    a_safe = xp.where(a == 0.0, 1.0, a)
    ratio = xp.sqrt(xp.abs(1.0 - 4.0 * (b / a_safe) * (c / a_safe)))
    return xp.where(a == 0.0, 2.0 * xp.sqrt(xp.abs(b)) * xp.sqrt(xp.abs(c)), xp.abs(a) * ratio)


def _rational_step(
    h: Array,
    dpsi: Array,
    dphi: Array,
    tau: Array,
    pole_l: Array,
    pole_r: Array,
    lo: Array,
    hi: Array,
    xp: Any,
) -> tuple[Array, Array]:
    """Zero of the two-pole model of h at τ; returns (new τ, whether it is usable).

    The model c + s/(pole_l − x) + S/(pole_r − x) matches h and the derivatives
    of its left part (poles at or left of pole_l) and right part at τ; it is
    exact when only the two gap poles carry weight. Its zero is computed both as
    an increment η from τ (accurate near convergence) and as a position x from
    the origin (accurate when the root is much closer to the origin than τ,
    where τ + η would cancel); a candidate outside the bracket is not usable.
    """
    d_l = pole_l - tau
    d_r = pole_r - tau
    cc = h - dpsi * d_l - dphi * d_r
    # Increment: c η² − a η + b = 0, the root that vanishes with h.
    a = h * (d_l + d_r) - (dpsi + dphi) * d_l * d_r
    b = h * d_l * d_r
    disc = _sqrt_disc(a, b, cc, xp)
    plus = a + disc
    eta_pos = 2.0 * b / xp.where(plus == 0.0, 1.0, plus)
    eta_neg = (a - disc) / xp.where(cc == 0.0, 1.0, 2.0 * cc)
    by_step = tau + xp.where(a > 0.0, eta_pos, eta_neg)
    # Position: c x² − A x + B = 0 with one pole at the origin, so B = s pole_r + S pole_l.
    s_l = dpsi * d_l * d_l
    s_r = dphi * d_r * d_r
    big_a = cc * (pole_l + pole_r) + s_l + s_r
    big_b = s_l * pole_r + s_r * pole_l
    root = _sqrt_disc(big_a, big_b, cc, xp)
    q = big_a + xp.where(big_a >= 0.0, root, -root)
    x_small = 2.0 * big_b / xp.where(q == 0.0, 1.0, q)
    x_large = q / xp.where(cc == 0.0, 1.0, 2.0 * cc)

    def inside(x: Array) -> Array:
        return xp.isfinite(x) & (x > lo) & (x < hi)

    by_position = xp.where(inside(x_small), x_small, x_large)
    step_ok = inside(by_step)
    use_position = inside(by_position) & (~step_ok | (xp.abs(by_step) < 0.5 * xp.abs(tau)))
    new = xp.where(use_position, by_position, by_step)
    return new, step_ok | use_position
