r"""Spectrum, local dimensionality and razor complexity of the Fisher metric.

THEORY §5 (Sun and Nielsen, *A Geometric Modeling of Occam's Razor in Deep
Learning*). The Fisher metric :math:`F = \sum_x J_x^\top I(z_x)\, J_x` of a network is
degenerate: most of its :math:`D` eigenvalues are (nearly) zero. This module measures
how many are not, matrix-free, over a whole data set:

- ``top_eigenpairs``: the :math:`k` largest eigenpairs of :math:`F` (or of a bound
  operator, to bracket :math:`\lambda_{\max}(F)`) by Lanczos on the Fisher operator;
- ``spectral_density``: the eigenvalue density by stochastic Lanczos quadrature
  (SLQ), with a pointwise standard error;
- ``local_dimension``: :math:`d_\varepsilon = \#\{i : \lambda_i(F) > \varepsilon\}`,
  counted from the top eigenvalues when they are few (deterministic) and estimated by
  SLQ with a standard error otherwise; ``rank_bound`` gives the structural bound
  :math:`\min(D, N r)` beside it (:math:`r = C - 1` for the categorical :math:`F`);
- ``razor``: the Gaussian-prior razor complexity
  :math:`-\log p(X \mid \hat\theta) + \|\hat\theta - \theta_0\|^2 / (2\sigma^2)
  + \frac12 \sum_i \log(1 + \sigma^2 \lambda_i(F))`, exact for linear-Gaussian models
  and a Laplace approximation otherwise, with its log-det term by dense eigenvalues,
  full Lanczos or SLQ (with an error bar), and the BIC term
  :math:`\frac{D}{2} \log N` beside it.

Every function takes ``source``, one linearization or a re-iterable collection of
them (a list of batches; every Fisher matvec streams the data again), and an
output ``family``. ``kernel`` selects the operator as in ``fisherbound.fisher``:
``"exact"`` (:math:`F`), ``"upper"`` (:math:`F_\mathrm{DG} \succeq F`), ``"lower"``
(:math:`F_\mathrm{LR} \preceq F`) and the scalar envelopes; Löwner order gives
:math:`\lambda_i(F_\mathrm{LR}) \le \lambda_i(F) \le \lambda_i(F_\mathrm{DG})` for every
:math:`i`, so the spectra of the bound operators bracket every eigenvalue of :math:`F`
and its trace. Results are for the SUM over inputs unless ``reduction="mean"`` (the
razor always uses the sum, :math:`F_\mathrm{sum}` of THEORY §5), which divides by
:math:`N`, the number of examples. Logits may have position axes, (N, ∗S, C): then
:math:`F = \sum_x \sum_t J_{xt}^\top K(z_{xt})\, J_{xt}` over the counted positions
(``lin.mask``), and one Fisher matvec still costs one JVP and one VJP per batch, with
:math:`O(N P C)` core work, whatever :math:`P` and :math:`C`.

Data parallel: ``process_group=`` (a ``torch.distributed`` process group or a JAX
axis name, as in ``fisherbound.fisher``) makes ``source`` this rank's shard; the
Fisher operator all-reduces every matvec, so Lanczos and SLQ run replicated on
every rank and return the spectrum of the metric over all shards. Their random
vectors must then be the same on every rank: pass the same ``rng`` seed on all
ranks (checked), or ``rng=None`` (rank 0 draws a seed and shares it). ``razor``
also all-reduces the negative log-likelihood and :math:`N`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from fisherbound._lib import (
    REDUCTIONS,
    Estimate,
    ProcessGroup,
    RngLike,
    Source,
    array_namespace,
    check_choice,
    check_device,
    check_floating,
    check_optional_int,
    check_positive_int,
    check_positive_real,
    collective,
    estimate_from_samples,
    index_dtype,
    shared_generator,
    to_host,
)
from fisherbound._quantities import total_counted
from fisherbound._razor import (
    LogDetSettings,
    Razor,
    check_parameter_vector,
    razor_terms,
    scalar,
    split_labels,
)
from fisherbound._stream import Stream, check_family
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.fisher import DEFAULT_MAX_PARAMS
from fisherbound.fisher import fisher_operator as _fisher_operator
from fisherbound.linalg import (
    Quadrature,
    eigsh,
    lanczos_quadrature,
    smoothed_density,
)
from fisherbound.linalg._lanczos import _default_tol
from fisherbound.linalg._quadrature import _adaptive_slq, _count_above, _rules_estimate
from fisherbound.linearization import as_linearizations

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "top_eigenpairs",
    "spectral_density",
    "local_dimension",
    "rank_bound",
    "razor",
    "Eigenpairs",
    "SpectralDensity",
    "RankBound",
    "Razor",
]

DIMENSION_METHODS = ("auto", "lanczos", "slq")
LOGDET_METHODS = ("auto", "dense", "lanczos", "slq")

#: SLQ defaults: Rademacher probes and Lanczos steps per probe.
DEFAULT_NUM_PROBES = 20
DEFAULT_SLQ_MATVECS = 40
#: ``local_dimension``: the relative standard error at which SLQ stops drawing probes.
DEFAULT_TARGET_ERROR = 0.05
#: ``local_dimension``: the largest count obtained deterministically from the top
#: eigenvalues before falling back to SLQ.
DEFAULT_MAX_COUNT = 32
#: ``spectral_density``: default number of grid points.
DEFAULT_NUM_POINTS = 256


# --------------------------------------------------------------------------- #
# result types


class Eigenpairs(NamedTuple):
    r"""The top eigenpairs of a Fisher operator.

    Attributes
    ----------
    eigenvalues
        Ritz values :math:`\theta_1 \ge \dots \ge \theta_k`, shape (k,), DESCENDING.
    eigenvectors
        Unit Ritz vectors :math:`y_i` as columns, shape (D, k), in the order of
        ``eigenvalues``, in the parameter order of the linearization's blocks.
    residuals
        :math:`\|F y_i - \theta_i y_i\|`, shape (k,): some eigenvalue of :math:`F` lies
        within this distance of :math:`\theta_i`.
    """

    eigenvalues: Array
    eigenvectors: Array
    residuals: Array


class SpectralDensity(NamedTuple):
    r"""A smoothed spectral density from stochastic Lanczos quadrature.

    Attributes
    ----------
    grid
        Points :math:`t`, shape (G,).
    density
        :math:`\varphi(t) = \frac1D \sum_i \mathcal N(t;\, \lambda_i, \mathrm{width}^2)`
        estimated on the grid, shape (G,): the mean over probes of each probe's
        Gauss-rule density; it integrates to 1.
    std_error
        Pointwise standard error of ``density`` over the probes, shape (G,).
    nodes, weights
        The Gauss quadrature rules (Ritz values and :math:`D` times the squared first
        components), shape (M, m);
        :math:`\sum_j \mathtt{weights}[i, j]\, f(\mathtt{nodes}[i, j])` estimates
        :math:`\operatorname{tr} f(F)` for any :math:`f` (``fisherbound.linalg.slq``
        averages exactly this).
    width
        The Gaussian smoothing standard deviation used (a float).
    """

    grid: Array
    density: Array
    std_error: Array
    nodes: Array
    weights: Array
    width: float


class RankBound(NamedTuple):
    r"""The structural bound :math:`\operatorname{rank} F \le \min(D, N r)` (THEORY §5).

    Attributes
    ----------
    value
        min(``num_params``, ``num_inputs`` :math:`\cdot` ``rank_per_input``).
    num_params
        :math:`D`.
    num_inputs
        :math:`N`, the total number of inputs in the source.
    rank_per_input
        :math:`r`, the largest possible rank of the core kernel :math:`K(z)`:
        :math:`C - 1` for the categorical :math:`F` and its scalar envelopes (softmax
        ignores a common shift of the logits), :math:`C` for ``kernel="upper"``
        (:math:`\operatorname{diag} p`) and for the Bernoulli and Gaussian families, 1
        for ``kernel="lower"``.
    """

    value: int
    num_params: int
    num_inputs: int
    rank_per_input: int


# --------------------------------------------------------------------------- #
# validation


def _operator(
    source: Source, family: Any, kernel: str, reduction: str, process_group: ProcessGroup = None
) -> Any:
    """The Fisher operator (validates the family, kernel, reduction and source)."""
    check_choice(kernel, "kernel", KERNELS)
    check_choice(reduction, "reduction", REDUCTIONS)
    return _fisher_operator(
        source, family, kernel=kernel, reduction=reduction, process_group=process_group
    )


def _shared_generator(rng: RngLike, process_group: ProcessGroup, where: str, **options: Any) -> Any:
    """The generator of parameter-space vectors: the same on every rank (checked).

    Before it, every rank must run the call with the same ``options`` (checked).
    """
    coll = collective(process_group)
    if coll is not None:
        coll.agree(options, where=where)
    return shared_generator(coll, rng, where=where)


def _namespace(op: Any) -> Any:
    witness = op.xp.zeros((0,), dtype=op.dtype, device=op.device)
    return array_namespace(witness, names=("the Fisher operator",))


# --------------------------------------------------------------------------- #
# top eigenpairs


def top_eigenpairs(
    source: Source,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    k: int,
    kernel: str = "exact",
    reduction: str = "sum",
    tol: float | None = None,
    num_matvecs: int | None = None,
    basis_size: int | None = None,
    block_size: int = 1,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> Eigenpairs:
    r"""The :math:`k` largest eigenpairs of the Fisher metric, by Lanczos on its operator.

    :math:`F_K = \sum_x J_x^\top K(z_x)\, J_x` is applied matrix-free (one JVP and one VJP
    per batch per matvec, ``fisherbound.fisher.fisher_operator``); thick-restart Lanczos
    with full reorthogonalisation (``fisherbound.linalg.eigsh``) gives the Ritz pairs
    :math:`(\theta_i, Q s_i)` of its :math:`k` largest eigenvalues and stops when each
    relative residual :math:`\|F y - \theta y\| / \theta` is below ``tol``; each residual
    bounds the distance from :math:`\theta` to the spectrum. Since
    :math:`F_\mathrm{LR} \preceq F \preceq F_\mathrm{DG}`, ``kernel="lower"`` and
    ``kernel="upper"`` give
    :math:`\lambda_i(F_\mathrm{LR}) \le \lambda_i(F) \le \lambda_i(F_\mathrm{DG})` for every
    :math:`i` (exactly when converged).

    Parameters
    ----------
    source
        A linearization or a re-iterable collection of them (a list of batches).
    family
        The output family (``Categorical()`` by default).
    k
        How many eigenpairs, :math:`1 \le k \le D`.
    kernel
        ``"exact"``, ``"upper"``, ``"lower"``, ``"scalar_upper"`` or
        ``"scalar_lower"`` (see ``fisherbound.fisher``).
    reduction
        ``"sum"`` over inputs (default) or ``"mean"``: divided by :math:`N`, the number
        of examples (not of positions).
    tol
        The relative residual at which a Ritz pair counts as converged; default
        :math:`\max(10^{-6}, \sqrt{\varepsilon})` (1e-6 in float64, 3.5e-4 in float32).
    num_matvecs
        The most Fisher matvecs, :math:`\ge k`; default :math:`\max(100, 10 p)` with
        :math:`p = \min(D, \max(2k + 1, 20))` the Lanczos basis. Reaching it first warns.
    basis_size
        :math:`p`, the most Lanczos vectors held (memory :math:`D p`),
        :math:`k + 1 \le p \le D`; :math:`p = D` is a full run: the exact spectrum with
        multiplicities.
    block_size
        :math:`b`, the vectors per Lanczos step (``linalg.eigsh``'s ``block_size``): 1
        (default) one Fisher matvec per step; :math:`b > 1` block Lanczos, one
        ``matmat`` of :math:`b` columns per step, with :math:`k + b \le p` and
        ``num_matvecs`` counting columns. It needs more products to the same ``tol``
        and pays only where one product of :math:`b` columns costs clearly less than
        :math:`b` single products (docs/linalg.md has the measurements).
    rng
        Generator, int seed, JAX key or None (the Lanczos start vector).

    Returns
    -------
    Eigenpairs
        ``eigenvalues`` (k,) descending, ``eigenvectors`` (D, k), ``residuals`` (k,),
        in the linearization's namespace, device and dtype.

    Notes
    -----
    Cost: one Fisher matvec per Lanczos step until the :math:`k` pairs converge (about
    :math:`p = \max(2k + 1, 20)` for a decaying spectrum, the count of SciPy's eigsh or
    fewer), :math:`O(D p)` work per step and :math:`D p` memory for the basis.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> lin = linearize(LinearSoftmax(np.zeros((3, 2))), np.array([[1.0, 2.0]]))
    >>> top = top_eigenpairs(lin, k=3, rng=0)
    >>> np.round(top.eigenvalues, 10).tolist()   # I_Δ(uniform) ⊗ x xᵀ: {5/3, 5/3, 0, …}
    [1.6666666667, 1.6666666667, 0.0]
    """
    k = check_positive_int(k, "k")
    m = check_optional_int(num_matvecs, "num_matvecs")
    op = _operator(source, family, kernel, reduction, process_group)
    d = int(op.shape[0])
    if k > d:
        msg = f"k must be at most D = {d} (the number of parameters); got k = {k}."
        raise ValueError(msg)
    p = check_optional_int(basis_size, "basis_size")
    b = check_positive_int(block_size, "block_size")
    opts: dict[str, Any] = {"tol": tol, "num_matvecs": m, "basis_size": p, "block_size": b}
    gen = _shared_generator(rng, process_group, "top_eigenpairs", k=k, **opts)
    res = eigsh(op, k=k, which="largest", rng=gen, **opts)
    xp = _namespace(op)
    return Eigenpairs(
        xp.flip(res.eigenvalues, axis=0),
        xp.flip(res.eigenvectors, axis=1),
        xp.flip(res.residuals, axis=0),
    )


# --------------------------------------------------------------------------- #
# spectral density


def spectral_density(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    num_probes: int = DEFAULT_NUM_PROBES,
    num_matvecs: int = DEFAULT_SLQ_MATVECS,
    grid: Array | None = None,
    num_points: int = DEFAULT_NUM_POINTS,
    width: float | None = None,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> SpectralDensity:
    r"""The spectral density of the Fisher metric by stochastic Lanczos quadrature.

    For each of :math:`M` Rademacher probes :math:`v`, :math:`m` Lanczos steps from
    :math:`v / \sqrt{D}` give a Gauss rule :math:`(\theta_{ij}, w_{ij})` of the spectral
    measure with :math:`v^\top f(F)\, v \approx \sum_j w_{ij} f(\theta_{ij})`, exact for
    polynomials of degree :math:`< 2m` (``fisherbound.linalg.lanczos_quadrature``).
    The smoothed density

    .. math::

       \varphi(t) = \frac1D \sum_{i=1}^D \mathcal N(t;\, \lambda_i, \sigma^2)
       \approx \frac{1}{M} \sum_{p=1}^M \frac{1}{D} \sum_j w_{pj}\,
       \mathcal N(t;\, \theta_{pj}, \sigma^2)

    is the mean of :math:`M` independent per-probe densities (Hutchinson's estimator of
    :math:`\operatorname{tr} f(F) / D` with :math:`f = \mathcal N(t;\, \cdot, \sigma^2)`,
    plus the quadrature error, which vanishes as :math:`m \to D`); ``std_error`` is their
    pointwise sample standard deviation :math:`/ \sqrt{M}`.

    Parameters
    ----------
    source, family, kernel, reduction
        As in ``top_eigenpairs``.
    num_probes
        :math:`M \ge 1` probes (:math:`M \ge 2` for a finite standard error).
    num_matvecs
        Lanczos steps per probe :math:`m` (capped at :math:`D`).
    grid
        1-D floating array of points :math:`t` (the linearization's namespace and
        device). Default: ``num_points`` points evenly spaced from
        :math:`\min \theta - 3\sigma` to :math:`\max \theta + 3\sigma`. For heavy-tailed
        spectra pass your own (e.g. a log-spaced) grid and width.
    num_points
        Grid size when ``grid`` is None.
    width
        :math:`\sigma > 0`, the smoothing standard deviation. Default: 1 % of the range
        of the nodes (of max ``|θ|`` when the range is 0, and 1 when :math:`F = 0`).
    rng
        Generator, int seed, JAX key or None (the probes).

    Returns
    -------
    SpectralDensity
        ``grid``, ``density``, ``std_error`` (G,), ``nodes``, ``weights`` (M, m) and
        ``width``.

    Notes
    -----
    Cost: :math:`M m` Fisher matvecs (:math:`m` batched matmats of :math:`M` columns),
    :math:`O(D M m^2)` work and :math:`D M m` memory for the :math:`M` Lanczos bases;
    :math:`O(G M m)` for the density.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> lin = linearize(MLP.random([3, 4, 3], rng=0), np.ones((4, 3)))
    >>> sd = spectral_density(lin, num_probes=4, num_matvecs=31, rng=0)
    >>> step = float(sd.grid[1] - sd.grid[0])
    >>> round(float(np.sum(sd.density)) * step, 2)
    1.0
    """
    M = check_positive_int(num_probes, "num_probes")
    m = check_positive_int(num_matvecs, "num_matvecs")
    G = check_positive_int(num_points, "num_points")
    sigma = None if width is None else check_positive_real(width, "width")
    op = _operator(source, family, kernel, reduction, process_group)
    xp = _namespace(op)
    if grid is not None:
        witness = xp.zeros((0,), dtype=op.dtype, device=op.device)
        array_namespace(witness, grid, names=("the Fisher operator's vectors", "grid"))
        check_floating(grid, "grid")
        if grid.ndim != 1:
            msg = f"grid must be a 1-D array of points; got shape {tuple(grid.shape)}."
            raise ValueError(msg)
        check_device(grid, "grid", op.device, owner="the linearization's device")
    return _spectral_density(
        xp,
        op,
        num_probes=M,
        num_matvecs=m,
        grid=grid,
        num_points=G,
        width=sigma,
        gen=_shared_generator(
            rng, process_group, "spectral_density", M=M, m=m, num_points=G, width=sigma
        ),
    )


def _spectral_density(
    xp: Any,
    op: Any,
    *,
    num_probes: int,
    num_matvecs: int,
    grid: Array | None,
    num_points: int,
    width: float | None,
    gen: Any,
) -> SpectralDensity:
    quad = lanczos_quadrature(op, num_probes=num_probes, num_matvecs=num_matvecs, rng=gen)
    nodes, weights = quad
    if width is None or grid is None:
        lo = float(to_host(xp.min(nodes)))
        hi = float(to_host(xp.max(nodes)))
        scale = hi - lo if hi > lo else abs(hi)
        if width is None:
            width = 0.01 * scale if scale > 0.0 else 1.0
        if grid is None:
            grid = xp.linspace(
                lo - 3.0 * width, hi + 3.0 * width, num_points, dtype=op.dtype, device=op.device
            )
    per_probe = [
        smoothed_density(Quadrature(nodes[i : i + 1, :], weights[i : i + 1, :]), grid, width=width)
        for i in range(num_probes)
    ]
    est = estimate_from_samples(xp.stack(per_probe, axis=0), xp)
    return SpectralDensity(grid, est.value, est.std_error, nodes, weights, float(width))


# --------------------------------------------------------------------------- #
# rank bound


def _rank_per_input(family: Family, kernel: str, c: int) -> int:
    """The largest rank of K(z): the columns of its square-root factor.

    At most C − 1 where the categorical kernel annihilates the constant vector.
    """
    r = family.sqrt_rank(c, kernel=kernel)
    if isinstance(family, Categorical) and kernel in ("exact", "scalar_upper", "scalar_lower"):
        r = min(r, c - 1)
    return min(r, c)


def rank_bound(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    process_group: ProcessGroup = None,
) -> RankBound:
    r"""The structural bound :math:`\operatorname{rank} F \le \min(D, N r)` of THEORY §5.

    :math:`F_K = \sum_x J_x^\top K(z_x)\, J_x` is a sum of :math:`N` terms of rank
    :math:`\le r = \max \operatorname{rank} K(z)`, and a :math:`D \times D` matrix:
    :math:`\operatorname{rank} F_K \le \min(D, N r)`. With position axes (logits
    (N, ∗S, C)) every counted position :math:`t` of :math:`x` adds a term
    :math:`J_{xt}^\top K(z_{xt})\, J_{xt}` of rank :math:`\le r`, so ``value`` is
    :math:`\min(D, r \cdot \sum_x P_x)`, :math:`P_x` the positions of :math:`x` not
    masked by ``lin.mask`` (:math:`N P` without a mask); ``num_inputs`` still counts the
    examples. For the categorical :math:`F`, :math:`r = C - 1`
    (:math:`I_\Delta \mathbf{1} = 0`), so
    :math:`\operatorname{rank} F \le \min(D, N (C - 1))`. The bound binds for wide
    networks (:math:`D \gg N C`); for a linear softmax layer the sharper
    :math:`\operatorname{rank} F \le (C - 1) \operatorname{rank}[\tilde x_1 \dots \tilde x_N]`
    holds (:math:`\tilde x = (x, 1)` with a bias). Compare with ``local_dimension``.

    Parameters
    ----------
    source
        A linearization or an iterable of them (streamed once; only the logits'
        shapes are read).
    family, kernel
        As in ``top_eigenpairs``.

    Returns
    -------
    RankBound
        ``value``, ``num_params`` (:math:`D`), ``num_inputs`` (:math:`N`),
        ``rank_per_input`` (:math:`r`, per position with position axes), Python ints.

    Notes
    -----
    Cost: one pass over the batches' logits; no JVP or VJP.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> lin = linearize(MLP.random([4, 16, 3], rng=0), np.ones((5, 4)))
    >>> rank_bound(lin)   # D = 131 parameters, N (C − 1) = 10
    RankBound(value=10, num_params=131, num_inputs=5, rank_per_input=2)
    """
    fam = check_family(family)
    check_choice(kernel, "kernel", KERNELS)
    d = 0
    r = 0
    positions = 0
    stream = Stream(source, fam, desc="rank bound", progress=False, process_group=process_group)
    for lin in stream:
        d = int(lin.num_params)
        if stream.num_batches == 1:
            r = _rank_per_input(fam, kernel, int(lin.logits.shape[-1]))
        positions += total_counted(lin)
    stream.finish(where="rank_bound", kernel=kernel)
    n = stream.num_inputs
    if stream.coll is not None:
        positions = stream.coll.sum_int(positions)
    return RankBound(min(d, positions * r), d, n, r)


# --------------------------------------------------------------------------- #
# local dimension


def local_dimension(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    eps: float,
    method: str = "auto",
    kernel: str = "exact",
    reduction: str = "sum",
    max_count: int = DEFAULT_MAX_COUNT,
    num_probes: int = DEFAULT_NUM_PROBES,
    num_matvecs: int | None = None,
    target_error: float | None = DEFAULT_TARGET_ERROR,
    quadrature: SpectralDensity | Quadrature | None = None,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> Estimate:
    r"""The local dimensionality :math:`d_\varepsilon`, matrix-free (THEORY §5).

    .. math::

       d_\varepsilon = \#\{i : \lambda_i(F) > \varepsilon\}

    Two ways, chosen by ``method``:

    - ``"lanczos"``: count the Ritz values above :math:`\varepsilon` by thick-restart
      Lanczos on :math:`F`. By Cauchy interlacing the :math:`i`-th largest Ritz value of
      any Krylov space never exceeds :math:`\lambda_i`, so the count never overshoots, and
      ``max_count`` + 1 Ritz values above :math:`\varepsilon` prove
      :math:`d_\varepsilon >` ``max_count`` at once (converged or not). Otherwise the run
      stops when the Ritz pairs above :math:`\varepsilon` and the largest one below
      :math:`\varepsilon` have relative residuals
      :math:`\le \max(10^{-6}, \sqrt{\varepsilon_\mathrm{mach}})` (only those need
      converge); they are counted and deflated, :math:`(I - Y Y^\top) F (I - Y Y^\top)`,
      and a new run looks for copies one Krylov space cannot hold (repeated eigenvalues)
      until a run converges with none above :math:`\varepsilon`. With :math:`D \le p` (the
      basis) the Ritz values are the exact spectrum. Deterministic: ``std_error`` is 0
      and ``num_probes`` is 0. A ValueError if :math:`d_\varepsilon >` ``max_count``.
    - ``"slq"``: stochastic Lanczos quadrature of the step function,
      :math:`\operatorname{tr} \mathbf{1}[F > \varepsilon] \approx \frac1M \sum_p \sum_j
      w_{pj} \mathbf{1}[\theta_{pj} > \varepsilon]`, with the Hutchinson standard error
      over the :math:`M` probes (the quadrature adds a bias that vanishes when the Ritz
      values resolve the gap of the spectrum around :math:`\varepsilon`, and as
      :math:`m \to D`). Probes run in rounds (4, then doubling) until the relative
      standard error is at most ``target_error`` (checked from 4 probes on) or :math:`M`
      probes ran.
    - ``"auto"`` (default): ``"lanczos"`` when it finds
      :math:`d_\varepsilon \le` ``max_count``, else ``"slq"``. The count's run starts
      from a Rademacher probe, so when it proves :math:`d_\varepsilon >` ``max_count``
      its first :math:`m` steps are SLQ's first probe: the products are reused, and the
      count costs only the steps it needs for the proof beyond :math:`m` (often none).

    Parameters
    ----------
    source, family, kernel, reduction
        As in ``top_eigenpairs``; :math:`\varepsilon` applies to :math:`F` (sum) or
        :math:`F / N` (mean).
    eps
        :math:`\varepsilon > 0`. THEORY §5: with a prior
        :math:`\mathcal N(\theta_0, \sigma^2 I)` the razor's effective dimension is about
        :math:`d_\varepsilon` for :math:`\varepsilon = 1/\sigma^2`.
    method
        ``"auto"``, ``"lanczos"`` or ``"slq"``.
    max_count
        The largest count obtained by Lanczos.
    num_probes
        :math:`M`, the most SLQ probes.
    num_matvecs
        The Lanczos basis of the count, :math:`p` (default :math:`\min(D, \max(2`
        ``max_count`` :math:`+ 3, 20, m))`), and the steps per SLQ probe, :math:`m`
        (default :math:`\min(D, 40)`).
    target_error
        The relative standard error at which SLQ stops drawing probes (default
        0.05); None runs all :math:`M` probes.
    quadrature
        Gauss rules already computed on the same operator: a ``SpectralDensity``
        (or a ``Quadrature``, (M, m) nodes and weights) of ``spectral_density`` or
        ``lanczos_quadrature`` with the same source, family, kernel and reduction.
        Then SLQ reuses them (no product; ``num_probes`` and ``target_error`` are
        ignored), and when their nodes prove :math:`d_\varepsilon >` ``max_count`` by
        interlacing, the Lanczos count does not run either.
    rng
        Generator, int seed, JAX key or None.

    Returns
    -------
    Estimate
        ``value`` (0-d, the count as a floating number), ``std_error`` (0-d; 0 for a
        deterministic count), ``num_probes`` (0 for a deterministic count, else the
        probes used). Compare it with ``rank_bound(source, family).value``.

    Notes
    -----
    Cost: Lanczos, one matvec per step until the pairs above :math:`\varepsilon` converge
    (about :math:`2 d_\varepsilon + 20`), or ``max_count`` + 1 steps to prove
    :math:`d_\varepsilon >` ``max_count``, plus a run per verification round; SLQ,
    :math:`m` matvecs per probe, between 4 and :math:`M` probes (each round one matmat of
    its probes per step). Each matvec is one JVP and one VJP
    per batch. With ``quadrature``, nothing beyond the count when it runs.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> lin = linearize(LinearSoftmax(np.zeros((3, 2))), np.array([[1.0, 2.0]]))
    >>> est = local_dimension(lin, eps=1e-6, rng=0)
    >>> float(est.value), float(est.std_error), est.num_probes
    (2.0, 0.0, 0)
    """
    opts = _CountOptions(
        check_positive_real(eps, "eps", " The local dimension counts eigenvalues > eps."),
        check_choice(method, "method", DIMENSION_METHODS),
        check_positive_int(max_count, "max_count"),
        check_positive_int(num_probes, "num_probes"),
        check_optional_int(num_matvecs, "num_matvecs"),
        None if target_error is None else check_positive_real(target_error, "target_error"),
    )
    m = opts.num_matvecs
    op = _operator(source, family, kernel, reduction, process_group)
    d = int(op.shape[0])
    if m is not None and method != "slq" and m < min(opts.max_count + 1, d):
        msg = (
            f"num_matvecs must be at least max_count + 1 = {min(opts.max_count + 1, d)} for the "
            f"Lanczos count (one step per Ritz value); got {m}. Raise num_matvecs, lower "
            "max_count, or leave num_matvecs as None."
        )
        raise ValueError(msg)
    xp = _namespace(op)
    quad = None if quadrature is None else _check_rules(xp, op, quadrature)
    rules = None if quad is None else tuple(int(s) for s in quad.nodes.shape)
    gen = _shared_generator(
        rng, process_group, "local_dimension", **opts._asdict(), quadrature=rules
    )
    steps = min(d, DEFAULT_SLQ_MATVECS) if m is None else min(m, d)
    proven = quad is not None and _rules_count(xp, quad, opts.eps, opts.max_count)
    first = None
    if method in ("auto", "lanczos") and not proven:
        tol = _default_tol(xp, op.dtype)
        reuse = steps if method == "auto" and quad is None else 0
        count, first = _count_above(
            xp,
            op,
            eps=opts.eps,
            max_count=opts.max_count,
            basis_size=m,
            tol=tol,
            probe_steps=reuse,
            gen=gen,
        )
        if count is not None:
            zero = scalar(xp, 0.0, op)
            # Exact: no probes, no error (dof ∞, the interval is the count itself).
            return Estimate(scalar(xp, float(count), op), zero, 0, float("inf"))
    if method == "lanczos":
        msg = (
            f"local_dimension with method='lanczos' found more than max_count = "
            f"{opts.max_count} eigenvalues above eps = {opts.eps}; raise max_count or use "
            "method='slq' (or 'auto')."
        )
        raise ValueError(msg)
    if quad is not None:
        return _rules_estimate(xp, _step(xp, opts.eps), quad)
    est, _ = _adaptive_slq(
        xp,
        op,
        _step(xp, opts.eps),
        num_probes=opts.num_probes,
        num_matvecs=steps,
        target_error=opts.target_error,
        gen=gen,
        first=first,
    )
    return est


class _CountOptions(NamedTuple):
    """The validated options of ``local_dimension``, on which the ranks agree."""

    eps: float
    method: str
    max_count: int
    num_probes: int
    num_matvecs: int | None
    target_error: float | None


def _step(xp: Any, eps: float) -> Any:
    def step(t: Array) -> Array:
        return xp.astype(t > eps, t.dtype)

    return step


def _check_rules(xp: Any, op: Any, quadrature: Any) -> Quadrature:
    """``quadrature``'s (M, m) nodes and weights, checked against the operator."""
    nodes = getattr(quadrature, "nodes", None)
    weights = getattr(quadrature, "weights", None)
    if nodes is None or weights is None:
        msg = (
            "quadrature must be a SpectralDensity or a Quadrature (nodes and weights of "
            "spectral_density or lanczos_quadrature on the same operator); got "
            f"{type(quadrature).__name__}."
        )
        raise TypeError(msg)
    witness = xp.zeros((0,), dtype=op.dtype, device=op.device)
    names = ("the Fisher operator's vectors", "quadrature.nodes", "quadrature.weights")
    array_namespace(witness, nodes, weights, names=names)
    if nodes.ndim != 2 or tuple(nodes.shape) != tuple(weights.shape):
        msg = (
            "quadrature.nodes and quadrature.weights must both have shape (M, m); got "
            f"{tuple(nodes.shape)} and {tuple(weights.shape)}."
        )
        raise ValueError(msg)
    return Quadrature(nodes, weights)


def _rules_count(xp: Any, quad: Any, eps: float, max_count: int) -> bool:
    """Whether some Gauss rule holds more than max_count nodes above eps.

    The nodes of a rule are Ritz values of F on a Krylov space, so by interlacing
    that many nodes above eps prove d_ε > max_count, at no product.
    """
    above = xp.sum(xp.astype(quad.nodes > eps, index_dtype(xp, quad.nodes)), axis=1)
    return bool(to_host(xp.max(above)) > max_count)


# --------------------------------------------------------------------------- #
# razor


def razor(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    prior_variance: float,
    labels: Array | Sequence[Array],
    theta: Array,
    theta0: Array | None = None,
    method: str = "auto",
    num_probes: int = DEFAULT_NUM_PROBES,
    num_matvecs: int = DEFAULT_SLQ_MATVECS,
    max_params: int = DEFAULT_MAX_PARAMS,
    quadrature: SpectralDensity | Quadrature | None = None,
    rng: RngLike = None,
    process_group: ProcessGroup = None,
) -> Razor:
    r"""The Gaussian-prior razor complexity of a model at :math:`\hat\theta` (THEORY §5).

    With the prior :math:`\theta \sim \mathcal N(\theta_0, \sigma^2 I)` and
    :math:`F_\mathrm{sum} = \sum_x J_x^\top I(z_x)\, J_x` at :math:`\hat\theta`,

    .. math::

       -\log p(X) \approx -\log p(X \mid \hat\theta)
       + \frac{\lVert \hat\theta - \theta_0 \rVert^2}{2\sigma^2}
       + \frac12 \sum_{i=1}^D \log(1 + \sigma^2 \lambda_i(F_\mathrm{sum})),

    the Laplace approximation of the log marginal likelihood with the Fisher (the
    Gauss–Newton matrix) in place of the Hessian: exact for a linear-Gaussian
    model (:math:`z = J \theta`, Gaussian outputs of known variance) at the posterior
    mode :math:`\hat\theta`. Null directions of :math:`F` cost nothing; a direction with
    :math:`\sigma^2 \lambda \gg 1` costs about :math:`\frac12 \log(\sigma^2 \lambda)`,
    about :math:`\frac12 \log N`, so the effective dimension is about
    :math:`\#\{\lambda_i \gtrsim 1/\sigma^2\}` (``local_dimension(eps=1/σ²)``). The
    BIC/MDL term :math:`\frac{D}{2} \log N` is reported beside it: the special case where
    every direction is significant.

    Parameters
    ----------
    source
        A linearization or a re-iterable collection of them, at :math:`\hat\theta`.
    family
        The output family; the likelihood :math:`p(y \mid z)` is its own: categorical
        (softmax), Bernoulli (:math:`C` independent sigmoids), Gaussian (its variance
        :math:`\sigma_y^2`, normalising constant :math:`\frac{C}{2} \log 2\pi\sigma_y^2`
        per input included).
    prior_variance
        :math:`\sigma^2 > 0`, the variance of the isotropic Gaussian prior.
    labels
        The observed :math:`y`: one array per batch (a list in the order of ``source``)
        or a single array for all inputs in that order. Categorical: integers in
        :math:`[0, C)`, shape (N, ∗S). Bernoulli: values in :math:`[0, 1]`, shape
        (N, ∗S, C). Gaussian: real targets, shape (N, ∗S, C). Same namespace and device
        as the logits. With position axes :math:`S` the log-likelihood sums over the
        counted positions; labels at positions masked by the linearization's ``mask``
        are never read, and the BIC term uses :math:`n` = the number of counted
        positions.
    theta
        :math:`\hat\theta`, the flat parameter vector (D,) at which ``source`` was
        linearized, in
        the blocks' order (e.g. ``model.parameters()`` of the NumPy models).
    theta0
        :math:`\theta_0`, the prior mean (D,); zeros when None.
    method
        How :math:`\log\det(I + \sigma^2 F)` is computed: ``"dense"`` (``fisher_dense``
        and ``eigvalsh``, :math:`D \le` ``max_params``), ``"lanczos"`` (a full run of
        :math:`D` Lanczos steps: the exact spectrum, matrix-free), ``"slq"`` (stochastic
        Lanczos quadrature of :math:`\log(1 + \sigma^2 \lambda)`, with a standard error) or
        ``"auto"``: ``"lanczos"`` when :math:`D \le \min(` ``num_probes`` :math:`\cdot`
        ``num_matvecs``, ``max_params`` :math:`)` (it costs no more matvecs than SLQ),
        else ``"slq"``. ``Razor.method`` says which ran.
    num_probes, num_matvecs
        SLQ probes :math:`M` and Lanczos steps per probe :math:`m`.
    max_params
        The largest :math:`D` for the exact methods ``"dense"`` and ``"lanczos"``, which
        hold :math:`D \times D` numbers (a :math:`D \times D` matrix, or a Lanczos basis of
        :math:`D` vectors).
    quadrature
        Gauss rules already computed on :math:`F_\mathrm{sum}` (a ``SpectralDensity`` or a
        ``Quadrature`` of ``spectral_density`` / ``lanczos_quadrature`` with the same
        source and family, ``kernel="exact"``, ``reduction="sum"``): when the method
        is ``"slq"`` the log-det is read off them, with no product (``num_probes``
        and ``num_matvecs`` are then theirs).
    rng
        Generator, int seed, JAX key or None.

    Returns
    -------
    Razor
        ``value``, ``std_error``, ``neg_log_likelihood``, ``prior_penalty``,
        ``log_det`` (an Estimate), ``bic_penalty``, ``method``; arrays 0-d in the
        logits' namespace, device and dtype.

    Notes
    -----
    Cost: one pass over the logits for the likelihood; then "dense": :math:`C`
    per-example VJPs per input and :math:`O(D^3)`; "lanczos": :math:`D` matvecs,
    :math:`O(D^3)` work, :math:`D^2` memory; "slq": :math:`M m` matvecs,
    :math:`O(D M m^2)` work, :math:`D M m` memory (none with ``quadrature``).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> from fisherbound.families import Categorical
    >>> model = LinearSoftmax.random(2, 3, rng=0)
    >>> x = np.random.default_rng(1).standard_normal((8, 2))
    >>> y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    >>> out = razor(linearize(model, x), Categorical(), prior_variance=1.0,
    ...             labels=y, theta=model.parameters())
    >>> out.method, bool(out.value > out.neg_log_likelihood)
    ('lanczos', True)
    """
    s2 = check_positive_real(prior_variance, "prior_variance")
    check_choice(method, "method", LOGDET_METHODS)
    M = check_positive_int(num_probes, "num_probes")
    m = check_positive_int(num_matvecs, "num_matvecs")
    check_positive_int(max_params, "max_params")
    op = _operator(source, family, "exact", "sum", process_group)
    coll = collective(process_group)
    fam = check_family(family)
    xp = _namespace(op)
    d = int(op.shape[0])
    lins = list(as_linearizations(source))
    theta_hat = check_parameter_vector(xp, op, theta, "theta")
    prior_mean = None if theta0 is None else check_parameter_vector(xp, op, theta0, "theta0")
    batches = split_labels(fam, lins, labels)
    rules = None if quadrature is None else _check_rules(xp, op, quadrature)
    if rules is not None:
        M, m = (int(s) for s in rules.nodes.shape)
    if method == "auto":
        method = "lanczos" if d <= min(M * m, max_params) else "slq"
    if method in ("dense", "lanczos") and d > max_params:
        msg = (
            f"razor with method={method!r} refuses D = {d} parameters above max_params = "
            f"{max_params} (the exact methods hold D × D numbers); raise max_params if you "
            "have the memory, or use method='slq'."
        )
        raise ValueError(msg)
    gen = _shared_generator(
        rng,
        process_group,
        "razor",
        s2=s2,
        method=method,
        M=M,
        m=m,
        max_params=max_params,
        quadrature=rules is not None,
    )
    how = LogDetSettings(s2, method, M, m, max_params, gen, process_group, rules)
    return razor_terms(xp, op, fam, lins, batches, theta_hat, prior_mean, how, coll)
