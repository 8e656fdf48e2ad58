"""The base class of the output families: public fronts over private kernels."""

from __future__ import annotations

from typing import Any, NamedTuple

from fisherbound._lib import (
    as_generator,
    check_choice,
    check_logits,
    check_positive_int,
    device_of,
)
from fisherbound.families._checks import check_result, check_vector

Array = Any

#: The core kernels K(z), in Löwner order lower-kinds ⪯ I(z) ⪯ upper-kinds.
KERNELS = ("exact", "upper", "lower", "scalar_upper", "scalar_lower")


class EigenPair(NamedTuple):
    """The top eigenpair of the core metric: eigenvalue (...), unit eigenvector (..., C)."""

    eigenvalue: Array
    eigenvector: Array


class EigenvalueBounds(NamedTuple):
    r"""Deterministic bounds lower :math:`\le \lambda_{\max} \le` upper, each of shape (...)."""

    lower: Array
    upper: Array


class Family:
    r"""An output family :math:`p(y|z)` with logits :math:`z` of shape (..., C): its core space.

    Every quantity of the library is a pull-back :math:`F = \sum_x J_x^\top K(z_x)\, J_x` of a
    core kernel :math:`K` of this family through the network's Jacobian. A family maps
    logits to the kernels, their square roots and matrix-vector products, the
    exact spectrum, the top eigenpair, eigenvalue bounds, the pseudo-determinant,
    label sampling, log-likelihoods, scores and the fourth moment used by the
    variance formulas.

    The families are small immutable values (``Categorical()``, ``Bernoulli()``,
    ``Gaussian(variance=1.0)``); two instances of one family with the same
    options compare equal. Every method
    takes logits of any array-API library (NumPy, CuPy, torch, JAX,
    array-api-strict), float32 or float64, with any leading batch axes, and
    returns arrays of the same library, device and dtype.

    Kernels (``kernel=``, see ``KERNELS``), each satisfying the Löwner order
    ``"lower"``, ``"scalar_lower"`` :math:`\preceq` ``"exact"`` :math:`\preceq` ``"upper"``,
    ``"scalar_upper"``:

    - ``"exact"``: the metric :math:`I(z) = \operatorname{Cov} t(y)`, the Fisher information
      of the family in the logits.
    - ``"upper"``: the diagonal (DG) envelope; :math:`\operatorname{diag}(p)` for Categorical,
      :math:`I` itself for the diagonal families.
    - ``"lower"``: the rank-one (LR) envelope :math:`\lambda_{\max} v v^\top` with the top
      eigenpair.
    - ``"scalar_upper"`` / ``"scalar_lower"``: :math:`s \cdot P` with the largest / the
      smallest nonzero eigenvalue (a lower bound of it for Categorical) and
      :math:`P` the projector onto the range of :math:`I`
      (:math:`I - \mathbf 1 \mathbf 1^\top / C` for Categorical, the identity otherwise).
    """

    __slots__ = ()

    #: Fewest classes the family accepts on the last axis of z.
    min_classes: int = 1
    #: Whether the metric annihilates the all-ones vector (P = I − 11ᵀ/C).
    _centered: bool = False
    #: Whether every method traces under ``jax.jit`` (no host reads, no Python branch on
    #: values), so that compiled programs may call them (``_traces_under_jit``). Read from
    #: the family's own class, never inherited: a subclass (which may override a method
    #: with host code) declares it again.
    _jit_safe: bool = False

    # ------------------------------------------------------------------ basics
    def _traces_under_jit(self) -> bool:
        """Whether this family's class declares its methods traceable (``_jit_safe``)."""
        return bool(type(self).__dict__.get("_jit_safe", False))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self).__name__)

    def _check_z(self, z: Array) -> Any:
        xp = check_logits(z, name="z", min_classes=1)
        c = int(z.shape[-1])
        if c < self.min_classes:
            msg = (
                f"z must have at least {self.min_classes} classes on its last axis for "
                f"{type(self).__name__}; got shape {tuple(z.shape)}. For a single binary "
                "output use Bernoulli()."
            )
            raise ValueError(msg)
        return xp

    def _check_outputs(self, z: Array, xp: Any, name: str) -> None:
        """Refuse model outputs that cannot be this family's natural parameters.

        A no-op here; Categorical refuses softmax probabilities (see there). Cost:
        one reduction over z and one host read.
        """

    def _refuses_outputs(self, z: Array, xp: Any) -> Array | None:
        """``_check_outputs`` as a flag: a 0-d boolean array, True when it would refuse ``z``.

        No host read (traceable by JAX), for a pass that reads all its flags at once
        and calls ``_check_outputs`` for the message. None here: nothing is refused.
        A family overriding ``_check_outputs`` overrides this too (else the check
        runs on the host).
        """
        del z, xp  # the interface's: Categorical reads them
        return None

    # ------------------------------------------------------------- statistics
    def mean(self, z: Array, /) -> Array:
        r"""The expected sufficient statistic :math:`\mathbb E\, t(y)`, shape (..., C).

        Categorical: :math:`\operatorname{softmax}(z)`; Bernoulli: :math:`\sigma(z)`;
        Gaussian: :math:`z`. Cost :math:`O(C)` per row.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> Categorical().mean(np.log(np.array([0.7, 0.2, 0.1])))
        array([0.7, 0.2, 0.1])
        """
        xp = self._check_z(z)
        return self._mean(z, xp)

    def log_likelihood(self, z: Array, y: Array, /) -> Array:
        r"""The log-likelihood :math:`\log p(y|z)`, shape (...), computed stably from the logits.

        Categorical: :math:`z_y - \operatorname{logsumexp}(z)` with integer labels :math:`y` (...);
        Bernoulli: :math:`\sum_c [y_c z_c - \operatorname{softplus}(z_c)]` with :math:`y` in
        :math:`\{0, 1\}` of shape (..., C);
        Gaussian: :math:`-\lVert y - z \rVert^2/(2\sigma^2) - (C/2) \log 2\pi\sigma^2` with real
        targets (..., C).

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([0.7, 0.2, 0.1]))
        >>> round(float(Categorical().log_likelihood(z, np.asarray(1))), 12)  # log 0.2
        -1.609437912434
        """
        xp = self._check_z(z)
        self._check_labels(z, y, xp)
        out = self._log_likelihood(z, y, xp)
        return check_result(out, f"{self!r}.log_likelihood(z, y)", xp, {"z": z, "y": y})

    def score(self, z: Array, y: Array, /) -> Array:
        r"""The score :math:`\partial_z \log p(y|z) = t(y) - \mathbb E\, t(y)`, shape (..., C).

        Categorical: :math:`\operatorname{onehot}(y) - p`; Bernoulli: :math:`y - \sigma(z)`;
        Gaussian: :math:`(y - z)/\sigma^2`. Its mean under :math:`y \sim p(\cdot \mid z)` is zero
        and its covariance is the exact metric.
        """
        xp = self._check_z(z)
        self._check_labels(z, y, xp)
        out = self._score(z, y, xp)
        return check_result(out, f"{self!r}.score(z, y)", xp, {"z": z, "y": y})

    def check_labels(self, z: Array, y: Array, /, *, names: tuple[str, str] = ("z", "y")) -> None:
        r"""Validate labels ``y`` for logits ``z`` (dtype, shape, range); raise if invalid.

        Categorical: integer class indices of shape z.shape[:-1] in :math:`[0, C)`;
        Bernoulli: real floating :math:`\{0, 1\}` of shape z.shape; Gaussian: real floating,
        finite, of shape z.shape. ``names``: how the messages name z and y (a
        caller's own arguments, e.g. ``("logits", "labels")``).
        """
        xp = self._check_z(z)
        self._check_labels(z, y, xp, names)

    def sample(self, z: Array, /, rng: Any = None, *, num_samples: int | None = None) -> Array:
        r"""Labels drawn from :math:`p(\cdot \mid z)` with host random numbers.

        ``rng`` is a numpy Generator, an int seed, a JAX key or None; one seed gives the same
        labels on every backend. With ``num_samples`` the result gets a leading
        axis of that length. Categorical (inverse CDF of one uniform per row):
        class indices of shape (...) in the namespace's indexing dtype (int64; int32
        for JAX without x64); Bernoulli: :math:`\{0, 1\}` in z's dtype, shape
        (..., C); Gaussian: :math:`z + \mathcal N(0, \sigma^2 I)` noise.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
        >>> Categorical().sample(z, rng=0).shape
        (2,)
        """
        xp = self._check_z(z)
        gen = as_generator(rng)
        lead: tuple[int, ...] = ()
        if num_samples is not None:
            lead = (check_positive_int(num_samples, "num_samples"),)
        return check_result(self._sample(z, gen, lead, xp), f"{self!r}.sample(z)", xp, {"z": z})

    # ---------------------------------------------------------------- kernels
    def metric(self, z: Array, /, *, kernel: str = "exact") -> Array:
        r"""The core kernel :math:`K(z)` as a dense (..., C, C) array.

        ``"exact"``: :math:`I(z)` (Categorical :math:`\operatorname{diag}(p) - p p^\top`,
        Bernoulli :math:`\operatorname{diag}(\sigma(1 - \sigma))`, Gaussian :math:`I/\sigma^2`);
        ``"upper"``: the DG envelope; ``"lower"``: :math:`\lambda_{\max} v v^\top`;
        ``"scalar_upper"`` / ``"scalar_lower"``: :math:`s \cdot P` (see the class docstring).
        Cost :math:`O(C^2)` per row (:math:`O(C)` per row plus an eigen-solve of :math:`O(C)` per
        iteration for the kernels that need :math:`\lambda_{\max}`).

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> Categorical().metric(np.log(np.array([0.5, 0.5])))
        array([[ 0.25, -0.25],
               [-0.25,  0.25]])
        """
        xp = self._check_z(z)
        kernel = check_choice(kernel, "kernel", KERNELS)
        return self._metric(z, kernel, xp)

    def upper_kernel(self, z: Array, /) -> Array:
        """The upper (DG) envelope, ``metric(z, kernel="upper")``."""
        return self.metric(z, kernel="upper")

    def lower_kernel(self, z: Array, /) -> Array:
        r"""The lower (LR) envelope :math:`\lambda_\max v v^\top`, ``metric(z, kernel="lower")``."""
        return self.metric(z, kernel="lower")

    def metric_matvec(self, z: Array, v: Array, /, *, kernel: str = "exact") -> Array:
        r""":math:`K(z) v` in :math:`O(C)` per row, never forming K; shape: the broadcast (..., C).

        Categorical exact: :math:`p \odot v - p\, (p \cdot v)`; upper: :math:`p \odot v`;
        lower: :math:`\lambda_C v_C (v_C^\top v)`; scalar: :math:`s\, (v - \operatorname{mean}(v))`.
        Diagonal families: :math:`d \odot v`, :math:`s v`.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([0.7, 0.2, 0.1]))
        >>> Categorical().metric_matvec(z, np.array([1.0, 0.0, 0.0]))
        array([ 0.21, -0.14, -0.07])
        """
        self._check_z(z)
        kernel = check_choice(kernel, "kernel", KERNELS)
        xp, z, v = check_vector(z, v, "v", int(z.shape[-1]), "the number of classes of z")
        out = self._metric_matvec(z, v, kernel, xp)
        return check_result(out, f"{self!r}.metric_matvec(z, v)", xp, {"z": z, "v": v})

    def upper_kernel_matvec(self, z: Array, v: Array, /) -> Array:
        """``metric_matvec(z, v, kernel="upper")``."""
        return self.metric_matvec(z, v, kernel="upper")

    def lower_kernel_matvec(self, z: Array, v: Array, /) -> Array:
        """``metric_matvec(z, v, kernel="lower")``."""
        return self.metric_matvec(z, v, kernel="lower")

    def sqrt_rank(self, num_classes: int, *, kernel: str = "exact") -> int:
        r""":math:`R`, the number of columns of the factor :math:`B` of ``sqrt_metric``.

        :math:`C` for the exact, upper and scalar kernels; 1 for the rank-one lower kernel.
        """
        c = check_positive_int(num_classes, "num_classes")
        kernel = check_choice(kernel, "kernel", KERNELS)
        return 1 if kernel == "lower" else c

    def sqrt_metric(self, z: Array, /, *, kernel: str = "exact") -> Array:
        r"""A factor B (..., C, R) with :math:`BB^\top = K(z)`, R = ``sqrt_rank(C, kernel=kernel)``.

        Categorical exact: :math:`B = (I - p \mathbf 1^\top) \operatorname{diag}(\sqrt p)`, whose
        column :math:`y` is :math:`\sqrt{p_y}\, (e_y - p)`; upper:
        :math:`\operatorname{diag}(\sqrt p)`; lower: the column :math:`\sqrt{\lambda_C}\, v_C`;
        scalar: :math:`\sqrt s\, P` (:math:`P^2 = P`). Diagonal families:
        :math:`\operatorname{diag}(\sqrt d)`, :math:`\sqrt{\lambda_{\max}}\, e_k`,
        :math:`\sqrt s\, I`. Cost :math:`O(C^2)` per row.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([0.5, 0.5]))
        >>> b = Categorical().sqrt_metric(z)
        >>> bool(np.allclose(b @ b.T, Categorical().metric(z)))
        True
        """
        xp = self._check_z(z)
        kernel = check_choice(kernel, "kernel", KERNELS)
        return self._sqrt_metric(z, kernel, xp)

    def sqrt_metric_matvec(self, z: Array, xi: Array, /, *, kernel: str = "exact") -> Array:
        r""":math:`B(z)\, \xi` in O(C) per row for :math:`\xi` of shape (..., R); result (..., C).

        Categorical exact: :math:`\sqrt p \odot \xi - p\, (\sqrt p \cdot \xi)`. This is the
        cotangent of the detach-and-mix estimator: with Rademacher :math:`\xi`,
        :math:`\mathbb E[(B \xi)(B \xi)^\top] = K(z)`; the weight is :math:`\sqrt p`, not :math:`p`.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([0.64, 0.36]))
        >>> Categorical().sqrt_metric_matvec(z, np.array([1.0, 0.0]))
        array([ 0.288, -0.288])
        """
        self._check_z(z)
        kernel = check_choice(kernel, "kernel", KERNELS)
        c = int(z.shape[-1])
        r = 1 if kernel == "lower" else c
        what = f"sqrt_rank(C={c}, kernel={kernel!r})"
        xp, z, xi = check_vector(z, xi, "xi", r, what)
        out = self._sqrt_metric_matvec(z, xi, kernel, xp)
        return check_result(out, f"{self!r}.sqrt_metric_matvec(z, xi)", xp, {"z": z, "xi": xi})

    # --------------------------------------------------------------- spectrum
    def eigvalsh(self, z: Array, /) -> Array:
        r"""The spectrum of the exact metric, ascending, shape (..., C).

        Categorical: :math:`\lambda_1 = 0` and one root of the secular equation
        :math:`\sum_i p_i / (p_i - \lambda) = 0` between each pair of consecutive distinct sorted
        probabilities (a value repeated :math:`k` times is an eigenvalue :math:`k - 1` times);
        never forms the :math:`C \times C` matrix: :math:`O(C)` per eigenvalue and iteration, a few
        iterations, memory bounded by chunking. Tiny eigenvalues keep their
        relative accuracy. Bernoulli: sorted :math:`\sigma(1 - \sigma)`; Gaussian:
        :math:`1/\sigma^2` (:math:`C` times).

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> Categorical().eigvalsh(np.log(np.array([0.9, 0.05, 0.05])))
        array([0.   , 0.05 , 0.135])
        """
        xp = self._check_z(z)
        return self._eigvalsh(z, xp)

    def top_eigenpair(self, z: Array, /) -> EigenPair:
        r"""(:math:`\lambda_{\max}` (...), unit eigenvector (..., C)) of the exact metric.

        Categorical: :math:`\lambda_C` from the secular equation and
        :math:`v_j \propto p_j / (p_j - \lambda_C)` (the component of the most likely class is
        positive); when the top probability is tied, :math:`\lambda_C = p_{(C)}` and
        :math:`v = (e_i - e_j)/\sqrt 2` for two tied classes. Bernoulli: the largest
        :math:`\sigma(1 - \sigma)` and its basis vector; Gaussian: 1 and :math:`e_0`. Cost
        :math:`O(C)` per row and iteration.
        """
        xp = self._check_z(z)
        return EigenPair(*self._top_eigenpair(z, xp))

    def lambda_max_bounds(self, z: Array, /) -> EigenvalueBounds:
        r"""Deterministic (lower, upper) bounds of :math:`\lambda_{\max}` without an eigen-solve.

        Categorical (paper 1, Theorem 1):
        :math:`\mathrm{lower} = \max\Big(p_{(C-1)},\ \max_i p_i (1 - p_i),\
        \tfrac12\big[p_{(C)} + p_{(C-1)} - (p_{(C)} - p_{(C-1)})^2\big]\Big)`,
        :math:`\mathrm{upper} = \min\big(p_{(C)},\ 1 - \lVert p \rVert^2,\ \tfrac12\big)`.
        Bernoulli and Gaussian: both equal :math:`\lambda_{\max}`. Cost :math:`O(C)` per row.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> lo, hi = Categorical().lambda_max_bounds(np.log(np.array([0.7, 0.2, 0.1])))
        >>> round(float(lo), 10), round(float(hi), 10)  # λ_max = 0.3344030651
        (0.325, 0.46)
        """
        xp = self._check_z(z)
        return EigenvalueBounds(*self._lambda_max_bounds(z, xp))

    def pseudo_determinant(self, z: Array, /) -> Array:
        r"""The product of the nonzero eigenvalues, shape (...).

        Categorical: :math:`C \cdot \prod_i p_i`; Bernoulli: :math:`\prod_c \sigma(1 - \sigma)`;
        Gaussian: 1. Underflows to 0 for large :math:`C`; use ``log_pseudo_determinant`` there.
        """
        xp = self._check_z(z)
        out = xp.exp(self._log_pseudo_determinant(z, xp))
        return check_result(out, f"{self!r}.pseudo_determinant(z)", xp, {"z": z})

    def log_pseudo_determinant(self, z: Array, /) -> Array:
        r"""The logarithm of ``pseudo_determinant`` from the logits, shape (...), no underflow.

        Categorical: :math:`\log C + \sum_i \log p_i` with
        :math:`\log p = z - \operatorname{logsumexp}(z)`; Bernoulli:
        :math:`\sum_c [\log \sigma(z_c) + \log \sigma(-z_c)]`; Gaussian: 0.
        """
        xp = self._check_z(z)
        out = self._log_pseudo_determinant(z, xp)
        return check_result(out, f"{self!r}.log_pseudo_determinant(z)", xp, {"z": z})

    # ---------------------------------------------------------------- moments
    def fourth_moment(self, z: Array, a: Array, /) -> Array:
        r""":math:`\mathbb E\, (a^\top u)^4`; shape: broadcast leading axes.

        With :math:`u = t(y) - \mathbb E\, t(y)`, :math:`y \sim p(\cdot \mid z)`.
        The contraction in the variance of the score-outer-product estimator
        (paper 2, THEORY §4):
        :math:`\operatorname{Var}(\hat I_{1,ii})
        = \frac1N \big[\mathbb E (a^\top u)^4 - (a^\top I a)^2\big]`
        with :math:`a = J_{\cdot i}`. Categorical: :math:`\sum_c p_c (a_c - \bar a)^4` with
        :math:`\bar a = \sum_c p_c a_c`; Bernoulli:
        :math:`\sum_c a_c^4 (\mu_{4,c} - 3 v_c^2) + 3 (\sum_c a_c^2 v_c)^2` with
        :math:`v = \sigma(1 - \sigma)`, :math:`\mu_4 = v (1 - 3v)`; Gaussian:
        :math:`3 \lVert a \rVert^4`. Cost :math:`O(C)` per row.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([0.5, 0.5]))
        >>> float(Categorical().fourth_moment(z, np.array([1.0, -1.0])))
        1.0
        """
        self._check_z(z)
        xp, z, a = check_vector(z, a, "a", int(z.shape[-1]), "the number of classes of z")
        out = self._fourth_moment(z, a, xp)
        return check_result(out, f"{self!r}.fourth_moment(z, a)", xp, {"z": z, "a": a})

    # ------------------------------------------- the unchecked kernel surface
    # What adapters call inside compiled, traced or vmapped code (jax.jit, torch.func),
    # where the fronts' validation cannot run (it reads values) or was done once
    # already (``check_labels`` on the batch). Same formulas and results as the
    # fronts; no checks; ``xp`` is the namespace of z (``jax.numpy`` under jit).

    def unchecked_log_likelihood(self, z: Array, y: Array, /, *, xp: Any) -> Array:
        r"""``log_likelihood(z, y)`` without validation: :math:`\log p(y \mid z)`, shape (...).

        Categorical: :math:`z_y - \operatorname{logsumexp}(z)` (integer :math:`y` of shape
        z.shape[:-1]); Bernoulli: :math:`\sum_c [y_c z_c - \operatorname{softplus}(z_c)]`;
        Gaussian: :math:`-\tfrac12 \lVert y - z \rVert^2 - (C/2) \log 2\pi`.
        Leading axes of z and y broadcast as the formulas do. Cost :math:`O(C)` per row.
        The caller guarantees what ``check_labels`` checks.

        Examples
        --------
        >>> import numpy as np
        >>> from fisherbound.families import Categorical
        >>> z = np.log(np.array([[0.7, 0.2, 0.1]]))
        >>> np.round(Categorical().unchecked_log_likelihood(z, np.array([0]), xp=np), 6)
        array([-0.356675])
        """
        return self._log_likelihood(z, y, xp)

    def unchecked_score(self, z: Array, y: Array, /, *, xp: Any) -> Array:
        r"""``score(z, y)`` without validation: :math:`t(y) - \mathbb E\, t(y)`, shape (..., C).

        Categorical: :math:`\operatorname{onehot}(y) - \operatorname{softmax}(z)`; Bernoulli:
        :math:`y - \sigma(z)`; Gaussian: :math:`y - z`.
        Cost :math:`O(C)` per row. The caller guarantees what ``check_labels`` checks.
        """
        return self._score(z, y, xp)

    def unchecked_metric_matvec(
        self, z: Array, v: Array, /, *, kernel: str = "exact", xp: Any
    ) -> Array:
        r"""``metric_matvec(z, v, kernel=kernel)`` without validation: :math:`K(z)\, v`, (..., C).

        Categorical exact: :math:`p \odot v - p\, (p \cdot v)`; see ``metric_matvec`` for the other
        kernels. :math:`O(C)` per row (plus an eigen-solve for ``"lower"``), never forming
        :math:`K`. ``kernel`` must be one of ``KERNELS``; z and v real floating of one
        namespace, device and dtype, broadcastable.
        """
        return self._metric_matvec(z, v, kernel, xp)

    def unchecked_sqrt_metric_matvec(
        self, z: Array, xi: Array, /, *, kernel: str = "exact", overwrite: bool = False, xp: Any
    ) -> Array:
        r"""``sqrt_metric_matvec(z, xi, kernel=kernel)`` without validation: :math:`B(z)\, \xi`.

        Returns (..., C).

        For callers whose :math:`z` and :math:`\xi` are known finite and conformant (the
        estimators' logits, checked when the linearization was built, and their own probes):
        it skips the two finiteness passes over arrays of the logits' size.
        Categorical exact: :math:`\sqrt p \odot \xi - p\, (\sqrt p \cdot \xi)`, :math:`O(C)` per
        row, never forming :math:`B`. ``kernel`` must be one of ``KERNELS``; :math:`\xi` has the
        factor's :math:`R` columns.
        ``overwrite=True``: :math:`\xi` is the caller's to lose; the result may be written
        into it (categorical exact on torch, where :math:`\xi` has the result's shape and
        dtype: no new array of :math:`\xi`'s size, which at vocabulary scale costs as much
        as the arithmetic). :math:`\xi` may be integer :math:`\pm 1` signs
        (``probes(..., signs=True)``): a kernel that takes them does (categorical exact on
        torch's CPU, one probe: block by block, one new array of the logits' size), the others
        get :math:`\xi` cast to z's dtype.
        """
        if overwrite and kernel == "exact":
            out = self._exact_sqrt_matvec_into(z, xi, xp)
            if out is not None:
                return out
        if xp.isdtype(xi.dtype, "integral"):
            xi = xp.astype(xi, z.dtype)
        return self._sqrt_metric_matvec(z, xi, kernel, xp)

    # ------------------------------------------------ kernels: generic parts
    def _scalar(self, z: Array, kernel: str, xp: Any) -> Array:
        return self._scalar_upper(z, xp) if kernel == "scalar_upper" else self._scalar_lower(z, xp)

    def _projector(self, z: Array, xp: Any) -> Array:
        c = int(z.shape[-1])
        eye = xp.eye(c, dtype=z.dtype, device=device_of(z))
        return eye - 1.0 / c if self._centered else eye

    def _project(self, v: Array, xp: Any) -> Array:
        return v - xp.mean(v, axis=-1, keepdims=True) if self._centered else v

    def _metric(self, z: Array, kernel: str, xp: Any) -> Array:
        if kernel == "exact":
            return self._exact_metric(z, xp)
        if kernel == "upper":
            return _diag(self._upper_diag(z, xp), xp)
        if kernel == "lower":
            lam, vec = self._top_eigenpair(z, xp)
            return lam[..., None, None] * vec[..., :, None] * vec[..., None, :]
        s = self._scalar(z, kernel, xp)
        return s[..., None, None] * self._projector(z, xp)

    def _metric_matvec(self, z: Array, v: Array, kernel: str, xp: Any) -> Array:
        if kernel == "exact":
            return self._exact_matvec(z, v, xp)
        if kernel == "upper":
            return self._upper_diag(z, xp) * v
        if kernel == "lower":
            lam, vec = self._top_eigenpair(z, xp)
            return (lam[..., None] * vec) * xp.sum(vec * v, axis=-1, keepdims=True)
        s = self._scalar(z, kernel, xp)
        return s[..., None] * self._project(v, xp)

    def _sqrt_metric(self, z: Array, kernel: str, xp: Any) -> Array:
        if kernel == "exact":
            return self._exact_sqrt(z, xp)
        if kernel == "upper":
            return _diag(self._sqrt_upper_diag(z, xp), xp)
        if kernel == "lower":
            lam, vec = self._top_eigenpair(z, xp)
            return (xp.sqrt(lam)[..., None] * vec)[..., None]
        s = self._scalar(z, kernel, xp)
        return xp.sqrt(s)[..., None, None] * self._projector(z, xp)

    def _sqrt_metric_matvec(self, z: Array, xi: Array, kernel: str, xp: Any) -> Array:
        if kernel == "exact":
            return self._exact_sqrt_matvec(z, xi, xp)
        if kernel == "upper":
            return self._sqrt_upper_diag(z, xp) * xi
        if kernel == "lower":
            lam, vec = self._top_eigenpair(z, xp)
            return (xp.sqrt(lam)[..., None] * vec) * xi
        s = self._scalar(z, kernel, xp)
        return xp.sqrt(s)[..., None] * self._project(xi, xp)

    # ------------------------------------------ family-specific (overridden)
    def _mean(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _check_labels(
        self, z: Array, y: Array, xp: Any, names: tuple[str, str] = ("z", "y")
    ) -> None:
        raise NotImplementedError

    def _log_likelihood(self, z: Array, y: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _score(self, z: Array, y: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _sample(self, z: Array, gen: Any, lead: tuple[int, ...], xp: Any) -> Array:
        raise NotImplementedError

    def _upper_diag(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _sqrt_upper_diag(self, z: Array, xp: Any) -> Array:
        return xp.sqrt(self._upper_diag(z, xp))

    def _exact_metric(self, z: Array, xp: Any) -> Array:
        return _diag(self._upper_diag(z, xp), xp)

    def _exact_matvec(self, z: Array, v: Array, xp: Any) -> Array:
        return self._upper_diag(z, xp) * v

    def _exact_sqrt(self, z: Array, xp: Any) -> Array:
        return _diag(self._sqrt_upper_diag(z, xp), xp)

    def _exact_sqrt_matvec(self, z: Array, xi: Array, xp: Any) -> Array:
        return self._sqrt_upper_diag(z, xp) * xi

    def _exact_sqrt_matvec_into(self, z: Array, xi: Array, xp: Any) -> Array | None:
        """``_exact_sqrt_matvec`` without a new array of ξ's size, or None where not offered.

        Written into ξ's buffer (floating ξ), or for integer ±1 signs ξ into an
        array the kernel makes anyway; ξ is the caller's to lose.
        """
        del z, xi, xp  # optional: a family offers it where it saves a large array
        return None

    def _eigvalsh(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _top_eigenpair(self, z: Array, xp: Any) -> tuple[Array, Array]:
        raise NotImplementedError

    def _scalar_upper(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _scalar_lower(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _lambda_max_bounds(self, z: Array, xp: Any) -> tuple[Array, Array]:
        raise NotImplementedError

    def _log_pseudo_determinant(self, z: Array, xp: Any) -> Array:
        raise NotImplementedError

    def _fourth_moment(self, z: Array, a: Array, xp: Any) -> Array:
        raise NotImplementedError


def _diag(d: Array, xp: Any) -> Array:
    """diag(d) for d of shape (..., C): (..., C, C)."""
    c = int(d.shape[-1])
    return d[..., :, None] * xp.eye(c, dtype=d.dtype, device=device_of(d))


def one_hot(index: Array, c: int, dtype: Any, xp: Any) -> Array:
    """One-hot rows e_index of length c in ``dtype`` (index: integer array (...))."""
    cols = xp.arange(c, device=device_of(index))
    return xp.astype(cols == xp.astype(index, cols.dtype)[..., None], dtype)
