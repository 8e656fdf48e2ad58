"""Host-side random numbers.

All randomness is drawn on the host from a ``numpy.random.Generator`` and moved
to the target namespace and device with ``xp.asarray``. One seed therefore gives
bit-identical probes on NumPy, CuPy, torch and JAX.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fisherbound._lib._options import DISTRIBUTIONS

Array = Any

__all__ = ["DISTRIBUTIONS", "RankedGenerator", "as_generator", "probes", "uniform"]


class RankedGenerator:
    """A host generator for traced SPMD code, with independent probes on every device.

    It draws ``world_size`` copies of every request and keeps this device's
    (``select``).
    """

    def __init__(self, gen: np.random.Generator, world_size: int, select: Any) -> None:
        self.gen = gen
        self.world_size = world_size
        self.select = select


def as_generator(rng: Any) -> Any:
    """Normalise ``rng`` (a Generator, an int seed or None) to a Generator."""
    if isinstance(rng, np.random.Generator) or _ranked(rng):
        return rng  # a RankedGenerator is used like one by probes() and uniform()
    if rng is None or (isinstance(rng, int | np.integer) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            msg = f"rng must be a non-negative int seed (or a Generator or None); got {rng}."
            raise ValueError(msg)
        return np.random.default_rng(rng)
    msg = f"rng must be a numpy.random.Generator, an int seed or None; got {type(rng).__name__}."
    raise TypeError(msg)


def probes(
    rng: Any,
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
    ranked = _ranked(rng)
    gen = rng.gen if ranked else rng
    full = (rng.world_size, *shape) if ranked else shape
    if distribution == "rademacher":
        # ±1 as int8: an eighth of the float64 bytes to build and move; exact in any dtype.
        signs = gen.integers(0, 2, size=full, dtype=np.int8) * np.int8(2) - np.int8(1)
        out = xp.astype(xp.asarray(signs, device=device), dtype)
    elif distribution == "gaussian":
        out = xp.asarray(gen.standard_normal(size=full), dtype=dtype, device=device)
    else:
        msg = f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}."
        raise ValueError(msg)
    return rng.select(out) if ranked else out


def uniform(rng: Any, shape: tuple[int, ...], *, xp: Any, dtype: Any, device: Any) -> Array:
    """Uniform numbers on [0, 1), drawn on the host."""
    if _ranked(rng):
        out = xp.asarray(rng.gen.random(size=(rng.world_size, *shape)), dtype=dtype, device=device)
        return rng.select(out)
    return xp.asarray(rng.random(size=shape), dtype=dtype, device=device)


def _ranked(rng: Any) -> bool:
    """A ``RankedGenerator`` (traced SPMD code): draw every device's numbers, keep ours."""
    return isinstance(rng, RankedGenerator)
