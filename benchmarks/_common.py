"""Helpers shared by the benchmark scripts: machine description, timing, JSON, tables.

Every benchmark module in this folder exposes

- ``NAME`` (the section key in results.json) and ``TITLE``;
- ``run(*, quick=False, threads=2, **options) -> dict``: measures and returns plain
  dicts, lists, strings and numbers, with a ``"ratios"`` entry (label -> ratio
  against a baseline measured in the same run);
- ``markdown(result) -> str``: the tables of that result;

and stays runnable on its own (``python benchmarks/bench_x.py``). ``run.py`` runs
them all and writes results.json and results.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# The peer libraries, by import name -> distribution name (detected at run time).
PEERS = {
    "backpack": "backpack-for-pytorch",
    "curvlinops": "curvlinops-for-pytorch",
    "nngeometry": "nngeometry",
    "pyhessian": "PyHessian",
}


def version(distribution: str) -> str | None:
    """The installed version of a distribution, or None (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def gpu_status() -> dict[str, Any]:
    """Which GPU back ends can run here: CuPy with a device, CUDA torch; with reasons."""
    out: dict[str, Any] = {"cupy": None, "torch_cuda": None, "reasons": []}
    if installed("cupy"):
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                props = cupy.cuda.runtime.getDeviceProperties(0)
                name = props["name"]
                out["cupy"] = name.decode() if isinstance(name, bytes) else str(name)
            else:
                out["reasons"].append("CuPy sees no CUDA device")
        except Exception as exc:  # no driver, no device: CuPy raises its own errors
            out["reasons"].append(f"CuPy has no usable device ({type(exc).__name__}: {exc})")
    else:
        out["reasons"].append("CuPy is not installed")
    if installed("torch"):
        import torch

        if torch.cuda.is_available():
            out["torch_cuda"] = torch.cuda.get_device_name(0)
        else:
            out["reasons"].append("torch.cuda.is_available() is False")
    else:
        out["reasons"].append("torch is not installed")
    return out


def machine() -> dict[str, Any]:
    gpu = gpu_status()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": version("numpy"),
        "torch": version("torch"),
        "jax": version("jax"),
        "cupy": version("cupy") or version("cupy-cuda12x") or version("cupy-cuda11x"),
        "gpu": gpu["torch_cuda"] or gpu["cupy"],
        "peers": {module: version(dist) for module, dist in PEERS.items()},
    }


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- #
# timing


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Wall time of one call (after ``sync``, for asynchronous devices) and its result."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start, out


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    reps: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Times of each function, one repetition of all of them after the other.

    Interleaving makes the methods share the load of the moment on a shared
    machine, so that their ratios mean something even when absolute times do not.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            t, _ = timed(fn, sync)
            if rep >= warmup:
                times[name].append(t)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float:
    return a / b


# --------------------------------------------------------------------------- #
# output


def plain(value: Any) -> Any:
    """A JSON-ready copy: 0-d arrays and numpy scalars become floats, NaN becomes None."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy/torch/cupy scalars
        return plain(value.item())
    msg = f"plain: cannot store a {type(value).__name__} in results.json; got {value!r:.80}."
    raise TypeError(msg)


def write_json(path: Path, record: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(record), indent=2, allow_nan=False) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one character per column, "l" or "r"."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)
