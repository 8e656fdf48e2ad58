"""Benchmark: the exact Fisher diagonal with the torch adapter.

diag F = Σ_n Σ_c (J_nᵀ b_nc)², with b_nc the c-th column of the core-metric
square root B(z_n) = (I − p 1ᵀ) diag(√p), on torch CPU in float32, compared with
one gradient step (forward + backward of the mean cross-entropy), the generic
vmap path (per-example VJPs) and, when ``backpack`` (backpack-for-pytorch) is
importable, BackPACK's ``DiagGGNExact`` on the same model and batch (the exact
GGN diagonal of the mean cross-entropy, which for the softmax likelihood is the
Fisher diagonal divided by N).

Timings are interleaved (one repetition of every method, then the next) after
warm-up rounds; the table reports the median and the minimum over repetitions
(the generic path, which is slow, gets fewer: --generic-reps).

Run:  python benchmarks/bench_exact_diagonal.py [--reps 7] [--threads 2] [--quick]
Writes benchmarks/results/exact_diagonal.json. ``--quick``: tiny models, 2 repetitions.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import machine, now, write_json
from torch import nn

from fisherbound.adapters.torch import linearize

NAME = "exact_diagonal"
TITLE = "Exact Fisher diagonal (torch CPU, float32)"


def make_mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, torch.randn(128, 784)


def make_cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    return model, torch.randn(64, 3, 32, 32)


def make_mlp_quick() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, torch.randn(16, 64)


def make_cnn_quick() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    return model, torch.randn(8, 3, 8, 8)


MODELS = {
    "mlp": ("MLP 784-512-256-10, batch 128", make_mlp),
    "cnn": ("CNN 3x32x32, conv16-conv32-linear, batch 64", make_cnn),
}
QUICK_MODELS = {
    "mlp": ("MLP 64-32-10, batch 16 (quick)", make_mlp_quick),
    "cnn": ("CNN 3x8x8, conv4-linear, batch 8 (quick)", make_cnn_quick),
}


def sqrt_metric_columns(logits: torch.Tensor) -> torch.Tensor:
    """U[n, c] = column c of B(z_n) = (I − p 1ᵀ) diag(√p), i.e. √p_c (e_c − p); (N, C, C)."""
    p = torch.softmax(logits, dim=-1)
    eye = torch.eye(p.shape[-1], dtype=p.dtype)
    return p.sqrt().unsqueeze(-1) * (eye.unsqueeze(0) - p.unsqueeze(1))


def grad_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def fast_diagonal(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lin = linearize(model, x)
    U = sqrt_metric_columns(lin.logits)
    return lin.sum_squared_per_example_vjp(U, sum_cotangents=True)


def fast_diagonal_per_cotangent(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lin = linearize(model, x)
    U = sqrt_metric_columns(lin.logits)
    return lin.sum_squared_per_example_vjp(U).sum(dim=0)


def generic_diagonal(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lin = linearize(model, x)
    U = sqrt_metric_columns(lin.logits)
    return lin._generic_sum_squared_per_example_vjp(U, sum_cotangents=True)


def make_backpack(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    if importlib.util.find_spec("backpack") is None:
        return None
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    bp_model = extend(copy.deepcopy(model))  # its hooks must not touch the other model
    loss_fn = extend(nn.CrossEntropyLoss())

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bp_model.zero_grad(set_to_none=True)
        loss = loss_fn(bp_model(x), y)
        with backpack(DiagGGNExact()), warnings.catch_warnings():
            # BackPACK's backward hooks fire on module outputs (the input needs no grad).
            warnings.filterwarnings("ignore", message="Full backward hook", category=UserWarning)
            loss.backward()
        # The mean loss: its GGN is the Fisher sum divided by N.
        return torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_model.parameters()]) * x.shape[0]

    return run


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def bench_model(
    key: str,
    reps: int,
    warmup: int,
    with_generic: bool,
    generic_reps: int,
    models: dict[str, Any] = MODELS,
) -> dict:
    torch.manual_seed(0)
    model, x = models[key][1]()
    model.eval()
    y = torch.randint(0, 10, (x.shape[0],))
    methods: dict[str, Callable[[], object]] = {
        "gradient step": lambda: grad_step(model, x, y),
        "fast path (sum over c)": lambda: fast_diagonal(model, x),
        "fast path (per c, then sum)": lambda: fast_diagonal_per_cotangent(model, x),
    }
    if with_generic:
        methods["generic vmap path"] = lambda: generic_diagonal(model, x)
    bp = make_backpack(model)
    if bp is not None:
        methods["BackPACK DiagGGNExact"] = lambda: bp(x, y)

    # Correctness first (outside the timings).
    checks: dict[str, float] = {}
    ref = fast_diagonal(model, x)
    checks["fast per-c vs fast"] = max_rel_diff(fast_diagonal_per_cotangent(model, x), ref)
    if with_generic:
        checks["generic vs fast"] = max_rel_diff(generic_diagonal(model, x), ref)
    if bp is not None:
        checks["BackPACK vs fast"] = max_rel_diff(bp(x, y), ref)

    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(warmup + reps):
        for name, fn in methods.items():
            if name == "generic vmap path" and rep >= warmup + generic_reps:
                continue  # slow: fewer repetitions
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": models[key][0],
        "num_params": sum(p.numel() for p in model.parameters()),
        "median_s": medians,
        "min_s": {name: min(ts) for name, ts in times.items()},
        "all_s": times,
        "max_relative_difference": checks,
    }


def table(result: dict) -> str:
    lines = [f"### {result['model']} (D = {result['num_params']})", ""]
    lines.append(
        "| method | median (ms) | × gradient step | × DiagGGNExact "
        "| min (ms) | × gradient step | × DiagGGNExact |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    med, low = result["median_s"], result["min_s"]
    bp = "BackPACK DiagGGNExact"
    for name in med:
        cells = []
        for stat in (med, low):
            t = stat[name]
            vs_bp = f"{t / stat[bp]:.2f}" if bp in stat else "n/a"
            cells += [f"{1e3 * t:.1f}", f"{t / stat['gradient step']:.2f}", vs_bp]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, value in result["max_relative_difference"].items():
        lines.append(f"- max relative difference, {name}: {value:.2e}")
    return "\n".join(lines)


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    models: Sequence[str] | None = None,
    reps: int | None = None,
    warmup: int | None = None,
    generic: bool = True,
    generic_reps: int | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    registry = QUICK_MODELS if quick else MODELS
    reps = reps or (2 if quick else 7)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    generic_reps = generic_reps or (1 if quick else 3)
    results = {
        key: bench_model(key, reps, warmup, generic, generic_reps, registry)
        for key in (models or list(registry))
    }
    ratios = {}
    for key, r in results.items():
        med = r["median_s"]
        for name, t in med.items():
            if name != "gradient step":
                ratios[f"{key}: {name} / gradient step"] = t / med["gradient step"]
            if "BackPACK DiagGGNExact" in med and name != "BackPACK DiagGGNExact":
                ratios[f"{key}: {name} / BackPACK DiagGGNExact"] = t / med["BackPACK DiagGGNExact"]
    return {
        "threads": threads,
        "dtype": "float32",
        "device": "cpu",
        "reps": reps,
        "generic_reps": generic_reps,
        "warmup": warmup,
        "backpack": importlib.util.find_spec("backpack") is not None,
        "models": results,
        "ratios": ratios,
    }


def markdown(result: dict[str, Any]) -> str:
    return "\n\n".join(table(r) for r in result["models"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-generic", action="store_true", help="skip the generic vmap path")
    parser.add_argument(
        "--generic-reps", type=int, default=None, help="timed repetitions of the slow generic path"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 repetitions")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "exact_diagonal.json",
        help="where to write the JSON results",
    )
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    result = run(
        quick=args.quick,
        threads=args.threads,
        models=args.models,
        reps=args.reps,
        warmup=args.warmup,
        generic=not args.no_generic,
        generic_reps=args.generic_reps,
    )
    print(markdown(result))
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    write_json(args.out, {**record, **result})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
