"""Hutchinson trace and diagonal estimators, and Hutch++."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fisherbound._lib import (
    DISTRIBUTIONS,
    Estimate,
    MeanVariance,
    RngLike,
    as_generator,
    check_choice,
    check_positive_int,
    estimate_from_samples,
    is_traced,
    probes,
    sum_is_finite,
)
from fisherbound.linalg._operator import LinearOperatorLike, _as_square_operator

if TYPE_CHECKING:  # only for the annotations
    import scipy.sparse.linalg

Array = Any

__all__ = ["hutchinson_diagonal", "hutchinson_trace", "hutchpp_trace"]

#: Default cap on the entries of one probe block (n × batch): 2**24 (128 MiB in float64).
DEFAULT_BLOCK_ENTRIES = 2**24


def _check_samples(xp: Any, samples: Array, dtype: Any) -> None:
    """A ValueError if the samples (v ⊙ Av, or vᵀAv) overflowed ``dtype``.

    One pass (their sum); entry by entry only when that sum is not finite. Traced
    samples (inside jax.jit) have no value to check: they pass.
    """
    if is_traced(samples):
        return
    if bool(sum_is_finite(samples, xp)) or bool(xp.all(xp.isfinite(samples))):
        return
    msg = (
        f"the probe products of A overflow {dtype}: A has entries or a spread too close to "
        f"the largest {dtype} ({float(xp.finfo(dtype).max):.3g}). Rescale A (estimate for "
        "A / s and multiply by s) or compute in float64."
    )
    raise ValueError(msg)


def _hutchinson(
    A: Any,
    num_probes: object,
    distribution: object,
    rng: RngLike,
    batch_size: object,
    *,
    diagonal: bool,
) -> Estimate:
    """The front and loop of ``hutchinson_trace`` and ``hutchinson_diagonal``."""
    op, xp = _as_square_operator(A)
    n = int(op.shape[0])
    m = check_positive_int(num_probes, "num_probes")
    dist = check_choice(distribution, "distribution", DISTRIBUTIONS)
    if batch_size is None:
        block = max(1, DEFAULT_BLOCK_ENTRIES // max(n, 1))
    else:
        block = check_positive_int(batch_size, "batch_size")
    gen = as_generator(rng)
    acc = MeanVariance(xp)
    negative: Any = None  # whether some trace sample was < 0 (one host read at the end)
    left = m
    while left > 0:
        b = min(block, left)
        # Drawn as (b, n), one probe per row, so Gaussian streams do not depend on b.
        V = xp.matrix_transpose(
            probes(gen, (b, n), distribution=dist, xp=xp, dtype=op.dtype, device=op.device)
        )
        prod = V * op.matmat(V)
        if diagonal:
            _check_samples(xp, prod, op.dtype)
            acc.add(xp.matrix_transpose(prod))
        else:
            samples = xp.sum(prod, axis=0)
            _check_samples(xp, samples, op.dtype)
            below = xp.any(samples < 0)
            negative = below if negative is None else negative | below
            acc.add(samples)
        left -= b
    # Trace samples vᵀAv that are all ≥ 0 (always, for a PSD A) are right-skewed
    # sums of squares: their interval is taken on the cube-root scale.
    if negative is not None and not is_traced(negative) and not bool(negative):
        acc.floor = 0.0  # traced (inside jax.jit): unknown, the symmetric interval
    return acc.estimate()


def hutchinson_trace(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    rng: RngLike = None,
    batch_size: int | None = None,
) -> Estimate:
    r"""Hutchinson's unbiased estimate of :math:`\operatorname{tr} A`.

    .. math::

       \widehat{\operatorname{tr}} A = \frac1M \sum_{i=1}^M v_i^\top A v_i,
       \qquad v_i \text{ i.i.d. Rademacher or standard Gaussian.}

    Variance of one sample (:math:`A` symmetric): Rademacher
    :math:`2 (\lVert A \rVert_F^2 - \sum_i a_{ii}^2)` (zero for a diagonal :math:`A`: the
    estimate is then exact), Gaussian :math:`2 \lVert A \rVert_F^2`. The reported
    ``std_error`` is the sample standard deviation of the :math:`M` per-probe values
    divided by :math:`\sqrt{M}` (NaN for :math:`M = 1`), with :math:`M - 1` degrees of
    freedom (``dof``). When every per-probe value is :math:`\ge 0` (always, for a
    positive semidefinite :math:`A`) the estimate has ``floor`` 0 and its
    ``interval`` is Student t on the cube-root scale, which allows for the right
    skew of such sums (``fisherbound.Estimate.interval``); otherwise Student t.
    Inside ``jax.jit`` the signs cannot be read: ``floor`` is None (Student t).

    Parameters
    ----------
    A
        A square operator (``LinearOperatorLike``) or a dense (n, n) floating array.
    num_probes
        :math:`M \ge 1`, the number of probe vectors.
    distribution
        ``"rademacher"`` (entries :math:`\pm 1`, never worse than Gaussian) or ``"gaussian"``.
    rng
        A ``numpy.random.Generator``, an int seed, a JAX key or None. Probes are drawn on the
        host, so one seed gives the same estimate on every backend.
    batch_size
        Probes applied per ``matmat`` call (memory :math:`n \times` ``batch_size``); None:
        all :math:`M` at once up to 2**24 probe entries (:math:`n \times` ``batch_size``), in
        blocks above that.
        Gaussian probes do not depend on it; Rademacher probes for one seed do
        (the host generator packs signs differently for different batch sizes).

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error`` in :math:`A`'s namespace, dtype and device,
        ``num_probes``, ``dof`` :math:`M - 1` and ``floor``; ``est.interval(0.95)``
        is the 95% confidence interval.

    Notes
    -----
    Cost: :math:`M` matvecs (in :math:`\lceil M / \mathrm{batch\_size} \rceil` ``matmat``
    calls) and :math:`O(n M)` extra work.

    Examples
    --------
    >>> import numpy as np
    >>> est = hutchinson_trace(np.diag([1.0, 2.0, 3.0]), num_probes=4, rng=0)
    >>> float(est.value), float(est.std_error)
    (6.0, 0.0)
    """
    return _hutchinson(A, num_probes, distribution, rng, batch_size, diagonal=False)


def hutchinson_diagonal(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    rng: RngLike = None,
    batch_size: int | None = None,
) -> Estimate:
    r"""Unbiased estimate of the diagonal of :math:`A` (Bekas, Kokiopoulou, Saad 2007).

    .. math::

       \widehat{\operatorname{diag}} A = \frac1M \sum_{i=1}^M v_i \odot A v_i.

    Variance of one sample, entry :math:`i`: Rademacher :math:`\sum_{j \ne i} a_{ij}^2`
    (zero for a diagonal :math:`A`), Gaussian :math:`a_{ii}^2 + \sum_j a_{ij}^2`
    (:math:`A` symmetric). ``std_error`` is the per-entry sample standard deviation
    over probes divided by :math:`\sqrt{M}`, with :math:`M - 1` degrees of freedom:
    ``est.interval(0.95)`` is the Student-t interval (the Rademacher samples
    :math:`a_{ii} + v_i \sum_{j \ne i} a_{ij} v_j` are symmetric about :math:`a_{ii}`).

    Parameters
    ----------
    A, num_probes, distribution, rng, batch_size
        As in ``hutchinson_trace``.

    Returns
    -------
    Estimate
        ``value`` and ``std_error`` of shape (n,).

    Notes
    -----
    Cost: :math:`M` matvecs; memory :math:`O(n \times \mathrm{batch\_size})` (samples are
    merged batch by batch, never stored as an (M, n) array).

    Examples
    --------
    >>> import numpy as np
    >>> est = hutchinson_diagonal(np.diag([1.0, 2.0]), num_probes=3, rng=0)
    >>> est.value.tolist(), est.std_error.tolist()
    ([1.0, 2.0], [0.0, 0.0])
    """
    return _hutchinson(A, num_probes, distribution, rng, batch_size, diagonal=True)


def _hutchpp(xp: Any, op: Any, *, num_probes: int, distribution: str, gen: Any) -> Estimate:
    n = int(op.shape[0])
    s = num_probes // 3
    g = num_probes - 2 * s
    kw = {"distribution": distribution, "xp": xp, "dtype": op.dtype, "device": op.device}
    S = xp.matrix_transpose(probes(gen, (s, n), **kw))
    Q, _ = xp.linalg.qr(op.matmat(S))
    low_rank = xp.sum(Q * op.matmat(Q))
    G = xp.matrix_transpose(probes(gen, (g, n), **kw))
    PG = G - Q @ (xp.matrix_transpose(Q) @ G)
    samples = xp.sum(PG * op.matmat(PG), axis=0)
    _check_samples(xp, samples, op.dtype)
    residual = estimate_from_samples(samples, xp)
    # The error is the residual's: g probes, g − 1 degrees of freedom. Residual
    # samples all ≥ 0 (always, for a PSD A) make every per-probe estimate ≥ tr(QᵀAQ).
    below = xp.any(samples < 0)
    floor = low_rank if not is_traced(below) and not bool(below) else None
    return Estimate(low_rank + residual.value, residual.std_error, num_probes, g - 1, floor)


def hutchpp_trace(
    A: LinearOperatorLike | scipy.sparse.linalg.LinearOperator | Array,
    /,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    rng: RngLike = None,
) -> Estimate:
    r"""Hutch++ estimate of :math:`\operatorname{tr} A` (Meyer, Musco, Musco, Woodruff 2021).

    With :math:`s = \lfloor M/3 \rfloor` and :math:`g = M - 2s`: sketch :math:`S`
    (:math:`n \times s`), :math:`Q = \operatorname{orth}(A S)` (QR), then

    .. math::

       \widehat{\operatorname{tr}} A = \operatorname{tr}(Q^\top A Q)
       + \frac1g \sum_{i=1}^g g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i .

    Unbiased for every :math:`Q`, because :math:`\operatorname{tr} A =
    \operatorname{tr}(Q^\top A Q) + \operatorname{tr}((I - QQ^\top) A (I - QQ^\top))`.
    The deflated part removes the top of the spectrum, so the error decays like
    :math:`1/M` instead of :math:`1/\sqrt{M}` for matrices with decaying spectra (a PSD
    :math:`A` has relative error :math:`O(1/M)`); it is exact when
    :math:`\operatorname{rank} A \le s`. ``std_error`` is the residual Hutchinson part's
    sample standard deviation over :math:`\sqrt{g}` (NaN when :math:`g = 1`), i.e.
    conditional on the sketch, with :math:`g - 1` degrees of freedom (``dof``). When the
    residual samples are all :math:`\ge 0` (always, for a PSD :math:`A`) the estimate's
    ``floor`` is :math:`\operatorname{tr}(Q^\top A Q)` and ``est.interval(0.95)`` allows
    for their right skew
    (``fisherbound.Estimate.interval``); otherwise it is Student t.

    Parameters
    ----------
    A, distribution, rng
        As in ``hutchinson_trace`` (the sketch and the residual probes share the
        distribution).
    num_probes
        :math:`M \ge 3`, the total number of matvecs: :math:`s` for the sketch, :math:`s`
        for :math:`Q^\top A Q`, :math:`g` for the residual.

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error``; ``num_probes`` is :math:`M`, ``dof`` :math:`g - 1`.

    Notes
    -----
    Cost: exactly :math:`M` matvecs in three ``matmat`` calls, a QR of an
    :math:`n \times s` matrix and :math:`O(n s g)` extra work.

    Examples
    --------
    >>> import numpy as np
    >>> u = np.array([[1.0], [2.0], [2.0]])
    >>> est = hutchpp_trace(u @ u.T, num_probes=6, rng=0)   # rank 1 ≤ 6 // 3
    >>> round(float(est.value), 10), float(est.std_error) < 1e-12
    (9.0, True)
    """
    op, xp = _as_square_operator(A)
    m = check_positive_int(num_probes, "num_probes")
    if m < 3:
        msg = (
            f"num_probes must be at least 3 for Hutch++ (a third each for the sketch, the "
            f"low-rank trace and the residual); got {m}. Use hutchinson_trace for fewer."
        )
        raise ValueError(msg)
    dist = check_choice(distribution, "distribution", DISTRIBUTIONS)
    gen = as_generator(rng)
    return _hutchpp(xp, op, num_probes=m, distribution=dist, gen=gen)
