"""The result type of every random estimate and the sample statistics behind it.

One home for the mean/variance computations: ``estimate_from_samples`` (one set
of M samples), ``variance_of_mean`` (one stratum of ``fisherbound.estimators.
Accumulator``) and ``MeanVariance`` (Hutchinson's streaming merge of sample
blocks of the same quantity), and for the confidence interval of an estimate
(``Estimate.interval``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

Array = Any

#: The interval's half-width is at least this many units in the last place of
#: ``|value|`` (``ROUNDING_ULPS · eps · |value|``, eps of the value's dtype): an
#: entry whose probes all give the same number (standard error 0) is exact up to
#: the rounding of the sums behind it, which puts the exactly computed value a few
#: ulps away (at most 3.4 over 300 seeds, per-example Bernoulli, the MLP of
#: tests/test_coverage.py).
ROUNDING_ULPS = 256

#: For an estimate with a ``floor`` the Student-t dof d is lowered to
#: d / (1 + SKEW_DOF · d · c²) (c = SE / (value − floor)): the variance of
#: right-skewed samples is itself more variable than a normal sample's (a gamma
#: sample has excess kurtosis 6 M c²); the cube-root scale absorbs most of that,
#: and this factor, set by simulation on squared Gaussians (the most skewed
#: estimates here), the rest (docs/estimators.md, "Error bars and intervals").
SKEW_DOF = 0.6


class Estimate(NamedTuple):
    r"""A random estimate with its standard error and confidence interval.

    Attributes
    ----------
    value
        The estimate (the sample mean over probes), an array of the input's
        namespace and device (0-d for a scalar; a dict of arrays for blocks).
    std_error
        The standard error of ``value``, same shape: the sample standard deviation
        of the per-probe estimates divided by :math:`\sqrt{\mathtt{num\_probes}}`. NaN when
        ``num_probes == 1`` (one sample has no sample variance).
    num_probes
        How many independent probes were averaged.
    dof
        The degrees of freedom of the variance estimate behind ``std_error``: a
        number, or an array of the value's shape where it differs per entry (the
        Welch–Satterthwaite dof of a sum over batches, see
        ``fisherbound.estimators.Accumulator``). None means ``num_probes − 1``;
        ``math.inf`` for a deterministic result (standard error 0).
    floor
        A number (or 0-d array) that every per-probe estimate is :math:`\ge`, or None:
        0 for sums of squares (the Fisher estimators' diagonal and trace,
        Hutchinson's trace of a positive semidefinite matrix). Estimates bounded
        below are right-skewed; ``interval`` corrects for it.

    Examples
    --------
    >>> import numpy as np
    >>> est = Estimate(np.array(10.0), np.array(1.0), 5)
    >>> est.degrees_of_freedom
    4
    >>> low, high = est.interval()
    >>> round(float(low), 3), round(float(high), 3)
    (7.224, 12.776)
    """

    value: Array
    std_error: Array
    num_probes: int
    dof: Any = None
    floor: Any = None

    @property
    def degrees_of_freedom(self) -> Any:
        """``dof``, or ``num_probes − 1`` when it is None."""
        return self.num_probes - 1 if self.dof is None else self.dof

    def interval(self, level: float = 0.95) -> tuple[Array, Array]:
        r"""The two-sided confidence interval ``(low, high)`` at ``level``.

        Student t with the estimate's degrees of freedom :math:`d` (``dof``): with
        :math:`q = t_d((1 + \mathrm{level})/2)`,

        .. math::

           \mathrm{low}, \mathrm{high} = \mathrm{value} \mp q \cdot \mathrm{std\_error},

        which covers the truth with probability ``level`` for normal per-probe
        estimates, also with few probes, where :math:`\mathrm{value} \pm 1.96\, \mathrm{SE}`
        does not (1.96 is :math:`q` for :math:`d = \infty`; :math:`d = 1` gives
        :math:`q = 12.7`).

        With a ``floor`` :math:`f` (sums of squares: :math:`f = 0`) the per-probe estimates
        are right-skewed (a low value comes with a small standard error, and the
        Student-t interval then ends below the truth). The interval is then
        Student t on the cube-root scale of :math:`\mathrm{value} - f` (Wilson–Hilferty: the
        cube root of a gamma variable is nearly normal): with
        :math:`c = \mathrm{SE} / (\mathrm{value} - f)`,

        .. math::

           \mathrm{low} &= f + (\mathrm{value} - f) / (1 - c^2/9 + q c/3)^3, \\
           \mathrm{high} &= f + (\mathrm{value} - f) / (1 - c^2/9 - q c/3)^3,

        ``high = inf`` when the bracket is :math:`\le 0` (few probes with a large relative
        error cannot bound the value from above), and :math:`q = t_{d'}` with
        :math:`d' = d / (1 + 0.6\, d c^2)` (``SKEW_DOF``): the variance of skewed samples
        is less certain than :math:`d` says. For small :math:`c` this is
        :math:`\mathrm{value} \mp q \cdot \mathrm{SE}`.

        Rounding: the half-widths are at least ``ROUNDING_ULPS`` (256) units in
        the last place of ``|value|``, so an entry whose probes all agree
        (standard error 0: exact up to rounding) still covers the exactly
        computed value. NaN where the standard error is NaN (one probe).

        Parameters
        ----------
        level
            The confidence level, :math:`0 < \mathrm{level} < 1`.

        Returns
        -------
        tuple
            ``(low, high)``, arrays of the value's shape, namespace and device
            (dicts of them for a dict value).

        Notes
        -----
        The Student-t quantiles are computed on the host
        (``scipy.special.stdtrit``, which takes non-integer :math:`d`); an array ``dof``
        (and, with a floor, :math:`c`) is copied there, so call it outside traced (JAX
        ``jit``) code. docs/estimators.md gives the coverage measured for every
        estimator.

        Examples
        --------
        >>> import numpy as np
        >>> est = Estimate(np.array([2.0, 3.0]), np.array([0.5, 0.0]), 2)
        >>> low, high = est.interval()
        >>> low.round(3).tolist(), high.round(3).tolist()
        ([-4.353, 3.0], [8.353, 3.0])
        >>> est = Estimate(np.array(2.0), np.array(0.5), 10, floor=0.0)
        >>> [round(float(b), 3) for b in est.interval()]
        [1.182, 3.99]
        """
        if isinstance(level, bool) or not isinstance(level, int | float):
            msg = f"level must be a number between 0 and 1; got {type(level).__name__}."
            raise TypeError(msg)
        if not 0.0 < float(level) < 1.0:
            msg = (
                "level must lie strictly between 0 and 1 (e.g. 0.95 for a 95% interval); "
                f"got {level!r}."
            )
            raise ValueError(msg)
        p = (1.0 + float(level)) / 2.0
        dof = self.degrees_of_freedom
        if isinstance(self.value, dict):
            pairs = {
                k: _interval(
                    v,
                    self.std_error[k],
                    dof[k] if isinstance(dof, dict) else dof,
                    p,
                    self.floor[k] if isinstance(self.floor, dict) else self.floor,
                )
                for k, v in self.value.items()
            }
            return {k: lo for k, (lo, _) in pairs.items()}, {k: hi for k, (_, hi) in pairs.items()}
        return _interval(self.value, self.std_error, dof, p, self.floor)


def _quantile(dof: Any, c: Any, p: float, like: Array, xp: Any) -> Any:
    """t_d'(p) with d' = d / (1 + SKEW_DOF · d · c²) (c None: d' = d).

    A float for a scalar dof without c, else an array like ``like`` (on its
    device); NaN where d' is not positive.
    """
    from scipy.special import stdtrit

    from fisherbound._lib._namespace import device_of, to_host

    if c is None and isinstance(dof, int | float):
        d = float(dof)
        return float(stdtrit(d, p)) if d > 0.0 else math.nan
    import numpy as np

    dofs = np.asarray(to_host(dof) if not isinstance(dof, int | float) else dof, dtype=np.float64)
    if c is not None:
        c2 = np.asarray(to_host(c), dtype=np.float64) ** 2
        with np.errstate(invalid="ignore"):
            dofs = np.where(np.isinf(dofs), dofs, dofs / (1.0 + SKEW_DOF * dofs * c2))
    ok = dofs > 0.0
    q = np.where(ok, stdtrit(np.where(ok, dofs, 1.0), p), np.nan)
    return xp.asarray(q, dtype=like.dtype, device=device_of(like))


def _interval(value: Array, se: Array, dof: Any, p: float, floor: Any) -> tuple[Array, Array]:
    """(low, high) of one array: see ``Estimate.interval``."""
    from fisherbound._lib._namespace import array_namespace

    xp = array_namespace(value, se, names=("value", "std_error"))
    if not xp.isdtype(value.dtype, "real floating"):
        msg = (
            f"interval needs a real floating value (its rounding floor is in units of the "
            f"dtype's eps); got {value.dtype}. Convert with xp.astype(value, xp.float64)."
        )
        raise TypeError(msg)
    if tuple(value.shape) != tuple(se.shape):
        msg = (
            "interval needs value and std_error of one shape; got value "
            f"{tuple(value.shape)} and std_error {tuple(se.shape)} (a what='full' estimate's "
            "value is a factor V with F̂ = VᵀV, and its std_error belongs to the diagonal "
            "of VᵀV: compute that diagonal, xp.sum(V * V, axis=0), for its interval)."
        )
        raise ValueError(msg)
    zero = xp.zeros_like(se)
    rounding = (ROUNDING_ULPS * xp.finfo(value.dtype).eps) * xp.abs(value)
    if floor is None:
        q = _quantile(dof, None, p, value, xp)
        # A standard error of 0 is an exact entry, whatever its dof (0 · t_d is 0,
        # even where d is 0 or NaN); a NaN standard error stays NaN.
        half = xp.maximum(xp.where(se == 0, zero, q * se), rounding)
        return value - half, value + half
    shift = value - floor
    positive = (shift > 0) & (se > 0)
    one = xp.ones_like(value)
    safe = xp.where(positive, shift, one)
    c = xp.where(positive, se, zero) / safe
    q = _quantile(dof, c, p, value, xp)
    half = xp.maximum(xp.where(se == 0, zero, q * se), rounding)
    centre = 1.0 - c * c / 9.0
    spread = q * c / 3.0
    up = centre - spread
    low = floor + safe / (centre + spread) ** 3
    high = xp.where(up > 0, floor + safe / xp.where(up > 0, up, one) ** 3, xp.inf)
    low = xp.where(positive, xp.minimum(low, value - rounding), value - half)
    high = xp.where(positive, xp.maximum(high, value + rounding), value + half)
    return low, high


def estimate_from_samples(samples: Array, xp: Any, *, floor: Any = None) -> Estimate:
    """Mean and standard error over the leading axis of ``samples`` (M, ...).

    The standard error is s / √M with the unbiased sample variance s²; NaN for M = 1.
    Its degrees of freedom are M − 1. ``floor``: a bound below every sample, if
    known (0 for squares; see ``Estimate``).
    """
    m = int(samples.shape[0])
    # Scaled by the largest |sample| of each entry, so that neither the sum of the
    # mean nor the squared deviations overflow where the result is representable
    # (samples near the dtype's largest value). Two more passes over the samples.
    top = xp.max(xp.abs(samples), axis=0) if m else xp.sum(samples, axis=0)
    scale = xp.where(xp.isfinite(top) & (top > 0), top, xp.ones_like(top))
    scaled = samples / scale
    mean_scaled = xp.mean(scaled, axis=0)
    mean = mean_scaled * scale
    if m > 1:
        se = xp.sqrt(variance_of_mean(scaled, mean_scaled, m, xp)) * scale
    else:
        se = xp.full_like(mean, float("nan"))
    return Estimate(mean, se, m, m - 1, floor)


def variance_of_mean(s: Array, mu: Array, m: int, xp: Any) -> Array:
    """s²/M, the estimated variance of the mean ``mu`` of the M samples ``s`` (NaN for M < 2)."""
    if m < 2:
        return xp.full_like(mu, float("nan"))
    return xp.sum((s - mu) ** 2, axis=0) / ((m - 1) * m)


class MeanVariance:
    """Streaming mean and sum of squared deviations over batches of samples.

    Batches are merged with Chan et al.'s pairwise update, which keeps the
    variance accurate without holding every sample (the diagonal estimator would
    otherwise hold an (M, n) array). Everything is held divided by ``scale``, the
    largest |sample| of each entry so far (raised, and the sums rescaled, when a
    batch brings a larger one), so that no sum or square overflows where the
    mean and its standard error are representable.
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        #: A bound below every sample, if known (see ``Estimate.floor``).
        self.floor: Any = None
        self.count = 0
        self.scale: Array = None
        self.mean: Array = None  # of the samples / scale
        self.m2: Array = None  # of the samples / scale

    def add(self, samples: Array) -> None:
        xp = self.xp
        b = int(samples.shape[0])
        top = xp.max(xp.abs(samples), axis=0)
        top = xp.where(xp.isfinite(top) & (top > 0), top, xp.ones_like(top))
        if self.count == 0:
            scale = top
        else:
            scale = xp.maximum(self.scale, top)
            ratio = self.scale / scale
            self.mean, self.m2 = self.mean * ratio, self.m2 * ratio**2
        self.scale = scale
        scaled = samples / scale
        mean_b = xp.mean(scaled, axis=0)
        m2_b = xp.sum((scaled - mean_b) ** 2, axis=0)
        if self.count == 0:
            self.mean, self.m2 = mean_b, m2_b
        else:
            total = self.count + b
            delta = mean_b - self.mean
            self.mean = self.mean + delta * (b / total)
            self.m2 = self.m2 + m2_b + delta**2 * (self.count * b / total)
        self.count += b

    def estimate(self) -> Estimate:
        xp = self.xp
        m = self.count
        mean = self.mean * self.scale
        if m > 1:
            se = xp.sqrt(self.m2 / ((m - 1) * m)) * self.scale
        else:
            se = xp.full_like(mean, float("nan"))
        return Estimate(mean, se, m, m - 1, self.floor)
