"""The torch adapter's loss function: the negative log-likelihood of a module on one batch.

Public through ``fisherbound.adapters.torch`` (``TorchLossFunction``, built by its
``loss_function`` and ``loss_functions``), for ``fisherbound.landscape``.
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: TID253

from fisherbound._lib import array_namespace, check_finite
from fisherbound.adapters._torch_model import FunctionalModel, Selection, ensure_forward_ad
from fisherbound.linearization import LossFunctionBase

__all__ = ["TorchLossFunction"]

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
        selection: Selection,
        inputs: tuple[Tensor, ...],
        labels: Tensor,
        family: Any,
        reduction: str,
    ) -> None:
        self._bind(selection, inputs)
        self._params = torch.cat([p.reshape(-1) for p in self._primals])
        with torch.no_grad():
            z = self._call(self._primals, inputs)
        self._check_logits(z)
        self._xp = array_namespace(z, names=("model output",))
        check_finite(z, "model output", xp=self._xp)
        self._hold_batch(z, labels, family, reduction)

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
