"""The knobs of the report's analysis (:class:`Settings`) and its outcome (:class:`Analysis`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    """The knobs of the analysis (the command-line options map onto these).

    Attributes
    ----------
    num_probes
        M, the probes of detach-and-mix (and the samples of Monte Carlo).
    target_error
        If set, detach-and-mix draws rounds of M probes until the relative
        standard error of its trace estimate is at most this.
    seed
        One seed for every random draw of the analysis.
    top_k
        How many top eigenvalues of the Fisher metric.
    prior_variance
        σ² of the razor's Gaussian prior; the local dimension is counted at
        ε = 0.01/σ², 1/σ² and 100/σ².
    slq_probes
        Probes of stochastic Lanczos quadrature (spectral density, local
        dimension, razor's log-determinant).
    lanczos_steps
        Lanczos steps per run (top eigenpairs, Hessian directions, local
        dimension) and per quadrature probe; None: the library's defaults.
    max_count
        The local dimension is counted exactly by Lanczos up to this many
        eigenvalues above ε, and estimated by quadrature beyond.
    grid_points, span
        The landscape grid: ``grid_points`` per direction in [−span, span].
    trace_probes
        Probes of the Hessian traces (HVP and loss-only, the same probes).
    repeats
        Timed runs per estimator, at least (after one warm-up run; more for fast
        ones); the fastest counts.
    progress
        Progress bars: None (on a terminal only), True or False.
    skip
        Sections left out (``SKIPPABLE``): ``"estimators"`` (the timed comparison),
        ``"spectrum"`` (the top eigenvalues of F, F_LR, F_DG), ``"density"`` (the
        spectral density; the local dimension and razor then run their own
        quadrature), ``"dimension"`` (local dimension and razor), ``"landscape"``
        (the whole loss landscape), ``"loss-only-trace"`` (the Hessian trace from
        loss values, shown only with its caveat; the HVP trace stays).
    """

    num_probes: int = 32
    target_error: float | None = None
    seed: int = 0
    top_k: int = 10
    prior_variance: float = 1.0
    slq_probes: int = 10
    lanczos_steps: int | None = None
    max_count: int = 32
    grid_points: int = 13
    span: float = 1.0
    trace_probes: int = 32
    repeats: int = 2
    progress: bool | None = None
    skip: tuple[str, ...] = ()


#: The sections ``Settings.skip`` (``--skip``) may leave out.
SKIPPABLE = ("estimators", "spectrum", "density", "dimension", "landscape", "loss-only-trace")


@dataclass
class Analysis:
    """The outcome of ``analyse``.

    ``numbers`` is JSON-ready (it becomes report.json); ``arrays`` holds the host
    arrays the figures are drawn from (the Fisher diagonal, the surfaces, ...).
    """

    numbers: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)
