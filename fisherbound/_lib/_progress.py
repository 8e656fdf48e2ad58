"""Progress bars for streamed computations and long runs (tqdm when installed).

One bar per call: while a bar is open (an analysis streaming its batches, the
command line's stages), the bars of the calls made inside it are not drawn, so
nested calls never stack bars. A bar has a total, a percentage, a rate and an
ETA when the length of what it counts is known (a list, a ``DataLoader``, an
adapter's ``linearizations`` over either), and stays on screen when it ends.
"""

from __future__ import annotations

import importlib.util
import operator
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds a run lasts before ``progress=None`` (the default) shows its bar.
DELAY = 2.0

_open = threading.local()  # .depth: how many bars this thread has open


def _terminal() -> bool:
    """Whether standard error is a terminal (where tqdm would draw a bar)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _depth() -> int:
    return int(getattr(_open, "depth", 0))


def check_progress(progress: object) -> None:
    """The house TypeError for a ``progress`` that is not True, False or None."""
    if progress is not None and not isinstance(progress, bool):
        msg = (
            f"progress must be True, False or None (a bar only on a terminal after two "
            f"seconds); got {type(progress).__name__} {progress!r}."
        )
        raise TypeError(msg)


def length_of(iterable: object) -> int | None:
    """How many items ``iterable`` will give (``operator.length_hint``), None if unknown."""
    try:
        n = operator.length_hint(iterable)
    except (TypeError, ValueError):  # a __len__ or __length_hint__ that fails
        return None
    return n if n > 0 else None


def open_bar(
    *,
    desc: str,
    progress: bool | None,
    total: int | None = None,
    unit: str = "batch",
    leave: bool = True,
) -> Any:
    """A tqdm bar of ``total`` steps (None: unknown), or None where none is drawn.

    None for ``progress=False``, without tqdm, inside another open bar, and for
    ``progress=None`` off a terminal (no tqdm object is built: it costs ~0.4 ms);
    ``progress=None`` on a terminal shows the bar once the run has lasted
    ``DELAY`` seconds, ``True`` at once. The bar stays on screen when closed
    (``leave=False``: erased, for the many short passes of one operator).
    Close it with ``close_bar`` (which also ends the "open" state).
    """
    check_progress(progress)
    if progress is False or _depth() > 0 or (progress is None and not _terminal()):
        return None
    if importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm.auto import tqdm

    options: dict[str, Any] = {"desc": desc, "unit": unit, "total": total, "leave": leave}
    if progress is None:
        options.update(disable=None, delay=DELAY)
    bar = tqdm(**options)
    _open.depth = _depth() + 1
    return bar


def close_bar(bar: Any) -> None:
    """Close a bar of ``open_bar`` (None: nothing to close)."""
    if bar is None:
        return
    _open.depth = max(0, _depth() - 1)
    bar.close()


def progress_bar(
    iterable: Iterable[T],
    *,
    desc: str,
    progress: bool | None,
    total: int | None = None,
    leave: bool = True,
) -> Iterator[T]:
    """Yield from ``iterable`` behind a bar (``open_bar``) that counts its items.

    ``total`` defaults to the length hint of ``iterable`` (None where it has
    none: the bar then shows the count and the rate, without percentage or ETA);
    a source that runs out before ``total`` leaves its bar at 100% of what came.
    """
    size = length_of(iterable) if total is None else total
    bar = open_bar(desc=desc, progress=progress, total=size, leave=leave)
    if bar is None:
        yield from iterable  # no bar: not even a hidden one
        return
    try:
        for item in iterable:
            yield item
            bar.update(1)
        if bar.total is not None and bar.n < bar.total:  # the source ran out first
            bar.total = bar.n
            bar.refresh()
    finally:
        close_bar(bar)
