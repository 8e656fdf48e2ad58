"""The backend matrix of the tests: array libraries and devices, with host conversions.

``conftest.py`` turns :data:`BACKEND_PARAMS` into the ``backend`` fixtures; tests that
run on one library without a fixture call :func:`make_backend` directly::

    from _backends import make_backend

    backend = make_backend("numpy")

Every backend id is a pytest marker as well (``numpy``, ``strict``, ``torch``, ``jax``,
``cupy``, plus ``gpu`` on the GPU ones), so ``-m "torch or jax"`` or ``-k strict-device1``
selects a subset of the matrix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# id -> the markers its test cases carry.
BACKEND_MARKS: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "strict": ("strict",),
    "strict-device1": ("strict",),  # array-api-strict on its non-default fake device
    "torch": ("torch",),
    "jax": ("jax",),
    "cupy": ("cupy", "gpu"),
    "torch-cuda": ("torch", "gpu"),
}

# The subsets the fixtures of conftest.py run on.
ALL = tuple(BACKEND_MARKS)
CPU = ("numpy", "strict-device1", "torch", "jax")  # slow tests: one entry per library
EAGER = ("numpy", "strict-device1", "torch")  # no JAX: its eager mode recompiles per op
HOST = ("numpy", "strict-device1")  # NumPy and a device that refuses host copies


def backend_params(names: tuple[str, ...]) -> list[Any]:
    """``pytest.param`` entries for ``names``, each with its id and markers."""
    return [
        pytest.param(name, id=name, marks=[getattr(pytest.mark, m) for m in BACKEND_MARKS[name]])
        for name in names
    ]


@dataclass(frozen=True)
class Backend:
    """An array library and a device, with conversions for the tests."""

    name: str
    xp: Any
    device: Any

    def asarray(self, a: Any, dtype: str = "float64") -> Any:
        dt = None if dtype is None else getattr(self.xp, dtype)
        return self.xp.asarray(np.asarray(a), dtype=dt, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        from fisherbound._lib import to_host

        return np.asarray(to_host(x))

    @property
    def float_types(self) -> tuple[Any, Any]:
        return self.xp.float32, self.xp.float64


def _cuda_torch() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _cupy_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def make_backend(name: str) -> Backend:
    """The backend ``name`` (one of :data:`ALL`); skips the test when it is not available."""
    from array_api_compat import array_namespace

    if name == "numpy":
        return Backend(name, array_namespace(np.zeros(1)), None)
    if name in ("strict", "strict-device1"):
        xs = pytest.importorskip("array_api_strict")
        dev = xs.Device("device1") if name == "strict-device1" else xs.Device("CPU_DEVICE")
        return Backend(name, xs, dev)
    if name == "torch":
        torch = pytest.importorskip("torch")
        return Backend(name, array_namespace(torch.zeros(1)), torch.device("cpu"))
    if name == "jax":
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        return Backend(name, jnp, jax.devices("cpu")[0])
    if name == "cupy":
        if not _cupy_gpu():
            pytest.skip("CuPy with a GPU is not available")
        import cupy

        return Backend(name, array_namespace(cupy.zeros(1)), cupy.cuda.Device(0))
    if name == "torch-cuda":
        if not _cuda_torch():
            pytest.skip("CUDA torch is not available")
        import torch

        return Backend(name, array_namespace(torch.zeros(1)), torch.device("cuda"))
    raise ValueError(name)
