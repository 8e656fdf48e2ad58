"""Bad input on the command line: ``UsageError`` and the argument types.

A ``UsageError`` is printed as ``fisherbound CMD: error: ...`` with exit status 2
and no traceback; the argument types report through argparse the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


class UsageError(ValueError):
    """Bad input on the command line: printed as ``fisherbound CMD: error: ...``, exit 2."""


def _parse(text: str, convert: Callable[[str], T], what: str) -> T:
    """``convert(text)``, or the argparse error 'must be {what}; got {text!r}'."""
    try:
        return convert(text)
    except ValueError:
        msg = f"must be {what}; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def int_at_least(low: int, what: str | None = None) -> Callable[[str], int]:
    """The argparse type of an integer of at least ``low`` (``what`` names it in messages)."""
    name = what or f"an integer of at least {low}"

    def parse(text: str) -> int:
        value = _parse(text, int, name)
        if value < low:
            msg = f"must be {name}; got {value}"
            raise argparse.ArgumentTypeError(msg)
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


#: An integer of at least 1 (argparse type: counts).
positive_int = int_at_least(1, "a positive integer")
#: An integer of at least 0 (argparse type: seeds).
non_negative_int = int_at_least(0, "a non-negative integer")


def positive_float(text: str) -> float:
    """A finite number above 0 (argparse type)."""
    value = _parse(text, float, "a positive number")
    if not 0.0 < value < float("inf"):
        msg = f"must be a positive finite number; got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def require(module: str, package: str, extra: str) -> None:
    """Stop with the install command of ``extra`` if ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        msg = (
            f"this needs {package}, which is not installed; install the '{extra}' extra: "
            f'python3 -m pip install -e ".[{extra}]" (or pip install {package}).'
        )
        raise UsageError(msg)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (loaders' messages can be long)."""
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def nonzero_int(text: str) -> int:
    """An integer other than 0 (argparse type of ``--class-axis``: 0 is the inputs' axis)."""
    value = _parse(text, int, "an integer")
    if value == 0:
        msg = "must not be 0 (axis 0 holds the inputs); got 0"
        raise argparse.ArgumentTypeError(msg)
    return value


def int_or_none(text: str) -> int | None:
    """An integer, or ``none`` for None (argparse type of ``--ignore-index``)."""
    if text.strip().lower() == "none":
        return None
    return _parse(text, int, "an integer or 'none'")


def selector(text: str) -> str | int:
    """``--output``: an integer selects an element of a tuple output, other text a key."""
    try:
        return int(text)
    except ValueError:
        return text
