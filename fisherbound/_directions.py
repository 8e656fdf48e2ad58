"""Directions in parameter space for the loss landscape: drawing, checking, step sizes.

Random directions (Gaussian, Rademacher, unit sphere, filter-normalised), the
checks of user-given directions and parameter blocks, and the finite-difference
displacement of ``fisherbound.landscape``, split from it by job (the public
``random_directions``, ``default_step`` and ``DIRECTION_KINDS`` are re-exported
there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fisherbound._lib import (
    RngLike,
    array_namespace,
    as_generator,
    check_choice,
    check_finite,
    check_floating,
    check_positive_int,
    check_vector,
    conform,
    device_of,
    is_array,
    known_false,
    probes,
)
from fisherbound.linearization import LossFunction, ParameterBlock

Array = Any

__all__ = [
    "DIRECTION_KINDS",
    "check_blocks",
    "check_vectors",
    "coefficients",
    "default_step",
    "draw",
    "params_and_blocks",
    "random_directions",
    "step_size",
]

#: Random direction distributions (``kind=`` / ``distribution=``).
DIRECTION_KINDS = ("gaussian", "rademacher", "sphere", "filter")


def check_vectors(
    x: Any, name: str, ref: Any, num_params: int, rows: Sequence[int] | None, what: str
) -> Array:
    """``x`` (k, D) as rows of ref's namespace, device and dtype; k in ``rows``."""
    if not is_array(x) and hasattr(x, "directions"):
        x = x.directions  # an EigenDirections
    xp = array_namespace(x, ref, names=(name, what))
    check_floating(x, name, xp=xp)
    if x.ndim != 2 or int(x.shape[1]) != num_params:
        msg = (
            f"{name} must have shape (k, D) = (k, {num_params}): one direction per row, "
            f"D the number of parameters; got shape {tuple(x.shape)}."
        )
        raise ValueError(msg)
    if rows is not None and int(x.shape[0]) not in rows:
        allowed = " or ".join(str(r) for r in rows)
        msg = (
            f"{name} must hold {allowed} directions (rows); got {int(x.shape[0])}. "
            f"Select rows, e.g. {name}[:2]."
        )
        raise ValueError(msg)
    owner = "the device of the parameters"
    return conform(x, name, xp=xp, dtype=ref.dtype, device=device_of(ref), owner=owner)


def check_blocks(blocks: Any, num_params: int) -> tuple[Any, ...]:
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        msg = (
            "blocks must be a non-empty sequence of ParameterBlock (name, shape, offset, "
            f"size), e.g. loss.blocks; got {type(blocks).__name__}."
        )
        raise TypeError(msg)
    offset = 0
    for i, b in enumerate(blocks):
        if not isinstance(b, ParameterBlock):
            msg = f"blocks[{i}] must be a ParameterBlock; got {type(b).__name__}."
            raise TypeError(msg)
        if b.offset != offset or math.prod(b.shape) != b.size:
            msg = (
                "blocks must tile the parameter vector in order (each block's offset the "
                f"end of the previous one, size the product of its shape); blocks[{i}] = "
                f"{b!r} does not start at {offset}."
            )
            raise ValueError(msg)
        offset += b.size
    if offset != num_params:
        msg = (
            f"blocks must cover all D = {num_params} parameters; they cover {offset}. "
            "Pass the blocks of the same model (loss.blocks)."
        )
        raise ValueError(msg)
    return tuple(blocks)


# --------------------------------------------------------------------------- #
# random directions


def _norm(xp: Any, x: Array, *, axis: int | None = None, keepdims: bool = False) -> Array:
    """‖x‖ along ``axis`` without overflow in the squares: max|x| · ‖x / max|x|‖.

    The plain vector_norm of float32 entries above about 1.8e19 overflows (NumPy and
    torch square first); the scaled one is finite whenever the norm itself is.
    """
    big = xp.max(xp.abs(x), axis=axis, keepdims=True)
    # Divided by √max twice: XLA on the CPU divides by multiplying with the reciprocal,
    # and 1 / max is subnormal (flushed to 0) for a float32 max above 8.5e37.
    root = xp.sqrt(xp.where(big == 0.0, xp.ones_like(big), big))
    out = big * xp.linalg.vector_norm(x / root / root, axis=axis, keepdims=True)
    if keepdims:
        return out
    return xp.reshape(out, ()) if axis is None else xp.squeeze(out, axis=axis)


def _filter_normalize(xp: Any, G: Array, theta: Array, blocks: Sequence[Any]) -> Array:
    """Scale every filter of each row of G (m, D) to the norm of θ's filter."""
    m = int(G.shape[0])
    pieces = []
    for b in blocks:
        g = G[:, b.offset : b.offset + b.size]
        if b.size == 0:
            pieces.append(g)
            continue
        rows = int(b.shape[0]) if len(b.shape) >= 2 else 1
        cols = b.size // rows
        g3 = xp.reshape(g, (m, rows, cols))
        t2 = xp.reshape(theta[b.offset : b.offset + b.size], (1, rows, cols))
        gn = xp.linalg.vector_norm(g3, axis=-1, keepdims=True)
        tn = _norm(xp, t2, axis=-1, keepdims=True)
        scale = tn / xp.where(gn == 0.0, xp.ones_like(gn), gn)
        pieces.append(xp.reshape(g3 * scale, (m, b.size)))
    return xp.concat(pieces, axis=1)


def draw(xp: Any, gen: Any, m: int, kind: str, theta: Array, blocks: Sequence[Any] | None) -> Array:
    """The m random directions (m, D) of ``kind``, drawn on the host one row at a time."""
    d = int(theta.shape[0])
    dist = "rademacher" if kind == "rademacher" else "gaussian"
    G = probes(gen, (m, d), distribution=dist, xp=xp, dtype=theta.dtype, device=device_of(theta))
    if kind == "sphere":
        return G / xp.linalg.vector_norm(G, axis=1, keepdims=True)
    if kind == "filter":
        assert blocks is not None
        D = _filter_normalize(xp, G, theta, blocks)
        if known_false(xp.all(xp.isfinite(D))):
            msg = (
                "params must have filters whose norms are finite in "
                f"{theta.dtype}: a filter-normalised direction overflowed (largest |θ_i| = "
                f"{float(xp.max(xp.abs(theta))):.3g}). Rescale the parameters or use float64."
            )
            raise ValueError(msg)
        return D
    return G


def params_and_blocks(params: Any, blocks: Any, kind: str) -> tuple[Any, Array, Any]:
    if isinstance(params, LossFunction):
        theta = params.params
        if blocks is None:
            blocks = params.blocks
    else:
        theta = params
    expected = "a flat, non-empty parameter vector θ (D,) or a LossFunction"
    xp = check_vector(theta, "params", expected)
    check_finite(theta, "params", xp=xp)
    if kind == "filter":
        if blocks is None:
            msg = (
                "kind='filter' needs the parameter blocks (which entries form a filter): "
                "pass blocks=loss.blocks, or pass the LossFunction itself as params."
            )
            raise ValueError(msg)
        blocks = check_blocks(blocks, int(theta.shape[0]))
    return xp, theta, blocks


def random_directions(
    params: Array | LossFunction,
    /,
    *,
    num_directions: int = 2,
    kind: str = "gaussian",
    blocks: Sequence[ParameterBlock] | None = None,
    rng: RngLike = None,
) -> Array:
    r"""Random directions in parameter space, as rows (k, D).

    Cost: :math:`k \cdot D` host random numbers moved to the device once (plus one norm
    per filter for ``"filter"``); no model evaluation.

    ``kind``:

    - ``"gaussian"``: :math:`\eta \sim \mathcal{N}(0, I_D)`;
      :math:`\mathbb{E}[\eta^\top H \eta] = \operatorname{tr} H`,
      :math:`\operatorname{Var} = 2 \operatorname{tr} H^2`.
    - ``"rademacher"``: entries :math:`\pm 1`; :math:`\mathbb{E} = \operatorname{tr} H`,
      :math:`\operatorname{Var} = 2(\lVert H \rVert_F^2 - \sum_i H_{ii}^2)`.
    - ``"sphere"``: uniform on the unit sphere;
      :math:`\mathbb{E}[u^\top H u] = \operatorname{tr} H / D`,
      :math:`\operatorname{Var} = 2[D \operatorname{tr} H^2 - (\operatorname{tr} H)^2]
      / (D^2 (D + 2))`.
    - ``"filter"``: filter-normalised (Li et al. 2018): a Gaussian direction whose
      every filter :math:`f` (a slice along the first axis of a weight block; a 1-D
      block, such as a bias, is one filter) is rescaled to :math:`\lVert \theta_f \rVert`.
      :math:`\mathbb{E}[d d^\top] = \operatorname{diag}(w)`,
      :math:`w_i = \lVert \theta_f \rVert^2 / n_f`, so :math:`\mathbb{E}[d^\top H d]` is the
      WEIGHTED trace :math:`\sum_f (\lVert \theta_f \rVert^2 / n_f) \operatorname{tr}(H_{ff})`,
      not :math:`\operatorname{tr} H`. Filters of :math:`\theta` that are zero get zero.

    Parameters
    ----------
    params
        :math:`\theta` (D,), a flat floating array, or a LossFunction (its ``params``
        and ``blocks`` are used).
    num_directions
        :math:`k \ge 1`.
    kind
        One of ``DIRECTION_KINDS``.
    blocks
        The parameter blocks (``loss.blocks``), needed for ``"filter"`` when
        ``params`` is an array.
    rng
        numpy Generator, int seed, JAX key or None. Drawn on the host, so one seed gives the
        same directions on every backend (row by row: the first rows of :math:`k + 1`
        directions are the :math:`k` directions).

    Returns
    -------
    Array
        (k, D), in :math:`\theta`'s namespace, device and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> d = random_directions(np.zeros(5), num_directions=2, kind="sphere", rng=0)
    >>> d.shape, np.round(np.linalg.norm(d, axis=1), 12).tolist()
    ((2, 5), [1.0, 1.0])
    """
    kind = check_choice(kind, "kind", DIRECTION_KINDS)
    k = check_positive_int(num_directions, "num_directions")
    xp, theta, blocks = params_and_blocks(params, blocks, kind)
    return draw(xp, as_generator(rng), k, kind, theta, blocks)


# --------------------------------------------------------------------------- #
# finite differences


def default_step(params: Array, /) -> Array:
    r"""The default finite-difference displacement :math:`h`, 0-d.

    :math:`h = \varepsilon^{1/4} \cdot \max(\lVert \theta \rVert, 1)`.
    ``params`` is a flat float32 or float64 vector with finite entries (else a
    ValueError or TypeError); :math:`\lVert \theta \rVert` is computed scaled, so entries
    far beyond :math:`\sqrt{\text{largest float}}` are fine as long as the norm itself is
    finite.

    :math:`\varepsilon` is the machine epsilon of :math:`\theta`'s dtype
    (:math:`\varepsilon^{1/4} \approx` 1.2e−4 in float64, 1.9e−2 in float32). The second
    difference :math:`[L(\theta + h u) - 2L(\theta) + L(\theta - h u)] / h^2` of a
    unit direction :math:`u` has a truncation error :math:`O(h^2 L'''')` and a rounding
    error :math:`O(\varepsilon \lvert L \rvert / h^2)`; :math:`h \propto \varepsilon^{1/4}`
    balances the two, and the factor :math:`\lVert \theta \rVert` makes the
    step relative to the size of the parameters (a step of about :math:`\varepsilon^{1/4}`
    of every coordinate's root-mean-square for a direction with entries of order
    one). A direction :math:`d` is used with the coefficient
    :math:`h / \lVert d \rVert`, so that the displacement has norm :math:`h` whatever the
    scaling of :math:`d`.
    """
    xp = check_vector(params, "params", "a flat, non-empty parameter vector θ (D,)")
    check_finite(params, "params", xp=xp)
    eps = float(xp.finfo(params.dtype).eps)
    one = xp.asarray(1.0, dtype=params.dtype, device=device_of(params))
    h = eps**0.25 * xp.maximum(_norm(xp, params), one)
    if known_false(xp.isfinite(h)):
        msg = (
            f"params must have a norm finite in {params.dtype}; ‖θ‖ overflowed (largest "
            f"|θ_i| = {float(xp.max(xp.abs(params))):.3g}). Rescale the parameters, compute "
            "in float64, or pass step= explicitly."
        )
        raise ValueError(msg)
    return h


def step_size(xp: Any, theta: Array, step: float | None) -> Array:
    if step is None:
        return default_step(theta)
    return xp.asarray(step, dtype=theta.dtype, device=device_of(theta))


def coefficients(xp: Any, P: Array, h: Array) -> Array:
    """The coefficients h / ‖P[i]‖ of the rows (0 for a zero row, whose samples are then 0)."""
    norms = xp.linalg.vector_norm(P, axis=1)
    zero = norms == 0.0
    return xp.where(zero, xp.zeros_like(norms), h / xp.where(zero, xp.ones_like(norms), norms))
