"""The analysis behind the report: every part of the library on one trained classifier.

``analyse`` runs the stages in order (the forward pass, the Fisher diagonal, the
estimators compared, the core space, the spectrum, the local dimension and
razor, the loss landscape), times each behind one progress bar, records the
library's warnings, and collects the JSON-ready numbers and the host arrays the
figures are drawn from. The numbers of each stage come from the modules
``diagonal``, ``spectrum`` and ``landscape`` of this package.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fisherbound._report.diagonal import compare_estimators, diagonal_estimate, diagonal_numbers
from fisherbound._report.hoststats import host
from fisherbound._report.landscape import landscape as landscape_numbers
from fisherbound._report.settings import Analysis, Settings
from fisherbound._report.spectrum import core_space, density, dimension, top_spectrum
from fisherbound._report.subjects import Subject
from fisherbound._report.timing import Stages

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
    stages = Stages(STAGES, cfg.progress)
    start = time.perf_counter()
    numbers: dict[str, Any] = {
        "schema": "fisherbound-report/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(subject.framework),
        "settings": asdict(cfg),
    }
    numbers.update(context or {})
    arrays: dict[str, Any] = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            run(subject, inputs, labels, landscape, cfg, stages, numbers, arrays)
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


def environment(framework: str) -> dict[str, Any]:
    """Python, machine, framework and library versions, for the report's overview."""
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


def analysed(fam: Any, lin: Any, logits: Any, labels: Any) -> dict[str, Any]:
    """The ``analysed`` section: sizes, family, dtype, accuracy and parameter blocks."""
    import numpy as np

    from fisherbound.families import Categorical

    host_labels = np.asarray(labels)
    if isinstance(fam, Categorical):
        accuracy = float(np.mean(np.argmax(logits, axis=1) == host_labels))
    else:
        accuracy = float(np.mean((logits > 0) == (host_labels > 0.5)))
    blocks = [
        {"name": b.name, "shape": list(b.shape), "offset": int(b.offset), "size": int(b.size)}
        for b in lin.blocks
    ]
    return {
        "num_inputs": int(logits.shape[0]),
        "num_outputs": int(logits.shape[1]),
        "num_params": int(lin.num_params),
        "family": type(fam).__name__,
        "dtype": str(lin.logits.dtype),
        "accuracy": accuracy,
        "blocks": blocks,
    }


def run_diagonal(
    lin: Any, fam: Any, eps: float, cfg: Settings, stages: Stages, numbers: dict[str, Any]
) -> dict[str, Any]:
    """The Fisher-diagonal stages: exact, bounds, detach-and-mix; returns their arrays."""
    from fisherbound.fisher import fisher_bounds, fisher_diagonal

    with stages("exact Fisher diagonal"):
        exact = host(fisher_diagonal(lin, fam, progress=cfg.progress))
    with stages("deterministic bounds"):
        lo_b, hi_b = fisher_bounds(lin, fam, progress=cfg.progress)
        lower, upper = host(lo_b), host(hi_b)
    with stages("detach-and-mix"):
        diag_est, trace_samples = diagonal_estimate(lin, fam, cfg)
    numbers["fisher_diagonal"] = diagonal_numbers(
        lin.blocks, exact, lower, upper, diag_est, trace_samples, eps, cfg
    )
    return {
        "blocks": list(lin.blocks),
        "exact": exact,
        "lower": lower,
        "upper": upper,
        "estimate": host(diag_est.value),
        "std_error": host(diag_est.std_error),
    }


def run(
    subject: Subject,
    inputs: Any,
    labels: Any,
    landscape: Sequence[tuple[Any, Any]] | None,
    cfg: Settings,
    stages: Stages,
    numbers: dict[str, Any],
    arrays: dict[str, Any],
) -> None:
    """Every stage of ``analyse`` in order, filling ``numbers`` and ``arrays``."""
    import numpy as np

    from fisherbound._lib import to_host

    fam = subject.family
    x, y = subject.inputs(inputs), subject.labels(labels)
    with stages("forward pass"):
        lin = subject.linearize(x)
        logits = host(lin.logits)
    numbers["analysed"] = analysed(fam, lin, logits, labels)
    eps = float(np.finfo(np.asarray(to_host(lin.logits)).dtype).eps)
    arrays["diagonal"] = run_diagonal(lin, fam, eps, cfg, stages, numbers)
    exact = arrays["diagonal"]["exact"]
    with stages("estimators compared"):
        numbers["estimators"] = compare_estimators(subject, x, y, exact, cfg)
    with stages("core space"):
        numbers["core_space"], arrays["core_space"] = core_space(fam, lin.logits, eps)
    with stages("top of the spectrum"):
        numbers["spectrum"] = top_spectrum(lin, fam, cfg, float(np.sum(exact)))
    with stages("spectral density"):
        numbers["spectrum"]["density"], arrays["density"] = density(lin, fam, cfg)
    with stages("local dimension and razor"):
        theta = subject.loss_function(x, y, "sum").params
        numbers["dimension"] = dimension(lin, fam, y, theta, cfg)
    batches = (
        [(x, y)]
        if landscape is None
        else [(subject.inputs(a), subject.labels(b)) for a, b in landscape]
    )
    numbers["landscape"], arrays["landscape"] = landscape_numbers(subject, batches, cfg, stages)
