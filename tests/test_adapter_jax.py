"""The JAX adapter: exact products of any apply_fn(params, x) with pytree params.

Two float64 models written as pure functions: a 2-hidden-layer tanh MLP whose
params are a list of dicts, and a residual block with hand-written layer
normalisation whose params are nested flax-style dicts. Every product is checked
against finite differences, brute-force Jacobians (jax.jacrev) and each other;
linearizations are built once per module (compilation costs seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _assertions import assert_close
from _models import jax_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from fisherbound.adapters.jax import JaxLinearization, linearizations, linearize
from fisherbound.linearization import Linearization

N, D_IN, HIDDEN, C = 5, 4, 7, 3


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def mlp_apply(params: list[dict[str, Any]], x: Any) -> Any:
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def mlp_params(rng: np.random.Generator, dtype: Any = np.float64) -> list[dict[str, Any]]:
    sizes = [D_IN, HIDDEN, HIDDEN, C]
    return [
        {
            "w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), dtype=dtype),
            "b": jnp.asarray(0.3 * rng.normal(size=(b,)), dtype=dtype),
        }
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def layer_norm(h: Any, p: dict[str, Any]) -> Any:
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mean) ** 2, axis=-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def residual_apply(params: dict[str, Any], x: Any) -> Any:
    h = x @ params["embed"]["kernel"] + params["embed"]["bias"]
    block = params["block"]
    h = h + jnp.tanh(layer_norm(h, block["norm"]) @ block["dense"]["kernel"])
    h = layer_norm(h, params["final_norm"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def residual_params(rng: np.random.Generator) -> dict[str, Any]:
    def dense(a: int, b: int, bias: bool = True) -> dict[str, Any]:
        out = {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a))}
        if bias:
            out["bias"] = jnp.asarray(0.3 * rng.normal(size=(b,)))
        return out

    def norm(d: int) -> dict[str, Any]:
        return {
            "scale": jnp.asarray(1.0 + 0.2 * rng.normal(size=(d,))),
            "bias": jnp.asarray(0.2 * rng.normal(size=(d,))),
        }

    return {
        "embed": dense(D_IN, HIDDEN),
        "block": {"norm": norm(HIDDEN), "dense": dense(HIDDEN, HIDDEN, bias=False)},
        "final_norm": norm(HIDDEN),
        "head": dense(HIDDEN, C),
    }


@dataclass
class Case:
    name: str
    apply_fn: Callable[..., Any]
    params: Any
    x: Any
    lin: JaxLinearization
    jacobian: np.ndarray  # brute force (N, C, D), jax.jacrev of the flat function

    def logits_at(self, theta: Any) -> np.ndarray:
        return np.asarray(self.apply_fn(self.lin.unravel(theta), self.x))


def _make_case(name: str) -> Case:
    rng = np.random.default_rng(0 if name == "mlp" else 1)
    if name == "mlp":
        apply_fn, params = mlp_apply, mlp_params(rng)
    else:
        apply_fn, params = residual_apply, residual_params(rng)
    x = jnp.asarray(rng.normal(size=(N, D_IN)))
    lin = linearize(apply_fn, params, x)
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda t: apply_fn(unravel(t), x))(flat)
    return Case(name, apply_fn, params, x, lin, np.asarray(jac))


@pytest.fixture(scope="module", params=["mlp", "residual"])
def case(request: pytest.FixtureRequest) -> Case:
    return _make_case(request.param)


@pytest.fixture(scope="module")
def mlp_case() -> Case:
    return _make_case("mlp")


def rand(rng: np.random.Generator, *shape: int) -> Any:
    return jnp.asarray(rng.normal(size=shape))


# ----------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------


def test_protocol_namespace_dtype_device(case: Case) -> None:
    lin = case.lin
    assert isinstance(lin, Linearization)
    assert lin.xp is jnp
    assert lin.logits.shape == (N, C)
    assert lin.dtype == jnp.float64
    assert lin.device == jax.devices("cpu")[0]
    assert_close(lin.logits, case.apply_fn(case.params, case.x), rtol=1e-7, atol=1e-13)
    out = lin.vjp(rand(np.random.default_rng(2), N, C))
    assert isinstance(out, jax.Array)
    assert out.dtype == jnp.float64


def test_jvp_matches_central_differences(case: Case) -> None:
    lin = case.lin
    rng = np.random.default_rng(3)
    theta = lin.flat_params
    for _ in range(3):
        v = rand(rng, lin.num_params)
        v = v / jnp.linalg.vector_norm(v)
        eps = 1e-4
        fd = (case.logits_at(theta + eps * v) - case.logits_at(theta - eps * v)) / (2 * eps)
        # Central differences err by eps² |z'''| / 6 (|z'''| = O(1) here for a unit v)
        # plus rounding 1e-16 |z| / eps: 1e-7 bounds both with room to spare.
        assert_close(lin.jvp(v), fd, rtol=0, atol=1e-7, like="jax")


def test_adjointness(case: Case) -> None:
    lin = case.lin
    rng = np.random.default_rng(4)
    for _ in range(3):
        u, v = rand(rng, N, C), rand(rng, lin.num_params)
        lhs = float(jnp.sum(u * lin.jvp(v)))
        rhs = float(jnp.sum(lin.vjp(u) * v))
        scale = float(jnp.linalg.vector_norm(u) * jnp.linalg.vector_norm(lin.vjp(u)))
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, scale)


def test_dense_jacobian_from_jvps_equals_from_vjps_and_brute_force(case: Case) -> None:
    lin = case.lin
    d = lin.num_params
    eye_d = jnp.eye(d, dtype=jnp.float64)
    eye_nc = jnp.eye(N * C, dtype=jnp.float64)
    from_jvp = np.stack([np.asarray(lin.jvp(eye_d[i])) for i in range(d)], axis=-1)
    from_vjp = np.stack(
        [np.asarray(lin.vjp(jnp.reshape(eye_nc[r], (N, C)))) for r in range(N * C)], axis=0
    ).reshape(N, C, d)
    np.testing.assert_allclose(from_jvp, from_vjp, atol=1e-12, rtol=0)
    np.testing.assert_allclose(from_jvp, case.jacobian, atol=1e-12, rtol=0)


def test_batched_products_equal_loops(case: Case) -> None:
    lin = case.lin
    rng = np.random.default_rng(5)
    V, U = rand(rng, 4, lin.num_params), rand(rng, 4, N, C)
    jb, vb = np.asarray(lin.jvp_batch(V)), np.asarray(lin.vjp_batch(U))
    assert jb.shape == (4, N, C)
    assert vb.shape == (4, lin.num_params)
    for m in range(4):
        np.testing.assert_allclose(jb[m], np.asarray(lin.jvp(V[m])), atol=1e-13, rtol=0)
        np.testing.assert_allclose(vb[m], np.asarray(lin.vjp(U[m])), atol=1e-13, rtol=0)


def test_per_example_vjp_equals_masked_vjp(case: Case) -> None:
    lin = case.lin
    rng = np.random.default_rng(6)
    K = 2
    U = rand(rng, N, K, C)
    g = np.asarray(lin.per_example_vjp(U))
    assert g.shape == (N, K, lin.num_params)
    for n in range(N):
        mask = np.zeros((N, 1))
        mask[n] = 1.0
        for k in range(K):
            masked = lin.vjp(U[:, k, :] * jnp.asarray(mask))
            np.testing.assert_allclose(g[n, k], np.asarray(masked), atol=1e-12, rtol=0)
    # and against brute force: J_nᵀ U[n, k]
    brute = np.einsum("nkc,ncd->nkd", np.asarray(U), case.jacobian)
    np.testing.assert_allclose(g, brute, atol=1e-12, rtol=0)
    # A slice of the batch gives the same rows without a new forward pass.
    part = np.asarray(lin.per_example_vjp(U[1:3], examples=slice(1, 3)))
    np.testing.assert_allclose(part, g[1:3], atol=1e-12, rtol=0)


@pytest.mark.parametrize("max_vectors", [1, 2, 7, None])
def test_sum_squared_per_example_vjp(case: Case, max_vectors: int | None) -> None:
    lin = case.lin
    U = rand(np.random.default_rng(7), N, C, C)
    g = np.asarray(lin.per_example_vjp(U))
    expected = np.sum(g * g, axis=0)
    got = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors)
    assert got.shape == (C, lin.num_params)
    assert got.dtype == jnp.float64
    assert_close(got, expected, rtol=1e-12, atol=1e-12, like="jax")
    summed = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors, sum_cotangents=True)
    assert summed.shape == (lin.num_params,)
    assert_close(summed, expected.sum(axis=0), rtol=1e-12, atol=1e-12, like="jax")


def test_sum_squared_with_no_cotangents(mlp_case: Case) -> None:
    out = mlp_case.lin.sum_squared_per_example_vjp(jnp.ones((N, 0, C)))
    assert out.shape == (0, mlp_case.lin.num_params)
    assert out.dtype == jnp.float64
    summed = mlp_case.lin.sum_squared_per_example_vjp(jnp.ones((N, 0, C)), sum_cotangents=True)
    assert summed.shape == (mlp_case.lin.num_params,)


def test_unhashable_apply_fn_still_works() -> None:
    class Model:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, p: Any, x: Any) -> Any:
            return x @ p

    lin = linearize(Model(), jnp.ones((2, 3)), jnp.ones((4, 2)))
    assert_close(lin.vjp(jnp.ones((4, 3))), np.full(6, 4.0), rtol=1e-7, atol=0, like="jax")


def test_block_layout_mlp(mlp_case: Case) -> None:
    lin = mlp_case.lin
    names = [b.name for b in lin.blocks]
    assert names == ["[0].b", "[0].w", "[1].b", "[1].w", "[2].b", "[2].w"]
    shapes = [b.shape for b in lin.blocks]
    h = HIDDEN
    assert shapes == [(h,), (D_IN, h), (h,), (h, h), (C,), (h, C)]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    assert [b.offset for b in lin.blocks] == list(offsets[:-1])
    assert lin.num_params == offsets[-1]
    theta = np.asarray(lin.flat_params)
    flat, _ = ravel_pytree(mlp_case.params)
    np.testing.assert_array_equal(theta, np.asarray(flat))
    # each block is the row-major ravel of its leaf
    leaves = [layer[key] for layer in mlp_case.params for key in ("b", "w")]
    for block, leaf in zip(lin.blocks, leaves, strict=True):
        piece = theta[block.offset : block.offset + block.size].reshape(block.shape)
        np.testing.assert_array_equal(piece, np.asarray(leaf))
    back = lin.unravel(lin.flat_params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(mlp_case.params)
    assert_close(back[1]["w"], mlp_case.params[1]["w"], rtol=0, atol=0)


def test_block_names_nested_dicts_and_other_pytrees() -> None:
    params = residual_params(np.random.default_rng(1))
    lin = linearize(residual_apply, params, jnp.ones((2, D_IN)))
    assert [b.name for b in lin.blocks] == [
        "block.dense.kernel",
        "block.norm.bias",
        "block.norm.scale",
        "embed.bias",
        "embed.kernel",
        "final_norm.bias",
        "final_norm.scale",
        "head.bias",
        "head.kernel",
    ]
    assert lin.blocks[0].shape == (HIDDEN, HIDDEN)
    x = jnp.ones((4, 2))
    single = linearize(lambda w, x: x @ w, jnp.ones((2, 3)), x)
    assert [(b.name, b.shape) for b in single.blocks] == [("params", (2, 3))]
    nested = linearize(
        lambda p, x: x @ p["layers"][1][0] + p["layers"][0],
        {"layers": [jnp.zeros(3), (jnp.ones((2, 3)),)]},
        jnp.ones((4, 2)),
    )
    assert [b.name for b in nested.blocks] == ["layers[0]", "layers[1][0]"]
    int_keys = linearize(lambda p, x: x @ p[1] + p[0], {1: jnp.ones((2, 3)), 0: jnp.zeros(3)}, x)
    assert [b.name for b in int_keys.blocks] == ["[0]", "[1]"]
    clash = linearize(
        lambda p, x: x @ p["a"]["b"] + p["a.b"],
        {"a.b": jnp.zeros(3), "a": {"b": jnp.ones((2, 3))}},
        jnp.ones((4, 2)),
    )
    assert [b.name for b in clash.blocks] == ["['a']['b']", "['a.b']"]


def test_matches_numpy_reference_mlp() -> None:
    """The same weights in the NumPy reference adapter give the same numbers."""
    from fisherbound.adapters.numpy import MLP
    from fisherbound.adapters.numpy import linearize as np_linearize

    rng = np.random.default_rng(8)
    sizes = [D_IN, HIDDEN, C]
    weights = [rng.normal(size=(b, a)) / np.sqrt(a) for a, b in zip(sizes, sizes[1:])]
    biases = [0.3 * rng.normal(size=(b,)) for b in sizes[1:]]
    x = rng.normal(size=(N, D_IN))
    ref = np_linearize(MLP(weights, biases, activation="tanh"), x)

    apply_fn, params = jax_mlp(weights, biases)  # the same weights, flattened (W, b) per layer
    lin = linearize(apply_fn, params, x)
    assert [b.shape for b in lin.blocks] == [b.shape for b in ref.blocks]
    V, U = rng.normal(size=(3, lin.num_params)), rng.normal(size=(3, N, C))
    W = rng.normal(size=(N, 2, C))
    pairs = [
        (lin.logits, ref.logits),
        (lin.jvp_batch(jnp.asarray(V)), ref.jvp_batch(V)),
        (lin.vjp_batch(jnp.asarray(U)), ref.vjp_batch(U)),
        (lin.sum_squared_per_example_vjp(jnp.asarray(W)), ref.sum_squared_per_example_vjp(W)),
    ]
    for got, want in pairs:
        assert_close(got, want, rtol=1e-12, atol=1e-12, like="jax")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_jvp_is_linear_and_vjp_adjoint(mlp_case: Case, seed: int, a: float, b: float) -> None:
    lin = mlp_case.lin
    rng = np.random.default_rng(seed)
    v, w, u = rand(rng, lin.num_params), rand(rng, lin.num_params), rand(rng, N, C)
    assert_close(lin.jvp(a * v + b * w), a * lin.jvp(v) + b * lin.jvp(w), rtol=1e-7, atol=1e-12)
    lhs, rhs = float(jnp.vdot(u, lin.jvp(v))), float(jnp.vdot(lin.vjp(u), v))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


# ----------------------------------------------------------------------------
# dtype, streaming, compilation reuse
# ----------------------------------------------------------------------------


def test_float32_parameters_give_float32_products() -> None:
    params = mlp_params(np.random.default_rng(9), dtype=np.float32)
    x = jnp.ones((3, D_IN), dtype=jnp.float32)
    lin = linearize(mlp_apply, params, x)
    assert lin.dtype == jnp.float32
    assert lin.logits.dtype == jnp.float32
    v64 = jnp.ones(lin.num_params, dtype=jnp.float64)  # cast to the parameters' dtype
    assert lin.jvp(v64).dtype == jnp.float32
    assert lin.vjp(jnp.ones((3, C), dtype=jnp.float32)).dtype == jnp.float32


def test_linearizations_streams_batches_lazily() -> None:
    rng = np.random.default_rng(10)
    params = mlp_params(rng)
    xs = [rng.normal(size=(n, D_IN)) for n in (3, 3, 2)]
    batches = [(xs[0], np.zeros(3)), [jnp.asarray(xs[1])], xs[2]]
    consumed: list[int] = []

    def source() -> Any:
        for i, batch in enumerate(batches):
            consumed.append(i)
            yield batch

    stream = linearizations(mlp_apply, params, source())
    assert consumed == []
    first = next(stream)
    assert consumed == [0]
    lins = [first, *stream]
    assert [lin.num_inputs for lin in lins] == [3, 3, 2]
    u = rand(rng, 3, C)
    for lin, x in zip(lins[:2], xs[:2], strict=True):
        direct = linearize(mlp_apply, params, x)
        assert_close(lin.logits, direct.logits, rtol=1e-7, atol=1e-13)
        assert_close(lin.vjp(u), direct.vjp(u), rtol=1e-7, atol=1e-14)


def test_pytree_inputs_and_dict_batches() -> None:
    def apply_fn(p: Any, batch: dict[str, Any]) -> Any:
        return batch["a"] @ p["w"] + batch["b"][:, None] * p["v"]

    params = {"w": jnp.ones((2, 3)), "v": jnp.arange(3.0)}
    batch = {"a": jnp.ones((4, 2)), "b": jnp.arange(4.0)}
    (lin,) = list(linearizations(apply_fn, params, [batch]))
    assert lin.logits.shape == (4, 3)
    U = rand(np.random.default_rng(11), 4, 2, 3)
    g = np.asarray(lin.per_example_vjp(U))
    masked = lin.vjp(U[:, 1, :] * jnp.asarray([[0.0], [0.0], [1.0], [0.0]]))
    np.testing.assert_allclose(g[2, 1], np.asarray(masked), atol=1e-13)


def test_batches_of_one_shape_compile_once() -> None:
    import collections

    # A deque is keyed by identity (it has no value that the kernels' cache reads: a
    # list apply_fn reads is keyed by its content), so counting does not recompile.
    calls: collections.deque[int] = collections.deque()

    def apply_fn(p: Any, x: Any) -> Any:
        calls.append(1)  # runs once per trace, never per evaluation
        return jnp.tanh(x @ p["w"])

    params = {"w": jnp.ones((2, 3))}
    rng = np.random.default_rng(12)
    data = [rng.normal(size=(4, 2)) for _ in range(3)]
    lins = list(linearizations(apply_fn, params, data))
    assert len(calls) == 1
    lin2 = linearize(apply_fn, params, data[0])
    assert len(calls) == 1
    for lin in [*lins, lin2]:
        lin.vjp(jnp.ones((4, 3)))
    assert len(calls) == 1  # the VJP transposes the stored linear map: no retrace
    assert_close(lins[0].logits, lin2.logits, rtol=1e-7, atol=1e-13)


# ----------------------------------------------------------------------------
# Bad input messages
# ----------------------------------------------------------------------------


def test_bad_apply_fn_and_params() -> None:
    x = jnp.ones((4, 2))
    f = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(TypeError, match=r"apply_fn must be a callable .* got builtins.int"):
        linearize(3, {"w": jnp.ones((2, 3))}, x)
    with pytest.raises(ValueError, match=r"params must hold at least one array leaf; got an empty"):
        linearize(f, {}, x)
    with pytest.raises(
        TypeError, match=r"params leaf 'w' must be a floating-point array; got float"
    ):
        linearize(f, {"w": 1.5}, x)
    with pytest.raises(TypeError, match=r"params leaf 'w' must have a real floating-point dtype"):
        linearize(f, {"w": jnp.ones((2, 3), dtype=jnp.int32)}, x)
    mixed = {"w": jnp.ones((2, 3)), "v": jnp.ones(3, dtype=jnp.float32)}
    with pytest.raises(TypeError, match=r"one dtype; 'v' is float32 but 'w' is float64"):
        linearize(f, mixed, x)


def test_float64_without_x64_is_refused() -> None:
    with (
        jax.enable_x64(False),
        pytest.raises(TypeError, match=r"'\[0\]' is float64 but JAX runs in 32-bit mode"),
    ):
        linearize(lambda p, x: x @ p[0], [np.ones((2, 3))], np.ones((4, 2), dtype=np.float32))


def test_float32_without_x64_warns_nothing() -> None:
    # JAX without x64 has no int64: asking for it (class indices, counts) warned on
    # every float32 loss value and sample. The suite turns warnings into errors.
    from fisherbound.adapters.jax import loss_function
    from fisherbound.estimators import monte_carlo
    from fisherbound.fisher import fisher_trace

    f = lambda p, x: x @ p  # noqa: E731
    with jax.enable_x64(False):
        w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), dtype=jnp.float32)
        x = jnp.ones((5, 2, 3), dtype=jnp.float32)
        y = jnp.asarray([[0, 1], [2, 3], [0, -100], [1, 1], [3, 2]], dtype=jnp.int32)
        loss = loss_function(f, w, x, y)
        assert loss.value(jnp.zeros((2, 12), dtype=jnp.float32)).dtype == jnp.float32
        assert loss.gradient().dtype == jnp.float32
        lin = linearize(f, w, x, mask=y != -100)
        assert int(lin.num_positions) == 2
        assert monte_carlo(lin, num_samples=2, rng=0).value.dtype == jnp.float32
        assert fisher_trace(lin).dtype == jnp.float32


def test_rng_takes_jax_keys() -> None:
    from fisherbound.estimators import detach_and_mix

    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)))
    lin = linearize(lambda p, x: x @ p, w, jnp.ones((5, 3)))
    key = jax.random.key(7)
    a = detach_and_mix(lin, num_probes=3, rng=key).value
    b = detach_and_mix(lin, num_probes=3, rng=jax.random.PRNGKey(7)).value  # same key data
    c = detach_and_mix(lin, num_probes=3, rng=jax.random.split(key)[0]).value
    assert_close(a, b, rtol=0, atol=0)
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(
        TypeError, match=r"one jax.random.key\(seed\).*got a JAX array of shape \(2,\)"
    ):
        detach_and_mix(lin, rng=jax.random.split(key))
    with pytest.raises(TypeError, match=r"rng: a JAX key traced inside jax.jit"):
        jax.jit(lambda k: detach_and_mix(lin, rng=k).value)(key)


def test_bad_inputs() -> None:
    f = lambda p, x: x @ p  # noqa: E731
    w = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"inputs must be an array .* got an empty dict"):
        linearize(f, w, {})
    with pytest.raises(ValueError, match=r"inputs must have a leading batch axis .* 0-d"):
        linearize(f, w, jnp.asarray(1.0))
    with pytest.raises(ValueError, match=r"same leading batch size N; inputs\['a'\] has 4 but"):
        linearize(lambda p, b: b["a"] @ p, w, {"a": jnp.ones((4, 2)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"at least one example; got batch size 0"):
        linearize(f, w, jnp.ones((0, 2)))
    with pytest.raises(TypeError, match=r"inputs\['s'\] must be an array; got builtins.str"):
        linearize(lambda p, b: b["a"] @ p, w, {"a": jnp.ones((4, 2)), "s": "text"})


def test_bad_logits() -> None:
    w, x = jnp.ones((2, 3)), jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\); got shape \(4,\)"):
        linearize(lambda p, x: jnp.sum(x @ p, axis=1), w, x)
    with pytest.raises(
        ValueError, match=r"one row of logits per example; got shape \(1, 3\) for 4"
    ):
        linearize(lambda p, x: jnp.sum(x @ p, axis=0, keepdims=True), w, x)
    with pytest.raises(TypeError, match=r"real floating-point logits; got dtype int32\. Return"):
        linearize(lambda p, x: (x @ p > 0).astype(jnp.int32), w, x)
    with pytest.raises(TypeError, match=r"logits in the parameters' dtype float64; got float32"):
        linearize(lambda p, x: (x @ p).astype(jnp.float32), w, x)
    with pytest.raises(TypeError, match=r"must return an array of logits \(N, C\); got tuple"):
        linearize(lambda p, x: (x @ p, x @ p), w, x)
    bad_x = x.at[2, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"inputs must be finite; got NaN in examples \[2\]\."):
        linearize(lambda p, x: x @ p, w, bad_x)
    with pytest.raises(
        ValueError, match=r"must be finite; got NaN in rows \[2\]\. No parameter or input is"
    ):
        linearize(lambda p, x: jnp.log(x @ p - jnp.asarray([0.0, 0, 9, 0])[:, None]), w, x)


def test_bad_operands(mlp_case: Case) -> None:
    lin = mlp_case.lin
    d = lin.num_params
    with pytest.raises(ValueError, match=rf"v must have shape \(D,\) = \({d},\); got shape \(3,\)"):
        lin.jvp(jnp.ones(3))
    with pytest.raises(ValueError, match=r"u must have shape \(N, C\) = \(5, 3\); got shape"):
        lin.vjp(jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=rf"V must have shape \(M, D\) = \(M, {d}\)"):
        lin.jvp_batch(jnp.ones(d))
    with pytest.raises(ValueError, match=r"U must have shape \(M, N, C\) = \(M, 5, 3\)"):
        lin.vjp_batch(jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, C\) = \(5, M, 3\)"):
        lin.per_example_vjp(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, C\) = \(2, M, 3\)"):
        lin.per_example_vjp(jnp.ones((5, 1, 3)), examples=slice(1, 3))
    with pytest.raises(ValueError, match=r"U must have shape \(N, K, C\)"):
        lin.sum_squared_per_example_vjp(jnp.ones((4, 1, 3)))
    with pytest.raises(TypeError, match=r"v is a numpy array but the linearization's logits is a"):
        lin.jvp(np.ones(d))
    with pytest.raises(TypeError, match=r"u must have a real floating-point dtype"):
        lin.vjp(jnp.ones((N, C), dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"max_vectors must be an integer >= 1; got 0"):
        lin.sum_squared_per_example_vjp(jnp.ones((N, 1, C)), max_vectors=0)
    with pytest.raises(ValueError, match=r"v must have shape \(D,\)"):
        lin.unravel(jnp.ones(2))


def test_custom_vjp_model_has_no_jvp_but_vjp_works() -> None:
    @jax.custom_vjp
    def square(h: Any) -> Any:
        return h * h

    square.defvjp(lambda h: (h * h, h), lambda h, g: (2.0 * h * g,))
    w, x = jnp.arange(6.0).reshape(2, 3) / 6, jnp.ones((4, 2))
    lin = linearize(lambda p, x: square(x @ p), w, x)
    with pytest.raises(NotImplementedError, match=r"jvp is unavailable: apply_fn uses a jax"):
        lin.jvp(jnp.ones(6))
    u = jnp.ones((4, 3))
    expected = jax.grad(lambda p: jnp.sum(square(x @ p) * u))(w)
    assert_close(lin.vjp(u), np.ravel(np.asarray(expected)), rtol=1e-14, atol=0, like="jax")


def test_bad_batches() -> None:
    f, w = (lambda p, x: x @ p), jnp.ones((2, 3))
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches .* got int"):
        linearizations(f, w, 3)
    with pytest.raises(TypeError, match=r"batches must be an iterable .* got ndarray"):
        linearizations(f, w, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"batch 1 must be an inputs array or a non-empty tuple"):
        list(linearizations(f, w, [jnp.ones((4, 2)), ()]))


def test_models_that_couple_examples_use_the_exact_masked_path() -> None:
    # A mean over the batch couples the examples: the single-example vmap would be
    # silently wrong (it gives zero here), so the adapter must detect it.
    rng = np.random.default_rng(30)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4))),
        "w2": jnp.asarray(rng.standard_normal((4, 2))),
    }

    def apply(p, x):
        return jnp.tanh((x - x.mean(0)) @ p["w1"]) @ p["w2"]

    x = jnp.asarray(rng.standard_normal((5, 3)))
    lin = linearize(apply, params, x)
    assert not lin.examples_independent
    d = lin.num_params
    jac = np.stack([np.asarray(lin.jvp(jnp.eye(d)[i])) for i in range(d)], axis=-1)  # (N, C, D)
    U = jnp.asarray(rng.standard_normal((5, 2, 2)))
    brute = np.einsum("nkc,ncd->nkd", np.asarray(U), jac)
    assert_close(lin.per_example_vjp(U), brute, rtol=1e-7, atol=1e-12, like="jax")
    part = lin.per_example_vjp(U[1:3], examples=slice(1, 3))
    assert_close(part, brute[1:3], rtol=1e-7, atol=1e-12, like="jax")
    sq = lin.sum_squared_per_example_vjp(U, max_vectors=3)
    assert_close(sq, (brute**2).sum(axis=0), rtol=1e-7, atol=1e-12, like="jax")
    assert float(np.abs(brute).max()) > 0.1
    # With a mask: the masked positions' cotangents count for nothing.
    keep = jnp.asarray([True, False, True, True, False])
    masked = linearize(apply, params, x, mask=keep)
    want = brute * np.asarray(keep)[:, None, None]
    assert_close(masked.per_example_vjp(U), want, rtol=1e-7, atol=1e-12, like="jax")
    sq = masked.sum_squared_per_example_vjp(U, sum_cotangents=True)
    assert_close(sq, (want**2).sum(axis=(0, 1)), rtol=1e-7, atol=1e-12, like="jax")

    # Under jit the choice is traced. A mean of a hidden layer over the batch (as a
    # training-mode batch norm): every parameter has a layer rule, whose squares are
    # computed outside the conditional and are wrong here; it must return the
    # coupled path's, the eager result.
    def normed(p: dict, xb: Any) -> Any:
        h = jnp.tanh(xb @ p["w1"])
        return (h - h.mean(0)) @ p["w2"]

    lin = linearize(normed, params, x)
    assert not lin.examples_independent
    assert set(lin.fast_path_reasons.values()) == {"fast"}
    want = lin.sum_squared_per_example_vjp(U, max_vectors=3)
    jitted = jax.jit(
        lambda p, xb, u: linearize(normed, p, xb).sum_squared_per_example_vjp(u, max_vectors=3)
    )
    assert_close(jitted(params, x, U), want, rtol=1e-10, atol=1e-12)
    rules = lin._kernels.layer_sum_squared(lin._theta, lin._xs, U, None, 2, False)
    assert float(jnp.max(jnp.abs(rules - want))) > 0.1  # the rules alone are wrong


def test_jitted_exact_quantities_do_not_grow_with_the_batch() -> None:
    """Under jax.jit both paths of the examples' independence are compiled; the exact
    path for coupled examples is one compiled loop over them, so the program does not
    hold a copy of the backward pass per example (it had N: 14 minutes to compile
    fisher_bounds of a small MLP)."""
    from fisherbound.fisher import fisher_bounds

    w = {"w": jnp.ones((3, 4)) / 3}

    def program_size(n: int) -> int:
        x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 3)))
        fn = jax.jit(
            lambda p, xb: tuple(
                fisher_bounds(linearize(lambda q, v: jnp.tanh(v @ q["w"]), p, xb))[:2]
            )
        )
        return len(fn.lower(w, x).as_text())

    small, large = program_size(4), program_size(64)
    assert large < 1.2 * small, (small, large)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_refused(dtype: str) -> None:
    w = jnp.ones((3, 2), dtype=dtype)
    with pytest.raises(
        TypeError,
        match=rf"'params' must be float32 or float64; got {dtype}\..*Pass float32 parameters.*"
        r"param_dtype=jnp.float32 with dtype=jnp.bfloat16",
    ):
        linearize(lambda p, x: x @ p, w, jnp.ones((4, 3), dtype=dtype))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_are_upcast(dtype: str) -> None:
    # Mixed precision: float32 parameters, the forward pass in half precision. The
    # logits are upcast to float32 and everything after them is float32: the same
    # numbers as a model that casts its logits itself.
    from fisherbound.adapters.jax import loss_function
    from fisherbound.fisher import fisher_diagonal

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 4)), dtype=jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 3)), dtype=jnp.float32)

    def half(p: Any, x: Any) -> Any:
        return x.astype(dtype) @ p.astype(dtype)

    lin = linearize(half, w, x)
    assert lin.logits.dtype == jnp.float32
    # Two half-precision layers (bias too): the layer rules against the per-example vmap.
    w2 = jnp.asarray(rng.standard_normal((4, 3)), dtype=jnp.float32)

    def two(p: Any, xb: Any) -> Any:
        h = jnp.tanh(xb.astype(dtype) @ p["a"].astype(dtype) + p["b"].astype(dtype))
        return h @ p["c"].astype(dtype)

    two_params = {"a": w, "b": jnp.zeros(4, jnp.float32), "c": w2}
    deep = linearize(two, two_params, x)
    assert set(deep.fast_path_reasons.values()) == {"fast"}
    U = jnp.asarray(rng.standard_normal((5, 2, 3)), dtype=jnp.float32)
    g = deep.per_example_vjp(U)
    # The vmap forms each per-example gradient in half precision (the backward pass of
    # a half-precision product), the rules square upcast factors: the difference is the
    # vmap's rounding, relative eps of the dtype per factor, doubled by the square.
    tol = 4 * float(jnp.finfo(dtype).eps)
    assert_close(deep.sum_squared_per_example_vjp(U), jnp.sum(g * g, axis=0), rtol=tol, atol=1e-7)
    cast = linearize(lambda p, x: half(p, x).astype(jnp.float32), w, x)
    assert_close(fisher_diagonal(lin), fisher_diagonal(cast), rtol=0, atol=0)
    y = jnp.asarray([0, 1, 2, 3, 0])
    grad = loss_function(half, w, x, y).gradient()
    assert grad.dtype == jnp.float32
    assert_close(
        grad,
        loss_function(lambda p, x: half(p, x).astype(jnp.float32), w, x, y).gradient(),
        rtol=0,
        atol=0,
    )


def test_unravel_and_ravel_are_pytrees_like_params() -> None:
    from fisherbound.fisher import fisher_blocks, fisher_diagonal

    params = {"w1": 0.1 * jnp.ones((3, 4)), "b1": jnp.zeros(4), "w2": 0.2 * jnp.ones((4, 2))}

    def f(p: dict, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    lin = linearize(f, params, x)
    d = fisher_diagonal(lin)
    tree = lin.unravel(d)
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_map(jnp.shape, tree) == jax.tree_util.tree_map(jnp.shape, params)
    np.testing.assert_array_equal(ravel_pytree(tree)[0], d)  # jax's own flattening
    np.testing.assert_array_equal(lin.ravel(tree), d)
    stack = jnp.stack([d, 2 * d])  # leading axes kept: leaves (2, *shape)
    trees = lin.unravel(stack)
    assert trees["w1"].shape == (2, 3, 4)
    np.testing.assert_array_equal(lin.ravel(trees), stack)
    with pytest.raises(ValueError, match=r"tree must have the structure of params"):
        lin.ravel({"w1": tree["w1"]})
    with pytest.raises(ValueError, match=r"the leaf .*b1.* of tree must have shape"):
        lin.ravel({**tree, "b1": tree["b1"][:2]})
    first = lin.blocks[0].name  # the first leaf fixes the leading axes: it needs its rank
    with pytest.raises(ValueError, match=rf"the leaf {first} of tree must have shape \(\.\.\., ∗"):
        lin.ravel(jax.tree_util.tree_map(lambda a: a.reshape(-1)[0], tree))
    # A loss function's directions (k, D): the same pytrees.
    from fisherbound.adapters.jax import loss_function
    from fisherbound.landscape import hessian_directions

    loss = loss_function(f, params, x, jnp.asarray([0, 1, 1, 0, 1]))
    hd = hessian_directions(loss, rng=0)
    dirs = loss.unravel(hd.directions)
    assert dirs["w1"].shape == (2, 3, 4)
    np.testing.assert_array_equal(loss.ravel(dirs), hd.directions)
    # The products take flat arrays; a pytree gets the remedy.
    with pytest.raises(
        TypeError, match=r"v must be a flat array .* shaped like params: .*lin\.ravel\(v\)"
    ):
        lin.jvp(tree)
    with pytest.raises(
        TypeError, match=r"v must be a flat array .* \(a pytree; loss\.ravel flattens"
    ):
        loss.hvp({"w1": tree["w1"]})
    blocks = fisher_blocks(lin)  # the dense blocks as a pytree like params (docs/adapters.md)
    names = [b.name for b in lin.blocks]
    btree = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), [blocks[n] for n in names]
    )
    assert btree["w1"].shape == (12, 12)
    # The w1 entries are 0 in exact arithmetic (the hidden units are identical and the
    # factor's columns sum to 0): rounding, 1e-33, which the compiled diagonal (one
    # XLA program) and the blocks round differently; atol relative to the largest entry.
    assert_close(
        jnp.diagonal(btree["w1"]), tree["w1"].reshape(-1), rtol=1e-12, atol=1e-14 * jnp.max(d)
    )


# The compiled kernels are cached by apply_fn's state, not by the function object.
SCALE = 1.0


def _scaled(p: dict, x: Any) -> Any:
    return SCALE * (x @ p["w"])


def test_kernels_never_return_results_for_old_closed_over_values() -> None:
    """A global, a closure cell, a NumPy array changed in place, a partial's keyword or
    an object's attribute read by apply_fn: the next linearization sees the new value
    (jax.jit alone would reuse the trace of the old one)."""
    global SCALE
    params = {"w": jnp.ones((3, 2))}
    x = jnp.ones((4, 3))
    first = linearize(_scaled, params, x).logits
    SCALE = 5.0
    try:
        np.testing.assert_allclose(linearize(_scaled, params, x).logits, 5.0 * first)
    finally:
        SCALE = 1.0

    def scaled_by(s: float) -> Any:
        return lambda p, xb: s * (xb @ p["w"])

    np.testing.assert_allclose(linearize(scaled_by(3.0), params, x).logits, 3.0 * first)
    shift = np.zeros(2)

    def shifted(p: dict, xb: Any) -> Any:
        return xb @ p["w"] + shift

    linearize(shifted, params, x)
    shift[:] = 2.0  # in place: the same object, other values
    np.testing.assert_allclose(linearize(shifted, params, x).logits, first + 2.0)
    import functools

    def times(p: dict, xb: Any, k: float) -> Any:
        return k * (xb @ p["w"])

    linearize(functools.partial(times, k=2.0), params, x)
    np.testing.assert_allclose(
        linearize(functools.partial(times, k=4.0), params, x).logits, 4.0 * first
    )

    class Head:
        def __init__(self) -> None:
            self.bias = 0.0

        def apply(self, p: dict, xb: Any) -> Any:
            return xb @ p["w"] + self.bias

    head = Head()
    linearize(head.apply, params, x)
    head.bias = 1.0
    np.testing.assert_allclose(linearize(head.apply, params, x).logits, first + 1.0)
    # The same function on parameters of another shape: kernels of their own.
    wide = linearize(_scaled, {"w": jnp.ones((3, 5))}, x)
    assert wide.logits.shape == (4, 5)
    assert wide.num_params == 15


def test_a_retrace_never_runs_an_older_function_whose_values_changed() -> None:
    """Two objects with equal values share kernels; when the first one's value changes
    and the second is linearized on another batch size (a retrace), the logits are the
    second's (the cached kernels used to call the first function: [15, 15] for [3, 3])."""

    class Scaled:
        def __init__(self, s: float) -> None:
            self.s = s

        def apply(self, p: dict, xb: Any) -> Any:
            return self.s * (xb @ p["w"])

    params = {"w": jnp.ones((3, 2))}
    first = Scaled(1.0)
    linearize(first.apply, params, jnp.ones((4, 3)))
    first.s = 5.0
    second = Scaled(1.0)  # equal values: the same cache key as first had
    got = linearize(second.apply, params, jnp.ones((7, 3))).logits
    np.testing.assert_allclose(got, np.full((7, 2), 3.0))


def test_kernels_in_use_are_evicted_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache drops its least recently used entry: a model used again stays."""
    from fisherbound.adapters import _jax_model

    monkeypatch.setattr(_jax_model, "MAX_CACHED_KERNELS", 2)
    monkeypatch.setattr(_jax_model, "_KERNELS", {})
    x = jnp.ones((4, 3))

    def model(width: int) -> tuple[Any, dict]:
        return (lambda p, xb: xb @ p["w"]), {"w": jnp.ones((3, width))}

    kept = model(2)
    linearize(kept[0], kept[1], x)
    linearize(model(3)[0], model(3)[1], x)
    kernels = next(iter(_jax_model._KERNELS.values()))
    linearize(kept[0], kept[1], x)  # used again: now the most recent
    linearize(model(4)[0], model(4)[1], x)  # a third layout evicts width 3, not width 2
    assert kernels in _jax_model._KERNELS.values()
    assert len(_jax_model._KERNELS) == 2


def test_a_fresh_lambda_per_call_compiles_once() -> None:
    """A new lambda object per call (the same code, the same values): one set of
    compiled kernels, whatever the number of calls."""
    from fisherbound.adapters import _jax_model

    params = {"w": jnp.ones((3, 2))}
    x = jnp.ones((4, 3))
    offset = 0.5

    def model() -> Any:
        return lambda p, xb: xb @ p["w"] + offset  # a fresh function object each time

    linearize(model(), params, x)
    before = dict(_jax_model._KERNELS)
    for _ in range(3):
        fn = model()
        assert fn is not model()
        assert linearize(fn, params, x).num_params == 6
    assert _jax_model._KERNELS.keys() == before.keys()
    assert all(_jax_model._KERNELS[k] is v for k, v in before.items())


# --------------------------------------------------------------------------- #
# state=: the model's non-differentiated variables, an argument of every kernel
# --------------------------------------------------------------------------- #


def _normed(p: dict, x: Any, s: dict) -> Any:
    """A batch-norm layer in inference mode: running statistics in the state."""
    h = x @ p["w1"]
    h = (h - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["g"]
    return jnp.tanh(h) @ p["w2"]


def _normed_case(seed: int) -> tuple[dict, Any, Any]:
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4))),
        "g": jnp.asarray(1.0 + 0.1 * rng.standard_normal(4)),
        "w2": jnp.asarray(rng.standard_normal((4, 3))),
    }
    x = jnp.asarray(rng.standard_normal((6, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=6))
    return params, x, y


def _stats(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"mean": jnp.asarray(rng.standard_normal(4)), "var": jnp.asarray(rng.uniform(0.5, 2, 4))}


def test_state_is_passed_whole_and_equals_closing_over_it() -> None:
    from fisherbound.adapters.jax import loss_function
    from fisherbound.fisher import fisher_diagonal
    from fisherbound.variance import detach_and_mix_variance

    params, x, y = _normed_case(0)
    s = _stats(1)
    closed = lambda p, xb: _normed(p, xb, s)  # noqa: E731
    lin = linearize(_normed, params, x, state=s)
    ref = linearize(closed, params, x)
    assert lin.num_params == ref.num_params == 3 * 4 + 4 + 4 * 3  # the state is no parameter
    assert_close(lin.logits, ref.logits, rtol=1e-14, atol=0)
    v = jnp.asarray(np.random.default_rng(2).standard_normal(lin.num_params))
    assert_close(lin.jvp(v), ref.jvp(v), rtol=1e-13, atol=1e-14)
    assert lin.examples_independent  # the state is shared, not batched
    assert_close(fisher_diagonal(lin), fisher_diagonal(ref), rtol=1e-12, atol=1e-15)
    u = jnp.ones((6, 2, 3))
    assert_close(lin.per_example_vjp(u), ref.per_example_vjp(u), rtol=1e-12, atol=1e-15)
    assert_close(  # second derivatives of the logits, through the state too
        detach_and_mix_variance(lin), detach_and_mix_variance(ref), rtol=1e-10, atol=1e-15
    )
    loss = loss_function(_normed, params, x, y, state=s)
    loss_ref = loss_function(closed, params, x, y)
    assert_close(loss.gradient(), loss_ref.gradient(), rtol=1e-12, atol=1e-15)
    assert_close(loss.hvp(v), loss_ref.hvp(v), rtol=1e-12, atol=1e-15)
    shifts = jnp.stack([jnp.zeros_like(v), v])
    assert_close(loss.value(shifts), loss_ref.value(shifts), rtol=1e-13, atol=0)


def test_new_state_values_reuse_the_kernels_and_are_never_stale() -> None:
    from fisherbound.adapters.jax import linearizations, loss_functions
    from fisherbound.fisher import fisher_diagonal

    params, x, y = _normed_case(3)
    first = linearize(_normed, params, x, state=_stats(4))
    forward = first._kernels.forward
    sizes = forward._cache_size()
    for seed in (5, 6):  # running statistics after another training step
        s = _stats(seed)
        lin = linearize(_normed, params, x, state=s)
        ref = linearize(lambda p, xb, s=s: _normed(p, xb, s), params, x)
        assert_close(fisher_diagonal(lin), fisher_diagonal(ref), rtol=1e-12, atol=1e-15)
        assert lin._kernels.forward is forward
    assert forward._cache_size() == sizes  # no compilation for new values
    s = _stats(7)
    streamed = [
        fisher_diagonal(lin) for lin in linearizations(_normed, params, [x, x[:3]], state=s)
    ]
    assert_close(
        streamed[1], fisher_diagonal(linearize(_normed, params, x[:3], state=s)), rtol=0, atol=0
    )
    losses = list(loss_functions(_normed, params, [(x, y)], state=s))
    assert losses[0].num_inputs == 6


def test_fisher_bounds_differentiate() -> None:
    """jax.grad through the bounds: the lower kernel's eigenvalues by the implicit
    function theorem (the iteration runs on constants), against central differences
    (step 1e-6 in float64: their own error is about 1e-10 relative)."""
    from fisherbound.fisher import fisher_bounds

    rng = np.random.default_rng(60)
    w = jnp.asarray(rng.standard_normal((4, 5)))
    x = jnp.asarray(rng.standard_normal((3, 2, 4)))  # with positions
    mask = np.ones((3, 2), bool)
    mask[1, 0] = False  # a masked position's slot has tied probabilities: no NaN
    for kind in ("lower", "upper"):

        def total(p: Any, kind: str = kind) -> Any:
            lin = linearize(lambda q, xb: jnp.tanh(xb @ q), p, x, mask=mask)
            return jnp.sum(getattr(fisher_bounds(lin), kind))

        grad = np.asarray(jax.grad(total)(w))
        for i, j in ((0, 0), (1, 2), (3, 4)):
            e = np.zeros((4, 5))
            e[i, j] = 1e-6
            fd = (float(total(w + e)) - float(total(w - e))) / 2e-6
            assert abs(grad[i, j] - fd) <= 1e-6 * max(1.0, abs(fd)), (kind, i, j, grad[i, j], fd)


def test_state_is_checked_and_a_variables_dict_is_refused() -> None:
    params, x, _ = _normed_case(8)
    variables = {"params": params, "batch_stats": _stats(9)}
    with pytest.raises(
        ValueError,
        match=r"flax variables dict with the collections \['batch_stats'\] besides 'params'.*"
        r"state=\{'batch_stats': variables\['batch_stats'\]\}",
    ):
        linearize(lambda v, xb: _normed(v["params"], xb, v["batch_stats"]), variables, x)
    other = {"params": params, "perturbations": {"z": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"collections \['perturbations'\] besides 'params'"):
        linearize(lambda v, xb: _normed(v["params"], xb, _stats(9)), other, x)
    with pytest.raises(TypeError, match=r"state\['mean'\] must be an array .*got builtins.str"):
        linearize(_normed, params, x, state={"mean": "zero", "var": jnp.ones(4)})
    bad = {**_stats(9), "var": jnp.asarray([1.0, np.nan, 1.0, 1.0])}
    with pytest.raises(ValueError, match=r"state\['var'\] must be finite; got 1 NaN or infinite"):
        linearize(_normed, params, x, state=bad)
    state = {"mean": np.zeros(4), "var": np.ones(4)}  # NumPy leaves are converted
    assert linearize(_normed, params, x, state=state).num_params == 28


def test_flax_batch_norm_state() -> None:
    """A flax linen model with batch norm: state= gives the numbers of closing over the
    running statistics, and the variables dict as params is refused (it would count
    the 2 × 16 statistics as parameters)."""
    nn = pytest.importorskip("flax.linen")
    from fisherbound.fisher import fisher_diagonal

    class Net(nn.Module):  # type: ignore[misc, name-defined]
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.BatchNorm(use_running_average=True)(nn.Dense(16)(x))
            return nn.Dense(3)(nn.relu(h))

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5)), dtype=jnp.float32)
    variables = model.init(jax.random.key(1), x)  # float32 parameters
    stats = jax.tree_util.tree_map(lambda a: a + 0.5, variables["batch_stats"])  # not the init
    state = {"batch_stats": stats}
    lin = linearize(
        lambda p, xb, s: model.apply({"params": p, **s}, xb), variables["params"], x, state=state
    )
    ref = linearize(
        lambda p, xb: model.apply({"params": p, "batch_stats": stats}, xb), variables["params"], x
    )
    assert lin.num_params == 179
    # The same float32 operations, the statistics an argument or a constant: a few ulps.
    assert_close(fisher_diagonal(lin), fisher_diagonal(ref), rtol=1e-5, atol=1e-7)
    with pytest.raises(
        ValueError, match=r"flax variables dict with the collections \['batch_stats'\]"
    ):
        linearize(lambda v, xb: model.apply(v, xb), variables, x)


# --------------------------------------------------------------------------- #
# Inside jax.jit: every public function gives its eager result, or refuses clearly
# --------------------------------------------------------------------------- #


def _jit_case() -> tuple[Callable[..., Any], dict, Any, Any]:
    rng = np.random.default_rng(40)
    params = {
        "w1": jnp.asarray(rng.standard_normal((4, 6))),
        "w2": jnp.asarray(rng.standard_normal((6, 3))),
    }
    x = jnp.asarray(rng.standard_normal((8, 4)))
    y = jnp.asarray(rng.integers(0, 3, 8))
    return (lambda p, xb: jnp.tanh(xb @ p["w1"]) @ p["w2"]), params, x, y


def _jit_calls() -> dict[str, Callable[..., Any]]:
    import fisherbound.dimension as dim
    import fisherbound.estimators as est
    import fisherbound.fisher as fis
    import fisherbound.landscape as land
    import fisherbound.linalg as la
    import fisherbound.variance as var
    from fisherbound.adapters.jax import loss_function

    f, _, _, y = _jit_case()

    def lin(p: Any, x: Any) -> Any:
        return linearize(f, p, x)

    def loss(p: Any, x: Any) -> Any:
        return loss_function(f, p, x, y)

    return {
        "fisher_diagonal": lambda p, x: fis.fisher_diagonal(lin(p, x)),
        "fisher_trace": lambda p, x: fis.fisher_trace(lin(p, x), reduction="mean"),
        "fisher_blocks": lambda p, x: fis.fisher_blocks(lin(p, x))["w2"],
        "fisher_bounds": lambda p, x: jnp.stack(fis.fisher_bounds(lin(p, x))[:2]),
        "fisher_operator": lambda p, x: fis.fisher_operator(lin(p, x)).matvec(jnp.ones(42)),
        "detach_and_mix": lambda p, x: est.detach_and_mix(lin(p, x), num_probes=3, rng=0).value,
        "monte_carlo": lambda p, x: est.monte_carlo(lin(p, x), rng=0).std_error,
        "empirical": lambda p, x: est.empirical(lin(p, x), y).value,
        "detach_and_mix_variance": lambda p, x: var.detach_and_mix_variance(lin(p, x)),
        "classical_variance": lambda p, x: var.classical_variance(lin(p, x)),
        "razor (dense)": lambda p, x: (
            dim.razor(
                lin(p, x), prior_variance=1.0, labels=y, theta=lin(p, x).flat_params, method="dense"
            ).value
        ),
        "hutchinson_trace": lambda p, x: (
            la.hutchinson_trace(fis.fisher_operator(lin(p, x)), num_probes=4, rng=0).value
        ),
        "hutchpp_trace": lambda p, x: (
            la.hutchpp_trace(fis.fisher_operator(lin(p, x)), num_probes=12, rng=0).value
        ),
        "loss_trace": lambda p, x: land.loss_trace(loss(p, x), num_probes=3, rng=0).value,
        "projected_curvature": lambda p, x: (
            land.projected_curvature(loss(p, x), jnp.ones((2, 42))).hessian
        ),
        "surface": lambda p, x: (
            land.surface(loss(p, x), jnp.ones((2, 42)) / 10, num_points=3).values
        ),
    }


@pytest.mark.parametrize("name", list(_jit_calls()))
def test_public_functions_inside_jit_give_their_eager_results(name: str) -> None:
    _, params, x, _ = _jit_case()
    fn = _jit_calls()[name]
    eager = fn(params, x)
    assert_close(jax.jit(fn)(params, x), eager, rtol=1e-10, atol=1e-12)


def test_public_functions_that_decide_on_the_host_refuse_jit_clearly() -> None:
    import fisherbound.dimension as dim
    import fisherbound.landscape as land
    import fisherbound.linalg as la
    import fisherbound.variance as var
    from fisherbound.adapters.jax import loss_function
    from fisherbound.fisher import fisher_operator

    f, params, x, y = _jit_case()
    lanczos = r"products are traced by JAX \(inside jax.jit .*Call it outside jax.jit"
    cases = [
        (lambda p, xb: dim.top_eigenpairs(linearize(f, p, xb), k=2, rng=0).eigenvalues, lanczos),
        (lambda p, xb: dim.local_dimension(linearize(f, p, xb), eps=1e-3, rng=0), lanczos),
        (
            lambda p, xb: land.hessian_directions(loss_function(f, p, xb, y), rng=0).directions,
            lanczos,
        ),
        (
            lambda p, xb: (
                la.lanczos(fisher_operator(linearize(f, p, xb)), num_matvecs=4, rng=0).alpha
            ),
            lanczos,
        ),
        (lambda p, xb: la.eigsh(p["w1"] @ p["w1"].T, k=1).eigenvalues, lanczos),
        (
            lambda p, xb: (
                land.saddle_probability(jnp.sum(p["w1"]) * jnp.asarray([1.0, -2.0])).minimum
            ),
            r"method='exact'\) reads the signs .*use method='monte_carlo'",
        ),
        (
            lambda p, xb: var.compare_estimators(linearize(f, p, xb)).best,
            r"compare_estimators times the estimators by the wall clock.*outside jit",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            jax.jit(fn)(params, x)


# --------------------------------------------------------------------------- #
# Layer rules: dense kernels and biases found in the jaxpr
# --------------------------------------------------------------------------- #


def _per_example_squares(lin: Any, U: Any) -> Any:
    g = lin.per_example_vjp(U)  # the single-example vmap, not the rules
    return jnp.sum(g * g, axis=0)


def _layer_cases() -> dict[str, tuple[Callable[..., Any], dict, Any, Any]]:
    rng = np.random.default_rng(50)

    def arr(*shape: int) -> Any:
        return jnp.asarray(rng.standard_normal(shape))

    mlp = {"w1": arr(4, 6), "b1": arr(6), "w2": arr(6, 3), "b2": arr(3)}

    def dense(p: dict, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def transposed(p: dict, x: Any) -> Any:  # kernels (out, in), used as x @ W.T
        return jnp.tanh(x @ p["w1"].T) @ p["w2"].T

    @jax.jit
    def hidden(x: Any, w: Any) -> Any:  # a jitted function inside the model: inlined
        return jax.nn.relu(x @ w)

    def nested(p: dict, x: Any) -> Any:
        return hidden(x, p["w1"]) @ p["w2"]

    def conv(p: dict, x: Any) -> Any:  # NHWC / HWIO, stride 2, dilation, bias; then NCHW
        nhwc, nchw = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
        y = jax.lax.conv_general_dilated(
            x, p["k"], (2, 1), "SAME", rhs_dilation=(1, 2), dimension_numbers=nhwc
        )
        y = jnp.moveaxis(jnp.tanh(y + p["kb"]), 3, 1)
        y = jax.lax.conv_general_dilated(y, p["o"], (1, 1), "VALID", dimension_numbers=nchw)
        return jnp.mean(jnp.tanh(y), axis=(2, 3)) @ p["w"]

    cnn = {"k": arr(3, 2, 2, 4), "kb": arr(4), "o": arr(5, 4, 2, 2), "w": arr(5, 3)}

    def grouped(p: dict, x: Any) -> Any:  # two feature groups (NHWC), then depthwise (NCHW)
        y = jax.lax.conv_general_dilated(
            x, p["k"], (1, 2), "SAME", dimension_numbers=nhwc, feature_group_count=2
        )
        y = jnp.moveaxis(jnp.tanh(y), 3, 1)  # (N, 6, H, W)
        y = jax.lax.conv_general_dilated(
            y, p["d"], (1, 1), "VALID", dimension_numbers=nchw, feature_group_count=6
        )
        return jnp.mean(jnp.tanh(y), axis=(2, 3)) @ p["w"]

    nhwc, nchw = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
    groups = {"k": arr(3, 2, 2, 6), "d": arr(12, 1, 2, 2), "w": arr(12, 3)}

    def tokens(p: dict, ids: Any) -> Any:  # embedding, layer norm, a kernel on the left
        h = jnp.take(p["emb"], ids, axis=0, mode="clip")  # ids ≥ 10 clipped to row 9
        mu, var = jnp.mean(h, -1, keepdims=True), jnp.var(h, -1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]
        return jnp.moveaxis(jnp.tensordot(p["w"], jnp.tanh(h), axes=[[1], [2]]), 0, -1)

    lm = {"emb": arr(10, 6), "g": arr(6), "b": arr(6), "w": arr(3, 6)}

    def dropped(p: dict, ids: Any) -> Any:  # out-of-range ids: their rows get no gradient
        h = p["emb"][ids]  # PROMISE_IN_BOUNDS: clamped forward, dropped derivative
        cols = (ids % 3 == 0).astype(ids.dtype)  # a second index: 1 is out of range
        idx = jnp.stack([ids, cols], axis=-1)
        numbers = jax.lax.GatherDimensionNumbers(
            offset_dims=(2,), collapsed_slice_dims=(0,), start_index_map=(0, 1)
        )
        f = jax.lax.gather(p["e2"], idx, numbers, (1, 6), mode="fill", fill_value=0.0)
        return jnp.tanh(h + f) @ p["w"].T

    small = {"emb": arr(10, 6), "e2": arr(10, 6), "w": arr(3, 6)}
    wide = {"emb": arr(300, 6), "e2": arr(300, 6), "w": arr(3, 6)}
    bytes_ids = jnp.asarray(rng.integers(200, 256, (5, 4)), dtype=jnp.uint8)
    mean, var = arr(6), jnp.exp(arr(6))  # running statistics: constants

    def normed(p: dict, x: Any) -> Any:  # batch norm in inference mode, then a group norm
        h = (x @ p["w"] - mean) * (jax.lax.rsqrt(var + 1e-5) * p["g"]) + p["b"]
        g = jnp.reshape(h, (h.shape[0], 2, 3))
        g = (g - jnp.mean(g, -1, keepdims=True)) / jnp.std(g, -1, keepdims=True)
        return jnp.tanh(jnp.reshape(g, h.shape) * p["s"]) @ p["v"]

    norms = {"w": arr(4, 6), "g": arr(6), "b": arr(6), "s": arr(6), "v": arr(6, 3)}

    def pooled(p: dict, x: Any) -> Any:  # integer data: tied maxima inside windows
        y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=nhwc)
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        y = jnp.moveaxis(y + p["kb"], 3, 1)  # 5x5 pooled to 2x2 (the last row cut); NCHW
        y = jax.lax.conv_general_dilated(y, p["o"], (1, 1), "SAME", dimension_numbers=nchw)
        pad = ((0, 0), (0, 0), (1, 0), (0, 1))  # windows as long as strides, padded
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), pad)
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1, 2, 1), (1, 1, 1, 1), "SAME")
        return jnp.mean(y, axis=(2, 3)) @ p["w"]  # the last pool overlaps: the primitive

    def ints(*shape: int) -> Any:
        return jnp.asarray(rng.integers(-1, 2, shape), dtype=jnp.float64)

    pools = {"k": ints(2, 2, 2, 3), "kb": arr(3), "o": ints(4, 3, 2, 2), "w": arr(4, 3)}
    ids = jnp.asarray(rng.integers(0, 12, (5, 4)))  # repeated tokens within examples
    return {
        "convolutions": (conv, cnn, arr(4, 6, 5, 2), None),
        "grouped convolutions": (grouped, groups, arr(4, 6, 5, 4), None),
        "max pooling, tied": (pooled, pools, ints(4, 5, 5, 2), None),
        "dense": (dense, mlp, arr(7, 4), None),
        "positions and mask": (dense, mlp, arr(5, 3, 4), jnp.asarray(rng.random((5, 3)) > 0.3)),
        "transposed": (transposed, {"w1": arr(6, 4), "w2": arr(3, 6)}, arr(7, 4), None),
        "nested jit": (nested, {"w1": arr(4, 6), "w2": arr(6, 3)}, arr(7, 4), None),
        "tokens": (tokens, lm, ids, ids[:, ::-1] != 11),
        "dropped tokens": (dropped, small, ids, None),
        "uint8 tokens, 300 rows": (dropped, wide, bytes_ids, None),
        "normalisations": (normed, norms, arr(7, 4), None),
    }


@pytest.mark.parametrize("case", list(_layer_cases()))
def test_layer_rules_equal_the_per_example_vmap(case: str) -> None:
    from fisherbound.fisher import fisher_diagonal

    f, params, x, mask = _layer_cases()[case]
    lin = linearize(f, params, x, mask=mask)
    assert set(lin.fast_path_reasons.values()) == {"fast"}, dict(lin.fast_path_reasons)
    n, c = lin.logits.shape[0], lin.logits.shape[-1]
    U = jnp.asarray(np.random.default_rng(51).standard_normal((n, 5, *lin.logits.shape[1:])))
    assert U.shape[-1] == c  # K = 5 random cotangents per example, every class its own
    want = _per_example_squares(lin, U)
    assert_close(lin.sum_squared_per_example_vjp(U), want, rtol=1e-12, atol=1e-14)
    # Chunks of 2 (1 where per-example layer gradients are formed): a loop and a rest.
    got = lin.sum_squared_per_example_vjp(U, max_vectors=2)
    assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert_close(
        lin.sum_squared_per_example_vjp(U, max_vectors=2 * n, sum_cotangents=True),
        jnp.sum(want, axis=0),
        rtol=1e-12,
        atol=1e-14,
    )
    exact = jax.jit(lambda p, xb: fisher_diagonal(linearize(f, p, xb, mask=mask)))(params, x)
    assert_close(exact, fisher_diagonal(lin), rtol=1e-12, atol=1e-14)


def test_layer_rules_evaluate_convolutions_and_pooling_in_loop_friendly_forms() -> None:
    # The forms the rules evaluate instead of the primitives (fast inside lax.scan):
    # the same values and the same VJP as JAX's, ties in max pooling included (the
    # first maximum of each window, as select-and-scatter takes it).
    from fisherbound.adapters._jax_rules import _LOOP_FRIENDLY

    rng = np.random.default_rng(53)

    def ints(*shape: int) -> Any:
        return jnp.asarray(rng.integers(-2, 3, shape), dtype=jnp.float64)

    def check(f: Callable[..., Any], args: tuple, name: str, kept: bool = False) -> None:
        eqn = next(e for e in jax.make_jaxpr(f)(*args).jaxpr.eqns if e.primitive.name == name)
        g = lambda *a: _LOOP_FRIENDLY[name](list(a), eqn.params)  # noqa: E731
        if kept:  # the primitive as it is
            assert g(*args) is None
            return
        want, pull_want = jax.vjp(f, *args)
        got, pull_got = jax.vjp(g, *args)
        assert_close(got, want, rtol=0, atol=0)
        ct = jnp.asarray(rng.standard_normal(want.shape))
        for a, b in zip(pull_got(ct), pull_want(ct), strict=True):
            assert_close(a, b, rtol=1e-14, atol=1e-14)

    pools = [  # window = stride: padded, cut (5 → 2), over two axes of four, plain 2-D
        ((1, 2, 2, 1), "VALID", (3, 5, 5, 2)),
        ((1, 3, 3, 1), "SAME", (2, 7, 8, 3)),
        ((1, 1, 2, 2), ((0, 0), (0, 0), (1, 0), (0, 1)), (2, 3, 5, 6)),
        ((2, 2), "VALID", (6, 4)),
    ]
    for window, padding, shape in pools:

        def pool(x: Any, w: tuple = window, pad: Any = padding) -> Any:
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, w, w, pad)

        check(pool, (ints(*shape),), "reduce_window_max")
    for window, strides, x in (((2,), (1,), ints(5)), ((1, 3), (1, 3), ints(2, 2))):
        kept = jax.make_jaxpr(  # overlapping windows; no window at all (shape (2, 0))
            lambda v, w=window, s=strides: jax.lax.reduce_window(
                v, -jnp.inf, jax.lax.max, w, s, "VALID"
            )
        )(x).jaxpr.eqns[0]
        assert _LOOP_FRIENDLY["reduce_window_max"]([x], kept.params) is None
    # And evaluate (the rules' forward pass) takes them: a 2x2 pool and an HWIO
    # convolution come out as a selection and a (spatial…, out, in) kernel.
    from fisherbound.adapters._jax_rules import evaluate

    def net(x: Any, k: Any) -> Any:
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    args = (ints(2, 4, 4, 3), ints(2, 2, 3, 5))
    closed = jax.make_jaxpr(net)(*args)
    again = jax.make_jaxpr(
        lambda *a: evaluate(closed.jaxpr, closed.consts, list(a), {}, {}, {}, {})
    )(*args)
    names = [e.primitive.name for e in again.jaxpr.eqns]
    assert "reduce_window_max" not in names, names
    assert "argmax" in names, names
    specs = [
        e.params["dimension_numbers"].rhs_spec
        for e in again.jaxpr.eqns
        if e.primitive.name == "conv_general_dilated"
    ]
    assert specs == [(2, 3, 0, 1)], specs
    got = evaluate(closed.jaxpr, closed.consts, list(args), {}, {}, {}, {})[0]
    assert_close(got, net(*args), rtol=0, atol=0, like="jax")
    convs = [  # moved: HWIO, NCHW / OIHW, mixed layouts, grouped; kept: NHWC / HWOI
        (("NHWC", "HWIO", "NHWC"), (2, 3, 4, 6), (3, 5, 6, 4), 1),
        (("NCHW", "OIHW", "NCHW"), (6, 4, 3, 2), (3, 4, 5, 6), 1),
        (("NCHW", "HWIO", "NHWC"), (2, 3, 4, 6), (3, 4, 5, 6), 1),
        (("NHWC", "HWIO", "NHWC"), (2, 2, 2, 6), (3, 5, 6, 4), 2),
        (("NHWC", "HWOI", "NHWC"), (2, 2, 6, 4), (3, 5, 6, 4), 1),
    ]
    for numbers, kernel, shape, groups in convs:

        def conv(x: Any, k: Any, dn: tuple = numbers, g: int = groups) -> Any:
            return jax.lax.conv_general_dilated(
                x,
                k,
                (2, 1),
                "SAME",
                rhs_dilation=(1, 2),
                dimension_numbers=dn,
                feature_group_count=g,
            )

        kept = numbers[1] == "HWOI"  # stored (spatial…, out, in) already
        check(conv, (ints(*shape), ints(*kernel)), "conv_general_dilated", kept)


def test_layer_rules_say_why_a_parameter_has_none() -> None:
    rng = np.random.default_rng(52)
    w, v, k = (jnp.asarray(rng.standard_normal(s)) for s in ((4, 4), (4, 3), (3, 3, 1, 2)))

    def shared(p: dict, x: Any) -> Any:  # w applied twice
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["v"]

    def seq_first(p: dict, x: Any) -> Any:  # examples on axis 1 inside the model
        h = jnp.tanh(jnp.swapaxes(x, 0, 1) @ p["w"])  # (T, N, 4)
        return jnp.swapaxes(h @ p["v"], 0, 1)

    def left(p: dict, x: Any) -> Any:
        return (p["v"].T @ x.T).T

    @jax.jit
    def layer(h: Any, w: Any) -> Any:  # one jitted body for two calls of one shape
        return jnp.tanh(h @ w)

    def twice(p: dict, x: Any) -> Any:
        return layer(layer(x, p["w"]), p["u"]) @ p["v"]

    @jax.jit
    def block(w: Any, x: Any) -> Any:  # returns its parameter, used after the call
        return jnp.tanh(x @ w), w.T

    def tied(p: dict, x: Any) -> Any:
        h, wt = block(p["w"], x)
        return jnp.tanh(h @ wt) @ p["v"]

    @jax.jit
    def folded(g: Any) -> Any:  # an inference batch norm's factor folded into γ in a jit
        return g * jax.lax.rsqrt(jnp.arange(1.0, 5.0))

    def folded_scale(p: dict, x: Any) -> Any:
        return jnp.tanh((x @ p["w"]) * folded(p["g"])) @ p["v"]

    @jax.jit
    def scale_in(h: Any, g: Any) -> Any:
        return h * g

    def scaled_into_jit(p: dict, x: Any) -> Any:
        return jnp.tanh(scale_in(x @ p["w"], p["g"] * jnp.arange(1.0, 5.0))) @ p["v"]

    def middle_axis(p: dict, x: Any) -> Any:  # γ over axis 1 of (N, 4, 3): no scale
        h = jnp.tanh(x @ p["w"])[:, :, None] * jnp.reshape(p["g"], (1, 4, 1))
        return jnp.sum(h * jnp.arange(3.0), axis=-1) @ p["v"]

    def positions(p: dict, x: Any) -> Any:  # one row per position, for all examples
        h = x @ p["w"] + jnp.take(p["pos"], jnp.arange(x.shape[1]), axis=0)
        return jnp.tanh(h) @ p["v"]

    def again(p: dict, x: Any) -> Any:  # the second call of the body has no parameter
        return layer(layer(x, p["w"]), jnp.eye(4)) @ p["v"]

    def one_channel(p: dict, x: Any) -> Any:  # NCHW, one channel: its bias is no last-axis bias
        y = jax.lax.conv_general_dilated(
            x, p["k"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return jnp.mean(jnp.tanh(y + jnp.reshape(p["b"], (1, 1, 1, 1))), axis=(1, 2)) @ p["v"][:3]

    cases = [
        (
            shared,
            {"w": w, "v": v},
            (6, 4),
            {"w": "used 2 times in one forward pass (shared)", "v": "fast"},
        ),
        (
            seq_first,
            {"w": w, "v": v},
            (5, 5, 4),
            {"w": "layer input axis 0 is not the example axis"},
        ),
        (left, {"v": v}, (6, 4), {"v": "a product that is not over the activation's last axis"}),
        (
            twice,
            {"w": w, "u": w + 1.0, "v": v},
            (6, 4),
            {"w": "fast", "u": "fast", "v": "fast"},  # one body, two calls: two taps
        ),
        (tied, {"w": w, "v": v}, (6, 4), {"w": "used 2 times in one forward pass (shared)"}),
        (
            scaled_into_jit,
            {"w": w, "g": v[:, 0], "v": v},
            (6, 4),
            {"g": "a scaled parameter passed into a jitted function"},
        ),
        (
            middle_axis,
            {"w": w, "g": v[:, 0], "v": v},
            (6, 4),
            {"g": "a product that is not a scale (a 1-D parameter over the last axis)"},
        ),
        (
            positions,
            {"w": w, "pos": w[:3] + 1.0, "v": v},
            (5, 3, 4),
            {"pos": "layer input axis 0 is not the example axis", "w": "fast"},
        ),
        (
            folded_scale,
            {"w": w, "g": v[:, 0], "v": v},
            (6, 4),
            {"g": "a scaled parameter returned by a jitted function", "w": "fast"},
        ),
        (
            again,
            {"w": w, "v": v},
            (6, 4),
            {"w": "fast"},
        ),
        (
            one_channel,
            {"k": k[:, :, :1, :1].reshape(1, 1, 3, 3), "b": jnp.ones(1), "v": v},
            (2, 1, 5, 3),
            {
                "k": "fast",
                "b": "an addition that is not a bias (a 1-D parameter over the last axis)",
            },
        ),
        (
            lambda p, x: x @ p["v"],
            {"v": v, "unused": w},
            (6, 4),
            {"unused": "not used by the model"},
        ),
    ]
    for f, params, shape, reasons in cases:
        x = jnp.asarray(rng.standard_normal(shape))
        lin = linearize(f, params, x)
        for name, reason in reasons.items():
            assert lin.fast_path_reasons[name] == reason, (name, dict(lin.fast_path_reasons))
        # Not every parameter has a rule: the per-example vmap computes them all.
        U = jnp.ones((shape[0], 2, *lin.logits.shape[1:]))
        assert_close(
            lin.sum_squared_per_example_vjp(U), _per_example_squares(lin, U), rtol=1e-12, atol=1e-14
        )


def test_layer_rules_on_a_flax_mlp() -> None:
    nn = pytest.importorskip("flax.linen")
    from fisherbound.fisher import fisher_diagonal

    class MLP(nn.Module):  # type: ignore[misc, name-defined]
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

    model = MLP()
    x = jnp.asarray(np.random.default_rng(53).standard_normal((6, 5)), dtype=jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    lin = linearize(lambda p, xb: model.apply({"params": p}, xb), params, x)
    assert set(lin.fast_path_reasons.values()) == {"fast"}
    U = jnp.asarray(np.random.default_rng(54).standard_normal((6, 2, 3)), dtype=jnp.float32)
    assert_close(
        lin.sum_squared_per_example_vjp(U), _per_example_squares(lin, U), rtol=1e-5, atol=1e-7
    )
    assert fisher_diagonal(lin).shape == (lin.num_params,)

    class CNN(nn.Module):  # type: ignore[misc, name-defined]
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
            return nn.Dense(3)(h.reshape((h.shape[0], -1)))

    cnn = CNN()
    xc = jnp.asarray(np.random.default_rng(55).standard_normal((6, 7, 7, 2)), dtype=jnp.float32)
    cparams = cnn.init(jax.random.key(0), xc)["params"]
    lin = linearize(lambda p, xb: cnn.apply({"params": p}, xb), cparams, xc)
    assert set(lin.fast_path_reasons.values()) == {"fast"}
    assert_close(
        lin.sum_squared_per_example_vjp(U), _per_example_squares(lin, U), rtol=1e-5, atol=1e-7
    )


def test_layer_rules_on_flax_and_equinox_tokens_and_norms() -> None:
    nn = pytest.importorskip("flax.linen")
    eqx = pytest.importorskip("equinox")

    class Tokens(nn.Module):  # type: ignore[misc, name-defined]
        @nn.compact
        def __call__(self, ids: Any) -> Any:
            return nn.Dense(5)(nn.LayerNorm()(nn.Embed(20, 8)(ids)))

    ids = jnp.asarray(np.random.default_rng(56).integers(0, 20, (6, 4)), dtype=jnp.int32)
    U = jnp.asarray(np.random.default_rng(57).standard_normal((6, 2, 4, 5)), dtype=jnp.float32)
    model = Tokens()
    params = model.init(jax.random.key(0), ids)["params"]
    flax_lin = linearize(lambda p, x: model.apply({"params": p}, x), params, ids)

    class EqxTokens(eqx.Module):  # type: ignore[misc, name-defined]
        emb: Any
        norm: Any
        out: Any

        def __init__(self, key: Any) -> None:
            k1, k2 = jax.random.split(key)
            self.emb = eqx.nn.Embedding(20, 8, key=k1)
            self.norm = eqx.nn.LayerNorm(8)
            self.out = eqx.nn.Linear(8, 5, key=k2)

        def __call__(self, ids: Any) -> Any:  # one example's tokens
            return jax.vmap(lambda i: self.out(self.norm(self.emb(i))))(ids)

    eparams, static = eqx.partition(EqxTokens(jax.random.key(1)), eqx.is_array)
    eqx_lin = linearize(lambda p, x: jax.vmap(eqx.combine(p, static))(x), eparams, ids)
    for lin in (flax_lin, eqx_lin):
        assert set(lin.fast_path_reasons.values()) == {"fast"}, dict(lin.fast_path_reasons)
        assert_close(
            lin.sum_squared_per_example_vjp(U), _per_example_squares(lin, U), rtol=1e-5, atol=1e-6
        )

    class Normed(nn.Module):  # type: ignore[misc, name-defined]
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x))
            h = nn.RMSNorm()(nn.GroupNorm(num_groups=2)(nn.relu(h)))
            return nn.Dense(3)(h.reshape((h.shape[0], -1)))

    x = jnp.asarray(np.random.default_rng(58).standard_normal((4, 5, 5, 2)), dtype=jnp.float32)
    normed = Normed()
    variables = normed.init(jax.random.key(2), x)
    stats = jax.tree_util.tree_map(lambda a: a + 0.5, {"batch_stats": variables["batch_stats"]})
    lin = linearize(
        lambda p, xb, s: normed.apply({"params": p, **s}, xb), variables["params"], x, state=stats
    )
    assert set(lin.fast_path_reasons.values()) == {"fast"}, dict(lin.fast_path_reasons)
    U = U[:4, :, 0, :3]
    assert_close(
        lin.sum_squared_per_example_vjp(U), _per_example_squares(lin, U), rtol=1e-5, atol=1e-5
    )


def test_exact_diagonal_is_one_compiled_call_per_batch() -> None:
    """fisher_diagonal / fisher_trace of an eager JAX linearization run the batch as one
    compiled program (the factor's columns, the squared sums, the checks' flags), compiled
    once per model and shapes, with the eager per-chunk pass's values; a model coupling
    its examples gets the exact path; softmax outputs are still refused with the message."""
    from fisherbound._quantities import Diagonal
    from fisherbound.families import Categorical
    from fisherbound.fisher import _exact, fisher_diagonal, fisher_trace

    rng = np.random.default_rng(40)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 4))),
        "w2": jnp.asarray(rng.standard_normal((4, 3))),
    }
    import collections

    traces: collections.deque[int] = collections.deque()  # keyed by identity, not content

    def apply(p: dict, x: Any) -> Any:
        traces.append(1)
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    def coupled(p: dict, x: Any) -> Any:
        h = jnp.tanh(x @ p["w1"])
        return (h - h.mean(0)) @ p["w2"]

    x = jnp.asarray(rng.standard_normal((6, 3)))
    for fn in (apply, coupled):
        lin = linearize(fn, params, x)
        assert lin._independent is None  # not checked yet
        got = fisher_diagonal(lin, max_vectors=2)  # 3 chunks of 2 columns: one program
        assert lin._independent is (fn is apply)  # read with the program's flags
        opts = ("fisher_diagonal", "sum", 2, 4096, 2**27, False, None)
        from fisherbound.fisher import _Options

        want = _exact(lin, Categorical(), "exact", Diagonal(), _Options(*opts))  # eager
        assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert_close(fisher_trace(lin, max_vectors=2), jnp.sum(want), rtol=1e-12, atol=0)
        programs = [
            k for k in lin._kernels.cache if isinstance(k, tuple) and k[0] == "compiled pass"
        ]
        assert programs
    count = len(traces)
    for seed in (41, 42):  # new values, same shapes: no new trace of apply_fn
        xb = jnp.asarray(np.random.default_rng(seed).standard_normal((6, 3)))
        fisher_diagonal(linearize(apply, params, xb), max_vectors=2)
    assert len(traces) == count
    stream = fisher_diagonal(linearizations(apply, params, [x, x[:4]]), max_vectors=2)
    assert_close(
        stream,
        fisher_diagonal(linearize(apply, params, x), max_vectors=2)
        + fisher_diagonal(linearize(apply, params, x[:4]), max_vectors=2),
        rtol=1e-12,
        atol=1e-15,
    )
    soft = linearize(lambda p, xb: jax.nn.softmax(apply(p, xb)), params, x)
    with pytest.raises(ValueError, match=r"batch 0 look like softmax probabilities"):
        fisher_diagonal(soft)
    # Columns that max_memory does not hold all at once: the pass by chunks, no program.
    other = linearize(lambda p, xb: 2.0 * jnp.tanh(xb @ p["w1"]) @ p["w2"], params, x)
    got = fisher_diagonal(other, max_memory=1)
    assert not [k for k in other._kernels.cache if isinstance(k, tuple) and k[0] == "compiled pass"]
    assert_close(got, fisher_diagonal(other), rtol=1e-12, atol=1e-15)  # by one program
    assert [k for k in other._kernels.cache if isinstance(k, tuple) and k[0] == "compiled pass"]


def test_only_families_declaring_traceable_methods_run_in_compiled_programs() -> None:
    """A family's class declares its methods traceable (the built-in ones do); a subclass,
    which may override a method with host code, does not inherit the declaration: its
    exact diagonal takes the eager pass and its Fisher operator the Python loop, with the
    same values."""
    from fisherbound.families import Bernoulli, Categorical, Gaussian
    from fisherbound.fisher import fisher_diagonal, fisher_operator

    class Tempered(Categorical):  # the same metric, but declared by no one (not inherited)
        __slots__ = ()

    assert all(f._traces_under_jit() for f in (Categorical(), Bernoulli(), Gaussian()))
    assert not Tempered()._traces_under_jit()
    rng = np.random.default_rng(44)
    w = {"w": jnp.asarray(rng.standard_normal((3, 4)))}
    x = jnp.asarray(rng.standard_normal((5, 3)))

    def compiled(lin: Any) -> list[Any]:
        return [k for k in lin._kernels.cache if isinstance(k, tuple) and k[0] == "compiled pass"]

    lin = linearize(lambda p, xb: jnp.tanh(xb @ p["w"]), w, x)
    got = fisher_diagonal(lin, Tempered())
    assert not compiled(lin)
    assert fisher_operator(lin, Tempered()).traceable is None
    assert_close(got, fisher_diagonal(lin, Categorical()), rtol=1e-12, atol=1e-15)
    assert compiled(lin)
    assert fisher_operator(lin, Categorical()).traceable is not None


def test_one_compiled_call_keeps_the_eager_errors() -> None:
    """The one-call pass says what the eager pass says: softmax outputs before a cotangent
    limit, and a result that is not finite (from finite inputs and logits) is refused."""
    from fisherbound.fisher import fisher_diagonal, fisher_trace

    rng = np.random.default_rng(43)
    w = {"w": jnp.asarray(rng.standard_normal((3, 4)))}
    x = jnp.asarray(rng.standard_normal((5, 3)))
    soft = linearize(lambda p, xb: jax.nn.softmax(xb @ p["w"]), w, x)
    with pytest.raises(ValueError, match=r"batch 0 look like softmax probabilities"):
        fisher_diagonal(soft, max_cotangents=1)
    # d sqrt|x w| / dw is infinite where x w = 0: finite logits, a result that is not.
    x0 = x.at[0].set(0.0)
    kinked = linearize(lambda p, xb: jnp.sqrt(jnp.abs(xb @ p["w"])), w, x0)
    for fn in (fisher_diagonal, fisher_trace):
        with pytest.raises(ValueError, match=r"per-example squares.*must be finite"):
            fn(kinked)
