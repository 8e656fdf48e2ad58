"""The report's numbers on spectra: core space, top of the Fisher spectrum, density, dimension.

The output-space metric at every input (``Family.eigvalsh``, the λ_max bounds,
the pseudo-determinant); the top eigenvalues of F and of its bound operators
(``top_eigenpairs``); the spectral density (``spectral_density``); the local
dimension and the razor complexity (``local_dimension``, ``rank_bound``,
``razor``).
"""

from __future__ import annotations

import math
from typing import Any

from fisherbound._report.hoststats import host, scalar_interval, stats
from fisherbound._report.positions import REFUSALS, Positions, not_run
from fisherbound._report.settings import Settings


def lanczos_options(cfg: Settings) -> dict[str, Any]:
    """``num_matvecs`` for the quadrature calls when ``--lanczos-steps`` is set, else none."""
    return {} if cfg.lanczos_steps is None else {"num_matvecs": cfg.lanczos_steps}


def core_space(fam: Any, logits: Any, eps: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``core_space`` section: the output metric's spectrum at every input."""
    import numpy as np

    eig = host(fam.eigvalsh(logits))  # (N, C) ascending
    lo_b, hi_b = fam.lambda_max_bounds(logits)
    lo, hi = host(lo_b), host(hi_b)
    pdet = host(fam.pseudo_determinant(logits))
    log_pdet = host(fam.log_pseudo_determinant(logits))
    lam_max = eig[:, -1]
    tr = np.sum(eig, axis=1)
    sq = np.sum(eig**2, axis=1)
    eff_rank = np.where(sq > 0, tr**2 / np.where(sq > 0, sq, 1.0), 0.0)
    tol = 1e3 * eps * np.maximum(lam_max, eps)
    holds = (lo <= lam_max + tol) & (lam_max <= hi + tol)
    safe = np.where(lam_max > 0, lam_max, 1.0)
    numbers = {
        "num_inputs": int(eig.shape[0]),
        "num_outputs": int(eig.shape[1]),
        "lambda_max": stats(lam_max),
        "lambda_max_lower_bound": stats(lo),
        "lambda_max_upper_bound": stats(hi),
        "lambda_max_bounds_hold": float(np.mean(holds)),
        "lower_bound_ratio": stats(np.where(lam_max > 0, lo / safe, 1.0)),
        "upper_bound_ratio": stats(np.where(lam_max > 0, hi / safe, 1.0)),
        "trace": stats(tr),
        "effective_rank": stats(eff_rank),
        "pseudo_determinant": stats(pdet),
        "log_pseudo_determinant": stats(log_pdet),
        "num_eigenvalues_above_1e-6": stats(np.sum(eig > 1e-6, axis=1)),
    }
    return numbers, {"eigenvalues": eig, "lambda_max": lam_max, "lower": lo, "upper": hi}


def top_spectrum(lin: Any, fam: Any, cfg: Settings, trace: float | None) -> dict[str, Any]:
    """The top eigenvalues of F, F_LR and F_DG and whether they are bracketed.

    ``trace`` is tr F from the exact diagonal (None when it did not run).
    """
    import numpy as np

    from fisherbound.dimension import top_eigenpairs

    k = min(cfg.top_k, int(lin.num_params))
    result: dict[str, Any] = {"k": k, "reduction": "sum", "trace": trace}
    for kernel in ("exact", "lower", "upper"):
        top = top_eigenpairs(
            lin, fam, k=k, kernel=kernel, num_matvecs=cfg.lanczos_steps, rng=cfg.seed
        )
        result[kernel] = {
            "eigenvalues": host(top.eigenvalues).tolist(),
            "residuals": host(top.residuals).tolist(),
        }
    ex = np.asarray(result["exact"]["eigenvalues"])
    lo, hi = np.asarray(result["lower"]["eigenvalues"]), np.asarray(result["upper"]["eigenvalues"])
    slack = (
        np.asarray(result["exact"]["residuals"])
        + np.asarray(result["lower"]["residuals"])
        + np.asarray(result["upper"]["residuals"])
        + 1e-9 * max(float(np.max(np.abs(hi))), 1e-300)
    )
    result["brackets_hold"] = bool(np.all(lo <= ex + slack) and np.all(ex <= hi + slack))
    result["top_fraction_of_trace"] = float(np.sum(ex) / trace) if trace else None
    return result


def dimension(
    lin: Any,
    fam: Any,
    y: Any,
    theta: Any,
    cfg: Settings,
    info: Positions | None = None,
    rules: Any = None,
) -> dict[str, Any]:
    """The rank bound, the local dimension at three ε and the razor complexity.

    ``rules``: the spectral density's Gauss rules (a ``SpectralDensity``), reused by
    every count and by the razor's log-det: their quadrature costs no product, and
    their nodes prove d_ε > max_count by interlacing, so the Lanczos count runs
    only where they do not. None: each call runs its own quadrature. With positions
    (``info``) the razor is refused or checked: its likelihood term must be the one
    of the counted positions (see ``razor_numbers``).
    """
    from fisherbound.dimension import local_dimension, rank_bound

    s2 = cfg.prior_variance
    bound = rank_bound(lin, fam)
    counts = []
    for factor in (100.0, 1.0, 0.01):
        eps = factor / s2
        est = local_dimension(
            lin,
            fam,
            eps=eps,
            max_count=cfg.max_count,
            num_probes=cfg.slq_probes,
            num_matvecs=cfg.lanczos_steps,
            quadrature=rules,
            rng=cfg.seed,
        )
        counts.append(
            {
                "eps": eps,
                "value": float(host(est.value)),
                "std_error": float(host(est.std_error)),
                "interval": scalar_interval(est),
                "num_probes": int(est.num_probes),
                "method": "lanczos (exact count)" if est.num_probes == 0 else "slq",
            }
        )
    rank = {
        "value": int(bound.value),
        "num_params": int(bound.num_params),
        "num_inputs": int(bound.num_inputs),
        "rank_per_input": int(bound.rank_per_input),
    }
    if info is not None:
        rank["counted_positions"] = info.counted
    return {
        "rank_bound": rank,
        "local_dimension": counts,
        "razor": razor_numbers(lin, fam, y, theta, cfg, info, rules),
    }


def razor_numbers(
    lin: Any,
    fam: Any,
    y: Any,
    theta: Any,
    cfg: Settings,
    info: Positions | None,
    rules: Any = None,
) -> dict[str, Any]:
    """The razor's terms; with positions ``{"not_run": reason}`` when the library refuses.

    The likelihood term −log p(X | θ̂) sums over the counted positions (the razor
    reads ``lin.mask``).
    """
    from fisherbound.dimension import razor

    try:
        rz = razor(
            lin,
            fam,
            prior_variance=cfg.prior_variance,
            labels=y,
            theta=theta,
            num_probes=cfg.slq_probes,
            quadrature=rules,
            rng=cfg.seed,
            **lanczos_options(cfg),
        )
    except REFUSALS as err:
        if info is None:
            raise
        return not_run(err)
    nll = float(host(rz.neg_log_likelihood))
    # The razor is ½ log det plus exact terms: its interval is ½ that of the log det.
    half = scalar_interval(rz.log_det)
    half = None if half is None else [0.5 * b for b in half]
    shift = float(host(rz.value)) - 0.5 * float(host(rz.log_det.value))
    return {
        "prior_variance": cfg.prior_variance,
        "value": float(host(rz.value)),
        "std_error": float(host(rz.std_error)),
        "neg_log_likelihood": nll,
        "prior_penalty": float(host(rz.prior_penalty)),
        "half_log_det": 0.5 * float(host(rz.log_det.value)),
        "half_log_det_std_error": 0.5 * float(host(rz.log_det.std_error)),
        "half_log_det_interval": half,
        "interval": None if half is None else [shift + b for b in half],
        "bic_penalty": float(host(rz.bic_penalty)),
        "method": rz.method,
    }


def density(lin: Any, fam: Any, cfg: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spectral density of F by stochastic Lanczos quadrature: numbers and arrays.

    F is positive semi-definite, so its spectrum lies in [0, ∞): the density shown
    is each probe's Gauss-rule density reflected at 0 (``smoothed_density(...,
    lower=0.0)``) on a grid from 0 to the largest node plus three widths, averaged
    over the probes with its pointwise standard error; it has no mass below 0 and
    integrates to 1. ``mass_below_zero_unreflected`` is the fraction of the plain
    smoothed density (``spectral_density``'s) that lay below 0.

    ``arrays["rules"]`` is the ``SpectralDensity`` itself, whose Gauss rules the
    local dimension and the razor reuse (``dimension(..., rules=...)``).
    """
    import numpy as np

    from fisherbound._lib import estimate_from_samples
    from fisherbound.dimension import spectral_density
    from fisherbound.linalg import Quadrature, smoothed_density

    result = spectral_density(
        lin, fam, num_probes=cfg.slq_probes, rng=cfg.seed, **lanczos_options(cfg)
    )
    nodes, weights, width = host(result.nodes), host(result.weights), float(result.width)
    m = int(nodes.shape[0])
    grid = np.linspace(0.0, max(float(np.max(nodes)), 0.0) + 3.0 * width, result.grid.shape[0])
    per_probe = np.stack(
        [
            smoothed_density(
                Quadrature(nodes[i : i + 1], weights[i : i + 1]), grid, width=width, lower=0.0
            )
            for i in range(m)
        ]
    )
    est = estimate_from_samples(per_probe, np)
    below = 0.5 * np.vectorize(math.erfc)(np.maximum(nodes, 0.0) / (width * math.sqrt(2.0)))
    arrays = {
        "grid": grid,
        "density": np.asarray(est.value, dtype=float),
        "std_error": np.asarray(est.std_error, dtype=float),
    }
    numbers = {
        "width": width,
        "num_probes": m,
        "num_matvecs": int(nodes.shape[1]),
        "support": [0.0, None],
        "boundary": "reflected at 0 (smoothed_density(..., lower=0.0)): F is positive "
        "semi-definite",
        "mass_below_zero_unreflected": float(np.sum(weights * below) / np.sum(weights)),
        **{k: v.tolist() for k, v in arrays.items()},
    }
    return numbers, {**arrays, "num_probes": m, "rules": result}
