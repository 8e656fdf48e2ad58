"""The exact Fisher metric and its deterministic bounds, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from _assertions import assert_close
from _models import jax_mlp, mlp_weights, torch_mlp

from fisherbound.families import KERNELS, Bernoulli, Categorical, Gaussian
from fisherbound.fisher import (
    Bounds,
    fisher_blocks,
    fisher_bounds,
    fisher_dense,
    fisher_diagonal,
    fisher_operator,
    fisher_trace,
)

FAMILIES = [Categorical(), Bernoulli(), Gaussian()]


def brute_force(lin, family, kernel, to_numpy):
    """Σ_n J_nᵀ K(z_n) J_n from dense per-example Jacobians built column by column."""
    xp = lin.xp
    d = lin.num_params
    eye = xp.eye(d, dtype=lin.logits.dtype, device=lin.device)
    jac = np.stack([to_numpy(lin.jvp(eye[i, ...])) for i in range(d)], axis=-1)  # (N, C, D)
    kz = to_numpy(family.metric(lin.logits, kernel=kernel))  # (N, C, C)
    return np.einsum("ncd,nce,nef->df", jac, kz, jac)


def numpy_mlp(backend, sizes=(3, 5, 4, 3), activation="tanh", seed=0, n=6):
    from fisherbound.adapters.numpy import MLP, linearize

    model = MLP.random(
        list(sizes),
        activation=activation,
        rng=seed,
        xp=backend.xp,
        device=backend.device,
        dtype=backend.xp.float64,
    )
    x = backend.asarray(np.random.default_rng(seed + 100).standard_normal((n, sizes[0])))
    return model, linearize(model, x)


# --------------------------------------------------------------------------- #
# THEORY reference values


def test_linear_softmax_reference(backend) -> None:
    from fisherbound.adapters.numpy import LinearSoftmax, linearize

    model = LinearSoftmax(backend.asarray(np.zeros((3, 2))))
    lin = linearize(model, backend.asarray([[1.0, 2.0]]))
    p = np.full(3, 1 / 3)
    x = np.array([1.0, 2.0])
    expected = np.kron(np.diag(p) - np.outer(p, p), np.outer(x, x))
    dense = backend.to_numpy(fisher_dense(lin, Categorical()))
    np.testing.assert_allclose(dense, expected, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(dense), [0, 0, 0, 0, 5 / 3, 5 / 3], atol=1e-12)
    np.testing.assert_allclose(float(backend.to_numpy(fisher_trace(lin))), 10 / 3, rtol=1e-12)
    assert_close(fisher_diagonal(lin), np.diag(expected), rtol=1e-7, atol=1e-12, like=backend)
    (block,) = fisher_blocks(lin).values()
    assert_close(block, expected, rtol=1e-7, atol=1e-12, like=backend)
    op = fisher_operator(lin)
    eye = backend.xp.eye(6, dtype=backend.xp.float64, device=backend.device)
    assert_close(op.matmat(eye), expected, rtol=1e-7, atol=1e-12, like=backend)


# --------------------------------------------------------------------------- #
# brute force on MLPs: every family and kernel, every CPU backend


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: type(f).__name__)
def test_every_kernel_matches_brute_force(cpu_backend, family) -> None:
    _, lin = numpy_mlp(cpu_backend, activation="relu", seed=3)
    to_np = cpu_backend.to_numpy
    for kernel in KERNELS:
        ref = brute_force(lin, family, kernel, to_np)
        dense = to_np(fisher_dense(lin, family, kernel=kernel))
        np.testing.assert_allclose(dense, ref, atol=1e-10, err_msg=kernel)
        diag = to_np(fisher_diagonal(lin, family, kernel=kernel, max_vectors=7))
        np.testing.assert_allclose(diag, np.diag(ref), atol=1e-10, err_msg=kernel)
        tr = float(to_np(fisher_trace(lin, family, kernel=kernel)))
        np.testing.assert_allclose(tr, np.trace(ref), rtol=1e-10, err_msg=kernel)
        blocks = fisher_blocks(lin, family, kernel=kernel, max_vectors=5)
        for blk in lin.blocks:
            sl = slice(blk.offset, blk.offset + blk.size)
            assert_close(blocks[blk.name], ref[sl, sl], rtol=1e-7, atol=1e-10, like=cpu_backend)
        op = fisher_operator(lin, family, kernel=kernel)
        v = np.random.default_rng(0).standard_normal((lin.num_params, 3))
        got = to_np(op.matmat(cpu_backend.asarray(v)))
        np.testing.assert_allclose(got, ref @ v, atol=1e-10, err_msg=kernel)
        got1 = to_np(op.matvec(cpu_backend.asarray(v[:, 0])))
        np.testing.assert_allclose(got1, ref @ v[:, 0], atol=1e-10, err_msg=kernel)


def test_bounds_are_loewner_ordered(cpu_backend) -> None:
    for seed in range(3):
        _, lin = numpy_mlp(cpu_backend, sizes=(4, 6, 5), seed=seed, n=4)
        to_np = cpu_backend.to_numpy
        exact = to_np(fisher_dense(lin))
        scale = np.abs(exact).max()
        for scalar in (False, True):
            lower, upper = (to_np(b) for b in fisher_bounds(lin, what="dense", scalar=scalar))
            assert np.linalg.eigvalsh(upper - exact).min() >= -1e-10 * scale
            assert np.linalg.eigvalsh(exact - lower).min() >= -1e-10 * scale
            dl, du = (to_np(b) for b in fisher_bounds(lin, scalar=scalar))
            assert np.all(dl <= np.diag(exact) + 1e-12 * scale)
            assert np.all(np.diag(exact) <= du + 1e-12 * scale)
            np.testing.assert_allclose(dl, np.diag(lower), atol=1e-12 * scale)
            np.testing.assert_allclose(du, np.diag(upper), atol=1e-12 * scale)
            tl, tu = (float(to_np(b)) for b in fisher_bounds(lin, what="trace", scalar=scalar))
            assert tl <= np.trace(exact) * (1 + 1e-12) <= tu * (1 + 2e-12)


def test_two_classes_lower_bound_is_exact(backend) -> None:
    _, lin = numpy_mlp(backend, sizes=(3, 4, 2), seed=5, n=5)
    exact = backend.to_numpy(fisher_dense(lin))
    assert_close(fisher_dense(lin, kernel="lower"), exact, rtol=1e-7, atol=1e-12, like=backend)


def test_streaming_equals_one_batch_and_mean_divides(cpu_backend) -> None:
    from fisherbound.adapters.numpy import linearizations, linearize

    model, _ = numpy_mlp(cpu_backend, seed=1)
    x = cpu_backend.asarray(np.random.default_rng(7).standard_normal((7, 3)))
    whole = fisher_diagonal(linearize(model, x))
    parts = [x[:3, ...], x[3:, ...]]
    streamed = fisher_diagonal(linearizations(model, parts))  # a one-shot generator
    to_np = cpu_backend.to_numpy
    assert_close(streamed, whole, rtol=1e-7, atol=1e-12)
    mean = fisher_diagonal([linearize(model, p) for p in parts], reduction="mean")
    assert_close(mean, to_np(whole) / 7, rtol=1e-7, atol=1e-12, like=cpu_backend)
    op = fisher_operator([linearize(model, p) for p in parts], reduction="mean")
    dense = to_np(fisher_dense(linearize(model, x)))
    v = cpu_backend.asarray(np.ones(dense.shape[0]))
    assert_close(op.matvec(v), dense.sum(axis=1) / 7, rtol=1e-7, atol=1e-12, like=cpu_backend)


# --------------------------------------------------------------------------- #
# the three adapters on the same weights


def _numpy_lin(ws, bs, x):
    from fisherbound.adapters.numpy import MLP, linearize

    return linearize(MLP(ws, bs, activation="tanh"), x)


def _torch_lin(ws, bs, x):
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize

    return linearize(torch_mlp(ws, bs), torch.from_numpy(x))


def _jax_lin(ws, bs, x):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters.jax import linearize

    apply, params = jax_mlp(ws, bs)
    return linearize(apply, params, jnp.asarray(x))


@pytest.mark.parametrize("make", [_torch_lin, _jax_lin], ids=["torch", "jax"])
def test_adapters_agree_with_numpy_and_brute_force(make) -> None:
    from fisherbound._lib import to_host

    sizes = (3, 5, 4)
    ws, bs = mlp_weights(sizes, 11)
    x = np.random.default_rng(12).standard_normal((5, 3))
    ref_lin = _numpy_lin(ws, bs, x)
    lin = make(ws, bs, x)
    assert [b.shape for b in lin.blocks] == [b.shape for b in ref_lin.blocks]
    to_np = lambda a: np.asarray(to_host(a))  # noqa: E731
    np.testing.assert_allclose(to_np(lin.logits), to_np(ref_lin.logits), atol=1e-12)
    for family in [*FAMILIES, Gaussian(variance=0.25)]:
        for kernel in ("exact", "upper", "lower"):
            ref = brute_force(lin, family, kernel, to_np)
            d = to_np(fisher_diagonal(lin, family, kernel=kernel))
            np.testing.assert_allclose(d, np.diag(ref), atol=1e-10)
            d_np = to_np(fisher_diagonal(ref_lin, family, kernel=kernel))
            np.testing.assert_allclose(d, d_np, atol=1e-10)
        dense = to_np(fisher_dense(lin, family))
        np.testing.assert_allclose(dense, brute_force(lin, family, "exact", to_np), atol=1e-10)
        tr = float(to_np(fisher_trace(lin, family)))
        np.testing.assert_allclose(tr, np.trace(dense), rtol=1e-10)
        blocks = fisher_blocks(lin, family)
        for blk in lin.blocks:
            sl = slice(blk.offset, blk.offset + blk.size)
            assert_close(blocks[blk.name], dense[sl, sl], rtol=1e-7, atol=1e-10, like=lin.logits)
        v = np.random.default_rng(1).standard_normal(lin.num_params)
        op = fisher_operator(lin, family)
        vv = lin.xp.asarray(v, device=lin.device)
        assert_close(op.matvec(vv), dense @ v, rtol=1e-7, atol=1e-10, like=lin.logits)
    lower, upper = (to_np(b) for b in fisher_bounds(lin, what="dense"))
    exact = to_np(fisher_dense(lin))
    assert np.linalg.eigvalsh(upper - exact).min() >= -1e-10 * np.abs(exact).max()
    assert np.linalg.eigvalsh(exact - lower).min() >= -1e-10 * np.abs(exact).max()


# --------------------------------------------------------------------------- #
# bad input


def test_bad_input_messages(backend) -> None:
    _, lin = numpy_mlp(backend, seed=2)
    with pytest.raises(TypeError, match="family must be a fisherbound.families family"):
        fisher_diagonal(lin, "categorical")
    with pytest.raises(ValueError, match="kernel must be one of 'exact', 'upper'"):
        fisher_diagonal(lin, kernel="tight")
    with pytest.raises(ValueError, match="reduction must be one of 'sum', 'mean'"):
        fisher_trace(lin, reduction="avg")
    with pytest.raises(TypeError, match="source must be a Linearization or an iterable of them"):
        fisher_diagonal(3.0)
    with pytest.raises(TypeError, match="item 1 is a str"):
        fisher_diagonal([lin, "x"])
    with pytest.raises(ValueError, match="must contain at least one batch"):
        fisher_diagonal([])
    with pytest.raises(ValueError, match=r"refuses D = 59 parameters .* above max_params = 10"):
        fisher_dense(lin, max_params=10)
    with pytest.raises(ValueError, match="refuses blocks larger than max_block_size = 4"):
        fisher_blocks(lin, max_block_size=4)
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        fisher_blocks(lin, blocks=["nope"])
    with pytest.raises(ValueError, match="what must be one of"):
        fisher_bounds(lin, what="eigenvalues")
    with pytest.raises(ValueError, match="max_vectors must be an integer >= 1; got 0"):
        fisher_diagonal(lin, max_vectors=0)
    with pytest.raises(TypeError, match="needs a re-iterable source"):
        fisher_operator(iter([lin]))
    assert isinstance(fisher_bounds(lin), Bounds)


def test_family_that_does_not_match_the_outputs(backend) -> None:
    from fisherbound.adapters.numpy import MLP, linearize

    model = MLP.random(
        [3, 4, 1], rng=0, xp=backend.xp, device=backend.device, dtype=backend.xp.float64
    )
    lin = linearize(model, backend.asarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match="C = 1 outputs, but the Categorical family needs"):
        fisher_diagonal(lin, Categorical())
    assert fisher_diagonal(lin, Bernoulli()).shape == (lin.num_params,)


def test_batches_from_different_models(backend) -> None:
    _, lin_a = numpy_mlp(backend, sizes=(3, 5, 3), seed=0)
    _, lin_b = numpy_mlp(backend, sizes=(3, 4, 3), seed=0)
    with pytest.raises(ValueError, match="every batch must come from the same model"):
        fisher_diagonal([lin_a, lin_b])


def test_batches_from_different_libraries_or_dtypes() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.numpy import MLP, linearize

    model = MLP.random([3, 4, 3], rng=0)
    x = np.random.default_rng(0).standard_normal((4, 3))
    lin_np = linearize(model, x)
    ws = [torch.from_numpy(np.asarray(w)) for w in model.weights]
    bs = [torch.from_numpy(np.asarray(b)) for b in model.biases]
    lin_torch = linearize(MLP(ws, bs), torch.from_numpy(x))
    with pytest.raises(TypeError, match="batch 1 holds torch arrays, batch 0 held numpy"):
        fisher_diagonal([lin_np, lin_torch])
    with pytest.raises(TypeError, match="batch 1 holds numpy arrays, batch 0 held torch"):
        fisher_trace([lin_torch, lin_np])
    model32 = MLP(
        [np.asarray(w, np.float32) for w in model.weights],
        [np.asarray(b, np.float32) for b in model.biases],
    )
    lin32 = linearize(model32, x.astype(np.float32))
    with pytest.raises(ValueError, match="batch 1 is float32 on cpu, batch 0 was float64"):
        fisher_diagonal([lin_np, lin32])


def test_boolean_and_progress_options_are_checked() -> None:
    from fisherbound.adapters.numpy import MLP, linearize
    from fisherbound.fisher import fisher_bounds, fisher_diagonal

    lin = linearize(MLP.random([3, 4, 2], rng=0), np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"scalar must be True or False; got str 'yes'"):
        fisher_bounds(lin, scalar="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"progress must be True, False or None .*got str 'no'"):
        fisher_diagonal(lin, progress="no")  # type: ignore[arg-type]


def test_softmax_outputs_are_refused_for_the_categorical_family() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize
    from fisherbound.adapters.torch import loss_function
    from fisherbound.families import Bernoulli, Categorical
    from fisherbound.fisher import fisher_diagonal, fisher_trace

    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    soft = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softmax(dim=-1)).double()
    with pytest.raises(ValueError, match=r"batch 0 look like softmax probabilities"):
        fisher_diagonal(torch_linearize(soft, x))
    with pytest.raises(ValueError, match=r"model's outputs look like softmax probabilities"):
        loss_function(soft, x, torch.zeros(5, dtype=torch.int64))
    # Log-softmax outputs are logits up to a constant per row; Bernoulli is not checked.
    logsoft = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LogSoftmax(dim=-1)).double()
    assert torch.isfinite(fisher_diagonal(torch_linearize(logsoft, x), Categorical())).all()
    assert torch.isfinite(fisher_trace(torch_linearize(soft, x), Bernoulli()))
    # The same check for the NumPy and JAX adapters (it lives in the family).
    z = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match=r"look like softmax probabilities"):
        Categorical()._check_outputs(z, np, "z")
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(ValueError, match=r"look like softmax probabilities"):
        Categorical()._check_outputs(jnp.asarray(z), jnp, "z")
