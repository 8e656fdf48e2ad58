"""Run every benchmark and write results.json (every number) and results.md (the tables).

    python3 benchmarks/run.py [--quick] [--out DIR] [--threads N] [--only NAME ...]

Sections, in order: eigvalsh, exact_diagonal, estimators, spectrum, dimension, eigsh,
landscape, peers, finite_checks, gpu_core_space, gpu_torch, language_model, memory (``--list``
prints them).
Each is the ``run`` function of one script in this folder (each script also runs on its
own). A
section that fails is recorded as failed, with its traceback, and the command exits
with status 1 after the others ran. The GPU sections are reported as skipped, with
the reason, when no GPU back end is usable, and language_model when transformers is
not installed. Speed is reported as ratios against a baseline measured in the same
run: on a shared machine only the ratios mean anything.

``--quick`` uses tiny models and few repetitions (a smoke run, about a minute on
2 cores; its numbers are not benchmarks). The default output folder is
benchmarks/results/ (not versioned).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling scripts import each other by name
    sys.path.insert(0, str(HERE))

# Before numpy and torch start their thread pools: spinning OpenMP threads fight
# other processes on a shared machine and make every timing erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import RESULTS, load_average, machine, now, write_json  # noqa: E402

MODULES = [
    "bench_eigvalsh",
    "bench_exact_diagonal",
    "bench_jax_diagonal",
    "bench_estimators",
    "bench_spectrum",
    "bench_dimension",
    "bench_eigsh",
    "bench_landscape",
    "bench_peers",
    "bench_finite",
    "bench_gpu",
    "bench_language_model",
    "bench_memory",
]

Section = tuple[str, str, Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]


def sections() -> list[Section]:
    import importlib

    out: list[Section] = []
    for name in MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "SECTIONS"):  # one script, several sections
            out += module.SECTIONS
        else:
            out.append((module.NAME, module.TITLE, module.run, module.markdown))
    return out


def section_names() -> list[str]:
    return [
        "eigvalsh",
        "exact_diagonal",
        "jax_diagonal",
        "estimators",
        "spectrum",
        "dimension",
        "eigsh",
        "landscape",
        "peers",
        "finite_checks",
        "gpu_core_space",
        "gpu_torch",
        "language_model",
        "memory",
    ]


def markdown(record: dict[str, Any], titles: dict[str, str], tables: dict[str, str]) -> str:
    m = record["machine"]
    peers = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["peers"].items())
    load = record["load_average"]
    lines = [
        "# fisherbound benchmarks",
        "",
        f"- date: {record['date']}",
        f"- command: `{record['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} logical cores, "
        + (f"{m['memory_gib']:.0f} GiB, " if m["memory_gib"] else "")
        + f"{m['platform']}",
        f"- GPU: {m['gpu'] or 'none'}",
        f"- versions: Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
        f"jax {m['jax'] or 'not installed'}, cupy {m['cupy'] or 'not installed'}",
        f"- peers: {peers}",
        f"- torch threads: {record['threads']}; quick: {record['quick']}; "
        f"total {record['seconds']:.0f} s",
        "- load average (1, 5, 15 min) at start "
        f"{_load(load['start'])}, at end {_load(load['end'])}. Speed is given as ratios "
        "against a baseline timed in the same run, interleaved; on a loaded machine only "
        "the ratios mean anything."
        + (
            " This was a --quick smoke run: tiny models, its numbers are no benchmark."
            if record["quick"]
            else ""
        ),
        "",
    ]
    for name, sec in record["sections"].items():
        lines += [f"## {titles[name]}", ""]
        if sec["status"] in ("measured", "skipped"):
            lines += [tables[name], ""]
        else:
            lines += [f"failed: {sec['error']}", ""]
        lines += [f"({sec['seconds']:.1f} s)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _load(values: list[float] | None) -> str:
    return "n/a" if values is None else ", ".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=section_names(), help="run these sections"
    )
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(section_names()))
        return 0
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer; got {args.threads}.")

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    record: dict[str, Any] = {
        "date": now(),
        "command": " ".join(
            ["python3", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "quick": args.quick,
        "threads": args.threads,
        "machine": machine(),
        "load_average": {"start": load_average()},
        "sections": {},
    }
    titles, tables = {}, {}
    failed = False
    available = sections()
    if [s[0] for s in available] != section_names():
        msg = f"section_names() is out of date: the scripts define {[s[0] for s in available]}."
        raise RuntimeError(msg)
    for name, title, run, md in available:
        if args.only and name not in args.only:
            continue
        titles[name] = title
        print(f"[{name}] {title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = run(quick=args.quick, threads=args.threads)
            status = "skipped" if "skipped" in result else "measured"
            sec: dict[str, Any] = {"title": title, "status": status}
            if status == "skipped":
                sec["reason"] = result["skipped"]
            sec["result"] = result
            tables[name] = md(result)
        except Exception as exc:  # record it, run the other sections, exit 1 at the end
            failed = True
            sec = {
                "title": title,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(sec["traceback"], file=sys.stderr, flush=True)
        sec["seconds"] = time.perf_counter() - t0
        record["sections"][name] = sec
        print(f"[{name}] {sec['status']} in {sec['seconds']:.1f} s", flush=True)
    record["load_average"]["end"] = load_average()
    record["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", record)
    (args.out / "results.md").write_text(markdown(record, titles, tables))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
