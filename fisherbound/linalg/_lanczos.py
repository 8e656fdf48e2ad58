"""Symmetric Lanczos (full or partial reorthogonalisation), and extreme eigenpairs."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

from fisherbound._lib import (
    RngLike,
    array_namespace,
    as_generator,
    check_choice,
    check_floating,
    check_positive_int,
    device_of,
    is_traced,
    is_writeable_array,
    power_of_two_scale,
    probes,
    set_row,
    to_host,
)
from fisherbound.linalg._operator import LinearOperatorLike, _as_square_operator, is_jax_namespace

if TYPE_CHECKING:  # only for the annotations
    import scipy.sparse.linalg

Array = Any

__all__ = ["EigshResult", "LanczosResult", "eigsh", "lanczos"]

WHICH = ("largest", "smallest", "both")
# A second Gram-Schmidt pass when a pass shrinks the vector below 1/√2 of its norm.
_DGKS = 0.7071067811865476


class LanczosResult(NamedTuple):
    r"""The Lanczos decomposition :math:`Q^\top A Q = T` of a symmetric operator.

    Attributes
    ----------
    alpha
        Diagonal of the tridiagonal :math:`T`, shape (m,).
    beta
        Off-diagonal of :math:`T`, shape (m − 1,); an exact 0 marks a breakdown (an
        invariant subspace was found) followed by a random restart.
    basis
        :math:`Q`, shape (n, m), orthonormal columns.
    """

    alpha: Array
    beta: Array
    basis: Array


class EigshResult(NamedTuple):
    r"""Ritz approximations of extreme eigenpairs.

    Attributes
    ----------
    eigenvalues
        Ritz values :math:`\theta`, shape (k',), ascending.
    eigenvectors
        Ritz vectors :math:`y`, shape (n, k'), unit columns, in the order of
        ``eigenvalues``.
    residuals
        The Krylov residual :math:`\beta \cdot \lvert s_{p,i} \rvert` per pair, shape (k',)
        (``eigsh`` with partial reorthogonalisation: with the term of the lost
        orthogonality, see ``eigsh``), floored at
        :math:`\varepsilon \cdot \max \lvert \theta \rvert` (rounding):
        :math:`\lVert A y - \theta y \rVert` in exact arithmetic, at no extra
        product (for symmetric :math:`A` some eigenvalue lies within
        :math:`\lVert A y - \theta y \rVert` of :math:`\theta`).
        It does not contain the rounding error of the products, which in float32
        can exceed it (1.2e-5 reported against 1.9e-5 explicit for the top pair of
        a :math:`2000 \times 2000` float32 matrix with eigenvalues up to 100); compute
        ``A @ y − θ y`` when that matters.
    """

    eigenvalues: Array
    eigenvectors: Array
    residuals: Array


def _orthogonalize(xp: Any, V: Array, W: Array) -> Array:
    """Remove from each row of W (B, n) its component in the span of the rows of V[b] (B, j, n).

    Classical Gram–Schmidt applied twice ("twice is enough"): one pass loses
    orthogonality in proportion to the condition of [Q, w]; the second restores
    it to rounding level. The coefficients h = V w (B, j, 1) are applied as the rows
    hᵀ V (B, 1, n), which no library transposes V for (XLA on the CPU took 2.2 times
    as long for Vᵀ h; NumPy and torch take the same time either way).
    """
    for _ in range(2):
        h = V @ W[:, :, None]
        W = W - (xp.matrix_transpose(h) @ V)[:, 0, :]
    return W


def _not_finite(xp: Any, dtype: Any, step: int) -> ValueError:
    """The error for a Lanczos step whose product or norm is NaN or inf."""
    limit = math.sqrt(float(xp.finfo(dtype).max))
    wider = "" if dtype == xp.float64 else "compute in float64, "
    msg = (
        f"A's products must be finite; at Lanczos step {step} A q or its norm is NaN or "
        f"inf in {dtype}. Either the operator returned NaN or inf, or the entries of A "
        f"are too large for {dtype} (squares overflow above {limit:.3g}). Rescale A "
        f"(A / c has the eigenvalues λ / c), {wider}or check the operator."
    )
    return ValueError(msg)


def _power_of_two_scale(xp: Any, w: Array) -> Array:
    """``power_of_two_scale`` of max |w| along the last axis: each run's s.

    Lanczos runs on A / s with s from the first product, so that no norm overflows or
    underflows at any representable scale of A (entries 1e±300 in float64, 1e±30 in
    float32); a power of two divides exactly. The Ritz values are multiplied back.
    """
    return power_of_two_scale(xp.max(xp.abs(w), axis=-1), xp)


def _breakdown_factor(xp: Any, dtype: Any, n: int) -> float:
    """The relative breakdown tolerance: β ≤ eps · clip(n, 10, eps^(-1/2)) · ‖T‖.

    n · eps · ‖T‖ is the size of the rounding noise left in A q − α q − β q' after a
    true breakdown; the cap at √eps keeps a large float32 problem from mistaking a
    small but genuine β for noise.
    """
    eps = float(xp.finfo(dtype).eps)
    return eps * min(max(n, 10), eps**-0.5)


def _residual(
    xp: Any,
    filled: Array,
    q: Array,
    q_prev: Array,
    w: Array,
    beta_prev: Array,
    norm_t: Array,
    factor: float,
) -> tuple[Array, Array, Array, Array, Array]:
    """One Lanczos step of B runs after the product w = A q / s (all (B, n) or (B,)).

    Returns α = qᵀ w, the residual w − α q − β' q' orthogonalised against the basis
    rows ``filled`` (B, j, n), its norm β, the running estimate of ‖T‖ and the
    breakdown flags β ≤ factor · ‖T‖. The Python loop and the compiled JAX loop
    (``_compiled``) both take their steps here.
    """
    a = xp.sum(q * w, axis=1)
    w = w - a[:, None] * q - beta_prev[:, None] * q_prev
    w = _orthogonalize(xp, filled, w)
    b = xp.linalg.vector_norm(w, axis=1)
    norm_t = xp.maximum(norm_t, xp.abs(a) + beta_prev + b)
    return a, w, b, norm_t, b <= factor * norm_t


def _next_vectors(
    xp: Any, filled: Array, w: Array, b: Array, broke: Array, r: Array | None
) -> tuple[Array, Array]:
    """The next basis vectors q = w / β and their β, restarted where a run broke down.

    A run with ``broke`` set records β = 0 and goes on from its row of ``r`` (B, n),
    Gaussian, orthogonalised against its basis ``filled`` and normalised; ``r`` is
    None when no run broke down.
    """
    if r is None:
        return w / b[:, None], b
    r = _orthogonalize(xp, filled, r)
    r = r / xp.linalg.vector_norm(r, axis=1)[:, None]
    safe = xp.where(broke, xp.ones_like(b), b)
    q_next = xp.where(broke[:, None], r, w / safe[:, None])
    return q_next, xp.where(broke, xp.zeros_like(b), b)


def _lanczos(xp: Any, op: Any, V0: Array, m: int, gen: Any) -> tuple[Array, Array, Array]:
    """B independent Lanczos runs at once, one ``matmat`` of B columns per step.

    ``V0`` (B, n) holds unit starting vectors. Returns alpha (B, m), beta
    (B, m − 1) and the bases Q (B, n, m). A run that breaks down (β below the
    tolerance) records β = 0 and restarts with a Gaussian vector orthogonalised
    against its basis, so an invariant subspace never ends the run early and
    repeated eigenvalues are found with their multiplicity.

    A JAX operator with a ``traceable`` product runs all m steps in one compiled
    loop on the device (``_compiled.lanczos``: the same steps, the same random
    restarts, one host read per call and per breakdown); the others step from
    Python here.
    """
    traceable = getattr(op, "traceable", None)
    if traceable is not None and is_jax_namespace(xp):
        import jax  # a JAX operator

        if any(is_traced(a) for a in jax.tree_util.tree_leaves(traceable.operands)):
            raise ValueError(TRACED_LANCZOS)
        from fisherbound.linalg._compiled import lanczos as compiled_lanczos

        return compiled_lanczos(xp, op, traceable, V0, m, gen)
    B, n = (int(s) for s in V0.shape)
    dtype, device = op.dtype, op.device
    factor = _breakdown_factor(xp, dtype, n)
    zeros = xp.zeros((B,), dtype=dtype, device=device)
    # The bases as rows, V (B, m, n): each basis vector is contiguous, written in place
    # where the library allows it, and the Gram–Schmidt passes read only the filled rows.
    V = set_row(xp, xp.zeros((B, m, n), dtype=dtype, device=device), 0, V0)
    # Without in-place writes (JAX) every step works on the whole V (zero rows do not
    # change the Gram–Schmidt passes): one shape, so each operation compiles once.
    static = not is_writeable_array(V)
    q, q_prev, beta_prev, norm_t = V0, xp.zeros_like(V0), zeros, zeros
    alphas: list[Array] = []
    betas: list[Array] = []
    scale = None
    for j in range(m):
        if B == 1:  # a matvec: an adapter's one-column matmat can cost far more
            w = op.matvec(q[0, :])[None, :]
        else:
            w = xp.matrix_transpose(op.matmat(xp.matrix_transpose(q)))
        if scale is None:  # each run on A / s_b (see _power_of_two_scale)
            if is_traced(w):
                raise ValueError(TRACED_LANCZOS)
            scale = _power_of_two_scale(xp, w)
        w = w / scale[:, None]
        if j == m - 1:
            alphas.append(xp.sum(q * w, axis=1))
            break
        filled = V if static else V[:, : j + 1, :]
        a, w, b, norm_t, broke = _residual(xp, filled, q, q_prev, w, beta_prev, norm_t, factor)
        alphas.append(a)
        # One host read per step for both tests: a breakdown, and a NaN or inf product
        # (whose β would compare as a breakdown and restart silently).
        flags = to_host(xp.stack([xp.any(broke), ~xp.all(xp.isfinite(a + b))]))
        if bool(flags[1]):
            raise _not_finite(xp, dtype, j + 1)
        r = None
        if bool(flags[0]):
            r = probes(gen, (B, n), distribution="gaussian", xp=xp, dtype=dtype, device=device)
        q_next, b = _next_vectors(xp, filled, w, b, broke, r)
        betas.append(b)
        q_prev, q, beta_prev = q, q_next, b
        V = set_row(xp, V, j + 1, q)
    alpha = xp.stack(alphas, axis=1)
    if not bool(to_host(xp.all(xp.isfinite(alphas[-1])))):
        raise _not_finite(xp, dtype, m)
    if betas:
        beta = xp.stack(betas, axis=1)
    else:
        beta = xp.zeros((B, 0), dtype=dtype, device=device)
    assert scale is not None
    return alpha * scale[:, None], beta * scale[:, None], xp.matrix_transpose(V)


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
    if v0 is None or is_traced(norm):  # a Gaussian draw; a traced v0 cannot be read
        return v / norm
    host_norm = float(to_host(norm))
    if not (host_norm > 0.0 and host_norm < float("inf")):
        msg = f"v0 must be a nonzero finite vector; got norm {host_norm}."
        raise ValueError(msg)
    return v / norm


def lanczos(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    num_matvecs: int,
    v0: Array | None = None,
    rng: RngLike = None,
) -> LanczosResult:
    r"""Symmetric Lanczos tridiagonalisation with full reorthogonalisation.

    Builds an orthonormal basis :math:`Q = [q_1 \dots q_m]` of the Krylov space
    :math:`\operatorname{span}\{v_0, A v_0, \dots, A^{m-1} v_0\}` and the tridiagonal
    :math:`T = Q^\top A Q`:

    .. math::

       A q_j = \beta_{j-1} q_{j-1} + \alpha_j q_j + \beta_j q_{j+1},

    every new vector orthogonalised against the whole basis by classical
    Gram–Schmidt applied twice, so :math:`Q` stays orthonormal to rounding level and no
    spurious copies ("ghosts") of converged eigenvalues appear. On breakdown
    (:math:`\beta_j \le \varepsilon \cdot \operatorname{clip}(n, 10, \varepsilon^{-1/2})
    \cdot \lVert T \rVert`, an invariant subspace) the run
    records :math:`\beta_j = 0` and restarts with a random vector orthogonal to the basis;
    this is how repeated eigenvalues are found with their multiplicity.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array (symmetry is
        assumed, not checked).
    num_matvecs
        Number of steps; :math:`m = \min(\mathrm{num\_matvecs}, n)`.
    v0
        Starting vector (n,) of A's namespace (normalised here); default a
        Gaussian vector from ``rng``.
    rng
        Generator, int seed, JAX key or None, for ``v0`` and the restart vectors.

    Returns
    -------
    LanczosResult
        ``alpha`` (m,), ``beta`` (m − 1,), ``basis`` (n, m).

    Notes
    -----
    Cost: :math:`m` matvecs, :math:`O(n m^2)` work for the reorthogonalisation and
    :math:`n m` memory for the basis; one scalar is read on the host per step (the
    breakdown test). A JAX operator with a traceable product (a dense JAX array, a JAX
    Fisher operator; see ``LinearOperator``) runs all :math:`m` steps as one compiled loop
    on the device instead,
    with one host read per call (and per breakdown).

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


def _default_tol(xp: Any, dtype: Any) -> float:
    """max(1e-6, √eps): 1e-6 in float64, about 3.5e-4 in float32."""
    return max(1e-6, math.sqrt(float(xp.finfo(dtype).eps)))


def _ranking(theta: Any, which: str) -> Any:
    """Indices of the Ritz values from most to least wanted (host, float64)."""
    import numpy as np

    ascending = np.argsort(theta, kind="stable")
    if which == "largest":
        return ascending[::-1]
    if which == "smallest":
        return ascending
    # "both": the largest, the smallest, the second largest, ... (each once).
    both = np.empty_like(ascending)
    both[0::2] = ascending[::-1][: (ascending.size + 1) // 2]
    both[1::2] = ascending[: ascending.size // 2]
    return both


#: Why the restarted Lanczos runs refuse traced operators (inside jax.jit, vmap, grad).
TRACED_LANCZOS = (
    "The operator's products are traced by JAX (inside jax.jit or another "
    "transformation), but Lanczos (linalg.lanczos, eigsh, slq, and the "
    "top_eigenpairs, local_dimension, fisher_directions and hessian_directions built "
    "on them) decides on the host when to restart and when it has converged, which "
    "traced values cannot tell it. Call it outside jax.jit: its products are "
    "compiled either way."
)


def first_check(p: int, wanted: int) -> int:
    """The basis size from which ``eigsh`` checks convergence: the wanted pairs and a margin."""
    return min(p, max(2 * wanted, wanted + 8))


def warn_budget(budget: int, worst: float, rtol: float, *, stacklevel: int) -> None:
    """Eigsh's RuntimeWarning: the budget reached before the tolerance (every variant's)."""
    warnings.warn(
        f"eigsh stopped at its budget num_matvecs = {budget} before the tolerance: "
        f"the largest relative residual of the wanted Ritz pairs is {worst:.2e} > "
        f"tol = {rtol:.1e}. Raise num_matvecs (or basis_size), or check the "
        "returned residuals.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def ritz_result(xp: Any, op: Any, kry: Any, theta: Any, S: Any, res: Any, sel: Any) -> EigshResult:
    """The Ritz pairs ``sel`` of a host-side run (``_Krylov`` or the block one), ascending.

    LAPACK deflates couplings below rounding, so β|s| can be exactly 0; the residual of
    a computed Ritz pair is not below ε‖T‖: the residuals reported are at least that.
    """
    import numpy as np

    sel = np.sort(sel)  # ascending Ritz values
    Y = kry.vectors(S[:, sel])
    values = xp.asarray(theta[sel], dtype=op.dtype, device=op.device)
    floor = float(xp.finfo(op.dtype).eps) * float(np.abs(theta).max())
    residuals = xp.asarray(np.maximum(res[sel], floor), dtype=op.dtype, device=op.device)
    return EigshResult(values, Y, residuals)


def relative_residuals(xp: Any, dtype: Any, theta: Any, res: Any, sel: Any) -> Any:
    """Res / max(|θ|, √ε max|θ|) of the Ritz pairs ``sel`` (host, float64): what ``tol`` bounds.

    Shared by the single-vector and the block runs; ε is ``dtype``'s.
    """
    import numpy as np

    sqrt_eps = math.sqrt(float(xp.finfo(dtype).eps))
    scale = np.maximum(np.abs(theta[sel]), sqrt_eps * float(np.abs(theta).max()))
    return res[sel] / np.maximum(scale, np.finfo(float).tiny)


def eigsh(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    k: int,
    which: str = "largest",
    tol: float | None = None,
    num_matvecs: int | None = None,
    basis_size: int | None = None,
    block_size: int = 1,
    rng: RngLike = None,
) -> EigshResult:
    r"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos to a tolerance.

    Lanczos builds :math:`A Q = Q T + \beta q e^\top` on a basis of at most :math:`p`
    vectors; the Ritz pairs :math:`(\theta_i, Q s_i)` of
    :math:`T = S \operatorname{diag}(\theta) S^\top` have residuals
    :math:`r_i = \lVert A Q s_i - \theta_i Q s_i \rVert = \beta \cdot \lvert s_{p,i} \rvert`,
    read off :math:`T` at no extra product. The run stops when (for :math:`p < n`) every
    wanted pair satisfies

    .. math::

       r_i \le \mathrm{tol} \cdot
       \max(\lvert \theta_i \rvert, \sqrt{\varepsilon}\, \lVert T \rVert),

    checked after every product once the basis could hold the wanted pairs and a
    margin (with :math:`p = n` the run is a full tridiagonalisation, :math:`n` products).
    When the basis is full and some pair has not
    converged, it restarts thickly (Wu & Simon; Stewart's Krylov–Schur for symmetric
    :math:`A`): it keeps the :math:`k'` wanted Ritz vectors and :math:`(p - k')/2` more next
    to them, with their couplings to the residual, and goes on from the residual, so no
    information about the wanted end is lost. On breakdown (an invariant subspace) it
    goes on from a random vector orthogonal to the basis: this is how repeated
    eigenvalues are found with their multiplicity. With :math:`p = n` the run is a full
    tridiagonalisation and returns the exact spectrum, repeated eigenvalues included.

    Until its first restart a run for the largest eigenpair (``which="largest"``,
    ``k=1``) with :math:`p < n` and ``tol`` > 0 on NumPy, torch or CuPy arrays
    reorthogonalises partially (Simon 1984):
    a step orthogonalises against its two latest basis vectors (the three-term
    recurrence), and Simon's recurrence of the levels :math:`\omega_k = q_k^\top q`
    (from :math:`T`, on the host) says when the new vector's loss of orthogonality
    against an older one exceeds

    .. math::

       \eta = \min\Bigl(\sqrt{\varepsilon},\; \frac{\mathrm{tol}}{100} \cdot
       \min_i \frac{\max(\lvert \theta_i \rvert, \sqrt{\varepsilon} \lVert T \rVert)}
       {\lVert T \rVert}\Bigr)

    over the wanted pairs; then it and the next vector are orthogonalised against the
    whole basis. The basis stays semi-orthogonal, which keeps :math:`T` the projection
    of :math:`A` on an orthonormal basis of the same Krylov space to
    :math:`O(\varepsilon \lVert A \rVert)` (Simon), so no spurious copies of converged
    eigenvalues appear. The couplings the steps actually subtracted, :math:`H`, differ
    from the symmetric :math:`T` by :math:`D = H - T`, and the residual tested and
    returned is :math:`r_i = \operatorname{hypot}(\beta \lvert s_{p,i} \rvert,
    \lVert D s_i \rVert) + \ell`, with :math:`\ell` the 2-norm of the :math:`Q D S`
    that the restarts folded away: an upper bound of
    :math:`\lVert A y_i - \theta_i y_i \rVert` up to Q's orthogonality and rounding,
    above it by about :math:`\eta \lVert T \rVert`, a hundredth of what ``tol``
    allows. From the first restart on, and for ``"smallest"``, ``"both"`` and
    :math:`k > 1` (whose smallest wanted pair may lie far below :math:`\lVert T \rVert`,
    in a null space or a fast-decaying spectrum, before a Ritz value shows it), JAX
    arrays (one shape per step), ``tol=0`` and :math:`p = n`, every step is
    orthogonalised against the whole basis (full reorthogonalisation).

    With :math:`p < n` the run may converge before any breakdown, and one Krylov space
    holds one copy of each eigenvalue (more only through rounding): when the wanted end
    has an eigenvalue of multiplicity :math:`m > 1`, fewer than :math:`m` copies may come
    back, each a true eigenpair within ``tol``, followed by the next eigenvalues. This
    matters for ``which="smallest"`` on a Fisher matrix, whose null space has dimension
    at least :math:`D - N C`: on a 400 × 400 matrix of rank 50, ``k=5`` returned two
    zeros and then 169.2, 184.4, 191.7, while ``block_size=8`` (a block holds
    :math:`b` copies) returned five zeros. For multiplicities up to :math:`b` use
    ``block_size=b``, or count the null space as ``n - rank``.

    Parameters
    ----------
    A
        A symmetric square operator or dense (n, n) floating array, :math:`k \le n`
        (symmetry is assumed, not checked).
    k
        How many eigenpairs at each requested end.
    which
        ``"largest"`` (the k largest), ``"smallest"`` (the k smallest) or
        ``"both"`` (the :math:`k` smallest then the :math:`k` largest; all :math:`n` pairs
        when :math:`2k \ge n`, never a pair twice).
    tol
        The relative residual above, :math:`\ge 0`; default
        :math:`\max(\text{1e-6}, \sqrt{\varepsilon})` (1e-6 in float64, 3.5e-4 in float32,
        where the products themselves carry relative errors near
        :math:`\sqrt{\varepsilon}`). 0 runs to the budget, without a warning (or to
        :math:`n` steps when :math:`p = n`).
    num_matvecs
        The most products (the budget); default :math:`\max(100, 10 p)`. Reaching it
        before the tolerance warns (RuntimeWarning) with the largest relative
        residual, and returns the current Ritz pairs.
    basis_size
        :math:`p`, the most Lanczos vectors held (memory :math:`n p`);
        :math:`k' + 1 \le p \le n` with :math:`k' = k` (``"both"``: :math:`2k`); default
        :math:`\min(n, \max(2k' + 1, 20))`. :math:`p = n` gives the exact spectrum with
        multiplicities.
    block_size
        :math:`b`, the columns per step; 1 (default) is the single-vector run above, one
        ``matvec`` per step. :math:`b > 1` runs block Lanczos (block Krylov–Schur,
        ``fisherbound.linalg._block``): one ``matmat`` of :math:`b` columns per step,
        :math:`A Q = Q T + X^\top C` with :math:`T` block tridiagonal (plus the arrow after
        a restart) and the residuals :math:`\lVert C s_i \rVert` (the same test, at no
        extra product); the basis must hold the wanted pairs and one block,
        :math:`k' + b \le p` (default :math:`p = \min(n, \max(2k', 20) + 2b)`), and
        ``num_matvecs`` counts columns. It pays only where one product of :math:`b`
        columns costs clearly less than :math:`b` products (an adapter that batches
        columns), as a block run needs more products to the same tolerance
        (docs/linalg.md gives the measurements). A JAX operator runs it stepped from
        Python, a few host reads per step.
    rng
        Generator, int seed, JAX key or None, for the start and restart vectors.

    Returns
    -------
    EigshResult
        ``eigenvalues`` ascending (:math:`k'` pairs, or all :math:`n` for ``"both"`` with
        :math:`2k \ge n`), ``eigenvectors`` (n, k') with unit columns, ``residuals``
        :math:`r_i`, the Krylov residuals (``EigshResult``:
        :math:`\lVert A y - \theta y \rVert` up to the rounding of the products, which in
        float32 can dominate; after a partially reorthogonalised first cycle an upper
        bound of it, above it by at most about :math:`\eta \lVert T \rVert`, a hundredth
        of what ``tol`` allows).

    Notes
    -----
    Cost: one ``matvec`` per step until convergence (about :math:`p` plus, per restart,
    :math:`p - (k' + (p - k')/2)` products); per step one Gram–Schmidt pass (a second
    one when the first cancels more than :math:`1 - 1/\sqrt{2}` of the vector, the
    criterion of ARPACK) against two basis vectors, :math:`O(n)`, where the first cycle
    reorthogonalises partially, and against the whole basis, :math:`O(n p)`, otherwise;
    the host work of the partial steps, :math:`O(p^3)` per step with :math:`p \times p`
    matrices, is small beside a product; :math:`n p` memory, and one or two host reads of
    :math:`p + 2` numbers per step. The vector handed to ``matvec`` may be a row of the
    basis that a later step overwrites (as in ARPACK's reverse communication): an
    operator that keeps its input must copy it; its output is never written. Scale: the
    iteration runs on :math:`A / s`, :math:`s` the power of two nearest the largest entry of the
    first product, so every representable scale of :math:`A` (1e±300 in float64,
    1e±35 in float32) gives the same relative accuracy; a product or norm that is
    NaN or inf raises instead of reading as a breakdown. A JAX operator with a traceable
    product (a dense JAX array, a JAX Fisher operator; see ``LinearOperator``) runs the
    same steps as one compiled loop on the device, with no host read per step.

    Examples
    --------
    >>> import numpy as np
    >>> res = eigsh(np.diag([1.0, 5.0, 2.0, 4.0]), k=2, rng=0)
    >>> np.round(res.eigenvalues, 10).tolist(), bool(np.all(res.residuals < 1e-10))
    ([4.0, 5.0], True)
    """
    import numpy as np

    op, xp = _as_square_operator(A)
    k = check_positive_int(k, "k")
    which = check_choice(which, "which", WHICH)
    n = int(op.shape[0])
    if k > n:
        msg = f"k must be at most n = {n} (the size of A); got k = {k}."
        raise ValueError(msg)
    wanted = min(n, 2 * k) if which == "both" else k
    label = "2k" if which == "both" else "k"
    b = check_positive_int(block_size, "block_size")
    if b > n:
        msg = f"block_size must be at most n = {n} (the size of A); got {b}."
        raise ValueError(msg)
    if basis_size is None:  # a block run: room for two more blocks
        p = min(n, max(2 * wanted + 1, 20) if b == 1 else max(2 * wanted, 20) + 2 * b)
    else:
        p = check_positive_int(basis_size, "basis_size")
        if p > n or (p < n and p < wanted + b):
            more = "1" if b == 1 else "block_size"
            why = "one more" if b == 1 else f"one block of block_size = {b}"
            msg = (
                f"basis_size must be between {label} + {more} = {wanted + b} (the wanted pairs "
                f"and {why}) and n = {n}; got {basis_size}."
            )
            raise ValueError(msg)
    if num_matvecs is None:
        budget = max(100, 10 * p)
    else:
        budget = check_positive_int(num_matvecs, "num_matvecs")
        if budget < wanted:
            msg = (
                f"num_matvecs must be at least {label} = {wanted} (one product per wanted "
                f"Ritz pair); got {num_matvecs}. Leave it as None for max(100, 10 p)."
            )
            raise ValueError(msg)
    if tol is None:
        rtol = _default_tol(xp, op.dtype)
    else:
        if (
            isinstance(tol, bool)
            or not isinstance(tol, (int, float))
            or not (0.0 <= float(tol) < math.inf)
        ):
            msg = f"tol must be a finite real number >= 0; got {tol!r}."
            raise ValueError(msg)
        rtol = float(tol)
    gen = as_generator(rng)
    if b > 1:  # block Lanczos (one matmat of b columns per step)
        from fisherbound.linalg._block import block_eigsh

        return block_eigsh(xp, op, which, wanted, p, b, budget, rtol, gen)
    traceable = getattr(op, "traceable", None)
    if traceable is not None and is_jax_namespace(xp):  # one compiled loop on the device
        from fisherbound.linalg._compiled_eigsh import eigsh as compiled

        v = _start_vector(xp, op, None, gen)
        return compiled(xp, op, traceable, v, gen, p, wanted, which, budget, rtol)
    from fisherbound.linalg._krylov import _Krylov

    v = _start_vector(xp, op, None, gen)
    kry = _Krylov(xp, op, v, p, gen, tol=rtol, top_pair=which == "largest" and wanted == 1)
    # Convergence is checked after every product once the basis could hold the wanted
    # pairs and a margin (and always after a restart): a host eigh of at most p × p.
    check_from = first_check(p, wanted)
    while True:
        kry.step()
        full = kry.j == p
        exhausted = kry.j == n  # the whole space: the Ritz values are the spectrum
        out_of_budget = kry.products >= budget
        restarted = kry.products > kry.j
        if not (
            full or exhausted or out_of_budget or (p < n and (kry.j >= check_from or restarted))
        ):
            continue
        theta, S, res = kry.ritz()
        order = _ranking(theta, which)
        sel = order[: min(wanted, kry.j)]
        relative = kry.relative_residuals(theta, res, sel)
        converged = exhausted or bool(np.all(relative <= rtol)) and kry.j >= wanted
        if converged or out_of_budget:
            if not converged and rtol > 0.0:
                warn_budget(budget, float(np.max(relative)), rtol, stacklevel=2)
            return ritz_result(xp, op, kry, theta, S, res, sel)
        if full:
            kry.thick_restart(S, theta, order, wanted)
