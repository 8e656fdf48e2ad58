"""The result type of every random estimate, and its mergeable accumulator."""

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
        var = xp.sum((samples - mean) ** 2, axis=0) / (m - 1)
        se = xp.sqrt(var / m)
    else:
        se = xp.full_like(mean, float("nan"))
    return Estimate(mean, se, m)
