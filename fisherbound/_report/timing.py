"""Wall-clock timing of the analysis and its progress bars.

``timed`` measures one estimator the way the report quotes it (best of several
runs after a warm-up, waiting for asynchronous backends); ``Stages`` times the
named steps of the analysis behind one progress bar; ``progress_bar`` opens
such a bar (the library's ``open_bar`` counting steps), shared with the command
line's training loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A bar of ``total`` steps (``fisherbound._lib.open_bar``), or None where none shows.

    ``progress=None`` shows it only on a terminal after two seconds, ``True``
    always; close it with ``fisherbound._lib.close_bar``. While it is open, the
    library calls made inside draw no bars of their own.
    """
    from fisherbound._lib import open_bar

    return open_bar(desc=desc, progress=progress, total=total, unit="step")


def wait(result: Any) -> None:
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


def timed(fn: Callable[[], Any], repeats: int, budget: float = 0.2) -> tuple[float, Any]:
    """Best wall-clock seconds of ``fn`` after one warm-up run.

    At least ``repeats`` timed runs, more for fast functions (until ``budget``
    seconds are spent, at most 50 runs): the minimum is the least disturbed by
    other work on a shared machine.
    """
    out = fn()  # warm-up: JAX compiles, caches fill
    wait(out)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < budget and len(times) < 50):
        start = time.perf_counter()
        out = fn()
        wait(out)
        times.append(time.perf_counter() - start)
    return min(times), out


class Stages:
    """A progress bar over the named steps of the analysis, timing each."""

    def __init__(self, names: Sequence[str], progress: bool | None) -> None:
        self.seconds: dict[str, float] = {}
        self._bar: Any = progress_bar(len(names), "fisherbound", progress)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_description(name, refresh=False)  # shown after DELAY
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        from fisherbound._lib import close_bar

        if self._bar is not None:
            self._bar.set_description("analysis", refresh=False)  # what stays on screen
        close_bar(self._bar)
        self._bar = None
