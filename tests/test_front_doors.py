"""Property-based test of the public front doors: nothing silently wrong.

Every front door runs once per plan (a pytest parameter): all arguments valid, or ONE
argument broken (a wrong dtype, float16 or int64; a torch "meta" tensor; a NaN or inf
entry; a wrong shape; an option of the wrong type, zero, negative, NaN, inf, huge, a
string or None), or one huge but finite entry (1e30, 3e38 in float32, 1e300 in
float64). Hypothesis draws the rest: shapes, values, the library (NumPy or torch on
the CPU), the dtype (float32 or float64), the family, the other options. The property:

- a valid call returns results of the documented shape, in the input's array library
  and device, whose values are all finite (the one documented exception: the NaN
  standard errors of an estimate without probe variance), and correct where a cheap
  reference exists;
- a call with a broken argument raises a house error (ValueError, TypeError or
  NotImplementedError) raised by the library itself (not a framework's error passed
  through) with a message;
- a call with a huge entry does either (a finite result, or a house error naming the
  overflow);
- the only warnings are the library's documented ones (eigsh's budget, a target
  error not reached) and NumPy's floating-point ones on the way ("overflow
  encountered in multiply" inside a float32 norm), which the property judges by what
  follows.

Never another exception type, never a NaN or inf returned without a word.

What the property found is fixed, each with a targeted test (the overflow of the
sample statistics at the end of this file; the others in the modules' own test files).

Runtime: 9.3-9.6 s on two shared cores (``python -m pytest -q -p no:cacheprovider
tests/test_front_doors.py``: 260 cases, 40-60 examples for a valid plan and 6-10 for
a broken one); the examples are derandomized, so every run draws the same ones.
"""

from __future__ import annotations

import math
import re
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _models import mlp_weights, torch_mlp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fisherbound
from fisherbound import dimension, estimators, families, fisher, landscape, linalg, variance
from fisherbound.adapters import numpy as fb_numpy

torch = pytest.importorskip("torch")
from fisherbound.adapters import torch as fb_torch  # noqa: E402

HOUSE_ERRORS = (ValueError, TypeError, NotImplementedError)
#: The warnings the library documents: (category, message pattern).
DOCUMENTED_WARNINGS = (
    (RuntimeWarning, r"^eigsh stopped at its budget num_matvecs"),
    (UserWarning, r"^target_relative_error = .* was not reached"),
)
FLOATING_WARNING = r"^(overflow|invalid value|divide by zero|underflow) encountered"
_SOURCES = (
    str(Path(fisherbound.__file__).resolve().parent),
    str(Path(fisherbound.__file__).resolve().parent.parent / "adapters"),
)
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow],
}

# --------------------------------------------------------------------------- #
# the property


def outcome(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the house error it raised (returned, not raised).

    Fails on any other exception, on a house error raised by a framework rather than
    by the library (a NumPy broadcast ValueError passed through), on an error without
    a message, and on any warning but the documented and the floating-point ones.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except HOUSE_ERRORS as err:
            result = err
    for w in caught:
        documented = any(
            issubclass(w.category, cat) and re.search(pat, str(w.message))
            for cat, pat in DOCUMENTED_WARNINGS
        )
        floating = issubclass(w.category, RuntimeWarning) and bool(
            re.search(FLOATING_WARNING, str(w.message))
        )
        assert documented or floating, f"undocumented warning {w.category.__name__}: {w.message}"
    if isinstance(result, BaseException):
        frame = traceback.extract_tb(result.__traceback__)[-1]
        where = str(Path(frame.filename).resolve())
        assert where.startswith(_SOURCES), (
            f"{type(result).__name__} raised by {frame.filename}:{frame.lineno} "
            f"({frame.name}), not by the library's own checks: {result}"
        )
        assert str(result), f"{type(result).__name__} without a message"
        event(f"{type(result).__name__}: {str(result)[:40]}")
    else:
        event("returned")
    return result


def lin_and_family(draw: Any, p: str | None) -> tuple[Any, Any] | None:
    """A linearization of plan ``p`` and a family for it; None when the plan broke it
    (the error is judged here)."""
    lin, _ = draw(linearization(p))
    if isinstance(lin, BaseException):
        judge(p, lin)
        return None
    return lin, draw(FAMILY_OF_OUTPUT)


def judge(plan: str | None, result: Any) -> bool:
    """Whether to check ``result`` as a valid call's: by the plan's broken argument.

    A valid plan must return; a broken one must raise; a huge entry may do either.
    """
    raised = isinstance(result, BaseException)
    if plan is None:
        assert not raised, f"a valid call raised {type(result).__name__}: {result}"
        return True
    if plan.endswith("huge"):
        return not raised
    assert raised, f"a call with a broken {plan} returned {result!r}"
    return False


def _host(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        assert not x.is_meta, "a meta tensor returned as a result"
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, tuple | list):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def assert_finite(x: Any, name: str = "result") -> None:
    for leaf in _leaves(x):
        a = _host(leaf)
        assert np.all(np.isfinite(a)), f"{name} has NaN or inf without an error: {a!r}"


def assert_shape(x: Any, shape: tuple[int, ...], name: str = "result") -> None:
    assert tuple(x.shape) == tuple(shape), f"{name} has shape {tuple(x.shape)}, not {shape}"


def assert_like(x: Any, ref: Any, name: str = "result") -> None:
    """Array type in equals array type out: the library and device of ``ref``."""
    for leaf in _leaves(x):
        if isinstance(ref, np.ndarray):  # NumPy's reductions give 0-d results as scalars
            ok = isinstance(leaf, np.ndarray | np.generic)
        else:
            ok = type(leaf) is type(ref)
        assert ok, f"{name} is a {type(leaf).__name__}; the input a {type(ref).__name__}"
        if isinstance(ref, torch.Tensor):
            assert leaf.device == ref.device, f"{name} is on {leaf.device}, not {ref.device}"


def assert_estimate(est: Any, shape: tuple[int, ...] | None, *, ref: Any) -> None:
    """An Estimate: finite value, finite standard error >= 0 (NaN without a probe variance)."""
    assert isinstance(est, linalg.Estimate), f"not an Estimate: {type(est).__name__}"
    if shape is not None:
        assert_shape(est.value, shape, "value")
        assert_shape(est.std_error, shape, "std_error")
    assert_finite(est.value, "value")
    assert_like(est.value, ref, "value")
    # Degrees of freedom of the probe variance: M − 1, g − 1 for Hutch++'s g residual
    # probes, per entry for the target-error loop; none: NaN standard errors.
    dof = getattr(est, "dof", int(est.num_probes) - 1)
    dof = _host(dof) if hasattr(dof, "shape") else np.asarray(float(dof))
    for leaf in _leaves(est.std_error):
        se = _host(leaf)
        none = np.broadcast_to(dof == 0, se.shape)
        assert np.all(np.isnan(se[none])), "no probe variance: NaN standard errors"
        assert np.all(np.isfinite(se[~none])), f"std_error {se!r}"
        assert np.all(se[~none] >= 0), f"std_error {se!r}"


# --------------------------------------------------------------------------- #
# plans and arrays

#: Values no option takes (each option adds its own invalid ones).
BAD = ("x", "2", math.nan, math.inf, -math.inf, True, [1], object())
#: Not a count >= 1.
BAD_INT = (*BAD, 1e300, 2.5, 0, -1)
#: Not a positive finite real number.
BAD_POSITIVE = (*BAD, 0, 0.0, -1.0, None)


def explore(p: str | None, body: Callable[[Any], None], *, valid: int, broken: int) -> None:
    """Run ``body(data)`` on ``valid`` examples for the valid plan, ``broken`` for the others.

    The plans are pytest parameters, not drawn, so that every broken argument is tried
    (hypothesis draws a choice among twenty far from uniformly).
    """

    @settings(max_examples=valid if p is None else broken, **SETTINGS)
    @given(st.data())
    def run(data: Any) -> None:
        body(data)

    run()


def plans(*broken: str) -> list[Any]:
    """pytest parameters: the valid plan and each broken argument."""
    return [None, *broken]


def opt(draw: Any, p: str | None, name: str, valid: Any, bad: tuple[Any, ...] = BAD) -> Any:
    """A valid value of option ``name`` from ``valid`` (a strategy), or a bad one."""
    return draw(st.sampled_from(bad)) if p == name else draw(valid)


#: Huge finite values of each dtype; NaN and inf.
HUGE = {"float32": (1e30, -1e30, 3e38), "float64": (1e30, -1e300, 1e300, 1.7e308)}
NONFINITE = (math.nan, math.inf, -math.inf)


@st.composite
def array(
    draw: Any,
    p: str | None,
    name: str,
    shape: tuple[int, ...],
    *,
    library: str | None = None,
    dtype: str | None = None,
    scale: float = 1.0,
    bad_shapes: tuple[tuple[int, ...], ...] = (),
) -> Any:
    """An array of ``shape`` (NumPy or torch, float64 or float32), or one broken as planned.

    ``p`` names what to break: "{name}.dtype" (float16 or int64), "{name}.meta" (a
    torch "meta" tensor), "{name}.nonfinite" (one NaN or inf), "{name}.huge" (one huge
    finite entry), "{name}.shape" (one of ``bad_shapes``).
    """
    library = library or draw(st.sampled_from(("numpy", "torch")))
    dtype = dtype or draw(st.sampled_from(("float64", "float32")))
    if p == f"{name}.shape":
        shape = draw(st.sampled_from(bad_shapes))
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.random.default_rng(seed).standard_normal(shape) * scale
    if p in (f"{name}.nonfinite", f"{name}.huge") and a.size:
        special = NONFINITE if p.endswith("nonfinite") else HUGE[dtype]
        a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(special))
    if p == f"{name}.dtype":
        dtype = draw(st.sampled_from(("float16", "int64")))
    if p == f"{name}.meta":
        library = "meta"
    return to_array(a, library, dtype)


def to_array(a: np.ndarray, library: str, dtype: str) -> Any:
    """``a`` in ``library`` ("numpy", "torch" or "meta") and ``dtype``."""
    with np.errstate(over="ignore", invalid="ignore"):
        host = np.round(np.clip(a, -9, 9)).astype(np.int64) if dtype == "int64" else a.astype(dtype)
    if library == "numpy":
        return host
    if library == "meta":
        return torch.empty(host.shape, dtype=getattr(torch, dtype), device="meta")
    return torch.from_numpy(np.array(host))


def broken_arrays(name: str, *extra: str) -> tuple[str, ...]:
    return (f"{name}.dtype", f"{name}.meta", f"{name}.nonfinite", f"{name}.huge", *extra)


def _np_or_torch(ref: Any) -> str:
    return "torch" if isinstance(ref, torch.Tensor) else "numpy"


# --------------------------------------------------------------------------- #
# families

FAMILIES = (families.Categorical(), families.Bernoulli(), families.Gaussian())
KERNELS = st.sampled_from(families.KERNELS)
ONE_ARRAY = (
    "mean",
    "eigvalsh",
    "top_eigenpair",
    "lambda_max_bounds",
    "metric",
    "sqrt_metric",
    "log_pseudo_determinant",
    "pseudo_determinant",
    "sample",
)
TWO_ARRAYS = ("metric_matvec", "sqrt_metric_matvec", "fourth_moment", "log_likelihood", "score")


def family_broken(method: str) -> tuple[str, ...]:
    broken = [*broken_arrays("z", "z.shape")]
    if method in ("metric", "sqrt_metric", "metric_matvec", "sqrt_metric_matvec"):
        broken += ["kernel"]
    if method in ("metric_matvec", "sqrt_metric_matvec", "fourth_moment"):
        broken += broken_arrays("v", "v.shape")
    if method == "sample":
        broken += ["num_samples", "rng"]
    return tuple(broken)


def family_call(draw: Any, method: str, p: str | None) -> tuple[dict[str, Any], Callable[[], Any]]:
    family = draw(st.sampled_from(FAMILIES))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    c = draw(st.integers(family.min_classes, 5))
    z = draw(array(p, "z", (*lead, c), scale=3.0, bad_shapes=((), (*lead, 0))))
    kernel = opt(draw, p, "kernel", KERNELS, (*BAD, None, "Exact"))
    info: dict[str, Any] = {"lead": lead, "c": c, "kernel": kernel, "z": z}
    fn = getattr(family, method)
    if method in ("metric", "sqrt_metric"):
        return info, lambda: fn(z, kernel=kernel)
    if method in ("metric_matvec", "sqrt_metric_matvec", "fourth_moment"):
        r = 1 if (method == "sqrt_metric_matvec" and kernel == "lower") else c
        vlead = draw(st.sampled_from(((), lead, (2, *lead))))
        lib = _np_or_torch(z)
        v = draw(array(p, "v", (*vlead, r), library=lib, bad_shapes=((*vlead, r + 1),)))
        info["v"] = v
        if method == "fourth_moment":
            return info, lambda: fn(z, v)
        return info, lambda: fn(z, v, kernel=kernel)
    if method == "sample":
        num = opt(draw, p, "num_samples", st.sampled_from((None, 1, 3)), BAD_INT)
        rng = opt(draw, p, "rng", st.sampled_from((0, 7, None)), (*BAD, -1))
        info["num_samples"] = num
        return info, lambda: fn(z, rng=rng, num_samples=num)
    if method in ("log_likelihood", "score"):
        g = np.random.default_rng(draw(st.integers(0, 1000)))
        lib, dt = _np_or_torch(z), str(z.dtype).removeprefix("torch.")
        dt = dt if dt in ("float32", "float64") else "float64"
        if isinstance(family, families.Categorical):
            y = to_array(g.integers(0, c, lead).astype(float), lib, "int64")
        elif isinstance(family, families.Bernoulli):
            y = to_array(g.integers(0, 2, (*lead, c)).astype(float), lib, dt)
        else:
            y = to_array(g.standard_normal((*lead, c)), lib, dt)
        info["y"] = y
        return info, lambda: fn(z, y)
    return info, lambda: fn(z)


def _check_family_result(method: str, info: dict[str, Any], result: Any) -> None:
    lead, c, kernel, z = info["lead"], info["c"], info["kernel"], info["z"]
    if method in ("mean", "eigvalsh", "score"):
        assert_shape(result, (*lead, c))
    elif method in ("log_pseudo_determinant", "pseudo_determinant", "log_likelihood"):
        assert_shape(result, lead)
    elif method == "top_eigenpair":
        assert_shape(result.eigenvalue, lead, "eigenvalue")
        assert_shape(result.eigenvector, (*lead, c), "eigenvector")
    elif method == "lambda_max_bounds":
        assert_shape(result.lower, lead, "lower")
        assert_shape(result.upper, lead, "upper")
        assert np.all(_host(result.lower) <= _host(result.upper) * (1 + 1e-5) + 1e-30)
    elif method == "metric":
        assert_shape(result, (*lead, c, c))
    elif method == "sqrt_metric":
        assert_shape(result, (*lead, c, 1 if kernel == "lower" else c))
    elif method in ("metric_matvec", "sqrt_metric_matvec", "fourth_moment"):
        out = np.broadcast_shapes(lead, tuple(info["v"].shape[:-1]))
        assert_shape(result, out if method == "fourth_moment" else (*out, c))
    elif method == "sample":
        head = () if info["num_samples"] is None else (info["num_samples"],)
        tail = (*lead,) if result.ndim == len(head) + len(lead) else (*lead, c)
        assert_shape(result, (*head, *tail))
    assert_like(result, z)
    assert_finite(result)


@pytest.mark.parametrize(
    ("method", "p"),
    [(m, b) for m in ONE_ARRAY + TWO_ARRAYS for b in [None, *family_broken(m)]],
)
def test_family_methods(method: str, p: str | None) -> None:
    def body(data: Any) -> None:
        info, call = family_call(data.draw, method, p)
        result = outcome(call)
        if judge(p, result):
            _check_family_result(method, info, result)

    explore(p, body, valid=40, broken=8)


# --------------------------------------------------------------------------- #
# linalg: dense matrices, every option


@st.composite
def matrix(draw: Any, p: str | None) -> tuple[Any, np.ndarray]:
    """A symmetric positive semi-definite (n, n) matrix (and its float64 host copy)."""
    n = draw(st.integers(1, 6))
    g = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = g.standard_normal((n, draw(st.integers(1, n))))
    host = b @ b.T * draw(st.sampled_from((1e-3, 1.0, 1e3)))
    if p == "A.shape":
        host = draw(st.sampled_from((host[:, :-1] if n > 1 else host[0], host[None], host[0])))
    if p in ("A.nonfinite", "A.huge") and host.ndim == 2:
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        dtype = draw(st.sampled_from(("float64", "float32")))
        value = draw(st.sampled_from(NONFINITE if p == "A.nonfinite" else HUGE[dtype]))
        host[i, j] = host[j, i] = value
        return to_array(host, draw(st.sampled_from(("numpy", "torch"))), dtype), host
    library = "meta" if p == "A.meta" else draw(st.sampled_from(("numpy", "torch")))
    dtype = draw(
        st.sampled_from(("float16", "int64") if p == "A.dtype" else ("float64", "float32"))
    )
    return to_array(host, library, dtype), host


MATRIX_BROKEN = (*broken_arrays("A"), "A.shape")
RNGS = st.sampled_from((0, 1, None, np.random.default_rng(3)))
BAD_RNG = (*BAD, -1)


def _dtype_eps(A: Any) -> float:
    return 1.2e-7 if "32" in str(A.dtype) else 2.3e-16


@pytest.mark.parametrize(
    "p", plans(*MATRIX_BROKEN, "k", "which", "tol", "num_matvecs", "basis_size", "rng")
)
def test_eigsh(p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        A, host = draw(matrix(p))
        n = int(host.shape[0])
        which = opt(
            draw, p, "which", st.sampled_from(("largest", "smallest", "both")), (*BAD, None)
        )
        k = opt(draw, p, "k", st.integers(1, n), (*BAD_INT, n + 1))
        kk = k if isinstance(k, int) and not isinstance(k, bool) else 1
        wanted = min(n, 2 * kk) if which == "both" else kk
        tol = opt(draw, p, "tol", st.sampled_from((None, 1e-8, 1e-3, 0.0)), (*BAD, -1e-3))
        num_matvecs = opt(
            draw,
            p,
            "num_matvecs",
            st.sampled_from((None, wanted, 100)),
            (*BAD_INT, max(wanted - 1, 0)),
        )
        basis_size = opt(
            draw, p, "basis_size", st.sampled_from((None, n, min(n, wanted + 1))), (*BAD_INT, n + 1)
        )
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        res = outcome(
            lambda: linalg.eigsh(
                A,
                k=k,
                which=which,
                tol=tol,
                num_matvecs=num_matvecs,
                basis_size=basis_size,
                rng=rng,
            )
        )
        if not judge(p, res):
            return
        got = int(res.eigenvalues.shape[0])
        assert got == wanted, f"{got} eigenpairs for k = {k}, which = {which!r}, n = {n}"
        assert_shape(res.eigenvectors, (n, got), "eigenvectors")
        assert_shape(res.residuals, (got,), "residuals")
        for name in ("eigenvalues", "eigenvectors", "residuals"):
            assert_finite(getattr(res, name), name)
            assert_like(getattr(res, name), A, name)
        # Each Ritz value lies within its residual (plus rounding) of an eigenvalue of A.
        # Compared on the scale of A (near the top of the range a difference overflows).
        exact = np.linalg.eigvalsh(host)
        s = max(1.0, float(np.max(np.abs(exact))))
        slack = _host(res.residuals) / s + 100 * n * _dtype_eps(A)
        gap = np.min(np.abs(_host(res.eigenvalues)[:, None] / s - exact[None, :] / s), axis=1)
        assert np.all(gap <= slack), f"Ritz values {_host(res.eigenvalues)}, eigenvalues {exact}"

    explore(p, body, valid=60, broken=10)


@pytest.mark.parametrize(
    "p", plans(*MATRIX_BROKEN, "num_matvecs", "rng", *broken_arrays("v0", "v0.shape"))
)
def test_lanczos(p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        A, host = draw(matrix(p))
        n = int(host.shape[0])
        num_matvecs = opt(draw, p, "num_matvecs", st.integers(1, 8), BAD_INT)
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        v0 = None
        if p is not None and p.startswith("v0") or draw(st.booleans()):
            lib = "numpy" if isinstance(A, np.ndarray) or A.is_meta else "torch"
            dt = "float32" if "32" in str(A.dtype) else "float64"
            v0 = draw(array(p, "v0", (n,), library=lib, dtype=dt, bad_shapes=((n + 1,), (n, 1))))
        res = outcome(lambda: linalg.lanczos(A, num_matvecs=num_matvecs, v0=v0, rng=rng))
        if not judge(p, res):
            return
        m = min(int(num_matvecs), n)
        assert_shape(res.alpha, (m,), "alpha")
        assert_shape(res.beta, (m - 1,), "beta")
        assert_shape(res.basis, (n, m), "basis")
        for name in ("alpha", "beta", "basis"):
            assert_finite(getattr(res, name), name)
            assert_like(getattr(res, name), A, name)
        Q = _host(res.basis).astype(np.float64)
        np.testing.assert_allclose(Q.T @ Q, np.eye(m), atol=1e3 * n * _dtype_eps(A))

    explore(p, body, valid=40, broken=8)


def _log1p_abs(x: Any) -> Any:
    xp = torch if isinstance(x, torch.Tensor) else np
    return xp.log1p(xp.abs(x))


ESTIMATORS = ("hutchinson_trace", "hutchinson_diagonal", "hutchpp_trace", "slq")


def estimator_options(name: str) -> tuple[str, ...]:
    options = ["num_probes", "rng"]
    options += ["num_matvecs"] if name == "slq" else ["distribution"]
    options += ["batch_size"] if name.startswith("hutchinson") else []
    return tuple(options)


@pytest.mark.parametrize(
    ("name", "p"),
    [(e, b) for e in ESTIMATORS for b in plans(*MATRIX_BROKEN, *estimator_options(e))],
)
def test_trace_estimators(name: str, p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        A, host = draw(matrix(p))
        n = int(host.shape[0])
        lo = 3 if name == "hutchpp_trace" else 1
        num_probes = opt(draw, p, "num_probes", st.integers(lo, 7), (*BAD_INT, lo - 1))
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        dist = opt(
            draw, p, "distribution", st.sampled_from(("rademacher", "gaussian")), (*BAD, None)
        )
        batch_size = opt(draw, p, "batch_size", st.sampled_from((None, 1, 3)), BAD_INT)
        num_matvecs = opt(draw, p, "num_matvecs", st.integers(1, 6), BAD_INT)
        fn = getattr(linalg, name)
        if name == "slq":

            def call() -> Any:
                return fn(A, _log1p_abs, num_probes=num_probes, num_matvecs=num_matvecs, rng=rng)
        elif name == "hutchpp_trace":

            def call() -> Any:
                return fn(A, num_probes=num_probes, distribution=dist, rng=rng)
        else:

            def call() -> Any:
                return fn(
                    A, num_probes=num_probes, distribution=dist, rng=rng, batch_size=batch_size
                )

        est = outcome(call)
        if judge(p, est):
            assert_estimate(est, (n,) if name == "hutchinson_diagonal" else (), ref=A)

    explore(p, body, valid=40, broken=8)


@pytest.mark.parametrize("p", plans("width", *broken_arrays("grid", "grid.shape")))
def test_smoothed_density(p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        A, _ = draw(matrix(None))
        quad = linalg.lanczos_quadrature(
            A, num_probes=draw(st.integers(1, 3)), num_matvecs=4, rng=0
        )
        g = draw(st.integers(1, 7))
        lib, dt = _np_or_torch(A), "float32" if "32" in str(A.dtype) else "float64"
        grid = draw(
            array(p, "grid", (g,), library=lib, dtype=dt, scale=3.0, bad_shapes=((g, 1), ()))
        )
        width = opt(draw, p, "width", st.sampled_from((0.1, 1.0, 1e-3, 1e300)), BAD_POSITIVE)
        phi = outcome(lambda: linalg.smoothed_density(quad, grid, width=width))
        if not judge(p, phi):
            return
        assert_shape(phi, (g,))
        assert_finite(phi, "density")
        assert np.all(_host(phi) >= 0)
        assert_like(phi, A)

    explore(p, body, valid=40, broken=8)


# --------------------------------------------------------------------------- #
# landscape: random directions and the default step; the a-priori bound


DIRECTION_OPTIONS = {
    "random_directions": ("num_directions", "kind", "rng"),
    "default_step": (),
}


@pytest.mark.parametrize(
    ("which", "p"),
    [
        (w, b)
        for w, o in DIRECTION_OPTIONS.items()
        for b in plans(*broken_arrays("params", "params.shape"), *o)
    ],
)
def test_random_directions_and_default_step(which: str, p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        d = draw(st.integers(1, 7))
        params = draw(array(p, "params", (d,), scale=2.0, bad_shapes=((), (0,), (d, 1))))
        if which == "default_step":
            h = outcome(lambda: landscape.default_step(params))
            if judge(p, h):
                assert_shape(h, ())
                assert_finite(h, "step")
                assert float(_host(h)) > 0
                assert_like(h, params)
            return
        k = opt(draw, p, "num_directions", st.integers(1, 3), BAD_INT)
        kind = opt(draw, p, "kind", st.sampled_from(landscape.DIRECTION_KINDS), (*BAD, None))
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        blocks = None
        if kind == "filter":  # one block of all of θ: filters are its entries
            from fisherbound.linearization import ParameterBlock

            blocks = [ParameterBlock("w", (d,), 0, d)]
        out = outcome(
            lambda: landscape.random_directions(
                params, num_directions=k, kind=kind, blocks=blocks, rng=rng
            )
        )
        if judge(p, out):
            assert_shape(out, (k, d))
            assert_finite(out, "directions")
            assert_like(out, params)

    explore(p, body, valid=40, broken=8)


@pytest.mark.parametrize(
    "p", plans(*broken_arrays("value"), "value.negative", "value.shape", "num_probes")
)
def test_std_error_bound(p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        shape = draw(st.sampled_from(((), (3,), (2, 2))))
        if p == "value.shape":
            shape = draw(st.sampled_from(((2, 3), (2, 2, 2))))
        g = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        b = g.standard_normal(shape)
        host = b @ b.T if len(shape) == 2 and shape[0] == shape[1] else np.abs(b)  # variances
        if p == "value.negative":
            host = -host - 1.0
        dtype = draw(st.sampled_from(("float64", "float32")))
        if p in ("value.nonfinite", "value.huge"):
            special = NONFINITE if p.endswith("nonfinite") else HUGE[dtype]
            host = np.array(host)
            host.reshape(-1)[0] = abs(draw(st.sampled_from(special)))
        library = "meta" if p == "value.meta" else draw(st.sampled_from(("numpy", "torch")))
        value = to_array(host, library, "int64" if p == "value.dtype" else dtype)
        m = opt(draw, p, "num_probes", st.integers(1, 5), BAD_INT)
        se = outcome(lambda: variance.std_error_bound(value, num_probes=m))
        if judge(p, se):
            assert_shape(se, shape)
            assert_finite(se, "bound")
            assert np.all(_host(se) >= 0)
            assert_like(se, value)

    explore(p, body, valid=40, broken=8)


# --------------------------------------------------------------------------- #
# the Fisher and its estimators on a tiny NumPy reference model and a torch MLP

SIZES = (3, 4, 3)
WEIGHTS = mlp_weights(SIZES, seed=5)
NUM_PARAMS = 3 * 4 + 4 + 4 * 3 + 3


def _model(kind: str, dtype: str) -> Any:
    ws, bs = WEIGHTS
    if kind == "numpy":
        return fb_numpy.MLP([w.astype(dtype) for w in ws], [b.astype(dtype) for b in bs])
    net = torch_mlp(ws, bs)
    return net.float() if dtype == "float32" else net


@st.composite
def linearization(draw: Any, p: str | None) -> tuple[Any, str | None]:
    """A linearization of the NumPy or torch MLP at inputs x (N, 3), or its house error."""
    kind = draw(st.sampled_from(("numpy", "torch")))
    dtype = draw(st.sampled_from(("float64", "float32")))
    n = draw(st.integers(1, 4))
    x = draw(
        array(
            p,
            "x",
            (n, SIZES[0]),
            library=kind,
            dtype=dtype,
            scale=2.0,
            bad_shapes=((n, SIZES[0] + 1), (n,)),
        )
    )
    if p == "x.meta" and kind == "numpy":
        x = to_array(np.zeros((n, SIZES[0])), "meta", dtype)
    adapter = fb_numpy if kind == "numpy" else fb_torch
    lin = outcome(lambda: adapter.linearize(_model(kind, dtype), x))
    return lin, kind


FAMILY_OF_OUTPUT = st.sampled_from(
    (families.Categorical(), families.Bernoulli(), families.Gaussian())
)
X_BROKEN = (*broken_arrays("x", "x.shape"),)
FISHER_OPTIONS = {
    "fisher_diagonal": ("kernel", "reduction", "max_vectors", "progress"),
    "fisher_trace": ("kernel", "reduction", "progress"),
    "fisher_bounds": ("what", "scalar", "reduction"),
    "top_eigenpairs": ("k", "kernel", "reduction", "tol", "rng"),
}
ESTIMATOR_OPTIONS = {
    "detach_and_mix": (
        "what",
        "rng",
        "reduction",
        "target_relative_error",
        "num_probes",
        "kernel",
        "distribution",
        "per_example",
    ),
    "monte_carlo": ("what", "rng", "reduction", "target_relative_error", "num_samples"),
}


@pytest.mark.parametrize(
    ("name", "p"),
    [(f, b) for f, o in FISHER_OPTIONS.items() for b in plans(*X_BROKEN, *o)],
)
def test_fisher(name: str, p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        drawn = lin_and_family(draw, p)
        if drawn is None:
            return
        lin, family = drawn
        kernel = opt(draw, p, "kernel", KERNELS, (*BAD, None))
        reduction = opt(draw, p, "reduction", st.sampled_from(("sum", "mean")), (*BAD, None))
        max_vectors = opt(draw, p, "max_vectors", st.sampled_from((None, 1, 64)), BAD_INT)
        progress = opt(draw, p, "progress", st.sampled_from((None, False)), ("no", 1, "x"))
        what = opt(draw, p, "what", st.sampled_from(("diagonal", "trace")), (*BAD, None))
        scalar = opt(draw, p, "scalar", st.booleans(), ("yes", 1, None))
        k = opt(draw, p, "k", st.integers(1, 3), (*BAD_INT, NUM_PARAMS + 1))
        tol = opt(draw, p, "tol", st.sampled_from((None, 1e-6)), (*BAD, -1.0))
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        fn = getattr(fisher, name, None) or getattr(dimension, name)
        kwargs: dict[str, Any] = {"reduction": reduction}
        if name == "fisher_diagonal":
            kwargs |= {"kernel": kernel, "max_vectors": max_vectors, "progress": progress}
        elif name == "fisher_trace":
            kwargs |= {"kernel": kernel, "progress": progress}
        elif name == "fisher_bounds":
            kwargs |= {"what": what, "scalar": scalar}
        else:
            kwargs |= {"k": k, "kernel": kernel, "tol": tol, "rng": rng}
        res = outcome(lambda: fn(lin, family, **kwargs))
        if not judge(p, res):
            return
        ref = lin.logits
        if name == "fisher_diagonal":
            assert_shape(res, (NUM_PARAMS,))
            assert np.all(_host(res) >= 0), "a diagonal of a positive semi-definite matrix"
        elif name == "fisher_trace":
            assert_shape(res, ())
            assert float(_host(res)) >= 0
        elif name == "fisher_bounds":
            shape = (NUM_PARAMS,) if what == "diagonal" else ()
            assert_shape(res.lower, shape, "lower")
            assert_shape(res.upper, shape, "upper")
            lo, hi = _host(res.lower), _host(res.upper)
            assert np.all(lo <= hi * (1 + 1e-4) + 1e-6), "lower bound above the upper bound"
        else:
            assert_shape(res.eigenvalues, (k,), "eigenvalues")
            assert_shape(res.eigenvectors, (NUM_PARAMS, k), "eigenvectors")
            assert_shape(res.residuals, (k,), "residuals")
        assert_finite(res)
        assert_like(res, ref)

    explore(p, body, valid=30, broken=6)


@pytest.mark.parametrize(
    ("name", "p"),
    [(e, b) for e, o in ESTIMATOR_OPTIONS.items() for b in plans(*X_BROKEN, *o)],
)
def test_estimators(name: str, p: str | None) -> None:
    def body(data: Any) -> None:
        draw = data.draw
        drawn = lin_and_family(draw, p)
        if drawn is None:
            return
        lin, family = drawn
        what = opt(draw, p, "what", st.sampled_from(("diagonal", "trace")), (*BAD, None, "dense"))
        rng = opt(draw, p, "rng", RNGS, BAD_RNG)
        reduction = opt(draw, p, "reduction", st.sampled_from(("sum", "mean")), (*BAD, None))
        target = opt(
            draw, p, "target_relative_error", st.sampled_from((None, 0.5)), BAD_POSITIVE[:-1]
        )
        count = opt(
            draw,
            p,
            "num_probes" if name == "detach_and_mix" else "num_samples",
            st.integers(1 if target is None else 2, 4),  # a target needs a standard error
            BAD_INT,
        )
        kwargs: dict[str, Any] = {
            "what": what,
            "rng": rng,
            "reduction": reduction,
            "target_relative_error": target,
        }
        if name == "detach_and_mix":
            kwargs["num_probes"] = count
            kwargs["kernel"] = opt(draw, p, "kernel", KERNELS, (*BAD, None))
            kwargs["distribution"] = opt(
                draw, p, "distribution", st.sampled_from(("rademacher", "gaussian")), (*BAD, None)
            )
            kwargs["per_example"] = opt(draw, p, "per_example", st.booleans(), ("yes", 1, None))
        else:
            kwargs["num_samples"] = count
        est = outcome(lambda: getattr(estimators, name)(lin, family, **kwargs))
        if judge(p, est):
            assert_estimate(est, (NUM_PARAMS,) if what == "diagonal" else (), ref=lin.logits)

    explore(p, body, valid=30, broken=6)


# --------------------------------------------------------------------------- #
# what the property found and this change fixed, as plain regression tests


def test_std_error_bound_refuses_integers_and_names_an_overflow() -> None:
    with pytest.raises(TypeError, match=r"^value must have a real floating-point dtype"):
        variance.std_error_bound(np.array([1, 2]))  # was accepted (0-d int: 0.0)
    with (
        np.errstate(over="ignore"),
        pytest.raises(ValueError, match=r"bound of value overflows float64 .*rescale value"),
    ):
        variance.std_error_bound(np.array([1.7e308]))  # was inf
    # A block with entries 1e300: F_ii F_jj = 1e600 overflowed to inf; scaled, exact.
    block = np.array([[1e300, 1e299], [1e299, 2e300]])
    got = variance.std_error_bound(block, num_probes=2)
    d = np.diag(block / 1e300)
    want = 1e300 * np.sqrt((d[:, None] * d[None, :] + (block / 1e300) ** 2) / 2)
    np.testing.assert_allclose(got, want, rtol=1e-14)


# --------------------------------------------------------------------------- #
# overflow in the sample statistics (found by the property, fixed in _lib/_estimate.py)


def test_sample_statistics_do_not_overflow_where_the_result_is_representable() -> None:
    """The mean and standard error are computed scaled by the largest |sample|."""
    est = linalg.hutchinson_trace(np.array([[3e38]], dtype=np.float32), num_probes=2, rng=0)
    assert float(est.value) == pytest.approx(3e38, rel=1e-6)  # was inf
    assert float(est.std_error) == 0.0  # Rademacher: every sample is 3e38
    est = linalg.hutchinson_diagonal(np.array([[3e38]], dtype=np.float32), num_probes=2, rng=0)
    assert float(est.value[0]) == pytest.approx(3e38, rel=1e-6)
    A = np.array([[-1e300]])
    est = linalg.hutchinson_trace(A, num_probes=2, distribution="gaussian", rng=0)
    assert math.isfinite(float(est.std_error))  # was inf
    est = linalg.hutchpp_trace(np.array([[1e300, 1.0], [1.0, 1e300]]), num_probes=6, rng=0)
    assert float(est.value) == pytest.approx(2e300, rel=1e-12)
    assert math.isfinite(float(est.std_error))  # was inf
