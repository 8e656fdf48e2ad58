"""The argument parser of ``fisherbound demo`` and ``fisherbound report``.

Every option, its default, its help text and its check (the argument types of
``usage``); each subcommand names the function that runs it (``commands``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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

#: Where the demo's and the report's files go unless ``--out`` says otherwise.
DEFAULT_OUT = Path("fisherbound-report")

#: ``--family`` choices of ``fisherbound report``.
FAMILIES = ("categorical", "bernoulli")

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
    "family, 0/1 rows (N, C) for the Bernoulli family. The model is put in eval "
    "mode and must return logits (N, C) (log-softmax outputs are fine, "
    "probabilities are not). Models whose logits have position axes (a token "
    "classifier or language model (N, T, C); segmentation (N, C, H, W) with "
    "--class-axis 1) take labels with those axes, class indices (N, *S) where "
    "-100 (--ignore-index) marks a position that does not count; DATA may also "
    "hold a mask (N, *S) of the positions that count (key mask) and keyword "
    "inputs under x_NAME (the model is called as model(NAME=...); x_attention_mask "
    "is also the mask when there is no key mask). docs/cli.md has the details."
)


def _subcommand(
    sub: Any, name: str, run: Any, summary: str, description: str
) -> argparse.ArgumentParser:
    """The subparser of command ``name``, which ``run`` runs."""
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(run=run, subparser=p)
    return p


def add_analysis_options(p: argparse.ArgumentParser, threads: int | None) -> None:
    """The analysis options, then the output ones, shared by both commands."""
    group = p.add_argument_group("analysis")
    group.add_argument(
        "--num-probes",
        type=positive_int,
        default=32,
        metavar="M",
        help="probes of detach-and-mix, samples of Monte Carlo (default 32)",
    )
    group.add_argument(
        "--target-error",
        type=positive_float,
        default=None,
        metavar="E",
        help="draw rounds of M probes until the relative standard error of the "
        "detach-and-mix trace, scaled by the Student t quantile of its degrees of freedom, "
        "is at most E, with at least 10 degrees of freedom (e.g. 0.05)",
    )
    group.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed, 0 or more (default 0)"
    )
    group.add_argument(
        "--top-k",
        type=positive_int,
        default=10,
        metavar="K",
        help="top eigenvalues of the Fisher metric (default 10)",
    )
    group.add_argument(
        "--prior-variance",
        type=positive_float,
        default=1.0,
        metavar="S2",
        help="σ² of the razor's Gaussian prior; local dimension at ε = 100/σ², 1/σ², "
        "0.01/σ² (default 1)",
    )
    group.add_argument(
        "--slq-probes",
        type=positive_int,
        default=10,
        metavar="Q",
        help="probes of stochastic Lanczos quadrature: spectral density, local dimension, "
        "razor (default 10)",
    )
    group.add_argument(
        "--lanczos-steps",
        type=positive_int,
        default=None,
        metavar="L",
        help="Lanczos steps per run (top eigenvalues, Hessian directions, local dimension) "
        "and per quadrature probe (default: the library's, about 40-100)",
    )
    group.add_argument(
        "--max-count",
        type=positive_int,
        default=32,
        metavar="K",
        help="count up to K eigenvalues above ε exactly (Lanczos), estimate beyond (default 32)",
    )
    group.add_argument(
        "--grid",
        type=int_at_least(2),
        default=13,
        metavar="G",
        help="landscape grid points per direction, at least 2 (default 13)",
    )
    group.add_argument(
        "--trace-probes",
        type=positive_int,
        default=32,
        metavar="P",
        help="probes of the Hessian traces, HVP and loss-only (default 32)",
    )
    group.add_argument(
        "--repeats",
        type=positive_int,
        default=2,
        metavar="R",
        help="timed runs per estimator (at least; more for fast ones), after one warm-up; "
        "the fastest counts (default 2)",
    )
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
        help=f"report folder, created if needed (default ./{DEFAULT_OUT})",
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
    model.add_argument(
        "--epochs", type=positive_int, default=15, help="training epochs (default 15)"
    )
    model.add_argument(
        "--batch-size",
        type=positive_int,
        default=128,
        help="mini-batch size (default 128)",
    )
    model.add_argument(
        "--learning-rate",
        type=positive_float,
        default=0.01,
        metavar="LR",
        help="Adam step size (default 0.01)",
    )
    model.add_argument(
        "--landscape-inputs",
        type=positive_int,
        default=500,
        metavar="N",
        help="training digits whose mean loss the landscape shows (default 500)",
    )
    model.add_argument(
        "--test-inputs",
        type=positive_int,
        default=360,
        metavar="N",
        help="held-out digits analysed (default 360; the rest train the model)",
    )
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
        help="output family: categorical (softmax over C classes, default) or bernoulli "
        "(C independent sigmoids, multi-label)",
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
    outputs.add_argument(
        "--output",
        type=selector,
        default=None,
        metavar="SEL",
        help="where the logits are in the model's output: a key of a dict output or an "
        "attribute (e.g. logits of a Hugging Face ModelOutput), or an integer index into a "
        "tuple output (default: the output is the logits tensor)",
    )
    outputs.add_argument(
        "--class-axis",
        type=nonzero_int,
        default=-1,
        metavar="A",
        help="axis of the model's output that holds the C classes, moved last (default -1; "
        "e.g. 1 for (N, C, T) or (N, C, H, W) outputs)",
    )
    outputs.add_argument(
        "--ignore-index",
        type=int_or_none,
        default=-100,
        metavar="I",
        help="class labels (N, *S) equal to I do not count, as in torch.nn.CrossEntropyLoss "
        "(default -100; 'none': every label is a class)",
    )
    report.add_argument(
        "--max-inputs",
        type=positive_int,
        default=512,
        metavar="N",
        help="analyse the first N inputs of DATA (default 512)",
    )
    add_analysis_options(report, threads=None)
