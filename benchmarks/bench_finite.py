"""Benchmark: the cost of the finite checks on every product (torch CPU).

Every product of a linearization or loss function is checked finite as it
returns (``fisherbound._finite``: the sum of the result), and the torch adapter
checks the inputs finite and the forward pass deterministic (the random
generators' state around it) on every batch, the parameters on a stream's first. This times the main
analyses with these checks and with them switched off (the unwrapped methods,
the adapter's checks replaced by no-ops), interleaved in one process, on the
MLP 784-512-256-10 (batch 128) and the CNN of ``bench_estimators`` in float32,
and reports the ratio checked / unchecked for each: the exact diagonal,
detach-and-mix (M = 1, 10), the top five eigenpairs of F and the loss trace by
Hessian-vector products.

Run:  python benchmarks/bench_finite.py [--reps 7] [--threads 2] [--quick]
Writes benchmarks/results/finite.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import RESULTS, fmt, median, table, timed, write_json  # noqa: E402
from bench_estimators import make_cnn, make_cnn_quick, make_mlp, make_mlp_quick  # noqa: E402

NAME = "finite_checks"
TITLE = "The finite checks on every product: checked / unchecked time (torch CPU)"


def _guarded_classes() -> list[type]:
    """Every class whose products the finite check wraps (the adapters' included)."""
    from fisherbound._frozen import FrozenBase
    from fisherbound.adapters import numpy as _np_adapter  # noqa: F401 - registers classes
    from fisherbound.adapters import torch as _torch_adapter  # noqa: F401

    out, todo = [], [FrozenBase]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Without the checks of issue 15: the products unwrapped, and the torch adapter's
    checks of finite parameters and inputs and of a random forward pass switched off."""
    from fisherbound.adapters import _torch_model

    saved = []
    for cls in _guarded_classes():
        for name in cls.checked_products:
            fn = cls.__dict__.get(name)
            if fn is not None and getattr(fn, "_finite_guard", False):
                saved.append((cls, name, fn))
                setattr(cls, name, fn.__wrapped__)
    off = {
        "check_parameters_finite": lambda named: None,
        "check_inputs_finite": lambda named: None,
        "rng_states": lambda device: [],
    }
    for name, fn in off.items():
        saved.append((_torch_model, name, getattr(_torch_model, name)))
        setattr(_torch_model, name, fn)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _cases(model: Any, x: Any) -> dict[str, Any]:
    from fisherbound.adapters import torch as ft
    from fisherbound.dimension import top_eigenpairs
    from fisherbound.estimators import detach_and_mix
    from fisherbound.fisher import fisher_diagonal
    from fisherbound.landscape import loss_trace

    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()

    return {
        "gradient step": step,
        "fisher_diagonal": lambda: fisher_diagonal(ft.linearize(model, x)),
        "detach_and_mix M=1": lambda: detach_and_mix(ft.linearize(model, x), num_probes=1, rng=0),
        "detach_and_mix M=10": lambda: detach_and_mix(ft.linearize(model, x), num_probes=10, rng=0),
        "top_eigenpairs k=5": lambda: top_eigenpairs(ft.linearize(model, x), k=5, tol=1e-4, rng=0),
        "loss_trace M=10": lambda: loss_trace(ft.loss_function(model, x, y), num_probes=10, rng=0),
    }


def _alternating(fns: dict[str, Any], *, reps: int) -> dict[str, list[float]]:
    """Times of each function, interleaved, the order reversed every other repetition.

    Run right after its checked twin, the unchecked one finds warm caches: in a fixed
    order the gradient step itself timed about 10% apart from itself.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(1 + 2 * reps):  # one warm-up, then reps in each order
        for name in names if rep % 2 else names[::-1]:
            t, _ = timed(fns[name])
            if rep:
                times[name].append(t)
    return times


def run(*, quick: bool = False, threads: int = 2, reps: int = 7) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    makers = (
        {"mlp": make_mlp_quick, "cnn": make_cnn_quick}
        if quick
        else {
            "mlp": make_mlp,
            "cnn": make_cnn,
        }
    )
    reps = 2 if quick else reps
    models: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for key, make in makers.items():
        model, x = make()
        cases = _cases(model, x)
        fns: dict[str, Any] = {}
        for name, fn in cases.items():
            fns[f"{name} | checked"] = fn

            def off(fn: Any = fn) -> Any:
                with unchecked():
                    return fn()

            fns[f"{name} | unchecked"] = off
        times = _alternating(fns, reps=reps)
        step = median(times["gradient step | checked"])
        rows = []
        for name in cases:
            on = median(times[f"{name} | checked"])
            no = median(times[f"{name} | unchecked"])
            rows.append({"method": name, "checked": on / step, "unchecked": no / step})
            if name != "gradient step":
                ratios[f"{key}: {name} checked / unchecked"] = on / no
        models[key] = {"rows": rows, "step_seconds": step}
    return {"models": models, "reps": 2 * reps, "ratios": ratios}


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for key, m in result["models"].items():
        rows = [
            [
                r["method"],
                fmt(r["checked"]),
                fmt(r["unchecked"]),
                fmt(r["checked"] / r["unchecked"]),
            ]
            for r in m["rows"]
        ]
        parts.append(
            f"{key} (median of {result['reps']}; in gradient steps):\n\n"
            + table(["method", "checked", "unchecked", "checked / unchecked"], rows)
        )
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(quick=args.quick, threads=args.threads, reps=args.reps)
    write_json(RESULTS / "finite.json", result)
    print(markdown(result))


if __name__ == "__main__":
    main()
