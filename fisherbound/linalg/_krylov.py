"""The thick-restart Krylov–Schur decomposition behind ``eigsh`` and the Lanczos count.

``_Krylov`` grows A Q = Q H + β q eᵀ one product at a time, with full or (for the
largest eigenpair) partial reorthogonalisation, and restarts it thickly; ``eigsh``
(``_lanczos``) and ``local_dimension``'s count (``_quadrature``) drive it. Split from
``_lanczos`` by job.
"""

from __future__ import annotations

import math
from typing import Any

from fisherbound._lib import (
    is_torch_namespace,
    is_traced,
    is_writeable_array,
    probes,
    set_row,
    to_host,
)
from fisherbound.linalg._lanczos import (
    _DGKS,
    TRACED_LANCZOS,
    _breakdown_factor,
    _not_finite,
    _power_of_two_scale,
    relative_residuals,
)

Array = Any


class _Krylov:
    """A Krylov–Schur decomposition A Q = Q H + β q eᵀ, grown one product at a time.

    The basis is held as rows, V = Qᵀ (p, n), j of them filled (each a contiguous
    vector: the Gram–Schmidt products read only the filled rows); T (j × j, host,
    float64) is the projected matrix (tridiagonal plus, after a restart, an arrow of
    couplings to the kept Ritz vectors), the symmetric part of the relation's H; q
    (unit, orthogonal to Q) is the next basis vector, with its coupling β.

    Partial reorthogonalisation (Simon 1984), where rows are written in place (NumPy,
    torch, CuPy, array-api-strict), ``tol`` > 0, p < n, ``which="largest"`` and k = 1, until
    the first restart: a step orthogonalises against its two latest rows, and the recurrence of
    the orthogonality levels ω_k = q_kᵀ q (``omega``: on the host from T, O(j²) per
    step) says when the new vector has lost more than η against an older row; then it
    is orthogonalised against the whole basis, and so is the next one (as is every
    step after a breakdown). η = min(√ε, tol / 100 · s), s the top pair's scale over
    ‖T‖ (``_tighten``): the loss of orthogonality perturbs a Ritz
    vector's residual by about η ‖T‖, a hundredth of what ``tol`` allows. That part is
    measured, not assumed: H − T (``D``, H the couplings actually subtracted: every
    partial or reorthogonalised step, and the steps whose q had a level above 100 ε)
    gives a pair's residual hypot(β |s_j|, ‖D s‖), which is ‖A y − θ y‖ for y = Q s
    up to Q's orthogonality. A restart folds Q D S into one 2-norm (``lost``, added to
    every later residual) and starts D again; the kept vectors' relation then no
    longer holds to rounding, as the recurrence assumes, so from the first restart on
    every step takes the whole basis. So do JAX (one shape for every step, as the
    compiled loop), ``tol`` = 0, p = n (the exact spectrum), ``"smallest"``,
    ``"both"`` and k > 1: their smallest wanted pair may be far below ‖T‖ (a null
    space, a fast-decaying spectrum) before any Ritz value shows it, so η would have to
    be near ε from the first step (a spectrum 100 · 0.2^i with k = 10 ran to its budget
    of 2000 products where full reorthogonalisation took 31). O(n) work per step
    instead of O(n j) between the full passes.
    """

    def __init__(
        self,
        xp: Any,
        op: Any,
        v: Array,
        p: int,
        gen: Any,
        *,
        tol: float | None = None,
        top_pair: bool = False,
    ) -> None:
        import numpy as np

        self.np = np
        self.xp, self.op, self.gen, self.p = xp, op, gen, p
        n = int(op.shape[0])
        self.n = n
        self.factor = _breakdown_factor(xp, op.dtype, n)
        # Libraries without in-place writes (JAX) keep every operation at one shape, so
        # that each compiles once: they orthogonalise against all p rows (zeros beyond
        # j) and solve T on the host; the others read only the filled rows, so their
        # basis is allocated uninitialised: a row's memory is first touched when the
        # row is written (zero-filling p rows of a large n cost more than the few
        # products of a short run: 17 ms of a 250 ms run at n = 535,818, p = 20).
        self.static = not is_writeable_array(v)
        allocate = xp.zeros if self.static else xp.empty
        self.V = allocate((p, n), dtype=op.dtype, device=op.device)
        self.T = np.zeros((p, p))
        self.j = 0
        self.q: Array | None = v
        #: The view of V's row that holds q, when the step before wrote q there (``_next_row``).
        self.q_row: Array | None = None
        self.torch = is_torch_namespace(xp)
        self.beta = 0.0
        self.norm_t = 0.0
        self.products = 0
        #: T and β are those of A / scale (``_power_of_two_scale`` of the first product);
        #: ``ritz`` and ``restart`` speak in A's units.
        self.scale: float | None = None
        #: Whether A q / scale is folded into the Gram–Schmidt pass (torch; at the first product).
        self.fold = False
        self.eps = float(xp.finfo(op.dtype).eps)
        self.tol = 0.0 if tol is None else float(tol)
        # Only for the top pair (``top_pair``: eigsh's which="largest", k = 1): a smaller
        # wanted pair (the null space of "smallest", the far end of "both", the k-th of a
        # fast-decaying spectrum) needs η near ε before any Ritz value there shows it,
        # i.e. full reorthogonalisation.
        self.partial = not self.static and self.tol > 0.0 and p < n and top_pair
        #: D = H − T is kept (and corrects the residuals) once a step may have been partial.
        self.tracked = self.partial
        self.eta = min(math.sqrt(self.eps), self.tol / 100.0)
        # The estimated q_iᵀ q_k of the rows (``omega``) and of q against them (``omega_q``);
        # whether the next step takes the whole basis; D = H − T; the relation's row of q.
        self.omega = np.eye(p)
        self.omega_q = np.zeros(p)
        self.full_next = True
        self.D = np.zeros((p, p))
        self.coupling = np.zeros(p)
        #: A bound of the relation's error that restarts dropped, for any unit combination
        #: of the rows (a 2-norm, added to the residuals: ``_restart_partial``).
        self.lost = 0.0
        #: The estimated largest level of q against the basis (ε once orthogonalised
        #: against all of it): D keeps the rows of the steps whose q exceeded 100 ε.
        self.q_level = self.eps
        #: Steps orthogonalised against the whole basis (a diagnostic for tests).
        self.full_steps = 0

    def _project(self, V: Array, w: Array, inv: float | None = None) -> tuple[Array, Any]:
        """Remove from w its components along the rows of V: one pass, two on cancellation.

        ``inv`` (a power of two): w is the operator's product, taken as ``inv · w``
        (exactly) and never written; else w is the step's own, written in place where
        the rows are. Returns the new w and, on the host, the removed coefficients then
        ‖w‖. The norm before the pass, for the cancellation test, is
        hypot(‖w_new‖, ‖h‖) (Pythagoras, V's rows orthonormal to working accuracy):
        no pass over w of its own.
        """
        xp, np = self.xp, self.np
        h = V @ w
        if inv is None:
            w = self._subtract(w, h, V)
        else:
            h = h * inv
            w = self._subtract_scaled(w, inv, h, V)
        coeffs = to_host(xp.concat([h, xp.linalg.vector_norm(w)[None]]))
        coeffs = np.asarray(coeffs, dtype=np.float64)
        if not np.all(np.isfinite(coeffs)):
            raise _not_finite(xp, self.op.dtype, self.products)
        if coeffs[-1] < _DGKS * math.hypot(coeffs[-1], float(np.linalg.norm(coeffs[:-1]))):
            # Cancellation: a second pass restores orthogonality to rounding level
            # (Daniel, Gragg, Kaufman & Stewart 1976; ARPACK's criterion).
            h2 = V @ w
            w = self._subtract(w, h2, V)
            more = to_host(xp.concat([h2, xp.linalg.vector_norm(w)[None]]))
            more = np.asarray(more, dtype=np.float64)
            return w, np.concatenate([coeffs[:-1] + more[:-1], more[-1:]])
        return w, coeffs

    def _subtract(self, w: Array, h: Array, V: Array) -> Array:
        """The update w − hᵀ V, in place where rows are written in place (torch: one pass)."""
        if self.static:
            return w - h @ V
        if self.torch:
            return w.addmv_(self.xp.matrix_transpose(V), h, alpha=-1.0)
        w -= h @ V
        return w

    def _subtract_scaled(self, w: Array, inv: float, h: Array, V: Array) -> Array:
        """The update inv · w − hᵀ V as a new array: one torch ``addmv`` over w and the rows."""
        import torch  # only reached with torch arrays (``fold``)

        return torch.addmv(w, self.xp.matrix_transpose(V), h, beta=inv, alpha=-1.0)

    def step(self) -> None:
        """Append q as row j: one product, one Gram–Schmidt pass (two on cancellation).

        With partial reorthogonalisation the pass takes rows j − 1 and j (where A q_j's
        couplings lie, exactly so in exact arithmetic once a restart's arrow is past),
        then, when Simon's estimate says so or the step before asked for it, a pass over
        the whole basis: after the three-term part is gone, so that its large couplings
        do not carry the older rows' loss of orthogonality into the new vector.
        """
        xp, np, j, q = self.xp, self.np, self.j, self.q
        assert q is not None
        if q is not self.q_row:  # else the step before wrote q into row j already
            self.V = set_row(xp, self.V, j, q)
        w = self.op.matvec(q)
        self.products += 1
        if self.scale is None:  # one host read, at the first product only
            if is_traced(w):
                raise ValueError(TRACED_LANCZOS)
            self.scale = float(to_host(_power_of_two_scale(xp, w)))
            # Torch fuses the scaling into the update (``_subtract_scaled``); elsewhere
            # dividing first costs the same. V (A q) and its scaling by 1 / scale can
            # neither overflow nor lose digits to underflow while the scale is within
            # √tiny ... √max of the dtype (as in any practical problem); outside, A q is
            # divided first.
            finfo = xp.finfo(self.op.dtype)
            inside = math.sqrt(finfo.smallest_normal) <= self.scale <= math.sqrt(finfo.max)
            self.fold = self.torch and inside
        lo = max(j - 1, 0) if self.partial else 0
        V = self.V if self.static else self.V[lo : j + 1, :]  # a view: the rows taken
        if self.fold:  # A q / scale folded into the pass: one pass and one new vector fewer
            w, coeffs = self._project(V, w, 1.0 / self.scale)
        else:
            w, coeffs = self._project(V, w / self.scale)
        col = np.zeros(j + 1)
        col[lo:] = coeffs[: j + 1 - lo]
        b = float(coeffs[-1])
        # H's row j differs from T's by Σ_i T_ik ω_ij: O(q_j's level · ‖T‖); kept in D
        # above 100 ε, rounding below (the products' own rounding is not counted either).
        record = self.q_level > 100.0 * self.eps
        self.q_level = self.eps
        self._set_column(j, col, b, record)
        broke = b <= self.factor * self.norm_t
        full = lo == 0  # the whole basis taken
        if self.partial:
            self.omega[j, :j] = self.omega[:j, j] = self.omega_q[:j]
            if not full and not broke:
                # Forced: the step after a detection (Simon's rule: ω of q_j fed this
                # estimate and was not reset), or η at rounding level, where every step
                # would be detected.
                forced = self.full_next or self.eta < 10.0 * self.eps
                self.full_next = False
                estimate = None if forced else self._estimate(b, j)
                if estimate is not None and np.max(np.abs(estimate[:j])) <= self.eta:
                    self.omega_q[: j + 1] = estimate
                    self.q_level = float(np.max(np.abs(estimate)))
                else:
                    w, more = self._project(self.V[: j + 1, :], w)
                    col += more[: j + 1]
                    b = float(more[-1])
                    # The pass's coefficients (the new vector's loss, up to η ‖T‖) have no
                    # counterpart in H's earlier columns: D keeps them whatever q_j's level.
                    self._set_column(j, col, b, True)
                    broke = b <= self.factor * self.norm_t
                    full = True
                    self.full_next = not forced  # a detection: the next vector too
            if full:
                self.omega_q[: j + 1] = self.eps
        self.full_steps += int(full)
        self.j = j + 1
        self.coupling[:] = 0.0
        if not broke:
            self.coupling[j] = b
            self.q, self.beta = self._next_row(w, b), b
            return
        # Breakdown: span(Q) is invariant. Go on from a random vector orthogonal to it
        # (β = 0), so repeated eigenvalues are found with their multiplicity.
        self.beta = 0.0
        self.full_next = True
        self.q = self._random_orthogonal() if self.j < min(self.p, self.n) else None
        self.omega_q[: self.j] = self.eps

    def _next_row(self, w: Array, b: float) -> Array:
        """The next vector q = w / b, straight into row j (the next step's row) if free.

        Where rows are written in place: no vector of n allocated, and on torch one pass
        (``out=``, refused by autograd for an operator whose output requires grad: that
        one takes ``w / b`` as before). The row is read back after the write, so a library
        whose slices are copies still gets the right q (and V its row).
        """
        j = self.j
        if self.static or j >= self.p or (self.torch and w.requires_grad):
            return w / b
        if self.torch:
            import torch  # only reached with torch arrays

            torch.div(w, b, out=self.V[j, :])
        else:
            self.V[j, :] = w / b
        self.q_row = self.V[j, :]
        return self.q_row

    def _set_column(self, j: int, col: Any, b: float, record: bool) -> None:
        """T's column and row j (symmetric), D's row j (H − T) and the norm estimate.

        H's row j is the relation's coupling of q_j to the earlier rows (β of the step
        before, or a restart's arrow); T's symmetric entries differ from it by the loss
        of orthogonality of q_j, which D keeps where ``record`` (while ``tracked``), and
        by rounding.
        """
        self.T[: j + 1, j] = col
        self.T[j, : j + 1] = col
        if self.tracked:
            self.D[j, :j] = self.coupling[:j] - col[:j] if record else 0.0
        self.norm_t = max(self.norm_t, float(self.np.abs(col).sum()) + b)

    def _estimate(self, b: float, j: int) -> Any:
        """Simon's recurrence: the levels ω of the new vector w / b against rows 0..j.

        With A q_k = Σ_i T_ik q_i (+ rounding) for the rows k < j and
        b q' = A q_j − Σ_i T_ij q_i, the new vector's q_kᵀ q' is
        (Σ_i T_ik ω_ji − Σ_i T_ij ω_ik) / b, plus a rounding term ±2ε‖T‖ / b pushed
        away from zero; against q_j, ε‖T‖ / b. Updates η first (``_tighten``).
        """
        self._tighten(j)
        np = self.np
        om, T = self.omega[: j + 1, : j + 1], self.T[: j + 1, : j + 1]
        x = om[j, :] @ T[:, :j] - T[:, j] @ om[:, :j]
        noise = 2.0 * self.eps * self.norm_t
        est = np.empty(j + 1)
        est[:j] = (x + np.where(x >= 0.0, noise, -noise)) / b
        est[j] = self.eps * self.norm_t / b
        return est

    def _tighten(self, j: int) -> None:
        """η = min(√ε, tol / 100 · max(|θ₁|, √ε ‖θ‖∞) / ‖θ‖∞), θ₁ the largest Ritz value.

        From the Ritz values of the current T (a host eigvalsh of j + 1 rows, O(j³)):
        the wanted pair is the top one, whose scale is ‖T‖ unless the spectrum's far end
        (negative) outweighs it.
        """
        np = self.np
        theta = np.linalg.eigvalsh(self.T[: j + 1, : j + 1])
        top = float(np.abs(theta).max())
        if top == 0.0:
            return
        root = math.sqrt(self.eps)
        scale = max(abs(float(theta[-1])), root * top) / top
        self.eta = min(self.eta, root, self.tol / 100.0 * scale)

    def _random_orthogonal(self) -> Array:
        xp, V = self.xp, self.V if self.static else self.V[: self.j, :]
        r = probes(
            self.gen,
            (self.n,),
            distribution="gaussian",
            xp=xp,
            dtype=V.dtype,
            device=self.op.device,
        )
        for _ in range(2):
            r = r - (V @ r) @ V
        return r / xp.linalg.vector_norm(r)

    def ritz(self) -> tuple[Any, Any, Any]:
        """Ritz values θ (ascending), the eigenvectors S of T and their residuals.

        The residual of (θ_i, Q s_i) is β |S[j−1, i]|, with partial reorthogonalisation
        hypot(β |S[j−1, i]|, ‖D s_i‖) (D = H − T, see the class). T is small (j ≤ p).
        It is solved in the operator's namespace (NumPy's threaded LAPACK takes
        milliseconds for a 40 × 40 matrix beside a busy torch pool), except for JAX,
        which would compile an eigensolver for every j: NumPy there.
        """
        np, j = self.np, self.j
        xp = np if self.static else self.xp
        T = xp.asarray(
            self.T[:j, :j], dtype=xp.float64, device=None if self.static else self.op.device
        )
        theta, S = (np.asarray(to_host(a), dtype=np.float64) for a in xp.linalg.eigh(T))
        s = 1.0 if self.scale is None else self.scale
        res = self.beta * np.abs(S[j - 1, :])
        if self.tracked:
            res = np.hypot(res, np.linalg.norm(self.D[:j, :j] @ S, axis=0))
            res = res + self.lost
        return theta * s, S, s * res

    def restart(self, S_keep: Any, theta_keep: Any) -> None:
        """Thick restart: keep the Ritz vectors Q S_keep; q (the residual) comes next."""
        xp, l = self.xp, int(S_keep.shape[1])
        self.q_row = None  # q is no row of the new basis: the next step writes it into row l
        S = xp.asarray(S_keep.T, dtype=self.V.dtype, device=self.op.device)
        kept = S @ self.V[: self.j, :]
        if self.static:
            pad = xp.zeros((self.p - l, self.n), dtype=self.V.dtype, device=self.op.device)
            self.V = xp.concat([kept, pad], axis=0)
        else:  # in place: the rows from l on are not read until written again
            self.V[:l, :] = kept
        theta_keep = theta_keep / (self.scale or 1.0)
        if self.tracked:
            self._restart_partial(S_keep, theta_keep)
        self.T = self.np.zeros((self.p, self.p))
        self.T[self.np.arange(l), self.np.arange(l)] = theta_keep
        self.j = l
        if self.q is None:  # the last step broke down: the kept vectors span an invariant
            self.q = self._random_orthogonal()

    def _restart_partial(self, S_keep: Any, theta: Any) -> None:
        """Fold D into ``lost`` at a restart to the rows Y = Q S (written in V[:l]).

        The relation of the kept vectors is A Y = Y Θ + Q D S + β q sᵀ (s = S's last
        row): the restart keeps Y Θ and the arrow β s and drops Q D S, whose 2-norm
        bounds the error of any unit combination of them; it is added to ``lost`` and
        D starts again at 0 (so nothing is counted twice). At the first restart after
        partial steps, kept vectors whose levels Sᵀ Ω S exceed η are orthonormalised,
        Y = Y' R (QR, diag R > 0): A Y' = Y' (R Θ R⁻¹) + Q D S R⁻¹ + β q (sᵀ R⁻¹), so
        the arrow becomes β sᵀ R⁻¹ and ‖R Θ R⁻¹ − Θ‖ joins the error; and q, where its
        levels ω_q S exceed η, is orthogonalised against them, q = ‖r‖ q' + Y' c, which
        scales the arrow by ‖r‖ and adds ‖c‖ ‖arrow‖ to the error. Θ: the kept Ritz
        values of A / scale. From the first restart on every step takes the whole basis:
        the recurrence of ω assumes a relation that holds to rounding.
        """
        np, xp = self.np, self.xp
        j, l = self.j, int(S_keep.shape[1])
        S = np.asarray(S_keep, dtype=np.float64)
        error = float(np.linalg.norm(self.D[:j, :j] @ S, ord=2))
        lost = self.lost
        arrow = self.beta * S[j - 1, :]
        if self.partial:
            omega = S.T @ self.omega[:j, :j] @ S
            np.fill_diagonal(omega, 0.0)
            lost_q = np.max(np.abs(self.omega_q[:j] @ S), initial=0.0) > self.eta
            if np.max(np.abs(omega), initial=0.0) > self.eta:
                Y, R = xp.linalg.qr(xp.matrix_transpose(self.V[:l, :]))
                R = np.asarray(to_host(R), dtype=np.float64)
                sign = np.where(np.diag(R) < 0.0, -1.0, 1.0)  # each vector keeps its direction
                self.V[:l, :] = xp.matrix_transpose(
                    Y * xp.asarray(sign, dtype=Y.dtype, device=self.op.device)
                )
                R = sign[:, None] * R
                R_inv = np.linalg.inv(R)
                grow = float(np.linalg.norm(R_inv, ord=2))
                lost, error = lost * grow, error * grow
                error += float(np.linalg.norm(R @ np.diag(theta) @ R_inv - np.diag(theta), ord=2))
                arrow = arrow @ R_inv
                lost_q = True
            if self.q is not None and lost_q:
                q, V = self.q, self.V[:l, :]
                c = np.zeros(l)
                for _ in range(2):
                    h = V @ q
                    q = q - h @ V
                    c += np.asarray(to_host(h), dtype=np.float64)
                norm = xp.linalg.vector_norm(q)
                self.q = q / norm
                error += float(np.linalg.norm(c)) * float(np.linalg.norm(arrow))
                arrow = arrow * float(to_host(norm))
                self.q_level = self.eps
            else:  # q's levels against the kept vectors
                self.q_level = max(self.eps, float(np.max(np.abs(self.omega_q[:j] @ S))))
            self.partial = False
        self.D = np.zeros((self.p, self.p))
        self.coupling = np.zeros(self.p)
        self.coupling[:l] = arrow
        self.lost = lost + error

    def relative_residuals(self, theta: Any, res: Any, sel: Any) -> Any:
        """Res / max(|θ|, √ε max|θ|) of the Ritz pairs ``sel``: what ``tol`` bounds."""
        return relative_residuals(self.xp, self.V.dtype, theta, res, sel)

    def thick_restart(self, S: Any, theta: Any, order: Any, wanted: int) -> None:
        """Restart keeping the ``wanted`` best Ritz pairs of ``order`` and half the rest."""
        keep = order[: min(self.p - 1, wanted + (self.p - wanted) // 2)]
        self.restart(S[:, keep], theta[keep])

    def vectors(self, S_sel: Any) -> Array:
        xp = self.xp
        S = xp.asarray(S_sel, dtype=self.V.dtype, device=self.op.device)
        Y = xp.matrix_transpose(self.V[: self.j, :]) @ S
        return Y / xp.linalg.vector_norm(Y, axis=0)
