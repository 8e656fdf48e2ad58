"""The torch adapter: any ``torch.nn.Module`` as a linearization, via ``torch.func``.

``linearize(model, inputs)`` freezes a module at its current parameters and one
batch of inputs and exposes the Jacobian J = ∂z/∂θ of the logits z (N, C) with
respect to the flat parameter vector θ (the selected parameters, row-major, in
``named_parameters()`` order) only through products:

- ``jvp`` / ``jvp_batch`` with ``torch.func.jvp`` (vmapped over tangents);
- ``vjp`` / ``vjp_batch`` with the ``torch.func.vjp`` function of the one forward
  pass done at ``linearize`` time (vmapped over cotangents: one batched backward);
- ``per_example_vjp`` with ``torch.func.vmap`` over the examples of the
  single-example function;
- ``sum_squared_per_example_vjp`` (the building block of exact Fisher diagonals),
  Σ_n (J_nᵀ U[n, k])², with a fast path for the parameters of ``nn.Linear``,
  ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``,
  ``nn.RMSNorm`` and ``nn.BatchNorm*d`` (eval) modules (the layer rules of
  ``fisherbound.adapters.torch_rules``): one forward pass with hooks and ONE
  batched backward pass over the K cotangents to the outputs of those layers,
  then per-layer closed forms (for ``nn.Linear`` on (N, in) inputs,
  (δ_k ⊙ δ_k)ᵀ (a ⊙ a)), as BackPACK does, never per-example gradients of the
  whole network. Every other parameter (custom modules, parameters shared by
  several modules or also used outside their module, modules called more than
  once per forward, layers whose leading axis is not the example axis) goes
  through the generic path, so both paths give the same numbers;
  ``TorchLinearization.fast_path_reasons`` says which parameters take which path.

Nothing here is layer-specific except the fast path; everything else works for
any module whose forward ``torch.func`` can transform.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fisherbound._lib import array_namespace, check_finite, check_positive_int
from fisherbound.adapters._torch_loss import TorchLossFunction
from fisherbound.adapters._torch_model import (
    FunctionalModel,
    Selection,
    check_batch,
    check_model,
    ensure_forward_ad,
    is_tensor_or_text,
    select_parameters,
)
from fisherbound.adapters.torch_rules import (
    FastPathPlan,
    Record,
    batched_grad,
    chunks,
    fast_sum_squared,
    plan_fast_path,
    record_forward,
    static_candidates,
    total,
)
from fisherbound.linearization import (
    LinearizationBase,
    check_loss_options,
    stream_linearizations,
    stream_loss_functions,
)

__all__ = [
    "TorchLinearization",
    "TorchLossFunction",
    "linearize",
    "linearizations",
    "loss_function",
    "loss_functions",
]

Tensor = torch.Tensor


class _NotPerExample(Exception):
    """The single-example forward does not give one row of logits per example."""


class TorchLinearization(FunctionalModel, LinearizationBase):
    """A ``torch.nn.Module`` frozen at its parameters θ and one batch of inputs.

    Build it with :func:`linearize`. θ is the concatenation of the selected
    parameters, each flattened row-major, in the order of ``blocks`` (whose names
    are the parameter names). Every vector is a torch tensor on the parameters'
    device in their dtype.

    The linearization reads the parameters' storage: do not update them in place
    (an optimiser step) while it is in use; build a new one per step.
    """

    def __init__(self, selection: Selection, inputs: tuple[Tensor, ...]) -> None:
        self._bind(selection, inputs)
        model, names, tensors = selection
        self._fast_candidates, self._static_reasons = static_candidates(model, names, tensors)
        self._plan: FastPathPlan | None = None

        def forward(*params: Tensor) -> Tensor:
            out = self._call(params, self._inputs)
            self._check_output_structure(out)
            return out

        with torch.enable_grad():
            result = torch.func.vjp(forward, *self._primals)
        logits, self._vjp_fn = result[0].detach(), result[1]
        check_finite(logits, "model output", xp=array_namespace(logits, names=("model output",)))
        self._logits = logits
        self._xp = array_namespace(logits, names=("model output",))
        n = int(logits.shape[0])
        self._per_example_mode = (
            "vmap" if all(x.ndim >= 1 and x.shape[0] == n for x in inputs) else "masked"
        )

    # -- plumbing ------------------------------------------------------------

    def _check_output_structure(self, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            msg = (
                "model(inputs) must return a tensor of logits of shape (N, C); got "
                f"{type(out).__name__}. Wrap the model in a module that returns the logits."
            )
            raise ValueError(msg)
        if out.ndim != 2 or out.shape[0] < 1 or out.shape[1] < 1:
            msg = (
                "model(inputs) must return logits of shape (N, C), 2-D and non-empty; got "
                f"shape {tuple(out.shape)}. Flatten or select the outputs in a wrapper module."
            )
            raise ValueError(msg)
        if not out.is_floating_point():
            msg = f"model(inputs) must return floating-point logits; got dtype {out.dtype}."
            raise ValueError(msg)
        if out.dtype != self._param_dtype:
            msg = (
                f"model(inputs) must return logits in the parameters' dtype {self._param_dtype}; "
                f"got {out.dtype}. Remove the cast in the model or convert it with "
                f"model.to({out.dtype})."
            )
            raise ValueError(msg)

    def _flatten(self, grads: Sequence[Tensor], lead: tuple[int, ...] = ()) -> Tensor:
        return torch.cat([g.reshape(*lead, -1) for g in grads], dim=len(lead))

    def _shape_text(self, *axes: str) -> str:
        d, n, c = self.num_params, self.num_inputs, self.num_outputs
        sizes = {"D": d, "N": n, "C": c}
        inner = ", ".join(f"{a}={sizes[a]}" if a in sizes else a for a in axes)
        return f"({inner})" if len(axes) > 1 else f"({inner},)"

    # -- products ------------------------------------------------------------

    def jvp(self, v: Tensor, /) -> Tensor:
        """J v for a flat parameter vector ``v`` (D,); returns (N, C).

        One forward pass with forward-mode AD (``torch.func.jvp``).

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> lin.jvp(torch.ones(lin.num_params, dtype=torch.float64)).shape
        torch.Size([4, 3])
        """
        self._operand(v, "v", (self.num_params,), self._shape_text("D"))
        return self._jvp_impl(v)

    def _jvp_impl(self, v: Tensor) -> Tensor:
        ensure_forward_ad()
        tangents = self._split(v)
        return torch.func.jvp(lambda *ps: self._call(ps, self._inputs), self._primals, tangents)[1]

    def vjp(self, u: Tensor, /) -> Tensor:
        """Jᵀ u = Σ_n J_nᵀ u_n for a cotangent ``u`` (N, C); returns (D,).

        One backward pass through the graph recorded at ``linearize`` time.

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> lin.vjp(torch.ones(4, 3, dtype=torch.float64))[-3:]  # the bias block: Σ_n u_n
        tensor([4., 4., 4.], dtype=torch.float64)
        """
        self._operand(u, "u", (self.num_inputs, self.num_outputs), self._shape_text("N", "C"))
        return self._flatten(self._vjp_fn(u))

    def jvp_batch(self, V: Tensor, /) -> Tensor:
        """J V[m] for M parameter vectors ``V`` (M, D); returns (M, N, C) (vmapped jvp)."""
        self._operand(V, "V", (None, self.num_params), self._shape_text("M", "D"))
        m = int(V.shape[0])
        if m == 0:
            return V.new_zeros((0, self.num_inputs, self.num_outputs))
        ensure_forward_ad()
        tangents = self._split(V, (m,))

        def one(*ts: Tensor) -> Tensor:
            return torch.func.jvp(lambda *ps: self._call(ps, self._inputs), self._primals, ts)[1]

        return torch.func.vmap(one)(*tangents)

    def vjp_batch(self, U: Tensor, /) -> Tensor:
        """Jᵀ U[m] for M cotangents ``U`` (M, N, C); returns (M, D): one batched backward."""
        self._operand(
            U, "U", (None, self.num_inputs, self.num_outputs), self._shape_text("M", "N", "C")
        )
        m = int(U.shape[0])
        if m == 0:
            return U.new_zeros((0, self.num_params))
        return self._flatten(torch.func.vmap(self._vjp_fn)(U), (m,))

    def per_example_vjp(self, U: Tensor, /, *, examples: slice | None = None) -> Tensor:
        """J_nᵀ U[i, k] for the examples n = start + i of ``examples``; returns (n, K, D).

        ``U`` has shape (n, K, C) with n the length of the contiguous slice
        ``examples`` (default: all N examples).

        ``torch.func.vmap`` over the examples of the single-example vjp (the K
        cotangents of one example share its forward pass): about n single-example
        forward passes and n K backward passes, vectorised, and n K D numbers of
        output. When the model does not act on its examples independently along
        axis 0 of the inputs (checked on the single-example logits), the products
        are taken instead from the batch's backward pass with cotangents
        supported on one example (n K backward passes of the batch, vmapped).

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.eye(2, dtype=torch.float64))
        >>> lin.per_example_vjp(torch.ones(2, 1, 3, dtype=torch.float64))[1, 0, :6]
        tensor([0., 1., 0., 1., 0., 1.], dtype=torch.float64)
        >>> U = torch.ones(1, 1, 3, dtype=torch.float64)
        >>> lin.per_example_vjp(U, examples=slice(1, 2)).shape
        torch.Size([1, 1, 9])
        """
        start, stop = self._examples(examples)
        c = self.num_outputs
        self._operand(U, "U", (stop - start, None, c), f"(n={stop - start}, K, C={c})")
        k = int(U.shape[1])
        if k == 0:
            return U.new_zeros((stop - start, 0, self.num_params))
        return self._per_example(U, slice(start, stop), tuple(range(len(self._names))))

    def _per_example(self, U: Tensor, rows: slice, subset: tuple[int, ...]) -> Tensor:
        """(n, K, D_subset) per-example products of examples ``rows`` for ``subset``."""
        if self._per_example_mode == "vmap":
            try:
                z, grads = self._per_example_vmap(U, rows, subset)
            except _NotPerExample:
                self._per_example_mode = "masked"
            else:
                if self._same_logits(z, self._logits[rows]):
                    return grads
                self._per_example_mode = "masked"
        return self._per_example_masked(U, rows, subset)

    def _same_logits(self, z: Tensor, ref: Tensor) -> bool:
        eps = torch.finfo(ref.dtype).eps
        scale = 1.0 + float(ref.abs().max())
        return float((z - ref).abs().max()) <= eps**0.5 * scale

    def _per_example_vmap(
        self, U: Tensor, rows: slice, subset: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        base = self._primals
        c = self.num_outputs
        inputs = tuple(x[rows] for x in self._inputs)

        def one(x_n: tuple[Tensor, ...], u_n: Tensor) -> tuple[Tensor, Tensor]:
            def f(*sub: Tensor) -> Tensor:
                params = list(base)
                for i, p in zip(subset, sub, strict=True):
                    params[i] = p
                out = self._call(params, tuple(x.unsqueeze(0) for x in x_n))
                if tuple(out.shape) != (1, c):
                    raise _NotPerExample
                return out

            result = torch.func.vjp(f, *(base[i] for i in subset))
            out, pullback = result[0], result[1]
            grads = torch.func.vmap(lambda u: pullback(u.unsqueeze(0)))(u_n)
            return out[0], torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)

        with torch.enable_grad():
            return torch.func.vmap(one)(inputs, U)

    def _per_example_masked(self, U: Tensor, rows: slice, subset: tuple[int, ...]) -> Tensor:
        n_all, c = self.num_inputs, self.num_outputs
        m, k = int(U.shape[0]), int(U.shape[1])
        eye = torch.eye(n_all, dtype=U.dtype, device=U.device)[rows]  # (m, N)
        cot = eye[:, None, :, None] * U[:, :, None, :]  # (m, K, N, C)
        grads = torch.func.vmap(self._vjp_fn)(cot.reshape(m * k, n_all, c))
        return self._flatten([grads[i] for i in subset], (m * k,)).reshape(m, k, -1)

    # -- sums of per-example squares ------------------------------------------

    def sum_squared_per_example_vjp(
        self, U: Tensor, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Tensor:
        """Σ_n (J_nᵀ U[n, k])² for cotangents ``U`` (N, K, C); returns (K, D).

        With ``U[n, r]`` the r-th column of the core-metric square root B(z_n),
        the sum over k is the exact Fisher diagonal Σ_n Σ_r (J_nᵀ B_n e_r)².

        Fast path (parameters of ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``,
        ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
        ``nn.BatchNorm*d`` in eval mode; the rules of
        ``fisherbound.adapters.torch_rules``, see ``fast_path_reasons``): one
        forward pass with hooks recording each layer's input a and output, ONE
        backward pass batched over the K cotangents giving the output gradients
        δ_k, then per layer, e.g. for ``nn.Linear`` on (N, in) inputs, weight
        (δ_k ⊙ δ_k)ᵀ (a ⊙ a) and bias Σ_n δ_k², and otherwise per-layer
        per-example gradients (Σ_t δ_nt a_ntᵀ, unfolded convolutions, Σ over
        positions of δ x̂ for the norm layers, token rows scattered by index for
        embeddings) computed in chunks. Cost about one forward plus K backward
        passes to the covered layers. Every other parameter uses the generic
        path (vmap over examples of the single-example vjp, in chunks of
        examples so that at most ``max_vectors`` per-example D-vectors are alive
        at once; default ``default_max_vectors``).

        Parameters
        ----------
        U
            Cotangents, shape (N, K, C), in the parameters' dtype and device.
        max_vectors
            Memory bound: at most this many per-example gradients (of the
            network, or of one layer on the fast path) and at most this many
            cotangents per batched backward pass are alive at once.
        sum_cotangents
            Return Σ_k of the result, shape (D,): much cheaper on the fast path
            (the rank-one Linear weight term is one product instead of K).

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> lin.sum_squared_per_example_vjp(torch.ones(4, 1, 3, dtype=torch.float64)).shape
        torch.Size([1, 9])
        """
        n, c = self.num_inputs, self.num_outputs
        self._operand(U, "U", (n, None, c), self._shape_text("N", "K", "C"))
        budget = (
            self.default_max_vectors
            if max_vectors is None
            else check_positive_int(max_vectors, "max_vectors")
        )
        k = int(U.shape[1])
        if k == 0:
            return U.new_zeros((self.num_params,) if sum_cotangents else (0, self.num_params))
        results = self._fast_sum_squared(U, budget, sum_cotangents)
        rest = tuple(i for i in range(len(self._names)) if i not in results)
        if rest:
            generic = self._generic_sum_squared(U, budget, rest, sum_cotangents)
            parts = torch.split(generic, [self._sizes[i] for i in rest], dim=-1)
            for i, part in zip(rest, parts, strict=True):
                results[i] = part
        lead = () if sum_cotangents else (k,)
        return torch.cat(
            [results[i].reshape(*lead, -1) for i in range(len(self._names))], dim=len(lead)
        )

    def _generic_sum_squared_per_example_vjp(
        self,
        U: Tensor,
        /,
        *,
        max_vectors: int | None = None,
        sum_cotangents: bool = False,
    ) -> Tensor:
        """The generic path of ``sum_squared_per_example_vjp`` for every parameter."""
        budget = self.default_max_vectors if max_vectors is None else int(max_vectors)
        subset = tuple(range(len(self._names)))
        return self._generic_sum_squared(U, budget, subset, sum_cotangents)

    def _generic_sum_squared(
        self, U: Tensor, budget: int, subset: tuple[int, ...], sum_k: bool
    ) -> Tensor:
        n, k = int(U.shape[0]), int(U.shape[1])
        k_chunk = min(k, budget)
        n_chunk = max(1, budget // k_chunk)
        pieces = []
        for ks in chunks(k, k_chunk):
            squares = []
            for rows in chunks(n, n_chunk):
                g = self._per_example(U[rows, ks], rows, subset)  # (n, k, D_subset)
                sq = g * g
                squares.append(sq.sum(dim=(0, 1)) if sum_k else sq.sum(dim=0))
            pieces.append(total(squares))
        return total(pieces) if sum_k else torch.cat(pieces, dim=0)

    # -- second derivatives ----------------------------------------------------

    def output_second_derivative_diagonal(self, /, *, max_vectors: int | None = None) -> Tensor:
        """∂²z_nc/∂θ_i² for every example, output and parameter; returns (N, C, D).

        Exact, by forward-over-forward differentiation along each coordinate:
        ∂²z/∂θ_i² = d²/dt² z(θ + t e_i) at t = 0 (``torch.func.jvp`` of
        ``torch.func.jvp`` with the tangent e_i), vmapped over chunks of
        ``max_vectors`` coordinates (default ``default_max_vectors``). Cost: D
        second-order forward passes of the batch (about three forward passes
        each); memory: max_vectors × the forward activations. Never a D × D
        Hessian. Zero for parameters on which z is linear (the last layer) and
        through piecewise-linear activations (ReLU, max pooling).

        Examples
        --------
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Tanh()).double()
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(0.5), model[0].bias.fill_(0.0)
        >>> lin = linearize(model, torch.ones(1, 1, dtype=torch.float64))
        >>> h = lin.output_second_derivative_diagonal()  # tanh''(0.5) = -2 tanh (1 - tanh²)
        >>> bool(torch.allclose(h, torch.full((1, 1, 2), -0.72686198, dtype=torch.float64)))
        True
        """
        budget = (
            self.default_max_vectors
            if max_vectors is None
            else check_positive_int(max_vectors, "max_vectors")
        )
        ensure_forward_ad()
        d = self.num_params

        def second(*ts: Tensor) -> Tensor:
            def first(*ps: Tensor) -> Tensor:
                return torch.func.jvp(lambda *qs: self._call(qs, self._inputs), ps, ts)[1]

            return torch.func.jvp(first, self._primals, ts)[1]

        pieces = []
        for s in chunks(d, min(d, budget)):
            index = torch.arange(s.start, s.stop, device=self._param_device)
            eye = F.one_hot(index, d).to(self._param_dtype)  # (chunk, D): the e_i
            pieces.append(torch.func.vmap(second)(*self._split(eye, (s.stop - s.start,))))
        return torch.cat(pieces, dim=0).permute(1, 2, 0)

    # -- the fast path ---------------------------------------------------------

    @property
    def fast_path_reasons(self) -> Mapping[str, str]:
        """Which parameters ``sum_squared_per_example_vjp`` computes by a layer rule.

        A read-only mapping from every selected parameter name to ``"fast"`` (a
        closed-form rule of ``fisherbound.adapters.torch_rules.RULES``) or the
        reason it takes the generic per-example path, e.g. ``"no fast rule for
        Scale"``, ``"parameter shared by several modules (tied)"``, ``"module
        called 2 times in one forward pass"``, ``"layer output axis 0 mixes
        examples"``. Decided once per linearization (one forward pass with hooks
        and one batched backward pass over three probe examples, at the first
        access or the first ``sum_squared_per_example_vjp``) and cached.

        Examples
        --------
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()).double()
        >>> dict(linearize(model, torch.ones(4, 2, dtype=torch.float64)).fast_path_reasons)
        {'0.weight': 'fast', '0.bias': 'fast'}
        """
        return self._fast_plan()[0].reasons

    def _fast_plan(self) -> tuple[FastPathPlan, tuple[Tensor, list[Record]] | None]:
        """The cached plan, and the recorded forward pass it was decided on (first time)."""
        if self._plan is not None:
            return self._plan, None
        plan, forward = plan_fast_path(
            self._fast_candidates,
            self._static_reasons,
            self._names,
            self._leaf_forward,
            self._grad_batched,
            self.num_outputs,
        )
        self._plan = plan
        return plan, forward

    def _leaf_forward(self) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One forward pass (regular autograd) at fresh leaves of the parameters."""
        leaves = tuple(p.detach().requires_grad_(True) for p in self._primals)
        with torch.enable_grad():
            return self._call(leaves, self._inputs), leaves

    def _fast_sum_squared(self, U: Tensor, budget: int, sum_k: bool) -> dict[int, Tensor]:
        plan, forward = self._fast_plan()
        if not plan.layers:
            return {}
        if forward is None:
            z, _, records = record_forward(plan.layers, self._leaf_forward)
            forward = (z, records)
        return fast_sum_squared(
            plan, forward, U, budget, self.num_params, sum_k, self._grad_batched
        )

    @staticmethod
    def _grad_batched(
        z: Tensor, outputs: list[Tensor], cot: Tensor, retain: bool
    ) -> tuple[Tensor | None, ...]:
        return batched_grad(z, outputs, cot, retain)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def linearize(
    model: nn.Module, inputs: Tensor | Sequence[Tensor], /, *, params: Sequence[str] | None = None
) -> TorchLinearization:
    """Linearize ``model`` at its current parameters on one batch of ``inputs``.

    The linearization exposes the logits z = ``model(*inputs)``, shape (N, C), and
    the Jacobian J = ∂z/∂θ through products (``jvp``, ``vjp``, their batched and
    per-example forms), with θ the concatenation of the selected parameters,
    flattened row-major, in order. The forward pass is done once here
    (``torch.func.vjp``); buffers (BatchNorm running statistics) are used as they
    are and never changed. Cost: one forward pass (its activations kept for the
    VJPs); each ``vjp`` then costs one backward pass, each ``jvp`` one forward-mode
    pass.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` returning logits of shape (N, C). Modules that are
        random or couple the examples in training mode (Dropout, BatchNorm) must
        be in eval mode.
    inputs
        A tensor, or a tuple of tensors passed as positional arguments, with the
        examples on axis 0, on the parameters' device.
    params
        None: every parameter with ``requires_grad=True``, in
        ``named_parameters()`` order. Or a list of parameter names (a subset, in
        the order given; any of the names of a tied tensor, but only one).

    Returns
    -------
    TorchLinearization
        Torch tensors throughout, on the parameters' device, in their dtype.

    Raises
    ------
    TypeError
        ``model`` is not a module, ``inputs`` are not tensors, a selected
        parameter is not floating-point or the dtypes differ.
    ValueError
        No parameter selected, unknown or repeated names, a module in a random or
        batch-coupled mode, parameters or inputs on different devices, or logits
        not 2-D, not floating, not in the parameters' dtype, or not finite.

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import linearize
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> lin = linearize(model, torch.randn(5, 4))
    >>> lin.logits.shape, lin.num_params
    (torch.Size([5, 3]), 67)
    >>> [b.name for b in lin.blocks]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    selection = select_parameters(check_model(model), params)
    return TorchLinearization(selection, check_batch(selection, inputs))


def linearizations(
    model: nn.Module, batches: Iterable[Any], /, *, params: Sequence[str] | None = None
) -> Iterator[TorchLinearization]:
    """Lazily linearize ``model`` on each batch of ``batches``.

    A batch is a tensor, or a tuple/list whose first element holds the inputs
    (a tensor, or a tuple of tensors for a model with several inputs), as a
    ``DataLoader`` yields ``(x, y)``: only ``x`` is used. Each linearization is
    built when it is requested, so a data set is streamed one batch at a time.
    The model and the parameter selection are checked at once.

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import linearizations
    >>> model = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.zeros(8)) for _ in range(3)]
    >>> [lin.num_inputs for lin in linearizations(model, data)]
    [8, 8, 8]
    """
    selection = select_parameters(check_model(model), params)

    def build(i: int, inputs: Any) -> TorchLinearization:
        del i  # the stream's callback also gets the batch index, for messages
        return TorchLinearization(selection, check_batch(selection, inputs))

    return stream_linearizations(
        batches,
        build,
        what="batches (a list, a generator, a DataLoader)",
        remedy="For one batch use linearize(model, inputs).",
        single="an inputs tensor",
        one_batch=is_tensor_or_text,
    )


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
    selection = select_parameters(model, params)
    return _loss_function(selection, inputs, labels, fam, reduction)


def _loss_function(
    selection: Selection, inputs: object, labels: object, family: Any, reduction: str
) -> TorchLossFunction:
    batch = check_batch(selection, inputs)
    if not isinstance(labels, torch.Tensor):
        msg = (
            f"labels must be a torch.Tensor; got {type(labels).__module__}."
            f"{type(labels).__name__}. Convert with torch.as_tensor(...)."
        )
        raise TypeError(msg)
    return TorchLossFunction(selection, batch, labels, family, reduction)


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
    selection = select_parameters(model, params)

    def build(i: int, inputs: Any, labels: Any) -> TorchLossFunction:
        del i  # the stream's callback also gets the batch index, for messages
        return _loss_function(selection, inputs, labels, fam, reduction)

    return stream_loss_functions(
        batches,
        build,
        what="(inputs, labels) pairs (a list, a generator, a DataLoader)",
        remedy="For one batch use loss_function(model, inputs, labels).",
        one_batch=is_tensor_or_text,
    )
