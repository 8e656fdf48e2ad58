"""The Hessian trace of a loss from M random probes (THEORY §6).

The implementation of ``fisherbound.landscape.loss_trace`` (Hessian-vector
products, or second differences of loss values with their rounding bound and the
``LossTraceWarning``), split from ``landscape`` by job; the public names are
re-exported there.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

from fisherbound._directions import DIRECTION_KINDS, check_blocks, coefficients, draw, step_size
from fisherbound._lib import (
    Estimate,
    LossSource,
    ProcessGroup,
    RngLike,
    array_namespace,
    check_choice,
    check_positive_int,
    check_real,
    device_of,
    estimate_from_samples,
    shared_generator,
)
from fisherbound._stream import LossStream

Array = Any

__all__ = ["DEFAULT_PROBE_BATCH", "TRACE_METHODS", "LossTraceWarning", "loss_trace"]

#: ``loss_trace`` methods: Hessian-vector products (default), or loss values only.
TRACE_METHODS = ("hvp", "loss")

#: Default number of probes evaluated per call of the loss in ``loss_trace``.
DEFAULT_PROBE_BATCH = 16


class LossTraceWarning(RuntimeWarning):
    """``loss_trace(method="loss")`` may be wrong by more than its standard error.

    Attributes
    ----------
    reason
        ``"kinks"``: the loss functions report kinked modules (``kinks``, e.g. ReLU,
        max pooling); ``"rounding"``: the rounding bound of the second differences
        exceeds the standard error (float32 at the chosen step).
    detail
        For ``"kinks"`` the tuple of module names; for ``"rounding"`` the bound
        :math:`R` (a float, the estimate's units).
    """

    def __init__(self, message: str, *, reason: str, detail: Any = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = detail


def loss_trace(
    source: LossSource,
    /,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    method: str = "hvp",
    step: float | None = None,
    rng: RngLike = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Estimate:
    r"""The Hessian trace :math:`\operatorname{tr} \nabla^2 L(\theta)` from :math:`M` random probes.

    With a standard error. ``method="hvp"`` (default): the Hutchinson estimate
    :math:`\frac1M \sum_m \eta_m^\top (H \eta_m)` with
    exact Hessian-vector products, unbiased for any loss the adapter can
    differentiate twice. ``method="loss"``: loss values only (THEORY §6), with
    :math:`h_m = \mathrm{step} / \lVert \eta_m \rVert`,

    .. math::

       \widehat{\operatorname{tr} H} = \frac1M \sum_{m=1}^M
       \frac{L(\theta + h_m \eta_m) - 2 L(\theta) + L(\theta - h_m \eta_m)}{h_m^2}
       \approx \frac1M \sum_m \eta_m^\top H \eta_m,

    exact for a quadratic loss (up to rounding): two forward passes per probe (the
    :math:`2M` shifted parameter vectors batched through ``value``), no Hessian-vector
    product, no backward pass. Both methods use THE SAME probes for the same
    ``rng``, ``distribution`` and ``batch_size``, so the difference of the two is
    the finite-difference error alone.

    When the loss-only method is valid: its standard error covers the sampling
    error only, not the finite-difference error of each probe. With the unit
    direction :math:`u = \eta / \lVert \eta \rVert`, displacement :math:`h` and
    :math:`\varepsilon_L` the relative rounding error of one
    loss value (at least :math:`\varepsilon`, the dtype's machine epsilon),

    .. math::

       \frac{L(\theta + h u) - 2L(\theta) + L(\theta - h u)}{h^2} = u^\top H u
       + \underbrace{\tfrac{h^2}{12} \partial^4 L[u, u, u, u]}_{\text{truncation}}
       + \underbrace{O(4 \varepsilon_L \lvert L \rvert / h^2)}_{\text{rounding}},

    so it is valid when (1) :math:`L` is four times differentiable along the segments
    :math:`\theta \pm h u`: no kinks (ReLU, leaky ReLU, hard tanh, max pooling, …) within
    :math:`h`, since a second difference across a kink measures (jump of the slope) /
    :math:`h`, not the Hessian (which a piecewise-linear unit does not even have at the
    kink); and (2) rounding does not dominate:
    :math:`4 \varepsilon_L \lvert L \rvert / h^2 \ll \lvert u^\top H u \rvert
    \approx \lvert \operatorname{tr} H \rvert / D`, i.e.
    :math:`h^2 \gg 4 \varepsilon_L \lvert L \rvert D / \lvert \operatorname{tr} H \rvert`. The
    two errors are equal at :math:`h^4 = 48 \varepsilon_L \lvert L \rvert
    / \lvert \partial^4 L[u^4] \rvert`, the reason for the default
    :math:`h \propto \varepsilon^{1/4}`; in float32 (:math:`\varepsilon \approx` 1.2e-7)
    that leaves the rounding term of a loss summed over a batch comparable to the
    trace. The loss-only method therefore warns (``LossTraceWarning``, a
    RuntimeWarning, with ``reason`` and ``detail``):

    - ``reason="kinks"`` when any loss function reports kinked modules in its
      ``kinks`` property (the torch adapter reads the module tree: ``nn.ReLU``,
      ``LeakyReLU``, ``ReLU6`` / ``Hardtanh``, ``Hardswish``, ``MaxPool2d``, … ; a
      ReLU called as a function, ``F.relu`` or ``torch.relu``, is invisible to it,
      and adapters without the property, such as JAX's, are not checked);
    - ``reason="rounding"`` when the rounding bound of the estimate,
      :math:`R = \frac1M \sum_m 4 \varepsilon \lvert L(\theta) \rvert\,
      \lVert \eta_m \rVert^2 / h^2` (:math:`\varepsilon` the machine epsilon of
      :math:`\theta`'s dtype, :math:`\lvert L(\theta) \rvert` per batch, summed like the
      trace), exceeds both the standard error and 1% of
      :math:`\lvert \text{estimate} \rvert`: the error bar would not cover the rounding
      error.

    Use the HVP method wherever the adapter has ``hvp_batch``; the loss-only method
    is for smooth models in float64 (or float32 with a small loss and few
    parameters), or for a check of the HVPs.

    Parameters
    ----------
    source
        A LossFunction or an iterable of them (streamed once; the same probes are
        replayed on every batch, so the estimate is the one of the total loss).
    num_probes
        :math:`M \ge 1` (:math:`\ge 2` for a standard error).
    distribution
        ``"rademacher"`` (default; :math:`\operatorname{Var}` of one probe
        :math:`2(\lVert H \rVert_F^2 - \sum H_{ii}^2)`, exact for a diagonal :math:`H`),
        ``"gaussian"`` (:math:`\operatorname{Var}` :math:`2 \operatorname{tr} H^2`),
        ``"sphere"`` (unit vectors :math:`u`, reported as :math:`D u^\top H u` so that the
        mean is :math:`\operatorname{tr} H`; :math:`\operatorname{Var}`
        :math:`2[D \operatorname{tr} H^2 - (\operatorname{tr} H)^2] / (D + 2)`)
        or ``"filter"``: filter-normalised directions, which estimate the WEIGHTED
        trace :math:`\sum_f (\lVert \theta_f \rVert^2 / n_f) \operatorname{tr}(H_{ff})` (see
        ``random_directions``), not :math:`\operatorname{tr} H`.
    method
        ``"hvp"`` (default) or ``"loss"`` (see above for when it is valid).
    step
        ``"loss"`` only: the displacement norm :math:`h > 0`; default
        ``default_step(θ)`` :math:`= \varepsilon^{1/4} \cdot \max(\lVert \theta \rVert, 1)`
        (:math:`\varepsilon` the dtype's machine epsilon). Too small a step
        amplifies the rounding error of :math:`L`
        (:math:`4 \varepsilon_L \lvert L \rvert / h^2` per unit direction),
        too large a step adds the fourth-order term (:math:`h^2 \partial^4 L / 12`); the
        standard error includes neither.
    rng
        numpy Generator, int seed, JAX key or None.
    batch_size
        Probes per call of ``value`` / ``hvp_batch`` (default :math:`\min(M, 16)`).
    progress
        Progress bar over batches: None (on a terminal, after 2 s), True or False.
    process_group
        None, a ``torch.distributed`` process group or a JAX axis name: ``source``
        is this rank's shard; the per-probe sums are all-reduced, so the probes must
        be the same on every rank (the same ``rng`` seed; checked).

    Returns
    -------
    Estimate
        0-d ``value`` and ``std_error`` (sample standard deviation of the :math:`M`
        per-probe values / :math:`\sqrt{M}`), ``num_probes`` :math:`M`. A sum over the
        batches, or the mean over every counted position for loss functions with
        ``reduction="mean"``.

    Notes
    -----
    Cost per batch: :math:`M` Hessian-vector products (``"hvp"``: about :math:`2M` gradient
    steps, batched) or :math:`2M + 1` loss evaluations (``"loss"``: about :math:`2M + 1`
    forward passes, batched); memory: ``batch_size`` parameter vectors.

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
    >>> round(float(loss_trace(loss, num_probes=8, method="loss", rng=0).value), 6)
    5.0
    """
    m = check_positive_int(num_probes, "num_probes")
    kind = check_choice(distribution, "distribution", DIRECTION_KINDS)
    method = check_choice(method, "method", TRACE_METHODS)
    h_user = None if step is None else check_real(step, "step")
    b = (
        min(m, DEFAULT_PROBE_BATCH)
        if batch_size is None
        else check_positive_int(batch_size, "batch_size")
    )
    stream = LossStream(source, desc="loss trace", progress=progress, process_group=process_group)
    gen = shared_generator(stream.coll, rng, where="loss_trace", lanczos=False)
    start = copy.deepcopy(gen)  # the probe stream, replayed on every batch
    total = None
    xp = None
    last = None
    kinks: set[str] = set()
    for loss in stream:
        xp = array_namespace(loss.params, names=("params",))
        last = copy.deepcopy(start)
        # (M,) samples, and for "loss" their rounding bounds after them: (2M,).
        samples = stream.as_sum(loss, _trace_samples(xp, loss, last, m, b, kind, method, h_user))
        total = samples if total is None else total + samples
        if method == "loss":
            kinks.update(getattr(loss, "kinks", None) or ())
    stream.finish(M=m, distribution=kind, method=method, step=h_user, batch=b)
    assert total is not None
    assert last is not None
    assert xp is not None
    total = stream.total(total)
    gen.bit_generator.state = last.bit_generator.state
    est = estimate_from_samples(total[:m], xp)
    if method == "loss":
        _warn_loss_only(est, float(xp.mean(total[m:])), tuple(sorted(kinks)))
    return est


def _warn_loss_only(est: Estimate, bound: float, kinks: tuple[str, ...]) -> None:
    """``LossTraceWarning`` for kinked models and for rounding beyond the error bar."""
    if kinks:
        msg = (
            f"loss_trace(method='loss'): the model has kinks ({', '.join(kinks)}); a "
            "second difference across a kink measures the jump of the slope divided by "
            "the step, not the Hessian, and the estimate can be off by many standard "
            "errors. Use method='hvp' (the default)."
        )
        warnings.warn(LossTraceWarning(msg, reason="kinks", detail=kinks), stacklevel=3)
    se = float(est.std_error)
    floor = 0.01 * abs(float(est.value))
    if bound > (max(se, floor) if math.isfinite(se) else floor):
        msg = (
            f"loss_trace(method='loss'): the rounding bound of the second differences, "
            f"4 eps |L| mean ‖η‖² / h² = {bound:.3g}, exceeds the standard error "
            f"{se:.3g} and 1% of the estimate {float(est.value):.6g}: at this precision "
            "and step the error bar does not cover the rounding error. Use method='hvp' "
            "(the default), float64, or a larger step."
        )
        warnings.warn(LossTraceWarning(msg, reason="rounding", detail=bound), stacklevel=3)


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
    """The M per-probe values ηᵀHη of one loss function, (M,).

    For ``"loss"`` followed by their rounding bounds 4 ε |L(θ)| / e_m² (e_m = h / ‖η_m‖
    the coefficient of probe m), (2M,).
    """
    theta = loss.params
    d = int(theta.shape[0])
    blocks = check_blocks(loss.blocks, d) if kind == "filter" else None
    if method == "loss":
        h = step_size(xp, theta, step)
        center = loss.value(xp.zeros((1, d), dtype=theta.dtype, device=device_of(theta)))[0]
        noise = 4.0 * float(xp.finfo(theta.dtype).eps) * xp.abs(center)
    out = []
    bounds = []
    left = m
    while left > 0:
        size = min(b, left)
        P = draw(xp, gen, size, kind, theta, blocks)
        if method == "hvp":
            q = xp.sum(P * loss.hvp_batch(P), axis=1)
        else:
            e = coefficients(xp, P, h)
            shifts = P * e[:, None]
            vals = loss.value(xp.concat([shifts, -shifts], axis=0))
            e2 = xp.where(e == 0.0, xp.ones_like(e), e * e)
            q = (vals[:size] - 2.0 * center + vals[size:]) / e2
            bounds.append(xp.where(e == 0.0, xp.zeros_like(e), noise / e2))
        out.append(q)
        left -= size
    samples = out[0] if len(out) == 1 else xp.concat(out, axis=0)
    if bounds:
        samples = xp.concat([samples, *bounds], axis=0)
    return samples * float(d) if kind == "sphere" else samples
