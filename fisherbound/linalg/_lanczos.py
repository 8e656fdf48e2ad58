"""Symmetric Lanczos with full reorthogonalisation, and extreme eigenpairs."""

from __future__ import annotations

from typing import Any, NamedTuple

from fisherbound._lib import (
    array_namespace,
    as_generator,
    check_choice,
    check_floating,
    check_positive_int,
    device_of,
    probes,
    to_host,
)
from fisherbound.linalg._operator import _as_square_operator

Array = Any

__all__ = ["EigshResult", "LanczosResult", "eigsh", "lanczos"]

WHICH = ("largest", "smallest", "both")


class LanczosResult(NamedTuple):
    """The Lanczos decomposition Qᵀ A Q = T of a symmetric operator.

    Attributes
    ----------
    alpha
        Diagonal of the tridiagonal T, shape (m,).
    beta
        Off-diagonal of T, shape (m − 1,); an exact 0 marks a breakdown (an
        invariant subspace was found) followed by a random restart.
    basis
        Q, shape (n, m), orthonormal columns.
    """

    alpha: Array
    beta: Array
    basis: Array


class EigshResult(NamedTuple):
    """Ritz approximations of extreme eigenpairs.

    Attributes
    ----------
    eigenvalues
        Ritz values θ, shape (k',), ascending.
    eigenvectors
        Ritz vectors y, shape (n, k'), unit columns, in the order of ``eigenvalues``.
    residuals
        ‖A y − θ y‖ per pair, shape (k',), computed explicitly with one ``matmat``
        (for symmetric A some eigenvalue lies within this distance of θ).
    """

    eigenvalues: Array
    eigenvectors: Array
    residuals: Array


def _orthogonalize(xp: Any, Q: Array, W: Array) -> Array:
    """Remove from each row of W (B, n) its component in span(Q[b]) (B, n, j).

    Classical Gram–Schmidt applied twice ("twice is enough"): one pass loses
    orthogonality in proportion to the condition of [Q, w]; the second restores
    it to rounding level.
    """
    Wc = W[:, :, None]
    Qt = xp.matrix_transpose(Q)
    for _ in range(2):
        Wc = Wc - Q @ (Qt @ Wc)
    return Wc[:, :, 0]


def _breakdown_factor(xp: Any, dtype: Any, n: int) -> float:
    """The relative breakdown tolerance: β ≤ eps · clip(n, 10, eps^(-1/2)) · ‖T‖.

    n · eps · ‖T‖ is the size of the rounding noise left in A q − α q − β q' after a
    true breakdown; the cap at √eps keeps a large float32 problem from mistaking a
    small but genuine β for noise.
    """
    eps = float(xp.finfo(dtype).eps)
    return eps * min(max(n, 10), eps**-0.5)


def _lanczos(xp: Any, op: Any, V0: Array, m: int, gen: Any) -> tuple[Array, Array, Array]:
    """B independent Lanczos runs at once, one ``matmat`` of B columns per step.

    ``V0`` (B, n) holds unit starting vectors. Returns alpha (B, m), beta
    (B, m − 1) and the bases Q (B, n, m). A run that breaks down (β below the
    tolerance) records β = 0 and restarts with a Gaussian vector orthogonalised
    against its basis, so an invariant subspace never ends the run early and
    repeated eigenvalues are found with their multiplicity.
    """
    B, n = (int(s) for s in V0.shape)
    dtype, device = op.dtype, op.device
    factor = _breakdown_factor(xp, dtype, n)
    zeros = xp.zeros((B,), dtype=dtype, device=device)
    columns = xp.arange(m, device=device)
    # The basis is held at its final shape (B, n, m), unfilled columns zero: every
    # step then works on arrays of one shape (JAX compiles each operation once,
    # not once per step) and zero columns do not affect the Gram-Schmidt passes.
    Q = V0[:, :, None] * xp.astype(columns == 0, dtype)
    q, q_prev, beta_prev, norm_t = V0, xp.zeros_like(V0), zeros, zeros
    alphas: list[Array] = []
    betas: list[Array] = []
    for j in range(m):
        w = xp.matrix_transpose(op.matmat(xp.matrix_transpose(q)))
        a = xp.sum(q * w, axis=1)
        alphas.append(a)
        if j == m - 1:
            break
        w = w - a[:, None] * q - beta_prev[:, None] * q_prev
        w = _orthogonalize(xp, Q, w)
        b = xp.linalg.vector_norm(w, axis=1)
        norm_t = xp.maximum(norm_t, xp.abs(a) + beta_prev + b)
        broke = b <= factor * norm_t
        if bool(to_host(xp.any(broke))):
            r = probes(gen, (B, n), distribution="gaussian", xp=xp, dtype=dtype, device=device)
            r = _orthogonalize(xp, Q, r)
            r = r / xp.linalg.vector_norm(r, axis=1)[:, None]
            safe = xp.where(broke, xp.ones_like(b), b)
            q_next = xp.where(broke[:, None], r, w / safe[:, None])
            b = xp.where(broke, zeros, b)
        else:
            q_next = w / b[:, None]
        betas.append(b)
        q_prev, q, beta_prev = q, q_next, b
        Q = Q + q[:, :, None] * xp.astype(columns == j + 1, dtype)
    alpha = xp.stack(alphas, axis=1)
    if betas:
        beta = xp.stack(betas, axis=1)
    else:
        beta = xp.zeros((B, 0), dtype=dtype, device=device)
    return alpha, beta, Q


def tridiagonal(xp: Any, alpha: Array, beta: Array) -> Array:
    """The B symmetric tridiagonal matrices T (B, m, m) of ``alpha`` (B, m), ``beta`` (B, m − 1).

    Built densely in xp: m is the (small) number of Lanczos steps, so a dense
    m × m solve on the array's own device is cheaper than a round trip to the host.
    """
    B, m = (int(s) for s in alpha.shape)
    device = device_of(alpha)
    eye = xp.eye(m, dtype=alpha.dtype, device=device)
    T = alpha[:, :, None] * eye
    if m > 1:
        upper = xp.eye(m, k=1, dtype=alpha.dtype, device=device)
        padded = xp.concat([beta, xp.zeros((B, 1), dtype=alpha.dtype, device=device)], axis=1)
        sup = padded[:, :, None] * upper
        T = T + sup + xp.matrix_transpose(sup)
    return T


def _tridiagonal_eigh(xp: Any, alpha: Array, beta: Array) -> tuple[Array, Array]:
    """Eigenpairs of the B tridiagonal matrices T (B, m, m) (``tridiagonal``)."""
    theta, S = xp.linalg.eigh(tridiagonal(xp, alpha, beta))
    return theta, S


def _start_vector(xp: Any, op: Any, v0: Array | None, gen: Any) -> Array:
    n = int(op.shape[0])
    if v0 is None:
        v = probes(gen, (n,), distribution="gaussian", xp=xp, dtype=op.dtype, device=op.device)
    else:
        witness = xp.zeros((0,), dtype=op.dtype, device=op.device)
        array_namespace(witness, v0, names=("A", "v0"))
        check_floating(v0, "v0", xp=xp)
        if tuple(v0.shape) != (n,):
            msg = (
                f"v0 must have shape ({n},) to match A of shape ({n}, {n}); got {tuple(v0.shape)}."
            )
            raise ValueError(msg)
        v = xp.astype(v0, op.dtype) if v0.dtype != op.dtype else v0
    norm = xp.linalg.vector_norm(v)
    host_norm = float(to_host(norm))
    if not (host_norm > 0.0 and host_norm < float("inf")):
        msg = f"v0 must be a nonzero finite vector; got norm {host_norm}."
        raise ValueError(msg)
    return v / norm


def lanczos(
    A: Any,
    /,
    *,
    num_matvecs: int,
    v0: Array | None = None,
    rng: Any = None,
) -> LanczosResult:
    r"""Symmetric Lanczos tridiagonalisation with full reorthogonalisation.

    Builds an orthonormal basis Q = [q_1 … q_m] of the Krylov space
    span{v0, A v0, …, A^{m−1} v0} and the tridiagonal T = Qᵀ A Q:

    .. math:: A q_j = \beta_{j-1} q_{j-1} + \alpha_j q_j + \beta_j q_{j+1},

    every new vector orthogonalised against the whole basis by classical
    Gram–Schmidt applied twice, so Q stays orthonormal to rounding level and no
    spurious copies ("ghosts") of converged eigenvalues appear. On breakdown
    (β_j ≤ eps · clip(n, 10, eps^(-1/2)) · ‖T‖, an invariant subspace) the run
    records β_j = 0 and restarts with a random vector orthogonal to the basis;
    this is how repeated eigenvalues are found with their multiplicity.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array (symmetry is
        assumed, not checked).
    num_matvecs
        Number of steps; m = min(num_matvecs, n).
    v0
        Starting vector (n,) of A's namespace (normalised here); default a
        Gaussian vector from ``rng``.
    rng
        Generator, int seed or None, for ``v0`` and the restart vectors.

    Returns
    -------
    LanczosResult
        ``alpha`` (m,), ``beta`` (m − 1,), ``basis`` (n, m).

    Notes
    -----
    Cost: m matvecs, O(n m²) work for the reorthogonalisation and n m memory for
    the basis; one scalar is read on the host per step (the breakdown test).

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([1.0, 2.0, 3.0])
    >>> res = lanczos(A, num_matvecs=3, rng=0)
    >>> Q = res.basis
    >>> T = np.diag(res.alpha) + np.diag(res.beta, 1) + np.diag(res.beta, -1)
    >>> bool(np.allclose(Q.T @ A @ Q, T)), bool(np.allclose(Q.T @ Q, np.eye(3)))
    (True, True)
    """
    op, xp = _as_square_operator(A)
    steps = check_positive_int(num_matvecs, "num_matvecs")
    gen = as_generator(rng)
    n = int(op.shape[0])
    v = _start_vector(xp, op, v0, gen)
    alpha, beta, Q = _lanczos(xp, op, v[None, :], min(steps, n), gen)
    return LanczosResult(alpha[0, :], beta[0, :], Q[0, ...])


def eigsh(
    A: Any,
    /,
    *,
    k: int,
    which: str = "largest",
    num_matvecs: int | None = None,
    rng: Any = None,
) -> EigshResult:
    """Extreme eigenpairs of a symmetric operator: Ritz pairs from ``lanczos``.

    With T = Qᵀ A Q = S diag(θ) Sᵀ from m Lanczos steps, the Ritz pairs are
    (θ_i, Q s_i). The extreme Ritz values converge first (and fastest for
    well-separated eigenvalues); with m = n they are the exact spectrum, repeated
    eigenvalues included.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array, k ≤ n.
    k
        How many eigenpairs at each requested end.
    which
        ``"largest"`` (the k largest), ``"smallest"`` (the k smallest) or
        ``"both"`` (the k smallest then the k largest; all m Ritz pairs when
        2k ≥ m, never a pair twice).
    num_matvecs
        Lanczos steps m (capped at n). Default ``min(n, max(2k + 30, 60))``; must
        be at least k.
    rng
        Generator, int seed or None, for the start and restart vectors.

    Returns
    -------
    EigshResult
        ``eigenvalues`` ascending (k' = k, or min(2k, m) for ``"both"``),
        ``eigenvectors`` (n, k') with unit columns, ``residuals`` ‖A y − θ y‖.

    Notes
    -----
    Cost: m matvecs for Lanczos plus k' for the residuals (one ``matmat``),
    O(n m²) work, n m memory.

    Examples
    --------
    >>> import numpy as np
    >>> res = eigsh(np.diag([1.0, 5.0, 2.0, 4.0]), k=2, rng=0)
    >>> np.round(res.eigenvalues, 10).tolist(), bool(np.all(res.residuals < 1e-10))
    ([4.0, 5.0], True)
    """
    op, xp = _as_square_operator(A)
    k = check_positive_int(k, "k")
    which = check_choice(which, "which", WHICH)
    n = int(op.shape[0])
    if k > n:
        msg = f"k must be at most n = {n} (the size of A); got k = {k}."
        raise ValueError(msg)
    if num_matvecs is None:
        m = min(n, max(2 * k + 30, 60))
    else:
        m = min(check_positive_int(num_matvecs, "num_matvecs"), n)
        if m < k:
            msg = (
                f"num_matvecs must be at least k = {k} (one Lanczos step per Ritz pair); "
                f"got {num_matvecs}. Leave it as None for min(n, max(2k + 30, 60))."
            )
            raise ValueError(msg)
    gen = as_generator(rng)
    v = _start_vector(xp, op, None, gen)
    alpha, beta, Q = _lanczos(xp, op, v[None, :], m, gen)
    theta, S = _tridiagonal_eigh(xp, alpha, beta)
    theta, S = theta[0, :], S[0, ...]
    if which == "largest":
        sel_theta, sel_S = theta[m - k :], S[:, m - k :]
    elif which == "smallest":
        sel_theta, sel_S = theta[:k], S[:, :k]
    elif 2 * k >= m:
        sel_theta, sel_S = theta, S
    else:
        sel_theta = xp.concat([theta[:k], theta[m - k :]])
        sel_S = xp.concat([S[:, :k], S[:, m - k :]], axis=1)
    Y = Q[0, ...] @ sel_S
    Y = Y / xp.linalg.vector_norm(Y, axis=0)
    R = op.matmat(Y) - Y * sel_theta
    return EigshResult(sel_theta, Y, xp.linalg.vector_norm(R, axis=0))
