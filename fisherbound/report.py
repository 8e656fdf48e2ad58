"""The analysis behind ``fisherbound demo`` and ``fisherbound report``, and its report.

``analyse(subject, inputs, labels)`` runs every part of the library on one
trained classifier, seen through one adapter (a :class:`Subject`: NumPy
reference model, torch module or JAX function), on one batch of labelled inputs:

- the Fisher diagonal per parameter block: exact (``fisher_diagonal``), its
  deterministic bounds diag F_LR ≤ diag F ≤ diag F_DG (``fisher_bounds``) and the
  detach-and-mix estimate with its standard errors (``detach_and_mix``);
- the estimators compared on the same inputs: error against the exact diagonal
  and wall-clock cost in units of one gradient step measured in the same run;
- the core-space spectrum of the categorical (or Bernoulli) metric at every
  input: eigenvalues, the λ_max bounds, the pseudo-determinant;
- the top of the Fisher spectrum (with the bound operators' spectra beside it),
  the spectral density, the local dimension and the razor complexity;
- the loss landscape along filter-normalised random and Hessian directions:
  surfaces, projected curvature, loss-only and Hessian-vector-product traces.

Every Fisher quantity is the SUM over the analysed inputs (the papers'
convention); the landscape uses the MEAN loss. ``write_report(analysis, out)``
writes ``report.json`` (every number), ``report.md``, ``index.html`` and the PNG
figures (matplotlib). Nothing here imports a framework or NumPy at module level.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Array = Any

__all__ = [
    "Analysis",
    "Settings",
    "Subject",
    "analyse",
    "jax_subject",
    "numpy_subject",
    "torch_subject",
    "write_report",
]

#: The Fisher-diagonal vectors go into report.json up to this many parameters.
MAX_JSON_PARAMS = 100_000

#: File names of the figures, in the order of the report.
FIGURES = (
    "fisher_diagonal.png",
    "estimators.png",
    "core_space.png",
    "fisher_spectrum.png",
    "landscape.png",
)


# --------------------------------------------------------------------------- #
# what the analysis needs from a framework


@dataclass(frozen=True)
class Subject:
    """A trained model seen through one adapter.

    Attributes
    ----------
    framework
        ``"numpy"``, ``"torch"`` or ``"jax"``.
    description
        One line for the report, e.g. ``"MLP 64-32-10 (tanh), float64"``.
    family
        The output family (``Categorical()`` or ``Bernoulli()``).
    linearize
        inputs (backend array) → a linearization (``fisherbound.linearization``).
    loss_function
        (inputs, labels, reduction) → a ``LossFunction`` (negative log-likelihood).
    inputs, labels
        Host (NumPy) array → backend array of the model's dtype and device.
    """

    framework: str
    description: str
    family: Any
    linearize: Callable[[Array], Any]
    loss_function: Callable[[Array, Array, str], Any]
    inputs: Callable[[Any], Array]
    labels: Callable[[Any], Array]


def numpy_subject(model: Any, *, family: Any = None, description: str | None = None) -> Subject:
    """A NumPy reference model (``fisherbound.adapters.numpy.MLP`` or ``LinearSoftmax``)."""
    import numpy as np

    from fisherbound.adapters import numpy as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    return Subject(
        framework="numpy",
        description=repr(model) if description is None else description,
        family=fam,
        linearize=lambda x: adapter.linearize(model, x),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            model, x, y, family=fam, reduction=reduction
        ),
        inputs=lambda a: np.asarray(a, dtype=model.dtype),
        labels=lambda a: np.asarray(a),
    )


def torch_subject(
    model: Any,
    *,
    family: Any = None,
    params: Sequence[str] | None = None,
    description: str | None = None,
) -> Subject:
    """A ``torch.nn.Module`` (in eval mode) through ``fisherbound.adapters.torch``.

    Floating inputs are cast to the dtype of the first selected parameter; integer
    inputs (token ids) are kept. Categorical labels become int64, Bernoulli labels
    the parameters' dtype.
    """
    import numpy as np
    import torch

    from fisherbound.adapters import torch as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    named = dict(model.named_parameters())
    first = named[params[0]] if params else next(iter(named.values()))
    dtype, device = first.dtype, first.device
    names = None if params is None else list(params)

    def inputs(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def labels(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        t = t.to(torch.int64) if isinstance(fam, Categorical) else t.to(dtype)
        return t.to(device)

    return Subject(
        framework="torch",
        description=(type(model).__name__ if description is None else description),
        family=fam,
        linearize=lambda x: adapter.linearize(model, x, params=names),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            model, x, y, family=fam, reduction=reduction, params=names
        ),
        inputs=inputs,
        labels=labels,
    )


def jax_subject(
    apply_fn: Callable[..., Any],
    params: Any,
    *,
    family: Any = None,
    description: str = "JAX function",
) -> Subject:
    """``apply_fn(params, x)`` through ``fisherbound.adapters.jax``.

    Inputs are cast to the parameters' dtype (float64 needs ``jax.enable_x64``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fisherbound.adapters import jax as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    dtype = jax.tree_util.tree_leaves(params)[0].dtype

    def labels(a: Any) -> Any:
        host = np.asarray(a)
        return jnp.asarray(host) if isinstance(fam, Categorical) else jnp.asarray(host, dtype)

    return Subject(
        framework="jax",
        description=description,
        family=fam,
        linearize=lambda x: adapter.linearize(apply_fn, params, x),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            apply_fn, params, x, y, family=fam, reduction=reduction
        ),
        inputs=lambda a: jnp.asarray(np.asarray(a), dtype=dtype),
        labels=labels,
    )


# --------------------------------------------------------------------------- #
# settings and result


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
        Probes of the loss-only Hessian trace.
    repeats
        Timed runs per estimator, at least (after one warm-up run; more for fast
        ones); the fastest counts.
    progress
        Progress bars: None (on a terminal only), True or False.
    """

    num_probes: int = 32
    target_error: float | None = None
    seed: int = 0
    top_k: int = 10
    prior_variance: float = 1.0
    slq_probes: int = 10
    lanczos_steps: int | None = None
    max_count: int = 32
    grid_points: int = 21
    span: float = 1.0
    trace_probes: int = 64
    repeats: int = 3
    progress: bool | None = None


@dataclass
class Analysis:
    """The outcome of ``analyse``.

    ``numbers`` is JSON-ready (it becomes report.json); ``arrays`` holds the host
    arrays the figures are drawn from (the Fisher diagonal, the surfaces, ...).
    """

    numbers: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# small helpers


def _host(x: Any) -> Any:
    import numpy as np

    from fisherbound._lib import to_host

    return np.asarray(to_host(x), dtype=float)


def _wait(result: Any) -> None:
    """Block until ``result`` is computed (JAX dispatches asynchronously)."""
    from fisherbound._lib import is_array, to_host

    item = result
    while not is_array(item):
        if isinstance(item, dict):
            item = next(iter(item.values()))
        elif isinstance(item, tuple | list):
            item = item[0]
        elif hasattr(item, "value"):
            item = item.value
        else:
            return
    to_host(item)


def _timed(fn: Callable[[], Any], repeats: int, budget: float = 0.2) -> tuple[float, Any]:
    """Best wall-clock seconds of ``fn`` after one warm-up run.

    At least ``repeats`` timed runs, more for fast functions (until ``budget``
    seconds are spent, at most 50 runs): the minimum is the least disturbed by
    other work on a shared machine.
    """
    out = fn()  # warm-up: JAX compiles, caches fill
    _wait(out)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget and len(times) < 50):
        start = time.perf_counter()
        out = fn()
        _wait(out)
        times.append(time.perf_counter() - start)
    return min(times), out


def _stats(values: Any) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {
        "min": float(np.min(v)),
        "median": float(np.median(v)),
        "mean": float(np.mean(v)),
        "max": float(np.max(v)),
    }


def _relative_error(estimate: Any, exact: Any) -> float:
    import numpy as np

    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(estimate - exact)) / norm if norm > 0 else math.nan


def _coverage(estimate: Any, std_error: Any, exact: Any) -> float | None:
    """Fraction of entries with |estimate − exact| ≤ 2 standard errors (None if no SE)."""
    import numpy as np

    ok = np.isfinite(std_error) & (std_error > 0)
    if not np.any(ok):
        return None
    return float(np.mean(np.abs(estimate[ok] - exact[ok]) <= 2.0 * std_error[ok]))


def _median_relative_se(std_error: Any, exact: Any) -> float | None:
    import numpy as np

    ok = np.isfinite(std_error) & (exact > 0)
    if not np.any(ok):
        return None
    return float(np.median(std_error[ok] / exact[ok]))


def _bracket_tolerance(eps: float, *arrays: Any) -> Any:
    """Rounding allowance for lower ≤ exact ≤ upper: 100 ε times the entries' size."""
    import numpy as np

    scale = sum(np.abs(a) for a in arrays)
    return 100.0 * eps * scale + eps * float(np.max(scale, initial=0.0))


class _Stages:
    """A progress bar over the named steps of the analysis, timing each."""

    def __init__(self, names: Sequence[str], progress: bool | None) -> None:
        self.seconds: dict[str, float] = {}
        self._bar: Any = None
        if progress is False:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=len(names),
            desc="fisherbound",
            unit="step",
            disable=None if progress is None else False,
            leave=False,
        )

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_description(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


STAGES = (
    "forward pass",
    "exact Fisher diagonal",
    "deterministic bounds",
    "detach-and-mix",
    "estimators compared",
    "core space",
    "top of the spectrum",
    "spectral density",
    "local dimension and razor",
    "Hessian directions",
    "loss surfaces",
    "curvature and trace",
)


# --------------------------------------------------------------------------- #
# the analysis


def analyse(
    subject: Subject,
    inputs: Any,
    labels: Any,
    *,
    landscape: Sequence[tuple[Any, Any]] | None = None,
    settings: Settings | None = None,
    context: dict[str, Any] | None = None,
) -> Analysis:
    """Run the whole analysis of ``subject`` on one labelled batch.

    Parameters
    ----------
    subject
        The model and its adapter (``numpy_subject``, ``torch_subject``,
        ``jax_subject``).
    inputs, labels
        Host (NumPy) arrays: the N analysed inputs and their labels (class indices
        for the categorical family, {0, 1} rows for the Bernoulli family).
    landscape
        (inputs, labels) host batches of the loss whose landscape is drawn (the
        mean loss over all of them); default the analysed batch.
    settings
        ``Settings()`` by default.
    context
        Extra JSON-ready entries copied into the numbers (command, model, data,
        training, ...).

    Returns
    -------
    Analysis
        ``numbers`` (JSON-ready) and the host ``arrays`` behind the figures.

    Notes
    -----
    UserWarnings of the library (an unreached ``target_error``) are recorded in
    ``numbers["warnings"]`` instead of being printed.
    """
    cfg = Settings() if settings is None else settings
    stages = _Stages(STAGES, cfg.progress)
    start = time.perf_counter()
    numbers: dict[str, Any] = {
        "schema": "fisherbound-report/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(subject.framework),
        "settings": asdict(cfg),
    }
    numbers.update(context or {})
    arrays: dict[str, Any] = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            _run(subject, inputs, labels, landscape, cfg, stages, numbers, arrays)
    finally:
        stages.close()
    messages = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in messages:
            messages.append(text)
    numbers["warnings"] = messages
    numbers["timing"] = {
        "stages_seconds": stages.seconds,
        "analysis_seconds": time.perf_counter() - start,
    }
    return Analysis(numbers, arrays)


def _environment(framework: str) -> dict[str, Any]:
    import importlib.metadata

    import numpy as np

    import fisherbound

    versions = {"fisherbound": fisherbound.__version__, "numpy": np.__version__}
    if framework in ("torch", "jax"):
        try:
            versions[framework] = importlib.metadata.version(framework)
        except importlib.metadata.PackageNotFoundError:
            versions[framework] = "unknown"
    return {
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "framework": framework,
        "versions": versions,
    }


def _run(
    subject: Subject,
    inputs: Any,
    labels: Any,
    landscape: Sequence[tuple[Any, Any]] | None,
    cfg: Settings,
    stages: _Stages,
    numbers: dict[str, Any],
    arrays: dict[str, Any],
) -> None:
    import numpy as np

    from fisherbound._lib import to_host
    from fisherbound.families import Categorical
    from fisherbound.fisher import fisher_bounds, fisher_diagonal

    fam = subject.family
    x, y = subject.inputs(inputs), subject.labels(labels)
    with stages("forward pass"):
        lin = subject.linearize(x)
        logits = _host(lin.logits)
    host_labels = np.asarray(labels)
    if isinstance(fam, Categorical):
        accuracy = float(np.mean(np.argmax(logits, axis=1) == host_labels))
    else:
        accuracy = float(np.mean((logits > 0) == (host_labels > 0.5)))
    blocks = [
        {"name": b.name, "shape": list(b.shape), "offset": int(b.offset), "size": int(b.size)}
        for b in lin.blocks
    ]
    numbers["analysed"] = {
        "num_inputs": int(logits.shape[0]),
        "num_outputs": int(logits.shape[1]),
        "num_params": int(lin.num_params),
        "family": type(fam).__name__,
        "dtype": str(lin.logits.dtype),
        "accuracy": accuracy,
        "blocks": blocks,
    }
    eps = float(np.finfo(np.asarray(to_host(lin.logits)).dtype).eps)

    with stages("exact Fisher diagonal"):
        exact = _host(fisher_diagonal(lin, fam, progress=cfg.progress))
    with stages("deterministic bounds"):
        lo_b, hi_b = fisher_bounds(lin, fam, progress=cfg.progress)
        lower, upper = _host(lo_b), _host(hi_b)
    with stages("detach-and-mix"):
        diag_est, trace_samples = _detach_and_mix(lin, fam, cfg)
    numbers["fisher_diagonal"] = _fisher_diagonal_section(
        lin.blocks, exact, lower, upper, diag_est, trace_samples, eps, cfg
    )
    arrays["diagonal"] = {
        "blocks": list(lin.blocks),
        "exact": exact,
        "lower": lower,
        "upper": upper,
        "estimate": _host(diag_est.value),
        "std_error": _host(diag_est.std_error),
    }

    with stages("estimators compared"):
        numbers["estimators"] = _compare_estimators(subject, x, y, exact, cfg)

    with stages("core space"):
        numbers["core_space"], arrays["core_space"] = _core_space(fam, lin.logits, eps)

    with stages("top of the spectrum"):
        numbers["spectrum"] = _top_spectrum(lin, fam, cfg, float(np.sum(exact)))
    with stages("spectral density"):
        from fisherbound.dimension import spectral_density

        steps: dict[str, Any] = {}
        if cfg.lanczos_steps is not None:
            steps["num_matvecs"] = cfg.lanczos_steps
        density = spectral_density(lin, fam, num_probes=cfg.slq_probes, rng=cfg.seed, **steps)
        arrays["density"] = {
            "grid": _host(density.grid),
            "density": _host(density.density),
            "std_error": _host(density.std_error),
        }
        numbers["spectrum"]["density"] = {
            "width": float(density.width),
            "num_probes": int(density.nodes.shape[0]),
            "num_matvecs": int(density.nodes.shape[1]),
            **{k: v.tolist() for k, v in arrays["density"].items()},
        }
    with stages("local dimension and razor"):
        theta = subject.loss_function(x, y, "sum").params
        numbers["dimension"] = _dimension(lin, fam, y, theta, cfg)

    batches = (
        [(x, y)]
        if landscape is None
        else [(subject.inputs(a), subject.labels(b)) for a, b in landscape]
    )
    numbers["landscape"], arrays["landscape"] = _landscape(subject, batches, cfg, stages)


def _detach_and_mix(lin: Any, fam: Any, cfg: Settings) -> tuple[Any, dict[str, Any]]:
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
    v = _host(full.value)
    m = int(v.shape[0])
    per_probe = {
        blk.name: m * np.sum(v[:, blk.offset : blk.offset + blk.size] ** 2, axis=1)
        for blk in lin.blocks
    }
    per_probe["total"] = m * np.sum(v**2, axis=1)
    return diag, per_probe


def _mean_se(samples: Any) -> tuple[float, float | None]:
    import numpy as np

    m = samples.shape[0]
    mean = float(np.mean(samples))
    return mean, (float(np.std(samples, ddof=1) / math.sqrt(m)) if m > 1 else None)


def _fisher_diagonal_section(
    blocks: Sequence[Any],
    exact: Any,
    lower: Any,
    upper: Any,
    diag_est: Any,
    trace_samples: dict[str, Any],
    eps: float,
    cfg: Settings,
) -> dict[str, Any]:
    import numpy as np

    est, se = _host(diag_est.value), _host(diag_est.std_error)
    tol = _bracket_tolerance(eps, lower, exact, upper)
    scale = np.abs(exact) + eps * np.max(np.abs(exact), initial=0.0) + 1e-300
    violation = np.maximum(lower - exact, exact - upper)
    rows = []
    spans = [(b.name, slice(b.offset, b.offset + b.size), int(b.size)) for b in blocks]
    spans.append(("total", slice(0, exact.shape[0]), int(exact.shape[0])))
    for name, sl, size in spans:
        value, value_se = _mean_se(trace_samples[name])
        rows.append(
            {
                "block": name,
                "size": size,
                "lower_trace": float(np.sum(lower[sl])),
                "exact_trace": float(np.sum(exact[sl])),
                "upper_trace": float(np.sum(upper[sl])),
                "estimate_trace": value,
                "estimate_trace_std_error": value_se,
                "relative_error": _relative_error(est[sl], exact[sl]),
                "coverage_2se": _coverage(est[sl], se[sl], exact[sl]),
                "bounds_hold": bool(np.all(violation[sl] <= tol[sl])),
            }
        )
    out: dict[str, Any] = {
        "reduction": "sum",
        "num_probes": int(diag_est.num_probes),
        "target_error": cfg.target_error,
        "blocks": rows,
        "bounds_hold": bool(np.all(violation <= tol)),
        "max_relative_violation": max(0.0, float(np.max(violation / scale))),
        "relative_error": _relative_error(est, exact),
        "coverage_2se": _coverage(est, se, exact),
        "median_relative_std_error": _median_relative_se(se, exact),
    }
    if exact.shape[0] <= MAX_JSON_PARAMS:
        out["values"] = {
            "exact": exact.tolist(),
            "lower": lower.tolist(),
            "upper": upper.tolist(),
            "estimate": est.tolist(),
            "std_error": se.tolist(),
        }
    return out


def _compare_estimators(
    subject: Subject, x: Any, y: Any, exact: Any, cfg: Settings
) -> dict[str, Any]:
    from fisherbound.estimators import detach_and_mix, empirical, monte_carlo
    from fisherbound.fisher import fisher_bounds, fisher_diagonal

    fam, m, seed = subject.family, cfg.num_probes, cfg.seed

    def step() -> Any:
        return subject.loss_function(x, y, "sum").gradient()

    step_seconds, _ = _timed(step, cfg.repeats)
    cases: list[tuple[str, str, Callable[[Any], Any]]] = [
        (
            "exact",
            "fisher_diagonal",
            lambda lin: fisher_diagonal(lin, fam, progress=False),
        ),
        (
            "bounds (lower F_LR, upper F_DG)",
            "fisher_bounds",
            lambda lin: fisher_bounds(lin, fam, progress=False),
        ),
        (
            "detach-and-mix, 1 probe",
            "detach_and_mix(num_probes=1)",
            lambda lin: detach_and_mix(lin, fam, num_probes=1, rng=seed, progress=False),
        ),
        (
            f"detach-and-mix, {m} probes",
            f"detach_and_mix(num_probes={m})",
            lambda lin: detach_and_mix(lin, fam, num_probes=m, rng=seed, progress=False),
        ),
        (
            f"detach-and-mix per example, {m} probes",
            f"detach_and_mix(num_probes={m}, per_example=True)",
            lambda lin: detach_and_mix(
                lin, fam, num_probes=m, per_example=True, rng=seed, progress=False
            ),
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
                lambda lin: detach_and_mix(
                    lin, fam, num_probes=m, target_relative_error=e, rng=seed, progress=False
                ),
            )
        )
    rows = []
    for name, call, fn in cases:

        def run(fn: Callable[[Any], Any] = fn) -> Any:
            return fn(subject.linearize(x))

        seconds, result = _timed(run, cfg.repeats)
        row: dict[str, Any] = {
            "estimator": name,
            "call": call,
            "seconds": seconds,
            "cost_gradient_steps": seconds / step_seconds,
        }
        if call == "fisher_bounds":
            lo, hi = _host(result[0]), _host(result[1])
            row.update(
                num_probes=None,
                relative_error=None,
                lower_relative_error=_relative_error(lo, exact),
                upper_relative_error=_relative_error(hi, exact),
                trace_relative_error=None,
                coverage_2se=None,
                median_relative_std_error=None,
            )
        elif call == "fisher_diagonal":
            value = _host(result)
            row.update(
                num_probes=None,
                relative_error=_relative_error(value, exact),
                trace_relative_error=abs(float(value.sum() - exact.sum())) / float(exact.sum()),
                coverage_2se=None,
                median_relative_std_error=None,
            )
        else:
            value, se = _host(result.value), _host(result.std_error)
            row.update(
                num_probes=int(result.num_probes),
                relative_error=_relative_error(value, exact),
                trace_relative_error=abs(float(value.sum() - exact.sum())) / float(exact.sum()),
                coverage_2se=_coverage(value, se, exact),
                median_relative_std_error=_median_relative_se(se, exact),
            )
        rows.append(row)
    return {
        "gradient_step_seconds": step_seconds,
        "gradient_step": "loss_function(inputs, labels).gradient(): one forward and one "
        "backward pass of the summed loss over the analysed inputs",
        "timing": f"best of at least {cfg.repeats} runs (more for fast ones, up to 0.2 s) "
        "after one warm-up, each including the forward pass (linearize)",
        "rows": rows,
    }


def _core_space(fam: Any, logits: Any, eps: float) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    eig = _host(fam.eigvalsh(logits))  # (N, C) ascending
    lo_b, hi_b = fam.lambda_max_bounds(logits)
    lo, hi = _host(lo_b), _host(hi_b)
    pdet = _host(fam.pseudo_determinant(logits))
    log_pdet = _host(fam.log_pseudo_determinant(logits))
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
        "lambda_max": _stats(lam_max),
        "lambda_max_lower_bound": _stats(lo),
        "lambda_max_upper_bound": _stats(hi),
        "lambda_max_bounds_hold": float(np.mean(holds)),
        "lower_bound_ratio": _stats(np.where(lam_max > 0, lo / safe, 1.0)),
        "upper_bound_ratio": _stats(np.where(lam_max > 0, hi / safe, 1.0)),
        "trace": _stats(tr),
        "effective_rank": _stats(eff_rank),
        "pseudo_determinant": _stats(pdet),
        "log_pseudo_determinant": _stats(log_pdet),
        "num_eigenvalues_above_1e-6": _stats(np.sum(eig > 1e-6, axis=1)),
    }
    return numbers, {"eigenvalues": eig, "lambda_max": lam_max, "lower": lo, "upper": hi}


def _top_spectrum(lin: Any, fam: Any, cfg: Settings, trace: float) -> dict[str, Any]:
    import numpy as np

    from fisherbound.dimension import top_eigenpairs

    k = min(cfg.top_k, int(lin.num_params))
    result: dict[str, Any] = {"k": k, "reduction": "sum", "trace": trace}
    for kernel in ("exact", "lower", "upper"):
        top = top_eigenpairs(
            lin, fam, k=k, kernel=kernel, num_matvecs=cfg.lanczos_steps, rng=cfg.seed
        )
        result[kernel] = {
            "eigenvalues": _host(top.eigenvalues).tolist(),
            "residuals": _host(top.residuals).tolist(),
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
    result["top_fraction_of_trace"] = float(np.sum(ex) / trace) if trace > 0 else None
    return result


def _dimension(lin: Any, fam: Any, y: Any, theta: Any, cfg: Settings) -> dict[str, Any]:
    from fisherbound.dimension import local_dimension, rank_bound, razor

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
            rng=cfg.seed,
        )
        counts.append(
            {
                "eps": eps,
                "value": float(_host(est.value)),
                "std_error": float(_host(est.std_error)),
                "num_probes": int(est.num_probes),
                "method": "lanczos (exact count)" if est.num_probes == 0 else "slq",
            }
        )
    steps: dict[str, Any] = {}
    if cfg.lanczos_steps is not None:
        steps["num_matvecs"] = cfg.lanczos_steps
    rz = razor(
        lin,
        fam,
        prior_variance=s2,
        labels=y,
        theta=theta,
        num_probes=cfg.slq_probes,
        rng=cfg.seed,
        **steps,
    )
    return {
        "rank_bound": {
            "value": int(bound.value),
            "num_params": int(bound.num_params),
            "num_inputs": int(bound.num_inputs),
            "rank_per_input": int(bound.rank_per_input),
        },
        "local_dimension": counts,
        "razor": {
            "prior_variance": s2,
            "value": float(_host(rz.value)),
            "std_error": float(_host(rz.std_error)),
            "neg_log_likelihood": float(_host(rz.neg_log_likelihood)),
            "prior_penalty": float(_host(rz.prior_penalty)),
            "half_log_det": 0.5 * float(_host(rz.log_det.value)),
            "half_log_det_std_error": 0.5 * float(_host(rz.log_det.std_error)),
            "bic_penalty": float(_host(rz.bic_penalty)),
            "method": rz.method,
        },
    }


def _curvature(pc: Any) -> dict[str, Any]:
    return {
        "projected_hessian": _host(pc.hessian).tolist(),
        "gradient": _host(pc.gradient).tolist(),
        "principal": _host(pc.principal).tolist(),
        "mean": float(_host(pc.mean)),
        "gaussian": float(_host(pc.gaussian)),
    }


def _surface_summary(s: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    axes = [_host(a) for a in s.coordinates]
    values = _host(s.values)
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


def _landscape(
    subject: Subject, batches: list[tuple[Any, Any]], cfg: Settings, stages: _Stages
) -> tuple[dict[str, Any], dict[str, Any]]:
    from fisherbound.landscape import (
        hessian_directions,
        loss_trace,
        projected_curvature,
        random_directions,
        surface,
    )

    losses = [subject.loss_function(xb, yb, "mean") for xb, yb in batches]
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
        by_loss = loss_trace(losses, num_probes=cfg.trace_probes, rng=rng, progress=cfg.progress)
        by_hvp = loss_trace(
            losses, num_probes=cfg.trace_probes, rng=rng, method="hvp", progress=cfg.progress
        )
    rand_numbers, rand_arrays = _surface_summary(s_rand)
    hess_numbers, hess_arrays = _surface_summary(s_hess)
    numbers = {
        "reduction": "mean",
        "num_inputs": sum(int(loss.num_inputs) for loss in losses),
        "hessian": {
            "eigenvalues": _host(hd.eigenvalues).tolist(),
            "residuals": _host(hd.residuals).tolist(),
        },
        "random_plane": {
            "kind": "filter-normalised Gaussian",
            "curvature": _curvature(pc_rand),
            "surface": rand_numbers,
        },
        "hessian_plane": {
            "kind": "eigenvectors of λ_max and λ_min",
            "curvature": _curvature(pc_hess),
            "surface": hess_numbers,
        },
        "trace": {
            "num_probes": cfg.trace_probes,
            "loss_only": {
                "value": float(_host(by_loss.value)),
                "std_error": float(_host(by_loss.std_error)),
            },
            "hvp": {
                "value": float(_host(by_hvp.value)),
                "std_error": float(_host(by_hvp.std_error)),
            },
        },
    }
    return numbers, {"random": rand_arrays, "hessian": hess_arrays}


# --------------------------------------------------------------------------- #
# JSON


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: floats (NaN and infinities as null), ints, lists, dicts."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- #
# figures


def _figures(analysis: Analysis, out: Path) -> list[dict[str, str]]:
    from fisherbound.plotting import plot_fisher_diagonal, plot_spectral_density, plot_surfaces

    numbers, arrays = analysis.numbers, analysis.arrays
    made = []

    def save(fig: Any, name: str, title: str, caption: str, dpi: int = 80) -> None:
        fig.savefig(out / name, dpi=dpi)
        made.append({"file": name, "title": title, "caption": caption})

    d = arrays["diagonal"]
    est = _EstimateView(d["estimate"], d["std_error"])
    fig = plot_fisher_diagonal(
        d["blocks"],
        exact=d["exact"],
        bounds=(d["lower"], d["upper"]),
        estimate=est,
        max_points_per_block=150,
        title=f"Fisher diagonal per block (sum over {numbers['analysed']['num_inputs']} inputs)",
    )
    save(
        fig,
        "fisher_diagonal.png",
        "Fisher diagonal per block",
        "Exact diag F (black), the certified band diag F_LR … diag F_DG (green) and the "
        f"detach-and-mix estimate with {numbers['fisher_diagonal']['num_probes']} probes "
        "± 2 standard errors (orange); entries sorted within each block.",
    )
    save(
        _estimators_figure(numbers["estimators"]),
        "estimators.png",
        "Estimators: error against cost",
        "Relative error ‖diag F̂ − diag F‖ / ‖diag F‖ against wall-clock cost in gradient "
        "steps measured in the same run.",
    )
    save(
        _core_space_figure(arrays["core_space"]),
        "core_space.png",
        "Core-space spectrum",
        "Left: λ_max of the output-space metric per input with its deterministic bounds. "
        "Right: all eigenvalues of the metric over the inputs.",
    )
    fig = _spectrum_figure(numbers["spectrum"])
    plot_spectral_density(
        _DensityView(**arrays["density"]),
        markers=numbers["spectrum"]["exact"]["eigenvalues"][:3],
        log=True,
        ax=fig.axes[1],
        title="spectral density of F (SLQ)",
    )
    save(
        fig,
        "fisher_spectrum.png",
        "Top of the Fisher spectrum",
        "Left: the top eigenvalues of F_LR ⪯ F ⪯ F_DG (Lanczos). Right: the smoothed "
        "spectral density of F by stochastic Lanczos quadrature (±2 SE), top three "
        "eigenvalues marked.",
    )
    land = arrays["landscape"]
    fig = plot_surfaces(
        [_SurfaceView(**land["random"]), _SurfaceView(**land["hessian"])],
        titles=["filter-normalised random directions", "Hessian directions (λ_max, λ_min)"],
        kind="contour",
    )
    save(
        fig,
        "landscape.png",
        "Loss landscape",
        "The mean loss on a grid θ + α d₁ + β d₂ along two random (left) and the two "
        "extreme Hessian (right) directions; θ is the red star.",
    )
    return made


class _EstimateView:
    def __init__(self, value: Any, std_error: Any) -> None:
        self.value, self.std_error = value, std_error


class _DensityView:
    def __init__(self, grid: Any, density: Any, std_error: Any) -> None:
        self.grid, self.density, self.std_error = grid, density, std_error


class _SurfaceView:
    def __init__(self, coordinates: Any, values: Any) -> None:
        self.coordinates, self.values = tuple(coordinates), values


def _new_figure(width: float, height: float, cols: int = 1) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    for i in range(cols):
        fig.add_subplot(1, cols, i + 1)
    return fig


def _estimators_figure(section: dict[str, Any]) -> Any:
    from matplotlib.ticker import FuncFormatter

    fig = _new_figure(6.5, 4.2)
    ax = fig.axes[0]
    colour = 0
    for row in section["rows"]:
        cost = row["cost_gradient_steps"]
        if row["call"] == "fisher_bounds":
            points = [
                ("lower bound F_LR", row["lower_relative_error"]),
                ("upper bound F_DG", row["upper_relative_error"]),
            ]
        elif row["call"] == "fisher_diagonal":
            continue
        else:
            points = [(row["estimator"], row["relative_error"])]
        for label, err in points:
            ax.plot([cost], [err], "o", color=f"C{colour % 10}", label=label)
            colour += 1
    exact = next(r for r in section["rows"] if r["call"] == "fisher_diagonal")
    ax.axvline(exact["cost_gradient_steps"], color="k", linestyle="--", linewidth=0.8)
    ax.text(
        exact["cost_gradient_steps"],
        0.02,
        " exact",
        transform=ax.get_xaxis_transform(),
        fontsize="small",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("cost (gradient steps)")
    ax.set_ylabel("relative error of the diagonal")
    ax.set_title("estimators of diag F: error against cost")
    ax.legend(fontsize="x-small", loc="best")
    return fig


def _core_space_figure(core: dict[str, Any]) -> Any:
    import numpy as np

    fig = _new_figure(10.0, 3.8, cols=2)
    left, right = fig.axes
    order = np.argsort(core["lambda_max"])
    x = np.arange(order.size)
    left.fill_between(
        x, core["lower"][order], core["upper"][order], color="C2", alpha=0.3, label="bounds"
    )
    left.plot(x, core["lambda_max"][order], color="k", linewidth=1.0, label="λ_max")
    left.set_xlabel("inputs, sorted by λ_max")
    left.set_ylabel("λ_max of the output metric")
    left.set_yscale("log")
    left.set_title("λ_max and its deterministic bounds")
    left.legend(fontsize="small")
    eig = core["eigenvalues"].ravel()
    positive = eig[eig > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 40)
        right.hist(positive, bins=bins, color="C0")
        right.set_xscale("log")
    right.set_xlabel("eigenvalue")
    right.set_ylabel("count")
    right.set_title("nonzero eigenvalues of the output metric, all inputs")
    return fig


def _spectrum_figure(spectrum: dict[str, Any]) -> Any:
    import numpy as np

    fig = _new_figure(11.0, 3.9, cols=2)
    ax = fig.axes[0]
    k = np.arange(1, spectrum["k"] + 1)
    ax.plot(k, spectrum["upper"]["eigenvalues"], "v", color="C3", label="λ_i(F_DG)")
    ax.plot(k, spectrum["exact"]["eigenvalues"], "o", color="k", label="λ_i(F)")
    ax.plot(k, spectrum["lower"]["eigenvalues"], "^", color="C2", label="λ_i(F_LR)")
    ax.set_yscale("log")
    ax.set_xlabel("i")
    ax.set_ylabel("eigenvalue")
    ax.set_title("top eigenvalues, F_LR ⪯ F ⪯ F_DG")
    ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------- #
# the documents


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{digits}g}"
    return str(x)


def _pm(value: Any, se: Any) -> str:
    return _fmt(value) if se is None else f"{_fmt(value)} ± {_fmt(se, 2)}"


def _percent(x: Any) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


Block = tuple[str, Any]  # ("p", text) | ("table", (header, rows)) | ("figure", entry)


def _sections(
    numbers: dict[str, Any], figures: list[dict[str, str]]
) -> list[tuple[str, list[Block]]]:
    fig = {f["file"]: f for f in figures}
    an = numbers["analysed"]
    sections: list[tuple[str, list[Block]]] = []

    overview: list[Block] = []
    model = numbers.get("model", {})
    data = numbers.get("data", {})
    rows = [
        ["model", model.get("description", "n/a")],
        ["framework", numbers["environment"]["framework"]],
        ["parameters D", _fmt(an["num_params"])],
        ["outputs C", _fmt(an["num_outputs"])],
        ["family", an["family"]],
        ["dtype", an["dtype"]],
        ["data", data.get("description", "n/a")],
        ["analysed inputs N", _fmt(an["num_inputs"])],
        ["accuracy on them", _percent(an["accuracy"])],
    ]
    training = numbers.get("training")
    if training:
        rows += [
            ["training", training["description"]],
            ["training accuracy", _percent(training["train_accuracy"])],
            ["training time", f"{training['seconds']:.2f} s"],
        ]
    rows += [
        ["machine", numbers["environment"]["machine"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in numbers["environment"]["versions"].items())],
        ["analysis time", f"{numbers['timing']['analysis_seconds']:.2f} s"],
    ]
    overview.append(("table", (["quantity", "value"], rows)))
    overview.append(
        (
            "p",
            "Every Fisher quantity below is the SUM over the N analysed inputs (the papers' "
            "convention); the loss landscape uses the MEAN loss. All numbers are in "
            "report.json.",
        )
    )
    sections.append(("Overview", overview))

    fd = numbers["fisher_diagonal"]
    body: list[Block] = [
        (
            "p",
            "The diagonal of the Fisher metric F = Σ_x J_xᵀ I(z_x) J_x per parameter block: "
            "exact (fisher_diagonal), its certified bounds diag F_LR ≤ diag F ≤ diag F_DG "
            "(fisher_bounds) and the unbiased detach-and-mix estimate (detach_and_mix, "
            f"{fd['num_probes']} Rademacher probes, one batched backward pass). The block "
            "traces are sums of the diagonal; the estimate's error bar is the standard "
            "error over its probes. 'within 2 SE' is the fraction of diagonal entries "
            "whose exact value lies within two standard errors of the estimate.",
        ),
        (
            "table",
            (
                [
                    "block",
                    "size",
                    "tr F_LR",
                    "tr F (exact)",
                    "tr F_DG",
                    "detach-and-mix",
                    "rel. error",
                    "within 2 SE",
                    "bounds hold",
                ],
                [
                    [
                        r["block"],
                        _fmt(r["size"]),
                        _fmt(r["lower_trace"]),
                        _fmt(r["exact_trace"]),
                        _fmt(r["upper_trace"]),
                        _pm(r["estimate_trace"], r["estimate_trace_std_error"]),
                        _fmt(r["relative_error"], 3),
                        _percent(r["coverage_2se"]),
                        _fmt(r["bounds_hold"]),
                    ]
                    for r in fd["blocks"]
                ],
            ),
        ),
        (
            "p",
            f"Bounds hold entrywise: {_fmt(fd['bounds_hold'])} (largest relative violation "
            f"{_fmt(fd['max_relative_violation'], 3)}, rounding allowed). Median relative "
            f"standard error of an entry: {_fmt(fd['median_relative_std_error'], 3)}.",
        ),
        ("figure", fig["fisher_diagonal.png"]),
    ]
    sections.append(("Fisher diagonal per layer", body))

    es = numbers["estimators"]
    est_rows = []
    for r in es["rows"]:
        if r["call"] == "fisher_bounds":
            err = f"{_fmt(r['lower_relative_error'], 3)} / {_fmt(r['upper_relative_error'], 3)}"
        else:
            err = _fmt(r["relative_error"], 3)
        est_rows.append(
            [
                r["estimator"],
                f"`{r['call']}`",
                _fmt(r["num_probes"]),
                f"{1e3 * r['seconds']:.3g}",
                _fmt(r["cost_gradient_steps"], 3),
                err,
                _fmt(r["trace_relative_error"], 3),
                _percent(r["coverage_2se"]),
            ]
        )
    sections.append(
        (
            "Estimators compared",
            [
                (
                    "p",
                    "All on the same N inputs. Cost is wall-clock time in units of one "
                    f"gradient step ({es['gradient_step']}), measured in this run: "
                    f"{1e3 * es['gradient_step_seconds']:.3g} ms; {es['timing']}. Error is "
                    "‖diag F̂ − diag F‖ / ‖diag F‖ against the exact diagonal (lower / upper "
                    "for the bounds). The empirical Fisher uses the observed labels: it is "
                    "biased, and its zero standard error says nothing about that bias.",
                ),
                (
                    "table",
                    (
                        [
                            "estimator",
                            "call",
                            "probes",
                            "time (ms)",
                            "cost (gradient steps)",
                            "rel. error",
                            "trace rel. error",
                            "within 2 SE",
                        ],
                        est_rows,
                    ),
                ),
                ("figure", fig["estimators.png"]),
            ],
        )
    )

    cs = numbers["core_space"]
    stat_rows = [
        [label, _fmt(cs[key]["min"]), _fmt(cs[key]["median"]), _fmt(cs[key]["max"])]
        for label, key in (
            ("λ_max", "lambda_max"),
            ("lower bound of λ_max", "lambda_max_lower_bound"),
            ("upper bound of λ_max", "lambda_max_upper_bound"),
            ("lower bound / λ_max", "lower_bound_ratio"),
            ("upper bound / λ_max", "upper_bound_ratio"),
            ("trace Σ λ_i", "trace"),
            ("effective rank (Σλ)² / Σλ²", "effective_rank"),
            ("pseudo-determinant", "pseudo_determinant"),
            ("log pseudo-determinant", "log_pseudo_determinant"),
            ("eigenvalues above 1e-6", "num_eigenvalues_above_1e-6"),
        )
    ]
    sections.append(
        (
            "Core space",
            [
                (
                    "p",
                    f"The {cs['num_outputs']} × {cs['num_outputs']} metric I(z) of the output "
                    f"family at each of the {cs['num_inputs']} inputs, never formed: its "
                    "exact spectrum (eigvalsh, secular equation), the deterministic bounds "
                    "of its largest eigenvalue (lambda_max_bounds) and its pseudo-"
                    "determinant. The bounds bracket λ_max at "
                    f"{_percent(cs['lambda_max_bounds_hold'])} of the inputs.",
                ),
                ("table", (["statistic over inputs", "min", "median", "max"], stat_rows)),
                ("figure", fig["core_space.png"]),
            ],
        )
    )

    sp = numbers["spectrum"]
    top_rows = [
        [
            str(i + 1),
            _fmt(sp["lower"]["eigenvalues"][i]),
            _fmt(sp["exact"]["eigenvalues"][i]),
            _fmt(sp["upper"]["eigenvalues"][i]),
            _fmt(sp["exact"]["residuals"][i], 2),
        ]
        for i in range(sp["k"])
    ]
    sections.append(
        (
            "Top of the Fisher spectrum",
            [
                (
                    "p",
                    f"The {sp['k']} largest eigenvalues of F by Lanczos on the matrix-free "
                    "operator (top_eigenpairs), beside those of the bound operators F_LR and "
                    "F_DG, which bracket them by Löwner order: "
                    f"{_fmt(sp['brackets_hold'])}. tr F = {_fmt(sp['trace'])}; the top "
                    f"{sp['k']} carry {_percent(sp['top_fraction_of_trace'])} of it.",
                ),
                (
                    "table",
                    (["i", "λ_i(F_LR)", "λ_i(F)", "λ_i(F_DG)", "residual ‖F y − λ y‖"], top_rows),
                ),
                ("figure", fig["fisher_spectrum.png"]),
            ],
        )
    )

    dim = numbers["dimension"]
    rb, rz = dim["rank_bound"], dim["razor"]
    sections.append(
        (
            "Local dimension and razor",
            [
                (
                    "p",
                    "The local dimension d_ε = #{i : λ_i(F) > ε} (local_dimension: an exact "
                    "Lanczos count when few eigenvalues exceed ε, stochastic Lanczos "
                    "quadrature with a standard error otherwise), beside the structural "
                    f"bound rank F ≤ min(D, N r) = min({rb['num_params']}, {rb['num_inputs']}"
                    f" × {rb['rank_per_input']}) = {rb['value']}.",
                ),
                (
                    "table",
                    (
                        ["ε", "d_ε", "method"],
                        [
                            [_fmt(c["eps"]), _pm(c["value"], c["std_error"] or None), c["method"]]
                            for c in dim["local_dimension"]
                        ],
                    ),
                ),
                (
                    "p",
                    f"The razor complexity with a Gaussian prior of variance σ² = "
                    f"{_fmt(rz['prior_variance'])} (razor): −log p(X|θ̂) + ‖θ̂‖²/(2σ²) + "
                    "½ log det(I + σ² F), against the BIC term (D/2) log N.",
                ),
                (
                    "table",
                    (
                        ["term", "nats"],
                        [
                            ["−log p(X | θ̂)", _fmt(rz["neg_log_likelihood"])],
                            ["‖θ̂‖² / (2σ²)", _fmt(rz["prior_penalty"])],
                            [
                                "½ log det(I + σ² F)",
                                _pm(rz["half_log_det"], rz["half_log_det_std_error"] or None),
                            ],
                            ["razor", _pm(rz["value"], rz["std_error"] or None)],
                            ["BIC term (D/2) log N", _fmt(rz["bic_penalty"])],
                            ["log-det method", rz["method"]],
                        ],
                    ),
                ),
            ],
        )
    )

    ls = numbers["landscape"]
    hess = ls["hessian"]
    rp, hp = ls["random_plane"], ls["hessian_plane"]
    tr = ls["trace"]

    def plane_row(name: str, plane: dict[str, Any]) -> list[str]:
        c, s = plane["curvature"], plane["surface"]
        return [
            name,
            f"{_fmt(c['principal'][0])}, {_fmt(c['principal'][1])}",
            _fmt(c["gaussian"]),
            _fmt(c["mean"]),
            _fmt(s["loss_at_theta"]),
            f"{_fmt(s['min'])} … {_fmt(s['max'])}",
        ]

    sections.append(
        (
            "Loss landscape",
            [
                (
                    "p",
                    f"The mean loss over {ls['num_inputs']} inputs near θ. Hessian "
                    "directions (hessian_directions, Lanczos on Hessian-vector products): "
                    f"λ_max = {_fmt(hess['eigenvalues'][0])}, λ_min = "
                    f"{_fmt(hess['eigenvalues'][1])} (residuals "
                    f"{_fmt(hess['residuals'][0], 2)}, {_fmt(hess['residuals'][1], 2)}). "
                    "Projected on them the Hessian is diag(λ_max, λ_min): a negative λ_min "
                    "shows as a saddle there, which random directions (filter-normalised, "
                    "random_directions) usually hide. Curvatures of each plotted plane at θ "
                    "(projected_curvature):",
                ),
                (
                    "table",
                    (
                        [
                            "plane",
                            "principal curvatures",
                            "Gaussian",
                            "mean",
                            "loss at θ",
                            "loss range on the grid",
                        ],
                        [plane_row("random", rp), plane_row("Hessian", hp)],
                    ),
                ),
                (
                    "p",
                    f"Hessian trace from {tr['num_probes']} Rademacher probes (loss_trace): "
                    "from loss values only "
                    f"{_pm(tr['loss_only']['value'], tr['loss_only']['std_error'])}; with "
                    "Hessian-vector products on the same probes "
                    f"{_pm(tr['hvp']['value'], tr['hvp']['std_error'])}.",
                ),
                ("figure", fig["landscape.png"]),
            ],
        )
    )

    tail: list[Block] = [
        (
            "table",
            (
                ["step", "seconds"],
                [[k, f"{v:.3f}"] for k, v in numbers["timing"]["stages_seconds"].items()],
            ),
        )
    ]
    if numbers["warnings"]:
        tail.append(("p", "Warnings: " + " | ".join(numbers["warnings"])))
    sections.append(("Timing and warnings", tail))
    return sections


def _markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    lines = [f"# {title}", ""]
    for name, blocks in sections:
        lines += [f"## {name}", ""]
        for kind, item in blocks:
            if kind == "p":
                lines += [item, ""]
            elif kind == "table":
                header, rows = item
                lines.append("| " + " | ".join(h or " " for h in header) + " |")
                lines.append("|" + " --- |" * len(header))
                for row in rows:
                    cells = [c.replace("|", "\\|") for c in row]
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
            else:
                lines += [f"![{item['title']}]({item['file']})", "", f"*{item['caption']}*", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.55rem; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
code { font-size: 0.85rem; }
"""


def _html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    for name, blocks in sections:
        parts.append(f"<h2>{e(name)}</h2>")
        for kind, item in blocks:
            if kind == "p":
                parts.append(f"<p>{e(item)}</p>")
            elif kind == "table":
                header, rows = item
                parts.append("<table>")
                if any(header):
                    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    cells = "".join(f"<td>{_inline_code(e(c))}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</table>")
            else:
                parts.append(
                    f'<figure><img src="{e(item["file"])}" alt="{e(item["title"])}">'
                    f"<figcaption>{e(item['caption'])}</figcaption></figure>"
                )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _inline_code(text: str) -> str:
    if text.startswith("`") and text.endswith("`") and len(text) > 1:
        return f"<code>{text[1:-1]}</code>"
    return text


def write_report(analysis: Analysis, out: str | Path, *, title: str | None = None) -> Path:
    """Write ``report.json``, the PNG figures, ``report.md`` and ``index.html`` into ``out``.

    The folder is created if needed; files of the same names are replaced, other
    files are left alone. Returns the path of ``index.html``. Needs matplotlib.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures(analysis, folder)
    numbers = dict(analysis.numbers)
    numbers["figures"] = figures
    heading = title or numbers.get("title") or "fisherbound report"
    numbers["title"] = heading
    text = json.dumps(_jsonable(numbers), indent=1, allow_nan=False)
    (folder / "report.json").write_text(text + "\n", encoding="utf-8")
    sections = _sections(numbers, figures)
    (folder / "report.md").write_text(_markdown(heading, sections), encoding="utf-8")
    index = folder / "index.html"
    index.write_text(_html(heading, sections), encoding="utf-8")
    return index
