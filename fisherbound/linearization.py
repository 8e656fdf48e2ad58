r"""The model contract: what an adapter supplies for one batch at fixed parameters.

A *linearization* is a network frozen at parameters :math:`\theta` (flat, D entries) and one
batch of N inputs, exposing the logits :math:`z` (N, ∗S, C) and the Jacobian
:math:`J = \partial z / \partial \theta` only through products:

- ``jvp(v)``: :math:`(D,) \to (N, *S, C)`, the forward product :math:`J v`;
- ``vjp(u)``: :math:`(N, *S, C) \to (D,)`, the reverse product
  :math:`J^\top u = \sum_n J_n^\top u_n`;
- ``jvp_batch(V)``: :math:`(M, D) \to (M, N, *S, C)`, M forward products at once;
- ``vjp_batch(U)``: :math:`(M, N, *S, C) \to (M, D)`, M reverse products at once (one
  batched backward pass where the framework allows);
- ``per_example_vjp(U)``: :math:`(N, K, *S, C) \to (N, K, D)`, the per-example products
  :math:`J_n^\top U[n, k]`;
- ``sum_squared_per_example_vjp(U, *, max_vectors, sum_cotangents)``:
  :math:`(N, K, *S, C) \to (K, D)`, the per-example squares
  :math:`\sum_n (J_n^\top U[n, k])^2`, the building block of exact
  diagonals; with ``sum_cotangents=True`` their sum over :math:`k`, (D,). An adapter may
  compute it without materialising per-example gradients (the torch fast path).

S are the position axes of models with one output distribution per position
(tokens, pixels; none for one output per example): the classes are always the
last axis, and an "example" is an input :math:`x` with all its positions, so a
per-example product :math:`J_x^\top u` sums over the positions of :math:`x`. ``mask`` (None or a
boolean (N, ∗S) array) marks the positions that count; adapters zero the
Jacobian rows of the others in every product.

Parameter vectors are flat 1-D arrays of the linearization's namespace, in the
order of ``blocks``; a block is a contiguous slice ``offset : offset + size``
reshaped to ``shape``.

``LinearizationBase`` implements the batched and per-example products from the
primitive ones (correct for any adapter, not fast), so an adapter only has to
supply ``logits``, ``jvp``, ``vjp`` and ``blocks`` and override what its framework
does better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

from fisherbound._finite import Product
from fisherbound._frozen import FrozenBase, ParameterBlock, ReadOnly, example_range, make_blocks
from fisherbound._lib import (
    REDUCTIONS,
    Source,
    array_namespace,
    index_dtype,
    is_array,
    is_traced,
)

# The adapters' shared shell lives in its own module; the adapters and the analyses
# import it from here, with the contract.
from fisherbound._shell import (
    Lazy,
    check_batches,
    check_family,  # noqa: F401  (fisherbound._stream imports it from here)
    check_loss_labels,
    check_loss_mask,
    check_loss_options,
    check_operand,
    mask_source,
    masked_label_placeholder,
    stream_inputs,
    stream_linearizations,
    stream_loss_functions,
    stream_pairs,
)

Array = Any
T = TypeVar("T")

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "LinearizationBase",
    "Linearization",
    "LossFunctionBase",
    "LossFunction",
    "ParameterBlock",
    "as_linearizations",
    "stream_linearizations",
    "stream_loss_functions",
    "stream_pairs",
    "stream_inputs",
    "Lazy",
    "mask_source",
    "make_blocks",
    "example_range",
    "check_operand",
    "check_batches",
    "check_loss_labels",
    "check_loss_mask",
    "check_loss_options",
    "ReadOnly",
    "LOSS_REDUCTIONS",
]


@runtime_checkable
class Linearization(Protocol):
    """The protocol every adapter implements for one batch (see module docstring)."""

    @property
    def logits(self) -> Array:
        r"""The logits :math:`z = f(\theta, x)` of the batch, shape (N, ∗S, C).

        Computed once when the linearization is built (one forward pass); reading
        it costs nothing.
        """

    @property
    def blocks(self) -> tuple[ParameterBlock, ...]:
        r"""The parameter blocks (name, shape, offset, size), in flat-vector order.

        Block b is the slice ``offset : offset + size`` of every parameter vector
        (D,), reshaped to ``shape``; the blocks tile :math:`0 \dots D - 1` without gaps.
        """

    @property
    def num_params(self) -> int:
        r"""D, the length of the flat parameter vector :math:`\theta` (summed block sizes)."""

    @property
    def xp(self) -> Any:
        """The array namespace of the logits and of every vector in or out.

        Operands must be arrays of this namespace, on the logits' device; results
        are too.
        """

    def jvp(self, v: Array, /) -> Array:
        r"""The forward product :math:`J v` for one flat parameter vector.

        Parameters
        ----------
        v
            A tangent (D,), real floating, on the logits' device.

        Returns
        -------
        Array
            :math:`J v = \sum_i \partial z / \partial \theta_i\, v_i`, shape (N, ∗S, C), in the
            logits' dtype.

        Notes
        -----
        Cost: about one forward pass (forward-mode AD or a stored linear map).
        """

    def vjp(self, u: Array, /) -> Array:
        r"""The reverse product :math:`J^\top u = \sum_n J_n^\top u_n` for one cotangent.

        Parameters
        ----------
        u
            A cotangent (N, ∗S, C) on the logits, real floating, on their device.

        Returns
        -------
        Array
            :math:`J^\top u`, shape (D,), in the order of ``blocks``.

        Notes
        -----
        Cost: about one backward pass of the batch.
        """

    def jvp_batch(self, V: Array, /) -> Array:
        r"""M forward products at once: :math:`J V[m]` for tangents V (M, D); returns (M, N, ∗S, C).

        Cost: about M forward passes, batched (vmapped) where the framework allows;
        memory :math:`M N C` for the result plus the batched activations.
        """

    def vjp_batch(self, U: Array, /) -> Array:
        r"""M reverse products at once: :math:`J^\top U[m]` for cotangents U (M, N, ∗S, C).

        Returns (M, D).

        Cost: about M backward passes, as one batched backward pass where the
        framework allows; memory :math:`M D` for the result.
        """

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = ...) -> Array:
        r"""The per-example products :math:`J_n^\top U[i, k]` for a contiguous slice of examples.

        Parameters
        ----------
        U
            Cotangents (n, K, ∗S, C): K per example of the slice, n its length.
        examples
            A contiguous ``slice(start, stop)`` of the N examples (example
            n = start + i gets ``U[i]``); None (default) for all N.

        Returns
        -------
        Array
            (n, K, D): row [i, k] is :math:`J_n^\top U[i, k]`, the gradient of
            :math:`\langle U[i, k], z_n \rangle`.

        Notes
        -----
        Cost: about :math:`n K` single-example backward passes (vectorised by the
        adapters); memory :math:`n K D` for the result.
        """

    def sum_squared_per_example_vjp(
        self, U: Array, /, *, max_vectors: int | None = ..., sum_cotangents: bool = ...
    ) -> Array:
        r""":math:`\sum_n (J_n^\top U[n, k])^2`, the per-example squares summed over the batch.

        With ``U[n, r]`` the columns of :math:`B(z_n)`, :math:`B B^\top = K(z_n)`, the sum over
        :math:`k` is the exact Fisher diagonal
        :math:`\sum_n \operatorname{diag}(J_n^\top K(z_n)\, J_n)`.

        Parameters
        ----------
        U
            Cotangents (N, K, ∗S, C).
        max_vectors
            Memory bound: at most this many per-example D-vectors alive at once
            (default: the adapter's ``default_max_vectors``).
        sum_cotangents
            Return the sum over k, shape (D,), instead of (K, D); adapters may
            compute it more cheaply.

        Returns
        -------
        Array
            (K, D), or (D,) with ``sum_cotangents=True``; non-negative.

        Notes
        -----
        Cost: about :math:`N K` single-example backward passes, in chunks of
        ``max_vectors``; less on fast paths that never form per-example
        gradients (the reference models, the torch layer rules).
        """


class LinearizationBase(FrozenBase):
    """Default batched and per-example products built from ``jvp`` and ``vjp``.

    Subclasses set ``self._logits``, ``self._blocks`` and ``self._xp`` and
    implement ``jvp`` and ``vjp``; everything else has a generic (slow but exact)
    default here.
    """

    _logits: Array

    #: Default bound on how many D-vectors a per-example computation holds at once.
    default_max_vectors: int = 256

    #: True when the adapter checked the logits finite as it built them (the torch
    #: adapter does); the data stream then skips its own pass over them.
    logits_checked: bool = False

    _mask: Array | None = None

    checked_products = {
        "jvp": Product("the JVP J v", example_axis=0),
        "vjp": Product("the VJP Jᵀ u", param_axis=True),
        "jvp_batch": Product("the batched JVPs J V", example_axis=1),
        "vjp_batch": Product("the batched VJPs Jᵀ U", param_axis=True),
        "per_example_vjp": Product("the per-example VJPs J_nᵀ U", example_axis=0, param_axis=True),
        "sum_squared_per_example_vjp": Product(
            "the per-example squares Σ_n (J_nᵀ U)²", param_axis=True
        ),
        "vjp_batch_square_moments": Product("the moments of the squared VJPs", param_axis=True),
        "output_second_derivative_diagonal": Product(
            "the second derivatives ∂²z/∂θ_i²", example_axis=0, param_axis=True
        ),
    }

    logits = ReadOnly[Array](
        r"The logits :math:`z` of the batch, shape (N, ∗S, C): N examples, the position axes S "
        "(none for one output per example) and the C classes last."
    )
    mask = ReadOnly["Array | None"](
        "Which positions count: None (all) or a boolean array (N, ∗S). The Jacobian "
        "rows of masked positions are zero in every product, so they add nothing to "
        "any Fisher quantity; their logits keep their values."
    )

    def _reference(self) -> Array:
        return self._logits

    @property
    def output_shape(self) -> tuple[int, ...]:
        """(N, ∗S, C), the shape of the logits and of every output-space vector."""
        return tuple(int(s) for s in self._logits.shape)

    @property
    def num_positions(self) -> int:
        """P, the number of positions per example (the product of S; 1 when S = ())."""
        return math.prod(self.output_shape[1:-1])

    def _output_text(self, *lead: str) -> str:
        """The letters of an output-space shape for messages, e.g. "(M, N, T, C)"."""
        s = len(self.output_shape) - 2
        positions = ["T"] if s == 1 else [f"T{i + 1}" for i in range(s)]
        return "(" + ", ".join([*lead, "N", *positions, "C"]) + ")"

    @property
    def num_inputs(self) -> int:
        """N, the number of examples in the batch."""
        return int(self._logits.shape[0])

    @property
    def num_outputs(self) -> int:
        """C, the number of classes (the size of the last axis of the logits)."""
        return int(self._logits.shape[-1])

    def _examples(self, examples: slice | None) -> tuple[int, int]:
        """(start, stop) of the contiguous slice ``examples`` of the batch (``example_range``)."""
        return example_range(examples, self.num_inputs)

    def jvp(self, v: Array, /) -> Array:
        """:math:`J v` for a flat parameter vector ``v`` (D,); returns (N, ∗S, C)."""
        raise NotImplementedError

    def vjp(self, u: Array, /) -> Array:
        r""":math:`J^\top u=\sum_n J_n^\top u_n` for a cotangent ``u`` (N, ∗S, C); returns (D,)."""
        raise NotImplementedError

    def jvp_batch(self, V: Array, /) -> Array:
        """:math:`J V[m]` for each of M parameter vectors ``V`` (M, D); returns (M, N, ∗S, C).

        Generic default: M calls of ``jvp`` (cost M forward passes).
        """
        return self._row_by_row(self.jvp, V)

    def vjp_batch(self, U: Array, /) -> Array:
        r""":math:`J^\top U[m]` for each of M cotangents ``U`` (M, N, ∗S, C); returns (M, D).

        Generic default: M calls of ``vjp`` (cost M backward passes).
        """
        return self._row_by_row(self.vjp, U)

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = None) -> Array:
        r"""The products :math:`J_n^\top U[i, k]` for the examples :math:`n = \mathrm{start} + i`.

        ``examples`` is the slice of examples; returns (n, K, D).

        ``U`` has shape (n, K, ∗S, C) with n the length of the slice ``examples``
        (default: all N examples). Generic default: one masked batched VJP per
        example; adapters override it with a vectorised map.
        """
        xp = self._xp
        start, stop = self._examples(examples)
        n_all = self.num_inputs
        k = int(U.shape[1])
        out = tuple(U.shape[2:])  # (*S, C)
        ones = (1,) * len(out)
        rows = []
        for i in range(start, stop):
            # Cotangent that is U[i - start, j] on example i and zero elsewhere.
            hot = xp.astype(xp.arange(n_all, device=self.device) == i, U.dtype)
            Ui = xp.reshape(U[i - start, ...], (k, 1, *out)) * xp.reshape(hot, (1, n_all, *ones))
            rows.append(self.vjp_batch(Ui))
        return xp.stack(rows, axis=0)

    def sum_squared_per_example_vjp(
        self, U: Array, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Array:
        r""":math:`\sum_n (J_n^\top U[n, k])^2` for cotangents ``U`` (N, K, ∗S, C); returns (K, D).

        With ``sum_cotangents=True`` returns :math:`\sum_k \sum_n (J_n^\top U[n, k])^2`, shape (D,),
        which adapters may compute more cheaply (one product per layer instead of K).
        Memory: per-example VJPs are computed in chunks of examples so that at most
        ``max_vectors`` D-vectors are held at once (default
        ``default_max_vectors``).
        """
        xp = self._xp
        n, k = int(U.shape[0]), int(U.shape[1])
        budget = self.default_max_vectors if max_vectors is None else int(max_vectors)
        chunk = max(1, budget // max(k, 1))
        total = xp.zeros((k, self.num_params), dtype=U.dtype, device=self.device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            g = self.per_example_vjp(U[start:stop, ...], examples=slice(start, stop))
            total = total + xp.sum(g * g, axis=0)
        return xp.sum(total, axis=0) if sum_cotangents else total

    def output_second_derivative_diagonal(self, /, *, max_vectors: int | None = None) -> Array:
        r"""The outputs' second derivatives :math:`\partial^2 z_{nc} / \partial \theta_i^2`.

        Returns (N, ∗S, C, D).

        Needed by the variance of the Hessian-based Fisher estimator :math:`\hat I_2`
        (``fisherbound.variance``, THEORY §4). Exact, never through a :math:`D \times D`
        Hessian.
        First-order products cannot give it, so there is no generic default: each
        adapter implements it (NumPy reference models by hand, torch and JAX by
        forward-over-forward differentiation along each coordinate).
        """
        msg = (
            f"{type(self).__name__} does not provide output_second_derivative_diagonal "
            "(the diagonal second derivatives ∂²z/∂θ_i² of the outputs); use an adapter "
            "that does (fisherbound.adapters.numpy, .torch, .jax) or implement it."
        )
        raise NotImplementedError(msg)


def as_linearizations(source: Source) -> Iterator[Any]:
    """Iterate over ``source``: one linearization or an iterable of them.

    Parameters
    ----------
    source
        A ``Linearization``, or an iterable of them (read lazily, once).

    Raises
    ------
    TypeError
        Naming what was received when ``source`` (or one of its items) is neither.
    """
    if isinstance(source, Linearization):
        yield source
        return
    if isinstance(source, Iterable) and not isinstance(source, str | bytes):
        for i, lin in enumerate(source):
            if not isinstance(lin, Linearization):
                msg = (
                    "source must be a Linearization or an iterable of them; item "
                    f"{i} is a {type(lin).__name__}. Build one with an adapter's "
                    "linearize(...)."
                )
                raise TypeError(msg)
            yield lin
        return
    msg = (
        "source must be a Linearization or an iterable of them; got "
        f"{type(source).__name__}. Build one with an adapter's linearize(...)."
    )
    raise TypeError(msg)


# ---------------------------------------------------------------------------
# The loss of a labelled batch, for the loss landscape (fisherbound.landscape)
# ---------------------------------------------------------------------------

#: How a loss function reduces over the counted positions of its batch.
LOSS_REDUCTIONS = REDUCTIONS


@runtime_checkable
class LossFunction(Protocol):
    r"""The negative log-likelihood of one labelled batch as a function of :math:`\theta`.

    For logits :math:`z` (N, ∗S, C) (classes last, S the position axes, none for one
    output per example) and labels :math:`y` (class indices (N, ∗S), or targets
    (N, ∗S, C)),

    .. math::

       L(\theta) = -\sum_n \sum_t m_{nt} \log p(y_{nt} \mid z_{nt}(\theta))
       \qquad (\texttt{reduction="sum"})

    with :math:`m_{nt} = 1` for the positions that count (the ``mask``; masked positions,
    e.g. padding or labels equal to ``ignore_index``, have :math:`m_{nt} = 0`), or that sum
    divided by the number of counted positions :math:`n = \sum m_{nt}` (``"mean"``, as
    ``torch.nn.CrossEntropyLoss(ignore_index=-100)`` divides; :math:`n = N` for logits
    (N, C) without a mask). The output family's ``log_likelihood`` gives the
    terms; the loss is frozen at the parameters :math:`\theta` = ``params`` (flat, D entries,
    in the order of ``blocks``). Adapters build one with ``loss_function(...)``:

    - ``value(shifts)``: :math:`(S, D) \to (S,)`, the loss at :math:`\theta + \mathrm{shifts}[s]`
      for each of S shift vectors (a shift is any :math:`\sum_k \alpha_k d_k`), batched where
      the framework allows; ``value(xp.zeros((1, D)))`` is :math:`L(\theta)`;
    - ``gradient()``: (D,), :math:`\nabla L(\theta)`;
    - ``hvp(v)``: :math:`(D,) \to (D,)`, the exact Hessian-vector product
      :math:`\nabla^2 L(\theta)\, v`;
    - ``hvp_batch(V)``: :math:`(M, D) \to (M, D)`, M of them at once.

    Optional: ``num_counted``, the number of counted positions n (an int), which a
    data set of several batches needs for the mean over all of them
    (``LossFunctionBase`` provides it); a loss function without it counts
    ``num_inputs`` (one position per example).
    """

    @property
    def params(self) -> Array:
        r""":math:`\theta`, the flat parameter vector (D,) at which the loss is frozen.

        In ``blocks`` order.
        """

    @property
    def blocks(self) -> tuple[ParameterBlock, ...]:
        """The parameter blocks (name, shape, offset, size), in flat-vector order."""

    @property
    def num_params(self) -> int:
        """D, the length of ``params``."""

    @property
    def num_inputs(self) -> int:
        """N, the number of labelled examples in the batch (with all their positions)."""

    @property
    def reduction(self) -> str:
        """``"sum"`` over the counted positions, or ``"mean"``: the sum divided by their number."""

    @property
    def xp(self) -> Any:
        """The array namespace of ``params`` and of every vector in or out."""

    def value(self, shifts: Array, /) -> Array:
        r"""The loss at S shifted parameter vectors: :math:`L(\theta + \mathrm{shifts}[s])`.

        Parameters
        ----------
        shifts
            (S, D) shifts of :math:`\theta`, real floating, on ``params``' device; S may be 0.

        Returns
        -------
        Array
            (S,), the losses; ``value(xp.zeros((1, D)))[0]`` is :math:`L(\theta)`.

        Notes
        -----
        Cost: about S forward passes of the batch, batched (vmapped or stacked)
        in chunks of the adapter's ``default_max_shifts``; no autograd.
        """

    def gradient(self) -> Array:
        r""":math:`\nabla L(\theta)`, shape (D,): one forward and one backward pass."""

    def hvp(self, v: Array, /) -> Array:
        r"""The exact Hessian-vector product :math:`\nabla^2 L(\theta)\, v` for ``v`` (D,).

        Returns (D,).

        Cost: about two forward and two backward passes (forward-over-reverse, or
        Pearlmutter's R-operator for the reference models); never a :math:`D \times D` matrix.
        """

    def hvp_batch(self, V: Array, /) -> Array:
        r"""M Hessian-vector products :math:`\nabla^2 L(\theta) V[m]` for V (M, D); returns (M, D).

        Cost: M times ``hvp``, batched where the framework allows; memory :math:`M D` plus
        the batched activations.
        """


class LossFunctionBase(FrozenBase):
    r"""Shared properties of the adapters' loss functions and a generic ``hvp_batch``.

    Subclasses set ``self._params`` (flat :math:`\theta`), ``self._blocks`` and ``self._xp``,
    hold the labelled batch with ``_hold_batch`` (which also applies ``mask`` and
    ``ignore_index`` and sets the scale of the reduction) and implement ``value``,
    ``gradient`` and ``hvp`` (and ``hvp_batch`` when the framework batches it).
    ``reduce_log_likelihood`` turns the per-position log-likelihoods of the batch
    into the loss (masked positions excluded, scaled).
    """

    _params: Array
    _reduction: str
    _num_inputs: int
    _num_counted: Any
    _scale: Any
    _family: Any
    _labels: Array
    _logits: Array
    _mask: Array | None = None
    _weights: Array | None = None

    _role = "loss function"
    _reference_name = "params"

    checked_products = {
        "value": Product("the loss values L(θ + shift)"),
        "gradient": Product("the gradient ∇L", param_axis=True),
        "hvp": Product("the Hessian-vector product H v", param_axis=True),
        "hvp_batch": Product("the Hessian-vector products H V", param_axis=True),
    }
    _operand_remedy = "Move it with xp.asarray({name}, device=loss.device)."

    family = ReadOnly[Any]("The output family whose log-likelihood defines the loss.")
    labels = ReadOnly[Array](
        "The labels y of the batch in the logits' layout: class indices (N, ∗S) or "
        "targets (N, ∗S, C); the labels of masked positions replaced by a valid "
        "placeholder (0, or 1/C for label rows)."
    )
    logits = ReadOnly[Array](r"The logits :math:`z` (N, ∗S, C) at :math:`\theta`, classes last.")
    mask = ReadOnly["Array | None"](
        "The counted positions: None (all) or a boolean array (N, ∗S), False where "
        "``mask=`` was False or the label equals ``ignore_index``."
    )
    params = ReadOnly[Array](
        r":math:`\theta`, the flat parameter vector (D,) at which the loss is frozen."
    )
    num_inputs = ReadOnly[int]("N, the number of labelled examples in the batch.")
    reduction = ReadOnly[str](
        """``"sum"`` over the counted positions, or ``"mean"``: the sum divided by their number."""
    )

    def _reference(self) -> Array:
        return self._params

    @property
    def num_params(self) -> int:
        """D, the length of the flat parameter vector."""
        return int(self._params.shape[0])

    @property
    def num_counted(self) -> int:
        r"""The number :math:`n = \sum m_{nt}` of counted (unmasked) positions.

        It is the ``"mean"`` divisor.

        :math:`N \cdot P` without a mask (N for logits (N, C)); with ``mask`` its number of
        True entries, counted once when the batch was taken (an adapter that sets
        ``_mask`` itself sets ``_num_counted`` with it). Inside JAX ``jit`` /
        ``shard_map``, where a mask or the labels are traced, the host cannot
        count them and :math:`n` is :math:`N \cdot P`.
        """
        return int(self._num_counted)

    def _hold_batch(
        self,
        logits: Array,
        labels: Array,
        family: Any,
        reduction: str,
        *,
        mask: Array | None = None,
        ignore_index: int | None = None,
    ) -> None:
        """Check the labelled batch, apply ``mask`` and ``ignore_index``, and keep it.

        ``logits`` (N, ∗S, C) and ``labels`` in the classes-last layout (the
        adapter moves the user's class axis first). ``mask`` (None or boolean
        (N, ∗S), ``check_loss_mask``) marks the positions that count;
        ``ignore_index`` (None or an int) masks the positions whose INTEGER label
        equals it. The labels of masked positions are replaced by a valid
        placeholder (0, or 1/C for floating labels with a class axis) before the
        family's check (``check_loss_labels``), so padding may hold any value.
        Sets the logits, labels, family, reduction, N, ``mask`` (None when none
        was given and nothing is ignored), the weights m (None, or the mask as
        0/1 in the logits' dtype), ``num_counted`` n and the scale of the sum (1
        for ``"sum"``, 1 / n for ``"mean"``). A batch without a counted position
        is a ValueError. Cost: O(N P) elementwise work, one host read of n when
        masked.
        """
        xp = array_namespace(logits, names=("logits",))
        if not is_traced(logits):  # e.g. softmax probabilities for Categorical
            family._check_outputs(logits, xp, "the model's outputs")
        counted = None if mask is None else check_loss_mask(mask, logits)
        if (
            ignore_index is not None
            and is_array(labels)
            and tuple(labels.shape) == tuple(logits.shape[:-1])
            and xp.isdtype(labels.dtype, "integral")
        ):
            ignored = labels == ignore_index
            labels = xp.where(ignored, xp.zeros_like(labels), labels)
            counted = ~ignored if counted is None else xp.logical_and(counted, ~ignored)
        lead = None if counted is None else tuple(counted.shape)
        if lead is not None and is_array(labels) and tuple(labels.shape[: len(lead)]) == lead:
            labels = masked_label_placeholder(labels, counted, xp)
        check_loss_labels(family, logits, labels)
        n = int(logits.shape[0])
        if counted is None:
            num_counted = n * math.prod(int(s) for s in logits.shape[1:-1])
            weights = None
        else:
            num_counted = int(xp.sum(xp.astype(counted, index_dtype(xp, counted))))
            if num_counted == 0:
                because = "mask"
                if ignore_index is not None:
                    because = f"mask and ignore_index={ignore_index}"
                msg = (
                    f"{because} must leave at least one position of the batch counted; every "
                    f"one of its {n * math.prod(int(s) for s in logits.shape[1:-1])} positions "
                    "is masked."
                )
                raise ValueError(msg)
            weights = xp.astype(counted, logits.dtype)
        self._logits = logits
        self._labels = labels
        self._family = family
        self._reduction = reduction
        self._num_inputs = n
        self._mask = counted
        self._weights = weights
        self._num_counted = num_counted
        self._scale = 1.0 / num_counted if reduction == "mean" else 1.0

    def reduce_log_likelihood(self, ll: Array, /) -> Array:
        r"""The loss from per-position log-likelihoods ``ll`` (..., N, ∗S): (...).

        :math:`-\mathrm{scale} \cdot \sum_n \sum_t m_{nt}\, \mathrm{ll}[\dots, n, t]`, summed over
        the batch's N and position axes (the last 1 + len(S) axes), masked positions
        excluded (multiplied by 0: their logits are finite, so their terms are). Leading
        axes (a vmap over shifts, for ``value``) are kept. Cost: O(size of ``ll``).
        """
        xp = self._xp
        k = len(self._logits.shape) - 1  # N and the position axes
        if self._weights is not None:
            ll = ll * self._weights
        axes = tuple(range(ll.ndim - k, ll.ndim))
        return -xp.sum(ll, axis=axes) * self._scale

    def value(self, shifts: Array, /) -> Array:
        r"""The loss at :math:`\theta + \mathrm{shifts}[s]` for shifts (S, D); returns (S,)."""
        raise NotImplementedError

    def gradient(self) -> Array:
        r""":math:`\nabla L(\theta)`, shape (D,)."""
        raise NotImplementedError

    def hvp(self, v: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, v` for ``v`` (D,); returns (D,).

        Every adapter implements it exactly (never through a :math:`D \times D` matrix).
        """
        raise NotImplementedError

    def hvp_batch(self, V: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, V[m]` for M vectors ``V`` (M, D); returns (M, D).

        Generic default: M calls of ``hvp``, stacked.
        """
        return self._row_by_row(self.hvp, V)
