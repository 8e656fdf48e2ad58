"""Loss-landscape curvature: random projections, loss-only traces, Hessian directions.

THEORY §6 (Böttcher and Wheeler, *Visualizing high-dimensional loss landscapes
with Hessian directions*). A loss L: R^D → R at θ with Hessian H (eigenvalues
κ_i) is looked at through a plane θ + α η + β δ. What the plane shows depends on
how η and δ are chosen, and this module makes that quantitative:

- ``random_directions``: Gaussian, Rademacher, unit-sphere or filter-normalised
  random directions (the last estimate a *weighted* trace, see below);
- ``hessian_directions``: the eigenvectors of the largest and the smallest
  eigenvalue of H (Lanczos on the Hessian operator), along which a saddle always
  looks like a saddle; ``fisher_directions``: the top eigenvectors of the Fisher
  metric; ``hessian_operator``: H as a matrix-free operator for
  ``fisherbound.linalg``;
- ``projected_curvature``: the 2 × 2 projected Hessian and the principal, mean and
  Gaussian curvatures of the surface α, β ↦ L(θ + α η + β δ);
- ``loss_trace``: tr H from loss values only (central second differences along
  random directions), with a standard error, or the Hutchinson estimate with
  Hessian-vector products on the same probes for comparison;
- ``saddle_probability``: how often a random projection of a quadratic form shows
  a minimum, a maximum or a saddle (closed forms and Monte Carlo);
- ``surface``: 1-D and 2-D loss grids along any directions over a data set,
  streamed batch by batch.

The loss comes from an adapter's ``loss_function(...)`` (a
:class:`~fisherbound.linearization.LossFunction`): the negative log-likelihood of
a labelled batch. ``source`` is one loss function or several (a data set, one per
batch, all at the same θ); the total is the sum of the batch losses when they use
``reduction="sum"`` and the mean over every example when they use ``"mean"``.
Functions that apply H several times (``hessian_operator``,
``hessian_directions``, ``projected_curvature``) need a re-iterable source (a
list); ``loss_trace`` and ``surface`` stream any iterable once.

Expectations (THEORY §6), for Gaussian η: E[ηᵀHη] = tr H, Var = 2 tr H²;
Rademacher: Var = 2(‖H‖_F² − Σ_i H_ii²); unit sphere: E[uᵀHu] = tr H / D,
Var = 2[D tr H² − (tr H)²] / (D²(D + 2)). Filter-normalised directions scale
every filter f (a row of a weight tensor along its first axis; a 1-D block is one
filter) to the norm of the same filter of θ, so E[d dᵀ] = diag(w) with
w_i = ‖θ_f‖² / n_f for i in filter f of size n_f, and E[dᵀHd] is the WEIGHTED
trace Σ_f (‖θ_f‖² / n_f) tr(H_ff), not tr H.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from fisherbound._lib import (
    Estimate,
    array_namespace,
    as_generator,
    check_choice,
    check_floating,
    check_positive_int,
    device_of,
    is_array,
    probes,
)
from fisherbound._lib._collective import Collective, collective, fingerprint, shared_generator
from fisherbound._lib._estimate import estimate_from_samples
from fisherbound._lib._progress import progress_bar
from fisherbound._lib._validation import check_device, check_finite, is_traced
from fisherbound.families import Categorical, Family
from fisherbound.fisher import fisher_operator
from fisherbound.linalg import LinearOperator, eigsh
from fisherbound.linearization import LossFunction, ParameterBlock

Array = Any

__all__ = [
    "CURVATURE_METHODS",
    "DIRECTION_KINDS",
    "HESSIAN_METHODS",
    "SADDLE_METHODS",
    "TRACE_METHODS",
    "EigenDirections",
    "ProjectedCurvature",
    "SaddleProbability",
    "Surface",
    "default_step",
    "fisher_directions",
    "hessian_directions",
    "hessian_operator",
    "loss_trace",
    "projected_curvature",
    "random_directions",
    "saddle_probability",
    "surface",
]

#: Random direction distributions (``kind=`` / ``distribution=``).
DIRECTION_KINDS = ("gaussian", "rademacher", "sphere", "filter")
#: ``loss_trace`` methods: loss values only, or Hessian-vector products.
TRACE_METHODS = ("loss", "hvp")
#: ``hessian_directions`` methods.
HESSIAN_METHODS = ("lanczos", "shifted")
#: ``projected_curvature`` methods.
CURVATURE_METHODS = ("hvp", "loss")
#: ``saddle_probability`` methods.
SADDLE_METHODS = ("exact", "monte_carlo")

#: Default number of Monte-Carlo samples of ``saddle_probability``.
DEFAULT_NUM_SAMPLES = 10_000
#: Default number of probes evaluated per call of the loss in ``loss_trace``.
DEFAULT_PROBE_BATCH = 16
#: Entries of (shifts × D) formed at once by ``surface`` and the Monte Carlo.
_MAX_ENTRIES = 2**22
#: Step of the trapezoidal rule of Imhof's integral in s = log u (see ``_imhof``).
_IMHOF_STEP = 0.1


# --------------------------------------------------------------------------- #
# result types


class EigenDirections(NamedTuple):
    """Eigenvector directions of a curvature operator (Hessian or Fisher).

    Attributes
    ----------
    directions
        Unit vectors as ROWS, shape (k, D), in the order of ``eigenvalues``; pass
        it to ``surface`` or ``projected_curvature`` as it is.
    eigenvalues
        The Ritz values, shape (k,): (λ_max, λ_min) for ``hessian_directions``,
        descending for ``fisher_directions``.
    residuals
        ‖A y − θ y‖ for each pair, shape (k,): some eigenvalue of A lies within
        this distance of θ.
    """

    directions: Array
    eigenvalues: Array
    residuals: Array


class ProjectedCurvature(NamedTuple):
    """The curvature of the surface f(α, β) = L(θ + α η + β δ) at α = β = 0.

    Attributes
    ----------
    hessian
        H_αβ = [[ηᵀHη, ηᵀHδ], [δᵀHη, δᵀHδ]] = [[f_αα, f_αβ], [f_αβ, f_ββ]], (2, 2).
    gradient
        (f_α, f_β) = (ηᵀ∇L, δᵀ∇L), (2,).
    principal
        The principal curvatures (κ_+, κ_−) = H_m ± √(H_m² − K), (2,),
        descending; at a critical point the eigenvalues of ``hessian``.
    mean
        H_m = [(1 + f_β²) f_αα − 2 f_α f_β f_αβ + (1 + f_α²) f_ββ] / [2 (1 + f_α² + f_β²)^{3/2}].
    gaussian
        K = (f_αα f_ββ − f_αβ²) / (1 + f_α² + f_β²)².
    """

    hessian: Array
    gradient: Array
    principal: Array
    mean: Array
    gaussian: Array


class SaddleProbability(NamedTuple):
    """Probabilities that a random projection shows a minimum, a maximum or a saddle.

    0-d arrays in the eigenvalues' namespace. The three add up to 1 unless the
    projection is degenerate (singular) with positive probability, which happens
    only when H has fewer than ``dim`` nonzero eigenvalues. A Monte-Carlo value p
    has the binomial standard error √(p (1 − p) / num_samples).
    """

    minimum: Array
    maximum: Array
    saddle: Array


class Surface(NamedTuple):
    """Loss values on a grid of a 1-D or 2-D section θ + Σ_k α_k d_k.

    Attributes
    ----------
    coordinates
        One 1-D array of coefficients per direction: (α,) or (α, β).
    values
        The loss on the grid, shape (G,) or (G_α, G_β) (``values[i, j]`` at
        α_i, β_j): the sum of the batch losses, or the mean over every example
        for ``reduction="mean"``.
    directions
        The directions d_k as rows, shape (k, D).
    reduction
        ``"sum"`` or ``"mean"``, as the loss functions'.
    """

    coordinates: tuple[Array, ...]
    values: Array
    directions: Array
    reduction: str


# --------------------------------------------------------------------------- #
# the objective over a data set


def _check_loss(item: object, index: int, ref: Any) -> Any:
    """Item ``index`` of a source: a LossFunction at the parameters of item 0."""
    if not isinstance(item, LossFunction):
        what = "source" if index < 0 else f"item {index} of source"
        msg = (
            f"{what} must be a LossFunction (or an iterable of them); got "
            f"{type(item).__module__}.{type(item).__name__}. Build one with an adapter's "
            "loss_function(model, inputs, labels) (fisherbound.adapters.numpy, .torch, .jax)."
        )
        raise TypeError(msg)
    if ref is None:
        return item
    if item.num_params != ref.num_params:
        msg = (
            f"every loss function must have the same parameters; batch {index} has "
            f"D = {item.num_params}, batch 0 has D = {ref.num_params}."
        )
        raise ValueError(msg)
    if item.reduction != ref.reduction:
        msg = (
            f"every loss function must use the same reduction; batch {index} uses "
            f"{item.reduction!r}, batch 0 uses {ref.reduction!r}. Build them with one "
            "reduction= value."
        )
        raise ValueError(msg)
    xp = array_namespace(
        ref.params, item.params, names=("the params of batch 0", f"the params of batch {index}")
    )
    same = item.params == ref.params
    if not is_traced(same) and not bool(xp.all(same)):
        msg = (
            f"every loss function must be frozen at the same parameters θ; batch {index} "
            "differs from batch 0. Build all of them from one model state."
        )
        raise ValueError(msg)
    return item


def _stream(
    source: Any, *, desc: str, progress: bool | None, allow_empty: bool = False
) -> Iterator[Any]:
    """The loss functions of ``source`` (one, or an iterable), checked, lazily."""
    if isinstance(source, LossFunction):
        yield source
        return
    if not isinstance(source, Iterable) or isinstance(source, str | bytes) or is_array(source):
        _check_loss(source, -1, None)
    ref = None
    count = 0
    for i, item in enumerate(progress_bar(source, desc=desc, progress=progress)):
        _check_loss(item, i, ref)
        if ref is None:
            ref = item
        count += 1
        yield item
    if count == 0 and not allow_empty:
        msg = "source must contain at least one loss function; got an empty iterable."
        raise ValueError(msg)


def _agree(coll: Collective | None, first: Any, *, where: str, **options: Any) -> None:
    """With a collective: every rank has a batch of the same model, θ and options."""
    if coll is None:
        return
    empty = first is None  # placeholders: one vector size on every rank
    fields: dict[str, Any] = {
        "batches": 0 if empty else 1,
        "the parameter values θ": None if empty else fingerprint(first.params),
        "the number of parameters": -1 if empty else int(first.num_params),
        "the loss reduction": None if empty else first.reduction,
        "the family": None if empty else repr(first.family),
        "the dtype": None if empty else str(first.params.dtype),
    }
    coll.agree(fields | options, where=where)


def _sharded(
    source: Any, coll: Collective | None, *, desc: str, progress: bool | None, **options: Any
) -> Iterator[Any]:
    """``_stream`` for one rank's shard; at its end the ranks compare θ and ``options``
    (an empty shard is reported on every rank)."""
    first = None
    for item in _stream(source, desc=desc, progress=progress, allow_empty=coll is not None):
        first = item if first is None else first
        yield item
    _agree(coll, first, where=desc, **options)


class _Objective:
    """The total loss of a list of loss functions at one θ (sum, or mean over examples)."""

    def __init__(self, items: list[Any], coll: Collective | None = None) -> None:
        first = items[0]
        self.items = items
        self.coll = coll
        self.params = first.params
        self.blocks = tuple(first.blocks)
        self.num_params = int(first.num_params)
        self.reduction = first.reduction
        self.xp = array_namespace(first.params, names=("params",))
        self.dtype = first.params.dtype
        self.device = device_of(first.params)
        total = sum(int(item.num_inputs) for item in items)
        if coll is not None:
            total = coll.sum_int(total)
        if self.reduction == "mean":
            self.weights = [int(item.num_inputs) / total for item in items]
        else:
            self.weights = [1.0] * len(items)

    def _combine(self, parts: Iterable[Array]) -> Array:
        out = None
        for w, part in zip(self.weights, parts, strict=True):
            term = part if w == 1.0 else part * w
            out = term if out is None else out + term
        return out if self.coll is None else self.coll.sum(out)

    def value(self, shifts: Array) -> Array:
        return self._combine(item.value(shifts) for item in self.items)

    def gradient(self) -> Array:
        return self._combine(item.gradient() for item in self.items)

    def hvp(self, v: Array) -> Array:
        return self._combine(item.hvp(v) for item in self.items)

    def hvp_batch(self, V: Array) -> Array:
        return self._combine(item.hvp_batch(V) for item in self.items)


def _fingerprints(coordinates: Any) -> Any:
    if isinstance(coordinates, tuple | list):
        return tuple(fingerprint(c) for c in coordinates)
    return fingerprint(coordinates)


def _objective(source: Any, what: str, process_group: Any = None, **options: Any) -> _Objective:
    if isinstance(source, Iterator):
        msg = (
            f"{what} needs a re-iterable source (a LossFunction or a list of them): it "
            f"applies the Hessian several times; got a one-shot iterator "
            f"({type(source).__name__}). Wrap it in list(...)."
        )
        raise TypeError(msg)
    coll = collective(process_group)
    return _Objective(list(_sharded(source, coll, desc=what, progress=False, **options)), coll)


# --------------------------------------------------------------------------- #
# validation helpers


def _check_real(value: object, name: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a real number; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    x = float(value)
    if not math.isfinite(x) or (positive and x <= 0.0):
        req = "finite and > 0" if positive else "finite"
        msg = f"{name} must be {req}; got {x!r}."
        raise ValueError(msg)
    return x


def _check_vectors(
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
    check_device(x, name, device_of(ref), owner="the device of the parameters")
    check_finite(x, name, xp=xp)
    return xp.astype(x, ref.dtype) if x.dtype != ref.dtype else x


def _check_blocks(blocks: Any, num_params: int) -> tuple[Any, ...]:
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
        tn = xp.linalg.vector_norm(t2, axis=-1, keepdims=True)
        scale = tn / xp.where(gn == 0.0, xp.ones_like(gn), gn)
        pieces.append(xp.reshape(g3 * scale, (m, b.size)))
    return xp.concat(pieces, axis=1)


def _draw(
    xp: Any, gen: Any, m: int, kind: str, theta: Array, blocks: Sequence[Any] | None
) -> Array:
    """m random directions (m, D) of ``kind``, drawn on the host one row at a time."""
    d = int(theta.shape[0])
    dist = "rademacher" if kind == "rademacher" else "gaussian"
    G = probes(gen, (m, d), distribution=dist, xp=xp, dtype=theta.dtype, device=device_of(theta))
    if kind == "sphere":
        return G / xp.linalg.vector_norm(G, axis=1, keepdims=True)
    if kind == "filter":
        assert blocks is not None
        return _filter_normalize(xp, G, theta, blocks)
    return G


def _params_and_blocks(params: Any, blocks: Any, kind: str) -> tuple[Any, Array, Any]:
    if isinstance(params, LossFunction):
        theta = params.params
        if blocks is None:
            blocks = params.blocks
    else:
        theta = params
    xp = array_namespace(theta, names=("params",))
    check_floating(theta, "params", xp=xp)
    if theta.ndim != 1 or int(theta.shape[0]) == 0:
        msg = (
            "params must be a flat, non-empty parameter vector θ (D,) or a LossFunction; "
            f"got shape {tuple(theta.shape)}."
        )
        raise ValueError(msg)
    if kind == "filter":
        if blocks is None:
            msg = (
                "kind='filter' needs the parameter blocks (which entries form a filter): "
                "pass blocks=loss.blocks, or pass the LossFunction itself as params."
            )
            raise ValueError(msg)
        blocks = _check_blocks(blocks, int(theta.shape[0]))
    return xp, theta, blocks


def random_directions(
    params: Any,
    /,
    *,
    num_directions: int = 2,
    kind: str = "gaussian",
    blocks: Sequence[ParameterBlock] | None = None,
    rng: Any = None,
) -> Array:
    """Random directions in parameter space, as rows (k, D).

    Cost: k·D host random numbers moved to the device once (plus one norm per
    filter for ``"filter"``); no model evaluation.

    ``kind``:

    - ``"gaussian"``: η ~ N(0, I_D); E[ηᵀHη] = tr H, Var = 2 tr H².
    - ``"rademacher"``: entries ±1; E = tr H, Var = 2(‖H‖_F² − Σ_i H_ii²).
    - ``"sphere"``: uniform on the unit sphere; E[uᵀHu] = tr H / D,
      Var = 2[D tr H² − (tr H)²] / (D²(D + 2)).
    - ``"filter"``: filter-normalised (Li et al. 2018): a Gaussian direction whose
      every filter f (a slice along the first axis of a weight block; a 1-D block,
      such as a bias, is one filter) is rescaled to ‖θ_f‖. E[d dᵀ] = diag(w),
      w_i = ‖θ_f‖² / n_f, so E[dᵀHd] is the WEIGHTED trace
      Σ_f (‖θ_f‖² / n_f) tr(H_ff), not tr H. Filters of θ that are zero get zero.

    Parameters
    ----------
    params
        θ (D,), a flat floating array, or a LossFunction (its ``params`` and
        ``blocks`` are used).
    num_directions
        k ≥ 1.
    kind
        One of ``DIRECTION_KINDS``.
    blocks
        The parameter blocks (``loss.blocks``), needed for ``"filter"`` when
        ``params`` is an array.
    rng
        numpy Generator, int seed or None. Drawn on the host, so one seed gives the
        same directions on every backend (row by row: the first rows of k + 1
        directions are the k directions).

    Returns
    -------
    Array
        (k, D), in θ's namespace, device and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> d = random_directions(np.zeros(5), num_directions=2, kind="sphere", rng=0)
    >>> d.shape, np.round(np.linalg.norm(d, axis=1), 12).tolist()
    ((2, 5), [1.0, 1.0])
    """
    kind = check_choice(kind, "kind", DIRECTION_KINDS)
    k = check_positive_int(num_directions, "num_directions")
    xp, theta, blocks = _params_and_blocks(params, blocks, kind)
    return _draw(xp, as_generator(rng), k, kind, theta, blocks)


# --------------------------------------------------------------------------- #
# operators and eigen-directions


def hessian_operator(source: Any, /, *, process_group: Any = None) -> LinearOperator:
    """The Hessian ∇²L(θ) of the total loss as a matrix-free ``LinearOperator`` (D × D).

    matvec: Σ_b c_b ∇²L_b(θ) v, one Hessian-vector product per batch (c_b = 1 for
    ``reduction="sum"``, N_b / N for ``"mean"``); matmat: the same with
    ``hvp_batch`` over the columns. Use it with ``fisherbound.linalg`` (``eigsh``,
    ``hutchinson_trace``, ``lanczos_quadrature`` for the spectral density).

    Parameters
    ----------
    source
        A LossFunction or a re-iterable collection of them (every product streams
        the batches again).
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard and every product is all-reduced over the ranks
        (apply it to the same vectors on every rank).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 2.0]]), np.zeros((1, 1))
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> hessian_operator(loss).matmat(np.eye(2)).tolist()  # x xᵀ
    [[1.0, 2.0], [2.0, 4.0]]
    """
    obj = _objective(source, "hessian_operator", process_group)
    return _hessian_operator(obj)


def _hessian_operator(obj: _Objective) -> LinearOperator:
    xp = obj.xp

    def matmat(V: Array) -> Array:
        return xp.matrix_transpose(obj.hvp_batch(xp.matrix_transpose(V)))

    d = obj.num_params
    return LinearOperator(
        (d, d), matvec=obj.hvp, matmat=matmat, dtype=obj.dtype, device=obj.device, xp=xp
    )


def _shifted(op: Any, shift: Array) -> LinearOperator:
    xp = op.xp
    return LinearOperator(
        op.shape,
        matvec=lambda v: op.matvec(v) - shift * v,
        matmat=lambda V: op.matmat(V) - shift * V,
        dtype=op.dtype,
        device=op.device,
        xp=xp,
    )


def hessian_directions(
    source: Any,
    /,
    *,
    method: str = "lanczos",
    num_matvecs: int | None = None,
    rng: Any = None,
    process_group: Any = None,
) -> EigenDirections:
    """The eigenvectors of the largest and the smallest Hessian eigenvalue.

    Projected on these two directions the Hessian is diag(λ_max, λ_min) (THEORY §6):
    the surface shows the true extreme curvatures, and a saddle (λ_min < 0 <
    λ_max) always looks like a saddle.

    ``method="lanczos"`` (default): ONE Lanczos run with full reorthogonalisation
    on the Hessian operator (``fisherbound.linalg.eigsh(which="both", k=1)``); both
    extreme Ritz pairs converge from the same Krylov space. ``method="shifted"``:
    THEORY's two-run scheme: a first run gives the eigenvalue of largest magnitude
    λ₁, a second run, from a fresh random start, on H − λ₁ I gives the other end
    (λ = μ + λ₁). Lanczos is shift-invariant (the Krylov spaces of H and H − λ₁ I
    coincide), so the second run is an independent repetition of the first with
    the other end selected: twice the cost, useful as a cross-check. The run of
    the power method, which needs the shift, is not used.

    Parameters
    ----------
    source
        A LossFunction or a re-iterable collection of them (the Hessian of the total).
    method
        ``"lanczos"`` or ``"shifted"``.
    num_matvecs
        Lanczos steps m per run (default ``min(D, 60)``; at least 2). Check the
        ``residuals``; raise m if they are not small against the eigenvalues.
    rng
        numpy Generator, int seed or None (start vectors).
    process_group
        As in ``hessian_operator``; the start vectors must then be the same on every
        rank (the same ``rng`` seed; checked).

    Returns
    -------
    EigenDirections
        ``directions`` (2, D) rows (top, bottom), ``eigenvalues`` (λ_max, λ_min),
        ``residuals`` ‖H y − λ y‖.

    Notes
    -----
    Cost: m Hessian-vector products per run (each about two gradient steps per
    batch) plus O(D m²) work and D m memory for the Lanczos basis.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 2.0]]), np.zeros((1, 1))
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> np.round(hessian_directions(loss, rng=0).eigenvalues, 10).tolist()  # eig of x xᵀ
    [5.0, 0.0]
    """
    method = check_choice(method, "method", HESSIAN_METHODS)
    m = None
    if num_matvecs is not None:
        m = check_positive_int(num_matvecs, "num_matvecs")
        if m < 2:
            msg = (
                "num_matvecs must be at least 2 (two Ritz pairs for the two ends of the "
                f"spectrum); got {m}."
            )
            raise ValueError(msg)
    obj = _objective(source, "hessian_directions", process_group, method=method, m=m)
    d = obj.num_params
    if d < 2:
        msg = (
            "hessian_directions needs at least two parameters (D >= 2) for two distinct "
            f"directions; got D = {d}."
        )
        raise ValueError(msg)
    xp = obj.xp
    gen = shared_generator(obj.coll, rng, where="hessian_directions")
    op = _hessian_operator(obj)
    first = eigsh(op, k=1, which="both", num_matvecs=m, rng=gen)
    vals, vecs, res = first.eigenvalues, first.eigenvectors, first.residuals
    if method == "lanczos":
        order = [int(vals.shape[0]) - 1, 0]
        eigenvalues = xp.stack([vals[i] for i in order])
        directions = xp.stack([vecs[:, i] for i in order], axis=0)
        residuals = xp.stack([res[i] for i in order])
        return EigenDirections(directions, eigenvalues, residuals)
    # THEORY's scheme: the end of largest magnitude first, then the shifted run.
    top_first = bool(xp.abs(vals[-1]) >= xp.abs(vals[0]))
    i1 = int(vals.shape[0]) - 1 if top_first else 0
    lam1, y1, r1 = vals[i1], vecs[:, i1], res[i1]
    second = eigsh(
        _shifted(op, lam1),
        k=1,
        which="smallest" if top_first else "largest",
        num_matvecs=m,
        rng=gen,
    )
    lam2, y2, r2 = second.eigenvalues[0] + lam1, second.eigenvectors[:, 0], second.residuals[0]
    if top_first:
        return EigenDirections(xp.stack([y1, y2]), xp.stack([lam1, lam2]), xp.stack([r1, r2]))
    return EigenDirections(xp.stack([y2, y1]), xp.stack([lam2, lam1]), xp.stack([r2, r1]))


def fisher_directions(
    source: Any,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    /,
    *,
    num_directions: int = 2,
    kernel: str = "exact",
    reduction: str = "sum",
    num_matvecs: int | None = None,
    rng: Any = None,
    process_group: Any = None,
) -> EigenDirections:
    """The top eigenvectors of the Fisher metric F = Σ_x J_xᵀ I(z_x) J_x.

    Lanczos (``fisherbound.linalg.eigsh``) on ``fisherbound.fisher.fisher_operator``:
    the directions in which the model's predictions change most. F is the
    Gauss–Newton part of the Hessian of the negative log-likelihood, so these are
    the Hessian directions of a model without the second-order output term.

    Parameters
    ----------
    source
        A linearization or a re-iterable collection of them (adapters' ``linearize``).
    family
        The output family (default ``Categorical()``).
    num_directions
        k ≥ 1, at most D.
    kernel, reduction
        As in ``fisher_operator`` (``"upper"`` / ``"lower"`` give the bound operators).
    num_matvecs
        Lanczos steps (default ``min(D, max(2k + 30, 60))``).
    rng
        numpy Generator, int seed or None.
    process_group
        As in ``fisher_operator`` (the same ``rng`` seed on every rank; checked).

    Returns
    -------
    EigenDirections
        ``directions`` (k, D) rows, ``eigenvalues`` DESCENDING (k,), ``residuals``.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> lin = linearize(LinearSoftmax(np.zeros((3, 2))), np.array([[1.0, 2.0]]))
    >>> np.round(fisher_directions(lin, rng=0).eigenvalues, 10).tolist()  # 5/3, 5/3
    [1.6666666667, 1.6666666667]
    """
    k = check_positive_int(num_directions, "num_directions")
    op = fisher_operator(
        source, family, kernel=kernel, reduction=reduction, process_group=process_group
    )
    d = int(op.shape[0])
    if k > d:
        msg = f"num_directions must be at most D = {d} (the number of parameters); got {k}."
        raise ValueError(msg)
    gen = shared_generator(collective(process_group), rng, where="fisher_directions")
    res = eigsh(op, k=k, which="largest", num_matvecs=num_matvecs, rng=gen)
    xp = op.xp
    order = list(range(k - 1, -1, -1))
    return EigenDirections(
        xp.stack([res.eigenvectors[:, i] for i in order], axis=0),
        xp.stack([res.eigenvalues[i] for i in order]),
        xp.stack([res.residuals[i] for i in order]),
    )


# --------------------------------------------------------------------------- #
# finite differences


def default_step(params: Array, /) -> Array:
    """The default finite-difference displacement h = ε^{1/4} · max(‖θ‖, 1), 0-d.

    ε is the machine epsilon of θ's dtype (ε^{1/4} ≈ 1.2e−4 in float64, 1.9e−2 in
    float32). The second difference [L(θ + h u) − 2L(θ) + L(θ − h u)] / h² of a
    unit direction u has a truncation error O(h² L'''') and a rounding error
    O(ε ``|L|`` / h²); h ∝ ε^{1/4} balances the two, and the factor ‖θ‖ makes the
    step relative to the size of the parameters (a step of about ε^{1/4} of
    every coordinate's root-mean-square for a direction with entries of order
    one). A direction d is used with the coefficient h / ‖d‖, so that the
    displacement has norm h whatever the scaling of d.
    """
    xp = array_namespace(params, names=("params",))
    eps = float(xp.finfo(params.dtype).eps)
    return eps**0.25 * xp.maximum(
        xp.linalg.vector_norm(params), xp.asarray(1.0, dtype=params.dtype, device=device_of(params))
    )


def _step(xp: Any, theta: Array, step: float | None) -> Array:
    if step is None:
        return default_step(theta)
    return xp.asarray(step, dtype=theta.dtype, device=device_of(theta))


def _coefficients(xp: Any, P: Array, h: Array) -> Array:
    """h / ‖P[i]‖ for each row (0 for a zero row, whose samples are then 0)."""
    norms = xp.linalg.vector_norm(P, axis=1)
    zero = norms == 0.0
    return xp.where(zero, xp.zeros_like(norms), h / xp.where(zero, xp.ones_like(norms), norms))


# --------------------------------------------------------------------------- #
# projected curvature


def projected_curvature(
    source: Any,
    directions: Any,
    /,
    *,
    method: str = "hvp",
    step: float | None = None,
    process_group: Any = None,
) -> ProjectedCurvature:
    """Curvature of the loss surface f(α, β) = L(θ + α η + β δ) at α = β = 0.

    With the projected Hessian H_αβ = [[ηᵀHη, ηᵀHδ], [δᵀHη, δᵀHδ]] and the slopes
    f_α = ηᵀ∇L, f_β = δᵀ∇L, the graph formulas (THEORY §6). Cost per batch: two
    HVPs and one gradient (``method="hvp"``), or nine loss values (``"loss"``).

    .. math:: K = \\frac{f_{\\alpha\\alpha} f_{\\beta\\beta} - f_{\\alpha\\beta}^2}
              {(1 + f_\\alpha^2 + f_\\beta^2)^2}, \\quad
              H_m = \\frac{(1 + f_\\beta^2) f_{\\alpha\\alpha}
              - 2 f_\\alpha f_\\beta f_{\\alpha\\beta} + (1 + f_\\alpha^2) f_{\\beta\\beta}}
              {2 (1 + f_\\alpha^2 + f_\\beta^2)^{3/2}}, \\quad
              \\kappa_\\pm = H_m \\pm \\sqrt{H_m^2 - K}

    give the Gaussian, mean and principal curvatures anywhere; at a critical point
    (f_α = f_β = 0) the principal curvatures are the eigenvalues of H_αβ.

    Parameters
    ----------
    source
        A LossFunction or a re-iterable collection of them.
    directions
        η and δ as the rows of a (2, D) array (or an ``EigenDirections``). They need
        not be orthogonal nor normalised: the curvature is the one of the plotted
        surface in the coordinates (α, β).
    method
        ``"hvp"`` (default): H_αβ from two Hessian-vector products and the slopes
        from one gradient, exact. ``"loss"``: loss values only, nine of them:
        f_α = (f(h_α, 0) − f(−h_α, 0)) / 2h_α, f_αα = (f(h_α, 0) − 2 f(0, 0) +
        f(−h_α, 0)) / h_α², f_αβ = (f(h_α, h_β) − f(h_α, −h_β) − f(−h_α, h_β) +
        f(−h_α, −h_β)) / (4 h_α h_β), with h_k = step / ‖d_k‖; exact for a
        quadratic loss up to rounding.
    step
        The displacement norm of ``method="loss"``; default ``default_step(θ)``.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; losses, gradients and products are all-reduced.

    Returns
    -------
    ProjectedCurvature
        ``hessian`` (2, 2), ``gradient`` (2,), ``principal`` (2,), ``mean``,
        ``gaussian`` (0-d), in θ's namespace and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 2.0]]), np.array([[5.0]])
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> pc = projected_curvature(loss, np.eye(2))
    >>> pc.hessian.tolist(), pc.gradient.tolist()  # x xᵀ and −5 x
    ([[1.0, 2.0], [2.0, 4.0]], [-5.0, -10.0])
    """
    method = check_choice(method, "method", CURVATURE_METHODS)
    h_user = None if step is None else _check_real(step, "step")
    obj = _objective(
        source,
        "projected_curvature",
        process_group,
        method=method,
        step=h_user,
        directions=fingerprint(getattr(directions, "directions", directions)),
    )
    xp = obj.xp
    dirs = _check_vectors(directions, "directions", obj.params, obj.num_params, (2,), "params")
    if method == "hvp":
        hd = obj.hvp_batch(dirs)
        hm = xp.matmul(dirs, xp.matrix_transpose(hd))
        hm = 0.5 * (hm + xp.matrix_transpose(hm))
        grad = xp.matmul(dirs, obj.gradient())
    else:
        if bool(xp.any(xp.linalg.vector_norm(dirs, axis=1) == 0.0)):
            msg = (
                "directions must be nonzero for method='loss' (the finite-difference step "
                "along a direction d is step / ‖d‖); got a zero row."
            )
            raise ValueError(msg)
        h = _step(xp, obj.params, h_user)
        e = _coefficients(xp, dirs, h)
        a, b = e[0] * dirs[0, :], e[1] * dirs[1, :]
        zero = xp.zeros_like(a)
        shifts = xp.stack([zero, a, -a, b, -b, a + b, a - b, b - a, -a - b], axis=0)
        v = obj.value(shifts)
        fa = (v[1] - v[2]) / (2.0 * e[0])
        fb = (v[3] - v[4]) / (2.0 * e[1])
        faa = (v[1] - 2.0 * v[0] + v[2]) / (e[0] * e[0])
        fbb = (v[3] - 2.0 * v[0] + v[4]) / (e[1] * e[1])
        fab = (v[5] - v[6] - v[7] + v[8]) / (4.0 * e[0] * e[1])
        hm = xp.stack([xp.stack([faa, fab]), xp.stack([fab, fbb])], axis=0)
        grad = xp.stack([fa, fb])
    return _graph_curvature(xp, hm, grad)


def _graph_curvature(xp: Any, hm: Array, grad: Array) -> ProjectedCurvature:
    fa, fb = grad[0], grad[1]
    faa, fab, fbb = hm[0, 0], hm[0, 1], hm[1, 1]
    w = 1.0 + fa * fa + fb * fb
    gaussian = (faa * fbb - fab * fab) / (w * w)
    mean = ((1.0 + fb * fb) * faa - 2.0 * fa * fb * fab + (1.0 + fa * fa) * fbb) / (
        2.0 * w * xp.sqrt(w)
    )
    disc = xp.sqrt(xp.maximum(mean * mean - gaussian, xp.zeros_like(mean)))
    principal = xp.stack([mean + disc, mean - disc])
    return ProjectedCurvature(hm, grad, principal, mean, gaussian)


# --------------------------------------------------------------------------- #
# the Hessian trace from loss values


def loss_trace(
    source: Any,
    /,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    method: str = "loss",
    step: float | None = None,
    rng: Any = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Estimate:
    """The Hessian trace tr ∇²L(θ) from loss values only, with a standard error.

    For M random probes η_m (THEORY §6), with h_m = step / ‖η_m‖,

    .. math:: \\widehat{\\operatorname{tr} H} = \\frac1M \\sum_{m=1}^M
              \\frac{L(\\theta + h_m \\eta_m) - 2 L(\\theta) + L(\\theta - h_m \\eta_m)}{h_m^2}
              \\approx \\frac1M \\sum_m \\eta_m^\\top H \\eta_m,

    exact for a quadratic loss (up to rounding): two forward passes per probe (the
    2M shifted parameter vectors batched through ``value``), no Hessian-vector
    product, no backward pass. ``method="hvp"`` computes the Hutchinson estimate
    (1/M) Σ_m η_mᵀ (H η_m) with exact Hessian-vector products on THE SAME probes
    (same ``rng``, ``distribution`` and ``batch_size``), for comparison; the
    difference of the two is then the finite-difference error alone.

    Parameters
    ----------
    source
        A LossFunction or an iterable of them (streamed once; the same probes are
        replayed on every batch, so the estimate is the one of the total loss).
    num_probes
        M ≥ 1 (≥ 2 for a standard error).
    distribution
        ``"rademacher"`` (default; Var of one probe 2(‖H‖_F² − Σ H_ii²), exact for a
        diagonal H), ``"gaussian"`` (Var 2 tr H²), ``"sphere"`` (unit vectors u,
        reported as D uᵀHu so that the mean is tr H; Var 2[D tr H² − (tr H)²]/(D + 2))
        or ``"filter"``: filter-normalised directions, which estimate the WEIGHTED
        trace Σ_f (‖θ_f‖² / n_f) tr(H_ff) (see ``random_directions``), not tr H.
    method
        ``"loss"`` (default) or ``"hvp"``.
    step
        The displacement norm h > 0; default ``default_step(θ)`` = ε^{1/4} ·
        max(‖θ‖, 1) (ε the dtype's machine epsilon). Too small a step amplifies the
        rounding error of L (∝ ε ``|L|`` / h²), too large a step adds the fourth-order
        term (∝ h²); the standard error does not include this bias, which is why
        the ``"hvp"`` estimate on the same probes is there to compare.
    rng
        numpy Generator, int seed or None.
    batch_size
        Probes per call of ``value`` / ``hvp_batch`` (default min(M, 16)).
    progress
        Progress bar over batches: None (on a terminal, after 2 s), True or False.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; the per-probe sums are all-reduced, so the probes must
        be the same on every rank (the same ``rng`` seed; checked).

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error`` (sample standard deviation of the M per-probe
        values / √M), ``num_probes`` M. A sum over the batches, or the mean over
        every example for loss functions with ``reduction="mean"``.

    Notes
    -----
    Cost per batch: 2M + 1 loss evaluations (``"loss"``: about 2M + 1 forward
    passes, batched) or M Hessian-vector products (``"hvp"``: about 2M gradient
    steps); memory: ``batch_size`` parameter vectors.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 0.0], [0.0, 2.0]]), np.zeros((2, 1))
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> est = loss_trace(loss, num_probes=8, rng=0)  # H = diag(1, 4): Rademacher is exact
    >>> round(float(est.value), 6), round(float(est.std_error), 6)
    (5.0, 0.0)
    """
    m = check_positive_int(num_probes, "num_probes")
    kind = check_choice(distribution, "distribution", DIRECTION_KINDS)
    method = check_choice(method, "method", TRACE_METHODS)
    h_user = None if step is None else _check_real(step, "step")
    b = (
        min(m, DEFAULT_PROBE_BATCH)
        if batch_size is None
        else check_positive_int(batch_size, "batch_size")
    )
    coll = collective(process_group)
    gen = shared_generator(coll, rng, where="loss_trace", lanczos=False)
    start = copy.deepcopy(gen)  # the probe stream, replayed on every batch
    total = None
    count = 0
    xp = None
    last = None
    reduction = "sum"
    options = {"M": m, "distribution": kind, "method": method, "step": h_user, "batch": b}
    for loss in _sharded(source, coll, desc="loss trace", progress=progress, **options):
        xp = array_namespace(loss.params, names=("params",))
        last = copy.deepcopy(start)
        samples = _trace_samples(xp, loss, last, m, b, kind, method, h_user)
        if loss.reduction == "mean":
            samples = samples * float(loss.num_inputs)
        count += int(loss.num_inputs)
        total = samples if total is None else total + samples
        reduction = loss.reduction
    assert total is not None
    assert last is not None
    assert xp is not None
    if coll is not None:
        total = coll.sum(total)
        count = coll.sum_int(count)
    if reduction == "mean":
        total = total / float(count)
    gen.bit_generator.state = last.bit_generator.state
    return estimate_from_samples(total, xp)


def _trace_samples(
    xp: Any,
    loss: Any,
    gen: Any,
    m: int,
    b: int,
    kind: str,
    method: str,
    step: float | None,
) -> Array:
    """The M per-probe values ηᵀHη of one loss function, (M,)."""
    theta = loss.params
    d = int(theta.shape[0])
    blocks = _check_blocks(loss.blocks, d) if kind == "filter" else None
    if method == "loss":
        h = _step(xp, theta, step)
        center = loss.value(xp.zeros((1, d), dtype=theta.dtype, device=device_of(theta)))[0]
    out = []
    left = m
    while left > 0:
        size = min(b, left)
        P = _draw(xp, gen, size, kind, theta, blocks)
        if method == "hvp":
            q = xp.sum(P * loss.hvp_batch(P), axis=1)
        else:
            e = _coefficients(xp, P, h)
            shifts = P * e[:, None]
            vals = loss.value(xp.concat([shifts, -shifts], axis=0))
            e2 = xp.where(e == 0.0, xp.ones_like(e), e * e)
            q = (vals[:size] - 2.0 * center + vals[size:]) / e2
        out.append(q)
        left -= size
    samples = out[0] if len(out) == 1 else xp.concat(out, axis=0)
    return samples * float(d) if kind == "sphere" else samples


# --------------------------------------------------------------------------- #
# saddle probabilities


def saddle_probability(
    hessian_eigenvalues: Array,
    /,
    *,
    dim: int = 1,
    method: str = "exact",
    num_samples: int = DEFAULT_NUM_SAMPLES,
    rng: Any = None,
) -> SaddleProbability:
    """How often a random ``dim``-dimensional projection of H looks like a minimum,
    a maximum or a saddle.

    A uniformly random ``dim``-dimensional subspace (the span of ``dim`` Gaussian
    directions) shows H through the ``dim`` × ``dim`` matrix GᵀHG, which is
    positive definite (a minimum), negative definite (a maximum) or indefinite
    (a saddle). For ``dim = 1`` "saddle" is 0 and "minimum" is P(ηᵀHη > 0).
    THEORY §6 for H = diag(a, a, −c): one direction looks convex with probability
    √(a / (a + c)); a random plane in R³ shows a saddle with probability
    √(c / (a + c)), a minimum with 1 − √(c / (a + c)), a maximum never.

    ``method="exact"`` covers:

    - ``dim = 1``, any spectrum: P(Σ_i κ_i g_i² > 0) by Imhof's (1961) inversion
      formula, P = ½ + (1/π) ∫₀^∞ sin(½ Σ_i arctan κ_i u) / (u Π_i (1 + κ_i² u²)^{1/4}) du,
      evaluated by the trapezoidal rule in s = log u (exponentially convergent);
    - ``dim = D``: Sylvester's law of inertia (the answer is certain);
    - ``dim = D − 1``, no zero eigenvalue: a hyperplane with normal n (uniform on
      the sphere) keeps H's inertia minus one positive or one negative eigenvalue
      (interlacing); it loses a negative one exactly when
      det(GᵀHG) ∝ Σ_j (Π_{i≠j} κ_i) n_j² has the sign (−1)^{q−1} (q negative
      eigenvalues), i.e. when Σ_j n_j² / κ_j < 0: the ``dim = 1`` problem of H⁻¹.

    Other cases need ``method="monte_carlo"``: ``num_samples`` Gaussian D × dim
    matrices G, classified by the eigenvalues of GᵀHG (those within rounding of
    zero count as degenerate); each probability p has the binomial standard
    error √(p (1 − p) / num_samples).

    Parameters
    ----------
    hessian_eigenvalues
        κ, a 1-D real floating array (D,), finite (any namespace and device).
    dim
        The dimension of the projection, 1 ≤ dim ≤ D.
    method
        ``"exact"`` or ``"monte_carlo"``.
    num_samples
        Monte-Carlo samples (≥ 1).
    rng
        numpy Generator, int seed or None (Monte Carlo).

    Returns
    -------
    SaddleProbability
        ``(minimum, maximum, saddle)``, 0-d arrays in κ's namespace and dtype.

    Notes
    -----
    Cost: exact, O(D) per node of about 2000 quadrature nodes; Monte Carlo,
    O(num_samples · D · dim²) (chunked so that at most 4M numbers are held).

    Examples
    --------
    >>> import numpy as np
    >>> p = saddle_probability(np.array([1.0, 1.0, -1.0]))
    >>> round(float(p.minimum), 10) == round(2**-0.5, 10)
    True
    >>> p = saddle_probability(np.array([1.0, 1.0, -1.0]), dim=2)
    >>> round(float(p.saddle), 10) == round(2**-0.5, 10), float(p.maximum)
    (True, 0.0)
    """
    kappa = hessian_eigenvalues
    xp = array_namespace(kappa, names=("hessian_eigenvalues",))
    check_floating(kappa, "hessian_eigenvalues", xp=xp)
    if kappa.ndim != 1 or int(kappa.shape[0]) == 0:
        msg = (
            "hessian_eigenvalues must be a non-empty 1-D array of eigenvalues (D,); got "
            f"shape {tuple(kappa.shape)}."
        )
        raise ValueError(msg)
    check_finite(kappa, "hessian_eigenvalues", xp=xp)
    d = int(kappa.shape[0])
    k = check_positive_int(dim, "dim")
    if k > d:
        msg = (
            f"dim must be at most D = {d}, the number of eigenvalues (a {k}-dimensional "
            f"subspace of R^{d} does not exist); got dim = {k}."
        )
        raise ValueError(msg)
    method = check_choice(method, "method", SADDLE_METHODS)
    n = check_positive_int(num_samples, "num_samples")
    if method == "exact":
        return _saddle_exact(xp, kappa, k)
    return _saddle_monte_carlo(xp, kappa, k, n, as_generator(rng))


def _as_probability(xp: Any, value: Any, like: Array) -> Array:
    if is_array(value):
        return xp.clip(value, 0.0, 1.0)
    return xp.asarray(float(value), dtype=like.dtype, device=device_of(like))


def _saddle_exact(xp: Any, kappa: Array, k: int) -> SaddleProbability:
    d = int(kappa.shape[0])
    pos = int(xp.sum(xp.astype(kappa > 0.0, xp.int32)))
    neg = int(xp.sum(xp.astype(kappa < 0.0, xp.int32)))
    zeros = d - pos - neg

    def result(mn: Any, mx: Any, sd: Any) -> SaddleProbability:
        return SaddleProbability(
            _as_probability(xp, mn, kappa),
            _as_probability(xp, mx, kappa),
            _as_probability(xp, sd, kappa),
        )

    if k == 1:
        if pos == 0 or neg == 0:
            return result(float(pos > 0), float(neg > 0), 0.0)
        p = _imhof_positive(xp, kappa[kappa != 0.0])
        return result(p, 1.0 - p, 0.0)
    if k == d:
        if zeros > 0:
            return result(0.0, 0.0, 0.0)
        return result(float(neg == 0), float(pos == 0), float(pos > 0 and neg > 0))
    if k != d - 1:
        msg = (
            "method='exact' has closed forms for dim = 1, dim = D − 1 and dim = D only "
            f"(here D = {d}); got dim = {k}. Use method='monte_carlo'."
        )
        raise ValueError(msg)
    if zeros > 0:
        msg = (
            f"method='exact' with dim = D − 1 = {k} needs nonzero eigenvalues; got "
            f"{zeros} zero(s). Use method='monte_carlo'."
        )
        raise ValueError(msg)
    if neg == 0 or pos == 0:
        return result(float(neg == 0), float(pos == 0), 0.0)
    lost_negative = 1.0 - _imhof_positive(xp, 1.0 / kappa)
    mn = lost_negative if neg == 1 else 0.0
    mx = 1.0 - lost_negative if pos == 1 else 0.0
    sd = 1.0 - (mn if neg == 1 else 0.0) - (mx if pos == 1 else 0.0)
    return result(mn, mx, sd)


def _softplus(xp: Any, x: Array) -> Array:
    return xp.maximum(x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def _imhof_positive(xp: Any, kappa: Array) -> Array:
    """P(Σ_i κ_i g_i² > 0) for nonzero κ of both signs (Imhof 1961), 0-d.

    With u = e^s and κ scaled to max |κ_i| = 1 (the sign is scale-free),
    P = ½ + (1/π) ∫_ℝ sin(φ(s)) e^{−ρ(s)} ds with φ = ½ Σ_i sign(κ_i) arctan(e^{t_i}),
    ρ = ¼ Σ_i log(1 + e^{2 t_i}), t_i = s + log|κ_i|. The integrand is analytic in
    the strip |Im s| < π/2, so the trapezoidal rule converges geometrically: step
    0.1 leaves an error below e^{−π²/0.2} ≈ 4e−22 (relative). The range: below
    s_lo = −40 − log(½ Σ|κ_i|) the integrand is at most ½ Σ|κ_i| e^s (tail ≤ e^{−40});
    above the s_hi where ρ = 40, ρ grows at rate ≥ ¼ (tail ≤ 4 e^{−40}).
    """
    a = xp.abs(kappa)
    a = a / xp.max(a)
    sign = xp.sign(kappa)
    log_a = xp.log(a)
    n = int(kappa.shape[0])
    lo = -40.0 - math.log(0.5 * float(xp.sum(a)))

    def rho(s: float) -> float:
        return float(0.25 * xp.sum(_softplus(xp, 2.0 * (log_a + s))))

    left, right = lo, 80.0  # ρ(s) ≥ s/2 for s ≥ 0, so ρ(80) ≥ 40
    for _ in range(60):
        mid = 0.5 * (left + right)
        if rho(mid) >= 40.0:
            right = mid
        else:
            left = mid
    hi = right
    g = max(3, int(math.ceil((hi - lo) / _IMHOF_STEP)) + 1)
    step = (hi - lo) / (g - 1)
    chunk = max(1, _MAX_ENTRIES // n)
    total: Any = None
    for start in range(0, g, chunk):
        stop = min(g, start + chunk)
        idx = xp.arange(start, stop, dtype=kappa.dtype, device=device_of(kappa))
        t = (lo + step * idx)[:, None] + log_a[None, :]
        phase = 0.5 * xp.sum(sign * xp.atan(xp.exp(xp.clip(t, max=40.0))), axis=1)
        log_rho = 0.25 * xp.sum(_softplus(xp, 2.0 * t), axis=1)
        f = xp.sin(phase) * xp.exp(-log_rho)
        # Trapezoidal end weights ½ at the two outermost nodes.
        ones = xp.ones_like(idx)
        w = xp.where((idx == 0.0) | (idx == float(g - 1)), 0.5 * ones, ones)
        part = xp.sum(w * f)
        total = part if total is None else total + part
    return 0.5 + step * total / math.pi


def _saddle_monte_carlo(xp: Any, kappa: Array, k: int, n: int, gen: Any) -> SaddleProbability:
    d = int(kappa.shape[0])
    dtype, device = kappa.dtype, device_of(kappa)
    eps = float(xp.finfo(dtype).eps)
    chunk = max(1, _MAX_ENTRIES // (d * k))
    counts = [xp.asarray(0.0, dtype=dtype, device=device) for _ in range(3)]
    left = n
    while left > 0:
        size = min(chunk, left)
        G = probes(gen, (size, d, k), distribution="gaussian", xp=xp, dtype=dtype, device=device)
        # The rounding scale of GᵀHG: Σ_i |κ_i| ‖G_i‖².
        scale = xp.sum(xp.abs(kappa)[None, :] * xp.sum(G * G, axis=2), axis=1)
        tol = 8.0 * (d + k) * eps * scale
        if k == 1:
            ev = xp.sum(kappa[None, :] * G[:, :, 0] ** 2, axis=1)[:, None]
        else:
            M = xp.matmul(xp.matrix_transpose(G), kappa[:, None] * G)
            ev = xp.linalg.eigvalsh(0.5 * (M + xp.matrix_transpose(M)))
        up = ev > tol[:, None]
        down = ev < -tol[:, None]
        flags = [
            xp.all(up, axis=1),
            xp.all(down, axis=1),
            xp.any(up, axis=1) & xp.any(down, axis=1),
        ]
        counts = [c + xp.sum(xp.astype(f, dtype)) for c, f in zip(counts, flags, strict=True)]
        left -= size
    return SaddleProbability(*(c / float(n) for c in counts))


# --------------------------------------------------------------------------- #
# loss surfaces


def _grid(
    xp: Any, ref: Array, k: int, coordinates: Any, span: float, num_points: int
) -> tuple[Array, ...]:
    dtype, device = ref.dtype, device_of(ref)
    if coordinates is None:
        axis = xp.linspace(-span, span, num_points, dtype=dtype, device=device)
        return tuple(axis for _ in range(k))
    if is_array(coordinates):
        coordinates = (coordinates,) * k
    if not isinstance(coordinates, tuple | list) or len(coordinates) != k:
        msg = (
            f"coordinates must be None, a 1-D array (used along every direction) or a "
            f"tuple of {k} 1-D arrays, one per direction; got {type(coordinates).__name__}"
            + (f" of length {len(coordinates)}" if isinstance(coordinates, tuple | list) else "")
            + "."
        )
        raise TypeError(msg)
    out = []
    for i, c in enumerate(coordinates):
        name = f"coordinates[{i}]"
        array_namespace(c, ref, names=(name, "params"))
        check_floating(c, name, xp=xp)
        if c.ndim != 1 or int(c.shape[0]) == 0:
            msg = (
                f"{name} must be a non-empty 1-D array of coefficients; got shape {tuple(c.shape)}."
            )
            raise ValueError(msg)
        check_device(c, name, device, owner="the device of the parameters")
        check_finite(c, name, xp=xp)
        out.append(xp.astype(c, dtype) if c.dtype != dtype else c)
    return tuple(out)


def surface(
    source: Any,
    directions: Any,
    /,
    *,
    coordinates: Any = None,
    span: float = 1.0,
    num_points: int = 21,
    batch_size: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Surface:
    """The loss on a 1-D or 2-D grid θ + α d_1 (+ β d_2), over a data set.

    values[i] = L(θ + α_i d_1) for one direction, values[i, j] =
    L(θ + α_i d_1 + β_j d_2) for two; L is the total loss of ``source`` (the sum of
    the batch losses, or the mean over all examples for ``reduction="mean"``).
    The batches are streamed once (a progress bar shows them); for each batch the
    grid's parameter vectors go through ``value`` in chunks of ``batch_size``.

    Parameters
    ----------
    source
        A LossFunction or an iterable of them (one per batch, at one θ). For a data
        loader of (x, y) batches pass the adapter's ``loss_functions(model, loader)``,
        which builds them lazily.
    directions
        (1, D) or (2, D) rows, or an ``EigenDirections``: random
        (``random_directions``), Hessian (``hessian_directions``) or Fisher
        directions, or any others (e.g. θ_final − θ_init).
    coordinates
        None: ``num_points`` evenly spaced coefficients in [−span, span] along every
        direction. A 1-D array: those coefficients along every direction. A tuple of
        one 1-D array per direction.
    span, num_points
        The default grid.
    batch_size
        Grid points per call of ``value`` (default max(1, min(64, 2²² / D))).
    progress
        Progress bar over batches: None (on a terminal, after 2 s), True or False.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; the grid of losses is all-reduced (pass the same
        directions on every rank).

    Returns
    -------
    Surface
        ``coordinates``, ``values`` (G,) or (G_α, G_β), ``directions``, ``reduction``.

    Notes
    -----
    Cost: G loss evaluations per batch (about G forward passes, batched), with
    G = num_points^k; memory: ``batch_size`` parameter vectors.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 0.0]]), np.zeros((1, 1))
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> s = surface(loss, np.eye(2)[:1], coordinates=np.array([-1.0, 0.0, 2.0]))
    >>> np.round(s.values - s.values[1], 12).tolist()  # α² / 2
    [0.5, 0.0, 2.0]
    """
    span = _check_real(span, "span")
    g = check_positive_int(num_points, "num_points")
    bs = None if batch_size is None else check_positive_int(batch_size, "batch_size")
    total = None
    count = 0
    prepared = None
    reduction = "sum"
    coll = collective(process_group)
    options = {
        "directions": fingerprint(getattr(directions, "directions", directions)),
        "coordinates": repr(coordinates) if coordinates is None else _fingerprints(coordinates),
        "span": span,
        "num_points": g,
    }
    for loss in _sharded(source, coll, desc="loss surface", progress=progress, **options):
        if prepared is None:
            xp = array_namespace(loss.params, names=("params",))
            dirs = _check_vectors(
                directions, "directions", loss.params, loss.num_params, (1, 2), "params"
            )
            k = int(dirs.shape[0])
            axes = _grid(xp, loss.params, k, coordinates, span, g)
            if k == 1:
                coef = axes[0][:, None]
            else:
                ga, gb = xp.meshgrid(axes[0], axes[1], indexing="ij")
                coef = xp.stack([xp.reshape(ga, (-1,)), xp.reshape(gb, (-1,))], axis=1)
            size = bs if bs is not None else max(1, min(64, _MAX_ENTRIES // loss.num_params))
            prepared = (xp, dirs, axes, coef, size)
            reduction = loss.reduction
        xp, dirs, axes, coef, size = prepared
        rows = int(coef.shape[0])
        parts = [
            loss.value(xp.matmul(coef[start : min(rows, start + size), ...], dirs))
            for start in range(0, rows, size)
        ]
        vals = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        if reduction == "mean":
            vals = vals * float(loss.num_inputs)
        count += int(loss.num_inputs)
        total = vals if total is None else total + vals
    assert total is not None
    assert prepared is not None
    xp, dirs, axes, _, _ = prepared
    if coll is not None:
        total = coll.sum(total)
        count = coll.sum_int(count)
    if reduction == "mean":
        total = total / float(count)
    shape = tuple(int(a.shape[0]) for a in axes)
    return Surface(axes, xp.reshape(total, shape), dirs, reduction)
