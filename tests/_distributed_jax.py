"""Worker of tests/test_distributed.py: 2 CPU devices under jax.shard_map.

``python tests/_distributed_jax.py OUT`` sets ``XLA_FLAGS`` for two host devices
(it must come before JAX starts), runs fisherbound inside ``jax.shard_map`` with
``process_group="data"`` (the mesh axis; reductions are ``jax.lax.psum``) and on
one device over the union of the data, and with the data split over the devices
by a ``NamedSharding`` (eager and jitted), and saves all to OUT/jax.npz.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

N, IN, HIDDEN, C = 24, 5, 6, 3
PROBES = 64


def apply(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def setup() -> tuple[dict, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.standard_normal((IN, HIDDEN))),
        "b1": jnp.asarray(rng.standard_normal(HIDDEN)),
        "w2": jnp.asarray(rng.standard_normal((HIDDEN, C))),
    }
    x = jnp.asarray(rng.standard_normal((N, IN)))
    y = jnp.asarray(rng.integers(0, C, size=N))
    return params, x, y


def compute(params: dict, x: jax.Array, y: jax.Array, group: str | None) -> dict[str, jax.Array]:
    from fisherbound.adapters.jax import linearize, loss_function
    from fisherbound.estimators import detach_and_mix, empirical, monte_carlo
    from fisherbound.fisher import fisher_diagonal, fisher_operator, fisher_trace
    from fisherbound.landscape import hessian_operator, surface

    pg = {"process_group": group}
    lin = linearize(apply, params, x)
    loss = loss_function(apply, params, x, y)
    d = lin.num_params
    v = jnp.asarray(np.random.default_rng(3).standard_normal((d, 2)))
    dirs = jnp.asarray(np.random.default_rng(4).standard_normal((2, d)))
    out = {
        "diagonal": fisher_diagonal(lin, progress=False, **pg),
        "diagonal_mean": fisher_diagonal(lin, reduction="mean", progress=False, **pg),
        "trace": fisher_trace(lin, progress=False, **pg),
        "upper": fisher_diagonal(lin, kernel="upper", progress=False, **pg),
        "matmat": fisher_operator(lin, **pg).matmat(v),
        "emp": empirical(lin, y, progress=False, **pg).value,
        "surface": surface(loss, dirs, num_points=3, progress=False, **pg).values,
        "hvp": hessian_operator(loss, **pg).matmat(v),
    }
    est = detach_and_mix(lin, num_probes=PROBES, rng=7, progress=False, **pg)
    out["dm"], out["dm_se"] = est.value, est.std_error
    est = monte_carlo(lin, num_samples=PROBES, rng=7, progress=False, **pg)
    out["mc"], out["mc_se"] = est.value, est.std_error
    return out


def probes_per_device(mesh: Mesh) -> np.ndarray:
    """Each device's probes from one seed under shard_map, stacked (2, 3, 4)."""
    from fisherbound._lib import probes
    from fisherbound._lib._collective import collective

    def draw(x: jax.Array) -> jax.Array:
        gen = collective("data").generator(np.random.default_rng(0))
        p = probes(gen, (3, 4), distribution="gaussian", xp=jnp, dtype=x.dtype, device=None)
        return p[None]

    return np.asarray(
        jax.shard_map(draw, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(jnp.zeros(2))
    )


def main(out: str) -> None:
    assert len(jax.devices()) == 2, jax.devices()
    params, x, y = setup()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.shard_map(
        lambda xs, ys: compute(params, xs, ys, "data"),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )(x, y)
    single = compute(params, x, y, None)
    arrays = {f"sharded_{k}": np.asarray(v) for k, v in sharded.items()}
    arrays |= {f"single_{k}": np.asarray(v) for k, v in single.items()}
    # jit-style sharding: inputs and labels split over the devices by a NamedSharding,
    # eager and under jax.jit, give the one-device numbers (the same host probes too).
    from jax.sharding import NamedSharding

    from fisherbound.adapters.jax import linearize
    from fisherbound.dimension import top_eigenpairs

    split = NamedSharding(mesh, P("data"))
    xn, yn = jax.device_put(x, split), jax.device_put(y, split)
    named = compute(params, xn, yn, None)
    jitted = jax.jit(lambda xs, ys: compute(params, xs, ys, None))(xn, yn)
    arrays |= {f"named_{k}": np.asarray(v) for k, v in named.items()}
    arrays |= {f"jitnamed_{k}": np.asarray(v) for k, v in jitted.items()}
    arrays["named_top"] = np.asarray(top_eigenpairs(linearize(apply, params, xn), k=2, rng=0)[0])
    arrays["single_top"] = np.asarray(top_eigenpairs(linearize(apply, params, x), k=2, rng=0)[0])
    arrays["probes"] = probes_per_device(mesh)
    arrays["host_probes"] = np.random.default_rng(0).standard_normal((2, 3, 4))
    # Outside shard_map an axis name is a clear error.
    from fisherbound.fisher import fisher_diagonal

    try:
        fisher_diagonal(linearize(apply, params, x), process_group="data", progress=False)
    except ValueError as err:
        arrays["unbound_error"] = np.asarray(str(err))

    # Host-side Lanczos refuses traced code with a clear error.
    def lanczos(xs: jax.Array) -> jax.Array:
        return top_eigenpairs(linearize(apply, params, xs), k=1, rng=0, process_group="data")[0]

    try:
        jax.shard_map(lanczos, mesh=mesh, in_specs=P("data"), out_specs=P())(x)
    except ValueError as err:
        arrays["lanczos_error"] = np.asarray(str(err))
    np.savez(os.path.join(out, "jax.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
