"""The torch adapter's loss function: the negative log-likelihood of a module on one batch.

Public through ``fisherbound.adapters.torch``: ``TorchLossFunction`` and its fronts
``loss_function`` and ``loss_functions`` (defined here, re-exported there), for
``fisherbound.landscape``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch  # noqa: TID253
from torch import nn  # noqa: TID253

from fisherbound._finite import check_outputs
from fisherbound._lib import array_namespace
from fisherbound.adapters._torch_model import (
    FunctionalModel,
    Inputs,
    MaskSpec,
    OutputSelector,
    OutputSpec,
    Selection,
    check_batch,
    check_mask_spec,
    check_model,
    check_output_options,
    classes_last,
    ensure_forward_ad,
    is_tensor_or_text,
    resolve_mask,
    resolve_model,
    select_parameters,
    without_key,
)
from fisherbound.families import Family
from fisherbound.linearization import (
    Lazy,
    LossFunctionBase,
    ReadOnly,
    check_batches,
    check_loss_options,
    masked_label_placeholder,
    stream_pairs,
)

__all__ = [
    "KINKED_MODULES",
    "TorchLossFunction",
    "kinked_modules",
    "loss_function",
    "loss_functions",
]

Tensor = torch.Tensor

#: Module types whose output has a kink (a jump of the first derivative) in their
#: input: second differences across one measure 1/h times the jump, not a Hessian.
KINKED_MODULES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.ReLU,
    torch.nn.LeakyReLU,
    torch.nn.PReLU,
    torch.nn.RReLU,
    torch.nn.Hardtanh,  # ReLU6 too
    torch.nn.Hardswish,
    torch.nn.Hardsigmoid,
    torch.nn.Hardshrink,
    torch.nn.Softshrink,
    torch.nn.Threshold,
    torch.nn.SELU,
    torch.nn.MaxPool1d,
    torch.nn.MaxPool2d,
    torch.nn.MaxPool3d,
    torch.nn.AdaptiveMaxPool1d,
    torch.nn.AdaptiveMaxPool2d,
    torch.nn.AdaptiveMaxPool3d,
    torch.nn.FractionalMaxPool2d,
    torch.nn.FractionalMaxPool3d,
)


def kinked_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """The class names of the submodules of ``model`` with kinks, sorted, each once.

    ``KINKED_MODULES``, and ``ELU`` where its first derivative jumps (alpha ≠ 1;
    ``CELU`` and ``ELU(alpha=1)`` are once differentiable). Functional calls (``F.relu``,
    ``torch.clamp``, ``x.max(...)``) are not modules and cannot be seen.
    """
    found = set()
    for module in model.modules():
        if isinstance(module, KINKED_MODULES) or (
            isinstance(module, torch.nn.ELU) and module.alpha != 1.0
        ):
            found.add(type(module).__name__)
    return tuple(sorted(found))


# ---------------------------------------------------------------------------
# The loss of a labelled batch (added for fisherbound.landscape)
# ---------------------------------------------------------------------------


# The torch loss function whose hvp graph is alive (at most one; see ``hvp``).
_GRAPH_HOLDER: list[weakref.ref[Any] | None] = [None]
# Per model and parameter selection: whether its double backward agreed with
# forward-over-reverse on a first product (checked once per model, not per batch).
_DOUBLE_BACKWARD: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], bool]] = (
    weakref.WeakKeyDictionary()
)


class TorchLossFunction(FunctionalModel, LossFunctionBase):
    r"""The negative log-likelihood of a ``torch.nn.Module`` on one labelled batch.

    Build it with :func:`loss_function`. :math:`\theta` is the concatenation of the selected
    parameters (as in ``linearize``). ``value`` evaluates the module at S shifted
    parameter vectors with ``torch.func.vmap`` over ``functional_call``;
    ``gradient`` is ``torch.func.grad``; ``hvp`` is one backward pass through a
    cached graph of the gradient (reverse-over-reverse) and ``hvp_batch``
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, vmapped over
    the vectors). The parameters are read, never changed.
    """

    #: Shifts evaluated per vmapped forward pass in ``value``.
    default_max_shifts: int = 32

    def __init__(
        self,
        selection: Selection,
        inputs: Inputs,
        labels: Tensor,
        family: Any,
        reduction: str,
        spec: OutputSpec | None = None,
        mask: MaskSpec = None,
        ignore_index: int | None = None,
        raw_inputs: object = None,
    ) -> None:
        self._bind(selection, inputs, spec)
        self._params = torch.cat([p.reshape(-1) for p in self._primals])
        # hvp's cached graph of ∇L (None until first used) and whether it failed.
        self._grad_graph: tuple[Tensor, Tensor] | None = None
        self._no_grad_graph = False
        self._grad_graph_checked = False
        self._graph_versions: tuple[int, ...] = ()
        self._watched: tuple[Tensor, ...] | None = None  # listed by ``_state_versions``
        with torch.no_grad():
            z = self._z(self._primals, inputs, check=self._output_check())
        self._xp = array_namespace(z, names=("model output",))
        check_outputs(self, z, "model output")
        counted = resolve_mask(mask, inputs if raw_inputs is None else raw_inputs, z)
        if labels.ndim == z.ndim and labels.ndim >= 2:
            # Label rows (N, *S, C) (Bernoulli / Gaussian targets, categorical target
            # distributions) in the model output's layout.
            labels = classes_last(labels, self._spec.class_axis)
        ignored = None
        if ignore_index is not None and not (labels.is_floating_point() or labels.is_complex()):
            hit = labels == ignore_index
            if tuple(hit.shape) == tuple(z.shape[:-1]) and bool(hit.any()):
                ignored = hit
                labels = torch.where(hit, torch.zeros_like(labels), labels)
        if counted is not None and tuple(labels.shape[: counted.ndim]) == tuple(counted.shape):
            # Padding may hold any label: those of masked positions become a valid one.
            labels = masked_label_placeholder(labels, counted, self._xp)
        self._hold_batch(z, labels, family, reduction)
        if ignored is not None:
            counted = ~ignored if counted is None else counted & ~ignored
            if not bool(counted.any()):
                msg = (
                    f"ignore_index={ignore_index} leaves no position of the batch to count: "
                    "every label equals it (or is masked). Leave such batches out."
                )
                raise ValueError(msg)
        self._mask = counted
        self._num_inputs = int(z.shape[0])
        self._num_counted = math.prod(z.shape[:-1]) if counted is None else int(counted.sum())
        self._scale = 1.0 / self._num_counted if reduction == "mean" else 1.0

    mask = ReadOnly["Tensor | None"](
        "The positions that count, a boolean (N, ∗S) tensor (mask and ignore_index), "
        "or None when all do."
    )

    @property
    def kinks(self) -> tuple[str, ...]:
        """The module types with kinks in the model (``('MaxPool2d', 'ReLU')``), or ().

        Read from the module tree (``KINKED_MODULES``): a ReLU called as a function
        (``F.relu``, ``torch.relu``, ``clamp``) is invisible here, so () means none was
        found, not that the loss is smooth. ``fisherbound.landscape.loss_trace``
        warns when its loss-only method meets a non-empty tuple.
        """
        return kinked_modules(self._model)

    num_inputs = ReadOnly[int]("N, the number of examples (inputs) in the batch.")

    # -- plumbing ------------------------------------------------------------

    def _nll(self, z: Tensor) -> Tensor:
        """−Σ log p(y | z) over the counted positions of z (..., N, ∗S, C), scaled."""
        y = self._labels
        lead = z.ndim - self._logits.ndim
        if lead:
            y = y.expand(*z.shape[:lead], *y.shape)
        ll = self._family.unchecked_log_likelihood(z, y, xp=self._xp)  # (..., N, *S)
        if self._mask is not None:
            ll = torch.where(self._mask, ll, ll.new_zeros(()))
        dims = tuple(range(lead, ll.ndim))
        return -ll.sum(dim=dims) * self._scale

    def _loss(self, theta: Tensor) -> Tensor:
        return self._nll(self._z(self._split(theta), self._batch))

    # -- the loss and its derivatives ----------------------------------------

    def value(self, shifts: Tensor, /) -> Tensor:
        r""":math:`L(\theta + \mathrm{shifts}[s])` for shifts (S, D); returns (S,).

        ``torch.func.vmap`` of the module's forward pass over the S parameter
        vectors (chunks of ``default_max_shifts``), without autograd: cost about
        S forward passes, batched.

        Examples
        --------
        >>> from fisherbound.adapters.torch import loss_function
        >>> model = torch.nn.Linear(2, 3).double()
        >>> x = torch.ones(4, 2, dtype=torch.float64)
        >>> loss = loss_function(model, x, torch.zeros(4, dtype=torch.int64))
        >>> loss.value(torch.zeros(5, 9, dtype=torch.float64)).shape
        torch.Size([5])
        """
        d = self.num_params
        self._operand(shifts, "shifts", (None, d), f"(S, D={d})")
        if shifts.shape[0] == 0:
            return shifts.new_zeros((0,))

        def logits(s: Tensor) -> Tensor:
            return self._z(self._split(self._params + s), self._batch)

        pieces = []
        with torch.no_grad():
            for chunk in torch.split(shifts, self.default_max_shifts):
                pieces.append(self._nll(torch.func.vmap(logits)(chunk)))
        return torch.cat(pieces)

    def gradient(self) -> Tensor:
        r""":math:`\nabla L(\theta)`, shape (D,).

        One forward and one backward pass (``torch.func.grad``).
        """
        with torch.enable_grad():
            return torch.func.grad(self._loss)(self._params)

    def hvp(self, v: Tensor, /) -> Tensor:
        r""":math:`\nabla^2 L(\theta)\, v` for ``v`` (D,); returns (D,).

        Reverse-over-reverse on a cached graph of :math:`g = \nabla L(\theta)`: the first call runs
        the forward pass and a differentiable backward pass (``create_graph=True``) and keeps their
        graph; every later call is one backward pass through it, :math:`\nabla_\theta (g^\top v)`,
        about half the cost of forward-over-reverse, which redoes the
        forward pass each time. The first product for a model and parameter
        selection is checked against forward-over-reverse (``hvp_batch``'s path),
        once per model: an operation whose double backward is wrong or missing (a
        ``once_differentiable`` autograd Function) makes every call take
        forward-over-reverse. At most one such graph is held
        across all torch loss functions (about three forward passes' worth of
        activations): a Hessian operator over many batches rebuilds each batch's
        graph, never holds them all. A parameter, buffer or input tensor changed in
        place since the graph was built (its version counter moved) makes it rebuild,
        so the product is never stale.
        """
        d = self.num_params
        self._operand(v, "v", (d,), f"(D={d},)")
        verdict = _DOUBLE_BACKWARD.get(self._model, {}).get(tuple(self._names))
        if verdict is not None:  # this model and selection were checked before
            self._grad_graph_checked = True
            self._no_grad_graph = self._no_grad_graph or not verdict
        if self._no_grad_graph:
            return self._hvp(v)
        if self._grad_graph is not None and self._graph_versions != self._state_versions():
            self._drop_grad_graph()  # a parameter, buffer or input changed in place
        built = self._grad_graph is None
        try:
            theta, g = self._gradient_graph()
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(g, theta, grad_outputs=v, retain_graph=True)
        except RuntimeError:
            self._drop_grad_graph()
            if built:  # no double backward: forward-over-reverse from now on
                self._no_grad_graph = True
                return self._hvp(v)
            return self.hvp(v)  # a saved tensor changed in place: rebuild the graph
        if built and not self._grad_graph_checked:  # the first product, checked once
            reference = self._hvp(v)
            tol = 100 * torch.finfo(reference.dtype).eps ** 0.5
            scale = float(reference.abs().max())
            if not math.isfinite(scale):  # nothing to compare: the finite check names it
                return reference
            agree = bool(torch.allclose(hv, reference, rtol=tol, atol=tol * scale))
            if not agree:
                self._drop_grad_graph()
                self._no_grad_graph = True
            self._grad_graph_checked = True
            _DOUBLE_BACKWARD.setdefault(self._model, {})[tuple(self._names)] = agree
            return reference
        return hv.detach()

    def _gradient_graph(self) -> tuple[Tensor, Tensor]:
        """(θ, ∇L(θ) with its graph), built on demand; the only one held (see ``hvp``)."""
        if self._grad_graph is None:
            holder = _GRAPH_HOLDER[0]() if _GRAPH_HOLDER[0] is not None else None
            if holder is not None and holder is not self:
                holder._drop_grad_graph()
            theta = self._params.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self._loss(theta), theta, create_graph=True)
            self._grad_graph = (theta, g)
            self._graph_versions = self._state_versions()
            _GRAPH_HOLDER[0] = weakref.ref(self)
        return self._grad_graph

    def _state_versions(self) -> tuple[int, ...]:
        """Version counters of the model's parameters and buffers and of the inputs.

        The tensors are listed once, when the gradient graph is first built (walking
        the module tree and the inputs took 0.13 ms per product on a 3-layer MLP).
        """
        if self._watched is None:
            tensors = [*self._model.parameters(), *self._model.buffers()]
            leaves = torch.utils._pytree.tree_leaves(self._batch)
            self._watched = (*tensors, *(t for t in leaves if torch.is_tensor(t)))
        return tuple(t._version for t in self._watched)

    def _drop_grad_graph(self) -> None:
        self._grad_graph = None

    def hvp_batch(self, V: Tensor, /) -> Tensor:
        r""":math:`\nabla^2 L(\theta)\, V[m]` for M vectors ``V`` (M, D); returns (M, D).

        ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse), vmapped
        over the M vectors: exact, about M times the cost of two gradient steps,
        batched.
        """
        d = self.num_params
        self._operand(V, "V", (None, d), f"(M, D={d})")
        if V.shape[0] == 0:
            return V.new_zeros((0, d))
        return torch.func.vmap(self._hvp)(V)

    def _hvp(self, v: Tensor) -> Tensor:
        ensure_forward_ad()
        with torch.enable_grad():
            return torch.func.jvp(torch.func.grad(self._loss), (self._params,), (v,))[1]


# ---------------------------------------------------------------------------
# The public fronts (re-exported by fisherbound.adapters.torch)
# ---------------------------------------------------------------------------


def loss_function(
    model: nn.Module | Callable[..., Any],
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    labels: Tensor,
    /,
    *,
    family: Family | None = None,
    reduction: str = "sum",
    params: Sequence[str] | Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: OutputSelector = None,
    class_axis: int = -1,
    mask: MaskSpec = None,
    ignore_index: int | None = -100,
) -> TorchLossFunction:
    r"""The negative log-likelihood of ``model`` on one labelled batch, for the landscape.

    :math:`L(\theta) = -\sum_{n,\, t \text{ counted}} \log p(y_{nt} \mid z_{nt}(\theta))` over the
    examples n and their positions t, with :math:`z` the logits (N, ∗S, C) (as in :func:`linearize`)
    and the family's ``log_likelihood``. A position counts unless ``mask`` is False there
    or its integer label equals ``ignore_index``. ``reduction="mean"`` divides by
    the number of counted positions, as ``torch.nn.CrossEntropyLoss(ignore_index=
    -100)`` does; ``num_counted`` is that number (N without positions and ignored
    labels), the weight of the batch in a data set's mean; ``num_inputs`` is N. The result is a
    :class:`~fisherbound.linearization.LossFunction`: ``value(shifts)`` (S, D) →
    (S,) (vmapped over shifts), ``gradient()``, ``hvp(v)`` / ``hvp_batch(V)``
    (forward-over-reverse, exact). Cost: one forward pass here (to check the
    labels); ``value`` costs S forward passes, ``hvp`` about two gradient steps.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` whose output holds the logits (see
        :func:`linearize`); in eval mode if it has Dropout or BatchNorm. Or a
        function ``f(params, *inputs)`` with ``params`` a dict of tensors (as in
        :func:`linearize`).
    inputs
        A tensor, a tuple of tensors (positional arguments) or a dict of tensors
        (keyword arguments), examples on axis 0.
    labels
        Integer class indices (N, ∗S) or target distributions (N, ∗S, C) (soft
        targets) for ``Categorical()`` (the default), floats in [0, 1] (N, ∗S, C)
        for ``Bernoulli()`` (binary or soft), targets (N, ∗S, C) for
        ``Gaussian()``, the class axis of the (N, ∗S, C) forms where
        ``class_axis`` says (the model output's layout); on the parameters' device.
    family
        The output family (default ``Categorical()``).
    reduction
        ``"sum"`` over the counted positions (default) or ``"mean"``.
    params
        The parameters :math:`\theta` (names), as in ``linearize``; default every trainable one.
        For a function ``model``, the dict of its parameter tensors.
    buffers
        For a function ``model``: its non-differentiated tensors, as in
        :func:`linearize`.
    output, class_axis
        Where the logits are in the model's output and their class axis, as in
        :func:`linearize`.
    mask
        Which positions count, as in :func:`linearize` (a boolean (N, ∗S) tensor,
        a key of dict inputs or a callable); None: all.
    ignore_index
        For integer labels: positions whose label equals it do not count (their
        label is replaced by 0 before the family sees it); None: none ignored.
        A mask and ignore index leaving no position to count are refused.

    Returns
    -------
    TorchLossFunction

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import loss_function
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> loss = loss_function(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.num_params, loss.hvp(torch.ones(67)).shape
    (67, torch.Size([67]))
    >>> x, y = torch.randn(2, 6, 4), torch.tensor([[0, 1, 2, -100, -100, -100], [2] * 6])
    >>> loss = loss_function(model, x, y, reduction="mean")  # (N, T, C) logits
    >>> loss.num_inputs, loss.num_counted  # N and the counted positions
    (2, 9)
    """
    model, params = resolve_model(model, params, buffers)
    options = _LossOptions.check(model, family, reduction, output, class_axis, mask, ignore_index)
    selection = select_parameters(options.model, params)
    return _loss_function(selection, inputs, labels, options)


class _LossOptions(NamedTuple):
    """The checked options of ``loss_function`` / ``loss_functions``, shared by every batch."""

    model: nn.Module
    family: Any
    reduction: str
    spec: OutputSpec
    mask: MaskSpec
    ignore_index: int | None

    @classmethod
    def check(
        cls,
        model: object,
        family: Any,
        reduction: str,
        output: OutputSelector,
        class_axis: int,
        mask: object,
        ignore_index: object,
        *,
        stream: bool = False,
    ) -> _LossOptions:
        """The options checked in the fronts' order; ``stream``: a mask for every batch."""
        module = check_model(model)
        fam = check_loss_options(family, reduction)
        spec = check_output_options(output, class_axis)
        checked_mask = check_mask_spec(mask, stream=stream)
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            msg = f"ignore_index must be an int or None; got {type(ignore_index).__name__}."
            raise TypeError(msg)
        return cls(module, fam, reduction, spec, checked_mask, ignore_index)


def _loss_function(
    selection: Selection,
    inputs: object,
    labels: object,
    options: _LossOptions,
    *,
    parameters: bool = True,
) -> TorchLossFunction:
    batch = check_batch(selection, inputs, parameters=parameters)
    if not isinstance(labels, torch.Tensor):
        msg = (
            f"labels must be a torch.Tensor; got {type(labels).__module__}."
            f"{type(labels).__name__}. Convert with torch.as_tensor(...)."
        )
        raise TypeError(msg)
    o = options
    return TorchLossFunction(
        selection, batch, labels, o.family, o.reduction, o.spec, o.mask, o.ignore_index, inputs
    )


def loss_functions(
    model: nn.Module | Callable[..., Any],
    batches: Iterable[Any],
    /,
    *,
    family: Family | None = None,
    reduction: str = "sum",
    params: Sequence[str] | Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: OutputSelector = None,
    class_axis: int = -1,
    mask: str | Callable[[Any], Any] | None = None,
    ignore_index: int | None = -100,
    label_key: str = "labels",
) -> Iterator[TorchLossFunction]:
    """``loss_function`` on each labelled batch of ``batches``, lazily.

    A batch is a pair ``(inputs, labels, ...)`` (a DataLoader yields them) or a
    dict: then its entry ``label_key`` (default ``"labels"``) holds the labels and
    the other entries are the keyword inputs (a Hugging Face collator's batch).
    Each loss function is built when it is requested, so a data set is streamed
    one batch at a time. ``mask`` is per batch: None, a key of dict inputs (e.g.
    ``"attention_mask"``) or a callable ``inputs -> mask``; the other options are
    those of :func:`loss_function`. With ``reduction="mean"`` each batch weighs
    its ``num_counted`` positions, so a data set's mean is over all its counted
    positions.

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import loss_functions
    >>> data = [(torch.randn(8, 4), torch.zeros(8).long()) for _ in range(3)]
    >>> [loss.num_inputs for loss in loss_functions(torch.nn.Linear(4, 3), data)]
    [8, 8, 8]
    """
    model, params = resolve_model(model, params, buffers)
    options = _LossOptions.check(
        model, family, reduction, output, class_axis, mask, ignore_index, stream=True
    )
    if not isinstance(label_key, str):
        msg = f"label_key must be a str; got {type(label_key).__name__}."
        raise TypeError(msg)
    selection = select_parameters(options.model, params)
    what = "(inputs, labels) pairs or dict batches (a list, a generator, a DataLoader)"
    remedy = "For one batch use loss_function(model, inputs, labels)."
    checked = check_batches(batches, what=what, remedy=remedy, single=is_tensor_or_text)

    def pairs() -> Iterator[Any]:
        for i, batch in enumerate(checked):
            if isinstance(batch, Mapping):
                if label_key not in batch:
                    keys = ", ".join(repr(k) for k in batch)
                    msg = (
                        f"batch {i} is a dict without the labels' key label_key={label_key!r}; "
                        f"got keys [{keys}]. Name the key with label_key=..."
                    )
                    raise ValueError(msg)
                yield (without_key(batch, label_key), batch[label_key])
            else:
                yield batch

    def build(i: int, inputs: Any, labels: Any) -> TorchLossFunction:
        return _loss_function(selection, inputs, labels, options, parameters=i == 0)

    return stream_pairs(Lazy(pairs(), checked), build)  # the batches were checked above
