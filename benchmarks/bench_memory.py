"""Benchmark: peak memory of the Fisher quantities against one gradient step (issue 24).

Every measurement runs in a fresh Python process (this script with ``--child``), on an
MLP 256-256-256-C (ReLU, float32, torch CPU, ``--threads`` torch threads), standard
normal inputs (N, 256) and random labels, the same weights and data in every process
(seed 0). After the imports, the model, the data and one warm-up gradient step, the
child resets its peak resident set (``/proc/self/clear_refs``), calls the method once
and reports

- peak extra memory: the process's high-water resident set after the call (VmHWM)
  minus its resident set just before it. ``getrusage(RUSAGE_SELF).ru_maxrss`` is
  recorded too (after minus before), but it is no measure here: Linux carries the
  parent's peak into a child's ``ru_maxrss`` across fork and exec, so it starts at the
  runner's size;
- wall time of the call (the median of up to 5 calls when the first takes under 1 s).

Both are reported as ratios to one plain gradient step (cross-entropy with
reduction="sum", backward) of the same model and batch, measured the same way in its
own fresh process. Each child caps its address space (``RLIMIT_AS``, ``--max-gib``,
10 GiB by default, the imports' mappings included) so that a method that needs more
fails inside the child with a MemoryError or torch's allocation error and is reported
as "out of memory at the cap", before the kernel's out-of-memory killer could act; a
child that runs past ``--timeout`` (300 s) is killed and reported as "timed out".
Children run one after the other, never together.

Sweeps: N = 32 with C = 10, 100, 1000, 3000, 10000, and C = 1000 with N = 32, 256,
1024. Methods: the gradient step (the baseline); fisherbound's exact
``fisher_diagonal(linearize(model, x), max_cotangents=10**9)``; ``detach_and_mix`` with
1 and 10 probes; ``top_eigenpairs(k=5, tol=1e-4)`` on the smaller cells (C <= 1000,
N <= 256); BackPACK ``DiagGGNExact`` (model and CrossEntropyLoss(reduction="sum")
extended); curvlinops, which (3.0.1) has no exact GGN diagonal: its
``hutchinson_diag`` on ``GGNLinearOperator`` with 1 and 10 matrix-vector products, and
its operator with scipy's ``eigsh`` (k = 5, tol 1e-4) on the smaller cells. Peers that
are not importable are reported "not installed". A cell whose time, estimated from the
same method's previous cell (work ∝ N·C·D for the exact diagonals, N·D otherwise), would
pass the timeout is skipped, with the estimate.

Run:  python benchmarks/bench_memory.py [--threads 1] [--max-gib 10] [--timeout 300]
          [--only-c C ...] [--only-n N ...] [--methods NAME ...] [--out DIR] [--quick]
Writes DIR/memory.json (every number) and DIR/memory.md (the tables); DIR defaults to
benchmarks/results/. ``--quick``: N = 8, C = 10 and 100, five methods (a smoke run).
``--only-c`` / ``--only-n`` restrict the C sweep / the N sweep to those values; given
either, the sweep not named is left out.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NAME = "memory"
TITLE = "Peak memory against one gradient step (torch CPU, float32, a fresh process each)"

HIDDEN = 256
TOP_TOL = 1e-4
MAX_COTANGENTS = 10**9
RESULT_TAG = "MEMORY-RESULT "

# method key -> (label, peer module or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "step": ("gradient step (cross-entropy sum, backward)", None),
    "fb_exact": ("fisherbound fisher_diagonal (exact)", None),
    "fb_dm1": ("fisherbound detach_and_mix, 1 probe", None),
    "fb_dm10": ("fisherbound detach_and_mix, 10 probes", None),
    "fb_top5": ("fisherbound top_eigenpairs, k = 5", None),
    "bp_exact": ("BackPACK DiagGGNExact (exact)", "backpack"),
    "cl_diag1": ("curvlinops hutchinson_diag, 1 matvec", "curvlinops"),
    "cl_diag10": ("curvlinops hutchinson_diag, 10 matvecs", "curvlinops"),
    "cl_top5": ("curvlinops GGNLinearOperator + scipy eigsh, k = 5", "curvlinops"),
}
QUICK_METHODS = ["step", "fb_exact", "fb_dm1", "bp_exact", "cl_diag1"]
EXACT = {"fb_exact", "bp_exact"}  # C backward passes per example
TOP = {"fb_top5", "cl_top5"}  # only on the smaller cells

C_SWEEP = (32, [10, 100, 1000, 3000, 10000])  # N, the Cs
N_SWEEP = (1000, [32, 256, 1024])  # C, the Ns
QUICK_C_SWEEP = (8, [10, 100])


def num_params(c: int) -> int:
    return 2 * (HIDDEN * HIDDEN + HIDDEN) + HIDDEN * c + c


def small_cell(n: int, c: int) -> bool:
    return c <= 1000 and n <= 256


# --------------------------------------------------------------------------- #
# the child: one method, one cell, one fresh process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    msg = f"/proc/self/status has no {field}."
    raise RuntimeError(msg)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return False
    return True


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    signs = ("can't allocate memory", "Cannot allocate memory", "out of memory", "bad_alloc")
    return isinstance(exc, RuntimeError) and any(s in text for s in signs)


def _setup(method: str, n: int, c: int, threads: int) -> tuple[Callable[[], Any], Callable]:
    """Imports, model, data and a warm-up; returns the measured call and its summary.

    The warm-up is the same method on the first two examples: lazy imports, compiled
    functions and first-use allocations stay out of every row.
    """
    import warnings

    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, c),
    )
    model.eval()
    x = torch.randn(n, HIDDEN)
    y = torch.randint(0, c, (n,))
    params = list(model.parameters())

    def total(t: Any) -> dict[str, Any]:
        return {"sum": float(t.sum())}

    fn: Callable[[Any, Any], Any]
    summary: Callable[[Any], dict[str, Any]] = total
    if method == "step":

        def fn(xb: Any, yb: Any) -> Any:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

        def summary(_: Any) -> dict[str, Any]:
            return {}

    elif method.startswith("fb_"):
        from fisherbound.adapters.torch import linearize
        from fisherbound.dimension import top_eigenpairs
        from fisherbound.estimators import detach_and_mix
        from fisherbound.fisher import fisher_diagonal

        if method == "fb_exact":

            def fn(xb: Any, yb: Any) -> Any:
                lin = linearize(model, xb)
                return fisher_diagonal(lin, max_cotangents=MAX_COTANGENTS, progress=False)

        elif method in ("fb_dm1", "fb_dm10"):
            m = 1 if method == "fb_dm1" else 10

            def fn(xb: Any, yb: Any) -> Any:
                lin = linearize(model, xb)
                return detach_and_mix(lin, num_probes=m, rng=0, progress=False).value

        else:

            def fn(xb: Any, yb: Any) -> Any:
                return top_eigenpairs(linearize(model, xb), k=5, tol=TOP_TOL, rng=0)

            def summary(pairs: Any) -> dict[str, Any]:
                return {"eigenvalues": [float(e) for e in pairs.eigenvalues]}

    elif method == "bp_exact":
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        bp_model = extend(model)
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

        def fn(xb: Any, yb: Any) -> Any:
            bp_model.zero_grad(set_to_none=True)
            loss = loss_fn(bp_model(xb), yb)
            with backpack(DiagGGNExact()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook")
                loss.backward()
            return torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_model.parameters()])

    elif method.startswith("cl_"):
        from curvlinops import GGNLinearOperator, hutchinson_diag

        def operator(xb: Any, yb: Any) -> Any:
            return GGNLinearOperator(
                model,
                nn.CrossEntropyLoss(reduction="sum"),
                params,
                [(xb, yb)],
                check_deterministic=False,
                num_data=int(xb.shape[0]),
            )

        if method in ("cl_diag1", "cl_diag10"):
            m = 1 if method == "cl_diag1" else 10

            def fn(xb: Any, yb: Any) -> Any:
                torch.manual_seed(0)
                return hutchinson_diag(operator(xb, yb), m)

        else:
            from scipy.sparse.linalg import eigsh

            def fn(xb: Any, yb: Any) -> Any:
                op = operator(xb, yb).to_scipy()
                return eigsh(op, k=5, which="LA", tol=TOP_TOL, return_eigenvectors=False)

            def summary(values: Any) -> dict[str, Any]:
                return {"eigenvalues": sorted((float(e) for e in values), reverse=True)}

    else:
        msg = f"method must be one of {list(METHODS)}; got {method!r}."
        raise ValueError(msg)
    warm = fn(x[:2].clone(), y[:2].clone())
    del warm
    model.zero_grad(set_to_none=True)
    return (lambda: fn(x, y)), summary


def child(spec: dict[str, Any]) -> dict[str, Any]:
    cap = int(spec["max_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # before the imports: they count
    out: dict[str, Any] = {"max_gib": spec["max_gib"]}
    try:
        call, summary = _setup(spec["method"], spec["n"], spec["c"], spec["threads"])
    except Exception as exc:
        oom = _is_out_of_memory(exc)
        return {**out, "status": "oom" if oom else "failed", "error": f"setup: {exc!s:.500}"}
    gc.collect()
    out["peak_reset"] = _reset_peak()
    rss_before = _status_kib("VmRSS")
    out["vm_before_bytes"] = 1024 * _status_kib("VmSize")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        start = time.perf_counter()
        value = call()
        first = time.perf_counter() - start
    except Exception as exc:
        oom = _is_out_of_memory(exc)
        return {**out, "status": "oom" if oom else "failed", "error": f"{exc!s:.500}"}
    hwm = _status_kib("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["rss_before_bytes"] = 1024 * rss_before
    out["peak_extra_bytes"] = 1024 * max(hwm - rss_before, 0)
    out["ru_maxrss_delta_bytes"] = 1024 * (maxrss_after - maxrss_before)
    out["check"] = summary(value)
    del value
    times = [first]
    while first < 1.0 and len(times) < 5 and sum(times) < 3.0:
        gc.collect()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    out["seconds"] = statistics.median(times)
    out["all_seconds"] = times
    out["status"] = "measured"
    return out


def child_main(argv: Sequence[str]) -> int:
    spec = json.loads(argv[0])
    result = child(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- #
# the parent


def measure(
    method: str, n: int, c: int, *, threads: int, max_gib: float, timeout: float
) -> dict[str, Any]:
    """One child process: ``method`` on the cell (N, C)."""
    spec = {"method": method, "n": n, "c": c, "threads": threads, "max_gib": max_gib}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A fixed mmap threshold turns glibc's adaptive one off: every large block is
    # mapped and unmapped on its own, so the resident set follows the live memory
    # (freed blocks kept in the heap would hide a later call's peak).
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "timeout_s": timeout, "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"status": "failed", "error": f"child exited with {how}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    result["wall_s"] = wall
    return result


def work(method: str, n: int, c: int) -> float:
    return float(n * c * num_params(c)) if method in EXACT else float(n * num_params(c))


def fisher_diagonal_options() -> dict[str, Any]:
    """The memory-related keywords of the installed fisher_diagonal and their defaults."""
    from fisherbound.fisher import fisher_diagonal

    params = inspect.signature(fisher_diagonal).parameters
    out: dict[str, Any] = {"max_cotangents_passed": MAX_COTANGENTS}
    for name in ("max_memory", "max_vectors", "max_cotangents"):
        if name in params:
            default = params[name].default
            out[name] = (
                default if isinstance(default, (int, float, str, type(None))) else repr(default)
            )
        else:
            out[name] = "not a keyword"
    return out


def run(
    *,
    quick: bool = False,
    threads: int = 1,
    max_gib: float = 10.0,
    timeout: float = 300.0,
    only_c: Sequence[int] | None = None,
    only_n: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    log = log or (lambda s: print(s, flush=True))
    chosen = list(methods or (QUICK_METHODS if quick else METHODS))
    if "step" not in chosen:
        chosen.insert(0, "step")
    sweeps: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    if quick:
        n0, cs = QUICK_C_SWEEP
        sweeps["C"] = (f"N = {n0}", [(n0, c) for c in cs])
    else:
        n0, cs = C_SWEEP
        c0, ns = N_SWEEP
        if only_c or not only_n:
            sweeps["C"] = (f"N = {n0}", [(n0, c) for c in cs if not only_c or c in only_c])
        if only_n or not only_c:
            sweeps["N"] = (f"C = {c0}", [(n, c0) for n in ns if not only_n or n in only_n])
    peers = {mod: importlib.util.find_spec(mod) is not None for _, mod in METHODS.values() if mod}

    cells: dict[str, dict[str, Any]] = {}  # "N=32,C=10" -> method -> record
    for sweep, (_, grid) in sweeps.items():
        last: dict[str, tuple[int, int, float]] = {}  # method -> its previous measured cell
        for n, c in grid:
            key = f"N={n},C={c}"
            row = cells.setdefault(key, {"N": n, "C": c, "D": num_params(c), "methods": {}})
            for method in chosen:
                mod = METHODS[method][1]
                estimate = None
                if method in last:
                    n1, c1, t1 = last[method]
                    estimate = t1 * work(method, n, c) / work(method, n1, c1)
                if method in row["methods"]:  # a cell shared by both sweeps
                    rec = row["methods"][method]
                elif mod is not None and not peers[mod]:
                    rec = {"status": "not installed"}
                elif method in TOP and not (quick or small_cell(n, c)):
                    rec = {"status": "not run", "reason": "top eigenpairs: smaller cells only"}
                elif estimate is not None and estimate > timeout:
                    rec = {"status": "skipped", "estimate_s": estimate}
                else:
                    rec = measure(method, n, c, threads=threads, max_gib=max_gib, timeout=timeout)
                    log(f"  [{sweep}] N={n:5d} C={c:6d} {method:10s} {_cell_text(rec, None)}")
                row["methods"][method] = rec
                if rec["status"] == "measured":
                    last[method] = (n, c, rec["seconds"])

    ratios: dict[str, float] = {}
    for key, row in cells.items():
        step = row["methods"]["step"]
        if step["status"] != "measured":
            continue
        for method, rec in row["methods"].items():
            if method == "step" or rec["status"] != "measured":
                continue
            mem = _ratio(rec["peak_extra_bytes"], step["peak_extra_bytes"])
            if mem is not None:
                rec["memory_ratio"] = ratios[f"{key}: {method} peak memory / step"] = mem
            t = _ratio(rec["seconds"], step["seconds"])
            if t is not None:
                rec["time_ratio"] = ratios[f"{key}: {method} time / step"] = t
    return {
        "threads": threads,
        "dtype": "float32",
        "device": "cpu",
        "model": f"MLP {HIDDEN}-{HIDDEN}-{HIDDEN}-C (ReLU), inputs standard normal",
        "max_gib": max_gib,
        "timeout_s": timeout,
        "quick": quick,
        "methods": {m: METHODS[m][0] for m in chosen},
        "peers": {mod: ("installed" if ok else "not installed") for mod, ok in peers.items()},
        "fisher_diagonal": fisher_diagonal_options(),
        "sweeps": {
            name: {"fixed": fixed, "cells": [f"N={n},C={c}" for n, c in grid]}
            for name, (fixed, grid) in sweeps.items()
        },
        "cells": cells,
        "ratios": ratios,
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if a > 0 and b > 0 and math.isfinite(a / b) else None


def _mb(n_bytes: float) -> str:
    mb = n_bytes / 1e6
    return f"{mb:.3g}" if mb < 1000 else f"{mb:,.0f}"


def _cell_text(rec: dict[str, Any], step: dict[str, Any] | None) -> str:
    status = rec["status"]
    if status == "measured":
        mem, t = _mb(rec["peak_extra_bytes"]) + " MB", f"{rec['seconds']:.3g} s"
        if step is not None and "memory_ratio" in rec:
            mem += f" ({rec['memory_ratio']:.3g}×)"
        if step is not None and "time_ratio" in rec:
            t += f" ({rec['time_ratio']:.3g}×)"
        return f"{mem}, {t}"
    if status == "oom":
        return f"out of memory at the cap ({rec['max_gib']:g} GiB)"
    if status == "timed out":
        return f"timed out ({rec['timeout_s']:g} s)"
    if status == "skipped":
        return f"skipped (estimated {rec['estimate_s']:.0f} s)"
    if status == "not run":
        return "—"
    if status == "failed":
        return f"failed: {rec['error'][:120]}"
    return status


def markdown(result: dict[str, Any]) -> str:
    parts = []
    cells = result["cells"]
    for name, sweep in result["sweeps"].items():
        keys = sweep["cells"]
        if not keys:
            continue
        varying = "C" if name == "C" else "N"
        headers = ["method", *(f"{varying} = {cells[k][varying]:,}" for k in keys)]
        rows = []
        for method, label in result["methods"].items():
            texts = []
            for k in keys:
                rec = cells[k]["methods"][method]
                texts.append(_cell_text(rec, cells[k]["methods"]["step"]))
            rows.append([label, *texts])
        head = f"### {result['model']}, {sweep['fixed']}, float32, {result['threads']} thread(s)"
        dims = ", ".join(f"D = {cells[k]['D']:,}" for k in keys)
        parts.append(
            f"{head}\n\n({dims})\n\n"
            + _table(headers, rows)
            + "\n\n"
            + "\n".join(_agreement(cells, keys))
        )
    opts = result["fisher_diagonal"]
    parts.append(
        "Each cell: peak extra resident memory of the call in MB (10⁶ bytes) and its "
        "wall time, each with its ratio to the gradient step of the same cell in "
        "parentheses; every number from its own fresh process, the address space capped "
        f"at {result['max_gib']:g} GiB, children killed after {result['timeout_s']:g} s. "
        f"fisher_diagonal was called with max_cotangents={MAX_COTANGENTS:.0e}; its "
        f"max_memory: {opts['max_memory']}; max_vectors default: {opts['max_vectors']}."
    )
    return "\n\n".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _agreement(cells: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """The exact diagonals' sums (the Fisher trace) side by side, where both were measured."""
    out = []
    for k in keys:
        ms = cells[k]["methods"]
        fb, bp = ms.get("fb_exact", {}), ms.get("bp_exact", {})
        if fb.get("status") == "measured" and bp.get("status") == "measured":
            a, b = fb["check"]["sum"], bp["check"]["sum"]
            diff = abs(a - b) / abs(a)
            out.append(f"- {k}: trace of the exact diagonal, fisherbound vs BackPACK: {diff:.1e}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 8, C = 10, 100: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--max-gib", type=float, default=10.0, help="address-space cap per child")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    parser.add_argument("--only-c", type=int, nargs="+", help="these C of the N = 32 sweep")
    parser.add_argument("--only-n", type=int, nargs="+", help="these N of the C = 1000 sweep")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="these methods")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer; got {args.threads}.")
    from _common import load_average, machine, now, write_json

    record: dict[str, Any] = {
        "date": now(),
        "command": "python " + " ".join([sys.argv[0], *argv]),
        "machine": machine(),
        "load_average": {"start": load_average()},
    }
    start = time.perf_counter()
    result = run(
        quick=args.quick,
        threads=args.threads,
        max_gib=args.max_gib,
        timeout=args.timeout,
        only_c=args.only_c,
        only_n=args.only_n,
        methods=args.methods,
    )
    record["load_average"]["end"] = load_average()
    record["seconds"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", {**record, **result})
    load = record["load_average"]
    (args.out / "memory.md").write_text(
        f"# {TITLE}\n\n- date: {record['date']}\n- command: `{record['command']}`\n"
        f"- load average at start {load['start']}, at end {load['end']}; "
        f"total {record['seconds']:.0f} s\n\n{text}\n"
    )
    print(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
