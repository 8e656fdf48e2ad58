"""Closed-form variances of the Fisher estimators (THEORY §3 and §4), matrix-free.

Detach-and-mix (§3). Write G = [J_xᵀ B_x]_x, the D × K matrix whose columns
b_k = J_xᵀ B_x e_r (k = (x, r)) are per-example VJPs of the columns of the core
factor, so that F = G Gᵀ and F_ii = Σ_k b_ik². One probe g = G ξ gives

    Var(g_i²) = 2(F_ii² − Σ_k b_ik⁴) ≤ 2 F_ii²        (Rademacher ξ)
    Var(g_i²) = 2 F_ii²                               (Gaussian ξ)
    Var(‖g‖²) = 2(‖A‖_F² − Σ_k A_kk²) ≤ 2‖F‖_F²       (A = GᵀG, ‖A‖_F = ‖F‖_F)

per batch (the sum runs over the batch's columns; batches are independent, so
their variances add). The per-example variant sums squares per input: the same
formulas with G restricted to one input, summed over the inputs. The mean of M
probes divides every variance by M, hence CV ≤ √(2/M) for every diagonal entry
and for the trace (``std_error_bound``).

Classical estimators (§4), for an exponential family p(y|x) with sufficient
statistic t, u = t(y) − E t(y), I(h) = Cov t, and k labels y ~ p per input:

    Var(Î_1,ii) = (1/k) [E(aᵀu)⁴ − (aᵀ I a)²],     a = ∂h/∂θ_i   (C-vector)
    Var(Î_2,ii) = (1/k) cᵀ I c,                     c = ∂²h/∂θ_i²

with Î_1 the score outer product (the Monte-Carlo Fisher) and Î_2 minus the
Hessian of the log-likelihood. Bounds: categorical Var(Î_1,ii) ≤ (max a − min a)²
aᵀIa / k and Var(Î_2,ii) ≤ ‖c‖²/(2k) (λ_max(I_Δ) ≤ ½). Inputs are fixed (not
sampled); the variances of different inputs add.

Everything is computed from the adapters' per-example VJPs (C or R per input,
chunked by ``max_vectors``) and, for Î_2, ``output_second_derivative_diagonal``:
never a D × D matrix.
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
    array_namespace,
    check_bool,
    check_choice,
    check_optional_int,
    check_positive_int,
    check_target,
)
from fisherbound._stream import Stream, check_family
from fisherbound.families import KERNELS, Bernoulli, Categorical, Family, Gaussian
from fisherbound.fisher import fisher_diagonal

Array = Any

__all__ = [
    "Comparison",
    "EstimatorCost",
    "classical_variance",
    "compare_estimators",
    "detach_and_mix_variance",
    "std_error_bound",
]

ESTIMATORS = ("score", "hessian")


def _budget(lin: Any, max_vectors: int | None) -> int:
    return lin.default_max_vectors if max_vectors is None else max_vectors


def _factor_columns(family: Family, z: Array, kernel: str, xp: Any) -> Array:
    """U (n, R, C): U[n, r] is column r of B(z_n)."""
    return xp.permute_dims(family.sqrt_metric(z, kernel=kernel), (0, 2, 1))


# --------------------------------------------------------------------------- #
# a-priori bound


def std_error_bound(value: Any, /, *, num_probes: int = 1) -> Any:
    """The a-priori bound on the standard error of a detach-and-mix estimate.

    For an estimate whose expectation is ``value`` (the exact quantity, or the
    estimate itself as a plug-in), from M probes, Rademacher or Gaussian
    (cost: elementwise in ``value``, no model evaluation):

    - diagonal (1-D) and trace (0-d): SE ≤ √(2/M) · value, i.e. CV ≤ √(2/M)
      (Var(g_i²) ≤ 2 F_ii², Var(‖g‖²) ≤ 2‖F‖_F² ≤ 2 (tr F)²);
    - a block (2-D, square): SE_ij ≤ √((F_ii F_jj + F_ij²)/M)
      (Var(g_i g_j) = F_ii F_jj + F_ij² − 2 Σ_k b_ik² b_jk² for Rademacher);
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
    if value.ndim <= 1:
        return xp.abs(value) * math.sqrt(2.0 / m)
    if value.ndim == 2 and value.shape[0] == value.shape[1]:
        d = xp.linalg.diagonal(value)
        return xp.sqrt((d[:, None] * d[None, :] + value * value) / m)
    msg = (
        "value must be a diagonal (D,), a trace (0-d), a square block (s, s) or a dict of "
        f"blocks; got shape {tuple(value.shape)}. For what='full' pass the diagonal of the "
        "estimate, xp.sum(V * V, axis=0)."
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


def _column_chunks(lin: Any, r: int, max_vectors: int | None) -> list[tuple[int, int]]:
    """Chunks of the R cotangent columns so that N · chunk D-vectors are alive at once.

    (The adapters' per-example products cover every input of the batch.)
    """
    chunk = max(1, _budget(lin, max_vectors) // max(lin.num_inputs, 1))
    return [(s, min(r, s + chunk)) for s in range(0, r, chunk)]


def _diagonal_batch(
    lin: Any, family: Family, kernel: str, max_vectors: int | None, xp: Any
) -> tuple[Array, Array, Array]:
    """(F_b, Σ_x F_x², Σ_k b_k⁴) of one batch, from per-example VJPs in chunks."""
    u = _factor_columns(family, lin.logits, kernel, xp)  # (N, R, C)
    fx: Any = None
    q4: Any = None
    for start, stop in _column_chunks(lin, int(u.shape[1]), max_vectors):
        g = lin.per_example_vjp(u[:, start:stop, :])  # (N, R_c, D)
        g2 = g * g
        parts = (xp.sum(g2, axis=1), xp.sum(g2 * g2, axis=(0, 1)))
        if fx is None:
            fx, q4 = parts
        else:
            fx, q4 = fx + parts[0], q4 + parts[1]
    return xp.sum(fx, axis=0), xp.sum(fx * fx, axis=0), q4


def _trace_batch(
    lin: Any, family: Family, kernel: str, per_example: bool, max_vectors: int | None, xp: Any
) -> tuple[Array, Array]:
    """(‖A‖_F², Σ_k A_kk²) of one batch (or summed per input), A the Gram of the b_k.

    Row k of A is Bᵀ J b_k over the batch (one JVP per column b_k); the
    per-example Gram matrices are its entries within the input of column k.
    """
    n = lin.num_inputs
    bfac = family.sqrt_metric(lin.logits, kernel=kernel)  # (N, C, R)
    u = xp.permute_dims(bfac, (0, 2, 1))  # (N, R, C)
    frob = diag = None
    for start, stop in _column_chunks(lin, int(u.shape[1]), max_vectors):
        r_c = stop - start
        g = lin.per_example_vjp(u[:, start:stop, :])  # (N, R_c, D)
        norms = xp.sum(g * g, axis=2)  # (N, R_c): A_kk
        jv = lin.jvp_batch(xp.reshape(g, (n * r_c, lin.num_params)))  # (K_c, N, C)
        rows = xp.matmul(xp.permute_dims(jv, (1, 0, 2)), bfac)  # (N', K_c, R)
        if per_example:
            owner = xp.arange(n * r_c, device=lin.device) // r_c  # input of column k
            same = xp.arange(n, device=lin.device)[:, None] == owner[None, :]
            rows = rows * xp.astype(same, rows.dtype)[:, :, None]
        f_part = xp.sum(rows * rows)
        d_part = xp.sum(norms * norms)
        frob = f_part if frob is None else frob + f_part
        diag = d_part if diag is None else diag + d_part
    return frob, diag


def detach_and_mix_variance(
    source: Any,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    what: str = "diagonal",
    num_probes: int = 1,
    kernel: str = "exact",
    distribution: str = "rademacher",
    per_example: bool = False,
    reduction: str = "sum",
    max_vectors: int | None = None,
    progress: bool | None = None,
) -> Array:
    """The exact variance of ``detach_and_mix``'s value, in closed form (THEORY §3).

    diagonal (D,): Σ_b 2(F_b,ii² − Σ_{k∈b} b_ik⁴) / M (Rademacher) or
    Σ_b 2 F_b,ii² / M (Gaussian), b over batches (``per_example=True``: over
    inputs). trace (0-d): Σ_b 2(‖A_b‖_F² − Σ_k (A_b)_kk²) / M (Rademacher) or
    Σ_b 2‖A_b‖_F² / M (Gaussian), A_b = G_bᵀ G_b the Gram matrix of the batch's
    (or the input's) columns b_k = J_xᵀ B_x e_r. ``reduction="mean"`` divides by
    N² (the estimate is divided by N).

    Parameters mirror ``detach_and_mix``; the result is the variance of its
    ``value`` with the same options (the same batching of ``source``).

    Cost: R per-example VJPs per input (as the exact diagonal); for the batch
    trace also R JVPs per input. Memory: ``max_vectors`` D-vectors.

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
    total: Any = None
    moments = _DiagonalMoments()
    stream = Stream(source, fam, desc="detach-and-mix variance", progress=progress)
    for lin in stream:
        xp = lin.xp
        if what == "diagonal":
            moments.add(*_diagonal_batch(lin, fam, kernel, max_vectors, xp))
            continue
        frob, diag = _trace_batch(lin, fam, kernel, per_example, max_vectors, xp)
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
    return 1.0


def _score_batch(lin: Any, family: Family, bound: bool, max_vectors: int | None, xp: Any) -> Array:
    """Σ_x [E(aᵀu)⁴ − (aᵀIa)²] (or its bound) per parameter, a = J_x[:, i].

    The per-example Jacobians (N, C, D) of the batch are formed once; the moments
    are then taken for chunks of inputs.
    """
    z = lin.logits
    n, c = lin.num_inputs, lin.num_outputs
    eye = xp.eye(c, dtype=z.dtype, device=lin.device)
    jac = lin.per_example_vjp(xp.broadcast_to(eye[None, ...], (n, c, c)))  # (N, C, D)
    chunk = max(1, _budget(lin, max_vectors) // c)
    total = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        a = xp.permute_dims(jac[start:stop, ...], (0, 2, 1))  # (n_c, D, C)
        zb = xp.broadcast_to(z[start:stop, None, :], a.shape)
        quad = xp.sum(a * family.metric_matvec(zb, a), axis=-1)  # aᵀ I a
        if bound and not isinstance(family, Gaussian):
            part = _range_bound(family, zb, a, xp) * quad
        else:
            part = family.fourth_moment(zb, a) - quad * quad
        part = xp.sum(part, axis=0)
        total = part if total is None else total + part
    return total


def _hessian_batch(
    lin: Any, family: Family, bound: bool, max_vectors: int | None, xp: Any
) -> Array:
    """Σ_x cᵀ I(z_x) c (or its bound) per parameter, c = ∂²z_x/∂θ_i²."""
    if not hasattr(lin, "output_second_derivative_diagonal"):
        msg = (
            f"{type(lin).__name__} has no output_second_derivative_diagonal, which the "
            "variance of the Hessian estimator needs (∂²z/∂θ_i²); use an adapter of "
            "fisherbound.adapters."
        )
        raise NotImplementedError(msg)
    z = lin.logits
    h = lin.output_second_derivative_diagonal(max_vectors=max_vectors)  # (N, C, D)
    n, c = lin.num_inputs, lin.num_outputs
    chunk = max(1, _budget(lin, max_vectors) // c)
    total = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        hc = xp.permute_dims(h[start:stop, ...], (0, 2, 1))  # (n_c, D, C)
        if bound:
            part = _lambda_max_bound(family) * xp.sum(hc * hc, axis=-1)
        else:
            zb = xp.broadcast_to(z[start:stop, None, :], hc.shape)
            part = xp.sum(hc * family.metric_matvec(zb, hc), axis=-1)
        part = xp.sum(part, axis=0)
        total = part if total is None else total + part
    return total


def classical_variance(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    estimator: str = "score",
    num_samples: int = 1,
    bound: bool = False,
    reduction: str = "sum",
    max_vectors: int | None = None,
    progress: bool | None = None,
) -> Array:
    """Variance of the diagonal of the classical Fisher estimators Î_1 and Î_2 (THEORY §4).

    With k labels y ~ p(· | x) per input (inputs fixed, their variances added):

    - ``estimator="score"``: Î_1 = (1/k) Σ s sᵀ, the score outer product (what
      ``fisherbound.estimators.monte_carlo`` computes), Var(Î_1,ii) =
      Σ_x (1/k)[E(aᵀu)⁴ − (aᵀ I a)²] with a = ∂z_x/∂θ_i (``family.fourth_moment``).
      Bernoulli: z'⁴ p(1−p)(1−2p)²/k per output; unit Gaussian: 2‖a‖⁴/k.
    - ``estimator="hessian"``: Î_2 = −(1/k) Σ ∂²ℓ/∂θ², Var(Î_2,ii) =
      Σ_x (1/k) cᵀ I(z_x) c with c = ∂²z_x/∂θ_i² (from the adapter's
      ``output_second_derivative_diagonal``); zero for parameters on which z is
      linear (the last layer).

    ``bound=True`` returns the bounds instead: Î_1: (range of aᵀu)² · aᵀIa / k,
    the range being max a − min a (categorical) or Σ_c ``|a_c|`` max(σ_c, 1 − σ_c)
    (Bernoulli; unit Gaussian: the exact value, aᵀu is unbounded); Î_2:
    λ̄ ‖c‖²/k with λ̄ = ½ (categorical), ¼ (Bernoulli), 1 (Gaussian), upper
    bounds of λ_max(I). ``reduction="mean"`` divides by N².

    Returns
    -------
    array (D,)
        In the linearization's namespace and device.

    Notes
    -----
    Cost: Î_1: C per-example VJPs per input (the per-example Jacobians, chunked
    by ``max_vectors``) and O(N D C) for the moments; Î_2: the adapter's second
    derivatives (torch/JAX: D forward-over-forward passes of the batch).

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
    total: Any = None
    stream = Stream(source, fam, desc=f"{estimator} estimator variance", progress=progress)
    for lin in stream:
        xp = lin.xp
        if estimator == "score":
            part = _score_batch(lin, fam, bound, max_vectors, xp)
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
    """One row of ``compare_estimators``: accuracy and cost of one estimator.

    Attributes
    ----------
    name
        ``"detach_and_mix"``, ``"detach_and_mix_per_example"``, ``"monte_carlo"``
        or ``"exact"``.
    relative_variance
        E‖d̂ − d‖² / ‖d‖² for ONE draw (one probe, one label sample), d the exact
        diagonal: the squared relative error of one draw (0 for the exact one).
    seconds
        Measured wall time of one call with one draw on the given data.
    draws
        Draws needed to reach the target relative error, ⌈relative_variance / t²⌉.
    seconds_to_target
        draws × seconds: the time to reach the target (linear in the draws, an
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
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    target_relative_error: float = 0.1,
    rng: Any = 0,
    max_vectors: int | None = None,
    estimators: Sequence[str] | None = None,
) -> Comparison:
    """Which diagonal estimator reaches a given accuracy soonest, on YOUR model and data.

    For each of the batch-level detach-and-mix, the per-example detach-and-mix,
    the Monte-Carlo Fisher (one label sample per draw) and the exact diagonal, it
    computes the exact variance of one draw in closed form
    (``detach_and_mix_variance``, ``classical_variance``), summarised as the
    squared relative error E‖d̂ − d‖²/‖d‖², times one call on the data, and
    reports the number of draws and the time needed to reach
    ``target_relative_error`` (the exact diagonal needs one pass). ``best`` is
    the fastest to the target.

    ``source`` is materialised (a list of linearizations): pass a representative
    sample of batches. ``estimators`` selects rows (default all four).

    Returns
    -------
    Comparison
        ``rows`` (``EstimatorCost``: plain Python numbers, a report for humans),
        ``best`` and ``target_relative_error``; ``to_markdown()`` renders it.

    Notes
    -----
    Cost: the closed forms need the per-example VJPs of the exact diagonal (C
    per input) and of the Jacobian (C per input), plus one timed call of each
    estimator after a warm-up call.

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
    chosen = list(names) if estimators is None else list(estimators)
    for name in chosen:
        check_choice(name, "estimators entries", names)
    check_optional_int(max_vectors, "max_vectors")
    lins = list(Stream(source, fam, desc="compare estimators", progress=False))
    moments = _DiagonalMoments()
    mc_var: Any = None
    for lin in lins:
        xp = lin.xp
        moments.add(*_diagonal_batch(lin, fam, "exact", max_vectors, xp))
        if "monte_carlo" in chosen:
            part = _score_batch(lin, fam, False, max_vectors, xp)
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
        "exact": lambda: fisher_diagonal(lins, fam, max_vectors=max_vectors, progress=False),
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
