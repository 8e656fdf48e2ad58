"""The test helpers themselves: the backend table, assert_close and the same-weights MLP."""

from __future__ import annotations

import numpy as np
import pytest
from _assertions import assert_close, assert_like
from _backends import ALL, BACKEND_MARKS, CPU, EAGER, HOST, backend_params, make_backend
from _models import jax_dict_order, jax_mlp, mlp_weights, torch_mlp


def test_every_subset_is_part_of_the_table() -> None:
    assert set(CPU) | set(EAGER) | set(HOST) <= set(ALL) == set(BACKEND_MARKS)
    marks = {p.id: {m.name for m in p.marks} for p in backend_params(ALL)}
    assert marks["cupy"] == {"cupy", "gpu"}
    assert marks["torch-cuda"] == {"torch", "gpu"}
    assert marks["strict-device1"] == {"strict"}


def test_assert_close_passes_where_array_type_in_equals_array_type_out(backend) -> None:
    x = backend.asarray([1.0, 2.0])
    assert_close(x * 2, backend.asarray([2.0, 4.0]), rtol=0, atol=0)
    assert_close(x * 2, [2.0, 4.0], rtol=0, atol=0, like=backend)
    assert_close(x * 2, np.array([2.0, 4.0]), rtol=0, atol=0, like=x)
    x32 = backend.asarray([1.0, 2.0], dtype="float32")
    assert_close(x32, [1.0, 2.0], rtol=0, atol=0, like=backend, dtype=backend.xp.float32)
    assert_close(x32, [1.0, 2.0], rtol=0, atol=0, like=x32)


@pytest.mark.parametrize("name", ["torch", "strict-device1"])
def test_assert_close_names_the_first_difference(name: str) -> None:
    b = make_backend(name)
    x = b.asarray([1.0, 2.0])
    with pytest.raises(AssertionError, match="namespace: got numpy.ndarray"):
        assert_close(np.array([1.0, 2.0]), [1.0, 2.0], rtol=0, atol=0, like=b)
    if name == "strict-device1":
        import array_api_strict as xs

        elsewhere = xs.asarray([1.0, 2.0], dtype=xs.float64)  # the default device
        with pytest.raises(AssertionError, match="device: got"):
            assert_close(elsewhere, x, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="dtype: got .*float32, expected .*float64"):
        assert_close(b.asarray([1.0, 2.0], dtype="float32"), [1.0, 2.0], rtol=0, atol=0, like=b)
    with pytest.raises(AssertionError, match=r"shape: got \(2,\), expected \(1, 2\)"):
        assert_close(x, [[1.0, 2.0]], rtol=0, atol=0, like=b)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close(x, [1.0, 2.5], rtol=1e-3, atol=0, like=b)
    with pytest.raises(AssertionError, match="expected an array, got float"):
        assert_like(1.0, x)
    with pytest.raises(TypeError, match="assert_close needs like="):
        assert_close(x, [1.0, 2.0], rtol=0, atol=0)


def test_the_same_weights_give_the_same_logits_in_every_framework() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from fisherbound.adapters.numpy import MLP

    ws, bs = mlp_weights((3, 5, 4), seed=0)
    x = np.random.default_rng(1).standard_normal((6, 3))
    for activation in ("tanh", "relu"):
        want = MLP(ws, bs, activation=activation)(x)
        got_torch = torch_mlp(ws, bs, activation)(torch.from_numpy(x)).detach()
        assert_close(got_torch, want, rtol=1e-12, atol=1e-14, like="torch")
        for layout in ("tuple", "dict"):
            apply_fn, params = jax_mlp(ws, bs, activation, layout=layout)
            assert_close(apply_fn(params, jnp.asarray(x)), want, rtol=1e-12, atol=1e-14, like="jax")
    model = MLP(ws, bs)
    apply_fn, params = jax_mlp(ws, bs, layout="dict")
    flat, _ = ravel_pytree(params)
    np.testing.assert_array_equal(
        np.asarray(flat), np.asarray(model.parameters())[jax_dict_order(model.blocks)]
    )
    with pytest.raises(ValueError, match="activation must be one of"):
        torch_mlp(ws, bs, "gelu")
    with pytest.raises(ValueError, match="layout must be 'tuple' or 'dict'"):
        jax_mlp(ws, bs, layout="list")
