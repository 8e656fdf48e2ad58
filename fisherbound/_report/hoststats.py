"""Host copies of results and the summary statistics the report quotes.

Every number of the report is computed on the host (NumPy, float64) from the
results of the library's public functions: relative errors against the exact
diagonal, the coverage of ±2 standard errors, summaries over inputs.
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


def coverage(estimate: Any, std_error: Any, exact: Any) -> float | None:
    """Fraction of entries with |estimate − exact| ≤ 2 standard errors (None if no SE)."""
    import numpy as np

    ok = np.isfinite(std_error) & (std_error > 0)
    if not np.any(ok):
        return None
    return float(np.mean(np.abs(estimate[ok] - exact[ok]) <= 2.0 * std_error[ok]))


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


def scalar_estimate(estimate: Any) -> dict[str, float]:
    """``{"value", "std_error"}`` of a scalar estimate, as Python floats."""
    return {
        "value": float(host(estimate.value)),
        "std_error": float(host(estimate.std_error)),
    }
