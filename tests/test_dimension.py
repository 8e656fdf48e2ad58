"""Spectrum, local dimensionality and razor complexity, against dense eigendecompositions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _assertions import assert_close
from _backends import make_backend
from _models import jax_mlp, mlp_weights, torch_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound import Estimate
from fisherbound._lib import array_namespace, device_of
from fisherbound.dimension import (
    Eigenpairs,
    RankBound,
    Razor,
    SpectralDensity,
    local_dimension,
    rank_bound,
    razor,
    spectral_density,
    top_eigenpairs,
)
from fisherbound.families import Bernoulli, Categorical, Gaussian
from fisherbound.fisher import fisher_dense
from fisherbound.linalg import Quadrature, lanczos_quadrature

# --------------------------------------------------------------------------- #
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny torch ops spin-wait when the cores are shared: one intra-op thread is
    far faster here (restored after the module)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(backend, sizes=(3, 5, 4, 3), n=6, seed=0, activation="tanh", dtype="float64"):
    from fisherbound.adapters.numpy import MLP, linearize

    model = MLP.random(
        list(sizes),
        activation=activation,
        rng=seed,
        xp=backend.xp,
        device=backend.device,
        dtype=getattr(backend.xp, dtype),
    )
    x = backend.asarray(np.random.default_rng(seed + 100).standard_normal((n, sizes[0])), dtype)
    return model, linearize(model, x)


def dense_spectrum(backend, lin, family=None, kernel="exact"):
    """Eigenvalues (descending) and the dense matrix of F_K, on the host."""
    family = Categorical() if family is None else family
    dense = backend.to_numpy(fisher_dense(lin, family, kernel=kernel))
    return np.linalg.eigvalsh(dense)[::-1], dense


def gap_threshold(eigenvalues, index):
    """A threshold in the middle (geometrically) of the gap below eigenvalue ``index``."""
    return math.sqrt(eigenvalues[index] * eigenvalues[index + 1])


def assert_same_place(x, ref) -> None:
    array_namespace(x, ref)  # same library (NumPy reductions give 0-d numpy scalars)
    assert device_of(x) == device_of(ref)
    assert x.dtype == ref.dtype


# --------------------------------------------------------------------------- #
# THEORY reference value, every backend


def test_linear_softmax_reference(backend) -> None:
    from fisherbound.adapters.numpy import LinearSoftmax, linearize

    model = LinearSoftmax(backend.asarray(np.zeros((3, 2))))
    lin = linearize(model, backend.asarray([[1.0, 2.0]]))
    top = top_eigenpairs(lin, Categorical(), k=3, rng=0)
    assert isinstance(top, Eigenpairs)
    assert_close(top.eigenvalues, [5 / 3, 5 / 3, 0], rtol=1e-7, atol=1e-12, like=backend)
    assert_same_place(top.eigenvalues, lin.logits)
    assert tuple(top.eigenvectors.shape) == (6, 3)
    assert float(backend.to_numpy(top.residuals).max()) < 1e-12
    est = local_dimension(lin, Categorical(), eps=1e-6, rng=0)
    assert isinstance(est, Estimate)
    assert (float(backend.to_numpy(est.value)), float(backend.to_numpy(est.std_error))) == (2, 0)
    assert est.num_probes == 0
    assert_same_place(est.value, lin.logits)
    assert rank_bound(lin, Categorical()) == RankBound(2, 6, 1, 2)


# --------------------------------------------------------------------------- #
# top eigenpairs against dense eigendecompositions


@pytest.mark.parametrize("kernel", ["exact", "upper", "lower"])
def test_top_eigenpairs_match_dense(eager_backend, kernel) -> None:
    _, lin = mlp(eager_backend, seed=1)
    expected, dense = dense_spectrum(eager_backend, lin, kernel=kernel)
    k = 5
    top = top_eigenpairs(lin, Categorical(), k=k, kernel=kernel, rng=3)
    values = eager_backend.to_numpy(top.eigenvalues)
    vectors = eager_backend.to_numpy(top.eigenvectors)
    assert np.all(np.diff(values) <= 0), "eigenvalues must be descending"
    np.testing.assert_allclose(values, expected[:k], rtol=0, atol=1e-8 * expected[0])
    # F y = θ y for each Ritz pair, with the dense F; unit vectors.
    np.testing.assert_allclose(dense @ vectors, vectors * values, atol=1e-8 * expected[0])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=1e-12)
    assert_close(
        top.residuals,
        np.linalg.norm(dense @ vectors - vectors * values, axis=0),
        rtol=1e-7,
        atol=1e-10 * expected[0],
        like=eager_backend,
    )


def test_top_eigenpairs_few_lanczos_steps_converge_on_top(eager_backend) -> None:
    # m < D: the top Ritz value still converges; its residual bounds the error.
    _, lin = mlp(eager_backend, sizes=(4, 8, 3), n=5, seed=2)
    expected, _ = dense_spectrum(eager_backend, lin)
    top = top_eigenpairs(lin, k=1, num_matvecs=25, rng=0)
    theta = float(eager_backend.to_numpy(top.eigenvalues)[0])
    res = float(eager_backend.to_numpy(top.residuals)[0])
    assert abs(theta - expected[0]) <= max(res, 1e-10 * expected[0])
    assert theta <= expected[0] * (1 + 1e-12)  # Ritz values never exceed λ_max
    np.testing.assert_allclose(theta, expected[0], rtol=1e-8)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_bound_operators_bracket_every_eigenvalue(seed) -> None:
    backend = make_backend("numpy")
    _, lin = mlp(backend, sizes=(3, 4, 4), n=4, seed=seed)
    k = 6
    lo, ex, up = (
        backend.to_numpy(top_eigenpairs(lin, k=k, kernel=kern, rng=seed).eigenvalues)
        for kern in ("lower", "exact", "upper")
    )
    tol = 1e-9 * up[0]
    assert np.all(lo <= ex + tol)
    assert np.all(ex <= up + tol)


def test_mean_reduction_divides_the_spectrum(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(3, 4, 3), n=5, seed=4)
    total = eager_backend.to_numpy(top_eigenpairs(lin, k=3, rng=0).eigenvalues)
    assert_close(
        top_eigenpairs(lin, k=3, reduction="mean", rng=0).eigenvalues,
        total / 5,
        rtol=1e-10,
        atol=0,
        like=eager_backend,
    )


def test_streamed_batches_equal_one_batch(eager_backend) -> None:
    from fisherbound.adapters.numpy import linearize

    model, lin = mlp(eager_backend, sizes=(3, 4, 3), n=6, seed=5)
    x = lin.inputs
    parts = [linearize(model, x[:2, ...]), linearize(model, x[2:, ...])]
    one = eager_backend.to_numpy(top_eigenpairs(lin, k=4, rng=1).eigenvalues)
    assert_close(
        top_eigenpairs(parts, k=4, rng=1).eigenvalues, one, rtol=1e-10, atol=0, like=eager_backend
    )


def test_float32_in_float32_out(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(3, 4, 3), n=5, seed=6, dtype="float32")
    _, lin64 = mlp(eager_backend, sizes=(3, 4, 3), n=5, seed=6)
    top = top_eigenpairs(lin, k=2, rng=0)
    assert top.eigenvalues.dtype == eager_backend.xp.float32
    assert top.eigenvectors.dtype == eager_backend.xp.float32
    ref = eager_backend.to_numpy(top_eigenpairs(lin64, k=2, rng=0).eigenvalues)
    assert_close(
        top.eigenvalues, ref, rtol=1e-4, atol=0, like=eager_backend, dtype=eager_backend.xp.float32
    )
    est = local_dimension(lin, eps=1e-3 * float(ref[0]), rng=0)
    assert est.value.dtype == eager_backend.xp.float32
    sd = spectral_density(lin, num_probes=2, num_matvecs=5, num_points=8, rng=0)
    assert sd.density.dtype == eager_backend.xp.float32


# --------------------------------------------------------------------------- #
# local dimension


def test_local_dimension_lanczos_is_the_exact_count(eager_backend) -> None:
    _, lin = mlp(eager_backend, seed=7)
    expected, _ = dense_spectrum(eager_backend, lin)
    for index in (0, 3, 8):
        eps = gap_threshold(expected, index)
        est = local_dimension(lin, eps=eps, method="lanczos", rng=0)
        assert float(eager_backend.to_numpy(est.value)) == index + 1
        assert float(eager_backend.to_numpy(est.std_error)) == 0.0
        assert est.num_probes == 0


def test_local_dimension_finds_repeated_eigenvalues_by_deflation(eager_backend) -> None:
    # W = 0, C = 3: F = I_Δ(uniform) ⊗ Σ x xᵀ = (1/3) P ⊗ S has every eigenvalue s_j / 3
    # of S twice; one Krylov space holds one copy of each (until it breaks down),
    # so m = 22 < 31 steps see the top values once and the count needs deflation.
    from fisherbound.adapters.numpy import LinearSoftmax, linearize
    from fisherbound.fisher import fisher_operator
    from fisherbound.linalg import eigsh

    d = 30
    scales = np.concatenate([[8.0, 6.0, 4.0, 3.0], np.linspace(0.5, 1.5, d - 4)])
    basis, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    x = (basis * np.sqrt(scales)).T  # Σ x xᵀ = basis diag(scales) basisᵀ
    model = LinearSoftmax(eager_backend.asarray(np.zeros((3, d))))
    lin = linearize(model, eager_backend.asarray(x))
    eps = 0.75  # eigenvalues 8/3, 2, 4/3, 1 above (twice each), at most 1/2 below: 8
    one_run = eager_backend.to_numpy(
        eigsh(fisher_operator(lin), k=11, tol=0.0, num_matvecs=22, basis_size=22, rng=0)[0]
    )
    assert np.sum(one_run > eps) < 8  # a plain count of Ritz values misses copies
    est = local_dimension(lin, eps=eps, method="lanczos", max_count=10, num_matvecs=22, rng=0)
    assert float(eager_backend.to_numpy(est.value)) == 8
    assert est.num_probes == 0
    assert float(eager_backend.to_numpy(local_dimension(lin, eps=eps, rng=1).value)) == 8


def test_local_dimension_slq_within_five_standard_errors(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(4, 8, 3), n=6, seed=8)  # D = 67
    expected, _ = dense_spectrum(eager_backend, lin)
    truth = 6
    eps = gap_threshold(expected, truth - 1)
    est = local_dimension(lin, eps=eps, method="slq", num_probes=40, num_matvecs=30, rng=1)
    value = float(eager_backend.to_numpy(est.value))
    se = float(eager_backend.to_numpy(est.std_error))
    assert est.num_probes == 40
    assert se > 0
    assert abs(value - truth) <= 5 * se


def test_local_dimension_auto_switches_to_slq_above_max_count(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(4, 8, 3), n=6, seed=8)
    expected, _ = dense_spectrum(eager_backend, lin)
    eps = gap_threshold(expected, 5)
    exact = local_dimension(lin, eps=eps, max_count=6, rng=0)
    assert (float(eager_backend.to_numpy(exact.value)), exact.num_probes) == (6, 0)
    est = local_dimension(lin, eps=eps, max_count=3, num_probes=30, num_matvecs=30, rng=0)
    assert est.num_probes == 30
    se = float(eager_backend.to_numpy(est.std_error))
    assert se > 0
    assert abs(float(eager_backend.to_numpy(est.value)) - 6) <= 5 * se


def test_interlacing_proves_the_count_too_large_in_max_count_plus_one_products() -> None:
    # Every eigenvalue above eps: after j steps the j Ritz values all exceed eps (they
    # interlace the spectrum), so max_count + 1 = 6 products prove d_eps > 5.
    from fisherbound.linalg import LinearOperator
    from fisherbound.linalg._quadrature import _count_above

    diag = np.linspace(1.0, 2.0, 200)
    calls = []

    def matvec(v):
        calls.append(1)
        return diag * v

    op = LinearOperator((200, 200), matvec=matvec, dtype=np.float64, device="cpu", xp=np)
    gen = np.random.default_rng(0)
    count, rule = _count_above(
        np, op, eps=0.5, max_count=5, basis_size=None, tol=1e-8, probe_steps=0, gen=gen
    )
    assert (count, rule, len(calls)) == (None, None, 6)
    # Reused as SLQ's first probe: the run goes on to the probe's 10 steps, and its
    # rule is the Gauss rule of lanczos_quadrature from the same Rademacher probe.
    calls.clear()
    count, rule = _count_above(
        np, op, eps=0.5, max_count=5, basis_size=None, tol=1e-8, probe_steps=10,
        gen=np.random.default_rng(3),
    )  # fmt: skip
    assert count is None
    assert len(calls) == 10
    ref = lanczos_quadrature(np.diag(diag), num_probes=1, num_matvecs=10, rng=3)
    np.testing.assert_allclose(rule.nodes, ref.nodes, rtol=1e-10)
    np.testing.assert_allclose(rule.weights, ref.weights, rtol=1e-8, atol=1e-12)


def test_an_unconverged_count_warns_at_its_budget() -> None:
    from fisherbound.linalg import aslinearoperator
    from fisherbound.linalg._quadrature import _count_above

    diag = np.concatenate([[3.0, 2.0], np.linspace(0.0, 0.5, 58)])
    op = aslinearoperator(np.diag(diag))
    gen = np.random.default_rng(0)
    with pytest.warns(RuntimeWarning, match=r"the Lanczos count stopped at its budget of 100"):
        count, _ = _count_above(  # tol = 0: no residual is ever small enough
            np, op, eps=1.0, max_count=5, basis_size=10, tol=0.0, probe_steps=0, gen=gen
        )
    assert count == 2  # a lower bound, here the count


def test_slq_stops_at_the_target_error(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(4, 8, 3), n=6, seed=8)  # D = 67, d_eps = 6
    expected, _ = dense_spectrum(eager_backend, lin)
    eps = gap_threshold(expected, 5)
    kw = {"eps": eps, "method": "slq", "num_probes": 40, "num_matvecs": 30, "rng": 1}
    loose = local_dimension(lin, target_error=0.3, **kw)
    value = float(eager_backend.to_numpy(loose.value))
    se = float(eager_backend.to_numpy(loose.std_error))
    assert 4 <= loose.num_probes < 40
    assert se <= 0.3 * value
    assert abs(value - 6) <= 5 * se
    assert local_dimension(lin, target_error=None, **kw).num_probes == 40


def test_local_dimension_and_razor_reuse_the_density_rules(eager_backend) -> None:
    model, lin = mlp(eager_backend, sizes=(4, 8, 3), n=6, seed=8)
    expected, _ = dense_spectrum(eager_backend, lin)
    sd = spectral_density(lin, num_probes=6, num_matvecs=30, rng=4)
    nodes = eager_backend.to_numpy(sd.nodes)
    weights = eager_backend.to_numpy(sd.weights)
    eps = gap_threshold(expected, 5)
    # The nodes prove d_eps > 3 (some rule has 4 nodes above eps): no Lanczos count.
    assert np.max(np.sum(nodes > eps, axis=1)) > 3
    est = local_dimension(lin, eps=eps, max_count=3, quadrature=sd, rng=0)
    per_probe = np.sum(weights * (nodes > eps), axis=1)
    assert est.num_probes == 6
    assert_close(est.value, eager_backend.asarray(np.mean(per_probe)), rtol=1e-10, atol=0.0)
    # Under max_count the exact count runs, whatever the rules say.
    exact = local_dimension(lin, eps=eps, max_count=8, quadrature=sd, rng=0)
    assert (float(eager_backend.to_numpy(exact.value)), exact.num_probes) == (6.0, 0)
    # The razor's log-det from the same rules, with no product of its own.
    y = eager_backend.xp.asarray(np.array([0, 1, 2, 0, 1, 2]), device=eager_backend.device)
    theta = model.parameters()
    rz = razor(lin, prior_variance=2.0, labels=y, theta=theta, method="slq", quadrature=sd)
    logdet = np.sum(weights * np.log1p(2.0 * np.maximum(nodes, 0.0)), axis=1)
    assert rz.log_det.num_probes == 6
    assert_close(rz.log_det.value, eager_backend.asarray(np.mean(logdet)), rtol=1e-10, atol=0)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), log_eps=st.floats(-6.0, 0.0))
def test_local_dimension_is_monotone_and_below_the_rank_bound(seed, log_eps) -> None:
    backend = make_backend("numpy")
    _, lin = mlp(backend, sizes=(3, 6, 3), n=4, seed=seed)  # D = 45, N (C − 1) = 8
    counts = [
        float(local_dimension(lin, eps=10.0**e, rng=seed).value) for e in (log_eps, log_eps + 1)
    ]
    assert counts[0] >= counts[1]
    assert counts[0] <= rank_bound(lin).value
    expected, _ = dense_spectrum(backend, lin)
    # The count is exact unless eps sits within rounding of an eigenvalue.
    if np.all(np.abs(expected - 10.0**log_eps) > 1e-9 * expected[0]):
        assert counts[0] == int(np.sum(expected > 10.0**log_eps))


# --------------------------------------------------------------------------- #
# rank bounds


def numerical_rank(eigenvalues) -> int:
    return int(np.sum(eigenvalues > 1e-10 * eigenvalues[0]))


def test_linear_softmax_rank_is_at_most_c_minus_one_times_rank_of_inputs(eager_backend) -> None:
    from fisherbound.adapters.numpy import LinearSoftmax, linearize

    gen = np.random.default_rng(9)
    d, c, n = 6, 4, 10
    x = gen.standard_normal((n, 2)) @ gen.standard_normal((2, d))  # rank[x] = 2
    x_tilde = np.concatenate([x, np.ones((n, 1))], axis=1)
    assert np.linalg.matrix_rank(x_tilde) == 3
    model = LinearSoftmax.random(
        d,
        c,
        rng=9,
        xp=eager_backend.xp,
        device=eager_backend.device,
        dtype=eager_backend.xp.float64,
    )
    lin = linearize(model, eager_backend.asarray(x))
    expected, _ = dense_spectrum(eager_backend, lin)
    rank = numerical_rank(expected)
    assert rank == (c - 1) * 3  # the sharp bound binds: 9
    bound = rank_bound(lin)
    assert bound == RankBound(min(c * (d + 1), n * (c - 1)), c * (d + 1), n, c - 1)
    assert rank <= bound.value
    eps = 1e-8 * expected[0]
    est = local_dimension(lin, eps=eps, rng=0)
    assert float(eager_backend.to_numpy(est.value)) == rank


def test_wide_mlp_attains_the_general_bound(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(4, 16, 3), n=5, seed=10)  # D = 131 ≫ N (C − 1) = 10
    bound = rank_bound(lin)
    assert bound == RankBound(10, 131, 5, 2)
    expected, _ = dense_spectrum(eager_backend, lin)
    assert numerical_rank(expected) == bound.value
    est = local_dimension(lin, eps=1e-9 * expected[0], rng=0)
    assert float(eager_backend.to_numpy(est.value)) == bound.value


def test_narrow_mlp_is_bounded_by_the_number_of_parameters(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(2, 2, 3), n=20, seed=11)  # D = 15 < N (C − 1) = 40
    bound = rank_bound(lin)
    assert bound == RankBound(15, 15, 20, 2)
    expected, _ = dense_spectrum(eager_backend, lin)
    # Softmax ignores a common shift of the logits: δW_2 = 1 aᵀ, δb_2 = 1 c are null
    # directions (hidden width 2, so 3 of them): rank = D − 3 < D.
    assert numerical_rank(expected) == 12


@pytest.mark.parametrize(
    ("family", "kernel", "per_input"),
    [
        (Categorical(), "exact", 2),
        (Categorical(), "upper", 3),
        (Categorical(), "lower", 1),
        (Categorical(), "scalar_upper", 2),
        (Bernoulli(), "exact", 3),
        (Gaussian(), "exact", 3),
    ],
)
def test_rank_bound_per_family_and_kernel(family, kernel, per_input) -> None:
    backend = make_backend("numpy")
    _, lin = mlp(backend, sizes=(2, 3, 3), n=2, seed=12)  # D = 21
    bound = rank_bound(lin, family, kernel=kernel)
    assert bound == RankBound(min(21, 2 * per_input), 21, 2, per_input)
    expected, _ = dense_spectrum(backend, lin, family, kernel)
    assert numerical_rank(expected) <= bound.value


# --------------------------------------------------------------------------- #
# spectral density


def test_spectral_density_is_unbiased_and_normalised(eager_backend) -> None:
    _, lin = mlp(eager_backend, sizes=(3, 4, 3), n=4, seed=13)  # D = 31
    expected, _ = dense_spectrum(eager_backend, lin)
    width = 0.05 * expected[0]
    t = np.linspace(-0.1, 1.1, 25) * expected[0]
    grid = eager_backend.asarray(t)
    sd = spectral_density(lin, num_probes=30, num_matvecs=31, grid=grid, width=width, rng=2)
    assert isinstance(sd, SpectralDensity)
    assert tuple(sd.nodes.shape) == (30, 31)
    assert sd.width == width
    assert_same_place(sd.density, lin.logits)
    truth = np.mean(np.exp(-0.5 * ((t[:, None] - expected[None, :]) / width) ** 2), axis=1) / (
        width * math.sqrt(2 * math.pi)
    )
    value = eager_backend.to_numpy(sd.density)
    se = eager_backend.to_numpy(sd.std_error)
    assert np.all(np.abs(value - truth) <= 5 * se + 1e-12 * truth.max())
    np.testing.assert_allclose(eager_backend.to_numpy(sd.weights).sum(axis=1), 31, rtol=1e-10)
    # The default grid covers every node, and the density integrates to 1.
    default = spectral_density(lin, num_probes=3, num_matvecs=31, rng=2)
    g = eager_backend.to_numpy(default.grid)
    step = g[1] - g[0]
    np.testing.assert_allclose(eager_backend.to_numpy(default.density).sum() * step, 1, rtol=1e-3)
    assert g[0] < eager_backend.to_numpy(default.nodes).min()
    assert g[-1] > eager_backend.to_numpy(default.nodes).max()


# --------------------------------------------------------------------------- #
# razor


def linear_gaussian_case(backend, *, n=7, d=3, c=2, s2=0.7, seed=14):
    """z = W x with unit-variance Gaussian outputs, θ̂ the exact posterior mode.

    Returns the model at θ̂, inputs, targets, θ_0 and the exact −log p(Y).
    """
    from fisherbound.adapters.numpy import LinearSoftmax

    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, d))
    y = gen.standard_normal((n, c))
    theta0 = gen.standard_normal(c * d)
    # J stacks J_n = I_C ⊗ x_nᵀ (θ = row-major vec W), rows ordered (n, c).
    J = np.concatenate([np.kron(np.eye(c), x[i : i + 1, :]) for i in range(n)], axis=0)
    yv = y.reshape(-1)
    H = J.T @ J + np.eye(c * d) / s2
    theta_hat = np.linalg.solve(H, J.T @ yv + theta0 / s2)
    S = np.eye(n * c) + s2 * J @ J.T
    r = yv - J @ theta0
    _, logdet = np.linalg.slogdet(2 * np.pi * S)
    exact = 0.5 * (r @ np.linalg.solve(S, r) + logdet)
    model = LinearSoftmax(backend.asarray(theta_hat.reshape(c, d)))
    return model, x, y, theta0, exact


@pytest.mark.parametrize("method", ["dense", "lanczos", "auto"])
def test_razor_of_a_linear_gaussian_model_is_the_exact_marginal(eager_backend, method) -> None:
    from fisherbound.adapters.numpy import linearize

    s2 = 0.7
    model, x, y, theta0, exact = linear_gaussian_case(eager_backend, s2=s2)
    lin = linearize(model, eager_backend.asarray(x))
    out = razor(
        lin,
        Gaussian(),
        prior_variance=s2,
        labels=eager_backend.asarray(y),
        theta=model.parameters(),
        theta0=eager_backend.asarray(theta0),
        method=method,
        rng=0,
    )
    assert isinstance(out, Razor)
    assert out.method == ("lanczos" if method == "auto" else method)
    assert_close(out.value, exact, rtol=0, atol=1e-9, like=eager_backend)
    assert float(eager_backend.to_numpy(out.std_error)) == 0.0
    assert out.log_det.num_probes == 0
    assert_same_place(out.value, lin.logits)
    assert_close(out.bic_penalty, 0.5 * 6 * math.log(7), rtol=1e-12, atol=0, like=eager_backend)


def test_razor_streams_batches_and_splits_labels() -> None:
    from fisherbound.adapters.numpy import linearize

    backend = make_backend("numpy")
    model, x, y, theta0, exact = linear_gaussian_case(backend, n=9)
    parts = [linearize(model, x[:4]), linearize(model, x[4:])]
    common = dict(prior_variance=0.7, theta=model.parameters(), theta0=theta0, rng=0)
    split = razor(parts, Gaussian(), labels=[y[:4], y[4:]], **common)
    whole = razor(parts, Gaussian(), labels=y, **common)
    for out in (split, whole):
        np.testing.assert_allclose(float(out.value), exact, rtol=0, atol=1e-9)


def test_razor_slq_within_five_standard_errors(eager_backend) -> None:
    from fisherbound.adapters.numpy import linearize

    s2 = 0.7
    model, x, y, theta0, exact = linear_gaussian_case(eager_backend, n=12, d=8, c=3, s2=s2)
    lin = linearize(model, eager_backend.asarray(x))  # D = 24
    out = razor(
        lin,
        Gaussian(),
        prior_variance=s2,
        labels=eager_backend.asarray(y),
        theta=model.parameters(),
        theta0=eager_backend.asarray(theta0),
        method="slq",
        num_probes=30,
        num_matvecs=8,
        rng=3,
    )
    assert out.method == "slq"
    assert out.log_det.num_probes == 30
    se = float(eager_backend.to_numpy(out.std_error))
    assert se > 0
    np.testing.assert_allclose(se, 0.5 * float(eager_backend.to_numpy(out.log_det.std_error)))
    assert abs(float(eager_backend.to_numpy(out.value)) - exact) <= 5 * se


def test_razor_parts_for_a_classifier(eager_backend) -> None:
    from scipy.special import logsumexp

    model, lin = mlp(eager_backend, sizes=(3, 5, 3), n=8, seed=15)  # D = 38
    gen = np.random.default_rng(15)
    y = gen.integers(0, 3, size=8)
    theta0 = gen.standard_normal(38)
    s2 = 2.5
    labels = eager_backend.xp.asarray(y, device=eager_backend.device)
    common = dict(prior_variance=s2, labels=labels, theta=model.parameters(), rng=0)
    dense_out = razor(lin, theta0=eager_backend.asarray(theta0), method="dense", **common)
    lanczos_out = razor(lin, theta0=eager_backend.asarray(theta0), method="lanczos", **common)
    z = eager_backend.to_numpy(lin.logits)
    nll = float(np.sum(logsumexp(z, axis=1) - z[np.arange(8), y]))
    theta = eager_backend.to_numpy(model.parameters())
    eigenvalues, _ = dense_spectrum(eager_backend, lin)
    log_det = float(np.sum(np.log1p(s2 * np.clip(eigenvalues, 0, None))))
    for out in (dense_out, lanczos_out):
        assert_close(out.neg_log_likelihood, nll, rtol=1e-12, atol=0, like=eager_backend)
        assert_close(
            out.prior_penalty,
            np.sum((theta - theta0) ** 2) / (2 * s2),
            rtol=1e-12,
            atol=0,
            like=eager_backend,
        )
        assert_close(out.log_det.value, log_det, rtol=1e-10, atol=0, like=eager_backend)
        assert_close(
            out.value,
            nll + np.sum((theta - theta0) ** 2) / (2 * s2) + log_det / 2,
            rtol=1e-10,
            atol=0,
            like=eager_backend,
        )
    # θ_0 = 0 by default; the BIC term counts every direction.
    zero = razor(lin, method="dense", **common)
    assert_close(
        zero.prior_penalty, np.sum(theta**2) / (2 * s2), rtol=1e-12, atol=0, like=eager_backend
    )
    assert_close(zero.bic_penalty, 19 * math.log(8), rtol=1e-12, atol=0, like=eager_backend)


def test_razor_bernoulli_likelihood() -> None:
    backend = make_backend("numpy")
    model, lin = mlp(backend, sizes=(3, 4, 2), n=5, seed=16)
    y = np.random.default_rng(16).integers(0, 2, size=(5, 2)).astype(np.float64)
    out = razor(
        lin, Bernoulli(), prior_variance=1.0, labels=y, theta=model.parameters(), method="dense"
    )
    z = lin.logits
    nll = float(np.sum(np.logaddexp(0, z) - y * z))
    np.testing.assert_allclose(float(out.neg_log_likelihood), nll, rtol=1e-12)
    eigenvalues, _ = dense_spectrum(backend, lin, Bernoulli())
    np.testing.assert_allclose(
        float(out.log_det.value), np.sum(np.log1p(np.clip(eigenvalues, 0, None))), rtol=1e-10
    )


# --------------------------------------------------------------------------- #
# the torch and JAX adapters give the numbers of the NumPy reference models


def _numpy_lin(ws, bs, x):
    from fisherbound.adapters.numpy import MLP, linearize

    model = MLP(ws, bs, activation="tanh")
    return linearize(model, x), model.parameters()


def _torch_lin(ws, bs, x):
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize

    model = torch_mlp(ws, bs)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return linearize(model, torch.from_numpy(x)), theta


def _jax_lin(ws, bs, x):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters.jax import linearize

    apply, params = jax_mlp(ws, bs)
    theta = jnp.concatenate([jnp.ravel(a) for layer in params for a in layer])
    return linearize(apply, params, jnp.asarray(x)), theta


@pytest.mark.parametrize("make", [_torch_lin, _jax_lin], ids=["torch", "jax"])
def test_adapters_agree_with_numpy(make) -> None:
    from fisherbound._lib import to_host

    ws, bs = mlp_weights((3, 4, 3), 17)  # D = 31, small for JAX's per-shape compilation
    x = np.random.default_rng(18).standard_normal((6, 3))
    y = np.array([0, 1, 2, 2, 1, 0])
    ref_lin, ref_theta = _numpy_lin(ws, bs, x)
    lin, theta = make(ws, bs, x)
    labels = lin.xp.asarray(y)
    for a, b in ((ref_lin, ref_theta), (lin, theta)):
        assert a.num_params == 31
        assert b.shape[0] == 31
    ref_top = top_eigenpairs(ref_lin, k=4, rng=0).eigenvalues
    top = top_eigenpairs(lin, k=4, rng=0).eigenvalues
    assert_close(top, ref_top, rtol=1e-9, atol=0, like=lin.logits)
    eps = gap_threshold(ref_top, 2)
    # max_count = 3: k = 4 Ritz values, the shapes top_eigenpairs already compiled.
    assert float(to_host(local_dimension(lin, eps=eps, max_count=3, rng=0).value)) == 3
    ref = razor(ref_lin, prior_variance=1.5, labels=y, theta=ref_theta, rng=0)
    out = razor(lin, prior_variance=1.5, labels=labels, theta=theta, rng=0)
    assert_close(out.value, float(ref.value), rtol=1e-10, atol=0, like=lin.logits)
    if make is _jax_lin:
        return  # eager JAX compiles every new shape of the Lanczos basis: keep it short
    sd = spectral_density(lin, num_probes=2, num_matvecs=10, num_points=16, rng=0)
    ref_sd = spectral_density(ref_lin, num_probes=2, num_matvecs=10, num_points=16, rng=0)
    assert_close(
        sd.density, ref_sd.density, rtol=1e-7, atol=1e-9 * ref_sd.density.max(), like=lin.logits
    )


# --------------------------------------------------------------------------- #
# bad input


def test_bad_numbers(eager_backend) -> None:
    model, lin = mlp(eager_backend, sizes=(2, 3, 3), n=3, seed=19)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number; got 0\.0"):
        local_dimension(lin, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number; got -1\.0"):
        local_dimension(lin, eps=-1.0)
    with pytest.raises(ValueError, match=r"eps must be a positive finite number; got nan"):
        local_dimension(lin, eps=float("nan"))
    with pytest.raises(TypeError, match=r"eps must be a positive real number; got str"):
        local_dimension(lin, eps="0.1")
    with pytest.raises(ValueError, match=r"k must be an integer >= 1; got 0"):
        top_eigenpairs(lin, k=0)
    with pytest.raises(ValueError, match=r"k must be at most D = 21 \(the number of parameters\)"):
        top_eigenpairs(lin, k=22)
    with pytest.raises(ValueError, match=r"num_matvecs must be an integer >= 1; got 0"):
        top_eigenpairs(lin, k=1, num_matvecs=0)
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        top_eigenpairs(lin, k=1, kernel="exactly")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        top_eigenpairs(lin, k=1, reduction="avg")
    with pytest.raises(ValueError, match=r"method must be one of 'auto', 'lanczos', 'slq'"):
        local_dimension(lin, eps=1.0, method="dense")
    with pytest.raises(ValueError, match=r"target_error must be .*; got 0"):
        local_dimension(lin, eps=1.0, target_error=0.0)
    with pytest.raises(TypeError, match=r"quadrature must be a SpectralDensity .* got int"):
        local_dimension(lin, eps=1.0, quadrature=3)
    with pytest.raises(ValueError, match=r"quadrature.nodes and quadrature.weights must both"):
        local_dimension(lin, eps=1.0, quadrature=Quadrature(lin.logits, lin.logits[:1, ...]))
    with pytest.raises(ValueError, match=r"max_count must be an integer >= 1; got 0"):
        local_dimension(lin, eps=1.0, max_count=0)
    with pytest.raises(ValueError, match=r"num_probes must be an integer >= 1; got 0"):
        local_dimension(lin, eps=1.0, num_probes=0)
    with pytest.raises(ValueError, match=r"num_matvecs must be at least max_count \+ 1 = 5"):
        local_dimension(lin, eps=1.0, max_count=4, num_matvecs=3)
    with pytest.raises(ValueError, match=r"found more than max_count = 1 eigenvalues above"):
        local_dimension(lin, eps=1e-12, method="lanczos", max_count=1)
    y = eager_backend.xp.asarray(np.array([0, 1, 2]), device=eager_backend.device)
    theta = model.parameters()
    with pytest.raises(ValueError, match=r"prior_variance must be a positive finite number"):
        razor(lin, prior_variance=0.0, labels=y, theta=theta)
    with pytest.raises(TypeError, match=r"prior_variance must be a positive real number"):
        razor(lin, prior_variance=None, labels=y, theta=theta)
    with pytest.raises(ValueError, match=r"method must be one of 'auto', 'dense', 'lanczos'"):
        razor(lin, prior_variance=1.0, labels=y, theta=theta, method="exact")
    with pytest.raises(
        ValueError,
        match=r"razor with method=.dense. refuses D = 21 parameters above max_params = 20",
    ):
        razor(lin, prior_variance=1.0, labels=y, theta=theta, method="dense", max_params=20)
    with pytest.raises(ValueError, match=r"width must be a positive finite number"):
        spectral_density(lin, width=-1.0)
    with pytest.raises(ValueError, match=r"num_points must be an integer >= 1; got 0"):
        spectral_density(lin, num_points=0)


def test_bad_arrays(eager_backend) -> None:
    model, lin = mlp(eager_backend, sizes=(2, 3, 3), n=3, seed=19)
    xp, dev = eager_backend.xp, eager_backend.device
    y = xp.asarray(np.array([0, 1, 2]), device=dev)
    theta = model.parameters()
    kw = dict(prior_variance=1.0)
    with pytest.raises(ValueError, match=r"logits of batch 0 .*: labels must have shape \(3,\)"):
        razor(lin, labels=xp.reshape(y, (3, 1)), theta=theta, **kw)
    with pytest.raises(
        TypeError, match=r"logits of batch 0 .*: labels must be an integer array of class indices"
    ):
        razor(lin, labels=xp.astype(y, xp.float64), theta=theta, **kw)
    with pytest.raises(
        ValueError, match=r"logits of batch 0 .*: labels must hold class indices in \[0, 3\)"
    ):
        razor(lin, labels=y + 1, theta=theta, **kw)
    with pytest.raises(
        ValueError, match=r"labels must have one row per input: shape \(3, \.\.\.\)"
    ):
        razor(lin, labels=y[:2], theta=theta, **kw)
    with pytest.raises(
        ValueError, match=r"labels must hold one array per batch of the source .1 batches.; got 2"
    ):
        razor(lin, labels=[y, y], theta=theta, **kw)
    with pytest.raises(TypeError, match=r"labels must be an array .* or a list of arrays"):
        razor(lin, labels={"y": y}, theta=theta, **kw)
    with pytest.raises(TypeError, match=r"labels of batch 0 must be an array"):
        razor(lin, labels=[[0, 1, 2]], theta=theta, **kw)
    with pytest.raises(ValueError, match=r"theta must be a flat parameter vector of shape \(21,\)"):
        razor(lin, labels=y, theta=theta[:20], **kw)
    with pytest.raises(TypeError, match=r"theta must be a flat parameter array of shape \(21,\)"):
        razor(lin, labels=y, theta=[0.0] * 21, **kw)
    with pytest.raises(ValueError, match=r"theta0 must be a flat parameter vector of shape"):
        razor(lin, labels=y, theta=theta, theta0=theta[:3], **kw)
    with pytest.raises(ValueError, match=r"theta must be finite; got NaN"):
        razor(lin, labels=y, theta=theta * float("nan"), **kw)
    with pytest.raises(TypeError, match=r"theta must have a real floating-point dtype"):
        razor(lin, labels=y, theta=xp.astype(theta, xp.int64), **kw)
    targets = eager_backend.asarray(np.full((3, 3), 0.5))
    with pytest.raises(
        ValueError, match=r"logits of batch 0 .*: labels must hold values in \[0, 1\]"
    ):
        razor(lin, Bernoulli(), labels=targets * 3, theta=theta, **kw)
    with pytest.raises(ValueError, match=r"logits of batch 0 .*: labels must have shape \(3, 3\)"):
        razor(lin, Gaussian(), labels=targets[:, :2], theta=theta, **kw)
    with pytest.raises(ValueError, match=r"logits of batch 0 .*: labels must be finite; got inf"):
        razor(lin, Gaussian(), labels=targets + float("inf"), theta=theta, **kw)
    with pytest.raises(ValueError, match=r"grid must be a 1-D array of points; got shape \(2, 2\)"):
        spectral_density(lin, grid=eager_backend.asarray(np.zeros((2, 2))))
    with pytest.raises(TypeError, match=r"grid must have a real floating-point dtype"):
        spectral_density(lin, grid=xp.asarray(np.arange(3), device=dev))


def test_mixed_libraries_and_devices() -> None:
    import array_api_strict as xs
    import torch

    backend = make_backend("strict-device1")
    model, lin = mlp(backend, sizes=(2, 3, 3), n=3, seed=19)
    y = xs.asarray([0, 1, 2], device=backend.device)
    theta = model.parameters()
    kw = dict(prior_variance=1.0)
    with pytest.raises(TypeError, match=r"all arrays must come from one array library"):
        razor(lin, labels=torch.tensor([0, 1, 2]), theta=theta, **kw)
    with pytest.raises(TypeError, match=r"all arrays must come from one array library"):
        razor(lin, labels=y, theta=torch.zeros(21, dtype=torch.float64), **kw)
    with pytest.raises(TypeError, match=r"all arrays must come from one array library"):
        spectral_density(lin, grid=np.linspace(0.0, 1.0, 5))
    cpu = xs.Device("CPU_DEVICE")
    with pytest.raises(ValueError, match=r"logits of batch 0 .*: labels must be on"):
        razor(lin, labels=xs.asarray([0, 1, 2], device=cpu), theta=theta, **kw)
    with pytest.raises(ValueError, match=r"theta must be on the linearization's device"):
        razor(lin, labels=y, theta=xs.asarray(np.zeros(21), device=cpu), **kw)
    with pytest.raises(ValueError, match=r"grid must be on the linearization's device"):
        spectral_density(lin, grid=xs.asarray(np.zeros(5), device=cpu))


def test_bad_sources_and_families() -> None:
    backend = make_backend("numpy")
    _, lin = mlp(backend, sizes=(2, 3, 3), n=3, seed=19)
    with pytest.raises(TypeError, match=r"needs a re-iterable source"):
        top_eigenpairs(iter([lin]), k=1)
    with pytest.raises(TypeError, match=r"family must be a fisherbound.families family"):
        local_dimension(lin, "categorical", eps=1.0)
    with pytest.raises(TypeError, match=r"family must be a fisherbound.families family"):
        rank_bound(lin, None)
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        rank_bound(lin, kernel="both")
    with pytest.raises(TypeError, match=r"source must be a Linearization or an iterable"):
        rank_bound(3)
