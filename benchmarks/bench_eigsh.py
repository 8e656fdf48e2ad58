"""Benchmark: the top eigenpairs of a Fisher operator, fisherbound's eigsh against SciPy's.

Both solvers drive the SAME operator, ``fisher_operator(linearize(mlp, x))`` on the
MLP 784-512-256-10 (ReLU), batch 128 (535,818 parameters), torch CPU in float64 (so
that a relative residual of 1e-6 is attainable; in float32 the products themselves
carry relative errors near 1e-7 times the spread of the spectrum):

- ``fisherbound.dimension.top_eigenpairs(lin, k, tol=1e-6)``: thick-restart Lanczos,
  stopping when every wanted Ritz pair has ‖F y − θ y‖ ≤ 1e-6 θ;
- ``scipy.sparse.linalg.eigsh(op, k, which="LA", tol=1e-6)`` (ARPACK's implicitly
  restarted Lanczos) on a SciPy LinearOperator whose matvec is the same Fisher
  matvec (torch ↔ NumPy views, no copy);
- the old default of ``top_eigenpairs`` (before issue 14): a fixed Lanczos run of
  max(2k + 30, 60) steps and k more products for explicit residuals;
- ``eigsh(..., block_size=b)`` for each b of ``--blocks`` (default 2 4 8): block
  Lanczos, one ``matmat`` of b columns per step (products count columns), with its
  time also as a ratio to ``block_size=1`` in the same run.

For k = 1, 5 and 20 it reports the products (Fisher matvecs, each one JVP and one
VJP of the batch), the median wall time, the time in gradient steps (forward +
backward of the summed cross-entropy, timed interleaved) and the ratio to SciPy's
time, and the largest relative difference of the eigenvalues from SciPy's.

With ``--synthetic`` it instead runs ``eigsh`` at its defaults on 90 synthetic cases
(five spectra of 400 × 400 matrices, ``which`` largest / smallest / both, k = 1, 5,
20, float64 and float32) and prints, per case, the products, the largest eigenvalue
error over max |λ|, the largest explicit relative residual ‖A y − θ y‖ / |θ|, the
largest |explicit − reported residual| over max |λ| and the number of warnings: run
it on two versions to compare them case by case (no timing).

Run:  python benchmarks/bench_eigsh.py [--reps 3] [--threads 2] [--quick]
          [--model mlp|cnn] [--blocks 2 4 8] [--k 1 5 20]
      python benchmarks/bench_eigsh.py --synthetic
Writes benchmarks/results/eigsh.json (eigsh_cnn.json for the CNN) and prints a
Markdown table. ``--quick``: an MLP 64-32-10 on 32 inputs, k = 1 and 5, one
repetition. ``--model cnn``: the CNN of bench_estimators.py (conv 3-32-64, linear
4096-256-10, batch 64 of 3 × 32 × 32; 1,070,794 parameters), in float64.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from _common import machine, now, table, write_json
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.dimension import top_eigenpairs
from fisherbound.fisher import fisher_operator
from fisherbound.linalg import LinearOperator, eigsh

NAME = "eigsh"
TITLE = "Top eigenpairs of a Fisher operator: fisherbound's eigsh against SciPy's (torch CPU)"
TOL = 1e-6


def make_mlp(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    sizes = (64, 32, 10) if quick else (784, 512, 256, 10)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double()
    n = 32 if quick else 128
    x = torch.randn(n, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (n,))
    name = f"MLP {'-'.join(map(str, sizes))} (ReLU), batch {n}, float64"
    return model, x, y, name


def make_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """bench_estimators.py's CNN (1,070,794 parameters), in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).double()
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (64,))
    return model, x, y, "CNN conv 3-32-64, linear 4096-256-10 (ReLU), batch 64, float64"


class Counted:
    """The Fisher operator with a product counter, as fisherbound and SciPy operators."""

    def __init__(self, op: Any) -> None:
        self.op, self.count, self.seconds = op, 0, 0.0
        d = int(op.shape[0])

        def matvec(v: Any) -> Any:
            self.count += 1
            t0 = time.perf_counter()
            out = op.matvec(v)
            self.seconds += time.perf_counter() - t0
            return out

        def matmat(v: Any) -> Any:
            self.count += int(v.shape[1])
            t0 = time.perf_counter()
            out = op.matmat(v)
            self.seconds += time.perf_counter() - t0
            return out

        self.fb = LinearOperator(
            (d, d), matvec=matvec, matmat=matmat, dtype=op.dtype, device=op.device, xp=op.xp
        )

        def np_matvec(v: np.ndarray) -> np.ndarray:
            self.count += 1
            t0 = time.perf_counter()
            out = op.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy()
            self.seconds += time.perf_counter() - t0
            return out

        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        self.scipy = ScipyOperator((d, d), matvec=np_matvec, dtype=np.float64)


def gradient_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    reps: int | None = None,
    ks: tuple[int, ...] | None = None,
    blocks: tuple[int, ...] = (2, 4, 8),
    model_kind: str = "mlp",
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    from scipy.sparse.linalg import eigsh as arpack

    reps = 1 if quick else (reps or 3)
    model, x, y, model_name = make_cnn() if model_kind == "cnn" else make_mlp(quick)
    lin = linearize(model, x)
    counted = Counted(fisher_operator(lin))
    d = int(counted.op.shape[0])
    v0 = np.random.default_rng(0).standard_normal(d)

    def fb(k: int) -> np.ndarray:
        res = eigsh(counted.fb, k=k, which="largest", tol=TOL, rng=0)
        return res.eigenvalues.numpy()[::-1]

    def scipy(k: int) -> np.ndarray:
        values = arpack(counted.scipy, k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
        return np.sort(values)[::-1]

    def old(k: int) -> np.ndarray:
        m = min(d, max(2 * k + 30, 60))
        res = eigsh(counted.fb, k=k, tol=0.0, num_matvecs=m, basis_size=m, rng=0)
        counted.fb.matmat(res.eigenvectors)  # the old default's explicit residuals
        return res.eigenvalues.numpy()[::-1]

    def block(b: int) -> Any:
        def fn(k: int) -> np.ndarray:
            res = eigsh(counted.fb, k=k, which="largest", tol=TOL, rng=0, block_size=b)
            return res.eigenvalues.numpy()[::-1]

        return fn

    methods = {
        "fisherbound eigsh (thick restart, tol 1e-6)": fb,
        "scipy eigsh (ARPACK, tol 1e-6)": scipy,
        "old default: 60-step Lanczos + k residual products": old,
    }
    methods.update({f"fisherbound eigsh block_size={b} (tol 1e-6)": block(b) for b in blocks})
    ks = ks or ((1, 5) if quick else (1, 5, 20))
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    gradient_step(model, x, y)
    for fn in methods.values():  # warm-up: first calls set up vmap and the thread pool
        fn(1)
    for k in ks:
        times: dict[str, list[float]] = {name: [] for name in methods}
        steps: list[float] = []
        products: dict[str, int] = {}
        in_products: dict[str, list[float]] = {name: [] for name in methods}
        values: dict[str, np.ndarray] = {}
        for _ in range(reps):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                gradient_step(model, x, y)
                steps.append(time.perf_counter() - t0)
                counted.count, counted.seconds = 0, 0.0
                t0 = time.perf_counter()
                values[name] = fn(k)
                times[name].append(time.perf_counter() - t0)
                products[name] = counted.count
                in_products[name].append(counted.seconds)
        step = statistics.median(steps)
        ref = values["scipy eigsh (ARPACK, tol 1e-6)"]
        t_ref = statistics.median(times["scipy eigsh (ARPACK, tol 1e-6)"])
        fb_name = "fisherbound eigsh (thick restart, tol 1e-6)"
        t_fb = statistics.median(times[fb_name])
        for name in methods:
            t = statistics.median(times[name])
            rows.append(
                {
                    "k": k,
                    "method": name,
                    "products": products[name],
                    "median_s": t,
                    "products_s": statistics.median(in_products[name]),
                    "gradient_steps": t / step,
                    "x_scipy": t / t_ref,
                    "x_block1": t / t_fb,
                    "max_rel_diff": float(np.max(np.abs(values[name] - ref)) / abs(ref[0])),
                }
            )
        ratios[f"k={k}: fisherbound / scipy time"] = statistics.median(times[fb_name]) / t_ref
        ratios[f"k={k}: fisherbound / scipy products"] = (
            products[fb_name] / products["scipy eigsh (ARPACK, tol 1e-6)"]
        )
        for b in blocks:
            name = f"fisherbound eigsh block_size={b} (tol 1e-6)"
            ratios[f"k={k}: block_size={b} / block_size=1 time"] = (
                statistics.median(times[name]) / t_fb
            )
            ratios[f"k={k}: block_size={b} / block_size=1 products"] = (
                products[name] / products[fb_name]
            )
        print(f"k = {k} done", file=sys.stderr)
    # top_eigenpairs is eigsh on fisher_operator: check it gives the same numbers.
    top = top_eigenpairs(lin, k=ks[-1], tol=TOL, rng=0).eigenvalues.numpy()
    return {
        "date": now(),
        "machine": machine(),
        "model": model_name,
        "num_params": d,
        "threads": threads,
        "reps": reps,
        "tol": TOL,
        "rows": rows,
        "ratios": ratios,
        "top_eigenpairs_matches_eigsh": bool(
            np.allclose(top, [r for r in values[fb_name]], rtol=1e-9)
        ),
    }


def markdown(result: dict[str, Any]) -> str:
    head = (
        f"{result['model']} ({result['num_params']:,} parameters), {result['threads']} "
        f"threads, median of {result['reps']}; relative residual tolerance {result['tol']:g}. "
        "Products are Fisher matvecs (one JVP + one VJP of the batch); time in gradient "
        "steps (forward + backward, timed interleaved) and as a ratio to SciPy's time; "
        "'in products' is the part of the median time spent in the operator's products; "
        "× b=1 is the ratio to fisherbound's block_size=1 time; the last column is "
        "max |λ − λ_scipy| / λ_scipy,max."
    )
    rows = [
        [
            r["k"],
            r["method"],
            r["products"],
            f"{r['median_s']:.3g}",
            f"{r['products_s']:.3g}",
            f"{r['gradient_steps']:.3g}",
            f"{r['x_scipy']:.2f}",
            f"{r['x_block1']:.2f}",
            f"{r['max_rel_diff']:.1e}",
        ]
        for r in result["rows"]
    ]
    headers = [
        "k",
        "method",
        "products",
        "median (s)",
        "in products (s)",
        "× gradient step",
        "× scipy",
        "× b=1",
        "vs scipy",
    ]
    return head + "\n\n" + table(headers, rows, align="rlrrrrrrr")


def _counting(m: np.ndarray) -> tuple[LinearOperator, list[int]]:
    """A NumPy operator of the matrix ``m`` and the list holding its product count."""
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return m @ v

    return LinearOperator(m.shape, matvec=matvec, dtype=m.dtype, device=None, xp=np), count


def synthetic() -> list[str]:
    """One line per synthetic case (see the module docstring)."""
    import warnings

    n = 400
    rng = np.random.default_rng(1)
    spectra = {
        "decay": 100.0 * 0.9 ** np.arange(n),
        "lowrank": np.r_[rng.uniform(1.0, 10.0, 50), np.zeros(n - 50)],
        "signed": np.linspace(-1.0, 1.0, n) ** 3,
        "negdom": np.r_[np.linspace(-100, -1, 200), np.linspace(0, 0.01, 200)],
        "cluster": np.r_[10.0 + np.arange(5) * 1e-3, np.linspace(0, 9, n - 5)],
    }
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))[0]
    lines = ["spectrum which k dtype products eig_error explicit_rel |explicit-reported| warnings"]
    for name, lam in spectra.items():
        a = (basis * lam) @ basis.T
        a = (a + a.T) / 2
        dense = np.linalg.eigvalsh(a)
        scale = np.abs(dense).max()
        for which in ("largest", "smallest", "both"):
            for k in (1, 5, 20):
                for dtype in (np.float64, np.float32):
                    op, count = _counting(a.astype(dtype))
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        res = eigsh(op, k=k, which=which, rng=0)
                    want = {
                        "largest": dense[-k:],
                        "smallest": dense[:k],
                        "both": np.r_[dense[:k], dense[-k:]],
                    }[which]
                    y, theta = res.eigenvectors, res.eigenvalues
                    explicit = np.linalg.norm(a @ y - y * theta, axis=0)
                    rel = explicit / np.maximum(np.abs(theta), np.finfo(float).tiny)
                    lines.append(
                        f"{name} {which} {k} {np.dtype(dtype).name} {count[0]} "
                        f"{np.abs(theta - want).max() / scale:.1e} {rel.max():.1e} "
                        f"{np.abs(explicit - res.residuals).max() / scale:.1e} {len(caught)}"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, k = 1, 5")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="k values (1 5 20)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument(
        "--blocks", type=int, nargs="*", default=[2, 4, 8], help="block sizes b > 1 (2 4 8)"
    )
    parser.add_argument("--out", default=None, help="JSON path (results/eigsh[_cnn].json)")
    parser.add_argument(
        "--synthetic", action="store_true", help="the 90 synthetic cases, no timing"
    )
    args = parser.parse_args()
    if args.synthetic:
        print("\n".join(synthetic()))
        return
    ks = tuple(args.k) if args.k else None
    blocks = tuple(b for b in args.blocks if b > 1)
    result = run(
        quick=args.quick,
        threads=args.threads,
        reps=args.reps,
        ks=ks,
        blocks=blocks,
        model_kind=args.model,
    )
    default = "eigsh_cnn.json" if args.model == "cnn" else "eigsh.json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / default
    write_json(out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
