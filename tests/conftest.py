"""Shared fixtures: the backend matrix.

``backend`` runs a test on NumPy, array-api-strict (default device and a
non-default fake device, which refuses silent host copies), torch (CPU) and
JAX (CPU); CuPy and CUDA torch join when a GPU is present and skip otherwise.
The smaller matrices ``cpu_backend``, ``eager_backend`` and ``host_backend`` are
subsets of the same table (``_backends.py``); every case carries its backend's
markers (``numpy``, ``strict``, ``torch``, ``jax``, ``cupy``, ``gpu``) and its id
(``test_x[strict-device1]``), so ``-m`` and ``-k`` select parts of the matrix.

The test helpers (``_backends``, ``_assertions``, ``_models``) are plain modules
next to this file: it puts the tests folder on ``sys.path`` (the tests run with
``--import-mode=importlib``, which does not), so a test module imports them as
``from _assertions import assert_close``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _backends import ALL, CPU, EAGER, HOST, Backend, backend_params, make_backend  # noqa: E402

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)

__all__ = ["Backend", "make_backend"]


@pytest.fixture(params=backend_params(ALL))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every array library of the test matrix (GPU ones skip without a GPU)."""
    return make_backend(request.param)


@pytest.fixture(params=backend_params(CPU))
def cpu_backend(request: pytest.FixtureRequest) -> Backend:
    """A smaller matrix for slow tests: NumPy, strict on a fake device, torch, JAX."""
    return make_backend(request.param)


@pytest.fixture(params=backend_params(EAGER))
def eager_backend(request: pytest.FixtureRequest) -> Backend:
    """NumPy, strict on a fake device and torch: without JAX, whose eager mode
    recompiles every op of a growing Lanczos basis (tens of seconds per test)."""
    return make_backend(request.param)


@pytest.fixture(params=backend_params(HOST))
def host_backend(request: pytest.FixtureRequest) -> Backend:
    """NumPy and strict on a fake device: for tests whose torch/JAX runs add nothing."""
    return make_backend(request.param)
