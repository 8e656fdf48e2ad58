"""The result type of every random estimate and the sample statistics behind it.

One home for the mean/variance computations: ``estimate_from_samples`` (one set
of M samples), ``variance_of_mean`` (one stratum of ``fisherbound.estimators.
Accumulator``) and ``MeanVariance`` (Hutchinson's streaming merge of sample
blocks of the same quantity).
"""

from __future__ import annotations

from typing import Any, NamedTuple

Array = Any


class Estimate(NamedTuple):
    """A random estimate with its standard error.

    Attributes
    ----------
    value
        The estimate (the sample mean over probes), an array of the input's
        namespace and device (0-d for a scalar).
    std_error
        The standard error of ``value``, same shape: the sample standard deviation
        of the per-probe estimates divided by √num_probes. NaN when
        ``num_probes == 1`` (one sample has no sample variance).
    num_probes
        How many independent probes were averaged.
    """

    value: Array
    std_error: Array
    num_probes: int


def estimate_from_samples(samples: Array, xp: Any) -> Estimate:
    """Mean and standard error over the leading axis of ``samples`` (M, ...).

    The standard error is s / √M with the unbiased sample variance s²; NaN for M = 1.
    """
    m = int(samples.shape[0])
    mean = xp.mean(samples, axis=0)
    if m > 1:
        se = xp.sqrt(variance_of_mean(samples, mean, m, xp))
    else:
        se = xp.full_like(mean, float("nan"))
    return Estimate(mean, se, m)


def variance_of_mean(s: Array, mu: Array, m: int, xp: Any) -> Array:
    """s²/M, the estimated variance of the mean ``mu`` of the M samples ``s`` (NaN for M < 2)."""
    if m < 2:
        return xp.full_like(mu, float("nan"))
    return xp.sum((s - mu) ** 2, axis=0) / ((m - 1) * m)


class MeanVariance:
    """Streaming mean and sum of squared deviations over batches of samples.

    Batches are merged with Chan et al.'s pairwise update, which keeps the
    variance accurate without holding every sample (the diagonal estimator would
    otherwise hold an (M, n) array).
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self.count = 0
        self.mean: Array = None
        self.m2: Array = None

    def add(self, samples: Array) -> None:
        xp = self.xp
        b = int(samples.shape[0])
        mean_b = xp.mean(samples, axis=0)
        m2_b = xp.sum((samples - mean_b) ** 2, axis=0)
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
        if m > 1:
            se = xp.sqrt(self.m2 / ((m - 1) * m))
        else:
            se = xp.full_like(self.mean, float("nan"))
        return Estimate(self.mean, se, m)
