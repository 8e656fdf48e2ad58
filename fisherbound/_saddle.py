"""Saddle probabilities: how a random projection of a quadratic form looks (THEORY §6).

The implementation of ``fisherbound.landscape.saddle_probability`` (closed forms,
Imhof's integral, Monte Carlo), split from ``landscape`` by job; the public names
are re-exported there.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fisherbound._lib import (
    RngLike,
    as_generator,
    check_choice,
    check_finite,
    check_positive_int,
    check_vector,
    device_of,
    is_traced,
    probes,
)

Array = Any

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "MAX_ENTRIES",
    "SADDLE_METHODS",
    "SaddleProbability",
    "saddle_probability",
]

#: ``saddle_probability`` methods.
SADDLE_METHODS = ("exact", "monte_carlo")

#: Default number of Monte-Carlo samples of ``saddle_probability``.
DEFAULT_NUM_SAMPLES = 10_000
#: Entries of (shifts × D) formed at once by ``surface`` and the Monte Carlo.
MAX_ENTRIES = 2**22
#: Step of the trapezoidal rule of Imhof's integral in s = log u (see ``_imhof``).
_IMHOF_STEP = 0.1


class SaddleProbability(NamedTuple):
    r"""Probabilities that a random projection shows a minimum, a maximum or a saddle.

    0-d arrays in the eigenvalues' namespace. The three add up to 1 unless the
    projection is degenerate (singular) with positive probability, which happens
    only when :math:`H` has fewer than ``dim`` nonzero eigenvalues. A Monte-Carlo value
    :math:`p` has the binomial standard error
    :math:`\sqrt{p (1 - p) / \mathrm{num\_samples}}`.
    """

    minimum: Array
    maximum: Array
    saddle: Array


# --------------------------------------------------------------------------- #
# saddle probabilities


def saddle_probability(
    hessian_eigenvalues: Array,
    /,
    *,
    dim: int = 1,
    method: str = "exact",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    rng: RngLike = None,
) -> SaddleProbability:
    r"""How often a random ``dim``-dimensional projection of H looks like a min, max or saddle.

    A uniformly random ``dim``-dimensional subspace (the span of ``dim`` Gaussian
    directions) shows :math:`H` through the ``dim`` :math:`\times` ``dim`` matrix
    :math:`G^\top H G`, which is
    positive definite (a minimum), negative definite (a maximum) or indefinite
    (a saddle). For ``dim = 1`` "saddle" is 0 and "minimum" is
    :math:`P(\eta^\top H \eta > 0)`. THEORY §6 for :math:`H = \operatorname{diag}(a, a, -c)`:
    one direction looks convex with probability :math:`\sqrt{a / (a + c)}`; a random
    plane in :math:`\mathbb{R}^3` shows a saddle with probability
    :math:`\sqrt{c / (a + c)}`, a minimum with :math:`1 - \sqrt{c / (a + c)}`, a maximum
    never.

    ``method="exact"`` covers:

    - ``dim = 1``, any spectrum: :math:`P(\sum_i \kappa_i g_i^2 > 0)` by Imhof's (1961)
      inversion formula, :math:`P = \frac12 + \frac1\pi \int_0^\infty
      \sin(\tfrac12 \sum_i \arctan \kappa_i u)
      / (u \prod_i (1 + \kappa_i^2 u^2)^{1/4})\, du`,
      evaluated by the trapezoidal rule in :math:`s = \log u` (exponentially
      convergent);
    - ``dim = D``: Sylvester's law of inertia (the answer is certain);
    - ``dim = D − 1``, no zero eigenvalue: a hyperplane with normal :math:`n` (uniform on
      the sphere) keeps :math:`H`'s inertia minus one positive or one negative eigenvalue
      (interlacing); it loses a negative one exactly when
      :math:`\det(G^\top H G) \propto \sum_j (\prod_{i \ne j} \kappa_i)\, n_j^2` has the sign
      :math:`(-1)^{q-1}` (:math:`q` negative eigenvalues), i.e. when
      :math:`\sum_j n_j^2 / \kappa_j < 0`: the ``dim = 1`` problem of :math:`H^{-1}`.

    Other cases need ``method="monte_carlo"``: ``num_samples`` Gaussian
    :math:`D \times \mathrm{dim}` matrices :math:`G`, classified by the eigenvalues of
    :math:`G^\top H G` (those within rounding of zero count as degenerate); each
    probability :math:`p` has the binomial standard error
    :math:`\sqrt{p (1 - p) / \mathrm{num\_samples}}`.

    Parameters
    ----------
    hessian_eigenvalues
        :math:`\kappa`, a 1-D real floating array (D,), finite (any namespace and device).
    dim
        The dimension of the projection, :math:`1 \le \mathrm{dim} \le D`.
    method
        ``"exact"`` or ``"monte_carlo"``.
    num_samples
        Monte-Carlo samples (:math:`\ge 1`).
    rng
        numpy Generator, int seed, JAX key or None (Monte Carlo).

    Returns
    -------
    SaddleProbability
        ``(minimum, maximum, saddle)``, 0-d arrays in :math:`\kappa`'s namespace and dtype.

    Notes
    -----
    Cost: exact, :math:`O(D)` per node of about 2000 quadrature nodes; Monte Carlo,
    :math:`O(\mathrm{num\_samples} \cdot D \cdot \mathrm{dim}^2)` (chunked so that at most
    4M numbers are held).

    Examples
    --------
    >>> import numpy as np
    >>> p = saddle_probability(np.array([1.0, 1.0, -1.0]))
    >>> round(float(p.minimum), 10) == round(2**-0.5, 10)
    True
    >>> p = saddle_probability(np.array([1.0, 1.0, -1.0]), dim=2)
    >>> round(float(p.saddle), 10) == round(2**-0.5, 10), float(p.maximum)
    (True, 0.0)
    """
    kappa = hessian_eigenvalues
    xp = check_vector(kappa, "hessian_eigenvalues", "a non-empty 1-D array of eigenvalues (D,)")
    check_finite(kappa, "hessian_eigenvalues", xp=xp)
    d = int(kappa.shape[0])
    k = check_positive_int(dim, "dim")
    if k > d:
        msg = (
            f"dim must be at most D = {d}, the number of eigenvalues (a {k}-dimensional "
            f"subspace of R^{d} does not exist); got dim = {k}."
        )
        raise ValueError(msg)
    method = check_choice(method, "method", SADDLE_METHODS)
    n = check_positive_int(num_samples, "num_samples")
    if method == "exact":
        if is_traced(kappa):
            msg = (
                "saddle_probability(method='exact') reads the signs of "
                "hessian_eigenvalues on the host (they choose its formula and its "
                "integration grid), which values traced by JAX (inside jax.jit) cannot "
                "give. Call it outside jit, or use method='monte_carlo'."
            )
            raise ValueError(msg)
        return _saddle_exact(xp, kappa, k)
    return _saddle_monte_carlo(xp, kappa, k, n, as_generator(rng))


def _as_probability(xp: Any, value: Any, like: Array) -> Array:
    """A float or a 0-d array as a 0-d array like ``like``, clipped to [0, 1]."""
    return xp.clip(xp.asarray(value, dtype=like.dtype, device=device_of(like)), 0.0, 1.0)


def _saddle_exact(xp: Any, kappa: Array, k: int) -> SaddleProbability:
    d = int(kappa.shape[0])
    pos = int(xp.sum(xp.astype(kappa > 0.0, xp.int32)))
    neg = int(xp.sum(xp.astype(kappa < 0.0, xp.int32)))
    zeros = d - pos - neg

    def result(mn: Any, mx: Any, sd: Any) -> SaddleProbability:
        return SaddleProbability(
            _as_probability(xp, mn, kappa),
            _as_probability(xp, mx, kappa),
            _as_probability(xp, sd, kappa),
        )

    if k == 1:
        if pos == 0 or neg == 0:
            return result(float(pos > 0), float(neg > 0), 0.0)
        p = _imhof_positive(xp, kappa[kappa != 0.0])
        return result(p, 1.0 - p, 0.0)
    if k == d:
        if zeros > 0:
            return result(0.0, 0.0, 0.0)
        return result(float(neg == 0), float(pos == 0), float(pos > 0 and neg > 0))
    if k != d - 1:
        msg = (
            "method='exact' has closed forms for dim = 1, dim = D − 1 and dim = D only "
            f"(here D = {d}); got dim = {k}. Use method='monte_carlo'."
        )
        raise ValueError(msg)
    if zeros > 0:
        msg = (
            f"method='exact' with dim = D − 1 = {k} needs nonzero eigenvalues; got "
            f"{zeros} zero(s). Use method='monte_carlo'."
        )
        raise ValueError(msg)
    if neg == 0 or pos == 0:
        return result(float(neg == 0), float(pos == 0), 0.0)
    lost_negative = 1.0 - _imhof_positive(xp, 1.0 / kappa)
    mn = lost_negative if neg == 1 else 0.0
    mx = 1.0 - lost_negative if pos == 1 else 0.0
    sd = 1.0 - (mn if neg == 1 else 0.0) - (mx if pos == 1 else 0.0)
    return result(mn, mx, sd)


def _softplus(xp: Any, x: Array) -> Array:
    return xp.maximum(x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def _imhof_positive(xp: Any, kappa: Array) -> Array:
    """P(Σ_i κ_i g_i² > 0) for nonzero κ of both signs (Imhof 1961), 0-d.

    With u = e^s and κ scaled to max |κ_i| = 1 (the sign is scale-free),
    P = ½ + (1/π) ∫_ℝ sin(φ(s)) e^{−ρ(s)} ds with φ = ½ Σ_i sign(κ_i) arctan(e^{t_i}),
    ρ = ¼ Σ_i log(1 + e^{2 t_i}), t_i = s + log|κ_i|. The integrand is analytic in
    the strip |Im s| < π/2, so the trapezoidal rule converges geometrically: step
    0.1 leaves an error below e^{−π²/0.2} ≈ 4e−22 (relative). The range: below
    s_lo = −40 − log(½ Σ|κ_i|) the integrand is at most ½ Σ|κ_i| e^s (tail ≤ e^{−40});
    above the s_hi where ρ = 40, ρ grows at rate ≥ ¼ (tail ≤ 4 e^{−40}).
    """
    a = xp.abs(kappa)
    a = a / xp.max(a)
    sign = xp.sign(kappa)
    log_a = xp.log(a)
    n = int(kappa.shape[0])
    lo = -40.0 - math.log(0.5 * float(xp.sum(a)))

    def rho(s: float) -> float:
        return float(0.25 * xp.sum(_softplus(xp, 2.0 * (log_a + s))))

    left, right = lo, 80.0  # ρ(s) ≥ s/2 for s ≥ 0, so ρ(80) ≥ 40
    for _ in range(60):
        mid = 0.5 * (left + right)
        if rho(mid) >= 40.0:
            right = mid
        else:
            left = mid
    hi = right
    g = max(3, int(math.ceil((hi - lo) / _IMHOF_STEP)) + 1)
    step = (hi - lo) / (g - 1)
    chunk = max(1, MAX_ENTRIES // n)
    total: Any = None
    for start in range(0, g, chunk):
        stop = min(g, start + chunk)
        idx = xp.arange(start, stop, dtype=kappa.dtype, device=device_of(kappa))
        t = (lo + step * idx)[:, None] + log_a[None, :]
        phase = 0.5 * xp.sum(sign * xp.atan(xp.exp(xp.clip(t, max=40.0))), axis=1)
        log_rho = 0.25 * xp.sum(_softplus(xp, 2.0 * t), axis=1)
        f = xp.sin(phase) * xp.exp(-log_rho)
        # Trapezoidal end weights ½ at the two outermost nodes.
        ones = xp.ones_like(idx)
        w = xp.where((idx == 0.0) | (idx == float(g - 1)), 0.5 * ones, ones)
        part = xp.sum(w * f)
        total = part if total is None else total + part
    return 0.5 + step * total / math.pi


def _saddle_monte_carlo(xp: Any, kappa: Array, k: int, n: int, gen: Any) -> SaddleProbability:
    d = int(kappa.shape[0])
    dtype, device = kappa.dtype, device_of(kappa)
    eps = float(xp.finfo(dtype).eps)
    chunk = max(1, MAX_ENTRIES // (d * k))
    counts = [xp.asarray(0.0, dtype=dtype, device=device) for _ in range(3)]
    left = n
    while left > 0:
        size = min(chunk, left)
        G = probes(gen, (size, d, k), distribution="gaussian", xp=xp, dtype=dtype, device=device)
        # The rounding scale of GᵀHG: Σ_i |κ_i| ‖G_i‖².
        scale = xp.sum(xp.abs(kappa)[None, :] * xp.sum(G * G, axis=2), axis=1)
        tol = 8.0 * (d + k) * eps * scale
        if k == 1:
            ev = xp.sum(kappa[None, :] * G[:, :, 0] ** 2, axis=1)[:, None]
        else:
            M = xp.matmul(xp.matrix_transpose(G), kappa[:, None] * G)
            ev = xp.linalg.eigvalsh(0.5 * (M + xp.matrix_transpose(M)))
        up = ev > tol[:, None]
        down = ev < -tol[:, None]
        flags = [
            xp.all(up, axis=1),
            xp.all(down, axis=1),
            xp.any(up, axis=1) & xp.any(down, axis=1),
        ]
        counts = [c + xp.sum(xp.astype(f, dtype)) for c, f in zip(counts, flags, strict=True)]
        left -= size
    return SaddleProbability(*(c / float(n) for c in counts))
