"""Stochastic Lanczos quadrature: spectral densities and tr f(A)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from fisherbound._lib import (
    Estimate,
    RngLike,
    array_namespace,
    as_generator,
    check_finite,
    check_floating,
    check_positive_int,
    estimate_from_samples,
    known_false,
    probes,
    to_host,
)
from fisherbound.linalg._krylov import _Krylov
from fisherbound.linalg._lanczos import _lanczos, _start_vector, _tridiagonal_eigh
from fisherbound.linalg._operator import (
    LinearOperator,
    LinearOperatorLike,
    _as_square_operator,
    is_jax_namespace,
)

if TYPE_CHECKING:  # only for the annotations
    import scipy.sparse.linalg

Array = Any

__all__ = ["Quadrature", "lanczos_quadrature", "slq", "smoothed_density"]


class Quadrature(NamedTuple):
    r"""Gauss quadrature rules of the spectral measure, one per probe.

    Attributes
    ----------
    nodes
        Ritz values, shape (M, m), ascending along each row.
    weights
        :math:`n` times the squared first components of the Ritz vectors, shape (M, m);
        each row sums to :math:`n`, so
        :math:`\sum_j \mathrm{weights}[i, j]\, f(\mathrm{nodes}[i, j])` estimates
        :math:`\operatorname{tr} f(A)`.
    """

    nodes: Array
    weights: Array


def _quadrature(xp: Any, op: Any, *, num_probes: int, num_matvecs: int, gen: Any) -> Quadrature:
    n = int(op.shape[0])
    V = probes(
        gen, (num_probes, n), distribution="rademacher", xp=xp, dtype=op.dtype, device=op.device
    )
    V0 = V / math.sqrt(n)
    alpha, beta, _ = _lanczos(xp, op, V0, min(num_matvecs, n), gen)
    if is_jax_namespace(xp):  # one compiled function
        from fisherbound.linalg._compiled import gauss_rules

        theta, first = gauss_rules(alpha, beta)
        return Quadrature(theta, n * first)
    theta, S = _tridiagonal_eigh(xp, alpha, beta)
    return Quadrature(theta, n * S[:, 0, :] ** 2)


#: SLQ with a target error checks it from this many probes on.
_MIN_PROBES = 4


def _rules_estimate(xp: Any, function: Any, rule: Quadrature) -> Estimate:
    """Tr f(A) from Gauss rules, no product: mean and standard error of Σ_j w_ij f(θ_ij).

    Nodes of zero weight are dropped, so f may be undefined there; f must act
    elementwise (a ValueError otherwise).
    """
    values = function(rule.nodes)
    shape = tuple(getattr(values, "shape", ()))
    if shape != tuple(rule.nodes.shape):
        msg = (
            f"function must return an array of the shape of its input "
            f"{tuple(rule.nodes.shape)} (apply f elementwise); got "
            f"{type(values).__name__} of shape {shape}."
        )
        raise ValueError(msg)
    terms = xp.where(rule.weights == 0, xp.zeros_like(rule.weights), rule.weights * values)
    return estimate_from_samples(xp.sum(terms, axis=1), xp)


def _adaptive_slq(
    xp: Any,
    op: Any,
    function: Callable[[Array], Array],
    *,
    num_probes: int,
    num_matvecs: int,
    target_error: float | None,
    gen: Any,
    first: Quadrature | None = None,
) -> tuple[Estimate, Quadrature]:
    """SLQ of tr f(A) with probes in rounds until the relative standard error is met.

    Rounds of probes (one ``matmat`` of the round's columns per step) after the
    rules in ``first`` (Gauss rules of probes already run, e.g. the start of a
    Lanczos count): first up to 4 probes, then doubling, until
    ``std_error ≤ target_error · |value|`` (checked from 4 probes on: a standard
    error from fewer samples is too erratic to stop on), or ``num_probes`` probes;
    ``target_error=None`` runs them all in one round. Returns the estimate and the
    Gauss rules of every probe used.
    """
    nodes = [] if first is None else [first.nodes]
    weights = [] if first is None else [first.weights]
    done = 0 if first is None else int(first.nodes.shape[0])
    while True:
        if done >= num_probes and done > 0:
            break
        if target_error is None:
            size = num_probes - done
        else:  # at least 4 probes before the first check: 3 sample SEs are too erratic
            size = min(num_probes - done, max(2, done, _MIN_PROBES - done))
        if size > 0:
            quad = _quadrature(xp, op, num_probes=size, num_matvecs=num_matvecs, gen=gen)
            nodes.append(quad.nodes)
            weights.append(quad.weights)
            done += size
        if target_error is None or done >= num_probes or done < _MIN_PROBES:
            continue
        est = _rules_estimate(xp, function, Quadrature(xp.concat(nodes), xp.concat(weights)))
        value, se = (float(to_host(a)) for a in (est.value, est.std_error))
        if se <= target_error * abs(value):
            break
    rule = Quadrature(xp.concat(nodes, axis=0), xp.concat(weights, axis=0))
    return _rules_estimate(xp, function, rule), rule


def _deflated(xp: Any, op: Any, Y: Array) -> LinearOperator:
    """(I − Y Yᵀ) A (I − Y Yᵀ) for orthonormal columns Y (matvec and matmat)."""
    Yt = xp.matrix_transpose(Y)

    def matvec(v: Array) -> Array:
        w = op.matvec(v - Y @ (Yt @ v))
        return w - Y @ (Yt @ w)

    def matmat(V: Array) -> Array:
        W = op.matmat(V - Y @ (Yt @ V))
        return W - Y @ (Yt @ W)

    return LinearOperator(
        op.shape,
        matvec=matvec,
        matmat=matmat,
        dtype=op.dtype,
        device=op.device,
        xp=op.xp,
        symmetric=bool(getattr(op, "symmetric", False)),
    )


def _warn_count_budget(
    budget: int, eps: float, worst: float, tol: float, count: int, *, stacklevel: int
) -> None:
    """The count's RuntimeWarning: the budget reached before the tolerance (both loops)."""
    warnings.warn(
        f"the Lanczos count stopped at its budget of {budget} products before "
        f"the Ritz values above eps = {eps:g} converged (largest relative "
        f"residual {worst:.2e} > tol = {tol:.1e}); the count {count} "
        "may be low. Raise num_matvecs.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _count_above(
    xp: Any,
    op: Any,
    *,
    eps: float,
    max_count: int,
    basis_size: int | None,
    tol: float,
    probe_steps: int,
    gen: Any,
) -> tuple[int | None, Quadrature | None]:
    """#{λ_i(A) > eps} by thick-restart Lanczos with locking; None when above max_count.

    Cauchy interlacing: the i-th largest Ritz value of any Krylov space never
    exceeds λ_i, so max_count + 1 Ritz values above eps PROVE the count exceeds
    max_count, whether or not they have converged: the run stops there. Otherwise it
    goes on until the Ritz pairs above eps and the largest one below it have relative
    residuals ≤ ``tol`` (only those: the rest of the basis need not converge); the
    ones above eps are locked (counted, and deflated: (I − Y Yᵀ) A (I − Y Yᵀ)) and a
    new run from a random vector looks for copies a Krylov space cannot hold
    (repeated eigenvalues), until a run converges with nothing above eps. A basis of
    p = n vectors gives the exact spectrum, multiplicities included.

    A JAX operator with a ``traceable`` product runs each run as one compiled loop on
    the device (``_compiled_count``: the same steps, restarts, locking, random vectors,
    rule and warning; the host reads a few integers per run and per breakdown); the
    others step from Python here.

    The first run starts from a Rademacher probe v/√n; while it has not restarted,
    its first ``probe_steps`` steps are that probe's Lanczos quadrature, returned as
    a one-probe ``Quadrature`` for SLQ to reuse (None when ``probe_steps`` is 0 or
    the run ended before).
    """
    import numpy as np

    n = int(op.shape[0])
    k = max_count + 1
    p = min(n, max(2 * k + 1, 20, probe_steps)) if basis_size is None else min(n, basis_size)
    p = min(n, max(p, min(k + 1, n), probe_steps))
    budget = max(100, 10 * p)
    v = probes(gen, (n,), distribution="rademacher", xp=xp, dtype=op.dtype, device=op.device)
    v = v / math.sqrt(n)
    traceable = getattr(op, "traceable", None)
    if traceable is not None and is_jax_namespace(xp):  # one compiled loop per run
        from fisherbound.linalg._compiled_count import count_above

        found, pair, worst = count_above(
            xp,
            op,
            traceable,
            v,
            gen,
            eps=eps,
            max_count=max_count,
            p=p,
            budget=budget,
            tol=tol,
            probe_steps=probe_steps,
        )
        if worst is not None:
            assert found is not None
            _warn_count_budget(budget, eps, worst, tol, found, stacklevel=3)
        return found, None if pair is None else Quadrature(*pair)
    count = 0
    rule: Quadrature | None = None
    target, basis = op, None
    while True:
        kry = _Krylov(xp, target, v, p, gen)
        proven = False
        while True:
            kry.step()
            j = kry.j
            theta, S, res = kry.ritz()
            # Before any restart T is the probe's tridiagonal: its Gauss rule is SLQ's.
            first_run = basis is None and kry.products == j
            if rule is None and probe_steps and first_run and j == probe_steps:
                nodes = xp.asarray(theta[None, :], dtype=op.dtype, device=op.device)
                w = xp.asarray(n * S[0, :][None, :] ** 2, dtype=op.dtype, device=op.device)
                rule = Quadrature(nodes, w)
            order = np.argsort(theta)[::-1]
            above = int(np.sum(theta > eps))
            if count + above > max_count:
                proven = True
            if proven and (rule is not None or not probe_steps or basis is not None):
                return None, rule
            if proven:
                if kry.products > j or j in (p, n):
                    return None, rule
                continue  # finish the probe's quadrature: these products are reused
            if p == n and j == n:  # the whole space: the exact spectrum
                return count + above, rule
            want = order[: min(above + 1, j)]
            relative = kry.relative_residuals(theta, res, want)
            converged = j > above and bool(np.all(relative <= tol))
            if converged:
                break
            if kry.products >= budget:
                worst = float(np.max(relative))
                _warn_count_budget(budget, eps, worst, tol, count + above, stacklevel=3)
                return count + above, rule
            if j == p:
                kry.thick_restart(S, theta, order, min(above + 1, k))
        if above == 0:
            return count, rule
        Y = kry.vectors(S[:, order[:above]])
        Y = Y if basis is None else xp.concat([basis, Y], axis=1)
        basis, _ = xp.linalg.qr(Y)
        count += above
        if count >= n:
            return count, rule
        target = _deflated(xp, op, basis)
        v = _start_vector(xp, target, None, gen)
        v = v - basis @ (xp.matrix_transpose(basis) @ v)
        v = v / xp.linalg.vector_norm(v)


def lanczos_quadrature(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    num_probes: int,
    num_matvecs: int,
    rng: RngLike = None,
) -> Quadrature:
    r"""Gauss quadrature nodes and weights of :math:`A`'s spectral measure (Ubaru, Chen, Saad 2017).

    For each Rademacher probe :math:`v` (:math:`\lVert v \rVert^2 = n`), :math:`m` Lanczos
    steps from :math:`v/\sqrt{n}` give :math:`T = S \operatorname{diag}(\theta) S^\top`, and
    the :math:`m`-point Gauss rule

    .. math::

       v^\top f(A)\, v \approx \sum_{j=1}^m n\, S_{1j}^2 f(\theta_j),

    exact for polynomials of degree :math:`\le 2m - 1` (so exact for every :math:`f` when
    :math:`m = n`). Averaged over probes this estimates :math:`\operatorname{tr} f(A)`; the
    nodes and weights themselves are a discrete estimate of the spectral density
    :math:`\frac1n \sum_i \delta(t - \lambda_i)` (see ``smoothed_density``). When a run
    breaks down (the Krylov space of :math:`v` is invariant), the remaining nodes are
    Ritz values of
    restarted blocks and carry zero weight (to rounding).

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array.
    num_probes
        :math:`M \ge 1` Rademacher probes (all :math:`M` run at once: one ``matmat`` of
        :math:`M` columns per step).
    num_matvecs
        Lanczos steps per probe, :math:`m = \min(\mathrm{num\_matvecs}, n)`.
    rng
        Generator, int seed, JAX key or None. The probes are the ones ``hutchinson_trace``
        draws with the same seed.

    Returns
    -------
    Quadrature
        ``nodes`` and ``weights``, shape (M, m); each row of weights sums to :math:`n`.

    Notes
    -----
    Cost: :math:`M m` matvecs (:math:`m` ``matmat`` calls of :math:`M` columns),
    :math:`O(n M m^2)` work and :math:`n M m` memory for the :math:`M` bases.

    Examples
    --------
    >>> import numpy as np
    >>> quad = lanczos_quadrature(np.diag([1.0, 2.0, 3.0]), num_probes=2,
    ...                           num_matvecs=3, rng=0)
    >>> np.round(quad.nodes, 10).tolist(), np.round(quad.weights.sum(axis=1), 10).tolist()
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [3.0, 3.0])
    """
    op, xp = _as_square_operator(A)
    M = check_positive_int(num_probes, "num_probes")
    m = check_positive_int(num_matvecs, "num_matvecs")
    gen = as_generator(rng)
    return _quadrature(xp, op, num_probes=M, num_matvecs=m, gen=gen)


def slq(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    function: Any,
    *,
    num_probes: int,
    num_matvecs: int,
    rng: RngLike = None,
) -> Estimate:
    r"""Stochastic Lanczos quadrature estimate of :math:`\operatorname{tr} f(A)`.

    .. math::

       \widehat{\operatorname{tr} f(A)} = \frac1M \sum_{i=1}^M
       \sum_{j=1}^m w_{ij} f(\theta_{ij}),

    with the nodes :math:`\theta` and weights :math:`w` of ``lanczos_quadrature``. Each
    probe's term is the Gauss-rule value of :math:`v_i^\top f(A)\, v_i`, so the estimate
    has the Hutchinson variance (Rademacher: :math:`2 \sum_{j \ne k} f(A)_{jk}^2`) plus the
    quadrature error, which vanishes for polynomials of degree :math:`< 2m` and for
    every :math:`f` when :math:`m = n`.
    ``std_error`` is the sample standard deviation over probes divided by :math:`\sqrt{M}`.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array.
    function
        :math:`f`, applied elementwise to an array of Ritz values of :math:`A`'s namespace,
        e.g. ``lambda t: xp.log(t)`` for :math:`\log \det` of an SPD :math:`A` or
        ``lambda t: xp.log1p(s2 * t)`` for the razor's
        :math:`\sum \log(1 + \sigma^2 \lambda)`. Nodes with weight exactly zero are
        dropped, so :math:`f` may be undefined there.
    num_probes, num_matvecs, rng
        As in ``lanczos_quadrature``.

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error``, ``num_probes`` :math:`= M`.

    Notes
    -----
    Cost: as ``lanczos_quadrature`` (:math:`M m` matvecs) plus one call of ``function``
    on an (M, m) array.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([1.0, 2.0, 4.0])
    >>> est = slq(A, np.log, num_probes=3, num_matvecs=3, rng=0)
    >>> round(float(est.value), 10) == round(float(np.log(8.0)), 10)
    True
    """
    op, xp = _as_square_operator(A)
    if not callable(function):
        msg = (
            f"function must be callable (an elementwise f of an array of Ritz values); "
            f"got {type(function).__name__}."
        )
        raise TypeError(msg)
    M = check_positive_int(num_probes, "num_probes")
    m = check_positive_int(num_matvecs, "num_matvecs")
    gen = as_generator(rng)
    rule = _quadrature(xp, op, num_probes=M, num_matvecs=m, gen=gen)
    return _rules_estimate(xp, function, rule)


def smoothed_density(
    quadrature: Quadrature, grid: Array, /, *, width: float, lower: float | None = None
) -> Array:
    r"""The Gaussian-smoothed spectral density of a ``Quadrature`` on a grid.

    .. math::

       \varphi(t) = \frac{1}{M n} \sum_{i=1}^M \sum_{j=1}^m w_{ij}\,
       \mathcal N(t;\, \theta_{ij}, \sigma^2),

    an estimate of the spectral density :math:`\frac1n \sum_k \delta(t - \lambda_k)`
    blurred by a Gaussian of standard deviation :math:`\sigma =` ``width``. It integrates
    to 1 over the real line (normalised by :math:`\sum w`, which is :math:`M n` to
    rounding).

    With ``lower = a``, the known lower end of the spectrum (0 for a positive
    semi-definite matrix such as a Fisher metric), each Gaussian is reflected at
    :math:`a`:

    .. math::

       \varphi_a(t) = \frac{1}{M n} \sum_{ij} w_{ij} \left[
       \mathcal N(t;\, \theta_{ij}, \sigma^2)
       + \mathcal N(t;\, 2a - \theta_{ij}, \sigma^2)\right] \ (t \ge a),
       \qquad \varphi_a(t) = 0 \ (t < a),

    the boundary-corrected kernel estimate: no mass below :math:`a` (the plain density
    puts up to half the mass of the eigenvalues near :math:`a` there), and
    :math:`\varphi_a` still integrates to 1 over :math:`[a, \infty)`. Nodes below
    :math:`a` by rounding (by at most :math:`\max(\text{1e-8}, 64 \varepsilon)` times the
    largest node in absolute value, :math:`\varepsilon` the nodes' machine epsilon)
    are taken as :math:`a`; a node further below means the spectrum is not bounded by
    :math:`a`, a ValueError.

    Parameters
    ----------
    quadrature
        A ``Quadrature`` (nodes, weights) of shape (M, m).
    grid
        1-D floating array of finite points :math:`t`, same namespace as the quadrature.
    width
        :math:`\sigma > 0`; choose it about the spacing of the features you want to
        resolve.
    lower
        None (default): the plain density on the real line. A number :math:`a`: the
        spectrum's known lower end, the density reflected there (above).

    Returns
    -------
    Array
        :math:`\varphi` on the grid, shape (G,).

    Notes
    -----
    Cost: :math:`O(G M m)` work and memory, no matvec.

    Examples
    --------
    >>> import numpy as np
    >>> quad = lanczos_quadrature(np.diag([0.0, 1.0]), num_probes=1, num_matvecs=2, rng=0)
    >>> t = np.linspace(-3.0, 4.0, 2001)
    >>> phi = smoothed_density(quad, t, width=0.2)
    >>> round(float(np.sum(phi) * (t[1] - t[0])), 6)
    1.0
    >>> t0 = np.linspace(0.0, 4.0, 2001)  # the support of a PSD matrix's spectrum
    >>> phi0 = smoothed_density(quad, t0, width=0.2, lower=0.0)
    >>> round(float(np.sum(phi0) * (t0[1] - t0[0])), 2)  # all the mass above 0
    1.0
    """
    if not isinstance(quadrature, tuple) or len(quadrature) != 2:
        msg = (
            "quadrature must be a Quadrature (nodes, weights) as returned by "
            f"lanczos_quadrature; got {type(quadrature).__name__}."
        )
        raise TypeError(msg)
    nodes, weights = quadrature
    xp = array_namespace(
        nodes, weights, grid, names=("quadrature.nodes", "quadrature.weights", "grid")
    )
    if tuple(nodes.shape) != tuple(weights.shape):
        msg = (
            f"quadrature.nodes and quadrature.weights must have the same shape; got "
            f"{tuple(nodes.shape)} and {tuple(weights.shape)}."
        )
        raise ValueError(msg)
    check_floating(grid, "grid", xp=xp)
    if grid.ndim != 1:
        msg = f"grid must be a 1-D array of points; got shape {tuple(grid.shape)}."
        raise ValueError(msg)
    if isinstance(width, bool) or not isinstance(width, int | float):
        msg = f"width must be a positive real number; got {type(width).__name__}."
        raise TypeError(msg)
    if not (0.0 < float(width) < math.inf):
        msg = (
            "width must be a positive finite number (the smoothing standard deviation); "
            f"got {width}."
        )
        raise ValueError(msg)
    sigma = float(width)
    if lower is not None and (
        isinstance(lower, bool) or not isinstance(lower, int | float) or not math.isfinite(lower)
    ):
        msg = (
            "lower must be None or a finite real number (the spectrum's lower end, 0 for a "
            f"positive semi-definite matrix); got {type(lower).__name__} {lower!r}."
        )
        raise (ValueError if isinstance(lower, int | float) else TypeError)(msg)
    check_finite(grid, "grid", xp=xp)
    check_finite(nodes, "quadrature.nodes", xp=xp)
    check_finite(weights, "quadrature.weights", xp=xp)
    theta = xp.reshape(xp.astype(nodes, grid.dtype), (1, -1))
    w = xp.reshape(xp.astype(weights, grid.dtype), (1, -1))
    norm = sigma * math.sqrt(2.0 * math.pi)
    z = (grid[:, None] - theta) / sigma
    kernel = xp.exp(-0.5 * z * z) / norm
    if lower is not None:
        a = float(lower)
        scale = float(xp.max(xp.abs(theta))) if theta.shape[1] else 0.0
        deepest = float(xp.min(theta)) if theta.shape[1] else a
        slack = max(1e-8, 64.0 * float(xp.finfo(nodes.dtype).eps))  # float32 Ritz values
        if deepest < a - slack * max(scale, abs(a)):
            msg = (
                f"lower = {a!r} must bound the spectrum from below; got a quadrature node "
                f"{deepest!r} below it: the matrix is not bounded below by lower (not "
                "positive semi-definite for lower = 0). Pass lower=None for the plain "
                "density."
            )
            raise ValueError(msg)
        theta = xp.where(theta < a, xp.full_like(theta, a), theta)
        z = (grid[:, None] - theta) / sigma
        mirror = (grid[:, None] + theta - 2.0 * a) / sigma
        kernel = (xp.exp(-0.5 * z * z) + xp.exp(-0.5 * mirror * mirror)) / norm
        kernel = xp.where(grid[:, None] >= a, kernel, xp.zeros_like(kernel))
    phi = xp.sum(kernel * w, axis=1) / xp.sum(w)
    if known_false(xp.all(xp.isfinite(phi))):
        msg = (
            f"the smoothed density must be finite; got NaN or inf in {grid.dtype} with "
            f"width = {width!r} and quadrature weights summing to {float(xp.sum(w))!r}: "
            "width is below the dtype's range (1 / width overflows) or the weights sum "
            "to 0. Use a larger width, float64, or the weights of lanczos_quadrature."
        )
        raise ValueError(msg)
    return phi
