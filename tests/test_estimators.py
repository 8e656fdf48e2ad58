"""Detach-and-mix, Monte-Carlo and empirical Fisher estimates: unbiasedness, error bars."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from _assertions import assert_close
from _backends import make_backend
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound import Estimate
from fisherbound._quantities import quantity
from fisherbound.adapters.numpy import MLP, LinearSoftmax, linearize
from fisherbound.estimators import (
    Accumulator,
    _probe_samples,
    detach_and_mix,
    empirical,
    monte_carlo,
)
from fisherbound.families import Bernoulli, Categorical, Gaussian
from fisherbound.fisher import fisher_blocks, fisher_bounds, fisher_dense, fisher_diagonal

P_REF = np.array([0.7, 0.2, 0.1])
MEAN_REF = np.array([0.21, 0.16, 0.09])
RADEMACHER_VAR_REF = np.array([0.056252, 0.016832, 0.002972])


# --------------------------------------------------------------------------- #
# helpers


NUMPY = make_backend("numpy")


def identity_model(backend: Any, p: np.ndarray = P_REF) -> Any:
    """A linearization with J = I and softmax(z) = p: z = W·1, θ = W = log p."""
    model = LinearSoftmax(backend.asarray(np.log(p)[:, None]))
    return linearize(model, backend.asarray([[1.0]]))


def mlp(backend: Any, *, n: int = 4, sizes=(3, 4, 3), seed: int = 0, act: str = "tanh") -> Any:
    model = MLP.random(
        list(sizes), activation=act, rng=seed, xp=backend.xp, device=backend.device,
        dtype=backend.xp.float64,
    )  # fmt: skip
    x = np.random.default_rng(seed + 50).standard_normal((n, sizes[0]))
    return linearize(model, backend.asarray(x))


def all_signs(shape: tuple[int, ...]) -> np.ndarray:
    """Every Rademacher vector of the given shape, stacked: (2^size, *shape)."""
    size = int(np.prod(shape))
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=size)))
    return signs.reshape((-1, *shape))


def enumerate_samples(backend, lin, family, *, kernel="exact", what="diagonal", per_example=False):
    """The per-probe samples over ALL sign vectors: their mean is the exact expectation."""
    r = 1 if kernel == "lower" else lin.num_outputs
    xi = backend.asarray(all_signs((lin.num_inputs, r)))
    qty = quantity(what, max_size=lin.num_params)
    qty.select(lin)  # every block
    s = _probe_samples(
        lin, family, xi, qty, kernel=kernel, per_example=per_example, max_vectors=None
    )
    if isinstance(s, dict):
        return {k: backend.to_numpy(v) for k, v in s.items()}
    return backend.to_numpy(s)


def z_scores(est: Estimate, truth: np.ndarray, to_numpy) -> np.ndarray:
    """|estimate − truth| / standard error, with a rounding floor for exact entries.

    Some entries have zero variance (a Rademacher square ξ² = 1, e.g. last-layer
    weights of a Bernoulli model per example): their error is rounding only.
    """
    value, se = to_numpy(est.value), to_numpy(est.std_error)
    floor = 1e-10 * np.max(np.abs(truth))
    return np.abs(value - truth) / (se + floor)


# --------------------------------------------------------------------------- #
# THEORY reference: J = I, p = (0.7, 0.2, 0.1), on every backend


def test_reference_enumeration_exact(backend) -> None:
    lin = identity_model(backend)
    samples = enumerate_samples(backend, lin, Categorical())
    np.testing.assert_allclose(samples.mean(axis=0), MEAN_REF, atol=1e-12)
    np.testing.assert_allclose(samples.var(axis=0), RADEMACHER_VAR_REF, atol=1e-12)
    assert np.all(samples.std(axis=0) <= np.sqrt(2) * MEAN_REF)  # CV ≤ √2


def test_reference_estimate_and_error_bar(backend) -> None:
    lin = identity_model(backend)
    m = 4000
    est = detach_and_mix(lin, num_probes=m, rng=0)
    assert est.num_probes == m
    assert est.value.shape == (3,)
    assert est.std_error.shape == (3,)
    assert np.all(z_scores(est, MEAN_REF, backend.to_numpy) < 5)
    # The standard error estimates √(Var / M) (sampling error of a variance: ~5 %).
    assert_close(est.std_error, np.sqrt(RADEMACHER_VAR_REF / m), rtol=0.15, atol=0, like=backend)


def test_same_seed_same_numbers_on_every_backend(backend) -> None:
    def run(b):
        lins = [mlp(b, n=3), mlp(b, n=2, seed=1)]
        labels = b.xp.asarray(np.array([0, 2, 1]), device=b.device)
        return [
            detach_and_mix(lins, num_probes=3, rng=7),
            detach_and_mix(lins[0], what="trace", num_probes=3, rng=7, per_example=True),
            monte_carlo(lins[0], num_samples=3, rng=7),
            empirical(lins[0], labels),
        ]

    for ref, got in zip(run(NUMPY), run(backend)):
        assert_close(got.value, ref.value, rtol=1e-10, atol=1e-14, like=backend)
        assert_close(got.std_error, ref.std_error, rtol=1e-8, atol=0, like=backend)
        assert got.num_probes == ref.num_probes
        # The 95% interval stays in the backend's namespace and device (the first
        # estimate sums two batches: an array of Welch–Satterthwaite dof per entry).
        for end_got, end_ref in zip(got.interval(), ref.interval()):
            assert_close(end_got, np.asarray(end_ref), rtol=1e-8, atol=1e-14, like=backend)


# --------------------------------------------------------------------------- #
# exact enumeration on a tiny nonlinear model: every quantity to 1e-12


def test_enumeration_gives_exact_diagonal_trace_blocks(cpu_backend) -> None:
    check_enumeration(cpu_backend, per_example=False)


def test_enumeration_per_example(host_backend) -> None:
    check_enumeration(host_backend, per_example=True)


def check_enumeration(cpu_backend, *, per_example) -> None:
    lin = mlp(cpu_backend, n=2)  # 2 inputs × 3 classes: 64 sign vectors
    fam = Categorical()
    exact = cpu_backend.to_numpy(fisher_diagonal(lin, fam))
    diag = enumerate_samples(cpu_backend, lin, fam, per_example=per_example)
    np.testing.assert_allclose(diag.mean(axis=0), exact, atol=1e-12)
    trace = enumerate_samples(cpu_backend, lin, fam, what="trace", per_example=per_example)
    np.testing.assert_allclose(trace.mean(), exact.sum(), atol=1e-12)
    blocks = enumerate_samples(cpu_backend, lin, fam, what="blocks", per_example=per_example)
    for name, block in fisher_blocks(lin, fam).items():
        np.testing.assert_allclose(
            blocks[name].mean(axis=0), cpu_backend.to_numpy(block), atol=1e-12
        )


def test_enumeration_full_factor_gives_dense_fisher(host_backend) -> None:
    lin = mlp(host_backend, n=2)
    g = enumerate_samples(host_backend, lin, Categorical(), what="full")  # (64, D)
    dense = host_backend.to_numpy(fisher_dense(lin))
    np.testing.assert_allclose(g.T @ g / g.shape[0], dense, atol=1e-12)


@pytest.mark.parametrize("kernel", ["upper", "lower"])
def test_enumeration_bound_variants(host_backend, kernel) -> None:
    lin = mlp(host_backend, n=2)
    lower, upper = fisher_bounds(lin)
    expected = host_backend.to_numpy(upper if kernel == "upper" else lower)
    diag = enumerate_samples(host_backend, lin, Categorical(), kernel=kernel)
    np.testing.assert_allclose(diag.mean(axis=0), expected, atol=1e-12)


@pytest.mark.parametrize("family", [Bernoulli(), Gaussian()], ids=["bernoulli", "gaussian"])
def test_enumeration_other_families(family) -> None:
    backend = NUMPY
    lin = mlp(backend, n=2, sizes=(3, 4, 2))
    diag = enumerate_samples(backend, lin, family)
    np.testing.assert_allclose(diag.mean(axis=0), fisher_diagonal(lin, family), atol=1e-12)


# --------------------------------------------------------------------------- #
# the √p̃-versus-p̃ mistake is caught


class WrongWeight(Categorical):
    """The classic bug: weight p̃ instead of √p̃ in h = Σ ξ_y p̃_y ℓ_y.

    It overrides the family hook behind ``sqrt_metric_matvec`` (docs/architecture.md,
    "To add a family"), which the estimators reach through the public and the
    unchecked method alike.
    """

    def _exact_sqrt_matvec(self, z, xi, xp):
        p = self.probabilities(z)
        return p * xi - p * xp.sum(p * xi, axis=-1, keepdims=True)


def test_p_instead_of_sqrt_p_is_rejected() -> None:
    backend = NUMPY
    lin = mlp(backend, n=16, sizes=(3, 6, 4), seed=2)
    exact = fisher_diagonal(lin)
    good = detach_and_mix(lin, num_probes=400, rng=1)
    bad = detach_and_mix(lin, WrongWeight(), num_probes=400, rng=1)
    z_good = z_scores(good, exact, np.asarray)
    z_bad = z_scores(bad, exact, np.asarray)
    assert z_good.max() < 5  # the right estimator passes the 5-SE test ...
    assert z_bad.max() > 20  # ... the wrong one is rejected by a wide margin
    # and exactly: its expectation is Σ p_y² s sᵀ, not F.
    wrong_mean = enumerate_samples(backend, mlp(backend, n=2), WrongWeight()).mean(axis=0)
    right = fisher_diagonal(mlp(backend, n=2))
    assert np.max(np.abs(wrong_mean - right)) > 1e-2


# --------------------------------------------------------------------------- #
# unbiasedness by sampling (5 standard errors), streaming, options


def test_unbiased_streaming_diagonal_trace_blocks() -> None:
    cpu_backend = NUMPY
    first = mlp(cpu_backend, n=5, seed=0)
    lins = [first, linearize(first.model, first.inputs * 0.5)]  # two batches, one model
    exact = cpu_backend.to_numpy(fisher_diagonal(lins))
    to_np = cpu_backend.to_numpy
    est = detach_and_mix(lins, num_probes=300, rng=3)
    assert np.all(z_scores(est, exact, to_np) < 5)
    tr = detach_and_mix(lins, what="trace", num_probes=300, rng=4)
    assert tr.value.shape == ()
    assert float(z_scores(tr, exact.sum(), to_np)) < 5
    blk = detach_and_mix(lins, what="blocks", blocks=["layers.1.bias"], num_probes=300, rng=5)
    truth = to_np(fisher_blocks(lins, blocks=["layers.1.bias"])["layers.1.bias"])
    assert set(blk.value) == {"layers.1.bias"}
    zb = np.abs(to_np(blk.value["layers.1.bias"]) - truth) / to_np(blk.std_error["layers.1.bias"])
    assert zb.max() < 5
    mean = detach_and_mix(lins, num_probes=300, rng=3, reduction="mean")
    assert_close(mean.value, to_np(est.value) / 10, rtol=1e-12, atol=0, like=cpu_backend)
    assert_close(mean.std_error, to_np(est.std_error) / 10, rtol=1e-12, atol=0, like=cpu_backend)


@pytest.mark.parametrize(
    "family", [Categorical(), Bernoulli(), Gaussian()], ids=["cat", "bern", "gauss"]
)
def test_unbiased_families_gaussian_probes_and_per_example(family) -> None:
    backend = NUMPY
    lin = mlp(backend, n=6, sizes=(3, 5, 3), seed=4)
    exact = fisher_diagonal(lin, family)
    for kw in ({"distribution": "gaussian"}, {"per_example": True}):
        est = detach_and_mix(lin, family, num_probes=400, rng=6, **kw)
        assert np.all(z_scores(est, exact, np.asarray) < 5), kw


def test_per_example_beats_batch_level() -> None:
    backend = NUMPY
    lin = mlp(backend, n=32, sizes=(3, 8, 4), seed=1)
    batch = detach_and_mix(lin, num_probes=64, rng=0)
    per = detach_and_mix(lin, num_probes=64, rng=0, per_example=True)
    # Summing squares per input removes the cross-input noise: smaller error bars.
    assert np.median(per.std_error / batch.std_error) < 0.5


def test_full_factor(host_backend) -> None:
    cpu_backend = host_backend
    lins = [mlp(cpu_backend, n=3, seed=0), mlp(cpu_backend, n=2, seed=0)]
    to_np = cpu_backend.to_numpy
    est = detach_and_mix(lins, what="full", num_probes=5, rng=2)
    v = to_np(est.value)
    assert v.shape == (5, lins[0].num_params)
    assert est.num_probes == 5
    assert to_np(est.std_error).shape == (lins[0].num_params,)
    # The Gram matrix VᵀV is PSD of rank <= M and its diagonal is the mean of g_m².
    gram = v.T @ v
    assert np.linalg.matrix_rank(gram, tol=1e-10) <= 5
    mean = detach_and_mix(lins, what="full", num_probes=5, rng=2, reduction="mean")
    assert_close(mean.value, v / np.sqrt(5.0), rtol=1e-12, atol=0, like=cpu_backend)
    # One batch: the factor's diagonal is the diagonal estimate with the same probes.
    one = detach_and_mix(lins[0], what="full", num_probes=5, rng=9)
    diag = detach_and_mix(lins[0], num_probes=5, rng=9)
    np.testing.assert_allclose(np.sum(to_np(one.value) ** 2, axis=0), to_np(diag.value), rtol=1e-10)
    assert_close(one.std_error, diag.std_error, rtol=1e-10, atol=0)


def test_one_batched_vjp_and_no_per_example_gradients() -> None:
    lin = mlp(NUMPY, n=4)
    calls: list[str] = []

    class Spy:
        """Delegates to the linearization, logging products; refuses per-example ones."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        logits = property(lambda self: self._inner.logits)
        blocks = property(lambda self: self._inner.blocks)
        num_params = property(lambda self: self._inner.num_params)
        xp = property(lambda self: self._inner.xp)

        def jvp(self, v):
            raise AssertionError("jvp")

        def vjp(self, u):
            raise AssertionError("vjp")

        def jvp_batch(self, V):
            raise AssertionError("jvp_batch")

        def vjp_batch(self, U):
            calls.append(f"vjp_batch{tuple(U.shape)}")
            return self._inner.vjp_batch(U)

        def per_example_vjp(self, U):
            raise AssertionError("per-example gradients in the batch-level estimator")

        def sum_squared_per_example_vjp(self, U, *, max_vectors=None):
            raise AssertionError("per-example squares in the batch-level estimator")

    detach_and_mix([Spy(lin), Spy(lin)], num_probes=7, rng=0)
    assert calls == ["vjp_batch(7, 4, 3)", "vjp_batch(7, 4, 3)"]
    calls.clear()
    bounded = detach_and_mix(Spy(lin), num_probes=7, rng=0, max_vectors=3)
    assert calls == ["vjp_batch(3, 4, 3)", "vjp_batch(3, 4, 3)", "vjp_batch(1, 4, 3)"]
    np.testing.assert_allclose(bounded.value, detach_and_mix(lin, num_probes=7, rng=0).value)


def test_float32_in_float32_out(cpu_backend) -> None:
    model = MLP.random(
        [3, 4, 3], rng=0, xp=cpu_backend.xp, device=cpu_backend.device,
        dtype=cpu_backend.xp.float32,
    )  # fmt: skip
    lin = linearize(model, cpu_backend.asarray(np.ones((4, 3)), dtype="float32"))
    for what in ("diagonal", "trace", "full"):
        est = detach_and_mix(lin, what=what, num_probes=2, rng=0)
        assert est.value.dtype == cpu_backend.xp.float32
        assert est.std_error.dtype == cpu_backend.xp.float32
    assert monte_carlo(lin, num_samples=2, rng=0).value.dtype == cpu_backend.xp.float32


# --------------------------------------------------------------------------- #
# the accumulator: merges across batches, calls and processes


def test_accumulator_update_merge_pool() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((6, 3))
    acc = Accumulator().update(a, num_inputs=2).update(b, num_inputs=3)
    est = acc.estimate()
    expected_var = a.var(axis=0, ddof=1) / 4 + b.var(axis=0, ddof=1) / 6
    np.testing.assert_allclose(est.value, a.mean(0) + b.mean(0))
    np.testing.assert_allclose(est.std_error, np.sqrt(expected_var))
    assert est.num_probes == 4
    assert acc.num_inputs == 5
    assert acc.num_batches == 2
    np.testing.assert_allclose(acc.estimate(reduction="mean").value, est.value / 5)
    # merge == updating with both strata
    other = Accumulator().update(b, num_inputs=3)
    merged = Accumulator().update(a, num_inputs=2).merge(other)
    np.testing.assert_allclose(merged.estimate().std_error, est.std_error)
    # pool: same inputs, more probes == one stratum with all probes (means agree)
    pooled = (
        Accumulator().update(a[:2], num_inputs=2).pool(Accumulator().update(a[2:], num_inputs=2))
    )
    assert pooled.num_probes == 4
    np.testing.assert_allclose(pooled.estimate().value, a.mean(axis=0))
    # ... and the same standard error and dof as the four samples in one stratum
    one = Accumulator().update(a, num_inputs=2).estimate()
    np.testing.assert_allclose(pooled.estimate().std_error, one.std_error)
    assert pooled.estimate().dof == one.dof == 3
    # from an Estimate (another call, another process)
    back = Accumulator.from_estimate(est, num_inputs=5)
    np.testing.assert_allclose(back.estimate().std_error, est.std_error)
    back_mean = Accumulator.from_estimate(
        acc.estimate(reduction="mean"), num_inputs=5, reduction="mean"
    )
    np.testing.assert_allclose(back_mean.estimate().value, est.value)
    assert "batches=2" in repr(acc)


def test_calls_on_shards_merge_to_the_whole(host_backend) -> None:
    cpu_backend = host_backend
    b1, b2 = mlp(cpu_backend, n=3, seed=0), mlp(cpu_backend, n=4, seed=0)
    whole = detach_and_mix([b1, b2], num_probes=4, rng=np.random.default_rng(11))
    gen = np.random.default_rng(11)
    e1 = detach_and_mix(b1, num_probes=4, rng=gen)
    e2 = detach_and_mix(b2, num_probes=4, rng=gen)
    acc = Accumulator.from_estimate(e1).merge(Accumulator.from_estimate(e2))
    assert_close(acc.estimate().value, whole.value, rtol=1e-12, atol=0)
    assert_close(acc.estimate().std_error, whole.std_error, rtol=1e-12, atol=0)


def test_interval_is_student_t_with_the_degrees_of_freedom() -> None:
    from scipy import stats

    est = Estimate(np.array([10.0, -3.0]), np.array([1.0, 2.0]), 5)
    assert est.dof is None
    assert est.degrees_of_freedom == 4
    low, high = est.interval(0.9)
    q = stats.t.ppf(0.95, 4)
    np.testing.assert_allclose(low, [10.0 - q, -3.0 - 2 * q], rtol=1e-12)
    np.testing.assert_allclose(high, [10.0 + q, -3.0 + 2 * q], rtol=1e-12)
    # An explicit dof, per entry and non-integer (Welch–Satterthwaite).
    est = Estimate(np.array([10.0, 10.0]), np.array([1.0, 1.0]), 3, np.array([2.5, np.inf]))
    low, _ = est.interval()
    np.testing.assert_allclose(low, 10.0 - stats.t.ppf(0.975, [2.5, np.inf]), rtol=1e-12)
    # One probe: no interval (NaN), never a silent zero width.
    nan = Estimate(np.array(1.0), np.array(np.nan), 1).interval()
    assert all(np.isnan(b) for b in nan)


def test_interval_with_a_floor_is_on_the_cube_root_scale() -> None:
    from scipy import stats

    from fisherbound._lib._estimate import SKEW_DOF

    v, se, m = 4.0, 1.0, 10
    c = se / v
    d = (m - 1) / (1 + SKEW_DOF * (m - 1) * c * c)
    q = stats.t.ppf(0.975, d)
    low, high = Estimate(np.array(v), np.array(se), m, floor=0.0).interval()
    assert float(low) == pytest.approx(v / (1 - c * c / 9 + q * c / 3) ** 3, rel=1e-12)
    assert float(high) == pytest.approx(v / (1 - c * c / 9 - q * c / 3) ** 3, rel=1e-12)
    assert 0 < float(low) < v - q * se + 2 * se  # above the Student-t end: skew
    # A floor f shifts the scale: f + the interval of value − f.
    lo_f, hi_f = Estimate(np.array(v + 7.0), np.array(se), m, floor=7.0).interval()
    assert float(lo_f) == pytest.approx(7.0 + float(low), rel=1e-12)
    assert float(hi_f) == pytest.approx(7.0 + float(high), rel=1e-12)
    # Two probes and a large relative error: no upper bound.
    _, unbounded = Estimate(np.array(1.0), np.array(0.8), 2, floor=0.0).interval()
    assert float(unbounded) == np.inf


def test_interval_allows_for_rounding_where_the_error_is_zero() -> None:
    v = np.array([3.0, 1e-300, 0.0], dtype=np.float32)
    low, high = Estimate(v, np.zeros(3, np.float32), 4).interval()
    half = 256 * np.finfo(np.float32).eps * np.abs(v)
    np.testing.assert_array_equal(low, v - half)
    np.testing.assert_array_equal(high, v + half)
    assert low.dtype == np.float32
    # ... and an exact estimate of infinite dof is its value up to rounding.
    low, high = Estimate(np.array(2.0), np.array(0.0), 0, math.inf, 0.0).interval()
    assert float(low) < 2.0 < float(high) < 2.0 + 1e-12


def test_interval_of_blocks_and_its_errors() -> None:
    est = Estimate({"a": np.ones((2, 2))}, {"a": np.full((2, 2), 0.1)}, 8)
    low, high = est.interval()
    assert set(low) == set(high) == {"a"}
    assert np.all(low["a"] < 1.0)
    assert np.all(high["a"] > 1.0)
    with pytest.raises(ValueError, match=r"level must lie strictly between 0 and 1 .* got 95"):
        est.interval(95)
    with pytest.raises(TypeError, match="level must be a number between 0 and 1; got str"):
        est.interval("95%")
    factor = Estimate(np.ones((4, 3)), np.ones(3), 4)  # what="full": a factor, not F̂
    with pytest.raises(ValueError, match=r"value and std_error of one shape; got value \(4, 3\)"):
        factor.interval()
    with pytest.raises(TypeError, match=r"interval needs a real floating value .* got int64"):
        Estimate(np.array([3, 4]), np.array([1.0, 1.0]), 4).interval()


def test_accumulator_dof_is_welch_satterthwaite() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 2)), 5.0 * rng.standard_normal((6, 2))
    acc = Accumulator().update(a, num_inputs=1).update(b, num_inputs=1)
    va, vb = a.var(0, ddof=1) / 3, b.var(0, ddof=1) / 6
    expected = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 5)
    est = acc.estimate()
    np.testing.assert_allclose(est.dof, expected, rtol=1e-12)
    assert np.all((est.dof >= 2) & (est.dof <= 7))  # between the smallest and the sum
    # One stratum: M − 1; from an estimate: its dof; merged: Welch–Satterthwaite again.
    assert Accumulator().update(a).estimate().dof == 2
    back = Accumulator.from_estimate(est).merge(Accumulator.from_estimate(est)).estimate()
    np.testing.assert_allclose(back.dof, 2 * expected, rtol=1e-12)  # equal variances: the sum
    # The estimators' squares are ≥ 0: their estimates carry floor 0.
    assert Accumulator(nonnegative=True).update(a**2).estimate().floor == 0.0
    assert Accumulator().update(a).estimate().floor is None
    with pytest.raises(TypeError, match="nonnegative must be True or False; got str"):
        Accumulator(nonnegative="yes")  # type: ignore[arg-type]


def test_target_rule_needs_ten_degrees_of_freedom() -> None:
    from scipy import stats

    from fisherbound.estimators import MIN_TARGET_DOF, _target_reached

    assert MIN_TARGET_DOF == 10
    assert not _target_reached(1e-9, 9.0, 0.1)  # a lucky tiny error with too few dof
    scale = stats.t.ppf(0.975, 10) / stats.norm.ppf(0.975)
    assert _target_reached(0.1 / scale * (1 - 1e-9), 10.0, 0.1)
    assert not _target_reached(0.1 / scale * (1 + 1e-9), 10.0, 0.1)
    assert not _target_reached(float("nan"), 20.0, 0.1)


def test_accumulator_errors() -> None:
    with pytest.raises(ValueError, match="accumulator is empty"):
        Accumulator().estimate()
    with pytest.raises(ValueError, match=r"leading probe axis \(M, \.\.\.\) with M >= 1"):
        Accumulator().update(np.array(1.0))
    acc = Accumulator().update(np.ones((2, 3)), num_inputs=1)
    with pytest.raises(ValueError, match="different shapes"):
        acc.merge(Accumulator().update(np.ones((2, 4))))
    with pytest.raises(ValueError, match="different quantities"):
        acc.merge(Accumulator().update({"a": np.ones((2, 3))}))
    with pytest.raises(ValueError, match="same inputs; this accumulator covers 1 inputs"):
        acc.pool(Accumulator().update(np.ones((2, 3)), num_inputs=2))
    mixed = (
        Accumulator()
        .update(np.ones((2, 3)), num_inputs=1)
        .merge(Accumulator().update(np.ones((3, 3)), num_inputs=1))
    )
    with pytest.raises(ValueError, match="one number of probes in every stratum"):
        mixed.pool(Accumulator().update(np.ones((2, 3)), num_inputs=2))
    with pytest.raises(ValueError, match="reduction='mean' needs the number of inputs"):
        Accumulator().update(np.ones((2, 3))).estimate(reduction="mean")
    with pytest.raises(TypeError, match="other must be an Accumulator; got dict"):
        acc.merge({})
    with pytest.raises(TypeError, match="other must be an Accumulator; got int"):
        acc.pool(3)
    with pytest.raises(ValueError, match="needs an accumulator of a scalar"):
        acc.relative_std_error()
    with pytest.raises(TypeError, match="estimate must be a fisherbound Estimate"):
        Accumulator.from_estimate((1, 2, 3))
    with pytest.raises(ValueError, match="reduction='mean' estimate needs num_inputs"):
        Accumulator.from_estimate(Estimate(np.ones(2), np.ones(2), 2), reduction="mean")
    # one probe: the variance is unknown (NaN), never silently zero
    single = Accumulator().update(np.ones((1, 2)))
    assert np.all(np.isnan(single.estimate().std_error))


# --------------------------------------------------------------------------- #
# streaming with a target error


def counting(lins):
    seen = []

    def gen():
        for lin in lins:
            seen.append(1)
            yield lin

    return gen(), seen


def test_target_relative_error_stops_early() -> None:
    backend = NUMPY
    lins = [mlp(backend, n=8, seed=s) for s in range(6)]
    source, seen = counting(lins)
    est = detach_and_mix(source, num_probes=32, rng=0, target_relative_error=0.5, reduction="mean")
    assert len(seen) < 6  # stopped before the data ran out
    rel = float(np.sum(est.std_error)) / float(np.sum(est.value))
    assert est.value.shape == (lins[0].num_params,)
    assert rel > 0
    # per-example: an easy target on one linearization is met by adding rounds of probes
    one = detach_and_mix(lins[0], num_probes=2, rng=0, per_example=True, target_relative_error=0.05)
    assert one.num_probes >= 2
    assert one.num_probes % 2 == 0


def test_unreachable_target_warns_with_the_error_reached() -> None:
    backend = NUMPY
    lins = [mlp(backend, n=4, seed=s) for s in range(3)]
    with pytest.warns(
        UserWarning,
        match=(
            r"1e-06 was not reached: .* is [0-9.e-]+, with [0-9.e+-]+ degrees of freedom, "
            r"after 3 batches \(the data ran out\)"
        ),
    ):
        detach_and_mix(lins, num_probes=2, rng=0, target_relative_error=1e-6)
    with pytest.warns(UserWarning, match=r"after 2 batches \(max_batches = 2\)"):
        est = detach_and_mix(lins, num_probes=2, rng=0, target_relative_error=1e-6, max_batches=2)
    assert est.num_probes == 2
    with pytest.warns(UserWarning, match=r"after 3 batches \(max_batches = 3 rounds of probes\)"):
        detach_and_mix(
            lins[0], what="full", num_probes=2, rng=0, target_relative_error=1e-6, max_batches=3
        )
    with pytest.warns(UserWarning, match="was not reached"):
        monte_carlo(lins, num_samples=2, rng=0, target_relative_error=1e-6)


def test_max_batches_limits_the_stream() -> None:
    backend = NUMPY
    lins = [mlp(backend, n=4, seed=s) for s in range(3)]
    source, seen = counting(lins)
    est = detach_and_mix(source, num_probes=2, rng=0, max_batches=2, reduction="mean")
    assert len(seen) == 2
    ref = detach_and_mix(lins[:2], num_probes=2, rng=0, reduction="mean")
    np.testing.assert_allclose(est.value, ref.value)


# --------------------------------------------------------------------------- #
# Monte Carlo and empirical Fisher


def test_monte_carlo_unbiased() -> None:
    cpu_backend = NUMPY
    lin = mlp(cpu_backend, n=6, seed=3)
    to_np = cpu_backend.to_numpy
    exact = to_np(fisher_diagonal(lin))
    est = monte_carlo(lin, num_samples=400, rng=0)
    assert est.num_probes == 400
    assert np.all(z_scores(est, exact, to_np) < 5)
    tr = monte_carlo(lin, what="trace", num_samples=400, rng=1)
    assert float(z_scores(tr, exact.sum(), to_np)) < 5
    blk = monte_carlo(lin, what="blocks", blocks=["layers.1.bias"], num_samples=400, rng=2)
    truth = to_np(fisher_blocks(lin, blocks=["layers.1.bias"])["layers.1.bias"])
    zb = np.abs(to_np(blk.value["layers.1.bias"]) - truth) / to_np(blk.std_error["layers.1.bias"])
    assert zb.max() < 5
    full = monte_carlo(lin, what="full", num_samples=3, rng=0)
    assert full.value.shape == (6 * 3, lin.num_params)


def score_rows(lin, labels, family, to_np):
    """Per-example score gradients J_nᵀ ∇_z log p(y_n|z_n), brute force, (N, D)."""
    u = family.score(lin.logits, labels)
    return to_np(lin.per_example_vjp(u[:, None, :]))[:, 0, :]


@pytest.mark.parametrize("family", [Categorical(), Bernoulli()], ids=["cat", "bern"])
def test_empirical_matches_brute_force(host_backend, family) -> None:
    cpu_backend = host_backend
    lins = [mlp(cpu_backend, n=4, seed=0), mlp(cpu_backend, n=3, seed=1)]
    lins[1] = linearize(lins[0].model, lins[1].inputs)
    rng = np.random.default_rng(0)
    if isinstance(family, Categorical):
        host = rng.integers(0, 3, size=7)
        labels = cpu_backend.xp.asarray(host, device=cpu_backend.device)
    else:
        labels = cpu_backend.asarray(rng.integers(0, 2, size=(7, 3)).astype(float))
    to_np = cpu_backend.to_numpy
    rows = np.concatenate(
        [
            score_rows(lins[0], labels[:4, ...], family, to_np),
            score_rows(lins[1], labels[4:, ...], family, to_np),
        ]
    )
    est = empirical(lins, labels, family)
    assert_close(est.value, np.sum(rows**2, axis=0), rtol=1e-7, atol=1e-12, like=cpu_backend)
    assert np.all(to_np(est.std_error) == 0)
    assert est.num_probes == 1
    per_batch = empirical(lins, [labels[:4, ...], labels[4:, ...]], family, what="trace")
    np.testing.assert_allclose(float(to_np(per_batch.value)), np.sum(rows**2), rtol=1e-12)
    full = empirical(lins, labels, family, what="full", reduction="mean")
    assert_close(full.value, rows / np.sqrt(7), rtol=1e-7, atol=1e-12, like=cpu_backend)


# --------------------------------------------------------------------------- #
# torch and JAX models


def test_torch_module() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    lin = torch_linearize(model, torch.randn(6, 3, dtype=torch.float64))
    exact = fisher_diagonal(lin).numpy()
    to_np = lambda t: t.detach().numpy()  # noqa: E731
    for kw in ({}, {"per_example": True}):
        est = detach_and_mix(lin, num_probes=300, rng=0, **kw)
        assert isinstance(est.value, torch.Tensor)
        assert np.all(z_scores(est, exact, to_np) < 5), kw


def _torch_mlp_linearization() -> Any:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    return torch_linearize(model, torch.randn(6, 3, dtype=torch.float64))


@pytest.mark.parametrize("m", [1, 2, 5])
def test_torch_square_moments_are_those_of_the_probe_gradients(m) -> None:
    torch = pytest.importorskip("torch")
    lin = _torch_mlp_linearization()
    u = torch.randn(m, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    q = lin.vjp_batch(u) ** 2  # (M, D): the detach-and-mix diagonal samples
    mean, var, traces = lin.vjp_batch_square_moments(u, traces=True)
    torch.testing.assert_close(mean, q.mean(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(traces, q.sum(dim=1), rtol=1e-12, atol=0)
    if m == 1:
        assert var is None
    else:
        torch.testing.assert_close(var, q.var(dim=0), rtol=1e-10, atol=1e-14)
    assert lin.vjp_batch_square_moments(u)[2] is None  # traces only when asked for
    with pytest.raises(ValueError, match="got M = 0"):
        lin.vjp_batch_square_moments(u[:0])


@pytest.mark.parametrize("m", [1, 3])
def test_torch_square_moments_leave_the_cotangents_alone(m) -> None:
    # A parameter that IS the output: autograd may return the cotangent itself as
    # its gradient, which must not be squared in place.
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize

    class Table(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))

        def forward(self, x: Any) -> Any:
            return self.p + 0.0 * x

    lin = torch_linearize(Table(), torch.ones(4, 3, dtype=torch.float64))
    u = torch.arange(m * 12, dtype=torch.float64).reshape(m, 4, 3)
    before = u.clone()
    mean, _, _ = lin.vjp_batch_square_moments(u)
    torch.testing.assert_close(u, before, rtol=0, atol=0)
    torch.testing.assert_close(mean, (before**2).mean(dim=0).reshape(-1), rtol=1e-12, atol=0)


def test_torch_one_probe_square_with_a_shared_and_an_unused_parameter() -> None:
    # M = 1 squares each gradient in a hook on its leaf: a layer applied twice
    # must be squared once, after both contributions; an unused parameter is 0.
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import linearize as torch_linearize

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Linear(3, 3).double()
            self.unused = torch.nn.Linear(3, 3).double()

        def forward(self, x: Any) -> Any:
            return self.shared(torch.tanh(self.shared(x)))

    torch.manual_seed(1)
    lin = torch_linearize(Twice(), torch.randn(5, 3, dtype=torch.float64))
    u = torch.randn(1, 5, 3, dtype=torch.float64)
    mean, var, traces = lin.vjp_batch_square_moments(u, traces=True)
    expected = lin.vjp(u[0]) ** 2
    torch.testing.assert_close(mean, expected, rtol=1e-12, atol=0)
    assert var is None
    assert float(expected[-12:].abs().max()) == 0.0  # the unused layer
    torch.testing.assert_close(traces, expected.sum()[None], rtol=1e-12, atol=0)


@pytest.mark.parametrize("target", [None, 0.1])
def test_torch_diagonal_from_moments_equals_the_samples_path(target) -> None:
    # The adapter's moments (one batched backward, no (M, D) samples), the same
    # pooled over chunks of max_vectors = 2 probes, and the generic samples path
    # (the adapter's moments hidden) give one estimate.
    lin = _torch_mlp_linearization()
    kw = {"num_probes": 5, "rng": 3, "target_relative_error": target}
    fast = detach_and_mix(lin, **kw)
    pooled = detach_and_mix(lin, max_vectors=2, **kw)
    lin.vjp_batch_square_moments = None  # the estimator then squares vjp_batch itself
    generic = detach_and_mix(lin, **kw)
    for other in (pooled, generic):
        np.testing.assert_allclose(fast.value.numpy(), other.value.numpy(), rtol=1e-12)
        np.testing.assert_allclose(
            fast.std_error.numpy(), other.std_error.numpy(), rtol=1e-9, atol=1e-15
        )
        assert fast.num_probes == other.num_probes
    if target is not None:
        assert fast.num_probes > 5  # rounds of new probes until the target


def test_jax_function() -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters.jax import linearize as jax_linearize

    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.standard_normal((3, 5))),
        "w2": jnp.asarray(rng.standard_normal((5, 3))),
    }

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    lin = jax_linearize(apply_fn, params, jnp.asarray(rng.standard_normal((6, 3))))
    exact = np.asarray(fisher_diagonal(lin))
    est = detach_and_mix(lin, num_probes=300, rng=0)
    assert np.all(z_scores(est, exact, np.asarray) < 5)


# --------------------------------------------------------------------------- #
# invariants (hypothesis)


@settings(max_examples=15, deadline=None)
@given(
    logits=st.lists(st.floats(-4, 4), min_size=2, max_size=5),
)
def test_enumeration_is_exact_and_cv_at_most_sqrt2(logits) -> None:
    backend = NUMPY
    z = np.asarray(logits)
    p = np.exp(z - z.max())
    p /= p.sum()
    lin = identity_model(backend, p)
    samples = enumerate_samples(backend, lin, Categorical())
    diag = p * (1 - p)
    np.testing.assert_allclose(samples.mean(axis=0), diag, atol=1e-12)
    assert np.all(samples.var(axis=0) <= 2 * diag**2 + 1e-15)


# --------------------------------------------------------------------------- #
# bad input


def test_bad_input() -> None:
    backend = NUMPY
    lin = mlp(backend)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        detach_and_mix(lin, num_probes=0)
    with pytest.raises(TypeError, match="num_probes must be an integer >= 1; got str"):
        detach_and_mix(lin, num_probes="3")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 0"):
        monte_carlo(lin, num_samples=0)
    with pytest.raises(TypeError, match="family must be a fisherbound.families family"):
        detach_and_mix(lin, "categorical")
    one_output = linearize(LinearSoftmax.random(3, 1, rng=0), np.ones((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"C = 1 outputs, but the Categorical family needs at least 2; use Bernoulli\(\)",
    ):
        detach_and_mix(one_output)
    with pytest.raises(ValueError, match="what must be one of"):
        detach_and_mix(lin, what="dense")
    with pytest.raises(ValueError, match="distribution must be one of"):
        detach_and_mix(lin, distribution="uniform")
    with pytest.raises(ValueError, match="kernel must be one of"):
        detach_and_mix(lin, kernel="dg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        detach_and_mix(lin, reduction="avg")
    with pytest.raises(TypeError, match="per_example must be True or False; got int 1"):
        detach_and_mix(lin, per_example=1)
    with pytest.raises(
        ValueError, match="per_example=True supports what='diagonal', 'trace' and 'blocks'"
    ):
        detach_and_mix(lin, what="full", per_example=True)
    with pytest.raises(
        ValueError, match="target_relative_error must be a positive finite number; got -0.1"
    ):
        detach_and_mix(lin, target_relative_error=-0.1)
    with pytest.raises(TypeError, match="target_relative_error must be a positive number"):
        detach_and_mix(lin, target_relative_error="1%")
    with pytest.raises(
        ValueError, match=r"target_relative_error needs num_probes >= 2 .* got num_probes = 1"
    ):
        detach_and_mix([lin], target_relative_error=0.1)
    with pytest.raises(ValueError, match=r"target_relative_error needs num_samples >= 2"):
        monte_carlo([lin], target_relative_error=0.1)
    with pytest.raises(ValueError, match="max_batches must be an integer >= 1; got 0"):
        detach_and_mix(lin, max_batches=0)
    with pytest.raises(
        ValueError, match=r"blocks must name parameter blocks of the model; got unknown \['fc'\]"
    ):
        detach_and_mix(lin, what="blocks", blocks=["fc"])
    with pytest.raises(TypeError, match="blocks must be a list of block names; got the string"):
        detach_and_mix(lin, what="blocks", blocks="layers.0.bias")
    with pytest.raises(ValueError, match="refuses blocks larger than max_block_size = 4"):
        detach_and_mix(lin, what="blocks", max_block_size=4)
    with pytest.raises(ValueError, match="source must contain at least one batch"):
        detach_and_mix([])
    with pytest.raises(TypeError, match="source must be a Linearization or an iterable"):
        detach_and_mix(3)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        detach_and_mix(lin, rng="seed")


def test_bad_labels() -> None:
    backend = NUMPY
    lin = mlp(backend)  # 4 inputs
    with pytest.raises(ValueError, match="got 3 rows but the source has more inputs"):
        empirical(lin, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="got 5 rows but the source has 4 inputs"):
        empirical(lin, np.array([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="got 1 arrays but the source has more batches"):
        empirical([lin, lin], [np.array([0, 1, 2, 0])])
    with pytest.raises(ValueError, match="got 3 arrays for 2 batches"):
        empirical([lin, lin], [np.array([0, 1, 2, 0])] * 3)
    with pytest.raises(
        ValueError, match=r"labels\[0\] must have one row per input of batch 0 \(4\)"
    ):
        empirical([lin], [np.array([0, 1])])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="labels is a torch array"):
        empirical(lin, torch.zeros(4, dtype=torch.int64))


def test_empirical_with_max_batches_and_one_label_array() -> None:
    # max_batches stops the stream early: the unused label rows are not an error.
    model = MLP.random([3, 4, 3], rng=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3))
    y = rng.integers(0, 3, size=10)
    lins = [linearize(model, x[:5]), linearize(model, x[5:])]
    first = empirical(lins, y, max_batches=1)
    np.testing.assert_allclose(first.value, empirical(lins[0], y[:5]).value, atol=1e-14)
    with pytest.raises(ValueError, match="got 10 rows but the source has 5 inputs"):
        empirical(lins[:1], y)


def test_target_needs_two_probes_even_for_one_linearization() -> None:
    lin = linearize(MLP.random([3, 4, 3], rng=0), np.ones((4, 3)))
    with pytest.raises(ValueError, match="target_relative_error needs num_probes >= 2"):
        detach_and_mix(lin, what="trace", num_probes=1, target_relative_error=0.5, rng=0)
    with pytest.raises(ValueError, match="target_relative_error needs num_samples >= 2"):
        monte_carlo(lin, what="trace", num_samples=1, target_relative_error=0.5, rng=0)


def test_empirical_messages_name_labels() -> None:
    """The label checks name the argument as the caller wrote it: labels, not y."""
    lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((5, 4)))
    with pytest.raises(
        ValueError,
        match=r"labels do not fit the logits of batch 0 for the Categorical\(\) family: labels "
        r"must hold class indices in \[0, 3\)",
    ):
        empirical(lin, np.array([0, 1, 2, 3, 0]))
    with pytest.raises(TypeError, match=r"labels must be an integer .* xp.astype\(labels, xp"):
        empirical(lin, np.array([0.5, 1, 1, 1, 1]))
    with pytest.raises(TypeError, match=r"labels must be an array of observed labels .* NoneType"):
        empirical(lin, None)


def test_label_messages_name_labels_and_logits_throughout() -> None:
    """Every y and z of the family's message becomes labels and logits (the device
    message kept 'but y is on ... xp.asarray(y, ...)')."""
    xp = pytest.importorskip("array_api_strict")
    from fisherbound.linearization import check_loss_labels

    z = xp.zeros((5, 3), dtype=xp.float64)
    y = xp.asarray(np.zeros(5, dtype=np.int64), device=xp.Device("device1"))
    with pytest.raises(ValueError, match=r"labels must be on the device of logits") as info:
        check_loss_labels(Categorical(), z, y)
    assert "but labels is on" in str(info.value)
    assert "xp.asarray(labels, device" in str(info.value)


def test_welch_degrees_of_freedom_of_tiny_float32_variances() -> None:
    """The Welch terms V² / d are held in float64: float32 standard errors of 1e-13
    (V² = 1e-52, below float32's range) gave NaN degrees of freedom and intervals."""
    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-12, 1e-20):
        acc = Accumulator(nonnegative=True)
        for _ in range(2):
            acc.update((rng.standard_normal((4, 3)) ** 2 * scale).astype(np.float32), num_inputs=4)
        est = acc.estimate()
        dof = np.asarray(est.dof)
        assert np.all(np.isfinite(dof)), (scale, dof)
        assert np.all((dof >= 3) & (dof <= 6)), (scale, dof)  # between one and two strata's
        low, high = est.interval()
        assert np.all(np.isfinite(low))
        assert np.all(low <= est.value)
        assert np.all(est.value <= high)
        assert low.dtype == np.float32


@pytest.mark.parametrize("per_example", [False, True])
def test_weighted_trace_is_the_weighted_sum_of_each_probe(per_example: bool) -> None:
    """what="trace", weights=w: each probe's sample is Σ_i w_i g_i², the same probes as the
    diagonal's; its standard error is that of those per-probe sums (the entries of one
    probe are correlated), not √(Σ_i w_i² SE_i²)."""
    lin = linearize(MLP.random([4, 8, 3], rng=0), np.random.default_rng(1).standard_normal((32, 4)))
    w = np.random.default_rng(2).random(lin.num_params)
    m = 12
    est = detach_and_mix(lin, what="trace", weights=w, num_probes=m, rng=5, per_example=per_example)
    diag = detach_and_mix(lin, num_probes=m, rng=5, per_example=per_example)
    np.testing.assert_allclose(est.value, w @ diag.value, rtol=1e-12)
    assert float(est.std_error) > 0
    if not per_example:  # the factor V (M, D) holds g_m / √M: the per-probe samples are M Σ w V²
        v = detach_and_mix(lin, what="full", num_probes=m, rng=5).value
        samples = m * (v * v) @ w
        np.testing.assert_allclose(est.value, samples.mean(), rtol=1e-12)
        np.testing.assert_allclose(est.std_error, samples.std(ddof=1) / math.sqrt(m), rtol=1e-10)
        naive = math.sqrt(float(np.sum(w**2 * diag.std_error**2)))
        assert float(est.std_error) > 1.5 * naive  # the correlated entries' error is larger
    mc = monte_carlo(lin, what="trace", weights=w, num_samples=4, rng=0)
    np.testing.assert_allclose(mc.value, w @ monte_carlo(lin, num_samples=4, rng=0).value)
    y = np.arange(32) % 3
    np.testing.assert_allclose(
        empirical(lin, y, what="trace", weights=w).value, w @ empirical(lin, y).value
    )


def test_weights_are_checked() -> None:
    lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((6, 4)))
    with pytest.raises(ValueError, match=r"^weights are for what='trace' .* got what='diagonal'"):
        detach_and_mix(lin, weights=np.ones(lin.num_params), num_probes=2, rng=0)
    with pytest.raises(ValueError, match=r"^weights must have shape \(D,\) = \(67,\); got shape"):
        detach_and_mix(lin, what="trace", weights=np.ones(3), num_probes=2, rng=0)
    with pytest.raises(ValueError, match=r"^weights must be finite; got NaN"):
        detach_and_mix(lin, what="trace", weights=np.full(67, np.nan), num_probes=2, rng=0)
    negative = np.ones(67)
    negative[[0, 5]] = -1.0
    with pytest.raises(
        ValueError,
        match=r"^weights must be non-negative .* got 2 negative entries, at positions "
        r"\[0, 5\]\. For signed",
    ):
        detach_and_mix(lin, what="trace", weights=negative, num_probes=2, rng=0)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"weights"):
        detach_and_mix(lin, what="trace", weights=torch.ones(67), num_probes=2, rng=0)
