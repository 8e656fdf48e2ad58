"""The linear-operator protocol, a minimal operator and the round trip to SciPy.

``LinearOperator.to_scipy`` exports; ``aslinearoperator`` takes arrays, operators
and ``scipy.sparse.linalg.LinearOperator`` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from fisherbound._lib import (
    array_namespace,
    check_finite,
    check_real_floating,
    device_of,
    is_array,
    to_host,
)

Array = Any

__all__ = ["LinearOperator", "LinearOperatorLike", "TraceableProduct", "aslinearoperator"]


class TraceableProduct(NamedTuple):
    """An operator's ``matmat`` as a pure function, for loops compiled by JAX.

    ``fn(operands, V)`` returns :math:`A V` for :math:`V` (n, k) and is traceable by ``jax.jit``;
    ``operands`` is a pytree of the arrays it reads, passed to the compiled loop as
    arguments (not baked into it as constants). ``fn`` is the static part: it must
    be hashable, and two operators whose ``fn`` compare equal share the compiled
    loops for operands of the same shapes (e.g. the Fisher operators of one model on
    batches of one size), so ``fn`` must read arrays only from ``operands``.
    """

    fn: Callable[[Any, Array], Array]
    operands: Any


class KeyedProduct:
    """Base of the ``TraceableProduct.fn`` classes: hashed and compared by class and ``_key``.

    ``_key`` holds what the product computes besides its operands (a wrapped ``fn``,
    kernels, a family): equal keys make equal functions, so ``jax.jit`` compiles one
    loop for all of them.
    """

    _key: Any

    def __hash__(self) -> int:
        return hash((type(self), self._key))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key == other._key


@runtime_checkable
class LinearOperatorLike(Protocol):
    r"""What every function of ``fisherbound.linalg`` accepts as an operator.

    Any object with these six members qualifies (``LinearOperator`` is one, and
    so are the Fisher operators of ``fisherbound.fisher``): ``shape`` (n, m),
    ``dtype``, ``device``, ``xp`` (the array namespace of the vectors it acts on),
    ``matvec(v)`` (m,) :math:`\to` (n,) and ``matmat(V)`` (m, k) :math:`\to` (n, k).
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
    r"""A matrix-free linear map :math:`A: \mathbb{R}^m \to \mathbb{R}^n` given by its products.

    Parameters
    ----------
    shape
        ``(n, m)``: :math:`A` maps vectors of length :math:`m` to vectors of length :math:`n`.
    matvec
        ``v (m,) -> A v (n,)``. Optional when ``matmat`` is given (then
        ``matvec(v)`` is ``matmat(v[:, None])[:, 0]``).
    matmat
        ``V (m, k) -> A V (n, k)``. Optional; the default applies ``matvec`` to
        each column and stacks the results. Give it whenever the operator can
        apply several vectors at once (one batched pass instead of :math:`k`).
    dtype, device, xp
        The dtype, device and array namespace of the vectors the operator acts on
        and returns.
    traceable
        Optional ``TraceableProduct``: the same product as a pure function that
        ``jax.jit`` can trace. JAX operators that have one run ``lanczos``,
        ``lanczos_quadrature``, ``slq`` and ``eigsh`` as one compiled loop on the device;
        without it they call ``matvec`` / ``matmat`` once per step from Python.
    symmetric
        Whether :math:`A = A^\top` (default False). The Fisher and Hessian operators of the
        library are; ``to_scipy`` then gives SciPy the transpose products too.

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
        symmetric: bool = False,
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
        if not isinstance(symmetric, bool):
            msg = f"symmetric must be True or False; got {type(symmetric).__name__}."
            raise TypeError(msg)
        if symmetric and self.shape[0] != self.shape[1]:
            msg = f"symmetric=True needs a square shape (n, n); got {self.shape}."
            raise ValueError(msg)
        #: Whether :math:`A = A^\top`.
        self.symmetric = symmetric

    def _check_operand(self, x: Array, name: str, expected: str, ok: bool) -> None:
        """A ValueError unless ``ok``: ``x`` (``name``) must have the ``expected`` shape."""
        if not ok:
            msg = (
                f"{name} must have shape {expected} to match the operator's shape "
                f"{self.shape}; got {tuple(x.shape)}."
            )
            raise ValueError(msg)

    def matvec(self, v: Array, /) -> Array:
        """:math:`A v` for ``v`` of shape (m,); returns shape (n,)."""
        m = self.shape[1]
        self._check_operand(v, "v", f"({m},)", tuple(v.shape) == (m,))
        if self._matvec is not None:
            return self._matvec(v)
        assert self._matmat is not None
        return self._matmat(v[:, None])[:, 0]

    def matmat(self, V: Array, /) -> Array:
        """:math:`A V` for ``V`` of shape (m, k); returns shape (n, k)."""
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

    def to_scipy(self) -> Any:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` on NumPy vectors.

        For SciPy's ``eigsh``, ``cg``, ``gmres``, ``expm_multiply`` and its operator
        algebra (``A + B``, ``0.5 * A``, ``A @ B``, ``A.T``). Each
        product takes a NumPy vector or block, moves it into this operator's
        namespace and device (``xp.asarray``: no copy for torch on the CPU, whose
        tensors share NumPy's memory, unless the array is read-only; a copy onto
        an accelerator or into JAX), applies ``matvec`` / ``matmat`` and returns a
        writeable NumPy array (no copy for CPU torch; a copy of JAX's read-only
        result; a device-to-host copy from an accelerator). The SciPy
        dtype is the NumPy one of ``dtype`` (float32 stays float32, so ARPACK runs
        in single precision; build the operator in float64 for tight
        tolerances). A symmetric operator (``symmetric=True``, as the Fisher and
        Hessian operators are) also gives ``rmatvec`` / ``rmatmat`` (the same
        products); another, a dense one from ``aslinearoperator`` included, has no
        transpose (SciPy's NotImplementedError: use SciPy's own
        ``aslinearoperator`` for a dense matrix).
        Vectors SciPy returns (eigenvectors, solutions) come back with
        ``xp.asarray``, e.g. ``lin.unravel(torch.from_numpy(vectors.T))``.
        Needs SciPy.

        Examples
        --------
        >>> import numpy as np
        >>> from scipy.sparse.linalg import eigsh
        >>> op = aslinearoperator(np.diag([1.0, 2.0, 5.0, 3.0]))
        >>> float(eigsh(op.to_scipy(), k=1, return_eigenvectors=False)[0])
        5.0
        """
        try:
            from scipy.sparse.linalg import LinearOperator as SciPyOperator
        except ImportError as err:  # pragma: no cover - scipy is in every extra
            msg = "to_scipy needs SciPy: pip install scipy."
            raise ImportError(msg) from err
        return _scipy_operator(self, SciPyOperator)

    def __repr__(self) -> str:
        return f"LinearOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _scipy_operator(op: LinearOperator, base: Any) -> Any:
    """A SciPy operator over ``op``: NumPy in, ``op``'s namespace inside, NumPy out."""
    import numpy as np

    xp = _namespace_of(op)
    dtype = np.dtype(to_host(xp.zeros((0,), dtype=op.dtype, device=op.device)).dtype)

    def into(x: Any) -> Any:
        # writeable: torch warns on (and may write through) a read-only NumPy buffer
        host = np.require(x, dtype=dtype, requirements="W")
        return xp.asarray(host, dtype=op.dtype, device=op.device)

    def out(y: Any) -> Any:
        host = to_host(y)  # a read-only view for JAX on the CPU: SciPy may write to it
        return host if host.flags.writeable else np.array(host)

    def vec(x: Any) -> Any:
        return out(op.matvec(into(np.ravel(x))))

    def mat(x: Any) -> Any:
        return out(op.matmat(into(x)))

    class _Exported(base):
        """SciPy's view of a fisherbound operator (``LinearOperator.to_scipy``)."""

        def __init__(self) -> None:
            super().__init__(dtype=dtype, shape=op.shape)

        def _matvec(self, x: Any) -> Any:
            return vec(x)

        def _matmat(self, x: Any) -> Any:
            return mat(x)

        def _rmatvec(self, x: Any) -> Any:
            if not op.symmetric:
                msg = "this operator is not marked symmetric=True: it has no transpose product."
                raise NotImplementedError(msg)
            return vec(x)

        def _rmatmat(self, x: Any) -> Any:
            if not op.symmetric:
                msg = "this operator is not marked symmetric=True: it has no transpose product."
                raise NotImplementedError(msg)
            return mat(x)

        def _adjoint(self) -> Any:
            if op.symmetric:
                return self
            return super()._adjoint()

    return _Exported()


def _from_scipy(A: Any) -> LinearOperator:
    """A ``scipy.sparse.linalg.LinearOperator`` as a NumPy ``LinearOperator``."""
    import numpy as np

    dtype = np.dtype(A.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        msg = (
            "A must be real floating (float32 or float64); got a SciPy LinearOperator of "
            f"dtype {dtype}."
        )
        raise TypeError(msg)
    n, m = (int(s) for s in A.shape)

    def matvec(v: Array) -> Array:
        return np.asarray(A.matvec(v), dtype=dtype).reshape(n)

    def matmat(V: Array) -> Array:
        return np.asarray(A.matmat(V), dtype=dtype).reshape(n, int(V.shape[1]))

    return LinearOperator((n, m), matvec=matvec, matmat=matmat, dtype=dtype, device="cpu", xp=np)


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


def _is_scipy_operator(A: object) -> bool:
    """Whether ``A`` is a ``scipy.sparse.linalg.LinearOperator`` (without importing SciPy)."""
    return any(
        c.__module__.startswith("scipy.sparse.linalg") and c.__name__ == "LinearOperator"
        for c in type(A).__mro__
    )


def _what(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def aslinearoperator(A: Any, /) -> Any:
    """View ``A`` as a linear operator.

    A dense 2-D float32 or float64 array of any array-API library, checked finite
    (one reduction over its entries), becomes a ``LinearOperator`` with
    ``matvec(v) = A @ v`` and ``matmat(V) = A @ V``, in A's namespace and on A's
    device (no copy; a JAX array also gets a ``traceable`` product). A
    ``scipy.sparse.linalg.LinearOperator`` (float32 or float64: SciPy's operator
    algebra, or an operator of ``LinearOperator.to_scipy`` combined with others)
    becomes a NumPy ``LinearOperator`` over its ``matvec`` / ``matmat``. An object
    that already satisfies ``LinearOperatorLike`` is returned as it is (after
    checking that its dtype is real floating).

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
    if _is_scipy_operator(A):
        return _from_scipy(A)
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
