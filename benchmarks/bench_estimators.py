"""Benchmark: random Fisher-diagonal estimators against a gradient step (torch CPU).

For an MLP 784-512-256-10 (batch 128) and a CNN of about 1e6 parameters
(3×32×32 inputs, batch 64), in float32 on 2 threads, it times, interleaved with
one plain gradient step (forward + backward of the mean cross-entropy):

- ``detach_and_mix`` diagonal, batch level (M = 1, 10) and per example (M = 1, 10);
- the exact diagonal ``fisher_diagonal``;
- ``monte_carlo`` (k = 1, 10) and ``empirical``;
- BackPACK's DiagGGNExact, DiagGGNMC (1, 10) and SumGradSquared (the per-example
  empirical Fisher) when ``backpack`` (backpack-for-pytorch) is importable;
- the trace: detach-and-mix with 100 probes against Hutchinson with 100 probes on
  the exact Fisher operator (one JVP + one VJP per probe);
- "cheaper than exact": the exact diagonal against detach-and-mix per example
  (M = 2, 4, 8, 16) and at batch level (M = 64, 256) on the MLP with C = 10, 100
  and 1000 classes and on an MLP of custom ``Dense`` layers (no fast path: the
  generic per-example path): cost, relative error, relative error bar
  (‖SE‖/‖d‖), and the cheapest estimate that reaches 10 %.

It reports the cost in gradient steps (median over repetitions), the relative
error ‖d̂ − d‖/‖d‖ against the exact diagonal (root mean square over a few
independent draws, for k = 1, 10, 100 draws), the peak memory above the resting
state of each method (resident set size sampled every 0.5 ms, with glibc's mmap
threshold pinned so freed blocks return to the system), and the same errors on a
trained, confident copy of the MLP (mean top probability >= 0.9). It checks that
the exact diagonals of fisherbound and BackPACK agree.

Run:  python benchmarks/bench_estimators.py [--reps 5] [--threads 2] [--quick]
      [--models mlp cnn] [--no-cheaper]
Writes benchmarks/results/estimators.json and, with matplotlib,
benchmarks/results/estimators.png (relative error against cost). ``--quick``:
tiny models, k <= 10, no confident model and no memory measurement.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# On a shared machine, OpenMP threads that spin while waiting fight other processes
# and make every timing (the gradient step's included) erratic: wait passively.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from _common import machine, now, write_json
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix, empirical, monte_carlo
from fisherbound.fisher import fisher_diagonal, fisher_operator
from fisherbound.linalg import hutchinson_trace

RESULTS = Path(__file__).parent / "results"
NAME = "estimators"
TITLE = "Random Fisher-diagonal estimators against a gradient step (torch CPU, float32)"


# --------------------------------------------------------------------------- #
# models


def make_mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, torch.randn(128, 784)


def make_cnn() -> tuple[nn.Module, torch.Tensor]:
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
    )
    return model, torch.randn(64, 3, 32, 32)


def make_mlp_quick() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, torch.randn(32, 64)


def make_cnn_quick() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    return model, torch.randn(8, 3, 8, 8)


class Dense(nn.Module):
    """A linear layer the torch fast path does not know: the generic per-example path."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        ref = nn.Linear(n_in, n_out)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def make_wide(classes: int, *, fast: bool = True, quick: bool = False) -> nn.Module:
    sizes = (64, 32) if quick else (784, 512, 256)
    layer = nn.Linear if fast else Dense
    mods: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        mods += [layer(a, b), nn.ReLU()]
    return nn.Sequential(*mods, layer(sizes[-1], classes))


#: The "cheaper than exact" models: (label, classes, fast path).
CHEAPER = {
    "mlp_c10": ("MLP 784-512-256-10 (fast path), batch 128", 10, True),
    "mlp_c100": ("MLP 784-512-256-100, batch 128", 100, True),
    "mlp_c1000": ("MLP 784-512-256-1000, batch 128", 1000, True),
    "mlp_generic": (
        "MLP 784-512-256-10 of custom Dense layers (no fast path), batch 128",
        10,
        False,
    ),
}
CHEAPER_PROBES = (2, 4, 8, 16)
#: Batch-level probes (no per-example products: the way without a fast path),
#: in batched VJPs of at most ``CHEAPER_CHUNK`` probes.
CHEAPER_BATCH_PROBES = (64, 256)
CHEAPER_CHUNK = 32


MODELS = {
    "mlp": ("MLP 784-512-256-10, batch 128", make_mlp),
    "cnn": ("CNN conv32-conv64-fc256-fc10 on 3x32x32, batch 64", make_cnn),
}
QUICK_MODELS = {
    "mlp": ("MLP 64-32-10, batch 32 (quick)", make_mlp_quick),
    "cnn": ("CNN 3x8x8, conv4-linear, batch 8 (quick)", make_cnn_quick),
}


def registry(quick: bool) -> dict[str, Any]:
    return QUICK_MODELS if quick else MODELS


def train_confident(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fit the batch (Adam) until the mean top probability is >= 0.9; return it."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    top = 0.0
    for _ in range(500):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        with torch.no_grad():
            top = float(torch.softmax(model(x), dim=-1).max(dim=-1).values.mean())
        if top >= 0.9:
            break
    return top


# --------------------------------------------------------------------------- #
# measurement


class PeakRSS:
    """Peak resident set size above the value at entry (MiB), sampled every 0.5 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def rel_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(est - exact) / torch.linalg.vector_norm(exact))


def grad_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def backpack_methods(model: nn.Module, n: int) -> dict[str, Callable[..., torch.Tensor]]:
    if importlib.util.find_spec("backpack") is None:
        return {}
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    bp_model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())

    def run(extension: Any, attr: str, scale: float) -> Callable[..., torch.Tensor]:
        def call(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
            torch.manual_seed(seed)
            bp_model.zero_grad(set_to_none=True)
            loss = loss_fn(bp_model(x), y)
            with backpack(extension):
                loss.backward()
            return torch.cat([getattr(p, attr).reshape(-1) for p in bp_model.parameters()]) * scale

        return call

    # The mean loss: GGN = F / N; per-example gradients of the mean carry 1/N.
    out = {"backpack_exact": run(DiagGGNExact(), "diag_ggn_exact", n)}
    for k in (1, 10, 100):
        out[f"backpack_mc_{k}"] = run(DiagGGNMC(mc_samples=k), "diag_ggn_mc", n)
    out["backpack_sum_grad_squared"] = run(SumGradSquared(), "sum_grad_squared", n * n)
    return out


def fb_methods(model: nn.Module) -> dict[str, Callable[..., torch.Tensor]]:
    """fisherbound's estimators, each including the forward pass (linearize)."""

    def dm(m: int, per_example: bool = False) -> Callable[..., torch.Tensor]:
        def call(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
            lin = linearize(model, x)
            est = detach_and_mix(
                lin, num_probes=m, rng=seed, per_example=per_example, progress=False
            )
            return est.value

        return call

    def mc(k: int) -> Callable[..., torch.Tensor]:
        def call(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
            return monte_carlo(linearize(model, x), num_samples=k, rng=seed, progress=False).value

        return call

    out: dict[str, Callable[..., torch.Tensor]] = {}
    for k in (1, 10, 100):
        out[f"dm_{k}"] = dm(k)
        out[f"dm_per_example_{k}"] = dm(k, per_example=True)
        out[f"monte_carlo_{k}"] = mc(k)
    out["exact"] = lambda x, y, seed=0: fisher_diagonal(linearize(model, x), progress=False)
    out["empirical"] = lambda x, y, seed=0: empirical(linearize(model, x), y, progress=False).value
    return out


def trace_methods(model: nn.Module) -> dict[str, Callable[..., torch.Tensor]]:
    def dm_trace(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
        lin = linearize(model, x)
        return detach_and_mix(lin, what="trace", num_probes=100, rng=seed, progress=False).value

    def hutchinson(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
        op = fisher_operator(linearize(model, x))
        return hutchinson_trace(op, num_probes=100, rng=seed).value

    return {"trace_dm_100": dm_trace, "trace_hutchinson_100": hutchinson}


TIMED = [
    "dm_1",
    "dm_10",
    "dm_per_example_1",
    "dm_per_example_10",
    "exact",
    "monte_carlo_1",
    "monte_carlo_10",
    "empirical",
    "backpack_exact",
    "backpack_mc_1",
    "backpack_mc_10",
    "backpack_sum_grad_squared",
    "trace_dm_100",
    "trace_hutchinson_100",
]
ERROR_KS = {
    "dm": "dm_{k}",
    "dm_per_example": "dm_per_example_{k}",
    "monte_carlo": "monte_carlo_{k}",
    "backpack_mc": "backpack_mc_{k}",
}


def bench_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, x = registry(args.quick)[key][1]()
    model.eval()
    y = torch.randint(0, 10, (x.shape[0],))
    n = int(x.shape[0])
    methods: dict[str, Callable[..., Any]] = {}
    methods.update(fb_methods(model))
    methods.update(backpack_methods(model, n))
    big = key == "cnn"
    if not big:  # the trace comparison on the MLP (100 probes of the CNN: ~3 GB)
        methods.update(trace_methods(model))
    timed = [m for m in TIMED if m in methods]
    ks = (1, 10) if big or args.quick else (1, 10, 100)
    reps = max(1, args.reps // 3) if big else args.reps
    draws = max(2, args.draws - 1) if big else args.draws

    # -- time, interleaved with the gradient step -----------------------------
    # Each method is timed right after a gradient step; its cost is the median of
    # the ratios, robust to the load of a shared machine drifting during the run.
    ratios: dict[str, list[float]] = {m: [] for m in timed}
    steps: list[float] = []

    def timed_call(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for rep in range(args.warmup + reps):
        for name in timed:
            t_step = timed_call(lambda: grad_step(model, x, y))
            t_method = timed_call(lambda: methods[name](x, y, seed=rep))  # noqa: B023
            if rep >= args.warmup:
                steps.append(t_step)
                ratios[name].append(t_method / t_step)
    step = statistics.median(steps)
    cost = {m: statistics.median(r) for m, r in ratios.items()}
    for k in ks:  # k = 100 only for the error curves: time it once
        for fam in ERROR_KS.values():
            name = fam.format(k=k)
            if name in methods and name not in cost:
                t_step = timed_call(lambda: grad_step(model, x, y))
                cost[name] = timed_call(lambda: methods[name](x, y, seed=0)) / t_step  # noqa: B023

    memory = measure_memory(key) if args.memory else {}

    # -- accuracy -------------------------------------------------------------
    exact = methods["exact"](x, y)
    checks: dict[str, float] = {}
    if "backpack_exact" in methods:
        checks["backpack_exact_vs_fisherbound"] = rel_error(methods["backpack_exact"](x, y), exact)
        checks["backpack_sum_grad_squared_vs_empirical"] = rel_error(
            methods["backpack_sum_grad_squared"](x, y), methods["empirical"](x, y)
        )
    errors = draw_errors(methods, x, y, exact, ks, draws)
    errors["empirical"] = {"bias": rel_error(methods["empirical"](x, y), exact)}
    trace_err = trace_errors(model, x, exact) if "trace_dm_100" in methods else {}

    result: dict[str, Any] = {
        "model": registry(args.quick)[key][0],
        "num_params": sum(p.numel() for p in model.parameters()),
        "grad_step_ms": step * 1e3,
        "cost": cost,
        "memory_mib": memory,
        "errors": errors,
        "trace_errors": trace_err,
        "checks": checks,
    }
    if key == "mlp" and not args.quick:
        confident = copy.deepcopy(model)
        top = train_confident(confident, x, y)
        confident.eval()
        cm = fb_methods(confident)
        cm.update(backpack_methods(confident, n))
        c_exact = cm["exact"](x, y)
        result["confident"] = {
            "mean_top_probability": top,
            "errors": draw_errors(cm, x, y, c_exact, ks, args.draws),
        }
    return result


def bench_cheaper(args: argparse.Namespace) -> dict[str, Any]:
    """Exact diagonal against detach-and-mix where C is large or there is no fast path.

    Per model: the cost (gradient steps, median of interleaved ratios) of
    ``fisher_diagonal`` and of ``detach_and_mix`` with M probes, per example
    (``per_example=True``) and at batch level (batched VJPs of ``CHEAPER_CHUNK``
    probes), the root-mean-square relative error ‖d̂ − d‖/‖d‖ over ``draws``
    seeds, the mean relative error bar ‖SE‖/‖d‖ (what the estimate says of
    itself), and the cheapest estimate whose error is at most 10 %.
    """
    out: dict[str, Any] = {}
    n = 32 if args.quick else 128
    for key, (label, classes, fast) in CHEAPER.items():
        torch.manual_seed(0)
        model = make_wide(classes, fast=fast, quick=args.quick)
        model.eval()
        x = torch.randn(n, 64 if args.quick else 784)
        y = torch.randint(0, classes, (n,))

        def exact_call(seed: int = 0, model: nn.Module = model, x: torch.Tensor = x) -> Any:
            return fisher_diagonal(linearize(model, x), progress=False)

        def dm_call(
            m: int, per_example: bool, seed: int, model: nn.Module = model, x: torch.Tensor = x
        ) -> Any:
            return detach_and_mix(
                linearize(model, x),
                num_probes=m,
                rng=seed,
                per_example=per_example,
                max_vectors=None if per_example else CHEAPER_CHUNK,
                progress=False,
            )

        draws_of: dict[str, Callable[[int], Any]] = {}
        for m in CHEAPER_PROBES[:2] if args.quick else CHEAPER_PROBES:
            draws_of[f"dm_per_example_{m}"] = functools.partial(dm_call, m, True)
        for m in (4, 8) if args.quick else CHEAPER_BATCH_PROBES:
            draws_of[f"dm_{m}"] = functools.partial(dm_call, m, False)
        calls: dict[str, Callable[[int], Any]] = {"exact": exact_call, **draws_of}
        reps = max(1, min(args.reps, 3))
        ratios: dict[str, list[float]] = {k: [] for k in calls}
        for rep in range(1 + reps):  # the first round warms up
            for name, fn in calls.items():
                t0 = time.perf_counter()
                grad_step(model, x, y)
                t_step = time.perf_counter() - t0
                t0 = time.perf_counter()
                fn(rep)
                if rep:
                    ratios[name].append((time.perf_counter() - t0) / t_step)
        cost = {k: statistics.median(v) for k, v in ratios.items()}
        exact = exact_call()
        norm = float(torch.linalg.vector_norm(exact))
        errors: dict[str, float] = {}
        bars: dict[str, float] = {}
        for name, draw in draws_of.items():
            ests = [draw(100 + s) for s in range(args.draws)]
            errors[name] = math.sqrt(
                statistics.fmean([rel_error(e.value, exact) ** 2 for e in ests])
            )
            bars[name] = statistics.fmean(
                [float(torch.linalg.vector_norm(e.std_error)) / norm for e in ests]
            )
        reached = [name for name in draws_of if errors[name] <= 0.1]
        best = min(reached, key=lambda name: cost[name]) if reached else None
        quick_label = label.replace("784-512-256", "64-32").replace("128", "32") + " (quick)"
        out[key] = {
            "model": quick_label if args.quick else label,
            "classes": classes,
            "fast_path": fast,
            "num_params": sum(p.numel() for p in model.parameters()),
            "cost": cost,
            "relative_error": errors,
            "relative_error_bar": bars,
            "cheapest_within_10_percent": best,
            "cheaper_than_exact": None if best is None else cost[best] < cost["exact"],
        }
    return out


def trace_errors(model: nn.Module, x: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Exact relative standard errors of the two trace estimates with 100 probes.

    A scalar's error from a few draws is itself too noisy to compare two methods,
    so both come from closed forms (THEORY §3), with A the Gram matrix of the
    columns b_k = J_xᵀ B_x e_r (‖A‖_F = ‖F‖_F): detach-and-mix Var(‖g‖²) =
    2(‖A‖_F² − Σ_k A_kk²), Hutchinson on F Var(vᵀFv) = 2(‖F‖_F² − Σ_i F_ii²).
    """
    from fisherbound.variance import detach_and_mix_variance

    lin = linearize(model, x)
    var_dm = float(detach_and_mix_variance(lin, what="trace", max_vectors=128))
    # Gaussian probes: 2‖A‖_F² = 2‖F‖_F².
    gauss = detach_and_mix_variance(lin, what="trace", distribution="gaussian", max_vectors=128)
    frob = float(gauss) / 2
    trace = float(exact.sum())
    var_hutchinson = 2 * (frob - float((exact * exact).sum()))
    return {
        "trace_dm_100": math.sqrt(var_dm / 100) / trace,
        "trace_hutchinson_100": math.sqrt(var_hutchinson / 100) / trace,
    }


def measure_memory(key: str) -> dict[str, float]:
    """Peak memory of each method, measured in a child process (see ``memory_child``).

    glibc's mmap threshold is pinned there, so that large blocks are returned to
    the system when freed and the sampled RSS follows each method's live memory;
    that slows allocation down, hence a separate process from the timings.
    """
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", key],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(key: str) -> None:
    torch.manual_seed(0)
    model, x = make_mlp() if key == "mlp" else make_cnn()
    model.eval()
    y = torch.randint(0, 10, (x.shape[0],))
    methods: dict[str, Callable[..., Any]] = {}
    methods.update(fb_methods(model))
    methods.update(backpack_methods(model, int(x.shape[0])))
    if key != "cnn":
        methods.update(trace_methods(model))
    memory: dict[str, float] = {}
    for name in ["grad_step"] + [m for m in TIMED if m in methods]:
        for _ in range(2):  # the second run, after caches and lazy imports settled
            with PeakRSS() as peak:
                if name == "grad_step":
                    grad_step(model, x, y)
                else:
                    methods[name](x, y, seed=0)
        memory[name] = peak.mib
    print(json.dumps(memory))


def draw_errors(
    methods: dict[str, Callable[..., Any]],
    x: torch.Tensor,
    y: torch.Tensor,
    exact: torch.Tensor,
    ks: tuple[int, ...],
    draws: int,
) -> dict[str, dict[str, float]]:
    """Root-mean-square relative error over independent draws, per method and k."""
    out: dict[str, dict[str, float]] = {}
    for fam, pattern in ERROR_KS.items():
        row = {}
        for k in ks:
            name = pattern.format(k=k)
            if name not in methods:
                continue
            reps = draws if k < 100 else max(2, draws // 2)
            errs = [rel_error(methods[name](x, y, seed=100 + s), exact) for s in range(reps)]
            row[str(k)] = math.sqrt(statistics.fmean([e * e for e in errs]))
        if row:
            out[fam] = row
    return out


# --------------------------------------------------------------------------- #
# report


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for r in results["models"].values():
        lines += [
            f"### {r['model']} ({r['num_params']:,} parameters; gradient step "
            f"{r['grad_step_ms']:.1f} ms)",
            "",
            "| method | cost (gradient steps) | peak memory (MiB) | relative error |",
            "| --- | --- | --- | --- |",
        ]
        mem = r["memory_mib"]

        def mib(name: str, mem: dict[str, float] = mem) -> str:
            return f"{mem[name]:.0f}" if name in mem else "not measured"

        lines.append(f"| gradient step | 1.00 | {mib('grad_step')} | |")
        err = r["errors"]
        for name, c in r["cost"].items():
            if name == "grad_step" or (mem and name not in mem):
                continue
            e = ""
            for fam, pattern in ERROR_KS.items():
                for k, v in err.get(fam, {}).items():
                    if pattern.format(k=k) == name:
                        e = f"{v:.3f}"
            if name == "exact":
                e = "0"
            if name == "empirical":
                e = f"{err['empirical']['bias']:.3f} (bias)"
            if name in r["trace_errors"]:
                e = f"{r['trace_errors'][name]:.4f} (trace, exact)"
            lines.append(f"| {name} | {c:.2f} | {mib(name)} | {e} |")
        lines += [
            "",
            "Relative error of the diagonal by number of draws k (cost in gradient steps):",
            "",
        ]
        ks = sorted({k for row in err.values() for k in row if k != "bias"}, key=int)
        lines.append("| estimator | " + " | ".join(f"k = {k}" for k in ks) + " |")
        lines.append("| --- |" + " --- |" * len(ks))
        for fam, pattern in ERROR_KS.items():
            if fam not in err:
                continue
            cells = []
            for k in ks:
                v = err[fam].get(k)
                c = r["cost"].get(pattern.format(k=k))
                cells.append("" if v is None else f"{v:.3f} ({c:.1f})" if c else f"{v:.3f}")
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
        if "confident" in r:
            conf = r["confident"]
            lines += [
                "",
                "Trained, confident copy (mean top probability "
                f"{conf['mean_top_probability']:.3f}):",
                "",
                "| estimator | " + " | ".join(f"k = {k}" for k in ks) + " |",
                "| --- |" + " --- |" * len(ks),
            ]
            for fam, row in conf["errors"].items():
                lines.append(
                    f"| {fam} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in ks) + " |"
                )
        if r["checks"]:
            lines += ["", "Checks: " + ", ".join(f"{k} = {v:.2e}" for k, v in r["checks"].items())]
        lines.append("")
    lines += markdown_cheaper(results.get("cheaper_than_exact", {}))
    return "\n".join(lines)


def _estimate_label(name: str) -> str:
    """``dm_per_example_4`` → "per-example, M = 4"; ``dm_256`` → "batch level, M = 256"."""
    m = name.rsplit("_", 1)[1]
    return f"{'per-example' if 'per_example' in name else 'batch level'}, M = {m}"


def markdown_cheaper(cheap: dict[str, Any]) -> list[str]:
    """The "cheaper than exact" table: cost, error and error bar per model and M."""
    if not cheap:
        return []
    lines = [
        "### The diagonal to 10 % with an error bar, against the exact diagonal",
        "",
        "Detach-and-mix with M probes, per example (`per_example=True`) or at batch level "
        f"(batched VJPs of {CHEAPER_CHUNK} probes); relative error ‖d̂ − d‖/‖d‖ (root mean "
        "square over draws) and relative error bar ‖SE‖/‖d‖.",
        "",
        "| model | D | exact (steps) | estimate | cost (steps) | relative error | error bar | "
        "cheapest to 10 % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in cheap.values():
        best = r["cheapest_within_10_percent"]
        verdict = (
            "none measured"
            if best is None
            else f"{_estimate_label(best)}: "
            + ("cheaper" if r["cheaper_than_exact"] else "dearer")
            + f" ({r['cost'][best]:.1f} vs {r['cost']['exact']:.1f})"
        )
        first = True
        for name, err in r["relative_error"].items():
            head = (
                f"| {r['model']} | {r['num_params']:,} | {r['cost']['exact']:.1f} "
                if first
                else "| | | "
            )
            lines.append(
                f"{head}| {_estimate_label(name)} | {r['cost'][name]:.2f} | {err:.3f} | "
                f"{r['relative_error_bar'][name]:.3f} | {verdict if first else ''} |"
            )
            first = False
    return [*lines, ""]


def plot(results: dict[str, Any], path: Path) -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, r in zip(axes[0], models.values()):
        for fam, pattern in ERROR_KS.items():
            row = r["errors"].get(fam)
            if not row:
                continue
            ks = sorted(row, key=int)
            xs = [r["cost"][pattern.format(k=k)] for k in ks]
            ax.loglog(xs, [row[k] for k in ks], "o-", label=fam)
            for k, xv, yv in zip(ks, xs, [row[k] for k in ks]):
                ax.annotate(f"k={k}", (xv, yv), fontsize=7)
        ax.axvline(r["cost"]["exact"], color="k", ls="--", lw=1, label="exact (error 0)")
        ax.plot(
            [r["cost"]["empirical"]],
            [r["errors"]["empirical"]["bias"]],
            "kx",
            label="empirical (bias)",
        )
        ax.set_xlabel("cost (gradient steps)")
        ax.set_ylabel("relative error of the diagonal")
        ax.set_title(r["model"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    models: Sequence[str] | None = None,
    reps: int | None = None,
    warmup: int = 1,
    draws: int | None = None,
    memory: bool | None = None,
    cheaper: bool = True,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    args = SimpleNamespace(
        quick=quick,
        reps=reps or (2 if quick else 7),
        warmup=warmup,
        draws=draws or (2 if quick else 3),
        memory=(not quick) if memory is None else memory,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # BackPACK's hooks warn that no input requires a gradient (expected here).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        keys = list(registry(quick)) if models is None else list(models)
        results = {key: bench_model(key, args) for key in keys}
        cheap = bench_cheaper(args) if cheaper else {}
    ratios = {
        f"{key}: {name} / gradient step": c
        for key, r in results.items()
        for name, c in r["cost"].items()
    }
    ratios.update(
        {
            f"{key}: {name} / gradient step": c
            for key, r in cheap.items()
            for name, c in r["cost"].items()
        }
    )
    return {
        "threads": threads,
        "dtype": "float32",
        "reps": args.reps,
        "draws": args.draws,
        "backpack": importlib.util.find_spec("backpack") is not None,
        "models": results,
        "cheaper_than_exact": cheap,
        "seconds": time.perf_counter() - start,
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--draws", type=int, default=None, help="draws per relative error")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    parser.add_argument(
        "--no-cheaper",
        action="store_true",
        help="skip the C >= 100 / no-fast-path section (exact diagonal against estimates)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, k <= 10, no confident model, no memory"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        memory_child(args.memory_child)
        return
    results = run(
        quick=args.quick,
        threads=args.threads,
        models=args.models,
        reps=args.reps,
        warmup=args.warmup,
        draws=args.draws,
        cheaper=not args.no_cheaper,
    )
    results = {
        "date": now(),
        "machine": machine(),
        "command": "python benchmarks/bench_estimators.py " + " ".join(sys.argv[1:]),
        **results,
    }
    write_json(RESULTS / "estimators.json", results)
    print(f"{results['date']}, {results['machine']['cpu']}, {args.threads} threads, float32")
    print(markdown(results))
    if plot(results, RESULTS / "estimators.png"):
        print(f"plot: {RESULTS / 'estimators.png'}")
    print(f"total {results['seconds']:.0f} s; JSON: {RESULTS / 'estimators.json'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
