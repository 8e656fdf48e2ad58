"""Host copies of results and the summary statistics the report quotes.

Every number of the report is computed on the host (NumPy, float64) from the
results of the library's public functions: relative errors against the exact
diagonal, the coverage of the estimates' 95% confidence intervals
(``Estimate.interval``), summaries over inputs.
"""

from __future__ import annotations

import math
from typing import Any


def host(x: Any) -> Any:
    """A float64 NumPy copy of an array of any backend."""
    import numpy as np

    from fisherbound._lib import to_host

    return np.asarray(to_host(x), dtype=float)


def stats(values: Any) -> dict[str, float]:
    """Minimum, median, mean and maximum, as Python floats."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {
        "min": float(np.min(v)),
        "median": float(np.median(v)),
        "mean": float(np.mean(v)),
        "max": float(np.max(v)),
    }


def relative_error(estimate: Any, exact: Any) -> float:
    """‖estimate − exact‖ / ‖exact‖ (NaN when exact is zero)."""
    import numpy as np

    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(estimate - exact)) / norm if norm > 0 else math.nan


#: The confidence level of every interval the report shows.
LEVEL = 0.95


def coverage(low: Any, high: Any, std_error: Any, exact: Any) -> float | None:
    """Fraction of the random entries whose interval [low, high] holds the exact value.

    Random entries: those with a finite, positive standard error (None if there
    are none: an exact or deterministic result makes no claim).
    """
    import numpy as np

    ok = np.isfinite(std_error) & (std_error > 0)
    if not np.any(ok):
        return None
    return float(np.mean((low[ok] <= exact[ok]) & (exact[ok] <= high[ok])))


def interval(estimate: Any) -> tuple[Any, Any]:
    """Host float64 copies of ``estimate.interval(LEVEL)``."""
    low, high = estimate.interval(LEVEL)
    return host(low), host(high)


def scalar_interval(estimate: Any) -> list[float] | None:
    """``[low, high]`` of a scalar estimate's interval as floats (None where it is NaN)."""
    low, high = (float(b) for b in interval(estimate))
    return None if math.isnan(low) or math.isnan(high) else [low, high]


def samples_interval(samples: Any) -> list[float] | None:
    """The interval of the mean of host samples (M,) that are ≥ 0 (None for M = 1)."""
    import numpy as np

    from fisherbound._lib import estimate_from_samples

    if samples.shape[0] < 2:
        return None
    return scalar_interval(estimate_from_samples(np.asarray(samples, float), np, floor=0.0))


def median_relative_se(std_error: Any, exact: Any) -> float | None:
    """Median of std_error / exact over the entries with exact > 0 (None if none)."""
    import numpy as np

    ok = np.isfinite(std_error) & (exact > 0)
    if not np.any(ok):
        return None
    return float(np.median(std_error[ok] / exact[ok]))


def bracket_tolerance(eps: float, *arrays: Any) -> Any:
    """Rounding allowance for lower ≤ exact ≤ upper: 100 ε times the entries' size."""
    import numpy as np

    scale = sum(np.abs(a) for a in arrays)
    return 100.0 * eps * scale + eps * float(np.max(scale, initial=0.0))


def mean_se(samples: Any) -> tuple[float, float | None]:
    """Mean of the samples and its standard error (None from a single sample)."""
    import numpy as np

    m = samples.shape[0]
    mean = float(np.mean(samples))
    return mean, (float(np.std(samples, ddof=1) / math.sqrt(m)) if m > 1 else None)


def scalar_estimate(estimate: Any) -> dict[str, Any]:
    """``{"value", "std_error", "interval"}`` of a scalar estimate, as Python floats.

    ``interval``: ``[low, high]`` of its 95% confidence interval (None when the
    standard error is unknown).
    """
    return {
        "value": float(host(estimate.value)),
        "std_error": float(host(estimate.std_error)),
        "interval": scalar_interval(estimate),
    }
