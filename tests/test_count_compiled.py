"""The Lanczos count and the Hessian directions compiled by JAX (issue 14).

A JAX operator with a traceable product runs the Lanczos count of ``local_dimension``
(``_count_above``) run by run as compiled loops (``fisherbound.linalg._compiled_count``);
the same operator without it steps from Python. Both start from the same generator, so
they take the same steps: the same count, the same Gauss rule of the first probe (the
one SLQ reuses), the same products (counted inside the compiled loop by a host
callback), the same random vectors after a breakdown or a lock (the generator is left
in the same state) and the same budget warning. ``hessian_directions`` on JAX loss
functions runs the compiled ``eigsh`` on a traceable Hessian product.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.jax

jax = pytest.importorskip("jax")
jnp = jax.numpy

import fisherbound.linalg._compiled_count as compiled_count  # noqa: E402
import fisherbound.linalg._compiled_eigsh as compiled_eigsh  # noqa: E402
from fisherbound.linalg import LinearOperator, TraceableProduct, eigsh  # noqa: E402
from fisherbound.linalg._quadrature import _count_above  # noqa: E402

_PRODUCTS = [0]  # products applied inside the compiled loop (a callback per product)


def _counted_product(A, V):
    jax.debug.callback(lambda: _PRODUCTS.__setitem__(0, _PRODUCTS[0] + V.shape[1]))
    return A @ V


def _operators(a: np.ndarray) -> tuple[LinearOperator, LinearOperator, list[int]]:
    """The compiled operator, the same product stepping from Python, and the latter's
    product count."""
    n = a.shape[0]
    A = jnp.asarray(a)
    count = [0]

    def matmat(V):
        count[0] += int(V.shape[1])
        return A @ V

    kwargs = {"matmat": matmat, "dtype": A.dtype, "device": None, "xp": jnp}
    compiled = LinearOperator((n, n), traceable=TraceableProduct(_counted_product, A), **kwargs)
    return compiled, LinearOperator((n, n), **kwargs), count


def _with_spectrum(lam, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(lam), len(lam))))
    q = q * np.sign(np.diag(r))
    a = (q * np.asarray(lam, dtype=np.float64)) @ q.T
    return (a + a.T) / 2


def _clustered(n: int = 150) -> np.ndarray:
    """Ten eigenvalues 2 % apart above a bulk in [0, 1]."""
    lam = np.concatenate([np.linspace(0.0, 1.0, n - 10), 1.0 + 0.02 * np.arange(1, 11)])
    return _with_spectrum(lam, seed=0)


def _count(op, seed: int, **kwargs):
    """_count_above's count and rule, the products of the compiled loop, the warnings and
    the next number of the generator."""
    gen = np.random.default_rng(seed)
    kwargs = {"max_count": 32, "basis_size": None, "tol": 1e-6, "probe_steps": 0, **kwargs}
    _PRODUCTS[0] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count, rule = _count_above(jnp, op, gen=gen, **kwargs)
    jax.effects_barrier()
    return count, rule, _PRODUCTS[0], [str(w.message) for w in caught], gen.standard_normal()


# (matrix, options, the count): one converged run; locking of repeated eigenvalues (three
# runs); the proof of more than max_count, with and without the probe's rule, and in a
# later run (which stops at once, the probe's rule not taken); the rule
# reused by a count that converged; the exact spectrum with p = n; the budget warning. The
# cases share three compiled programs (n, p, max_count, probe_steps) besides p = n.
_REPEATED = np.concatenate([np.linspace(0.0, 1.0, 144), np.repeat([2.0, 3.0], 3)])
_SLOW = np.concatenate([np.linspace(0.0, 0.997, 147), [0.9998, 0.9999, 1.0]])
_SMALL = {"max_count": 3, "basis_size": 6}
# Six copies of 3: one per run (each converged in a few steps), the sixth run proves six.
_COPIES = np.concatenate([np.repeat([0.1, 0.5], 72), np.repeat(3.0, 6)])
_CASES = {
    "converged": (_clustered(), {"eps": 1.05}, 8),
    "locks": (_with_spectrum(_REPEATED, 2), {"eps": 1.5}, 6),
    "proven": (_clustered(), {"eps": 0.5, **_SMALL}, None),
    "proven_rule": (_clustered(), {"eps": 0.5, "max_count": 5, "probe_steps": 30}, None),
    "proven_later": (
        _with_spectrum(_COPIES, 3),
        {"eps": 1.5, "max_count": 5, "probe_steps": 30},
        None,
    ),
    "rule": (_clustered(), {"eps": 1.05, "basis_size": 30, "probe_steps": 30}, 8),
    "exact": (_with_spectrum(np.repeat([1.0, 2.0, 5.0], 4), 1), {"eps": 1.5, "basis_size": 12}, 8),
    "budget": (_with_spectrum(_SLOW, 0), {"eps": 0.99985, **_SMALL}, 1),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_compiled_count_takes_the_python_loops_steps(case):
    a, options, expected = _CASES[case]
    compiled, plain, count = _operators(a)
    got = _count(compiled, 3, **options)
    ref = _count(plain, 3, **options)
    assert got[0] == ref[0] == expected
    assert got[2] == count[0]  # the same products
    assert got[3] == ref[3]  # the same warnings
    assert got[4] == ref[4]  # the generator in the same state
    if case == "budget":
        assert len(got[3]) == 1
        assert got[3][0].startswith("the Lanczos count stopped at its budget of 100 products")
    else:
        assert not got[3]
    if case == "locks":  # three runs: the Krylov space of one holds one copy of each
        assert got[2] > 3 * 10
    if case == "proven_later":
        assert got[1] is None
        assert ref[1] is None
    rule, ref_rule = got[1], ref[1]
    if options.get("probe_steps") and case != "proven_later":
        assert rule.nodes.shape == rule.weights.shape == (1, 30)
        np.testing.assert_allclose(np.asarray(rule.nodes), ref_rule.nodes, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(rule.weights), ref_rule.weights, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.sum(np.asarray(rule.weights)), a.shape[0], rtol=1e-12)
    else:
        assert rule is None
        assert ref_rule is None


@pytest.mark.slow
def test_compiled_count_float32():
    a = _clustered().astype(np.float32)
    compiled, plain, count = _operators(a)
    got = _count(compiled, 5, eps=1.05, tol=3.5e-4)
    ref = _count(plain, 5, eps=1.05, tol=3.5e-4)
    assert got[0] == ref[0] == 8
    assert got[2] == count[0]
    assert got[4] == ref[4]


def test_compiled_count_compiles_once():
    """Other seeds, thresholds, tolerances, a count that locks and a matrix of the same size
    reuse the compiled run."""
    op, _, _ = _operators(_clustered())
    other, _, _ = _operators(_with_spectrum(_REPEATED, 4))
    _count(op, 0, eps=1.05)
    before = compiled_count._run._cache_size()
    assert _count(op, 1, eps=1.15)[0] == 3
    assert _count(op, 2, eps=1.01, tol=1e-8)[0] == 10
    assert _count(other, 3, eps=1.5)[0] == 6  # three runs, two locks
    assert compiled_count._run._cache_size() == before


def test_compiled_count_refuses_traced_operands_and_names_a_nan_step():
    a = _clustered(12)
    kwargs = {"eps": 1.0, "max_count": 5, "basis_size": 12, "tol": 1e-6, "probe_steps": 0}

    def traced(A):
        op = LinearOperator(
            (12, 12), matmat=lambda V: A @ V, dtype=A.dtype, device=None, xp=jnp,
            traceable=TraceableProduct(_counted_product, A),
        )  # fmt: skip
        return _count_above(jnp, op, gen=np.random.default_rng(0), **kwargs)[0]

    with pytest.raises(ValueError, match="traced by JAX"):
        jax.jit(traced)(jnp.asarray(a))
    a[3, 4] = a[4, 3] = np.nan
    compiled, plain, _ = _operators(a)
    for op in (compiled, plain):
        with pytest.raises(ValueError, match=r"^A's products must be finite; at Lanczos step 1 "):
            _count_above(jnp, op, gen=np.random.default_rng(0), **kwargs)


def _mlp_sources(batches: int, seed: int = 0, reduction: str = "sum"):
    from _models import jax_mlp, mlp_weights

    from fisherbound.adapters.jax import linearize, loss_function

    ws, bs = mlp_weights((4, 12, 12, 5), seed=11)
    apply_fn, params = jax_mlp(ws, bs)
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(rng.standard_normal((8, 4))) for _ in range(batches)]
    ys = [jnp.asarray(rng.integers(0, 5, 8)) for _ in range(batches)]
    lins = [linearize(apply_fn, params, x) for x in xs]
    losses = [loss_function(apply_fn, params, x, y, reduction=reduction) for x, y in zip(xs, ys)]
    return lins, losses


@pytest.mark.slow
def test_local_dimension_compiled_on_a_jax_mlp(monkeypatch):
    """local_dimension on a JAX linearization: the compiled count equals the Python loop's
    (the same operator without its traceable product), for a count that converges and
    for one that proves more than max_count and hands its probe to SLQ ("auto"); another
    batch and another seed reuse the compiled run."""
    import fisherbound.fisher
    from fisherbound.dimension import local_dimension

    lins, _ = _mlp_sources(2)
    options = [
        {"eps": 0.5, "method": "lanczos"},
        {"eps": 1e-4, "method": "auto", "max_count": 10, "num_probes": 6},
    ]
    got = [local_dimension(lins[0], rng=1, **o) for o in options]
    before = compiled_count._run._cache_size()
    again = local_dimension(lins[1], rng=2, **options[0])
    assert compiled_count._run._cache_size() == before
    monkeypatch.setattr(fisherbound.fisher, "_traceable_fisher", lambda *args: None)
    ref = [local_dimension(lins[0], rng=1, **o) for o in options]
    assert 3 <= float(got[0].value) <= 20
    assert float(got[0].value) == float(ref[0].value)
    assert got[1].num_probes == ref[1].num_probes > 0  # SLQ, its first probe the count's
    np.testing.assert_allclose(float(got[1].value), float(ref[1].value), rtol=1e-9)
    np.testing.assert_allclose(float(got[1].std_error), float(ref[1].std_error), rtol=1e-7)
    assert float(again.value) == float(local_dimension(lins[1], rng=2, **options[0]).value)


@pytest.mark.slow
def test_hessian_directions_compiled_on_jax_losses(monkeypatch):
    """hessian_directions on JAX loss functions runs the compiled eigsh (a traceable
    Hessian product, one compiled loop for other batches of the model); its directions
    equal the Python loop's, for one batch and for a mean over two, and for the shifted
    method's second run."""
    import fisherbound._hessian as landscape_hessian
    from fisherbound.landscape import hessian_directions, hessian_operator

    _, losses = _mlp_sources(3)
    _, means = _mlp_sources(3, reduction="mean")
    sources = [losses[0], [means[1], means[2]]]  # the second: weights 1/2
    assert hessian_operator(losses[0]).traceable is not None
    calls = [
        (sources[0], {"which": "largest"}),
        (sources[1], {"which": "both"}),
        (sources[0], {"which": "both", "method": "shifted"}),
    ]
    got = [hessian_directions(src, rng=4, **kw) for src, kw in calls]
    before = compiled_eigsh._run._cache_size()
    hessian_directions(losses[2], which="largest", rng=5)  # another batch: no new program
    assert compiled_eigsh._run._cache_size() == before
    monkeypatch.setattr(landscape_hessian, "_traceable_hessian", lambda obj: None)
    assert hessian_operator(losses[0]).traceable is None
    ref = [hessian_directions(src, rng=4, **kw) for src, kw in calls]
    for g, r in zip(got, ref):
        scale = float(np.max(np.abs(np.asarray(r.eigenvalues))))
        np.testing.assert_allclose(np.asarray(g.eigenvalues), r.eigenvalues, atol=1e-10 * scale)
        np.testing.assert_allclose(np.asarray(g.residuals), r.residuals, atol=1e-10 * scale)
        cos = np.abs(np.sum(np.asarray(g.directions) * np.asarray(r.directions), axis=1))
        np.testing.assert_allclose(cos, 1.0, atol=1e-8)


def test_hessian_directions_compiled_raises_on_a_nan_product(monkeypatch):
    """A NaN Hessian-vector product (finite logits, √ at 0 in the model) raises the
    Python loop's ValueError in the compiled loop too: the loss function's own, which
    names the blocks; an operator that does not check raises eigsh's, naming the step."""
    import fisherbound._hessian as landscape_hessian
    from fisherbound.adapters.jax import loss_function
    from fisherbound.landscape import hessian_directions, hessian_operator

    def apply_fn(p, x):
        return (x @ p["w"].T) * jnp.sqrt(p["s"])

    params = {"w": jnp.ones((3, 2)), "s": jnp.zeros(())}
    x, y = jnp.ones((4, 2)), jnp.asarray([0, 1, 2, 0])
    loss = loss_function(apply_fn, params, x, y)
    message = r"^the Hessian-vector product H v of the loss function must be finite; got NaN"
    with pytest.raises(ValueError, match=message) as compiled:
        hessian_directions(loss, which="largest", rng=0)
    op = hessian_operator(loss)
    unchecked = LinearOperator(
        op.shape, matvec=lambda v: op.traceable.fn(op.traceable.operands, v[:, None])[:, 0],
        dtype=op.dtype, device=None, xp=jnp, traceable=op.traceable,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"^A's products must be finite; at Lanczos step 1 "):
        eigsh(unchecked, k=1, rng=0)
    monkeypatch.setattr(landscape_hessian, "_traceable_hessian", lambda obj: None)
    with pytest.raises(ValueError, match=message) as loop:
        hessian_directions(loss, which="largest", rng=0)
    assert str(compiled.value) == str(loop.value)
