r"""Reference models with hand-written derivatives, for any array-API library.

Two small classifiers whose Jacobian products are written out by hand and
vectorised with batched matrix products:

- ``LinearSoftmax(weight, bias=None)``: logits :math:`z = x W^\top + b`;
- ``MLP(weights, biases, activation=...)``:
  :math:`z = W_L \phi(\dots \phi(W_1 x + b_1) \dots) + b_L`.

They use only array-API-standard functions on their own arrays, so they run on
NumPy, CuPy, array-api-strict (on any device), torch and JAX alike, and they are
the analytic test bed of the library and its zero-dependency default. The name
of the module says "numpy" because NumPy is the default namespace of
``random(...)``; nothing here imports NumPy at module level.

``linearize(model, inputs)`` freezes a model at its parameters on one batch and
returns a :class:`~fisherbound.linearization.LinearizationBase` with exact
forward (JVP) and reverse (VJP) products, batched and per-example products, and
the fast per-example-square path :math:`\sum_n (J_n^\top u_{nk})^2` that never materialises
per-example gradients. ``linearizations(model, batches)`` streams a data set.

Parameter layout: the flat vector :math:`\theta` holds, layer after layer, the row-major
weight (out, in) and then the bias (out,); blocks are named ``"weight"`` /
``"bias"`` for ``LinearSoftmax`` and ``"layers.{i}.weight"`` /
``"layers.{i}.bias"`` for ``MLP``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fisherbound._finite import check_outputs
from fisherbound._lib import (
    array_namespace,
    check_positive_int,
    is_array,
)
from fisherbound.adapters._numpy_models import ACTIVATIONS as _ACTIVATIONS
from fisherbound.adapters._numpy_models import (
    MLP,
    LinearSoftmax,
    ReferenceModel,
    check_inputs,
    check_model,
    forward_pass,
    join_layers,
    split_rows,
)
from fisherbound.families import Family
from fisherbound.linearization import (
    LinearizationBase,
    LossFunctionBase,
    ReadOnly,
    check_loss_options,
    stream_linearizations,
    stream_loss_functions,
)

Array = Any

#: The hidden-layer activations ``MLP`` supports.
ACTIVATIONS = _ACTIVATIONS

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "linearize",
    "linearizations",
    "loss_function",
    "loss_functions",
    "MLP",
    "LinearSoftmax",
    "ReferenceLinearization",
    "ReferenceLossFunction",
    "ACTIVATIONS",
]

# ----------------------------------------------------------------------------
# The linearization
# ----------------------------------------------------------------------------


class ReferenceLinearization(LinearizationBase):
    r"""A reference model frozen at its parameters on one batch (see ``linearize``).

    Holds the forward pass (the input of every layer and :math:`\phi'` of every hidden
    layer); every product below is a few batched matrix products with it.
    """

    def __init__(self, model: ReferenceModel, inputs: Array) -> None:
        xp = model.xp
        self._xp = xp
        self._model = model
        self._inputs = inputs
        self._weights = model._weights
        self._layout = model._layout
        self._blocks = model.blocks
        z, acts, derivs = forward_pass(xp, model._weights, model._biases, model._activation, inputs)
        check_outputs(self, z, "the model's logits")
        self._logits = z
        self._acts = acts
        self._derivs = derivs

    model = ReadOnly[ReferenceModel]("The linearized model.")
    inputs = ReadOnly[Array]("The batch of inputs (N, d), in the model's dtype.")

    # -- forward products ---------------------------------------------------------
    def _suspects(self) -> tuple[Array, list[tuple[str, Array]]]:
        return self._model.parameters(), [("inputs", self._inputs)]

    def jvp(self, v: Array, /) -> Array:
        r""":math:`J v` for a flat parameter vector ``v`` (D,); returns (N, C).

        Forward mode: :math:`dh_i = da_{i-1} W_i^\top + a_{i-1}\, dW_i^\top + db_i`,
        :math:`da_i = \phi'(h_i) \odot dh_i`.
        Cost: about one forward pass.
        """
        v = self._operand(v, "v", (self.num_params,), "(D,)")
        return self._jvp_batch(self._xp, self._xp.reshape(v, (1, self.num_params)))[0, ...]

    def jvp_batch(self, V: Array, /) -> Array:
        """:math:`J V[m]` for M parameter vectors ``V`` (M, D); returns (M, N, C) in one pass."""
        V = self._operand(V, "V", (None, self.num_params), "(M, D)")
        return self._jvp_batch(self._xp, V)

    def _jvp_batch(self, xp: Any, V: Array) -> Array:
        parts = split_rows(xp, V, self._layout)
        da = None
        t = None
        last = len(parts) - 1
        for i, ((dw, db), w) in enumerate(zip(parts, self._weights, strict=True)):
            # (N, in) @ (M, in, out) -> (M, N, out)
            t = xp.matmul(self._acts[i], xp.matrix_transpose(dw))
            if da is not None:
                t = t + xp.matmul(da, xp.matrix_transpose(w))
            if db is not None:
                t = t + xp.reshape(db, (int(db.shape[0]), 1, int(db.shape[1])))
            if i < last:
                da = t * self._derivs[i]
        return t

    # -- reverse products ---------------------------------------------------------
    def vjp(self, u: Array, /) -> Array:
        r""":math:`J^\top u = \sum_n J_n^\top u_n` for a cotangent ``u`` (N, C); returns (D,).

        Reverse mode: :math:`\delta_L = u`, :math:`\nabla W_i = \delta_i^\top a_{i-1}`,
        :math:`\nabla b_i = \sum_n \delta_i`,
        :math:`\delta_{i-1} = (\delta_i W_i) \odot \phi'(h_{i-1})`. Cost: about one backward pass.
        """
        n, c = self.num_inputs, self.num_outputs
        u = self._operand(u, "u", (n, c), "(N, C)")
        return self._vjp_batch(self._xp, self._xp.reshape(u, (1, n, c)))[0, ...]

    def vjp_batch(self, U: Array, /) -> Array:
        r""":math:`J^\top U[m]` for M cotangents ``U`` (M, N, C).

        Returns (M, D) in one batched pass.
        """
        U = self._operand(U, "U", (None, self.num_inputs, self.num_outputs), "(M, N, C)")
        return self._vjp_batch(self._xp, U)

    def _vjp_batch(self, xp: Any, U: Array) -> Array:
        delta = U
        parts: list[tuple[Array, Array | None]] = []
        for i in range(len(self._weights) - 1, -1, -1):
            # (M, out, N) @ (N, in) -> (M, out, in): the sum over examples is the matmul.
            gw = xp.matmul(xp.matrix_transpose(delta), self._acts[i])
            parts.append((gw, xp.sum(delta, axis=1) if self._layout.biased[i] else None))
            if i > 0:
                delta = xp.matmul(delta, self._weights[i]) * self._derivs[i - 1]
        return join_layers(xp, self._layout, parts[::-1])

    def _deltas(self, xp: Any, U: Array, start: int, stop: int) -> list[Array]:
        """δ_i (n, K, out_i) of every layer for per-example cotangents U (n, K, C)."""
        n = int(U.shape[0])
        deltas: list[Array] = [U]
        delta = U
        for i in range(len(self._weights) - 1, 0, -1):
            d = self._derivs[i - 1][start:stop, ...]
            d = xp.reshape(d, (n, 1, int(d.shape[1])))
            delta = xp.matmul(delta, self._weights[i]) * d
            deltas.append(delta)
        return deltas[::-1]

    def per_example_vjp(self, U: Array, /, *, examples: slice | None = None) -> Array:
        r""":math:`J_n^\top U[i, k]` for the examples :math:`n = \text{start} + i` of ``examples``.

        Returns (n, K, D).
        ``U`` has shape (n, K, C) with n the length of the slice ``examples``
        (default: all N examples). The per-example gradients are the outer
        products :math:`\delta_{nk} a_n^\top` (weights) and :math:`\delta_{nk}` (biases), formed for
        all n and k at once. Memory: :math:`n \cdot K \cdot D` entries.
        """
        xp = self._xp
        start, stop = self._examples(examples)
        U = self._operand(U, "U", (stop - start, None, self.num_outputs), "(n, K, C)")
        n, k = int(U.shape[0]), int(U.shape[1])
        deltas = self._deltas(xp, U, start, stop)
        parts: list[tuple[Array, Array | None]] = []
        for i, delta in enumerate(deltas):
            _, out, inp, _ = self._layout.layers[i]
            a = xp.reshape(self._acts[i][start:stop, ...], (n, 1, 1, inp))
            gw = xp.reshape(delta, (n, k, out, 1)) * a
            parts.append((gw, delta if self._layout.biased[i] else None))
        return join_layers(xp, self._layout, parts)

    def sum_squared_per_example_vjp(
        self, U: Array, /, *, max_vectors: int | None = None, sum_cotangents: bool = False
    ) -> Array:
        r""":math:`\sum_n (J_n^\top U[n, k])^2` for cotangents ``U`` (N, K, C); returns (K, D).

        ``sum_cotangents=True`` returns the sum over k, (D,), with one product per
        layer: :math:`\sum_k (\delta_k \odot \delta_k)^\top (a \odot a)
        = (\sum_k \delta_k \odot \delta_k)^\top (a \odot a)`.

        Uses :math:`\sum_n (\delta_{nk} \otimes a_n)^2 = (\delta_k \odot \delta_k)^\top (a \odot a)`
        per layer (and :math:`\sum_n \delta_{nk}^2` for biases), so per-example gradients are
        never formed: the cost is about K backward passes. Examples are processed in
        chunks whose backpropagated signals :math:`\delta`
        (:math:`\mathrm{chunk} \cdot K \cdot \sum_i \mathrm{out}_i` entries) take at most the
        memory of ``max_vectors`` D-vectors (default ``default_max_vectors``).
        """
        xp = self._xp
        U = self._operand(U, "U", (self.num_inputs, None, self.num_outputs), "(N, K, C)")
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        n, k = int(U.shape[0]), int(U.shape[1])
        per_example = max(1, k * self._layout.width_sum)
        chunk = max(1, (budget * self.num_params) // per_example)
        total = None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            part = self._sum_squared(xp, U[start:stop, ...], start, stop, sum_cotangents)
            total = part if total is None else total + part
        return total

    def _sum_squared(
        self, xp: Any, U: Array, start: int, stop: int, sum_cotangents: bool = False
    ) -> Array:
        deltas = self._deltas(xp, U, start, stop)
        parts: list[tuple[Array, Array | None]] = []
        for i, delta in enumerate(deltas):
            d2 = delta * delta
            a = self._acts[i][start:stop, ...]
            if sum_cotangents:
                d2 = xp.sum(d2, axis=1)  # (n, out)
                gw = xp.matmul(xp.matrix_transpose(d2), a * a)
            else:
                # (K, out, n) @ (n, in) -> (K, out, in)
                gw = xp.matmul(xp.permute_dims(d2, (1, 2, 0)), a * a)
            parts.append((gw, xp.sum(d2, axis=0) if self._layout.biased[i] else None))
        return join_layers(xp, self._layout, parts)

    # -- second derivatives (added for fisherbound.variance) ------------------------
    def output_second_derivative_diagonal(self, /, *, max_vectors: int | None = None) -> Array:
        r""":math:`\partial^2 z_{nc}/\partial\theta_i^2` for every example, output and parameter.

        Returns (N, C, D).
        Exact, from the hand-written second-order recursion over the layers: with
        :math:`G_i = \partial z/\partial h_i` and
        :math:`T_i = \partial^2 z/\partial h_i \partial h_i^\top` (:math:`h_i` the
        pre-activation of layer i), :math:`T_L = 0` and
        :math:`T_i = \Phi'_i W_{i+1}^\top T_{i+1} W_{i+1} \Phi'_i
        + \operatorname{diag}((G_{i+1} W_{i+1}) \odot \phi''(h_i))`;
        a weight :math:`W_i[j, k]` then has
        :math:`\partial^2 z/\partial W_i[j, k]^2 = (T_i)_{jj}\, a_{i-1,k}^2`, a bias
        :math:`(T_i)_{jj}`. Parameters of the last layer (on which :math:`z` is linear) give 0,
        and so do ReLU layers (:math:`\phi'' = 0` almost everywhere). Memory: a chunk of examples
        at a time holds :math:`C \times \mathrm{width}^2` entries per example (at most
        ``max_vectors`` D-vectors of output; default ``default_max_vectors``).
        """
        xp = self._xp
        budget = self.default_max_vectors if max_vectors is None else max_vectors
        budget = check_positive_int(budget, "max_vectors")
        n, c = self.num_inputs, self.num_outputs
        chunk = max(1, budget // max(c, 1))
        parts = [
            self._second_derivatives(xp, start, min(n, start + chunk))
            for start in range(0, n, chunk)
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    def _second_derivatives(self, xp: Any, start: int, stop: int) -> Array:
        n, c = stop - start, self.num_outputs
        num_layers = len(self._weights)
        dtype, device = self.dtype, self.device
        eye = xp.eye(c, dtype=dtype, device=device)
        grad = xp.broadcast_to(eye[None, ...], (n, c, c))  # G_L: ∂z/∂z
        hess = None  # T_L = 0 (z is linear in its own pre-activation)
        diagonals: list[Array] = [xp.zeros((n, c, c), dtype=dtype, device=device)]
        for i in range(num_layers - 2, -1, -1):
            w = self._weights[i + 1]  # (out_{i+1}, out_i)
            d1 = self._derivs[i][start:stop, ...]  # φ'(h_i), (n, out_i)
            if self._model._activation == "tanh":
                a = self._acts[i + 1][start:stop, ...]  # φ(h_i)
                d2 = -2.0 * a * d1
            else:
                d2 = xp.zeros_like(d1)
            gw = xp.matmul(grad, w)  # (n, C, out_i) = G_{i+1} W_{i+1}
            new_hess = None
            if hess is not None:
                # Φ' Wᵀ T W Φ', batched over (n, C).
                inner = xp.matmul(xp.matmul(xp.matrix_transpose(w), hess), w)
                new_hess = inner * d1[:, None, :, None] * d1[:, None, None, :]
            curvature = gw * d2[:, None, :]
            if new_hess is None:
                diag = curvature
                if i > 0:
                    width = int(d1.shape[1])
                    eye_w = xp.eye(width, dtype=dtype, device=device)
                    new_hess = curvature[..., None] * eye_w
            else:
                width = int(d1.shape[1])
                eye_w = xp.eye(width, dtype=dtype, device=device)
                new_hess = new_hess + curvature[..., None] * eye_w
                diag = xp.sum(new_hess * eye_w, axis=-1)
            diagonals.append(diag)
            grad = gw * d1[:, None, :]
            hess = new_hess
        diagonals = diagonals[::-1]  # (n, C, out_i) per layer, first layer first
        parts: list[tuple[Array, Array | None]] = []
        for i, diag in enumerate(diagonals):
            _, out, inp, _ = self._layout.layers[i]
            a = self._acts[i][start:stop, ...]
            a2 = xp.reshape(a * a, (n, 1, 1, inp))
            gw2 = xp.reshape(diag, (n, c, out, 1)) * a2
            parts.append((gw2, diag if self._layout.biased[i] else None))
        return join_layers(xp, self._layout, parts)


# ----------------------------------------------------------------------------
# Public fronts
# ----------------------------------------------------------------------------


def linearize(model: LinearSoftmax | MLP, inputs: Array, /) -> ReferenceLinearization:
    """Freeze a reference model at its parameters on one batch of inputs.

    Parameters
    ----------
    model
        A ``LinearSoftmax`` or ``MLP``.
    inputs
        The batch x (N, d), a real floating array of the model's namespace and
        device, finite; cast to the model's dtype.

    Returns
    -------
    ReferenceLinearization
        A :class:`~fisherbound.linearization.LinearizationBase` with logits (N, C),
        ``jvp`` (D,) → (N, C), ``vjp`` (N, C) → (D,), their batched forms,
        ``per_example_vjp`` (N, K, C) → (N, K, D) and the fast
        ``sum_squared_per_example_vjp`` (N, K, C) → (K, D), all exact (hand-written
        derivatives) and in the model's namespace, device and dtype.

    Notes
    -----
    Cost: one forward pass here; each JVP / VJP about one forward / backward
    pass; M of them batched cost M passes in a handful of matrix products.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> model = MLP.random([4, 8, 3], rng=0)
    >>> lin = linearize(model, np.ones((5, 4)))
    >>> lin.logits.shape, lin.jvp(np.ones(model.num_params)).shape
    ((5, 3), (5, 3))
    >>> lin.vjp(np.ones((5, 3))).shape
    (67,)
    """
    checked = check_model(model)
    return ReferenceLinearization(checked, check_inputs(checked, inputs))


def linearizations(
    model: LinearSoftmax | MLP, batches: Iterable[Any], /
) -> Iterator[ReferenceLinearization]:
    """Linearize ``model`` on each batch of ``batches``, lazily.

    Parameters
    ----------
    model
        A ``LinearSoftmax`` or ``MLP`` (checked now, not at the first batch).
    batches
        An iterable of batches; a batch is an inputs array (N, d) or a tuple /
        list whose first element is the inputs (as a DataLoader yields
        ``(x, y)``). Consumed one batch at a time.

    Returns
    -------
    Iterator[ReferenceLinearization]
        One linearization per batch, built when it is requested, so a data set
        is streamed without holding more than one batch.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearizations
    >>> model = LinearSoftmax.random(2, 3, rng=0)
    >>> data = [(np.ones((4, 2)), np.zeros(4)), (np.ones((3, 2)), np.zeros(3))]
    >>> [lin.num_inputs for lin in linearizations(model, data)]
    [4, 3]
    """
    checked = check_model(model)

    def build(i: int, batch: Any) -> ReferenceLinearization:
        if not is_array(batch):
            msg = (
                f"batch {i} must be an inputs array or a tuple / list whose first element "
                f"is the inputs; got {type(batch).__module__}.{type(batch).__name__}."
            )
            raise TypeError(msg)
        return ReferenceLinearization(checked, check_inputs(checked, batch))

    return stream_linearizations(
        batches, build, remedy="For a single batch use linearize(model, inputs).", single="an array"
    )


# ----------------------------------------------------------------------------
# The loss of a labelled batch (added for fisherbound.landscape)
# ----------------------------------------------------------------------------


class ReferenceLossFunction(LossFunctionBase):
    """The negative log-likelihood of a reference model on one labelled batch.

    Build it with :func:`loss_function`. ``value`` evaluates the model at S
    shifted parameter vectors in one batched forward pass (the weights stacked
    along a leading axis); ``gradient`` is one backward pass; ``hvp`` /
    ``hvp_batch`` are exact Hessian-vector products by Pearlmutter's R-operator
    (a forward R-pass and a backward R-pass, written out by hand).
    """

    #: Shifts evaluated per batched forward pass in ``value``.
    default_max_shifts: int = 64

    def __init__(
        self, model: ReferenceModel, inputs: Array, labels: Array, family: Any, reduction: str
    ) -> None:
        self._lin = ReferenceLinearization(model, inputs)
        self._hold_batch(self._lin.logits, labels, family, reduction)
        self._model = model
        self._xp = model.xp
        self._blocks = model.blocks
        self._params = model.parameters()

    def _suspects(self) -> tuple[Array, list[tuple[str, Array]]]:
        return self._lin._suspects()

    @property
    def linearization(self) -> ReferenceLinearization:
        r"""The model linearized at :math:`\theta` on the batch (for Fisher quantities)."""
        return self._lin

    @property
    def kinks(self) -> tuple[str, ...]:
        """``('relu',)`` for an ``MLP`` with ReLU hidden layers (kinks at 0), else ()."""
        model = self._model
        hidden = len(getattr(model, "_weights", ())) > 1
        return ("relu",) if hidden and model._activation == "relu" else ()

    def _nll(self, xp: Any, z: Array) -> Array:
        """−Σ_n log p(y_n | z_n) over the example axis of z (..., N, C), scaled."""
        y = self._labels
        if z.ndim > 2:
            y = xp.broadcast_to(y, tuple(z.shape[:-2]) + tuple(y.shape))
        return -xp.sum(self._family.unchecked_log_likelihood(z, y, xp=xp), axis=-1) * self._scale

    def value(self, shifts: Array, /) -> Array:
        r""":math:`L(\theta + \mathrm{shifts}[s])` for shifts (S, D); returns (S,).

        One forward pass with the S parameter vectors stacked (chunks of
        ``default_max_shifts``): cost about S forward passes, in a few batched
        matrix products.
        """
        lin = self._lin
        shifts = lin._operand(shifts, "shifts", (None, self.num_params), "(S, D)")
        xp = self._xp
        s_total = int(shifts.shape[0])
        pieces = []
        for start in range(0, s_total, self.default_max_shifts):
            stop = min(s_total, start + self.default_max_shifts)
            theta = self._params + shifts[start:stop, ...]
            pieces.append(self._nll(xp, self._stacked_forward(xp, theta)))
        if not pieces:
            return xp.zeros((0,), dtype=self.dtype, device=self.device)
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=0)

    def _stacked_forward(self, xp: Any, theta: Array) -> Array:
        """Logits (S, N, C) at S flat parameter vectors theta (S, D)."""
        a = self._lin.inputs
        parts = split_rows(xp, theta, self._model._layout)
        last = len(parts) - 1
        h = a
        for i, (w, b) in enumerate(parts):
            h = xp.matmul(a, xp.matrix_transpose(w))
            if b is not None:
                h = h + b[:, None, :]
            if i < last:
                a = xp.tanh(h) if self._model._activation == "tanh" else xp.maximum(h, 0.0)
        return h

    def _loss_gradient_logits(self, xp: Any) -> Array:
        """∂L/∂z = −score = E t(y) − t(y), (N, C), scaled."""
        z = self._lin.logits
        return -self._family.unchecked_score(z, self._labels, xp=xp) * self._scale

    def gradient(self) -> Array:
        r""":math:`\nabla L(\theta) = \sum_n J_n^\top (\mathbb E\, t(y_n) - t(y_n))`, (D,).

        One backward pass.
        """
        xp = self._xp
        g = self._loss_gradient_logits(xp)
        return self._lin._vjp_batch(xp, g[None, ...])[0, ...]

    def hvp(self, v: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, v` for ``v`` (D,); returns (D,) (see ``hvp_batch``)."""
        v = self._lin._operand(v, "v", (self.num_params,), "(D,)")
        return self._hvp_batch(self._xp, self._xp.reshape(v, (1, self.num_params)))[0, ...]

    def hvp_batch(self, V: Array, /) -> Array:
        r""":math:`\nabla^2 L(\theta)\, V[m]` for M vectors ``V`` (M, D); returns (M, D).

        Pearlmutter's R-operator :math:`R\{\cdot\} = \frac{d}{dt} (\cdot)(\theta + t v)` at
        :math:`t = 0`, applied to the forward pass
        (:math:`R h_i = R a_{i-1} W_i^\top + a_{i-1} V_i^\top + v_{b_i}`,
        :math:`R a_i = \phi'(h_i) \odot R h_i`) and to backpropagation
        (:math:`R \delta_L = I(z)\, R z`,
        :math:`R \delta_{i-1} = (R \delta_i W_i + \delta_i V_i) \odot \phi'(h_{i-1})
        + (\delta_i W_i) \odot \phi''(h_{i-1}) \odot R h_{i-1}`,
        :math:`R \nabla W_i = R \delta_i^\top a_{i-1} + \delta_i^\top R a_{i-1}`), with
        :math:`\delta_L = \partial L/\partial z = \mathbb E\, t(y) - t(y)`
        and :math:`\partial^2 L/\partial z^2 = I(z)` (the family's metric). Exact; cost about two
        forward and two backward passes per vector, batched over M.
        """
        V = self._lin._operand(V, "V", (None, self.num_params), "(M, D)")
        return self._hvp_batch(self._xp, V)

    def _hvp_batch(self, xp: Any, V: Array) -> Array:
        lin, model = self._lin, self._model
        layout = model._layout
        weights, acts, derivs = lin._weights, lin._acts, lin._derivs
        parts = split_rows(xp, V, layout)
        last = len(parts) - 1
        # Forward R-pass: R h_i (M, N, out_i) and R a_{i-1}, the R-input of layer i.
        r_in: list[Array | None] = [None]
        r_h: list[Array] = []
        for i, ((dw, db), w) in enumerate(zip(parts, weights, strict=True)):
            t = xp.matmul(acts[i], xp.matrix_transpose(dw))
            ra = r_in[i]
            if ra is not None:
                t = t + xp.matmul(ra, xp.matrix_transpose(w))
            if db is not None:
                t = t + db[:, None, :]
            r_h.append(t)
            if i < last:
                r_in.append(t * derivs[i])
        # Backward R-pass.
        z = lin.logits
        delta = self._loss_gradient_logits(xp)  # (N, C)
        r_delta = self._family.unchecked_metric_matvec(z, r_h[last], xp=xp) * self._scale
        grads: list[tuple[Array, Array | None]] = []
        for i in range(last, -1, -1):
            gw = xp.matmul(xp.matrix_transpose(r_delta), acts[i])  # (M, out, in)
            ra = r_in[i]
            if ra is not None:
                gw = gw + xp.matmul(xp.matrix_transpose(delta), ra)
            grads.append((gw, xp.sum(r_delta, axis=1) if layout.biased[i] else None))
            if i > 0:
                dw = parts[i][0]
                back = xp.matmul(delta, weights[i])  # δ_i W_i, (N, in)
                r_back = xp.matmul(r_delta, weights[i]) + xp.matmul(delta, dw)
                r_delta = r_back * derivs[i - 1]
                if model._activation == "tanh":
                    # φ'' = −2 φ φ' for tanh; φ(h_{i-1}) is the input of layer i.
                    second = -2.0 * acts[i] * derivs[i - 1]
                    r_delta = r_delta + (back * second) * r_h[i - 1]
                delta = back * derivs[i - 1]
        return join_layers(xp, layout, grads[::-1])


def loss_function(
    model: LinearSoftmax | MLP,
    inputs: Array,
    labels: Array,
    /,
    *,
    family: Family | None = None,
    reduction: str = "sum",
) -> ReferenceLossFunction:
    r"""The negative log-likelihood of a reference model on one labelled batch.

    :math:`L(\theta) = -\sum_n \log p(y_n \mid z_n(\theta))` with the family's ``log_likelihood``
    (``reduction="mean"`` divides by N), as a
    :class:`~fisherbound.linearization.LossFunction` for ``fisherbound.landscape``:
    ``value(shifts)`` (S, D) → (S,), ``gradient()`` (D,), ``hvp(v)`` and
    ``hvp_batch(V)`` (exact, Pearlmutter's R-operator, written out by hand).

    Parameters
    ----------
    model
        A ``LinearSoftmax`` or ``MLP``; :math:`\theta` = ``model.parameters()``.
    inputs
        The batch x (N, d) of the model's namespace and device.
    labels
        y for the family: integer class indices (N,) for ``Categorical()`` (the
        default), {0, 1} floats (N, C) for ``Bernoulli()``, real targets (N, C)
        for ``Gaussian()``; same namespace and device.
    family
        The output family (default ``Categorical()``).
    reduction
        ``"sum"`` over the batch (default) or ``"mean"``.

    Returns
    -------
    ReferenceLossFunction

    Notes
    -----
    Cost: one forward pass here; ``value`` about S forward passes; ``gradient``
    one backward pass; each Hessian-vector product about two forward and two
    backward passes.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_function
    >>> model = LinearSoftmax(np.zeros((3, 2)))
    >>> loss = loss_function(model, np.ones((4, 2)), np.zeros(4, dtype=int))
    >>> round(float(loss.value(np.zeros((1, 6)))[0]), 6)  # 4 log 3
    4.394449
    >>> loss.hvp(np.ones(6)).shape
    (6,)
    """
    checked = check_model(model)
    fam = check_loss_options(family, reduction)
    x = check_inputs(checked, inputs)
    array_namespace(labels, x, names=("labels", "inputs"))
    return ReferenceLossFunction(checked, x, labels, fam, reduction)


def loss_functions(
    model: LinearSoftmax | MLP,
    batches: Iterable[Any],
    /,
    *,
    family: Family | None = None,
    reduction: str = "sum",
) -> Iterator[ReferenceLossFunction]:
    """``loss_function`` on each (inputs, labels) batch of ``batches``, lazily.

    ``batches`` yields pairs ``(x, y)`` (as a DataLoader does); each loss
    function is built when it is requested, so a data set is streamed. The model,
    family and reduction are checked at once.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, loss_functions
    >>> model = LinearSoftmax.random(2, 3, rng=0)
    >>> data = [(np.ones((4, 2)), np.zeros(4, dtype=int))] * 2
    >>> [loss.num_inputs for loss in loss_functions(model, data)]
    [4, 4]
    """
    checked = check_model(model)
    fam = check_loss_options(family, reduction)

    def build(i: int, inputs: Any, labels: Any) -> ReferenceLossFunction:
        x = check_inputs(checked, inputs)
        array_namespace(labels, x, names=(f"the labels of batch {i}", "inputs"))
        return ReferenceLossFunction(checked, x, labels, fam, reduction)

    return stream_loss_functions(
        batches, build, remedy="For one batch use loss_function(model, x, y).", say_length=True
    )
