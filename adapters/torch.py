r"""The torch adapter: any ``torch.nn.Module`` as a linearization, via ``torch.func``.

``linearize(model, inputs)`` freezes a module at its current parameters and one
batch of inputs and exposes the Jacobian :math:`J = \partial z/\partial\theta` of the logits
:math:`z` (N, C) with respect to the flat parameter vector :math:`\theta` (the selected
parameters, row-major, in ``named_parameters()`` order) only through products:

- ``jvp`` / ``jvp_batch`` with ``torch.func.jvp`` (vmapped over tangents);
- ``vjp`` / ``vjp_batch`` with ``torch.autograd.grad`` through the graph of the one
  forward pass done at ``linearize`` time (``is_grads_batched`` over cotangents:
  one batched backward), and ``vjp_batch_square_moments``, the detach-and-mix
  diagonal's moments from that batched backward without an (M, D) copy;
- ``per_example_vjp`` with ``torch.func.vmap`` over the examples of the
  single-example function;
- ``sum_squared_per_example_vjp`` (the building block of exact Fisher diagonals),
  :math:`\sum_n (J_n^\top U[n, k])^2`, with a fast path for the parameters of ``nn.Linear``,
  ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``,
  ``nn.RMSNorm`` and ``nn.BatchNorm*d`` (eval) modules (the layer rules of
  ``fisherbound.adapters.torch_rules``): one forward pass with hooks and ONE
  batched backward pass over the K cotangents to the outputs of those layers,
  then per-layer closed forms (for ``nn.Linear`` on (N, in) inputs,
  :math:`(\delta_k \odot \delta_k)^\top (a \odot a)`), as BackPACK does, never per-example
  gradients of the whole network. Every other parameter (custom modules, parameters shared by
  several modules or also used outside their module, modules called more than
  once per forward, layers whose leading axis is not the example axis) goes
  through the generic path, so both paths give the same numbers;
  ``TorchLinearization.fast_path_reasons`` says which parameters take which path.

Nothing here is layer-specific except the fast path; everything else works for
any module whose forward ``torch.func`` can transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fisherbound._finite import check_outputs
from fisherbound._lib import array_namespace, check_positive_int, is_traced
from fisherbound.adapters._torch_loss import TorchLossFunction, loss_function, loss_functions
from fisherbound.adapters._torch_model import (
    FunctionalModel,
    Inputs,
    MaskSpec,
    OutputSelector,
    OutputSpec,
    Selection,
    apply_mask,
    check_batch,
    check_mask_spec,
    check_output_options,
    classes_last,
    ensure_forward_ad,
    is_tensor_or_text,
    resolve_mask,
    resolve_model,
    select_output,
    select_parameters,
    without_key,
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
    stream_linearizations,
)

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "linearize",
    "linearizations",
    "loss_function",
    "loss_functions",
    "TorchLinearization",
    "TorchLossFunction",
]

Tensor = torch.Tensor


class _NotPerExample(Exception):
    """The single-example forward does not give one row of logits per example."""


class TorchLinearization(FunctionalModel, LinearizationBase):
    r"""A ``torch.nn.Module`` frozen at its parameters :math:`\theta` and one batch of inputs.

    Build it with :func:`linearize`. :math:`\theta` is the concatenation of the selected
    parameters, each flattened row-major, in the order of ``blocks`` (whose names
    are the parameter names). Every vector is a torch tensor on the parameters'
    device in their dtype.

    The linearization reads the parameters' storage and keeps the forward pass at
    :math:`\theta`: updating a parameter, a buffer or an input in place afterwards (an
    optimiser step, ``p.add_``, ``load_state_dict``) makes every later product a
    RuntimeError naming the tensors that changed (torch's version counters,
    read before each product); build a new linearization per step.
    """

    logits_checked = True  # finite (checked on build): the stream need not re-read them

    def __init__(
        self,
        selection: Selection,
        inputs: Inputs,
        spec: OutputSpec | None = None,
        mask: MaskSpec = None,
        raw_inputs: object = None,
    ) -> None:
        self._bind(selection, inputs, spec)
        # Every tensor the forward pass reads (parameters, selected or constant; buffers;
        # the inputs), whose version counters ``_check_current`` compares.
        module = selection[0]
        self._watched = (
            *module.named_parameters(),
            *(("buffer " + n, b) for n, b in module.named_buffers()),
            *inputs.items(),
        )
        self._selection = selection  # the fast path's static candidates, at its first use
        self._plan: FastPathPlan | None = None
        check = self._output_check()

        def forward(*params: Tensor) -> Tensor:
            return self._z(params, self._batch, check=check)

        # One forward pass, kept for the VJPs. The mask is known only once the shape
        # of the logits is: vjp applies it to the cotangents (J_maskedᵀ u = Jᵀ (m ⊙ u)),
        # every other product inside the function (``_z`` with the mask). Plain
        # autograd at fresh leaves, not ``torch.func.vjp``: its wrapped tensors cost
        # about 0.4 gradient steps more per forward + backward (MLP, CPU).
        self._leaves = tuple(p.detach().requires_grad_(True) for p in self._primals)
        with torch.enable_grad():
            self._graph = forward(*self._leaves)
        logits = self._graph.detach()
        check_outputs(self, logits, "model output")
        self._logits = logits
        self._mask = resolve_mask(mask, inputs if raw_inputs is None else raw_inputs, logits)
        self._cot_mask = None if self._mask is None else self._mask.unsqueeze(-1)
        # The flat indices of the masked positions, for the CPU's cheap test below.
        cpu = self._mask is not None and self._mask.device.type == "cpu"
        self._masked_rows = (~self._mask).flatten().nonzero()[:, 0] if cpu else None
        self._xp = array_namespace(self._logits, names=("model output",))
        n = int(self._logits.shape[0])
        self._per_example_mode = "vmap" if inputs.leading == n else "masked"
        self._mark_current()  # after the forward pass (a train-mode norm updates buffers)

    def _mark_current(self) -> None:
        """Remember the version of every watched tensor (after linearize, each product)."""
        self._versions = tuple(t._version for _, t in self._watched)

    def _check_current(self) -> None:
        """A RuntimeError for a parameter, buffer or input changed in place.

        Since the last product or ``linearize``: the library's own products are
        taken as current after each (``_mark_current``).
        """
        if all(t._version == v for (_, t), v in zip(self._watched, self._versions, strict=True)):
            return
        changed = [
            name
            for (name, t), v in zip(self._watched, self._versions, strict=True)
            if t._version != v
        ]
        msg = (
            f"{changed} (parameters, buffers or inputs of the model) changed in place "
            "after linearize (an optimiser step, p.add_(...), load_state_dict): this "
            "linearization holds the forward pass at the old values, and a product now "
            "would mix old and new ones. Build a new one with linearize(model, inputs) "
            "after each update."
        )
        raise RuntimeError(msg)

    # -- plumbing ------------------------------------------------------------

    def _flatten(self, grads: Sequence[Tensor], lead: tuple[int, ...] = ()) -> Tensor:
        return torch.cat([g.reshape(*lead, -1) for g in grads], dim=len(lead))

    def _shape_text(self, *axes: str) -> str:
        d, n, c = self.num_params, self.num_inputs, self.num_outputs
        sizes = {"D": d, "N": n, "C": c}
        inner = ", ".join(f"{a}={sizes[a]}" if a in sizes else a for a in axes)
        return f"({inner})" if len(axes) > 1 else f"({inner},)"

    def _out_shape(self, *lead: str, examples: str = "N") -> tuple[tuple[int | None, ...], str]:
        """The shape (lead..., N, ∗S, C) of an output-space operand and its message text.

        ``lead`` are free axes (letters), ``examples`` replaces the N axis (e.g.
        "n=3" for a slice); the position letters come from ``_output_text``.
        """
        shape = self.output_shape
        letters = self._output_text().strip("()").split(", ")[1:-1]
        n_text = f"N={shape[0]}" if examples == "N" else examples
        n_size = shape[0] if examples == "N" else int(examples.split("=")[1])
        where = [n_text, *(f"{t}={s}" for t, s in zip(letters, shape[1:-1], strict=True))]
        texts = [*lead, *where[:1]] if examples == "N" else [where[0], *lead]
        texts += [*where[1:], f"C={shape[-1]}"]
        sizes: tuple[int | None, ...] = (
            (*(None,) * len(lead), n_size) if examples == "N" else (n_size, *(None,) * len(lead))
        )
        return (*sizes, *shape[1:]), "(" + ", ".join(texts) + ")"

    def _masked_cotangent(self, u: Tensor) -> Tensor:
        """``u`` (..., N, ∗S, C) with zeros at masked positions (J_maskedᵀ u = Jᵀ u_masked).

        On the CPU, a ``u`` that is zero there already (the estimators draw their
        probes so) is returned as it is: reading the masked rows costs a fraction
        of the pass over all of ``u`` that masking costs.
        """
        if self._cot_mask is None:
            return u
        rows = self._masked_rows
        if rows is not None and u.device.type == "cpu" and u.is_contiguous() and not is_traced(u):
            flat = u.reshape(*u.shape[: u.ndim - self._cot_mask.ndim], -1, u.shape[-1])
            if not bool(flat.index_select(-2, rows).any()):
                return u
        return torch.where(self._cot_mask, u, u.new_zeros(()))

    def _vjp_fn(self, u: Tensor) -> tuple[Tensor, ...]:
        """Jᵀ u per parameter (one backward pass of the recorded graph; vmap-able)."""
        return self._pullback(u, batched=False)

    def _pullback(self, u: Tensor, *, batched: bool) -> tuple[Tensor, ...]:
        """Jᵀ u per parameter, (*shape) or, ``batched``, (M, *shape) for u (M, N, ∗S, C)."""
        lead = (int(u.shape[0]),) if batched else ()
        z = self._graph
        if not z.requires_grad:  # no selected parameter reaches the logits
            return tuple(p.new_zeros((*lead, *p.shape)) for p in self._primals)
        if batched:
            grads = batched_grad(z, list(self._leaves), u, True)
        else:
            grads = torch.autograd.grad(z, self._leaves, u, retain_graph=True, allow_unused=True)
        return tuple(
            p.new_zeros((*lead, *p.shape)) if g is None else g
            for g, p in zip(grads, self._primals, strict=True)
        )

    def _fn(self, *params: Tensor) -> Tensor:
        """The masked logits (N, ∗S, C) of the batch as a function of the parameters."""
        return self._z(params, self._batch, self._mask)

    # -- products ------------------------------------------------------------

    def jvp(self, v: Tensor, /) -> Tensor:
        """:math:`J v` for a flat parameter vector ``v`` (D,); returns (N, ∗S, C).

        One forward pass with forward-mode AD (``torch.func.jvp``); zero at masked
        positions.

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
        return torch.func.jvp(self._fn, self._primals, tangents)[1]

    def vjp(self, u: Tensor, /) -> Tensor:
        r""":math:`J^\top u = \sum_n J_n^\top u_n` for a cotangent ``u`` (N, ∗S, C); returns (D,).

        One backward pass through the graph recorded at ``linearize`` time; the
        entries of ``u`` at masked positions are ignored.

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> lin.vjp(torch.ones(4, 3, dtype=torch.float64))[-3:]  # the bias block: Σ_n u_n
        tensor([4., 4., 4.], dtype=torch.float64)
        """
        self._operand(u, "u", *self._out_shape())
        return self._flatten(self._vjp_fn(self._masked_cotangent(u)))

    def _squared_vjp(self, u: Tensor, traces: bool) -> tuple[Tensor, None, Tensor | None]:
        """(Jᵀ u) ⊙ (Jᵀ u) (D,), squared by hooks while each gradient is still in cache.

        One plain backward pass; a hook on each parameter leaf writes the square of
        its gradient into the flat result the moment the gradient is complete.
        """
        out = u.new_empty((self.num_params,))
        z = self._graph
        if not z.requires_grad:  # no selected parameter reaches the logits
            out.zero_()
            return out, None, out.sum()[None] if traces else None
        handles = []
        offset = 0
        parts = []
        for leaf, size in zip(self._leaves, self._sizes, strict=True):
            part = out[offset : offset + size]
            offset += size
            parts.append(part)
            handles.append(leaf.register_hook(functools.partial(_square_into, part)))
        try:
            grads = torch.autograd.grad(z, self._leaves, u, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for g, part in zip(grads, parts, strict=True):
            if g is None:  # a parameter that does not reach the logits: its hook never ran
                part.zero_()
        return out, None, out.sum()[None] if traces else None

    def jvp_batch(self, V: Tensor, /) -> Tensor:
        """:math:`J V[m]` for M parameter vectors ``V`` (M, D); returns (M, N, ∗S, C).

        Vmapped jvp.
        """
        self._operand(V, "V", (None, self.num_params), self._shape_text("M", "D"))
        m = int(V.shape[0])
        if m == 0:
            return V.new_zeros((0, *self.output_shape))
        ensure_forward_ad()
        tangents = self._split(V, (m,))

        def one(*ts: Tensor) -> Tensor:
            return torch.func.jvp(self._fn, self._primals, ts)[1]

        return torch.func.vmap(one)(*tangents)

    def vjp_batch(self, U: Tensor, /) -> Tensor:
        r""":math:`J^\top U[m]` for M cotangents ``U`` (M, N, ∗S, C); returns (M, D).

        One batched backward.
        """
        self._operand(U, "U", *self._out_shape("M"))
        m = int(U.shape[0])
        if m == 0:
            return U.new_zeros((0, self.num_params))
        return self._flatten(self._pullback(self._masked_cotangent(U), batched=True), (m,))

    def vjp_batch_square_moments(
        self, U: Tensor, /, *, traces: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        r"""The moments over m of the squares :math:`g_m \odot g_m` of :math:`g_m = J^\top U[m]`.

        U (M, N, ∗S, C). Returns ``(mean, variance, traces)``: the mean
        :math:`\frac1M \sum_m g_m \odot g_m` (D,), the unbiased sample variance over the M probes of
        each entry of :math:`g_m \odot g_m` (D,; None for :math:`M = 1`) and, with ``traces``,
        :math:`\|g_m\|^2` (M,) (else None): what the detach-and-mix diagonal needs from one batch,
        without the (M, D) matrix :math:`[g_1 \dots g_M]`.

        One backward pass batched over the M cotangents (as ``vjp_batch``), then the moments from
        their power sums :math:`\sum g^4` and :math:`\sum g^2` (see ``_square_moments`` for the
        rounding), parameter by parameter, written straight into the flat outputs: no flat (M, D)
        copy. Memory: the M gradients plus 2 D-vectors.

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> U = torch.ones(2, 4, 3, dtype=torch.float64)
        >>> mean, var, tr = lin.vjp_batch_square_moments(U, traces=True)
        >>> mean[-3:]  # the bias block: (Σ_n u_n)² = 16 for both probes
        tensor([16., 16., 16.], dtype=torch.float64)
        >>> float(var.abs().max()), tr  # equal probes: variance 0; 9 entries of 16 each
        (0.0, tensor([144., 144.], dtype=torch.float64))
        """
        self._operand(U, "U", *self._out_shape("M"))
        m = int(U.shape[0])
        if m == 0:
            msg = "U must hold at least one cotangent (M >= 1); got M = 0."
            raise ValueError(msg)
        cot = self._masked_cotangent(U)
        if m == 1:
            return self._squared_vjp(cot[0], traces)
        grads = self._pullback(cot, batched=True)
        flat = [g.reshape(m, -1) for g in grads]
        # Autograd may hand back the cotangent itself (a parameter that IS the
        # output): square in place only buffers that share no memory with U.
        # Nor twice the same buffer (one gradient handed to two parameters).
        given = {cot.untyped_storage().data_ptr(), U.untyped_storage().data_ptr()}
        ptrs = [g.untyped_storage().data_ptr() for g in flat]
        own = all(g.is_contiguous() for g in flat) and len(set(ptrs)) == len(ptrs)
        own = own and not given.intersection(ptrs)
        return _square_moments(flat, traces, own)

    def per_example_vjp(self, U: Tensor, /, *, examples: slice | None = None) -> Tensor:
        r""":math:`J_n^\top U[i, k]` for the examples :math:`n = \text{start} + i` of ``examples``.

        Returns (n, K, D).
        ``U`` has shape (n, K, ∗S, C) with n the length of the contiguous slice
        ``examples`` (default: all N examples); :math:`J_n^\top U[i, k]` sums over the
        positions of example n (masked positions contribute nothing).

        ``torch.func.vmap`` over the examples of the single-example vjp (the K
        cotangents of one example share its forward pass): about n single-example
        forward passes and n K backward passes, vectorised, and n K D numbers of
        output. When the model does not act on its examples independently along
        axis 0 of the inputs (checked on the single-example logits, of shape
        (1, ∗S, C)), the products are taken instead from the batch's backward pass
        with cotangents supported on one example (n K backward passes of the
        batch, vmapped).

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
        self._operand(U, "U", *self._out_shape("K", examples=f"n={stop - start}"))
        k = int(U.shape[1])
        if k == 0:
            return U.new_zeros((stop - start, 0, self.num_params))
        return self._per_example(U, slice(start, stop), tuple(range(len(self._names))))

    def _per_example(self, U: Tensor, rows: slice, subset: tuple[int, ...]) -> Tensor:
        """(n, K, D_subset) per-example products of examples ``rows`` for ``subset``."""
        if self._per_example_mode == "vmap":
            try:
                z, grads = self._per_example_vmap(U, rows, subset)
            except torch.OutOfMemoryError:
                raise  # a memory limit, not a model that refuses vmap
            except (_NotPerExample, RuntimeError):
                # RuntimeError: the forward pass refuses vmap (data-dependent control
                # flow, e.g. transformers' attention-mask creation); the masked mode
                # needs no vmap over the model.
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
        one_shape = (1, *self.output_shape[1:])
        inputs = self._batch.map(lambda x: x[rows])
        masks = None if self._mask is None else self._mask[rows]

        def one(x_n: Inputs, u_n: Tensor, m_n: Tensor | None) -> tuple[Tensor, Tensor]:
            def f(*sub: Tensor) -> Tensor:
                params = list(base)
                for i, p in zip(subset, sub, strict=True):
                    params[i] = p
                out = select_output(
                    self._call(params, x_n.map(lambda x: x.unsqueeze(0))), self._spec.output
                )
                if not isinstance(out, torch.Tensor) or out.ndim != len(one_shape):
                    raise _NotPerExample
                out = classes_last(out, self._spec.class_axis)
                if tuple(out.shape) != one_shape:
                    raise _NotPerExample
                return apply_mask(out, None if m_n is None else m_n.unsqueeze(0))

            result = torch.func.vjp(f, *(base[i] for i in subset))
            out, pullback = result[0], result[1]
            grads = torch.func.vmap(lambda u: pullback(u.unsqueeze(0)))(u_n)
            return out[0], torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)

        in_dims = (0, 0, None if masks is None else 0)
        with torch.enable_grad():
            return torch.func.vmap(one, in_dims=in_dims)(inputs, U, masks)

    def _per_example_masked(self, U: Tensor, rows: slice, subset: tuple[int, ...]) -> Tensor:
        n_all = self.num_inputs
        m, k = int(U.shape[0]), int(U.shape[1])
        out = tuple(int(s) for s in U.shape[2:])  # (*S, C)
        eye = torch.eye(n_all, dtype=U.dtype, device=U.device)[rows]  # (m, N)
        eye = eye.reshape(m, 1, n_all, *(1,) * len(out))
        cot = eye * U[:, :, None]  # (m, K, N, *S, C)
        cot = self._masked_cotangent(cot.reshape(m * k, n_all, *out))
        grads = self._pullback(cot, batched=True)
        return self._flatten([grads[i] for i in subset], (m * k,)).reshape(m, k, -1)

    # -- sums of per-example squares ------------------------------------------

    def sum_squared_per_example_vjp(
        self, U: Tensor, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Tensor:
        r""":math:`\sum_n (J_n^\top U[n, k])^2` for cotangents ``U`` (N, K, C); returns (K, D).

        With ``U[n, r]`` the r-th column of the core-metric square root :math:`B(z_n)`,
        the sum over k is the exact Fisher diagonal :math:`\sum_n \sum_r (J_n^\top B_n e_r)^2`.

        Fast path (parameters of ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``,
        ``nn.Embedding``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
        ``nn.BatchNorm*d`` in eval mode; the rules of
        ``fisherbound.adapters.torch_rules``, see ``fast_path_reasons``): one
        forward pass with hooks recording each layer's input :math:`a` and output, ONE
        backward pass batched over the K cotangents giving the output gradients
        :math:`\delta_k`, then per layer, e.g. for ``nn.Linear`` on (N, in) inputs, weight
        :math:`(\delta_k \odot \delta_k)^\top (a \odot a)` and bias :math:`\sum_n \delta_k^2`, and
        otherwise per-layer per-example gradients (:math:`\sum_t \delta_{nt} a_{nt}^\top`, unfolded
        convolutions, :math:`\sum` over positions of :math:`\delta \hat x` for the norm layers,
        token rows scattered by index for embeddings) computed in chunks. Cost about one forward
        plus K backward passes to the covered layers. Every other parameter uses the generic path
        (vmap over examples of the single-example vjp, in chunks of examples so that at most
        ``max_vectors`` per-example D-vectors are alive
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
            Return :math:`\sum_k` of the result, shape (D,): much cheaper on the fast path
            (the rank-one Linear weight term is one product instead of K).

        Examples
        --------
        >>> lin = linearize(torch.nn.Linear(2, 3).double(), torch.ones(4, 2, dtype=torch.float64))
        >>> lin.sum_squared_per_example_vjp(torch.ones(4, 1, 3, dtype=torch.float64)).shape
        torch.Size([1, 9])
        """
        self._operand(U, "U", *self._out_shape("K", examples=f"N={self.num_inputs}"))
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
        r""":math:`\partial^2 z_{nc}/\partial\theta_i^2` for every example, output and parameter.

        Returns (N, C, D). Exact, by forward-over-forward differentiation along each coordinate:
        :math:`\partial^2 z/\partial\theta_i^2 = \frac{d^2}{dt^2} z(\theta + t e_i)` at
        :math:`t = 0` (``torch.func.jvp`` of ``torch.func.jvp`` with the tangent :math:`e_i`),
        vmapped over chunks of ``max_vectors`` coordinates (default ``default_max_vectors``). Cost:
        D second-order forward passes of the batch (about three forward passes each); memory:
        max_vectors :math:`\times` the forward activations. Never a
        :math:`D \times D` Hessian. Zero for parameters on which :math:`z` is linear (the last
        layer) and through piecewise-linear activations (ReLU, max pooling).

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
                return torch.func.jvp(self._fn, ps, ts)[1]

            return torch.func.jvp(first, self._primals, ts)[1]

        pieces = []
        for s in chunks(d, min(d, budget)):
            index = torch.arange(s.start, s.stop, device=self._param_device)
            eye = F.one_hot(index, d).to(self._param_dtype)  # (chunk, D): the e_i
            pieces.append(torch.func.vmap(second)(*self._split(eye, (s.stop - s.start,))))
        return torch.movedim(torch.cat(pieces, dim=0), 0, -1)

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
        candidates, static_reasons = static_candidates(*self._selection)
        plan, forward = plan_fast_path(
            candidates,
            static_reasons,
            self._names,
            self._leaf_forward,
            self._grad_batched,
        )
        self._plan = plan
        return plan, forward

    def _leaf_forward(self) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One forward pass (regular autograd) at fresh leaves: the masked logits."""
        leaves = tuple(p.detach().requires_grad_(True) for p in self._primals)
        with torch.enable_grad():
            return self._fn(*leaves), leaves

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


def _square_into(out: Tensor, g: Tensor) -> None:
    """The hook of ``_squared_vjp``: ``out`` = g ⊙ g, flat; the gradient itself unchanged."""
    with torch.no_grad():
        torch.mul(g.reshape(-1), g.reshape(-1), out=out)


def _square_moments(
    grads: Sequence[Tensor], traces: bool, own: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean and sample variance over m of g_m ⊙ g_m, blocks (M ≥ 2, D_b) → (D,) each.

    From the power sums S₁ = Σ_m g_m², S₂ = Σ_m g_m⁴ of each entry: mean S₁ / M,
    variance (S₂ − S₁² / M) / (M − 1), clamped at 0 (in float32 a relative
    rounding error of about eps (1 + mean² / variance), negligible unless an entry
    barely varies between the probes; one that never varies gets a standard error
    of order √eps · mean instead of 0). Four passes over the gradients, each
    written straight into the flat outputs; the gradients are squared in place
    when ``own`` (they belong to this call), which saves an (M, D) buffer.
    """
    m = int(grads[0].shape[0])  # M ≥ 2 (one probe takes ``_squared_vjp``)
    d = sum(int(g.shape[1]) for g in grads)
    ref = grads[0]
    s1 = ref.new_empty((d,))
    s2 = ref.new_empty((d,))
    tr = ref.new_empty((len(grads), m)) if traces else None
    offset = 0
    with torch.no_grad():
        for i, g in enumerate(grads):
            out = slice(offset, offset + int(g.shape[1]))
            offset = out.stop
            q = g.mul_(g) if own else g * g
            torch.sum(q, dim=0, out=s1[out])
            if tr is not None:
                tr[i] = q.sum(dim=1)
            q.mul_(q)
            torch.sum(q, dim=0, out=s2[out])
        var = s2.addcmul_(s1, s1, value=-1.0 / m).div_(m - 1).clamp_(min=0.0)
        s1.div_(m)
    return s1, var, None if tr is None else tr.sum(dim=0)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def linearize(
    model: nn.Module | Callable[..., Any],
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    /,
    *,
    params: Sequence[str] | Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: OutputSelector = None,
    class_axis: int = -1,
    mask: MaskSpec = None,
) -> TorchLinearization:
    r"""Linearize ``model`` at its current parameters on one batch of ``inputs``.

    The linearization exposes the logits :math:`z`, shape (N, ∗S, C) (N examples, the
    position axes S, none for one output per example, and the C classes last),
    and the Jacobian :math:`J = \partial z/\partial\theta` through products (``jvp``, ``vjp``,
    their batched and per-example forms), with :math:`\theta` the concatenation of the selected
    parameters, flattened row-major, in order. An example is an input with all its
    positions: the per-example products :math:`J_n^\top u` sum over the positions of n. The
    forward pass is done once here (autograd at leaves detached from the
    parameters); buffers (BatchNorm
    running statistics) are used as they are and never changed. Cost: one
    forward pass (its activations kept for the VJPs); each ``vjp`` then costs one
    backward pass, each ``jvp`` one forward-mode pass, whatever the mask.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` whose output holds the logits: (N, C), or with
        position axes, e.g. (N, T, C) for a language model or (N, C, H, W) for
        segmentation (see ``class_axis``). Modules that are random or couple the
        examples in training mode (Dropout, BatchNorm) must be in eval mode. Or a
        function ``f(params, *args, **kwargs)`` of a dict of tensors (the
        ``torch.func.functional_call`` style, curvlinops' ``model_func``), with
        ``params`` that dict: :math:`\theta` is its values, in order, named by its keys. Its
        layers are not modules, so the exact diagonal takes the generic
        per-example path.
    inputs
        A tensor, a tuple/list of tensors (positional arguments) or a dict of
        tensors (keyword arguments, e.g. ``input_ids``, ``attention_mask``), all
        with the same number of rows on axis 0 (the examples) and on the
        parameters' device. Integer inputs (token ids) are fine.
    params
        None: every parameter with ``requires_grad=True``, in
        ``named_parameters()`` order. Or a list of parameter names (a subset, in
        the order given; any of the names of a tied tensor, but only one). For a
        function ``model``: the dict name -> floating tensor of its parameters
        (required; all of them are :math:`\theta`).
    buffers
        For a function ``model`` only: None, or a dict name -> tensor of state
        that ``f`` reads but that is not differentiated (running statistics,
        frozen weights); ``f`` receives one dict, ``params`` then ``buffers``, as
        ``functional_call``'s ``parameters_and_buffers``. A module's buffers are
        its own (``buffers`` must be None).
    output
        Where the logits are in the model's output: None (the output is the
        logits tensor), a str (a key of a dict output, or else an attribute, e.g.
        ``"logits"`` of a Hugging Face ``ModelOutput``), an int (an element of a
        tuple output) or a callable ``out -> logits``.
    class_axis
        The axis of the model output holding the C classes (default -1, the
        last); e.g. 1 for PyTorch's (N, C, H, W) / (N, C, T) convention. It is
        moved last, so ``logits`` is (N, ∗S, C). 0 (the examples) is refused.
    mask
        Which positions count: None (all), a boolean tensor (N, ∗S) (the output's
        shape without its class axis; True = counts), a str (a key of dict
        ``inputs`` such as ``"attention_mask"``, converted with ``!= 0``) or a
        callable ``inputs -> mask``. Inside every product the Jacobian rows of
        the masked positions are zero (the logits are where(mask, z,
        z.detach()): same values, no derivative there), so they add nothing to
        any Fisher quantity; a mask with no True entry is refused. Cost: none
        beyond an elementwise select.

    Returns
    -------
    TorchLinearization
        Torch tensors throughout, on the parameters' device, in their dtype;
        ``lin.mask`` is the boolean (N, ∗S) mask or None.

    Raises
    ------
    TypeError
        ``model`` is not a module, ``inputs`` are not tensors, a selected
        parameter is not floating-point or the dtypes differ, ``output`` /
        ``class_axis`` / ``mask`` of the wrong type, a mask that is not boolean.
    ValueError
        No parameter selected, unknown or repeated names, a module in a random or
        batch-coupled mode, parameters or inputs on different devices, inputs
        with different numbers of rows, a selector that finds nothing,
        ``class_axis`` 0 or out of range, logits below 2-D, not floating, not in
        the parameters' dtype, or not finite, a mask of the wrong shape or
        without any True entry.

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

    A sequence model with (N, C, T) outputs and padding masked out:

    >>> conv = torch.nn.Conv1d(4, 3, kernel_size=1)
    >>> lin = linearize(conv, torch.randn(2, 4, 6), class_axis=1, mask=torch.ones(2, 6) > 0)
    >>> lin.logits.shape, lin.output_shape, lin.num_positions
    (torch.Size([2, 6, 3]), (2, 6, 3), 6)
    """
    spec = check_output_options(output, class_axis)
    checked_mask = check_mask_spec(mask)
    module, params = resolve_model(model, params, buffers)
    selection = select_parameters(module, params)
    return TorchLinearization(selection, check_batch(selection, inputs), spec, checked_mask, inputs)


def _check_label_key(label_key: object) -> str | None:
    if label_key is not None and not isinstance(label_key, str):
        msg = f"label_key must be a str or None; got {type(label_key).__name__}."
        raise TypeError(msg)
    return label_key


def linearizations(
    model: nn.Module | Callable[..., Any],
    batches: Iterable[Any],
    /,
    *,
    params: Sequence[str] | Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    output: OutputSelector = None,
    class_axis: int = -1,
    mask: str | Callable[[Any], Any] | None = None,
    label_key: str | None = "labels",
) -> Iterator[TorchLinearization]:
    """Lazily linearize ``model`` on each batch of ``batches``.

    A batch is the inputs (a tensor, or a dict of keyword tensors), or a
    tuple/list whose first element holds the inputs (a tensor, a tuple of tensors
    for a model with several inputs, or a dict), as a ``DataLoader`` yields
    ``(x, y)``: only ``x`` is used. The entry ``label_key`` (default
    ``"labels"``) of dict inputs is left out, so a Hugging Face collator's batch
    can be passed as it is. Each linearization is built when it is requested, so
    a data set is streamed one batch at a time. The model, the parameter
    selection and the options are checked at once.

    ``model``, ``params`` and ``buffers`` (a module, or a function with its dicts),
    ``output`` and ``class_axis`` are as in :func:`linearize`; ``mask`` is per
    batch: None, a str (a key of dict inputs, e.g. ``"attention_mask"``,
    converted with ``!= 0``) or a callable ``inputs -> mask`` (boolean
    (N, ∗S)).

    Examples
    --------
    >>> import torch
    >>> from fisherbound.adapters.torch import linearizations
    >>> model = torch.nn.Linear(4, 3)
    >>> data = [(torch.randn(8, 4), torch.zeros(8)) for _ in range(3)]
    >>> [lin.num_inputs for lin in linearizations(model, data)]
    [8, 8, 8]
    """
    spec = check_output_options(output, class_axis)
    checked_mask = check_mask_spec(mask, stream=True)
    key = _check_label_key(label_key)
    module, params = resolve_model(model, params, buffers)
    selection = select_parameters(module, params)

    def build(i: int, inputs: Any) -> TorchLinearization:
        inputs = without_key(inputs, key)
        batch = check_batch(selection, inputs, parameters=i == 0)  # θ: on the first batch
        return TorchLinearization(selection, batch, spec, checked_mask, inputs)

    return stream_linearizations(
        batches,
        build,
        what="batches (a list, a generator, a DataLoader)",
        remedy="For one batch use linearize(model, inputs).",
        single="an inputs tensor",
        one_batch=is_tensor_or_text,
    )
