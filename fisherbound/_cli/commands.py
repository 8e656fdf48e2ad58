"""Running a command: ``fisherbound demo`` and ``fisherbound report``.

Each command checks its extras and options, builds the report's ``Subject``
(the demo trains its MLP, the report loads the user's model and data), runs
``analyse`` and ``write_report``, and prints one line with the report's path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fisherbound._cli.loading import (
    MASK_KEY,
    Data,
    check_outputs,
    load_dataset,
    load_model,
    selected_params,
)
from fisherbound._cli.trainers import TRAINERS, accuracy_and_loss, fit, framework_context
from fisherbound._cli.usage import UsageError, require
from fisherbound._report.settings import Settings

#: Where the demo's and the report's files go unless ``--out`` says otherwise (with a
#: ``.gitignore``, ``ignore_in_git``).
DEFAULT_OUT = Path("fisherbound-report")


def settings_from(args: argparse.Namespace) -> Settings:
    """The analysis ``Settings`` of the parsed options, after the checks across options."""
    if args.target_error is not None and args.num_probes < 2:
        msg = (
            "--target-error needs --num-probes >= 2 (a standard error needs two probes per "
            f"round); got --num-probes {args.num_probes}."
        )
        raise UsageError(msg)
    steps = args.lanczos_steps
    if steps is not None and steps < max(args.top_k, args.max_count + 1, 2):
        msg = (
            f"--lanczos-steps must be at least --top-k ({args.top_k}), --max-count + 1 "
            f"({args.max_count + 1}) and 2; got {steps}."
        )
        raise UsageError(msg)
    return Settings(
        num_probes=args.num_probes,
        target_error=args.target_error,
        seed=args.seed,
        top_k=args.top_k,
        prior_variance=args.prior_variance,
        slq_probes=args.slq_probes,
        lanczos_steps=steps,
        max_count=args.max_count,
        grid_points=args.grid,
        trace_probes=args.trace_probes,
        repeats=args.repeats,
        progress=False if args.quiet else None,
        skip=tuple(dict.fromkeys(args.skip)),
    )


@contextlib.contextmanager
def threads(count: int | None, *, torch: bool = False) -> Iterator[None]:
    """Limit the BLAS / OpenMP thread pools (NumPy, torch) to ``count`` threads, then restore.

    Small arrays gain nothing from several threads, and on a busy machine idle
    BLAS threads that spin and wait cost far more than they give. ``torch=True``
    imports torch first (if installed), so that its thread pool is limited too.
    """
    if count is None:
        yield
        return
    if torch and importlib.util.find_spec("torch") is not None:
        import torch as _torch  # noqa: F401 - loads its OpenMP runtime before the limits
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("threadpoolctl") is not None:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=count))
        if "torch" in sys.modules:
            import torch as pt

            stack.callback(pt.set_num_threads, pt.get_num_threads())
            pt.set_num_threads(count)
        yield


def write(
    subject: Any,
    x: Any,
    y: Any,
    args: argparse.Namespace,
    settings: Settings,
    context: dict[str, Any],
    start: float,
    landscape: list[tuple[Any, Any]] | None = None,
    mask: Any = None,
    ignore_index: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """``analyse`` and ``write_report`` into ``--out``: the numbers and index.html's path."""
    from fisherbound._report.analysis import analyse
    from fisherbound._report.render import write_report

    analysis = analyse(
        subject,
        x,
        y,
        mask=mask,
        ignore_index=ignore_index,
        landscape=landscape,
        settings=settings,
        context=context,
    )
    analysis.numbers["timing"]["total_seconds"] = time.perf_counter() - start
    if Path(args.out) == DEFAULT_OUT:
        ignore_in_git(DEFAULT_OUT)
    return analysis.numbers, write_report(analysis, args.out).resolve()  # a path to click on


#: The ``.gitignore`` written into the default report folder.
GITIGNORE = (
    "# Written by fisherbound into its default report folder: the report is generated\n"
    "# output, so git ignores it. Delete this file to commit the report.\n*\n"
)


def ignore_in_git(folder: Path) -> None:
    """Create ``folder`` with a ``.gitignore`` of ``*`` unless it has one.

    The default report folder lands in the working directory, often a git
    repository; the file keeps it out of ``git status`` wherever that is, as
    pytest's and ruff's caches do. A folder chosen with ``--out`` is the user's.
    """
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".gitignore"
    if not marker.exists():
        marker.write_text(GITIGNORE, encoding="utf-8")


def digits(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any]:
    """The digits (inputs / 16, labels) and the indices of test, training and landscape."""
    import numpy as np
    from sklearn.datasets import load_digits

    data = load_digits()
    x_all, y_all = data.data / 16.0, np.asarray(data.target)
    total = int(y_all.shape[0])
    if args.test_inputs > total - 100:
        msg = (
            f"--test-inputs must leave at least 100 of the {total} digits for training; "
            f"got {args.test_inputs}."
        )
        raise UsageError(msg)
    order = np.random.default_rng(args.seed).permutation(total)
    test, train = order[: args.test_inputs], order[args.test_inputs :]
    return x_all, y_all, test, train, train[: args.landscape_inputs]


def demo(args: argparse.Namespace) -> int:
    """``fisherbound demo``: train the MLP on the digits, then write its report."""
    require("sklearn", "scikit-learn", "demo")
    require("matplotlib", "matplotlib", "demo")
    if args.framework != "numpy":
        require(args.framework, args.framework, args.framework)
    settings = settings_from(args)
    from fisherbound.adapters.numpy import MLP

    start = time.perf_counter()
    x_all, y_all, test, train, landscape = digits(args)
    sizes = [64, *args.hidden, 10]
    init = MLP.random(sizes, activation="tanh", rng=args.seed)
    arch = "-".join(str(s) for s in sizes)
    description = f"MLP {arch} (tanh), float64, {init.num_params} parameters"
    with framework_context(args.framework):
        trainer = TRAINERS[args.framework](init, description)
        t0 = time.perf_counter()
        theta, steps = fit(trainer, x_all[train], y_all[train], args, settings.progress)
        subject = trainer.subject(theta)
        train_seconds = time.perf_counter() - t0
        train_acc, train_loss = accuracy_and_loss(subject, x_all[train], y_all[train])
        context = {
            "title": f"fisherbound demo: MLP {arch} on the digits ({args.framework})",
            "command": "fisherbound " + " ".join(args.argv),
            "model": {"description": description, "sizes": sizes, "activation": "tanh"},
            "data": {
                "description": (
                    f"scikit-learn digits (8×8 images / 16, 10 classes): {len(train)} for "
                    f"training, {len(test)} held out and analysed; the landscape on the "
                    f"first {len(landscape)} training digits"
                ),
                "num_train": len(train),
                "num_test": len(test),
                "num_landscape": len(landscape),
            },
            "training": {
                "description": (
                    f"Adam (lr {args.learning_rate:g}) on the mean cross-entropy, "
                    f"{args.epochs} epochs of mini-batches of {min(args.batch_size, len(train))}"
                    f" ({steps} steps)"
                ),
                "steps": steps,
                "seconds": train_seconds,
                "train_accuracy": train_acc,
                "train_loss": train_loss,
            },
        }
        numbers, index = write(
            subject,
            x_all[test],
            y_all[test],
            args,
            settings,
            context,
            start,
            landscape=[(x_all[landscape], y_all[landscape])],
        )
    an = numbers["analysed"]
    print(
        f"fisherbound demo ({args.framework}): MLP {arch}, test accuracy "
        f"{100 * an['accuracy']:.1f}%, D = {an['num_params']}, N = {an['num_inputs']}; report "
        f"in {time.perf_counter() - start:.1f} s: {index}"
    )
    return 0


def report_dataset(args: argparse.Namespace) -> tuple[Data, int]:
    """The first ``--max-inputs`` examples of DATA (checked rows and mask) and its size."""
    import numpy as np

    data = load_dataset(Path(args.data))
    x, y = data.inputs, data.labels
    if isinstance(x, dict):
        rows = {f"x_{k}": int(v.shape[0]) if v.ndim else -1 for k, v in x.items()}
        if len(set(rows.values())) != 1:
            msg = (
                f"DATA {args.data}: every keyword input must have the same N rows; got "
                f"{', '.join(f'{k} {v}' for k, v in rows.items())}."
            )
            raise UsageError(msg)
        if int(np.shape(y)[0] if np.ndim(y) else -1) != data.num_rows:
            msg = (
                f"DATA {args.data} must hold one label per input; got {data.num_rows} inputs "
                f"and labels of shape {np.shape(y)}."
            )
            raise UsageError(msg)
    elif int(np.shape(y)[0] if np.ndim(y) else -1) != int(x.shape[0]):
        msg = (
            f"DATA {args.data} must hold one label per input; got {x.shape[0]} inputs "
            f"(shape {x.shape}) and labels of shape {np.shape(y)}."
        )
        raise UsageError(msg)
    total = data.num_rows
    if total == 0:
        msg = f"DATA {args.data} holds no inputs."
        raise UsageError(msg)
    return data.head(args.max_inputs), total


def label_positions(args: argparse.Namespace, labels: Any) -> tuple[Any, tuple[int, ...]]:
    """The labels, class axis last (rows), and S, the position axes they ask for.

    Rows (N, ∗S, C): Bernoulli labels, and categorical target distributions
    (``--soft-targets``, made floating here); else categorical class indices (N, ∗S).
    """
    import numpy as np

    soft = getattr(args, "soft_targets", False)
    if soft and args.family != "categorical":
        msg = (
            f"--soft-targets is for the categorical family; got --family {args.family}, whose "
            "labels are rows already (Bernoulli: in [0, 1], soft or binary; Gaussian: real "
            "targets)."
        )
        raise UsageError(msg)
    if args.family == "categorical" and not soft:
        return labels, tuple(int(s) for s in labels.shape[1:])
    if soft:
        labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim < 3:  # rows (N, C): no positions (checked against the logits later)
        return labels, ()
    kind = "target distributions" if soft else f"{args.family.capitalize()} labels"
    if not -labels.ndim <= args.class_axis < labels.ndim or args.class_axis % labels.ndim == 0:
        msg = (
            f"--class-axis {args.class_axis} is not an axis of the {kind} of shape "
            f"{labels.shape} other than 0 (labels have the model output's layout)."
        )
        raise UsageError(msg)
    moved = np.moveaxis(labels, args.class_axis, -1)
    return moved, tuple(int(s) for s in moved.shape[1:-1])


def check_positions(
    args: argparse.Namespace, data: Data, labels: Any, positions: tuple[int, ...]
) -> None:
    """The mask has the labels' positions (N, ∗S), and some position counts."""
    import numpy as np

    n = int(labels.shape[0])
    mask = data.mask
    if mask is not None and tuple(mask.shape) != (n, *positions):
        msg = (
            f"DATA {args.data}: the mask (key {data.mask_key}) must have the shape (N, *S) = "
            f"{(n, *positions)} of the labels' positions; got {tuple(mask.shape)}."
        )
        raise UsageError(msg)
    keep = np.ones((n, *positions), dtype=bool) if mask is None else mask
    indices = args.family == "categorical" and not getattr(args, "soft_targets", False)
    ignoring = indices and args.ignore_index is not None and positions
    if ignoring:
        keep = keep & (labels != args.ignore_index)
    if not np.any(keep):
        by = [f"the mask (key {data.mask_key})"] if mask is not None else []
        if ignoring:
            by.append(f"the ignore index {args.ignore_index} (--ignore-index)")
        msg = (
            f"DATA {args.data}: no position counts: {' and '.join(by)} leave none of the "
            f"{keep.size} positions of the first {n} inputs."
        )
        raise UsageError(msg)


def report_family(args: argparse.Namespace) -> Any:
    """The family of ``--family`` (with ``--variance`` for the Gaussian one)."""
    from fisherbound.families import Bernoulli, Categorical, Gaussian

    variance = getattr(args, "variance", None)
    if variance is not None and args.family != "gaussian":
        msg = f"--variance is for the gaussian family (regression); got --family {args.family}."
        raise UsageError(msg)
    if args.family == "gaussian":
        return Gaussian(variance=1.0 if variance is None else variance)
    return Categorical() if args.family == "categorical" else Bernoulli()


def report(args: argparse.Namespace) -> int:
    """``fisherbound report MODEL DATA``: the analysis of the user's model and data."""
    import numpy as np

    require("torch", "torch", "torch")
    require("matplotlib", "matplotlib", "demo")
    settings = settings_from(args)
    family = report_family(args)
    from fisherbound._report.subjects import torch_subject

    start = time.perf_counter()
    data, total = report_dataset(args)
    x = data.inputs
    y, positions = label_positions(args, data.labels)
    check_positions(args, data, y, positions)
    model, origin = load_model(args.model, args.factory)
    model.eval()
    names, count = selected_params(model, args.params)
    subject = torch_subject(
        model,
        family=family,
        params=names,
        description=f"{origin}, {count} parameters",
        output=args.output,
        class_axis=args.class_axis,
    )
    soft = bool(getattr(args, "soft_targets", False))
    ignore_index = args.ignore_index if positions and not soft else None
    check_outputs(
        model,
        subject,
        x,
        y,
        "soft" if soft else args.family,
        output=args.output,
        class_axis=args.class_axis,
        positions=positions,
        mask=data.mask,
        ignore_index=ignore_index,
    )
    if args.family == "categorical" and not soft:
        y = np.asarray(y).astype(np.int64)  # class indices (integral floats were checked)
    n = data.num_rows
    description = f"{args.data} (keys {data.keys}): the first {n} of {total} inputs"
    if data.mask_key is not None and data.mask_key != MASK_KEY:
        description += f"; the keyword input {data.mask_key} is the mask"
    about: dict[str, Any] = {"description": description, "num_inputs_in_file": total}
    if positions or data.mask is not None:
        about.update(
            mask_key=data.mask_key,
            ignore_index=ignore_index,
            output=args.output,
            class_axis=args.class_axis,
        )
    context = {
        "title": f"fisherbound report: {args.model} on {args.data}",
        "command": "fisherbound " + " ".join(args.argv),
        "model": {"description": f"{origin}, {count} parameters", "params": names},
        "data": about,
        "training": None,
    }
    numbers, index = write(
        subject, x, y, args, settings, context, start, mask=data.mask, ignore_index=ignore_index
    )
    an = numbers["analysed"]
    counted = ""
    if "positions" in an:
        pos = an["positions"]
        counted = f", P = {pos['per_example']}, K = {pos['counted']} counted positions"
    print(
        f"fisherbound report: D = {an['num_params']}, N = {an['num_inputs']}, C = "
        f"{an['num_outputs']}{counted}; report in {time.perf_counter() - start:.1f} s: {index}"
    )
    return 0
