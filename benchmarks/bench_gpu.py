"""Benchmark: the GPU paths: NumPy vs CuPy for the core space, CPU vs CUDA torch for detach-and-mix.

Two sections, each run only when its GPU back end is usable (CuPy with a device;
``torch.cuda.is_available()``) and reported as skipped, with the reason, otherwise:

- core space: ``Categorical().eigvalsh``, ``sqrt_metric_matvec`` and
  ``metric_matvec`` on (N, C) logits with N·C = 4e6 (default shapes 400,000 × 10
  and 40,000 × 100, float64), the same arrays on the host (NumPy) and on the device
  (CuPy), interleaved, the device synchronised around every call; reports the
  host / device time ratio and the largest difference between the two results;
- torch: ``detach_and_mix`` (1 and 10 probes) and one gradient step on the MLP
  784-512-256-10 of the other benchmarks (batch 128, float32) on the CPU and on
  CUDA; reports CPU / CUDA ratios, the cost in gradient steps on each device, and
  the largest difference between the two estimates (the probes are drawn on the
  host from one seed, so both devices see the same ones).

The timing functions take the two namespaces or devices as arguments, so the same
code runs with NumPy as both "host" and "device" (and torch "cpu" as both): that
self-check runs whenever no GPU is there, at a tiny size, so that the code path is
exercised by the tests; its ratios are not GPU measurements and are labelled so.

Run:  python benchmarks/bench_gpu.py [--quick] [--reps 3] [--threads 2]
Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, gpu_status, interleaved, machine, now, table, write_json
from torch import nn

from fisherbound.adapters.torch import linearize
from fisherbound.estimators import detach_and_mix
from fisherbound.families import Categorical

SHAPES = ((400_000, 10), (40_000, 100))  # N·C = 4e6
QUICK_SHAPES = ((2_000, 10), (200, 100))
SELF_CHECK = "code-path check on the CPU, not a GPU measurement"


# --------------------------------------------------------------------------- #
# core space: host namespace against device namespace


def core_space(
    host_xp: Any,
    device_xp: Any,
    *,
    to_device: Callable[[Any], Any],
    to_host: Callable[[Any], Any],
    sync: Callable[[], None] | None = None,
    shapes: Sequence[tuple[int, int]] = SHAPES,
    reps: int = 3,
    warmup: int = 1,
    dtype: str = "float64",
    seed: int = 0,
) -> dict[str, Any]:
    """Time the core-space operations on host arrays and on device arrays.

    ``to_device`` moves a host array to the device namespace, ``to_host`` back;
    ``sync`` waits for the device (None for a synchronous one). Returns rows with
    the median times, the host / device ratio and the largest absolute difference
    of the two results relative to the largest host value.
    """
    family = Categorical()
    rows = []
    for n, c in shapes:
        gen = np.random.default_rng(seed)
        z_np = (2.0 * gen.standard_normal((n, c))).astype(dtype)
        xi_np = gen.choice(np.array([-1.0, 1.0], dtype=dtype), size=(n, c))
        z_host, xi_host = host_xp.asarray(z_np), host_xp.asarray(xi_np)
        z_dev, xi_dev = to_device(z_np), to_device(xi_np)
        ops: dict[str, Callable[[Any, Any], Any]] = {
            "eigvalsh": lambda z, xi: family.eigvalsh(z),
            "sqrt_metric_matvec": lambda z, xi: family.sqrt_metric_matvec(z, xi),
            "metric_matvec": lambda z, xi: family.metric_matvec(z, xi),
        }
        for op, fn in ops.items():
            host = np.asarray(to_host(fn(z_host, xi_host)))
            dev = np.asarray(to_host(fn(z_dev, xi_dev)))
            diff = float(np.max(np.abs(host - dev)) / max(float(np.max(np.abs(host))), 1e-300))
            times = interleaved(
                {
                    "host": lambda fn=fn, z=z_host, xi=xi_host: fn(z, xi),
                    "device": lambda fn=fn, z=z_dev, xi=xi_dev: fn(z, xi),
                },
                reps=reps,
                warmup=warmup,
                sync=sync,
            )
            t_host, t_dev = statistics.median(times["host"]), statistics.median(times["device"])
            rows.append(
                {
                    "operation": op,
                    "N": n,
                    "C": c,
                    "host_s": t_host,
                    "device_s": t_dev,
                    "host_over_device": t_host / t_dev,
                    "max_relative_difference": diff,
                }
            )
    return {
        "host": host_xp.__name__,
        "device": device_xp.__name__,
        "dtype": dtype,
        "reps": reps,
        "rows": rows,
        "ratios": {
            f"{r['operation']}, N={r['N']}, C={r['C']}: host / device": r["host_over_device"]
            for r in rows
        },
    }


# --------------------------------------------------------------------------- #
# torch: detach-and-mix on two devices


def make_mlp(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    if quick:
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        x, name = torch.randn(32, 64), "MLP 64-32-10, batch 32 (quick)"
    else:
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x, name = torch.randn(128, 784), "MLP 784-512-256-10, batch 128"
    model.eval()
    return model, x, torch.randint(0, 10, (x.shape[0],)), name


def torch_devices(
    host: str,
    device: str,
    *,
    quick: bool = False,
    probes: Sequence[int] = (1, 10),
    reps: int = 5,
    warmup: int = 2,
) -> dict[str, Any]:
    """Time one gradient step and ``detach_and_mix`` on ``host`` and on ``device``."""
    model, x, y, name = make_mlp(quick)
    # Keyed by role, not by device: the self-check runs "cpu" against "cpu".
    roles = {"host": host, "device": device}
    placed = {role: (_copy_to(model, d), x.to(d), y.to(d)) for role, d in roles.items()}

    def sync_for(role: str) -> Callable[[], None] | None:
        return torch.cuda.synchronize if torch.device(roles[role]).type == "cuda" else None

    def step(role: str) -> None:
        m, xd, yd = placed[role]
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(xd), yd).backward()

    def dm(role: str, k: int, seed: int = 0) -> torch.Tensor:
        m, xd, _ = placed[role]
        return detach_and_mix(linearize(m, xd), num_probes=k, rng=seed, progress=False).value

    rows = []
    step_times: dict[str, float] = {}
    for role in roles:
        times = interleaved(
            {"step": lambda r=role: step(r)}, reps=reps, warmup=warmup, sync=sync_for(role)
        )
        step_times[role] = statistics.median(times["step"])
    for k in probes:
        a, b = dm("host", k).cpu(), dm("device", k).cpu()
        diff = float((a - b).abs().max() / a.abs().max())
        med = {}
        for role in roles:
            times = interleaved(
                {"step": lambda r=role: step(r), "dm": lambda r=role, k=k: dm(r, k)},
                reps=reps,
                warmup=warmup,
                sync=sync_for(role),
            )
            med[role] = (statistics.median(times["dm"]), statistics.median(times["step"]))
        rows.append(
            {
                "num_probes": k,
                "host_s": med["host"][0],
                "device_s": med["device"][0],
                "host_over_device": med["host"][0] / med["device"][0],
                "host_gradient_steps": med["host"][0] / med["host"][1],
                "device_gradient_steps": med["device"][0] / med["device"][1],
                "max_relative_difference": diff,
            }
        )
    ratios = {"gradient step: host / device": step_times["host"] / step_times["device"]}
    for r in rows:
        k = r["num_probes"]
        ratios[f"detach_and_mix, {k} probe(s): host / device"] = r["host_over_device"]
        ratios[f"detach_and_mix, {k} probe(s) / gradient step, host"] = r["host_gradient_steps"]
        ratios[f"detach_and_mix, {k} probe(s) / gradient step, device"] = r["device_gradient_steps"]
    return {
        "model": name,
        "num_params": sum(p.numel() for p in model.parameters()),
        "host": host,
        "device": device,
        "dtype": "float32",
        "reps": reps,
        "gradient_step_s": step_times,
        "rows": rows,
        "ratios": ratios,
    }


def _copy_to(model: nn.Module, where: str) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(where)


# --------------------------------------------------------------------------- #
# the two sections


def _skip_reason(status: dict[str, Any]) -> str:
    return "no GPU: " + "; ".join(status["reasons"])


def run_core_space(*, quick: bool = False, threads: int = 2, reps: int | None = None) -> dict:
    """NumPy vs CuPy; without CuPy and a device, skipped, with the NumPy self-check."""
    status = gpu_status()
    if status["cupy"] is None:
        check = core_space(
            np,
            np,
            to_device=np.array,
            to_host=np.asarray,
            shapes=QUICK_SHAPES[:1],
            reps=1,
            warmup=0,
        )
        return {"skipped": _skip_reason(status), "self_check": {"kind": SELF_CHECK, **check}}
    import cupy

    result = core_space(
        np,
        cupy,
        to_device=cupy.asarray,
        to_host=cupy.asnumpy,
        sync=cupy.cuda.runtime.deviceSynchronize,
        shapes=QUICK_SHAPES if quick else SHAPES,
        reps=reps or (1 if quick else 3),
    )
    return {"gpu": status["cupy"], **result}


def run_torch(*, quick: bool = False, threads: int = 2, reps: int | None = None) -> dict:
    """CPU vs CUDA torch; without CUDA, skipped, with the CPU-vs-CPU self-check."""
    torch.set_num_threads(threads)
    status = gpu_status()
    if status["torch_cuda"] is None:
        check = torch_devices("cpu", "cpu", quick=True, probes=(1,), reps=1, warmup=1)
        return {"skipped": _skip_reason(status), "self_check": {"kind": SELF_CHECK, **check}}
    result = torch_devices("cpu", "cuda", quick=quick, reps=reps or (2 if quick else 5))
    return {"gpu": status["torch_cuda"], **result}


def markdown_core_space(result: dict[str, Any]) -> str:
    if "skipped" in result:
        check = result["self_check"]
        rows = check["rows"]
        worst = max(r["max_relative_difference"] for r in rows)
        return (
            f"skipped: {result['skipped']}.\n\nThe same timing function ran with NumPy as both "
            f"host and device namespace ({SELF_CHECK}): {len(rows)} operations at N × C = "
            f"{rows[0]['N']} × {rows[0]['C']}, largest difference {worst:.1e}."
        )
    rows = [
        [
            r["operation"],
            f"{r['N']:,} × {r['C']}",
            f"{1e3 * r['host_s']:.4g}",
            f"{1e3 * r['device_s']:.4g}",
            f"{r['host_over_device']:.3g}",
            f"{r['max_relative_difference']:.1e}",
        ]
        for r in result["rows"]
    ]
    head = f"{result['gpu']}, {result['dtype']}, median of {result['reps']} interleaved runs.\n\n"
    return head + table(
        ["operation", "N × C", "NumPy (ms)", "CuPy (ms)", "NumPy / CuPy", "max rel. difference"],
        rows,
        align="llrrrr",
    )


def markdown_torch(result: dict[str, Any]) -> str:
    if "skipped" in result:
        check = result["self_check"]
        worst = max(r["max_relative_difference"] for r in check["rows"])
        return (
            f"skipped: {result['skipped']}.\n\nThe same timing function ran with torch "
            f'"cpu" as both devices ({SELF_CHECK}) on the {check["model"]}: largest '
            f"difference between the two estimates {worst:.1e}."
        )
    steps = result["gradient_step_s"]
    rows = [
        [
            "gradient step",
            f"{1e3 * steps['host']:.3g}",
            f"{1e3 * steps['device']:.3g}",
            f"{steps['host'] / steps['device']:.3g}",
            "1",
            "1",
            "",
        ]
    ]
    for r in result["rows"]:
        rows.append(
            [
                f"detach_and_mix, {r['num_probes']} probe(s)",
                f"{1e3 * r['host_s']:.3g}",
                f"{1e3 * r['device_s']:.3g}",
                f"{r['host_over_device']:.3g}",
                f"{r['host_gradient_steps']:.3g}",
                f"{r['device_gradient_steps']:.3g}",
                f"{r['max_relative_difference']:.1e}",
            ]
        )
    head = f"{result['model']}, float32, {result['gpu']}, median of {result['reps']} runs.\n\n"
    return head + table(
        [
            "method",
            "CPU (ms)",
            "CUDA (ms)",
            "CPU / CUDA",
            "× gradient step, CPU",
            "× gradient step, CUDA",
            "max rel. difference",
        ],
        rows,
    )


SECTIONS = [
    (
        "gpu_core_space",
        "GPU: core-space math, NumPy vs CuPy (N·C = 4e6)",
        run_core_space,
        markdown_core_space,
    ),
    ("gpu_torch", "GPU: detach-and-mix, CPU vs CUDA torch", run_torch, markdown_torch),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and model")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()
    record: dict[str, Any] = {
        "date": now(),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
    }
    for name, title, run, markdown in SECTIONS:
        result = run(quick=args.quick, threads=args.threads, reps=args.reps)
        record[name] = result
        print(f"## {title}\n\n{markdown(result)}\n")
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
