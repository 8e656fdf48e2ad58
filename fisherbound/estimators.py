r"""Unbiased random estimates of the Fisher metric with honest error bars (THEORY §3).

The **detach-and-mix** estimator backpropagates, for every probe :math:`m`, ONE scalar
through the whole batch,

.. math::

   h_m(\theta) = \sum_x c_{xm}^\top z_x(\theta), \qquad
   c_{xm} = B(\tilde z_x)\, \xi_{xm} \quad \text{(detached)},

with :math:`B B^\top = K` the core factor of the output family
(``family.sqrt_metric_matvec``: for the categorical family column :math:`y` of :math:`B` is
:math:`\sqrt{p_y}\, (e_y - p)`, the weight is :math:`\sqrt{\tilde p}`, not :math:`\tilde p`)
and :math:`\xi_{xm}` i.i.d. Rademacher (or Gaussian) probes. Its gradient

.. math::

   g_m = \partial h_m / \partial \theta = \sum_x J_x^\top B_x \xi_{xm}

satisfies :math:`\mathbb{E}[g_m g_m^\top] = F = \sum_x J_x^\top K(z_x)\, J_x`, because the
probes of different inputs are independent: no per-example gradients are needed. From the
M vectors :math:`g_m` (one ``vjp_batch`` call per batch; for the diagonal the adapter's
``vjp_batch_square_moments`` where it has one): the diagonal :math:`g \odot g`, the blocks
:math:`g_b g_b^\top`, the trace :math:`\|g\|^2` and the low-rank factor
:math:`[g_1 \dots g_M]` of :math:`F`. The kernel selects the quantity: ``"exact"``
:math:`F`, ``"upper"`` the DG bound :math:`F_\mathrm{DG}`
(:math:`h_\mathrm{DG} = \sum \xi \sqrt{\tilde p}\, z`), ``"lower"`` the LR bound
:math:`F_\mathrm{LR}` (one sign per input), and ``Bernoulli()`` gives the multi-label
estimator.

Variance (Rademacher, one probe):
:math:`\operatorname{Var}(g_i^2) = 2(F_{ii}^2 - \sum_k b_{ik}^4) \le 2 F_{ii}^2`, so the
coefficient of variation of every diagonal entry is at most :math:`\sqrt{2}`, and at most
:math:`\sqrt{2/M}` for the mean of M probes;
:math:`\operatorname{Var}(\|g\|^2) \le 2 \|F\|_F^2`. Gaussian probes have
:math:`\operatorname{Var}(g_i^2) = 2 F_{ii}^2` exactly (Rademacher is never worse). The
closed forms are in ``fisherbound.variance``.

``per_example=True`` keeps the same probes but sums the squares per input,
:math:`\sum_x (J_x^\top B_x \xi_{xm})^2`, through the adapter's
``sum_squared_per_example_vjp``: also unbiased, and much less variable (the cross-input
terms, which cancel only on average, are gone), at the price of per-example squares.

For comparison, ``monte_carlo`` (labels sampled from the model, per-example
scores) and ``empirical`` (observed labels, biased) return estimates of the same
shapes.

Position axes. With logits (N, ∗S, C) (tokens, pixels) the probes :math:`\xi` have the
logits' shape but R on the last axis, one independent probe per position, and
:math:`h_m = \sum_x \sum_t (B(\tilde z_{xt})\, \xi_{xtm})^\top z_{xt}`: still ONE backward
pass per probe (one per-example backward pass per probe and example with
``per_example=True``), whatever P and C, and
:math:`\mathbb{E}[g_m g_m^\top] = \sum_x \sum_t J_{xt}^\top K(z_{xt})\, J_{xt}`. The
Monte-Carlo labels are sampled per position; the empirical Fisher takes labels
(N, ∗S) or (N, ∗S, C) and skips ``ignore_index``. Positions masked by
``lin.mask`` get zero probes and scores. ``reduction="mean"`` divides by N, the
number of examples.

Error bars. Each batch is a stratum: its M per-probe samples give a mean and a
sample variance; the estimate of the data set is the sum over batches of the
batch means and its variance the sum of the batches' variances of the mean
(probes of different batches are independent). This is what ``Accumulator``
stores; it merges across batches, calls and processes by addition. The standard
error is the Monte-Carlo error of the probes, conditional on the inputs: it does
not include the sampling of the inputs from a population. Its degrees of freedom
(:math:`M - 1` for one batch, Welch–Satterthwaite over batches) set the width of the
confidence interval ``Estimate.interval``, Student t on the cube-root scale for
the diagonal and the trace (sums of squares, right-skewed); docs/estimators.md
has its measured coverage.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from fisherbound._accumulator import Accumulator, ProbeMoments, SampleSum, moments_of_samples
from fisherbound._finite import is_host_device
from fisherbound._lib import (
    DISTRIBUTIONS,
    REDUCTIONS,
    Collective,
    Estimate,
    ProcessGroup,
    RngLike,
    Source,
    array_namespace,
    as_generator,
    check_bool,
    check_choice,
    check_optional_int,
    check_positive_int,
    check_target,
    collective,
    is_traced,
    probes,
    to_host,
)
from fisherbound._quantities import Quantity, quantity
from fisherbound._stream import (
    LabelSource,
    Stream,
    check_counted,
    check_family,
    conform_labels,
    ignored_labels,
)
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.linearization import Linearization, check_loss_labels

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "detach_and_mix",
    "monte_carlo",
    "empirical",
    "Accumulator",
]

WHATS = ("diagonal", "trace", "blocks", "full")

#: Default limit on the size of one parameter block for ``what="blocks"``.
DEFAULT_MAX_BLOCK_SIZE = 4096

#: With a single linearization and ``target_relative_error``, at most this many
#: rounds of ``num_probes`` probes are drawn unless ``max_batches`` says otherwise.
DEFAULT_MAX_ROUNDS = 64

#: ``target_relative_error`` stops only once the trace estimate's variance has at
#: least this many degrees of freedom: a standard error from fewer is too erratic
#: to stop on (its own relative error is about 1/√(2 dof); two probes that happen
#: to agree would stop the loop at once).
MIN_TARGET_DOF = 10

# ``DISTRIBUTIONS`` and ``REDUCTIONS`` live in ``fisherbound._lib`` (imported above,
# re-exported here for code that read them from this module).


# --------------------------------------------------------------------------- #
# the shared options and the loop


class _Common(NamedTuple):
    """The validated options every estimator shares."""

    family: Family
    qty: Quantity
    reduction: str
    limit: int | None
    progress: bool | None
    coll: Collective | None
    blocks: tuple[str, ...] | None


def _check_options(
    family: Any,
    what: str,
    reduction: str,
    max_batches: int | None,
    blocks: Sequence[str] | None,
    max_block_size: int,
    max_vectors: int | None,
    progress: bool | None,
    process_group: ProcessGroup,
    weights: Array | None = None,
) -> _Common:
    """Validate the options every estimator shares (once, for all three)."""
    fam = check_family(family)
    check_choice(what, "what", WHATS)
    check_choice(reduction, "reduction", REDUCTIONS)
    limit = check_optional_int(max_batches, "max_batches")
    size = check_positive_int(max_block_size, "max_block_size")
    check_optional_int(max_vectors, "max_vectors")
    qty = quantity(what, blocks=blocks, max_size=size, owner="what='blocks'", weights=weights)
    names = None if blocks is None else tuple(blocks)
    return _Common(fam, qty, reduction, limit, progress, collective(process_group), names)


def _check_sampling(
    common: _Common, num: object, name: str, per: str, rng: RngLike, target_relative_error: Any
) -> tuple[int, Any, float | None]:
    """The ``num`` draws per batch, the generator and the target of a sampled estimator.

    With a collective, every rank gets its own stream of draws (independent probes).
    """
    n = check_positive_int(num, name)
    gen = as_generator(rng)
    target = check_target(target_relative_error)
    if target is not None and n < 2:
        msg = (
            f"target_relative_error needs {name} >= 2 (a standard error needs two "
            f"{per}); got {name} = {n}."
        )
        raise ValueError(msg)
    _check_distributed_target(common.coll, target, common.qty.what)
    if common.coll is not None:
        gen = common.coll.generator(gen)  # independent draws on every rank
    return n, gen, target


def _run(
    source: Source,
    common: _Common,
    draw: Any,
    *,
    target: float | None,
    desc: str,
    squares: bool,
    skew: bool = True,
    **options: Any,
) -> Estimate:
    """Stream the batches (or, with ``rounds``, redraw on one batch) and accumulate.

    ``draw(lin)`` returns the per-probe samples of a batch (``squares``: per-example
    squares, whose factor stacks rows); ``options`` are the estimator's own, which
    the ranks compare with the shared ones. ``skew=False``: the samples, though
    ≥ 0, are not gamma-like (Monte Carlo), and the intervals are plain Student t.
    With a collective, the
    ranks' states are all-reduced at the end; with a target as well, the ranks step
    in lockstep and stop together once the all-reduced trace estimate reaches it
    (or when every rank has run out of batches).
    """
    family, qty, reduction, limit, progress, coll, blocks = common
    opts = {"what": qty.what} | options | {"blocks": blocks}
    if coll is not None:  # the quantity's own options (a weighted trace's weights)
        opts |= qty.agreement()
    rounds = isinstance(source, Linearization) and target is not None
    stream = Stream(
        source,
        family,
        desc=desc,
        progress=False if rounds else progress,
        coll=coll,
        limit=None if rounds else limit,
    )
    settings: dict[str, Any] = {
        "what": qty.what,
        "reduction": reduction,
        "target_relative_error": target,
    }
    settings |= {"max_batches": limit, "rounds of probes on one batch": rounds}
    # Before any data-dependent collective: every rank runs the same call.
    stream.agree_options(**(settings | opts))
    state = qty.running(per_example=squares)
    if isinstance(state, SampleSum):
        state.track_trace = target is not None  # only a target reads the trace summary
        if not skew:
            state.gamma_like(False)
    count = 0
    reached = False
    if rounds:
        (lin,) = list(stream)
        max_rounds = DEFAULT_MAX_ROUNDS if limit is None else limit
        steps: Iterator[Any] = (lin for _ in range(max_rounds))
        why = f"max_batches = {max_rounds} rounds of probes"
    else:
        steps = iter(stream)
        why = ""
    try:
        while True:
            lin = next(steps, None)
            if lin is not None:
                if count == 0:
                    qty.select(lin)
                state.add(draw(lin), lin.num_inputs, lin.xp, same_inputs=rounds)
                count += 1
            if target is None:
                if lin is None:
                    break
                continue
            if coll is None:
                if lin is None:
                    break
                error, dof = state.trace_error(lin.xp)
                if _target_reached(error, dof, target):
                    reached = True
                    break
                continue
            # Lockstep: the trace estimate over all ranks, and whether any rank went on.
            terms = state.global_trace_terms(lin is not None)
            value, variance, welch, active = coll.sum_floats(terms)
            error, dof = _error_and_dof(value, variance, welch)
            if _target_reached(error, dof, target):
                reached = True
                break
            if active == 0.0:
                break
    finally:  # a loop left early (a target, an error) closes the stream's bar
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    if not rounds:
        why = "the data ran out" if limit is None or count < limit else f"max_batches = {limit}"
    stream.finish(**opts)
    if coll is not None:
        state.all_reduce(coll)
    xp = stream.first.xp
    if target is not None and not reached:
        error, dof = state.trace_error(xp) if coll is None else state.reduced_trace_error
        _warn_unreached(target, error, dof, count, why)
    return state.estimate(stream.scale(reduction), xp)


def _error_and_dof(value: float, variance: float, welch: float) -> tuple[float, float]:
    """SE / |value| and the Welch–Satterthwaite dof of the all-reduced trace terms."""
    if not variance >= 0.0:
        return math.nan, math.nan
    error = math.inf if value == 0.0 else math.sqrt(variance) / abs(value)
    dof = math.inf if welch == 0.0 else variance * variance / welch
    return error, dof


def _target_reached(error: float, dof: float, target: float) -> bool:
    """The stopping rule of ``target_relative_error``, for the trace estimate.

    True when the variance estimate has at least ``MIN_TARGET_DOF`` (10) degrees
    of freedom d and the relative standard error, scaled by the Student-t quantile
    t_d(0.975)/1.96, is at most the target: the symmetric Student-t interval would
    then lie within value · (1 ± 1.96 · target). The trace's ``Estimate.interval`` is
    skew-adjusted (a sum of squares): longer above, shorter below, e.g. value ·
    [0.83, 1.23] for target 0.1 at d = 10.
    """
    if not dof >= MIN_TARGET_DOF or not error >= 0.0:
        return False
    from scipy.special import stdtrit

    return error * float(stdtrit(dof, 0.975)) / _Z975 <= target


#: The normal quantile z(0.975) = t_∞(0.975).
_Z975 = 1.959963984540054


# --------------------------------------------------------------------------- #
# the samples of one batch


def _cotangents(
    family: Family, z: Array, xi: Array, kernel: str, xp: Any, *, overwrite: bool = False
) -> Array:
    """U[m, x, t] = B(z_xt) ξ[m, x, t], shape (M, N, ∗S, C), for probes ξ (M, N, ∗S, R).

    ``overwrite``: ξ are the caller's own, used no more; U may be written into them.
    ξ may be int8 ±1 signs (one Rademacher probe, ``probes(..., signs=True)``).
    """
    if kernel == "lower":
        # One column: compute the top eigenpair once per position, not once per probe.
        b = family.sqrt_metric(z, kernel="lower")[..., 0]  # (N, *S, C)
        return b[None, ...] * (xp.astype(xi, z.dtype) if xp.isdtype(xi.dtype, "integral") else xi)
    # z (N, ∗S, C) broadcasts against ξ: the factor's softmax is taken once, not per
    # probe. z was checked finite by the adapter, ξ are the estimator's own probes.
    return family.unchecked_sqrt_metric_matvec(z, xi, kernel=kernel, xp=xp, overwrite=overwrite)


def _host_mask(lin: Any) -> Any:
    """The linearization's mask (N, ∗S) on the host, or None (none, traced, or on a GPU).

    Probe rows of masked positions are drawn as zeros, so the cotangents are zero
    there already and the adapter need not mask them on the CPU (one pass less
    over arrays of the logits' size); the products ignore those rows either way.
    On an accelerator the masking pass is cheap and a device-to-host copy is not.
    """
    mask = getattr(lin, "mask", None)
    if mask is None or is_traced(mask) or not is_host_device(mask):
        return None
    return to_host(mask).astype(bool, copy=False)


def _probe_samples(
    lin: Any,
    family: Family,
    xi: Array,
    qty: Quantity,
    *,
    kernel: str,
    per_example: bool,
    max_vectors: int | None,
    overwrite: bool = False,
) -> Any:
    """The M per-probe detach-and-mix samples of one batch for probes ξ (M, N, ∗S, R).

    One cotangent of the logits' shape per probe: M backward passes (batch level)
    or M per-example backward passes per example (``per_example``), whatever the
    number of positions P and classes C. ``overwrite``: ξ may be overwritten.
    """
    xp = lin.xp
    u = _cotangents(family, lin.logits, xi, kernel, xp, overwrite=overwrite)
    if per_example:
        return qty.from_squares(lin, u, max_vectors)
    m = int(u.shape[0])
    if m == 1:  # one probe: a plain VJP (no batching overhead)
        g = lin.vjp(u[0, ...])[None, ...]
    elif max_vectors is None or m <= max_vectors:
        g = lin.vjp_batch(u)  # the M probes in ONE batched backward pass
    else:  # bounded memory: batched VJPs of at most max_vectors probes
        g = xp.concat(
            [lin.vjp_batch(u[s : min(m, s + max_vectors), ...]) for s in range(0, m, max_vectors)],
            axis=0,
        )
    return qty.from_gradients(g, xp)


def _probe_stratum(
    lin: Any,
    family: Family,
    xi: Array,
    qty: Quantity,
    *,
    kernel: str,
    per_example: bool,
    max_vectors: int | None,
    traces: bool,
) -> Any:
    """What one batch adds to the running sum: its samples, or for the diagonal their moments.

    The diagonal's (M, D) samples are reduced at once to ``ProbeMoments`` (mean
    and variance over the probes, the per-probe traces only if ``traces``): by
    the adapter without forming them (``vjp_batch_square_moments``, batch level)
    or by ``moments_of_samples`` (three passes instead of the accumulator's six).
    ξ are the caller's fresh probes: the cotangents are written into them.
    """
    m = int(xi.shape[0])
    diagonal = qty.what == "diagonal"
    moments = getattr(lin, "vjp_batch_square_moments", None)
    if diagonal and not per_example and moments is not None:
        u = _cotangents(family, lin.logits, xi, kernel, lin.xp, overwrite=True)
        step = m if max_vectors is None else max(1, min(m, max_vectors))
        parts = [moments(u[s : min(m, s + step), ...], traces=traces) for s in range(0, m, step)]
        return _pooled_moments(parts, [min(m, s + step) - s for s in range(0, m, step)], lin.xp)
    samples = _probe_samples(
        lin, family, xi, qty, kernel=kernel, per_example=per_example, max_vectors=max_vectors,
        overwrite=True,
    )  # fmt: skip
    return moments_of_samples(samples, lin.xp, traces=traces) if diagonal else samples


def _pooled_moments(parts: list[Any], sizes: list[int], xp: Any) -> ProbeMoments:
    """One ``ProbeMoments`` from the (mean, variance, traces) of chunks of the probes.

    Through the power sums: S₁ = Σ_c M_c mean_c, S₂ = Σ_c ((M_c − 1) var_c + M_c mean_c²),
    then mean S₁ / M and variance (S₂ − S₁² / M) / (M − 1), clamped at 0.
    """
    if len(parts) == 1:
        mean, variance, per_probe = parts[0]
        return ProbeMoments(mean, variance, sizes[0], per_probe)
    m = sum(sizes)
    s1: Any = None
    s2: Any = None
    for (mean, variance, _), mc in zip(parts, sizes, strict=True):
        t1 = mean * mc
        t2 = t1 * mean if variance is None else t1 * mean + variance * (mc - 1)
        s1 = t1 if s1 is None else s1 + t1
        s2 = t2 if s2 is None else s2 + t2
    mean = s1 / m
    variance = xp.clip((s2 - s1 * mean) / (m - 1), min=0.0)
    traces = [p[2] for p in parts]
    per_probe = None if traces[0] is None else xp.concat(traces, axis=0)
    return ProbeMoments(mean, variance, m, per_probe)


def _check_distributed_target(coll: Collective | None, target: float | None, what: str) -> None:
    if coll is None or target is None:
        return
    if coll.spmd:
        msg = (
            "target_relative_error needs host-side decisions after every batch, which traced "
            f"JAX code (process_group = {coll.description}) cannot make; pass max_batches "
            "instead, or run the loop eagerly."
        )
        raise ValueError(msg)
    if what == "full":
        msg = (
            "target_relative_error with a process_group supports what='diagonal', 'trace' "
            "and 'blocks'; for what='full' size the run with what='trace' first."
        )
        raise ValueError(msg)


def _warn_unreached(target: float, reached: float, dof: float, batches: int, why: str) -> None:
    msg = (
        f"target_relative_error = {target:g} was not reached: the relative standard error "
        f"of the trace estimate is {reached:.3g}, with {dof:.3g} degrees of freedom, after "
        f"{batches} batches ({why}); the loop stops once there are at least "
        f"{MIN_TARGET_DOF} degrees of freedom and the error times t_dof(0.975)/1.96 is at "
        "most the target. The estimate covers those batches; stream more data, raise "
        "max_batches or num_probes."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- #
# Public functions


def detach_and_mix(
    source: Source,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    what: str = "diagonal",
    weights: Array | None = None,
    num_probes: int = 1,
    rng: RngLike = None,
    kernel: str = "exact",
    distribution: str = "rademacher",
    per_example: bool = False,
    reduction: str = "sum",
    target_relative_error: float | None = None,
    max_batches: int | None = None,
    blocks: Sequence[str] | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Estimate:
    r"""The unbiased single-backward-pass ("detach-and-mix") estimate of the Fisher metric.

    For every probe :math:`m` and batch, one scalar
    :math:`h_m = \sum_x (B(\tilde z_x)\, \xi_{xm})^\top z_x` is backpropagated (the M
    cotangents of a batch in ONE ``vjp_batch`` call), giving
    :math:`g_m = \sum_x J_x^\top B_x \xi_{xm}` with
    :math:`\mathbb{E}[g_m g_m^\top] = F_K = \sum_x J_x^\top K(z_x)\, J_x` (THEORY §3). The
    probes :math:`\xi` are Rademacher (default) or standard Gaussian,
    drawn on the host, so one seed gives the same numbers on every backend.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family
        The output family (``Categorical()``, ``Bernoulli()`` for multi-label,
        ``Gaussian()``).
    what
        ``"diagonal"`` (D,), ``"trace"`` (0-d), ``"blocks"`` (dict name :math:`\to` (s, s)),
        or ``"full"``: the low-rank factor :math:`V` (M, D) with :math:`\hat F = V^\top V`
        (see Returns).
    weights
        For ``what="trace"``: :math:`w` (D,) :math:`\ge 0`, a flat vector in the
        linearization's namespace, device and dtype (``lin.ravel`` of a dict), for the
        weighted trace :math:`\sum_i w_i F_{ii}`, e.g. an EWC penalty
        :math:`\frac{\lambda}{2} \sum_i F_{ii} (\theta_i - \theta^*_i)^2`. Each probe gives
        :math:`\sum_i w_i g_i^2`, so the standard error is the weighted sum's own (the
        entries of one probe are correlated: :math:`\sqrt{\sum_i w_i^2 \mathrm{SE}_i^2}` from
        the diagonal's errors would be wrong). None (default): the plain trace.
    num_probes
        M, the number of probes per batch (>= 1; >= 2 for a standard error).
    rng
        numpy Generator, int seed, JAX key or None.
    kernel
        ``"exact"`` (:math:`F`), ``"upper"`` (the DG bound,
        :math:`h = \sum \xi \sqrt{\tilde p}\, z`), ``"lower"`` (the LR bound: one sign per
        input), or the scalar envelopes.
    distribution
        ``"rademacher"`` (never worse) or ``"gaussian"``.
    per_example
        Sum the squares per input, :math:`\sum_x (J_x^\top B_x \xi_{xm})^2`, through the
        adapter's ``sum_squared_per_example_vjp`` (``what`` "diagonal", "trace" or
        "blocks"): each input's term has CV :math:`\le \sqrt{2}` and the sum over inputs
        averages them; the batch-level default squares the sum over inputs.
    reduction
        ``"sum"`` over inputs (default) or ``"mean"``: divided by N, the number
        of examples (not of positions).
    target_relative_error
        Stop streaming batches once the relative standard error of the TRACE
        estimate, :math:`\mathrm{SE}(\operatorname{tr} \hat F) / \operatorname{tr} \hat F`, can
        be trusted to be at or below this (checked after every batch; needs
        ``num_probes >= 2``): its variance estimate has at least ``MIN_TARGET_DOF`` = 10
        degrees of freedom :math:`d` (11 probes in one batch, or in the rounds on one
        linearization; over batches the Welch–Satterthwaite dof of ``Accumulator``, at
        most :math:`\sum_b (M - 1)`, so at least 10 batches of 2 probes) and
        :math:`(\mathrm{SE} / \operatorname{tr} \hat F) \cdot t_d(0.975) / 1.96 \le
        \mathrm{target}`: the symmetric t interval would lie within
        :math:`\operatorname{tr} \hat F \cdot (1 \pm 1.96 \cdot \mathrm{target})`; the
        skew-adjusted
        ``interval()`` is longer above and shorter below. Two probes that happen
        to agree no longer stop the loop. The estimate then covers the batches consumed:
        use ``reduction="mean"`` to estimate the data set's mean Fisher from a
        prefix. With a single linearization, rounds of ``num_probes`` new probes
        are drawn on it instead (at most ``max_batches`` rounds, default 64). If
        the data or ``max_batches`` run out first, a ``UserWarning`` names the
        error reached.
    max_batches
        Consume at most this many batches (rounds, for a single linearization).
    blocks, max_block_size
        For ``what="blocks"``: the block names (default all) and the largest block
        allowed (a ValueError above it).
    max_vectors
        Memory bound: batch level, at most this many probes per batched VJP
        (default: all M in one call, the fastest); ``per_example=True``, the
        adapter's bound on live D-vectors.
    progress
        Progress bar: None (on a terminal, after 2 s), True or False.

    Returns
    -------
    Estimate
        ``value`` the mean over probes of the per-probe estimates (sum over
        batches), ``std_error`` its standard error (same shape; from the probes'
        sample variance within each batch, see ``Accumulator``; NaN with one
        probe, as a read-only broadcast of one NaN), ``num_probes`` M, ``dof``
        the degrees of freedom of the variance estimate (:math:`M - 1` for one batch; the
        Welch–Satterthwaite dof per entry over batches) and ``floor`` 0 for the
        diagonal and the trace (sums of squares): ``est.interval(0.95)`` is their
        95% confidence interval (Student t on the cube-root scale, see
        ``fisherbound.Estimate.interval``). For
        ``what="full"``: ``value`` is the factor
        :math:`V = [g_1; \dots; g_M] / \sqrt{M}` (M, D) (scaled by :math:`1/\sqrt{N}` for
        ``reduction="mean"``), whose Gram matrix
        :math:`V^\top V = \frac{1}{M} \sum_m g_m g_m^\top` is the rank-:math:`{\le} M`
        estimate of :math:`F`, with :math:`g_m` summed over batches; ``std_error`` (D,) is
        the standard error of the diagonal of :math:`V^\top V`. The a-priori bound on the
        standard error is ``fisherbound.variance.std_error_bound(value, num_probes=M)``
        (CV :math:`\le \sqrt{2/M}` for the diagonal and the trace).

    Notes
    -----
    Cost per batch: the linearization's forward pass and ONE batched VJP of M
    cotangents (about M backward passes; never per-example gradients), plus
    :math:`O(M N P C)` for the cotangents (P positions per example), whatever P and C.
    For the diagonal, the squares' mean and variance over the probes take four
    passes over the M D-vectors (the torch adapter's ``vjp_batch_square_moments``
    reduces them without an (M, D) copy; one probe is squared during its
    backward pass), so one probe costs one forward and one backward pass plus
    one D-vector written: about one gradient step (docs/estimators.md has the
    measured ratios). ``per_example=True`` costs the adapter's per-example
    squares with M cotangents (the torch fast path for Linear / Conv / norm
    layers: one batched backward pass). Memory: M D-vectors per batch
    (blocks: :math:`M s^2` per block) and the M cotangents, each of the logits' size
    (one Rademacher probe of the categorical factor on torch's CPU: that array
    and temporaries of 2 MiB in float32, the signs kept as int8).

    Variance (Rademacher, one probe, one batch):
    :math:`\operatorname{Var}(g_i^2) = 2(F_{ii}^2 - \sum_k b_{ik}^4) \le 2 F_{ii}^2`
    (``fisherbound.variance.detach_and_mix_variance`` gives it exactly).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> from fisherbound.estimators import detach_and_mix
    >>> model = MLP.random([4, 8, 3], rng=0)
    >>> lin = linearize(model, np.random.default_rng(1).standard_normal((32, 4)))
    >>> est = detach_and_mix(lin, num_probes=16, rng=0)
    >>> est.value.shape, est.std_error.shape, est.num_probes
    ((67,), (67,), 16)
    >>> float(detach_and_mix(lin, what="trace", num_probes=4, rng=0).value) > 0
    True
    """
    common = _check_options(
        family, what, reduction, max_batches, blocks, max_block_size, max_vectors, progress,
        process_group, weights,
    )  # fmt: skip
    fam, qty = common.family, common.qty
    check_choice(kernel, "kernel", KERNELS)
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    per_example = check_bool(per_example, "per_example")
    if per_example and what == "full":
        msg = (
            "per_example=True supports what='diagonal', 'trace' and 'blocks'; got "
            "what='full' (a per-example factor would have N·M rows). Use per_example=False."
        )
        raise ValueError(msg)
    m, gen, target = _check_sampling(
        common, num_probes, "num_probes", "probes per batch or round", rng, target_relative_error
    )

    def draw(lin: Any) -> Any:
        shape = tuple(int(s) for s in lin.logits.shape)
        r = fam.sqrt_rank(shape[-1], kernel=kernel)
        xi = probes(
            gen,
            (m, *shape[:-1], r),
            distribution=distribution,
            xp=lin.xp,
            dtype=lin.logits.dtype,
            device=lin.device,
            keep=_host_mask(lin),
            signs=m == 1 and distribution == "rademacher",  # one probe: a kernel may take signs
        )
        return _probe_stratum(
            lin, fam, xi, qty, kernel=kernel, per_example=per_example, max_vectors=max_vectors,
            traces=target is not None,
        )  # fmt: skip

    return _run(
        source, common, draw, target=target, desc="detach-and-mix", squares=per_example,
        num_probes=m, kernel=kernel, distribution=distribution, per_example=per_example,
    )  # fmt: skip


def monte_carlo(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    weights: Array | None = None,
    num_samples: int = 1,
    rng: RngLike = None,
    reduction: str = "sum",
    target_relative_error: float | None = None,
    max_batches: int | None = None,
    blocks: Sequence[str] | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Estimate:
    r"""The Monte-Carlo Fisher: k labels sampled from the model per input, per-example scores.

    For draw :math:`j`, :math:`y_{xj} \sim p(\cdot \mid z_x)` and
    :math:`s_{xj} = J_x^\top \nabla_z \log p(y_{xj} \mid z_x)` (the score cotangent
    ``family.score``; with position axes a label per position,
    :math:`s_{xj} = \sum_t J_{xt}^\top \nabla_z \log p(y_{xtj} \mid z_{xt})` over the counted
    positions); the sample is :math:`\sum_x s_{xj} s_{xj}^\top` (diagonal: the per-example
    squares :math:`\sum_x s_{xj} \odot s_{xj}`, through the adapter's
    ``sum_squared_per_example_vjp``). Unbiased for :math:`F`; its CV is unbounded: in core
    coordinates :math:`\operatorname{Var} = p_i (1 - p_i) (1 - 2 p_i)^2`, large for
    confident models (THEORY §3). ``fisherbound.variance.classical_variance``
    gives the exact variance (:math:`\hat I_1` of THEORY §4).

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    num_samples
        :math:`k \ge 1` label draws per input, in place of probes (the standard error is
        over the k draws; NaN for :math:`k = 1`).
    family, what, weights, rng, reduction, target_relative_error
        As in ``detach_and_mix``. ``what="full"`` returns the factor of all
        per-example scores (:math:`\sum_b N_b k` rows, divided by :math:`\sqrt{k}`;
        :math:`\hat F = V^\top V`) with the
        standard error of its diagonal; ``reduction="mean"`` divides by N, the
        number of examples.
    max_batches, blocks, max_block_size, max_vectors, progress, process_group
        As in ``detach_and_mix``.

    Notes
    -----
    Cost per batch: the adapter's per-example squares with k cotangents (per-example
    gradients on its generic path), whatever the number of positions.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> from fisherbound.estimators import monte_carlo
    >>> lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((16, 4)))
    >>> monte_carlo(lin, num_samples=8, rng=0).value.shape
    (67,)
    """
    common = _check_options(
        family, what, reduction, max_batches, blocks, max_block_size, max_vectors, progress,
        process_group, weights,
    )  # fmt: skip
    fam, qty = common.family, common.qty
    k, gen, target = _check_sampling(
        common, num_samples, "num_samples", "draws per batch", rng, target_relative_error
    )

    def draw(lin: Any) -> Any:
        z = lin.logits
        y = fam.sample(z, rng=gen, num_samples=k)  # (k, N, *S) or (k, N, *S, C)
        zb = lin.xp.broadcast_to(z[None, ...], (k, *tuple(z.shape)))
        scores = fam.unchecked_score(zb, y, xp=lin.xp)  # (k, N, *S, C); masked rows: ignored
        return qty.from_squares(lin, scores, max_vectors)

    # Student t without the cube-root correction: the squared scores of sampled
    # labels are dominated by rare labels for a confident model, not gamma-like.
    return _run(
        source, common, draw, target=target, desc="Monte-Carlo Fisher", squares=True,
        skew=False, num_samples=k,
    )  # fmt: skip


def empirical(
    source: Source,
    labels: Array | list[Array] | tuple[Array, ...],
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    weights: Array | None = None,
    reduction: str = "sum",
    max_batches: int | None = None,
    blocks: Sequence[str] | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_vectors: int | None = None,
    ignore_index: int | None = -100,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Estimate:
    r"""The empirical Fisher: per-example scores at the OBSERVED labels (biased).

    :math:`\sum_x s_x s_x^\top` with :math:`s_x = J_x^\top \nabla_z \log p(y_x \mid z_x)` for
    the observed :math:`y_x`; its diagonal is :math:`\sum_x s_x \odot s_x` (the adapter's
    per-example squares). With position axes,
    :math:`s_x = \sum_t J_{xt}^\top \nabla_z \log p(y_{xt} \mid z_{xt})` sums over the counted
    positions of :math:`x` (not masked by ``lin.mask``, label not ``ignore_index``). It is
    not an estimate of :math:`F`: :math:`\mathbb{E}` over :math:`y \sim p` would give
    :math:`F`, the observed labels do not (THEORY §3).
    Cost: one per-example VJP per input (the diagonal through the adapter's
    per-example squares, as ``fisher_diagonal`` with one cotangent instead of C).

    Parameters
    ----------
    source
        A linearization or an iterable of them.
    labels
        The observed labels: one array for all inputs (sliced batch by batch in
        order; it must have exactly as many rows as the source has inputs), or a
        list of arrays, one per batch (needed when the batches differ in their
        positions). Categorical: integer class indices (N, ∗S); Bernoulli:
        {0, 1} floats (N, ∗S, C); Gaussian: targets (N, ∗S, C); validated by
        ``family.check_labels``; same namespace and device as the logits.
    family, what, weights, max_batches, blocks, max_block_size, max_vectors, progress
        As in ``detach_and_mix``.
    reduction
        ``"sum"`` over inputs (default) or ``"mean"``: divided by N, the number of
        examples (not of positions).
    ignore_index
        For integer labels (categorical): the positions whose label equals it
        contribute nothing (their label is replaced by 0 before the family
        sees it), as ``torch.nn.CrossEntropyLoss(ignore_index=-100)``. None
        counts every label. Labels of other dtypes are not compared with it. A
        batch whose every position is ignored (or masked) is a ValueError.

    Returns
    -------
    Estimate
        ``value`` of the shape of the exact quantity. ``std_error`` is ZERO: given
        the inputs and labels the empirical Fisher is deterministic (no Monte-Carlo
        error); its error as an estimate of F is a bias that no standard error can
        show (compare with ``fisherbound.fisher.fisher_diagonal``). ``num_probes``
        is 1, ``dof`` is ``math.inf`` (``interval`` returns the value itself, up to
        rounding). ``what="full"``: the factor of the per-example scores (N, D).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> from fisherbound.estimators import empirical
    >>> lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((6, 4)))
    >>> est = empirical(lin, np.array([0, 1, 2, 0, 1, 2]))
    >>> est.value.shape, float(est.std_error.max())
    ((67,), 0.0)
    """
    common = _check_options(
        family, what, reduction, max_batches, blocks, max_block_size, max_vectors, progress,
        process_group, weights,
    )  # fmt: skip
    fam, qty = common.family, common.qty
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        msg = f"ignore_index must be an int or None; got {type(ignore_index).__name__}."
        raise TypeError(msg)
    batch_labels = LabelSource(labels)

    def draw(lin: Any) -> Any:
        index = batch_labels.batches
        y = conform_labels(lin, batch_labels.take(lin))
        y, keep = ignored_labels(lin, y, ignore_index)
        check_loss_labels(fam, lin.logits, y, where=f" of batch {index}")
        score = fam.unchecked_score(lin.logits, y, xp=lin.xp)  # the labels were checked above
        if keep is not None:
            check_counted(lin, keep, ignore_index, index)
            score = score * lin.xp.astype(keep, score.dtype)[..., None]
        return qty.from_squares(lin, score[None, ...], max_vectors)

    est = _run(source, common, draw, target=None, desc="empirical Fisher", squares=True)
    if common.limit is None or batch_labels.batches < common.limit:
        # Only a source that was read to its end can be checked for unused labels.
        batch_labels.finish()
    xp = array_namespace(_first_leaf(est.std_error), names=("std_error",))
    if isinstance(est.std_error, dict):
        zero: Any = {k: xp.zeros_like(v) for k, v in est.std_error.items()}
    else:
        zero = xp.zeros_like(est.std_error)
    # Deterministic given the inputs and labels: no Monte-Carlo error, dof = ∞.
    return Estimate(est.value, zero, 1, math.inf, est.floor)


def _first_leaf(tree: Any) -> Any:
    return next(iter(tree.values())) if isinstance(tree, dict) else tree
