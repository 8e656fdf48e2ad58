"""The report's numbers on the loss landscape (the MEAN loss, unlike the Fisher sums).

With position axes the mean is over the counted positions of all the batches (as
``torch.nn.CrossEntropyLoss(reduction="mean", ignore_index=-100)``); each batch is
(inputs, labels) or (inputs, labels, mask).

Hessian directions (``hessian_directions``) and filter-normalised random ones
(``random_directions``), the loss surfaces on both planes (``surface``), their
projected curvature (``projected_curvature``) and the Hessian trace from
Hessian-vector products (``loss_trace``), with the trace from loss values only beside
it, always with its caveat (``loss_only_trace``).
"""

from __future__ import annotations

from typing import Any

from fisherbound._report.hoststats import host, scalar_estimate
from fisherbound._report.settings import Settings
from fisherbound._report.subjects import Subject
from fisherbound._report.timing import Stages


def curvature(pc: Any) -> dict[str, Any]:
    """The projected curvature of one plane as JSON-ready numbers.

    ``hessian_eigenvalues``: the eigenvalues of the 2 × 2 projected Hessian H_αβ,
    largest first: the second derivatives of the loss along the plane's principal
    axes at θ (along the Hessian directions, λ_max and λ_min). ``principal``,
    ``mean`` and ``gaussian`` are the curvatures of the plotted graph
    z = f(α, β) at θ, which equal the Hessian's only at a critical point: with the
    slope g = (f_α, f_β) ≠ 0 they are smaller, by about (1 + |g|²)^(3/2) along g
    (``slope_norm`` = |g|).
    """
    import numpy as np

    hessian = host(pc.hessian)
    slope = host(pc.gradient)
    return {
        "projected_hessian": hessian.tolist(),
        "hessian_eigenvalues": np.linalg.eigvalsh(0.5 * (hessian + hessian.T))[::-1].tolist(),
        "gradient": slope.tolist(),
        "slope_norm": float(np.linalg.norm(slope)),
        "principal": host(pc.principal).tolist(),
        "mean": float(host(pc.mean)),
        "gaussian": float(host(pc.gaussian)),
    }


def surface_summary(s: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loss surface: its numbers (values, minimum, loss at θ) and host arrays."""
    import numpy as np

    axes = [host(a) for a in s.coordinates]
    values = host(s.values)
    centre = tuple(int(np.argmin(np.abs(a))) for a in axes)
    i, j = np.unravel_index(int(np.argmin(values)), values.shape)
    numbers = {
        "coordinates": [a.tolist() for a in axes],
        "values": values.tolist(),
        "loss_at_theta": float(values[centre]),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "argmin": [float(axes[0][i]), float(axes[1][j])],
    }
    return numbers, {"coordinates": axes, "values": values}


#: Printed beside every loss-only trace: when it is valid at all.
LOSS_ONLY_CAVEAT = (
    "The loss-only trace (loss_trace(method='loss')) is valid only for a loss that is "
    "smooth (no ReLU-type kinks or max pooling) at a precision where the rounding of "
    "the second differences is below its standard error; otherwise it can be off by "
    "many standard errors. The HVP trace is the reference."
)


def loss_only_trace(losses: list[Any], cfg: Settings, rng: int) -> dict[str, Any]:
    """The loss-only Hessian trace with its caveats (the ``LossTraceWarning`` it raised).

    ``caveats`` always holds the general condition of validity, then the message of
    each warning raised on this model (kinked modules, rounding), recorded here
    instead of printed.
    """
    import warnings

    from fisherbound.landscape import LossTraceWarning, loss_trace

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LossTraceWarning)
        est = loss_trace(
            losses, num_probes=cfg.trace_probes, rng=rng, method="loss", progress=cfg.progress
        )
    raised = [w.message for w in caught if isinstance(w.message, LossTraceWarning)]
    for w in caught:  # anything else goes on as it came
        if not isinstance(w.message, LossTraceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {
        **scalar_estimate(est),
        "reasons": [str(w.reason) for w in raised],
        "caveats": [LOSS_ONLY_CAVEAT, *(str(w) for w in raised)],
    }


def landscape(
    subject: Subject, batches: list[tuple[Any, ...]], cfg: Settings, stages: Stages
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``landscape`` section: directions, surfaces, curvature, trace; and arrays.

    ``num_inputs`` counts the inputs, ``num_counted`` the terms of the mean: the
    inputs, or the counted positions of a model with position axes.
    """
    from fisherbound._stream import counted
    from fisherbound.landscape import (
        hessian_directions,
        loss_trace,
        projected_curvature,
        random_directions,
        surface,
    )

    losses = [
        subject.loss_function(b[0], b[1], "mean", b[2] if len(b) > 2 else None) for b in batches
    ]
    with stages("Hessian directions"):
        hd = hessian_directions(losses, num_matvecs=cfg.lanczos_steps, rng=cfg.seed)
        rd = random_directions(losses[0], num_directions=2, kind="filter", rng=cfg.seed + 1)
    with stages("loss surfaces"):
        g, span, bars = cfg.grid_points, cfg.span, cfg.progress
        s_rand = surface(losses, rd, num_points=g, span=span, progress=bars)
        s_hess = surface(losses, hd.directions, num_points=g, span=span, progress=bars)
    with stages("curvature and trace"):
        pc_rand = projected_curvature(losses, rd)
        pc_hess = projected_curvature(losses, hd.directions)
        rng = cfg.seed + 2
        by_hvp = loss_trace(
            losses, num_probes=cfg.trace_probes, rng=rng, method="hvp", progress=cfg.progress
        )
        loss_only = None if "loss-only-trace" in cfg.skip else loss_only_trace(losses, cfg, rng)
    rand_numbers, rand_arrays = surface_summary(s_rand)
    hess_numbers, hess_arrays = surface_summary(s_hess)
    numbers = {
        "reduction": "mean",
        "num_inputs": sum(int(loss.num_inputs) for loss in losses),
        "num_counted": sum(counted(loss) for loss in losses),
        "hessian": {
            "eigenvalues": host(hd.eigenvalues).tolist(),
            "residuals": host(hd.residuals).tolist(),
        },
        "random_plane": {
            "kind": "filter-normalised Gaussian",
            "curvature": curvature(pc_rand),
            "surface": rand_numbers,
        },
        "hessian_plane": {
            "kind": "eigenvectors of λ_max and λ_min",
            "curvature": curvature(pc_hess),
            "surface": hess_numbers,
        },
        "trace": {
            "num_probes": cfg.trace_probes,
            "hvp": scalar_estimate(by_hvp),
            "loss_only": loss_only,
        },
    }
    return numbers, {"random": rand_arrays, "hessian": hess_arrays}
