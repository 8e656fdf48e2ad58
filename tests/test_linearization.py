"""The model contract: the generic defaults of LinearizationBase and the helpers."""

from __future__ import annotations

import numpy as np
import pytest
from _assertions import assert_close

from fisherbound.linearization import (
    Linearization,
    LinearizationBase,
    as_linearizations,
    check_batches,
    check_operand,
    example_range,
    make_blocks,
    stream_inputs,
    stream_pairs,
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
    assert_close(
        lin.jvp_batch(backend.asarray(V)),
        np.einsum("ncd,md->mnc", jac, V),
        rtol=1e-7,
        atol=1e-12,
        like=backend,
    )
    U = rng.standard_normal((4, 5, 3))
    assert_close(
        lin.vjp_batch(backend.asarray(U)),
        np.einsum("ncd,mnc->md", jac, U),
        rtol=1e-7,
        atol=1e-12,
        like=backend,
    )
    W = rng.standard_normal((5, 2, 3))
    per = np.einsum("ncd,nkc->nkd", jac, W)
    assert_close(lin.per_example_vjp(backend.asarray(W)), per, rtol=1e-7, atol=1e-12, like=backend)
    part = lin.per_example_vjp(backend.asarray(W[2:4]), examples=slice(2, 4))
    assert_close(part, per[2:4], rtol=1e-7, atol=1e-12, like=backend)
    for max_vectors in (1, 3, None):
        sq = lin.sum_squared_per_example_vjp(backend.asarray(W), max_vectors=max_vectors)
        assert_close(sq, (per**2).sum(axis=0), rtol=1e-7, atol=1e-12, like=backend)
        total = lin.sum_squared_per_example_vjp(
            backend.asarray(W), max_vectors=max_vectors, sum_cotangents=True
        )
        assert_close(total, (per**2).sum(axis=(0, 1)), rtol=1e-7, atol=1e-12, like=backend)


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


# ---------------------------------------------------------------------------
# The adapter shell
# ---------------------------------------------------------------------------


def test_operand_check_of_the_base_class(backend) -> None:
    lin = DenseJacobian(backend.asarray(np.zeros((5, 3, 7))), backend)
    v = lin._operand(backend.asarray(np.ones(7), dtype="float32"), "v", (7,), "(D,)")
    assert v.dtype == lin.dtype  # cast to the logits' dtype
    with pytest.raises(ValueError, match=r"v must have shape \(D,\) = \(7,\); got shape \(6,\)"):
        lin._operand(backend.asarray(np.ones(6)), "v", (7,), "(D,)")
    with pytest.raises(ValueError, match=r"U must have shape \(M, N, C\) = \(M, 5, 3\)"):
        lin._operand(backend.asarray(np.ones((2, 5))), "U", (None, 5, 3), "(M, N, C)")
    with pytest.raises(TypeError, match="real floating-point dtype"):
        lin._operand(backend.asarray(np.ones(7), dtype="int64"), "v", (7,), "(D,)")
    like = backend.asarray(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"U must have shape \(n, K, C\) = \(5, M, 3\)"):
        check_operand(
            backend.asarray(np.ones((5, 3))),
            "U",
            (5, None, 3),
            "(n, K, C)",
            like=like,
            like_name="the logits",
            owner="the logits' device",
            remedy="",
            free="M",
        )


def test_streams_of_batches() -> None:
    with pytest.raises(TypeError, match=r"batches must be an iterable of pairs; got int\. Use x\."):
        check_batches(3, what="pairs", remedy="Use x.")
    with pytest.raises(TypeError, match="got ndarray"):
        check_batches(np.ones(3), what="pairs", remedy="")
    data = [np.ones(2), (np.zeros(3), "labels"), [np.ones(4)]]
    assert check_batches(data, what="pairs", remedy="") is data
    built = stream_inputs(data, lambda i, x: (i, x.shape), single="an array")
    assert list(built) == [(0, (2,)), (1, (3,)), (2, (4,))]
    empty = stream_inputs([np.ones(2), ()], lambda i, x: x, single="an array")
    next(empty)  # lazy: the bad batch is seen when it is reached
    with pytest.raises(ValueError, match=r"batch 1 must be an array or a non-empty tuple"):
        next(empty)
    pairs = stream_pairs([(1, 2), (3, 4, 5)], lambda i, x, y: (i, x, y))
    assert list(pairs) == [(0, 1, 2), (1, 3, 4)]
    with pytest.raises(TypeError, match=r"batch 1 must be a pair \(inputs, labels\); got list\.$"):
        list(stream_pairs([(1, 2), [3]], lambda i, x, y: y))
    with pytest.raises(TypeError, match=r"got list of length 1\.$"):
        list(stream_pairs([[3]], lambda i, x, y: y, say_length=True))
