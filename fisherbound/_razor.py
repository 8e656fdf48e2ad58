"""The pieces of ``fisherbound.dimension.razor``: its result type and its terms.

The negative log-likelihood over the batches, the Gaussian prior's penalty and
log det(I + σ² F) by the dense matrix, full Lanczos or SLQ; split from
``dimension`` by job (``Razor`` is re-exported there).

Logits (N, ∗S, C) with position axes: an example x holds P conditionally
independent outputs, so −log p(X | θ̂) = −Σ_x Σ_t log p(y_xt | z_xt) over the
counted positions (``lin.mask``; the labels of masked positions are never read,
any value is accepted there, e.g. an ignore index), F_sum = Σ_x Σ_t J_xtᵀ I J_xt
(the adapters zero the masked rows), and the BIC term counts the observations:
(D/2) log n with n the number of counted positions (N without position axes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from fisherbound._lib import (
    Estimate,
    ProcessGroup,
    array_namespace,
    check_vector,
    conform,
    is_array,
)
from fisherbound._quantities import total_counted
from fisherbound._stream import conform_labels
from fisherbound.families import Family
from fisherbound.fisher import fisher_dense
from fisherbound.linalg import lanczos, slq
from fisherbound.linalg._lanczos import tridiagonal
from fisherbound.linalg._quadrature import _rules_estimate
from fisherbound.linearization import check_loss_labels

Array = Any

__all__ = [
    "LogDetSettings",
    "Razor",
    "check_parameter_vector",
    "razor_terms",
    "scalar",
    "split_labels",
]


class Razor(NamedTuple):
    r"""The Gaussian-prior razor complexity and its parts (THEORY §5).

    ``value`` = ``neg_log_likelihood`` + ``prior_penalty`` + :math:`\frac12`
    ``log_det.value``, an estimate of :math:`-\log p(X)` (nats), exact for
    linear-Gaussian models.

    Attributes
    ----------
    value
        The razor, 0-d.
    std_error
        Its standard error, :math:`\frac12` ``log_det.std_error`` (0 when the log-det is
        exact).
    neg_log_likelihood
        :math:`-\log p(X \mid \hat\theta) = -\sum_x \sum_t \log p(y_{xt} \mid x, \hat\theta)`
        over the counted positions (one term per input without position axes), 0-d,
        normalising constants included (the Gaussian family's
        :math:`\frac{C}{2} \log 2\pi` per position).
    prior_penalty
        :math:`\|\hat\theta - \theta_0\|^2 / (2\sigma^2)`, 0-d.
    log_det
        An ``Estimate`` of :math:`\sum_i \log(1 + \sigma^2 \lambda_i(F_\mathrm{sum}))
        = \log\det(I + \sigma^2 F_\mathrm{sum})`; ``num_probes`` is 0 when it was
        computed exactly.
    bic_penalty
        The classical BIC/MDL term :math:`\frac{D}{2} \log n`, 0-d, :math:`n` the number
        of observations: the counted positions (:math:`N` inputs without position axes),
        for comparison with :math:`\frac12` ``log_det.value`` (which it equals when
        every direction is significant and :math:`\sigma^2 \lambda_i \approx n`).
    method
        How ``log_det`` was computed: ``"dense"``, ``"lanczos"`` or ``"slq"``.
    """

    value: Array
    std_error: Array
    neg_log_likelihood: Array
    prior_penalty: Array
    log_det: Estimate
    bic_penalty: Array
    method: str


class LogDetSettings(NamedTuple):
    """How ``razor`` computes log det(I + σ² F): the validated options, once."""

    s2: float
    method: str
    num_probes: int
    num_matvecs: int
    max_params: int
    gen: Any
    process_group: ProcessGroup = None
    rules: Any = None  # Gauss rules (nodes, weights) to reuse for "slq": no product


def scalar(xp: Any, value: float, op: Any) -> Array:
    return xp.asarray(value, dtype=op.dtype, device=op.device)


def check_parameter_vector(xp: Any, op: Any, v: Any, name: str) -> Array:
    d = int(op.shape[0])
    if not is_array(v):
        msg = (
            f"{name} must be a flat parameter array of shape ({d},); got "
            f"{type(v).__module__}.{type(v).__name__}."
        )
        raise TypeError(msg)
    witness = xp.zeros((0,), dtype=op.dtype, device=op.device)
    array_namespace(witness, v, names=("the linearization's logits", name))
    order = "D, in the order of the linearization's blocks"
    check_vector(v, name, f"a flat parameter vector of shape ({d},) ({order})", xp=xp, size=d)
    owner = "the linearization's device"
    return conform(v, name, xp=xp, dtype=op.dtype, device=op.device, owner=owner)


def split_labels(family: Family, lins: list[Any], labels: Any) -> list[Array]:
    """One validated label array per batch, (N_b, ∗S) or (N_b, ∗S, C).

    The labels of masked positions (``lin.mask``) are replaced by a valid
    placeholder (0, or 1/C for label rows) before the family's check, so they may
    hold anything (e.g. −100).
    """
    sizes = [int(lin.logits.shape[0]) for lin in lins]
    if is_array(labels):
        total = sum(sizes)
        if labels.ndim < 1 or int(labels.shape[0]) != total:
            msg = (
                f"labels must have one row per input: shape ({total}, ...) for the {total} "
                f"inputs of the source; got shape {tuple(labels.shape)}. Pass one array per "
                "batch as a list to label the batches separately."
            )
            raise ValueError(msg)
        parts = []
        start = 0
        for size in sizes:
            parts.append(labels[start : start + size, ...])
            start += size
    elif isinstance(labels, Sequence) and not isinstance(labels, str | bytes):
        if len(labels) != len(sizes):
            msg = (
                f"labels must hold one array per batch of the source ({len(sizes)} batches); "
                f"got {len(labels)}."
            )
            raise ValueError(msg)
        parts = list(labels)
    else:
        msg = (
            "labels must be an array (all inputs, in the source's order) or a list of "
            f"arrays (one per batch); got {type(labels).__name__}."
        )
        raise TypeError(msg)
    pairs = enumerate(zip(lins, parts, strict=True))
    return [_check_labels(family, lin, y, i) for i, (lin, y) in pairs]


def _check_labels(family: Family, lin: Any, y: Any, index: int) -> Array:
    """The family's label check, its message prefixed with the batch; masked labels replaced."""
    if not is_array(y):
        msg = (
            f"labels of batch {index} must be an array; got "
            f"{type(y).__module__}.{type(y).__name__}."
        )
        raise TypeError(msg)
    y = conform_labels(lin, y)
    try:
        check_loss_labels(family, lin.logits, y, where=f" of batch {index}")
    except (TypeError, ValueError) as err:
        msg = str(err)
        if int(y.ndim) >= 2 and int(y.ndim) < int(lin.logits.ndim):
            msg += (
                " Padding labels (such as -100) must be masked: pass mask= to the "
                "adapter's linearize so those positions leave the Fisher term too."
            )
        raise type(err)(msg) from err
    return y


def _log1p_clipped(xp: Any, s2: float) -> Callable[[Array], Array]:
    def f(t: Array) -> Array:
        # Rounding can make null eigenvalues slightly negative; F is PSD.
        return xp.log1p(s2 * xp.where(t > 0, t, xp.zeros_like(t)))

    return f


def _log_det(xp: Any, op: Any, lins: list[Any], family: Family, how: LogDetSettings) -> Estimate:
    f = _log1p_clipped(xp, how.s2)
    if how.method == "slq" and how.rules is not None:
        return _rules_estimate(xp, f, how.rules)
    if how.method == "slq":
        return slq(op, f, num_probes=how.num_probes, num_matvecs=how.num_matvecs, rng=how.gen)
    if how.method == "dense":
        try:
            dense = fisher_dense(
                lins,
                family,
                max_params=how.max_params,
                progress=False,
                process_group=how.process_group,
            )
        except ValueError as err:
            if "max_cotangents" not in str(err):
                raise
            msg = (
                f"razor(method='dense') builds F from per-position factor columns: {err} "
                "For the razor use method='lanczos' instead: D matrix-free steps, the "
                "same exact spectrum."
            )
            raise ValueError(msg) from err
        eigenvalues = xp.linalg.eigvalsh(dense)
    else:
        # A full run of D Lanczos steps: the eigenvalues of T are F's spectrum.
        res = lanczos(op, num_matvecs=int(op.shape[0]), rng=how.gen)
        eigenvalues = xp.linalg.eigvalsh(tridiagonal(xp, res.alpha[None, :], res.beta[None, :]))[
            0, :
        ]
    return Estimate(xp.sum(f(eigenvalues)), scalar(xp, 0.0, op), 0, math.inf)  # exact


def razor_terms(
    xp: Any,
    op: Any,
    family: Family,
    lins: list[Any],
    labels: list[Array],
    theta: Array,
    theta0: Array | None,
    how: LogDetSettings,
    coll: Any = None,
) -> Razor:
    """The razor's terms: the likelihood, the prior's penalty and log det(I + σ² F).

    The likelihood sums over the counted positions; n (the BIC term's) counts them.
    """
    nll = scalar(xp, 0.0, op)
    n = 0
    for lin, y in zip(lins, labels, strict=True):
        ll = family.unchecked_log_likelihood(lin.logits, y, xp=lin.xp)  # (N, *S), y checked
        mask = getattr(lin, "mask", None)
        if mask is not None:
            ll = xp.where(mask, ll, xp.zeros_like(ll))
        n += total_counted(lin)
        nll = nll - xp.sum(ll)
    if coll is not None:
        nll = coll.sum(nll)
        n = coll.sum_int(n)
    delta = theta if theta0 is None else theta - theta0
    penalty = xp.sum(delta * delta) / (2.0 * how.s2)
    log_det = _log_det(xp, op, lins, family, how)
    bic = scalar(xp, 0.5 * int(op.shape[0]) * math.log(n), op)
    value = nll + penalty + 0.5 * log_det.value
    return Razor(value, 0.5 * log_det.std_error, nll, penalty, log_det, bic, how.method)
