"""The report's numbers on the Fisher diagonal, and the estimators compared.

The exact diagonal (``fisher_diagonal``), its deterministic bounds
(``fisher_bounds``) and the detach-and-mix estimate (``detach_and_mix``) per
parameter block; then every estimator run on the same inputs, its error against
the exact diagonal and its wall-clock cost in gradient steps of the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from fisherbound._report.hoststats import (
    bracket_tolerance,
    coverage,
    host,
    interval,
    mean_se,
    median_relative_se,
    relative_error,
    samples_interval,
)
from fisherbound._report.settings import Settings
from fisherbound._report.subjects import Subject
from fisherbound._report.timing import timed

#: The Fisher-diagonal vectors go into report.json up to this many parameters.
MAX_JSON_PARAMS = 100_000


def diagonal_estimate(lin: Any, fam: Any, cfg: Settings) -> tuple[Any, dict[str, Any]]:
    """The diagonal estimate and, from the same probes, per-probe block traces."""
    import numpy as np

    from fisherbound.estimators import detach_and_mix

    options: dict[str, Any] = {"num_probes": cfg.num_probes, "rng": cfg.seed}
    if cfg.target_error is not None:
        options["target_relative_error"] = cfg.target_error
    diag = detach_and_mix(lin, fam, progress=cfg.progress, **options)
    # what="full" returns V = [g_1; …; g_M] / √M for the same probes: the per-probe
    # trace of block b is M ‖V[m, b]‖², whose spread gives the block's error bar.
    full = detach_and_mix(lin, fam, what="full", progress=False, **options)
    v = host(full.value)
    m = int(v.shape[0])
    per_probe = {
        blk.name: m * np.sum(v[:, blk.offset : blk.offset + blk.size] ** 2, axis=1)
        for blk in lin.blocks
    }
    per_probe["total"] = m * np.sum(v**2, axis=1)
    return diag, per_probe


def diagonal_numbers(
    blocks: Sequence[Any],
    exact: Any,
    lower: Any,
    upper: Any,
    diag_est: Any,
    trace_samples: dict[str, Any],
    eps: float,
    cfg: Settings,
) -> dict[str, Any]:
    """The ``fisher_diagonal`` section of report.json: block traces, errors, bounds.

    ``coverage_95``: the fraction of random entries whose 95% confidence interval
    (``Estimate.interval``) holds the exact value; the block traces carry theirs
    (``estimate_trace_interval``, from the per-probe block traces).
    """
    import numpy as np

    est, se = host(diag_est.value), host(diag_est.std_error)
    low, high = interval(diag_est)
    tol = bracket_tolerance(eps, lower, exact, upper)
    scale = np.abs(exact) + eps * np.max(np.abs(exact), initial=0.0) + 1e-300
    violation = np.maximum(lower - exact, exact - upper)
    rows = []
    spans = [(b.name, slice(b.offset, b.offset + b.size), int(b.size)) for b in blocks]
    spans.append(("total", slice(0, exact.shape[0]), int(exact.shape[0])))
    for name, sl, size in spans:
        value, value_se = mean_se(trace_samples[name])
        rows.append(
            {
                "block": name,
                "size": size,
                "lower_trace": float(np.sum(lower[sl])),
                "exact_trace": float(np.sum(exact[sl])),
                "upper_trace": float(np.sum(upper[sl])),
                "estimate_trace": value,
                "estimate_trace_std_error": value_se,
                "estimate_trace_interval": samples_interval(trace_samples[name]),
                "relative_error": relative_error(est[sl], exact[sl]),
                "coverage_95": coverage(low[sl], high[sl], se[sl], exact[sl]),
                "bounds_hold": bool(np.all(violation[sl] <= tol[sl])),
                "zero_entries": int(np.count_nonzero(exact[sl] == 0.0)),
            }
        )
    out: dict[str, Any] = {
        "reduction": "sum",
        "num_probes": int(diag_est.num_probes),
        "target_error": cfg.target_error,
        "blocks": rows,
        "bounds_hold": bool(np.all(violation <= tol)),
        "max_relative_violation": max(0.0, float(np.max(violation / scale))),
        "relative_error": relative_error(est, exact),
        "coverage_95": coverage(low, high, se, exact),
        "median_relative_std_error": median_relative_se(se, exact),
        "zero_entries": zero_entries(exact),
    }
    if exact.shape[0] <= MAX_JSON_PARAMS:
        out["values"] = {
            "exact": exact.tolist(),
            "lower": lower.tolist(),
            "upper": upper.tolist(),
            "estimate": est.tolist(),
            "std_error": se.tolist(),
            "interval_low": low.tolist(),
            "interval_high": high.tolist(),
        }
    return out


def zero_entries(exact: Any) -> dict[str, Any]:
    """The entries of diag F that are exactly 0: their count, D, and the fraction.

    F_ii = Σ_x ‖I(z_x)^{1/2} ∂z_x/∂θ_i‖² is 0 exactly when parameter i moves no
    output on any analysed input (a weight from an input that is always 0, a unit
    that never activates: a dead ReLU), not by rounding of a small positive value.
    """
    import numpy as np

    d = int(exact.shape[0])
    count = int(np.count_nonzero(exact == 0.0))
    return {"count": count, "of": d, "fraction": count / d if d else None}


Case = tuple[str, str, Callable[[Any], Any]]  # (name, call, linearization → result)


def estimator_cases(fam: Any, y: Any, cfg: Settings) -> list[Case]:
    """Every estimator of the comparison: its name, its call, and how to run it."""
    from fisherbound.estimators import detach_and_mix, empirical, monte_carlo
    from fisherbound.fisher import fisher_bounds, fisher_diagonal

    m, seed = cfg.num_probes, cfg.seed

    def mix(**options: Any) -> Callable[[Any], Any]:
        return lambda lin: detach_and_mix(lin, fam, rng=seed, progress=False, **options)

    cases: list[Case] = [
        ("exact", "fisher_diagonal", lambda lin: fisher_diagonal(lin, fam, progress=False)),
        (
            "bounds (lower F_LR, upper F_DG)",
            "fisher_bounds",
            lambda lin: fisher_bounds(lin, fam, progress=False),
        ),
        ("detach-and-mix, 1 probe", "detach_and_mix(num_probes=1)", mix(num_probes=1)),
        (f"detach-and-mix, {m} probes", f"detach_and_mix(num_probes={m})", mix(num_probes=m)),
        (
            f"detach-and-mix per example, {m} probes",
            f"detach_and_mix(num_probes={m}, per_example=True)",
            mix(num_probes=m, per_example=True),
        ),
        (
            f"Monte Carlo, {m} samples",
            f"monte_carlo(num_samples={m})",
            lambda lin: monte_carlo(lin, fam, num_samples=m, rng=seed, progress=False),
        ),
        (
            "empirical (observed labels)",
            "empirical",
            lambda lin: empirical(lin, y, fam, progress=False),
        ),
    ]
    if cfg.target_error is not None:
        e = cfg.target_error
        cases.append(
            (
                f"detach-and-mix, target relative error {e:g}",
                f"detach_and_mix(num_probes={m}, target_relative_error={e:g})",
                mix(num_probes=m, target_relative_error=e),
            )
        )
    return cases


def estimator_errors(call: str, result: Any, exact: Any) -> dict[str, Any]:
    """The error columns of one estimator's row (the bounds have one per side)."""
    if call == "fisher_bounds":
        return {
            "num_probes": None,
            "relative_error": None,
            "lower_relative_error": relative_error(host(result[0]), exact),
            "upper_relative_error": relative_error(host(result[1]), exact),
            "trace_relative_error": None,
            "coverage_95": None,
            "median_relative_std_error": None,
        }
    exact_result = call == "fisher_diagonal"
    value = host(result if exact_result else result.value)
    se = None if exact_result else host(result.std_error)
    covered = None
    if se is not None:
        covered = coverage(*interval(result), se, exact)
    return {
        "num_probes": None if exact_result else int(result.num_probes),
        "relative_error": relative_error(value, exact),
        "trace_relative_error": abs(float(value.sum() - exact.sum())) / float(exact.sum()),
        "coverage_95": covered,
        "median_relative_std_error": None if se is None else median_relative_se(se, exact),
    }


def compare_estimators(
    subject: Subject, x: Any, y: Any, exact: Any, cfg: Settings
) -> dict[str, Any]:
    """The ``estimators`` section: each estimator's error and cost in gradient steps."""

    def step() -> Any:
        return subject.loss_function(x, y, "sum").gradient()

    step_seconds, _ = timed(step, cfg.repeats)
    rows = []
    for name, call, fn in estimator_cases(subject.family, y, cfg):

        def run(fn: Callable[[Any], Any] = fn) -> Any:
            return fn(subject.linearize(x))

        seconds, result = timed(run, cfg.repeats)
        row: dict[str, Any] = {
            "estimator": name,
            "call": call,
            "seconds": seconds,
            "cost_gradient_steps": seconds / step_seconds,
        }
        row.update(estimator_errors(call, result, exact))
        rows.append(row)
    return {
        "gradient_step_seconds": step_seconds,
        "gradient_step": "loss_function(inputs, labels).gradient(): one forward and one "
        "backward pass of the summed loss over the analysed inputs",
        "timing": f"best of at least {cfg.repeats} runs (more for fast ones, up to 0.2 s) "
        "after one warm-up, each including the forward pass (linearize)",
        "rows": rows,
        "cheapest": cheapest(rows),
    }


#: The relative errors of the diagonal at which the report names the cheapest estimator.
ERROR_LEVELS = (0.01, 0.1, 0.3)


def cheapest(rows: list[dict[str, Any]], levels: tuple[float, ...] = ERROR_LEVELS) -> list[Any]:
    """For each relative error level, the cheapest estimator whose measured error is within it.

    Only unbiased diagonals compete: the exact one and the random estimates (the
    bounds are not estimates, the empirical Fisher is biased). The cost is the
    measured one, in gradient steps.
    """
    fair = [
        r
        for r in rows
        if r["call"] not in ("fisher_bounds", "empirical")
        and r["relative_error"] is not None
        and math.isfinite(r["relative_error"])
    ]
    out = []
    for level in levels:
        within = [r for r in fair if r["relative_error"] <= level]
        best = min(within, key=lambda r: r["cost_gradient_steps"], default=None)
        out.append(
            {
                "level": level,
                "estimator": None if best is None else best["estimator"],
                "cost_gradient_steps": None if best is None else best["cost_gradient_steps"],
                "relative_error": None if best is None else best["relative_error"],
            }
        )
    return out
