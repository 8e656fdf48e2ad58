r"""Closed-form variances of the Fisher estimators (THEORY §3 and §4), matrix-free.

Logits :math:`z` (N, ∗S, C): :math:`N` examples, position axes :math:`S` (none for one
output per example; :math:`P = \operatorname{prod}(S)` positions), :math:`C` classes. An
example :math:`x` is an input with all its positions; its output is the product of
independent per-position families, so its core kernel is block diagonal,
:math:`K_x = \bigoplus_t K(z_{xt})`, its factor :math:`B_x = \bigoplus_t B(z_{xt})` has
:math:`P \cdot R` columns :math:`(t, r)`, its score is a sum over positions and its
moments factor across positions. Positions outside ``lin.mask`` have zero Jacobian rows
(the adapters' contract) and are excluded everywhere.

Detach-and-mix (§3). Write :math:`G = [J_x^\top B_x]_x`, the :math:`D \times K` matrix
whose columns :math:`b_k = J_{xt}^\top B(z_{xt})\, e_r` (:math:`k = (x, t, r)`) are
per-example VJPs of the columns of the block-diagonal core factor, so that
:math:`F = G G^\top` and :math:`F_{ii} = \sum_k b_{ik}^2`. One probe :math:`g = G \xi`,
:math:`\xi` i.i.d. over :math:`(x, t, r)`, gives

.. math::

   \operatorname{Var}(g_i^2) &= 2\Big(F_{ii}^2 - \sum_k b_{ik}^4\Big) \le 2 F_{ii}^2
   \qquad (\text{Rademacher } \xi) \\
   \operatorname{Var}(g_i^2) &= 2 F_{ii}^2
   \qquad (\text{Gaussian } \xi) \\
   \operatorname{Var}(\|g\|^2) &= 2\Big(\|A\|_F^2 - \sum_k A_{kk}^2\Big) \le 2 \|F\|_F^2
   \qquad (A = G^\top G,\ \|A\|_F = \|F\|_F)

per batch (the sum runs over the batch's columns; batches are independent, so their
variances add). These are identities of Rademacher/Gaussian quadratic forms in the
independent entries of :math:`\xi`, so they hold unchanged for position axes: only the
column set grows to :math:`(x, t, r)`. The per-example variant squares
:math:`g_x = \sum_t J_{xt}^\top B_{xt}\, \xi_{xt}` per example: the same formulas with
:math:`G` restricted to one example (all its positions), summed over the examples. The
mean of :math:`M` probes divides every variance by :math:`M`, hence
:math:`\mathrm{CV} \le \sqrt{2/M}` for every diagonal entry and for the trace
(``std_error_bound``).

Classical estimators (§4), for an exponential family :math:`p(y \mid x)` with
sufficient statistic :math:`t`, :math:`u = t(y) - \mathbb{E}\, t(y)`,
:math:`I(h) = \operatorname{Cov} t`, and :math:`k` labels :math:`y \sim p` per input.
With positions the score of example :math:`x` is :math:`s_{x,i} = \sum_t w_t`,
:math:`w_t = a_t^\top u_t`, :math:`a_t = \partial z_{xt} / \partial \theta_i`
(:math:`C`-vector), the :math:`w_t` independent with mean 0,
:math:`\sigma_t^2 = a_t^\top I_t a_t` and fourth moment
:math:`m_t = \mathbb{E}(a_t^\top u_t)^4`. Expanding :math:`\mathbb{E}(\sum_t w_t)^4`:

.. math::

   \operatorname{Var}(\hat I_{1,ii}) &= \frac1k \Big[\sum_t (m_t - 3\sigma_t^4)
   + 2 \Big(\sum_t \sigma_t^2\Big)^2\Big] \\
   \operatorname{Var}(\hat I_{2,ii}) &= \frac1k \sum_t c_t^\top I_t c_t,
   \qquad c_t = \partial^2 z_{xt} / \partial \theta_i^2

(for :math:`P = 1`: :math:`\frac1k [\mathbb{E}(a^\top u)^4 - (a^\top I a)^2]` and
:math:`\frac1k c^\top I c`), with :math:`\hat I_1` the score outer product (the
Monte-Carlo Fisher) and :math:`\hat I_2` minus the Hessian of the log-likelihood
(:math:`\sum_t` of independent position terms). Bounds: with
:math:`w_t^2 \le \rho_t^2` (categorical :math:`\rho_t = \max a_t - \min a_t`),
:math:`m_t \le \rho_t^2 \sigma_t^2`, so
:math:`\operatorname{Var}(\hat I_{1,ii}) \le \frac1k [\sum_t \rho_t^2 \sigma_t^2
+ 2((\sum_t \sigma_t^2)^2 - \sum_t \sigma_t^4)]` (:math:`= \rho^2 a^\top I a / k` for
:math:`P = 1`), and :math:`\operatorname{Var}(\hat I_{2,ii}) \le \bar\lambda \sum_t
\|c_t\|^2 / k` (:math:`\lambda_{\max}(I_\Delta) \le \frac12`). Inputs are fixed (not
sampled); the variances of different inputs add.

Everything is computed from the adapters' per-example VJPs (:math:`P \cdot R` or
:math:`P \cdot C` per input, chunked by ``max_vectors``, refused above
``max_cotangents``) and, for :math:`\hat I_2`, ``output_second_derivative_diagonal``
((N, ∗S, C, D)): never a :math:`D \times D` matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from fisherbound import estimators as est
from fisherbound._lib import (
    DISTRIBUTIONS,
    REDUCTIONS,
    RngLike,
    Source,
    array_namespace,
    check_bool,
    check_choice,
    check_finite,
    check_floating,
    check_optional_int,
    check_positive_int,
    check_target,
    is_traced,
)
from fisherbound._quantities import (
    DEFAULT_MAX_MEMORY,
    check_cotangents,
    columns_per_chunk,
    cotangent_chunks,
    most_slots,
    position_chunks,
    position_slots,
)
from fisherbound._stream import Stream, check_family
from fisherbound.families import KERNELS, Bernoulli, Categorical, Family, Gaussian
from fisherbound.fisher import DEFAULT_MAX_COTANGENTS, fisher_diagonal

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "detach_and_mix_variance",
    "classical_variance",
    "std_error_bound",
    "compare_estimators",
    "Comparison",
    "EstimatorCost",
]

ESTIMATORS = ("score", "hessian")


def _budget(lin: Any, max_vectors: int | None) -> int:
    return lin.default_max_vectors if max_vectors is None else max_vectors


def _columns_per_example(lin: Any, max_vectors: int | None, max_memory: int) -> int:
    """Cotangents per example in one chunk, so that N · chunk D-vectors are alive at once.

    (The adapters' per-example products cover every input of the batch.) At most
    what ``max_memory`` bytes hold of the output-space columns (``columns_per_chunk``).
    """
    size = max(1, _budget(lin, max_vectors) // max(lin.num_inputs, 1))
    return columns_per_chunk(lin, size, max_memory)


def _positions(lin: Any) -> tuple[int, tuple[int, ...], int, int]:
    """(N, S, P, C) of the logits (N, ∗S, C)."""
    shape = tuple(int(s) for s in lin.logits.shape)
    return shape[0], shape[1:-1], math.prod(shape[1:-1]), shape[-1]


# --------------------------------------------------------------------------- #
# a-priori bound


def std_error_bound(value: Any, /, *, num_probes: int = 1) -> Any:
    r"""The a-priori bound on the standard error of a detach-and-mix estimate.

    For an estimate whose expectation is ``value`` (the exact quantity, or the
    estimate itself as a plug-in), from :math:`M` probes, Rademacher or Gaussian
    (cost: elementwise in ``value``, no model evaluation):

    - diagonal (1-D) and trace (0-d): :math:`\mathrm{SE} \le \sqrt{2/M} \cdot {}` ``value``,
      i.e. :math:`\mathrm{CV} \le \sqrt{2/M}` (:math:`\operatorname{Var}(g_i^2) \le 2 F_{ii}^2`,
      :math:`\operatorname{Var}(\|g\|^2) \le 2 \|F\|_F^2 \le 2 (\operatorname{tr} F)^2`);
    - a block (2-D, square): :math:`\mathrm{SE}_{ij} \le \sqrt{(F_{ii} F_{jj} + F_{ij}^2) / M}`
      (:math:`\operatorname{Var}(g_i g_j) = F_{ii} F_{jj} + F_{ij}^2
      - 2 \sum_k b_{ik}^2 b_{jk}^2` for Rademacher);
    - a dict of blocks: the bound of each.

    Gaussian probes attain the diagonal bound; Rademacher probes never exceed it.

    Examples
    --------
    >>> import numpy as np
    >>> std_error_bound(np.array([0.21, 0.16, 0.09]), num_probes=2)
    array([0.21, 0.16, 0.09])
    """
    m = check_positive_int(num_probes, "num_probes")
    if isinstance(value, dict):
        return {k: std_error_bound(v, num_probes=m) for k, v in value.items()}
    xp = array_namespace(value, names=("value",))
    check_floating(value, "value", xp=xp)
    check_finite(value, "value", xp=xp)
    square = value.ndim == 2 and value.shape[0] == value.shape[1]
    diag = xp.linalg.diagonal(value) if square else value
    if (value.ndim <= 1 or square) and bool(xp.any(diag < 0)):
        msg = (
            "value must be a Fisher diagonal, trace or block: its diagonal entries are "
            f"variances, >= 0; got a minimum of {float(xp.min(diag))}. Pass the exact "
            "quantity or the estimate (an estimate's negative entries are noise: clip "
            "them at 0 first)."
        )
        raise ValueError(msg)
    if value.ndim <= 1:
        return _finite_bound(xp, xp.abs(value) * math.sqrt(2.0 / m), value)
    if value.ndim == 2 and value.shape[0] == value.shape[1]:
        # Scaled by c = max |F_ij| so that the products F_ii F_jj cannot overflow.
        c = xp.max(xp.abs(value))
        f = value / xp.where(c == 0.0, xp.ones_like(c), c)
        d = xp.linalg.diagonal(f)
        return _finite_bound(xp, c * xp.sqrt((d[:, None] * d[None, :] + f * f) / m), value)
    msg = (
        "value must be a diagonal (D,), a trace (0-d), a square block (s, s) or a dict of "
        f"blocks; got shape {tuple(value.shape)}. For what='full' pass the diagonal of the "
        "estimate, xp.sum(V * V, axis=0)."
    )
    raise ValueError(msg)


def _finite_bound(xp: Any, bound: Array, value: Array) -> Array:
    """``bound`` if finite; else a ValueError: it overflows ``value``'s dtype."""
    if bool(xp.all(xp.isfinite(bound))):
        return bound
    remedy = "rescale value" if value.dtype == xp.float64 else "compute in float64"
    msg = (
        f"the standard-error bound of value overflows {value.dtype} (largest |value| = "
        f"{float(xp.max(xp.abs(value))):.3g}, bound up to √2 times that): {remedy}."
    )
    raise ValueError(msg)


# --------------------------------------------------------------------------- #
# detach-and-mix


class _DiagonalMoments:
    """Per-batch sums behind the detach-and-mix diagonal variances."""

    def __init__(self) -> None:
        self.exact: Any = None  # Σ_b F_b   (= diag F)
        self.batch_sq: Any = None  # Σ_b F_b²
        self.example_sq: Any = None  # Σ_x F_x²
        self.fourth: Any = None  # Σ_k b_k⁴

    def add(self, f_batch: Array, example_sq: Array, fourth: Array) -> None:
        parts = (f_batch, f_batch * f_batch, example_sq, fourth)
        if self.exact is None:
            self.exact, self.batch_sq, self.example_sq, self.fourth = parts
        else:
            self.exact = self.exact + parts[0]
            self.batch_sq = self.batch_sq + parts[1]
            self.example_sq = self.example_sq + parts[2]
            self.fourth = self.fourth + parts[3]

    def variance(self, distribution: str, per_example: bool) -> Array:
        sq = self.example_sq if per_example else self.batch_sq
        if distribution == "gaussian":
            return 2.0 * sq
        return 2.0 * (sq - self.fourth)


def _diagonal_batch(
    lin: Any, family: Family, kernel: str, max_vectors: int | None, max_memory: int, xp: Any
) -> tuple[Array, Array, Array]:
    """(F_b, Σ_x F_x², Σ_k b_k⁴) of one batch, from per-example VJPs in chunks.

    The columns b_k = J_xtᵀ B(z_xt) e_r come from ``cotangent_chunks`` (the factor
    columns of K_x = ⊕_t K(z_xt); masked positions get none).
    """
    fx: Any = None
    q4: Any = None
    for u in cotangent_chunks(
        lin, family, kernel, _columns_per_example(lin, max_vectors, max_memory)
    ):
        g = lin.per_example_vjp(u)  # (N, K_c, D)
        g2 = g * g
        parts = (xp.sum(g2, axis=1), xp.sum(g2 * g2, axis=(0, 1)))
        if fx is None:
            fx, q4 = parts
        else:
            fx, q4 = fx + parts[0], q4 + parts[1]
    return xp.sum(fx, axis=0), xp.sum(fx * fx, axis=0), q4


def _trace_batch(
    lin: Any,
    family: Family,
    kernel: str,
    per_example: bool,
    max_vectors: int | None,
    max_memory: int,
    xp: Any,
) -> tuple[Array, Array]:
    """(‖A‖_F², Σ_k A_kk²) of one batch (or summed per input), A the Gram of the b_k.

    Row k of A is (b_{k'}ᵀ b_k)_{k'} = Bᵀ J b_k over the batch (one JVP per column
    b_k), so ‖A_k,:‖² = Σ_{x,t} (J_xt b_k)ᵀ K(z_xt) (J_xt b_k), with K applied by
    ``metric_matvec`` (O(C) per position, no factor formed); the per-example Gram
    matrices keep the terms of x = the example of column k.
    """
    n = lin.num_inputs
    z = lin.logits
    frob = diag = None
    size = _columns_per_example(lin, max_vectors, max_memory)
    # One JVP row is an (N, *S, C) array, as one column of every example: a chunk's
    # N · K_c rows go through jvp_batch as many at a time as the budget holds.
    rows_per_call = columns_per_chunk(lin, n * size, max_memory)
    for u in cotangent_chunks(lin, family, kernel, size):
        k_c = int(u.shape[1])
        g = lin.per_example_vjp(u)  # (N, K_c, D)
        norms = xp.sum(g * g, axis=2)  # (N, K_c): A_kk
        g = xp.reshape(g, (n * k_c, lin.num_params))
        f_part = None
        for r0 in range(0, n * k_c, rows_per_call):
            r1 = min(n * k_c, r0 + rows_per_call)
            jv = lin.jvp_batch(g[r0:r1, :])  # (rows, N, *S, C)
            mz = family.unchecked_metric_matvec(z, jv, kernel=kernel, xp=xp)
            quad = xp.sum(jv * mz, axis=-1)
            quad = xp.sum(xp.reshape(quad, (r1 - r0, n, -1)), axis=2)  # (rows, N): Σ_t
            if per_example:
                owner = xp.arange(r0, r1, device=lin.device) // k_c  # example of row k
                same = owner[:, None] == xp.arange(n, device=lin.device)[None, :]
                quad = quad * xp.astype(same, quad.dtype)
            part = xp.sum(quad)
            f_part = part if f_part is None else f_part + part
        d_part = xp.sum(norms * norms)
        frob = f_part if frob is None else frob + f_part
        diag = d_part if diag is None else diag + d_part
    return frob, diag


def detach_and_mix_variance(
    source: Source,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    what: str = "diagonal",
    num_probes: int = 1,
    kernel: str = "exact",
    distribution: str = "rademacher",
    per_example: bool = False,
    reduction: str = "sum",
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
) -> Array:
    r"""The exact variance of ``detach_and_mix``'s value, in closed form (THEORY §3).

    diagonal (D,): :math:`\sum_b 2(F_{b,ii}^2 - \sum_{k \in b} b_{ik}^4) / M` (Rademacher) or
    :math:`\sum_b 2 F_{b,ii}^2 / M` (Gaussian), :math:`b` over batches
    (``per_example=True``: over inputs). trace (0-d):
    :math:`\sum_b 2(\|A_b\|_F^2 - \sum_k (A_b)_{kk}^2) / M` (Rademacher) or
    :math:`\sum_b 2 \|A_b\|_F^2 / M` (Gaussian), :math:`A_b = G_b^\top G_b` the Gram matrix
    of the batch's (or the input's) columns :math:`b_k = J_{xt}^\top B(z_{xt})\, e_r`,
    :math:`k = (x, t, r)` over the examples :math:`x`, their counted positions :math:`t`
    and the factor's columns :math:`r` (the probe :math:`\xi` is independent over all
    three). ``reduction="mean"`` divides by :math:`N^2`, :math:`N` the number of examples
    (the estimate is divided by :math:`N`).

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once): the batches of the
        ``detach_and_mix`` call whose variance this is (the same batching).
    family, what, num_probes, kernel, distribution, per_example, reduction, max_vectors, progress
        As in ``detach_and_mix``; the result is the variance of its ``value``
        with the same options.
    max_cotangents
        The largest :math:`P \cdot R` (per-example backward passes per example) accepted
        (default 4096), a ValueError above it.
    max_memory
        Bytes for the columns of one chunk, as in ``fisher_diagonal``.

    Notes
    -----
    Cost: :math:`P \cdot R` per-example VJPs per input (as the exact diagonal; :math:`P`
    the counted positions); for the batch trace also :math:`P \cdot R` JVPs per input,
    each contracted with the kernels in :math:`O(N P C)`. Memory: ``max_vectors``
    :math:`D`-vectors.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> lin = linearize(LinearSoftmax(np.log([[0.7], [0.2], [0.1]])), np.ones((1, 1)))
    >>> np.round(detach_and_mix_variance(lin), 6)  # J = I, p = (0.7, 0.2, 0.1)
    array([0.056252, 0.016832, 0.002972])
    """
    fam = check_family(family)
    check_choice(what, "what", ("diagonal", "trace"))
    m = check_positive_int(num_probes, "num_probes")
    check_choice(kernel, "kernel", KERNELS)
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    check_bool(per_example, "per_example")
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_int(max_vectors, "max_vectors")
    limit = check_positive_int(max_cotangents, "max_cotangents")
    memory = check_positive_int(max_memory, "max_memory")
    total: Any = None
    moments = _DiagonalMoments()
    stream = Stream(source, fam, desc="detach-and-mix variance", progress=progress)
    for lin in stream:
        xp = lin.xp
        r = fam.sqrt_rank(lin.num_outputs, kernel=kernel)
        check_cotangents(lin, r, limit, owner="detach_and_mix_variance", kernel=kernel)
        if what == "diagonal":
            moments.add(*_diagonal_batch(lin, fam, kernel, max_vectors, memory, xp))
            continue
        frob, diag = _trace_batch(lin, fam, kernel, per_example, max_vectors, memory, xp)
        part = 2.0 * frob if distribution == "gaussian" else 2.0 * (frob - diag)
        total = part if total is None else total + part
    if what == "diagonal":
        total = moments.variance(distribution, per_example)
    scale = 1.0 / m
    if reduction == "mean":
        scale /= stream.num_inputs * stream.num_inputs
    return total * scale


# --------------------------------------------------------------------------- #
# classical estimators (THEORY §4)


def _range_bound(family: Family, zb: Array, a: Array, xp: Any) -> Array:
    """An upper bound on |aᵀu|², u = t(y) − E t(y): the support of aᵀu."""
    if isinstance(family, Categorical):
        width = xp.max(a, axis=-1) - xp.min(a, axis=-1)
        return width * width
    s = family.mean(zb)
    reach = xp.sum(xp.abs(a) * xp.maximum(s, 1.0 - s), axis=-1)
    return reach * reach


def _lambda_max_bound(family: Family) -> float:
    if isinstance(family, Categorical):
        return 0.5
    if isinstance(family, Bernoulli):
        return 0.25
    if isinstance(family, Gaussian):
        return 1.0 / family.variance
    return 1.0


def _jacobian_rows(lin: Any, max_vectors: int | None, max_memory: int, xp: Any) -> Any:
    """Per chunk of slots: (z_at (N, K, C), rows (N, K, C, D)) with rows[x, k, c] = ∂z_xtc/∂θ.

    t is the k-th counted position of example x (rows and z_at 0 for an example
    with fewer counted positions): one-hot cotangents at (t, c), K·C per-example
    VJPs per chunk, K·C ≤ max(C, ``max_vectors`` / N).
    """
    n, spatial, p, c = _positions(lin)
    z = xp.reshape(lin.logits, (n, p, c))
    eye = xp.eye(c, dtype=z.dtype, device=lin.device)
    mask = getattr(lin, "mask", None)
    if mask is None:
        slots, count = xp.broadcast_to(xp.arange(p, device=lin.device)[None, :], (n, p)), p
    else:  # the k-th counted position of each example; at least one chunk
        slots = position_slots(mask, xp)
        count = max(1, most_slots(slots, xp))
    for k0, k1 in position_chunks(count, c, _columns_per_example(lin, max_vectors, max_memory)):
        ks = xp.arange(k0, k1, device=lin.device)
        hot = xp.astype(slots[:, None, :] == ks[None, :, None], z.dtype)  # (N, K, P)
        u = hot[:, :, None, :, None] * eye[None, None, :, None, :]  # (N, K, C, P, C)
        g = lin.per_example_vjp(xp.reshape(u, (n, (k1 - k0) * c, *spatial, c)))
        yield xp.matmul(hot, z), xp.reshape(g, (n, k1 - k0, c, lin.num_params))


def _score_batch(
    lin: Any, family: Family, bound: bool, max_vectors: int | None, max_memory: int, xp: Any
) -> Array:
    """Σ_x Var(s_x,i²) (or its bound) per parameter, s_x,i = Σ_t a_tᵀ u_t, a_t = J_xt[:, i].

    Σ_x [Σ_t (m_t − 3σ_t⁴) + 2 (Σ_t σ_t²)²] with σ_t² = a_tᵀ I_t a_t and
    m_t = E(a_tᵀ u_t)⁴ (``family.fourth_moment``); the bound replaces m_t by
    ρ_t² σ_t² and drops −Σ_t σ_t⁴ (see the module docstring). The per-position
    Jacobian rows are formed for chunks of counted positions (``_jacobian_rows``)
    and the moments taken for chunks of examples.
    """
    n, _, _, c = _positions(lin)
    use_bound = bound and not isinstance(family, Gaussian)
    s2: Any = None  # (N, D): Σ_t σ_t²
    rest: Any = None  # (N, D): Σ_t (m_t − 3σ_t⁴), or Σ_t (ρ_t² σ_t² − 2σ_t⁴) for the bound
    for z_at, rows in _jacobian_rows(lin, max_vectors, max_memory, xp):
        k = int(rows.shape[1])
        chunk = max(1, _budget(lin, max_vectors) // (k * c))
        s2_parts, rest_parts = [], []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            a = xp.permute_dims(rows[start:stop, ...], (0, 1, 3, 2))  # (n_c, K, D, C)
            zb = xp.broadcast_to(z_at[start:stop, :, None, :], a.shape)
            quad = xp.sum(a * family.unchecked_metric_matvec(zb, a, xp=xp), axis=-1)  # σ_t²
            if use_bound:
                part = _range_bound(family, zb, a, xp) * quad - 2.0 * quad * quad
            else:
                part = family.fourth_moment(zb, a) - 3.0 * quad * quad
            s2_parts.append(xp.sum(quad, axis=1))
            rest_parts.append(xp.sum(part, axis=1))
        s2_c = s2_parts[0] if len(s2_parts) == 1 else xp.concat(s2_parts, axis=0)
        rest_c = rest_parts[0] if len(rest_parts) == 1 else xp.concat(rest_parts, axis=0)
        s2 = s2_c if s2 is None else s2 + s2_c
        rest = rest_c if rest is None else rest + rest_c
    return xp.sum(rest + 2.0 * s2 * s2, axis=0)


def _hessian_batch(
    lin: Any, family: Family, bound: bool, max_vectors: int | None, xp: Any
) -> Array:
    """Σ_x Σ_t c_tᵀ I(z_xt) c_t (or its bound) per parameter, c_t = ∂²z_xt/∂θ_i²."""
    if not hasattr(lin, "output_second_derivative_diagonal"):
        msg = (
            f"{type(lin).__name__} has no output_second_derivative_diagonal, which the "
            "variance of the Hessian estimator needs (∂²z/∂θ_i²); use an adapter of "
            "fisherbound.adapters."
        )
        raise NotImplementedError(msg)
    n, _, p, c = _positions(lin)
    d = lin.num_params
    h = lin.output_second_derivative_diagonal(max_vectors=max_vectors)
    want = (*(int(s) for s in lin.logits.shape), d)
    if tuple(int(s) for s in h.shape) != want:
        msg = (
            f"the variance of the Hessian estimator needs the second derivatives ∂²z/∂θ_i² "
            f"of every output, shape (N, *S, C, D) = {want}; "
            f"{type(lin).__name__}.output_second_derivative_diagonal returned shape "
            f"{tuple(h.shape)}. Its adapter does not provide them for outputs with "
            "position axes; use estimator='score'."
        )
        raise ValueError(msg)
    h = xp.reshape(h, (n, p, c, d))
    z = xp.reshape(lin.logits, (n, p, c))
    mask = getattr(lin, "mask", None)
    if mask is not None:  # the contract zeroes masked rows; second derivatives too
        h = h * xp.astype(xp.reshape(mask, (n, p)), h.dtype)[:, :, None, None]
    chunk = max(1, _budget(lin, max_vectors) // (c * p))
    total = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        hc = xp.permute_dims(h[start:stop, ...], (0, 1, 3, 2))  # (n_c, P, D, C)
        if bound:
            part = _lambda_max_bound(family) * xp.sum(hc * hc, axis=-1)
        else:
            zb = xp.broadcast_to(z[start:stop, :, None, :], hc.shape)
            part = xp.sum(hc * family.unchecked_metric_matvec(zb, hc, xp=xp), axis=-1)
        part = xp.sum(part, axis=(0, 1))
        total = part if total is None else total + part
    return total


def classical_variance(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    estimator: str = "score",
    num_samples: int = 1,
    bound: bool = False,
    reduction: str = "sum",
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
) -> Array:
    r"""Variance of the diagonal of the classical Fisher estimators (THEORY §4).

    With :math:`k` labels :math:`y \sim p(\cdot \mid x)` per input (inputs fixed, their
    variances added), one label per position :math:`y_{xt}` independently for logits
    (N, ∗S, C); :math:`a_t = \partial z_{xt} / \partial \theta_i`,
    :math:`\sigma_t^2 = a_t^\top I(z_{xt})\, a_t`, the sums over the counted positions
    :math:`t`:

    - ``estimator="score"``: :math:`\hat I_1 = \frac1k \sum s s^\top`, the score outer
      product (what ``fisherbound.estimators.monte_carlo`` computes,
      :math:`s_x = \sum_t J_{xt}^\top u_t`),
      :math:`\operatorname{Var}(\hat I_{1,ii}) = \sum_x \frac1k [\sum_t (\mathbb{E}(a_t^\top
      u_t)^4 - 3\sigma_t^4) + 2(\sum_t \sigma_t^2)^2]` (``family.fourth_moment``); without
      positions :math:`\frac1k [\mathbb{E}(a^\top u)^4 - (a^\top I a)^2]`. Bernoulli:
      :math:`z'^4 p(1 - p)(1 - 2p)^2 / k` per output; Gaussian:
      :math:`2 \|a\|^4 / (\sigma^4 k)`.
    - ``estimator="hessian"``: :math:`\hat I_2 = -\frac1k \sum \partial^2 \ell / \partial
      \theta^2`, :math:`\operatorname{Var}(\hat I_{2,ii}) = \sum_x \sum_t \frac1k c_t^\top
      I(z_{xt})\, c_t` with :math:`c_t = \partial^2 z_{xt} / \partial \theta_i^2` (from the
      adapter's ``output_second_derivative_diagonal``, shape (N, ∗S, C, D); a ValueError
      when it gives another); zero for parameters on which :math:`z` is linear (the last
      layer).

    ``bound=True`` returns the bounds instead: :math:`\hat I_1`:
    :math:`\sum_x [\sum_t \rho_t^2 \sigma_t^2 + 2((\sum_t \sigma_t^2)^2 - \sum_t
    \sigma_t^4)] / k` (without positions :math:`\rho^2 \cdot a^\top I a / k`),
    :math:`\rho_t` the range of :math:`a_t^\top u`: :math:`\max a_t - \min a_t`
    (categorical) or :math:`\sum_c` ``|a_c|`` :math:`\max(\sigma_c, 1 - \sigma_c)`
    (Bernoulli; Gaussian: the exact value, :math:`a^\top u` is unbounded);
    :math:`\hat I_2`: :math:`\bar\lambda \sum_t \|c_t\|^2 / k` with
    :math:`\bar\lambda = \frac12` (categorical), :math:`\frac14` (Bernoulli),
    :math:`1/\sigma^2` (Gaussian), upper bounds of :math:`\lambda_{\max}(I)`.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family
        The output family, as in ``monte_carlo``.
    estimator
        ``"score"`` (:math:`\hat I_1`) or ``"hessian"`` (:math:`\hat I_2`).
    num_samples
        :math:`k \ge 1` label draws per input.
    bound
        Return the upper bounds above instead of the exact variance.
    reduction
        ``"sum"``, or ``"mean"``, which divides by :math:`N^2`, :math:`N` the number of
        examples.
    max_vectors, progress
        As in ``fisher_diagonal``.
    max_cotangents
        The largest :math:`P \cdot C` (per-example backward passes per example of the
        score variance) accepted (default 4096), a ValueError above it.
    max_memory
        As in ``fisher_diagonal`` (the score variance takes the Jacobian rows of
        at least one position, :math:`C` columns, per chunk, whatever the budget; the
        Hessian estimator holds no output-space columns and does not use it).

    Returns
    -------
    array (D,)
        In the linearization's namespace and device.

    Notes
    -----
    Cost: :math:`\hat I_1`: :math:`P \cdot C` per-example VJPs per input (the per-example
    Jacobian rows of the counted positions, chunked by ``max_vectors``) and
    :math:`O(N P D C)` for the moments; :math:`\hat I_2`: the adapter's second derivatives
    (torch/JAX: :math:`D` forward-over-forward passes of the batch) and
    :math:`O(N P D C)`.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> from fisherbound.families import Bernoulli
    >>> theta = np.log(0.1 / 0.9) / 1.5  # logistic z = θx, x = 1.5, p = 0.1
    >>> lin = linearize(LinearSoftmax(np.array([[theta]])), np.array([[1.5]]))
    >>> np.round(classical_variance(lin, Bernoulli()), 4)
    array([0.2916])
    >>> classical_variance(lin, Bernoulli(), estimator="hessian")
    array([0.])
    """
    fam = check_family(family)
    check_choice(estimator, "estimator", ESTIMATORS)
    k = check_positive_int(num_samples, "num_samples")
    check_bool(bound, "bound")
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_int(max_vectors, "max_vectors")
    limit = check_positive_int(max_cotangents, "max_cotangents")
    memory = check_positive_int(max_memory, "max_memory")
    total: Any = None
    stream = Stream(source, fam, desc=f"{estimator} estimator variance", progress=progress)
    for lin in stream:
        xp = lin.xp
        if estimator == "score":
            check_cotangents(
                lin, lin.num_outputs, limit, owner="classical_variance", kernel="exact"
            )
            part = _score_batch(lin, fam, bound, max_vectors, memory, xp)
        else:
            part = _hessian_batch(lin, fam, bound, max_vectors, xp)
        total = part if total is None else total + part
    scale = 1.0 / k
    if reduction == "mean":
        scale /= stream.num_inputs * stream.num_inputs
    return total * scale


# --------------------------------------------------------------------------- #
# which estimator to use


class EstimatorCost(NamedTuple):
    r"""One row of ``compare_estimators``: accuracy and cost of one estimator.

    Attributes
    ----------
    name
        ``"detach_and_mix"``, ``"detach_and_mix_per_example"``, ``"monte_carlo"``
        or ``"exact"``.
    relative_variance
        :math:`\mathbb{E}\|\hat d - d\|^2 / \|d\|^2` for ONE draw (one probe, one label
        sample), :math:`d` the exact diagonal: the squared relative error of one draw (0 for
        the exact one).
    seconds
        Measured wall time of one call with one draw on the given data.
    draws
        Draws needed to reach the target relative error,
        :math:`\lceil` ``relative_variance`` :math:`/\, t^2 \rceil`.
    seconds_to_target
        draws :math:`\times` seconds: the time to reach the target (linear in the draws, an
        upper estimate when the draws are batched).
    """

    name: str
    relative_variance: float
    seconds: float
    draws: int
    seconds_to_target: float


class Comparison(NamedTuple):
    """The result of ``compare_estimators``: a small table and the winner."""

    rows: tuple[EstimatorCost, ...]
    best: str
    target_relative_error: float

    def to_markdown(self) -> str:
        """The table as Markdown."""
        lines = [
            f"target relative error {self.target_relative_error:g}; best: {self.best}",
            "",
            "| estimator | rel. variance per draw | s per draw | draws | s to target |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.relative_variance:.4g} | {r.seconds:.3g} | {r.draws} "
                f"| {r.seconds_to_target:.3g} |"
            )
        return "\n".join(lines)


def _timed(fn: Any) -> float:
    fn()  # warm-up (compilation, caches)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare_estimators(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    target_relative_error: float = 0.1,
    rng: RngLike = 0,
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    estimators: Sequence[str] | None = None,
) -> Comparison:
    r"""Which diagonal estimator reaches a given accuracy soonest, on YOUR model and data.

    For each of the batch-level detach-and-mix, the per-example detach-and-mix,
    the Monte-Carlo Fisher (one label sample per draw) and the exact diagonal, it
    computes the exact variance of one draw in closed form
    (``detach_and_mix_variance``, ``classical_variance``), summarised as the
    squared relative error :math:`\mathbb{E}\|\hat d - d\|^2 / \|d\|^2`, times one call on
    the data, and
    reports the number of draws and the time needed to reach
    ``target_relative_error`` (the exact diagonal needs one pass). ``best`` is
    the fastest to the target.

    Parameters
    ----------
    source
        A linearization, or an iterable of them, materialised (a list): pass a
        representative sample of batches.
    family
        The output family, as in ``detach_and_mix``.
    target_relative_error
        The relative error :math:`(\mathbb{E}\|\hat d - d\|^2 / \|d\|^2)^{1/2}` each row is
        timed to reach.
    rng
        A ``numpy.random.Generator``, an int seed, a JAX key or None, for the timed calls.
    max_vectors
        As in ``detach_and_mix``.
    max_cotangents, max_memory
        As in ``fisher_diagonal`` (the closed forms need the same :math:`P \cdot R`
        per-example products per example; the Monte Carlo row's score variance
        takes the :math:`C` one-hot columns of at least one position per chunk,
        :math:`N \cdot C \cdot P \cdot C` entries, whatever the budget: see
        ``classical_variance``).
    estimators
        The rows to compute (default all four).

    Returns
    -------
    Comparison
        ``rows`` (``EstimatorCost``: plain Python numbers, a report for humans),
        ``best`` and ``target_relative_error``; ``to_markdown()`` renders it.

    Notes
    -----
    Cost: the closed forms need the per-example VJPs of the exact diagonal
    (:math:`P \cdot R` per input) and of the Jacobian rows (:math:`P \cdot C` per input),
    plus one timed call of each estimator after a warm-up call.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((16, 4)))
    >>> table = compare_estimators(lin, target_relative_error=0.2)
    >>> [row.name for row in table.rows]
    ['detach_and_mix', 'detach_and_mix_per_example', 'monte_carlo', 'exact']
    """
    fam = check_family(family)
    target = check_target(target_relative_error)
    if target is None:
        msg = "target_relative_error must be a positive number (e.g. 0.1); got None."
        raise TypeError(msg)
    names = ("detach_and_mix", "detach_and_mix_per_example", "monte_carlo", "exact")
    if estimators is not None and (
        isinstance(estimators, str) or not isinstance(estimators, Sequence) or not estimators
    ):
        msg = (
            f"estimators must be None (all four) or a non-empty list of names from {names}; "
            f"got {estimators!r}."
        )
        wrong_type = isinstance(estimators, str) or not isinstance(estimators, Sequence)
        raise (TypeError if wrong_type else ValueError)(msg)
    chosen = list(names) if estimators is None else list(estimators)
    for name in chosen:
        check_choice(name, "estimators entries", names)
    check_optional_int(max_vectors, "max_vectors")
    limit = check_positive_int(max_cotangents, "max_cotangents")
    memory = check_positive_int(max_memory, "max_memory")
    lins = list(Stream(source, fam, desc="compare estimators", progress=False))
    if any(is_traced(lin.logits) for lin in lins):
        msg = (
            "compare_estimators times the estimators by the wall clock, which has no "
            "meaning for values traced by JAX (inside jax.jit): call it outside jit. "
            "The variances alone are detach_and_mix_variance and classical_variance, "
            "which work inside jit."
        )
        raise ValueError(msg)
    moments = _DiagonalMoments()
    mc_var: Any = None
    for lin in lins:
        xp = lin.xp
        # the score variance takes all C one-hot rows per position (sqrt_rank ≤ C)
        check_cotangents(lin, lin.num_outputs, limit, owner="compare_estimators", kernel="exact")
        moments.add(*_diagonal_batch(lin, fam, "exact", max_vectors, memory, xp))
        if "monte_carlo" in chosen:
            part = _score_batch(lin, fam, False, max_vectors, memory, xp)
            mc_var = part if mc_var is None else mc_var + part
    xp = lins[0].xp
    norm2 = float(xp.sum(moments.exact * moments.exact))
    variances = {
        "detach_and_mix": moments.variance("rademacher", False),
        "detach_and_mix_per_example": moments.variance("rademacher", True),
        "monte_carlo": mc_var,
    }
    calls = {
        "detach_and_mix": lambda: est.detach_and_mix(lins, fam, rng=rng, progress=False),
        "detach_and_mix_per_example": lambda: est.detach_and_mix(
            lins, fam, rng=rng, per_example=True, max_vectors=max_vectors, progress=False
        ),
        "monte_carlo": lambda: est.monte_carlo(
            lins, fam, rng=rng, max_vectors=max_vectors, progress=False
        ),
        "exact": lambda: fisher_diagonal(
            lins,
            fam,
            max_vectors=max_vectors,
            max_cotangents=limit,
            max_memory=memory,
            progress=False,
        ),
    }
    rows = []
    for name in chosen:
        seconds = _timed(calls[name])
        if name == "exact":
            rel, draws = 0.0, 1
        else:
            total = float(xp.sum(variances[name]))
            rel = total / norm2 if norm2 > 0 else math.inf
            draws = max(1, math.ceil(rel / target**2)) if math.isfinite(rel) else 0
        to_target = draws * seconds if draws else math.inf
        rows.append(EstimatorCost(name, rel, seconds, draws, to_target))
    best = min(rows, key=lambda r: r.seconds_to_target).name
    return Comparison(tuple(rows), best, target)
