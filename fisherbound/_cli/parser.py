"""The argument parser of ``fisherbound demo`` and ``fisherbound report``.

Every option, its default, its help text and its check (the argument types of
``usage``); each subcommand names the function that runs it (``commands``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fisherbound._cli.commands import DEFAULT_OUT
from fisherbound._cli.commands import demo as run_demo
from fisherbound._cli.commands import report as run_report
from fisherbound._cli.trainers import TRAINERS
from fisherbound._cli.usage import (
    int_at_least,
    int_or_none,
    non_negative_int,
    nonzero_int,
    positive_float,
    positive_int,
    selector,
)
from fisherbound._report.settings import SKIPPABLE

#: ``--family`` choices of ``fisherbound report``.
FAMILIES = ("categorical", "bernoulli", "gaussian")

#: ``fisherbound demo``: its line in the command list and its description.
DEMO_SUMMARY = "train a small classifier on the bundled digits and write a report on it"
DEMO_DESCRIPTION = (
    "Train an MLP (64-32-10, tanh, float64) on scikit-learn's bundled digits with "
    "Adam, then write a report folder (report.md, index.html, PNG figures, "
    "report.json) on its Fisher information, measured on held-out digits. Needs the "
    "'demo' extra (scikit-learn, matplotlib, tqdm); no network. --framework torch "
    "or jax trains and analyses the same network (same initial weights) there."
)

#: ``fisherbound report``: its line in the command list and its description.
REPORT_SUMMARY = "the same analysis for your own torch model and data"
REPORT_DESCRIPTION = (
    "Analyse a trained torch classifier on your data and write the report folder. "
    "MODEL is a Python file with a factory (model.py:make_model, or model.py with "
    "--factory make_model; called with no arguments, it returns the nn.Module with "
    "its weights loaded), or a TorchScript file (torch.jit.save), or a whole module "
    "saved with torch.save. WARNING: a torch.save file is loaded with "
    "torch.load(weights_only=False), which unpickles and so EXECUTES code from the "
    "file: use only files you trust (a Python factory executes your code, too). "
    "DATA is an .npz file (numpy.savez) with the inputs and labels under the keys "
    "x and y (or inputs and labels): class indices (N,) for the categorical "
    "family (target distributions (N, C) with --soft-targets), rows in [0, 1] "
    "(N, C) for the Bernoulli family, real targets (N, C) for the Gaussian family "
    "(regression, --variance). The model is put in eval "
    "mode and must return logits (N, C) (log-softmax outputs are fine, "
    "probabilities are not). Models whose logits have position axes (a token "
    "classifier or language model (N, T, C); segmentation (N, C, H, W) with "
    "--class-axis 1) take labels with those axes, class indices (N, *S) where "
    "-100 (--ignore-index) marks a position that does not count; DATA may also "
    "hold a mask (N, *S) of the positions that count (key mask) and keyword "
    "inputs under x_NAME (the model is called as model(NAME=...); x_attention_mask "
    "is also the mask when there is no key mask). docs/cli.md has the details."
)


#: One row of an option table: the flag, its type (the check), its default, its
#: metavar (None: argparse's, from the flag) and its help text.
Option = tuple[str, Callable[[str], Any], Any, str | None, str]

#: The analysis options of both commands, in the order of ``--help``.
ANALYSIS_OPTIONS: tuple[Option, ...] = (
    (
        "--num-probes",
        positive_int,
        32,
        "M",
        "probes of detach-and-mix, samples of Monte Carlo (default 32)",
    ),
    (
        "--target-error",
        positive_float,
        None,
        "E",
        "draw rounds of M probes until the relative standard error of the "
        "detach-and-mix trace, scaled by the Student t quantile of its degrees of freedom, "
        "is at most E, with at least 10 degrees of freedom (e.g. 0.05)",
    ),
    ("--seed", non_negative_int, 0, None, "random seed, 0 or more (default 0)"),
    ("--top-k", positive_int, 10, "K", "top eigenvalues of the Fisher metric (default 10)"),
    (
        "--prior-variance",
        positive_float,
        1.0,
        "S2",
        "σ² of the razor's Gaussian prior; local dimension at ε = 100/σ², 1/σ², "
        "0.01/σ² (default 1)",
    ),
    (
        "--slq-probes",
        positive_int,
        10,
        "Q",
        "probes of stochastic Lanczos quadrature: spectral density, local dimension, "
        "razor (default 10)",
    ),
    (
        "--lanczos-steps",
        positive_int,
        None,
        "L",
        "Lanczos steps per run (top eigenvalues, Hessian directions, local dimension) "
        "and per quadrature probe (default: the library's, about 40-100)",
    ),
    (
        "--max-count",
        positive_int,
        32,
        "K",
        "count up to K eigenvalues above ε exactly (Lanczos), estimate beyond (default 32)",
    ),
    (
        "--grid",
        int_at_least(2),
        13,
        "G",
        "landscape grid points per direction, at least 2 (default 13)",
    ),
    (
        "--trace-probes",
        positive_int,
        32,
        "P",
        "probes of the Hessian traces, HVP and loss-only (default 32)",
    ),
    (
        "--repeats",
        positive_int,
        2,
        "R",
        "timed runs per estimator (at least; more for fast ones), after one warm-up; "
        "the fastest counts (default 2)",
    ),
)

#: ``fisherbound demo``'s training options after ``--hidden``.
TRAINING_OPTIONS: tuple[Option, ...] = (
    ("--epochs", positive_int, 15, None, "training epochs (default 15)"),
    ("--batch-size", positive_int, 128, None, "mini-batch size (default 128)"),
    ("--learning-rate", positive_float, 0.01, "LR", "Adam step size (default 0.01)"),
    (
        "--landscape-inputs",
        positive_int,
        500,
        "N",
        "training digits whose mean loss the landscape shows (default 500)",
    ),
    (
        "--test-inputs",
        positive_int,
        360,
        "N",
        "held-out digits analysed (default 360; the rest train the model)",
    ),
)

#: ``fisherbound report``'s options for outputs with position axes.
POSITION_OPTIONS: tuple[Option, ...] = (
    (
        "--output",
        selector,
        None,
        "SEL",
        "where the logits are in the model's output: a key of a dict output or an "
        "attribute (e.g. logits of a Hugging Face ModelOutput), or an integer index into a "
        "tuple output (default: the output is the logits tensor)",
    ),
    (
        "--class-axis",
        nonzero_int,
        -1,
        "A",
        "axis of the model's output that holds the C classes, moved last (default -1; "
        "e.g. 1 for (N, C, T) or (N, C, H, W) outputs)",
    ),
    (
        "--ignore-index",
        int_or_none,
        -100,
        "I",
        "class labels (N, *S) equal to I do not count, as in torch.nn.CrossEntropyLoss "
        "(default -100; 'none': every label is a class)",
    ),
)


def _subcommand(
    sub: Any, name: str, run: Any, summary: str, description: str
) -> argparse.ArgumentParser:
    """The subparser of command ``name``, which ``run`` runs."""
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(run=run, subparser=p)
    return p


def _add_options(group: Any, options: Sequence[Option]) -> None:
    """One ``add_argument`` of ``group`` (a parser or an argument group) per table row."""
    for flag, check, default, metavar, text in options:
        group.add_argument(flag, type=check, default=default, metavar=metavar, help=text)


def add_analysis_options(p: argparse.ArgumentParser, threads: int | None) -> None:
    """The analysis options, then the output ones, shared by both commands."""
    group = p.add_argument_group("analysis")
    _add_options(group, ANALYSIS_OPTIONS)
    group.add_argument(
        "--skip",
        nargs="+",
        choices=SKIPPABLE,
        default=[],
        metavar="SECTION",
        help="leave out these sections: " + ", ".join(SKIPPABLE) + " (put this option "
        "after MODEL and DATA)",
    )
    add_output_options(p, threads)


def add_output_options(p: argparse.ArgumentParser, threads: int | None) -> None:
    """``--out``, ``--quiet`` and ``--threads`` (``threads``: the default)."""
    output = p.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"report folder, created if needed (default ./{DEFAULT_OUT}, with a "
        ".gitignore so that git ignores it)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    output.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback instead of the one-line message",
    )
    output.add_argument(
        "--threads",
        type=positive_int,
        default=threads,
        metavar="T",
        help="BLAS / OpenMP threads of NumPy and torch (default "
        + ("1: small arrays, and no oversubscription on a busy machine)" if threads else "")
        + ("the libraries' own)" if threads is None else ""),
    )


def build_parser(description: str | None) -> argparse.ArgumentParser:
    """The ``fisherbound`` parser; ``description`` is its help text (the CLI's docstring)."""
    parser = argparse.ArgumentParser(
        prog="fisherbound",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo(sub)
    add_report(sub)
    return parser


def add_demo(sub: Any) -> None:
    """``fisherbound demo``: the framework, the model and its training, the analysis."""
    demo = _subcommand(sub, "demo", run_demo, DEMO_SUMMARY, DEMO_DESCRIPTION)
    demo.add_argument(
        "--framework",
        choices=tuple(TRAINERS),
        default="numpy",
        help="numpy (the hand-written reference MLP, default), torch or jax (if installed)",
    )
    model = demo.add_argument_group("model and training")
    model.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        default=[32],
        metavar="H",
        help="hidden layer widths (default 32)",
    )
    _add_options(model, TRAINING_OPTIONS)
    add_analysis_options(demo, threads=1)


def add_report(sub: Any) -> None:
    """``fisherbound report MODEL DATA``: the model, the data, the family, the analysis."""
    report = _subcommand(sub, "report", run_report, REPORT_SUMMARY, REPORT_DESCRIPTION)
    report.add_argument(
        "model",
        metavar="MODEL",
        help="model.py:factory, TorchScript or torch.save file",
    )
    report.add_argument("data", metavar="DATA", help=".npz file with x/y or inputs/labels")
    report.add_argument(
        "--factory",
        default=None,
        metavar="NAME",
        help="factory name in a MODEL .py file",
    )
    report.add_argument(
        "--family",
        choices=FAMILIES,
        default="categorical",
        help="output family: categorical (softmax over C classes, default), bernoulli "
        "(C independent sigmoids, multi-label) or gaussian (regression y ~ N(z, σ² I))",
    )
    report.add_argument(
        "--variance",
        type=positive_float,
        default=None,
        metavar="S2",
        help="gaussian family: σ², the known noise variance of every output (default 1; "
        "0.5 makes the loss MSELoss(reduction='sum') up to a constant); the Fisher "
        "scales as 1/σ²",
    )
    report.add_argument(
        "--soft-targets",
        action="store_true",
        help="categorical family: DATA's labels are target distributions (N, C) or "
        "(N, *S, C) in the model output's layout (rows in [0, 1] summing to 1, e.g. "
        "label-smoothed or a teacher's probabilities), not class indices",
    )
    report.add_argument(
        "--params",
        nargs="+",
        default=None,
        metavar="NAME",
        help="analyse only these parameters (names from model.named_parameters()); "
        "put this option after MODEL and DATA",
    )
    outputs = report.add_argument_group("outputs with position axes (sequences, images)")
    _add_options(outputs, POSITION_OPTIONS)
    report.add_argument(
        "--max-inputs",
        type=positive_int,
        default=512,
        metavar="N",
        help="analyse the first N inputs of DATA (default 512)",
    )
    add_analysis_options(report, threads=None)
