"""Tests of ``eigsh(..., block_size=b)``: block thick-restart Lanczos (issue 14).

Dense symmetric matrices with known spectra (random eigenvectors, fixed seeds);
the reference is ``numpy.linalg.eigh``. A relative residual r of a Ritz pair
bounds its eigenvalue error by r |θ| (symmetric A), so the float64 checks to 1e-10
run at ``tol=1e-10``; in float32 the products themselves carry errors near
√n · ε₃₂ · ‖A‖, added to the tolerance.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fisherbound.linalg import EigshResult, LinearOperator, eigsh


def with_spectrum(eigenvalues: list[float] | np.ndarray, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with the given eigenvalues and random eigenvectors."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    q = q * np.sign(np.diag(r))
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def counting(a: np.ndarray) -> tuple[LinearOperator, dict[str, list[int]]]:
    """A NumPy operator of ``a`` that records each matvec (1) and matmat (its columns)."""
    calls: dict[str, list[int]] = {"matvec": [], "matmat": []}

    def matvec(v: np.ndarray) -> np.ndarray:
        calls["matvec"].append(1)
        return a @ v

    def matmat(v: np.ndarray) -> np.ndarray:
        calls["matmat"].append(int(v.shape[1]))
        return a @ v

    op = LinearOperator(a.shape, matvec=matvec, matmat=matmat, dtype=a.dtype, device=None, xp=np)
    return op, calls


def as_namespace(a: np.ndarray, namespace: str, dtype: str = "float64") -> object:
    if namespace == "numpy":
        return a.astype(dtype)
    torch = pytest.importorskip("torch")
    return torch.asarray(a, dtype=getattr(torch, dtype))


def to_numpy(x: object) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)  # type: ignore[attr-defined]


def expected(dense: np.ndarray, k: int, which: str) -> np.ndarray:
    return {
        "largest": dense[-k:],
        "smallest": dense[:k],
        "both": np.concatenate([dense[:k], dense[-k:]]),
    }[which]


# Well separated at both ends: 10 · 0.8^i and −10 · 0.8^i, n = 100.
SPECTRUM = np.concatenate([10.0 * 0.8 ** np.arange(50), -7.0 * 0.8 ** np.arange(50)])


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("b", [2, 4])
def test_block_eigsh_matches_eigh_float64(namespace, which, k, b):
    a = with_spectrum(SPECTRUM, seed=1)
    dense = np.linalg.eigvalsh(a)
    res = eigsh(as_namespace(a, namespace), k=k, which=which, tol=1e-10, block_size=b, rng=0)
    assert isinstance(res, EigshResult)
    want = expected(dense, k, which)
    theta = to_numpy(res.eigenvalues)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(theta, want, rtol=0.0, atol=1e-10 * scale)
    Y = to_numpy(res.eigenvectors)
    assert Y.shape == (a.shape[0], want.size)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(Y.T @ Y, np.eye(want.size), atol=1e-8)
    # The residuals ‖C s‖ read off the decomposition are the explicit ones.
    explicit = np.linalg.norm(a @ Y - Y * theta, axis=0)
    np.testing.assert_allclose(to_numpy(res.residuals), explicit, atol=1e-12 * scale)
    assert np.all(explicit <= 1e-10 * np.maximum(np.abs(theta), 1e-8 * scale) + 1e-13 * scale)
    if namespace == "torch":
        assert type(res.eigenvalues).__module__.startswith("torch")
        assert res.eigenvectors.dtype == res.eigenvalues.dtype


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
@pytest.mark.parametrize("which", ["largest", "both"])
def test_block_eigsh_float32(namespace, which):
    a = with_spectrum(SPECTRUM, seed=2)
    dense = np.linalg.eigvalsh(a)
    res = eigsh(as_namespace(a, namespace, "float32"), k=5, which=which, block_size=3, rng=0)
    assert str(res.eigenvalues.dtype).endswith("float32")
    theta = to_numpy(res.eigenvalues)
    # Default tol √ε₃₂ bounds |θ − λ| by tol · |θ|; the products add √n ε₃₂ ‖A‖ each.
    eps = float(np.finfo(np.float32).eps)
    scale = np.abs(dense).max()
    atol = math.sqrt(eps) * np.abs(theta) + 10 * math.sqrt(a.shape[0]) * eps * scale
    assert np.all(np.abs(theta - expected(dense, 5, which)) <= atol)


def test_block_eigsh_uses_one_matmat_of_b_columns_per_step():
    a = with_spectrum(SPECTRUM, seed=3)
    op, calls = counting(a)
    res = eigsh(op, k=3, block_size=4, rng=0)
    assert calls["matvec"] == []
    assert set(calls["matmat"]) == {4}
    dense = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(res.eigenvalues, dense[-3:], rtol=1e-6)


def test_repeated_eigenvalue_of_multiplicity_above_b_is_found_with_its_multiplicity():
    # Three distinct eigenvalues: the block Krylov space (b = 2) is invariant after
    # three steps; the deflated columns restart from random vectors.
    a = with_spectrum([5.0] * 6 + [3.0] * 5 + [1.0] * 49, seed=4)
    res = eigsh(a, k=8, block_size=2, tol=1e-10, rng=0)
    np.testing.assert_allclose(res.eigenvalues, [3.0, 3.0] + [5.0] * 6, atol=1e-9)
    Y = res.eigenvectors
    np.testing.assert_allclose(Y.T @ Y, np.eye(8), atol=1e-8)
    # And in a full run (basis_size = n, n not a multiple of b): the whole spectrum.
    lam = [4.0] * 5 + [-1.0, 0.5, 2.0, 2.0, 7.0, 3.0, 3.0, 3.0]
    b = with_spectrum(lam, seed=5)
    full = eigsh(b, k=7, which="both", basis_size=13, block_size=3, rng=0)
    np.testing.assert_allclose(full.eigenvalues, np.sort(lam), atol=1e-10)


def test_low_rank_matrix_breakdown_and_deflation():
    g = np.random.default_rng(6).standard_normal((40, 6))
    a = g @ g.T  # PSD, rank 6: 34 zero eigenvalues
    dense = np.linalg.eigvalsh(a)
    large = eigsh(a, k=6, block_size=4, tol=1e-10, rng=0)
    np.testing.assert_allclose(large.eigenvalues, dense[-6:], rtol=1e-10)
    # The null space (multiplicity 34 > b): five zero eigenvalues after deflations.
    small = eigsh(a, k=5, which="smallest", block_size=4, rng=0)
    np.testing.assert_allclose(small.eigenvalues, np.zeros(5), atol=1e-10 * dense[-1])
    assert np.all(small.residuals < 1e-10 * dense[-1])
    Y = small.eigenvectors
    np.testing.assert_allclose(np.linalg.norm(a @ Y, axis=0), 0.0, atol=1e-10 * dense[-1])


@pytest.mark.parametrize("top", [[1e8], [1e10, 1e9]])
@pytest.mark.parametrize("b", [4, 8])
def test_nearly_parallel_block_columns_stay_orthogonal(top, b):
    # A X is dominated by the top eigenvector: the columns of a block nearly coincide,
    # and orthogonalising them among themselves cancels almost everything (the second
    # in-block pass and the block pass against the basis after it are needed).
    a = with_spectrum(top + list(np.linspace(1.0, 2.0, 200 - len(top))), seed=3)
    dense = np.linalg.eigvalsh(a)
    res = eigsh(a, k=6, block_size=b, tol=0.0, num_matvecs=160, rng=0)  # no early stop
    Y, theta, norm = res.eigenvectors, res.eigenvalues, dense[-1]
    np.testing.assert_allclose(Y.T @ Y, np.eye(6), atol=1e-13)
    explicit = np.linalg.norm(a @ Y - Y * theta, axis=0)
    np.testing.assert_allclose(res.residuals, explicit, rtol=0.0, atol=1e-13 * norm)
    np.testing.assert_allclose(theta[-len(top) :], top[::-1], rtol=1e-14)
    assert np.all(theta <= dense[-1] * (1 + 1e-14))  # Ritz values interlace


def test_block_eigsh_restarts_within_a_small_basis():
    a = with_spectrum(100.0 * 0.9 ** np.arange(200), seed=7)
    op, calls = counting(a)
    res = eigsh(op, k=3, block_size=2, basis_size=8, tol=1e-10, rng=0)
    assert sum(calls["matmat"]) > 8  # more products than the basis holds: it restarted
    dense = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(res.eigenvalues, dense[-3:], rtol=1e-10)
    Y = res.eigenvectors
    explicit = np.linalg.norm(a @ Y - Y * res.eigenvalues, axis=0)
    assert np.all(explicit <= 1e-10 * res.eigenvalues + 1e-12)


def test_block_eigsh_warns_at_its_budget_counting_columns():
    a = with_spectrum(np.linspace(0.0, 1.0, 200) ** 2, seed=4)  # clustered top: slow
    op, calls = counting(a)
    with pytest.warns(RuntimeWarning, match=r"eigsh stopped at its budget num_matvecs = 25"):
        res = eigsh(op, k=3, num_matvecs=25, block_size=4, rng=0)
    assert sum(calls["matmat"]) + len(calls["matvec"]) == 25  # the last block cut to 1
    assert calls["matvec"] == [1]  # a one-column block goes through matvec
    assert res.eigenvalues.shape == (3,)
    assert np.all(res.residuals > 0.0)


def test_block_size_errors():
    a = with_spectrum(np.arange(1.0, 31.0), seed=0)
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1; got 0"):
        eigsh(a, k=1, block_size=0)
    with pytest.raises(TypeError, match=r"block_size must be an integer >= 1; got float 2.0"):
        eigsh(a, k=1, block_size=2.0)
    with pytest.raises(ValueError, match=r"block_size must be at most n = 30 .*; got 31"):
        eigsh(a, k=1, block_size=31)
    msg = (
        r"basis_size must be between k \+ block_size = 7 \(the wanted pairs and one "
        r"block of block_size = 4\) and n = 30; got 6"
    )
    with pytest.raises(ValueError, match=msg):
        eigsh(a, k=3, block_size=4, basis_size=6)
    with pytest.raises(ValueError, match=r"basis_size must be between 2k \+ block_size = 6"):
        eigsh(a, k=2, which="both", block_size=2, basis_size=5)
    with pytest.raises(ValueError, match=r"basis_size must be between k \+ 1 = 4 .* got 3"):
        eigsh(a, k=3, basis_size=3)  # block_size=1: the message as before


def test_block_size_1_is_the_single_vector_run():
    a = with_spectrum(SPECTRUM, seed=8)
    op, calls = counting(a)
    default = eigsh(op, k=5, which="both", basis_size=12, rng=3)
    n_default = len(calls["matvec"])
    one = eigsh(op, k=5, which="both", basis_size=12, block_size=1, rng=3)
    assert calls["matmat"] == []  # matvec only
    assert len(calls["matvec"]) == 2 * n_default
    for x, y in zip(default, one, strict=True):
        assert np.array_equal(x, y)  # bit for bit


def test_front_doors_forward_block_size():
    pytest.importorskip("torch")
    from fisherbound.adapters.numpy import LinearSoftmax, linearize, loss_function
    from fisherbound.dimension import top_eigenpairs
    from fisherbound.families import Gaussian
    from fisherbound.landscape import fisher_directions, hessian_directions

    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4))
    lin = linearize(LinearSoftmax(0.3 * rng.standard_normal((3, 4))), x)
    one = top_eigenpairs(lin, k=2, rng=0, tol=1e-10)
    two = top_eigenpairs(lin, k=2, rng=0, tol=1e-10, block_size=2)
    np.testing.assert_allclose(two.eigenvalues, one.eigenvalues, rtol=1e-9)
    fd = fisher_directions(lin, num_directions=2, rng=0, tol=1e-10, block_size=3)
    np.testing.assert_allclose(fd.eigenvalues, one.eigenvalues, rtol=1e-9)
    loss = loss_function(LinearSoftmax(np.zeros((1, 4))), x, np.zeros((6, 1)), family=Gaussian())
    hd = hessian_directions(loss, rng=0, tol=1e-10, block_size=2)
    dense = np.linalg.eigvalsh(x.T @ x)  # the Hessian of the summed squared error / 2
    np.testing.assert_allclose(hd.eigenvalues, [dense[-1], dense[0]], rtol=1e-9)
    for call in (
        lambda: top_eigenpairs(lin, k=2, block_size=0),
        lambda: fisher_directions(lin, block_size=0),
        lambda: hessian_directions(loss, block_size=0),
    ):
        with pytest.raises(ValueError, match=r"block_size must be an integer >= 1; got 0"):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no budget warning on a converged run
        top_eigenpairs(lin, k=1, rng=0, block_size=2)


@pytest.mark.slow
def test_block_eigsh_on_jax_steps_from_python():
    jnp = pytest.importorskip("jax.numpy")
    a = with_spectrum([5.0] * 3 + list(np.linspace(-1.0, 1.0, 27)), seed=10)
    res = eigsh(jnp.asarray(a), k=4, block_size=2, tol=1e-10, rng=0)
    assert type(res.eigenvalues).__module__.startswith("jax")
    np.testing.assert_allclose(np.asarray(res.eigenvalues), [1.0, 5.0, 5.0, 5.0], atol=1e-9)
    Y = np.asarray(res.eigenvectors)
    np.testing.assert_allclose(Y.T @ Y, np.eye(4), atol=1e-10)
