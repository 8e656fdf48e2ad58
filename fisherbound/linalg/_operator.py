"""The linear-operator protocol, a minimal concrete operator and ``aslinearoperator``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from fisherbound._lib import (
    array_namespace,
    check_finite,
    check_real_floating,
    device_of,
    is_array,
)

Array = Any

__all__ = ["LinearOperator", "LinearOperatorLike", "TraceableProduct", "aslinearoperator"]


class TraceableProduct(NamedTuple):
    """An operator's ``matmat`` as a pure function, for loops compiled by JAX.

    ``fn(operands, V)`` returns A V for V (n, k) and is traceable by ``jax.jit``;
    ``operands`` is a pytree of the arrays it reads, passed to the compiled loop as
    arguments (not baked into it as constants). ``fn`` is the static part: it must
    be hashable, and two operators whose ``fn`` compare equal share the compiled
    loops for operands of the same shapes (e.g. the Fisher operators of one model on
    batches of one size), so ``fn`` must read arrays only from ``operands``.
    """

    fn: Callable[[Any, Array], Array]
    operands: Any


@runtime_checkable
class LinearOperatorLike(Protocol):
    """What every function of ``fisherbound.linalg`` accepts as an operator.

    Any object with these six members qualifies (``LinearOperator`` is one, and
    so are the Fisher operators of ``fisherbound.fisher``): ``shape`` (n, m),
    ``dtype``, ``device``, ``xp`` (the array namespace of the vectors it acts on),
    ``matvec(v)`` (m,) → (n,) and ``matmat(V)`` (m, k) → (n, k).
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    @property
    def xp(self) -> Any: ...

    def matvec(self, v: Array, /) -> Array: ...

    def matmat(self, V: Array, /) -> Array: ...


def _as_dim(value: object, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        msg = f"{name} must be a non-negative integer; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    n = int(value)
    if n < 0:
        msg = f"{name} must be a non-negative integer; got {n}."
        raise ValueError(msg)
    return n


class LinearOperator:
    """A matrix-free linear map A: R^m → R^n given by its products.

    Parameters
    ----------
    shape
        ``(n, m)``: A maps vectors of length m to vectors of length n.
    matvec
        ``v (m,) -> A v (n,)``. Optional when ``matmat`` is given (then
        ``matvec(v)`` is ``matmat(v[:, None])[:, 0]``).
    matmat
        ``V (m, k) -> A V (n, k)``. Optional; the default applies ``matvec`` to
        each column and stacks the results. Give it whenever the operator can
        apply several vectors at once (one batched pass instead of k).
    dtype, device, xp
        The dtype, device and array namespace of the vectors the operator acts on
        and returns.
    traceable
        Optional ``TraceableProduct``: the same product as a pure function that
        ``jax.jit`` can trace. JAX operators that have one run ``lanczos``,
        ``lanczos_quadrature`` and ``slq`` as one compiled loop on the device;
        without it they call ``matvec`` / ``matmat`` once per step from Python.

    Examples
    --------
    >>> import numpy as np
    >>> op = LinearOperator((2, 2), matvec=lambda v: 3.0 * v, dtype=np.float64,
    ...                     device=None, xp=np)
    >>> op.matmat(np.eye(2)).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        matvec: Callable[[Array], Array] | None = None,
        matmat: Callable[[Array], Array] | None = None,
        dtype: Any,
        device: Any,
        xp: Any,
        traceable: TraceableProduct | None = None,
    ) -> None:
        if matvec is None and matmat is None:
            msg = (
                "LinearOperator needs matvec or matmat (or both); got neither. "
                "Pass matvec=lambda v: ... and, for batched products, matmat=lambda V: ...."
            )
            raise TypeError(msg)
        for fname, f in (("matvec", matvec), ("matmat", matmat)):
            if f is not None and not callable(f):
                msg = f"{fname} must be callable; got {type(f).__name__}."
                raise TypeError(msg)
        if not isinstance(shape, tuple | list) or len(shape) != 2:
            msg = f"shape must be a pair (n, m); got {shape!r}."
            raise ValueError(msg)
        self.shape: tuple[int, int] = (_as_dim(shape[0], "shape[0]"), _as_dim(shape[1], "shape[1]"))
        self.dtype = dtype
        self.device = device
        self.xp = xp
        self._matvec = matvec
        self._matmat = matmat
        if traceable is not None and not (
            isinstance(traceable, TraceableProduct) and callable(traceable.fn)
        ):
            msg = (
                "traceable must be a TraceableProduct(fn, operands) with a callable fn; "
                f"got {type(traceable).__name__}. Leave it as None for an operator that "
                "only has matvec / matmat."
            )
            raise TypeError(msg)
        #: The product as a pure function for compiled loops, or None.
        self.traceable = traceable

    def _check_operand(self, x: Array, name: str, expected: str, ok: bool) -> None:
        """A ValueError unless ``ok``: ``x`` (``name``) must have the ``expected`` shape."""
        if not ok:
            msg = (
                f"{name} must have shape {expected} to match the operator's shape "
                f"{self.shape}; got {tuple(x.shape)}."
            )
            raise ValueError(msg)

    def matvec(self, v: Array, /) -> Array:
        """A v for ``v`` of shape (m,); returns shape (n,)."""
        m = self.shape[1]
        self._check_operand(v, "v", f"({m},)", tuple(v.shape) == (m,))
        if self._matvec is not None:
            return self._matvec(v)
        assert self._matmat is not None
        return self._matmat(v[:, None])[:, 0]

    def matmat(self, V: Array, /) -> Array:
        """A V for ``V`` of shape (m, k); returns shape (n, k)."""
        m = self.shape[1]
        self._check_operand(V, "V", f"({m}, k)", V.ndim == 2 and int(V.shape[0]) == m)
        if self._matmat is not None:
            return self._matmat(V)
        assert self._matvec is not None
        k = int(V.shape[1])
        if k == 0:
            xp = _namespace_of(self)
            return xp.zeros((self.shape[0], 0), dtype=self.dtype, device=self.device)
        cols = [self._matvec(V[:, i]) for i in range(k)]
        xp = array_namespace(cols[0], names=("matvec(v)",))
        return xp.stack(cols, axis=1)

    def __repr__(self) -> str:
        return f"LinearOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _namespace_of(op: Any) -> Any:
    """The array-API (compat) namespace of the vectors ``op`` acts on.

    ``op.xp`` may be a raw library module (``numpy``, ``torch``); an empty array
    made with it resolves to the standard-conforming namespace.
    """
    witness = op.xp.zeros((0,), dtype=op.dtype, device=op.device)
    return array_namespace(witness, names=("A",))


def _dense_product(A: Array, V: Array) -> Array:
    """A @ V: the ``TraceableProduct.fn`` of every dense JAX operator."""
    return A @ V


def is_jax_namespace(xp: Any) -> bool:
    """Whether ``xp`` is JAX's array namespace (``jax.numpy``)."""
    return str(getattr(xp, "__name__", "")).startswith("jax")


def _dense_operator(A: Array, xp: Any) -> LinearOperator:
    def matvec(v: Array) -> Array:
        return A @ v

    def matmat(V: Array) -> Array:
        return A @ V

    n, m = (int(s) for s in A.shape)
    traceable = TraceableProduct(_dense_product, A) if is_jax_namespace(xp) else None
    return LinearOperator(
        (n, m),
        matvec=matvec,
        matmat=matmat,
        dtype=A.dtype,
        device=device_of(A),
        xp=xp,
        traceable=traceable,
    )


def _what(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def aslinearoperator(A: Any, /) -> Any:
    """View ``A`` as a linear operator.

    A dense 2-D float32 or float64 array of any array-API library, checked finite
    (one reduction over its entries), becomes a ``LinearOperator`` with
    ``matvec(v) = A @ v`` and ``matmat(V) = A @ V``, in A's namespace and on A's
    device (no copy; a JAX array also gets a ``traceable`` product). An object that
    already satisfies ``LinearOperatorLike`` is returned as it is (after checking that
    its dtype is real floating).

    Raises
    ------
    TypeError
        If ``A`` is neither an array nor an operator, or has another dtype than
        float32 or float64.
    ValueError
        If ``A`` is an array that is not 2-D or has NaN or inf entries.

    Examples
    --------
    >>> import numpy as np
    >>> op = aslinearoperator(np.array([[2.0, 1.0], [1.0, 3.0]]))
    >>> op.shape, op.matvec(np.array([1.0, 0.0])).tolist()
    ((2, 2), [2.0, 1.0])
    """
    if is_array(A):
        xp = array_namespace(A, names=("A",))
        if A.ndim != 2:
            msg = (
                f"A must be a 2-D array (a dense matrix) or a linear operator; got an array "
                f"of shape {tuple(A.shape)}."
            )
            raise ValueError(msg)
        check_real_floating(xp, A.dtype)
        check_finite(A, "A", xp=xp)
        return _dense_operator(A, xp)
    if isinstance(A, LinearOperatorLike):
        shape = tuple(A.shape)
        if len(shape) != 2:
            msg = f"A must have a 2-D shape (n, m); got an operator of shape {shape}."
            raise ValueError(msg)
        check_real_floating(_namespace_of(A), A.dtype)
        return A
    msg = (
        "A must be a 2-D real floating array of an array-API library (NumPy, CuPy, torch, "
        "JAX, array-api-strict) or a linear operator (an object with shape, dtype, device, "
        f"xp, matvec and matmat, e.g. fisherbound.linalg.LinearOperator); got {_what(A)}."
    )
    raise TypeError(msg)


def _as_square_operator(A: Any) -> tuple[Any, Any]:
    """Validate ``A`` as a non-empty square operator; return it and its namespace."""
    op = aslinearoperator(A)
    n, m = (int(s) for s in op.shape)
    if n != m:
        msg = f"A must be square (n × n); got shape ({n}, {m})."
        raise ValueError(msg)
    if n < 1:
        msg = "A must have at least one row and column; got shape (0, 0)."
        raise ValueError(msg)
    return op, _namespace_of(op)
