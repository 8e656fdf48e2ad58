"""The loss landscape: adapters' loss functions, curvature of projections, loss-only
traces, saddle probabilities, Hessian and Fisher directions, surfaces (THEORY §6)."""

from __future__ import annotations

import copy
import doctest
import math
from typing import Any

import numpy as np
import pytest
from _assertions import assert_close
from _backends import make_backend
from _models import jax_dict_order, jax_mlp, torch_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherbound import landscape
from fisherbound._lib import device_of
from fisherbound.adapters import numpy as ref
from fisherbound.adapters.numpy import MLP, LinearSoftmax, linearize, loss_function
from fisherbound.families import Bernoulli, Categorical, Gaussian
from fisherbound.fisher import fisher_dense
from fisherbound.landscape import (
    EigenDirections,
    LossTraceWarning,
    fisher_directions,
    hessian_directions,
    hessian_operator,
    loss_trace,
    projected_curvature,
    random_directions,
    saddle_probability,
    surface,
)
from fisherbound.linalg import hutchinson_trace
from fisherbound.linearization import LossFunction, make_blocks

FAMILIES = {"categorical": Categorical(), "bernoulli": Bernoulli(), "gaussian": Gaussian()}


# --------------------------------------------------------------------------- #
# test beds


class Quadratic:
    """L(θ + s) = ½ (θ + s)ᵀ A (θ + s) + bᵀ(θ + s): a LossFunction with Hessian A."""

    def __init__(
        self,
        backend: Any,
        A: np.ndarray,
        b: np.ndarray,
        theta: np.ndarray,
        blocks: Any = None,
        dtype: str = "float64",
    ) -> None:
        self.A = backend.asarray(A, dtype=dtype)
        self.b = backend.asarray(b, dtype=dtype)
        self._params = backend.asarray(theta, dtype=dtype)
        self._blocks = blocks or make_blocks([("w", (theta.shape[0],))])
        self._xp = backend.xp

    params = property(lambda self: self._params)
    blocks = property(lambda self: self._blocks)
    num_params = property(lambda self: int(self._params.shape[0]))
    num_inputs = property(lambda self: 1)
    reduction = property(lambda self: "sum")
    xp = property(lambda self: self._xp)

    def value(self, shifts: Any, /) -> Any:
        t = self._params + shifts
        return 0.5 * self._xp.sum((t @ self.A) * t, axis=1) + t @ self.b

    def gradient(self) -> Any:
        return self.A @ self._params + self.b

    def hvp(self, v: Any, /) -> Any:
        return self.A @ v

    def hvp_batch(self, V: Any, /) -> Any:
        return V @ self.A


def symmetric(d: int, seed: int, *, shift: float = 0.0) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((d, d))
    return 0.5 * (g + g.T) + shift * np.eye(d)


def labels_for(family: Any, n: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if isinstance(family, Categorical):
        return rng.integers(0, c, n)
    if isinstance(family, Bernoulli):
        return (rng.random((n, c)) < 0.5).astype(float)
    return rng.standard_normal((n, c))


def reference_loss(
    backend: Any,
    kind: str = "tanh",
    family: Any = None,
    *,
    n: int = 6,
    reduction: str = "sum",
    seed: int = 0,
    dtype: str = "float64",
) -> Any:
    family = Categorical() if family is None else family
    if kind == "linear":
        model = LinearSoftmax.random(
            4,
            3,
            bias=False,
            rng=seed,
            xp=backend.xp,
            device=backend.device,
            dtype=getattr(backend.xp, dtype),
        )
    else:
        model = MLP.random(
            [4, 5, 3],
            activation=kind,
            rng=seed,
            xp=backend.xp,
            device=backend.device,
            dtype=getattr(backend.xp, dtype),
        )
    x = np.random.default_rng(seed + 1).standard_normal((n, 4))
    y = labels_for(family, n, 3, seed + 2)
    ydt = "int64" if isinstance(family, Categorical) else dtype
    loss = loss_function(
        model,
        backend.asarray(x, dtype=dtype),
        backend.asarray(y, dtype=ydt),
        family=family,
        reduction=reduction,
    )
    return model, x, y, loss


def dense_hessian(backend: Any, loss: Any) -> np.ndarray:
    """H (D, D) from Hessian-vector products with the unit vectors."""
    d = loss.num_params
    return backend.to_numpy(loss.hvp_batch(backend.asarray(np.eye(d))))


# --------------------------------------------------------------------------- #
# the adapters' loss functions


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
@pytest.mark.parametrize("kind", ["linear", "tanh", "relu"])
def test_reference_loss_value_gradient_and_hvp(family: str, kind: str) -> None:
    check_reference_loss(make_backend("numpy"), kind, FAMILIES[family])


def test_reference_loss_on_every_backend(cpu_backend: Any) -> None:
    check_reference_loss(cpu_backend, "tanh", Categorical())


def check_reference_loss(cpu_backend: Any, kind: str, fam: Any) -> None:
    model, x, y, loss = reference_loss(cpu_backend, kind, fam)
    assert isinstance(loss, LossFunction)
    d = loss.num_params
    xp = cpu_backend.xp
    # L(θ) is −Σ log p(y|x) of the model's logits.
    z = model(cpu_backend.asarray(x))
    ydt = "int64" if isinstance(fam, Categorical) else "float64"
    expected = -float(xp.sum(fam.log_likelihood(z, cpu_backend.asarray(y, dtype=ydt))))
    shifts = np.random.default_rng(5).standard_normal((3, d)) * 0.1
    values = cpu_backend.to_numpy(loss.value(cpu_backend.asarray(np.vstack([np.zeros(d), shifts]))))
    assert values[0] == pytest.approx(expected, rel=1e-12)
    V = np.random.default_rng(7).standard_normal((2, d))
    if cpu_backend.name != "numpy":
        # Same numbers as the NumPy run of the same model (which is checked below).
        _, _, _, host = reference_loss(make_backend("numpy"), kind, fam)
        np.testing.assert_allclose(values[1:], host.value(shifts), rtol=1e-12)
        got = [
            loss.gradient(),
            loss.hvp_batch(cpu_backend.asarray(V)),
            loss.hvp(cpu_backend.asarray(V[0])),
        ]
        want = [host.gradient(), host.hvp_batch(V), host.hvp(V[0])]
        for g, w in zip(got, want):
            assert device_of(g) == device_of(loss.params)
            assert_close(g, w, rtol=1e-11, atol=1e-13, like=cpu_backend)
        return
    theta = cpu_backend.to_numpy(loss.params)
    for s, v in zip(shifts, values[1:]):
        moved = model.with_parameters(cpu_backend.asarray(theta + s))
        other = loss_function(
            moved, cpu_backend.asarray(x), cpu_backend.asarray(y, dtype=ydt), family=fam
        )
        assert v == pytest.approx(
            float(other.value(xp.zeros((1, d), dtype=xp.float64, device=cpu_backend.device))[0]),
            rel=1e-12,
        )
    # The gradient against central differences of the loss values.
    h = 1e-5
    eye = np.eye(d)
    vals = cpu_backend.to_numpy(loss.value(cpu_backend.asarray(np.vstack([h * eye, -h * eye]))))
    fd = (vals[:d] - vals[d:]) / (2 * h)
    assert_close(loss.gradient(), fd, rtol=1e-7, atol=1e-7, like=cpu_backend)
    # The Hessian: symmetric, and the derivative of the gradient.
    H = dense_hessian(cpu_backend, loss)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    v = np.random.default_rng(7).standard_normal(d)
    assert_close(loss.hvp(cpu_backend.asarray(v)), H @ v, rtol=1e-7, atol=1e-12, like=cpu_backend)
    if cpu_backend.name == "numpy":
        rows = []
        for j in range(d):
            plus = loss_function(model.with_parameters(theta + h * eye[j]), x, y, family=fam)
            minus = loss_function(model.with_parameters(theta - h * eye[j]), x, y, family=fam)
            rows.append((plus.gradient() - minus.gradient()) / (2 * h))
        np.testing.assert_allclose(H, np.array(rows), atol=1e-7)


def test_reference_loss_mean_reduction_and_float32(host_backend: Any) -> None:
    cpu_backend = host_backend
    _, _, _, total = reference_loss(cpu_backend, "tanh", n=6)
    _, _, _, mean = reference_loss(cpu_backend, "tanh", n=6, reduction="mean")
    assert mean.reduction == "mean"
    assert mean.num_inputs == 6
    d = total.num_params
    V = cpu_backend.asarray(np.random.default_rng(0).standard_normal((2, d)))
    np.testing.assert_allclose(
        cpu_backend.to_numpy(mean.value(V)) * 6, cpu_backend.to_numpy(total.value(V)), rtol=1e-12
    )
    np.testing.assert_allclose(
        cpu_backend.to_numpy(mean.hvp_batch(V)) * 6,
        cpu_backend.to_numpy(total.hvp_batch(V)),
        rtol=1e-10,
        atol=1e-13,
    )
    _, _, _, f32 = reference_loss(cpu_backend, "tanh", dtype="float32")
    V32 = cpu_backend.asarray(np.ones((1, d)), dtype="float32")
    assert f32.value(V32).dtype == cpu_backend.xp.float32
    assert f32.hvp_batch(V32).dtype == cpu_backend.xp.float32
    assert f32.gradient().dtype == cpu_backend.xp.float32
    assert device_of(f32.hvp_batch(V32)) == device_of(V32)


def torch_twin(model: MLP) -> Any:
    return torch_mlp(model.weights, model.biases, model.activation)


def jax_twin(model: MLP) -> tuple[Any, Any]:
    """``[{"w": W, "b": b}, ...]`` layers: flattened ``(b, W)`` (see :func:`jax_order`)."""
    return jax_mlp(model.weights, model.biases, model.activation, layout="dict")


def jax_order(model: MLP) -> np.ndarray:
    """Permutation from the NumPy layout (w, b per layer) to the JAX one (b, w)."""
    return jax_dict_order(model.blocks)


@pytest.mark.parametrize(
    ("family", "activation"), [("categorical", "tanh"), ("bernoulli", "relu"), ("gaussian", "tanh")]
)
def test_loss_functions_agree_across_adapters(family: str, activation: str) -> None:
    """Same weights in NumPy, torch and JAX: same loss, gradient and Hessian products."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    from fisherbound.adapters import jax as jax_adapter
    from fisherbound.adapters import torch as torch_adapter

    fam = FAMILIES[family]
    model = MLP.random([4, 6, 5, 3], activation=activation, rng=3)
    x = np.random.default_rng(4).standard_normal((7, 4))
    y = labels_for(fam, 7, 3, 5)
    ref_loss = loss_function(model, x, y, family=fam, reduction="mean")
    t_loss = torch_adapter.loss_function(
        torch_twin(model), torch.as_tensor(x), torch.as_tensor(y), family=fam, reduction="mean"
    )
    apply_fn, params = jax_twin(model)
    j_loss = jax_adapter.loss_function(
        apply_fn, params, jnp.asarray(x), y, family=fam, reduction="mean"
    )
    d = ref_loss.num_params
    perm = jax_order(model)
    rng = np.random.default_rng(6)
    S, V = 0.1 * rng.standard_normal((3, d)), rng.standard_normal((4, d))
    assert_close(
        t_loss.value(torch.as_tensor(S)), ref_loss.value(S), rtol=1e-12, atol=0, like="torch"
    )
    assert_close(
        j_loss.value(jnp.asarray(S[:, perm])), ref_loss.value(S), rtol=1e-12, atol=0, like="jax"
    )
    assert_close(t_loss.gradient(), ref_loss.gradient(), rtol=1e-7, atol=1e-13, like="torch")
    assert_close(j_loss.gradient(), ref_loss.gradient()[perm], rtol=1e-7, atol=1e-13, like="jax")
    H = ref_loss.hvp_batch(V)
    assert_close(t_loss.hvp_batch(torch.as_tensor(V)), H, rtol=1e-7, atol=1e-12, like="torch")
    assert_close(
        j_loss.hvp_batch(jnp.asarray(V[:, perm])), H[:, perm], rtol=1e-7, atol=1e-12, like="jax"
    )
    assert_close(j_loss.hvp(jnp.asarray(V[0, perm])), H[0, perm], rtol=1e-7, atol=1e-12, like="jax")
    if family != "categorical":
        return
    # The dense Hessians from Hessian-vector products against the frameworks' own.
    t_dense = t_loss.hvp_batch(torch.eye(d, dtype=torch.float64)).numpy()
    t_ref = torch.func.hessian(t_loss._loss)(t_loss.params).numpy()
    np.testing.assert_allclose(t_dense, t_ref, atol=1e-12)
    # hvp (reverse-over-reverse on the cached gradient graph), called twice per column.
    for i in (0, d // 2, d - 1):
        e = torch.zeros(d, dtype=torch.float64)
        e[i] = 1.0
        np.testing.assert_allclose(t_loss.hvp(e).numpy(), t_ref[:, i], atol=1e-12)
        np.testing.assert_allclose(t_loss.hvp(e).numpy(), t_ref[:, i], atol=1e-12)
    np.testing.assert_allclose(ref_loss.hvp_batch(np.eye(d)), t_ref, atol=1e-12)
    j_ref = jax.hessian(
        lambda t: j_loss._kernels.values(t, *j_loss._batch()[1:], jnp.zeros((1, d)))[0]
    )
    assert_close(j_loss.hvp_batch(jnp.eye(d)), j_ref(j_loss.params), rtol=1e-7, atol=1e-12)


def test_loss_function_streams() -> None:
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as jax_adapter
    from fisherbound.adapters import torch as torch_adapter

    model = MLP.random([4, 5, 3], rng=0)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((4, 4)), rng.integers(0, 3, 4)) for _ in range(3)]
    losses = list(ref.loss_functions(model, data, reduction="mean"))
    assert [loss.num_inputs for loss in losses] == [4, 4, 4]
    assert all(loss.reduction == "mean" for loss in losses)
    tdata = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in data]
    tl = list(torch_adapter.loss_functions(torch_twin(model), tdata))
    apply_fn, params = jax_twin(model)
    jl = list(jax_adapter.loss_functions(apply_fn, params, [(jnp.asarray(x), y) for x, y in data]))
    zero = np.zeros((1, model.num_params))
    for a, b, c in zip(losses, tl, jl):
        assert float(b.value(torch.as_tensor(zero))[0]) == pytest.approx(
            4 * float(a.value(zero)[0]), rel=1e-12
        )
        assert float(c.value(jnp.asarray(zero))[0]) == pytest.approx(
            4 * float(a.value(zero)[0]), rel=1e-12
        )


def test_loss_function_errors() -> None:
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as jax_adapter
    from fisherbound.adapters import torch as torch_adapter

    model = MLP.random([4, 5, 3], rng=0)
    x, y = np.ones((4, 4)), np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="reduction must be one of 'sum', 'mean'; got 'avg'"):
        loss_function(model, x, y, reduction="avg")
    with pytest.raises(TypeError, match="family must be a fisherbound.families family"):
        loss_function(model, x, y, family="categorical")
    with pytest.raises(TypeError, match="labels do not fit the logits for the Categorical"):
        loss_function(model, x, np.zeros(4))
    with pytest.raises(ValueError, match=r"labels do not fit .* class indices in \[0, 3\)"):
        loss_function(model, x, np.full(4, 3))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\) to match logits of shape"):
        loss_function(model, x, np.zeros(5, dtype=int))
    with pytest.raises(TypeError, match="all arrays must come from one array library"):
        loss_function(model, x, torch.zeros(4, dtype=torch.int64))
    loss = loss_function(model, x, y)
    with pytest.raises(ValueError, match=r"shifts must have shape \(S, D\) = \(S, 43\)"):
        loss.value(np.zeros((2, 42)))
    with pytest.raises(ValueError, match=r"V must have shape \(M, D\) = \(M, 43\)"):
        loss.hvp_batch(np.zeros(43))
    with pytest.raises(TypeError, match=r"batch 0 must be a pair \(inputs, labels\)"):
        list(ref.loss_functions(model, [x]))
    with pytest.raises(TypeError, match="batches must be an iterable of"):
        ref.loss_functions(model, x)
    tmodel = torch.nn.Linear(4, 3).double()
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        torch_adapter.loss_function(tmodel, torch.ones(4, 4, dtype=torch.float64), y)
    tloss = torch_adapter.loss_function(
        tmodel, torch.ones(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)
    )
    with pytest.raises(ValueError, match=r"shifts must have shape \(S, D=15\)"):
        tloss.value(torch.zeros(2, 14, dtype=torch.float64))
    with pytest.raises(TypeError, match="v must have the parameters' dtype torch.float64"):
        tloss.hvp(torch.zeros(15))
    with pytest.raises(TypeError, match=r"batch 1 must be a pair \(inputs, labels\)"):
        list(
            torch_adapter.loss_functions(
                tmodel, [(torch.ones(2, 4).double(), torch.zeros(2).long()), torch.ones(2, 4)]
            )
        )
    jloss = jax_adapter.loss_function(
        lambda p, x: x @ p, jnp.ones((4, 3)), jnp.ones((2, 4)), jnp.zeros(2, dtype=jnp.int64)
    )
    with pytest.raises(ValueError, match=r"V must have shape \(M, D\) = \(M, 12\)"):
        jloss.hvp_batch(jnp.zeros((2, 11)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        jax_adapter.loss_function(
            lambda p, x: x @ p,
            jnp.ones((4, 3)),
            jnp.ones((2, 4)),
            jnp.zeros(2, dtype=jnp.int64),
            reduction="none",
        )


# --------------------------------------------------------------------------- #
# curvature of projections: quadratic losses


def expected_curvature(A: np.ndarray, b: np.ndarray, theta: np.ndarray, dirs: np.ndarray) -> Any:
    H = dirs @ A @ dirs.T
    g = dirs @ (A @ theta + b)
    fa, fb = g
    w = 1 + fa**2 + fb**2
    K = (H[0, 0] * H[1, 1] - H[0, 1] ** 2) / w**2
    Hm = ((1 + fb**2) * H[0, 0] - 2 * fa * fb * H[0, 1] + (1 + fa**2) * H[1, 1]) / (2 * w**1.5)
    disc = math.sqrt(max(Hm**2 - K, 0.0))
    return H, g, np.array([Hm + disc, Hm - disc]), Hm, K


@pytest.mark.parametrize("method", ["hvp", "loss"])
def test_projected_curvature_of_a_quadratic(cpu_backend: Any, method: str) -> None:
    d = 6
    A, rng = symmetric(d, 0), np.random.default_rng(1)
    b, theta = rng.standard_normal(d), rng.standard_normal(d)
    dirs = rng.standard_normal((2, d))
    q = Quadratic(cpu_backend, A, b, theta)
    pc = projected_curvature(q, cpu_backend.asarray(dirs), method=method)
    H, g, principal, Hm, K = expected_curvature(A, b, theta, dirs)
    tol = 1e-12 if method == "hvp" else 1e-6
    assert_close(pc.hessian, H, rtol=tol, atol=tol, like=cpu_backend)
    assert_close(pc.gradient, g, rtol=tol, atol=tol, like=cpu_backend)
    assert_close(pc.principal, principal, rtol=tol, atol=tol, like=cpu_backend)
    assert float(pc.mean) == pytest.approx(Hm, rel=tol, abs=tol)
    assert float(pc.gaussian) == pytest.approx(K, rel=tol, abs=tol)
    # At a critical point the principal curvatures are the eigenvalues of H_αβ.
    crit = Quadratic(cpu_backend, A, -A @ theta, theta)
    pc = projected_curvature(crit, cpu_backend.asarray(dirs), method=method)
    assert_close(pc.gradient, np.zeros(2), rtol=1e-7, atol=1e-7, like=cpu_backend)
    assert_close(pc.principal, np.linalg.eigvalsh(H)[::-1], rtol=1e-6, atol=1e-6, like=cpu_backend)
    assert float(pc.gaussian) == pytest.approx(np.linalg.det(H), rel=1e-6)


def test_projected_hessian_of_hessian_directions_is_diagonal() -> None:
    """THEORY §6: along the extreme eigenvectors H_αβ = diag(λ_max, λ_min)."""
    backend = make_backend("numpy")
    A = symmetric(8, 3)
    q = Quadratic(backend, A, np.zeros(8), np.zeros(8))
    hd = hessian_directions(q, num_matvecs=8, rng=0)
    evals = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(hd.eigenvalues, [evals[-1], evals[0]], rtol=1e-10)
    pc = projected_curvature(q, hd)
    np.testing.assert_allclose(pc.hessian, np.diag([evals[-1], evals[0]]), atol=1e-10)
    assert evals[0] < 0 < evals[-1]
    assert float(pc.gaussian) < 0


def test_random_projections_average_to_the_trace() -> None:
    """E[H_αβ] = tr(H) I_2 for Gaussian directions (5 standard errors of the known variance)."""
    backend = make_backend("numpy")
    d, m = 5, 400
    A = symmetric(d, 4, shift=1.0)
    q = Quadratic(backend, A, np.zeros(d), np.zeros(d))
    dirs = random_directions(q.params, num_directions=2 * m, rng=0).reshape(m, 2, d)
    Hs = np.array([projected_curvature(q, pair).hessian for pair in dirs])
    tr, tr2 = np.trace(A), np.trace(A @ A)
    assert abs(Hs[:, 0, 0].mean() - tr) <= 5 * math.sqrt(2 * tr2 / m)
    assert abs(Hs[:, 1, 1].mean() - tr) <= 5 * math.sqrt(2 * tr2 / m)
    assert abs(Hs[:, 0, 1].mean()) <= 5 * math.sqrt(tr2 / m)  # Var(ηᵀHδ) = tr H²


# --------------------------------------------------------------------------- #
# the Hessian trace from loss values


def test_loss_trace_of_a_quadratic_on_every_backend(cpu_backend: Any) -> None:
    check_loss_trace_of_a_quadratic(cpu_backend, "rademacher")


@pytest.mark.parametrize("distribution", ["gaussian", "sphere", "filter"])
def test_loss_trace_of_a_quadratic_is_hutchinson(distribution: str) -> None:
    check_loss_trace_of_a_quadratic(make_backend("numpy"), distribution)


def check_loss_trace_of_a_quadratic(cpu_backend: Any, distribution: str) -> None:
    """Exact up to rounding: the same probes give the Hutchinson-HVP estimate."""
    d = 7
    A, rng = symmetric(d, 5), np.random.default_rng(6)
    q = Quadratic(cpu_backend, A, rng.standard_normal(d), rng.standard_normal(d))
    loss_est = loss_trace(
        q, num_probes=9, distribution=distribution, rng=3, batch_size=4, method="loss"
    )
    hvp_est = loss_trace(
        q, num_probes=9, distribution=distribution, rng=3, batch_size=4, method="hvp"
    )
    assert loss_est.num_probes == 9
    assert float(loss_est.value) == pytest.approx(float(hvp_est.value), rel=1e-7, abs=1e-7)
    assert float(loss_est.std_error) == pytest.approx(float(hvp_est.std_error), rel=1e-6)
    if distribution in ("rademacher", "gaussian"):
        ref_est = hutchinson_trace(
            hessian_operator(q), num_probes=9, distribution=distribution, rng=3, batch_size=4
        )
        assert float(hvp_est.value) == pytest.approx(float(ref_est.value), rel=1e-12)


def test_loss_trace_is_exact_for_a_diagonal_hessian(cpu_backend: Any) -> None:
    A = np.diag([3.0, -1.0, 0.5, 2.0])
    q = Quadratic(cpu_backend, A, np.ones(4), np.arange(4.0))
    est = loss_trace(q, num_probes=5, rng=0, method="loss")
    assert float(est.value) == pytest.approx(4.5, rel=1e-8)
    assert float(est.std_error) <= 1e-7
    assert est.value.dtype == cpu_backend.xp.float64
    assert device_of(est.value) == device_of(q.params)
    default = loss_trace(q, num_probes=5, rng=0)  # method="hvp"
    assert float(default.value) == pytest.approx(4.5, rel=1e-12)
    assert float(default.value) == float(loss_trace(q, num_probes=5, rng=0, method="hvp").value)


def test_loss_only_trace_warns_for_kinks() -> None:
    _, _, _, loss = reference_loss(make_backend("numpy"), "relu", n=8, seed=2)
    assert loss.kinks == ("relu",)
    with pytest.warns(LossTraceWarning, match=r"the model has kinks \(relu\)") as record:
        loss_trace(loss, num_probes=4, rng=0, method="loss")
    assert [(w.message.reason, w.message.detail) for w in record] == [("kinks", ("relu",))]
    loss_trace(loss, num_probes=4, rng=0)  # the HVP default: no warning (warnings are errors)
    _, _, _, smooth = reference_loss(make_backend("numpy"), "tanh", n=8, seed=2)
    assert smooth.kinks == ()
    loss_trace(smooth, num_probes=4, rng=0, method="loss")  # float64, default step: silent


def test_loss_only_trace_warns_when_rounding_dominates() -> None:
    """float32 with a step far below ε^{1/4}: the bound 4 ε |L(θ)| D / h² (Rademacher
    ‖η‖² = D) exceeds the standard error."""
    _, _, _, loss = reference_loss(make_backend("numpy"), "tanh", n=8, seed=2, dtype="float32")
    d, h = loss.num_params, 1e-3
    with pytest.warns(LossTraceWarning, match="rounding bound of the second differences") as rec:
        est = loss_trace(loss, num_probes=8, rng=0, method="loss", step=h)
    assert [w.message.reason for w in rec] == ["rounding"]
    center = abs(float(loss.value(np.zeros((1, d), dtype=np.float32))[0]))
    bound = 4 * float(np.finfo(np.float32).eps) * center * d / h**2
    assert rec[0].message.detail == pytest.approx(bound, rel=1e-5)
    assert rec[0].message.detail > float(est.std_error)
    loss_trace(loss, num_probes=8, rng=0, method="loss")  # the default step: silent here


def test_torch_loss_functions_report_kinked_modules() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters import torch as torch_adapter

    class FunctionalRelu(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.nn.functional.relu(x))

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.arange(5) % 3
    nn = torch.nn
    kinked = nn.Sequential(nn.Linear(4, 4), nn.ReLU6(), nn.Linear(4, 4), nn.LeakyReLU())
    kinked = nn.Sequential(kinked, nn.ELU(alpha=0.5), nn.Linear(4, 3)).double()
    smooth = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.ELU(), nn.Linear(4, 3)).double()
    loss = torch_adapter.loss_function(kinked, x, y)
    assert loss.kinks == ("ELU", "LeakyReLU", "ReLU6")
    assert torch_adapter.loss_function(smooth, x, y).kinks == ()
    # A ReLU called as a function is not a module: invisible (documented).
    assert torch_adapter.loss_function(FunctionalRelu().double(), x, y).kinks == ()
    with pytest.warns(LossTraceWarning, match=r"kinks \(ELU, LeakyReLU, ReLU6\)"):
        loss_trace([loss, loss], num_probes=2, rng=0, method="loss")


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "sphere"])
def test_expected_curvature_is_the_trace(distribution: str) -> None:
    """E[ηᵀHη] = tr H (Gaussian, Rademacher) and D E[uᵀHu] = tr H (sphere), within
    5 standard deviations of the known variance."""
    backend = make_backend("numpy")
    d, m = 6, 600
    A = symmetric(d, 8, shift=0.5)
    q = Quadratic(backend, A, np.zeros(d), np.zeros(d))
    est = loss_trace(q, num_probes=m, distribution=distribution, rng=11, method="loss")
    tr, tr2 = np.trace(A), np.trace(A @ A)
    var = {
        "gaussian": 2 * tr2,
        "rademacher": 2 * (tr2 - np.sum(np.diag(A) ** 2)),
        "sphere": 2 * (d * tr2 - tr**2) / (d + 2),
    }[distribution]
    assert abs(float(est.value) - tr) <= 5 * math.sqrt(var / m)
    assert float(est.std_error) == pytest.approx(math.sqrt(var / m), rel=0.25)


def test_filter_directions_estimate_the_weighted_trace() -> None:
    backend = make_backend("numpy")
    blocks = make_blocks([("weight", (3, 4)), ("bias", (3,))])
    d = 15
    A = symmetric(d, 9, shift=2.0)
    theta = np.random.default_rng(10).standard_normal(d)
    q = Quadratic(backend, A, np.zeros(d), theta, blocks=blocks)
    # w_i = ‖θ_f‖² / n_f for i in filter f (rows of the weight; the bias is one filter).
    w = np.empty(d)
    for r in range(3):
        row = theta[4 * r : 4 * r + 4]
        w[4 * r : 4 * r + 4] = row @ row / 4
    w[12:] = theta[12:] @ theta[12:] / 3
    est = loss_trace(q, num_probes=3000, distribution="filter", rng=0, method="loss")
    assert abs(float(est.value) - np.sum(w * np.diag(A))) <= 5 * float(est.std_error)
    assert abs(float(est.value) - np.trace(A)) > 5 * float(est.std_error)  # not tr H
    dirs = random_directions(q, num_directions=4, kind="filter", rng=1)
    np.testing.assert_allclose(
        np.linalg.norm(dirs[:, :12].reshape(4, 3, 4), axis=2),
        np.broadcast_to(np.linalg.norm(theta[:12].reshape(3, 4), axis=1), (4, 3)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        np.linalg.norm(dirs[:, 12:], axis=1), np.linalg.norm(theta[12:]), rtol=1e-12
    )


def test_random_directions_on_every_backend(cpu_backend: Any) -> None:
    theta = np.random.default_rng(0).standard_normal(10)
    blocks = make_blocks([("w", (2, 4)), ("b", (2,))])
    for kind in ("gaussian", "rademacher", "sphere", "filter"):
        expected = random_directions(theta, num_directions=3, kind=kind, blocks=blocks, rng=4)
        got = random_directions(
            cpu_backend.asarray(theta, dtype="float32"),
            num_directions=3,
            kind=kind,
            blocks=blocks,
            rng=4,
        )
        assert got.dtype == cpu_backend.xp.float32
        assert device_of(got) == cpu_backend.device or cpu_backend.device is None
        assert_close(
            got, expected, rtol=1e-5, atol=1e-6, like=cpu_backend, dtype=cpu_backend.xp.float32
        )
    two = random_directions(theta, num_directions=2, rng=4)
    np.testing.assert_array_equal(two, random_directions(theta, num_directions=3, rng=4)[:2])
    np.testing.assert_allclose(
        np.linalg.norm(random_directions(theta, kind="sphere", rng=0), axis=1), 1.0
    )
    assert set(np.unique(random_directions(theta, kind="rademacher", rng=0))) == {-1.0, 1.0}


# --------------------------------------------------------------------------- #
# a trained network: the loss-only trace against the HVP trace


@pytest.fixture(scope="module")
def trained_digits() -> Any:
    """A small tanh MLP trained on a digits subset by plain gradient descent (float64)."""
    torch = pytest.importorskip("torch")
    sklearn = pytest.importorskip("sklearn.datasets")
    from fisherbound.adapters import torch as torch_adapter

    digits = sklearn.load_digits()
    x = torch.as_tensor(digits.data[:240] / 16.0)
    y = torch.as_tensor(digits.target[:240]).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10)
    ).double()
    params = list(model.parameters())
    for _ in range(300):  # plain gradient descent
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.5 * g)
    accuracy = float((model(x).argmax(1) == y).double().mean())
    return model, x, y, accuracy, torch_adapter.loss_function(model, x, y, reduction="mean")


def test_loss_trace_agrees_with_hvp_trace_on_a_trained_network(trained_digits: Any) -> None:
    torch = pytest.importorskip("torch")
    model, x, y, accuracy, loss = trained_digits
    assert accuracy > 0.9  # it did train
    exact = float(torch.trace(torch.func.hessian(loss._loss)(loss.params)))
    by_loss = loss_trace(loss, num_probes=100, rng=1, method="loss")
    by_hvp = loss_trace(loss, num_probes=100, rng=2, method="hvp")
    same = loss_trace(loss, num_probes=100, rng=1, method="hvp")
    se = math.hypot(float(by_loss.std_error), float(by_hvp.std_error))
    assert abs(float(by_loss.value) - float(by_hvp.value)) <= 5 * se
    assert abs(float(by_loss.value) - exact) <= 5 * float(by_loss.std_error)
    assert abs(float(by_hvp.value) - exact) <= 5 * float(by_hvp.std_error)
    # Same probes: the difference is the finite-difference error alone.
    assert float(by_loss.value) == pytest.approx(float(same.value), rel=1e-5)
    # Float32: the default step keeps the loss-only estimate within its error bar.
    model32 = copy.deepcopy(model).float()
    from fisherbound.adapters import torch as torch_adapter

    loss32 = torch_adapter.loss_function(model32, x.float(), y, reduction="mean")
    est32 = loss_trace(loss32, num_probes=100, rng=1, method="loss")  # tanh: no warning
    assert est32.value.dtype == torch.float32
    assert abs(float(est32.value) - exact) <= 5 * float(est32.std_error)


# --------------------------------------------------------------------------- #
# Hessian and Fisher directions


@pytest.mark.parametrize("method", ["lanczos", "shifted"])
def test_hessian_directions_of_the_reference_mlp(host_backend: Any, method: str) -> None:
    cpu_backend = host_backend
    _, _, _, loss = reference_loss(cpu_backend, "tanh", n=8, seed=2)
    H = dense_hessian(cpu_backend, loss)
    evals, evecs = np.linalg.eigh(H)
    d = loss.num_params
    # basis_size = D: a full tridiagonalisation, exact after D products.
    hd = hessian_directions(loss, method=method, num_matvecs=d, basis_size=d, rng=0)
    assert isinstance(hd, EigenDirections)
    assert_close(hd.eigenvalues, [evals[-1], evals[0]], rtol=1e-9, atol=1e-10, like=cpu_backend)
    dirs = cpu_backend.to_numpy(hd.directions)
    assert abs(dirs[0] @ evecs[:, -1]) == pytest.approx(1.0, abs=1e-8)
    assert abs(dirs[1] @ evecs[:, 0]) == pytest.approx(1.0, abs=1e-8)
    assert np.all(cpu_backend.to_numpy(hd.residuals) < 1e-8)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_directions_of_one_end_stop_at_the_tolerance(which: str) -> None:
    backend = make_backend("numpy")
    _, _, _, loss = reference_loss(backend, "tanh", n=8, seed=2)
    H = dense_hessian(backend, loss)
    evals, evecs = np.linalg.eigh(H)
    i = -1 if which == "largest" else 0
    hd = hessian_directions(loss, which=which, tol=1e-8, rng=0)
    assert hd.directions.shape == (1, loss.num_params)
    assert hd.eigenvalues.shape == hd.residuals.shape == (1,)
    lam = float(hd.eigenvalues[0])
    assert lam == pytest.approx(evals[i], rel=1e-12)  # error ≈ residual² / gap
    assert float(hd.residuals[0]) <= 1e-8 * abs(lam)
    assert float(np.linalg.norm(H @ hd.directions[0] - lam * hd.directions[0])) <= 1e-7 * abs(lam)
    assert abs(hd.directions[0] @ evecs[:, i]) == pytest.approx(1.0, abs=1e-10)
    both = hessian_directions(loss, tol=1e-8, rng=0)
    assert float(both.eigenvalues[0 if which == "largest" else 1]) == pytest.approx(lam, rel=1e-12)


def test_hessian_directions_of_a_torch_network() -> None:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters import torch as torch_adapter

    torch.manual_seed(1)
    small = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    loss = torch_adapter.loss_function(small, x, torch.arange(20) % 3)
    d = loss.num_params
    H = loss.hvp_batch(torch.eye(d, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(H, torch.func.hessian(loss._loss)(loss.params).numpy(), atol=1e-10)
    evals, evecs = np.linalg.eigh(H)
    hd = hessian_directions(loss, num_matvecs=d, rng=0)
    assert isinstance(hd.directions, torch.Tensor)
    assert_close(hd.eigenvalues, [evals[-1], evals[0]], rtol=1e-8, atol=0, like="torch")
    assert abs(float(hd.directions[0] @ torch.as_tensor(evecs[:, -1]))) == pytest.approx(
        1, abs=1e-8
    )
    assert abs(float(hd.directions[1] @ torch.as_tensor(evecs[:, 0]))) == pytest.approx(1, abs=1e-8)


def test_fisher_directions_are_the_top_fisher_eigenvectors() -> None:
    model = MLP.random([3, 4, 3], rng=0)
    lin = linearize(model, np.random.default_rng(1).standard_normal((6, 3)))
    F = fisher_dense(lin)
    evals, evecs = np.linalg.eigh(F)
    fd = fisher_directions(lin, num_directions=3, num_matvecs=lin.num_params, rng=0)
    np.testing.assert_allclose(fd.eigenvalues, evals[::-1][:3], rtol=1e-9)
    for i in range(3):
        assert abs(fd.directions[i] @ evecs[:, -1 - i]) == pytest.approx(1.0, abs=1e-7)


# --------------------------------------------------------------------------- #
# saddle probabilities


def test_saddle_probability_closed_forms_on_every_backend(cpu_backend: Any) -> None:
    check_saddle_closed_forms(cpu_backend, 2.0, 1.0)


@pytest.mark.parametrize(("a", "c"), [(1.0, 1.0), (1.0, 3.0), (0.1, 5.0)])
def test_saddle_probability_closed_forms(a: float, c: float) -> None:
    check_saddle_closed_forms(make_backend("numpy"), a, c)


def check_saddle_closed_forms(cpu_backend: Any, a: float, c: float) -> None:
    kappa = cpu_backend.asarray([a, a, -c])
    one = saddle_probability(kappa)
    assert float(one.minimum) == pytest.approx(math.sqrt(a / (a + c)), abs=1e-9)
    assert float(one.maximum) == pytest.approx(1 - math.sqrt(a / (a + c)), abs=1e-9)
    assert float(one.saddle) == 0.0
    two = saddle_probability(kappa, dim=2)
    assert float(two.saddle) == pytest.approx(math.sqrt(c / (a + c)), abs=1e-9)
    assert float(two.minimum) == pytest.approx(1 - math.sqrt(c / (a + c)), abs=1e-9)
    assert float(two.maximum) == 0.0
    assert device_of(two.saddle) == device_of(kappa)
    n = 2000
    for dim, exact in ((1, one), (2, two)):
        mc = saddle_probability(kappa, dim=dim, method="monte_carlo", num_samples=n, rng=1)
        for p_mc, p in zip(mc, exact):
            p = float(p)
            assert abs(float(p_mc) - p) <= 3 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def test_saddle_probability_theory_reference() -> None:
    """THEORY: diag(1, 1, −1) looks convex along one Gaussian direction w.p. 1/√2 (Monte Carlo)."""
    n = 20000
    mc = saddle_probability(np.array([1.0, 1.0, -1.0]), method="monte_carlo", num_samples=n, rng=0)
    p = 2**-0.5
    assert abs(float(mc.minimum) - p) <= 3 * math.sqrt(p * (1 - p) / n)


def test_saddle_probability_general_spectra() -> None:
    kappa = np.array([2.0, 0.5, -1.0, -0.3, 1.5])
    n = 6000
    for dim in (1, 4, 5):
        exact = saddle_probability(kappa, dim=dim)
        mc = saddle_probability(kappa, dim=dim, method="monte_carlo", num_samples=n, rng=dim)
        assert sum(float(p) for p in exact) == pytest.approx(1.0, abs=1e-12)
        for p_mc, p in zip(mc, exact):
            p = float(p)
            assert abs(float(p_mc) - p) <= 3 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert tuple(float(p) for p in saddle_probability(kappa, dim=5)) == (0.0, 0.0, 1.0)
    assert tuple(float(p) for p in saddle_probability(np.array([1.0, 2.0]), dim=2)) == (1, 0, 0)
    # Zero eigenvalues: dropped along one direction; rank < dim gives degenerate sections.
    flat = saddle_probability(np.array([1.0, 0.0, -1.0]))
    assert float(flat.minimum) == pytest.approx(0.5, abs=1e-12)
    degenerate = saddle_probability(
        np.array([1.0, 0.0, 0.0]), dim=2, method="monte_carlo", num_samples=500, rng=0
    )
    assert float(degenerate.minimum) + float(degenerate.saddle) == 0.0
    f32 = saddle_probability(np.array([1.0, 1.0, -1.0], dtype=np.float32))
    assert f32.minimum.dtype == np.float32
    assert float(f32.minimum) == pytest.approx(2**-0.5, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.05, 20.0), min_size=2, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.floats(0.1, 10.0),
)
def test_saddle_probability_invariants(
    magnitudes: list[float], signs: list[bool], scale: float
) -> None:
    kappa = np.array([m if s else -m for m, s in zip(magnitudes, signs)])
    for dim in {1, len(kappa) - 1}:
        p = saddle_probability(kappa, dim=dim)
        total = float(p.minimum) + float(p.maximum) + float(p.saddle)
        assert total == pytest.approx(1.0, abs=1e-10)
        flipped = saddle_probability(-kappa, dim=dim)  # a minimum of H is a maximum of −H
        assert float(flipped.maximum) == pytest.approx(float(p.minimum), abs=1e-10)
        scaled = saddle_probability(scale * kappa, dim=dim)
        assert float(scaled.saddle) == pytest.approx(float(p.saddle), abs=1e-10)


def test_saddle_probability_errors() -> None:
    kappa = np.array([1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1; got 0"):
        saddle_probability(kappa, method="monte_carlo", num_samples=0)
    with pytest.raises(ValueError, match="dim must be at most D = 3, the number of eigenvalues"):
        saddle_probability(kappa, dim=4)
    with pytest.raises(ValueError, match="dim must be an integer >= 1; got 0"):
        saddle_probability(kappa, dim=0)
    with pytest.raises(ValueError, match="method must be one of 'exact', 'monte_carlo'"):
        saddle_probability(kappa, method="mc")
    with pytest.raises(ValueError, match=r"must be a non-empty 1-D array of eigenvalues \(D,\)"):
        saddle_probability(np.eye(3))
    with pytest.raises(ValueError, match="hessian_eigenvalues must be finite; got NaN"):
        saddle_probability(np.array([1.0, np.nan]))
    with pytest.raises(TypeError, match="hessian_eigenvalues must have a real floating-point"):
        saddle_probability(np.array([1, -1]))
    with pytest.raises(ValueError, match="closed forms for dim = 1, dim = D − 1 and dim = D only"):
        saddle_probability(np.array([1.0, 2.0, -1.0, -2.0]), dim=2)
    with pytest.raises(ValueError, match=r"needs nonzero eigenvalues; got 1 zero\(s\)"):
        saddle_probability(np.array([1.0, 0.0, -1.0]), dim=2)


# --------------------------------------------------------------------------- #
# surfaces


def test_surface_of_a_quadratic(cpu_backend: Any) -> None:
    d = 5
    A, rng = symmetric(d, 12), np.random.default_rng(13)
    b, theta, dirs = rng.standard_normal(d), rng.standard_normal(d), rng.standard_normal((2, d))
    q = Quadratic(cpu_backend, A, b, theta)
    s = surface(q, cpu_backend.asarray(dirs), num_points=3, span=0.5, batch_size=4)
    assert s.values.shape == (3, 3)
    t = np.linspace(-0.5, 0.5, 3)
    points = [[theta + a * dirs[0] + c * dirs[1] for c in t] for a in t]
    expected = [[0.5 * p @ A @ p + b @ p for p in row] for row in points]
    assert_close(s.values, expected, rtol=1e-12, atol=0, like=cpu_backend)
    assert s.values.dtype == cpu_backend.xp.float64
    assert device_of(s.values) == device_of(q.params)


def test_surface_matches_direct_evaluation(host_backend: Any) -> None:
    cpu_backend = host_backend
    model, x, y, loss = reference_loss(cpu_backend, "tanh", n=5)
    d = loss.num_params
    dirs = random_directions(loss, num_directions=2, kind="filter", rng=0)
    a = cpu_backend.asarray([-0.5, 0.0, 1.0])
    b = cpu_backend.asarray([-1.0, 0.25])
    s2 = surface(loss, dirs, coordinates=(a, b), batch_size=4)
    assert s2.values.shape == (3, 2)
    assert s2.reduction == "sum"
    theta, dn = cpu_backend.to_numpy(loss.params), cpu_backend.to_numpy(dirs)
    an, bn = cpu_backend.to_numpy(a), cpu_backend.to_numpy(b)
    shifts = np.array([ai * dn[0] + bj * dn[1] for ai in an for bj in bn])
    direct = cpu_backend.to_numpy(loss.value(cpu_backend.asarray(shifts))).reshape(3, 2)
    assert_close(s2.values, direct, rtol=1e-12, atol=0, like=cpu_backend)
    ref_model = MLP.random([4, 5, 3], activation="tanh", rng=0)
    moved = ref_model.with_parameters(theta + an[2] * dn[0] + bn[1] * dn[1])
    assert float(s2.values[2, 1]) == pytest.approx(
        float(loss_function(moved, x, y).value(np.zeros((1, d)))[0]), rel=1e-12
    )
    s1 = surface(loss, dirs[:1, ...], num_points=5, span=2.0)
    assert s1.values.shape == (5,)
    assert_close(s1.coordinates[0], np.linspace(-2, 2, 5), rtol=1e-7, atol=0, like=cpu_backend)
    assert float(s1.values[2]) == pytest.approx(
        float(loss.value(dirs[:1, ...] * 0.0)[0]), rel=1e-12
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_surface_streams_a_data_set(reduction: str) -> None:
    model = MLP.random([4, 5, 3], rng=1)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    whole = loss_function(model, x, y, reduction=reduction)
    parts = [(x[:4], y[:4]), (x[4:], y[4:])]
    dirs = random_directions(whole, num_directions=2, rng=0)
    expected = surface(whole, dirs, num_points=4)
    streamed = surface(
        ref.loss_functions(model, parts, reduction=reduction), dirs, num_points=4, progress=True
    )
    np.testing.assert_allclose(streamed.values, expected.values, rtol=1e-12)
    listed = list(ref.loss_functions(model, parts, reduction=reduction))
    hd_whole = hessian_directions(whole, num_matvecs=whole.num_params, rng=0)
    hd_listed = hessian_directions(listed, num_matvecs=whole.num_params, rng=0)
    np.testing.assert_allclose(hd_listed.eigenvalues, hd_whole.eigenvalues, rtol=1e-9)
    tr_whole = loss_trace(whole, num_probes=6, rng=0, method="loss")
    tr_streamed = loss_trace(
        ref.loss_functions(model, parts, reduction=reduction), num_probes=6, rng=0, method="loss"
    )
    assert float(tr_streamed.value) == pytest.approx(float(tr_whole.value), rel=1e-6)
    pc_whole = projected_curvature(whole, dirs)
    pc_listed = projected_curvature(listed, dirs)
    np.testing.assert_allclose(pc_listed.hessian, pc_whole.hessian, rtol=1e-10)
    along = surface(whole, hd_whole, num_points=3)  # EigenDirections are accepted
    assert along.directions.shape == (2, whole.num_params)


def test_landscape_on_jax_matches_numpy() -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as jax_adapter

    model = MLP.random([4, 5, 3], rng=4)
    x, y = np.random.default_rng(5).standard_normal((6, 4)), np.arange(6) % 3
    perm = jax_order(model)
    apply_fn, params = jax_twin(model)
    j_loss = jax_adapter.loss_function(apply_fn, params, jnp.asarray(x), y)
    n_loss = loss_function(model, x, y)
    dirs = random_directions(n_loss, num_directions=2, rng=0)
    s_np = surface(n_loss, dirs, num_points=3)
    s_jax = surface(j_loss, jnp.asarray(dirs[:, perm]), num_points=3)
    assert_close(s_jax.values, s_np.values, rtol=1e-12, atol=0, like="jax")
    # Rademacher probes are permutation-free in distribution only: compare exact traces.
    H = n_loss.hvp_batch(np.eye(n_loss.num_params))
    est = loss_trace(j_loss, num_probes=40, rng=0, method="loss")
    assert abs(float(est.value) - np.trace(H)) <= 5 * float(est.std_error)


# --------------------------------------------------------------------------- #
# bad input


def test_landscape_errors(host_backend: Any) -> None:
    cpu_backend = host_backend
    _, _, _, loss = reference_loss(cpu_backend, "tanh")
    d = loss.num_params
    good = random_directions(loss, num_directions=2, rng=0)
    with pytest.raises(ValueError, match=r"directions must hold 2 directions \(rows\); got 3"):
        projected_curvature(loss, random_directions(loss, num_directions=3, rng=0))
    with pytest.raises(ValueError, match=rf"directions must have shape \(k, D\) = \(k, {d}\)"):
        surface(loss, cpu_backend.asarray(np.zeros((2, d + 1))))
    with pytest.raises(ValueError, match="directions must be finite; got NaN"):
        projected_curvature(loss, cpu_backend.asarray(np.full((2, d), np.nan)))
    with pytest.raises(ValueError, match="directions must be nonzero for method='loss'"):
        projected_curvature(loss, cpu_backend.asarray(np.zeros((2, d))), method="loss")
    with pytest.raises(TypeError, match="must be a LossFunction"):
        loss_trace(object(), num_probes=2)
    with pytest.raises(TypeError, match="item 1 of source must be a LossFunction"):
        surface([loss, "batch"], good)
    with pytest.raises(TypeError, match="needs a re-iterable source"):
        hessian_operator(iter([loss]))
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1; got 0"):
        loss_trace(loss, num_probes=0)
    with pytest.raises(ValueError, match="distribution must be one of 'gaussian', 'rademacher'"):
        loss_trace(loss, num_probes=2, distribution="normal")
    with pytest.raises(ValueError, match="step must be finite and > 0; got -0.1"):
        loss_trace(loss, num_probes=2, step=-0.1)
    with pytest.raises(ValueError, match="method must be one of 'hvp', 'loss'"):
        projected_curvature(loss, good, method="fd")
    with pytest.raises(ValueError, match="span must be finite and > 0"):
        surface(loss, good, span=0.0)
    with pytest.raises(TypeError, match="coordinates must be None, a 1-D array"):
        surface(loss, good, coordinates=(cpu_backend.asarray([0.0]),))
    with pytest.raises(ValueError, match=r"coordinates\[0\] must be a non-empty 1-D array"):
        surface(loss, good, coordinates=cpu_backend.asarray(np.zeros((2, 2))))
    with pytest.raises(ValueError, match="source must contain at least one loss function"):
        surface([], good)


def test_landscape_errors_numpy() -> None:
    torch = pytest.importorskip("torch")
    _, _, _, loss = reference_loss(make_backend("numpy"), "tanh")
    _, _, _, other = reference_loss(make_backend("numpy"), "tanh", seed=5)
    _, _, _, mean = reference_loss(make_backend("numpy"), "tanh", reduction="mean")
    d = loss.num_params
    good = random_directions(loss, num_directions=2, rng=0)
    with pytest.raises(ValueError, match="same reduction; batch 1 uses 'mean'"):
        hessian_operator([loss, mean])
    with pytest.raises(ValueError, match="frozen at the same parameters θ; batch 1 differs"):
        loss_trace([loss, other], num_probes=2)
    with pytest.raises(ValueError, match="kind='filter' needs the parameter blocks"):
        random_directions(loss.params, kind="filter")
    with pytest.raises(ValueError, match="blocks must cover all D = 43 parameters; they cover 3"):
        random_directions(loss.params, kind="filter", blocks=make_blocks([("w", (3,))]))
    with pytest.raises(ValueError, match=r"params must be a flat, non-empty parameter vector"):
        random_directions(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="all arrays must come from one array library"):
        surface(loss, torch.zeros(2, d, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_matvecs must be at least 2 .* got 1"):
        hessian_directions(loss, num_matvecs=1)
    with pytest.raises(ValueError, match="which must be one of 'both', 'largest', 'smallest'"):
        hessian_directions(loss, which="top")
    with pytest.raises(ValueError, match="method='shifted' finds both ends .* got which='largest'"):
        hessian_directions(loss, which="largest", method="shifted")
    with pytest.raises(ValueError, match="tol must be a finite real number >= 0"):
        hessian_directions(loss, tol=-1.0)
    with pytest.raises(ValueError, match="method must be one of 'lanczos', 'shifted'"):
        hessian_directions(loss, method="power")
    tiny = loss_function(
        LinearSoftmax(np.zeros((1, 1))), np.ones((2, 1)), np.zeros((2, 1)), family=Gaussian()
    )
    with pytest.raises(ValueError, match="needs at least two parameters"):
        hessian_directions(tiny)
    one = hessian_directions(tiny, which="smallest")  # one end needs one parameter only
    assert one.eigenvalues.tolist() == hessian_operator(tiny).matmat(np.ones((1, 1)))[0].tolist()
    lin = linearize(MLP.random([2, 2], rng=0), np.ones((1, 2)))
    with pytest.raises(ValueError, match="num_directions must be at most D = 6"):
        fisher_directions(lin, num_directions=7)
    assert hessian_operator(loss).shape == (d, d)
    assert isinstance(good, np.ndarray)


def test_doctests() -> None:
    assert doctest.testmod(landscape).failed == 0
    assert doctest.testmod(ref).failed == 0


def test_more_error_messages() -> None:
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as jax_adapter
    from fisherbound.adapters import torch as torch_adapter

    backend = make_backend("numpy")
    _, _, _, loss = reference_loss(backend, "tanh")
    _, _, _, small = reference_loss(backend, "linear")
    d = loss.num_params
    good = random_directions(loss, num_directions=2, rng=0)
    with pytest.raises(ValueError, match="same parameters; batch 1 has D = 12, batch 0 has D = 43"):
        hessian_operator([loss, small])
    with pytest.raises(TypeError, match="step must be a real number; got str '1'"):
        loss_trace(loss, num_probes=2, step="1")
    with pytest.raises(TypeError, match="blocks must be a non-empty sequence of ParameterBlock"):
        random_directions(loss.params, kind="filter", blocks=[])
    with pytest.raises(TypeError, match=r"blocks\[0\] must be a ParameterBlock; got tuple"):
        random_directions(loss.params, kind="filter", blocks=[("w", (d,), 0, d)])
    shuffled = make_blocks([("a", (3,)), ("b", (d - 3,))])[::-1]
    with pytest.raises(ValueError, match=r"blocks must tile the parameter vector in order"):
        random_directions(loss.params, kind="filter", blocks=shuffled)
    strict = make_backend("strict-device1")
    _, _, _, on_device = reference_loss(strict, "tanh")
    import array_api_strict as xs

    cpu = xs.asarray(np.zeros((2, d)), device=xs.Device("CPU_DEVICE"))
    with pytest.raises(ValueError, match="directions must be on the device of the parameters"):
        surface(on_device, cpu)
    dirs = strict.asarray(good)
    with pytest.raises(ValueError, match=r"coordinates\[0\] must be on the device of the param"):
        surface(on_device, dirs, coordinates=xs.asarray([0.0], device=xs.Device("CPU_DEVICE")))
    # torch and JAX adapters
    with pytest.raises(ValueError, match=r"model\(inputs\) must return logits of shape"):
        torch_adapter.loss_function(
            torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)).double(),
            torch.ones(2, 3, dtype=torch.float64),
            torch.zeros(2),
        )
    with pytest.raises(TypeError, match="batches must be an iterable of"):
        torch_adapter.loss_functions(torch.nn.Linear(2, 2), torch.ones(2, 2))
    with pytest.raises(TypeError, match="batches must be an iterable of"):
        jax_adapter.loss_functions(lambda p, x: x @ p, jnp.ones((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(TypeError, match=r"batch 0 must be a pair \(inputs, labels\)"):
        list(jax_adapter.loss_functions(lambda p, x: x @ p, jnp.ones((2, 2)), [jnp.ones((2, 2))]))


def test_more_plotting_error_messages() -> None:
    pytest.importorskip("matplotlib")
    from fisherbound.plotting import plot_fisher_diagonal, plot_spectral_density, plot_surface

    blocks = make_blocks([("w", (3,))])
    with pytest.raises(TypeError, match="bounds must be a pair"):
        plot_fisher_diagonal(blocks, bounds=np.ones(3))
    with pytest.raises(TypeError, match=r"blocks\[0\] must be a ParameterBlock"):
        plot_fisher_diagonal(["w"], exact=np.ones(3))
    with pytest.raises(ValueError, match=r"std_error must have the shape of grid \(3,\)"):
        plot_spectral_density(np.ones(3), grid=np.ones(3), std_error=np.ones(2))
    bad = landscape.Surface(([0.0, 1.0],), np.ones(2), np.ones((1, 2)), "sum")
    with pytest.raises(TypeError, match=r"surface.coordinates\[0\] must be an array"):
        plot_surface(bad)


def _torch_loss_pair() -> tuple[Any, Any, Any]:
    torch = pytest.importorskip("torch")
    from fisherbound.adapters.torch import loss_function

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1])
    return torch, net, loss_function(net, x, y, params=["2.weight", "2.bias"])


def test_torch_hvp_graph_is_rebuilt_when_a_frozen_parameter_changes_in_place() -> None:
    torch, net, loss = _torch_loss_pair()
    v = torch.linspace(-1.0, 1.0, loss.num_params, dtype=torch.float64)
    first = loss.hvp(v)
    np.testing.assert_allclose(first.numpy(), loss.hvp_batch(v[None])[0].numpy(), atol=1e-12)
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # not selected: the graph saved the old tensor
    again = loss.hvp(v)
    np.testing.assert_allclose(again.numpy(), loss.hvp_batch(v[None])[0].numpy(), atol=1e-12)
    assert float((again - first).abs().max()) > 1e-3  # the new weights count


def test_torch_hvp_holds_one_graph_and_refuses_a_wrong_double_backward() -> None:
    torch, net, loss = _torch_loss_pair()
    _, _, other = _torch_loss_pair()
    v = torch.ones(loss.num_params, dtype=torch.float64)
    loss.hvp(v)
    assert loss._grad_graph is not None
    other.hvp(v)
    assert loss._grad_graph is None
    assert other._grad_graph is not None

    class Square(torch.autograd.Function):  # backward without a usable double backward
        @staticmethod
        def forward(ctx: Any, z: Any) -> Any:
            ctx.save_for_backward(z)
            return z * z

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, grad: Any) -> Any:
            (z,) = ctx.saved_tensors
            return 2.0 * z * grad

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()

        def forward(self, x: Any) -> Any:
            return Square.apply(self.lin(x))

    from fisherbound.adapters.torch import loss_function

    odd = loss_function(Net(), torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    w = torch.ones(odd.num_params, dtype=torch.float64)
    # Forward-over-reverse cannot differentiate it either: an error, never a wrong number.
    with pytest.raises(RuntimeError):
        odd.hvp(w)


def test_torch_hvp_checks_double_backward_once_per_model(monkeypatch: Any) -> None:
    torch, net, loss = _torch_loss_pair()
    from fisherbound.adapters.torch import loss_function

    calls = []
    cls = type(loss)
    original = cls._hvp

    def counted(self: Any, v: Any) -> Any:
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(cls, "_hvp", counted)
    v = torch.linspace(-1.0, 1.0, loss.num_params, dtype=torch.float64)
    first = loss.hvp(v)
    assert len(calls) == 1  # the check of the first product
    x2 = torch.randn(6, 3, dtype=torch.float64)
    y2 = torch.zeros(6, dtype=torch.int64)
    second = loss_function(net, x2, y2, params=["2.weight", "2.bias"])
    h2 = second.hvp(v)
    assert len(calls) == 1  # same model and selection: not checked again
    np.testing.assert_allclose(h2.numpy(), original(second, v).numpy(), atol=1e-12)
    assert float((h2 - first).abs().max()) > 1e-6  # another batch, another Hessian


# ------------------------------------------ non-finite and overflowing θ (issue 15)
def test_default_step_checks_params_and_scales_the_norm(backend) -> None:
    with pytest.raises(ValueError, match=r"^params must be finite; got NaN at positions \[1\]\.$"):
        landscape.default_step(backend.asarray([1.0, np.nan]))  # was a NaN step
    with pytest.raises(TypeError, match=r"params must have a real floating-point dtype"):
        landscape.default_step(backend.asarray([1, 2], dtype="int64"))  # was NumPy's finfo error
    with pytest.raises(ValueError, match=r"params must be a flat, non-empty parameter vector"):
        landscape.default_step(backend.asarray(np.ones((2, 2))))
    # ‖θ‖ = 1e30 overflows float32 when squared (was an inf step): scaled, it is exact.
    theta = backend.asarray([1e30, 1.0], dtype="float32")
    h = landscape.default_step(theta)
    eps = float(np.finfo(np.float32).eps)
    assert_close(h, eps**0.25 * 1e30, rtol=1e-6, atol=0, like=theta)
    big = backend.asarray([3e38, 3e38], dtype="float32")  # ‖θ‖ = 4.2e38 itself overflows
    with (
        np.errstate(over="ignore"),
        pytest.raises(ValueError, match=r"params must have a norm finite in .*float32.*step="),
    ):
        landscape.default_step(big)


def test_random_directions_check_params(backend) -> None:
    with pytest.raises(ValueError, match=r"^params must be finite; got inf at positions \[0\]\.$"):
        random_directions(backend.asarray([np.inf, 1.0]), rng=0)
    block = [make_blocks([("w", (2,))])[0]]
    d = random_directions(
        backend.asarray([1e30, 1.0], dtype="float32"), kind="filter", blocks=block, rng=0
    )
    assert np.all(np.isfinite(backend.to_numpy(d)))  # the filter norm, scaled: no overflow
    big = backend.asarray([3e38, 3e38], dtype="float32")
    with (
        np.errstate(over="ignore", invalid="ignore"),
        pytest.raises(ValueError, match=r"params must have filters whose norms are finite"),
    ):
        random_directions(big, kind="filter", blocks=block, rng=0)
