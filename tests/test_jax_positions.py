"""The JAX adapter with position axes: logits (N, *S, C), masks, selectors, pytree inputs.

Two tiny float64 models: a sequence model taking a dict of inputs and returning a
dict ({"logits": (N, T, C), "hidden": ...}), and a segmentation-like model
returning a tuple (aux, logits (N, C, H, W)) read with ``output=1,
class_axis=1``. Every product is checked against dense per-position Jacobians
from ``jax.jacrev`` (masked rows zeroed by hand), the loss against a hand-written
optax-style cross-entropy, and the Fisher diagonal against
Σ_x Σ_t diag(J_xtᵀ K(z_xt) J_xt).
"""

from __future__ import annotations

import doctest
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _assertions import assert_close
from jax.flatten_util import ravel_pytree

from fisherbound.adapters import jax as jax_adapter
from fisherbound.adapters.jax import linearizations, linearize, loss_function, loss_functions
from fisherbound.families import Bernoulli, Categorical

N, T, F, H, C = 3, 4, 2, 5, 3
HW = (2, 3)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def seq_apply(params: dict[str, Any], x: dict[str, Any]) -> dict[str, Any]:
    """(N, T, F) tokens -> (N, T, C) logits; positions interact through a per-example mean."""
    h = jnp.tanh(x["tokens"] @ params["w1"] + params["b1"])
    h = h + jnp.mean(h, axis=1, keepdims=True) * params["mix"]
    return {"logits": h @ params["w2"], "hidden": h}


def seg_apply(params: dict[str, Any], x: Any) -> tuple[Any, Any]:
    """(N, F, H, W) images -> (aux, (N, C, H, W) logits), pixels mixed by a roll."""
    h = jnp.tanh(jnp.einsum("nfhw,fk->nkhw", x, params["conv"]))
    h = h + 0.5 * jnp.roll(h, 1, axis=3)
    z = jnp.einsum("nkhw,kc->nchw", h, params["head"]) + params["bias"][None, :, None, None]
    return jnp.sum(h), z


@dataclass
class Case:
    lin: Any
    params: Any
    inputs: Any
    logits_of: Any  # flat θ -> logits (N, *S, C) classes last
    mask: Any  # (N, *S) bool or None


def _seq_params(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "w1": jnp.asarray(rng.normal(size=(F, H))),
        "b1": jnp.asarray(0.3 * rng.normal(size=(H,))),
        "mix": jnp.asarray(rng.normal(size=(H,))),
        "w2": jnp.asarray(rng.normal(size=(H, C)) / np.sqrt(H)),
    }


def _seg_params(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "conv": jnp.asarray(rng.normal(size=(F, H))),
        "head": jnp.asarray(rng.normal(size=(H, C)) / np.sqrt(H)),
        "bias": jnp.asarray(0.2 * rng.normal(size=(C,))),
    }


def _seq_inputs(rng: np.random.Generator) -> dict[str, Any]:
    keep = np.ones((N, T), dtype=bool)
    keep[0, 3] = keep[1, 2:] = False
    return {"tokens": jnp.asarray(rng.normal(size=(N, T, F))), "keep": jnp.asarray(keep)}


@pytest.fixture(scope="module")
def seq_case() -> Case:
    rng = np.random.default_rng(0)
    params, x = _seq_params(rng), _seq_inputs(rng)
    _, unravel = ravel_pytree(params)
    lin = linearize(seq_apply, params, x, output="logits", mask=lambda x: x["keep"])
    return Case(lin, params, x, lambda th: seq_apply(unravel(th), x)["logits"], x["keep"])


@pytest.fixture(scope="module")
def seg_case() -> Case:
    rng = np.random.default_rng(1)
    params = _seg_params(rng)
    x = jnp.asarray(rng.normal(size=(N, F, *HW)))
    mask = jnp.asarray(rng.random((N, *HW)) < 0.7).at[0, 0, 0].set(True)
    _, unravel = ravel_pytree(params)
    lin = linearize(seg_apply, params, x, output=1, class_axis=1, mask=mask)

    def logits_of(th: Any) -> Any:
        return jnp.moveaxis(seg_apply(unravel(th), x)[1], 1, -1)

    return Case(lin, params, x, logits_of, mask)


def _dense(case: Case) -> Any:
    """The masked per-position Jacobian (N, *S, C, D) by jax.jacrev."""
    theta = ravel_pytree(case.params)[0]
    J = jax.jacrev(case.logits_of)(theta)
    return jnp.where(case.mask[..., None, None], J, 0.0)


# ----------------------------------------------------------------------------
# Products against dense Jacobians
# ----------------------------------------------------------------------------


@pytest.mark.slow  # about 6 s each: every product kernel compiles for (N, *S, C)
@pytest.mark.parametrize("name", ["seq_case", "seg_case"])
def test_products_match_dense_masked_jacobians(name: str, request: pytest.FixtureRequest) -> None:
    case = request.getfixturevalue(name)
    lin = case.lin
    J = _dense(case)
    shape = tuple(J.shape[:-1])
    assert lin.output_shape == shape
    assert lin.num_positions == int(np.prod(shape[1:-1]))
    assert_close(lin.logits, case.logits_of(lin.flat_params), rtol=1e-13, atol=0)
    assert lin.mask is not None
    assert bool(jnp.all(lin.mask == case.mask))
    d = lin.num_params
    rng = np.random.default_rng(5)
    v = jnp.asarray(rng.normal(size=d))
    V = jnp.asarray(rng.normal(size=(2, d)))
    u = jnp.asarray(rng.normal(size=shape))
    U = jnp.asarray(rng.normal(size=(2, *shape)))
    Uk = jnp.asarray(rng.normal(size=(shape[0], 2, *shape[1:])))
    tol = {"rtol": 1e-11, "atol": 1e-13}
    assert_close(lin.jvp(v), J @ v, **tol)
    assert_close(lin.jvp_batch(V), jnp.einsum("...d,md->m...", J, V), **tol)
    assert_close(lin.vjp(u), jnp.einsum("...d,...->d", J, u), **tol)
    assert_close(lin.vjp_batch(U), jnp.einsum("...d,m...->md", J, U), **tol)
    # Per example: J_xᵀ U[x, k] sums over the positions of x.
    per = jnp.einsum("n...d,nk...->nkd", J, Uk)
    assert_close(lin.per_example_vjp(Uk), per, **tol)
    assert_close(lin.per_example_vjp(Uk[1:3], examples=slice(1, 3)), per[1:3], **tol)
    squares = jnp.sum(per * per, axis=0)
    assert_close(lin.sum_squared_per_example_vjp(Uk), squares, **tol)
    assert_close(lin.sum_squared_per_example_vjp(Uk, max_vectors=1), squares, **tol)
    assert_close(
        lin.sum_squared_per_example_vjp(Uk, sum_cotangents=True), jnp.sum(squares, 0), **tol
    )
    # Masked positions: jvp is zero there, their cotangents change nothing.
    keep = case.mask[..., None]
    assert bool(jnp.all(jnp.where(keep, 0.0, lin.jvp(v)) == 0.0))
    assert_close(lin.vjp(jnp.where(keep, u, 1e3)), lin.vjp(u), **tol)


def test_second_derivative_diagonal_with_positions(seg_case: Case) -> None:
    lin = seg_case.lin
    theta = lin.flat_params
    hess = jax.jacfwd(jax.jacfwd(seg_case.logits_of))(theta)  # (N, H, W, C, D, D)
    diag = jnp.diagonal(hess, axis1=-2, axis2=-1)
    diag = jnp.where(seg_case.mask[..., None, None], diag, 0.0)
    got = lin.output_second_derivative_diagonal(max_vectors=7)
    assert_close(got, diag, rtol=1e-11, atol=1e-13)


def test_without_mask_and_dense_jacobian_of_all_positions(seq_case: Case) -> None:
    lin = linearize(seq_apply, seq_case.params, seq_case.inputs, output="logits")
    assert lin.mask is None
    J = jax.jacrev(seq_case.logits_of)(lin.flat_params)
    u = jnp.asarray(np.random.default_rng(2).normal(size=(N, T, C)))
    assert_close(lin.vjp(u), jnp.einsum("...d,...->d", J, u), rtol=1e-11, atol=1e-13)
    assert_close(lin.jvp(jnp.ones(lin.num_params)), jnp.sum(J, -1), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "output",
    [lambda out: out["logits"], "logits"],
    ids=["callable", "str"],
)
def test_output_selectors_agree(seq_case: Case, output: Any) -> None:
    lin = linearize(seq_apply, seq_case.params, seq_case.inputs, output=output)
    assert_close(lin.logits, seq_case.lin.logits, rtol=0, atol=0)


def test_attribute_selector_and_tuple_inputs() -> None:
    @dataclass
    class ModelOutput:  # a Hugging Face-like output: logits as an attribute
        logits: Any
        loss: Any

    def apply(p: Any, x: tuple[Any, Any]) -> ModelOutput:
        a, b = x
        return ModelOutput(logits=(a @ p)[:, None, :] * b[:, :, None], loss=None)

    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(F, C)))
    x = (jnp.asarray(rng.normal(size=(N, F))), jnp.asarray(rng.normal(size=(N, T))))
    lin = linearize(apply, w, x, output="logits")
    J = jax.jacrev(lambda th: apply(th.reshape(F, C), x).logits)(jnp.ravel(w))
    Uk = jnp.asarray(rng.normal(size=(N, 2, T, C)))
    assert_close(
        lin.per_example_vjp(Uk), jnp.einsum("ntcd,nktc->nkd", J, Uk), rtol=1e-12, atol=1e-13
    )


def test_coupled_examples_use_the_exact_masked_path(seq_case: Case) -> None:
    def coupled(p: Any, x: Any) -> Any:  # a batch mean couples the examples
        z = seq_apply(p, x)["logits"]
        return z - jnp.mean(z, axis=0, keepdims=True) * 0.5

    x, mask = seq_case.inputs, seq_case.mask
    lin = linearize(coupled, seq_case.params, x, mask=mask)
    assert not lin.examples_independent
    _, unravel = ravel_pytree(seq_case.params)
    J = jax.jacrev(lambda th: coupled(unravel(th), x))(lin.flat_params)
    J = jnp.where(mask[..., None, None], J, 0.0)
    Uk = jnp.asarray(np.random.default_rng(4).normal(size=(N, 2, T, C)))
    per = jnp.einsum("ntcd,nktc->nkd", J, Uk)
    assert_close(lin.per_example_vjp(Uk), per, rtol=1e-11, atol=1e-13)
    assert_close(lin.sum_squared_per_example_vjp(Uk), jnp.sum(per * per, 0), rtol=1e-11, atol=1e-13)


def test_streams_apply_the_mask_callable_per_batch(seq_case: Case) -> None:
    x = seq_case.inputs
    halves = [jax.tree_util.tree_map(lambda a, s=s: a[s], x) for s in (slice(0, 2), slice(2, 3))]
    lins = list(
        linearizations(
            seq_apply,
            seq_case.params,
            [(h, None) for h in halves],
            output="logits",
            mask="keep",
        )
    )
    assert [lin.output_shape for lin in lins] == [(2, T, C), (1, T, C)]
    u = jnp.asarray(np.random.default_rng(6).normal(size=(N, T, C)))
    total = lins[0].vjp(u[:2]) + lins[1].vjp(u[2:])
    assert_close(total, seq_case.lin.vjp(u), rtol=1e-12, atol=1e-13)
    assert bool(jnp.all(lins[0].mask == x["keep"][:2]))


# ----------------------------------------------------------------------------
# The Fisher diagonal, end to end
# ----------------------------------------------------------------------------


def test_fisher_diagonal_sums_over_examples_and_counted_positions(seq_case: Case) -> None:
    from fisherbound._quantities import factor_columns
    from fisherbound.fisher import fisher_diagonal

    lin, fam = seq_case.lin, Categorical()
    J = _dense(seq_case)  # (N, T, C, D), masked rows zero
    K = fam.metric(lin.logits)  # (N, T, C, C)
    expected = jnp.einsum("ntcd,ntce,nted->d", J, K, J)
    # Through the adapter's product with the per-position factor columns ...
    U = factor_columns(fam.sqrt_metric(lin.logits), jnp)
    got = lin.sum_squared_per_example_vjp(U, sum_cotangents=True)
    assert_close(got, expected, rtol=1e-11, atol=1e-13)
    # ... and through the analysis.
    assert_close(fisher_diagonal(lin, progress=False), expected, rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------
# Loss functions
# ----------------------------------------------------------------------------


def _hand_cross_entropy(z: Any, y: Any, keep: Any, reduction: str) -> Any:
    """optax-style softmax cross-entropy with integer labels, masked and reduced."""
    logp = jax.nn.log_softmax(z, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, y, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(keep, nll, 0.0))
    return total / jnp.sum(keep) if reduction == "mean" else total


@pytest.mark.slow  # about 5 s for the first: the loss kernels compile
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_categorical_loss_with_ignore_index_and_mask(seq_case: Case, reduction: str) -> None:
    rng = np.random.default_rng(7)
    x = seq_case.inputs
    y = np.asarray(rng.integers(0, C, size=(N, T)))
    y[2, 0] = y[0, 1] = -100
    keep = x["keep"] & jnp.asarray(y != -100)
    y[0, 3] = 7  # a masked position (padding) may hold any label
    loss = loss_function(
        seq_apply,
        seq_case.params,
        x,
        y,
        output="logits",
        mask=lambda b: b["keep"],
        reduction=reduction,
    )
    assert loss.num_counted == int(jnp.sum(keep))
    assert bool(jnp.all(loss.mask == keep))

    def hand(th: Any) -> Any:
        return _hand_cross_entropy(seq_case.logits_of(th), jnp.asarray(y), keep, reduction)

    theta = loss.params
    d = loss.num_params
    shifts = jnp.asarray(rng.normal(size=(2, d)) * 0.1)
    assert_close(
        loss.value(shifts), jnp.stack([hand(theta + s) for s in shifts]), rtol=1e-12, atol=0
    )
    assert_close(loss.gradient(), jax.grad(hand)(theta), rtol=1e-11, atol=1e-14)
    v = jnp.asarray(rng.normal(size=d))
    hv = jax.jvp(jax.grad(hand), (theta,), (v,))[1]
    assert_close(loss.hvp(v), hv, rtol=1e-10, atol=1e-13)
    assert_close(
        loss.hvp_batch(jnp.stack([v, 2 * v])), jnp.stack([hv, 2 * hv]), rtol=1e-10, atol=1e-13
    )


def test_traced_labels_inside_jit_still_skip_ignored_positions(seq_case: Case) -> None:
    x = seq_case.inputs
    y = jnp.asarray(np.random.default_rng(10).integers(0, C, size=(N, T))).at[1, 0].set(-100)

    def gradient(labels: Any) -> Any:
        return loss_function(seq_apply, seq_case.params, x, labels, output="logits").gradient()

    eager = loss_function(seq_apply, seq_case.params, x, y, output="logits")
    assert eager.num_counted == N * T - 1
    assert_close(jax.jit(gradient)(y), eager.gradient(), rtol=1e-13, atol=1e-15)
    # The mean's count is traced there: it divides by every position, N · T.
    traced = jax.jit(
        lambda labels: loss_function(
            seq_apply, seq_case.params, x, labels, output="logits", reduction="mean"
        ).gradient()
    )(y)
    assert_close(traced, eager.gradient() / (N * T), rtol=1e-13, atol=1e-15)


def test_bernoulli_loss_labels_follow_the_class_axis(seg_case: Case) -> None:
    rng = np.random.default_rng(8)
    y = jnp.asarray(rng.integers(0, 2, size=(N, C, *HW)).astype(np.float64))  # user layout
    loss = loss_function(
        seg_apply, seg_case.params, seg_case.inputs, y, family=Bernoulli(), output=1,
        class_axis=1, mask=seg_case.mask, reduction="mean",
    )  # fmt: skip

    def hand(th: Any) -> Any:  # optax.sigmoid_binary_cross_entropy, classes summed
        z = seg_case.logits_of(th)
        per = jnp.sum(jax.nn.softplus(z) - jnp.moveaxis(y, 1, -1) * z, axis=-1)
        return jnp.sum(jnp.where(seg_case.mask, per, 0.0)) / jnp.sum(seg_case.mask)

    theta = loss.params
    assert_close(loss.value(jnp.zeros((1, loss.num_params)))[0], hand(theta), rtol=1e-12, atol=0)
    assert_close(loss.gradient(), jax.grad(hand)(theta), rtol=1e-11, atol=1e-14)


def test_loss_functions_stream_and_old_case_unchanged(seq_case: Case) -> None:
    rng = np.random.default_rng(9)
    y = jnp.asarray(rng.integers(0, C, size=(N, T)))
    batches = [(seq_case.inputs, y)] * 2
    losses = list(loss_functions(seq_apply, seq_case.params, batches, output="logits"))
    assert [loss.num_counted for loss in losses] == [N * T, N * T]
    # (N, C) logits, nothing masked: "mean" still divides by N.
    w = jnp.asarray(rng.normal(size=(F, C)))
    x2, y2 = jnp.asarray(rng.normal(size=(N, F))), jnp.asarray(rng.integers(0, C, size=N))
    loss = loss_function(lambda p, x: x @ p, w, x2, y2, reduction="mean")
    hand = _hand_cross_entropy(x2 @ w, y2, jnp.ones(N, bool), "mean")
    assert loss.num_counted == N
    assert loss.mask is None
    assert_close(loss.value(jnp.zeros((1, loss.num_params)))[0], hand, rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------


def test_bad_masks(seq_case: Case) -> None:
    p, x = seq_case.params, seq_case.inputs
    with pytest.raises(
        ValueError,
        match=r"mask must have the logits' shape without the class axis, "
        r"\(N, T\) = \(3, 4\); got shape \(3, 3\)",
    ):
        linearize(seq_apply, p, x, output="logits", mask=jnp.ones((N, 3), bool))
    with pytest.raises(ValueError, match=r"mask \(the callable's result\) must keep at least"):
        linearize(seq_apply, p, x, output="logits", mask=lambda b: b["keep"] & False)
    # 0/1 integers (a Hugging Face attention_mask) read as booleans; other integers do not.
    ones = linearize(seq_apply, p, x, output="logits", mask=jnp.ones((N, T), int))
    assert ones.mask.dtype == jnp.bool_
    with pytest.raises(ValueError, match=r"mask must be boolean or hold only 0 and 1"):
        linearize(seq_apply, p, x, output="logits", mask=2 * jnp.ones((N, T), int))
    with pytest.raises(TypeError, match=r"mask must be a boolean array .* got dtype float"):
        linearize(seq_apply, p, x, output="logits", mask=jnp.ones((N, T)))
    with pytest.raises(TypeError, match=r"mask must be None, a boolean array .* builtins.list"):
        linearize(seq_apply, p, x, output="logits", mask=[True])
    with pytest.raises(ValueError, match=r"mask='pad' names no entry of the inputs: got keys"):
        linearize(seq_apply, p, x, output="logits", mask="pad")
    with pytest.raises(TypeError, match=r"mask of a stream of batches must be a str .* array"):
        linearizations(seq_apply, p, [x], output="logits", mask=x["keep"])
    with pytest.raises(TypeError, match=r"mask of a stream of batches must be a str"):
        loss_functions(seq_apply, p, [(x, x["keep"])], output="logits", mask=x["keep"])
    # A key of dict inputs and a 0/1 callable result are converted with != 0.
    ints = {**x, "keep": x["keep"].astype(jnp.int32)}
    by_key = linearize(seq_apply, p, ints, output="logits", mask="keep")
    by_call = linearize(seq_apply, p, ints, output="logits", mask=lambda b: b["keep"])
    assert bool(jnp.all(by_key.mask == x["keep"]))
    assert bool(jnp.all(by_call.mask == x["keep"]))


def test_bad_selectors_and_class_axes(seq_case: Case, seg_case: Case) -> None:
    p, x = seq_case.params, seq_case.inputs
    with pytest.raises(
        ValueError, match=r"output='scores' names no key .* keys \['logits', 'hidden'\]"
    ):
        linearize(seq_apply, p, x, output="scores")
    with pytest.raises(ValueError, match=r"output=2 indexes a tuple output, but .*") as info:
        linearize(seg_apply, seg_case.params, seg_case.inputs, output=2)
    assert str(info.value).endswith(
        "a tuple of 2 outputs. Pass an index in range, a key, or a callable out -> logits."
    )
    with pytest.raises(ValueError, match=r"output=0 must select an array of logits .* a tuple"):
        linearize(lambda p, x: ((x @ p, x @ p),), jnp.ones((F, C)), jnp.ones((N, F)), output=0)
    with pytest.raises(
        TypeError, match=r"must return an array of logits \(N, C\); got dict\. .*output="
    ):
        linearize(seq_apply, p, x)
    with pytest.raises(TypeError, match=r"output must be None .* got float"):
        linearize(seq_apply, p, x, output=1.5)
    with pytest.raises(ValueError, match=r"class_axis must not be 0: axis 0 of the logits holds"):
        linearize(seq_apply, p, x, output="logits", class_axis=0)
    with pytest.raises(ValueError, match=r"class_axis=-3 must name an axis of the logits other"):
        linearize(seq_apply, p, x, output="logits", class_axis=-3)
    with pytest.raises(ValueError, match=r"class_axis=5 must name an axis .* shape \(3, 4, 3\)"):
        linearize(seq_apply, p, x, output="logits", class_axis=5)
    with pytest.raises(TypeError, match=r"class_axis must be an int"):
        linearize(seq_apply, p, x, output="logits", class_axis=True)


def test_bad_inputs_operands_and_labels(seq_case: Case) -> None:
    p, x, lin = seq_case.params, seq_case.inputs, seq_case.lin
    bad_x = {"tokens": x["tokens"], "keep": x["keep"][:2]}
    with pytest.raises(ValueError, match=r"same leading batch size N; inputs\['keep'\] has 2"):
        linearize(seq_apply, p, bad_x, output="logits")
    with pytest.raises(ValueError, match=r"u must have shape \(N, T, C\) = \(3, 4, 3\); got"):
        lin.vjp(jnp.ones((N, C)))
    with pytest.raises(ValueError, match=r"U must have shape \(M, N, T, C\) = \(M, 3, 4, 3\)"):
        lin.vjp_batch(jnp.ones((1, N, T + 1, C)))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, T, C\) = \(3, M, 4, 3\)"):
        lin.per_example_vjp(jnp.ones((N, 1, C)))
    with pytest.raises(ValueError, match=r"U must have shape \(N, K, T, C\) = \(3, M, 4, 3\)"):
        lin.sum_squared_per_example_vjp(jnp.ones((N, 1, T)))
    with pytest.raises(
        ValueError,
        match=r"labels do not fit .* labels must have shape \(3, 4\) to match logits of shape",
    ):
        loss_function(seq_apply, p, x, jnp.zeros((N, T + 1), int), output="logits")
    with pytest.raises(ValueError, match=r"labels must count at least one position; every label"):
        loss_function(seq_apply, p, x, jnp.full((N, T), -100), output="logits")
    y = jnp.where(x["keep"], -100, 0)  # what the mask keeps is ignored: nothing counts
    with pytest.raises(ValueError, match=r"equals ignore_index=-100 or is masked by mask"):
        loss_function(seq_apply, p, x, y, output="logits", mask=x["keep"])
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        loss_function(seq_apply, p, x, jnp.full((N, T), -100), output="logits", ignore_index=None)
    with pytest.raises(TypeError, match=r"ignore_index must be an int .* got str"):
        loss_function(seq_apply, p, x, jnp.zeros((N, T), int), output="logits", ignore_index="x")


def test_doctests() -> None:
    assert doctest.testmod(jax_adapter).failed == 0


def test_categorical_soft_targets_jax_loss_with_padding() -> None:
    # Target distributions (N, T, C) with padded positions holding garbage: the loss is
    # Σ over counted positions of −Σ_c y_c log p_c, computed here by hand.
    from fisherbound.adapters.jax import loss_function as jax_loss_function
    from fisherbound.families import Categorical

    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((4, 3)))

    def apply(params, x):  # (N, T, 4) -> (N, T, 3)
        return jnp.tanh(x) @ params

    x = jnp.asarray(rng.standard_normal((2, 5, 4)))
    y = jax.nn.softmax(jnp.asarray(rng.standard_normal((2, 5, 3))), axis=-1)
    mask = jnp.asarray(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool))
    padded = jnp.where(mask[..., None], y, -100.0)
    loss = jax_loss_function(apply, w, x, padded, family=Categorical(), mask=mask)
    logp = jax.nn.log_softmax(apply(w, x), axis=-1)
    want = -jnp.sum(jnp.where(mask[..., None], y * logp, 0.0))
    value = loss.value(jnp.zeros((1, loss.num_params), dtype=w.dtype))[0]
    np.testing.assert_allclose(float(value), float(want), rtol=1e-12)

    def by_hand(params):  # the same loss, differentiated by JAX itself
        logq = jax.nn.log_softmax(apply(params, x), axis=-1)
        return -jnp.sum(jnp.where(mask[..., None], y * logq, 0.0))

    grad = jax.grad(by_hand)(w).reshape(-1)
    np.testing.assert_allclose(np.asarray(loss.gradient()), np.asarray(grad), rtol=1e-12)
