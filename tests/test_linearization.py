"""The model contract: the generic defaults of LinearizationBase and the helpers."""

from __future__ import annotations

import numpy as np
import pytest

from fisherbound.linearization import (
    Linearization,
    LinearizationBase,
    as_linearizations,
    example_range,
    make_blocks,
)


class DenseJacobian(LinearizationBase):
    """A linearization given by an explicit Jacobian (N, C, D): the generic defaults only."""

    def __init__(self, jac, backend):
        self._jac = jac
        self._xp = backend.xp
        n, c, d = jac.shape
        self._logits = backend.asarray(np.zeros((n, c)))
        self._blocks = make_blocks([("a", (2, 2)), ("b", (d - 4,))])

    def jvp(self, v):
        return self._xp.matmul(self._jac, v)

    def vjp(self, u):
        xp = self._xp
        return xp.sum(xp.matmul(xp.matrix_transpose(self._jac), u[..., None])[..., 0], axis=0)


def test_generic_defaults_match_the_jacobian(backend) -> None:
    rng = np.random.default_rng(0)
    jac = rng.standard_normal((5, 3, 7))
    lin = DenseJacobian(backend.asarray(jac), backend)
    assert isinstance(lin, Linearization)
    assert (lin.num_params, lin.num_inputs, lin.num_outputs) == (7, 5, 3)
    assert [b.offset for b in lin.blocks] == [0, 4]
    assert lin.blocks[0].shape == (2, 2)
    V = rng.standard_normal((2, 7))
    np.testing.assert_allclose(
        backend.to_numpy(lin.jvp_batch(backend.asarray(V))),
        np.einsum("ncd,md->mnc", jac, V),
        atol=1e-12,
    )
    U = rng.standard_normal((4, 5, 3))
    np.testing.assert_allclose(
        backend.to_numpy(lin.vjp_batch(backend.asarray(U))),
        np.einsum("ncd,mnc->md", jac, U),
        atol=1e-12,
    )
    W = rng.standard_normal((5, 2, 3))
    per = np.einsum("ncd,nkc->nkd", jac, W)
    np.testing.assert_allclose(
        backend.to_numpy(lin.per_example_vjp(backend.asarray(W))), per, atol=1e-12
    )
    part = lin.per_example_vjp(backend.asarray(W[2:4]), examples=slice(2, 4))
    np.testing.assert_allclose(backend.to_numpy(part), per[2:4], atol=1e-12)
    for max_vectors in (1, 3, None):
        sq = lin.sum_squared_per_example_vjp(backend.asarray(W), max_vectors=max_vectors)
        np.testing.assert_allclose(backend.to_numpy(sq), (per**2).sum(axis=0), atol=1e-12)
        total = lin.sum_squared_per_example_vjp(
            backend.asarray(W), max_vectors=max_vectors, sum_cotangents=True
        )
        np.testing.assert_allclose(backend.to_numpy(total), (per**2).sum(axis=(0, 1)), atol=1e-12)


def test_example_range() -> None:
    assert example_range(None, 5) == (0, 5)
    assert example_range(slice(1, 3), 5) == (1, 3)
    assert example_range(slice(3, None), 5) == (3, 5)
    with pytest.raises(TypeError, match=r"examples must be a contiguous slice\(start, stop\)"):
        example_range(slice(0, 4, 2), 5)
    with pytest.raises(TypeError, match="examples must be a contiguous slice"):
        example_range([0, 1], 5)
    with pytest.raises(ValueError, match="must select at least one of the 5 examples"):
        example_range(slice(4, 2), 5)


def test_as_linearizations(backend) -> None:
    lin = DenseJacobian(backend.asarray(np.ones((2, 3, 5))), backend)
    assert list(as_linearizations(lin)) == [lin]
    assert list(as_linearizations([lin, lin])) == [lin, lin]
    with pytest.raises(TypeError, match="item 1 is a int"):
        list(as_linearizations([lin, 3]))
    with pytest.raises(TypeError, match="got str"):
        list(as_linearizations("lin"))
