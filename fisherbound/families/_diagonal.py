"""The families with a diagonal metric: Bernoulli (multi-label) and Gaussian (regression)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from fisherbound._lib import check_finite, device_of, probes, uniform
from fisherbound.families._base import Family, one_hot
from fisherbound.families._checks import check_label_array, check_label_support

Array = Any


def sigmoid_parts(z: Array, xp: Any) -> tuple[Array, Array]:
    """(σ(z), σ(z)(1 − σ(z))) from e = exp(−|z|): no overflow for any finite z."""
    e = xp.exp(-xp.abs(z))
    one_plus = 1.0 + e
    sig = xp.where(z >= 0.0, 1.0 / one_plus, e / one_plus)
    return sig, e / (one_plus * one_plus)


def softplus(z: Array, xp: Any) -> Array:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(−|z|))."""
    return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))


class _DiagonalFamily(Family):
    """A family whose metric is diag(d(z)): exact = upper, eigenpairs from d."""

    __slots__ = ()

    def _eigvalsh(self, z: Array, xp: Any) -> Array:
        return xp.sort(self._upper_diag(z, xp), axis=-1)

    def _top_eigenpair(self, z: Array, xp: Any) -> tuple[Array, Array]:
        d = self._upper_diag(z, xp)
        k = xp.argmax(d, axis=-1)
        return xp.max(d, axis=-1), one_hot(k, int(z.shape[-1]), z.dtype, xp)

    def _scalar_upper(self, z: Array, xp: Any) -> Array:
        return xp.max(self._upper_diag(z, xp), axis=-1)

    def _scalar_lower(self, z: Array, xp: Any) -> Array:
        return xp.min(self._upper_diag(z, xp), axis=-1)

    def _lambda_max_bounds(self, z: Array, xp: Any) -> tuple[Array, Array]:
        top = xp.max(self._upper_diag(z, xp), axis=-1)
        return top, top


class Bernoulli(_DiagonalFamily):
    r"""C independent binary outputs (multi-label): :math:`p_c=\sigma(z_c), t(y)=y\in\{0,1\}^C`.

    Core metric :math:`I(z) = \operatorname{diag}(\sigma(z) \odot (1 - \sigma(z)))`, square root
    :math:`\operatorname{diag}\big(\sqrt{\sigma(1 - \sigma)}\big)`; the
    upper envelope is :math:`I` itself, the lower one :math:`\lambda_{\max} e_k e_k^\top` at the
    largest entry, the scalar ones (min / max entry) :math:`\cdot\, I`. Labels are floats in
    :math:`[0, 1]` of shape (..., C): binary labels, or soft targets (label smoothing,
    distillation, as ``BCEWithLogitsLoss`` takes them). For a soft target :math:`y` the
    log-likelihood is the soft cross-entropy's negative
    :math:`\sum_c [y_c z_c - \operatorname{softplus}(z_c)]` and the score :math:`y - \sigma(z)`
    its gradient; the metric does not depend on :math:`y`.

    Examples
    --------
    >>> import numpy as np
    >>> Bernoulli().metric(np.array([0.0, 0.0]))
    array([[0.25, 0.  ],
           [0.  , 0.25]])
    """

    __slots__ = ()
    _jit_safe = True

    def probabilities(self, z: Array, /) -> Array:
        r""":math:`\sigma(z)`, shape (..., C): the same as ``mean``, the paper's name."""
        return self.mean(z)

    def _mean(self, z: Array, xp: Any) -> Array:
        return sigmoid_parts(z, xp)[0]

    def _check_labels(
        self, z: Array, y: Array, xp: Any, names: tuple[str, str] = ("z", "y")
    ) -> None:
        check_label_array(z, y, kind="real floating", shape=tuple(z.shape), names=names)
        bad = ~((y >= 0.0) & (y <= 1.0))  # NaN fails both comparisons
        check_label_support(
            bad,
            xp,
            names[1],
            "values in [0, 1] (binary labels 0.0 / 1.0 or soft targets)",
            "values outside [0, 1] or NaN",
        )

    def _log_likelihood(self, z: Array, y: Array, xp: Any) -> Array:
        y = xp.astype(y, z.dtype)
        return xp.sum(y * z - softplus(z, xp), axis=-1)

    def _score(self, z: Array, y: Array, xp: Any) -> Array:
        return xp.astype(y, z.dtype) - sigmoid_parts(z, xp)[0]

    def _sample(self, z: Array, gen: Any, lead: tuple[int, ...], xp: Any) -> Array:
        u = uniform(gen, lead + tuple(z.shape), xp=xp, dtype=z.dtype, device=device_of(z))
        return xp.astype(u < sigmoid_parts(z, xp)[0], z.dtype)

    def _upper_diag(self, z: Array, xp: Any) -> Array:
        return sigmoid_parts(z, xp)[1]

    def _sqrt_upper_diag(self, z: Array, xp: Any) -> Array:
        """√(σ(1 − σ)) = exp(−|z|/2) / (1 + exp(−|z|)), accurate for large |z|."""
        return xp.exp(-0.5 * xp.abs(z)) / (1.0 + xp.exp(-xp.abs(z)))

    def _log_pseudo_determinant(self, z: Array, xp: Any) -> Array:
        # log σ(z) + log σ(−z) = −softplus(−z) − softplus(z) = −|z| − 2 log1p(e^{−|z|})
        return -xp.sum(xp.abs(z) + 2.0 * xp.log1p(xp.exp(-xp.abs(z))), axis=-1)

    def _fourth_moment(self, z: Array, a: Array, xp: Any) -> Array:
        v = sigmoid_parts(z, xp)[1]
        mu4 = v * (1.0 - 3.0 * v)
        a2 = a * a
        quadratic = xp.sum(a2 * v, axis=-1)
        return xp.sum(a2 * a2 * (mu4 - 3.0 * v * v), axis=-1) + 3.0 * quadratic * quadratic


class Gaussian(_DiagonalFamily):
    r"""Regression with a known variance: :math:`y \sim \mathcal N(z, \sigma^2 I), t(y)=y/\sigma^2`.

    ``variance`` :math:`\sigma^2 > 0` (default 1, the unit Gaussian of THEORY §1), a positive
    real number (keyword-only) with :math:`1/\sigma^2` finite in the logits' dtype: the same
    for every output (a homoscedastic noise level, as
    ``MSELoss`` assumes; with :math:`\sigma^2 = \tfrac12` the negative log-likelihood is the sum
    of squared errors up to a constant). Core metric :math:`I = I_C / \sigma^2` for every kernel
    except the rank-one lower envelope :math:`e_0 e_0^\top / \sigma^2`
    (:math:`\lambda_{\max} = 1/\sigma^2` with eigenvector :math:`e_0`); square root
    :math:`I_C / \sigma`. Scaling :math:`\sigma^2` scales every Fisher quantity by
    :math:`1/\sigma^2` (and the variance formulas by :math:`1/\sigma^4`). Targets are real
    floats of shape (..., C).

    Examples
    --------
    >>> import numpy as np
    >>> Gaussian().eigvalsh(np.array([3.0, -1.0]))
    array([1., 1.])
    >>> Gaussian(variance=0.25).eigvalsh(np.array([3.0, -1.0]))
    array([4., 4.])
    """

    __slots__ = ("_variance",)
    _jit_safe = True

    def __init__(self, *, variance: float = 1.0) -> None:
        ok = isinstance(variance, numbers.Real) and not isinstance(variance, bool)
        value = float(variance) if ok else math.nan  # numpy floats are numbers.Real too
        # 1/σ² must be a finite float64 (σ² ≥ 5.6e-309); float32 logits need more.
        if not ok or not (math.isfinite(value) and value > 0.0 and math.isfinite(1.0 / value)):
            msg = (
                "variance must be a positive finite number with a finite 1/variance "
                f"(σ² of y ~ N(z, σ² I)); got {type(variance).__name__} {variance!r}."
            )
            raise (ValueError if ok else TypeError)(msg)
        self._variance = value

    @property
    def variance(self) -> float:
        r""":math:`\sigma^2`, the variance of every output (a float)."""
        return self._variance

    def __repr__(self) -> str:
        return "Gaussian()" if self._variance == 1.0 else f"Gaussian(variance={self._variance!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._variance == other._variance

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._variance))

    def __reduce__(self) -> tuple[Any, tuple[float]]:
        return (_gaussian, (self._variance,))

    def _mean(self, z: Array, xp: Any) -> Array:
        del xp  # the mean of the Gaussian is its logits, as they are
        return z

    def _check_labels(
        self, z: Array, y: Array, xp: Any, names: tuple[str, str] = ("z", "y")
    ) -> None:
        check_label_array(z, y, kind="real floating", shape=tuple(z.shape), names=names)
        check_finite(y, names[1], xp=xp)

    def _log_likelihood(self, z: Array, y: Array, xp: Any) -> Array:
        r = xp.astype(y, z.dtype) - z
        s2 = self._variance
        const = 0.5 * int(z.shape[-1]) * math.log(2.0 * math.pi * s2)
        return -(0.5 / s2) * xp.sum(r * r, axis=-1) - const

    def _score(self, z: Array, y: Array, xp: Any) -> Array:
        r = xp.astype(y, z.dtype) - z
        return r if self._variance == 1.0 else r / self._variance

    def _sample(self, z: Array, gen: Any, lead: tuple[int, ...], xp: Any) -> Array:
        noise = probes(
            gen,
            lead + tuple(z.shape),
            distribution="gaussian",
            xp=xp,
            dtype=z.dtype,
            device=device_of(z),
        )
        return z + noise if self._variance == 1.0 else z + math.sqrt(self._variance) * noise

    def _precision(self, z: Array, xp: Any) -> float:
        """1/σ², refused where it overflows the logits' dtype (float32: σ² < 2.9e-39)."""
        inverse = 1.0 / self._variance
        if inverse > float(xp.finfo(z.dtype).max):
            msg = (
                f"Gaussian(variance={self._variance!r}): 1/variance = {inverse:.3g} overflows "
                f"the logits' dtype {z.dtype}; use float64 logits or a larger variance."
            )
            raise ValueError(msg)
        return inverse

    def _upper_diag(self, z: Array, xp: Any) -> Array:
        return xp.full_like(z, self._precision(z, xp))

    def _sqrt_upper_diag(self, z: Array, xp: Any) -> Array:
        return xp.full_like(z, math.sqrt(self._precision(z, xp)))

    def _log_pseudo_determinant(self, z: Array, xp: Any) -> Array:
        # log det(I_C / σ²) = −C log σ², written as a sum over z for its shape and device
        return xp.sum(xp.full_like(z, -math.log(self._variance)), axis=-1)

    def _fourth_moment(self, z: Array, a: Array, xp: Any) -> Array:
        # aᵀs ~ N(0, ‖a‖²/σ²): E(aᵀs)⁴ = 3 (‖a‖²/σ²)²
        sq = (xp.sum(a * a, axis=-1) + xp.sum(xp.zeros_like(z), axis=-1)) / self._variance
        return 3.0 * sq * sq


def _gaussian(variance: float) -> Gaussian:
    """``Gaussian(variance=variance)``: how a pickled Gaussian is rebuilt."""
    return Gaussian(variance=variance)
