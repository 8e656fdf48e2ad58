"""Benchmark: the categorical spectrum from the secular equation vs a dense eigen-solve.

Times ``Categorical().eigvalsh(z)`` (roots of Σ_i p_i / (p_i − λ) = 0, no C × C
matrix) against ``numpy.linalg.eigvalsh`` of the dense metric diag(p) − p pᵀ
(including building it), with interleaved repetitions so both see the same
machine load; reports the median wall time of each, their ratio and the largest
absolute difference between the two spectra. Prints a Markdown table and writes
benchmarks/results/eigvalsh.json.

Run: ``python benchmarks/bench_eigvalsh.py`` (minutes: the two dense solves at
C = 10,000 dominate, about 5 minutes each on a loaded 2-core machine).
``--sizes 1000 3000`` and ``--repeats 5`` change the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from fisherbound.families import Categorical


def dense_spectrum(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    p = e / e.sum()
    return np.linalg.eigvalsh(np.diag(p) - np.outer(p, p))


def bench(c: int, repeats: int, seed: int) -> dict[str, float | int]:
    z = np.random.default_rng(seed).standard_normal(c) * 2.0
    family = Categorical()
    secular_times, dense_times = [], []
    ours = ref = None
    for _ in range(repeats):  # interleaved, so both see the same load
        start = time.perf_counter()
        ours = family.eigvalsh(z)
        secular_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = dense_spectrum(z)
        dense_times.append(time.perf_counter() - start)
    assert ours is not None
    assert ref is not None
    secular = statistics.median(secular_times)
    dense = statistics.median(dense_times)
    return {
        "num_classes": c,
        "repeats": repeats,
        "secular_s": secular,
        "dense_s": dense,
        "speedup": dense / secular,
        "max_abs_diff": float(np.max(np.abs(ours - ref))),
        "dense_matrix_mb": c * c * 8 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10_000])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions below C = 10,000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for c in args.sizes:
        repeats = args.repeats if c < 10_000 else min(args.repeats, 2)
        rows.append(bench(c, repeats, args.seed))

    print("| C | secular eigvalsh (s) | dense eigvalsh (s) | dense / secular | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['num_classes']:,} | {r['secular_s']:.3f} | {r['dense_s']:.3f} | "
            f"{r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "numpy": np.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": rows,
    }
    (out / "eigvalsh.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out / 'eigvalsh.json'}")


if __name__ == "__main__":
    main()
