"""Benchmark: the Fisher diagonal of a language model, detach-and-mix against per-token Monte Carlo.

A tiny GPT-2 (``transformers.GPT2LMHeadModel`` built from a config, float32, eager
attention, right padding) with logits (N, T, V); the Fisher counts the positions the
causal LM loss counts (position t labelled with token t + 1, padding and the last
position excluded), summed over them: F = Σ_x Σ_t J_xtᵀ (diag p − p pᵀ) J_xt.

Methods, all unbiased for diag F, timed in the same run, interleaved, as multiples of
one gradient step (forward and backward of the model's own mean loss,
``model(**batch, labels=...).loss.backward()``):

- detach-and-mix (``linearize(..., output="logits", mask=...)`` and
  ``detach_and_mix(lin, num_probes=M)``): one forward pass and one batched backward
  pass of M probes, g_m = Σ_xt J_xtᵀ B_xt ξ_xtm, estimate (1/M) Σ_m g_m²;
  ``per_example=True``: Σ_x (J_xᵀ B_x ξ_xm)², M per-example backward passes per sequence;
- per-token Monte Carlo as EWC and model-merging code writes it, plainly in torch: for
  each of k samples, a forward pass, one label per counted token drawn from the model
  (``torch.multinomial`` of the softmax), the summed NLL backpropagated, and the batch
  gradient squared ("batch"); or the same per sequence, one sequence at a time, each
  sequence's gradient squared ("per sequence", N forward and backward passes per sample);
- the exact diagonal (``fisher_diagonal``): one per-example backward pass per counted
  position and class, N·T·V of them, so only on a smaller setting (the "accuracy"
  model below), where the estimators' relative errors ‖est − F‖₂ / ‖F‖₂ are measured
  (root mean square over independent runs) and compared at equal wall time: the
  Monte-Carlo error at the time of each detach-and-mix point is interpolated on a
  log-log scale between Monte-Carlo points (beyond them, extrapolated as time^(−1/2)).

Run:  python benchmarks/bench_language_model.py [--quick] [--threads 2] [--reps 5]
          [--accuracy-reps 20]
Writes benchmarks/results/language_model.json. Needs ``transformers`` (the ``hf``
extra); without it the section is reported as skipped.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import timed

NAME = "language_model"
TITLE = (
    "Language model: detach-and-mix against per-token Monte Carlo (tiny GPT-2, torch CPU, float32)"
)

# name -> (description, vocab, n_embd, n_layer, n_head, N, T)
TIMING = {
    "v1000": ("GPT-2 4 layers, width 128, V = 1000, N = 8, T = 64", 1000, 128, 4, 4, 8, 64),
    "v50257": ("GPT-2 4 layers, width 128, V = 50,257, N = 4, T = 64", 50257, 128, 4, 4, 4, 64),
}
ACCURACY = ("GPT-2 2 layers, width 64, V = 1000, N = 2, T = 8", 1000, 64, 2, 4, 2, 8)
QUICK_TIMING = {
    "v100": ("GPT-2 1 layer, width 16, V = 100, N = 2, T = 8 (quick)", 100, 16, 1, 2, 2, 8),
    "v1000": ("GPT-2 1 layer, width 16, V = 1000, N = 2, T = 8 (quick)", 1000, 16, 1, 2, 2, 8),
}
QUICK_ACCURACY = ("GPT-2 1 layer, width 16, V = 100, N = 2, T = 4 (quick)", 100, 16, 1, 2, 2, 4)

PROBES = [1, 4, 16, 64]
QUICK_PROBES = [1, 4]
TIMING_PROBES = 8


# --------------------------------------------------------------------------- #
# model and data


def make_model(vocab: int, width: int, layers: int, heads: int, seed: int = 0) -> Any:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # tiny configs trip config advice
    options: dict[str, Any] = {
        "vocab_size": vocab,
        "n_positions": 64,
        "n_embd": width,
        "n_layer": layers,
        "n_head": heads,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "attn_implementation": "eager",  # vmapped per-example products (docs/quickstart.md)
    }
    config = transformers.GPT2Config(**options)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def make_batch(vocab: int, n: int, t: int, seed: int = 1) -> dict[str, Any]:
    """Token ids with the last sequence padded over its last quarter, and the labels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=gen)
    attention = torch.ones(n, t, dtype=torch.long)
    attention[-1, t - max(1, t // 4) :] = 0
    ids = ids.masked_fill(attention == 0, 0)
    following = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    labels = torch.nn.functional.pad(following, (0, 1), value=-100)  # label of t: token t+1
    return {
        "batch": {"input_ids": ids, "attention_mask": attention},
        "counted": labels != -100,
        "hf_labels": ids.masked_fill(attention == 0, -100),  # transformers shifts them itself
    }


def num_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- #
# methods


def gradient_step(model: Any, data: dict[str, Any]) -> None:
    model.zero_grad(set_to_none=True)
    model(**data["batch"], labels=data["hf_labels"]).loss.backward()


def detach_and_mix_diagonal(
    model: Any, data: dict[str, Any], probes: int, seed: int, per_example: bool = False
) -> Any:
    from fisherbound.adapters.torch import linearize
    from fisherbound.estimators import detach_and_mix

    lin = linearize(model, data["batch"], output="logits", mask=data["counted"])
    return detach_and_mix(lin, num_probes=probes, rng=seed, per_example=per_example).value


def _sampled_nll(model: Any, batch: dict[str, Any], counted: Any, gen: Any) -> Any:
    """Σ over counted tokens of −log p(y_t), y_t drawn from the model at every token."""
    import torch
    from torch.nn import functional as F

    logits = model(**batch).logits
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        y = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen)
        y = y.reshape(probs.shape[:-1])
    return F.cross_entropy(logits[counted], y[counted], reduction="sum")


def monte_carlo_batch(model: Any, data: dict[str, Any], samples: int, seed: int) -> Any:
    """(1/k) Σ_j g_j², g_j the gradient of the batch's NLL at sampled labels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        nll = _sampled_nll(model, data["batch"], data["counted"], gen)
        for acc, g in zip(total, torch.autograd.grad(nll, params)):
            acc += g * g
    return torch.cat([t.reshape(-1) for t in total]) / samples


def monte_carlo_per_sequence(model: Any, data: dict[str, Any], samples: int, seed: int) -> Any:
    """(1/k) Σ_j Σ_x g_xj², one sequence at a time (batch size 1, as EWC code does)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    n = int(data["counted"].shape[0])
    for _ in range(samples):
        for i in range(n):
            one = {k: v[i : i + 1] for k, v in data["batch"].items()}
            nll = _sampled_nll(model, one, data["counted"][i : i + 1], gen)
            for acc, g in zip(total, torch.autograd.grad(nll, params)):
                acc += g * g
    return torch.cat([t.reshape(-1) for t in total]) / samples


def exact_diagonal(model: Any, data: dict[str, Any]) -> Any:
    from fisherbound.adapters.torch import linearize
    from fisherbound.fisher import fisher_diagonal

    lin = linearize(model, data["batch"], output="logits", mask=data["counted"])
    return fisher_diagonal(lin, max_cotangents=10**9, max_vectors=512)


# --------------------------------------------------------------------------- #
# measurements


def bench_timing(spec: tuple, reps: int, warmup: int, probes: int) -> dict[str, Any]:
    label, vocab, width, layers, heads, n, t = spec
    model = make_model(vocab, width, layers, heads)
    data = make_batch(vocab, n, t)
    methods: dict[str, Callable[[int], Any]] = {
        "gradient step": lambda s: gradient_step(model, data),
        "detach-and-mix, 1 probe": lambda s: detach_and_mix_diagonal(model, data, 1, s),
        f"detach-and-mix, {probes} probes": lambda s: detach_and_mix_diagonal(
            model, data, probes, s
        ),
        "MC per token (batch), 1 sample": lambda s: monte_carlo_batch(model, data, 1, s),
        f"MC per token (batch), {probes} samples": lambda s: monte_carlo_batch(
            model, data, probes, s
        ),
        "MC per token (per sequence), 1 sample": lambda s: monte_carlo_per_sequence(
            model, data, 1, s
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(warmup + reps):
        for name, fn in methods.items():
            elapsed, _ = timed(functools.partial(fn, rep))
            if rep >= warmup:
                times[name].append(elapsed)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    return {
        "model": label,
        "num_params": num_params(model),
        "counted_tokens": int(data["counted"].sum()),
        "median_s": med,
        "min_s": low,
        "all_s": times,
        "steps": {name: med[name] / med["gradient step"] for name in med},
        "steps_min": {name: low[name] / low["gradient step"] for name in low},
    }


def relative_error(estimate: Any, exact: Any) -> float:
    return float((estimate - exact).norm() / exact.norm())


def error_at_time(points: list[tuple[float, float]], at: float) -> float:
    """The error of a method at time ``at``, log-log interpolated between its points.

    Beyond its fastest / slowest point, the error is extrapolated as time^(−1/2),
    the rate of an average of independent probes.
    """
    pts = sorted(points)
    if at <= pts[0][0]:
        return pts[0][1] * math.sqrt(pts[0][0] / at)
    if at >= pts[-1][0]:
        return pts[-1][1] * math.sqrt(pts[-1][0] / at)
    for (t0, e0), (t1, e1) in zip(pts, pts[1:]):
        if t0 <= at <= t1:
            w = (math.log(at) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp((1 - w) * math.log(e0) + w * math.log(e1))
    raise AssertionError("unreachable")


def bench_accuracy(spec: tuple, reps: int, counts: list[int]) -> dict[str, Any]:
    label, vocab, width, layers, heads, n, t = spec
    model = make_model(vocab, width, layers, heads)
    data = make_batch(vocab, n, t)
    gradient_step(model, data)  # warm-up
    step_times = [timed(lambda: gradient_step(model, data))[0] for _ in range(max(3, reps))]
    exact_s, exact = timed(lambda: exact_diagonal(model, data))
    methods: dict[str, Callable[[int, int], Any]] = {
        "detach-and-mix": lambda k, s: detach_and_mix_diagonal(model, data, k, s),
        "detach-and-mix, per_example": lambda k, s: detach_and_mix_diagonal(
            model, data, k, s, per_example=True
        ),
        "MC per token (batch)": lambda k, s: monte_carlo_batch(model, data, k, s),
        "MC per token (per sequence)": lambda k, s: monte_carlo_per_sequence(model, data, k, s),
    }
    for fn in methods.values():  # warm-up
        fn(1, 10**6)
    times: dict[str, dict[int, list[float]]] = {m: {k: [] for k in counts} for m in methods}
    errors: dict[str, dict[int, list[float]]] = {m: {k: [] for k in counts} for m in methods}
    for rep in range(reps):  # interleaved: every method and count, then the next seed
        for k in counts:
            for name, fn in methods.items():
                elapsed, est = timed(functools.partial(fn, k, rep))
                times[name][k].append(elapsed)
                errors[name][k].append(relative_error(est, exact))
    step = statistics.median(step_times)
    rows: list[dict[str, Any]] = []
    for name in methods:
        for k in counts:
            rms = math.sqrt(statistics.fmean(e * e for e in errors[name][k]))
            rows.append(
                {
                    "method": name,
                    "count": k,
                    "seconds": statistics.median(times[name][k]),
                    "steps": statistics.median(times[name][k]) / step,
                    "relative_error": rms,
                }
            )
    # Equal wall time: each detach-and-mix point against the Monte-Carlo curve of its kind.
    pairs = {
        "detach-and-mix": "MC per token (batch)",
        "detach-and-mix, per_example": "MC per token (per sequence)",
    }
    for row in rows:
        if row["method"] in pairs:
            mc = [
                (r["seconds"], r["relative_error"])
                for r in rows
                if r["method"] == pairs[row["method"]]
            ]
            other = error_at_time(mc, row["seconds"])
            row["baseline"] = pairs[row["method"]]
            row["baseline_error_at_same_time"] = other
            row["error_ratio"] = row["relative_error"] / other
    return {
        "model": label,
        "num_params": num_params(model),
        "counted_tokens": int(data["counted"].sum()),
        "per_example_backward_passes_of_exact": int(data["counted"].sum()) * vocab,
        "gradient_step_s": step,
        "exact_s": exact_s,
        "exact_steps": exact_s / step,
        "reps": reps,
        "rows": rows,
    }


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    reps: int | None = None,
    warmup: int | None = None,
    accuracy_reps: int | None = None,
) -> dict[str, Any]:
    if importlib.util.find_spec("transformers") is None:
        return {
            "skipped": "transformers is not installed (pip install -e '.[hf]')",
            "ratios": {},
        }
    import torch

    torch.set_num_threads(threads)
    reps = reps or (2 if quick else 5)
    warmup = warmup if warmup is not None else 1
    accuracy_reps = accuracy_reps or (2 if quick else 20)
    probes = 2 if quick else TIMING_PROBES
    timing = {
        key: bench_timing(spec, reps, warmup, probes)
        for key, spec in (QUICK_TIMING if quick else TIMING).items()
    }
    accuracy = bench_accuracy(
        QUICK_ACCURACY if quick else ACCURACY, accuracy_reps, QUICK_PROBES if quick else PROBES
    )
    ratios: dict[str, float] = {}
    for key, r in timing.items():
        for name, steps in r["steps"].items():
            if name != "gradient step":
                ratios[f"{key}: {name} / gradient step"] = steps
    ratios["accuracy: exact diagonal / gradient step"] = accuracy["exact_steps"]
    for row in accuracy["rows"]:
        if "error_ratio" in row:
            ratios[
                f"accuracy: {row['method']} ({row['count']}) error / {row['baseline']} "
                "error at the same time"
            ] = row["error_ratio"]
    return {
        "threads": threads,
        "dtype": "float32",
        "device": "cpu",
        "reps": reps,
        "warmup": warmup,
        "transformers": importlib.metadata.version("transformers"),
        "timing": timing,
        "accuracy": accuracy,
        "ratios": ratios,
    }


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    from _common import fmt, table

    timing = result["timing"]
    names = list(next(iter(timing.values()))["steps"])
    rows = []
    for r in timing.values():
        cells = [fmt(r["median_s"]["gradient step"] * 1e3, ".1f")]
        cells += [
            f"{fmt(r['steps'][name], '.2f')} ({fmt(r['steps_min'][name], '.2f')})"
            for name in names[1:]
        ]
        rows.append([f"{r['model']} (D = {r['num_params']:,})", *cells])
    headers = ["model", "gradient step (ms)", *(f"{name} (× step)" for name in names[1:])]
    parts = [
        "Cost in gradient steps: median of "
        f"{result['reps']} interleaved repetitions (in parentheses: the ratio of the "
        f"minima, less affected by other load), torch {result['threads']} threads:",
        "",
        table(headers, rows),
    ]
    acc = result["accuracy"]
    parts += [
        "",
        f"Error of the diagonal against the exact one, {acc['model']} "
        f"(D = {acc['num_params']:,}, {acc['counted_tokens']} counted tokens): the exact "
        f"diagonal took {acc['exact_s']:.1f} s = {acc['exact_steps']:.0f} gradient steps "
        f"({acc['per_example_backward_passes_of_exact']:,} per-example backward passes). "
        f"Relative error ‖est − F‖₂ / ‖F‖₂, root mean square over {acc['reps']} runs; "
        "the last two columns: the Monte-Carlo error of the same kind (batch or per "
        "sequence) at the same wall time, interpolated, and the ratio (< 1: "
        "detach-and-mix is more accurate).",
        "",
    ]
    arows = []
    for row in acc["rows"]:
        arows.append(
            [
                row["method"],
                row["count"],
                fmt(row["steps"], ".2f"),
                fmt(row["relative_error"], ".3f"),
                fmt(row.get("baseline_error_at_same_time"), ".3f"),
                fmt(row.get("error_ratio"), ".2f"),
            ]
        )
    parts.append(
        table(
            [
                "method",
                "probes / samples",
                "time (× step)",
                "relative error",
                "MC error at same time",
                "ratio",
            ],
            arows,
            align="lrrrrr",
        )
    )
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds")
    parser.add_argument(
        "--accuracy-reps", type=int, default=None, help="independent runs for the errors"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 repetitions")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "language_model.json",
        help="where to write the JSON results",
    )
    args = parser.parse_args()
    from _common import machine, now, write_json

    result = run(
        quick=args.quick,
        threads=args.threads,
        reps=args.reps,
        warmup=args.warmup,
        accuracy_reps=args.accuracy_reps,
    )
    print(markdown(result))
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    write_json(args.out, {**record, **result})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
