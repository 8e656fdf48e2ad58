"""The command line: fisherbound demo and fisherbound report.

'fisherbound demo' trains a small classifier on scikit-learn's bundled digits
(no download) and writes a report folder on its Fisher information: the diagonal
per layer with its bounds and error bars, the estimators compared, the core-space
spectrum, the top of the Fisher spectrum, local dimension and razor, and the loss
landscape. 'fisherbound report MODEL DATA' runs the same analysis on your own
torch module and data, also for models whose logits have position axes (token
classifiers, language models, segmentation: --output, --class-axis,
--ignore-index, and a mask in DATA). Both write report.md, index.html, PNG
figures and report.json into the output folder (default ./fisherbound-report).

Run 'fisherbound COMMAND --help' for the options; docs/cli.md explains every
section of the report.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fisherbound._cli import commands as _commands
from fisherbound._cli import loading as _loading
from fisherbound._cli import parser as _parser_module
from fisherbound._cli import trainers as _trainers
from fisherbound._cli import usage as _usage
from fisherbound._cli.loading import DATA_KEYS as DATA_KEYS
from fisherbound._cli.parser import DEFAULT_OUT as DEFAULT_OUT
from fisherbound._cli.parser import FAMILIES as FAMILIES
from fisherbound._cli.trainers import TRAINERS as TRAINERS
from fisherbound._cli.usage import UsageError as UsageError
from fisherbound._report.settings import Settings as Settings
from fisherbound._report.subjects import Subject as Subject
from fisherbound._report.timing import progress_bar as _progress_bar

Array = Any


def _parser() -> argparse.ArgumentParser:
    """The ``fisherbound`` parser, with this module's docstring as its description."""
    return _parser_module.build_parser(__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherbound`` command (and of ``python -m fisherbound``).

    Bad input ends with a message on stderr and exit status 2 (``SystemExit``),
    without a traceback.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(arguments)
    args.argv = arguments
    try:
        uses_torch = args.command == "report" or getattr(args, "framework", "") == "torch"
        with _commands.threads(args.threads, torch=uses_torch):
            return int(args.run(args))
    except UsageError as err:
        args.subparser.error(str(err))
    except Exception as err:  # every failure: one line and status 2 (--debug: traceback)
        if args.debug:
            raise
        args.subparser.exit(2, f"{args.subparser.prog}: error: {_failure(err)}\n")
    return 2  # pragma: no cover - error() exits


def _failure(err: Exception) -> str:
    """The one-line message of a failure: the house errors as they are, others as a bug."""
    line = _usage.first_line(err)
    house = ValueError | TypeError | NotImplementedError | OSError | MemoryError
    if isinstance(err, house) or type(err).__name__ == "OutOfMemoryError":  # torch's OOM
        return f"{line} (--debug shows the traceback)"
    return (
        f"unexpected {type(err).__name__}: {line}. This is a bug in fisherbound or in the "
        "model; run again with --debug for the traceback and report it."
    )


# The helpers of the former single module, under their former names, for code
# that imported them from here.
_positive_int = _usage.positive_int
_positive_float = _usage.positive_float
_require = _usage.require
_first_line = _usage.first_line
_settings = _commands.settings_from
_threads = _commands.threads
_demo = _commands.demo
_report = _commands.report
_bar = _progress_bar
_Trainer = _trainers.Trainer
_numpy_trainer = _trainers.numpy_trainer
_torch_trainer = _trainers.torch_trainer
_jax_trainer = _trainers.jax_trainer
_train = _trainers.fit
_accuracy_and_loss = _trainers.accuracy_and_loss
_framework_context = _trainers.framework_context
_split_model_spec = _loading.split_model_spec
_import_file = _loading.import_file
_script_wrapper = _loading.script_wrapper
_load_model = _loading.load_model
_load_data = _loading.load_data
_check_outputs = _loading.check_outputs
_add_analysis_options = _parser_module.add_analysis_options


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
