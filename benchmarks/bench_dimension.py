"""Benchmark: the cost of ``local_dimension`` in Fisher matvecs and gradient steps, and its error.

What it measures, on torch CPU in float32 (default 2 threads), with
``local_dimension``'s default options (``max_count=32``, 20 SLQ probes at most,
40 steps per probe):

- accuracy: a small CNN (conv4-fc10 on 3×8×8, D = 762, batch 32) whose exact
  spectrum comes from the dense Fisher (``fisher_dense`` + ``eigvalsh``): the count
  at ε = 1e-1, 1e-2 and 1e-3 times λ_max, its error against the exact count, its
  standard error and its Fisher matvecs;
- cost: the report's CNN (conv8-conv32-fc10 on 3×20×20, 34,570 parameters,
  random initialisation, batch ``--inputs``) at ε = 100 and 1 (the report's ε for
  σ² = 1): matvecs, seconds and seconds per gradient step (forward + backward of
  the mean cross-entropy, timed just before and after each call in the same
  process, so that the ratio holds under the load of a shared machine).

Matvecs are counted by a wrapper around the linearization (every column of a
JVP counts one). ``--before DIR`` runs the same measurements a second time in a
subprocess with ``PYTHONPATH=DIR`` (e.g. a ``git worktree`` of an older commit)
and reports both side by side with the ratios before / after.

Run:  python benchmarks/bench_dimension.py [--threads 2] [--inputs 64] [--before DIR]
Writes benchmarks/results/dimension.json and prints a Markdown table. ``--quick``:
batch 8 for the cost model, the accuracy model only at ε = 1e-2 λ_max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine, now, write_json
from bench_spectrum import CountingLinearization, make_cnn_quick, median_time
from torch import nn

NAME = "dimension"
TITLE = "local_dimension: Fisher matvecs, gradient steps and error (torch CPU, float32)"


def make_report_cnn(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The 34,570-parameter CNN of issue 14 (conv8-conv32-fc10 on 3×20×20)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 10 * 10, 10),
    )
    x = torch.randn(n, 3, 20, 20)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def measure(*, quick: bool, threads: int, inputs: int) -> dict[str, Any]:
    """Every row, with whichever ``fisherbound`` is importable."""
    import fisherbound
    from fisherbound.adapters.torch import linearize
    from fisherbound.dimension import local_dimension
    from fisherbound.families import Categorical
    from fisherbound.fisher import fisher_dense

    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []

    # Accuracy against the exact count.
    model, x, _ = make_cnn_quick()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    lin = CountingLinearization(linearize(model, x))
    dense = fisher_dense(linearize(model, x), Categorical(), progress=False)
    exact = np.linalg.eigvalsh(np.asarray(dense, dtype=np.float64))[::-1]
    for factor in (1e-2,) if quick else (1e-1, 1e-2, 1e-3):
        eps = float(factor * exact[0])
        truth = int(np.sum(exact > eps))
        lin.matvecs = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = local_dimension(lin, Categorical(), eps=eps, rng=0)
        value = float(est.value)
        rows.append(
            {
                "model": "accuracy",
                "eps": eps,
                "eps_over_lambda_max": factor,
                "exact": truth,
                "value": value,
                "std_error": float(est.std_error),
                "num_probes": int(est.num_probes),
                "error": value - truth,
                "matvecs": lin.matvecs,
            }
        )

    # Cost on the report's CNN.
    model, x, y = make_report_cnn(8 if quick else inputs)

    def grad_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):
        grad_step()
    lin = CountingLinearization(linearize(model, x))
    for eps in (100.0, 1.0):
        before, _ = median_time(grad_step, 5)
        lin.matvecs = 0
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = local_dimension(lin, Categorical(), eps=eps, rng=0)
        seconds = time.perf_counter() - start
        after, _ = median_time(grad_step, 5)
        step = statistics.median([before, after])
        rows.append(
            {
                "model": "cost",
                "eps": eps,
                "value": float(est.value),
                "std_error": float(est.std_error),
                "num_probes": int(est.num_probes),
                "matvecs": lin.matvecs,
                "seconds": seconds,
                "gradient_step_seconds": step,
                "gradient_steps": seconds / step,
            }
        )
    return {
        "fisherbound": str(Path(fisherbound.__file__).resolve().parent.parent),
        "threads": threads,
        "accuracy_model": "CNN conv4-fc10 on 3x8x8, D = 762, batch 32 (exact: dense eigvalsh)",
        "cost_model": f"CNN conv8-conv32-fc10 on 3x20x20, D = 34,570, batch {len(x)}",
        "rows": rows,
    }


def run(
    *, quick: bool = False, threads: int = 2, inputs: int = 64, before: str | None = None
) -> dict[str, Any]:
    after = measure(quick=quick, threads=threads, inputs=inputs)
    results: dict[str, Any] = {"after": after, "ratios": {}}
    for r in after["rows"]:
        if r["model"] == "cost":
            results["ratios"][f"local_dimension / gradient step, eps={r['eps']:.3g}"] = r[
                "gradient_steps"
            ]
    if before is not None:
        command = [sys.executable, __file__, "--json-only", "--threads", str(threads)]
        command += ["--inputs", str(inputs)] + (["--quick"] if quick else [])
        env = {**os.environ, "PYTHONPATH": before}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results["before"] = json.loads(out.stdout.strip().splitlines()[-1])
        for old, new in zip(results["before"]["rows"], after["rows"], strict=True):
            key = f"{new['model']} eps={new['eps']:.3g}"
            results["ratios"][f"matvecs before/after, {key}"] = old["matvecs"] / max(
                new["matvecs"], 1
            )
            if new["model"] == "cost":
                results["ratios"][f"gradient steps before/after, {key}"] = (
                    old["gradient_steps"] / new["gradient_steps"]
                )
    return results


def markdown(results: dict[str, Any]) -> str:
    runs = [("before", results["before"])] if "before" in results else []
    runs.append(("after", results["after"]))
    first = results["after"]
    lines = [
        f"{first['accuracy_model']}; {first['cost_model']}; float32, {first['threads']} threads",
        "",
        "| code | model | ε | exact | d_ε ± SE | probes | matvecs | gradient steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, res in runs:
        for r in res["rows"]:
            exact = str(r.get("exact", "–"))
            steps = f"{r['gradient_steps']:.0f}" if "gradient_steps" in r else "–"
            lines.append(
                f"| {label} | {r['model']} | {r['eps']:.3g} | {exact} | {r['value']:.1f} ± "
                f"{r['std_error']:.1f} | {r['num_probes']} | {r['matvecs']} | {steps} |"
            )
    if results["ratios"]:
        lines.append("")
        lines += [f"- {k}: {v:.1f}x" for k, v in results["ratios"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=64, help="batch of the cost model")
    parser.add_argument("--quick", action="store_true", help="batch 8, one ε on the small model")
    parser.add_argument("--before", default=None, help="PYTHONPATH of the code to compare with")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dimension.json"))
    args = parser.parse_args()
    if args.json_only:  # the --before subprocess
        print(json.dumps(measure(quick=args.quick, threads=args.threads, inputs=args.inputs)))
        return
    results = run(quick=args.quick, threads=args.threads, inputs=args.inputs, before=args.before)
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    write_json(Path(args.out), {**record, **results})
    print(markdown(results))


if __name__ == "__main__":
    main()
