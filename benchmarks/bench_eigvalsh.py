"""Benchmark: the categorical spectrum from the secular equation vs a dense eigen-solve.

Times ``Categorical().eigvalsh(z)`` (roots of Σ_i p_i / (p_i − λ) = 0, no C × C
matrix) against ``numpy.linalg.eigvalsh`` of the dense metric diag(p) − p pᵀ
(including building it), with interleaved repetitions so both see the same
machine load; reports the median wall time of each, their ratio and the largest
absolute difference between the two spectra. Prints a Markdown table and writes
benchmarks/results/eigvalsh.json.

Run: ``python benchmarks/bench_eigvalsh.py`` (minutes: the two dense solves at
C = 10,000 dominate, about 5 minutes each on a loaded 2-core machine).
``--sizes 1000 3000`` and ``--repeats 5`` change the defaults; ``--quick`` runs
C = 200, 500 twice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from _common import RESULTS, machine, median, now, table, timed, write_json

from fisherbound.families import Categorical

NAME = "eigvalsh"
TITLE = "Core-space spectrum: secular equation vs dense eigvalsh (NumPy, float64)"
SIZES = (1000, 3000, 10_000)
QUICK_SIZES = (200, 500)


def dense_spectrum(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    p = e / e.sum()
    return np.linalg.eigvalsh(np.diag(p) - np.outer(p, p))


def bench(c: int, repeats: int, seed: int) -> dict[str, float | int]:
    z = np.random.default_rng(seed).standard_normal(c) * 2.0
    family = Categorical()
    times: dict[str, list[float]] = {"secular": [], "dense": []}
    ours = ref = np.empty(0)
    for _ in range(repeats):  # interleaved, so both see the same load
        t, ours = timed(lambda: family.eigvalsh(z))
        times["secular"].append(t)
        t, ref = timed(lambda: dense_spectrum(z))
        times["dense"].append(t)
    secular, dense = median(times["secular"]), median(times["dense"])
    return {
        "num_classes": c,
        "repeats": repeats,
        "secular_s": secular,
        "dense_s": dense,
        "speedup": dense / secular,
        "max_abs_diff": float(np.max(np.abs(ours - ref))),
        "dense_matrix_mb": c * c * 8 / 2**20,
    }


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``threads`` is unused: NumPy's BLAS threads are set by the environment."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else SIZES))
    repeats = repeats or (2 if quick else 5)
    rows = [bench(c, repeats if c < 10_000 else min(repeats, 2), seed) for c in sizes]
    return {
        "dtype": "float64",
        "rows": rows,
        "ratios": {f"dense / secular, C = {r['num_classes']}": r["speedup"] for r in rows},
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        [
            f"{r['num_classes']:,}",
            f"{r['secular_s']:.3g}",
            f"{r['dense_s']:.3g}",
            f"{r['speedup']:.1f}",
            f"{r['max_abs_diff']:.1e}",
        ]
        for r in result["rows"]
    ]
    return table(["C", "secular (s)", "dense (s)", "dense / secular", "max abs difference"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="repetitions below C = 10,000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(quick=args.quick, sizes=args.sizes, repeats=args.repeats, seed=args.seed)
    print(markdown(result))
    record = {
        "date": now(),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        **result,
    }
    write_json(RESULTS / "eigvalsh.json", record)
    print(f"\nwrote {RESULTS / 'eigvalsh.json'}")


if __name__ == "__main__":
    main()
