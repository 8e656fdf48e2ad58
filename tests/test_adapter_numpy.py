"""The NumPy reference adapter: the model contract on every backend, brute force."""

from __future__ import annotations

import doctest
import importlib
from typing import Any

import numpy as np
import pytest
from _assertions import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound._lib import device_of
from fisherbound.adapters import numpy as ref
from fisherbound.adapters.numpy import MLP, LinearSoftmax, linearizations, linearize
from fisherbound.linearization import Linearization, LinearizationBase

N, C, D_IN = 5, 3, 4

# Every model has 4 inputs and C = 3 outputs; hidden widths are shared so that JAX
# compiles each operation for few distinct shapes.
KINDS = {
    "linear": lambda **kw: LinearSoftmax.random(D_IN, C, **kw),
    "linear-nobias": lambda **kw: LinearSoftmax.random(D_IN, C, bias=False, **kw),
    "tanh": lambda **kw: MLP.random([D_IN, 8, 8, C], activation="tanh", **kw),
    "relu": lambda **kw: MLP.random([D_IN, 8, 8, 8, C], activation="relu", **kw),
}
CONTRACT_KINDS = ["linear", "tanh", "relu"]


def make(backend: Any, kind: str, *, dtype: str = "float64", seed: int = 0) -> tuple[Any, Any]:
    """A model of ``kind`` and a batch of N inputs on ``backend``."""
    model = KINDS[kind](
        rng=seed, xp=backend.xp, device=backend.device, dtype=getattr(backend.xp, dtype)
    )
    x = np.random.default_rng(seed + 100).standard_normal((N, D_IN))
    return model, backend.asarray(x, dtype=dtype)


def randn(backend: Any, shape: tuple[int, ...], seed: int, dtype: str = "float64") -> Any:
    return backend.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def dense_jacobian_from_jvps(backend: Any, lin: Any) -> np.ndarray:
    """J (N, C, D) from D forward products with the unit vectors."""
    eye = np.eye(lin.num_params)
    cols = [backend.to_numpy(lin.jvp(backend.asarray(eye[j]))) for j in range(lin.num_params)]
    return np.stack(cols, axis=-1)


def dense_jacobian_from_vjps(backend: Any, lin: Any) -> np.ndarray:
    """J (N, C, D) from N·C reverse products with the unit cotangents."""
    n, c = lin.num_inputs, lin.num_outputs
    rows = np.zeros((n, c, lin.num_params))
    for i in range(n):
        for k in range(c):
            e = np.zeros((n, c))
            e[i, k] = 1.0
            rows[i, k] = backend.to_numpy(lin.vjp(backend.asarray(e)))
    return rows


# ----------------------------------------------------------------------------
# The contract, on every backend
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_jvp_matches_central_differences(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    assert isinstance(lin, Linearization)
    assert isinstance(lin, LinearizationBase)
    theta = model.parameters()
    v = randn(backend, (model.num_params,), seed=1)
    eps = 1e-5
    plus = backend.to_numpy(model.with_parameters(theta + eps * v)(x))
    minus = backend.to_numpy(model.with_parameters(theta - eps * v)(x))
    fd = (plus - minus) / (2 * eps)
    # Central differences: truncation eps²/6 |z'''| (|z'''| = O(10) here) plus
    # rounding 1e-16 |z| / eps; 1e-7 is well above both and far below |J v| = O(1).
    jv = backend.to_numpy(lin.jvp(v))
    assert jv.shape == (N, C)
    np.testing.assert_allclose(jv, fd, rtol=0, atol=1e-7)
    assert np.max(np.abs(jv)) > 1e-2


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_adjoint(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    xp = backend.xp
    for seed in range(3):
        v = randn(backend, (model.num_params,), seed=10 + seed)
        u = randn(backend, (N, C), seed=20 + seed)
        lhs = float(backend.to_numpy(xp.sum(u * lin.jvp(v))))
        rhs = float(backend.to_numpy(xp.sum(lin.vjp(u) * v)))
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_dense_jacobian_from_jvps_equals_from_vjps(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    forward = dense_jacobian_from_jvps(backend, lin)
    reverse = dense_jacobian_from_vjps(backend, lin)
    assert forward.shape == (N, C, model.num_params)
    np.testing.assert_allclose(forward, reverse, rtol=0, atol=1e-10)
    # The batched forward product with the identity gives the same Jacobian.
    xp = backend.xp
    batch = lin.jvp_batch(xp.eye(model.num_params, dtype=xp.float64, device=backend.device))
    np.testing.assert_allclose(
        np.moveaxis(backend.to_numpy(batch), 0, -1), forward, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_batched_products_equal_loops(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    xp = backend.xp
    V = randn(backend, (3, model.num_params), seed=2)
    U = randn(backend, (4, N, C), seed=3)
    jb = lin.jvp_batch(V)
    vb = lin.vjp_batch(U)
    assert tuple(jb.shape) == (3, N, C)
    assert tuple(vb.shape) == (4, model.num_params)
    loop_j = xp.stack([lin.jvp(V[m, ...]) for m in range(3)], axis=0)
    loop_v = xp.stack([lin.vjp(U[m, ...]) for m in range(4)], axis=0)
    assert_close(jb, loop_j, rtol=1e-7, atol=1e-12)
    assert_close(vb, loop_v, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_per_example_vjp_equals_vjp_on_one_example(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    K = 2
    U_np = np.random.default_rng(4).standard_normal((N, K, C))
    pe = backend.to_numpy(lin.per_example_vjp(backend.asarray(U_np)))
    assert pe.shape == (N, K, model.num_params)
    for n in range(N):
        for k in range(K):
            u = np.zeros((N, C))
            u[n] = U_np[n, k]
            expected = backend.to_numpy(lin.vjp(backend.asarray(u)))
            np.testing.assert_allclose(pe[n, k], expected, rtol=0, atol=1e-12)
    # Summed over examples, the per-example products are the ordinary VJP.
    total = backend.to_numpy(lin.vjp(backend.asarray(U_np[:, 0, :])))
    np.testing.assert_allclose(pe[:, 0, :].sum(axis=0), total, atol=1e-12)
    # A slice of the batch gives the same rows without a new forward pass.
    part = lin.per_example_vjp(backend.asarray(U_np[1:3]), examples=slice(1, 3))
    assert_close(part, pe[1:3], rtol=1e-7, atol=1e-12, like=backend)


@pytest.mark.parametrize("kind", CONTRACT_KINDS)
def test_sum_squared_per_example_vjp(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    K = 3
    U = randn(backend, (N, K, C), seed=5)
    pe = backend.to_numpy(lin.per_example_vjp(U))
    expected = np.sum(pe * pe, axis=0)
    assert np.all(expected.max(axis=1) > 0)
    for max_vectors in (1, 7, None):
        got = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors)
        assert tuple(got.shape) == (K, model.num_params)
        assert_close(got, expected, rtol=1e-12, atol=1e-13, like=backend)
        summed = lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors, sum_cotangents=True)
        assert tuple(summed.shape) == (model.num_params,)
        assert_close(summed, expected.sum(axis=0), rtol=1e-12, atol=1e-13, like=backend)


def test_sum_squared_default_max_vectors_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunking follows ``default_max_vectors`` and does not change the result."""
    model = MLP.random([3, 6, 2], rng=7)
    x = np.random.default_rng(8).standard_normal((40, 3))
    lin = linearize(model, x)
    U = np.random.default_rng(9).standard_normal((40, 2, 2))
    whole = lin.sum_squared_per_example_vjp(U)
    calls: list[tuple[int, int]] = []
    original = lin._sum_squared

    def spy(xp: Any, Uc: Any, start: int, stop: int, sum_cotangents: bool = False) -> Any:
        calls.append((start, stop))
        return original(xp, Uc, start, stop, sum_cotangents)

    monkeypatch.setattr(lin, "_sum_squared", spy)
    monkeypatch.setattr(lin, "default_max_vectors", 1)
    chunked = lin.sum_squared_per_example_vjp(U)
    assert len(calls) > 1
    # Chunks cover the examples once, in order.
    assert calls[0][0] == 0
    assert calls[-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(calls[:-1], calls[1:], strict=True))
    np.testing.assert_allclose(chunked, whole, rtol=1e-13)


def test_results_keep_dtype_and_device(backend: Any) -> None:
    for dtype in ("float32", "float64"):
        model, x = make(backend, "tanh", dtype=dtype)
        lin = linearize(model, x)
        want = getattr(backend.xp, dtype)
        v = randn(backend, (model.num_params,), seed=1, dtype=dtype)
        u = randn(backend, (N, C), seed=2, dtype=dtype)
        U = randn(backend, (N, 2, C), seed=3, dtype=dtype)
        outs = [
            lin.logits,
            lin.jvp(v),
            lin.vjp(u),
            lin.jvp_batch(backend.xp.reshape(v, (1, -1))),
            lin.vjp_batch(backend.xp.reshape(u, (1, N, C))),
            lin.per_example_vjp(U),
            lin.sum_squared_per_example_vjp(U),
            model.parameters(),
            model(x),
        ]
        for out in outs:
            assert out.dtype == want
            assert device_of(out) == device_of(x)
        assert lin.dtype == want


def test_float32_operands_are_cast_to_the_model_dtype(backend: Any) -> None:
    model, x = make(backend, "tanh")
    lin = linearize(model, x)
    v64 = randn(backend, (model.num_params,), seed=1)
    v32 = backend.xp.astype(v64, backend.xp.float32)
    out = lin.jvp(v32)
    assert out.dtype == backend.xp.float64
    assert_close(out, lin.jvp(v64), rtol=1e-6, atol=1e-6)
    # float32 inputs into a float64 model are cast, too.
    lin32 = linearize(model, backend.xp.astype(x, backend.xp.float32))
    assert lin32.logits.dtype == backend.xp.float64


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_layout(backend: Any, kind: str) -> None:
    model, x = make(backend, kind)
    lin = linearize(model, x)
    assert lin.blocks == model.blocks
    names = [b.name for b in lin.blocks]
    if isinstance(model, LinearSoftmax):
        weights, biases = [model.weight], [model.bias]
        expected_names = ["weight"] + (["bias"] if model.bias is not None else [])
    else:
        weights, biases = list(model.weights), list(model.biases)
        expected_names = []
        for i in range(len(weights)):
            expected_names += [f"layers.{i}.weight", f"layers.{i}.bias"]
    assert names == expected_names
    tensors = [t for pair in zip(weights, biases, strict=True) for t in pair if t is not None]
    theta = backend.to_numpy(model.parameters())
    offset = 0
    for block, t in zip(lin.blocks, tensors, strict=True):
        assert block.shape == tuple(t.shape)
        assert block.offset == offset
        assert block.size == int(np.prod(block.shape))
        np.testing.assert_array_equal(
            theta[block.offset : block.offset + block.size].reshape(block.shape),
            backend.to_numpy(t),
        )
        offset += block.size
    assert offset == model.num_params == lin.num_params == theta.shape[0]
    # Round trip through the flat vector.
    again = model.with_parameters(model.parameters())
    assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.blocks == model.blocks


def test_block_gradients_are_outer_products(backend: Any) -> None:
    """Jᵀ u restricted to the last layer's weight block is δᵀ a (a = last hidden layer)."""
    model, x = make(backend, "tanh")
    lin = linearize(model, x)
    u_np = np.random.default_rng(6).standard_normal((N, C))
    g = backend.to_numpy(lin.vjp(backend.asarray(u_np)))
    W = [backend.to_numpy(w) for w in model.weights]
    b = [backend.to_numpy(c) for c in model.biases]
    a = backend.to_numpy(x)
    for w, c in zip(W[:-1], b[:-1], strict=True):
        a = np.tanh(a @ w.T + c)
    block = next(bl for bl in lin.blocks if bl.name == "layers.2.weight")
    got = g[block.offset : block.offset + block.size].reshape(block.shape)
    np.testing.assert_allclose(got, u_np.T @ a, atol=1e-12)
    bias = next(bl for bl in lin.blocks if bl.name == "layers.2.bias")
    np.testing.assert_allclose(g[bias.offset : bias.offset + bias.size], u_np.sum(0), atol=1e-12)


def test_logits_match_a_numpy_forward_pass(backend: Any) -> None:
    model, x = make(backend, "relu")
    a = backend.to_numpy(x)
    W = [backend.to_numpy(w) for w in model.weights]
    b = [backend.to_numpy(c) for c in model.biases]
    for w, c in zip(W[:-1], b[:-1], strict=True):
        a = np.maximum(a @ w.T + c, 0.0)
    z = a @ W[-1].T + b[-1]
    assert_close(model(x), z, rtol=1e-7, atol=1e-13, like=backend)
    assert_close(linearize(model, x).logits, z, rtol=1e-7, atol=1e-13, like=backend)


# ----------------------------------------------------------------------------
# THEORY reference value: linear softmax, C = 3, x = (1, 2), W = 0
# ----------------------------------------------------------------------------


def test_linear_softmax_reference_fisher(backend: Any) -> None:
    xp = backend.xp
    model = LinearSoftmax(backend.asarray(np.zeros((3, 2))))
    x_np = np.array([[1.0, 2.0]])
    lin = linearize(model, backend.asarray(x_np))
    D = model.num_params
    assert D == 6
    assert [b.name for b in lin.blocks] == ["weight"]
    # Per-example Jacobians J_n (C, D) from D forward products.
    eye = xp.eye(D, dtype=xp.float64, device=backend.device)
    J = xp.permute_dims(lin.jvp_batch(eye), (1, 2, 0))  # (N, C, D)
    # The core metric I_Δ(z) = diag(p) − p pᵀ, written out here.
    z = lin.logits
    e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
    p = e / xp.sum(e, axis=1, keepdims=True)
    n, c = z.shape
    eye_c = xp.eye(c, dtype=xp.float64, device=backend.device)
    core = xp.reshape(p, (n, c, 1)) * eye_c - xp.reshape(p, (n, c, 1)) * xp.reshape(p, (n, 1, c))
    F = xp.sum(xp.matmul(xp.matmul(xp.matrix_transpose(J), core), J), axis=0)
    eig = np.sort(backend.to_numpy(xp.linalg.eigvalsh(F)))[::-1]
    F_np = backend.to_numpy(F)
    core_np = np.eye(3) / 3 - np.ones((3, 3)) / 9
    np.testing.assert_allclose(F_np, np.kron(core_np, np.outer(x_np[0], x_np[0])), atol=1e-12)
    np.testing.assert_allclose(eig, [5 / 3, 5 / 3, 0, 0, 0, 0], atol=1e-9)
    assert abs(np.trace(F_np) - 10 / 3) < 1e-9
    # The exact diagonal through the fast path: U[n, r] = column r of B(z_n).
    B = xp.reshape(xp.sqrt(p), (n, 1, c)) * (eye_c - xp.reshape(p, (n, c, 1)))
    diag = xp.sum(lin.sum_squared_per_example_vjp(xp.matrix_transpose(B)), axis=0)
    assert_close(diag, np.diag(F_np), rtol=1e-7, atol=1e-12, like=backend)


def test_one_layer_mlp_equals_linear_softmax_with_bias(backend: Any) -> None:
    lsm, x = make(backend, "linear")
    mlp = MLP([lsm.weight], [lsm.bias], activation="relu")
    a, b = linearize(lsm, x), linearize(mlp, x)
    U = randn(backend, (N, 2, C), seed=3)
    v = randn(backend, (lsm.num_params,), seed=4)
    assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert_close(a.jvp(v), b.jvp(v), rtol=1e-7, atol=1e-14)
    assert_close(a.per_example_vjp(U), b.per_example_vjp(U), rtol=1e-7, atol=1e-14)


def test_relu_derivative_is_zero_at_zero(backend: Any) -> None:
    """A hidden unit with pre-activation exactly 0 passes no gradient (φ'(0) = 0)."""
    W1 = np.array([[1.0, -1.0], [0.0, 0.0]])  # unit 1 has h = 0 for every input
    b1 = np.array([0.5, 0.0])
    W2 = np.array([[1.0, 2.0], [1.0, 3.0]])
    b2 = np.zeros(2)
    model = MLP(
        [backend.asarray(t) for t in (W1, W2)],
        [backend.asarray(t) for t in (b1, b2)],
        activation="relu",
    )
    x = backend.asarray(np.array([[1.0, 0.5], [0.2, -0.3], [2.0, 1.0]]))
    lin = linearize(model, x)
    g = backend.to_numpy(lin.vjp(backend.asarray(np.ones((3, 2)))))
    w1 = g[0:4].reshape(2, 2)
    assert np.all(w1[1] == 0.0)  # row of the unit at the kink
    assert np.any(w1[0] != 0.0)
    assert g[5] == 0.0  # its bias
    # With tanh the same unit does pass gradient (tanh'(0) = 1).
    tanh_model = MLP(list(model.weights), list(model.biases), activation="tanh")
    gt = backend.to_numpy(linearize(tanh_model, x).vjp(backend.asarray(np.ones((3, 2)))))
    assert np.all(gt[0:4].reshape(2, 2)[1] != 0.0)


def test_random_models_are_the_same_on_every_backend(backend: Any) -> None:
    model = MLP.random(
        [3, 5, 2], rng=11, xp=backend.xp, device=backend.device, dtype=backend.xp.float64
    )
    host = MLP.random([3, 5, 2], rng=11)
    assert_close(model.parameters(), host.parameters(), rtol=0, atol=0, like=backend)
    assert device_of(model.parameters()) == device_of(backend.asarray(np.zeros(1)))
    # Glorot scale and small biases.
    w = host.weights[0]
    assert 0.2 < float(np.std(w)) < 1.2
    assert float(np.max(np.abs(host.biases[0]))) < 0.5
    lsm = LinearSoftmax.random(3, 2, rng=11, xp=backend.xp, device=backend.device, dtype="float32")
    assert lsm.dtype == backend.xp.float32


def test_random_defaults() -> None:
    a, b = MLP.random([2, 3, 2], rng=5), MLP.random([2, 3, 2], rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.parameters(), b.parameters())
    assert a.parameters().dtype == np.float64
    assert type(a.parameters()) is np.ndarray
    assert a.activation == "tanh"
    assert a.sizes == [2, 3, 2]
    assert a.num_classes == 2
    assert a.in_features == 2
    assert repr(a) == "MLP(sizes=[2, 3, 2], activation='tanh', dtype=float64)"
    lsm = LinearSoftmax.random(2, 3, bias=False, rng=0)
    assert lsm.bias is None
    assert repr(lsm) == "LinearSoftmax(d=2, C=3, bias=False, dtype=float64)"


def test_random_default_dtype_follows_the_namespace() -> None:
    import array_api_compat

    torch = pytest.importorskip("torch")

    xt = array_api_compat.array_namespace(torch.zeros(1))
    model = MLP.random([2, 3, 2], rng=0, xp=xt)
    assert model.dtype == torch.get_default_dtype()
    assert isinstance(model.weights[0], torch.Tensor)


# ----------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------


def test_linearizations_streams_lazily(backend: Any) -> None:
    model, x = make(backend, "tanh")
    y = backend.asarray(np.zeros(N))
    consumed: list[int] = []

    def batches() -> Any:
        for i, b in enumerate([x, (x[:2, ...], y[:2]), [x[2:, ...]]]):
            consumed.append(i)
            yield b

    it = linearizations(model, batches())
    assert consumed == []
    first = next(it)
    assert consumed == [0]
    rest = list(it)
    assert consumed == [0, 1, 2]
    assert [lin.num_inputs for lin in [first, *rest]] == [N, 2, N - 2]
    assert_close(
        rest[0].logits, backend.to_numpy(first.logits)[:2], rtol=1e-7, atol=1e-14, like=backend
    )
    assert all(lin.model is model for lin in rest)


def test_linearizations_errors() -> None:
    model = LinearSoftmax.random(2, 3, rng=0)
    with pytest.raises(TypeError, match=r"model must be one of the reference models"):
        linearizations(object(), [])
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches"):
        linearizations(model, 3)
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches"):
        linearizations(model, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"batch 1 must be an array or a non-empty tuple"):
        list(linearizations(model, [np.ones((1, 2)), ()]))
    with pytest.raises(TypeError, match=r"batch 0 must be an inputs array or a tuple"):
        list(linearizations(model, [{"x": np.ones((1, 2))}]))
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, 2\)"):
        list(linearizations(model, [(np.ones((1, 3)), 0)]))


# ----------------------------------------------------------------------------
# Bad input: every message
# ----------------------------------------------------------------------------


def test_bad_model_type() -> None:
    with pytest.raises(
        TypeError,
        match=r"model must be one of the reference models .*"
        r"\(LinearSoftmax, MLP\); got builtins.dict",
    ):
        linearize({}, np.ones((1, 2)))


def test_bad_inputs(backend: Any) -> None:
    model, x = make(backend, "tanh")
    xp = backend.xp
    with pytest.raises(
        ValueError,
        match=r"inputs must be a 2-D array of shape \(N, 4\); got "
        r"shape \(4,\)",
    ):
        linearize(model, x[0, ...])
    with pytest.raises(
        ValueError,
        match=r"inputs must have shape \(N, 4\) for this model "
        r"\(expected width 4\); got shape \(5, 3\)",
    ):
        linearize(model, x[:, :3])
    with pytest.raises(TypeError, match=r"inputs must have a real floating-point dtype"):
        linearize(model, xp.ones((2, 4), dtype=xp.int64, device=backend.device))
    with pytest.raises(ValueError, match=r"inputs must hold at least one row"):
        linearize(model, x[:0, ...])
    bad = np.ones((6, 4))
    bad[2, 1] = np.nan
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"inputs must be finite; got NaN in rows \[2, 4\]"):
        linearize(model, backend.asarray(bad))
    with pytest.raises(ValueError, match=r"inputs must be a 2-D array"):
        model(x[0, ...])


def test_mixed_namespaces() -> None:
    import array_api_compat

    torch = pytest.importorskip("torch")

    xt = array_api_compat.array_namespace(torch.zeros(1))
    model = MLP.random([4, 3, 2], rng=0, xp=xt, dtype=torch.float64)
    with pytest.raises(
        TypeError,
        match=r"one array library; inputs is a numpy array but the "
        r"model's weight is a torch array",
    ):
        linearize(model, np.ones((2, 4)))
    lin = linearize(model, torch.ones((2, 4), dtype=torch.float64))
    with pytest.raises(TypeError, match=r"one array library; v is a numpy array"):
        lin.jvp(np.ones(model.num_params))
    with pytest.raises(TypeError, match=r"one array library; theta is a numpy array"):
        model.with_parameters(np.ones(model.num_params))
    with pytest.raises(TypeError, match=r"one array library"):
        MLP([torch.ones((2, 2), dtype=torch.float64)], [np.ones(2)])


def test_device_mismatch() -> None:
    xs = pytest.importorskip("array_api_strict")
    dev1, cpu = xs.Device("device1"), xs.Device("CPU_DEVICE")
    model = LinearSoftmax.random(2, 3, rng=0, xp=xs, device=dev1, dtype=xs.float64)
    with pytest.raises(ValueError, match=r"inputs must be on the model's device"):
        linearize(model, xs.ones((1, 2), dtype=xs.float64, device=cpu))
    lin = linearize(model, xs.ones((1, 2), dtype=xs.float64, device=dev1))
    with pytest.raises(ValueError, match=r"u must be on the linearization's device"):
        lin.vjp(xs.ones((1, 3), dtype=xs.float64, device=cpu))
    with pytest.raises(ValueError, match=r"bias must be on the device of weight"):
        LinearSoftmax(
            xs.ones((3, 2), dtype=xs.float64, device=dev1),
            xs.ones((3,), dtype=xs.float64, device=cpu),
        )


def test_bad_operands(backend: Any) -> None:
    model, x = make(backend, "tanh")
    lin = linearize(model, x)
    xp, D = backend.xp, model.num_params
    with pytest.raises(ValueError, match=rf"v must have shape \(D,\) = \({D},\); got shape"):
        lin.jvp(randn(backend, (D + 1,), 0))
    with pytest.raises(ValueError, match=rf"V must have shape \(M, D\) = \(M, {D}\); got shape"):
        lin.jvp_batch(randn(backend, (D,), 0))
    with pytest.raises(
        ValueError,
        match=r"u must have shape \(N, C\) = \(5, 3\); got shape "
        r"\(3, 5\)",
    ):
        lin.vjp(randn(backend, (3, 5), 0))
    with pytest.raises(ValueError, match=r"U must have shape \(M, N, C\) = \(M, 5, 3\)"):
        lin.vjp_batch(randn(backend, (2, 4, 3), 0))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, C\) = \(5, K, 3\)"):
        lin.per_example_vjp(randn(backend, (5, 3), 0))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, C\) = \(2, K, 3\)"):
        lin.per_example_vjp(randn(backend, (5, 1, 3), 0), examples=slice(1, 3))
    with pytest.raises(TypeError, match="examples must be a contiguous slice"):
        lin.per_example_vjp(randn(backend, (5, 1, 3), 0), examples=[0, 1])
    with pytest.raises(ValueError, match=r"U must have shape \(N, K, C\)"):
        lin.sum_squared_per_example_vjp(randn(backend, (4, 1, 3), 0))
    with pytest.raises(TypeError, match=r"v must have a real floating-point dtype"):
        lin.jvp(xp.ones((D,), dtype=xp.int64, device=backend.device))
    with pytest.raises(ValueError, match=r"max_vectors must be an integer >= 1; got 0"):
        lin.sum_squared_per_example_vjp(randn(backend, (5, 1, 3), 0), max_vectors=0)
    with pytest.raises(TypeError, match=r"max_vectors must be an integer >= 1; got float"):
        lin.sum_squared_per_example_vjp(randn(backend, (5, 1, 3), 0), max_vectors=1.5)
    with pytest.raises(ValueError, match=rf"theta must be a flat vector of shape \({D},\)"):
        model.with_parameters(randn(backend, (D - 1,), 0))


def test_non_finite_parameters() -> None:
    model = LinearSoftmax(np.array([[np.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(
        ValueError,
        match=r"parameters must be finite; got NaN or inf in \['weight'\]\. A model with",
    ):
        linearize(model, np.array([[1.0, 1.0], [2.0, 1.0]]))


def test_bad_constructors() -> None:
    w, b = np.ones((3, 2)), np.ones(3)
    with pytest.raises(
        ValueError,
        match=r"weight must be a 2-D array \(out, in\); got shape "
        r"\(3,\)",
    ):
        LinearSoftmax(b)
    with pytest.raises(
        ValueError,
        match=r"bias must have shape \(3,\) to match weight of shape "
        r"\(3, 2\); got shape \(2,\)",
    ):
        LinearSoftmax(w, np.ones(2))
    with pytest.raises(TypeError, match=r"weight must have a real floating-point dtype"):
        LinearSoftmax(np.ones((3, 2), dtype=np.int64))
    with pytest.raises(
        TypeError,
        match=r"bias must have the dtype of weight \(float64\); got "
        r"float32",
    ):
        LinearSoftmax(w, np.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match=r"weight must be an array of an array-API library"):
        LinearSoftmax([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"weight must have at least one row and one column"):
        LinearSoftmax(np.ones((0, 2)))
    w1, w2 = np.ones((4, 2)), np.ones((3, 4))
    b1, b2 = np.ones(4), np.ones(3)
    with pytest.raises(
        ValueError,
        match=r"activation must be one of 'tanh', 'relu'; got "
        r"'sigmoid'",
    ):
        MLP([w1, w2], [b1, b2], activation="sigmoid")
    with pytest.raises(TypeError, match=r"weights must be a list or tuple of arrays"):
        MLP(w1, [b1])
    with pytest.raises(TypeError, match=r"biases must be a list or tuple of arrays"):
        MLP([w1], b1)
    with pytest.raises(ValueError, match=r"weights must hold at least one layer"):
        MLP([], [])
    with pytest.raises(
        ValueError,
        match=r"biases must have one entry per layer \(len\(weights\)"
        r" = 2\); got 1",
    ):
        MLP([w1, w2], [b1])
    with pytest.raises(
        TypeError,
        match=r"biases\[1\] must be an array of shape \(out_1,\); got "
        r"None",
    ):
        MLP([w1, w2], [b1, None])
    with pytest.raises(
        ValueError,
        match=r"weights\[1\] must have 4 columns to follow the "
        r"previous layer's 4 outputs; got shape \(3, 5\)",
    ):
        MLP([w1, np.ones((3, 5))], [b1, b2])
    with pytest.raises(
        ValueError,
        match=r"biases\[0\] must have shape \(4,\) to match "
        r"weights\[0\]",
    ):
        MLP([w1, w2], [b2, b2])
    with pytest.raises(TypeError, match=r"weights\[1\] must have the dtype of weights\[0\]"):
        MLP([w1, w2.astype(np.float32)], [b1, b2])


def test_bad_random_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=r"sizes must be a list or tuple \[d, h_1, \.\.\., C\] "
        r"of at least two layer widths; got \[3\]",
    ):
        MLP.random([3])
    with pytest.raises(ValueError, match=r"sizes\[1\] must be an integer >= 1; got 0"):
        MLP.random([3, 0, 2])
    with pytest.raises(ValueError, match=r"activation must be one of"):
        MLP.random([3, 2], activation="gelu")
    with pytest.raises(ValueError, match=r"C must be an integer >= 1; got 0"):
        LinearSoftmax.random(2, 0)
    with pytest.raises(
        TypeError,
        match=r"dtype must be 'float32', 'float64' or a dtype object; "
        r"got 'int32'",
    ):
        MLP.random([3, 2], dtype="int32")
    with pytest.raises(TypeError, match=r"dtype must have a real floating-point dtype"):
        MLP.random([3, 2], dtype=np.int32)
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        MLP.random([3, 2], rng="seed")


# ----------------------------------------------------------------------------
# Invariants over random architectures, and the documentation examples
# ----------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    n=st.integers(1, 4),
    k=st.integers(1, 3),
    activation=st.sampled_from(["tanh", "relu"]),
    seed=st.integers(0, 2**16),
)
def test_invariants_random_architectures(
    sizes: list[int], n: int, k: int, activation: str, seed: int
) -> None:
    model = MLP.random(sizes, activation=activation, rng=seed)
    rng = np.random.default_rng(seed + 1)
    lin = linearize(model, rng.standard_normal((n, sizes[0])))
    c, D = sizes[-1], model.num_params
    assert lin.logits.shape == (n, c)
    v, u = rng.standard_normal(D), rng.standard_normal((n, c))
    assert abs(np.sum(u * lin.jvp(v)) - np.sum(lin.vjp(u) * v)) <= 1e-12 * max(
        1.0, abs(np.sum(u * lin.jvp(v)))
    )
    U = rng.standard_normal((n, k, c))
    pe = lin.per_example_vjp(U)
    np.testing.assert_allclose(pe.sum(axis=0)[0], lin.vjp(U[:, 0, :]), atol=1e-12)
    for max_vectors in (1, 3):
        np.testing.assert_allclose(
            lin.sum_squared_per_example_vjp(U, max_vectors=max_vectors),
            np.sum(pe**2, axis=0),
            rtol=1e-12,
            atol=1e-14,
        )


def test_docstring_examples() -> None:
    result = doctest.testmod(ref, raise_on_error=False, verbose=False)
    assert result.attempted >= 6
    assert result.failed == 0
    # The models live in a private module (re-exported by ref): their examples too.
    models = importlib.import_module("fisherbound.adapters._numpy_models")
    result = doctest.testmod(models, raise_on_error=False, verbose=False)
    assert result.attempted >= 2
    assert result.failed == 0
