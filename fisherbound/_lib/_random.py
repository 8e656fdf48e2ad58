"""Host-side random numbers.

All randomness is drawn on the host from a ``numpy.random.Generator`` and moved
to the target namespace and device with ``xp.asarray``. One seed therefore gives
bit-identical probes on NumPy, CuPy, torch and JAX.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fisherbound._lib._options import DISTRIBUTIONS

Array = Any

__all__ = [
    "DISTRIBUTIONS",
    "RankedGenerator",
    "as_generator",
    "probes",
    "rademacher_signs",
    "uniform",
]


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
    """Normalise ``rng`` (a Generator, an int seed, a JAX key or None) to a Generator.

    A JAX PRNG key (typed, ``jax.random.key(s)``, or the raw uint32 pair of
    ``jax.random.PRNGKey(s)``) seeds a NumPy generator with its key data: the same
    key gives the same host-drawn probes; ``jax.random.split`` gives independent
    ones. The key is read on the host, so a key traced inside ``jax.jit`` is refused.
    """
    if isinstance(rng, np.random.Generator) or _ranked(rng):
        return rng  # a RankedGenerator is used like one by probes() and uniform()
    if rng is None or (isinstance(rng, int | np.integer) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            msg = f"rng must be a non-negative int seed (or a Generator or None); got {rng}."
            raise ValueError(msg)
        return np.random.default_rng(rng)
    data = _jax_key_data(rng)
    if data is not None:
        return np.random.default_rng([int(w) for w in data.ravel()])
    msg = (
        "rng must be a numpy.random.Generator, an int seed, a JAX PRNG key or None; "
        f"got {type(rng).__module__}.{type(rng).__name__}."
    )
    raise TypeError(msg)


def _jax_key_data(rng: Any) -> np.ndarray | None:
    """The uint32 key data of a JAX PRNG key on the host; None if ``rng`` is none."""
    if type(rng).__module__.split(".")[0] not in ("jax", "jaxlib"):
        return None
    import jax  # a JAX object: JAX is installed

    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    raw = rng.dtype == np.uint32 and tuple(rng.shape) == (2,)
    if not (typed and rng.ndim == 0) and not raw:
        msg = (
            "rng must be a numpy.random.Generator, an int seed, a JAX PRNG key (one "
            "jax.random.key(seed), or the uint32 pair of jax.random.PRNGKey(seed)) or None; "
            f"got a JAX array of shape {tuple(rng.shape)} and dtype {rng.dtype}."
        )
        raise TypeError(msg)
    if isinstance(rng, jax.core.Tracer):
        msg = (
            "rng: a JAX key traced inside jax.jit cannot seed fisherbound's probes, which "
            "are drawn on the host when the function is traced; pass the key (or an int "
            "seed) from outside the jitted function, e.g. as a static argument."
        )
        raise TypeError(msg)
    data = jax.random.key_data(rng) if typed else rng
    return np.asarray(data, dtype=np.uint32)


def probes(
    rng: Any,
    shape: tuple[int, ...],
    *,
    distribution: str,
    xp: Any,
    dtype: Any,
    device: Any,
    keep: Any = None,
    signs: bool = False,
) -> Array:
    """Random probe vectors of ``shape``: Rademacher (±1) or standard Gaussian.

    Drawn on the host, so the same generator state gives the same probes on
    every backend. ``keep``: None, or a host boolean array of the shape
    ``shape[1:-1]``; the probe rows where it is False are set to 0 on the host
    (the others are the same draw), for positions that do not count.
    ``signs=True`` (Rademacher only): the same probes as int8 ±1 (0 in dropped
    rows), not cast to ``dtype``, for a kernel that takes signs (a quarter of
    float32's bytes, and no array of the probes' size in ``dtype``).
    """
    ranked = _ranked(rng)
    gen = rng.gen if ranked else rng
    full = (rng.world_size, *shape) if ranked else shape
    if distribution == "rademacher":
        host = rademacher_signs(gen, full)
    elif distribution == "gaussian":
        host = gen.standard_normal(size=full)
    else:
        msg = f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}."
        raise ValueError(msg)
    if keep is not None:
        host[..., ~keep, :] = 0  # only the dropped rows are written
    if distribution == "rademacher":  # ±1 moved as int8, cast on the device
        out = xp.asarray(host, device=device)
        out = out if signs else xp.astype(out, dtype)
    else:
        out = xp.asarray(host, dtype=dtype, device=device)
    return rng.select(out) if ranked else out


def rademacher_signs(gen: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Independent ±1 entries of ``shape`` as int8, one random bit each.

    The bits of ``gen.bytes`` unpacked (an eighth of a byte drawn per entry: for
    12.9 million signs 2.3 ms against 22 ms for ``gen.integers(0, 2)`` on this
    project's CPU machines); int8 is an eighth of float64's bytes to move, and
    exact in any dtype. Cost: O(n) host work, three passes over n bytes.
    """
    n = math.prod(shape)
    raw = np.frombuffer(gen.bytes((n + 7) // 8), dtype=np.uint8)
    signs = np.unpackbits(raw, count=n).view(np.int8)
    signs *= 2
    signs -= 1
    return signs.reshape(shape)


def uniform(rng: Any, shape: tuple[int, ...], *, xp: Any, dtype: Any, device: Any) -> Array:
    """Uniform numbers on [0, 1), drawn on the host."""
    if _ranked(rng):
        out = xp.asarray(rng.gen.random(size=(rng.world_size, *shape)), dtype=dtype, device=device)
        return rng.select(out)
    return xp.asarray(rng.random(size=shape), dtype=dtype, device=device)


def _ranked(rng: Any) -> bool:
    """A ``RankedGenerator`` (traced SPMD code): draw every device's numbers, keep ours."""
    return isinstance(rng, RankedGenerator)
