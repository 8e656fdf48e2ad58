"""Shared fixtures: the backend matrix.

``backend`` runs a test on NumPy, array-api-strict (default device and a
non-default fake device, which refuses silent host copies), torch (CPU) and
JAX (CPU); CuPy and CUDA torch join when a GPU is present and skip otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)


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


BACKENDS = ["numpy", "strict", "strict-device1", "torch", "jax", "cupy", "torch-cuda"]


def make_backend(name: str) -> Backend:
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
        pytest.importorskip("jax")
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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every array library of the test matrix (GPU ones skip without a GPU)."""
    return make_backend(request.param)


@pytest.fixture(params=["numpy", "strict-device1", "torch", "jax"])
def cpu_backend(request: pytest.FixtureRequest) -> Backend:
    """A smaller matrix for slow tests: NumPy, strict on a fake device, torch, JAX."""
    return make_backend(request.param)
