"""The finite check on inputs, model outputs and every product (``fisherbound._finite``).

A non-finite result never comes back silently: each case raises a ValueError that
names the quantity, the examples or parameter blocks and the likely cause.
"""

from __future__ import annotations

import numpy as np
import pytest
from _models import jax_mlp, mlp_weights, torch_mlp

import fisherbound._finite as finite
from fisherbound import estimators, fisher
from fisherbound.adapters import numpy as fnp
from fisherbound.linearization import LinearizationBase

WS, BS = mlp_weights((4, 8, 3), 0)
X = np.random.default_rng(0).standard_normal((5, 4))


def _torch():
    return pytest.importorskip("torch")


# -- inputs --------------------------------------------------------------------


def test_torch_non_finite_input_is_refused_at_linearize() -> None:
    torch = _torch()
    from fisherbound.adapters import torch as ft

    x = torch.as_tensor(X).clone()
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"inputs\[0\] must be finite; got inf in examples \[1\]"):
        ft.linearize(torch_mlp(WS, BS), x)
    with pytest.raises(ValueError, match=r"inputs\[0\] must be finite; got inf in examples \[1\]"):
        ft.loss_function(torch_mlp(WS, BS), x, torch.tensor([0, 1, 2, 0, 1]))
    # An image batch (N, C, H, W): the message names the example, not a flattened row.
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten()).double()
    images = torch.zeros(4, 2, 5, 5, dtype=torch.float64)
    images[3, 1, 2, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"inputs\[0\] must be finite; got NaN in examples \[3\]\."
    ):
        ft.linearize(conv, images)
    # Integer inputs (token ids) are not floating: nothing to check.
    emb = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Flatten()).double()
    assert ft.linearize(emb, torch.tensor([[1], [4]])).logits.shape == (2, 3)


def test_jax_non_finite_input_is_refused_at_linearize() -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as fj

    apply_fn, params = jax_mlp(WS, BS)
    x = jnp.asarray(X).at[3, 2].set(-jnp.inf)
    with pytest.raises(ValueError, match=r"inputs must be finite; got inf in examples \[3\]"):
        fj.linearize(apply_fn, params, x)
    with pytest.raises(ValueError, match=r"inputs must be finite; got inf in examples \[3\]"):
        fj.loss_function(apply_fn, params, x, jnp.asarray([0, 1, 2, 0, 1]))


def test_non_finite_parameters_are_refused_by_name() -> None:
    """An infinite weight behind a saturated tanh gives finite logits: refused anyway."""
    ws = [w.copy() for w in WS]
    ws[0][1, 2] = np.inf
    match = r"parameters must be finite; got NaN or inf in \['layers.0.weight'\]"
    with pytest.raises(ValueError, match=match):
        fnp.linearize(fnp.MLP(ws, BS), X)
    torch = _torch()
    from fisherbound.adapters import torch as ft

    model = torch_mlp(WS, BS)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    match = r"parameters must be finite; got NaN or inf in \['2.bias'\]"
    with pytest.raises(ValueError, match=match):
        ft.linearize(model, torch.as_tensor(X))
    with pytest.raises(ValueError, match=match):
        ft.loss_function(model, torch.as_tensor(X), torch.tensor([0, 1, 2, 0, 1]))


def test_jax_non_finite_parameters_are_refused_by_name() -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters import jax as fj

    apply_fn, params = jax_mlp(WS, BS)
    params[1] = (params[1][0].at[0, 0].set(-jnp.inf), params[1][1])
    with pytest.raises(ValueError, match=r"parameters must be finite; got NaN or inf in \['\[1\]"):
        fj.linearize(apply_fn, params, jnp.asarray(X))


def test_non_finite_logits_from_finite_parameters_name_the_cause() -> None:
    """Finite parameters and inputs whose logits overflow: the overflow is named."""
    ws = [w * 1e200 for w in WS]
    with (
        np.errstate(over="ignore", invalid="ignore"),
        pytest.raises(
            ValueError,
            match=r"logits must be finite; got .* No parameter or input is non-finite, so an "
            r"intermediate overflowed in float64",
        ),
    ):
        fnp.linearize(fnp.MLP(ws, BS, activation="relu"), X * 1e100)


# -- products ------------------------------------------------------------------


def _lin():
    return fnp.linearize(fnp.MLP(WS, BS), X)


@pytest.mark.parametrize(
    ("method", "shape", "label", "where"),
    [
        ("jvp", ("D",), "the JVP J v", r"examples \[0, 1, 2, 3, 4\]"),
        ("vjp", (5, 3), "the VJP Jᵀ u", r"parameter blocks \['layers.0.weight', "),
        ("jvp_batch", (2, "D"), "the batched JVPs J V", r"examples \[0, 1, 2, 3, 4\]"),
        ("vjp_batch", (2, 5, 3), "the batched VJPs Jᵀ U", r"parameter blocks"),
    ],
)
def test_non_finite_operand_is_named(method: str, shape: tuple, label: str, where: str) -> None:
    lin = _lin()
    shape = tuple(lin.num_params if s == "D" else s for s in shape)
    bad = np.ones(shape)
    bad.flat[0] = np.nan
    with pytest.raises(
        ValueError, match=rf"{label} of the linearization must be finite; got NaN"
    ) as e:
        getattr(lin, method)(bad)
    assert "its operand (argument 1) is not finite" in str(e.value)
    assert e.match(where)


def test_per_example_products_name_the_examples_of_the_slice() -> None:
    lin = _lin()
    U = np.ones((2, 1, 3))
    U[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"per-example VJPs J_nᵀ U .* in examples \[3\] and"):
        lin.per_example_vjp(U, examples=slice(2, 4))


def _cancelling_linear(torch):
    """nn.Linear(4, 3) whose weights cancel the 1e30 inputs of example 2 (float32)."""
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(
            torch.tensor([[1.0, -1.0, 0.5, 0.0]] * 3) * torch.tensor([[1.0], [2], [3]])
        )
    x = torch.as_tensor(X, dtype=torch.float32).clone()
    x[2, :2] = 1e30  # w · x stays finite: 1e30 − 1e30 = 0
    return model, x


def test_overflowing_input_names_the_cause_in_float32() -> None:
    """Weights that cancel a 1e30 input keep the logits finite and δ ≠ 0: the true
    per-example squares (δ · 1e30)² are not representable in float32, and the message
    names the input."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    model, x = _cancelling_linear(torch)
    with pytest.raises(
        ValueError,
        match=r"per-example squares .* must be finite; got .*inf .* Likely cause: inputs\[0\] has "
        r"entries above 1\.84e\+19 in absolute value in examples \[2\], whose squares overflow",
    ):
        fisher.fisher_diagonal(ft.linearize(model, x))


def test_bias_behind_an_overflowing_input_stays_exact_in_float32() -> None:
    """The bias's per-example gradient is δ, finite whatever the input: its exact
    diagonal must come out finite and right although (δ · 1e30)² overflows."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    model, x = _cancelling_linear(torch)
    got = fisher.fisher_diagonal(ft.linearize(model, x, params=["bias"]))
    with torch.no_grad():  # ∂z/∂b = I: diag F_bias = Σ_n p_n (1 − p_n)
        p = torch.softmax(model(x), dim=-1)
    torch.testing.assert_close(got, (p * (1 - p)).sum(dim=0), rtol=1e-5, atol=0)


def test_loss_hvp_of_non_finite_vector() -> None:
    torch = _torch()
    from fisherbound.adapters import torch as ft

    loss = ft.loss_function(torch_mlp(WS, BS), torch.as_tensor(X), torch.tensor([0, 1, 2, 0, 1]))
    v = torch.full((loss.num_params,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Hessian-vector product H v of the loss function must"):
        loss.hvp(v)
    assert torch.isfinite(loss.hvp(torch.ones_like(v))).all()  # the next product is fine


def test_an_intermediate_overflow_is_named_as_such() -> None:
    """Finite inputs and parameters, a non-finite product: the message says so."""
    lin = _lin()
    with (
        np.errstate(over="ignore"),
        pytest.raises(ValueError, match=r"got inf .* No parameter or input is non-finite, so an"),
    ):
        lin.vjp(np.full((5, 3), 1e308))


def test_finite_results_whose_sum_overflows_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check sums the result; an overflowing sum of finite entries is no error."""
    lin = _lin()
    huge = np.full(lin.num_params, 1e308)  # finite entries, an infinite sum
    spec = type(lin).checked_products["vjp"]
    finite._check(lin, huge, spec, 0, ())  # on the host: confirmed entry by entry
    monkeypatch.setattr(finite, "is_host_device", lambda x: False)
    finite._check(lin, huge, spec, 0, ())
    finite.flush(lin)  # deferred: confirmed when the flag is read
    huge[3] = np.inf
    finite._check(lin, huge, spec, 0, ())
    with pytest.raises(ValueError, match=r"the VJP Jᵀ u of the linearization is not finite"):
        finite.flush(lin)


def test_nested_products_are_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic per-example product calls vjp_batch: one check, at the outer call."""
    calls = []
    check = finite._check
    monkeypatch.setattr(finite, "_check", lambda *a: calls.append(a[2].label) or check(*a))
    lin = _lin()
    out = LinearizationBase.per_example_vjp(lin, np.ones((5, 2, 3)))
    assert out.shape == (5, 2, lin.num_params)
    assert calls == ["the per-example VJPs J_nᵀ U"]


def test_deferred_checks_raise_when_the_flags_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an accelerator the flags wait on the device: read at the next batch of a
    stream, or once PENDING_LIMIT of them wait, never between two products."""
    monkeypatch.setattr(finite, "is_host_device", lambda x: False)
    lin = _lin()
    out = lin.jvp(np.full(lin.num_params, np.nan))  # returns: the check waits
    assert np.isnan(out).all()
    for _ in range(finite.PENDING_LIMIT - 2):
        lin.jvp(np.ones(lin.num_params))  # no read yet
    with pytest.raises(ValueError, match=r"the JVP J v of the linearization is not finite \(found"):
        lin.jvp(np.ones(lin.num_params))  # the limit: every waiting flag read at once
    lin.jvp(np.ones(lin.num_params))  # read once; later products are fine
    assert len(lin.__dict__["_finite_pending"]) == 1  # a flag, not the array

    # A data stream reads it when the analysis moves to the next batch.
    batches = [_lin(), _lin()]

    def analysis() -> None:
        for lin_b in finite_stream(iter(batches)):
            lin_b.vjp(np.full((5, 3), np.nan))

    with pytest.raises(ValueError, match=r"not finite \(found after it returned"):
        analysis()


def finite_stream(source):
    from fisherbound._stream import Stream
    from fisherbound.families import Categorical

    return Stream(source, Categorical(), desc="test", progress=False)


def test_estimators_never_return_nan_silently() -> None:
    """The issue's case: a tanh MLP with one input at +inf (torch)."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    x = torch.as_tensor(X).clone()
    x[1, 0] = float("inf")
    model = torch_mlp(WS, BS)
    for run in (
        lambda: fisher.fisher_diagonal(ft.linearizations(model, [x])),
        lambda: estimators.detach_and_mix(ft.linearizations(model, [x]), num_probes=2, rng=0),
    ):
        with pytest.raises(ValueError, match=r"must be finite; got inf in examples \[1\]"):
            run()


def test_saturated_unit_behind_a_huge_input_gives_the_exact_diagonal() -> None:
    """tanh(1e30 w) saturates: δ = 0 and the true per-example gradient is 0, but the
    fast path's a² overflowed float32 (0 · inf = NaN); scaled by powers of two, it is
    the float64 diagonal to float32 rounding."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    x = torch.as_tensor(X).clone()
    x[1, 0] = 1e30
    exact = fisher.fisher_diagonal(ft.linearize(torch_mlp(WS, BS), x))
    got = fisher.fisher_diagonal(ft.linearize(torch_mlp(WS, BS).float(), x.float()))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * float(exact.max()))


def test_torch_parameters_are_checked_by_every_call() -> None:
    """Every linearize / loss_function call, and the first batch of each stream, checks
    the parameters: a write between calls is seen however it was made (a fused
    optimiser step leaves the tensors' version counters alone)."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    model = torch_mlp(WS, BS)
    x = torch.as_tensor(X)
    ft.linearize(model, x)
    model[0].weight.data[0, 0] = float("inf")  # a write torch does not count
    with pytest.raises(
        ValueError, match=r"parameters must be finite; got NaN or inf in \['0.weight'\]"
    ):
        ft.linearize(model, x)
    with pytest.raises(ValueError, match=r"\['0.weight'\]"):
        next(iter(ft.linearizations(model, [x, x])))


def test_products_under_torch_func_transforms() -> None:
    """vmap's batched tensors have no value to read: the check passes them (as JAX
    tracers), and the products compose with torch.func as before."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    lin = ft.linearize(torch_mlp(WS, BS), torch.as_tensor(X))
    V = torch.ones(2, lin.num_params, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lin.jvp)(V), lin.jvp_batch(V))
    U = torch.ones(2, *lin.output_shape, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(lin.vjp)(U), lin.vjp_batch(U))
    loss = ft.loss_function(torch_mlp(WS, BS), torch.as_tensor(X), torch.tensor([0, 1, 2, 0, 1]))
    torch.testing.assert_close(torch.func.vmap(loss.hvp)(V), loss.hvp_batch(V))


def test_array_api_strict_is_checked_at_once() -> None:
    """Only accelerators defer: array-api-strict's devices are host memory."""
    xp = pytest.importorskip("array_api_strict")
    model = fnp.MLP([xp.asarray(w) for w in WS], [xp.asarray(b) for b in BS])
    lin = fnp.linearize(model, xp.asarray(X))
    assert finite.is_host_device(lin.logits)
    with pytest.raises(ValueError, match=r"the JVP J v of the linearization must be finite"):
        lin.jvp(xp.full((lin.num_params,), float("nan"), dtype=xp.float64))


def test_linear_fast_path_keeps_small_entries_of_large_inputs() -> None:
    """Only examples whose squares would overflow are scaled (scaling pushed 1e-10
    beside 1e15 into underflow in float32: its square came back 0)."""
    torch = _torch()
    from fisherbound.adapters import torch as ft

    lin = ft.linearize(torch.nn.Linear(2, 1, bias=False), torch.tensor([[1e15, 1e-10]]))
    U = torch.ones(1, 1, 1)
    torch.testing.assert_close(lin.sum_squared_per_example_vjp(U), lin.per_example_vjp(U)[0] ** 2)


def test_jax_parameters_are_checked_once_per_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """JAX arrays are immutable: a θ leaf checked finite is not read again by later
    linearize calls; a new (updated) leaf is."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from fisherbound.adapters import _jax_checks
    from fisherbound.adapters import jax as fj

    apply_fn, params = jax_mlp(WS, BS)
    read: list[list[str]] = []
    check = _jax_checks.check_parameters_finite
    monkeypatch.setattr(
        _jax_checks,
        "check_parameters_finite",
        lambda named: read.append([n for n, _ in named]) or check(named),
    )
    x = jnp.asarray(X)
    for _ in range(3):
        fj.linearize(apply_fn, params, x)
    assert len(read) == 1
    params[1] = (params[1][0].at[0, 0].set(jnp.nan), params[1][1])  # an update: a new leaf
    with pytest.raises(
        ValueError, match=r"parameters must be finite; got NaN or inf in \['\[1\]\[0\]'\]"
    ):
        fj.linearize(apply_fn, params, x)
    assert read[-1] == ["[1][0]"]
