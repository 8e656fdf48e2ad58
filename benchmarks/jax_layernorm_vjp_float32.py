"""Check for a float32 problem of JAX's CPU backend (docs/adapters.md): batched VJPs
through a layer norm with scale and bias.

A token model (embedding, layer norm with scale and bias, two dense layers at each
position), 6 examples of 16 tokens and K = 160 cotangents per example, each at one
position: the per-example VJPs, batched by ``jax.vmap`` over the cotangents and the
examples (as a per-example Fisher computation does), are compared for the first
example with its VJPs taken one at a time, in float32 and float64. No fisherbound
code runs here; the printed numbers say whether the installed JAX has the problem.

Run:  python benchmarks/jax_layernorm_vjp_float32.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)


def model(p: dict, ids: jax.Array) -> jax.Array:
    h = jnp.take(p["emb"], ids, axis=0)
    mu, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]
    return jax.nn.relu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def main() -> None:
    rng = np.random.default_rng(0)
    vocab, d, t, n, k = 500, 16, 16, 6, 160
    params = {
        "emb": rng.standard_normal((vocab, d)),
        "g": np.ones(d),
        "b": np.zeros(d),
        "w1": rng.standard_normal((d, d)) / d**0.5,
        "b1": np.zeros(d),
        "w2": rng.standard_normal((d, 10)) / d**0.5,
        "b2": np.zeros(10),
    }
    ids = jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32)
    at = (np.arange(k) % t)[:, None] == np.arange(t)[None, :]  # cotangent k at one position
    U = rng.standard_normal((n, k, t, 10)) * at[None, :, :, None]
    for dtype in (np.float32, np.float64):
        err = _errors(params, ids, np.asarray(U), dtype)
        print(
            f"{np.dtype(dtype).name}: batched vs one at a time, largest relative "
            f"difference for cotangents 0-127: {err[:128].max():.1e}, 128-{k - 1}: "
            f"{err[128:].max():.1e}"
        )


def _errors(params: dict, ids: jax.Array, U: np.ndarray, dtype: type) -> np.ndarray:
    """Per cotangent of example 0: |batched VJP - one-at-a-time VJP|, largest, over the
    largest. Batched: per-example VJPs, vmapped over the cotangents and the examples."""
    flat, unravel = ravel_pytree({k: jnp.asarray(a, dtype) for k, a in params.items()})

    @jax.jit
    def per_example(theta: jax.Array, u: jax.Array) -> jax.Array:
        def one(xn: jax.Array, un: jax.Array) -> jax.Array:
            _, vjp = jax.vjp(lambda q: model(unravel(q), xn[None])[0], theta)
            return jax.vmap(lambda v: vjp(v)[0])(un)

        return jax.vmap(one)(ids, u)

    u = jnp.asarray(U, dtype)
    batched = np.asarray(per_example(flat, u)[0], np.float64)
    _, vjp = jax.vjp(lambda q: model(unravel(q), ids[:1])[0], flat)
    single = np.stack([np.asarray(vjp(u[0, i])[0], np.float64) for i in range(u.shape[1])])
    return np.max(np.abs(batched - single), axis=1) / np.max(np.abs(single))


if __name__ == "__main__":
    main()
