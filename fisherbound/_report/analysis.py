"""The analysis behind the report: every part of the library on one trained classifier.

``analyse`` runs the stages in order (the forward pass, the Fisher diagonal, the
estimators compared, the core space, the spectrum, the local dimension and
razor, the loss landscape), times each behind one progress bar, records the
library's warnings, and collects the JSON-ready numbers and the host arrays the
figures are drawn from. The numbers of each stage come from the modules
``diagonal``, ``spectrum`` and ``landscape`` of this package.

Models whose logits have position axes, (N, ∗S, C), are analysed over their
counted positions (``positions``): every linearization and loss function gets the
mask of the counted positions. There a stage that the library refuses (a
ValueError, TypeError or NotImplementedError) is reported as not run, with the
library's message, instead of ending the analysis.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fisherbound._report.diagonal import compare_estimators, diagonal_estimate, diagonal_numbers
from fisherbound._report.hoststats import host, interval
from fisherbound._report.landscape import landscape as landscape_numbers
from fisherbound._report.positions import (
    REFUSALS,
    Positions,
    count,
    counted_rows,
    label_rows,
    not_run,
)
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
    mask: Any = None,
    ignore_index: int | None = None,
    landscape: Sequence[tuple[Any, ...]] | None = None,
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
        Host (NumPy) arrays: the N analysed inputs (or a dict of them: keyword
        inputs) and their labels: integer class indices (N,) or (N, ∗S), or
        floating target distributions (N, C) or (N, ∗S, C), for the categorical
        family; rows in [0, 1] (N, C) or (N, ∗S, C) for the Bernoulli family (class
        axis last). Labels with position axes S analyse a model
        whose logits are (N, ∗S, C).
    mask
        None (every position counts) or a host boolean / 0-1 array (N, ∗S): the
        positions that count (padding is False).
    ignore_index
        Class labels (N, ∗S) equal to it do not count either (e.g. -100, as
        ``torch.nn.CrossEntropyLoss``); None: none. Applies to labels with
        position axes.
    landscape
        (inputs, labels) or (inputs, labels, mask) host batches of the loss whose
        landscape is drawn (the mean loss over all of their counted positions);
        default the analysed batch.
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
    UserWarnings and RuntimeWarnings of the library (an unreached ``target_error``,
    a Lanczos run stopped at its budget) are recorded in ``numbers["warnings"]``
    instead of being printed. With position axes every
    Fisher quantity is the sum over the examples and over their counted
    positions, F = Σ_x Σ_t J_xtᵀ I(z_xt) J_xt, and the landscape's mean loss is
    over the counted positions; ``numbers["analysed"]["positions"]`` counts them.
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
            warnings.simplefilter("always", RuntimeWarning)  # an unconverged eigsh, say
            batch = (inputs, labels, mask, ignore_index)
            run(subject, batch, landscape, cfg, stages, numbers, arrays)
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


def analysed(
    fam: Any, lin: Any, logits: Any, labels: Any, info: Positions | None = None
) -> dict[str, Any]:
    """The ``analysed`` section: sizes, family, dtype, fit and parameter blocks.

    The fit is ``accuracy`` (classification) or ``rmse`` and ``variance``
    (Gaussian: the root mean squared error per output entry, and σ²). With
    positions, the fit is over the counted positions and ``positions`` holds
    their numbers.
    """
    import numpy as np

    from fisherbound.families import Categorical, Gaussian

    host_labels = np.asarray(labels)
    if isinstance(fam, Gaussian):  # squared errors of the outputs, summed over C
        right = np.sum((np.asarray(logits) - host_labels) ** 2, axis=-1)
    elif isinstance(fam, Categorical) and label_rows(fam, host_labels):  # the target's mode
        right = np.argmax(logits, axis=-1) == np.argmax(host_labels, axis=-1)
    elif isinstance(fam, Categorical):
        right = np.argmax(logits, axis=-1) == host_labels
    else:  # the fraction of right entries (sigmoids)
        right = (logits > 0) == (host_labels > 0.5)
    if info is not None and info.mask is not None:
        right = right[np.asarray(info.mask)]
    fit: dict[str, Any]
    if isinstance(fam, Gaussian):
        # root mean squared error per output entry; the family's σ² next to it
        fit = {"rmse": math.sqrt(float(np.mean(right)) / int(logits.shape[-1]))}
        fit["variance"] = fam.variance
    else:
        fit = {"accuracy": float(np.mean(right))}
    blocks = [
        {"name": b.name, "shape": list(b.shape), "offset": int(b.offset), "size": int(b.size)}
        for b in lin.blocks
    ]
    out = {
        "num_inputs": int(logits.shape[0]),
        "num_outputs": int(logits.shape[-1]),
        "num_params": int(lin.num_params),
        "family": type(fam).__name__,
        "dtype": str(lin.logits.dtype),
        **fit,
        "blocks": blocks,
    }
    if info is not None:
        out["output_shape"] = [int(s) for s in logits.shape]
        out["positions"] = info.numbers()
    return out


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
        "interval": interval(diag_est),
    }


def masked_subject(subject: Subject, mask: Any) -> Subject:
    """``subject`` whose linearizations and loss functions all count only ``mask``."""
    if mask is None:
        return subject
    return dataclasses.replace(
        subject,
        linearize=lambda x, m=None: subject.linearize(x, mask if m is None else m),
        loss_function=lambda x, y, reduction, m=None: subject.loss_function(
            x, y, reduction, mask if m is None else m
        ),
    )


def backend_mask(info: Positions | None, like: Any) -> Any:
    """The counted positions as a boolean array of ``like``'s namespace and device."""
    if info is None or info.mask is None:
        return None
    from fisherbound._lib import array_namespace, device_of

    xp = array_namespace(like)
    return xp.asarray(info.mask, dtype=xp.bool, device=device_of(like))


def guarded(
    on: bool, numbers: dict[str, Any], key: str, fn: Any, arrays: dict[str, Any] | None = None
) -> None:
    """``numbers[key] (, arrays[key]) = fn()``; with ``on``, a refusal is recorded instead."""
    try:
        result = fn()
    except REFUSALS as err:
        if not on:
            raise
        numbers[key] = not_run(err)
        return
    if arrays is None:
        numbers[key] = result
    else:
        numbers[key], arrays[key] = result


def landscape_batches(subject: Subject, batches: Any, ignore_index: int | None) -> list[Any]:
    """Backend (inputs, labels, mask) of each landscape batch (host pairs or triples)."""
    out = []
    for batch in batches:
        a, b, *rest = batch
        info, labels = count(subject.family, b, rest[0] if rest else None, ignore_index)
        y = subject.labels(labels)
        out.append((subject.inputs(a), y, backend_mask(info, y)))
    return out


def run(
    subject: Subject,
    batch: tuple[Any, Any, Any, int | None],
    landscape: Sequence[tuple[Any, ...]] | None,
    cfg: Settings,
    stages: Stages,
    numbers: dict[str, Any],
    arrays: dict[str, Any],
) -> None:
    """Every stage of ``analyse`` in order, filling ``numbers`` and ``arrays``."""
    import numpy as np

    from fisherbound._lib import to_host

    fam = subject.family
    inputs, labels, host_mask, ignore_index = batch
    info, clean = count(fam, labels, host_mask, ignore_index)
    x, y = subject.inputs(inputs), subject.labels(clean)
    mask = backend_mask(info, y)
    sub = masked_subject(subject, mask)
    with stages("forward pass"):
        lin = sub.linearize(x)
        logits = host(lin.logits)
    numbers["analysed"] = analysed(fam, lin, logits, clean, info)
    eps = float(np.finfo(np.asarray(to_host(lin.logits)).dtype).eps)
    on = info is not None  # positions: a refused stage is reported, not raised
    guarded(on, arrays, "diagonal", lambda: run_diagonal(lin, fam, eps, cfg, stages, numbers))
    if "not_run" in arrays["diagonal"]:  # e.g. P · C above max_cotangents: no exact F
        numbers["fisher_diagonal"] = arrays.pop("diagonal")
        reason = "it needs the exact Fisher diagonal, which did not run"
        numbers["estimators"] = {"not_run": reason}
        exact = None
    else:
        exact = arrays["diagonal"]["exact"]
        if "estimators" in cfg.skip:
            numbers["estimators"] = skipped("estimators")
        else:
            with stages("estimators compared"):
                guarded(
                    on, numbers, "estimators", lambda: compare_estimators(sub, x, y, exact, cfg)
                )
    trace = None if exact is None else float(np.sum(exact))
    with stages("core space"):
        if info is None:
            numbers["core_space"], arrays["core_space"] = core_space(fam, lin.logits, eps)
        else:  # the output metric at each counted position
            rows = counted_rows(info, logits)
            guarded(on, numbers, "core_space", lambda: core_space(fam, rows, eps), arrays)
    run_spectrum(lin, fam, cfg, stages, numbers, arrays, trace, on)
    rules = arrays.pop("rules", None)
    if "dimension" in cfg.skip:
        numbers["dimension"] = skipped("dimension")
    else:
        with stages("local dimension and razor"):
            theta = sub.loss_function(x, y, "sum").params
            guarded(
                on, numbers, "dimension", lambda: dimension(lin, fam, y, theta, cfg, info, rules)
            )
    if "landscape" in cfg.skip:
        numbers["landscape"] = skipped("landscape")
        return
    if landscape is None:
        batches = [(x, y, mask)]
    else:
        batches = landscape_batches(subject, landscape, ignore_index)

    def draw() -> tuple[dict[str, Any], dict[str, Any]]:
        return landscape_numbers(subject, batches, cfg, stages)

    guarded(on, numbers, "landscape", draw, arrays)


def skipped(name: str) -> dict[str, str]:
    """The ``not_run`` entry of a section left out on request (``Settings.skip``)."""
    return {"not_run": f"skipped on request (--skip {name})", "skipped": name}


def run_spectrum(
    lin: Any,
    fam: Any,
    cfg: Settings,
    stages: Stages,
    numbers: dict[str, Any],
    arrays: dict[str, Any],
    trace: float | None,
    on: bool,
) -> None:
    """The top of the spectrum and the spectral density (kept in ``arrays["rules"]``).

    The density's Gauss rules serve the local dimension and the razor too, so they
    are computed when either section runs, and reported when the spectrum runs.
    """
    spectrum_on = "spectrum" not in cfg.skip
    if spectrum_on:
        with stages("top of the spectrum"):
            guarded(on, numbers, "spectrum", lambda: top_spectrum(lin, fam, cfg, trace))
    else:
        numbers["spectrum"] = skipped("spectrum")
    ran = spectrum_on and "not_run" not in numbers["spectrum"]
    if "density" in cfg.skip:
        if ran:
            numbers["spectrum"]["density"] = skipped("density")
        return
    if not ran and (spectrum_on or "dimension" in cfg.skip):  # refused, or wanted by none
        return
    with stages("spectral density"):
        out: dict[str, Any] = {}
        guarded(on, out, "density", lambda: density(lin, fam, cfg), arrays)
    if "density" in arrays:
        arrays["rules"] = arrays["density"].pop("rules")
    if ran:
        numbers["spectrum"]["density"] = out["density"]
    else:
        arrays.pop("density", None)
