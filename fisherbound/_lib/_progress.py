"""Progress bars for streamed computations (tqdm when installed)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def _terminal() -> bool:
    """Whether standard error is a terminal (where tqdm would draw a bar)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def progress_bar(iterable: Iterable[T], *, desc: str, progress: bool | None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar.

    ``progress=False`` never shows one; ``True`` always does (if tqdm is installed);
    ``None`` (the default of public functions) shows one only on a terminal and only
    once the run has lasted two seconds, so short runs and logs stay quiet.
    """
    if progress is not None and not isinstance(progress, bool):
        msg = (
            f"progress must be True, False or None (a bar only on a terminal after two "
            f"seconds); got {type(progress).__name__} {progress!r}."
        )
        raise TypeError(msg)
    if progress is False or (progress is None and not _terminal()):
        yield from iterable  # no bar: not even a hidden one (tqdm costs ~0.4 ms to build)
        return
    if importlib.util.find_spec("tqdm") is None:
        yield from iterable
        return
    from tqdm.auto import tqdm

    options: dict[str, Any] = {"desc": desc, "unit": "batch", "leave": False}
    if progress is None:
        options.update(disable=None, delay=2.0)
    yield from tqdm(iterable, **options)
