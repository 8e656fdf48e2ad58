"""A test-only linearization with position axes, exact from a dense Jacobian.

``DenseLinearization(z, jac, mask=..., blocks=...)`` holds logits z (N, *S, C) and
the Jacobian J (N, *S, C, D) as arrays of one array-API namespace (NumPy, or
array-api-strict for the strict double) and implements every product of the
linearization contract exactly from J, with the rows of masked positions zeroed
as the adapters do (J_masked = diag(mask) J). ``columns`` counts the
per-example backward passes the analyses asked for (the K of every
``per_example_vjp`` call, times its examples).

``dense_fisher`` is the independent reference, on the host:

    F = Σ_x Σ_t J_xtᵀ K(z_xt) J_xt    (masked positions excluded),

and ``random_case`` builds a small random case for a family, position shape and
mask.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fisherbound._lib import array_namespace
from fisherbound.families import Bernoulli, Categorical
from fisherbound.linearization import LinearizationBase, make_blocks

Array = Any


class DenseLinearization(LinearizationBase):
    """Every product from a dense Jacobian (N, *S, C, D); masked rows are zero."""

    def __init__(
        self,
        z: Array,
        jac: Array,
        *,
        mask: Array | None = None,
        blocks: Any = None,
        default_max_vectors: int | None = None,
    ) -> None:
        xp = array_namespace(z, jac)
        self._xp = xp
        self._logits = z
        self._mask = mask
        d = int(jac.shape[-1])
        if mask is not None:
            jac = jac * xp.astype(mask, jac.dtype)[..., None, None]
        self._jac = jac
        self._blocks = make_blocks([("w", (d,))] if blocks is None else blocks)
        if default_max_vectors is not None:
            self.default_max_vectors = default_max_vectors
        self.columns = 0

    def _flat(self) -> Array:
        """J as (N·P·C, D)."""
        return self._xp.reshape(self._jac, (-1, self.num_params))

    def jvp(self, v: Array, /) -> Array:
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        return self._xp.reshape(self._flat() @ v, self.output_shape)

    def vjp(self, u: Array, /) -> Array:
        xp = self._xp
        u = self._operand(u, "u", self.output_shape, self._output_text())
        return xp.reshape(xp.reshape(u, (1, -1)) @ self._flat(), (self.num_params,))

    def jvp_batch(self, V: Array, /) -> Array:
        xp = self._xp
        out = self._flat() @ xp.matrix_transpose(V)  # (N P C, M)
        return xp.reshape(xp.matrix_transpose(out), (int(V.shape[0]), *self.output_shape))

    def vjp_batch(self, U: Array, /) -> Array:
        xp = self._xp
        return xp.reshape(U, (int(U.shape[0]), -1)) @ self._flat()

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = None) -> Array:
        xp = self._xp
        start, stop = self._examples(examples)
        n, k = stop - start, int(U.shape[1])
        self.columns += n * k
        jac = xp.reshape(self._jac[start:stop, ...], (n, -1, self.num_params))  # (n, P C, D)
        return xp.reshape(U, (n, k, -1)) @ jac


def dense_fisher(
    z: np.ndarray, jac: np.ndarray, mask: np.ndarray | None, family: Any, kernel: str = "exact"
) -> np.ndarray:
    """Σ_x Σ_t J_xtᵀ K(z_xt) J_xt on the host (masked positions excluded); (D, D)."""
    c, d = int(jac.shape[-2]), int(jac.shape[-1])
    jf = jac.reshape(-1, c, d)
    kz = np.asarray(family.metric(z, kernel=kernel)).reshape(-1, c, c)
    keep = np.ones(jf.shape[0]) if mask is None else np.asarray(mask, dtype=float).reshape(-1)
    return np.einsum("k,kcd,kce,kef->df", keep, jf, kz, jf)


def random_case(
    family: Any,
    spatial: tuple[int, ...],
    *,
    masked: bool,
    n: int = 3,
    c: int = 3,
    d: int = 7,
    seed: int = 0,
) -> dict[str, Any]:
    """A random case: host z (N, *S, C), J (N, *S, C, D), mask (N, *S) or None.

    The mask (when ``masked``) drops a suffix of positions per example (padding of
    different lengths) and one more scattered position, but keeps at least one
    position of every example.
    """
    gen = np.random.default_rng(seed)
    shape = (n, *spatial)
    z = gen.standard_normal((*shape, c)) * 1.5
    jac = gen.standard_normal((*shape, c, d))
    mask = None
    if masked:
        p = math.prod(spatial)
        flat = np.ones((n, p), dtype=bool)
        for x in range(n):
            length = max(1, p - x)  # example x loses its last x positions
            flat[x, length:] = False
        if p > 2:
            flat[0, 1] = False  # a hole inside the first example
        mask = flat.reshape(shape)
    del family  # the same logits and Jacobian serve every family
    return {"z": z, "jac": jac, "mask": mask}


def make_lin(case: dict[str, Any], backend: Any = None, **options: Any) -> DenseLinearization:
    """The ``DenseLinearization`` of a ``random_case`` (float64) on a test backend.

    ``backend`` is a ``_backends.Backend`` (NumPy when None; array-api-strict on
    its fake device is the strict double).
    """
    if backend is None:
        z, jac = np.asarray(case["z"], dtype=np.float64), np.asarray(case["jac"])
        mask = case["mask"]
    else:
        z, jac = backend.asarray(case["z"]), backend.asarray(case["jac"])
        mask = None if case["mask"] is None else backend.asarray(case["mask"], dtype="bool")
    return DenseLinearization(z, jac, mask=mask, **options)


def labels_for(family: Any, z: np.ndarray, seed: int = 1) -> np.ndarray:
    """Host labels for logits z (N, *S, C): class indices or (N, *S, C) targets."""
    gen = np.random.default_rng(seed)
    if isinstance(family, Categorical):
        return gen.integers(0, z.shape[-1], size=z.shape[:-1])
    if isinstance(family, Bernoulli):
        return (gen.random(z.shape) < 0.5).astype(float)
    return z + gen.standard_normal(z.shape)
