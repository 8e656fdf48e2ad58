"""eigsh compiled by JAX (issue 14): the Python loop's results, products and warnings.

A JAX operator with a traceable product runs ``eigsh`` as one compiled loop
(``fisherbound.linalg._compiled_eigsh``); the same operator without it steps from
Python (``_Krylov``). Both start from the same generator, so they take the same steps:
the same Ritz values, vectors and residuals to rounding, the same number of products
(counted inside the compiled loop by a host callback), the same restarts, random
vectors after a breakdown and budget warning, and the compiled loop is traced once
per shape.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.jax

jax = pytest.importorskip("jax")
jnp = jax.numpy

from fisherbound.linalg import LinearOperator, TraceableProduct, eigsh  # noqa: E402

_PRODUCTS = [0]  # products applied inside the compiled loop (a callback per product)
_TRACES = [0]  # traces of the compiled loop (the product function runs when traced)


def _counted_product(A, V):
    _TRACES[0] += 1
    jax.debug.callback(lambda: _PRODUCTS.__setitem__(0, _PRODUCTS[0] + V.shape[1]))
    return A @ V


class _Counted:
    """A TraceableProduct.fn that counts its traces and products, equal when the wrapped
    fn is (the Fisher operators of one model share their fn)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __hash__(self) -> int:
        return hash(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Counted) and self.fn == other.fn

    def __call__(self, operands, V):
        _TRACES[0] += 1
        jax.debug.callback(lambda: _PRODUCTS.__setitem__(0, _PRODUCTS[0] + V.shape[1]))
        return self.fn(operands, V)


def _operators(fn, operands, n: int, dtype) -> tuple[LinearOperator, LinearOperator, list[int]]:
    """The compiled operator, the same product stepping from Python, and the latter's
    product count."""
    count = [0]

    def matmat(V):
        count[0] += int(V.shape[1])
        return fn(operands, V)

    kwargs = {"matmat": matmat, "dtype": dtype, "device": None, "xp": jnp}
    compiled = LinearOperator((n, n), traceable=TraceableProduct(fn, operands), **kwargs)
    return compiled, LinearOperator((n, n), **kwargs), count


def _run(op, **kwargs):
    """eigsh, its products (compiled: counted by the callbacks) and its warnings."""
    _PRODUCTS[0] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = eigsh(op, **kwargs)
    jax.effects_barrier()
    return res, _PRODUCTS[0], [str(w.message) for w in caught]


def _with_spectrum(lam, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(lam), len(lam))))
    q = q * np.sign(np.diag(r))
    a = (q * np.asarray(lam, dtype=np.float64)) @ q.T
    return (a + a.T) / 2


def _clustered(n: int = 150) -> np.ndarray:
    """A slowly converging top (ten eigenvalues 2 % apart above a bulk in [0, 1]): the
    default basis restarts before k = 5 pairs converge."""
    lam = np.concatenate([np.linspace(0.0, 1.0, n - 10), 1.0 + 0.02 * np.arange(1, 11)])
    return _with_spectrum(lam, seed=0)


def _assert_same(got, ref, atol: float, a: np.ndarray | None = None) -> None:
    """The same Ritz values and residuals to ``atol``, and the same eigenvectors up to
    sign; with ``a`` (repeated eigenvalues, whose Ritz vectors are any basis of part of
    the eigenspace), eigenvectors of ``a`` instead."""
    for x, y in zip(got, ref):
        assert x.shape == y.shape
        assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(got.eigenvalues), ref.eigenvalues, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(got.residuals), ref.residuals, rtol=0, atol=atol)
    Y, Z = np.asarray(got.eigenvectors), np.asarray(ref.eigenvectors)
    if a is None:
        np.testing.assert_allclose(np.abs(np.sum(Y * Z, axis=0)), 1.0, rtol=0, atol=1e3 * atol)
    else:
        np.testing.assert_allclose(a @ Y, Y * np.asarray(got.eigenvalues), rtol=0, atol=atol)
        np.testing.assert_allclose(Y.T @ Y, np.eye(Y.shape[1]), rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("which", "k"), [("largest", 1), ("largest", 5), ("smallest", 3), ("both", 2)]
)
def test_compiled_eigsh_takes_the_python_loops_steps(which, k):
    """Restarted runs to the default tolerance: the Ritz pairs and residuals of the
    Python loop (on the same JAX operator and on NumPy), and the same products."""
    a = _clustered()
    n = a.shape[0]
    compiled, plain, count = _operators(_counted_product, jnp.asarray(a), n, jnp.float64)
    got, products, messages = _run(compiled, k=k, which=which, rng=3)
    ref, _, ref_messages = _run(plain, k=k, which=which, rng=3)
    assert not messages
    assert not ref_messages
    assert products == count[0]
    if (which, k) == ("largest", 5):
        assert products > 2 * 20  # the basis of 20 restarted more than once
    _assert_same(got, ref, atol=1e-12)
    _assert_same(got, eigsh(a, k=k, which=which, rng=3), atol=1e-12)
    lam = np.linalg.eigvalsh(a)
    want = {"largest": lam[-k:], "smallest": lam[:k], "both": np.r_[lam[:k], lam[-k:]]}[which]
    assert np.all(np.abs(np.asarray(got.eigenvalues) - want) <= 1e-5)


@pytest.mark.parametrize(("which", "k"), [("largest", 5), ("smallest", 2)])
def test_compiled_eigsh_float32(which, k):
    """Float32 in, float32 out: the Python loop's pairs to float32 rounding, the same
    number of products."""
    a = _clustered().astype(np.float32)
    n = a.shape[0]
    compiled, plain, count = _operators(_counted_product, jnp.asarray(a), n, jnp.float32)
    got, products, _ = _run(compiled, k=k, which=which, rng=5)
    ref, _, _ = _run(plain, k=k, which=which, rng=5)
    assert got.eigenvalues.dtype == jnp.float32
    assert got.eigenvectors.dtype == jnp.float32
    assert products == count[0]
    _assert_same(got, ref, atol=2e-5)


@pytest.mark.parametrize("basis_size", [None, 12])
def test_compiled_eigsh_breaks_down_and_draws_as_the_python_loop(basis_size):
    """Three eigenvalues, each four times: every Krylov space is invariant after three
    steps, a breakdown, and both loops go on from the same random vector (drawn on the
    host from the same generator, which is left in the same state). The full basis
    (p = n = 12) gives the spectrum with multiplicities."""
    lam = np.repeat([1.0, 2.0, 5.0], 4)
    a = _with_spectrum(lam, seed=1)
    compiled, plain, count = _operators(_counted_product, jnp.asarray(a), 12, jnp.float64)
    k = 4 if basis_size == 12 else 2
    gens = [np.random.default_rng(7), np.random.default_rng(7)]
    got, products, _ = _run(compiled, k=k, which="both", basis_size=basis_size, rng=gens[0])
    ref, _, _ = _run(plain, k=k, which="both", basis_size=basis_size, rng=gens[1])
    assert products == count[0]
    _assert_same(got, ref, atol=1e-12, a=a)
    assert gens[0].standard_normal() == gens[1].standard_normal()
    if basis_size == 12:  # p = n: the whole spectrum, repeated eigenvalues included
        np.testing.assert_allclose(
            np.asarray(got.eigenvalues), lam[:4].tolist() + lam[-4:].tolist(), atol=1e-12
        )


def test_compiled_eigsh_breakdown_before_the_basis_is_full():
    """A 40 × 40 matrix with three distinct eigenvalues: the run breaks down at step 3 of a
    20-vector basis, draws, and finds the top eigenvalue twice, as the Python loop does."""
    lam = np.repeat([0.5, 1.5, 3.0], [20, 10, 10])
    a = _with_spectrum(lam, seed=2)
    compiled, plain, count = _operators(_counted_product, jnp.asarray(a), 40, jnp.float64)
    got, products, _ = _run(compiled, k=2, rng=0)
    ref, _, _ = _run(plain, k=2, rng=0)
    assert products == count[0]
    _assert_same(got, ref, atol=1e-12, a=a)
    np.testing.assert_allclose(np.asarray(got.eigenvalues), [3.0, 3.0], atol=1e-12)


def test_compiled_eigsh_warns_at_the_budget_as_the_python_loop():
    """A budget too small for the tolerance: the same RuntimeWarning (the same largest
    relative residual), the same Ritz pairs, exactly num_matvecs products."""
    a = _clustered()
    compiled, plain, count = _operators(_counted_product, jnp.asarray(a), 150, jnp.float64)
    kwargs = {"k": 3, "tol": 1e-10, "num_matvecs": 33, "rng": 1}
    got, products, messages = _run(compiled, **kwargs)
    ref, _, ref_messages = _run(plain, **kwargs)
    assert products == count[0] == 33
    assert len(messages) == 1
    assert messages == ref_messages
    assert messages[0].startswith("eigsh stopped at its budget num_matvecs = 33")
    _assert_same(got, ref, atol=1e-12)
    _, _, quiet = _run(compiled, **{**kwargs, "tol": 0.0})  # tol 0: to the budget, silently
    assert not quiet
    # A budget beyond int32 (the loop's counter) is one the run cannot reach anyway.
    big, _, _ = _run(compiled, **{**kwargs, "tol": 1e-8, "num_matvecs": 2**31})
    small, _, _ = _run(plain, **{**kwargs, "tol": 1e-8, "num_matvecs": 2**31})
    _assert_same(big, small, atol=1e-12)


def test_compiled_eigsh_traces_once_per_shape():
    """Second calls (another seed, tol, k of the same basis and budget, another matrix of
    the same size) reuse the compiled loop: no new trace."""
    a = _clustered(60)
    op, _, _ = _operators(_counted_product, jnp.asarray(a), 60, jnp.float64)
    other, _, _ = _operators(_counted_product, jnp.asarray(a + np.eye(60)), 60, jnp.float64)
    eigsh(op, k=2, rng=0)
    before = _TRACES[0]
    eigsh(op, k=2, rng=1)
    eigsh(op, k=2, tol=1e-8, num_matvecs=150, rng=2)
    res = eigsh(other, k=2, rng=3)
    assert _TRACES[0] == before
    np.testing.assert_allclose(
        np.asarray(res.eigenvalues), np.linalg.eigvalsh(a)[-2:] + 1.0, atol=1e-5
    )


@pytest.mark.slow
def test_compiled_eigsh_on_jax_fisher_operators():
    """top_eigenpairs' operator: a JAX MLP's Fisher operator runs compiled, with the Python
    loop's pairs and products on the same operator; the operator of another batch of the
    same size reuses the compiled loop (one trace in all)."""
    from _models import jax_mlp, mlp_weights

    from fisherbound.adapters.jax import linearize
    from fisherbound.fisher import fisher_operator

    ws, bs = mlp_weights((3, 5, 4), seed=11)
    apply_fn, params = jax_mlp(ws, bs)
    xs = np.random.default_rng(0).standard_normal((2, 6, 3))
    ops = [fisher_operator(linearize(apply_fn, params, jnp.asarray(x))) for x in xs]
    d = int(ops[0].shape[0])
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
    got, products, _ = _run(counted[0], k=3, basis_size=12, rng=4)
    count = [0]

    def matmat(V):
        count[0] += int(V.shape[1])
        return ops[0].matmat(V)

    plain = LinearOperator(ops[0].shape, matmat=matmat, dtype=ops[0].dtype, device=None, xp=jnp)
    ref, _, _ = _run(plain, k=3, basis_size=12, rng=4)
    assert products == count[0]
    top = float(np.max(np.asarray(ref.eigenvalues)))
    _assert_same(got, ref, atol=1e-12 * top)
    dense = np.asarray(ops[1].matmat(jnp.eye(d)))
    second, _, _ = _run(counted[1], k=3, basis_size=12, rng=5)
    np.testing.assert_allclose(
        np.asarray(second.eigenvalues), np.linalg.eigvalsh(dense)[-3:], rtol=1e-6
    )
    assert _TRACES[0] - before == 1


def test_compiled_eigsh_refuses_traced_operands_and_names_a_nan_step():
    """Inside jax.jit the compiled eigsh raises the Python loop's ValueError; a NaN in A
    raises at step 1 in both loops."""
    a = _clustered(30)
    with pytest.raises(ValueError, match="traced by JAX"):
        jax.jit(lambda A: eigsh(A, k=1, rng=0).eigenvalues)(jnp.asarray(a))
    a[3, 4] = a[4, 3] = np.nan
    compiled, plain, _ = _operators(_counted_product, jnp.asarray(a), 30, jnp.float64)
    for op in (compiled, plain):
        with pytest.raises(ValueError, match=r"^A's products must be finite; at Lanczos step 1 "):
            eigsh(op, k=1, rng=0)
