"""The Hessian operators of ``fisherbound.landscape``: the products, traceable for JAX.

``_hessian_operator`` is the ``LinearOperator`` of a loss objective (its batches'
Hessian-vector products, summed with their weights), with a ``TraceableProduct`` for
loops compiled by JAX where every batch offers one; ``_shifted`` is A − s I for the
second run of ``hessian_directions(method="shifted")``. Split from the landscape
module by job.
"""

from __future__ import annotations

from typing import Any

from fisherbound._stream import Objective
from fisherbound.linalg import LinearOperator, TraceableProduct
from fisherbound.linalg._operator import KeyedProduct

Array = Any


def _hessian_operator(obj: Objective) -> LinearOperator:
    xp = obj.xp

    def matmat(V: Array) -> Array:
        return xp.matrix_transpose(obj.hvp_batch(xp.matrix_transpose(V)))

    d = obj.num_params
    return LinearOperator(
        (d, d),
        matvec=obj.hvp,
        matmat=matmat,
        dtype=obj.dtype,
        device=obj.device,
        xp=xp,
        traceable=_traceable_hessian(obj),
        symmetric=True,
    )


class _HessianProduct(KeyedProduct):
    r""":math:`\sum_b c_b \nabla^2 L_b(\theta)\, V` as a pure function of the batches' arrays.

    The ``TraceableProduct.fn`` of ``hessian_operator`` on JAX loss functions: its
    operands are each batch's arrays and the weights :math:`c_b` (0-d arrays, so that
    other batches, counts and weights reuse the compiled loop); equal for the loss
    functions of one model and family, whose kernels are one object.
    """

    def __init__(self, kernels: tuple[Any, ...]) -> None:
        self._kernels = self._key = kernels

    def __call__(self, operands: Any, V: Array) -> Array:
        batches, weights = operands
        total: Array = None
        for kernels, batch, c in zip(self._kernels, batches, weights, strict=True):
            part = kernels.hessian_product(batch, V) * c
            total = part if total is None else total + part
        return total


def _traceable_hessian(obj: Objective) -> TraceableProduct | None:
    """The Hessian product for loops compiled by JAX, or None.

    Built when every batch has one (JAX loss functions) and no process group
    all-reduces the products.
    """
    if obj.coll is not None or not all(hasattr(item, "_traceable_hvp") for item in obj.items):
        return None
    pairs = [item._traceable_hvp() for item in obj.items]
    xp = obj.xp
    weights = tuple(xp.asarray(c, dtype=obj.dtype, device=obj.device) for c in obj.weights)
    return TraceableProduct(
        _HessianProduct(tuple(k for k, _ in pairs)), (tuple(b for _, b in pairs), weights)
    )


class _ShiftedProduct(KeyedProduct):
    """:math:`A V - s V` as a ``TraceableProduct.fn``; operands (A's operands, s)."""

    def __init__(self, fn: Any) -> None:
        self.fn = self._key = fn

    def __call__(self, operands: Any, V: Array) -> Array:
        inner, shift = operands
        return self.fn(inner, V) - shift * V


def _shifted(op: Any, shift: Array) -> LinearOperator:
    xp = op.xp
    traceable = getattr(op, "traceable", None)
    if traceable is not None:
        traceable = TraceableProduct(_ShiftedProduct(traceable.fn), (traceable.operands, shift))
    return LinearOperator(
        op.shape,
        matvec=lambda v: op.matvec(v) - shift * v,
        matmat=lambda V: op.matmat(V) - shift * V,
        dtype=op.dtype,
        device=op.device,
        xp=xp,
        traceable=traceable,
        symmetric=bool(getattr(op, "symmetric", False)),
    )
