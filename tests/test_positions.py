"""Logits with position axes (N, *S, C) and masks: every analysis against dense formulas.

The reference is F = Σ_x Σ_t J_xtᵀ K(z_xt) J_xt over the counted positions, from
the dense Jacobian of the test linearization (``_dense_positions``); the random
estimators are checked by exact enumeration of their probes where that is small
and within 5 standard errors of the truth otherwise (fixed seeds).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _assertions import assert_close
from _dense_positions import DenseLinearization, dense_fisher, labels_for, make_lin, random_case

from fisherbound._quantities import factor_columns, quantity
from fisherbound.dimension import local_dimension, rank_bound, top_eigenpairs
from fisherbound.estimators import _probe_samples, detach_and_mix, empirical, monte_carlo
from fisherbound.families import KERNELS, Bernoulli, Categorical, Gaussian
from fisherbound.fisher import (
    fisher_blocks,
    fisher_bounds,
    fisher_dense,
    fisher_diagonal,
    fisher_operator,
    fisher_trace,
)

FAMILIES = [Categorical(), Bernoulli(), Gaussian()]
SHAPES = [(4,), (2, 3)]
BLOCKS = [("a", (2, 2)), ("b", (3,))]
fam_id = pytest.mark.parametrize("family", FAMILIES, ids=lambda f: type(f).__name__)
shape_id = pytest.mark.parametrize("spatial", SHAPES, ids=lambda s: "S" + "x".join(map(str, s)))
mask_id = pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])


def case_and_truth(family, spatial, masked, kernel="exact", **kw):
    case = random_case(family, spatial, masked=masked, **kw)
    truth = dense_fisher(case["z"], case["jac"], case["mask"], family, kernel)
    return case, truth


def within(est, truth, k=5.0):
    """|estimate − truth| ≤ k standard errors (plus a rounding floor) entrywise."""
    value, se = np.asarray(est.value), np.asarray(est.std_error)
    floor = 1e-10 * np.max(np.abs(truth))
    z = np.abs(value - truth) / (se + floor)
    assert np.all(z <= k), f"max z-score {z.max():.2f}"


# --------------------------------------------------------------------------- #
# exact quantities


@fam_id
@shape_id
@mask_id
def test_exact_quantities_match_the_dense_formula(family, spatial, masked) -> None:
    case, truth = case_and_truth(family, spatial, masked)
    lin = make_lin(case, blocks=BLOCKS)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(fisher_dense(lin, family), truth, **tol)
    np.testing.assert_allclose(fisher_diagonal(lin, family), np.diag(truth), **tol)
    np.testing.assert_allclose(float(fisher_trace(lin, family)), np.trace(truth), **tol)
    blocks = fisher_blocks(lin, family)
    np.testing.assert_allclose(blocks["a"], truth[:4, :4], **tol)
    np.testing.assert_allclose(blocks["b"], truth[4:, 4:], **tol)
    op = fisher_operator(lin, family)
    np.testing.assert_allclose(op.matmat(np.eye(7)), truth, **tol)
    np.testing.assert_allclose(op.matvec(np.eye(7)[2]), truth[:, 2], **tol)


@fam_id
@shape_id
@mask_id
def test_bounds_match_the_dense_kernels(family, spatial, masked) -> None:
    case = random_case(family, spatial, masked=masked)
    lin = make_lin(case)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    for scalar, (lo, hi) in [(False, ("lower", "upper")), (True, ("scalar_lower", "scalar_upper"))]:
        b = fisher_bounds(lin, family, what="dense", scalar=scalar)
        np.testing.assert_allclose(
            b.lower, dense_fisher(**_args(case), family=family, kernel=lo), **tol
        )
        np.testing.assert_allclose(
            b.upper, dense_fisher(**_args(case), family=family, kernel=hi), **tol
        )
        d = fisher_bounds(lin, family, what="diagonal", scalar=scalar)
        np.testing.assert_allclose(d.lower, np.diag(b.lower), **tol)
        np.testing.assert_allclose(d.upper, np.diag(b.upper), **tol)
    exact = np.diag(dense_fisher(**_args(case), family=family))
    assert np.all(d.lower <= exact + 1e-12)
    assert np.all(exact <= d.upper + 1e-12)


def _args(case):
    return {"z": case["z"], "jac": case["jac"], "mask": case["mask"]}


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_and_the_operator_with_positions(kernel) -> None:
    case, truth = case_and_truth(Categorical(), (2, 3), True, kernel=kernel)
    lin = make_lin(case)
    np.testing.assert_allclose(
        fisher_diagonal(lin, kernel=kernel), np.diag(truth), rtol=1e-10, atol=1e-12
    )
    op = fisher_operator(lin, kernel=kernel)
    np.testing.assert_allclose(op.matmat(np.eye(7)), truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_chunks_of_columns_give_the_same_result(size) -> None:
    # size < R = C = 3: one position at a time, its columns in ranges (sqrt_metric_matvec).
    case, truth = case_and_truth(Categorical(), (4,), True)
    lin = make_lin(case)
    np.testing.assert_allclose(fisher_dense(lin, max_vectors=size), truth, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        fisher_diagonal(lin, max_vectors=size), np.diag(truth), rtol=1e-10, atol=1e-12
    )


def test_masked_positions_cost_no_backward_pass() -> None:
    # Counted positions per example: 3, 3, 2 of P = 4 (random_case's mask), so
    # every example needs max 3 · R columns, not P · R = 12.
    case = random_case(Categorical(), (4,), masked=True)
    counts = case["mask"].reshape(3, -1).sum(axis=1)
    lin = make_lin(case)
    fisher_diagonal(lin)
    assert lin.columns == 3 * int(counts.max()) * 3
    full = make_lin(random_case(Categorical(), (4,), masked=False))
    fisher_diagonal(full)
    assert full.columns == 3 * 4 * 3
    # The lower kernel has R = 1.
    lin.columns = 0
    fisher_diagonal(lin, kernel="lower")
    assert lin.columns == 3 * int(counts.max())


def test_factor_columns_with_a_mask_are_the_counted_positions() -> None:
    case = random_case(Categorical(), (2, 3), masked=True)
    b = Categorical().sqrt_metric(case["z"])  # (N, 2, 3, C, R)
    plain = factor_columns(b, np, 0, 6)  # (N, 6 R, 2, 3, C)
    packed = factor_columns(b, np, mask=case["mask"])
    n, r = 3, 3
    cols = plain.reshape(n, 6, r, 6, 3)
    for x in range(n):
        counted = np.flatnonzero(case["mask"][x].reshape(-1))
        got = packed.reshape(n, -1, r, 6, 3)[x]
        np.testing.assert_array_equal(got[: len(counted)], cols[x, counted])
        assert not np.any(got[len(counted) :])
    # Without position axes a mask (N,) zeroes the masked examples' columns.
    b0 = Categorical().sqrt_metric(case["z"][:, 0, 0, :])
    u0 = factor_columns(b0, np, mask=np.array([True, False, True]))
    assert u0.shape == (3, 3, 3)
    assert not np.any(u0[1])
    assert np.any(u0[0])


def test_max_cotangents_refuses_with_the_cost() -> None:
    case = random_case(Categorical(), (4,), masked=False)
    lin = make_lin(case)
    msg = (
        r"fisher_diagonal needs P · R = 4 · 3 = 12 per-example backward passes per example "
        r"\(P = 4 positions per example, R = 3 factor columns per position for "
        r"kernel='exact'\), 36 for this batch of N = 3 examples: above max_cotangents = 11\. "
        r"Estimate it with fisherbound.estimators.detach_and_mix .*raise max_cotangents="
    )
    with pytest.raises(ValueError, match=msg):
        fisher_diagonal(lin, max_cotangents=11)
    assert lin.columns == 0  # refused before any backward pass
    np.testing.assert_allclose(
        fisher_trace(lin, max_cotangents=12),
        np.trace(dense_fisher(**_args(case), family=Categorical())),
        rtol=1e-12,
    )
    # The bounds check each kernel: "lower" has R = 1, "upper" R = C.
    with pytest.raises(ValueError, match=r"fisher_bounds needs P · R = 4 · 3 = 12 .*'upper'"):
        fisher_bounds(lin, max_cotangents=11)
    with pytest.raises(ValueError, match=r"fisher_dense needs"):
        fisher_dense(lin, max_cotangents=2)
    with pytest.raises(ValueError, match=r"fisher_blocks needs"):
        fisher_blocks(lin, max_cotangents=2)
    # With a mask, P counts the unmasked positions of the fullest example.
    masked = make_lin(random_case(Categorical(), (4,), masked=True))
    with pytest.raises(ValueError, match=r"P · R = 3 · 3 = 9 .*\(P = 3 counted \(unmasked\)"):
        fisher_trace(masked, max_cotangents=8)
    with pytest.raises(ValueError, match=r"max_cotangents must be an integer >= 1; got 0\."):
        fisher_trace(masked, max_cotangents=0)


def test_mean_reduction_divides_by_the_examples() -> None:
    case, truth = case_and_truth(Bernoulli(), (2, 3), True, n=4)
    lin = make_lin(case)
    np.testing.assert_allclose(
        fisher_dense(lin, Bernoulli(), reduction="mean"), truth / 4, rtol=1e-10
    )
    np.testing.assert_allclose(
        float(fisher_trace(lin, Bernoulli(), reduction="mean")), np.trace(truth) / 4, rtol=1e-10
    )
    op = fisher_operator(lin, Bernoulli(), reduction="mean")
    np.testing.assert_allclose(op.matmat(np.eye(7)), truth / 4, rtol=1e-10, atol=1e-12)
    est = detach_and_mix(lin, Bernoulli(), num_probes=4, rng=3)
    est_mean = detach_and_mix(lin, Bernoulli(), num_probes=4, rng=3, reduction="mean")
    np.testing.assert_allclose(est_mean.value, est.value / 4, rtol=1e-12)
    np.testing.assert_allclose(est_mean.std_error, est.std_error / 4, rtol=1e-12)


# --------------------------------------------------------------------------- #
# streams of batches with different sequence lengths


def test_a_stream_of_batches_with_different_lengths() -> None:
    fam = Categorical()
    c1, t1 = case_and_truth(fam, (4,), True, n=3, seed=1)
    c2, t2 = case_and_truth(fam, (2,), False, n=2, seed=2)
    lins = [make_lin(c1), make_lin(c2)]
    truth = t1 + t2
    np.testing.assert_allclose(fisher_diagonal(lins), np.diag(truth), rtol=1e-10)
    np.testing.assert_allclose(fisher_dense(lins, reduction="mean"), truth / 5, rtol=1e-10)
    top = top_eigenpairs(lins, k=2, num_matvecs=7, rng=0)
    np.testing.assert_allclose(top.eigenvalues, np.linalg.eigvalsh(truth)[::-1][:2], rtol=1e-8)
    est = detach_and_mix(lins, what="trace", num_probes=3000, rng=0)
    within(est, np.trace(truth))
    assert rank_bound(lins).value == min(7, (c1["mask"].sum() + 2 * 2) * 2)


def test_the_stream_refuses_another_number_of_position_axes() -> None:
    a = make_lin(random_case(Categorical(), (4,), masked=False))
    b = make_lin(random_case(Categorical(), (2, 2), masked=False))
    msg = (
        r"every batch must have the same number of position axes; the logits of batch 1 are "
        r"\(N, T1, T2, C\), batch 0's were \(N, T, C\)\. Batches may differ in N and in the "
        r"sizes of the position axes \(sequence length\), not in their number\."
    )
    with pytest.raises(ValueError, match=msg):
        fisher_diagonal([a, b])


def test_the_stream_refuses_a_mask_of_the_wrong_shape() -> None:
    case = random_case(Categorical(), (4,), masked=False)
    lin = DenseLinearization(case["z"], case["jac"], mask=np.ones((3, 4), dtype=bool))
    lin._mask = np.ones((3, 5), dtype=bool)
    msg = (
        r"the mask of batch 0 must be a boolean array of shape \(N, \*S\) = \(3, 4\) \(the "
        r"logits' shape without the class axis\); got bool of shape \(3, 5\)\."
    )
    with pytest.raises(ValueError, match=msg):
        fisher_trace(lin)


def test_the_stream_refuses_logits_without_a_class_axis() -> None:
    lin = DenseLinearization(np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"must have shape \(N, C\), or \(N, \*S, C\) with "):
        fisher_trace(lin)


# --------------------------------------------------------------------------- #
# detach-and-mix


def all_signs(shape):
    size = int(np.prod(shape))
    return np.array(list(itertools.product([-1.0, 1.0], repeat=size))).reshape((-1, *shape))


@fam_id
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per_example"])
def test_detach_and_mix_is_unbiased_by_enumeration(family, masked, per_example) -> None:
    # N = 2 examples, S = (2,), C = R = 2: 2^8 sign vectors, the exact expectation.
    case, truth = case_and_truth(family, (2,), masked, n=2, c=2, d=5)
    if masked:
        case["mask"][0, 1] = False  # random_case keeps both positions of N = 2, T = 2
        truth = dense_fisher(**_args(case), family=family)
    lin = make_lin(case, blocks=[("a", (2,)), ("b", (3,))])
    xi = all_signs((2, 2, 2)) * (1.0 if case["mask"] is None else case["mask"][..., None])
    for what in ("diagonal", "trace", "blocks"):
        qty = quantity(what, max_size=5)
        qty.select(lin)
        s = _probe_samples(
            lin, family, xi, qty, kernel="exact", per_example=per_example, max_vectors=None
        )
        if what == "diagonal":
            np.testing.assert_allclose(s.mean(axis=0), np.diag(truth), rtol=1e-10, atol=1e-12)
        elif what == "trace":
            np.testing.assert_allclose(s.mean(axis=0), np.trace(truth), rtol=1e-10)
        else:
            np.testing.assert_allclose(s["a"].mean(axis=0), truth[:2, :2], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(s["b"].mean(axis=0), truth[2:, 2:], rtol=1e-10, atol=1e-12)


@fam_id
@shape_id
@mask_id
def test_detach_and_mix_within_five_standard_errors(family, spatial, masked) -> None:
    case, truth = case_and_truth(family, spatial, masked)
    lin = make_lin(case, blocks=BLOCKS)
    m = 400
    est = detach_and_mix(lin, family, num_probes=m, rng=11)
    assert est.value.shape == (7,)
    assert est.std_error.shape == (7,)
    assert est.num_probes == m
    within(est, np.diag(truth))
    within(detach_and_mix(lin, family, num_probes=m, rng=12, per_example=True), np.diag(truth))
    within(detach_and_mix(lin, family, what="trace", num_probes=m, rng=13), np.trace(truth))
    blocks = detach_and_mix(lin, family, what="blocks", num_probes=m, rng=14, per_example=True)
    assert blocks.value["a"].shape == (4, 4)
    assert blocks.value["b"].shape == (3, 3)
    within(type(est)(blocks.value["a"], blocks.std_error["a"], m), truth[:4, :4])
    full = detach_and_mix(lin, family, what="full", num_probes=m, rng=15)
    assert full.value.shape == (m, 7)
    diag = np.sum(np.asarray(full.value) ** 2, axis=0)
    within(type(est)(diag, full.std_error, m), np.diag(truth))


def test_detach_and_mix_one_backward_pass_per_probe() -> None:
    # Probes have the logits' shape: M batch VJPs, and M per-example columns per
    # example with per_example=True, whatever P and C.
    case = random_case(Categorical(), (2, 3), masked=True, c=5)
    lin = make_lin(case)
    calls = []
    vjp_batch = lin.vjp_batch

    def counting(U):
        calls.append(tuple(U.shape))
        return vjp_batch(U)

    lin.vjp_batch = counting
    detach_and_mix(lin, num_probes=6, rng=0)
    assert calls == [(6, 3, 2, 3, 5)]
    detach_and_mix(lin, num_probes=6, rng=0, per_example=True)
    assert lin.columns == 3 * 6


# --------------------------------------------------------------------------- #
# Monte-Carlo and empirical Fisher


@fam_id
@shape_id
@mask_id
def test_monte_carlo_within_five_standard_errors(family, spatial, masked) -> None:
    case, truth = case_and_truth(family, spatial, masked)
    lin = make_lin(case)
    k = 400
    est = monte_carlo(lin, family, num_samples=k, rng=21)
    within(est, np.diag(truth))
    within(monte_carlo(lin, family, what="trace", num_samples=k, rng=22), np.trace(truth))
    full = monte_carlo(lin, family, what="full", num_samples=3, rng=23)
    assert full.value.shape == (3 * 3, 7)  # N rows per draw: examples, not positions


def empirical_truth(case, family, y, ignore_index=None):
    """Σ_x s_x s_xᵀ with s_x = Σ_t J_xtᵀ score_t over the counted positions."""
    z, jac, mask = case["z"], case["jac"], case["mask"]
    keep = np.ones(z.shape[:-1]) if mask is None else mask.astype(float)
    y_fam = y
    if ignore_index is not None:
        keep = keep * (y != ignore_index)
        y_fam = np.where(y == ignore_index, 0, y)
    score = np.asarray(family.score(z, y_fam)) * keep[..., None]
    n, d = z.shape[0], jac.shape[-1]
    s = np.einsum(
        "xkc,xkcd->xd", score.reshape(n, -1, z.shape[-1]), jac.reshape(n, -1, z.shape[-1], d)
    )
    return s.T @ s


@fam_id
@shape_id
@mask_id
def test_empirical_is_the_sum_of_per_example_score_products(family, spatial, masked) -> None:
    case = random_case(family, spatial, masked=masked)
    y = labels_for(family, case["z"])
    ignore = None
    if isinstance(family, Categorical):
        y[0, ...] = -100  # every position of example 0 ignored
        y.reshape(3, -1)[1, 0] = -100
        ignore = -100
    truth = empirical_truth(case, family, y, ignore)
    lin = make_lin(case)
    est = empirical(lin, y, family)
    np.testing.assert_allclose(est.value, np.diag(truth), rtol=1e-10, atol=1e-12)
    assert not np.any(est.std_error)
    full = empirical(lin, y, family, what="full")
    assert full.value.shape == (3, 7)  # one row per example
    np.testing.assert_allclose(full.value.T @ full.value, truth, rtol=1e-10, atol=1e-12)
    trace = empirical(lin, [y], family, what="trace", reduction="mean")
    np.testing.assert_allclose(float(trace.value), np.trace(truth) / 3, rtol=1e-10)


def test_empirical_ignore_index() -> None:
    case = random_case(Categorical(), (4,), masked=False)
    y = labels_for(Categorical(), case["z"])
    y[:, 1] = 7
    lin = make_lin(case)
    est = empirical(lin, y, ignore_index=7)
    np.testing.assert_allclose(
        est.value, np.diag(empirical_truth(case, Categorical(), y, 7)), rtol=1e-10, atol=1e-12
    )
    # Without ignore_index the label 7 is out of range for C = 3.
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        empirical(lin, y, ignore_index=None)
    with pytest.raises(ValueError, match=r"the labels of batch 0 leave no position to count"):
        empirical(lin, np.full((3, 4), -100))
    with pytest.raises(TypeError, match="ignore_index must be an int or None; got float"):
        empirical(lin, y, ignore_index=7.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 4\)"):
        empirical(lin, y[:, :2])
    # Batches with different lengths take a list of label arrays.
    c2 = random_case(Categorical(), (2,), masked=False, seed=5)
    y2 = labels_for(Categorical(), c2["z"], seed=6)
    both = empirical([lin, make_lin(c2)], [np.where(y == 7, -100, y), y2])
    expected = empirical_truth(case, Categorical(), np.where(y == 7, -100, y), -100)
    expected = expected + empirical_truth(c2, Categorical(), y2)
    np.testing.assert_allclose(both.value, np.diag(expected), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- #
# spectra


@fam_id
@mask_id
def test_top_eigenpairs_and_local_dimension_match_eigh(family, masked) -> None:
    case, truth = case_and_truth(family, (2, 3), masked, d=9, c=2, n=1)
    lin = make_lin(case)
    lam = np.linalg.eigvalsh(truth)[::-1]
    top = top_eigenpairs(lin, family, k=3, num_matvecs=9, rng=0)
    np.testing.assert_allclose(top.eigenvalues, lam[:3], rtol=1e-8, atol=1e-10)
    for i in range(3):
        v = np.asarray(top.eigenvectors[:, i])
        np.testing.assert_allclose(truth @ v, lam[i] * v, atol=1e-8 * lam[0])
    eps = 1e-6 * lam[0]
    count = local_dimension(lin, family, eps=eps, rng=0, method="lanczos")
    assert float(count.value) == int(np.sum(lam > eps))
    bound = rank_bound(lin, family)
    counted = 6 if case["mask"] is None else int(case["mask"].sum())
    r = 1 if isinstance(family, Categorical) else 2
    assert bound.value == min(9, counted * r)
    assert bound.num_inputs == 1
    assert int(np.sum(lam > eps)) <= bound.value


# --------------------------------------------------------------------------- #
# the strict array-API double (a fake device that refuses host copies)


def test_positions_on_the_strict_double() -> None:
    from _backends import make_backend

    backend = make_backend("strict-device1")
    case, truth = case_and_truth(Categorical(), (2, 3), True)
    lin = make_lin(case, backend)
    assert_close(fisher_diagonal(lin), np.diag(truth), rtol=1e-10, atol=1e-12, like=backend)
    assert_close(fisher_dense(lin), truth, rtol=1e-10, atol=1e-12, like=backend)
    est = detach_and_mix(lin, num_probes=3, rng=0, per_example=True)
    ref = detach_and_mix(make_lin(case), num_probes=3, rng=0, per_example=True)
    assert_close(est.value, ref.value, rtol=1e-12, atol=1e-14, like=backend)
    mc = monte_carlo(lin, num_samples=2, rng=0)
    ref_mc = monte_carlo(make_lin(case), num_samples=2, rng=0)
    assert_close(mc.value, ref_mc.value, rtol=1e-12, atol=1e-14, like=backend)
    y = labels_for(Categorical(), case["z"])
    y[0, 0, 0] = -100
    emp = empirical(lin, backend.asarray(y, dtype="int64"))
    assert_close(
        emp.value,
        np.diag(empirical_truth(case, Categorical(), y, -100)),
        rtol=1e-10,
        atol=1e-12,
        like=backend,
    )
    assert math.isclose(
        float(np.asarray(fisher_trace(make_lin(case)))), float(np.trace(truth)), rel_tol=1e-10
    )
