"""Benchmark: the exact Fisher diagonal with the JAX adapter, layer rules against the vmap.

diag F = Σ_n Σ_c (J_nᵀ b_nc)² on the CPU in float32, for MLPs written as plain JAX
functions (``x @ W + b``, ReLU), the torch section's CNN (``lax.conv_general_dilated``,
ReLU, 2 x 2 max pooling, a dense layer) and a token classifier (an embedding table,
a layer norm, two dense layers applied at every position: logits (N, T, C)), timed
against one gradient step of the same model and batch (``jax.jit(jax.grad)`` of the
summed cross-entropy) measured in the same run:

- ``fisher_diagonal``: ``fisher_diagonal(linearize(apply_fn, params, x))``, end to
  end (the linearization, the core columns, the squared sums: the layer rules when
  every parameter has one, which ``lin.fast_path_reasons`` reports), eagerly and as one
  ``jax.jit``-compiled function of (params, x);
- ``vmap path``: the same squared sums by the per-example vmap (the adapter's
  compiled ``lax.scan`` of per-example VJPs, what every model took before the rules);
- with torch installed (and without ``--jax-only``), the torch adapter's fast path on
  the same architecture and batch, against a torch gradient step, so the two adapters'
  costs compare in gradient steps. ``--jax-only`` leaves torch out, so that JAX has
  the cores alone (the two frameworks' thread pools share them otherwise).

With flax installed, flax.linen twins of the small MLP and the CNN (``nn.Dense``,
``nn.Conv``, ``nn.max_pool``) run too.

Timings are interleaved (one repetition of every method, then the next) after
warm-up rounds (the compilations); medians over the repetitions.

Run:  python benchmarks/bench_jax_diagonal.py [--reps 7] [--threads 2] [--quick]
      [--models mlp mlp-small ...] [--jax-only]
Writes benchmarks/results/jax_diagonal.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import installed, interleaved, machine, median, now, ratio, table, write_json

NAME = "jax_diagonal"
TITLE = "Exact Fisher diagonal with JAX (CPU, float32): layer rules, vmap, torch"

MODELS = {
    "mlp": ("MLP 784-512-256-10, batch 128", (784, 512, 256, 10), 128),
    "mlp-small": ("MLP 64-256-256-10, batch 128", (64, 256, 256, 10), 128),
    "cnn": ("CNN 3x32x32, conv16-conv32-linear, batch 64", "cnn", 64),
    "tokens": ("token classifier V=5000, d=128, T=32, 10 classes, batch 32", "tokens", 32),
    # flax.linen twins of the small MLP and the CNN (skipped without flax)
    "flax-mlp": ("flax MLP 64-256-256-10, batch 128", "flax-mlp", 128),
    "flax-cnn": ("flax CNN 3x32x32, conv16-conv32-linear, batch 64", "flax-cnn", 64),
}
#: The torch model of the same architecture.
TORCH_TWIN: dict[str, Any] = {"flax-mlp": (64, 256, 256, 10), "flax-cnn": "cnn"}
QUICK_MODELS = {"mlp": ("MLP 32-16-10, batch 8 (quick)", (32, 16, 10), 8)}


def jax_case(widths: Any, n: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fisherbound._quantities import cotangent_chunks
    from fisherbound.adapters.jax import linearize
    from fisherbound.families import Categorical
    from fisherbound.fisher import fisher_diagonal

    rng = np.random.default_rng(0)
    if widths == "cnn":  # the torch section's CNN: conv 3x3 (16, 32), ReLU, 2x2 max pool
        apply_fn, params, x = _jax_cnn(rng, n)
        y = jnp.asarray(rng.integers(0, 10, n))
    elif widths in ("flax-mlp", "flax-cnn"):
        apply_fn, params, x = flax_model(widths, rng, n)
        y = jnp.asarray(rng.integers(0, 10, n))
    elif widths == "tokens":  # embedding, layer norm, two dense layers per position
        apply_fn, params, x = _jax_tokens(rng, n)
        y = jnp.asarray(rng.integers(0, 10, (n, x.shape[1])))
    else:
        params = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            w = rng.standard_normal((a, b)) / np.sqrt(a)
            params.append({"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(b, jnp.float32)})
        x = jnp.asarray(rng.standard_normal((n, widths[0])), jnp.float32)
        y = jnp.asarray(rng.integers(0, widths[-1], n))

        def apply_fn(p: list, h: Any) -> Any:
            for i, layer in enumerate(p):
                h = h @ layer["w"] + layer["b"]
                if i < len(p) - 1:
                    h = jax.nn.relu(h)
            return h

    def loss(p: list) -> Any:
        logp = jax.nn.log_softmax(apply_fn(p, x))
        return -jnp.sum(jnp.take_along_axis(logp, y[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    lin = linearize(apply_fn, params, x)
    reasons = sorted(set(lin.fast_path_reasons.values()))
    chunk = lin.default_max_vectors
    # The exact diagonal's cotangents, as fisher_diagonal takes them: the core factor's
    # columns, one per (position, column) with positions, in chunks of `chunk`.
    cotangents = list(cotangent_chunks(lin, Categorical(), "exact", chunk))

    def vmap_path() -> Any:
        total = 0.0
        for U in cotangents:
            vectors = min(int(U.shape[1]), chunk)
            examples = max(1, chunk // vectors)
            out = lin._kernels.sum_squared(lin._theta, lin._xs, U, None, examples, vectors)
            total = total + jnp.sum(out, axis=0)
        return total

    jitted = jax.jit(lambda p, xb: fisher_diagonal(linearize(apply_fn, p, xb)))
    methods = {
        "gradient step (jax)": lambda: grad(params),
        "fisher_diagonal (jax)": lambda: fisher_diagonal(linearize(apply_fn, params, x)),
        "fisher_diagonal under jax.jit (jax)": lambda: jitted(params, x),
        "vmap path (jax)": vmap_path,
    }
    exact = fisher_diagonal(lin)
    check = float(jnp.max(jnp.abs(vmap_path() - exact)) / jnp.max(exact))
    return {
        "methods": methods,
        "reasons": reasons,
        "check": check,
        "sync": jax.block_until_ready,
        "num_params": lin.num_params,
    }


def _jax_cnn(rng: Any, n: int) -> tuple[Callable[..., Any], dict, Any]:
    import jax
    import jax.numpy as jnp

    def conv(h: Any, k: Any, b: Any) -> Any:
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=dn) + b
        h = jax.nn.relu(h)
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def apply_fn(p: dict, h: Any) -> Any:
        h = conv(conv(h, p["k1"], p["b1"]), p["k2"], p["b2"])
        return jnp.reshape(h, (h.shape[0], -1)) @ p["w"] + p["b"]

    def arr(*shape: int) -> Any:
        return jnp.asarray(
            rng.standard_normal(shape) / (shape[0] if len(shape) == 2 else 6.0), jnp.float32
        )

    params = {
        "k1": arr(3, 3, 3, 16),
        "b1": jnp.zeros(16, jnp.float32),
        "k2": arr(3, 3, 16, 32),
        "b2": jnp.zeros(32, jnp.float32),
        "w": arr(32 * 8 * 8, 10),
        "b": jnp.zeros(10, jnp.float32),
    }
    return apply_fn, params, jnp.asarray(rng.standard_normal((n, 32, 32, 3)), jnp.float32)


def flax_model(kind: str, rng: Any, n: int) -> tuple[Callable[..., Any], dict, Any]:
    """A flax.linen MLP 64-256-256-10 or CNN (the torch section's), its params, inputs."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, h: Any) -> Any:
            h = nn.relu(nn.Dense(256)(h))
            return nn.Dense(10)(nn.relu(nn.Dense(256)(h)))

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, h: Any) -> Any:
            for channels in (16, 32):
                h = nn.max_pool(nn.relu(nn.Conv(channels, (3, 3))(h)), (2, 2), (2, 2))
            return nn.Dense(10)(jnp.reshape(h, (h.shape[0], -1)))

    model = MLP() if kind == "flax-mlp" else CNN()
    shape = (n, 64) if kind == "flax-mlp" else (n, 32, 32, 3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = model.init(jax.random.key(0), x[:1])["params"]
    return lambda p, h: model.apply({"params": p}, h), params, x


def _jax_tokens(rng: Any, n: int) -> tuple[Callable[..., Any], dict, Any]:
    import jax
    import jax.numpy as jnp

    vocab, d, t = 5000, 128, 32

    def apply_fn(p: dict, ids: Any) -> Any:
        h = jnp.take(p["emb"], ids, axis=0)  # (N, T, d)
        mu, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]
        h = jax.nn.relu(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]  # (N, T, 10)

    def arr(*shape: int) -> Any:
        return jnp.asarray(rng.standard_normal(shape) / (shape[0] ** 0.5), jnp.float32)

    params = {
        "emb": jnp.asarray(rng.standard_normal((vocab, d)), jnp.float32),
        "g": jnp.ones(d, jnp.float32),
        "b": jnp.zeros(d, jnp.float32),
        "w1": arr(d, d),
        "b1": jnp.zeros(d, jnp.float32),
        "w2": arr(d, 10),
        "b2": jnp.zeros(10, jnp.float32),
    }
    return apply_fn, params, jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32)


def torch_case(widths: Any, n: int, threads: int) -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn

    from fisherbound.adapters.torch import linearize
    from fisherbound.fisher import fisher_diagonal

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    if widths == "cnn":
        layers = [
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
        ]  # fmt: skip
        x, classes = torch.randn(n, 3, 32, 32), 10
    else:
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        x, classes = torch.randn(n, widths[0]), widths[-1]
    model = nn.Sequential(*layers).eval()
    y = torch.randint(0, classes, (n,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()

    return {
        "gradient step (torch)": step,
        "fisher_diagonal (torch fast path)": lambda: fisher_diagonal(linearize(model, x)),
    }


def run(
    *,
    quick: bool = False,
    threads: int = 2,
    reps: int | None = None,
    models: list[str] | None = None,
    jax_only: bool = False,
) -> dict[str, Any]:
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
    )
    registry = QUICK_MODELS if quick else MODELS
    if models:
        unknown = sorted(set(models) - set(registry))
        if unknown:
            raise ValueError(f"--models must name some of {sorted(registry)}; got {unknown}")
        registry = {key: value for key, value in registry.items() if key in models}
    reps = reps or (2 if quick else 7)
    warmup = 1 if quick else 2
    results: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for key, (label, widths, n) in registry.items():
        if key.startswith("flax") and not installed("flax"):
            print(f"{label}: skipped, flax is not installed")
            continue
        case = jax_case(widths, n)
        methods = dict(case["methods"])
        # no torch twin of the token classifier; --jax-only: JAX alone in the process
        with_torch = installed("torch") and widths != "tokens" and not jax_only
        if with_torch:
            methods.update(torch_case(TORCH_TWIN.get(key, widths), n, threads))
        sync = case["sync"]
        times = interleaved(
            {name: (lambda fn=fn, sync=sync: sync(fn())) for name, fn in methods.items()},
            reps=reps,
            warmup=warmup,
        )
        med = {name: median(ts) for name, ts in times.items()}
        jax_step = med["gradient step (jax)"]
        steps = {name: ratio(t, jax_step) for name, t in med.items() if "(jax)" in name}
        if with_torch:
            torch_step = med["gradient step (torch)"]
            steps["gradient step (torch)"] = 1.0
            steps["fisher_diagonal (torch fast path)"] = ratio(
                med["fisher_diagonal (torch fast path)"], torch_step
            )
        results[key] = {
            "model": label,
            "num_params": case["num_params"],
            "median_s": med,
            "all_s": times,
            "gradient_steps": steps,
            "fast_path_reasons": case["reasons"],
            "max_relative_difference vmap vs fisher_diagonal": case["check"],
        }
        ratios[f"{key}: fisher_diagonal (jax) / gradient step (jax)"] = steps[
            "fisher_diagonal (jax)"
        ]
        ratios[f"{key}: vmap path (jax) / fisher_diagonal (jax)"] = ratio(
            med["vmap path (jax)"], med["fisher_diagonal (jax)"]
        )
        if with_torch:
            ratios[f"{key}: jax / torch, in gradient steps"] = ratio(
                steps["fisher_diagonal (jax)"], steps["fisher_diagonal (torch fast path)"]
            )
    import jax

    return {
        "threads": threads,
        "reps": reps,
        "warmup": warmup,
        "jax": jax.__version__,
        "models": results,
        "ratios": ratios,
    }


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for r in result["models"].values():
        rows = [
            [name, f"{1e3 * t:.2f}", f"{r['gradient_steps'].get(name, float('nan')):.1f}"]
            for name, t in r["median_s"].items()
        ]
        parts.append(
            f"#### {r['model']} (D = {r['num_params']:,})\n\n"
            + table(["method", "median (ms)", "gradient steps of its framework"], rows, "lrr")
            + f"\n\n- layer rules: {', '.join(r['fast_path_reasons'])}; max relative "
            f"difference, vmap path vs fisher_diagonal: "
            f"{r['max_relative_difference vmap vs fisher_diagonal']:.1e}"
        )
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; XLA's eigen pool")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 repetitions")
    parser.add_argument(
        "--models", nargs="+", default=None, help=f"a subset of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--jax-only", action="store_true", help="leave torch out (JAX alone in the process)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "jax_diagonal.json"
    )
    args = parser.parse_args()
    result = run(
        quick=args.quick,
        threads=args.threads,
        reps=args.reps,
        models=args.models,
        jax_only=args.jax_only,
    )
    print(markdown(result))
    record = {"date": now(), "command": "python " + " ".join(sys.argv), "machine": machine()}
    write_json(args.out, {**record, **result})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
