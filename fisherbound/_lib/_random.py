"""Host-side random numbers.

All randomness is drawn on the host from a ``numpy.random.Generator`` and moved
to the target namespace and device with ``xp.asarray``. One seed therefore gives
bit-identical probes on NumPy, CuPy, torch and JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any

DISTRIBUTIONS = ("rademacher", "gaussian")


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """Normalise ``rng`` (a Generator, an int seed or None) to a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, int | np.integer) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    msg = f"rng must be a numpy.random.Generator, an int seed or None; got {type(rng).__name__}."
    raise TypeError(msg)


def probes(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    *,
    distribution: str,
    xp: Any,
    dtype: Any,
    device: Any,
) -> Array:
    """Random probe vectors of ``shape``: Rademacher (±1) or standard Gaussian.

    Drawn on the host, so the same generator state gives the same probes on
    every backend.
    """
    if distribution == "rademacher":
        host = rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float64) * 2.0 - 1.0
    elif distribution == "gaussian":
        host = rng.standard_normal(size=shape)
    else:
        msg = f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}."
        raise ValueError(msg)
    return xp.asarray(host, dtype=dtype, device=device)


def uniform(
    rng: np.random.Generator, shape: tuple[int, ...], *, xp: Any, dtype: Any, device: Any
) -> Array:
    """Uniform numbers on [0, 1), drawn on the host."""
    return xp.asarray(rng.random(size=shape), dtype=dtype, device=device)
