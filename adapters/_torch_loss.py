"""The torch adapter's loss function: the negative log-likelihood of a module on one batch.

Public through ``fisherbound.adapters.torch`` (``loss_function``,
``loss_functions``, ``TorchLossFunction``), for ``fisherbound.landscape``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch  # noqa: TID253
from torch import nn  # noqa: TID253

from fisherbound._lib import array_namespace, check_finite
from fisherbound.adapters._torch_model import (
    FunctionalModel,
    as_inputs,
    check_deterministic,
    check_inputs_device,
    check_model,
    check_parameters,
    ensure_forward_ad,
    is_tensor_or_text,
    select_parameters,
)
from fisherbound.linearization import (
    LossFunctionBase,
    check_batches,
    check_loss_labels,
    check_loss_options,
    stream_pairs,
)

__all__ = ["TorchLossFunction", "loss_function", "loss_functions"]

Tensor = torch.Tensor

# ---------------------------------------------------------------------------
# The loss of a labelled batch (added for fisherbound.landscape)
# ---------------------------------------------------------------------------


class TorchLossFunction(FunctionalModel, LossFunctionBase):
    """The negative log-likelihood of a ``torch.nn.Module`` on one labelled batch.

    Build it with :func:`loss_function`. θ is the concatenation of the selected
    parameters (as in ``linearize``). ``value`` evaluates the module at S shifted
    parameter vectors with ``torch.func.vmap`` over ``functional_call``;
    ``gradient`` is ``torch.func.grad``; ``hvp`` / ``hvp_batch`` are
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, vmapped over
    the vectors). The parameters are read, never changed.
    """

    #: Shifts evaluated per vmapped forward pass in ``value``.
    default_max_shifts: int = 32

    def __init__(
        self,
        model: nn.Module,
        inputs: tuple[Tensor, ...],
        labels: Tensor,
        names: tuple[str, ...],
        tensors: tuple[Tensor, ...],
        family: Any,
        reduction: str,
    ) -> None:
        self._bind(model, inputs, names, tensors)
        self._params = torch.cat([p.reshape(-1) for p in self._primals])
        with torch.no_grad():
            z = self._call(self._primals, inputs)
        self._check_logits(z)
        self._xp = array_namespace(z, names=("model output",))
        check_finite(z, "model output", xp=self._xp)
        check_loss_labels(family, z, labels)
        self._logits = z
        self._labels = labels
        self._family = family
        self._reduction = reduction
        self._num_inputs = int(z.shape[0])
        self._scale = 1.0 / self._num_inputs if reduction == "mean" else 1.0

    # -- plumbing ------------------------------------------------------------

    def _check_logits(self, z: object) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or 0 in tuple(z.shape):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            msg = (
                f"model(inputs) must return a tensor of logits of shape (N, C); got {got}. "
                "Wrap the model in a module that returns the logits."
            )
            raise ValueError(msg)
        if z.dtype != self._param_dtype:
            msg = (
                f"model(inputs) must return logits in the parameters' dtype {self._param_dtype}; "
                f"got {z.dtype}. Convert the model with model.to({self._param_dtype})."
            )
            raise ValueError(msg)

    def _nll(self, z: Tensor) -> Tensor:
        """−Σ_n log p(y_n | z_n) over the example axis of z (..., N, C), scaled."""
        y = self._labels
        if z.ndim > 2:
            y = y.expand(*z.shape[:-2], *y.shape)
        return -self._family.unchecked_log_likelihood(z, y, xp=self._xp).sum(dim=-1) * self._scale

    def _loss(self, theta: Tensor) -> Tensor:
        return self._nll(self._call(self._split(theta), self._inputs))

    # -- the loss and its derivatives ----------------------------------------

    def value(self, shifts: Tensor, /) -> Tensor:
        """L(θ + shifts[s]) for shifts (S, D); returns (S,).

        ``torch.func.vmap`` of the module's forward pass over the S parameter
        vectors (chunks of ``default_max_shifts``), without autograd: cost about
        S forward passes, batched.

        Examples
        --------
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
            return self._call(self._split(self._params + s), self._inputs)

        pieces = []
        with torch.no_grad():
            for chunk in torch.split(shifts, self.default_max_shifts):
                pieces.append(self._nll(torch.func.vmap(logits)(chunk)))
        return torch.cat(pieces)

    def gradient(self) -> Tensor:
        """∇L(θ), shape (D,): one forward and one backward pass (``torch.func.grad``)."""
        with torch.enable_grad():
            return torch.func.grad(self._loss)(self._params)

    def hvp(self, v: Tensor, /) -> Tensor:
        """∇²L(θ) v for ``v`` (D,); returns (D,) (forward-over-reverse)."""
        d = self.num_params
        self._operand(v, "v", (d,), f"(D={d},)")
        return self._hvp(v)

    def hvp_batch(self, V: Tensor, /) -> Tensor:
        """∇²L(θ) V[m] for M vectors ``V`` (M, D); returns (M, D).

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


def loss_function(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    labels: Tensor,
    /,
    *,
    family: Any = None,
    reduction: str = "sum",
    params: Sequence[str] | None = None,
) -> TorchLossFunction:
    """The negative log-likelihood of ``model`` on one labelled batch, for the landscape.

    L(θ) = −Σ_n log p(y_n | z_n(θ)) with z = ``model(*inputs)`` and the family's
    ``log_likelihood`` (``reduction="mean"`` divides by N), as a
    :class:`~fisherbound.linearization.LossFunction`: ``value(shifts)`` (S, D) →
    (S,) (vmapped over shifts), ``gradient()``, ``hvp(v)`` / ``hvp_batch(V)``
    (forward-over-reverse, exact). Cost: one forward pass here (to check the
    labels); ``value`` costs S forward passes, ``hvp`` about two gradient steps.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` returning logits (N, C); in eval mode if it has
        Dropout or BatchNorm.
    inputs
        A tensor or a tuple of tensors (positional arguments), examples on axis 0.
    labels
        Integer class indices (N,) for ``Categorical()`` (the default), {0, 1}
        floats (N, C) for ``Bernoulli()``, targets (N, C) for ``Gaussian()``; on
        the parameters' device.
    family
        The output family (default ``Categorical()``).
    reduction
        ``"sum"`` over the batch (default) or ``"mean"``.
    params
        The parameters θ (names), as in ``linearize``; default every trainable one.

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
    """
    model = check_model(model)
    fam = check_loss_options(family, reduction)
    names, tensors = select_parameters(model, params)
    return _loss_function(model, inputs, labels, names, tensors, fam, reduction)


def _loss_function(
    model: nn.Module,
    inputs: object,
    labels: object,
    names: tuple[str, ...],
    tensors: tuple[Tensor, ...],
    family: Any,
    reduction: str,
) -> TorchLossFunction:
    batch = as_inputs(inputs)
    check_parameters(names, tensors)
    check_deterministic(model)
    check_inputs_device(batch, tensors[0].device)
    if not isinstance(labels, torch.Tensor):
        msg = (
            f"labels must be a torch.Tensor; got {type(labels).__module__}."
            f"{type(labels).__name__}. Convert with torch.as_tensor(...)."
        )
        raise TypeError(msg)
    return TorchLossFunction(model, batch, labels, names, tensors, family, reduction)


def loss_functions(
    model: nn.Module,
    batches: Iterable[Any],
    /,
    *,
    family: Any = None,
    reduction: str = "sum",
    params: Sequence[str] | None = None,
) -> Iterator[TorchLossFunction]:
    """``loss_function`` on each ``(inputs, labels)`` batch of ``batches``, lazily.

    ``batches`` yields pairs (a DataLoader does); each loss function is built when
    it is requested, so a data set is streamed one batch at a time.

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import loss_functions
    >>> data = [(torch.randn(8, 4), torch.zeros(8).long()) for _ in range(3)]
    >>> [loss.num_inputs for loss in loss_functions(torch.nn.Linear(4, 3), data)]
    [8, 8, 8]
    """
    model = check_model(model)
    fam = check_loss_options(family, reduction)
    names, tensors = select_parameters(model, params)
    batches = check_batches(
        batches,
        what="(inputs, labels) pairs (a list, a generator, a DataLoader)",
        remedy="For one batch use loss_function(model, inputs, labels).",
        single=is_tensor_or_text,
    )

    def build(i: int, inputs: Any, labels: Any) -> TorchLossFunction:
        return _loss_function(model, inputs, labels, names, tensors, fam, reduction)

    return stream_pairs(batches, build)
