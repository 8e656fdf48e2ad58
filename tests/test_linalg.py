"""Tests of fisherbound.linalg: operators, Hutchinson / Hutch++, Lanczos, eigsh, SLQ.

Statistical checks use fixed seeds and tolerances derived from the known
variances: an estimate lies within 5 standard errors of the truth, and an
estimated variance within 5 standard errors of a sample variance of the
closed-form value, Var(s²) = μ4/M − σ⁴ (M − 3) / (M (M − 1)).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from _assertions import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound._lib import array_namespace, device_of
from fisherbound.linalg import (
    EigshResult,
    Estimate,
    LanczosResult,
    LinearOperator,
    LinearOperatorLike,
    Quadrature,
    aslinearoperator,
    eigsh,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    lanczos_quadrature,
    slq,
    smoothed_density,
)

A2 = np.array([[2.0, 1.0], [1.0, 3.0]])  # THEORY reference: trace 5, var 4 / 30


# ----------------------------------------------------------------------------- helpers


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def with_spectrum(eigenvalues: list[float] | np.ndarray, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with the given eigenvalues and random eigenvectors."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q = random_orthogonal(lam.size, seed)
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def random_symmetric(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, n))
    return (g + g.T) / 2


def variance_tolerance(mu4: float, sigma2: float, m: int) -> float:
    """Five standard errors of the unbiased sample variance of m samples."""
    var_s2 = mu4 / m - sigma2**2 * (m - 3) / (m * (m - 1))
    return 5.0 * math.sqrt(var_s2)


def counting_operator(a: np.ndarray, backend) -> tuple[LinearOperator, list[int]]:
    """A dense operator that counts the vectors it is applied to."""
    A = backend.asarray(a)
    count = [0]

    def matmat(V):
        count[0] += int(V.shape[1])
        return A @ V

    op = LinearOperator(a.shape, matmat=matmat, dtype=A.dtype, device=backend.device, xp=backend.xp)
    return op, count


def assert_on_backend(x, backend) -> None:
    """x lives in the backend's namespace and on its device."""
    xp = array_namespace(x)
    assert xp is array_namespace(backend.asarray(np.zeros(1)))
    if backend.device is not None:
        assert device_of(x) == backend.device


class FixedGenerator(np.random.Generator):
    """A Generator whose random bits are fixed (to enumerate sign vectors).

    Rademacher signs take one bit each from ``bytes``: the bits of ``fixed`` in order.
    """

    def __init__(self, fixed: np.ndarray) -> None:
        super().__init__(np.random.PCG64(0))
        self.fixed = fixed

    def bytes(self, length: int) -> bytes:  # type: ignore[override]
        packed = np.packbits(self.fixed.astype(np.uint8).ravel()).tobytes()
        assert len(packed) == length
        return packed


# ----------------------------------------------------------------------------- operators


def test_aslinearoperator_keeps_namespace_and_device(backend):
    a = random_symmetric(4, 0)[:, :3]
    A = backend.asarray(a)
    op = aslinearoperator(A)
    assert isinstance(op, LinearOperatorLike)
    assert op.shape == (4, 3)
    assert op.dtype == A.dtype
    v = backend.asarray(np.arange(3.0))
    V = backend.asarray(np.ones((3, 2)))
    Av, AV = op.matvec(v), op.matmat(V)
    assert_on_backend(Av, backend)
    assert_on_backend(AV, backend)
    assert_close(Av, a @ np.arange(3.0), rtol=1e-14, atol=0, like=backend)
    assert_close(AV, a @ np.ones((3, 2)), rtol=1e-14, atol=0, like=backend)
    assert aslinearoperator(op) is op


def test_aslinearoperator_float32_stays_float32(backend):
    A = backend.asarray(A2, dtype="float32")
    op = aslinearoperator(A)
    out = op.matvec(backend.asarray(np.ones(2), dtype="float32"))
    assert out.dtype == backend.xp.float32


def test_linear_operator_matvec_only_stacks_for_matmat():
    a = random_symmetric(3, 1)
    calls = []

    def matvec(v):
        calls.append(v.shape)
        return a @ v

    op = LinearOperator((3, 3), matvec=matvec, dtype=np.float64, device=None, xp=np)
    V = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(op.matmat(V), a @ V, rtol=1e-14)
    assert calls == [(3,), (3,)]
    assert op.matmat(np.zeros((3, 0))).shape == (3, 0)
    assert "LinearOperator(shape=(3, 3)" in repr(op)


def test_linear_operator_matmat_only_serves_matvec(backend):
    A = backend.asarray(A2)
    op = LinearOperator(
        (2, 2), matmat=lambda V: A @ V, dtype=A.dtype, device=backend.device, xp=backend.xp
    )
    out = op.matvec(backend.asarray(np.array([1.0, -1.0])))
    assert tuple(out.shape) == (2,)
    assert_close(out, [1.0, -2.0], rtol=1e-7, atol=0, like=backend)


def test_linear_operator_errors():
    with pytest.raises(TypeError, match="needs matvec or matmat"):
        LinearOperator((2, 2), dtype=np.float64, device=None, xp=np)
    with pytest.raises(TypeError, match="matvec must be callable; got int"):
        LinearOperator((2, 2), matvec=3, dtype=np.float64, device=None, xp=np)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape must be a pair \(n, m\); got \(2, 2, 2\)"):
        LinearOperator((2, 2, 2), matvec=abs, dtype=np.float64, device=None, xp=np)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape\[1\] must be a non-negative integer; got -1"):
        LinearOperator((2, -1), matvec=abs, dtype=np.float64, device=None, xp=np)
    with pytest.raises(TypeError, match=r"shape\[0\] must be a non-negative integer; got float"):
        LinearOperator((2.0, 2), matvec=abs, dtype=np.float64, device=None, xp=np)  # type: ignore[arg-type]
    op = aslinearoperator(A2)
    with pytest.raises(ValueError, match=r"v must have shape \(2,\).*got \(3,\)"):
        op.matvec(np.ones(3))
    with pytest.raises(ValueError, match=r"V must have shape \(2, k\).*got \(3, 1\)"):
        op.matmat(np.ones((3, 1)))


def test_aslinearoperator_errors(backend):
    with pytest.raises(TypeError, match="A must be a 2-D real floating array.*got builtins.list"):
        aslinearoperator([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="A must have a real floating-point dtype.*int"):
        aslinearoperator(backend.asarray(np.eye(2), dtype="int64"))
    with pytest.raises(ValueError, match=r"A must be a 2-D array.*shape \(3,\)"):
        aslinearoperator(backend.asarray(np.ones(3)))
    int_op = LinearOperator(
        (2, 2), matvec=abs, dtype=backend.xp.int64, device=backend.device, xp=backend.xp
    )
    with pytest.raises(TypeError, match="A must have a real floating-point dtype"):
        hutchinson_trace(int_op, num_probes=2)


# ------------------------------------------------------------ the round trip to SciPy
def test_to_scipy_round_trip_on_numpy() -> None:
    """eigsh and cg of SciPy on an exported operator; SciPy's algebra comes back through
    aslinearoperator; a symmetric operator has a transpose, another does not."""
    sla = pytest.importorskip("scipy.sparse.linalg")
    rng = np.random.default_rng(3)
    g = rng.standard_normal((6, 6))
    a = g @ g.T + np.eye(6)
    sym = LinearOperator(
        (6, 6),
        matvec=lambda v: a @ v,
        matmat=lambda v: a @ v,
        dtype=np.float64,
        device=None,
        xp=np,
        symmetric=True,
    )
    exported = sym.to_scipy()
    assert exported.shape == (6, 6)
    assert exported.dtype == np.float64
    top = sla.eigsh(exported, k=2, return_eigenvectors=False, tol=1e-12, v0=np.ones(6))
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(a)[-2:], rtol=1e-10)
    b = rng.standard_normal(6)
    x, info = sla.cg(exported + 0.5 * sla.aslinearoperator(np.eye(6)), b)  # residual 1e-5
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(a + 0.5 * np.eye(6), b), rtol=1e-3)
    np.testing.assert_allclose(exported.T.matvec(b), a @ b, rtol=1e-12)
    np.testing.assert_allclose(exported.matmat(np.eye(6)[:, :2]), a[:, :2], rtol=1e-12)
    back = aslinearoperator(exported @ exported)  # SciPy's algebra, back into fisherbound
    assert back.shape == (6, 6)
    np.testing.assert_allclose(back.matvec(b), a @ (a @ b), rtol=1e-12)
    est = hutchinson_trace(back, num_probes=6, rng=0)  # the same probes as on A² itself
    assert float(est.value) == pytest.approx(
        float(hutchinson_trace(a @ a, num_probes=6, rng=0).value), rel=1e-12
    )
    plain = aslinearoperator(np.arange(6.0).reshape(2, 3))  # not marked symmetric
    with pytest.raises(NotImplementedError, match="not marked symmetric=True"):
        plain.to_scipy().rmatvec(np.ones(2))
    f32 = aslinearoperator(a.astype(np.float32)).to_scipy()
    assert f32.dtype == np.float32
    assert f32.matvec(b).dtype == np.float32
    with pytest.raises(TypeError, match=r"A must be real floating .*got a SciPy LinearOperator "):
        aslinearoperator(sla.aslinearoperator(np.eye(2, dtype=complex)))
    with pytest.raises(TypeError, match=r"^symmetric must be True or False; got int\.$"):
        LinearOperator((2, 2), matvec=abs, dtype=np.float64, device=None, xp=np, symmetric=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"symmetric=True needs a square shape"):
        LinearOperator((2, 3), matvec=abs, dtype=np.float64, device=None, xp=np, symmetric=True)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_fisher_operator_to_scipy_matches_the_dense_fisher(framework: str) -> None:
    """SciPy's eigsh on a torch / JAX Fisher operator gives the dense spectrum; its
    eigenvectors come back shaped like the parameters."""
    sla = pytest.importorskip("scipy.sparse.linalg")
    pytest.importorskip(framework)
    from fisherbound.fisher import fisher_dense, fisher_operator

    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((5, 4)), rng.standard_normal((3, 5))
    x = rng.standard_normal((7, 4))
    if framework == "torch":
        import torch

        from fisherbound.adapters.torch import linearize

        model = torch.nn.Sequential(
            torch.nn.Linear(4, 5, bias=False), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False)
        ).double()
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(w1))
            model[2].weight.copy_(torch.from_numpy(w2))
        lin = linearize(model, torch.from_numpy(x))
        back = torch.from_numpy
    else:
        import jax.numpy as jnp

        from fisherbound.adapters.jax import linearize

        def apply(params, xb):
            return jnp.tanh(xb @ params["w1"].T) @ params["w2"].T

        lin = linearize(apply, {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}, jnp.asarray(x))
        back = jnp.asarray
    dense = np.asarray(fisher_dense(lin))
    exported = fisher_operator(lin).to_scipy()
    vals, vecs = sla.eigsh(exported, k=3, tol=1e-12, v0=np.ones(exported.shape[0]))
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(dense)[-3:], rtol=1e-9)
    np.testing.assert_allclose(exported.T.matvec(vecs[:, 0]), dense @ vecs[:, 0], rtol=1e-10)
    shaped = lin.unravel(back(np.ascontiguousarray(vecs.T)))
    assert [tuple(v.shape) for v in shaped.values()] == [(3, 5, 4), (3, 3, 5)]


def test_operator_with_non_2d_shape_is_rejected():
    class Odd:
        shape = (2, 2, 2)
        dtype = np.float64
        device = None
        xp = np

        def matvec(self, v):
            return v

        def matmat(self, V):
            return V

    with pytest.raises(ValueError, match=r"A must have a 2-D shape \(n, m\); got an operator"):
        aslinearoperator(Odd())


def test_non_square_inputs_are_rejected():
    rect = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"A must be square \(n × n\); got shape \(3, 4\)"):
        hutchinson_trace(rect, num_probes=2)
    op = LinearOperator((3, 4), matvec=lambda v: v[:3], dtype=np.float64, device=None, xp=np)
    for fn, kw in [
        (hutchinson_diagonal, {"num_probes": 2}),
        (hutchpp_trace, {"num_probes": 3}),
        (lanczos, {"num_matvecs": 2}),
        (eigsh, {"k": 1}),
        (lanczos_quadrature, {"num_probes": 1, "num_matvecs": 2}),
    ]:
        with pytest.raises(ValueError, match=r"A must be square.*\(3, 4\)"):
            fn(op, **kw)
    with pytest.raises(ValueError, match=r"A must be square.*\(3, 4\)"):
        slq(op, np.log, num_probes=1, num_matvecs=2)
    with pytest.raises(ValueError, match="at least one row and column"):
        hutchinson_trace(np.zeros((0, 0)), num_probes=2)


def test_argument_errors():
    a = with_spectrum([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        hutchinson_trace(a, num_probes=0)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        hutchinson_diagonal(a, num_probes=0)
    with pytest.raises(TypeError, match="num_probes must be an integer >= 1; got float"):
        hutchinson_trace(a, num_probes=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        hutchinson_trace(a, num_probes=2, batch_size=0)
    with pytest.raises(ValueError, match="distribution must be one of 'rademacher', 'gaussian'"):
        hutchinson_trace(a, num_probes=2, distribution="uniform")
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchpp_trace(a, num_probes=3, distribution="normal")
    with pytest.raises(ValueError, match="num_probes must be at least 3 for Hutch\\+\\+.*got 2"):
        hutchpp_trace(a, num_probes=2)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        hutchpp_trace(a, num_probes=0)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        hutchinson_trace(a, num_probes=2, rng="seed")
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1; got 0"):
        lanczos(a, num_matvecs=0)
    with pytest.raises(ValueError, match="k must be an integer >= 1; got 0"):
        eigsh(a, k=0)
    with pytest.raises(ValueError, match=r"k must be at most n = 3 \(the size of A\); got k = 4"):
        eigsh(a, k=4)
    with pytest.raises(ValueError, match="which must be one of 'largest', 'smallest', 'both'"):
        eigsh(a, k=1, which="middle")
    with pytest.raises(ValueError, match="num_matvecs must be at least k = 2.*got 1"):
        eigsh(a, k=2, num_matvecs=1)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1; got 0"):
        eigsh(a, k=1, num_matvecs=0)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        lanczos_quadrature(a, num_probes=0, num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1; got 0"):
        slq(a, np.log, num_probes=2, num_matvecs=0)


def test_v0_errors(backend):
    A = backend.asarray(with_spectrum([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"v0 must have shape \(3,\) to match A.*got \(2,\)"):
        lanczos(A, num_matvecs=2, v0=backend.asarray(np.ones(2)))
    with pytest.raises(ValueError, match="v0 must be a nonzero finite vector; got norm 0.0"):
        lanczos(A, num_matvecs=2, v0=backend.asarray(np.zeros(3)))
    with pytest.raises(TypeError, match="v0 must have a real floating-point dtype"):
        lanczos(A, num_matvecs=2, v0=backend.asarray(np.ones(3), dtype="int64"))


def test_v0_from_another_library_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="A is a numpy array but v0 is a torch array"):
        lanczos(A2, num_matvecs=2, v0=torch.ones(2, dtype=torch.float64))


def test_slq_and_density_errors():
    a = with_spectrum([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="function must be callable.*got float"):
        slq(a, 3.0, num_probes=2, num_matvecs=2)
    with pytest.raises(
        ValueError, match=r"function must return an array of the shape of its input \(2, 2\)"
    ):
        slq(a, lambda t: np.sum(t), num_probes=2, num_matvecs=2)
    quad = lanczos_quadrature(a, num_probes=2, num_matvecs=2, rng=0)
    grid = np.linspace(0.0, 4.0, 5)
    with pytest.raises(TypeError, match="quadrature must be a Quadrature.*got ndarray"):
        smoothed_density(grid, grid, width=0.1)
    with pytest.raises(ValueError, match="width must be a positive finite number.*got 0.0"):
        smoothed_density(quad, grid, width=0.0)
    with pytest.raises(TypeError, match="width must be a positive real number; got str"):
        smoothed_density(quad, grid, width="wide")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grid must be a 1-D array of points; got shape \(5, 1\)"):
        smoothed_density(quad, grid[:, None], width=0.1)
    with pytest.raises(ValueError, match="must have the same shape; got"):
        smoothed_density(Quadrature(quad.nodes, quad.weights[:, :1]), grid, width=0.1)
    with pytest.raises(TypeError, match="grid must have a real floating-point dtype"):
        smoothed_density(quad, np.arange(3), width=0.1)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="quadrature.nodes is a numpy array but grid is a torch"):
        smoothed_density(quad, torch.linspace(0.0, 1.0, 3), width=0.1)


def test_importing_linalg_imports_no_framework():
    code = (
        "import sys, fisherbound.linalg\n"
        "bad = [m for m in ('torch', 'jax', 'cupy', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- Hutchinson


def test_hutchinson_enumeration_of_all_sign_vectors_is_exact():
    # Rows are the 4 sign vectors (0 -> -1, 1 -> +1): mean 5, population variance 4.
    signs = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=np.int8)
    est = hutchinson_trace(A2, num_probes=4, rng=FixedGenerator(signs))
    assert float(est.value) == 5.0
    population_variance = float(est.std_error) ** 2 * 4 * (4 - 1) / 4
    assert population_variance == pytest.approx(4.0, rel=1e-14)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_reference_values(backend, distribution):
    """THEORY: tr A = 5, Var(vᵀAv) = 4 (Rademacher) and 30 (Gaussian)."""
    M = 20_000
    est = hutchinson_trace(backend.asarray(A2), num_probes=M, distribution=distribution, rng=7)
    assert isinstance(est, Estimate)
    assert est.num_probes == M
    assert tuple(est.value.shape) == ()
    assert tuple(est.std_error.shape) == ()
    assert_on_backend(est.value, backend)
    value, se = float(est.value), float(est.std_error)
    assert abs(value - 5.0) <= 5 * se
    lam = np.linalg.eigvalsh(A2)
    if distribution == "rademacher":
        sigma2 = 2 * (np.sum(A2**2) - np.sum(np.diag(A2) ** 2))  # 4
        mu4 = sigma2**2  # the centred samples are ±2: a two-point distribution
    else:
        sigma2 = 2 * np.sum(A2**2)  # 30
        k2, k4 = 2 * np.sum(lam**2), 48 * np.sum(lam**4)  # cumulants of Σ λ z²
        mu4 = k4 + 3 * k2**2
    assert sigma2 == {"rademacher": 4.0, "gaussian": 30.0}[distribution]
    assert abs(se**2 * M - sigma2) <= variance_tolerance(mu4, sigma2, M)


def test_hutchinson_same_seed_same_value_on_every_backend(backend):
    a = random_symmetric(6, 3)
    ref = hutchinson_trace(a, num_probes=5, rng=11)
    est = hutchinson_trace(backend.asarray(a), num_probes=5, rng=11)
    assert abs(float(est.value) - float(ref.value)) <= 1e-12
    assert abs(float(est.std_error) - float(ref.std_error)) <= 1e-12
    ref_d = hutchinson_diagonal(a, num_probes=5, rng=11, distribution="gaussian")
    est_d = hutchinson_diagonal(backend.asarray(a), num_probes=5, rng=11, distribution="gaussian")
    assert_close(est_d.value, ref_d.value, rtol=1e-7, atol=1e-12, like=backend)


def test_hutchinson_rademacher_is_exact_for_a_diagonal_matrix(backend):
    d = np.array([3.0, -1.0, 4.0, 1.0, -5.0, 9.0])
    A = backend.asarray(np.diag(d))
    tr = hutchinson_trace(A, num_probes=7, rng=0, batch_size=3)
    assert float(tr.value) == d.sum()
    assert float(tr.std_error) == 0.0
    diag = hutchinson_diagonal(A, num_probes=7, rng=0, batch_size=2)
    assert_on_backend(diag.value, backend)
    assert_close(diag.value, d, rtol=0, atol=0, like=backend)
    assert_close(diag.std_error, np.zeros(6), rtol=0, atol=0, like=backend)


def test_hutchinson_single_probe_has_nan_std_error(backend):
    est = hutchinson_trace(backend.asarray(A2), num_probes=1, rng=0)
    assert math.isnan(float(est.std_error))
    assert float(est.value) in (3.0, 7.0)
    diag = hutchinson_diagonal(backend.asarray(A2), num_probes=1, rng=0)
    assert np.all(np.isnan(backend.to_numpy(diag.std_error)))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_diagonal_unbiased_with_closed_form_variance(cpu_backend, distribution):
    a = random_symmetric(5, 2)
    M = 6000
    est = hutchinson_diagonal(
        cpu_backend.asarray(a), num_probes=M, distribution=distribution, rng=3, batch_size=1000
    )
    value = cpu_backend.to_numpy(est.value)
    se = cpu_backend.to_numpy(est.std_error)
    assert value.shape == (5,)
    assert se.shape == (5,)
    assert np.all(np.abs(value - np.diag(a)) <= 5 * se)
    for i in range(5):
        off = np.sum(np.delete(a[i], i) ** 2)
        aii = a[i, i]
        if distribution == "rademacher":
            # v_i (Av)_i − a_ii = Σ_{j≠i} a_ij ε_j with independent signs ε_j.
            sigma2 = off
            mu4 = 3 * off**2 - 2 * np.sum(np.delete(a[i], i) ** 4)
        else:
            # a_ii u² + u w with u ~ N(0, 1), w ~ N(0, off): moments by hand.
            sigma2 = aii**2 + np.sum(a[i] ** 2)
            mu4 = 60 * aii**4 + 60 * aii**2 * off + 9 * off**2
        assert abs(se[i] ** 2 * M - sigma2) <= variance_tolerance(mu4, sigma2, M)


def test_hutchinson_batches_cover_every_probe_once(cpu_backend):
    op, count = counting_operator(random_symmetric(4, 5), cpu_backend)
    est = hutchinson_trace(op, num_probes=10, rng=0, batch_size=4, distribution="gaussian")
    assert count[0] == 10
    assert est.num_probes == 10
    # Gaussian streams do not depend on how they are split into batches.
    whole = hutchinson_trace(op, num_probes=10, rng=0, distribution="gaussian")
    assert abs(float(whole.value) - float(est.value)) <= 1e-12
    assert abs(float(whole.std_error) - float(est.std_error)) <= 1e-12


def test_hutchinson_float32_in_float32_out(backend):
    A = backend.asarray(A2, dtype="float32")
    assert hutchinson_trace(A, num_probes=3, rng=0).value.dtype == backend.xp.float32
    d = hutchinson_diagonal(A, num_probes=3, rng=0)
    assert d.value.dtype == backend.xp.float32
    assert d.std_error.dtype == backend.xp.float32
    assert hutchpp_trace(A, num_probes=3, rng=0).value.dtype == backend.xp.float32


def test_hutchinson_accepts_a_matrix_free_operator():
    a = random_symmetric(8, 9)
    op = LinearOperator((8, 8), matvec=lambda v: a @ v, dtype=np.float64, device=None, xp=np)
    est = hutchinson_trace(op, num_probes=4000, rng=1)
    assert abs(float(est.value) - np.trace(a)) <= 5 * float(est.std_error)


# ----------------------------------------------------------------------------- Hutch++


def test_hutchpp_is_exact_for_low_rank(backend):
    rng = np.random.default_rng(4)
    u = rng.standard_normal((20, 3))
    a = u @ np.diag([5.0, -2.0, 1.0]) @ u.T
    op, count = counting_operator(a, backend)
    est = hutchpp_trace(op, num_probes=10, rng=2)  # s = 3 >= rank
    assert count[0] == 10
    assert est.num_probes == 10
    assert_on_backend(est.value, backend)
    scale = np.linalg.norm(a)
    assert abs(float(est.value) - np.trace(a)) <= 1e-10 * scale
    assert float(est.std_error) <= 1e-10 * scale


def test_hutchpp_is_unbiased_within_five_standard_errors(cpu_backend):
    lam = 10.0 / (1.0 + np.arange(40)) ** 1.5 + np.linspace(-0.5, 0.5, 40)
    a = with_spectrum(lam, seed=3)
    est = hutchpp_trace(cpu_backend.asarray(a), num_probes=31, distribution="gaussian", rng=5)
    se = float(est.std_error)
    assert se > 0
    assert abs(float(est.value) - lam.sum()) <= 5 * se
    # The deflation removes the top of the spectrum: the residual error is far below
    # plain Hutchinson's with the same budget.
    plain_se = math.sqrt(2 * np.sum(a**2) / 31)
    assert se < plain_se / 2


def test_hutchpp_three_probes_has_nan_std_error():
    est = hutchpp_trace(with_spectrum([1.0, 2.0, 3.0, 4.0]), num_probes=3, rng=0)
    assert math.isnan(float(est.std_error))
    assert math.isfinite(float(est.value))


# ----------------------------------------------------------------------------- Lanczos


def tridiagonal(res: LanczosResult, backend) -> np.ndarray:
    alpha, beta = backend.to_numpy(res.alpha), backend.to_numpy(res.beta)
    return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


def test_lanczos_basis_is_orthonormal_and_tridiagonalises(backend):
    a = random_symmetric(20, 6)
    op, count = counting_operator(a, backend)
    res = lanczos(op, num_matvecs=12, rng=1)
    assert isinstance(res, LanczosResult)
    assert count[0] == 12
    assert tuple(res.alpha.shape) == (12,)
    assert tuple(res.beta.shape) == (11,)
    assert tuple(res.basis.shape) == (20, 12)
    assert_on_backend(res.basis, backend)
    Q = backend.to_numpy(res.basis)
    np.testing.assert_allclose(Q.T @ Q, np.eye(12), atol=1e-12)
    np.testing.assert_allclose(
        Q.T @ a @ Q, tridiagonal(res, backend), atol=1e-12 * np.linalg.norm(a)
    )


def test_lanczos_starts_from_v0(backend):
    a = random_symmetric(6, 2)
    v0 = np.arange(1.0, 7.0)
    res = lanczos(backend.asarray(a), num_matvecs=3, v0=backend.asarray(v0))
    np.testing.assert_allclose(
        backend.to_numpy(res.basis)[:, 0], v0 / np.linalg.norm(v0), rtol=1e-14
    )
    assert float(res.alpha[0]) == pytest.approx(v0 @ a @ v0 / (v0 @ v0), rel=1e-13)
    # num_matvecs beyond n is capped at n; a float32 v0 is cast to A's dtype.
    full = lanczos(backend.asarray(a), num_matvecs=50, v0=backend.asarray(v0, dtype="float32"))
    assert tuple(full.basis.shape) == (6, 6)
    assert full.basis.dtype == backend.xp.float64


def test_lanczos_breakdown_restarts_and_records_zero_beta(backend):
    # Three distinct eigenvalues: the Krylov space of any start vector has dimension 3.
    a = with_spectrum([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], seed=1)
    res = lanczos(backend.asarray(a), num_matvecs=6, rng=0)
    beta = backend.to_numpy(res.beta)
    assert beta[2] == 0.0
    assert np.all(np.delete(beta, 2) > 1e-8)  # the restarted block is a full Krylov space
    Q = backend.to_numpy(res.basis)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)
    T = tridiagonal(res, backend)
    np.testing.assert_allclose(Q.T @ a @ Q, T, atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), [1, 1, 2, 2, 3, 3], atol=1e-12)


def test_lanczos_of_zero_matrix_restarts_every_step(backend):
    res = lanczos(backend.asarray(np.zeros((6, 6))), num_matvecs=6, rng=0)
    assert_close(res.beta, np.zeros(5), rtol=0, atol=0, like=backend)
    Q = backend.to_numpy(res.basis)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)


def test_lanczos_float32(backend):
    a = random_symmetric(6, 8)
    res = lanczos(backend.asarray(a, dtype="float32"), num_matvecs=6, rng=0)
    assert res.alpha.dtype == backend.xp.float32
    assert res.basis.dtype == backend.xp.float32
    Q = backend.to_numpy(res.basis).astype(np.float64)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-5)


# ----------------------------------------------------------------------------- eigsh

SPECTRUM = np.array([10.0, 10.0, 10.0, 7.0, 6.0, 5.5, 5.0] + list(np.linspace(-3.0, 4.0, 23)))


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_eigsh_matches_dense_eigh_with_multiplicity(backend, which):
    a = with_spectrum(SPECTRUM, seed=2)
    n, k = a.shape[0], 4
    res = eigsh(backend.asarray(a), k=k, which=which, basis_size=n, rng=0)
    assert isinstance(res, EigshResult)
    dense = np.linalg.eigvalsh(a)
    expect = {
        "largest": dense[-k:],
        "smallest": dense[:k],
        "both": np.concatenate([dense[:k], dense[-k:]]),
    }[which]
    theta = backend.to_numpy(res.eigenvalues)
    np.testing.assert_allclose(theta, expect, atol=1e-8)
    if which == "largest":
        np.testing.assert_allclose(theta[1:], [10.0, 10.0, 10.0], atol=1e-8)
    Y = backend.to_numpy(res.eigenvectors)
    assert Y.shape == (n, expect.size)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=0), 1.0, atol=1e-12)
    resid = backend.to_numpy(res.residuals)
    np.testing.assert_allclose(resid, np.linalg.norm(a @ Y - Y * theta, axis=0), atol=1e-10)
    assert np.all(resid < 1e-8)
    assert_on_backend(res.eigenvectors, backend)


def test_eigsh_both_returns_every_eigenvalue_once_when_2k_exceeds_n(backend):
    a = with_spectrum([4.0, -1.0, 2.0, 2.0, 0.5, 7.0], seed=5)
    res = eigsh(backend.asarray(a), k=3, which="both", rng=1)
    assert_close(
        res.eigenvalues, [-1.0, 0.5, 2.0, 2.0, 4.0, 7.0], rtol=1e-7, atol=1e-10, like=backend
    )
    Y = backend.to_numpy(res.eigenvectors)
    np.testing.assert_allclose(Y.T @ Y, np.eye(6), atol=1e-10)


def test_eigsh_rank_deficient_psd(cpu_backend):
    rng = np.random.default_rng(3)
    g = rng.standard_normal((30, 6))
    a = g @ g.T  # PSD, rank 6: 24 zero eigenvalues
    dense = np.linalg.eigvalsh(a)
    small = eigsh(cpu_backend.asarray(a), k=5, which="smallest", num_matvecs=30, rng=0)
    assert_close(small.eigenvalues, np.zeros(5), rtol=1e-7, atol=1e-8, like=cpu_backend)
    assert np.all(cpu_backend.to_numpy(small.residuals) < 1e-8)
    large = eigsh(cpu_backend.asarray(a), k=6, rng=0)  # default num_matvecs = 30 = n
    assert_close(large.eigenvalues, dense[-6:], rtol=1e-7, atol=1e-8, like=cpu_backend)


def test_eigsh_default_budget_finds_separated_top_and_repeated_values(cpu_backend):
    # n = 100 > default m = 60: Lanczos must converge rather than exhaust the space.
    bulk = np.linspace(0.0, 1.0, 97)
    a = with_spectrum(np.concatenate([[50.0, 40.0, 30.0], bulk]), seed=7)
    res = eigsh(cpu_backend.asarray(a), k=3, rng=0)
    assert_close(res.eigenvalues, [30.0, 40.0, 50.0], rtol=1e-7, atol=1e-8, like=cpu_backend)
    assert np.all(cpu_backend.to_numpy(res.residuals) < 1e-6)
    # Few distinct eigenvalues: breakdowns and restarts find the multiplicities.
    b = with_spectrum([5.0] * 4 + [3.0] * 4 + [1.0] * 92, seed=8)
    res = eigsh(cpu_backend.asarray(b), k=5, rng=0)
    assert_close(res.eigenvalues, [3.0] + [5.0] * 4, rtol=1e-7, atol=1e-8, like=cpu_backend)


def test_eigsh_float32(backend):
    a = with_spectrum([1.0, 2.0, 3.0, 4.0, 8.0, 9.0], seed=1)
    res = eigsh(backend.asarray(a, dtype="float32"), k=2, rng=0)
    assert res.eigenvalues.dtype == backend.xp.float32
    assert res.eigenvectors.dtype == backend.xp.float32
    assert_close(
        res.eigenvalues, [8.0, 9.0], rtol=1e-7, atol=1e-4, like=backend, dtype=backend.xp.float32
    )


def _counting(a: np.ndarray) -> tuple[LinearOperator, list[int]]:
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return a @ v

    return LinearOperator(a.shape, matvec=matvec, dtype=a.dtype, device=None, xp=np), count


@pytest.mark.parametrize(
    ("spectrum", "which", "k"),
    [
        ("decay", "largest", 1),
        ("decay", "largest", 5),
        ("decay", "largest", 20),
        ("lowrank", "largest", 5),
        ("signed", "smallest", 5),
        ("signed", "both", 5),
    ],
)
def test_eigsh_restarted_to_tolerance_needs_no_more_products_than_arpack(spectrum, which, k):
    sla = pytest.importorskip("scipy.sparse.linalg")
    n = 400
    lam = {
        "decay": 100.0 * 0.9 ** np.arange(n),
        "lowrank": np.r_[np.random.default_rng(1).uniform(1.0, 10.0, 50), np.zeros(n - 50)],
        "signed": np.linspace(-1.0, 1.0, n) ** 3,
    }[spectrum]
    a = with_spectrum(lam, seed=0)
    op, ours = _counting(a)
    res = eigsh(op, k=k, which=which, tol=1e-6, rng=0)
    ref, theirs = _counting(a)
    scipy_op = sla.LinearOperator((n, n), matvec=ref.matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    kk, code = (2 * k, "BE") if which == "both" else (k, {"largest": "LA", "smallest": "SA"}[which])
    sla.eigsh(scipy_op, k=kk, which=code, tol=1e-6, v0=v0, return_eigenvectors=False)
    assert ours[0] <= theirs[0]
    dense = np.linalg.eigvalsh(a)
    want = {"largest": dense[-k:], "smallest": dense[:k], "both": np.r_[dense[:k], dense[-k:]]}
    # A relative residual r bounds the eigenvalue error by r |θ| (and by r²|θ|/gap).
    np.testing.assert_allclose(res.eigenvalues, want[which], rtol=1e-6, atol=1e-9)
    theta = res.eigenvalues
    explicit = np.linalg.norm(a @ res.eigenvectors - res.eigenvectors * theta, axis=0)
    np.testing.assert_allclose(res.residuals, explicit, atol=1e-10 * np.abs(dense).max())
    assert np.all(explicit <= 1e-6 * np.maximum(np.abs(theta), 1e-8 * np.abs(dense).max()) + 1e-10)


class _Recorded:
    """Records every ``_Krylov`` a call builds, and after each step the actual largest
    |q_iᵀ q_k| of its rows and q next to the estimate ``omega``/``omega_q`` it keeps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fisherbound.linalg import _krylov

        self.runs: list[object] = []
        self.levels: list[tuple[float, float, bool]] = []
        init, step = _krylov._Krylov.__init__, _krylov._Krylov.step
        recorded = self

        def recording_init(kry, *args, **kwargs):
            init(kry, *args, **kwargs)
            recorded.runs.append(kry)

        def recording_step(kry):
            partial = kry.partial
            step(kry)
            j = kry.j
            if not partial or kry.q is None:
                return
            V = np.vstack([kry.V[:j], kry.q[None, :]])
            actual = np.abs(V @ V.T - np.eye(j + 1)).max()
            estimated = max(
                np.abs(kry.omega[:j, :j] - np.eye(j)).max(), np.abs(kry.omega_q[:j]).max()
            )
            recorded.levels.append((actual, estimated, kry.full_next))

        monkeypatch.setattr(_krylov._Krylov, "__init__", recording_init)
        monkeypatch.setattr(_krylov._Krylov, "step", recording_step)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spectrum", ["slow", "signed"])
def test_eigsh_partial_reorthogonalisation_keeps_the_basis_semi_orthogonal(
    monkeypatch, dtype, spectrum
):
    """Between full passes a step orthogonalises against two rows; Simon's recurrence
    must bound the actual loss of orthogonality, which stays below √ε, and many steps
    of a run before its first restart skip the full pass."""
    lam = {"slow": 100.0 * 0.99 ** np.arange(400), "signed": np.linspace(-1, 1, 400) ** 3}
    a = with_spectrum(lam[spectrum], seed=0).astype(dtype)
    rec = _Recorded(monkeypatch)
    res = eigsh(a, k=1, basis_size=100, rng=0)
    (kry,) = rec.runs
    eps = float(np.finfo(dtype).eps)
    assert kry.products < 100  # no restart: partial all along
    # η = min(√ε, tol / 100): 1.5e-8 in float64 (reached late), 3.5e-6 in float32.
    assert kry.full_steps <= kry.products // (4 if dtype == np.float64 else 1.5)
    actual = np.array([r[0] for r in rec.levels])
    estimated = np.array([r[1] for r in rec.levels])
    assert actual.max() <= math.sqrt(eps)
    # The estimate is an upper bound of the actual level, up to rounding.
    assert np.all(actual <= 10.0 * estimated + 10.0 * eps)
    # Kato–Temple: |θ − λ₁| ≤ r² / gap, r the residual (of the float64 matrix: + rounding).
    dense = np.linalg.eigvalsh(a.astype(np.float64))
    eps *= float(np.abs(dense).max()) / dense[-1]  # rounding relative to ‖A‖
    y, theta = res.eigenvectors[:, 0], float(res.eigenvalues[0])
    r = float(np.linalg.norm(a @ y - y * theta))
    gap = dense[-1] - dense[-2]
    assert abs(theta - dense[-1]) <= r**2 / gap + 100 * eps * dense[-1]


@pytest.mark.parametrize(
    ("spectrum", "basis_size", "tol"),
    [("slow", 150, None), ("decay", 150, None), ("slow", 8, None), ("decay", 6, 1e-10)],
)
def test_eigsh_partial_reorthogonalisation_reports_an_upper_bound_of_the_residual(
    monkeypatch, spectrum, basis_size, tol
):
    """With partial reorthogonalisation, and after a restart that folded D into ``lost``,
    the returned residual bounds ‖A y − θ y‖ up to rounding (D = H − T of every partial
    and reorthogonalised step), and exceeds it by little beside tol."""
    lam = {"slow": 100.0 * 0.99 ** np.arange(400), "decay": 100.0 * 0.9 ** np.arange(400)}
    a = with_spectrum(lam[spectrum], seed=0)
    rec = _Recorded(monkeypatch)
    res = eigsh(a, k=1, basis_size=basis_size, tol=tol, rng=0)
    (kry,) = rec.runs
    assert kry.tracked
    assert (kry.products > basis_size) == (basis_size < 20)  # restarted where p is small
    y, theta = res.eigenvectors[:, 0], float(res.eigenvalues[0])
    explicit = float(np.linalg.norm(a @ y - y * theta))
    reported = float(res.residuals[0])
    assert explicit <= reported + 1e-14 * 100.0
    assert reported <= explicit + 0.05 * (tol or 1e-6) * theta
    np.testing.assert_allclose(theta, 100.0, rtol=(tol or 1e-6) ** 2 * 100 + 1e-14)


@pytest.mark.parametrize("spectrum", ["slow", "signed"])
def test_partial_steps_keep_the_krylov_relation_with_d(spectrum):
    """A Q = Q (T + D) + β q eᵀ to rounding along a partially reorthogonalised run, the
    reorthogonalised steps included: D = H − T holds what the symmetric T leaves out."""
    from fisherbound._lib import as_generator
    from fisherbound.linalg._krylov import _Krylov
    from fisherbound.linalg._lanczos import _start_vector

    lam = {"slow": 100.0 * 0.99 ** np.arange(400), "signed": np.linspace(-1, 1, 400) ** 3}
    a = with_spectrum(lam[spectrum], seed=0)
    op = LinearOperator(a.shape, matvec=lambda v: a @ v, dtype=a.dtype, device=None, xp=np)
    gen = as_generator(0)
    kry = _Krylov(np, op, _start_vector(np, op, None, gen), 150, gen, tol=1e-6, top_pair=True)
    for _ in range(120):
        kry.step()
    assert kry.partial
    assert 1 < kry.full_steps < kry.products  # partial steps and full passes both
    j, Q = kry.j, kry.V[: kry.j]
    R = a @ Q.T / kry.scale - Q.T @ (kry.T[:j, :j] + kry.D[:j, :j])
    R[:, -1] -= kry.beta * kry.q
    levels = np.abs(Q @ Q.T - np.eye(j)).max()
    assert levels > 1e-12  # the basis is only semi-orthogonal: D matters
    scale = np.abs(lam[spectrum]).max() / kry.scale
    assert np.linalg.norm(R, axis=0).max() <= 1e-13 * scale


@pytest.mark.parametrize("lost", ["kept", "q"])
def test_first_restart_repairs_what_lost_semi_orthogonality(lost):
    """At the first restart, kept vectors whose estimated levels Sᵀ Ω S exceed η are
    orthonormalised (QR, directions kept), and q is orthogonalised against them where
    its levels ω_q S do; from there every step is full and the run still converges."""
    from fisherbound._lib import as_generator
    from fisherbound.linalg._krylov import _Krylov
    from fisherbound.linalg._lanczos import _ranking, _start_vector

    a = with_spectrum(100.0 * 0.9 ** np.arange(200), seed=3)
    op = LinearOperator(a.shape, matvec=lambda v: a @ v, dtype=a.dtype, device=None, xp=np)
    gen = as_generator(0)
    kry = _Krylov(np, op, _start_vector(np, op, None, gen), 20, gen, tol=1e-6, top_pair=True)
    while kry.j < kry.p:
        kry.step()
    assert kry.partial
    # Pretend the recurrence had found more loss than it did.
    if lost == "kept":
        kry.omega[:20, :20] += 1e-3 * (1.0 - np.eye(20))
    else:
        kry.omega_q[:20] = 1e-3
    # Make the kept rows and q visibly non-orthogonal, as such a loss would.
    kry.V[1] += 1e-4 * kry.V[0]
    kry.q = kry.q + 1e-4 * kry.V[0]
    theta, S, _ = kry.ritz()
    before = S[:, _ranking(theta, "largest")[:10]].T @ kry.V[:20]  # the kept vectors
    kry.thick_restart(S, theta, _ranking(theta, "largest"), 1)
    l = kry.j
    Y = kry.V[:l]
    if lost == "kept":
        np.testing.assert_allclose(Y @ Y.T, np.eye(l), atol=1e-13)
        cos = np.sum(Y * before[:l], axis=1) / np.linalg.norm(before[:l], axis=1)
        assert np.all(cos > 0.999)  # the same directions, the same signs
    assert np.abs(Y @ kry.q).max() < 1e-13
    assert not kry.partial
    while kry.products < 200:
        kry.step()
        if kry.j == kry.p:
            theta, S, _ = kry.ritz()
            kry.thick_restart(S, theta, _ranking(theta, "largest"), 1)
    # The injected 1e-4 broke the Krylov relation by 1e-4 ‖A‖: the top eigenvalue is then
    # right to about (1e-4)² ‖A‖ (second order), not to rounding.
    theta, _, _ = kry.ritz()
    assert abs(float(theta.max()) - 100.0) < 1e-5


def test_eigsh_reorthogonalises_fully_for_the_exact_spectrum_and_tol_0(monkeypatch):
    """p = n (the exact spectrum with multiplicities) and tol = 0 take the whole basis
    at every step, as do JAX arrays (one shape per step)."""
    a = with_spectrum(SPECTRUM, seed=2)
    rec = _Recorded(monkeypatch)
    eigsh(a, k=4, basis_size=a.shape[0], rng=0)
    eigsh(a, k=4, tol=0.0, num_matvecs=25, rng=0)
    for kry in rec.runs:
        assert not kry.tracked
        assert kry.full_steps == kry.products


def test_eigsh_warns_at_its_budget_and_returns_the_current_pairs():
    a = with_spectrum(np.linspace(0.0, 1.0, 200) ** 2, seed=4)  # clustered top: slow
    op, count = _counting(a)
    with pytest.warns(RuntimeWarning, match=r"eigsh stopped at its budget num_matvecs = 25"):
        res = eigsh(op, k=3, num_matvecs=25, rng=0)
    assert count[0] == 25
    assert res.eigenvalues.shape == (3,)
    assert np.all(res.residuals > 0.0)


def test_eigsh_option_errors():
    a = with_spectrum(np.arange(1.0, 31.0), seed=0)
    with pytest.raises(ValueError, match=r"basis_size must be between k \+ 1 = 4 .* n = 30; got 3"):
        eigsh(a, k=3, basis_size=3)
    with pytest.raises(ValueError, match=r"basis_size must be between 2k \+ 1 = 5 .* got 31"):
        eigsh(a, k=2, which="both", basis_size=31)
    with pytest.raises(ValueError, match=r"tol must be a finite real number >= 0; got -1"):
        eigsh(a, k=1, tol=-1.0)
    with pytest.raises(ValueError, match=r"tol must be a finite real number >= 0; got nan"):
        eigsh(a, k=1, tol=float("nan"))


# ----------------------------------------------------------------------------- SLQ


def test_quadrature_weights_sum_to_n(backend):
    a = random_symmetric(8, 4)
    op, count = counting_operator(a, backend)
    quad = lanczos_quadrature(op, num_probes=4, num_matvecs=8, rng=0)
    assert isinstance(quad, Quadrature)
    assert count[0] == 32
    assert tuple(quad.nodes.shape) == (4, 8)
    assert tuple(quad.weights.shape) == (4, 8)
    assert_on_backend(quad.weights, backend)
    w = backend.to_numpy(quad.weights)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 8.0, rtol=1e-12)
    nodes = backend.to_numpy(quad.nodes)
    lam = np.linalg.eigvalsh(a)
    assert np.all(nodes >= lam[0] - 1e-10)
    assert np.all(nodes <= lam[-1] + 1e-10)


def test_slq_identity_equals_hutchinson_on_the_same_probes(backend):
    a = random_symmetric(8, 1)
    A = backend.asarray(a)
    est = slq(A, lambda t: t, num_probes=4, num_matvecs=3, rng=4)
    ref = hutchinson_trace(A, num_probes=4, rng=4)
    assert abs(float(est.value) - float(ref.value)) <= 1e-10
    assert abs(float(est.std_error) - float(ref.std_error)) <= 1e-10
    assert_on_backend(est.value, backend)


def test_slq_is_exact_per_probe_when_num_matvecs_is_n(backend):
    a = random_symmetric(8, 2) / 2
    lam, U = np.linalg.eigh(a)
    exp_a = (U * np.exp(lam)) @ U.T
    xp = backend.xp
    est = slq(backend.asarray(a), xp.exp, num_probes=4, num_matvecs=8, rng=9)
    # The same seed gives the same Rademacher probes to Hutchinson on exp(A).
    ref = hutchinson_trace(exp_a, num_probes=4, rng=9)
    assert abs(float(est.value) - float(ref.value)) <= 1e-10
    assert abs(float(est.std_error) - float(ref.std_error)) <= 1e-10


def test_slq_log_det_within_five_standard_errors(cpu_backend):
    lam = np.linspace(0.5, 4.0, 24)
    a = with_spectrum(lam, seed=6)
    xp = cpu_backend.xp
    est = slq(cpu_backend.asarray(a), xp.log, num_probes=30, num_matvecs=10, rng=3)
    assert est.num_probes == 30
    assert abs(float(est.value) - np.sum(np.log(lam))) <= 5 * float(est.std_error)


def test_slq_float32(backend):
    lam = np.arange(1.0, 9.0)
    a = with_spectrum(lam, seed=0)
    xp = backend.xp
    est = slq(backend.asarray(a, dtype="float32"), xp.log1p, num_probes=4, num_matvecs=8, rng=0)
    assert est.value.dtype == backend.xp.float32
    assert abs(float(est.value) - np.sum(np.log1p(lam))) <= 5 * float(est.std_error) + 1e-4


def test_quadrature_after_breakdown_gives_zero_weight_to_restarted_nodes(backend):
    # Eigenvectors (1, 1)/√2 (eigenvalue 1) and (1, −1)/√2 (eigenvalue 3): a
    # Rademacher probe is an eigenvector, so Lanczos breaks down after one step
    # and the restarted node is the other eigenvalue, with zero weight.
    a = np.array([[2.0, -1.0], [-1.0, 2.0]])
    quad = lanczos_quadrature(backend.asarray(a), num_probes=4, num_matvecs=2, rng=0)
    nodes, w = backend.to_numpy(quad.nodes), backend.to_numpy(quad.weights)
    np.testing.assert_allclose(nodes, np.tile([1.0, 3.0], (4, 1)), atol=1e-12)
    assert np.all((np.abs(w) < 1e-12) | (np.abs(w - 2.0) < 1e-12))
    np.testing.assert_allclose(w.sum(axis=1), 2.0, rtol=1e-12)
    assert 0 < np.sum(np.abs(w[:, 0] - 2.0) < 1e-12) < 4  # both kinds of probe occur


def test_quadrature_weights_group_by_eigenvalue_for_repeated_spectrum(backend):
    # For A = diag(d) the weight of the node λ is Σ_{i: d_i = λ} v_i² = #{i: d_i = λ}.
    d = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0, 2.0])
    quad = lanczos_quadrature(backend.asarray(np.diag(d)), num_probes=4, num_matvecs=8, rng=1)
    nodes, w = backend.to_numpy(quad.nodes), backend.to_numpy(quad.weights)
    for row in range(4):
        near_one = np.abs(nodes[row] - 1.0) < 1e-10
        near_two = np.abs(nodes[row] - 2.0) < 1e-10
        assert np.all(near_one | near_two)
        assert w[row, near_one].sum() == pytest.approx(5.0, abs=1e-10)
        assert w[row, near_two].sum() == pytest.approx(3.0, abs=1e-10)


def test_smoothed_density_integrates_to_one(backend):
    a = with_spectrum(np.linspace(-1.0, 2.0, 8), seed=4)
    quad = lanczos_quadrature(backend.asarray(a), num_probes=4, num_matvecs=8, rng=0)
    t = np.linspace(-4.0, 5.0, 3001)
    phi = smoothed_density(quad, backend.asarray(t), width=0.1)
    assert_on_backend(phi, backend)
    phi_np = backend.to_numpy(phi)
    assert phi_np.shape == (3001,)
    assert np.all(phi_np >= 0)
    assert np.sum((phi_np[1:] + phi_np[:-1]) / 2 * np.diff(t)) == pytest.approx(1.0, abs=1e-9)
    f32 = smoothed_density(quad, backend.asarray(t, dtype="float32"), width=0.1)
    assert f32.dtype == backend.xp.float32


def test_smoothed_density_pointwise_formula():
    quad = Quadrature(np.array([[0.0, 1.0]]), np.array([[1.5, 0.5]]))  # n = 2, M = 1
    phi = smoothed_density(quad, np.array([0.0, 1.0]), width=0.5)
    pdf = lambda x: np.exp(-0.5 * (x / 0.5) ** 2) / (0.5 * math.sqrt(2 * math.pi))  # noqa: E731
    expect = np.array([1.5 * pdf(0.0) + 0.5 * pdf(1.0), 1.5 * pdf(1.0) + 0.5 * pdf(0.0)]) / 2
    np.testing.assert_allclose(phi, expect, rtol=1e-14)


# ----------------------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=7),
    st.integers(0, 2**16),
)
def test_lanczos_full_budget_recovers_spectrum_with_multiplicity(values, seed):
    lam = np.array(values, dtype=np.float64)
    a = with_spectrum(lam, seed=seed)
    n = lam.size
    res = eigsh(a, k=n, which="smallest", num_matvecs=n, rng=seed)
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam), atol=1e-9)
    lz = lanczos(a, num_matvecs=n, rng=seed)
    np.testing.assert_allclose(lz.basis.T @ lz.basis, np.eye(n), atol=1e-11)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6),
    st.integers(1, 5),
    st.integers(0, 2**16),
)
def test_rademacher_hutchinson_of_diagonal_is_exact(d, num_probes, seed):
    a = np.diag(np.array(d))
    diag = hutchinson_diagonal(a, num_probes=num_probes, rng=seed)
    np.testing.assert_allclose(diag.value, d, rtol=1e-14, atol=1e-14)
    tr = hutchinson_trace(a, num_probes=num_probes, rng=seed)
    assert float(tr.value) == pytest.approx(sum(d), rel=1e-12, abs=1e-12)


# ------------------------------------- non-finite and overflowing inputs (issue 15)
def test_dense_matrices_must_be_finite_and_float32_or_float64(backend):
    a = np.eye(3)
    a[1, 2] = a[2, 1] = np.nan
    for fn, kw in [
        (hutchinson_trace, {"num_probes": 2}),
        (hutchinson_diagonal, {"num_probes": 2}),
        (hutchpp_trace, {"num_probes": 3}),
        (lanczos, {"num_matvecs": 2}),
        (eigsh, {"k": 1}),
        (lanczos_quadrature, {"num_probes": 1, "num_matvecs": 2}),
    ]:
        with pytest.raises(ValueError, match=r"^A must be finite; got NaN in rows \[1, 2\]\.$"):
            fn(backend.asarray(a), **kw)
    if hasattr(backend.xp, "float16"):  # was accepted: Lanczos in float16
        with pytest.raises(
            TypeError, match=r"A must have a real floating-point dtype \(float32 or float64\)"
        ):
            eigsh(backend.asarray(np.eye(2), dtype="float16"), k=1)


@pytest.mark.parametrize(
    ("matrix", "dtype"),
    [
        ([[1e300, 1.0], [1.0, 2.0]], "float64"),  # was eigenvalues 4.8e299 and 5.2e299
        ([[1e30, 1.0], [1.0, 2.0]], "float32"),
    ],
)
def test_lanczos_products_near_the_top_of_the_range_are_scaled(matrix, dtype):
    """A finite matrix whose products' squared norms would overflow: run on A / s, the
    top eigenvalue comes out right (it gave 4.8e299 and 5.2e299 through a silent
    restart, then an error; now neither)."""
    a = np.asarray(matrix, dtype=dtype)
    top = float(np.linalg.eigvalsh(a.astype(np.float64))[-1])
    eps = float(np.finfo(dtype).eps)
    assert float(eigsh(a, k=1).eigenvalues[0]) == pytest.approx(top, rel=10 * eps)
    run = lanczos(a, num_matvecs=2, rng=0)
    T = np.diag(np.asarray(run.alpha, dtype=np.float64))
    T += np.diag(np.asarray(run.beta, dtype=np.float64), 1)
    T += np.diag(np.asarray(run.beta, dtype=np.float64), -1)
    assert float(np.linalg.eigvalsh(T)[-1]) == pytest.approx(top, rel=10 * eps)
    quad = lanczos_quadrature(a, num_probes=2, num_matvecs=2, rng=0)
    assert np.all(np.isfinite(np.asarray(quad.nodes)))
    assert float(np.max(np.asarray(quad.nodes))) == pytest.approx(top, rel=10 * eps)


def test_an_operator_returning_nan_is_named_by_lanczos():
    op = LinearOperator((3, 3), matvec=lambda v: v * np.nan, dtype=np.float64, device=None, xp=np)
    with pytest.raises(ValueError, match="at Lanczos step 1 A q or its norm is NaN or inf"):
        eigsh(op, k=1)
    with pytest.raises(ValueError, match="Either the operator returned NaN or inf"):
        lanczos(op, num_matvecs=3, rng=0)


def test_smoothed_density_refuses_non_finite_points_and_names_an_overflow():
    a = with_spectrum([1.0, 2.0, 3.0])
    quad = lanczos_quadrature(a, num_probes=2, num_matvecs=3, rng=0)
    with pytest.raises(ValueError, match=r"^grid must be finite; got NaN at positions \[1\]\.$"):
        smoothed_density(quad, np.array([0.0, np.nan, 2.0]), width=0.1)
    bad = Quadrature(quad.nodes, quad.weights * np.inf)
    with pytest.raises(ValueError, match=r"^quadrature\.weights must be finite; got inf"):
        smoothed_density(bad, np.linspace(0.0, 4.0, 5), width=0.1)
    zero = Quadrature(quad.nodes, quad.weights * 0.0)  # 0 / 0
    with (
        np.errstate(invalid="ignore"),
        pytest.raises(ValueError, match="the smoothed density must be finite; got NaN or inf"),
    ):
        smoothed_density(zero, np.ones(2), width=0.1)
    with (
        np.errstate(over="ignore", divide="ignore"),  # 1 / width overflows float64
        pytest.raises(ValueError, match=r"width = 1e-320 .*Use a larger width"),
    ):
        smoothed_density(quad, quad.nodes[0, :1], width=1e-320)
    phi = smoothed_density(quad, np.array([2.0]), width=1e300)  # tiny, finite, fine
    assert np.isfinite(phi[0])
    assert phi[0] > 0


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        *(("float64", s) for s in (1e-300, 1e-170, 1e-100, 1.0, 1e100, 1e200, 1e300)),
        *(("float32", s) for s in (1e-35, 1e-20, 1.0, 1e20, 1e35)),
    ],
)
def test_krylov_methods_are_scale_invariant(dtype: str, scale: float) -> None:
    """eigsh, lanczos and slq give the same relative accuracy at any representable scale
    of A (they run on A / s, s a power of two from the first product); the residuals
    scale with A and never claim a convergence that did not happen."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((5, 5))
    A = G @ G.T
    lam = np.linalg.eigvalsh(A)
    As = (A * scale).astype(dtype)
    eps = float(np.finfo(dtype).eps)
    res = eigsh(As, k=2)
    got = np.asarray(res.eigenvalues, dtype=np.float64) / scale
    np.testing.assert_allclose(got, lam[-2:], rtol=50 * eps)
    residuals = np.asarray(res.residuals, dtype=np.float64) / scale
    assert np.all(residuals > 0)
    assert np.all(residuals < 1e3 * eps * lam[-1])
    small = eigsh(As, k=1, which="smallest")
    np.testing.assert_allclose(float(small.eigenvalues[0]) / scale, lam[0], rtol=1e3 * eps)
    one = eigsh(np.full((1, 1), scale, dtype=dtype), k=1)
    assert float(one.eigenvalues[0]) == float(np.asarray(scale, dtype=dtype))
    for extreme in (np.finfo(dtype).max, np.finfo(dtype).tiny):  # the ends of the range
        got_extreme = eigsh(np.full((1, 1), extreme, dtype=dtype), k=1).eigenvalues[0]
        assert float(got_extreme) == float(extreme)
    # The full Krylov space (5 steps): the Ritz values are the spectrum, at every scale.
    run = lanczos(As, num_matvecs=5, rng=0)
    beta = np.asarray(run.beta, dtype=np.float64)
    T = np.diag(np.asarray(run.alpha, dtype=np.float64)) + np.diag(beta, 1) + np.diag(beta, -1)
    ritz = np.linalg.eigvalsh(T) / scale
    np.testing.assert_allclose(ritz, lam, rtol=1e3 * eps, atol=1e3 * eps * lam[-1])
    tr = slq(As, lambda t: t, num_probes=3, num_matvecs=5, rng=0)
    ref = slq(A.astype(dtype), lambda t: t, num_probes=3, num_matvecs=5, rng=0)
    assert float(tr.value) / scale == pytest.approx(float(ref.value), rel=1e3 * eps)


@pytest.mark.parametrize("scale", [1e-300, 1.0, 1e300])
def test_eigsh_top_pair_on_each_library_folds_the_scale_or_divides_first(backend, scale):
    """Each library, restarted (p = 8 < the steps needed): the largest pair to tol at a scale
    inside √tiny … √max (A q / s folded into the Gram–Schmidt pass, q written straight
    into the basis) and outside it (A q divided first); the reported residual bounds the
    explicit one."""
    rng = np.random.default_rng(3)
    lam = np.concatenate([np.linspace(0.0, 1.0, 79), [1.05]])
    Q, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    a = (Q * lam) @ Q.T * scale
    res = eigsh(backend.asarray(a), k=1, tol=1e-10, basis_size=8, rng=0)
    theta = float(backend.to_numpy(res.eigenvalues)[0])
    y = backend.to_numpy(res.eigenvectors)[:, 0]
    assert theta / scale == pytest.approx(1.05, rel=1e-9)
    explicit = np.linalg.norm((a / scale) @ y - (theta / scale) * y)  # no overflow
    reported = float(backend.to_numpy(res.residuals)[0]) / scale
    # Never 0 (at 1e-300 the compiled loop's residual, a subnormal in A's units, was
    # flushed to 0 by XLA and taken for convergence: it stopped at 1.9e-8).
    assert 0.0 < reported <= 1e-10 * 1.05 * (1 + 1e-12)
    # Converged for real. At 1e-300 XLA also flushes the entries of A below 2.2e-308, so
    # that JAX's A differs from NumPy's there.
    flushed = backend.name == "jax" and scale < 1e-290
    assert explicit <= (1e-9 if flushed else max(reported, 1e-10 * 1.05) + 1e-12)


def _symmetric(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, n))
    return (g + g.T) / 2


def test_eigsh_never_writes_the_operators_output_and_copes_with_inputs_from_the_basis():
    """An operator that returns a read-only view of its own buffer (in-place arithmetic on
    it would raise): the largest pair (partial, q written into the basis) and k = 3 (full)
    come out right."""
    a = _symmetric(60, 4)
    buf = np.empty(60)

    def matvec(x: np.ndarray) -> np.ndarray:
        np.matmul(a, x, out=buf)
        out = buf.view()
        out.setflags(write=False)
        return out

    op = LinearOperator((60, 60), matvec=matvec, dtype=np.float64, device="cpu", xp=np)
    lam = np.linalg.eigvalsh(a)
    for k, which in ((1, "largest"), (3, "both")):
        res = eigsh(op, k=k, which=which, tol=1e-8, basis_size=10, num_matvecs=2000, rng=0)
        want = lam[-1:] if k == 1 else np.concatenate([lam[:3], lam[-3:]])  # both ends
        np.testing.assert_allclose(np.asarray(res.eigenvalues), want, rtol=1e-7, atol=1e-7)


def test_eigsh_on_torch_tensors_that_require_grad():
    """A parameter (or anything built from one) as the matrix: products that require grad
    take ``w / b`` (autograd refuses ``out=``), the eigenpair is right."""
    torch = pytest.importorskip("torch")
    a = _symmetric(40, 5)
    W = torch.nn.Parameter(torch.tensor(a))
    for k in (1, 3):
        res = eigsh(W, k=k, tol=1e-10, rng=0)
        got = np.asarray(res.eigenvalues.detach(), dtype=np.float64)
        np.testing.assert_allclose(got, np.linalg.eigvalsh(a)[-k:], rtol=1e-9)


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-307])
def test_krylov_restart_before_the_basis_is_full_keeps_it_orthonormal(library, scale):
    """_Krylov driven by hand: a restart at j < p (q then lives in the old row j, which
    the next step must copy into row l) leaves an orthonormal basis; 1/s is folded into
    the pass on torch only, within √tiny … √max (at 1e-307, 1/s would overflow)."""
    from fisherbound.linalg._krylov import _Krylov

    a = _symmetric(40, 6) * scale
    v = np.random.default_rng(1).standard_normal(40)
    v /= np.linalg.norm(v)
    if library == "torch":
        torch = pytest.importorskip("torch")
        a, v = torch.tensor(a), torch.tensor(v)
    op = aslinearoperator(a)
    kry = _Krylov(op.xp, op, v, 12, np.random.default_rng(0))
    for _ in range(5):
        kry.step()
    assert kry.fold is (library == "torch" and scale == 1.0)
    theta, S, _ = kry.ritz()
    kry.restart(S[:, -2:], theta[-2:])
    for _ in range(4):
        kry.step()
    V = np.asarray(kry.V[: kry.j])
    assert np.max(np.abs(V @ V.T - np.eye(kry.j))) < 1e-12


# ----------------------------------------------------------------------------- compiled JAX loop


def _jax_operator(fn, operands, n: int, dtype):
    """A JAX operator with a traceable product ``fn(operands, V)`` and the same matvec /
    matmat; ``plain`` is the same operator without it (the Python loop)."""
    import jax.numpy as jnp

    from fisherbound.linalg._operator import TraceableProduct

    def matmat(V):
        return fn(operands, V)

    def matvec(v):
        return fn(operands, v[:, None])[:, 0]

    kwargs = {"matvec": matvec, "matmat": matmat, "dtype": dtype, "device": None, "xp": jnp}
    compiled = LinearOperator((n, n), traceable=TraceableProduct(fn, operands), **kwargs)
    return compiled, LinearOperator((n, n), **kwargs)


_TRACES = [0]


def _counted_product(A, V):
    _TRACES[0] += 1  # runs when jax traces the loop, not when it runs it
    return A @ V


class _Counted:
    """A TraceableProduct.fn that counts its traces, equal when the wrapped fn is."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Counted) and self.fn == other.fn

    def __call__(self, operands, V):
        _TRACES[0] += 1
        return self.fn(operands, V)


@pytest.mark.jax
def test_compiled_lanczos_matches_the_numpy_loop():
    """A dense JAX matrix runs the compiled loop: alpha, beta, the basis and the Gauss
    rules of NumPy's Python loop to rounding, for one run and for three at once."""
    jnp = pytest.importorskip("jax.numpy")
    a = random_symmetric(30, 3)
    A = jnp.asarray(a)
    assert aslinearoperator(A).traceable is not None
    for m in (1, 12):
        ref, got = lanczos(a, num_matvecs=m, rng=4), lanczos(A, num_matvecs=m, rng=4)
        for x, y in zip(got, ref):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=1e-13)
    ref_q = lanczos_quadrature(a, num_probes=3, num_matvecs=12, rng=5)
    got_q = lanczos_quadrature(A, num_probes=3, num_matvecs=12, rng=5)
    np.testing.assert_allclose(np.asarray(got_q.nodes), ref_q.nodes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got_q.weights), ref_q.weights, rtol=0, atol=1e-12)


@pytest.mark.jax
def test_compiled_lanczos_breaks_down_and_restarts_as_the_numpy_loop():
    """Repeated eigenvalues: the same exact zeros in beta (the same restart vectors,
    drawn on the host), the spectrum with multiplicities, and one trace in all."""
    jnp = pytest.importorskip("jax.numpy")
    lam = np.repeat([1.0, 2.0, 5.0], 4)
    a = with_spectrum(lam, seed=1)  # clean breakdowns: every other beta is 0.3 or more
    op, _ = _jax_operator(_counted_product, jnp.asarray(a), 12, jnp.float64)
    before = _TRACES[0]
    got, ref = lanczos(op, num_matvecs=12, rng=1), lanczos(a, num_matvecs=12, rng=1)
    assert np.sum(ref.beta == 0.0) == 3  # a restart after each 3-dimensional Krylov space
    np.testing.assert_array_equal(np.asarray(got.beta) == 0.0, ref.beta == 0.0)
    np.testing.assert_allclose(np.asarray(got.alpha), ref.alpha, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.beta), ref.beta, rtol=0, atol=1e-12)
    b = np.asarray(got.beta)
    T = np.diag(np.asarray(got.alpha)) + np.diag(b, 1) + np.diag(b, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), lam, rtol=0, atol=1e-12)
    # A second call on another matrix of the same shape, another seed: no new trace.
    lanczos(op, num_matvecs=12, rng=2)
    other, _ = _jax_operator(_counted_product, jnp.asarray(a + np.eye(12)), 12, jnp.float64)
    lanczos(other, num_matvecs=12, rng=3)
    assert _TRACES[0] - before == 1


@pytest.mark.jax
def test_compiled_lanczos_raises_at_the_step_of_a_nan_product():
    """A product that turns NaN at step 4 (from e_0 on the path graph the basis is e_j):
    the compiled loop raises the Python loop's ValueError, naming the same step."""
    jnp = pytest.importorskip("jax.numpy")
    n = 8
    path = np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)

    def product(A, V):
        return A @ V + jnp.where(jnp.abs(V[3, :]) > 0, jnp.nan, 0.0)

    compiled, plain = _jax_operator(product, jnp.asarray(path), n, jnp.float64)
    e0 = jnp.asarray(np.eye(n)[0])
    match = r"^A's products must be finite; at Lanczos step 4 A q or its norm is NaN"
    for op in (compiled, plain):
        with pytest.raises(ValueError, match=match):
            lanczos(op, num_matvecs=6, v0=e0)
    ok = lanczos(compiled, num_matvecs=3, v0=e0)  # steps 1 to 3 are finite
    np.testing.assert_allclose(np.asarray(ok.beta), [1.0, 1.0], rtol=1e-15)


@pytest.mark.jax
def test_compiled_lanczos_on_a_jax_fisher_operator():
    """The Fisher operator of a JAX MLP runs compiled: the Gauss rules of the Python
    loop on the same operator and of NumPy's loop on its dense matrix, to rounding; the
    operators of two batches of one size share one compiled loop (one trace)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from _models import jax_mlp, mlp_weights

    from fisherbound.adapters.jax import linearize
    from fisherbound.fisher import fisher_operator
    from fisherbound.linalg._operator import TraceableProduct

    ws, bs = mlp_weights((3, 5, 4), seed=11)
    apply_fn, params = jax_mlp(ws, bs)
    xs = np.random.default_rng(0).standard_normal((2, 6, 3))
    ops = [fisher_operator(linearize(apply_fn, params, jnp.asarray(x))) for x in xs]
    assert ops[0].traceable.fn == ops[1].traceable.fn
    assert hash(ops[0].traceable.fn) == hash(ops[1].traceable.fn)
    op = ops[0]
    d = op.shape[0]
    plain = LinearOperator(
        op.shape, matvec=op.matvec, matmat=op.matmat, dtype=op.dtype, device=None, xp=jnp
    )
    dense = np.asarray(op.matmat(jnp.eye(d)))
    counted = [
        LinearOperator(
            o.shape,
            matmat=o.matmat,
            dtype=o.dtype,
            device=None,
            xp=jnp,
            traceable=TraceableProduct(_Counted(o.traceable.fn), o.traceable.operands),
        )
        for o in ops
    ]
    before = _TRACES[0]
    got = lanczos_quadrature(counted[0], num_probes=3, num_matvecs=15, rng=6)
    loop = lanczos_quadrature(plain, num_probes=3, num_matvecs=15, rng=6)
    ref = lanczos_quadrature(dense, num_probes=3, num_matvecs=15, rng=6)
    top = float(np.max(np.abs(ref.nodes)))
    for other in (loop, ref):
        np.testing.assert_allclose(np.asarray(got.nodes), np.asarray(other.nodes), atol=1e-12 * top)
        np.testing.assert_allclose(np.asarray(got.weights), np.asarray(other.weights), atol=1e-10)
    lanczos_quadrature(counted[1], num_probes=3, num_matvecs=15, rng=7)
    assert _TRACES[0] - before == 1


@pytest.mark.jax
def test_fisher_operators_whose_kernel_needs_an_eigen_solve_keep_the_python_loop():
    """ "lower" and "scalar_upper" solve for K(z)'s top eigenpair (an unrolled iteration
    under jit, minutes of XLA compilation inside the loop): no traceable product; the
    closed-form kernels have one."""
    jnp = pytest.importorskip("jax.numpy")
    from _models import jax_mlp, mlp_weights

    from fisherbound.adapters.jax import linearize
    from fisherbound.fisher import fisher_operator

    ws, bs = mlp_weights((3, 5, 4), seed=11)
    apply_fn, params = jax_mlp(ws, bs)
    lin = linearize(apply_fn, params, jnp.asarray(np.ones((2, 3))))
    for kernel, traced in (("exact", True), ("upper", True), ("lower", False)):
        assert (fisher_operator(lin, kernel=kernel).traceable is not None) is traced
    assert fisher_operator(lin, kernel="scalar_upper").traceable is None


def test_a_bad_traceable_product_is_named() -> None:
    from fisherbound.linalg import TraceableProduct

    with pytest.raises(TypeError, match=r"traceable must be a TraceableProduct\(fn, operands\)"):
        LinearOperator(
            (2, 2), matvec=lambda v: v, dtype=np.float64, device=None, xp=np, traceable=len
        )
    with pytest.raises(TypeError, match=r"with a callable fn; got TraceableProduct"):
        LinearOperator(
            (2, 2),
            matvec=lambda v: v,
            dtype=np.float64,
            device=None,
            xp=np,
            traceable=TraceableProduct(3, ()),
        )
