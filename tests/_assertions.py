"""``assert_close``: a cross-backend comparison that checks where a result lives first.

Comparing through NumPy alone (``np.testing.assert_allclose(to_host(x), ...)``)
passes when a function returns the right numbers in the wrong library, on the
wrong device or in the wrong precision. :func:`assert_close` checks, in order,
the namespace (array type in equals array type out), the device, the dtype and
the shape, and only then the values, on the host::

    from _assertions import assert_close

    assert_close(lin.jvp(v), expected, rtol=1e-12, atol=0.0)            # expected: an array
    assert_close(lin.jvp(v), host_values, rtol=1e-12, atol=0.0, like=v)  # host reference
    assert_close(f(x), host_values, rtol=0.0, atol=1e-10, like=backend)
    assert_close(lin.logits, host_values, rtol=0.0, atol=1e-12, like="jax")
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fisherbound._lib import array_namespace, device_of, is_array, to_host


def _reference(like: Any) -> Any:
    """The array whose namespace and device a result must share (a backend: a 0-d array)."""
    if isinstance(like, str):  # a backend id of _backends.py: "torch", "jax", ...
        from _backends import make_backend

        like = make_backend(like)
    if hasattr(like, "xp") and hasattr(like, "asarray"):  # a Backend of _backends.py
        return like.asarray(np.zeros(()))
    return like


def assert_like(actual: Any, expected: Any, *, like: Any = None, dtype: Any = None) -> Any:
    """Assert that ``actual`` has the namespace, device, dtype and shape it should have.

    The checks of :func:`assert_close` without the values (for tests that compare
    values their own way); returns ``expected`` on the host as a NumPy array.
    ``like`` and ``dtype`` as in :func:`assert_close`.
    """
    assert is_array(actual), f"expected an array, got {type(actual).__name__}"
    ref = _reference(like) if like is not None else expected
    if not is_array(ref):
        msg = "assert_close needs like= (an array or a backend) when expected holds host values"
        raise TypeError(msg)
    xp_actual, xp_ref = array_namespace(actual), array_namespace(ref)
    assert xp_actual is xp_ref, (
        f"namespace: got {type(actual).__module__}.{type(actual).__name__} "
        f"({xp_actual.__name__}), expected {xp_ref.__name__}"
    )
    assert device_of(actual) == device_of(ref), (
        f"device: got {device_of(actual)!r}, expected {device_of(ref)!r}"
    )
    host_expected = np.asarray(to_host(expected) if is_array(expected) else expected)
    if dtype is None:
        if is_array(like):
            dtype = like.dtype
        elif is_array(expected) and array_namespace(expected) is xp_actual:
            dtype = expected.dtype
        else:  # host values: the backend's dtype of the same name
            dtype = getattr(xp_actual, host_expected.dtype.name)
    assert actual.dtype == dtype, f"dtype: got {actual.dtype}, expected {dtype}"
    shape = tuple(actual.shape)
    assert shape == host_expected.shape, f"shape: got {shape}, expected {host_expected.shape}"
    return host_expected


def assert_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float,
    atol: float,
    like: Any = None,
    dtype: Any = None,
) -> None:
    """Assert that ``actual`` lives where it should and is close to ``expected``.

    Parameters
    ----------
    actual
        The array under test (any array API library, 0-d NumPy scalars included).
    expected
        An array of the same library, device and dtype, or host values
        (NumPy arrays, lists, Python numbers) together with ``like``.
    rtol, atol
        The tolerances of ``np.testing.assert_allclose``: ``|a - e| <= atol + rtol |e|``.
    like
        An array, a test backend (``_backends.Backend``) or a backend id
        (``"torch"``, ``"jax"``, ...), whose namespace and device ``actual``
        must have. Defaults to ``expected``, which must then be an array.
    dtype
        The dtype ``actual`` must have. Defaults to the dtype of ``like`` (an
        array), else of ``expected`` (an array of the library of ``actual``),
        else the dtype of that library named like ``np.asarray(expected).dtype``
        (host values: float64 for Python floats).

    Raises
    ------
    AssertionError
        Naming the first property that differs: namespace, device, dtype, shape or values.
    """
    host_expected = assert_like(actual, expected, like=like, dtype=dtype)
    np.testing.assert_allclose(np.asarray(to_host(actual)), host_expected, rtol=rtol, atol=atol)
