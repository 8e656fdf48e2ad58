"""Unbiased random estimates of the Fisher metric with honest error bars (THEORY §3).

The **detach-and-mix** estimator backpropagates, for every probe m, ONE scalar
through the whole batch,

    h_m(θ) = Σ_x c_xmᵀ z_x(θ),    c_xm = B(z̃_x) ξ_xm   (detached),

with B Bᵀ = K the core factor of the output family (``family.sqrt_metric_matvec``:
for the categorical family column y of B is √p_y (e_y − p), the weight is √p̃,
not p̃) and ξ_xm i.i.d. Rademacher (or Gaussian) probes. Its gradient

    g_m = ∂h_m/∂θ = Σ_x J_xᵀ B_x ξ_xm

satisfies E[g_m g_mᵀ] = F = Σ_x J_xᵀ K(z_x) J_x, because the probes of different
inputs are independent: no per-example gradients are needed. From the M vectors
g_m (one ``vjp_batch`` call per batch): the diagonal g ⊙ g, the blocks g_b g_bᵀ,
the trace ‖g‖² and the low-rank factor [g_1 … g_M] of F. The kernel selects the
quantity: ``"exact"`` F, ``"upper"`` the DG bound F_DG (h_DG = Σ ξ √p̃ z),
``"lower"`` the LR bound F_LR (one sign per input), and ``Bernoulli()`` gives the
multi-label estimator.

Variance (Rademacher, one probe): Var(g_i²) = 2(F_ii² − Σ_k b_ik⁴) ≤ 2 F_ii², so
the coefficient of variation of every diagonal entry is at most √2, and at most
√(2/M) for the mean of M probes; Var(‖g‖²) ≤ 2‖F‖_F². Gaussian probes have
Var(g_i²) = 2 F_ii² exactly (Rademacher is never worse). The closed forms are in
``fisherbound.variance``.

``per_example=True`` keeps the same probes but sums the squares per input,
Σ_x (J_xᵀ B_x ξ_xm)², through the adapter's ``sum_squared_per_example_vjp``:
also unbiased, and much less variable (the cross-input terms, which cancel only
on average, are gone), at the price of per-example squares.

For comparison, ``monte_carlo`` (labels sampled from the model, per-example
scores) and ``empirical`` (observed labels, biased) return estimates of the same
shapes.

Error bars. Each batch is a stratum: its M per-probe samples give a mean and a
sample variance; the estimate of the data set is the sum over batches of the
batch means and its variance the sum of the batches' variances of the mean
(probes of different batches are independent). This is what ``Accumulator``
stores; it merges across batches, calls and processes by addition. The standard
error is the Monte-Carlo error of the probes, conditional on the inputs: it does
not include the sampling of the inputs from a population.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from fisherbound._lib import (
    Estimate,
    array_namespace,
    as_generator,
    check_choice,
    check_positive_int,
    device_of,
    probes,
)
from fisherbound._lib._collective import Collective, collective
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.fisher import _agree, _batches, _check_family, _named_blocks
from fisherbound.linearization import Linearization

Array = Any

__all__ = [
    "Accumulator",
    "detach_and_mix",
    "empirical",
    "monte_carlo",
]

WHATS = ("diagonal", "trace", "blocks", "full")
DISTRIBUTIONS = ("rademacher", "gaussian")
REDUCTIONS = ("sum", "mean")

#: Default limit on the size of one parameter block for ``what="blocks"``.
DEFAULT_MAX_BLOCK_SIZE = 4096

#: With a single linearization and ``target_relative_error``, at most this many
#: rounds of ``num_probes`` probes are drawn unless ``max_batches`` says otherwise.
DEFAULT_MAX_ROUNDS = 64


# --------------------------------------------------------------------------- #
# The mergeable accumulator


def _map(f: Any, *trees: Any) -> Any:
    """Apply ``f`` leafwise to arrays or to dicts of arrays (the blocks)."""
    if isinstance(trees[0], dict):
        return {k: f(*(t[k] for t in trees)) for k in trees[0]}
    return f(*trees)


def _leaves(tree: Any) -> list[Any]:
    return list(tree.values()) if isinstance(tree, dict) else [tree]


class Accumulator:
    """A sum of independent unbiased estimates, with its variance: mergeable.

    Each ``update(samples)`` adds one *stratum*: the M per-probe samples of one
    batch's contribution (an array (M, ...) or a dict of them). The stratum
    contributes its sample mean to ``value`` and the estimated variance of that
    mean, s²/M (s² the unbiased sample variance over the M probes; NaN for
    M = 1), to ``variance``. Strata are independent (their probes are), so

        value = Σ_b mean_b,    variance = Σ_b s_b² / M_b

    is an unbiased estimate of the sum over the data and of its variance, with
    Σ_b (M_b − 1) degrees of freedom: better error bars than treating each
    probe's data-set total as one sample, in O(D) memory.

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
    >>> est.value, est.std_error, est.num_probes
    (array([3., 3.]), array([1.41421356, 0.        ]), 2)
    >>> acc.estimate(reduction="mean").value
    array([0.375, 0.375])
    """

    def __init__(self) -> None:
        self._value: Any = None
        self._variance: Any = None
        self._num_inputs = 0
        self._num_batches = 0
        self._probes: tuple[int, int] | None = None  # (min, max) over strata
        self._unknown = False  # some stratum had one probe: no variance estimate

    # -- read-only state -------------------------------------------------------
    @property
    def value(self) -> Any:
        """Σ_b mean_b: the estimate of the sum over the inputs seen (None if empty)."""
        return self._value

    @property
    def variance(self) -> Any:
        """Σ_b s_b²/M_b: the estimated variance of ``value`` (None if empty).

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
        return cls()._add(value, variance, n, 1, (m, m))

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
            var = _map(lambda s, mu: _variance_of_mean(s, mu, m, xp), samples, mean)
        self._unknown = self._unknown or m < 2
        return self._add(mean, var, num_inputs, 1, (m, m))

    def merge(self, other: Accumulator, /) -> Accumulator:
        """Add the strata of ``other`` (estimates over OTHER inputs). Returns self."""
        if not isinstance(other, Accumulator):
            msg = f"other must be an Accumulator; got {type(other).__name__}."
            raise TypeError(msg)
        if other._value is None:
            return self
        assert other._probes is not None
        self._unknown = self._unknown or other._unknown
        return self._add(
            other._value, other._variance, other._num_inputs, other._num_batches, other._probes
        )

    def pool(self, other: Accumulator, /) -> Accumulator:
        """Combine with an independent estimate of the SAME inputs (more probes).

        With M₁ and M₂ probes per stratum: value (M₁ v₁ + M₂ v₂)/(M₁ + M₂),
        variance (M₁² V₁ + M₂² V₂)/(M₁ + M₂)², M₁ + M₂ probes. Both must cover the
        same number of inputs and use one number of probes in all their strata.
        Returns self.
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
        self._value = _map(lambda a, b: w1 * a + w2 * b, self._value, other._value)
        self._variance = _map(
            lambda a, b: (w1 * w1) * a + (w2 * w2) * b, self._variance, other._variance
        )
        self._probes = (m1 + m2, m1 + m2)
        # Two one-probe estimates of the same inputs still have no variance estimate.
        self._unknown = self._unknown or other._unknown
        return self

    def _add(
        self, value: Any, variance: Any, num_inputs: int, num_batches: int, probes: tuple[int, int]
    ) -> Accumulator:
        if self._value is None:
            self._value, self._variance = value, variance
        else:
            self._check_compatible(value)
            self._value = _map(lambda a, b: a + b, self._value, value)
            self._variance = _map(lambda a, b: a + b, self._variance, variance)
        self._num_inputs += int(num_inputs)
        self._num_batches += int(num_batches)
        if self._probes is None:
            self._probes = probes
        else:
            self._probes = (min(self._probes[0], probes[0]), max(self._probes[1], probes[1]))
        return self

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

    def all_reduce(self, process_group: Any, /) -> Accumulator:
        """Sum the accumulators of all ranks of ``process_group``; every rank gets the total.

        ``process_group`` is a ``torch.distributed`` process group (reduced with
        ``torch.distributed.all_reduce``) or the name of a JAX mapped axis (inside
        ``jax.shard_map``: ``jax.lax.psum``). Values and variances are summed, as
        are the counts of inputs and batches (the strata of different ranks are
        independent: their probes must be, see ``Collective.generator``). Every
        rank must hold at least one stratum of the same quantity (names, shapes
        and dtypes are compared first; a ValueError on every rank otherwise).
        Returns self.

        value = Σ_ranks value_r,  variance = Σ_ranks variance_r,  num_inputs = Σ N_r.

        Cost: two all-reduces of the accumulator's arrays (value and variance; one
        when the variance is unknown) and four of a few integers.
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
        if self._unknown:
            # Some rank's stratum had a single probe: the variance stays unknown (NaN).
            xp = array_namespace(leaves[0], names=("value",))
            self._variance = _map(
                lambda v: xp.full((), float("nan"), dtype=v.dtype, device=device_of(v)),
                self._value,
            )
        else:
            self._variance = coll.sum_tree(self._variance)
        self._num_inputs = coll.sum_int(self._num_inputs)
        self._num_batches = coll.sum_int(self._num_batches)
        return self

    # -- results -----------------------------------------------------------------
    def estimate(self, *, reduction: str = "sum") -> Estimate:
        """The accumulated ``Estimate``: value, standard error √variance, num_probes.

        ``reduction="mean"`` divides value and standard error by ``num_inputs``.
        """
        check_choice(reduction, "reduction", REDUCTIONS)
        if self._value is None:
            msg = "the accumulator is empty; add samples with update(...) first."
            raise ValueError(msg)
        xp = array_namespace(_leaves(self._value)[0], names=("value",))
        scale = 1.0
        if reduction == "mean":
            if self._num_inputs < 1:
                msg = (
                    "reduction='mean' needs the number of inputs; this accumulator was "
                    "updated without num_inputs. Pass num_inputs=... to update()."
                )
                raise ValueError(msg)
            scale = 1.0 / self._num_inputs
        value = self._value if scale == 1.0 else _map(lambda v: v * scale, self._value)
        if self._unknown:  # NaN, without the (slow) square root of NaNs
            se = _map(lambda v: xp.full_like(v, float("nan")), value)
        elif scale == 1.0:
            se = _map(xp.sqrt, self._variance)
        else:
            se = _map(lambda v: xp.sqrt(v) * scale, self._variance)
        return Estimate(value, se, self.num_probes)

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


def _variance_of_mean(s: Array, mu: Array, m: int, xp: Any) -> Array:
    if m < 2:
        return xp.full_like(mu, float("nan"))
    return xp.sum((s - mu) ** 2, axis=0) / ((m - 1) * m)


# --------------------------------------------------------------------------- #
# Streaming and validation helpers


def _check_optional_int(value: Any, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False; got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    return value


def _check_target(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = (
            "target_relative_error must be a positive number (e.g. 0.05) or None; got "
            f"{type(value).__name__} {value!r}."
        )
        raise TypeError(msg)
    t = float(value)
    if not (t > 0.0 and math.isfinite(t)):
        msg = f"target_relative_error must be a positive finite number; got {value!r}."
        raise ValueError(msg)
    return t


def _cotangents(family: Family, z: Array, xi: Array, kernel: str, xp: Any) -> Array:
    """U[m, n] = B(z_n) ξ[m, n], shape (M, N, C), for probes ξ (M, N, R)."""
    if kernel == "lower":
        # One column: compute the top eigenpair once per input, not once per probe.
        b = family.sqrt_metric(z, kernel="lower")[..., 0]  # (N, C)
        return b[None, ...] * xi
    zb = xp.broadcast_to(z[None, ...], (int(xi.shape[0]), *tuple(z.shape)))
    return family.sqrt_metric_matvec(zb, xi, kernel=kernel)


def _samples_from_gradients(g: Array, what: str, selected: list[Any], xp: Any) -> Any:
    """Per-probe samples of ``what`` from the M probe gradients g (M, D)."""
    if what == "full":
        return g
    if what == "diagonal":
        return g * g
    if what == "trace":
        return xp.sum(g * g, axis=1)
    out = {}
    for blk in selected:
        gb = g[:, blk.offset : blk.offset + blk.size]
        out[blk.name] = gb[:, :, None] * gb[:, None, :]
    return out


def _per_example_block_samples(
    lin: Any, ut: Array, selected: list[Any], max_vectors: int | None, xp: Any
) -> dict[str, Array]:
    """Σ_n g_nm[b] g_nm[b]ᵀ for per-example gradients g_nm = J_nᵀ ut[n, m]; (M, s, s).

    The per-example products are taken for chunks of probes (the adapter's
    ``per_example_vjp`` covers every input of the batch), N · chunk D-vectors at a
    time, chunk = max(1, max_vectors // N).
    """
    n, m, _ = ut.shape
    budget = lin.default_max_vectors if max_vectors is None else max_vectors
    chunk = max(1, budget // max(n, 1))
    parts: dict[str, list[Array]] = {blk.name: [] for blk in selected}
    for start in range(0, m, chunk):
        g = lin.per_example_vjp(ut[:, start : min(m, start + chunk), :])  # (N, m_c, D)
        g = xp.permute_dims(g, (1, 0, 2))  # (m_c, N, D)
        for blk in selected:
            gb = g[:, :, blk.offset : blk.offset + blk.size]
            parts[blk.name].append(xp.matmul(xp.matrix_transpose(gb), gb))
    return {k: v[0] if len(v) == 1 else xp.concat(v, axis=0) for k, v in parts.items()}


def _squares_per_example(
    lin: Any,
    u: Array,
    what: str,
    selected: list[Any],
    max_vectors: int | None,
    xp: Any,
) -> Any:
    """Per-draw samples Σ_n (J_nᵀ u[m, n])² (or their blocks) for cotangents u (M, N, C)."""
    ut = xp.permute_dims(u, (1, 0, 2))  # (N, M, C)
    if what == "blocks":
        return _per_example_block_samples(lin, ut, selected, max_vectors, xp)
    sq = lin.sum_squared_per_example_vjp(ut, max_vectors=max_vectors)  # (M, D)
    return sq if what == "diagonal" else xp.sum(sq, axis=1)


def _trace_samples(samples: Any, what: str, xp: Any) -> Array:
    """The per-probe trace samples (M,) implied by per-probe samples of ``what``."""
    if what == "trace":
        return samples
    if what == "diagonal":
        return xp.sum(samples, axis=1)
    total = None
    for s in samples.values():
        t = xp.sum(xp.linalg.diagonal(s), axis=1)
        total = t if total is None else total + t
    return total


def _dm_batch_samples(
    lin: Any,
    family: Family,
    xi: Array,
    *,
    kernel: str,
    what: str,
    per_example: bool,
    selected: list[Any],
    max_vectors: int | None,
    xp: Any,
) -> Any:
    """The M per-probe samples of one batch for probes ξ (M, N, R)."""
    u = _cotangents(family, lin.logits, xi, kernel, xp)
    if per_example:
        return _squares_per_example(lin, u, what, selected, max_vectors, xp)
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
    return _samples_from_gradients(g, what, selected, xp)


class _Running:
    """The running state of one estimator: Accumulators, and the factor for "full"."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.acc = Accumulator()  # the value (for "full": the diagonal of the factor's Gram)
        self.trace = Accumulator()  # the trace summary behind target_relative_error
        self.factor: Array = None  # detach-and-mix "full": per-probe gradient sums (M, D)
        self.rows: list[Array] = []  # per-example estimators' "full": stacked score rows
        self.num_inputs = 0

    def add_batch(self, samples: Any, num_inputs: int, xp: Any, *, same_inputs: bool) -> None:
        if not same_inputs or self.num_inputs == 0:
            self.num_inputs += num_inputs
        if isinstance(samples, _PerExampleRows):
            self.rows.append(samples.rows)
            samples = samples.diagonal
            what = "diagonal"
        elif self.what == "full":
            if self.factor is None:
                self.factor = samples
            elif same_inputs:
                self.factor = xp.concat([self.factor, samples], axis=0)
            else:
                self.factor = self.factor + samples
            return
        else:
            what = self.what
        new = Accumulator().update(samples, num_inputs=num_inputs)
        new_trace = Accumulator().update(_trace_samples(samples, what, xp), num_inputs=num_inputs)
        if same_inputs and self.acc.num_batches:
            self.acc.pool(new)
            self.trace.pool(new_trace)
        else:
            self.acc.merge(new)
            self.trace.merge(new_trace)

    def global_trace_terms(self, active: bool) -> list[float]:
        """(trace value, its variance, active) of this rank, for the lockstep target."""
        t = self.trace
        if t.value is None:
            return [0.0, 0.0, float(active)]
        return [float(t.value), float(t.variance), float(active)]

    def all_reduce(self, coll: Collective) -> None:
        """Sum the states of all ranks (the factor's probes: sums of g_m over ranks)."""
        if self.factor is not None:
            self.factor = coll.sum(self.factor)
        else:
            self.acc.all_reduce(coll)
            self.trace.all_reduce(coll)
        if self.rows:
            xp = array_namespace(self.rows[0], names=("rows",))
            local = self.rows[0] if len(self.rows) == 1 else xp.concat(self.rows, axis=0)
            self.rows = [coll.gather_rows(local)]
        self.num_inputs = coll.sum_int(self.num_inputs)

    @property
    def reduced_trace_error(self) -> float:
        return self.trace.relative_std_error() if self.trace.value is not None else math.nan

    def relative_error(self, xp: Any) -> float:
        if self.factor is None:
            return self.trace.relative_std_error()
        m = int(self.factor.shape[0])
        if m < 2:
            return math.nan
        t = xp.sum(self.factor * self.factor, axis=1)
        mean = xp.mean(t)
        sd = xp.sqrt(xp.sum((t - mean) ** 2) / (m - 1))
        value = abs(float(mean))
        return math.inf if value == 0.0 else float(sd) / math.sqrt(m) / value

    def estimate(self, reduction: str, xp: Any) -> Estimate:
        scale = 1.0 / self.num_inputs if reduction == "mean" else 1.0
        if self.what != "full":
            return self.acc.estimate(reduction=reduction)
        if self.factor is None:
            # Per-example rows of k draws: F̂ = (1/k) Σ rowsᵀ rows.
            k = self.acc.num_probes
            est = self.acc.estimate(reduction=reduction)
            rows = self.rows[0] if len(self.rows) == 1 else xp.concat(self.rows, axis=0)
            return Estimate(rows * math.sqrt(scale / k), est.std_error, k)
        g = self.factor
        m = int(g.shape[0])
        if m < 2:
            return Estimate(g * math.sqrt(scale), xp.full_like(g[0, ...], float("nan")), m)
        diag_samples = g * g
        mean = xp.mean(diag_samples, axis=0)
        var = _variance_of_mean(diag_samples, mean, m, xp)
        return Estimate(g * math.sqrt(scale / m), xp.sqrt(var) * scale, m)


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


def _warn_unreached(target: float, reached: float, batches: int, why: str) -> None:
    msg = (
        f"target_relative_error = {target:g} was not reached: the relative standard error "
        f"of the trace estimate is {reached:.3g} after {batches} batches ({why}). The "
        "estimate covers those batches; stream more data, raise max_batches or num_probes."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- #
# Public functions


def detach_and_mix(
    source: Any,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    what: str = "diagonal",
    num_probes: int = 1,
    rng: Any = None,
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
    process_group: Any = None,
) -> Estimate:
    """The unbiased single-backward-pass ("detach-and-mix") estimate of the Fisher metric.

    For every probe m and batch, one scalar h_m = Σ_x (B(z̃_x) ξ_xm)ᵀ z_x is
    backpropagated (the M cotangents of a batch in ONE ``vjp_batch`` call), giving
    g_m = Σ_x J_xᵀ B_x ξ_xm with E[g_m g_mᵀ] = F_K = Σ_x J_xᵀ K(z_x) J_x
    (THEORY §3). The probes ξ are Rademacher (default) or standard Gaussian,
    drawn on the host, so one seed gives the same numbers on every backend.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family
        The output family (``Categorical()``, ``Bernoulli()`` for multi-label,
        ``Gaussian()``).
    what
        ``"diagonal"`` (D,), ``"trace"`` (0-d), ``"blocks"`` (dict name → (s, s)),
        or ``"full"``: the low-rank factor V (M, D) with F̂ = Vᵀ V (see Returns).
    num_probes
        M, the number of probes per batch (>= 1; >= 2 for a standard error).
    rng
        numpy Generator, int seed or None.
    kernel
        ``"exact"`` (F), ``"upper"`` (the DG bound, h = Σ ξ √p̃ z),
        ``"lower"`` (the LR bound: one sign per input), or the scalar envelopes.
    distribution
        ``"rademacher"`` (never worse) or ``"gaussian"``.
    per_example
        Sum the squares per input, Σ_x (J_xᵀ B_x ξ_xm)², through the adapter's
        ``sum_squared_per_example_vjp`` (``what`` "diagonal", "trace" or
        "blocks"): each input's term has CV ≤ √2 and the sum over inputs averages
        them; the batch-level default squares the sum over inputs.
    reduction
        ``"sum"`` over inputs (default) or ``"mean"``.
    target_relative_error
        Stop streaming batches once the relative standard error of the TRACE
        estimate, SE(tr F̂)/tr F̂, is at or below this (checked after every batch;
        needs ``num_probes >= 2``). The estimate then covers the batches consumed:
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
        probe), ``num_probes`` M. For ``what="full"``: ``value`` is the factor
        V = [g_1; …; g_M] / √M (M, D) (scaled by 1/√N for ``reduction="mean"``),
        whose Gram matrix Vᵀ V = (1/M) Σ_m g_m g_mᵀ is the rank-≤M estimate of F,
        with g_m summed over batches; ``std_error`` (D,) is the standard error of
        the diagonal of Vᵀ V. The a-priori bound on the standard error is
        ``fisherbound.variance.std_error_bound(value, num_probes=M)``
        (CV ≤ √(2/M) for the diagonal and the trace).

    Notes
    -----
    Cost per batch: the linearization's forward pass and ONE batched VJP of M
    cotangents (about M backward passes; never per-example gradients), plus
    O(M N C) for the cotangents. ``per_example=True`` costs the adapter's
    per-example squares with M cotangents (the torch fast path for Linear / Conv
    / norm layers: one batched backward pass). Memory: M D-vectors per batch
    (blocks: M s² per block).

    Variance (Rademacher, one probe, one batch): Var(g_i²) = 2(F_ii² − Σ_k b_ik⁴)
    ≤ 2 F_ii² (``fisherbound.variance.detach_and_mix_variance`` gives it exactly).

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
    fam = _check_family(family)
    check_choice(what, "what", WHATS)
    m = check_positive_int(num_probes, "num_probes")
    gen = as_generator(rng)
    coll = collective(process_group)
    check_choice(kernel, "kernel", KERNELS)
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    per_example = _check_bool(per_example, "per_example")
    check_choice(reduction, "reduction", REDUCTIONS)
    target = _check_target(target_relative_error)
    limit = _check_optional_int(max_batches, "max_batches")
    max_block_size = check_positive_int(max_block_size, "max_block_size")
    if max_vectors is not None:
        check_positive_int(max_vectors, "max_vectors")
    if per_example and what == "full":
        msg = (
            "per_example=True supports what='diagonal', 'trace' and 'blocks'; got "
            "what='full' (a per-example factor would have N·M rows). Use per_example=False."
        )
        raise ValueError(msg)
    single = isinstance(source, Linearization)
    if target is not None and m < 2:
        msg = (
            "target_relative_error needs num_probes >= 2 (a standard error needs two "
            f"probes per batch or round); got num_probes = {m}."
        )
        raise ValueError(msg)
    _check_distributed_target(coll, target, what)
    if coll is not None:
        gen = coll.generator(gen)  # independent probes on every rank

    def draw(lin: Any, selected: list[Any]) -> Any:
        xp = lin.xp
        r = fam.sqrt_rank(int(lin.logits.shape[-1]), kernel=kernel)
        xi = probes(
            gen,
            (m, lin.num_inputs, r),
            distribution=distribution,
            xp=xp,
            dtype=lin.logits.dtype,
            device=lin.device,
        )
        return _dm_batch_samples(
            lin,
            fam,
            xi,
            kernel=kernel,
            what=what,
            per_example=per_example,
            selected=selected,
            max_vectors=max_vectors,
            xp=xp,
        )

    return _run(
        source,
        fam,
        draw,
        what=what,
        reduction=reduction,
        target=target,
        limit=limit,
        blocks=blocks,
        max_block_size=max_block_size,
        progress=progress,
        desc="detach-and-mix",
        rounds=single and target is not None,
        coll=coll,
        options={
            "what": what,
            "num_probes": m,
            "kernel": kernel,
            "distribution": distribution,
            "per_example": per_example,
            "blocks": None if blocks is None else tuple(blocks),
        },
    )


def _run(
    source: Any,
    family: Family,
    draw: Any,
    *,
    what: str,
    reduction: str,
    target: float | None,
    limit: int | None,
    blocks: Sequence[str] | None,
    max_block_size: int,
    progress: bool | None,
    desc: str,
    rounds: bool,
    coll: Collective | None = None,
    options: dict[str, Any] | None = None,
) -> Estimate:
    """Stream the batches (or, with ``rounds``, redraw on one batch) and accumulate.

    With a collective, the ranks' states are all-reduced at the end; with a target
    as well, the ranks step in lockstep and stop together once the all-reduced
    trace estimate reaches it (or when every rank has run out of batches).
    """
    if coll is not None:
        # Before any data-dependent collective: every rank runs the same call.
        settings = {"what": what, "reduction": reduction, "target_relative_error": target}
        settings |= {"max_batches": limit, "rounds of probes on one batch": rounds}
        coll.agree(settings | dict(options or {}), where=desc)
    state = _Running(what)
    selected: list[Any] = []
    first: Any = None
    count = 0
    reached = False
    if rounds:
        (lin,) = list(_batches(source, family, desc=desc, progress=False))
        max_rounds = DEFAULT_MAX_ROUNDS if limit is None else limit
        steps: Iterator[Any] = (lin for _ in range(max_rounds))
        why = f"max_batches = {max_rounds} rounds of probes"
    else:
        steps = _batches(
            source, family, desc=desc, progress=progress, limit=limit, allow_empty=coll is not None
        )
        why = ""
    while True:
        lin = next(steps, None)
        if lin is not None:
            if first is None:
                first = lin
                if what == "blocks":
                    selected = _named_blocks(lin, blocks, max_block_size, owner="what='blocks'")
            state.add_batch(draw(lin, selected), lin.num_inputs, lin.xp, same_inputs=rounds)
            count += 1
        if target is None:
            if lin is None:
                break
            continue
        if coll is None:
            if lin is None:
                break
            if state.relative_error(lin.xp) <= target:
                reached = True
                break
            continue
        # Lockstep: the trace estimate over all ranks, and whether any rank went on.
        value, variance, active = coll.sum_floats(state.global_trace_terms(lin is not None))
        if variance >= 0.0 and value != 0.0 and math.sqrt(variance) / abs(value) <= target:
            reached = True
            break
        if active == 0.0:
            break
    if not rounds:
        why = "the data ran out" if limit is None or count < limit else f"max_batches = {limit}"
    fam_opts = dict(options or {})
    if coll is not None:
        _agree(coll, first, family, where=desc, **fam_opts)
        state.all_reduce(coll)
    xp = first.xp
    if target is not None and not reached:
        error = state.relative_error(xp) if coll is None else state.reduced_trace_error
        _warn_unreached(target, error, count, why)
    return state.estimate(reduction, xp)


def monte_carlo(
    source: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    num_samples: int = 1,
    rng: Any = None,
    reduction: str = "sum",
    target_relative_error: float | None = None,
    max_batches: int | None = None,
    blocks: Sequence[str] | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Estimate:
    """The Monte-Carlo Fisher: k labels sampled from the model per input, per-example scores.

    For draw j, y_xj ~ p(· | z_x) and s_xj = J_xᵀ ∇_z log p(y_xj | z_x) (the score
    cotangent ``family.score``); the sample is Σ_x s_xj s_xjᵀ (diagonal: the
    per-example squares Σ_x s_xj ⊙ s_xj, through the adapter's
    ``sum_squared_per_example_vjp``). Unbiased for F; its CV is unbounded: in core
    coordinates Var = p_i(1 − p_i)(1 − 2p_i)², large for confident models
    (THEORY §3). ``fisherbound.variance.classical_variance`` gives the exact
    variance (Î_1 of THEORY §4).

    Parameters are those of ``detach_and_mix`` with ``num_samples`` = k draws per
    input in place of probes (the standard error is over the k draws; NaN for
    k = 1). ``what="full"`` returns the factor of all per-example scores
    (Σ_b N_b k rows, divided by √k; F̂ = Vᵀ V) with the standard error of its
    diagonal.

    Cost per batch: the adapter's per-example squares with k cotangents (per-example
    gradients on its generic path).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> from fisherbound.estimators import monte_carlo
    >>> lin = linearize(MLP.random([4, 8, 3], rng=0), np.ones((16, 4)))
    >>> monte_carlo(lin, num_samples=8, rng=0).value.shape
    (67,)
    """
    fam = _check_family(family)
    check_choice(what, "what", WHATS)
    k = check_positive_int(num_samples, "num_samples")
    gen = as_generator(rng)
    coll = collective(process_group)
    check_choice(reduction, "reduction", REDUCTIONS)
    target = _check_target(target_relative_error)
    limit = _check_optional_int(max_batches, "max_batches")
    max_block_size = check_positive_int(max_block_size, "max_block_size")
    if max_vectors is not None:
        check_positive_int(max_vectors, "max_vectors")
    single = isinstance(source, Linearization)
    if target is not None and k < 2:
        msg = (
            "target_relative_error needs num_samples >= 2 (a standard error needs two "
            f"draws per batch); got num_samples = {k}."
        )
        raise ValueError(msg)
    _check_distributed_target(coll, target, what)
    if coll is not None:
        gen = coll.generator(gen)  # independent label draws on every rank

    def draw(lin: Any, selected: list[Any]) -> Any:
        xp = lin.xp
        z = lin.logits
        y = fam.sample(z, rng=gen, num_samples=k)  # (k, N) or (k, N, C)
        zb = xp.broadcast_to(z[None, ...], (k, *tuple(z.shape)))
        u = fam.score(zb, y)  # (k, N, C)
        return _score_samples(lin, u, what, selected, max_vectors, xp)

    est = _run(
        source,
        fam,
        draw,
        what=what,
        reduction=reduction,
        target=target,
        limit=limit,
        blocks=blocks,
        max_block_size=max_block_size,
        progress=progress,
        desc="Monte-Carlo Fisher",
        rounds=single and target is not None,
        coll=coll,
        options={
            "what": what,
            "num_samples": k,
            "blocks": None if blocks is None else tuple(blocks),
        },
    )
    return est


def _score_samples(
    lin: Any, u: Array, what: str, selected: list[Any], max_vectors: int | None, xp: Any
) -> Any:
    """Per-draw samples from per-example score cotangents u (k, N, C)."""
    if what != "full":
        return _squares_per_example(lin, u, what, selected, max_vectors, xp)
    k, n, _ = u.shape
    g = lin.per_example_vjp(xp.permute_dims(u, (1, 0, 2)))  # (N, k, D)
    return _PerExampleRows(xp.reshape(g, (n * k, -1)), xp.sum(g * g, axis=0))


class _PerExampleRows:
    """Rows (N·k, D) of a per-example factor and the k per-draw diagonal samples (k, D)."""

    def __init__(self, rows: Array, diagonal: Array) -> None:
        self.rows = rows
        self.diagonal = diagonal


def empirical(
    source: Any,
    labels: Any,
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    reduction: str = "sum",
    max_batches: int | None = None,
    blocks: Sequence[str] | None = None,
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE,
    max_vectors: int | None = None,
    progress: bool | None = None,
    process_group: Any = None,
) -> Estimate:
    """The empirical Fisher: per-example scores at the OBSERVED labels (biased).

    Σ_x s_x s_xᵀ with s_x = J_xᵀ ∇_z log p(y_x|z_x) for the observed y_x; its
    diagonal is Σ_x s_x ⊙ s_x (the adapter's per-example squares). It is not an
    estimate of F: E over y ~ p would give F, the observed labels do not (THEORY §3).
    Cost: one per-example VJP per input (the diagonal through the adapter's
    per-example squares, as ``fisher_diagonal`` with one cotangent instead of C).

    Parameters
    ----------
    source
        A linearization or an iterable of them.
    labels
        The observed labels: one array for all inputs (sliced batch by batch in
        order; it must have exactly as many rows as the source has inputs), or a
        list of arrays, one per batch. Categorical: integer class indices (N,);
        Bernoulli: {0, 1} floats (N, C); Gaussian: targets (N, C); validated by
        ``family.check_labels``; same namespace and device as the logits.
    family, what, reduction, max_batches, blocks, max_block_size, max_vectors, progress
        As in ``detach_and_mix``.

    Returns
    -------
    Estimate
        ``value`` of the shape of the exact quantity. ``std_error`` is ZERO: given
        the inputs and labels the empirical Fisher is deterministic (no Monte-Carlo
        error); its error as an estimate of F is a bias that no standard error can
        show (compare with ``fisherbound.fisher.fisher_diagonal``). ``num_probes``
        is 1. ``what="full"``: the factor of the per-example scores (N, D).

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
    fam = _check_family(family)
    check_choice(what, "what", WHATS)
    check_choice(reduction, "reduction", REDUCTIONS)
    limit = _check_optional_int(max_batches, "max_batches")
    max_block_size = check_positive_int(max_block_size, "max_block_size")
    if max_vectors is not None:
        check_positive_int(max_vectors, "max_vectors")
    batch_labels = _label_source(labels)
    coll = collective(process_group)

    def draw(lin: Any, selected: list[Any]) -> Any:
        xp = lin.xp
        y = batch_labels.take(lin)
        fam.check_labels(lin.logits, y)
        u = fam.score(lin.logits, y)[None, ...]  # (1, N, C)
        return _score_samples(lin, u, what, selected, max_vectors, xp)

    est = _run(
        source,
        fam,
        draw,
        what=what,
        reduction=reduction,
        target=None,
        limit=limit,
        blocks=blocks,
        max_block_size=max_block_size,
        progress=progress,
        desc="empirical Fisher",
        rounds=False,
        coll=coll,
        options={"what": what, "blocks": None if blocks is None else tuple(blocks)},
    )
    if limit is None or batch_labels.batches < limit:
        # Only a source that was read to its end can be checked for unused labels.
        batch_labels.finish()
    xp = array_namespace(_leaves(est.std_error)[0], names=("std_error",))
    zero = _map(xp.zeros_like, est.std_error)
    return Estimate(est.value, zero, 1)


class _LabelSource:
    """Labels for each batch: slices of one array, or one array per batch."""

    def __init__(self, labels: Any) -> None:
        self.whole: Any = None
        self.parts: Iterator[Any] | None = None
        if isinstance(labels, list | tuple):
            self.parts = iter(labels)
            self.total = len(labels)
        else:
            array_namespace(labels, names=("labels",))
            self.whole = labels
            self.total = int(labels.shape[0]) if labels.ndim >= 1 else 0
        self.offset = 0
        self.batches = 0

    def take(self, lin: Any) -> Any:
        n = lin.num_inputs
        i = self.batches
        self.batches += 1
        if self.parts is not None:
            y = next(self.parts, None)
            if y is None:
                msg = (
                    f"labels must hold one array per batch; got {self.total} arrays but the "
                    f"source has more batches (batch {i} has no labels)."
                )
                raise ValueError(msg)
            array_namespace(y, lin.logits, names=(f"labels[{i}]", "the logits"))
            if y.ndim < 1 or int(y.shape[0]) != n:
                msg = (
                    f"labels[{i}] must have one row per input of batch {i} ({n}); got shape "
                    f"{tuple(y.shape)}."
                )
                raise ValueError(msg)
            return y
        y_all = self.whole
        array_namespace(y_all, lin.logits, names=("labels", "the logits"))
        if self.offset + n > self.total:
            msg = (
                f"labels must have one row per input of the source; got {self.total} rows but "
                f"the source has more inputs (batch {i} needs rows {self.offset}.."
                f"{self.offset + n - 1})."
            )
            raise ValueError(msg)
        y = y_all[self.offset : self.offset + n, ...]
        self.offset += n
        return y

    def finish(self) -> None:
        if self.whole is not None and self.offset != self.total:
            msg = (
                f"labels must have one row per input of the source; got {self.total} rows but "
                f"the source has {self.offset} inputs."
            )
            raise ValueError(msg)
        if self.parts is not None and self.batches != self.total:
            msg = (
                f"labels must hold one array per batch; got {self.total} arrays for "
                f"{self.batches} batches."
            )
            raise ValueError(msg)


def _label_source(labels: Any) -> _LabelSource:
    return _LabelSource(labels)
