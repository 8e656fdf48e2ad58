"""Benchmark: the Hessian trace from loss values against the HVP trace (torch CPU).

For an MLP 784-512-256-10 (ReLU, float32, batch 128) on 2 threads it times, per
probe, interleaved with one plain gradient step (forward + backward of the summed
cross-entropy, the baseline), the two estimators of ``fisherbound.landscape.loss_trace``:

- ``method="loss"``: central second differences, two forward passes per probe,
  the 2b shifted parameter vectors of b probes in one ``torch.func.vmap`` call;
- ``method="hvp"``: Hutchinson with exact Hessian-vector products
  (forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``, vmapped over b).

Each with b = 1 (one probe per call) and b = 16. It reports the median cost per probe
in gradient steps, and the two estimates on the same probes (their difference is the
finite-difference error alone).

With ``--figures DIR`` it instead trains a small MLP (64-32-10, tanh) on the
scikit-learn digits by gradient descent and writes the figures of docs/landscape.md.

Run:  python benchmarks/bench_landscape.py [--reps 5] [--threads 2] [--probes 32] [--quick]
      python benchmarks/bench_landscape.py --figures docs/figures
Writes benchmarks/results/landscape.json. ``--quick``: an MLP 64-32-10, batch 32,
4 probes, one repetition.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from _common import machine, now, write_json
from torch import nn

from fisherbound.adapters.torch import TorchLossFunction, linearize, loss_function
from fisherbound.landscape import default_step, hessian_directions, loss_trace

RESULTS = Path(__file__).parent / "results"
NAME = "landscape"
TITLE = "Loss landscape: the Hessian trace from loss values against HVPs (torch CPU)"


def make_mlp(
    activation: type[nn.Module] = nn.ReLU, quick: bool = False
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if quick:
        model = nn.Sequential(nn.Linear(64, 32), activation(), nn.Linear(32, 10))
        return model, torch.randn(32, 64), torch.randint(0, 10, (32,))
    model = nn.Sequential(
        nn.Linear(784, 512), activation(), nn.Linear(512, 256), activation(), nn.Linear(256, 10)
    )
    return model, torch.randn(128, 784), torch.randint(0, 10, (128,))


def gradient_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(reps: int, probes: int, quick: bool = False) -> dict[str, Any]:
    model, x, y = make_mlp(quick=quick)
    loss = loss_function(model, x, y)
    cases = [("loss", 1), ("loss", 16), ("hvp", 1), ("hvp", 16)]
    for method, b in cases:  # warm up (torch.func's first transforms are slow)
        loss_trace(loss, num_probes=b, method=method, batch_size=b, rng=0)
    for _ in range(3):
        gradient_step(model, x, y)
    base: list[float] = []
    per_probe: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    for rep in range(reps):
        for method, b in cases:
            base.append(timed(lambda: gradient_step(model, x, y)))
            seconds = timed(
                lambda m=method, bs=b, seed=rep: loss_trace(
                    loss, num_probes=probes, method=m, batch_size=bs, rng=seed
                )
            )
            per_probe[(method, b)].append(seconds / probes)
    step = statistics.median(base)
    rows = []
    for (method, b), times in per_probe.items():
        t = statistics.median(times)
        rows.append(
            {
                "method": method,
                "batch_size": b,
                "seconds_per_probe": t,
                "gradient_steps_per_probe": t / step,
            }
        )
    return {"gradient_step_seconds": step, "rows": rows, "same_probes": accuracy(quick)}


def accuracy(quick: bool = False) -> list[dict[str, Any]]:
    """Loss-only against HVP trace on the same 32 probes, default step, 4 variants."""
    out = []
    for activation in (nn.ReLU, nn.Tanh):
        for dtype in (torch.float32, torch.float64):
            model, x, y = make_mlp(activation, quick)
            loss = loss_function(model.to(dtype), x.to(dtype), y)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                by_loss = loss_trace(loss, num_probes=32, rng=7, batch_size=16, method="loss")
            by_hvp = loss_trace(loss, num_probes=32, rng=7, batch_size=16, method="hvp")
            out.append(
                {
                    "activation": activation.__name__,
                    "dtype": str(dtype).removeprefix("torch."),
                    "step": float(default_step(loss.params)),
                    "loss": [float(by_loss.value), float(by_loss.std_error)],
                    "hvp": [float(by_hvp.value), float(by_hvp.std_error)],
                    # LossTraceWarning's reasons (absent before the warning existed).
                    "warnings": [getattr(w.message, "reason", "?") for w in caught],
                }
            )
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| estimator | probes per call | ms per probe | gradient steps per probe |",
        "| --- | --- | --- | --- |",
    ]
    names = {"loss": "loss values only (2 forward passes)", "hvp": "Hutchinson with exact HVPs"}
    for row in result["rows"]:
        lines.append(
            f"| {names[row['method']]} | {row['batch_size']} | "
            f"{1e3 * row['seconds_per_probe']:.2f} | {row['gradient_steps_per_probe']:.2f} |"
        )
    lines.append(
        f"| (baseline: one gradient step) | | {1e3 * result['gradient_step_seconds']:.2f} | 1.00 |"
    )
    lines += [
        "",
        "| activation | dtype | step h | tr H from loss values | tr H from HVPs, same probes "
        "| loss-only warns |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["same_probes"]:
        (a, sa), (b, sb) = row["loss"], row["hvp"]
        lines.append(
            f"| {row['activation']} | {row['dtype']} | {row['step']:.3g} | {a:.5g} ± {sa:.2g} "
            f"| {b:.5g} ± {sb:.2g} | {', '.join(row.get('warnings', [])) or 'no'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Hessian eigenpairs: hessian_directions against PyHessian's power iteration

#: The tolerances tried for "equal accuracy": the loosest whose eigenvalue error is at
#: most PyHessian's is the one timed (the list is fixed before any run).
TOL_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)


class HvpCount:
    """Counts Hessian-vector products: fisherbound's TorchLossFunction.hvp and
    PyHessian's ``hessian_vector_product`` (patched for the duration)."""

    def __init__(self) -> None:
        self.n = 0

    def __enter__(self) -> HvpCount:
        self._fb = TorchLossFunction.hvp
        fb = self._fb

        def hvp(loss: Any, v: Any) -> Any:
            self.n += 1
            return fb(loss, v)

        TorchLossFunction.hvp = hvp  # type: ignore[method-assign]
        self._fb_batch = TorchLossFunction.hvp_batch
        fb_batch = self._fb_batch

        def hvp_batch(loss: Any, V: Any) -> Any:  # an older eigsh's one-column matmat
            self.n += int(V.shape[0])
            return fb_batch(loss, V)

        TorchLossFunction.hvp_batch = hvp_batch  # type: ignore[method-assign]
        try:
            ph = importlib.import_module("pyhessian.hessian")  # the module, not the class
        except ImportError:
            self._ph = None
        else:
            self._ph = ph.hessian_vector_product

            def ph_hvp(*args: Any) -> Any:
                self.n += 1
                return self._ph(*args)

            ph.hessian_vector_product = ph_hvp
        return self

    def __exit__(self, *exc: Any) -> None:
        TorchLossFunction.hvp = self._fb  # type: ignore[method-assign]
        TorchLossFunction.hvp_batch = self._fb_batch  # type: ignore[method-assign]
        if self._ph is not None:
            importlib.import_module("pyhessian.hessian").hessian_vector_product = self._ph


def eigen(reps: int, quick: bool = False) -> dict[str, Any]:
    """Products, time and error of the top (and bottom) Hessian eigenpair.

    The mean cross-entropy of the ReLU MLP (float32), as PyHessian computes it. The
    reference λ_max, λ_min: ``hessian_directions`` on a float64 copy, tol 1e-10.
    Each method runs ``reps`` times, interleaved with gradient steps (medians).
    """
    new_api = "which" in inspect.signature(hessian_directions).parameters
    model, x, y = make_mlp(quick=quick)
    loss = loss_function(model, x, y, reduction="mean")
    ref64 = loss_function(copy.deepcopy(model).double(), x.double(), y, reduction="mean")
    if new_api:
        top = float(hessian_directions(ref64, which="largest", tol=1e-10, rng=1).eigenvalues[0])
        bottom = float(hessian_directions(ref64, which="smallest", tol=1e-10, rng=1).eigenvalues[0])
    else:
        ref = hessian_directions(ref64, num_matvecs=min(ref64.num_params, 200), rng=1)
        top, bottom = (float(v) for v in ref.eigenvalues)
    loss.hvp(torch.ones(loss.num_params))  # warm-up: torch.func's first transform

    def pyhessian_top() -> tuple[list[float], Any]:
        from pyhessian import hessian

        m = copy.deepcopy(model)
        torch.manual_seed(0)
        h = hessian(m, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        return [float(h.eigenvalues(top_n=1)[0][0])], None

    def fb(**kw: Any) -> Any:
        def call() -> tuple[list[float], Any]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                hd = hessian_directions(loss, rng=0, **kw)
            return [float(v) for v in hd.eigenvalues], hd

        return call

    def once(fn: Any) -> dict[str, Any]:
        steps, secs = [], []
        for _ in range(reps):
            steps.append(timed(lambda: gradient_step(model, x, y)))
            with HvpCount() as count:
                start = time.perf_counter()
                values, _ = fn()
                secs.append(time.perf_counter() - start)
            steps.append(timed(lambda: gradient_step(model, x, y)))
        step = statistics.median(steps)
        sec = statistics.median(secs)
        return {
            "values": values,
            "products": count.n,
            "seconds": sec,
            "gradient_steps": sec / step,
        }

    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Any, wanted: tuple[str, ...]) -> dict[str, Any]:
        r = once(fn)
        exact = {"top": top, "bottom": bottom}
        r["relative_errors"] = [
            abs(v - exact[w]) / abs(exact[w]) for v, w in zip(r["values"], wanted, strict=True)
        ]
        r["method"] = name
        rows.append(r)
        return r

    try:
        import pyhessian  # noqa: F401
    except ImportError:
        ph = None
    else:
        ph = add(
            "PyHessian hessian.eigenvalues (power iteration, tol 1e-3)", pyhessian_top, ("top",)
        )
    if not new_api:
        add("hessian_directions() (both ends, fixed Lanczos steps)", fb(), ("top", "bottom"))
        return {"reference": [top, bottom], "rows": rows, "equal_accuracy_tol": None}
    add("hessian_directions(which='largest'), default tol", fb(which="largest"), ("top",))
    chosen = None
    if ph is not None:
        for tol in TOL_LADDER:
            vals, _ = fb(which="largest", tol=tol)()
            if abs(vals[0] - top) / abs(top) <= ph["relative_errors"][0]:
                chosen = tol
                break
        if chosen is not None:
            add(
                f"hessian_directions(which='largest', tol={chosen:g}), equal accuracy",
                fb(which="largest", tol=chosen),
                ("top",),
            )
    small = add(
        "hessian_directions(which='smallest'), default tol", fb(which="smallest"), ("bottom",)
    )
    both = add("hessian_directions() (which='both', one run), default tol", fb(), ("top", "bottom"))
    largest = next(r for r in rows if r["method"].endswith("'largest'), default tol"))
    return {
        "reference": [top, bottom],
        "rows": rows,
        "equal_accuracy_tol": chosen,
        "both_vs_two_runs_products": both["products"] / (largest["products"] + small["products"]),
    }


def eigen_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Reference (float64, tol 1e-10): λ_max = {result['reference'][0]:.6g}, "
        f"λ_min = {result['reference'][1]:.6g}.",
        "",
        "| method | Hessian-vector products | ms | × gradient step | relative error(s) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        errs = ", ".join(f"{e:.1e}" for e in r["relative_errors"])
        lines.append(
            f"| {r['method']} | {r['products']} | {1e3 * r['seconds']:.4g} | "
            f"{r['gradient_steps']:.3g} | {errs} |"
        )
    if "both_vs_two_runs_products" in result:
        lines += [
            "",
            "products of the one 'both' run / products of the 'largest' and 'smallest' runs: "
            f"{result['both_vs_two_runs_products']:.3g}",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# the figures of docs/landscape.md


def figures(out: Path) -> None:
    from sklearn.datasets import load_digits

    from fisherbound.estimators import detach_and_mix
    from fisherbound.fisher import fisher_bounds, fisher_diagonal
    from fisherbound.landscape import (
        hessian_directions,
        hessian_operator,
        random_directions,
        saddle_probability,
        surface,
    )
    from fisherbound.linalg import lanczos_quadrature, smoothed_density
    from fisherbound.plotting import plot_fisher_diagonal, plot_spectral_density, plot_surfaces

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = torch.as_tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.as_tensor(digits.target).long()
    xtr, ytr, xte, yte = x[:1500], y[:1500], x[1500:], y[1500:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    params = list(model.parameters())
    for _ in range(2000):  # plain full-batch gradient descent on the mean cross-entropy
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(xtr), ytr), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.5 * g)
    with torch.no_grad():
        acc_tr = float((model(xtr).argmax(1) == ytr).double().mean())
        acc_te = float((model(xte).argmax(1) == yte).double().mean())
    batches = [(xtr[i : i + 500], ytr[i : i + 500]) for i in range(0, 1500, 500)]
    losses = [loss_function(model, xb, yb, reduction="mean") for xb, yb in batches]
    hd = hessian_directions(losses, rng=0)
    rand = random_directions(losses[0], num_directions=2, kind="filter", rng=1)
    s_rand = surface(losses, rand, num_points=31, span=1.0)
    s_hess = surface(losses, hd, num_points=31, span=1.0)
    fig = plot_surfaces(
        [s_rand, s_hess],
        titles=["filter-normalised random directions", "Hessian directions (λ_max, λ_min)"],
        kind="both",
    )
    fig.savefig(out / "landscape_random_vs_hessian.png", dpi=65)
    op = hessian_operator(losses)
    quad = lanczos_quadrature(op, num_probes=8, num_matvecs=60, rng=2)
    lam_max, lam_min = (float(v) for v in hd.eigenvalues)
    margin = 0.08 * (lam_max - lam_min)
    grid = torch.linspace(lam_min - margin, lam_max + margin, 600, dtype=torch.float64)
    width = 0.01 * (lam_max - lam_min)
    per = torch.stack(
        [
            smoothed_density((quad.nodes[i : i + 1], quad.weights[i : i + 1]), grid, width=width)
            for i in range(8)
        ]
    )
    density = SimpleNamespace(grid=grid, density=per.mean(0), std_error=per.std(0) / np.sqrt(8))
    fig = plot_spectral_density(
        density,
        num_probes=8,
        markers=hd.eigenvalues,
        log=True,
        title="Hessian spectral density (SLQ, 8 probes × 60 steps)",
    )
    fig.savefig(out / "landscape_hessian_density.png", dpi=70)
    lin = linearize(model, xtr[:500])
    fig = plot_fisher_diagonal(
        lin,
        exact=fisher_diagonal(lin, reduction="mean"),
        bounds=fisher_bounds(lin, reduction="mean"),
        estimate=detach_and_mix(lin, num_probes=32, rng=0, reduction="mean"),
        max_points_per_block=60,
        title="Fisher diagonal per block (500 digits, mean)",
    )
    fig.savefig(out / "landscape_fisher_diagonal.png", dpi=70)
    by_loss = loss_trace(losses, num_probes=200, rng=3, method="loss")
    by_hvp = loss_trace(losses, num_probes=200, rng=3, method="hvp")
    exact = sum(float(torch.trace(torch.func.hessian(lf._loss)(lf.params))) for lf in losses) / len(
        losses
    )
    ritz = quad.nodes.reshape(-1)
    print(f"train accuracy {acc_tr:.3f}, test accuracy {acc_te:.3f}, D = {losses[0].num_params}")
    print(f"λ_max = {lam_max:.5g}, λ_min = {lam_min:.5g}, residuals {hd.residuals.tolist()}")
    print(f"tr H exact {exact:.6g}")
    print(f"tr H loss-only {float(by_loss.value):.6g} ± {float(by_loss.std_error):.2g}")
    print(f"tr H HVP (same probes) {float(by_hvp.value):.6g} ± {float(by_hvp.std_error):.2g}")
    p = saddle_probability(torch.tensor([lam_max, lam_min], dtype=torch.float64))
    print(
        f"one random direction in the (λ_max, λ_min) plane looks convex w.p. {float(p.minimum):.3f}"
    )
    print(f"Ritz values: min {float(ritz.min()):.4g}, max {float(ritz.max()):.4g}")


def run(
    *, quick: bool = False, threads: int = 2, reps: int | None = None, probes: int | None = None
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    reps = reps or (1 if quick else 5)
    probes = probes or (4 if quick else 32)
    result = benchmark(reps, probes, quick)
    model = "MLP 64-32-10 (ReLU), batch 32 (quick)" if quick else "MLP 784-512-256-10 (ReLU)"
    result.update(
        {
            "threads": threads,
            "reps": reps,
            "probes": probes,
            "model": f"{model}, float32" if quick else f"{model}, float32, batch 128",
            "ratios": {
                f"{row['method']}, {row['batch_size']} per call: per probe / gradient step": row[
                    "gradient_steps_per_probe"
                ]
                for row in result["rows"]
            },
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a small MLP, 4 probes, 1 rep")
    parser.add_argument("--figures", type=Path, default=None)
    parser.add_argument(
        "--eigen",
        action="store_true",
        help="the top and bottom Hessian eigenpairs against PyHessian's power iteration",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.figures is not None:
        figures(args.figures)
        return
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    if args.eigen:
        reps = args.reps or (1 if args.quick else 3)
        result = eigen(reps, args.quick)
        model = (
            "MLP 64-32-10 (ReLU), batch 32"
            if args.quick
            else "MLP 784-512-256-10 (ReLU), batch 128"
        )
        result |= {
            "model": f"{model}, float32, mean cross-entropy",
            "threads": args.threads,
            "reps": reps,
        }
        write_json(args.out or RESULTS / "landscape_eigen.json", {**record, **result})
        print(result["model"])
        print(eigen_markdown(result))
        return
    result = run(quick=args.quick, threads=args.threads, reps=args.reps, probes=args.probes)
    write_json(args.out or RESULTS / "landscape.json", {**record, **result})
    print(markdown(result))


if __name__ == "__main__":
    main()
