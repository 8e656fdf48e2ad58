r"""Block thick-restart Lanczos (block Krylov–Schur) for symmetric operators.

``eigsh(..., block_size=b)`` with :math:`b > 1` runs here: each step applies the
operator to a block of :math:`b` orthonormal vectors with one ``matmat`` (a ``matvec``
for a block of one column), so an adapter that batches products (``vmap`` over the
columns) pays one batched call per step instead of :math:`b` separate products.

The decomposition is :math:`A Q = Q T + X^\top C`: :math:`Q` (n × j) the orthonormal
basis, :math:`T = Q^\top A Q` (j × j, host, float64; block tridiagonal, plus the arrow
of couplings to the kept Ritz vectors after a restart), :math:`X` (c × n, c ≤ b) the next
block, orthonormal rows orthogonal to :math:`Q`, and :math:`C` (c × j) its coupling. A
Ritz pair :math:`(\theta, Q s)` of :math:`T` has the residual
:math:`\lVert A Q s - \theta Q s \rVert = \lVert C s \rVert`, read off at no extra product.
"""

from __future__ import annotations

import math
from typing import Any

from fisherbound._lib import (
    is_traced,
    is_writeable_array,
    power_of_two_scale,
    probes,
    set_row,
    to_host,
)
from fisherbound.linalg._lanczos import (
    _DGKS,
    TRACED_LANCZOS,
    EigshResult,
    _breakdown_factor,
    _not_finite,
    _ranking,
    first_check,
    relative_residuals,
    ritz_result,
    warn_budget,
)

Array = Any


class _BlockKrylov:
    r"""A block Krylov–Schur decomposition :math:`A Q = Q T + X^\top C`, grown a block a step.

    The basis is held as rows, V = Qᵀ (p, n), j of them filled; T (p × p host, float64,
    j × j filled) and C (c × j host) are those of A / scale, ``scale`` the power of two
    of the first product (``_lanczos._power_of_two_scale``); ``ritz`` and
    ``restart`` speak in A's units.
    """

    def __init__(self, xp: Any, op: Any, p: int, b: int, gen: Any) -> None:
        import numpy as np

        self.np = np
        self.xp, self.op, self.gen, self.p = xp, op, gen, p
        n = int(op.shape[0])
        self.n = n
        self.dtype, self.device = op.dtype, op.device
        self.factor = _breakdown_factor(xp, op.dtype, n)
        start = self._gaussian(b)
        # As in _krylov._Krylov: JAX keeps one shape (all p rows, zeros beyond j); the
        # others read only the filled rows of an uninitialised basis.
        self.static = not is_writeable_array(start)
        allocate = xp.zeros if self.static else xp.empty
        self.V = allocate((p, n), dtype=op.dtype, device=op.device)
        self.T = np.zeros((p, p))
        self.j = 0
        self.norm_t = 0.0
        self.products = 0
        self.scale: float | None = None
        rows, _, _ = self._orthonormal_rows(start, [], floors=None)
        self.X = rows
        self.C = np.zeros((int(rows.shape[0]), 0))

    # ----------------------------------------------------------------- helpers

    def _gaussian(self, m: int) -> Array:
        return probes(
            self.gen,
            (m, self.n),
            distribution="gaussian",
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
        )

    def _filled(self, j: int) -> Array:
        return self.V if self.static else self.V[:j, :]

    def _project(self, bases: list[Array], W: Array) -> tuple[list[Array], Array]:
        """One classical Gram–Schmidt pass of the rows of W (c, n) against each basis (m, n)."""
        xp, hs = self.xp, []
        for B in bases:
            h_rows = W @ xp.matrix_transpose(B)  # (c, m): hᵀ
            W = W - h_rows @ B
            hs.append(xp.matrix_transpose(h_rows))
        return hs, W

    def _read(self, arrays: list[Array]) -> list[Any]:
        """One host read of several small arrays (float64 NumPy, their shapes kept)."""
        xp, np = self.xp, self.np
        flat = [xp.reshape(a, (-1,)) for a in arrays]
        host = np.asarray(to_host(xp.concat(flat)), dtype=np.float64)
        if not np.all(np.isfinite(host)):
            raise _not_finite(xp, self.dtype, self.products)
        out, at = [], 0
        for a in arrays:
            size = math.prod(int(s) for s in a.shape)
            out.append(host[at : at + size].reshape(tuple(int(s) for s in a.shape)))
            at += size
        return out

    def _orthonormal_rows(
        self, W: Array, bases: list[Array], floors: Any, used: int = 0, norms: Any = None
    ) -> tuple[Array, Any, list[Any]]:
        r"""Orthonormalise the rows of W (c, n), already orthogonal to ``bases``.

        Row i is orthogonalised against the rows accepted before it (twice when the
        first pass cancels more than :math:`1 - 1/\sqrt{2}` of it, DGKS) and accepted
        when its norm stays above ``floors[i]`` (default: the breakdown tolerance
        relative to its own norm). Such a cancellation magnifies what is left of the
        row along ``bases``, so the accepted rows then get one more block pass against
        ``bases`` and are re-orthonormalised among themselves (block CGS2: one product
        with the basis for the block, not one per row). The deflated rows are replaced
        by Gaussian rows orthogonal to everything (as many as the space holds), with
        zero coefficients. Returns the rows (a + d, n), R ((a + d) × c, W = Rᵀ rows
        plus the parts along ``bases``) and the extra coefficients per basis (host,
        m × c) to add to the caller's. ``norms``: the host norms of W's rows where the
        caller has them.
        """
        xp, np = self.xp, self.np
        c = int(W.shape[0])
        extra = [np.zeros((int(B.shape[0]), c)) for B in bases]
        if norms is None:
            norms = self._read([xp.linalg.vector_norm(W, axis=1)])[0]
        # The accepted rows: written in place into one buffer where the library allows
        # it (a view of the first a rows, no copy per row), else stacked (JAX).
        buffer = None if self.static else xp.empty_like(W)
        accepted: list[Array] = []

        def rows_so_far() -> Array:
            return xp.stack(accepted) if buffer is None else buffer[: len(accepted), :]

        R = np.zeros((c, c))
        cancelled = False
        for i in range(c):
            w, before = W[i, :], float(norms[i])
            r_host, after = np.zeros(len(accepted)), before
            for second in (False, True):
                if not accepted or (second and after >= _DGKS * before):
                    break
                A = rows_so_far()
                r = A @ w
                w = w - r @ A
                r_pass, norm = self._read([r, xp.linalg.vector_norm(w)[None]])
                r_host, after = r_host + r_pass, float(norm[0])
                cancelled = cancelled or second
            floor = self.factor * before if floors is None else float(floors[i])
            a = len(accepted)
            R[:a, i] = r_host
            if after > floor and after > 0.0:
                R[a, i] = after
                accepted.append(w / after)
                if buffer is not None:
                    buffer[a, :] = accepted[-1]
        a = len(accepted)
        Q = rows_so_far() if a else None
        R = R[:a]
        if Q is not None and cancelled and bases:
            # Q = Q₂ + h₂ᵀ B, Q₂ = R₂ᵀ Q₃: W = (H + h₂ R)ᵀ B + (R₂ R)ᵀ Q₃.
            hs, Q2 = self._project(bases, Q)
            host = self._read(hs)
            for e, h in zip(extra, host, strict=True):
                e += h @ R
            Q, R2 = self._cholesky_qr(Q2)
            R = R2 @ R
        room = self.n - used - a  # used: the rows of ``bases`` (not JAX's zero rows)
        d = min(c - a, max(room, 0))
        if d > 0:  # breakdown or a multiplicity: random rows orthogonal to everything
            Z = self._gaussian(d)
            for _ in range(2):
                _, Z = self._project([*bases, *([Q] if Q is not None else [])], Z)
                Z, _ = self._cholesky_qr(Z)
            Q = Z if Q is None else xp.concat([Q, Z], axis=0)
            R = np.concatenate([R, np.zeros((d, c))])
        if Q is None:
            Q = xp.zeros((0, self.n), dtype=self.dtype, device=self.device)
        return Q, R, extra

    def _cholesky_qr(self, Q: Array) -> tuple[Array, Any]:
        """Rows Q (a, n) of full rank as R₂ᵀ Q₃, Q₃ orthonormal, R₂ upper (host): Cholesky QR.

        Accurate for rows that are nearly orthonormal already (the second pass of
        block CGS2, or Gaussian rows orthogonalised against a basis: condition near 1).
        """
        xp, np = self.xp, self.np
        G = self._read([Q @ xp.matrix_transpose(Q)])[0]
        U = np.linalg.cholesky(0.5 * (G + G.T)).T  # G = Uᵀ U, U upper
        inverse = np.linalg.inv(U)  # Q₃ = U⁻ᵀ Q
        Uinv_t = xp.asarray(inverse.T, dtype=self.dtype, device=self.device)
        return Uinv_t @ Q, U

    # ----------------------------------------------------------------- the steps

    @property
    def width(self) -> int:
        """Columns of the next block (b, fewer only where the space ran out)."""
        return int(self.X.shape[0])

    def step(self, width: int) -> None:
        """Append the first ``width`` rows X₁ of X, one product of ``width`` columns.

        Block Gram–Schmidt of A X₁ against the basis and the rest X₂ of X (a second
        pass on cancellation), then the next block [X₂; new rows] with its coupling
        ``[[C₂, G], [0, R]]``.
        """
        xp, np, j, c = self.xp, self.np, self.j, self.width
        X1, X2 = self.X[:width, :], self.X[width:, :]
        jj = j + width
        if self.static:
            for i in range(width):
                self.V = set_row(xp, self.V, j + i, X1[i, :])
        else:
            self.V[j:jj, :] = X1
        if width == 1:  # a matvec: an adapter's one-column matmat can cost far more
            W = self.op.matvec(X1[0, :])[None, :]
        else:
            W = xp.matrix_transpose(self.op.matmat(xp.matrix_transpose(X1)))
        self.products += width
        if self.scale is None:  # one host read, at the first product only
            if is_traced(W):
                raise ValueError(TRACED_LANCZOS)
            top = xp.max(xp.abs(W))
            self.scale = float(to_host(power_of_two_scale(top, xp)))
        if self.static:
            W = W / self.scale
        else:  # as contiguous rows: the transposed product would make every row strided
            rows_w = xp.empty((width, self.n), dtype=self.dtype, device=self.device)
            rows_w[...] = W / self.scale
            W = rows_w
        V = self._filled(jj)
        bases = [V] + ([X2] if c > width else [])
        before = xp.linalg.vector_norm(W, axis=1)
        hs, W = self._project(bases, W)
        host = self._read([*hs, before, xp.linalg.vector_norm(W, axis=1)])
        coeffs, norm_before, norm_after = host[:-2], host[-2], host[-1]
        if np.any(norm_after < _DGKS * norm_before):
            # Cancellation: a second pass restores orthogonality to rounding level.
            hs, W = self._project(bases, W)
            more = self._read([*hs, xp.linalg.vector_norm(W, axis=1)])
            coeffs = [h + h2 for h, h2 in zip(coeffs, more[:-1], strict=True)]
            norm_after = more[-1]
        H = coeffs[0][:jj, :]  # (jj, width): the new columns of T
        G = coeffs[1] if c > width else np.zeros((0, width))  # X₂ A X₁ᵀ
        column = np.abs(H).sum(axis=0) + np.abs(G).sum(axis=0) + norm_after
        self.norm_t = max(self.norm_t, float(column.max()))
        floors = np.full(width, self.factor * self.norm_t)
        rows, R, extra = self._orthonormal_rows(
            W, bases, floors, used=jj + c - width, norms=norm_after
        )
        # The second pass's coefficients (of order eps ‖A‖): T stays Qᵀ A Q to rounding.
        H = H + extra[0][:jj, :]
        if c > width:
            G = G + extra[1]
        self.T[:jj, j:jj] = H
        self.T[j:jj, :jj] = H.T
        diagonal = H[j:jj, :]
        self.T[j:jj, j:jj] = 0.5 * (diagonal + diagonal.T)
        # The next block [X₂; new rows] and its coupling to the jj basis vectors.
        C2 = self.C[width:, :]
        top_rows = np.concatenate([C2, G], axis=1)
        low_rows = np.concatenate([np.zeros((int(R.shape[0]), j)), R], axis=1)
        self.C = np.concatenate([top_rows, low_rows], axis=0)
        self.X = xp.concat([X2, rows], axis=0) if c > width else rows
        self.j = jj

    def ritz(self) -> tuple[Any, Any, Any]:
        """Ritz values θ (ascending), the eigenvectors S of T and residuals ‖C s_i‖.

        Solved in the operator's namespace except for JAX (NumPy there), as in
        ``_krylov._Krylov.ritz``.
        """
        np, j = self.np, self.j
        xp = np if self.static else self.xp
        T = xp.asarray(
            self.T[:j, :j], dtype=xp.float64, device=None if self.static else self.device
        )
        theta, S = (np.asarray(to_host(a), dtype=np.float64) for a in xp.linalg.eigh(T))
        s = 1.0 if self.scale is None else self.scale
        return theta * s, S, s * np.linalg.norm(self.C @ S, axis=0)

    def restart(self, S_keep: Any, theta_keep: Any) -> None:
        """Thick restart: keep the Ritz vectors Q S_keep, their couplings C S_keep to X."""
        xp, np, l = self.xp, self.np, int(S_keep.shape[1])
        S = xp.asarray(S_keep.T, dtype=self.dtype, device=self.device)
        kept = S @ self.V[: self.j, :]
        if self.static:
            pad = xp.zeros((self.p - l, self.n), dtype=self.dtype, device=self.device)
            self.V = xp.concat([kept, pad], axis=0)
        else:  # in place: the rows from l on are not read until written again
            self.V[:l, :] = kept
        self.T = np.zeros((self.p, self.p))
        self.T[np.arange(l), np.arange(l)] = theta_keep / (self.scale or 1.0)
        self.C = self.C @ S_keep
        self.j = l

    def vectors(self, S_sel: Any) -> Array:
        xp = self.xp
        S = xp.asarray(S_sel, dtype=self.dtype, device=self.device)
        Y = xp.matrix_transpose(self.V[: self.j, :]) @ S
        return Y / xp.linalg.vector_norm(Y, axis=0)


def block_eigsh(
    xp: Any,
    op: Any,
    which: str,
    wanted: int,
    p: int,
    b: int,
    budget: int,
    rtol: float,
    gen: Any,
) -> EigshResult:
    """``eigsh`` with ``block_size = b > 1`` (its arguments checked there).

    The loop of ``eigsh`` a block at a time: convergence checked after every block
    once the basis could hold the wanted pairs and a margin; when the basis is full,
    a thick restart keeping the wanted Ritz pairs and half of the rest (at most
    p − b, so that a block fits); the budget counts columns, and the last block is cut
    to it.
    """
    import numpy as np

    n = int(op.shape[0])
    kry = _BlockKrylov(xp, op, p, b, gen)
    check_from = first_check(p, wanted)
    restarted = False
    while True:
        width = min(kry.width, p - kry.j, budget - kry.products)
        kry.step(width)
        full = kry.j == p
        exhausted = kry.j == n or kry.width == 0
        out_of_budget = kry.products >= budget
        if not (
            full or exhausted or out_of_budget or (p < n and (kry.j >= check_from or restarted))
        ):
            continue
        theta, S, res = kry.ritz()
        order = _ranking(theta, which)
        sel = order[: min(wanted, kry.j)]
        relative = relative_residuals(xp, op.dtype, theta, res, sel)
        converged = exhausted or bool(np.all(relative <= rtol)) and kry.j >= wanted
        if converged or out_of_budget:
            if not converged and rtol > 0.0:
                warn_budget(budget, float(np.max(relative)), rtol, stacklevel=3)
            return ritz_result(xp, op, kry, theta, S, res, sel)
        if full:
            keep = order[: min(p - b, wanted + (p - wanted) // 2)]
            kry.restart(S[:, keep], theta[keep])
            restarted = True
