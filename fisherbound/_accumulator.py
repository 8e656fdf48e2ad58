"""The mergeable accumulator of random estimates, and the running sums of the estimators.

``Accumulator`` (public as ``fisherbound.estimators.Accumulator``) stores a sum of
independent unbiased estimates with its variance, one stratum per batch. The
estimators of ``fisherbound.estimators`` accumulate the per-probe samples of a
quantity (``fisherbound._quantities``) in one of three running sums:

- ``SampleSum``: diagonal, trace or blocks samples (M, ...) per batch, with the
  trace summary behind ``target_relative_error``;
- ``FactorSum``: the detach-and-mix factor, the per-probe gradients summed over
  batches (or stacked, for rounds of new probes on one batch);
- ``RowStack``: the per-example factor rows of the Monte-Carlo and empirical
  Fisher, with the diagonal's samples for the standard error.

Each has ``add(samples, num_inputs, xp, same_inputs=)``, ``trace_error(xp)`` (the
relative standard error of the trace estimate and its degrees of freedom),
``global_trace_terms(active)``, ``all_reduce(coll)``, ``reduced_trace_error`` and
``estimate(scale, xp)`` (``scale``: the stream's reduction scale, 1/N or 1).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fisherbound._lib import (
    REDUCTIONS,
    Collective,
    Estimate,
    ProcessGroup,
    array_namespace,
    check_choice,
    collective,
    device_of,
    estimate_from_samples,
    variance_of_mean,
)

Array = Any

__all__ = [
    "Accumulator",
    "FactorSum",
    "PerExampleRows",
    "ProbeMoments",
    "RowStack",
    "SampleSum",
    "moments_of_samples",
]


def _map(f: Any, *trees: Any) -> Any:
    """Apply ``f`` leafwise to arrays or to dicts of arrays (the blocks)."""
    if isinstance(trees[0], dict):
        return {k: f(*(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def _leaves(tree: Any) -> list[Any]:
    return list(tree.values()) if isinstance(tree, dict) else [tree]


class Accumulator:
    r"""A sum of independent unbiased estimates, with its variance: mergeable.

    Each ``update(samples)`` adds one *stratum*: the M per-probe samples of one
    batch's contribution (an array (M, ...) or a dict of them). The stratum
    contributes its sample mean to ``value`` and the estimated variance of that
    mean, :math:`s^2/M` (:math:`s^2` the unbiased sample variance over the M probes; NaN
    for :math:`M = 1`), to ``variance``. Strata are independent (their probes are), so

    .. math::

       \mathrm{value} = \sum_b \mathrm{mean}_b, \qquad
       \mathrm{variance} = \sum_b s_b^2 / M_b

    is an unbiased estimate of the sum over the data and of its variance: better
    error bars than treating each probe's data-set total as one sample, in :math:`O(D)`
    memory. The variance estimate has, per entry, the Welch–Satterthwaite degrees
    of freedom

    .. math::

       \mathrm{dof} = \frac{\big(\sum_b s_b^2/M_b\big)^2}{\sum_b (s_b^2/M_b)^2 / (M_b - 1)},

    between the smallest :math:`M_b - 1` and :math:`\sum_b (M_b - 1)` (equal to the latter
    when the strata have equal variances): the ``dof`` of the ``Estimate``, which sets the
    width of its interval (``Estimate.interval``). With one stratum it is :math:`M - 1`.

    ``nonnegative=True`` declares the samples :math:`\ge 0` (sums of squares, as the
    estimators' diagonal and trace samples): the estimate then has ``floor`` 0
    and its interval allows for their right skew (see ``Estimate.interval``).

    ``merge(other)`` adds the strata of ``other`` (other inputs: another shard,
    another call, another process; across processes, all-reducing ``value``,
    ``variance`` and ``num_inputs`` with a sum is the same thing).
    ``pool(other)`` combines two independent estimates of the SAME inputs (new
    probes), weighting by their numbers of probes.

    Examples
    --------
    >>> import numpy as np
    >>> acc = Accumulator()
    >>> acc = acc.update(np.array([[1.0, 2.0], [3.0, 2.0]]), num_inputs=4)
    >>> acc = acc.update(np.array([[0.0, 1.0], [2.0, 1.0]]), num_inputs=4)
    >>> est = acc.estimate()
    >>> est.value, est.std_error, est.num_probes, est.dof
    (array([3., 3.]), array([1.41421356, 0.        ]), 2, array([ 2., inf]))
    >>> acc.estimate(reduction="mean").value
    array([0.375, 0.375])
    """

    def __init__(self, *, nonnegative: bool = False) -> None:
        if not isinstance(nonnegative, bool):
            msg = f"nonnegative must be True or False; got {type(nonnegative).__name__}."
            raise TypeError(msg)
        self._value: Any = None
        self._variance: Any = None
        # Welch–Satterthwaite: Σ_b V_b² / d_b (V_b = s_b²/M_b, d_b = M_b − 1), formed
        # once a second stratum arrives; until then ``_dof`` holds the one stratum's.
        self._welch: Any = None
        self._dof: Any = None
        self._nonnegative = nonnegative
        self._num_inputs = 0
        self._num_batches = 0
        self._probes: tuple[int, int] | None = None  # (min, max) over strata
        self._unknown = False  # some stratum had one probe: no variance estimate

    # -- read-only state -------------------------------------------------------
    @property
    def value(self) -> Any:
        r""":math:`\sum_b \mathrm{mean}_b`: the estimate of the sum over the inputs seen.

        None if empty.
        """
        return self._value

    @property
    def variance(self) -> Any:
        r""":math:`\sum_b s_b^2/M_b`: the estimated variance of ``value`` (None if empty).

        NaN (possibly a 0-d NaN) when some stratum had a single probe.
        """
        return self._variance

    @property
    def num_inputs(self) -> int:
        """How many inputs the strata cover (for ``reduction="mean"``)."""
        return self._num_inputs

    @property
    def num_batches(self) -> int:
        """How many strata (batches) have been added."""
        return self._num_batches

    @property
    def num_probes(self) -> int:
        """The number of probes per stratum (the smallest, if they differ); 0 if empty."""
        return 0 if self._probes is None else self._probes[0]

    @classmethod
    def from_estimate(
        cls, estimate: Estimate, /, *, num_inputs: int = 0, reduction: str = "sum"
    ) -> Accumulator:
        """An accumulator holding one ``Estimate`` (of another call or process).

        Its variance is ``std_error**2``. For an estimate made with
        ``reduction="mean"`` pass ``reduction="mean"`` and ``num_inputs`` (the
        number of inputs it averages) so that it is scaled back to a sum.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound import Estimate
        >>> a = Accumulator.from_estimate(Estimate(np.array(2.0), np.array(0.3), 8))
        >>> b = Accumulator.from_estimate(Estimate(np.array(1.0), np.array(0.4), 8))
        >>> est = a.merge(b).estimate()  # sums add, variances add
        >>> float(est.value), float(est.std_error), est.num_probes
        (3.0, 0.5, 8)
        """
        if not isinstance(estimate, Estimate):
            msg = (
                "estimate must be a fisherbound Estimate (value, std_error, num_probes); got "
                f"{type(estimate).__name__}."
            )
            raise TypeError(msg)
        check_choice(reduction, "reduction", REDUCTIONS)
        n = int(num_inputs)
        scale = 1.0
        if reduction == "mean":
            if n < 1:
                msg = (
                    "a reduction='mean' estimate needs num_inputs (how many inputs it "
                    f"averages) to be turned back into a sum; got num_inputs = {n}."
                )
                raise ValueError(msg)
            scale = float(n)
        value = _map(lambda v: v * scale, estimate.value)
        variance = _map(lambda s: (s * scale) ** 2, estimate.std_error)
        m = int(estimate.num_probes)
        floor = estimate.floor
        acc = cls(nonnegative=isinstance(floor, int | float) and floor == 0)
        return acc._add(value, variance, n, 1, (m, m), estimate.degrees_of_freedom)

    # -- updates ------------------------------------------------------------------
    def update(self, samples: Any, /, *, num_inputs: int = 0) -> Accumulator:
        """Add one stratum: ``samples`` (M, ...) (or a dict of them), M >= 1.

        ``num_inputs`` is the number of inputs the stratum covers. Returns self.
        """
        first = _leaves(samples)[0]
        leaves = _leaves(samples)
        xp = array_namespace(*leaves, names=tuple(f"samples[{i}]" for i in range(len(leaves))))
        if first.ndim < 1 or int(first.shape[0]) < 1:
            msg = (
                "samples must have a leading probe axis (M, ...) with M >= 1; got shape "
                f"{tuple(first.shape)}."
            )
            raise ValueError(msg)
        m = int(first.shape[0])
        if m == 1:
            # One probe: the mean is the sample and the variance is unknown (a 0-d
            # NaN, which broadcasts; ``estimate`` reports NaN standard errors).
            mean = _map(lambda s: s[0, ...], samples)
            var = _map(
                lambda s: xp.full((), float("nan"), dtype=s.dtype, device=device_of(s)), samples
            )
        else:
            mean = _map(lambda s: xp.mean(s, axis=0), samples)
            var = _map(lambda s, mu: variance_of_mean(s, mu, m, xp), samples, mean)
        self._unknown = self._unknown or m < 2
        return self._add(mean, var, num_inputs, 1, (m, m), m - 1)

    def _update_moments(self, moments: ProbeMoments, num_inputs: int) -> Accumulator:
        """Add one stratum given as the moments of its M samples (``ProbeMoments``).

        The same stratum as ``update`` of the samples themselves: mean, and the
        sample variance divided by M (NaN for M = 1).
        """
        m = int(moments.num_probes)
        mean = moments.mean
        if m < 2 or moments.variance is None:
            xp = array_namespace(_leaves(mean)[0], names=("mean",))
            var = _map(
                lambda s: xp.full((), float("nan"), dtype=s.dtype, device=device_of(s)), mean
            )
            self._unknown = True
        else:
            var = _map(lambda v: v / m, moments.variance)
        return self._add(mean, var, num_inputs, 1, (m, m), m - 1)

    def merge(self, other: Accumulator, /) -> Accumulator:
        """Add the strata of ``other`` (estimates over OTHER inputs). Returns self."""
        if not isinstance(other, Accumulator):
            msg = f"other must be an Accumulator; got {type(other).__name__}."
            raise TypeError(msg)
        if other._value is None:
            return self
        assert other._probes is not None
        self._unknown = self._unknown or other._unknown
        self._nonnegative = self._nonnegative and other._nonnegative
        return self._add(
            other._value,
            other._variance,
            other._num_inputs,
            other._num_batches,
            other._probes,
            other._dof,
            welch=other._welch,
        )

    def pool(self, other: Accumulator, /) -> Accumulator:
        r"""Combine with an independent estimate of the SAME inputs (more probes).

        With :math:`M_1` and :math:`M_2` probes per stratum: value
        :math:`(M_1 v_1 + M_2 v_2)/(M_1 + M_2)`, :math:`M_1 + M_2` probes. When both hold one
        stratum of :math:`M \ge 2` samples each (from ``update``, or an estimate with dof
        :math:`M - 1`), the result is that of one stratum with all :math:`M_1 + M_2` samples
        (Chan et al.'s merge of the sums of squared deviations, :math:`M_1 + M_2 - 1` degrees
        of freedom); otherwise the variance is
        :math:`(M_1^2 V_1 + M_2^2 V_2)/(M_1 + M_2)^2`, with Welch–Satterthwaite dof.
        Both must cover the same number of inputs and use one number of probes in
        all their strata. Returns self.
        """
        if not isinstance(other, Accumulator):
            msg = f"other must be an Accumulator; got {type(other).__name__}."
            raise TypeError(msg)
        if other._value is None:
            return self
        if self._value is None:
            return self.merge(other)
        if other._num_inputs != self._num_inputs:
            msg = (
                "pool combines two estimates of the same inputs; this accumulator covers "
                f"{self._num_inputs} inputs but other covers {other._num_inputs}. Use "
                "merge(other) for estimates over different inputs."
            )
            raise ValueError(msg)
        assert self._probes is not None
        assert other._probes is not None
        if self._probes[0] != self._probes[1] or other._probes[0] != other._probes[1]:
            msg = (
                "pool needs one number of probes in every stratum of each accumulator; got "
                f"{self._probes} and {other._probes} (min, max). Pool batch by batch instead."
            )
            raise ValueError(msg)
        m1, m2 = self._probes[0], other._probes[0]
        w1, w2 = m1 / (m1 + m2), m2 / (m1 + m2)
        self._nonnegative = self._nonnegative and other._nonnegative
        if self._one_sample_set() and other._one_sample_set():
            # Sums of squared deviations S = V M (M − 1), merged as one sample set.
            m = m1 + m2
            spread = m1 * m2 / m

            def merged(v1: Any, v2: Any, a: Any, b: Any) -> Any:
                s = v1 * (m1 * (m1 - 1)) + v2 * (m2 * (m2 - 1)) + (b - a) ** 2 * spread
                return s / (m * (m - 1))

            self._variance = _map(
                merged, self._variance, other._variance, self._value, other._value
            )
            self._value = _map(lambda a, b: w1 * a + w2 * b, self._value, other._value)
            self._welch, self._dof = None, m - 1
            self._probes = (m, m)
            return self
        welch1, welch2 = self._welch_terms(), other._welch_terms()
        self._value = _map(lambda a, b: w1 * a + w2 * b, self._value, other._value)
        self._variance = _map(
            lambda a, b: (w1 * w1) * a + (w2 * w2) * b, self._variance, other._variance
        )
        w1, w2 = w1**4, w2**4
        self._welch = _map(lambda a, b: w1 * a + w2 * b, welch1, welch2)
        self._dof = None
        self._probes = (m1 + m2, m1 + m2)
        # Two one-probe estimates of the same inputs still have no variance estimate.
        self._unknown = self._unknown or other._unknown
        return self

    def _add(
        self,
        value: Any,
        variance: Any,
        num_inputs: int,
        num_batches: int,
        probes: tuple[int, int],
        dof: Any,
        *,
        welch: Any = None,
    ) -> Accumulator:
        """Add value and variance; ``dof`` (or ``welch``, Σ V²/d) is the variance's."""
        if self._value is None:
            self._value, self._variance = value, variance
            self._welch, self._dof = welch, (None if welch is not None else dof)
        else:
            self._check_compatible(value)
            mine = self._welch_terms()
            theirs = welch if welch is not None else _welch_of(variance, dof)
            self._welch = _map(lambda a, b: a + b, mine, theirs)
            self._dof = None
            self._value = _map(lambda a, b: a + b, self._value, value)
            self._variance = _map(lambda a, b: a + b, self._variance, variance)
        self._num_inputs += int(num_inputs)
        self._num_batches += int(num_batches)
        if self._probes is None:
            self._probes = probes
        else:
            self._probes = (min(self._probes[0], probes[0]), max(self._probes[1], probes[1]))
        return self

    def _one_sample_set(self) -> bool:
        """One stratum of M ≥ 2 samples with known variance and M − 1 dof."""
        assert self._probes is not None
        m = self._probes[0]
        return (
            self._num_batches == 1
            and not self._unknown
            and m >= 2
            and self._welch is None
            and isinstance(self._dof, int | float)
            and self._dof == m - 1
        )

    def _welch_terms(self) -> Any:
        """Σ_b V_b² / d_b of the strata held (formed from the one stratum's dof)."""
        if self._welch is None:
            return _welch_of(self._variance, self._dof)
        return self._welch

    def degrees_of_freedom(self) -> Any:
        """The Welch–Satterthwaite dof of ``variance`` (per entry; see the class).

        The one stratum's :math:`M - 1` (a number) while there is one stratum; otherwise
        an array of the value's shape (a dict for blocks), ``inf`` where the
        variance is 0 and NaN where it is unknown.
        """
        if self._value is None:
            return None
        if self._welch is None:
            return self._dof
        xp = array_namespace(_leaves(self._value)[0], names=("value",))

        def dof(v: Any, w: Any) -> Any:
            v = _wide(v)
            positive = w > 0
            ratio = (v * v) / xp.where(positive, w, xp.ones_like(w))
            undefined = xp.where(
                v == 0, xp.full_like(v, math.inf), xp.full_like(v, math.nan)
            )  # V = 0: an exact entry (any dof); otherwise a stratum had one probe
            return xp.where(positive, ratio, undefined)

        return _map(dof, self._variance, self._welch)

    def _check_compatible(self, value: Any) -> None:
        if isinstance(self._value, dict) != isinstance(value, dict) or (
            isinstance(value, dict) and set(value) != set(self._value)
        ):
            msg = (
                "cannot add estimates of different quantities: the accumulator holds "
                f"{_describe(self._value)} but got {_describe(value)}."
            )
            raise ValueError(msg)
        for a, b in zip(_leaves(self._value), _leaves(value), strict=True):
            if tuple(a.shape) != tuple(b.shape):
                msg = (
                    "cannot add estimates of different shapes: the accumulator holds shape "
                    f"{tuple(a.shape)} but got {tuple(b.shape)} (same model and `what`?)."
                )
                raise ValueError(msg)

    def all_reduce(self, process_group: ProcessGroup, /) -> Accumulator:
        r"""Sum the accumulators of all ranks of ``process_group``; every rank gets the total.

        ``process_group`` is a ``torch.distributed`` process group (reduced with
        ``torch.distributed.all_reduce``) or the name of a JAX mapped axis (inside
        ``jax.shard_map``: ``jax.lax.psum``). Values and variances are summed, as
        are the counts of inputs and batches (the strata of different ranks are
        independent: their probes must be, see ``Collective.generator``). Every
        rank must hold at least one stratum of the same quantity (names, shapes
        and dtypes are compared first; a ValueError on every rank otherwise).
        Returns self.

        .. math::

           \mathrm{value} = \sum_r \mathrm{value}_r, \quad
           \mathrm{variance} = \sum_r \mathrm{variance}_r, \quad
           \mathrm{num\_inputs} = \sum_r N_r.

        Cost: three all-reduces of the accumulator's arrays (value, variance and the
        Welch–Satterthwaite terms :math:`\sum V^2/d` behind the dof; one when the variance is
        unknown) and four of a few integers.
        """
        coll = process_group if isinstance(process_group, Collective) else None
        if coll is None:
            coll = collective(process_group)
            if coll is None:
                msg = "process_group must be a torch process group or a JAX axis name; got None."
                raise TypeError(msg)
        leaves = _leaves(self._value) if self._value is not None else []
        fields: dict[str, Any] = {
            "batches": self._num_batches,
            "the quantity (shapes and dtypes)": _layout(self._value),
        }
        coll.agree(fields, where="Accumulator.all_reduce")
        assert self._probes is not None
        lows, highs = coll.extrema(
            [self._probes[0], -self._probes[1], int(self._unknown), -int(self._unknown)]
        )
        self._probes = (lows[0], -lows[1])
        self._unknown = bool(highs[2])
        self._value = coll.sum_tree(self._value)
        welch = self._welch_terms()
        self._dof = None
        if self._unknown:
            # Some rank's stratum had a single probe: the variance stays unknown (NaN).
            xp = array_namespace(leaves[0], names=("value",))
            self._variance = _map(
                lambda v: xp.full((), float("nan"), dtype=v.dtype, device=device_of(v)),
                self._value,
            )
            self._welch = self._variance
        else:
            self._variance = coll.sum_tree(self._variance)
            self._welch = coll.sum_tree(welch)
        self._num_inputs = coll.sum_int(self._num_inputs)
        self._num_batches = coll.sum_int(self._num_batches)
        return self

    # -- results -----------------------------------------------------------------
    def estimate(self, *, reduction: str = "sum") -> Estimate:
        r"""The accumulated ``Estimate``: value, standard error, num_probes, dof.

        The standard error is :math:`\sqrt{\mathrm{variance}}`. ``reduction="mean"`` divides
        value and standard error by ``num_inputs``.
        """
        check_choice(reduction, "reduction", REDUCTIONS)
        if self._value is None:
            msg = "the accumulator is empty; add samples with update(...) first."
            raise ValueError(msg)
        scale = 1.0
        if reduction == "mean":
            if self._num_inputs < 1:
                msg = (
                    "reduction='mean' needs the number of inputs; this accumulator was "
                    "updated without num_inputs. Pass num_inputs=... to update()."
                )
                raise ValueError(msg)
            scale = 1.0 / self._num_inputs
        return self.scaled_estimate(scale)

    def scaled_estimate(self, scale: float) -> Estimate:
        """The ``Estimate`` with value and standard error multiplied by ``scale``.

        Its ``dof`` is ``degrees_of_freedom()`` (scale-free), its ``floor`` 0 for
        a ``nonnegative`` accumulator (None otherwise).
        """
        xp = array_namespace(_leaves(self._value)[0], names=("value",))
        value = self._value if scale == 1.0 else _map(lambda v: v * scale, self._value)
        if self._unknown:
            # NaN, without the (slow) square root of NaNs, and as a read-only broadcast
            # of one NaN: writing D NaNs would cost a tenth of a gradient step.
            se = _map(
                lambda v: xp.broadcast_to(
                    xp.full((), float("nan"), dtype=v.dtype, device=device_of(v)), v.shape
                ),
                value,
            )
        elif scale == 1.0:
            se = _map(xp.sqrt, self._variance)
        else:
            se = _map(lambda v: xp.sqrt(v) * scale, self._variance)
        dof = self.degrees_of_freedom()
        floor = 0.0 if self._nonnegative else None
        return Estimate(value, se, self.num_probes, dof, floor)

    def relative_std_error(self) -> float:
        """SE / ``|value|`` of a scalar accumulator (inf when the value is 0, NaN if unknown)."""
        if self._value is None or isinstance(self._value, dict) or self._value.ndim != 0:
            msg = "relative_std_error needs an accumulator of a scalar (0-d) quantity."
            raise ValueError(msg)
        value = abs(float(self._value))
        se = math.sqrt(float(self._variance)) if float(self._variance) >= 0 else math.nan
        if math.isnan(se):
            return math.nan
        return math.inf if value == 0.0 else se / value

    def __repr__(self) -> str:
        return (
            f"Accumulator(batches={self._num_batches}, inputs={self._num_inputs}, "
            f"probes={self.num_probes}, value={_describe(self._value)})"
        )


def _wide(x: Any) -> Any:
    """``x`` in float64 where its library and device have it (else as it is).

    The Welch–Satterthwaite terms V² / d square a variance, itself a squared standard
    error: in float32 they underflow for standard errors below about 1e-10 (the
    degrees of freedom came out NaN) and overflow above about 1e9. float64 holds them
    for any float32 input; JAX without x64 and torch's MPS have no float64.
    """
    xp = array_namespace(x, names=("variance",))
    if x.dtype == xp.float64:
        return x
    if type(x).__module__.startswith("jax"):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return x
    try:
        return xp.astype(x, xp.float64)
    except (TypeError, RuntimeError):  # a device without float64 (MPS)
        return x


def _welch_of(variance: Any, dof: Any) -> Any:
    """V² / d leafwise: one stratum's Welch–Satterthwaite term (0 for d = ∞, NaN for d ≤ 0).

    In float64 where available (``_wide``).
    """

    def term(v: Any, d: Any) -> Any:
        v = _wide(v)
        if isinstance(d, int | float):
            if d == math.inf:
                return v * 0.0
            return v * v / d if d > 0 else v * math.nan
        xp = array_namespace(v, names=("variance",))
        ok = d > 0
        return xp.where(ok, v * v / xp.where(ok, d, xp.ones_like(d)), xp.full_like(v, math.nan))

    if isinstance(variance, dict):
        return {k: term(v, dof[k] if isinstance(dof, dict) else dof) for k, v in variance.items()}
    return term(variance, dof)


def _layout(tree: Any) -> Any:
    """Names, shapes and dtypes of an accumulated quantity, in a rank-independent order."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return tuple((k, tuple(tree[k].shape), str(tree[k].dtype)) for k in sorted(tree))
    return (tuple(tree.shape), str(tree.dtype))


def _describe(tree: Any) -> str:
    if tree is None:
        return "nothing"
    if isinstance(tree, dict):
        return f"blocks {sorted(tree)}"
    return f"an array of shape {tuple(tree.shape)}"


# --------------------------------------------------------------------------- #
# the running sums of the estimators


class ProbeMoments(NamedTuple):
    """One batch's M per-probe samples, reduced by the adapter: a stratum without (M, D).

    ``mean`` (1/M) Σ_m s_m, ``variance`` the unbiased sample variance over the
    probes (None for M = 1), ``num_probes`` M, ``traces`` the per-probe trace
    samples (M,) (None when no trace summary was asked for).
    """

    mean: Any
    variance: Any
    num_probes: int
    traces: Any = None


def moments_of_samples(samples: Array, xp: Any, *, traces: bool) -> ProbeMoments:
    """The ``ProbeMoments`` of per-probe samples (M, D), in three passes over them.

    From the power sums S₁ = Σ_m s_m and S₂ = Σ_m s_m²: mean S₁ / M and variance
    (S₂ − S₁² / M) / (M − 1), clamped at 0 (relative rounding error about
    eps · (1 + mean² / variance), see the torch adapter's ``_square_moments``);
    the trace samples Σ_i s_mi (M,) only with ``traces``. ``Accumulator.update``
    takes the two-pass route (mean, then deviations) and the trace summary five
    or six passes in all; the estimators' samples are large (M × D).
    """
    m = int(samples.shape[0])
    per_probe = xp.sum(samples, axis=1) if traces else None
    if m == 1:
        return ProbeMoments(samples[0, ...], None, 1, per_probe)
    s1 = xp.sum(samples, axis=0)
    s2 = xp.sum(samples * samples, axis=0)
    var = xp.clip((s2 - s1 * s1 / m) / (m - 1), min=0.0)
    return ProbeMoments(s1 / m, var, m, per_probe)


class PerExampleRows:
    """Rows (N·k, D) of a per-example factor and the k per-draw diagonal samples (k, D)."""

    def __init__(self, rows: Array, diagonal: Array) -> None:
        self.rows = rows
        self.diagonal = diagonal


class SampleSum:
    """Per-probe samples of a quantity, one stratum per batch, and their trace summary."""

    def __init__(self, quantity: Any) -> None:
        self.quantity = quantity
        # Diagonal and trace samples are squares (≥ 0): their intervals correct for skew.
        self.nonnegative = getattr(quantity, "what", "") in ("diagonal", "trace")
        self.acc = Accumulator(nonnegative=self.nonnegative)  # the value
        self.trace = Accumulator(nonnegative=True)  # the summary behind target_relative_error
        #: Whether to keep the trace summary (only a target_relative_error reads it;
        #: for the diagonal it costs a pass over the (M, D) samples).
        self.track_trace = True

    def gamma_like(self, flag: bool) -> None:
        """Whether the value's intervals get the skew correction (before any batch).

        Squares are ≥ 0, but only gamma-like ones (squared probe sums) gain from
        the cube-root scale; Monte Carlo's squared scores of sampled labels do not.
        """
        self.nonnegative = self.nonnegative and flag
        self.acc = Accumulator(nonnegative=self.nonnegative)

    def add(self, samples: Any, num_inputs: int, xp: Any, *, same_inputs: bool) -> None:
        if isinstance(samples, ProbeMoments):
            new = Accumulator(nonnegative=self.nonnegative)._update_moments(samples, num_inputs)
            traces = samples.traces
        else:
            new = Accumulator(nonnegative=self.nonnegative).update(samples, num_inputs=num_inputs)
            traces = self.quantity.trace(samples, xp) if self.track_trace else None
        pool = same_inputs and self.acc.num_batches > 0
        if pool:
            self.acc.pool(new)
        else:
            self.acc.merge(new)
        if not self.track_trace:
            return
        assert traces is not None  # the estimators ask for them when they track the trace
        new_trace = Accumulator(nonnegative=True).update(traces, num_inputs=num_inputs)
        if pool:
            self.trace.pool(new_trace)
        else:
            self.trace.merge(new_trace)

    def global_trace_terms(self, active: bool) -> list[float]:
        """(trace value, its variance, Σ V²/d, active) of this rank, for the lockstep target.

        Summed over the ranks: the trace estimate, its variance and the
        Welch–Satterthwaite denominator of its dof.
        """
        t = self.trace
        if t.value is None:
            return [0.0, 0.0, 0.0, float(active)]
        return [float(t.value), float(t.variance), float(t._welch_terms()), float(active)]

    def all_reduce(self, coll: Collective) -> None:
        self.acc.all_reduce(coll)
        if self.track_trace:
            self.trace.all_reduce(coll)

    @property
    def reduced_trace_error(self) -> tuple[float, float]:
        return self.trace_error(None)

    def trace_error(self, xp: Any) -> tuple[float, float]:
        """SE / |value| of the trace estimate and its dof (NaN, NaN before any batch)."""
        del xp  # the running sums' interface: FactorSum computes with it
        if self.trace.value is None:
            return math.nan, math.nan
        return self.trace.relative_std_error(), float(self.trace.degrees_of_freedom())

    def estimate(self, scale: float, xp: Any) -> Estimate:
        del xp  # the running sums' interface: RowStack and FactorSum compute with it
        return self.acc.scaled_estimate(scale)


class RowStack(SampleSum):
    """The per-example factor rows (k draws per input) and the diagonal's samples."""

    def __init__(self, quantity: Any) -> None:
        super().__init__(quantity)
        self.rows: list[Array] = []

    def add(self, samples: Any, num_inputs: int, xp: Any, *, same_inputs: bool) -> None:
        self.rows.append(samples.rows)
        super().add(samples.diagonal, num_inputs, xp, same_inputs=same_inputs)

    def all_reduce(self, coll: Collective) -> None:
        super().all_reduce(coll)
        xp = array_namespace(self.rows[0], names=("rows",))
        local = self.rows[0] if len(self.rows) == 1 else xp.concat(self.rows, axis=0)
        self.rows = [coll.gather_rows(local)]

    def estimate(self, scale: float, xp: Any) -> Estimate:
        # Per-example rows of k draws: F̂ = (1/k) Σ rowsᵀ rows.
        k = self.acc.num_probes
        est = self.acc.scaled_estimate(scale)
        rows = self.rows[0] if len(self.rows) == 1 else xp.concat(self.rows, axis=0)
        return Estimate(rows * math.sqrt(scale / k), est.std_error, k, est.dof, est.floor)


class FactorSum:
    """The detach-and-mix factor: per-probe gradient sums g_m (M, D) over batches."""

    def __init__(self) -> None:
        self.factor: Array = None

    def add(self, samples: Any, num_inputs: int, xp: Any, *, same_inputs: bool) -> None:
        del num_inputs  # the running sums' interface: the factor is scaled at the end
        if self.factor is None:
            self.factor = samples
        elif same_inputs:
            self.factor = xp.concat([self.factor, samples], axis=0)
        else:
            self.factor = self.factor + samples

    def global_trace_terms(self, active: bool) -> list[float]:  # pragma: no cover - refused
        return [0.0, 0.0, 0.0, float(active)]

    def all_reduce(self, coll: Collective) -> None:
        self.factor = coll.sum(self.factor)

    @property
    def reduced_trace_error(self) -> tuple[float, float]:  # pragma: no cover - refused
        return math.nan, math.nan

    def trace_error(self, xp: Any) -> tuple[float, float]:
        """SE / |value| of the M-probe trace estimate ‖g_m‖² and its dof M − 1."""
        m = int(self.factor.shape[0])
        if m < 2:
            return math.nan, math.nan
        est = estimate_from_samples(xp.sum(self.factor * self.factor, axis=1), xp)
        value = abs(float(est.value))
        return (math.inf if value == 0.0 else float(est.std_error) / value), float(m - 1)

    def estimate(self, scale: float, xp: Any) -> Estimate:
        g = self.factor
        m = int(g.shape[0])
        if m < 2:
            nan = xp.full_like(g[0, ...], float("nan"))
            return Estimate(g * math.sqrt(scale), nan, m, m - 1, 0.0)
        diag_samples = g * g
        mean = xp.mean(diag_samples, axis=0)
        var = variance_of_mean(diag_samples, mean, m, xp)
        return Estimate(g * math.sqrt(scale / m), xp.sqrt(var) * scale, m, m - 1, 0.0)
