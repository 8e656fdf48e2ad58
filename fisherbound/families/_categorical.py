"""The categorical (softmax) family: I_Δ(z) = diag(p) − p pᵀ."""

from __future__ import annotations

import math
from typing import Any

from fisherbound._lib import (
    device_of,
    index_dtype,
    is_torch_namespace,
    is_traced,
    log_softmax,
    uniform,
)
from fisherbound.families._base import Family, _diag, one_hot
from fisherbound.families._checks import check_label_array, check_label_support
from fisherbound.families._secular import secular_roots

Array = Any


def log_softmax_parts(z: Array, xp: Any) -> tuple[Array, Array, Array]:
    """(e, s, log p): e = exp(z − max z), s = Σ e (keepdims), log p = z − max − log s."""
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    s = xp.sum(e, axis=-1, keepdims=True)
    return e, s, shifted - xp.log(s)


def _probabilities_and_roots(z: Array, xp: Any) -> tuple[Array, Array]:
    """(p, √p) from one log-softmax pass: √p = exp(½ log p), p = √p · √p.

    √p outlives p's underflow; p as a product costs a multiply, not a second exp
    (at vocabulary scale these passes over (N, ∗S, C) are the factor's cost).
    """
    r = xp.exp(0.5 * log_softmax(z, xp))
    return r * r, r


def _in_place_ok(z: Array, xi: Array, xp: Any) -> bool:
    """Whether z and ξ are plain torch arrays of one dtype, ξ of the result's shape.

    Plain: no autograd graph and not wrapped by a ``torch.func`` transform (vmap's
    batched tensors cannot be written in place from an unbatched one).
    """
    if not is_torch_namespace(xp):
        return False
    import torch  # only reached with torch arrays

    return (
        not (z.requires_grad or xi.requires_grad)
        and not (is_traced(z) or is_traced(xi))  # torch.func transforms: out of place
        and z.dtype == xi.dtype
        and torch.broadcast_shapes(z.shape, xi.shape) == xi.shape
    )


def _torch_sqrt_matvec(z: Array, xi: Array, overwrite: bool) -> Array:
    """B ξ = √p ⊙ ξ − p (√p · ξ) = √p ⊙ (ξ − √p s), s = √p · ξ, on torch in place.

    √p = exp(½ log p) in the log-softmax's own array, s by ``einsum`` (no
    product array), then two in-place passes over ξ's buffer (a copy of ξ
    unless ``overwrite``). At vocabulary scale a new array of the logits' size
    costs as much as a pass of arithmetic, so this takes a third of the
    out-of-place formula's time; the values are the same to rounding.
    """
    import torch  # only reached with torch arrays

    r = torch.log_softmax(z, dim=-1).mul_(0.5).exp_()
    s = torch.einsum("...c,...c->...", r, xi).unsqueeze(-1)
    # An expanded ξ (stride 0) shares memory between entries: write into a copy.
    u = xi if overwrite and 0 not in xi.stride() else xi.clone()
    return u.addcmul_(r, s, value=-1.0).mul_(r)


#: Entries per block of rows in ``_torch_sqrt_matvec_signs``: temporaries of 2 MiB in
#: float32, which the allocator reuses from block to block and which stay in cache.
SIGNS_BLOCK = 2**19


def _one_probe_of_signs(z: Array, xi: Array) -> bool:
    """Whether ξ is one probe (1, ∗z.shape) of int8 signs for plain floating CPU logits z.

    On the CPU only: the blocks are sized for its caches (an accelerator would
    run thousands of small kernels where the float path runs a few).
    """
    import torch  # only reached with torch arrays

    return (
        xi.dtype == torch.int8
        and tuple(xi.shape) == (1, *z.shape)
        and z.device.type == "cpu"
        and z.is_floating_point()
        and not z.requires_grad
        and not (is_traced(z) or is_traced(xi))
    )


def _torch_sqrt_matvec_signs(z: Array, signs: Array) -> Array:
    """B ξ = √p ⊙ (ξ − √p s), s = √p · ξ, for one probe of ±1 signs ξ (1, ∗z.shape), int8.

    Block by block of at most ``SIGNS_BLOCK`` entries: √p = exp(½ log p) and ξ in
    z's dtype as temporaries (reused by the allocator, and in cache), then the
    block of the result written once. The same operations as the float path
    (``_torch_sqrt_matvec``), so the same values to the bit, with one new array of
    the logits' size in all where the float path makes two: at vocabulary scale
    a new one costs about as much as a pass of arithmetic (its first touch), and
    a float copy of ξ is four times its bytes.
    """
    import torch  # only reached with torch arrays

    c = int(z.shape[-1])
    out = torch.empty((1, *z.shape), dtype=z.dtype, device=z.device)
    rows, signs_rows, out_rows = z.reshape(-1, c), signs.reshape(-1, c), out.view(-1, c)
    step = max(1, SIGNS_BLOCK // max(c, 1))
    for start in range(0, int(rows.shape[0]), step):
        block = slice(start, start + step)
        root = torch.log_softmax(rows[block], dim=-1).mul_(0.5).exp_()
        u = signs_rows[block].to(z.dtype)
        # With a leading axis of one einsum takes a matrix product; "rc,rc->r" a slow bmm.
        s = torch.einsum("...c,...c->...", root[None], u[None])[0].unsqueeze(-1)
        torch.mul(u.addcmul_(root, s, value=-1.0), root, out=out_rows[block])
    return out


#: How far the rows of a target distribution may sum from 1 (absolute).
SOFT_TARGET_TOLERANCE = 1e-4


def _soft(z: Array, y: Array, xp: Any) -> bool:
    """Whether ``y`` holds target distributions (floating, one axis per axis of z)."""
    return int(y.ndim) == int(z.ndim) and bool(xp.isdtype(y.dtype, "real floating"))


def _looks_like_probabilities(z: Array, xp: Any) -> Array:
    """Every row of ``z`` non-negative and summing to 1 (to 1e-4): a 0-d bool."""
    return xp.all(z >= 0) & xp.all(xp.abs(xp.sum(z, axis=-1) - 1) <= 1e-4)


def softmax(z: Array, xp: Any) -> Array:
    e, s, _ = log_softmax_parts(z, xp)
    return e / s


def complements(z: Array, xp: Any) -> tuple[Array, Array, Array]:
    """(p, 1 − p, is_top) with 1 − p_i computed as Σ_{j≠i} p_j, free of cancellation.

    1 − p_i = (s − e_i)/s cancels only for the dominant class (e_i = 1 ≈ s); there
    the sum of the other terms is used instead. ``is_top`` marks the first argmax.
    """
    e, s, _ = log_softmax_parts(z, xp)
    c = int(z.shape[-1])
    top = xp.argmax(e, axis=-1, keepdims=True)
    is_top = xp.arange(c, device=device_of(z)) == top
    rest = xp.sum(xp.where(is_top, 0.0, e), axis=-1, keepdims=True)
    return e / s, xp.where(is_top, rest, s - e) / s, is_top


class Categorical(Family):
    r"""Softmax classification over :math:`C \ge 2` classes: :math:`p = \mathrm{softmax}(z)`.

    Sufficient statistic :math:`t(y) = e_y`.

    Core metric :math:`I_\Delta(z) = \operatorname{diag}(p) - p p^\top` with eigenvalues
    :math:`0 = \lambda_1 \le \dots \le \lambda_C \le \tfrac12`
    interlacing the sorted probabilities (:math:`p_{(i-1)} \le \lambda_i \le p_{(i)}`), trace
    :math:`1 - \lVert p \rVert^2` and pseudo-determinant :math:`C \prod p_i`. Envelopes
    (THEORY §1): :math:`\lambda_C v_C v_C^\top \preceq I_\Delta \preceq \operatorname{diag}(p)` and
    :math:`p_{(1)} P \preceq I_\Delta \preceq \lambda_C P` with
    :math:`P = I - \mathbf 1 \mathbf 1^\top / C`.
    Labels are integer class indices in :math:`[0, C)`, or target distributions :math:`y` of
    z's shape (..., C) (soft targets, e.g. label smoothing or distillation, as
    ``CrossEntropyLoss`` takes class probabilities): entries in :math:`[0, 1]`, rows summing
    to 1 to ``SOFT_TARGET_TOLERANCE`` = 1e-4. Then
    :math:`\log p(y \mid z) = \sum_c y_c \log p_c`, the soft cross-entropy's negative, and the
    score its gradient :math:`y - (\sum_c y_c)\, p`, which is :math:`y - p` for a distribution;
    the metric does not depend on :math:`y`.

    Examples
    --------
    >>> import numpy as np
    >>> fam = Categorical()
    >>> z = np.log(np.array([0.7, 0.2, 0.1]))
    >>> fam.eigvalsh(z).round(10)
    array([0.        , 0.12559693, 0.33440307])
    >>> round(float(fam.pseudo_determinant(z)), 12)  # 3 · 0.7 · 0.2 · 0.1
    0.042
    """

    __slots__ = ()
    _jit_safe = True
    min_classes = 2
    _centered = True

    def _check_outputs(self, z: Array, xp: Any, name: str) -> None:
        """Refuse softmax probabilities given as logits (every row ≥ 0 and summing to 1).

        A model that ends in softmax gives p where log p is meant: every Fisher
        quantity would be wrong, silently. Log-softmax outputs are fine (logits up
        to a constant per row). Real logits pass this test only by a coincidence of
        measure zero.
        """
        # Every row must look like p for the model to end in softmax: the first row
        # decides for almost every model, at O(C) instead of a pass over z.
        if math.prod(z.shape[:-1]) == 0:
            return
        first = z[(0,) * (z.ndim - 1) + (slice(None),)]
        if not bool(_looks_like_probabilities(first, xp)):
            return
        if bool(_looks_like_probabilities(z, xp)):
            msg = (
                f"{name} look like softmax probabilities (every row is non-negative and "
                "sums to 1), not logits: remove the model's final softmax. Log-softmax "
                "outputs are fine (logits up to a constant per row)."
            )
            raise ValueError(msg)

    def _refuses_outputs(self, z: Array, xp: Any) -> Array | None:
        """Every row of ``z`` looks like softmax probabilities (``_check_outputs`` refuses it)."""
        if math.prod(z.shape[:-1]) == 0:
            return None
        return _looks_like_probabilities(z, xp)

    def probabilities(self, z: Array, /) -> Array:
        r""":math:`\mathrm{softmax}(z)`, shape (..., C): the same as ``mean``, the paper's name."""
        return self.mean(z)

    # ------------------------------------------------------------ statistics
    def _mean(self, z: Array, xp: Any) -> Array:
        return softmax(z, xp)

    def _check_labels(
        self, z: Array, y: Array, xp: Any, names: tuple[str, str] = ("z", "y")
    ) -> None:
        if _soft(z, y, xp):
            check_label_array(z, y, kind="real floating", shape=tuple(z.shape), names=names)
            bad = ~((y >= 0.0) & (y <= 1.0))  # NaN fails both comparisons
            check_label_support(
                bad, xp, names[1], "target distributions: entries in [0, 1]",
                "values outside [0, 1] or NaN",
            )  # fmt: skip
            off = xp.abs(xp.sum(y, axis=-1) - 1.0) > SOFT_TARGET_TOLERANCE
            check_label_support(
                off, xp, names[1], f"target distributions: rows summing to 1 (to "
                f"{SOFT_TARGET_TOLERANCE:g})", "rows with another sum",
            )  # fmt: skip
            return
        if tuple(y.shape) == tuple(z.shape) and int(z.ndim) >= 1:
            zn, yn = names
            msg = (
                f"{yn} has the shape of {zn} {tuple(z.shape)}, as target distributions "
                f"(soft targets) do, but dtype {y.dtype}: target distributions must be "
                f"floating (xp.astype({yn}, {zn}.dtype)); class indices have the shape "
                f"{tuple(z.shape[:-1])}."
            )
            raise TypeError(msg)
        check_label_array(z, y, kind="integral", shape=tuple(z.shape[:-1]), names=names)
        c = int(z.shape[-1])
        bad = (y < 0) | (y >= c)
        check_label_support(bad, xp, names[1], f"class indices in [0, {c})", "values out of range")

    def _log_likelihood(self, z: Array, y: Array, xp: Any) -> Array:
        _, _, logp = log_softmax_parts(z, xp)
        if _soft(z, y, xp):  # Σ_c y_c log p_c: the soft cross-entropy's negative
            return xp.sum(xp.astype(y, z.dtype) * logp, axis=-1)
        index = xp.astype(y, index_dtype(xp, y))[..., None]
        return xp.take_along_axis(logp, index, axis=-1)[..., 0]

    def _score(self, z: Array, y: Array, xp: Any) -> Array:
        if _soft(z, y, xp):  # the gradient of Σ_c y_c log p_c: y − (Σ_c y_c) p
            t = xp.astype(y, z.dtype)
            return t - xp.sum(t, axis=-1, keepdims=True) * softmax(z, xp)
        return one_hot(y, int(z.shape[-1]), z.dtype, xp) - softmax(z, xp)

    def _sample(self, z: Array, gen: Any, lead: tuple[int, ...], xp: Any) -> Array:
        cdf = xp.cumulative_sum(softmax(z, xp), axis=-1)
        u = uniform(gen, lead + tuple(z.shape[:-1]), xp=xp, dtype=z.dtype, device=device_of(z))
        # Inverse CDF against the unnormalised total, so rounding in the cumulative
        # sum can never select beyond the last class.
        target = (u * cdf[..., -1])[..., None]
        below = xp.astype(cdf[..., :-1] <= target, index_dtype(xp, z))
        return xp.sum(below, axis=-1, dtype=below.dtype)

    # --------------------------------------------------------------- kernels
    def _upper_diag(self, z: Array, xp: Any) -> Array:
        return softmax(z, xp)

    def _exact_metric(self, z: Array, xp: Any) -> Array:
        p = softmax(z, xp)
        return _diag(p, xp) - p[..., :, None] * p[..., None, :]

    def _exact_matvec(self, z: Array, v: Array, xp: Any) -> Array:
        p = softmax(z, xp)
        return p * v - p * xp.sum(p * v, axis=-1, keepdims=True)

    def _sqrt_upper_diag(self, z: Array, xp: Any) -> Array:
        # √p = exp(½ log p): representable long after p itself underflows.
        return xp.exp(0.5 * log_softmax(z, xp))

    def _exact_sqrt(self, z: Array, xp: Any) -> Array:
        p, r = _probabilities_and_roots(z, xp)
        return _diag(r, xp) - p[..., :, None] * r[..., None, :]

    def _exact_sqrt_matvec(self, z: Array, xi: Array, xp: Any) -> Array:
        if _in_place_ok(z, xi, xp):
            return _torch_sqrt_matvec(z, xi, overwrite=False)
        p, r = _probabilities_and_roots(z, xp)
        rxi = r * xi
        return rxi - p * xp.sum(rxi, axis=-1, keepdims=True)

    def _exact_sqrt_matvec_into(self, z: Array, xi: Array, xp: Any) -> Array | None:
        # Only where the factor is this class's own (a subclass may change it).
        cls = type(self)
        own = (
            cls._exact_sqrt_matvec is Categorical._exact_sqrt_matvec
            and cls._sqrt_metric_matvec is Categorical._sqrt_metric_matvec
        )
        if not own or not is_torch_namespace(xp):
            return None
        if _in_place_ok(z, xi, xp):
            return _torch_sqrt_matvec(z, xi, overwrite=True)
        if _one_probe_of_signs(z, xi):
            return _torch_sqrt_matvec_signs(z, xi)
        return None

    def _scalar_upper(self, z: Array, xp: Any) -> Array:
        return self._top_eigenpair(z, xp)[0]

    def _scalar_lower(self, z: Array, xp: Any) -> Array:
        return xp.min(softmax(z, xp), axis=-1)

    # -------------------------------------------------------------- spectrum
    def _eigvalsh(self, z: Array, xp: Any) -> Array:
        c = int(z.shape[-1])
        p = xp.reshape(softmax(z, xp), (-1, c))
        if p.shape[0] == 0:
            return xp.zeros_like(z)
        roots = secular_roots(xp.sort(p, axis=-1), 0, c - 1, xp).eigenvalue
        zero = xp.zeros((p.shape[0], 1), dtype=p.dtype, device=device_of(p))
        return xp.reshape(xp.concat([zero, roots], axis=-1), tuple(z.shape))

    def _top_eigenpair(self, z: Array, xp: Any) -> tuple[Array, Array]:
        c = int(z.shape[-1])
        lead = tuple(z.shape[:-1])
        p = xp.reshape(softmax(z, xp), (-1, c))
        if p.shape[0] == 0:
            return xp.zeros(lead, dtype=z.dtype, device=device_of(z)), xp.zeros_like(z)
        order = xp.argsort(p, axis=-1)
        p_sorted = xp.take_along_axis(p, order, axis=-1)
        root = secular_roots(p_sorted, c - 2, c - 1, xp)
        lam = root.eigenvalue[:, 0]
        # v_j ∝ p_j / (p_j − λ), with p_j − λ = scale · ((p_j − origin)/scale − τ).
        den = (p - root.origin) / root.scale - root.tau
        den = xp.where(den == 0.0, 1.0, den)  # only at the tied poles of fixed rows
        v = p / den
        v = v / _nonzero(xp.max(xp.abs(v), axis=-1, keepdims=True), xp)
        v = v / _nonzero(xp.linalg.vector_norm(v, axis=-1, keepdims=True), xp)
        # A tied top probability (or an underflowed runner-up): λ = p_(C) and the
        # eigenspace contains (e_top − e_second)/√2.
        top = one_hot(order[:, -1], c, p.dtype, xp)
        second = one_hot(order[:, -2], c, p.dtype, xp)
        tied = (top - second) / math.sqrt(2.0)
        v = xp.where(root.fixed, tied, v)
        return xp.reshape(lam, lead), xp.reshape(v, tuple(z.shape))

    def _lambda_max_bounds(self, z: Array, xp: Any) -> tuple[Array, Array]:
        p, q, is_top = complements(z, xp)
        var = p * q
        p1 = xp.max(p, axis=-1)
        p2 = xp.max(xp.where(is_top, -1.0, p), axis=-1)
        q1 = xp.sum(xp.where(is_top, q, 0.0), axis=-1)  # 1 − p_(C)
        trace = xp.sum(var, axis=-1)  # 1 − ‖p‖² without cancellation
        # ½[p_(C) + p_(C−1) − d²] with d = p_(C) − p_(C−1) equals p_(C−1) + ½ d (1 − d),
        # and 1 − d = (1 − p_(C)) + p_(C−1): a sum of nonnegative terms.
        d = p1 - p2
        lower = xp.maximum(
            xp.maximum(p2, xp.max(var, axis=-1)),
            p2 + 0.5 * d * (q1 + p2),
        )
        half = xp.asarray(0.5, dtype=z.dtype, device=device_of(z))
        upper = xp.minimum(xp.minimum(p1, trace), half)
        return lower, upper

    def _log_pseudo_determinant(self, z: Array, xp: Any) -> Array:
        _, _, logp = log_softmax_parts(z, xp)
        return math.log(int(z.shape[-1])) + xp.sum(logp, axis=-1)

    def _fourth_moment(self, z: Array, a: Array, xp: Any) -> Array:
        p = softmax(z, xp)
        centred = a - xp.sum(p * a, axis=-1, keepdims=True)
        return xp.sum(p * centred**4, axis=-1)


def _nonzero(x: Array, xp: Any) -> Array:
    return xp.where(x == 0.0, 1.0, x)
