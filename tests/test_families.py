"""Tests of fisherbound.families: the core space (THEORY §1, and §3-4 for the moments)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from _assertions import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound._lib import device_of
from fisherbound.families import (
    KERNELS,
    Bernoulli,
    Categorical,
    EigenPair,
    EigenvalueBounds,
    Family,
    Gaussian,
    _secular,
)

FAMILIES = [Categorical(), Bernoulli(), Gaussian(), Gaussian(variance=0.25)]
CAT = Categorical()


def logits_of(p) -> np.ndarray:
    return np.log(np.asarray(p, dtype=np.float64))


def dense_metric(p: np.ndarray) -> np.ndarray:
    return np.diag(p) - np.outer(p, p)


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def min_eig(a: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(a).min())


# ---------------------------------------------------------------- reference values
def test_reference_p_07_02_01(backend) -> None:
    z = backend.asarray(logits_of([0.7, 0.2, 0.1]))
    ref = [[0.21, -0.14, -0.07], [-0.14, 0.16, -0.02], [-0.07, -0.02, 0.09]]
    assert_close(CAT.metric(z), ref, rtol=1e-7, atol=1e-12, like=backend)
    eig = backend.to_numpy(CAT.eigvalsh(z))
    np.testing.assert_allclose(eig, [0.0, 0.1255969349, 0.3344030651], atol=1e-9)
    assert float(backend.to_numpy(CAT.pseudo_determinant(z))) == pytest.approx(0.042, abs=1e-12)
    assert float(backend.to_numpy(CAT.log_pseudo_determinant(z))) == pytest.approx(math.log(0.042))
    # tr I_Δ = 1 − ‖p‖² = 0.46
    assert eig.sum() == pytest.approx(0.46, abs=1e-12)
    lam, vec = CAT.top_eigenpair(z)
    assert float(backend.to_numpy(lam)) == pytest.approx(0.3344030651, abs=1e-9)
    v = backend.to_numpy(vec)
    np.testing.assert_allclose(np.array(ref) @ v, 0.3344030651 * v, atol=1e-9)
    assert np.linalg.norm(v) == pytest.approx(1.0)
    assert v[0] > 0


def test_reference_p_09_005_005(backend) -> None:
    z = backend.asarray(logits_of([0.9, 0.05, 0.05]))
    assert_close(CAT.eigvalsh(z), [0, 0.05, 0.135], rtol=1e-7, atol=1e-12, like=backend)


@pytest.mark.parametrize(
    "p",
    [
        [0.3, 0.7],
        [0.5, 0.5],
        [0.6, 0.3, 0.1],
        [1 / 3] * 3,
        [1 - 2 * 0.15, 0.15, 0.15],
        [1 - 2 * 0.4, 0.4, 0.4],
    ],
)
def test_closed_forms(backend, p) -> None:
    p = np.asarray(p)
    c = p.size
    if c == 2:
        ref = [0.0, 2 * p[0] * p[1]]
    elif np.allclose(p, 1 / c):
        ref = [0.0] + [1 / c] * (c - 1)
    elif np.isclose(p[1], p[2]):  # (1 − 2q, q, q)
        q = p[1]
        ref = sorted([0.0, q, 3 * q * (1 - 2 * q)])
    else:  # C = 3
        t = 1 - np.sum(p**2)
        root = math.sqrt(t**2 - 12 * np.prod(p))
        ref = [0.0, (t - root) / 2, (t + root) / 2]
    z = backend.asarray(logits_of(p))
    assert_close(CAT.eigvalsh(z), ref, rtol=1e-7, atol=1e-12, like=backend)
    lam, _ = CAT.top_eigenpair(z)
    assert float(backend.to_numpy(lam)) == pytest.approx(ref[-1], abs=1e-12)


def test_batched_spectrum_trace_and_bounds(backend) -> None:
    rng = np.random.default_rng(1)
    zn = rng.standard_normal((2, 1, 3)) * 2  # (N, C) = (2, 3) inside, as elsewhere
    z = backend.asarray(zn)
    p = softmax_np(zn)
    eig = backend.to_numpy(CAT.eigvalsh(z))
    assert eig.shape == (2, 1, 3)
    for row, pr in zip(eig.reshape(-1, 3), p.reshape(-1, 3), strict=True):
        np.testing.assert_allclose(row, np.linalg.eigvalsh(dense_metric(pr)), atol=1e-12)
    np.testing.assert_allclose(eig.sum(-1), 1 - (p**2).sum(-1), atol=1e-12)
    lo, hi = CAT.lambda_max_bounds(z)
    lam, vec = CAT.top_eigenpair(z)
    lo, hi, lam = (backend.to_numpy(x) for x in (lo, hi, lam))
    assert lo.shape == hi.shape == lam.shape == (2, 1)
    np.testing.assert_allclose(lam, eig[..., -1], atol=1e-12)
    assert np.all(lo <= lam + 1e-12)
    assert np.all(lam <= hi + 1e-12)
    assert np.all(hi <= 0.5)
    assert backend.to_numpy(vec).shape == (2, 1, 3)


def test_uniform_closed_form() -> None:
    for c in (2, 4, 5, 50):
        eig = CAT.eigvalsh(np.zeros(c))
        np.testing.assert_allclose(eig, [0.0] + [1 / c] * (c - 1), atol=1e-15)


def test_lambda_max_bounds_reference(backend) -> None:
    z = backend.asarray(logits_of([0.7, 0.2, 0.1]))
    bounds = CAT.lambda_max_bounds(z)
    assert isinstance(bounds, EigenvalueBounds)
    # lower = max(0.2, 0.21, ½[0.9 − 0.25]) = 0.325; upper = min(0.7, 0.46, 0.5)
    assert float(backend.to_numpy(bounds.lower)) == pytest.approx(0.325, abs=1e-12)
    assert float(backend.to_numpy(bounds.upper)) == pytest.approx(0.46, abs=1e-12)


# ------------------------------------------------------- kernels on every backend
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_kernels_square_roots_and_matvecs(backend, family) -> None:
    rng = np.random.default_rng(2)
    zn = rng.standard_normal((2, 3)) * 2
    z = backend.asarray(zn)
    v = backend.asarray(rng.standard_normal((3, 1, 3)))  # broadcasts against (2, 3)
    for kernel in KERNELS:
        k = backend.to_numpy(family.metric(z, kernel=kernel))
        assert k.shape == (2, 3, 3)
        np.testing.assert_allclose(k, np.swapaxes(k, -1, -2), atol=1e-15)
        b = backend.to_numpy(family.sqrt_metric(z, kernel=kernel))
        r = family.sqrt_rank(3, kernel=kernel)
        assert b.shape == (2, 3, r)
        np.testing.assert_allclose(b @ np.swapaxes(b, -1, -2), k, atol=1e-13)
        kv = backend.to_numpy(family.metric_matvec(z, v, kernel=kernel))
        assert kv.shape == (3, 2, 3)
        np.testing.assert_allclose(
            kv, np.einsum("nij,mnj->mni", k, backend.to_numpy(v)), atol=1e-13
        )
        xi_n = rng.standard_normal((2, r))
        assert_close(
            family.sqrt_metric_matvec(z, backend.asarray(xi_n), kernel=kernel),
            np.einsum("nij,nj->ni", b, xi_n),
            rtol=1e-7,
            atol=1e-13,
            like=backend,
        )
    assert_close(family.upper_kernel(z), family.metric(z, kernel="upper"), rtol=1e-7, atol=0)
    assert_close(family.lower_kernel(z), family.metric(z, kernel="lower"), rtol=1e-7, atol=0)
    assert_close(
        family.upper_kernel_matvec(z, v),
        family.metric_matvec(z, v, kernel="upper"),
        rtol=1e-7,
        atol=0,
    )
    assert_close(
        family.lower_kernel_matvec(z, v),
        family.metric_matvec(z, v, kernel="lower"),
        rtol=1e-7,
        atol=0,
    )


def test_explicit_kernel_formulas(backend) -> None:
    p = np.array([0.7, 0.2, 0.1])
    z = backend.asarray(logits_of(p))
    proj = np.eye(3) - 1 / 3
    lam = 0.3344030651
    assert_close(CAT.upper_kernel(z), np.diag(p), rtol=1e-7, atol=1e-12, like=backend)
    assert_close(
        CAT.metric(z, kernel="scalar_upper"), lam * proj, rtol=1e-7, atol=1e-9, like=backend
    )
    assert_close(
        CAT.metric(z, kernel="scalar_lower"), 0.1 * proj, rtol=1e-7, atol=1e-12, like=backend
    )
    lower = backend.to_numpy(CAT.lower_kernel(z))
    assert np.linalg.matrix_rank(lower, tol=1e-12) == 1
    assert np.trace(lower) == pytest.approx(lam, abs=1e-9)
    # column y of B is √p_y (e_y − p)
    b = backend.to_numpy(CAT.sqrt_metric(z))
    np.testing.assert_allclose(b[:, 1], math.sqrt(0.2) * (np.eye(3)[1] - p), atol=1e-12)
    xi = backend.asarray(np.array([1.0, -1.0, 1.0]))
    expected = np.sqrt(p) * [1, -1, 1] - p * (np.sqrt(p) @ [1, -1, 1])
    assert_close(CAT.sqrt_metric_matvec(z, xi), expected, rtol=1e-7, atol=1e-12, like=backend)
    # Bernoulli diag(σ(1 − σ)) and Gaussian identity
    zb = backend.asarray(np.array([0.0, math.log(3.0)]))  # σ = 1/2, 3/4
    assert_close(
        Bernoulli().metric(zb), np.diag([0.25, 0.1875]), rtol=1e-7, atol=1e-15, like=backend
    )
    assert_close(Bernoulli().eigvalsh(zb), [0.1875, 0.25], rtol=1e-7, atol=0, like=backend)
    lam_b, vec_b = Bernoulli().top_eigenpair(zb)
    assert float(backend.to_numpy(lam_b)) == pytest.approx(0.25)
    assert_close(vec_b, [1.0, 0.0], rtol=1e-7, atol=0, like=backend)
    assert_close(Gaussian().metric(zb), np.eye(2), rtol=1e-7, atol=0, like=backend)
    lam_g, vec_g = Gaussian().top_eigenpair(zb)
    assert float(backend.to_numpy(lam_g)) == 1.0
    assert_close(vec_g, [1.0, 0.0], rtol=1e-7, atol=0, like=backend)
    assert_close(
        Gaussian().metric(zb, kernel="lower"),
        [[1.0, 0.0], [0.0, 0.0]],
        rtol=1e-7,
        atol=0,
        like=backend,
    )


def test_pseudo_determinants_of_diagonal_families(backend) -> None:
    zb = backend.asarray(np.array([[0.0, math.log(3.0)], [1.0, -2.0]]))
    s = 1 / (1 + np.exp(-np.array([[0.0, math.log(3.0)], [1.0, -2.0]])))
    ref = np.prod(s * (1 - s), axis=-1)
    assert_close(Bernoulli().pseudo_determinant(zb), ref, rtol=1e-7, atol=0, like=backend)
    assert_close(
        Bernoulli().log_pseudo_determinant(zb), np.log(ref), rtol=1e-7, atol=0, like=backend
    )
    assert_close(Gaussian().pseudo_determinant(zb), [1.0, 1.0], rtol=1e-7, atol=0, like=backend)
    assert_close(Gaussian().log_pseudo_determinant(zb), [0.0, 0.0], rtol=1e-7, atol=0, like=backend)
    assert_close(
        Gaussian().lambda_max_bounds(zb).lower, [1.0, 1.0], rtol=1e-7, atol=0, like=backend
    )
    assert_close(
        Bernoulli().lambda_max_bounds(zb).upper,
        np.max(s * (1 - s), axis=-1),
        rtol=1e-7,
        atol=0,
        like=backend,
    )


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_namespace_device_and_dtype_are_kept(backend, family) -> None:
    rng = np.random.default_rng(3)
    for dtype in ("float32", "float64"):
        z = backend.asarray(rng.standard_normal((2, 3)), dtype=dtype)
        v = backend.asarray(rng.standard_normal((2, 3)), dtype=dtype)
        y = family.sample(z, rng=0)
        results = [
            family.mean(z),
            family.log_likelihood(z, y),
            family.score(z, y),
            family.eigvalsh(z),
            *family.top_eigenpair(z),
            *family.lambda_max_bounds(z),
            family.pseudo_determinant(z),
            family.log_pseudo_determinant(z),
            family.fourth_moment(z, v),
        ]
        for kernel in KERNELS:
            xi = backend.asarray(np.ones((2, family.sqrt_rank(3, kernel=kernel))), dtype=dtype)
            results += [
                family.metric(z, kernel=kernel),
                family.metric_matvec(z, v, kernel=kernel),
                family.sqrt_metric(z, kernel=kernel),
                family.sqrt_metric_matvec(z, xi, kernel=kernel),
            ]
        for r in results:
            assert type(r).__module__.split(".")[0] == type(z).__module__.split(".")[0]
            assert r.dtype == z.dtype
            assert device_of(r) == device_of(z)
        if isinstance(family, Categorical):
            assert y.dtype == backend.xp.int64
            assert y.shape == (2,)
        else:
            assert y.dtype == z.dtype
            assert y.shape == (2, 3)
        assert device_of(y) == device_of(z)
    assert isinstance(family.top_eigenpair(z), EigenPair)


def test_float32_spectrum(backend) -> None:
    rng = np.random.default_rng(4)
    zn = rng.standard_normal((2, 3)) * 2
    eig = backend.to_numpy(CAT.eigvalsh(backend.asarray(zn, dtype="float32")))
    assert eig.dtype == np.float32
    p = softmax_np(zn)
    for row, pr in zip(eig, p, strict=True):
        np.testing.assert_allclose(row, np.linalg.eigvalsh(dense_metric(pr)), atol=2e-6)
    lam, vec = CAT.top_eigenpair(backend.asarray(zn, dtype="float32"))
    v = backend.to_numpy(vec).astype(np.float64)
    for li, vi, pr in zip(backend.to_numpy(lam), v, p, strict=True):
        np.testing.assert_allclose(dense_metric(pr) @ vi, li * vi, atol=2e-6)


# ------------------------------------------------------ labels, scores, sampling
def test_float32_spectrum_larger_c() -> None:
    rng = np.random.default_rng(5)
    zn = rng.standard_normal((3, 60)) * 2
    eig = CAT.eigvalsh(zn.astype(np.float32))
    assert eig.dtype == np.float32
    for row, pr in zip(eig, softmax_np(zn), strict=True):
        np.testing.assert_allclose(row, np.linalg.eigvalsh(dense_metric(pr)), atol=2e-6)


def test_log_likelihood_and_score(backend) -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    z = backend.asarray(np.log(p))
    y = backend.asarray(np.array([1, 2]), dtype="int64")
    assert_close(CAT.log_likelihood(z, y), np.log([0.2, 0.8]), rtol=1e-7, atol=1e-12, like=backend)
    score = backend.to_numpy(CAT.score(z, y))
    np.testing.assert_allclose(score, np.eye(3)[[1, 2]] - p, atol=1e-12)
    # Bernoulli: Σ_c log p(y_c)
    zb_np = np.array([[0.3, -1.2], [2.0, 0.0]])
    yb_np = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = 1 / (1 + np.exp(-zb_np))
    ref = np.sum(yb_np * np.log(s) + (1 - yb_np) * np.log(1 - s), axis=-1)
    zb, yb = backend.asarray(zb_np), backend.asarray(yb_np)
    assert_close(Bernoulli().log_likelihood(zb, yb), ref, rtol=1e-7, atol=0, like=backend)
    assert_close(Bernoulli().score(zb, yb), yb_np - s, rtol=1e-7, atol=0, like=backend)
    # Gaussian
    ref_g = -0.5 * np.sum((yb_np - zb_np) ** 2, axis=-1) - math.log(2 * math.pi)
    assert_close(Gaussian().log_likelihood(zb, yb), ref_g, rtol=1e-7, atol=0, like=backend)
    assert_close(Gaussian().score(zb, yb), yb_np - zb_np, rtol=1e-7, atol=0, like=backend)
    assert CAT.check_labels(z, y) is None


def test_unchecked_kernel_surface_equals_the_fronts(backend) -> None:
    # The adapters' surface (no validation, explicit xp) gives the fronts' numbers.
    rng = np.random.default_rng(11)
    z_np = rng.standard_normal((4, 3))
    v = backend.asarray(rng.standard_normal((4, 3)))
    labels = {
        CAT: backend.asarray(np.array([0, 2, 1, 1]), dtype="int64"),
        Bernoulli(): backend.asarray((rng.random((4, 3)) < 0.5).astype(np.float64)),
        Gaussian(): backend.asarray(rng.standard_normal((4, 3))),
    }
    z = backend.asarray(z_np)
    xp = backend.xp
    for family, y in labels.items():
        for got, want in [
            (family.unchecked_log_likelihood(z, y, xp=xp), family.log_likelihood(z, y)),
            (family.unchecked_score(z, y, xp=xp), family.score(z, y)),
            (family.unchecked_metric_matvec(z, v, xp=xp), family.metric_matvec(z, v)),
            (
                family.unchecked_metric_matvec(z, v, kernel="lower", xp=xp),
                family.metric_matvec(z, v, kernel="lower"),
            ),
            (family.unchecked_sqrt_metric_matvec(z, v, xp=xp), family.sqrt_metric_matvec(z, v)),
        ]:
            assert type(got) is type(want)
            assert got.dtype == want.dtype
            assert tuple(got.shape) == tuple(want.shape)
            assert_close(got, want, rtol=0, atol=0)


def test_sqrt_metric_matvec_overwrite(backend) -> None:
    # B ξ = √p ⊙ ξ − p (√p · ξ) for probes ξ (M, N, C) against logits z (N, C): the same
    # values whether or not ξ may be overwritten; ξ is kept unless overwrite=True.
    rng = np.random.default_rng(5)
    z_np = 3.0 * rng.standard_normal((4, 6))
    xi_np = rng.choice([-1.0, 1.0], size=(3, 4, 6))
    p = np.exp(z_np - z_np.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    r = np.sqrt(p)
    want = r * xi_np - p * np.sum(r * xi_np, axis=-1, keepdims=True)
    z, xp = backend.asarray(z_np), backend.xp
    for overwrite in (False, True):
        xi = backend.asarray(xi_np.copy())  # torch.asarray may share NumPy's buffer
        got = CAT.unchecked_sqrt_metric_matvec(z, xi, xp=xp, overwrite=overwrite)
        assert_close(got, want, rtol=1e-13, atol=1e-15, like=backend)
        if not overwrite:
            assert_close(xi, xi_np, rtol=0, atol=0, like=backend)
        if backend.name.startswith("torch"):  # written into ξ's buffer, or a new array
            assert (got.data_ptr() == xi.data_ptr()) is overwrite

    if backend.name == "torch":  # under torch.func.vmap: out of place, the same values
        import torch

        xi0 = backend.asarray(xi_np[0])  # (N, C): ξ batched with z, or z batched alone
        batched = torch.func.vmap(CAT.sqrt_metric_matvec)(z, xi0)
        assert_close(batched, want[0], rtol=1e-13, atol=1e-15, like=backend)
        row = torch.func.vmap(lambda zz: CAT.sqrt_metric_matvec(zz, xi0[0]))(z[:1])
        assert_close(row, want[0, :1], rtol=1e-13, atol=1e-15, like=backend)
        expanded = backend.asarray(xi_np[0]).expand(3, 4, 6)  # stride 0: copied, not written
        got = CAT.unchecked_sqrt_metric_matvec(z, expanded, xp=xp, overwrite=True)
        assert_close(got, want[0:1].repeat(3, 0), rtol=1e-13, atol=1e-15, like=backend)

    class Doubled(Categorical):  # a subclass's own factor is used, overwrite or not
        def _exact_sqrt_matvec(self, z, xi, xp):  # type: ignore[no-untyped-def]
            return 2.0 * super()._exact_sqrt_matvec(z, xi, xp)

    xi = backend.asarray(xi_np.copy())
    got = Doubled().unchecked_sqrt_metric_matvec(z, xi, xp=xp, overwrite=True)
    assert_close(got, 2.0 * want, rtol=1e-13, atol=1e-15, like=backend)


def test_sqrt_metric_matvec_of_one_probe_of_signs(backend) -> None:
    # One probe of int8 ±1 signs (0 on dropped rows), as detach-and-mix draws it: the
    # same B ξ as the floating ξ, on every backend (torch's CPU: block by block of
    # rows, bit for bit the float path's values; the others: ξ cast first). Blocks of
    # 7 rows here.
    import fisherbound.families._categorical as categorical

    rng = np.random.default_rng(6)
    z_np = 4.0 * rng.standard_normal((3, 5, 6))
    signs_np = rng.choice(np.array([-1, 1], dtype=np.int8), size=(1, 3, 5, 6))
    signs_np[0, 1, 2] = 0  # a dropped (masked) position
    xi_np = signs_np.astype(np.float64)
    p = np.exp(z_np - z_np.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.sqrt(p) * xi_np - p * np.sum(np.sqrt(p) * xi_np, axis=-1, keepdims=True)
    z, xp = backend.asarray(z_np), backend.xp
    signs = xp.asarray(signs_np, device=backend.device)
    saved = categorical.SIGNS_BLOCK
    categorical.SIGNS_BLOCK = 7 * 6
    try:
        got = CAT.unchecked_sqrt_metric_matvec(z, signs, xp=xp, overwrite=True)
    finally:
        categorical.SIGNS_BLOCK = saved
    assert_close(got, want, rtol=1e-13, atol=1e-15, like=backend)
    assert float(xp.max(xp.abs(got[0, 1, 2, :]))) == 0.0
    if backend.name == "torch":  # float32 logits: the float path's values to the bit
        float_xi = xp.astype(signs, z.float().dtype)
        want32 = CAT.unchecked_sqrt_metric_matvec(z.float(), float_xi, xp=xp, overwrite=True)
        got32 = CAT.unchecked_sqrt_metric_matvec(z.float(), signs, xp=xp, overwrite=True)
        assert got32.dtype == want32.dtype
        assert bool((got32 == want32).all())


def test_categorical_target_distributions(backend) -> None:
    # Soft targets: log p(y | z) = Σ_c y_c log p_c and score y − p; a one-hot row
    # gives its class index's numbers, on every backend.
    rng = np.random.default_rng(8)
    z_np = rng.standard_normal((2, 4, 3))
    y_np = rng.dirichlet(np.ones(3), size=(2, 4))
    z, y = backend.asarray(z_np), backend.asarray(y_np)
    logp = z_np - np.log(np.sum(np.exp(z_np), axis=-1, keepdims=True))
    assert_close(
        CAT.log_likelihood(z, y), np.sum(y_np * logp, axis=-1), rtol=1e-13, atol=0, like=backend
    )
    assert_close(CAT.score(z, y), y_np - np.exp(logp), rtol=1e-13, atol=1e-15, like=backend)
    k = backend.asarray(np.array([[0, 2, 1, 1], [2, 0, 0, 1]]), dtype="int64")
    hard = backend.asarray(np.eye(3)[np.array([[0, 2, 1, 1], [2, 0, 0, 1]])])
    assert_close(
        CAT.log_likelihood(z, hard), CAT.log_likelihood(z, k), rtol=1e-14, atol=0, like=backend
    )
    assert_close(CAT.score(z, hard), CAT.score(z, k), rtol=0, atol=1e-15, like=backend)
    off = y_np.copy()
    off[1, 2] *= 1.01  # a row summing to 1.01
    with pytest.raises(ValueError, match=r"rows summing to 1 \(to 0.0001\); got rows with"):
        CAT.check_labels(z, backend.asarray(off))
    with pytest.raises(ValueError, match=r"at positions \[6\]"):  # row (1, 2), flattened
        CAT.score(z, backend.asarray(off))
    with pytest.raises(ValueError, match=r"target distributions: entries in \[0, 1\]"):
        CAT.log_likelihood(z, backend.asarray(y_np * np.nan))
    with pytest.raises(ValueError, match=r"y must have shape \(2, 4, 3\)"):
        CAT.score(z, backend.asarray(y_np[..., :2]))
    with pytest.raises(TypeError, match="target distributions, soft targets, have the shape"):
        CAT.score(z, backend.asarray(np.zeros((2, 4))))
    with pytest.raises(TypeError, match=r"target distributions must be floating .* class indices"):
        CAT.score(z, backend.asarray(np.eye(3)[np.zeros((2, 4), dtype=int)], dtype="int64"))


def test_score_has_mean_zero_and_covariance_metric(backend) -> None:
    """Exact enumeration: E_p s = 0 and E_p s sᵀ = I (Categorical over C labels,
    Bernoulli over the 2^C label vectors)."""
    p = np.array([0.5, 0.3, 0.2])
    z = backend.asarray(np.log(p))
    scores = [
        backend.to_numpy(CAT.score(z, backend.asarray(np.asarray(k), dtype="int64")))
        for k in range(3)
    ]
    mean = sum(pk * s for pk, s in zip(p, scores, strict=True))
    np.testing.assert_allclose(mean, 0.0, atol=1e-15)
    cov = sum(pk * np.outer(s, s) for pk, s in zip(p, scores, strict=True))
    np.testing.assert_allclose(cov, backend.to_numpy(CAT.metric(z)), atol=1e-15)
    zb_np = np.array([0.4, -1.0, 2.0])
    zb = backend.asarray(zb_np)
    s = 1 / (1 + np.exp(-zb_np))
    mean_b = np.zeros(3)
    cov_b = np.zeros((3, 3))
    for labels in itertools.product([0.0, 1.0], repeat=3):
        lab = np.array(labels)
        prob = np.prod(np.where(lab == 1, s, 1 - s))
        sc = backend.to_numpy(Bernoulli().score(zb, backend.asarray(lab)))
        mean_b += prob * sc
        cov_b += prob * np.outer(sc, sc)
    np.testing.assert_allclose(mean_b, 0.0, atol=1e-15)
    np.testing.assert_allclose(cov_b, backend.to_numpy(Bernoulli().metric(zb)), atol=1e-15)


def test_sample_frequencies_within_five_standard_errors(backend) -> None:
    p = np.array([0.6, 0.25, 0.1, 0.05])
    n = 4000
    z = backend.asarray(np.broadcast_to(np.log(p), (n, 4)).copy())
    y = backend.to_numpy(CAT.sample(z, rng=123))
    assert y.shape == (n,)
    assert y.min() >= 0
    assert y.max() <= 3
    freq = np.bincount(y, minlength=4) / n
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se)
    # one seed gives the same labels on every backend
    ref = CAT.sample(np.broadcast_to(np.log(p), (n, 4)).copy(), rng=123)
    np.testing.assert_array_equal(y, ref)
    yb = backend.to_numpy(Bernoulli().sample(backend.asarray(np.zeros((n, 2))), rng=5))
    assert set(np.unique(yb)) <= {0.0, 1.0}
    assert np.all(np.abs(yb.mean(0) - 0.5) <= 5 * 0.5 / math.sqrt(n))
    yg = backend.to_numpy(Gaussian().sample(backend.asarray(np.full((n, 2), 3.0)), rng=6))
    assert np.all(np.abs(yg.mean(0) - 3.0) <= 5 / math.sqrt(n))
    many = CAT.sample(backend.asarray(np.log(p)), rng=0, num_samples=7)
    assert tuple(many.shape) == (7,)


def test_sample_never_picks_a_zero_probability_class() -> None:
    z = np.array([[0.0, -1e3, 0.0, -1e3]] * 500)
    y = CAT.sample(z, rng=0)
    assert set(np.unique(y)) <= {0, 2}


# --------------------------------------------------------------- fourth moment
def test_fourth_moment_by_enumeration(backend) -> None:
    rng = np.random.default_rng(7)
    zn = rng.standard_normal((2, 3))
    an = rng.standard_normal((4, 1, 3))  # broadcasts to (4, 2)
    z, a = backend.asarray(zn), backend.asarray(an)
    got = backend.to_numpy(CAT.fourth_moment(z, a))
    assert got.shape == (4, 2)
    p = softmax_np(zn)
    for m, n in itertools.product(range(4), range(2)):
        u = np.eye(3) - p[n]  # u = e_y − p for each label y
        ref = np.sum(p[n] * (u @ an[m, 0]) ** 4)
        assert got[m, n] == pytest.approx(ref, rel=1e-12)
    # Bernoulli: enumerate the 2^C label vectors
    got_b = backend.to_numpy(Bernoulli().fourth_moment(z, a))
    s = 1 / (1 + np.exp(-zn))
    for m, n in itertools.product(range(4), range(2)):
        ref = 0.0
        for labels in itertools.product([0.0, 1.0], repeat=3):
            lab = np.array(labels)
            prob = np.prod(np.where(lab == 1, s[n], 1 - s[n]))
            ref += prob * ((lab - s[n]) @ an[m, 0]) ** 4
        assert got_b[m, n] == pytest.approx(ref, rel=1e-12)
    assert_close(
        Gaussian().fourth_moment(z, a),
        np.broadcast_to(3 * np.sum(an**2, -1) ** 2, (4, 2)),
        rtol=1e-7,
        atol=0,
        like=backend,
    )


def test_gaussian_fourth_moment_by_monte_carlo() -> None:
    a = np.array([0.5, -1.0, 2.0])
    z = np.array([1.0, 0.0, -3.0])
    u = Gaussian().sample(z, rng=11, num_samples=200_000) - z
    samples = (u @ a) ** 4
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(samples.mean() - float(Gaussian().fourth_moment(z, a))) <= 5 * se


def test_gaussian_with_a_variance_against_closed_forms(backend) -> None:
    """y ~ N(z, σ² I): log-density as scipy.stats.norm, score (y − z)/σ², metric I/σ²,
    E s sᵀ = I/σ² and E(aᵀs)⁴ by Monte Carlo, sample variance σ², log det −C log σ²."""
    stats = pytest.importorskip("scipy.stats")
    s2 = 0.3
    fam = Gaussian(variance=s2)
    zn = np.array([[0.3, -1.2], [2.0, 0.0]])
    yn = np.array([[1.0, 0.5], [-0.5, 1.5]])
    z, y = backend.asarray(zn), backend.asarray(yn)
    ref = np.sum(stats.norm.logpdf(yn, loc=zn, scale=math.sqrt(s2)), axis=-1)
    assert_close(fam.log_likelihood(z, y), ref, rtol=1e-7, atol=0, like=backend)
    assert_close(fam.score(z, y), (yn - zn) / s2, rtol=1e-7, atol=0, like=backend)
    metric = np.eye(2) / s2 * np.ones((2, 1, 1))
    assert_close(fam.metric(z), metric, rtol=1e-7, atol=0, like=backend)
    assert_close(fam.eigvalsh(z), np.full((2, 2), 1 / s2), rtol=1e-7, atol=0, like=backend)
    assert_close(
        fam.log_pseudo_determinant(z), [-2 * math.log(s2)] * 2, rtol=1e-7, atol=0, like=backend
    )
    assert_close(fam.lambda_max_bounds(z).upper, [1 / s2] * 2, rtol=1e-7, atol=0, like=backend)
    # Monte Carlo on NumPy: covariance of the score and the fourth moment of aᵀs
    z1, a = np.array([1.0, 0.0, -3.0]), np.array([0.5, -1.0, 2.0])
    draws = fam.sample(z1, rng=5, num_samples=200_000)
    np.testing.assert_allclose(draws.var(axis=0, ddof=1), s2, rtol=5 * math.sqrt(2 / 200_000))
    scores = fam.score(np.broadcast_to(z1, draws.shape), draws)
    cov = scores.T @ scores / scores.shape[0]
    # entries of the sample covariance of N(0, I/σ²) have standard error ≤ √2/σ² / √n
    np.testing.assert_allclose(cov, np.eye(3) / s2, atol=5 * math.sqrt(2 / 200_000) / s2)
    fourth = (scores @ a) ** 4
    se = fourth.std(ddof=1) / math.sqrt(fourth.size)
    assert abs(fourth.mean() - float(fam.fourth_moment(z1, a))) <= 5 * se
    assert float(fam.fourth_moment(z1, a)) == pytest.approx(3 * (a @ a / s2) ** 2, rel=1e-12)


def test_gaussian_variance_is_a_value_and_is_checked() -> None:
    import pickle

    assert Gaussian(variance=1.0) == Gaussian()
    assert repr(Gaussian()) == "Gaussian()"
    assert repr(Gaussian(variance=0.5)) == "Gaussian(variance=0.5)"
    assert Gaussian(variance=0.5) != Gaussian()
    assert Gaussian(variance=0.5) != Bernoulli()
    assert hash(Gaussian(variance=2)) == hash(Gaussian(variance=2.0))
    assert pickle.loads(pickle.dumps(Gaussian(variance=0.5))) == Gaussian(variance=0.5)
    assert Gaussian(variance=4).variance == 4.0
    assert Gaussian(variance=np.float32(0.5)) == Gaussian(variance=0.5)  # numpy scalars
    for bad in (0.0, -1.0, math.inf, math.nan, 1e-320):  # 1e-320: 1/σ² overflows float64
        with pytest.raises(ValueError, match=r"^variance must be a positive finite number"):
            Gaussian(variance=bad)
    for bad in ("1", True, None, np.ones(2)):
        with pytest.raises(TypeError, match=r"^variance must be a positive finite number"):
            Gaussian(variance=bad)
    with pytest.raises(TypeError, match="positional"):
        Gaussian(0.5)  # type: ignore[misc]
    tiny = Gaussian(variance=1e-200)  # fine in float64, 1/σ² overflows float32
    assert float(tiny.metric(np.zeros(2))[0, 0]) == pytest.approx(1e200)
    with pytest.raises(
        ValueError, match=r"1/variance = 1e\+200 overflows the logits' dtype float32"
    ):
        tiny.metric(np.zeros(2, dtype=np.float32))


def test_fourth_moment_gives_the_variance_of_the_score_outer_product() -> None:
    """Var((aᵀs)²) = E(aᵀu)⁴ − (aᵀ I a)², checked by enumeration."""
    p = np.array([0.6, 0.3, 0.1])
    a = np.array([1.0, -2.0, 0.5])
    z = np.log(p)
    values = np.array([(a @ (np.eye(3)[y] - p)) ** 2 for y in range(3)])
    var = p @ values**2 - (p @ values) ** 2
    quad = a @ CAT.metric(z) @ a
    assert float(CAT.fourth_moment(z, a)) - quad**2 == pytest.approx(var, rel=1e-12)


# ------------------------------------------------------ hypothesis: invariants
def _logits(c: int, kind: str, draw) -> np.ndarray:
    if kind == "repeated":
        values = draw(st.lists(st.sampled_from([-3.0, 0.0, 0.5, 2.0]), min_size=c, max_size=c))
    elif kind == "extreme":
        values = draw(st.lists(st.floats(-700.0, 700.0, allow_nan=False), min_size=c, max_size=c))
    else:
        values = draw(st.lists(st.floats(-8.0, 8.0, allow_nan=False), min_size=c, max_size=c))
    return np.asarray(values, dtype=np.float64)


@st.composite
def logit_vectors(draw) -> np.ndarray:
    c = draw(st.integers(2, 12))
    kind = draw(st.sampled_from(["random", "repeated", "extreme"]))
    return _logits(c, kind, draw)


@settings(max_examples=60, deadline=None)
@given(logit_vectors())
def test_spectrum_invariants(z) -> None:
    p = softmax_np(z)
    ps = np.sort(p)
    eig = CAT.eigvalsh(z)
    assert eig[0] == 0.0
    assert np.all(np.diff(eig) >= 0)
    slack = 4e-16 * ps + 1e-300
    assert np.all(ps[:-1] - slack[:-1] <= eig[1:])
    assert np.all(eig[1:] <= ps[1:] + slack[1:])
    assert eig.sum() == pytest.approx(1 - np.sum(p**2), abs=1e-14)
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(dense_metric(p)), atol=1e-10, rtol=0)
    lo, hi = CAT.lambda_max_bounds(z)
    assert lo <= eig[-1] * (1 + 1e-12) + 1e-300
    assert eig[-1] <= hi * (1 + 1e-12) + 1e-300
    lam, vec = CAT.top_eigenpair(z)
    assert lam == pytest.approx(eig[-1], rel=1e-12, abs=1e-300)
    assert np.linalg.norm(vec) == pytest.approx(1.0)
    np.testing.assert_allclose(dense_metric(p) @ vec, lam * vec, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(logit_vectors(), st.sampled_from(FAMILIES))
def test_loewner_order_of_the_kernels(z, family) -> None:
    exact = family.metric(z)
    for kernel in ("upper", "scalar_upper"):
        assert min_eig(family.metric(z, kernel=kernel) - exact) >= -1e-12
    for kernel in ("lower", "scalar_lower"):
        assert min_eig(exact - family.metric(z, kernel=kernel)) >= -1e-12
    if isinstance(family, Categorical) and z.size == 2:  # the lower envelope is exact
        np.testing.assert_allclose(family.lower_kernel(z), exact, atol=1e-14)


# ------------------------------------------------------- hard spectra, big C
def test_matches_dense_at_c_200() -> None:
    rng = np.random.default_rng(8)
    for scale in (0.1, 2.0, 10.0):
        z = rng.standard_normal((2, 200)) * scale
        eig = CAT.eigvalsh(z)
        for row, pr in zip(eig, softmax_np(z), strict=True):
            np.testing.assert_allclose(row, np.linalg.eigvalsh(dense_metric(pr)), atol=1e-10)


def test_tiny_probabilities_keep_relative_accuracy(backend) -> None:
    z = backend.asarray(logits_of([1 - 2e-30, 1e-30, 1e-30]))
    eig = backend.to_numpy(CAT.eigvalsh(z))
    assert eig[0] == 0.0
    assert eig[1] == pytest.approx(1e-30, rel=1e-10)
    assert eig[2] == pytest.approx(3e-30, rel=1e-10)  # 3q(1 − 2q)
    z2 = backend.asarray(logits_of([1 - 3e-30, 1e-30, 2e-30]))
    eig2 = backend.to_numpy(CAT.eigvalsh(z2))
    # 1e-30 ≤ λ_2 ≤ 2e-30 ≤ λ_3, λ_2 λ_3 = C Π p, λ_2 + λ_3 = 1 − ‖p‖²
    assert 1e-30 <= eig2[1] <= 2e-30 <= eig2[2]
    assert eig2[1] * eig2[2] == pytest.approx(3 * 2e-60, rel=1e-10)
    assert eig2[1] + eig2[2] == pytest.approx(6e-30, rel=1e-10)


def test_ties_and_near_ties() -> None:
    z = logits_of([0.25, 0.25, 0.25, 0.125, 0.125])
    eig = CAT.eigvalsh(z)
    p = CAT.probabilities(z)  # the tied values, as computed
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(dense_metric(p)), atol=1e-15)
    assert np.sum(eig == p[0]) == 2
    assert np.sum(eig == p[3]) == 1
    near = np.array([0.0, 1e-14, -1e-14, 3.0, 3.0 + 1e-15, -2.0])
    np.testing.assert_allclose(
        CAT.eigvalsh(near), np.linalg.eigvalsh(dense_metric(softmax_np(near))), atol=1e-15
    )
    # tied top probability: λ_C = p_(C), eigenvector (e_i − e_j)/√2
    lam, vec = CAT.top_eigenpair(logits_of([0.4, 0.2, 0.4]))
    assert float(lam) == pytest.approx(0.4)
    np.testing.assert_allclose(np.abs(vec), [2**-0.5, 0.0, 2**-0.5])
    np.testing.assert_allclose(dense_metric(np.array([0.4, 0.2, 0.4])) @ vec, 0.4 * vec, atol=1e-15)


def test_extreme_logits_do_not_overflow() -> None:
    z = np.array([[1e3, -1e3, 0.0, 5.0], [-1e3, -1e3, -1e3, 1e3], [0.0, -720.0, -740.0, -30.0]])
    for family in FAMILIES:
        for kernel in KERNELS:
            assert np.all(np.isfinite(family.metric(z, kernel=kernel)))
            assert np.all(np.isfinite(family.sqrt_metric(z, kernel=kernel)))
        assert np.all(np.isfinite(family.eigvalsh(z)))
        assert np.all(np.isfinite(family.log_pseudo_determinant(z)))
        lam, vec = family.top_eigenpair(z)
        np.testing.assert_allclose(np.linalg.norm(vec, axis=-1), 1.0)
    eig = CAT.eigvalsh(z)
    for row, pr in zip(eig, softmax_np(z), strict=True):
        np.testing.assert_allclose(row, np.linalg.eigvalsh(dense_metric(pr)), atol=1e-15)
    assert float(Bernoulli().log_pseudo_determinant(np.array([1e3]))) == pytest.approx(-1e3)
    assert float(CAT.log_pseudo_determinant(np.array([1e3, -1e3]))) == pytest.approx(
        math.log(2) - 2e3
    )


def test_many_chunks_give_the_same_roots(monkeypatch) -> None:
    rng = np.random.default_rng(9)
    z = rng.standard_normal((3, 40)) * 3
    z[1, :10] = z[1, 0]  # ties in one row
    ref = CAT.eigvalsh(z)
    monkeypatch.setattr(_secular, "CHUNK_ELEMENTS", 100)
    np.testing.assert_array_equal(CAT.eigvalsh(z), ref)
    np.testing.assert_array_equal(CAT.top_eigenpair(z)[0], ref[:, -1])
    big = rng.standard_normal(300)
    monkeypatch.setattr(_secular, "CHUNK_ELEMENTS", 3000)  # ten gaps per chunk
    np.testing.assert_allclose(
        CAT.eigvalsh(big), np.linalg.eigvalsh(dense_metric(softmax_np(big))), atol=1e-12
    )


def test_c_10000_on_numpy() -> None:
    rng = np.random.default_rng(10)
    z = rng.standard_normal(10_000) * 2
    p = softmax_np(z)
    eig = CAT.eigvalsh(z)
    assert eig.shape == (10_000,)
    assert eig[0] == 0.0
    assert np.all(np.diff(eig) >= 0)
    ps = np.sort(p)
    assert np.all(ps[:-1] * (1 - 1e-15) <= eig[1:])
    assert np.all(eig[1:] <= ps[1:] * (1 + 1e-15))
    assert eig.sum() == pytest.approx(1 - np.sum(p**2), rel=1e-12)
    lo, hi = CAT.lambda_max_bounds(z)
    assert lo <= eig[-1] <= hi
    assert float(CAT.top_eigenpair(z)[0]) == pytest.approx(eig[-1], rel=1e-13)
    log_pdet = float(CAT.log_pseudo_determinant(z))
    assert np.sum(np.log(eig[1:])) == pytest.approx(log_pdet, rel=1e-12)
    assert float(CAT.pseudo_determinant(z)) == 0.0  # underflows; the log does not


# ------------------------------------------------------------------ bad input
def test_bad_logits(backend) -> None:
    z = backend.asarray(np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, np.inf]]))
    with pytest.raises(ValueError, match=r"z must be finite; got NaN and inf in rows \[1, 2\]"):
        CAT.eigvalsh(z)
    with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., C\) with at least one axis"):
        CAT.metric(backend.asarray(np.asarray(1.0)))
    with pytest.raises(TypeError, match="z must have a real floating-point dtype"):
        Bernoulli().mean(backend.asarray(np.array([1, 2]), dtype="int64"))
    with pytest.raises(ValueError, match="at least 2 classes on its last axis for Categorical"):
        CAT.metric(backend.asarray(np.zeros((4, 1))))
    assert Bernoulli().metric(backend.asarray(np.zeros((4, 1)))).shape == (4, 1, 1)


def test_bad_vectors(backend) -> None:
    z = backend.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., 3\) to match the number"):
        CAT.metric_matvec(z, backend.asarray(np.zeros((2, 4))))
    with pytest.raises(ValueError, match=r"xi must have shape \(\.\.\., 1\) to match sqrt_rank"):
        CAT.sqrt_metric_matvec(z, backend.asarray(np.zeros((2, 3))), kernel="lower")
    with pytest.raises(ValueError, match=r"a must have shape \(\.\.\., 3\)"):
        Gaussian().fourth_moment(z, backend.asarray(np.zeros(2)))
    with pytest.raises(ValueError, match="the leading axes of v must broadcast against those of z"):
        CAT.metric_matvec(z, backend.asarray(np.zeros((5, 3))))
    with pytest.raises(TypeError, match="v must have a real floating-point dtype"):
        CAT.metric_matvec(z, backend.asarray(np.zeros(3), dtype="int64"))
    with pytest.raises(ValueError, match="kernel must be one of 'exact', 'upper'"):
        CAT.metric(z, kernel="diagonal")
    with pytest.raises(ValueError, match="kernel must be one of"):
        Bernoulli().metric_matvec(z, z, kernel="Exact")


def test_mixed_namespaces_and_devices() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="z is a numpy array but v is a torch array"):
        CAT.metric_matvec(np.zeros(3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="z is a numpy array but y is a torch array"):
        CAT.log_likelihood(np.zeros(3), torch.zeros((), dtype=torch.int64))
    with pytest.raises(TypeError, match="v must be an array of an array-API library"):
        CAT.metric_matvec(np.zeros(3), [1.0, 2.0, 3.0])
    xs = pytest.importorskip("array_api_strict")
    z = xs.asarray([0.0, 1.0], device=xs.Device("CPU_DEVICE"))
    v = xs.asarray([0.0, 1.0], device=xs.Device("device1"))
    with pytest.raises(ValueError, match="v must be on the device of z"):
        CAT.metric_matvec(z, v)


def test_bad_labels(backend) -> None:
    z = backend.asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\); got values out"):
        CAT.log_likelihood(z, backend.asarray(np.array([0, 3]), dtype="int64"))
    with pytest.raises(ValueError, match=r"out of range at positions \[0\]"):
        CAT.score(z, backend.asarray(np.array([-1, 0]), dtype="int64"))
    with pytest.raises(TypeError, match="y must be an integer array of class indices"):
        CAT.check_labels(z, backend.asarray(np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"y must have shape \(2,\) to match z"):
        CAT.score(z, backend.asarray(np.array([0, 1, 2]), dtype="int64"))
    for bad in (1.5, -0.25, np.nan):  # soft targets in [0, 1] are labels, these are not
        with pytest.raises(ValueError, match=r"y must hold values in \[0, 1\] .*; got values"):
            Bernoulli().log_likelihood(z, backend.asarray(np.full((2, 3), bad)))
    with pytest.raises(TypeError, match="y must have a real floating-point dtype"):
        Bernoulli().score(z, backend.asarray(np.ones((2, 3)), dtype="int64"))
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3\)"):
        Gaussian().score(z, backend.asarray(np.ones(3)))
    with pytest.raises(ValueError, match="y must be finite"):
        Gaussian().log_likelihood(z, backend.asarray(np.array([[0.0, np.nan, 0.0]] * 2)))
    # names=: the caller's own argument names in every message.
    named = {"names": ("logits", "targets")}
    with pytest.raises(ValueError, match=r"targets must hold class indices in \[0, 3\)"):
        CAT.check_labels(z, backend.asarray(np.array([0, 3]), dtype="int64"), **named)
    with pytest.raises(TypeError, match=r"targets must be .* xp.astype\(targets, xp.int64\)"):
        CAT.check_labels(z, backend.asarray(np.array([0.0, 1.0])), **named)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\) to match logits of"):
        Bernoulli().check_labels(z, backend.asarray(np.ones(3)), **named)
    with pytest.raises(ValueError, match=r"targets must hold values in \[0, 1\]"):
        Bernoulli().check_labels(z, backend.asarray(np.full((2, 3), 1.5)), **named)
    with pytest.raises(ValueError, match="targets must be finite"):
        Gaussian().check_labels(z, backend.asarray(np.array([[0.0, np.nan, 0.0]] * 2)), **named)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 0"):
        CAT.sample(np.zeros(3), rng=0, num_samples=0)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        CAT.sample(np.zeros(3), rng="seed")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        CAT.sqrt_rank(0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        CAT.sqrt_rank(3, kernel="full")
    assert CAT.sqrt_rank(5) == 5
    assert CAT.sqrt_rank(5, kernel="lower") == 1


def test_families_are_small_stateless_values() -> None:
    assert Categorical() == Categorical()
    assert Categorical() != Bernoulli()
    assert hash(Gaussian()) == hash(Gaussian())
    assert repr(Bernoulli()) == "Bernoulli()"
    assert all(isinstance(f, Family) for f in FAMILIES)
    assert KERNELS == ("exact", "upper", "lower", "scalar_upper", "scalar_lower")
    z = np.log(np.array([0.7, 0.2, 0.1]))
    np.testing.assert_allclose(CAT.probabilities(z), [0.7, 0.2, 0.1])
    np.testing.assert_allclose(Bernoulli().probabilities(np.zeros(2)), [0.5, 0.5])


# ------------------------------------------ non-finite operands and overflow (issue 15)
@pytest.mark.parametrize("method", ["metric_matvec", "sqrt_metric_matvec", "fourth_moment"])
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_non_finite_vector_operands_are_refused(backend, family, method) -> None:
    z = backend.asarray([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0]])
    v = backend.asarray([[1.0, np.nan, 0.0], [0.0, 1.0, np.inf]])
    name = {"metric_matvec": "v", "sqrt_metric_matvec": "xi", "fourth_moment": "a"}[method]
    with pytest.raises(
        ValueError, match=rf"^{name} must be finite; got NaN and inf in rows \[0, 1\]"
    ):
        getattr(family, method)(z, v)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize(
    ("family", "call", "what"),
    [
        # −½‖y − z‖² of a float32 target 1e30 away overflows to −inf.
        (
            Gaussian(),
            lambda f: f.log_likelihood(_f32(0.5, -0.5), _f32(1e30, 0.0)),
            "log_likelihood",
        ),
        # a⁴ of a = 1e10 is 1e40 > 3.4e38.
        (Gaussian(), lambda f: f.fourth_moment(_f32(0.5, -0.5), _f32(1e10, 0.0)), "fourth_moment"),
        (
            Categorical(),
            lambda f: f.fourth_moment(_f32(0.5, -0.5), _f32(1e10, -1e10)),
            "fourth_moment",
        ),
        # log p = z − logsumexp(z) of z = ±3e38 is −6e38: −inf in float32.
        (
            Categorical(),
            lambda f: f.log_pseudo_determinant(_f32(3e38, -3e38)),
            "log_pseudo_determinant",
        ),
        # σ(1 − σ) v of v = 3e38 stays finite: no error.
        (Bernoulli(), lambda f: f.metric_matvec(_f32(0.5, -0.5), _f32(3e38, 3e38)), None),
    ],
)
def test_overflow_from_finite_inputs_is_named(family, call, what) -> None:
    """Finite float32 inputs whose result overflows: a ValueError, never a silent inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        if what is None:
            assert np.all(np.isfinite(call(family)))
            return
        match = (
            rf"^{re.escape(repr(family))}\.{what}\(.*\) must be finite; got NaN or inf .*from "
            r"finite inputs \(largest \|z\| = .*\): an intermediate overflowed float32 "
            r"\(largest finite value 3\.4e\+38\)\. Rescale the inputs, or compute in float64"
        )
        with pytest.raises(ValueError, match=match):
            call(family)


def test_overflow_check_passes_finite_results_and_traced_values() -> None:
    from fisherbound.families._checks import check_result

    z = np.array([1e30, 1.0], dtype=np.float32)
    assert check_result(z, "x", np, {"z": z}) is z
    jax = pytest.importorskip("jax")
    out = jax.jit(lambda z: Gaussian().unchecked_log_likelihood(z, z + 1e30, xp=jax.numpy))(z)
    assert not np.isfinite(float(out))  # the unchecked surface stays unchecked
