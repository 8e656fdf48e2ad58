"""Variance formulas and the razor for logits (N, *S, C) with a mask, against enumeration.

The references are independent: every sign vector ξ (detach-and-mix) or every
label configuration y (classical estimators) of a tiny case is enumerated, the
estimator's sample is computed from the dense Jacobian J (N, *S, C, D) on the
host (and, for detach-and-mix and the score estimator, by the library's own
estimator machinery), and its exact variance is compared with the closed forms.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _dense_positions import DenseLinearization, dense_fisher, labels_for, make_lin, random_case

from fisherbound._quantities import quantity
from fisherbound.dimension import razor
from fisherbound.estimators import _probe_samples
from fisherbound.families import Bernoulli, Categorical, Gaussian
from fisherbound.variance import classical_variance, compare_estimators, detach_and_mix_variance

FAMILIES = [Categorical(), Bernoulli(), Gaussian()]
fam_id = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: type(f).__name__)
mask_id = pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])


class SecondDerivatives(DenseLinearization):
    """A dense linearization that also reports given ∂²z/∂θ_i², (N, *S, C, D)."""

    def __init__(self, z, jac, h2, **kw):
        super().__init__(z, jac, **kw)
        self._h2 = h2

    def output_second_derivative_diagonal(self, /, *, max_vectors=None):
        del max_vectors
        return self._h2


def tiny_case(family, spatial=(2,), masked=False, n=2, c=2, d=5, seed=0):
    case = random_case(family, spatial, masked=False, n=n, c=c, d=d, seed=seed)
    if masked:
        mask = np.ones((n, *spatial), dtype=bool)
        mask.reshape(n, -1)[0, -1] = False  # padding at the end of example 0
        case["mask"] = mask
        # Garbage logits at the masked position: they must not matter.
        case["z"].reshape(n, -1, c)[0, -1] = 40.0 * np.arange(c)
    return case


def keep(case):
    """The mask as floats (N, *S), ones without a mask."""
    if case["mask"] is None:
        return np.ones(case["z"].shape[:-1])
    return case["mask"].astype(float)


def host_factor(family, case):
    """B(z) (N, *S, C, R) on the host, zero at masked positions."""
    b = np.asarray(family.sqrt_metric(case["z"]))
    return b * keep(case)[..., None, None]


def all_signs(shape):
    size = int(np.prod(shape))
    return np.array(list(itertools.product([-1.0, 1.0], repeat=size))).reshape((-1, *shape))


def dense_probes(case, family, xi, per_example):
    """g ⊙ g (M, D) (or Σ_x g_x ⊙ g_x) with g = Σ_{x,t} J_xtᵀ B_xt ξ_xt, on the host."""
    jac = case["jac"] * keep(case)[..., None, None]
    b = host_factor(family, case)
    c_xt = np.einsum("n...cr,mn...r->mn...c", b, xi)  # (M, N, *S, C)
    n = jac.shape[0]
    jf = jac.reshape(n, -1, jac.shape[-1])  # (N, P C, D)
    g_x = np.einsum("nkd,mnk->mnd", jf, c_xt.reshape(c_xt.shape[0], n, -1))  # (M, N, D)
    if per_example:
        return np.sum(g_x * g_x, axis=1)
    g = g_x.sum(axis=1)
    return g * g


# --------------------------------------------------------------------------- #
# detach-and-mix


@fam_id
@mask_id
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per_example"])
@pytest.mark.parametrize("spatial", [(2,), (1, 2)], ids=["T2", "S1x2"])
def test_detach_and_mix_variance_by_enumeration(family, masked, per_example, spatial) -> None:
    # N = 2, P = 2 positions, C = R = 2: 2^8 Rademacher vectors, the exact variance.
    case = tiny_case(family, spatial, masked)
    lin = make_lin(case, blocks=[("a", (2,)), ("b", (3,))])
    r = family.sqrt_rank(2)
    xi = all_signs((2, *spatial, r))
    dense = dense_probes(case, family, xi, per_example)
    for what in ("diagonal", "trace"):
        qty = quantity(what)
        qty.select(lin)
        lib = np.asarray(
            _probe_samples(
                lin, family, xi, qty, kernel="exact", per_example=per_example, max_vectors=None
            )
        )
        ref = dense if what == "diagonal" else dense.sum(axis=1)
        np.testing.assert_allclose(lib, ref, rtol=1e-10, atol=1e-12)  # the estimator's samples
        var = detach_and_mix_variance(lin, family, what=what, per_example=per_example)
        np.testing.assert_allclose(var, ref.var(axis=0), rtol=1e-9, atol=1e-12)
        mean = detach_and_mix_variance(
            lin, family, what=what, per_example=per_example, reduction="mean", num_probes=3
        )
        np.testing.assert_allclose(mean, ref.var(axis=0) / (3 * 2**2), rtol=1e-9, atol=1e-14)


@fam_id
@mask_id
def test_gaussian_probes_against_the_dense_gram(family, masked) -> None:
    # Gaussian ξ: Var(g_i²) = 2 F_ii², Var(‖g‖²) = 2‖GᵀG‖_F² (per example: per block of x).
    case = random_case(family, (3,), masked=masked, n=3, c=3, d=6, seed=4)
    lin = make_lin(case)
    f = dense_fisher(case["z"], case["jac"], case["mask"], family)
    jac = case["jac"] * keep(case)[..., None, None]
    b = host_factor(family, case)
    cols = np.einsum("n...cd,n...cr->n...rd", jac, b).reshape(3, -1, 6)  # (N, P R, D)
    g_all = cols.reshape(-1, 6)
    var = detach_and_mix_variance(lin, family, distribution="gaussian")
    np.testing.assert_allclose(var, 2 * np.diag(f) ** 2, rtol=1e-10)
    tr = detach_and_mix_variance(lin, family, what="trace", distribution="gaussian")
    np.testing.assert_allclose(tr, 2 * np.sum((g_all @ g_all.T) ** 2), rtol=1e-10)
    tr_x = detach_and_mix_variance(
        lin, family, what="trace", distribution="gaussian", per_example=True
    )
    np.testing.assert_allclose(tr_x, sum(2 * np.sum((g @ g.T) ** 2) for g in cols), rtol=1e-10)


def test_diagonal_variance_ignores_how_positions_group_into_examples() -> None:
    # At batch level the columns k = (x, t, r) are all that counts: (N, T, C) ≡ (N·T, C).
    family = Categorical()
    case = random_case(family, (4,), masked=False, n=3, c=4, d=6, seed=2)
    flat = {"z": case["z"].reshape(12, 4), "jac": case["jac"].reshape(12, 4, 6), "mask": None}
    for what in ("diagonal", "trace"):
        a = detach_and_mix_variance(make_lin(case), family, what=what)
        b = detach_and_mix_variance(make_lin(flat), family, what=what)
        np.testing.assert_allclose(a, b, rtol=1e-10)
    h2 = np.random.default_rng(3).standard_normal((3, 4, 4, 6))
    lin = SecondDerivatives(case["z"], case["jac"], h2)
    lin_flat = SecondDerivatives(flat["z"], flat["jac"], h2.reshape(12, 4, 6))
    np.testing.assert_allclose(
        classical_variance(lin, family, estimator="hessian"),
        classical_variance(lin_flat, family, estimator="hessian"),
        rtol=1e-10,
    )


@pytest.mark.parametrize("max_vectors", [1, 3, 5])
def test_chunks_give_the_same_variances(max_vectors) -> None:
    family = Categorical()
    case = random_case(family, (2, 3), masked=True, n=3, c=3, d=7, seed=5)
    lin = make_lin(case)
    for what in ("diagonal", "trace"):
        for per_example in (False, True):
            ref = detach_and_mix_variance(lin, family, what=what, per_example=per_example)
            got = detach_and_mix_variance(
                lin, family, what=what, per_example=per_example, max_vectors=max_vectors
            )
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)
    for bound in (False, True):
        ref = classical_variance(lin, family, bound=bound)
        got = classical_variance(lin, family, bound=bound, max_vectors=max_vectors)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)


def test_max_cotangents_refuses_with_the_cost() -> None:
    family = Categorical()
    case = random_case(family, (4,), masked=False, n=2, c=3, d=5)
    lin = make_lin(case)
    with pytest.raises(ValueError, match=r"P · R = 4 · 3 = 12.*detach_and_mix"):
        detach_and_mix_variance(lin, family, max_cotangents=11)
    with pytest.raises(ValueError, match=r"classical_variance.*max_cotangents = 11"):
        classical_variance(lin, family, max_cotangents=11)
    with pytest.raises(ValueError, match="compare_estimators"):
        compare_estimators(lin, family, max_cotangents=11)
    detach_and_mix_variance(lin, family, max_cotangents=12)  # at the limit: accepted


# --------------------------------------------------------------------------- #
# classical estimators


def label_configurations(family, z_x):
    """Every label configuration of one example (positions (P, C)) and its probability."""
    p_pos, c = z_x.shape
    if isinstance(family, Categorical):
        prob = np.asarray(family.mean(z_x))  # (P, C)
        for ys in itertools.product(range(c), repeat=p_pos):
            yield np.eye(c)[list(ys)], math.prod(prob[t, y] for t, y in enumerate(ys))
    else:  # Bernoulli: t(y) = y in {0, 1}^C per position
        s = np.asarray(family.mean(z_x))
        for bits in itertools.product([0.0, 1.0], repeat=p_pos * c):
            y = np.array(bits).reshape(p_pos, c)
            yield y, float(np.prod(np.where(y == 1.0, s, 1.0 - s)))


def enumerated_variances(family, case, h2):
    """Σ_x Var(s_x,i²) and Σ_x Var(−∂²ℓ_x/∂θ_i²) by enumerating the labels of each example."""
    n, c, d = case["z"].shape[0], case["z"].shape[-1], case["jac"].shape[-1]
    m = keep(case).reshape(n, -1)
    jac = (case["jac"] * keep(case)[..., None, None]).reshape(n, -1, c, d)
    h2 = (h2 * keep(case)[..., None, None]).reshape(n, -1, c, d)
    z = case["z"].reshape(n, -1, c)
    v1 = np.zeros(d)
    v2 = np.zeros(d)
    for x in range(n):
        mean_t = np.asarray(family.mean(z[x]))  # E t(y) per position
        e1, e1sq, e2, e2sq = np.zeros(d), np.zeros(d), np.zeros(d), np.zeros(d)
        for t_y, prob in label_configurations(family, z[x]):
            u = (t_y - mean_t) * m[x][:, None]  # (P, C)
            s = np.einsum("pcd,pc->d", jac[x], u)
            q = -np.einsum("pcd,pc->d", h2[x], u)  # the label-dependent part of −∂²ℓ
            e1, e1sq = e1 + prob * s**2, e1sq + prob * s**4
            e2, e2sq = e2 + prob * q, e2sq + prob * q**2
        v1 += e1sq - e1**2
        v2 += e2sq - e2**2
    return v1, v2


@pytest.mark.parametrize("family", [Categorical(), Bernoulli()], ids=["Categorical", "Bernoulli"])
@mask_id
@pytest.mark.parametrize("spatial", [(2,), (1, 3)], ids=["T2", "S1x3"])
def test_classical_variances_by_enumerating_labels(family, masked, spatial) -> None:
    c = 3 if isinstance(family, Categorical) else 2
    case = tiny_case(family, spatial, masked, n=2, c=c, d=4, seed=7)
    h2 = np.random.default_rng(8).standard_normal(case["jac"].shape)
    lin = SecondDerivatives(case["z"], case["jac"], h2, mask=case["mask"])
    v1, v2 = enumerated_variances(family, case, h2)
    score = classical_variance(lin, family)
    np.testing.assert_allclose(score, v1, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(classical_variance(lin, family, num_samples=4), v1 / 4, rtol=1e-9)
    np.testing.assert_allclose(
        classical_variance(lin, family, reduction="mean"), v1 / 4, rtol=1e-9, atol=1e-14
    )
    hess = classical_variance(lin, family, estimator="hessian")
    np.testing.assert_allclose(hess, v2, rtol=1e-9, atol=1e-13)
    # The bounds hold.
    assert np.all(classical_variance(lin, family, bound=True) >= score * (1 - 1e-12))
    assert np.all(classical_variance(lin, family, estimator="hessian", bound=True) >= hess - 1e-12)


def test_score_variance_matches_the_library_score_squares_by_enumeration() -> None:
    # The Monte-Carlo Fisher of ONE label draw is Σ_x (J_xᵀ u_x)², u_x the scores of
    # all positions of x (``from_squares``): its exact variance over the labels.
    family = Categorical()
    case = tiny_case(family, (2,), True, n=2, c=2, d=3, seed=11)
    lin = make_lin(case)
    z = case["z"]
    qty = quantity("diagonal")
    qty.select(lin)
    configs = list(itertools.product(range(2), repeat=4))
    ys = np.array(configs).reshape(-1, 2, 2)  # every labelling (M, N, T)
    prob = np.asarray(family.mean(z))  # (N, T, C)
    weights = np.array([np.prod(np.take_along_axis(prob, y[..., None], -1)) for y in ys])
    u = np.stack([np.asarray(family.score(z, y)) for y in ys])  # (M, N, T, C)
    samples = np.asarray(qty.from_squares(lin, u, None))  # (M, D)
    mean = weights @ samples
    var = weights @ samples**2 - mean**2
    np.testing.assert_allclose(classical_variance(lin, family), var, rtol=1e-9, atol=1e-13)


def test_gaussian_score_variance_is_twice_the_squared_fisher_per_example() -> None:
    # s_x,i ~ N(0, Σ_t ‖a_t‖²) for unit Gaussian outputs: Var(s²) = 2 (Σ_t ‖a_t‖²)².
    family = Gaussian()
    case = random_case(family, (2, 2), masked=True, n=3, c=2, d=5, seed=9)
    lin = make_lin(case)
    jac = case["jac"] * keep(case)[..., None, None]
    per_x = np.sum(jac**2, axis=(1, 2, 3))  # (N, D): Σ_t ‖a_t‖²
    np.testing.assert_allclose(classical_variance(lin, family), 2 * np.sum(per_x**2, axis=0))
    np.testing.assert_allclose(
        classical_variance(lin, family, bound=True), classical_variance(lin, family)
    )


def test_hessian_variance_refuses_second_derivatives_without_positions() -> None:
    family = Categorical()
    case = random_case(family, (3,), masked=False, n=2, c=2, d=4)
    wrong = np.zeros((2, 2, 4))  # (N, C, D): an adapter that ignores the positions
    lin = SecondDerivatives(case["z"], case["jac"], wrong)
    with pytest.raises(ValueError, match=r"\(N, \*S, C, D\) = \(2, 3, 2, 4\).*returned shape"):
        classical_variance(lin, family, estimator="hessian")


def test_compare_estimators_with_positions() -> None:
    family = Categorical()
    case = random_case(family, (3,), masked=True, n=3, c=3, d=6, seed=12)
    lin = make_lin(case)
    table = compare_estimators(lin, family, target_relative_error=0.3)
    rows = {r.name: r for r in table.rows}
    diag = np.diag(dense_fisher(case["z"], case["jac"], case["mask"], family))
    mc = float(np.sum(classical_variance(lin, family)))
    dm = float(np.sum(detach_and_mix_variance(lin, family)))
    np.testing.assert_allclose(rows["monte_carlo"].relative_variance, mc / np.sum(diag**2))
    np.testing.assert_allclose(rows["detach_and_mix"].relative_variance, dm / np.sum(diag**2))
    assert rows["exact"].relative_variance == 0.0


# --------------------------------------------------------------------------- #
# razor


@fam_id
def test_razor_counts_positions_and_ignores_masked_labels(family) -> None:
    case = random_case(family, (3,), masked=True, n=3, c=3, d=5, seed=13)
    lin = make_lin(case)
    y = labels_for(family, case["z"])
    garbage = y.copy()
    if isinstance(family, Categorical):
        garbage[~case["mask"]] = -100  # an ignore index: never read
    else:
        garbage[~case["mask"]] = np.nan
    theta = np.linspace(-1.0, 1.0, 5)
    out = razor(lin, family, prior_variance=2.0, labels=garbage, theta=theta, method="dense")
    ll = np.asarray(family.log_likelihood(case["z"], y))
    counted = int(case["mask"].sum())
    np.testing.assert_allclose(out.neg_log_likelihood, -np.sum(ll[case["mask"]]), rtol=1e-12)
    f = dense_fisher(case["z"], case["jac"], case["mask"], family)
    logdet = np.sum(np.log1p(2.0 * np.clip(np.linalg.eigvalsh(f), 0.0, None)))
    np.testing.assert_allclose(out.log_det.value, logdet, rtol=1e-10)
    np.testing.assert_allclose(out.bic_penalty, 0.5 * 5 * np.log(counted), rtol=1e-12)
    # Batches given as a list, one label array each: the same.
    again = razor([lin], family, prior_variance=2.0, labels=[garbage], theta=theta, method="dense")
    np.testing.assert_allclose(again.value, out.value, rtol=1e-12)


def test_a_batch_without_counted_positions_has_zero_variance() -> None:
    # Adapters refuse such a batch; a hand-built linearization may still pass one.
    rng = np.random.default_rng(3)
    z, jac = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4, 5))
    lin = DenseLinearization(z, jac, mask=np.zeros((2, 3), dtype=bool))
    for bound in (False, True):
        out = classical_variance(lin, estimator="score", bound=bound)
        np.testing.assert_array_equal(out, np.zeros(5))
