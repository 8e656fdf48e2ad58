"""The reference models of ``fisherbound.adapters.numpy``: LinearSoftmax and MLP.

Public through ``fisherbound.adapters.numpy`` (``LinearSoftmax``, ``MLP``,
``ACTIVATIONS``). Here: the models, their forward pass written against the array
API (takes ``xp`` explicitly, validates nothing), the flat parameter layout and
the checks of the layers and inputs with the house messages.
"""

from __future__ import annotations

import math
from typing import Any

from fisherbound._finite import check_parameters_finite
from fisherbound._lib import (
    array_namespace,
    as_generator,
    check_choice,
    check_device,
    check_finite,
    check_floating,
    check_positive_int,
    device_of,
)
from fisherbound.linearization import ParameterBlock, make_blocks

Array = Any

__all__ = ["ACTIVATIONS", "MLP", "LinearSoftmax"]

#: The hidden-layer activations ``MLP`` supports.
ACTIVATIONS = ("tanh", "relu")

#: Standard deviation of the random biases drawn by ``random(...)``.
_BIAS_SCALE = 0.1


# ----------------------------------------------------------------------------
# Private implementation: takes xp explicitly, validates nothing.
# ----------------------------------------------------------------------------


def _activate(xp: Any, h: Array, activation: str) -> tuple[Array, Array]:
    """φ(h) and φ'(h) for a hidden pre-activation ``h``."""
    if activation == "tanh":
        a = xp.tanh(h)
        return a, 1.0 - a * a
    # ReLU; its derivative at 0 is taken to be 0.
    mask = xp.astype(h > 0, h.dtype)
    return h * mask, mask


def forward_pass(
    xp: Any,
    weights: tuple[Array, ...],
    biases: tuple[Array | None, ...],
    activation: str,
    x: Array,
) -> tuple[Array, list[Array], list[Array]]:
    """Logits, the input a_{i-1} of every layer and φ'(h_i) of every hidden layer."""
    inputs = []
    derivatives = []
    a = x
    last = len(weights) - 1
    h = x
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inputs.append(a)
        h = xp.matmul(a, xp.matrix_transpose(w))
        if b is not None:
            h = h + b
        if i < last:
            a, d = _activate(xp, h, activation)
            derivatives.append(d)
    return h, inputs, derivatives


class Layout:
    """Where each layer's weight and bias sit in the flat parameter vector."""

    def __init__(self, weights: tuple[Array, ...], biases: tuple[Array | None, ...]) -> None:
        self.layers: list[tuple[int, int, int, int | None]] = []
        offset = 0
        for w, b in zip(weights, biases, strict=True):
            out, inp = int(w.shape[0]), int(w.shape[1])
            w_offset = offset
            offset += out * inp
            b_offset = None
            if b is not None:
                b_offset = offset
                offset += out
            self.layers.append((w_offset, out, inp, b_offset))
        self.size = offset
        self.width_sum = sum(out for _, out, _, _ in self.layers)
        #: Whether each layer has a bias (whose piece ``join_layers`` then expects).
        self.biased = tuple(b_offset is not None for _, _, _, b_offset in self.layers)


def split_rows(xp: Any, V: Array, layout: Layout) -> list[tuple[Array, Array | None]]:
    """Per layer, the tangents (M, out, in) and (M, out) (or None) of rows V (M, D)."""
    m = int(V.shape[0])
    parts = []
    for w_offset, out, inp, b_offset in layout.layers:
        dw = xp.reshape(V[:, w_offset : w_offset + out * inp], (m, out, inp))
        db = None if b_offset is None else V[:, b_offset : b_offset + out]
        parts.append((dw, db))
    return parts


def join_layers(xp: Any, layout: Layout, parts: list[tuple[Array, Array | None]]) -> Array:
    """The inverse of ``split_rows``: per-layer pieces concatenated in θ order, (..., D).

    ``parts[i]`` holds layer i's weight piece (..., out, in), flattened row-major,
    and its bias piece (..., out), None for a layer without bias; the pieces are
    joined along the last axis.
    """
    pieces: list[Array] = []
    for (_, out, inp, _), (w, b) in zip(layout.layers, parts, strict=True):
        pieces.append(xp.reshape(w, (*w.shape[:-2], out * inp)))
        if b is not None:
            pieces.append(b)
    return xp.concat(pieces, axis=-1)


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


class ReferenceModel:
    """Shared machinery of the reference models (a stack of affine layers)."""

    _weights: tuple[Array, ...]
    _biases: tuple[Array | None, ...]
    _activation: str
    _xp: Any
    _blocks: tuple[ParameterBlock, ...]
    _layout: Layout

    def _setup(
        self,
        weights: tuple[Array, ...],
        biases: tuple[Array | None, ...],
        weight_names: list[str],
        bias_names: list[str],
        block_names: list[tuple[str, str]],
    ) -> None:
        self._xp = _check_layers(weights, biases, weight_names, bias_names)
        self._weights = weights
        self._biases = biases
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for (wname, bname), w, b in zip(block_names, weights, biases, strict=True):
            shapes.append((wname, tuple(int(s) for s in w.shape)))
            if b is not None:
                shapes.append((bname, (int(b.shape[0]),)))
        self._blocks = make_blocks(shapes)
        self._layout = Layout(weights, biases)

    # -- read-only description ------------------------------------------------
    @property
    def blocks(self) -> tuple[ParameterBlock, ...]:
        """The parameter blocks (name, shape, offset, size), in flat-vector order."""
        return self._blocks

    @property
    def num_params(self) -> int:
        """D, the length of the flat parameter vector."""
        return self._layout.size

    @property
    def xp(self) -> Any:
        """The array namespace of the parameters."""
        return self._xp

    @property
    def dtype(self) -> Any:
        """The floating dtype of the parameters (and of the logits)."""
        return self._weights[0].dtype

    @property
    def device(self) -> Any:
        """The device of the parameters."""
        return device_of(self._weights[0])

    @property
    def in_features(self) -> int:
        """d, the width of one input."""
        return int(self._weights[0].shape[1])

    @property
    def num_classes(self) -> int:
        """C, the number of logits."""
        return int(self._weights[-1].shape[0])

    # -- evaluation -------------------------------------------------------------
    def __call__(self, inputs: Array, /) -> Array:
        """The logits z (N, C) of ``inputs`` (N, d)."""
        x = check_inputs(self, inputs)
        z, _, _ = forward_pass(self._xp, self._weights, self._biases, self._activation, x)
        return z

    def parameters(self) -> Array:
        """The flat parameter vector θ (D,), in the order of ``blocks``."""
        return join_layers(
            self._xp, self._layout, list(zip(self._weights, self._biases, strict=True))
        )

    def with_parameters(self, theta: Array, /) -> Any:
        """A new model of the same architecture with flat parameters ``theta`` (D,).

        The new model's arrays are slices of ``theta`` (its namespace, device and
        dtype). ``model.with_parameters(model.parameters())`` reproduces ``model``.
        """
        xp = array_namespace(theta, self._weights[0], names=("theta", "the model's weight"))
        check_floating(theta, "theta", xp=xp)
        if theta.ndim != 1 or int(theta.shape[0]) != self.num_params:
            msg = (
                f"theta must be a flat vector of shape ({self.num_params},) (the model's "
                f"num_params); got shape {tuple(theta.shape)}."
            )
            raise ValueError(msg)
        parts = split_rows(xp, xp.reshape(theta, (1, self.num_params)), self._layout)
        weights = tuple(dw[0, ...] for dw, _ in parts)
        biases = tuple(None if db is None else db[0, ...] for _, db in parts)
        return self._rebuild(weights, biases)

    def _rebuild(self, weights: tuple[Array, ...], biases: tuple[Array | None, ...]) -> Any:
        raise NotImplementedError


class LinearSoftmax(ReferenceModel):
    r"""A linear softmax classifier, :math:`z = x W^\top + b`.

    Parameters
    ----------
    weight
        :math:`W`, shape (C, d), a real floating array of any array-API library.
    bias
        :math:`b`, shape (C,), same namespace, dtype and device as ``weight``; ``None``
        (the default) for a model without bias (then :math:`\theta = \operatorname{vec} W` only).

    Notes
    -----
    :math:`\theta = (\text{row-major } \operatorname{vec} W, b)`; blocks ``"weight"`` (C, d) and
    ``"bias"`` (C,). The Jacobian of one input is :math:`J_x = [I_C \otimes x^\top, I_C]`, so the
    Fisher metric is :math:`F = \sum_x I_\Delta(z_x) \otimes \tilde x \tilde x^\top` with
    :math:`\tilde x = (x, 1)` (:math:`\tilde x = x` without bias).

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax
    >>> model = LinearSoftmax(np.zeros((3, 2)))
    >>> model.num_params, [b.name for b in model.blocks]
    (6, ['weight'])
    >>> model(np.array([[1.0, 2.0]]))  # uniform logits
    array([[0., 0., 0.]])
    """

    def __init__(self, weight: Array, bias: Array | None = None, /) -> None:
        self._activation = "identity"  # a single affine layer has no hidden activation
        self._setup((weight,), (bias,), ["weight"], ["bias"], [("weight", "bias")])

    @property
    def weight(self) -> Array:
        """:math:`W`, shape (C, d)."""
        return self._weights[0]

    @property
    def bias(self) -> Array | None:
        """:math:`b`, shape (C,), or None."""
        return self._biases[0]

    def _rebuild(self, weights: tuple[Array, ...], biases: tuple[Array | None, ...]) -> Any:
        return LinearSoftmax(weights[0], biases[0])

    def __repr__(self) -> str:
        """The sizes and dtype, e.g. ``LinearSoftmax(d=2, C=3, ...)``."""
        return (
            f"LinearSoftmax(d={self.in_features}, C={self.num_classes}, "
            f"bias={self.bias is not None}, dtype={self.dtype})"
        )

    @classmethod
    def random(
        cls,
        d: int,
        C: int,
        *,
        bias: bool = True,
        rng: Any = None,
        dtype: Any = None,
        xp: Any = None,
        device: Any = None,
    ) -> LinearSoftmax:
        r"""A random linear softmax model with d inputs and C classes.

        :math:`W` has Glorot-scaled Gaussian entries (standard deviation
        :math:`\sqrt{2 / (d + C)}`), :math:`b` small zero-mean Gaussian entries (standard
        deviation 0.1). The numbers are drawn on the host from ``rng`` (a numpy
        Generator, an int seed or None), so one seed gives the same model in every namespace.

        Parameters
        ----------
        d, C
            Input width and number of classes (integers >= 1).
        bias
            Whether the model has a bias.
        rng
            numpy Generator, int seed, JAX key or None.
        dtype
            A real floating dtype of ``xp`` (or its name, ``"float32"``); the
            namespace's default floating dtype when None.
        xp
            The array namespace (NumPy when None).
        device
            The device (the namespace's default when None).

        Examples
        --------
        >>> from fisherbound.adapters.numpy import LinearSoftmax
        >>> LinearSoftmax.random(4, 3, rng=0).num_params
        15
        """
        d = check_positive_int(d, "d")
        C = check_positive_int(C, "C")
        gen = as_generator(rng)
        w = gen.standard_normal((C, d)) * math.sqrt(2.0 / (d + C))
        b = gen.standard_normal((C,)) * _BIAS_SCALE if bias else None
        xp, dtype = _resolve_target(w, xp, dtype, device)
        weight = xp.asarray(w, dtype=dtype, device=device)
        return cls(weight, None if b is None else xp.asarray(b, dtype=dtype, device=device))


class MLP(ReferenceModel):
    r"""A multilayer perceptron, :math:`z = W_L \phi(\dots \phi(W_1 x + b_1) \dots) + b_L`.

    Parameters
    ----------
    weights
        A list or tuple of :math:`L \ge 1` arrays, ``weights[i]`` of shape (out_i, in_i)
        with :math:`\mathrm{in}_{i+1} = \mathrm{out}_i`; real floating, one namespace, dtype and
        device.
    biases
        A list or tuple of L arrays, ``biases[i]`` of shape (out_i,).
    activation
        The hidden activation :math:`\phi`: ``"tanh"`` or ``"relu"`` (whose derivative at 0
        is taken to be 0). The last layer is affine (no activation).

    Notes
    -----
    :math:`\theta = (\operatorname{vec} W_1, b_1, \operatorname{vec} W_2, b_2, \dots)`, each weight
    row-major; blocks
    ``"layers.{i}.weight"`` and ``"layers.{i}.bias"`` (i from 0).

    Examples
    --------
    >>> from fisherbound.adapters.numpy import MLP, linearize
    >>> model = MLP.random([4, 8, 3], rng=0)
    >>> [b.name for b in model.blocks]
    ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias']
    >>> model.num_params
    67
    """

    def __init__(self, weights: Any, biases: Any, /, *, activation: str = "tanh") -> None:
        check_choice(activation, "activation", ACTIVATIONS)
        for value, name in ((weights, "weights"), (biases, "biases")):
            if not isinstance(value, list | tuple):
                msg = (
                    f"{name} must be a list or tuple of arrays, one per layer; got "
                    f"{type(value).__name__}. Wrap a single layer as [{name[:-1]}]."
                )
                raise TypeError(msg)
        if len(weights) == 0:
            msg = "weights must hold at least one layer; got an empty sequence."
            raise ValueError(msg)
        if len(biases) != len(weights):
            msg = (
                f"biases must have one entry per layer (len(weights) = {len(weights)}); "
                f"got {len(biases)}."
            )
            raise ValueError(msg)
        for i, b in enumerate(biases):
            if b is None:
                msg = f"biases[{i}] must be an array of shape (out_{i},); got None."
                raise TypeError(msg)
        self._activation = activation
        n = len(weights)
        self._setup(
            tuple(weights),
            tuple(biases),
            [f"weights[{i}]" for i in range(n)],
            [f"biases[{i}]" for i in range(n)],
            [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(n)],
        )

    @property
    def weights(self) -> tuple[Array, ...]:
        """The weights :math:`W_i`, shapes (out_i, in_i)."""
        return self._weights

    @property
    def biases(self) -> tuple[Array, ...]:
        """The biases :math:`b_i`, shapes (out_i,)."""
        return tuple(self._biases)

    @property
    def activation(self) -> str:
        """The hidden activation, ``"tanh"`` or ``"relu"``."""
        return self._activation

    @property
    def sizes(self) -> list[int]:
        r"""The layer widths :math:`[d, h_1, \dots, C]`."""
        return [self.in_features] + [int(w.shape[0]) for w in self._weights]

    def _rebuild(self, weights: tuple[Array, ...], biases: tuple[Array | None, ...]) -> Any:
        return MLP(weights, biases, activation=self._activation)

    def __repr__(self) -> str:
        """The layer sizes, activation and dtype."""
        return f"MLP(sizes={self.sizes}, activation={self._activation!r}, dtype={self.dtype})"

    @classmethod
    def random(
        cls,
        sizes: Any,
        *,
        activation: str = "tanh",
        rng: Any = None,
        dtype: Any = None,
        xp: Any = None,
        device: Any = None,
    ) -> MLP:
        r"""A random MLP with layer widths ``sizes`` = :math:`[d, h_1, \dots, C]`.

        Weights have Glorot-scaled Gaussian entries (standard deviation
        :math:`\sqrt{2 / (\mathrm{in} + \mathrm{out})}`), biases small zero-mean Gaussian
        entries (standard deviation 0.1), drawn layer by layer (weight, then bias) on
        the host from ``rng``, so one seed gives the same model in every namespace.

        Parameters
        ----------
        sizes
            A list or tuple of at least two integers >= 1.
        activation
            ``"tanh"`` or ``"relu"``.
        rng, dtype, xp, device
            As in ``LinearSoftmax.random``: where the numbers are drawn and which
            namespace, dtype and device the arrays get.

        Examples
        --------
        >>> from fisherbound.adapters.numpy import MLP
        >>> MLP.random([2, 5, 5, 3], activation="relu", rng=1).sizes
        [2, 5, 5, 3]
        """
        check_choice(activation, "activation", ACTIVATIONS)
        if not isinstance(sizes, list | tuple) or len(sizes) < 2:
            msg = (
                "sizes must be a list or tuple [d, h_1, ..., C] of at least two layer "
                f"widths; got {sizes!r}."
            )
            raise ValueError(msg)
        widths = [check_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        gen = as_generator(rng)
        host = []
        for inp, out in zip(widths[:-1], widths[1:], strict=True):
            w = gen.standard_normal((out, inp)) * math.sqrt(2.0 / (inp + out))
            b = gen.standard_normal((out,)) * _BIAS_SCALE
            host.append((w, b))
        xp, dtype = _resolve_target(host[0][0], xp, dtype, device)
        weights = [xp.asarray(w, dtype=dtype, device=device) for w, _ in host]
        biases = [xp.asarray(b, dtype=dtype, device=device) for _, b in host]
        return cls(weights, biases, activation=activation)


def _resolve_target(host: Any, xp: Any, dtype: Any, device: Any) -> tuple[Any, Any]:
    """The namespace (NumPy for None) and floating dtype for ``random(...)``."""
    if xp is None:
        # The array-API-compatible NumPy namespace, without importing NumPy here.
        xp = array_namespace(host, names=("the host array",))
    if dtype is None:
        dtype = xp.asarray(0.0, device=device).dtype
    elif isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            msg = f"dtype must be 'float32', 'float64' or a dtype object; got {dtype!r}."
            raise TypeError(msg)
        dtype = getattr(xp, dtype)
    probe = xp.asarray(0.0, dtype=dtype, device=device)
    check_floating(probe, "dtype")
    return xp, dtype


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _check_layers(
    weights: tuple[Array, ...],
    biases: tuple[Array | None, ...],
    weight_names: list[str],
    bias_names: list[str],
) -> Any:
    """Check the layer arrays and return their namespace."""
    arrays = [*weights, *biases]
    names = (*weight_names, *bias_names)
    xp = array_namespace(*arrays, names=names)
    w0 = weights[0]
    dtype, device = None, None
    prev_out = None
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        wname, bname = weight_names[i], bias_names[i]
        check_floating(w, wname, xp=xp)
        if w.ndim != 2:
            msg = f"{wname} must be a 2-D array (out, in); got shape {tuple(w.shape)}."
            raise ValueError(msg)
        if prev_out is not None and int(w.shape[1]) != prev_out:
            msg = (
                f"{wname} must have {prev_out} columns to follow the previous layer's "
                f"{prev_out} outputs; got shape {tuple(w.shape)}."
            )
            raise ValueError(msg)
        if 0 in tuple(w.shape):
            msg = f"{wname} must have at least one row and one column; got {tuple(w.shape)}."
            raise ValueError(msg)
        prev_out = int(w.shape[0])
        if b is not None:
            check_floating(b, bname, xp=xp)
            if tuple(b.shape) != (prev_out,):
                msg = (
                    f"{bname} must have shape ({prev_out},) to match {wname} of shape "
                    f"{tuple(w.shape)}; got shape {tuple(b.shape)}."
                )
                raise ValueError(msg)
        for a, name in ((w, wname), (b, bname)):
            if a is None:
                continue
            if dtype is None:
                dtype, device = a.dtype, device_of(a)
                continue
            if a.dtype != dtype:
                msg = (
                    f"{name} must have the dtype of {weight_names[0]} ({w0.dtype}); got "
                    f"{a.dtype}. Convert with xp.astype({name}, {weight_names[0]}.dtype)."
                )
                raise TypeError(msg)
            check_device(a, name, device, owner=f"the device of {weight_names[0]}")
    return xp


def check_model(model: object) -> ReferenceModel:
    if not isinstance(model, ReferenceModel):
        msg = (
            "model must be one of the reference models of fisherbound.adapters.numpy "
            f"(LinearSoftmax, MLP); got {type(model).__module__}.{type(model).__name__}. "
            "Use fisherbound.adapters.torch for torch modules and "
            "fisherbound.adapters.jax for JAX functions."
        )
        raise TypeError(msg)
    return model


def check_inputs(model: ReferenceModel, inputs: Array) -> Array:
    """Validated inputs (N, d), cast to the model's dtype."""
    xp = array_namespace(inputs, model._weights[0], names=("inputs", "the model's weight"))
    check_floating(inputs, "inputs", xp=xp)
    d = model.in_features
    if inputs.ndim != 2:
        msg = (
            f"inputs must be a 2-D array of shape (N, {d}); got shape {tuple(inputs.shape)}. "
            f"For one input use xp.reshape(x, (1, {d}))."
        )
        raise ValueError(msg)
    if int(inputs.shape[1]) != d:
        msg = (
            f"inputs must have shape (N, {d}) for this model (expected width {d}); got "
            f"shape {tuple(inputs.shape)}."
        )
        raise ValueError(msg)
    if int(inputs.shape[0]) == 0:
        msg = f"inputs must hold at least one row; got shape {tuple(inputs.shape)}."
        raise ValueError(msg)
    check_device(
        inputs,
        "inputs",
        model.device,
        owner="the model's device",
        remedy="Move them with xp.asarray(inputs, device=...).",
    )
    check_finite(inputs, "inputs", xp=xp)
    theta = model.parameters()
    check_parameters_finite([(b.name, theta[b.offset : b.offset + b.size]) for b in model.blocks])
    if inputs.dtype != model.dtype:
        inputs = xp.astype(inputs, model.dtype)
    return inputs
