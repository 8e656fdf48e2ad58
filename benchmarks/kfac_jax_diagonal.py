"""Benchmark: kfac-jax's exact Fisher diagonal against fisherbound's, on JAX MLPs and CNNs.

For MLPs written as plain JAX functions (``h = h @ W + b``, ReLU between layers),
bench_jax_diagonal's CNN (two 3x3 convolutions with bias, ReLU and 2x2 max pooling, a
dense layer; kfac-jax's ``Conv2DDiagonal`` blocks for its convolutions) and
bench_jax_diagonal's flax.linen twins of the small MLP and the CNN, float32, on
the CPU, this script computes the exact diagonal of the Fisher (= GGN) of the
categorical negative log-likelihood summed over the batch, diag F = Σ_n diag(J_nᵀ K_n J_n),
in three ways and times them against one gradient step of the same model and batch:

- ``gradient step``: ``jax.jit(jax.grad(loss))(params)`` of the summed cross-entropy;
- ``kfac-jax fisher_exact``: ``kfac_jax.BlockDiagonalCurvature`` with every dense layer
  given a ``kfac_jax.DenseDiagonal`` block (``layer_tag_to_block_ctor={"dense": ...}``,
  layers found by kfac-jax's automatic tag registration) and
  ``estimation_mode="fisher_exact"`` (one backward pass per class, with the one-hot
  columns of the Fisher factor of the loss registered by
  ``kfac_jax.register_softmax_cross_entropy_loss``). One ``jax.jit``-compiled function
  runs ``init``, ``update_curvature_matrix_estimate(ema_old=0, ema_new=1)`` and reads
  the diagonal as ``multiply(state, ones, identity_weight=0)``;
- ``fisherbound``: ``fisher_diagonal(linearize(apply_fn, params, x))``, end to end,
  eagerly and as one ``jax.jit``-compiled function of (params, x) (as kfac-jax's).

Scaling: kfac-jax's curvature blocks divide their statistics by the ``batch_size``
passed to the update (its curvature is that of the loss averaged over the batch), so
its diagonal is diag F / N; it is multiplied by N before the comparison with
fisherbound's sum over the batch (``reduction="sum"``, the default).

Correctness: both diagonals as flat vectors in JAX's tree order (per layer ``b`` then
``w``, ``jax.flatten_util.ravel_pytree``); reported are the largest elementwise relative
difference over the nonzero entries and the largest absolute difference divided by the
largest entry.

Timing: interleaved (one repetition of each method, then the next), after warm-up
rounds (the compilations), each call ended by ``jax.block_until_ready``; medians.

Run with a virtual environment that has kfac-jax, which needs JAX 0.9.0 (kfac-jax
0.0.8 fails on JAX 0.10.2), with fisherbound installed in it from this checkout::

    python3 -m venv /tmp/kfacenv
    /tmp/kfacenv/bin/pip install "jax==0.9.0" "jaxlib==0.9.0" "kfac-jax==0.0.8" \
        dm-haiku flax array-api-compat scipy numpy
    /tmp/kfacenv/bin/pip install --no-deps -e .

and then:

    python benchmarks/kfac_jax_diagonal.py [--quick] [--reps 7] [--warmup 2]
        [--mode fisher_exact] [--out /tmp/kfac_jax_diagonal.json]

``--quick`` runs a tiny MLP with one repetition (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
from jax.flatten_util import ravel_pytree

from fisherbound.adapters.jax import linearize
from fisherbound.fisher import fisher_diagonal

MODELS = {
    "mlp": ("MLP 784-512-256-10, batch 128", (784, 512, 256, 10), 128),
    "mlp-small": ("MLP 64-256-256-10, batch 128", (64, 256, 256, 10), 128),
    "cnn": ("CNN 3x32x32, conv16-conv32-linear, batch 64", "cnn", 64),
    # bench_jax_diagonal's flax.linen twins of the small MLP and the CNN
    "flax-mlp": ("flax MLP 64-256-256-10, batch 128", "flax-mlp", 128),
    "flax-cnn": ("flax CNN 3x32x32, conv16-conv32-linear, batch 64", "flax-cnn", 64),
}
QUICK_MODELS = {"mlp-quick": ("MLP 16-32-10, batch 8 (quick)", (16, 32, 10), 8)}

GRADIENT = "gradient step"
FISHERBOUND = "fisherbound fisher_diagonal"
FISHERBOUND_JIT = "fisherbound fisher_diagonal under jax.jit"


def make_problem(widths: tuple[int, ...], n: int) -> tuple[list[dict[str, Any]], Any, Any]:
    """Parameters (W ~ N(0, 1/fan_in), b = 0), inputs ~ N(0, 1), random labels; seed 0."""
    rng = np.random.default_rng(0)
    params = []
    for a, b in zip(widths[:-1], widths[1:]):
        w = rng.standard_normal((a, b)) / np.sqrt(a)
        params.append({"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(b, jnp.float32)})
    x = jnp.asarray(rng.standard_normal((n, widths[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, widths[-1], n), jnp.int32)
    return params, x, y


def make_cnn(n: int) -> tuple[dict[str, Any], Any, Any, Callable[..., Any]]:
    """bench_jax_diagonal's CNN (its parameters and inputs, seed 0), random labels, and
    its function."""
    from bench_jax_diagonal import _jax_cnn  # the same model in both benchmarks

    rng = np.random.default_rng(0)
    model, params, x = _jax_cnn(rng, n)
    return params, x, jnp.asarray(rng.integers(0, 10, n), jnp.int32), model


def apply_fn(params: list[dict[str, Any]], h: Any) -> Any:
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def summed_cross_entropy(logits: Any, y: Any) -> Any:
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


def kfac_diagonal_fn(
    mode: str, n: int, model: Callable[..., Any]
) -> tuple[Callable[..., Any], Any]:
    """A jitted ``(params, batch) -> kfac-jax's diagonal`` (a params-shaped pytree), and
    the estimator (finalized on the first call)."""

    def kfac_loss(params: Any, batch: tuple[Any, Any]) -> Any:
        # The model function kfac-jax traces: the loss, with its softmax CE registered.
        x, y = batch
        logits = model(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return summed_cross_entropy(logits, y) / x.shape[0]

    estimator = kfac_jax.BlockDiagonalCurvature(
        func=kfac_loss,
        default_estimation_mode=mode,
        layer_tag_to_block_ctor={
            "dense": kfac_jax.DenseDiagonal,
            "conv2d": kfac_jax.Conv2DDiagonal,
        },
    )
    rng = jax.random.PRNGKey(0)  # unused by the exact modes

    @jax.jit
    def diagonal(params: list[dict[str, Any]], batch: tuple[Any, Any]) -> Any:
        func_args = (params, batch)
        state = estimator.init(rng, func_args, None, None)
        state = estimator.update_curvature_matrix_estimate(
            state,
            ema_old=0.0,
            ema_new=1.0,
            identity_weight=0.0,
            batch_size=n,
            rng=rng,
            func_args=func_args,
            estimation_mode=mode,
        )
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        return estimator.multiply(
            state,
            ones,
            identity_weight=0.0,
            exact_power=True,
            use_cached=False,
            pmap_axis_name=None,
        )

    return diagonal, estimator


def interleaved(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, one repetition of all of them after the other."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def run_model(
    label: str, widths: tuple[int, ...], n: int, *, mode: str, reps: int, warmup: int
) -> dict[str, Any]:
    model: Callable[..., Any]
    if widths == "cnn":
        params, x, y, model = make_cnn(n)
    elif widths in ("flax-mlp", "flax-cnn"):
        from bench_jax_diagonal import flax_model  # the same models in both benchmarks

        rng = np.random.default_rng(0)
        model, params, x = flax_model(widths, rng, n)
        y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    else:
        params, x, y = make_problem(widths, n)
        model = apply_fn
    grad = jax.jit(jax.grad(lambda p: summed_cross_entropy(model(p, x), y)))
    kfac_diag, estimator = kfac_diagonal_fn(mode, n, model)
    kfac_name = f"kfac-jax {mode}"

    # Correctness: kfac-jax's diagonal is diag F / N (see the module docstring).
    ours = np.asarray(fisher_diagonal(linearize(model, params, x)), np.float64)
    theirs = n * np.asarray(ravel_pytree(kfac_diag(params, (x, y)))[0], np.float64)
    blocks = sorted({type(block).__name__ for block in estimator.blocks})
    covered = sorted(i for indices in estimator.jaxpr.layer_indices for i in indices)
    assert covered == list(range(len(jax.tree_util.tree_leaves(params)))), covered
    nonzero = ours != 0
    difference = np.abs(theirs - ours)
    check = {
        "max_elementwise_relative_difference": float(
            np.max(difference[nonzero] / ours[nonzero]) if nonzero.any() else 0.0
        ),
        "max_abs_difference_over_max_entry": float(np.max(difference) / np.max(ours)),
        "zero_entries": int(np.sum(~nonzero)),
        "kfac_nonzero_where_fisherbound_zero": int(np.sum(theirs[~nonzero] != 0)),
        "scaling": f"kfac-jax diagonal multiplied by N = {n} (its blocks divide by batch_size)",
        "kfac_blocks": blocks,
    }

    jitted = jax.jit(lambda p, xb: fisher_diagonal(linearize(model, p, xb)))
    methods = {
        GRADIENT: lambda: grad(params),
        kfac_name: lambda: kfac_diag(params, (x, y)),
        FISHERBOUND: lambda: fisher_diagonal(linearize(model, params, x)),
        FISHERBOUND_JIT: lambda: jitted(params, x),
    }
    times = interleaved(methods, reps=reps, warmup=warmup)
    median_s = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "model": label,
        "widths": widths if isinstance(widths, str) else list(widths),
        "batch": n,
        "num_params": int(ours.size),
        "check": check,
        "median_s": median_s,
        "gradient_steps": {name: t / median_s[GRADIENT] for name, t in median_s.items()},
        "kfac_over_fisherbound": median_s[kfac_name] / median_s[FISHERBOUND],
        "kfac_over_fisherbound_jitted": median_s[kfac_name] / median_s[FISHERBOUND_JIT],
        "all_s": times,
    }


def markdown(result: dict[str, Any]) -> str:
    check = result["check"]
    lines = [
        f"#### {result['model']} (D = {result['num_params']:,})",
        "",
        "| method | median (ms) | gradient steps |",
        "|:--|--:|--:|",
    ]
    for name, t in result["median_s"].items():
        lines.append(f"| {name} | {1e3 * t:.2f} | {result['gradient_steps'][name]:.1f} |")
    lines += [
        "",
        f"- kfac-jax / fisherbound: {result['kfac_over_fisherbound']:.2f}x eagerly, "
        f"{result['kfac_over_fisherbound_jitted']:.2f}x under jax.jit",
        f"- max relative difference (kfac-jax x N vs fisherbound): elementwise "
        f"{check['max_elementwise_relative_difference']:.1e}, normwise "
        f"{check['max_abs_difference_over_max_entry']:.1e}; fisherbound's zero entries: "
        f"{check['zero_entries']}, of which kfac-jax nonzero: "
        f"{check['kfac_nonzero_where_fisherbound_zero']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, 1 repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 7)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2)")
    parser.add_argument(
        "--mode",
        default="fisher_exact",
        choices=["fisher_exact", "ggn_exact"],
        help="kfac-jax's exact estimation mode (the two agree for softmax cross-entropy)",
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/kfac_jax_diagonal.json"))
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")

    models = QUICK_MODELS if args.quick else MODELS
    reps = args.reps or (1 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    results = {}
    for key, (label, widths, n) in models.items():
        results[key] = run_model(label, widths, n, mode=args.mode, reps=reps, warmup=warmup)
        print(markdown(results[key]) + "\n", flush=True)

    record = {
        "benchmark": "kfac-jax exact Fisher diagonal vs fisherbound (CPU, float32)",
        "command": shlex.join([sys.executable, *sys.argv]),
        "kfac_api": (
            "kfac_jax.BlockDiagonalCurvature(func, default_estimation_mode=mode, "
            "layer_tag_to_block_ctor={'dense': kfac_jax.DenseDiagonal}); jax.jit of init, "
            "update_curvature_matrix_estimate(ema_old=0, ema_new=1, identity_weight=0, "
            "batch_size=N, estimation_mode=mode), multiply(state, ones, identity_weight=0)"
        ),
        "mode": args.mode,
        "reps": reps,
        "warmup": warmup,
        "versions": {
            name: version(name) for name in ("jax", "jaxlib", "kfac-jax", "numpy", "fisherbound")
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0]),
        },
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
