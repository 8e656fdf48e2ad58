"""Stochastic Lanczos quadrature: spectral densities and tr f(A)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fisherbound._lib import (
    Estimate,
    array_namespace,
    as_generator,
    check_floating,
    check_positive_int,
    estimate_from_samples,
    probes,
)
from fisherbound.linalg._lanczos import _lanczos, _tridiagonal_eigh
from fisherbound.linalg._operator import _as_square_operator

Array = Any

__all__ = ["Quadrature", "lanczos_quadrature", "slq", "smoothed_density"]


class Quadrature(NamedTuple):
    """Gauss quadrature rules of the spectral measure, one per probe.

    Attributes
    ----------
    nodes
        Ritz values, shape (M, m), ascending along each row.
    weights
        n times the squared first components of the Ritz vectors, shape (M, m);
        each row sums to n, so Σ_j weights[i, j] f(nodes[i, j]) estimates tr f(A).
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
    theta, S = _tridiagonal_eigh(xp, alpha, beta)
    return Quadrature(theta, n * S[:, 0, :] ** 2)


def lanczos_quadrature(
    A: Any,
    /,
    *,
    num_probes: int,
    num_matvecs: int,
    rng: Any = None,
) -> Quadrature:
    r"""Gauss quadrature nodes and weights of A's spectral measure (Ubaru, Chen, Saad 2017).

    For each Rademacher probe v (‖v‖² = n), m Lanczos steps from v/√n give
    T = S diag(θ) Sᵀ, and the m-point Gauss rule

    .. math:: v^\top f(A)\, v \approx \sum_{j=1}^m n\, S_{1j}^2 f(\theta_j),

    exact for polynomials of degree ≤ 2m − 1 (so exact for every f when m = n).
    Averaged over probes this estimates tr f(A); the nodes and weights
    themselves are a discrete estimate of the spectral density
    (1/n) Σ_i δ(t − λ_i) (see ``smoothed_density``). When a run breaks down (the
    Krylov space of v is invariant), the remaining nodes are Ritz values of
    restarted blocks and carry zero weight (to rounding).

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array.
    num_probes
        M ≥ 1 Rademacher probes (all M run at once: one ``matmat`` of M columns
        per step).
    num_matvecs
        Lanczos steps per probe, m = min(num_matvecs, n).
    rng
        Generator, int seed or None. The probes are the ones ``hutchinson_trace``
        draws with the same seed.

    Returns
    -------
    Quadrature
        ``nodes`` and ``weights``, shape (M, m); each row of weights sums to n.

    Notes
    -----
    Cost: M m matvecs (m ``matmat`` calls of M columns), O(n M m²) work and
    n M m memory for the M bases.

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
    A: Any,
    /,
    function: Any,
    *,
    num_probes: int,
    num_matvecs: int,
    rng: Any = None,
) -> Estimate:
    r"""Stochastic Lanczos quadrature estimate of tr f(A).

    .. math:: \widehat{\operatorname{tr} f(A)} = \frac1M \sum_{i=1}^M
              \sum_{j=1}^m w_{ij} f(\theta_{ij}),

    with the nodes θ and weights w of ``lanczos_quadrature``. Each probe's term
    is the Gauss-rule value of v_iᵀ f(A) v_i, so the estimate has the Hutchinson
    variance (Rademacher: 2 Σ_{j≠k} f(A)_jk²) plus the quadrature error, which
    vanishes for polynomials of degree < 2m and for every f when m = n.
    ``std_error`` is the sample standard deviation over probes divided by √M.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array.
    function
        f, applied elementwise to an array of Ritz values of A's namespace, e.g.
        ``lambda t: xp.log(t)`` for log det of an SPD A or
        ``lambda t: xp.log1p(s2 * t)`` for the razor's Σ log(1 + σ² λ). Nodes with
        weight exactly zero are dropped, so f may be undefined there.
    num_probes, num_matvecs, rng
        As in ``lanczos_quadrature``.

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error``, ``num_probes`` = M.

    Notes
    -----
    Cost: as ``lanczos_quadrature`` (M m matvecs) plus one call of ``function``
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
    nodes, weights = _quadrature(xp, op, num_probes=M, num_matvecs=m, gen=gen)
    values = function(nodes)
    shape = tuple(getattr(values, "shape", ()))
    if shape != tuple(nodes.shape):
        msg = (
            f"function must return an array of the shape of its input {tuple(nodes.shape)} "
            f"(apply f elementwise); got {type(values).__name__} of shape {shape}."
        )
        raise ValueError(msg)
    terms = xp.where(weights == 0, xp.zeros_like(weights), weights * values)
    return estimate_from_samples(xp.sum(terms, axis=1), xp)


def smoothed_density(quadrature: Any, grid: Array, /, *, width: float) -> Array:
    r"""The Gaussian-smoothed spectral density of a ``Quadrature`` on a grid.

    .. math:: \varphi(t) = \frac{1}{M n} \sum_{i=1}^M \sum_{j=1}^m w_{ij}\,
              \mathcal N(t;\, \theta_{ij}, \sigma^2),

    an estimate of the spectral density (1/n) Σ_k δ(t − λ_k) blurred by a
    Gaussian of standard deviation σ = ``width``. It integrates to 1 over the
    real line (normalised by Σ w, which is M n to rounding).

    Parameters
    ----------
    quadrature
        A ``Quadrature`` (nodes, weights) of shape (M, m).
    grid
        1-D floating array of points t, same namespace as the quadrature.
    width
        σ > 0; choose it about the spacing of the features you want to resolve.

    Returns
    -------
    Array
        φ on the grid, shape (G,).

    Notes
    -----
    Cost: O(G M m) work and memory, no matvec.

    Examples
    --------
    >>> import numpy as np
    >>> quad = lanczos_quadrature(np.diag([0.0, 1.0]), num_probes=1, num_matvecs=2, rng=0)
    >>> t = np.linspace(-3.0, 4.0, 2001)
    >>> phi = smoothed_density(quad, t, width=0.2)
    >>> round(float(np.sum(phi) * (t[1] - t[0])), 6)
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
    theta = xp.reshape(xp.astype(nodes, grid.dtype), (1, -1))
    w = xp.reshape(xp.astype(weights, grid.dtype), (1, -1))
    z = (grid[:, None] - theta) / sigma
    kernel = xp.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))
    return xp.sum(kernel * w, axis=1) / xp.sum(w)
