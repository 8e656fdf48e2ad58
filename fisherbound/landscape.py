r"""Loss-landscape curvature: random projections, loss-only traces, Hessian directions.

THEORY §6 (Böttcher and Wheeler, *Visualizing high-dimensional loss landscapes
with Hessian directions*). A loss :math:`L: \mathbb{R}^D \to \mathbb{R}` at :math:`\theta` with
Hessian :math:`H` (eigenvalues :math:`\kappa_i`) is looked at through a plane
:math:`\theta + \alpha \eta + \beta \delta`. What the plane shows depends on how :math:`\eta`
and :math:`\delta` are chosen, and this module makes that quantitative:

- ``random_directions``: Gaussian, Rademacher, unit-sphere or filter-normalised
  random directions (the last estimate a *weighted* trace, see below);
- ``hessian_directions``: the eigenvectors of the largest and the smallest
  eigenvalue of :math:`H` (Lanczos on the Hessian operator), along which a saddle
  always looks like a saddle; ``fisher_directions``: the top eigenvectors of the
  Fisher metric; ``hessian_operator``: :math:`H` as a matrix-free operator for
  ``fisherbound.linalg``;
- ``projected_curvature``: the :math:`2 \times 2` projected Hessian and the principal, mean
  and Gaussian curvatures of the surface
  :math:`\alpha, \beta \mapsto L(\theta + \alpha \eta + \beta \delta)`;
- ``loss_trace``: :math:`\operatorname{tr} H` from loss values only (central second
  differences along
  random directions), with a standard error, or the Hutchinson estimate with
  Hessian-vector products on the same probes for comparison;
- ``saddle_probability``: how often a random projection of a quadratic form shows
  a minimum, a maximum or a saddle (closed forms and Monte Carlo);
- ``surface``: 1-D and 2-D loss grids along any directions over a data set,
  streamed batch by batch.

The loss comes from an adapter's ``loss_function(...)`` (a
:class:`~fisherbound.linearization.LossFunction`): the negative log-likelihood of
a labelled batch, with logits (N, C) or, with position axes, (N, ∗S, C) (a
language model's tokens, a segmentation's pixels), one term per counted
position (masked positions and ignored labels excluded). ``source`` is one loss
function or several (a data set, one per batch, all at the same :math:`\theta`); the total
is the sum of the batch losses when they use ``reduction="sum"`` and the mean
over every counted position of the data set (``num_counted``, the inputs
without position axes) when they use ``"mean"``, as
``torch.nn.CrossEntropyLoss(ignore_index=...)`` averages. Nothing here depends
on the output's shape: every function sees the loss only through ``value``,
``gradient`` and Hessian-vector products in parameter space.
Functions that apply :math:`H` several times (``hessian_operator``,
``hessian_directions``, ``projected_curvature``) need a re-iterable source (a
list); ``loss_trace`` and ``surface`` stream any iterable once.

Expectations (THEORY §6), for Gaussian :math:`\eta`:
:math:`\mathbb{E}[\eta^\top H \eta] = \operatorname{tr} H`,
:math:`\operatorname{Var} = 2 \operatorname{tr} H^2`;
Rademacher: :math:`\operatorname{Var} = 2(\lVert H \rVert_F^2 - \sum_i H_{ii}^2)`; unit sphere:
:math:`\mathbb{E}[u^\top H u] = \operatorname{tr} H / D`,
:math:`\operatorname{Var} = 2[D \operatorname{tr} H^2 - (\operatorname{tr} H)^2] / (D^2 (D + 2))`.
Filter-normalised directions scale every filter :math:`f` (a row of a weight tensor
along its first axis; a 1-D block is one filter) to the norm of the same filter of
:math:`\theta`, so :math:`\mathbb{E}[d d^\top] = \operatorname{diag}(w)` with
:math:`w_i = \lVert \theta_f \rVert^2 / n_f` for :math:`i` in filter :math:`f` of size
:math:`n_f`, and :math:`\mathbb{E}[d^\top H d]` is the WEIGHTED trace
:math:`\sum_f (\lVert \theta_f \rVert^2 / n_f) \operatorname{tr}(H_{ff})`, not
:math:`\operatorname{tr} H`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from fisherbound._directions import DIRECTION_KINDS as _DIRECTION_KINDS
from fisherbound._directions import (
    check_vectors,
    coefficients,
    default_step,
    random_directions,
    step_size,
)
from fisherbound._hessian import _hessian_operator, _shifted
from fisherbound._lib import (
    LossSource,
    ProcessGroup,
    RngLike,
    Source,
    array_namespace,
    check_choice,
    check_optional_int,
    check_positive_int,
    check_real,
    check_vector,
    collective,
    conform,
    device_of,
    fingerprint,
    is_array,
    shared_generator,
)
from fisherbound._loss_trace import DEFAULT_PROBE_BATCH as DEFAULT_PROBE_BATCH
from fisherbound._loss_trace import TRACE_METHODS as _TRACE_METHODS
from fisherbound._loss_trace import LossTraceWarning, loss_trace
from fisherbound._saddle import DEFAULT_NUM_SAMPLES as DEFAULT_NUM_SAMPLES
from fisherbound._saddle import (
    MAX_ENTRIES,
    SaddleProbability,
    saddle_probability,
)
from fisherbound._saddle import SADDLE_METHODS as _SADDLE_METHODS
from fisherbound._stream import LossStream, Objective
from fisherbound.families import Categorical, Family
from fisherbound.fisher import fisher_operator
from fisherbound.linalg import LinearOperator, eigsh

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "loss_trace",
    "hessian_directions",
    "hessian_operator",
    "projected_curvature",
    "saddle_probability",
    "surface",
    "random_directions",
    "fisher_directions",
    "default_step",
    "EigenDirections",
    "ProjectedCurvature",
    "SaddleProbability",
    "Surface",
    "LossTraceWarning",
    "CURVATURE_METHODS",
    "DIRECTION_KINDS",
    "HESSIAN_METHODS",
    "HESSIAN_WHICH",
    "SADDLE_METHODS",
    "TRACE_METHODS",
]

# The re-exported functions live in private modules (split by job); their doctests
# still run with ``doctest.testmod(fisherbound.landscape)``.
__test__ = {
    "random_directions": random_directions,
    "default_step": default_step,
    "saddle_probability": saddle_probability,
    "SaddleProbability": SaddleProbability,
    "loss_trace": loss_trace,
}

#: ``loss_trace`` methods: Hessian-vector products (default), or loss values only.
TRACE_METHODS = _TRACE_METHODS
#: ``hessian_directions`` methods.
HESSIAN_METHODS = ("lanczos", "shifted")
#: ``hessian_directions`` ends of the spectrum.
HESSIAN_WHICH = ("both", "largest", "smallest")
#: ``projected_curvature`` methods.
CURVATURE_METHODS = ("hvp", "loss")
#: Random direction distributions (``kind=`` / ``distribution=``).
DIRECTION_KINDS = _DIRECTION_KINDS
#: ``saddle_probability`` methods.
SADDLE_METHODS = _SADDLE_METHODS


# --------------------------------------------------------------------------- #
# result types


class EigenDirections(NamedTuple):
    r"""Eigenvector directions of a curvature operator (Hessian or Fisher).

    Attributes
    ----------
    directions
        Unit vectors as ROWS, shape (k, D), in the order of ``eigenvalues``; pass
        it to ``surface`` or ``projected_curvature`` as it is.
    eigenvalues
        The Ritz values, shape (k,): :math:`(\lambda_{\max}, \lambda_{\min})` for
        ``hessian_directions``, descending for ``fisher_directions``.
    residuals
        :math:`\lVert A y - \theta y \rVert` for each pair, shape (k,): some eigenvalue
        of :math:`A` lies within this distance of :math:`\theta`.
    """

    directions: Array
    eigenvalues: Array
    residuals: Array


class ProjectedCurvature(NamedTuple):
    r"""The curvature of the surface :math:`f(\alpha, \beta)` at :math:`\alpha = \beta = 0`.

    Here :math:`f(\alpha, \beta) = L(\theta + \alpha \eta + \beta \delta)`.

    Attributes
    ----------
    hessian
        :math:`H_{\alpha\beta} = \begin{pmatrix} \eta^\top H \eta & \eta^\top H \delta \\
        \delta^\top H \eta & \delta^\top H \delta \end{pmatrix}
        = \begin{pmatrix} f_{\alpha\alpha} & f_{\alpha\beta} \\
        f_{\alpha\beta} & f_{\beta\beta} \end{pmatrix}`, (2, 2).
    gradient
        :math:`(f_\alpha, f_\beta) = (\eta^\top \nabla L, \delta^\top \nabla L)`, (2,).
    principal
        The principal curvatures :math:`(\kappa_+, \kappa_-) = H_m \pm \sqrt{H_m^2 - K}`,
        (2,), descending; at a critical point the eigenvalues of ``hessian``.
    mean
        :math:`H_m = [(1 + f_\beta^2) f_{\alpha\alpha} - 2 f_\alpha f_\beta f_{\alpha\beta}
        + (1 + f_\alpha^2) f_{\beta\beta}] / [2 (1 + f_\alpha^2 + f_\beta^2)^{3/2}]`.
    gaussian
        :math:`K = (f_{\alpha\alpha} f_{\beta\beta} - f_{\alpha\beta}^2)
        / (1 + f_\alpha^2 + f_\beta^2)^2`.
    """

    hessian: Array
    gradient: Array
    principal: Array
    mean: Array
    gaussian: Array


class Surface(NamedTuple):
    r"""Loss values on a grid of a 1-D or 2-D section :math:`\theta + \sum_k \alpha_k d_k`.

    Attributes
    ----------
    coordinates
        One 1-D array of coefficients per direction: :math:`(\alpha,)` or
        :math:`(\alpha, \beta)`.
    values
        The loss on the grid, shape (G,) or :math:`(G_\alpha, G_\beta)` (``values[i, j]``
        at :math:`\alpha_i, \beta_j`): the sum of the batch losses, or the mean over
        every counted position for ``reduction="mean"``.
    directions
        The directions :math:`d_k` as rows, shape (k, D).
    reduction
        ``"sum"`` or ``"mean"``, as the loss functions'.
    """

    coordinates: tuple[Array, ...]
    values: Array
    directions: Array
    reduction: str


# --------------------------------------------------------------------------- #
# the objective over a data set


def _fingerprint(x: Any, name: str) -> Any:
    """``fingerprint(x)``, its house errors (not an array, a meta tensor) naming ``name``."""
    if x is not None:
        array_namespace(x, names=(name,))
    return fingerprint(x)


def _fingerprints(coordinates: Any) -> Any:
    if isinstance(coordinates, tuple | list):
        return tuple(_fingerprint(c, f"coordinates[{i}]") for i, c in enumerate(coordinates))
    return _fingerprint(coordinates, "coordinates")


def _objective(
    source: LossSource, what: str, process_group: ProcessGroup = None, **options: Any
) -> Objective:
    if isinstance(source, Iterator):
        msg = (
            f"{what} needs a re-iterable source (a LossFunction or a list of them): it "
            f"applies the Hessian several times; got a one-shot iterator "
            f"({type(source).__name__}). Wrap it in list(...)."
        )
        raise TypeError(msg)
    stream = LossStream(source, desc=what, progress=False, process_group=process_group)
    return Objective(stream, **options)


# --------------------------------------------------------------------------- #
# operators and eigen-directions


def hessian_operator(
    source: LossSource, /, *, process_group: ProcessGroup = None
) -> LinearOperator:
    r"""The Hessian :math:`\nabla^2 L(\theta)` of the total loss as a matrix-free operator.

    A ``LinearOperator`` (:math:`D \times D`). matvec:
    :math:`\sum_b c_b \nabla^2 L_b(\theta)\, v`, one Hessian-vector product per batch
    (:math:`c_b = 1` for ``reduction="sum"``, :math:`n_b / n` for ``"mean"``, :math:`n_b` the
    counted positions of batch :math:`b` and :math:`n` their total); matmat: the same with
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


def hessian_directions(
    source: LossSource,
    /,
    *,
    which: str = "both",
    method: str = "lanczos",
    tol: float | None = None,
    num_matvecs: int | None = None,
    basis_size: int | None = None,
    block_size: int = 1,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> EigenDirections:
    r"""The eigenvectors of the largest and/or the smallest Hessian eigenvalue.

    Projected on the two extreme directions the Hessian is
    :math:`\operatorname{diag}(\lambda_{\max}, \lambda_{\min})` (THEORY §6): the surface shows
    the true extreme curvatures, and a saddle (:math:`\lambda_{\min} < 0 < \lambda_{\max}`)
    always looks like a saddle.

    Thick-restart Lanczos with full reorthogonalisation on the Hessian operator
    (``fisherbound.linalg.eigsh``, one Hessian-vector product per step) stops as soon
    as every wanted Ritz pair :math:`(\theta, y)` satisfies

    .. math::

       \lVert H y - \theta y \rVert \le \mathrm{tol} \cdot
       \max(\lvert \theta \rvert, \sqrt{\varepsilon}\, \lVert T \rVert),

    the residual read off the tridiagonal :math:`T` at no extra product. ``which="both"``
    (default): ONE run (``eigsh(which="both", k=1)``) in which both extreme Ritz
    pairs converge from the same Krylov space (fewer products than two one-ended
    runs on the models of ``benchmarks/bench_landscape.py``). ``which="largest"`` or
    ``"smallest"``: one run for that end alone. The top eigenpair is what PyHessian's
    power iteration computes; until the first restart (:math:`p` products) the Krylov
    space contains the :math:`p`-th power iterate, so its Ritz value is at least as close
    to :math:`\lambda_{\max}`, and much closer when :math:`\lambda_{\max}` is not well
    separated from the next
    eigenvalue (after a restart the kept Ritz vectors no longer guarantee this).

    ``method="shifted"`` (``which="both"`` only): THEORY's two-run scheme: a first
    run gives the eigenvalue of largest magnitude :math:`\lambda_1`, a second run, from a
    fresh random start, on :math:`H - \lambda_1 I` gives the other end
    (:math:`\lambda = \mu + \lambda_1`). Lanczos is shift-invariant (the Krylov spaces of
    :math:`H` and :math:`H - \lambda_1 I` coincide), so the second
    run is an independent repetition of the first with the other end selected:
    about twice the cost, useful as a cross-check. The power method, which needs
    the shift, is not used.

    Parameters
    ----------
    source
        A LossFunction or a re-iterable collection of them (the Hessian of the total).
    which
        ``"both"`` (default; rows (top, bottom)), ``"largest"`` or ``"smallest"``
        (one row).
    method
        ``"lanczos"`` or ``"shifted"``.
    tol
        The relative residual above, :math:`\ge 0`; default
        :math:`\max(\text{1e-6}, \sqrt{\varepsilon})` (1e-6 in float64, 3.5e-4 in float32).
        The eigenvalue error is then about :math:`\lVert r \rVert^2 / \mathrm{gap}`, far
        below :math:`\lVert r \rVert`. 0 runs to the budget, without a warning.
    num_matvecs
        The budget: the most Hessian-vector products per Lanczos run
        (:math:`\ge 2`); default :math:`\max(100, 10 p)`. Reaching it before ``tol`` warns
        (RuntimeWarning) and returns the current Ritz pairs; check the ``residuals``.
    basis_size
        :math:`p`, the most Lanczos vectors held (memory :math:`D p`); default
        :math:`\min(D, 20)` (the ``eigsh`` default for :math:`k = 1` at one or both ends).
        :math:`p = D` is a full tridiagonalisation: exact extreme eigenpairs after
        :math:`D` products.
    block_size
        :math:`b`, the vectors per Lanczos step (``linalg.eigsh``'s ``block_size``): 1
        (default) one Hessian-vector product per step; :math:`b > 1` block Lanczos, one
        ``matmat`` of :math:`b` columns per step (``hvp_batch``), with :math:`p \ge b + 1`
        (:math:`b + 2` for ``"both"``) and ``num_matvecs`` counting columns. It needs
        more products to the same ``tol`` and pays only where one product of :math:`b`
        columns costs clearly less than :math:`b` single products (docs/linalg.md has
        the measurements).
    rng
        numpy Generator, int seed, JAX key or None (start and restart vectors).
    process_group
        As in ``hessian_operator``; the start vectors must then be the same on every
        rank (the same ``rng`` seed; checked).

    Returns
    -------
    EigenDirections
        ``directions`` (2, D) rows (top, bottom) for ``which="both"``, (1, D) for
        one end; ``eigenvalues`` :math:`(\lambda_{\max}, \lambda_{\min})` or
        :math:`(\lambda,)`; ``residuals`` :math:`\lVert H y - \lambda y \rVert`.

    Notes
    -----
    Cost: one Hessian-vector product (about two gradient steps per batch) per
    Lanczos step until convergence, at most ``num_matvecs`` per run (``"shifted"``:
    two runs); :math:`O(D p)` work per step for the reorthogonalisation and :math:`D p`
    memory for the basis.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> from fisherbound.families import Gaussian
    >>> x, y = np.array([[1.0, 2.0]]), np.zeros((1, 1))
    >>> loss = loss_function(LinearSoftmax(np.zeros((1, 2))), x, y, family=Gaussian())
    >>> np.round(hessian_directions(loss, rng=0).eigenvalues, 10).tolist()  # eig of x xᵀ
    [5.0, 0.0]
    >>> np.round(hessian_directions(loss, which="largest", rng=0).eigenvalues, 10).tolist()
    [5.0]
    """
    which = check_choice(which, "which", HESSIAN_WHICH)
    method = check_choice(method, "method", HESSIAN_METHODS)
    if method == "shifted" and which != "both":
        msg = (
            "method='shifted' finds both ends (a second run on H − λ₁ I), so which must "
            f"be 'both'; got which={which!r}. Use method='lanczos' for one end."
        )
        raise ValueError(msg)
    m = check_optional_int(num_matvecs, "num_matvecs")
    if m is not None and m < 2:
        msg = (
            "num_matvecs must be at least 2 (the budget of Hessian-vector products per "
            f"Lanczos run: a residual needs a second product); got {m}."
        )
        raise ValueError(msg)
    p = check_optional_int(basis_size, "basis_size")
    b = check_positive_int(block_size, "block_size")
    obj = _objective(
        source,
        "hessian_directions",
        process_group,
        which=which,
        method=method,
        tol=tol,
        m=m,
        p=p,
        b=b,
    )
    d = obj.num_params
    if d < 2 and which == "both":
        msg = (
            "hessian_directions needs at least two parameters (D >= 2) for two distinct "
            f"directions with which='both'; got D = {d}. Use which='largest' or 'smallest'."
        )
        raise ValueError(msg)
    xp = obj.xp
    gen = shared_generator(obj.coll, rng, where="hessian_directions")
    op = _hessian_operator(obj)
    options: dict[str, Any] = {"tol": tol, "num_matvecs": m, "basis_size": p, "block_size": b}
    first = eigsh(op, k=1, which=which, rng=gen, **options)
    vals, vecs, res = first.eigenvalues, first.eigenvectors, first.residuals
    if which != "both":
        return EigenDirections(xp.matrix_transpose(vecs), vals, res)
    if method == "lanczos":
        return _rows(xp, first, [int(vals.shape[0]) - 1, 0])
    # THEORY's scheme: the end of largest magnitude first, then the shifted run.
    top_first = bool(xp.abs(vals[-1]) >= xp.abs(vals[0]))
    i1 = int(vals.shape[0]) - 1 if top_first else 0
    lam1, y1, r1 = vals[i1], vecs[:, i1], res[i1]
    second = eigsh(
        _shifted(op, lam1),
        k=1,
        which="smallest" if top_first else "largest",
        rng=gen,
        **options,
    )
    lam2, y2, r2 = second.eigenvalues[0] + lam1, second.eigenvectors[:, 0], second.residuals[0]
    if top_first:
        return EigenDirections(xp.stack([y1, y2]), xp.stack([lam1, lam2]), xp.stack([r1, r2]))
    return EigenDirections(xp.stack([y2, y1]), xp.stack([lam2, lam1]), xp.stack([r2, r1]))


def fisher_directions(
    source: Source,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    /,
    *,
    num_directions: int = 2,
    kernel: str = "exact",
    reduction: str = "sum",
    tol: float | None = None,
    num_matvecs: int | None = None,
    basis_size: int | None = None,
    block_size: int = 1,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> EigenDirections:
    r"""The top eigenvectors of the Fisher metric :math:`F = \sum_x J_x^\top I(z_x)\, J_x`.

    Thick-restart Lanczos (``fisherbound.linalg.eigsh``) on
    ``fisherbound.fisher.fisher_operator``, stopped when each of the :math:`k` Ritz pairs
    :math:`(\theta, y)` has :math:`\lVert F y - \theta y \rVert \le \mathrm{tol} \cdot
    \max(\theta, \sqrt{\varepsilon}\, \lVert T \rVert)`: the directions in which the
    model's predictions change most. :math:`F` is the Gauss–Newton part of the Hessian of
    the negative log-likelihood, so these are the Hessian directions of a model
    without the second-order output term.

    Parameters
    ----------
    source
        A linearization or a re-iterable collection of them (adapters' ``linearize``).
    family
        The output family (default ``Categorical()``).
    num_directions
        :math:`k \ge 1`, at most :math:`D`.
    kernel, reduction
        As in ``fisher_operator`` (``"upper"`` / ``"lower"`` give the bound operators).
    tol
        The relative residual of each pair, :math:`\ge 0`; default
        :math:`\max(\text{1e-6}, \sqrt{\varepsilon})` (1e-6 in float64, 3.5e-4 in float32).
        0 runs to the budget, without a warning.
    num_matvecs
        The budget: the most Fisher matvecs (:math:`\ge \max(k, 2)`); default
        :math:`\max(100, 10 p)`. Reaching it before ``tol`` warns (RuntimeWarning).
    basis_size
        :math:`p`, the most Lanczos vectors held (memory :math:`D p`); default
        :math:`\min(D, \max(2k + 1, 20))`; :math:`p = D` gives the exact top :math:`k` after
        :math:`D` products.
    block_size
        :math:`b`, the vectors per Lanczos step (``linalg.eigsh``'s ``block_size``): 1
        (default) one Fisher matvec per step; :math:`b > 1` block Lanczos, one
        ``matmat`` of :math:`b` columns per step, with :math:`k + b \le p` and
        ``num_matvecs`` counting columns. It needs more products to the same ``tol``
        and pays only where one product of :math:`b` columns costs clearly less than
        :math:`b` single products (docs/linalg.md has the measurements).
    rng
        numpy Generator, int seed, JAX key or None.
    process_group
        As in ``fisher_operator`` (the same ``rng`` seed on every rank; checked).

    Returns
    -------
    EigenDirections
        ``directions`` (k, D) rows, ``eigenvalues`` DESCENDING (k,), ``residuals``.

    Notes
    -----
    Cost: one Fisher matvec (one JVP and one VJP per batch) per Lanczos step until
    the :math:`k` pairs converge, at most ``num_matvecs``; :math:`O(D p)` work per step and
    :math:`D p` memory for the basis.

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
    res = eigsh(
        op,
        k=k,
        which="largest",
        tol=tol,
        num_matvecs=check_optional_int(num_matvecs, "num_matvecs"),
        basis_size=check_optional_int(basis_size, "basis_size"),
        block_size=check_positive_int(block_size, "block_size"),
        rng=gen,
    )
    return _rows(op.xp, res, list(range(k - 1, -1, -1)))


def _rows(xp: Any, res: Any, order: list[int]) -> EigenDirections:
    """The eigenpairs ``order`` of an ``eigsh`` result, its eigenvectors (columns) as rows."""
    return EigenDirections(
        xp.stack([res.eigenvectors[:, i] for i in order], axis=0),
        xp.stack([res.eigenvalues[i] for i in order]),
        xp.stack([res.residuals[i] for i in order]),
    )


# --------------------------------------------------------------------------- #
# projected curvature


def projected_curvature(
    source: LossSource,
    directions: Array | EigenDirections,
    /,
    *,
    method: str = "hvp",
    step: float | None = None,
    process_group: ProcessGroup = None,
) -> ProjectedCurvature:
    r"""Curvature of the loss surface :math:`f(\alpha, \beta)` at :math:`\alpha = \beta = 0`.

    Here :math:`f(\alpha, \beta) = L(\theta + \alpha \eta + \beta \delta)`.
    With the projected Hessian :math:`H_{\alpha\beta} = \begin{pmatrix} \eta^\top H \eta &
    \eta^\top H \delta \\ \delta^\top H \eta & \delta^\top H \delta \end{pmatrix}` and the
    slopes :math:`f_\alpha = \eta^\top \nabla L`, :math:`f_\beta = \delta^\top \nabla L`, the
    graph formulas (THEORY §6). Cost per batch: two
    HVPs and one gradient (``method="hvp"``), or nine loss values (``"loss"``).

    .. math::

       K = \frac{f_{\alpha\alpha} f_{\beta\beta} - f_{\alpha\beta}^2}
       {(1 + f_\alpha^2 + f_\beta^2)^2}, \quad
       H_m = \frac{(1 + f_\beta^2) f_{\alpha\alpha}
       - 2 f_\alpha f_\beta f_{\alpha\beta} + (1 + f_\alpha^2) f_{\beta\beta}}
       {2 (1 + f_\alpha^2 + f_\beta^2)^{3/2}}, \quad
       \kappa_\pm = H_m \pm \sqrt{H_m^2 - K}

    give the Gaussian, mean and principal curvatures anywhere; at a critical point
    (:math:`f_\alpha = f_\beta = 0`) the principal curvatures are the eigenvalues of
    :math:`H_{\alpha\beta}`.

    Parameters
    ----------
    source
        A LossFunction or a re-iterable collection of them.
    directions
        :math:`\eta` and :math:`\delta` as the rows of a (2, D) array (or an
        ``EigenDirections``). They need not be orthogonal nor normalised: the
        curvature is the one of the plotted surface in the coordinates
        :math:`(\alpha, \beta)`.
    method
        ``"hvp"`` (default): :math:`H_{\alpha\beta}` from two Hessian-vector products and the
        slopes from one gradient, exact. ``"loss"``: loss values only, nine of them:
        :math:`f_\alpha = (f(h_\alpha, 0) - f(-h_\alpha, 0)) / 2h_\alpha`,
        :math:`f_{\alpha\alpha} = (f(h_\alpha, 0) - 2 f(0, 0) + f(-h_\alpha, 0)) / h_\alpha^2`,
        :math:`f_{\alpha\beta} = (f(h_\alpha, h_\beta) - f(h_\alpha, -h_\beta)
        - f(-h_\alpha, h_\beta) + f(-h_\alpha, -h_\beta)) / (4 h_\alpha h_\beta)`, with
        :math:`h_k = \mathrm{step} / \lVert d_k \rVert`; exact for a quadratic loss up to
        rounding.
    step
        The displacement norm of ``method="loss"``; default ``default_step(θ)``.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; losses, gradients and products are all-reduced.

    Returns
    -------
    ProjectedCurvature
        ``hessian`` (2, 2), ``gradient`` (2,), ``principal`` (2,), ``mean``,
        ``gaussian`` (0-d), in :math:`\theta`'s namespace and dtype.

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
    h_user = None if step is None else check_real(step, "step")
    obj = _objective(
        source,
        "projected_curvature",
        process_group,
        method=method,
        step=h_user,
        directions=_fingerprint(getattr(directions, "directions", directions), "directions"),
    )
    xp = obj.xp
    dirs = check_vectors(directions, "directions", obj.params, obj.num_params, (2,), "params")
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
        h = step_size(xp, obj.params, h_user)
        e = coefficients(xp, dirs, h)
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
        check_vector(c, name, "a non-empty 1-D array of coefficients", xp=xp)
        owner = "the device of the parameters"
        out.append(conform(c, name, xp=xp, dtype=dtype, device=device, owner=owner))
    return tuple(out)


def surface(
    source: LossSource,
    directions: Array | EigenDirections,
    /,
    *,
    coordinates: Array | tuple[Array, ...] | None = None,
    span: float = 1.0,
    num_points: int = 21,
    batch_size: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Surface:
    r"""The loss on a 1-D or 2-D grid :math:`\theta + \alpha d_1 (+ \beta d_2)`, over a data set.

    :math:`\mathrm{values}[i] = L(\theta + \alpha_i d_1)` for one direction,
    :math:`\mathrm{values}[i, j] = L(\theta + \alpha_i d_1 + \beta_j d_2)` for two; :math:`L` is
    the total loss of ``source`` (the sum of
    the batch losses, or the mean over all counted positions for ``reduction="mean"``).
    The batches are streamed once (a progress bar shows them); for each batch the
    grid's parameter vectors go through ``value`` in chunks of ``batch_size``.

    Parameters
    ----------
    source
        A LossFunction or an iterable of them (one per batch, at one :math:`\theta`). For a data
        loader of (x, y) batches pass the adapter's ``loss_functions(model, loader)``,
        which builds them lazily.
    directions
        (1, D) or (2, D) rows, or an ``EigenDirections``: random
        (``random_directions``), Hessian (``hessian_directions``) or Fisher
        directions, or any others (e.g. :math:`\theta_\mathrm{final} - \theta_\mathrm{init}`).
    coordinates
        None: ``num_points`` evenly spaced coefficients in
        :math:`[-\mathrm{span}, \mathrm{span}]` along every
        direction. A 1-D array: those coefficients along every direction. A tuple of
        one 1-D array per direction.
    span, num_points
        The default grid.
    batch_size
        Grid points per call of ``value`` (default :math:`\max(1, \min(64, 2^{22} / D))`).
    progress
        Progress bar over batches: None (on a terminal, after 2 s), True or False.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; the grid of losses is all-reduced (pass the same
        directions on every rank).

    Returns
    -------
    Surface
        ``coordinates``, ``values`` (G,) or :math:`(G_\alpha, G_\beta)`, ``directions``,
        ``reduction``.

    Notes
    -----
    Cost: :math:`G` loss evaluations per batch (about :math:`G` forward passes, batched),
    with :math:`G = \mathrm{num\_points}^k`; memory: ``batch_size`` parameter vectors.

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
    span = check_real(span, "span")
    g = check_positive_int(num_points, "num_points")
    bs = None if batch_size is None else check_positive_int(batch_size, "batch_size")
    total = None
    prepared = None
    stream = LossStream(source, desc="loss surface", progress=progress, process_group=process_group)
    options = {
        "directions": _fingerprint(getattr(directions, "directions", directions), "directions"),
        "coordinates": repr(coordinates) if coordinates is None else _fingerprints(coordinates),
        "span": span,
        "num_points": g,
    }
    for loss in stream:
        if prepared is None:
            xp = array_namespace(loss.params, names=("params",))
            dirs = check_vectors(
                directions, "directions", loss.params, loss.num_params, (1, 2), "params"
            )
            k = int(dirs.shape[0])
            axes = _grid(xp, loss.params, k, coordinates, span, g)
            if k == 1:
                coef = axes[0][:, None]
            else:
                ga, gb = xp.meshgrid(axes[0], axes[1], indexing="ij")
                coef = xp.stack([xp.reshape(ga, (-1,)), xp.reshape(gb, (-1,))], axis=1)
            size = bs if bs is not None else max(1, min(64, MAX_ENTRIES // loss.num_params))
            prepared = (xp, dirs, axes, coef, size)
        xp, dirs, axes, coef, size = prepared
        rows = int(coef.shape[0])
        parts = [
            loss.value(xp.matmul(coef[start : min(rows, start + size), ...], dirs))
            for start in range(0, rows, size)
        ]
        vals = stream.as_sum(loss, parts[0] if len(parts) == 1 else xp.concat(parts, axis=0))
        total = vals if total is None else total + vals
    stream.finish(**options)
    assert total is not None
    assert prepared is not None
    xp, dirs, axes, _, _ = prepared
    total = stream.total(total)
    reduction = stream.reduction
    shape = tuple(int(a.shape[0]) for a in axes)
    return Surface(axes, xp.reshape(total, shape), dirs, reduction)
