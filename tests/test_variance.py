"""Closed-form variances of the Fisher estimators against enumeration and Monte Carlo."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from _assertions import assert_close
from _backends import make_backend
from _models import jax_mlp, torch_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound._quantities import quantity
from fisherbound.adapters.numpy import MLP, LinearSoftmax, linearize
from fisherbound.estimators import _probe_samples
from fisherbound.families import Bernoulli, Categorical, Gaussian
from fisherbound.fisher import fisher_dense, fisher_diagonal
from fisherbound.linearization import LinearizationBase
from fisherbound.variance import (
    Comparison,
    classical_variance,
    compare_estimators,
    detach_and_mix_variance,
    std_error_bound,
)

P_REF = np.array([0.7, 0.2, 0.1])
MEAN_REF = np.array([0.21, 0.16, 0.09])
RADEMACHER_VAR_REF = np.array([0.056252, 0.016832, 0.002972])
GAUSSIAN_VAR_REF = np.array([0.0882, 0.0512, 0.0162])
FAMILIES = [Categorical(), Bernoulli(), Gaussian()]
FAMILY_IDS = ["categorical", "bernoulli", "gaussian"]


NUMPY = make_backend("numpy")


def identity_model(backend: Any) -> Any:
    """J = I and p = (0.7, 0.2, 0.1): z = W·1 with W = log p."""
    return linearize(
        LinearSoftmax(backend.asarray(np.log(P_REF)[:, None])), backend.asarray([[1.0]])
    )


def logistic_model(backend: Any) -> Any:
    """z = θx with x = 1.5 and σ(z) = 0.1."""
    theta = np.log(0.1 / 0.9) / 1.5
    return linearize(LinearSoftmax(backend.asarray([[theta]])), backend.asarray([[1.5]]))


def mlp(backend: Any, *, n: int = 3, sizes=(3, 4, 3), seed: int = 0, act: str = "tanh") -> Any:
    model = MLP.random(
        list(sizes), activation=act, rng=seed, xp=backend.xp, device=backend.device,
        dtype=backend.xp.float64,
    )  # fmt: skip
    x = np.random.default_rng(seed + 50).standard_normal((n, sizes[0]))
    return linearize(model, backend.asarray(x))


def all_signs(shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    return np.array(list(itertools.product([-1.0, 1.0], repeat=size))).reshape((-1, *shape))


def probe_samples(lin, xi, *, what="diagonal", per_example=False, kernel="exact", family=None):
    return np.asarray(
        _probe_samples(
            lin, family or Categorical(), xi, quantity(what), kernel=kernel,
            per_example=per_example, max_vectors=None,
        )
    )  # fmt: skip


def assert_variance_matches(samples: np.ndarray, expected: np.ndarray, k: float = 5.0) -> None:
    """The sample variance matches ``expected`` within k standard errors of a variance.

    SE(s²) ≈ √((m₄ − s⁴)/K), m₄ the sample fourth central moment.
    """
    n = samples.shape[0]
    centred = samples - samples.mean(axis=0)
    s2 = np.mean(centred**2, axis=0) * n / (n - 1)
    m4 = np.mean(centred**4, axis=0)
    se = np.sqrt(np.maximum(m4 - s2**2, 0.0) / n)
    floor = 1e-12 * np.max(np.abs(expected))
    assert np.all(np.abs(s2 - expected) <= k * se + floor), np.max(
        np.abs(s2 - expected) / (se + floor)
    )


# --------------------------------------------------------------------------- #
# THEORY reference values on every backend


def test_reference_detach_and_mix_variances(backend) -> None:
    lin = identity_model(backend)
    to_np = backend.to_numpy
    rad = detach_and_mix_variance(lin)
    assert rad.shape == (3,)
    assert_close(rad, RADEMACHER_VAR_REF, rtol=1e-7, atol=1e-12, like=backend)
    gauss = detach_and_mix_variance(lin, distribution="gaussian")
    assert_close(gauss, GAUSSIAN_VAR_REF, rtol=1e-7, atol=1e-12, like=backend)
    assert_close(gauss, 2 * MEAN_REF**2, rtol=1e-7, atol=1e-12, like=backend)  # CV = √2
    per = detach_and_mix_variance(lin, per_example=True, num_probes=4)  # one input: the same
    assert_close(per, RADEMACHER_VAR_REF / 4, rtol=1e-7, atol=1e-12, like=backend)
    bound = std_error_bound(backend.asarray(MEAN_REF), num_probes=1)
    assert np.all(np.sqrt(RADEMACHER_VAR_REF) <= to_np(bound))  # CV ≤ √2


def test_reference_logistic(backend) -> None:
    lin = logistic_model(backend)
    to_np = backend.to_numpy
    fam = Bernoulli()
    assert_close(fisher_diagonal(lin, fam), [0.2025], rtol=1e-7, atol=1e-12, like=backend)  # E Î_1
    assert_close(classical_variance(lin, fam), [0.2916], rtol=1e-7, atol=1e-12, like=backend)
    assert_close(
        classical_variance(lin, fam, estimator="hessian"), [0.0], rtol=1e-7, atol=0, like=backend
    )
    # z'⁴ p(1−p)(1−2p)²/k, and the bound sits above it
    assert_close(
        classical_variance(lin, fam, num_samples=4), [0.0729], rtol=1e-7, atol=1e-12, like=backend
    )
    assert to_np(classical_variance(lin, fam, bound=True))[0] >= 0.2916


# --------------------------------------------------------------------------- #
# detach-and-mix closed forms: exact against enumeration over all sign vectors


def check_against_enumeration(backend, lin, *, kernel="exact") -> None:
    r = 1 if kernel == "lower" else lin.num_outputs
    xi = backend.asarray(all_signs((lin.num_inputs, r)))
    to_np = backend.to_numpy
    for what, per_example in itertools.product(("diagonal", "trace"), (False, True)):
        samples = np.asarray(
            to_np(
                _probe_samples(
                    lin, Categorical(), xi, quantity(what), kernel=kernel,
                    per_example=per_example, max_vectors=None,
                )
            )
        )  # fmt: skip
        expected = to_np(
            detach_and_mix_variance(lin, what=what, per_example=per_example, kernel=kernel)
        )
        np.testing.assert_allclose(samples.var(axis=0), expected, rtol=1e-10, atol=1e-14)


def test_closed_forms_equal_enumeration(cpu_backend) -> None:
    check_against_enumeration(cpu_backend, mlp(cpu_backend, n=2))


@pytest.mark.parametrize("kernel", ["upper", "lower"])
def test_closed_forms_equal_enumeration_bound_kernels(kernel) -> None:
    check_against_enumeration(NUMPY, mlp(NUMPY, n=2, seed=3), kernel=kernel)


def test_closed_forms_streaming_and_chunking() -> None:
    lins = [mlp(NUMPY, n=2, seed=1), mlp(NUMPY, n=3, seed=1)]
    for what in ("diagonal", "trace"):
        whole = detach_and_mix_variance(lins, what=what, num_probes=3, reduction="mean")
        parts = sum(detach_and_mix_variance(lin, what=what) for lin in lins) / 3 / 25
        np.testing.assert_allclose(whole, parts, rtol=1e-12)
        tiny = detach_and_mix_variance(lins, what=what, max_vectors=1, per_example=True)
        big = detach_and_mix_variance(lins, what=what, per_example=True)
        np.testing.assert_allclose(tiny, big, rtol=1e-12)


# --------------------------------------------------------------------------- #
# ... and against sampling, where enumeration is impossible


@pytest.mark.parametrize("per_example", [False, True])
def test_empirical_variance_over_many_probes_matches_closed_form(per_example) -> None:
    lin = mlp(NUMPY, n=8, sizes=(3, 5, 4), seed=2)  # 2^32 sign vectors
    rng = np.random.default_rng(0)
    k = 6000
    for distribution in ("rademacher", "gaussian"):
        if distribution == "rademacher":
            xi = rng.choice([-1.0, 1.0], size=(k, 8, 4))
        else:
            xi = rng.standard_normal((k, 8, 4))
        for what in ("diagonal", "trace"):
            samples = probe_samples(lin, xi, what=what, per_example=per_example)
            expected = detach_and_mix_variance(
                lin, what=what, distribution=distribution, per_example=per_example
            )
            assert_variance_matches(samples, expected)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), hidden=st.integers(1, 6))
def test_cv_at_most_sqrt2_and_trace_bound(seed, n, hidden) -> None:
    lin = mlp(NUMPY, n=n, sizes=(3, hidden, 3), seed=seed)
    exact = fisher_diagonal(lin)
    rad = detach_and_mix_variance(lin)
    gauss = detach_and_mix_variance(lin, distribution="gaussian")
    assert np.all(rad <= 2 * exact**2 * (1 + 1e-12) + 1e-300)  # CV ≤ √2 per entry
    np.testing.assert_allclose(gauss, 2 * exact**2, rtol=1e-12, atol=1e-300)
    per = detach_and_mix_variance(lin, per_example=True)
    assert np.all(per <= rad * (1 + 1e-10) + 1e-300)  # per-example is never worse
    dense = fisher_dense(lin)
    tr_var = float(detach_and_mix_variance(lin, what="trace"))
    frob2 = float(np.sum(dense**2))
    assert tr_var <= 2 * frob2 * (1 + 1e-12) <= 2 * np.trace(dense) ** 2 * (1 + 1e-12)
    np.testing.assert_allclose(
        float(detach_and_mix_variance(lin, what="trace", distribution="gaussian")),
        2 * frob2,
        rtol=1e-10,
    )


# --------------------------------------------------------------------------- #
# §4: the variances of Î_1 and Î_2


def i1_i2_samples(lin, family, k, seed, to_np):
    """k independent draws of diag Î_1 and diag Î_2 (one label per input per draw)."""
    xp = lin.xp
    z = lin.logits
    y = family.sample(z, rng=seed, num_samples=k)
    zb = xp.broadcast_to(z[None, ...], (k, *tuple(z.shape)))
    u = family.score(zb, y)  # (k, N, C) = t(y) − E t(y)
    i1 = to_np(lin.sum_squared_per_example_vjp(xp.permute_dims(u, (1, 0, 2))))  # (k, D)
    h = to_np(lin.output_second_derivative_diagonal())  # (N, C, D)
    exact = to_np(fisher_diagonal(lin, family))
    i2 = exact[None, :] - np.einsum("knc,ncd->kd", to_np(u), h)  # −∂²ℓ/∂θ_i²
    return i1, i2, exact


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_section4_formulas_match_monte_carlo_numpy(family) -> None:
    lin = mlp(NUMPY, n=3, sizes=(3, 5, 3), seed=5)
    i1, i2, exact = i1_i2_samples(lin, family, 6000, 0, np.asarray)
    # both estimators are unbiased ...
    for s in (i1, i2):
        se = s.std(axis=0, ddof=1) / np.sqrt(s.shape[0])
        assert np.all(np.abs(s.mean(axis=0) - exact) <= 5 * se + 1e-10 * exact.max())
    # ... with the variances of THEORY §4
    assert_variance_matches(i1, classical_variance(lin, family))
    assert_variance_matches(i2, classical_variance(lin, family, estimator="hessian"))
    # the bounds hold
    for estimator in ("score", "hessian"):
        exact_var = classical_variance(lin, family, estimator=estimator)
        bound = classical_variance(lin, family, estimator=estimator, bound=True)
        assert np.all(exact_var <= bound * (1 + 1e-12) + 1e-300)


def test_section4_exact_by_enumerating_labels() -> None:
    """Categorical, two inputs: all 9 label pairs give the variances to 1e-12."""
    lin = mlp(NUMPY, n=2, sizes=(3, 4, 3), seed=8)
    fam = Categorical()
    p = np.asarray(fam.mean(lin.logits))
    h = lin.output_second_derivative_diagonal()
    exact = fisher_diagonal(lin)
    i1, i2, weights = [], [], []
    for labels in itertools.product(range(3), repeat=2):
        y = np.array(labels)
        u = np.asarray(fam.score(lin.logits, y))
        g = lin.per_example_vjp(u[:, None, :])[:, 0, :]
        i1.append(np.sum(g**2, axis=0))
        i2.append(exact - np.einsum("nc,ncd->d", u, h))
        weights.append(p[0, labels[0]] * p[1, labels[1]])
    w = np.array(weights)[:, None]
    for samples, estimator in ((np.array(i1), "score"), (np.array(i2), "hessian")):
        mean = np.sum(w * samples, axis=0)
        np.testing.assert_allclose(mean, exact, atol=1e-12)
        var = np.sum(w * (samples - mean) ** 2, axis=0)
        np.testing.assert_allclose(
            var, classical_variance(lin, fam, estimator=estimator), atol=1e-12
        )


def test_section4_torch() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize

    lin_np = mlp(NUMPY, n=3, sizes=(3, 5, 3), seed=5)
    module = torch_mlp(lin_np.model.weights, lin_np.model.biases)
    x = torch.as_tensor(lin_np.inputs)
    lin = torch_linearize(module, x)
    h = lin.output_second_derivative_diagonal(max_vectors=7)
    assert_close(h, lin_np.output_second_derivative_diagonal(), rtol=1e-7, atol=1e-12, like="torch")
    # independent check: the diagonal of the Hessian of each output, by torch.func
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach() for p in module.parameters())

    def out(*ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    hess = torch.func.hessian(out, argnums=tuple(range(len(params))))(*params)
    diag_blocks = []
    for i, p in enumerate(params):
        hi = hess[i][i].reshape(3, 3, p.numel(), p.numel())
        diag_blocks.append(torch.diagonal(hi, dim1=-2, dim2=-1))
    assert_close(h, torch.cat(diag_blocks, dim=-1), rtol=1e-7, atol=1e-12)
    for fam in (Categorical(), Bernoulli()):
        to_np = lambda t: t.detach().numpy()  # noqa: E731
        i1, i2, _ = i1_i2_samples(lin, fam, 6000, 1, to_np)
        assert_variance_matches(i1, classical_variance(lin, fam).numpy())
        assert_variance_matches(i2, classical_variance(lin, fam, estimator="hessian").numpy())


def test_section4_jax() -> None:
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    from fisherbound.adapters.jax import linearize as jax_linearize

    lin_np = mlp(NUMPY, n=3, sizes=(3, 5, 3), seed=5)
    model = lin_np.model
    apply_fn, params = jax_mlp(model.weights, model.biases)
    x = jnp.asarray(lin_np.inputs)
    lin = jax_linearize(apply_fn, params, x)
    h = lin.output_second_derivative_diagonal(max_vectors=7)
    assert_close(h, lin_np.output_second_derivative_diagonal(), rtol=1e-7, atol=1e-12, like="jax")
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)  # the adapter's documented layout
    assert_close(flat, lin.flat_params, rtol=0, atol=0)
    hess = jax.hessian(lambda t: apply_fn(unravel(t), x))(flat)  # (N, C, D, D)
    assert_close(h, jnp.diagonal(hess, axis1=-2, axis2=-1), rtol=1e-7, atol=1e-12)
    fam = Categorical()
    i1, i2, _ = i1_i2_samples(lin, fam, 6000, 2, np.asarray)
    assert_variance_matches(i1, np.asarray(classical_variance(lin, fam)))
    assert_variance_matches(i2, np.asarray(classical_variance(lin, fam, estimator="hessian")))


def test_second_derivatives_numpy_against_finite_differences(host_backend) -> None:
    lin = mlp(host_backend, n=2, sizes=(3, 4, 4, 2), seed=1)
    model = lin.model
    to_np = host_backend.to_numpy
    theta = to_np(model.parameters())
    x = lin.inputs
    h = to_np(lin.output_second_derivative_diagonal(max_vectors=1))
    eps = 1e-4
    fd = np.zeros_like(h)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = eps
        plus = to_np(model.with_parameters(host_backend.asarray(theta + e))(x))
        minus = to_np(model.with_parameters(host_backend.asarray(theta - e))(x))
        fd[:, :, i] = (plus - 2 * to_np(model(x)) + minus) / eps**2
    np.testing.assert_allclose(h, fd, atol=1e-6)
    last = model.blocks[-2].offset  # the last layer: z is linear in it
    assert np.all(h[:, :, last:] == 0)


# --------------------------------------------------------------------------- #
# the a-priori bound


def test_std_error_bound_blocks_and_trace() -> None:
    lin = mlp(NUMPY, n=2, seed=4)
    xi = all_signs((2, 3))
    g = probe_samples(lin, xi, what="full")  # (64, D): every probe's gradient
    dense = fisher_dense(lin)
    # per entry of the full matrix: the SE of g_i g_j over all probes ≤ the bound
    products = g[:, :, None] * g[:, None, :]
    bound = std_error_bound(dense, num_probes=1)
    assert np.all(products.std(axis=0) <= bound * (1 + 1e-12) + 1e-15)
    blocks = std_error_bound({"all": dense}, num_probes=4)
    np.testing.assert_allclose(blocks["all"], bound / 2)
    trace_sd = np.sum(g**2, axis=1).std()
    assert trace_sd <= float(std_error_bound(np.trace(dense)))
    with pytest.raises(
        ValueError, match=r"value must be a diagonal \(D,\), a trace \(0-d\), a square block"
    ):
        std_error_bound(np.ones((2, 3)))
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        std_error_bound(np.ones(3), num_probes=0)
    with pytest.raises(TypeError, match="value must be an array"):
        std_error_bound([1.0, 2.0])


# --------------------------------------------------------------------------- #
# which estimator to use


def test_compare_estimators() -> None:
    lin = mlp(NUMPY, n=16, sizes=(3, 6, 3), seed=6)
    table = compare_estimators(lin, target_relative_error=0.2)
    assert isinstance(table, Comparison)
    rows = {r.name: r for r in table.rows}
    assert set(rows) == {"detach_and_mix", "detach_and_mix_per_example", "monte_carlo", "exact"}
    exact = fisher_diagonal(lin)
    norm2 = float(np.sum(exact**2))
    np.testing.assert_allclose(
        rows["detach_and_mix"].relative_variance, np.sum(detach_and_mix_variance(lin)) / norm2
    )
    np.testing.assert_allclose(
        rows["monte_carlo"].relative_variance, np.sum(classical_variance(lin)) / norm2, rtol=1e-12
    )
    assert rows["exact"].relative_variance == 0
    assert rows["exact"].draws == 1
    # per-example squares have the smaller variance per draw on 16 inputs
    assert (
        rows["detach_and_mix_per_example"].relative_variance
        < rows["detach_and_mix"].relative_variance
    )
    for r in table.rows:
        assert r.draws >= 1
        assert r.seconds >= 0
        assert r.seconds_to_target == pytest.approx(r.draws * r.seconds)
    assert table.best == min(table.rows, key=lambda r: r.seconds_to_target).name
    text = table.to_markdown()
    assert "| estimator |" in text
    assert "best:" in text
    sub = compare_estimators(lin, estimators=["monte_carlo"], target_relative_error=0.5)
    assert [r.name for r in sub.rows] == ["monte_carlo"]
    assert sub.best == "monte_carlo"
    with pytest.raises(ValueError, match="estimators entries must be one of"):
        compare_estimators(lin, estimators=["hutchinson"])
    with pytest.raises(ValueError, match="target_relative_error must be a positive finite number"):
        compare_estimators(lin, target_relative_error=0)
    with pytest.raises(TypeError, match="target_relative_error must be a positive number"):
        compare_estimators(lin, target_relative_error=None)


# --------------------------------------------------------------------------- #
# bad input


def test_bad_input() -> None:
    lin = mlp(NUMPY)
    with pytest.raises(ValueError, match="what must be one of 'diagonal', 'trace'; got 'blocks'"):
        detach_and_mix_variance(lin, what="blocks")
    with pytest.raises(ValueError, match="distribution must be one of"):
        detach_and_mix_variance(lin, distribution="sobol")
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        detach_and_mix_variance(lin, num_probes=0)
    with pytest.raises(TypeError, match="per_example must be True or False; got str"):
        detach_and_mix_variance(lin, per_example="yes")
    with pytest.raises(
        ValueError, match="estimator must be one of 'score', 'hessian'; got 'fisher'"
    ):
        classical_variance(lin, estimator="fisher")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 0"):
        classical_variance(lin, num_samples=0)
    with pytest.raises(TypeError, match="bound must be True or False; got int"):
        classical_variance(lin, bound=1)
    with pytest.raises(TypeError, match="family must be a fisherbound.families family"):
        classical_variance(lin, family=object())
    one_output = linearize(LinearSoftmax.random(3, 1, rng=0), np.ones((2, 3)))
    with pytest.raises(ValueError, match="needs at least 2; use Bernoulli"):
        detach_and_mix_variance(one_output)

    class NoSecond(LinearizationBase):
        def __init__(self, inner):
            self._logits, self._blocks, self._xp = inner.logits, inner.blocks, inner.xp

    with pytest.raises(
        NotImplementedError, match="NoSecond does not provide output_second_derivative_diagonal"
    ):
        classical_variance(NoSecond(lin), estimator="hessian")


def test_std_error_bound_refuses_negative_and_non_finite_values() -> None:
    with pytest.raises(
        ValueError, match=r"diagonal entries are variances, >= 0; got a minimum of -0.5"
    ):
        std_error_bound(np.array([0.2, -0.5]), num_probes=4)
    with pytest.raises(ValueError, match=r"got a minimum of -1.0"):
        std_error_bound(np.array(-1.0))
    with pytest.raises(ValueError, match=r"got a minimum of -2.0"):
        std_error_bound(np.array([[-2.0, 0.1], [0.1, 1.0]]))
    with pytest.raises(ValueError, match=r"value .*NaN"):
        std_error_bound(np.array([0.2, np.nan]))


def test_compare_estimators_names_a_bad_selection() -> None:
    lin = mlp(NUMPY, n=4, sizes=(3, 4, 3), seed=6)
    with pytest.raises(ValueError, match=r"estimators must be None \(all four\) or a non-empty"):
        compare_estimators(lin, target_relative_error=0.2, estimators=[])  # was min() of []
    with pytest.raises(TypeError, match=r"non-empty list of names .* got 'exact'"):
        compare_estimators(lin, target_relative_error=0.2, estimators="exact")  # was 'e'
    with pytest.raises(ValueError, match=r"estimators entries must be one of .* got 'nope'"):
        compare_estimators(lin, target_relative_error=0.2, estimators=["nope"])
