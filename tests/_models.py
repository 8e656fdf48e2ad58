"""One multilayer perceptron, the same weights in NumPy, torch and JAX.

The cross-adapter tests build the NumPy reference model
(``fisherbound.adapters.numpy.MLP``) and its twins from the same host weights:
``h = act(h @ W.T + b)`` on every layer but the last, float64 throughout::

    from _models import jax_mlp, mlp_weights, torch_mlp

    ws, bs = mlp_weights((3, 5, 4), seed=11)
    module = torch_mlp(ws, bs)                 # nn.Sequential(Linear, Tanh, Linear)
    apply_fn, params = jax_mlp(ws, bs)         # params: [(W, b), ...]

The parameter layouts: NumPy and torch flatten ``(W, b)`` per layer; so does
``jax_mlp`` with ``layout="tuple"``, while ``layout="dict"`` gives
``{"w": W, "b": b}`` layers, which ``ravel_pytree`` flattens as ``(b, W)``
(:func:`jax_dict_order` maps the NumPy layout onto it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

ACTIVATIONS = ("tanh", "relu")


def mlp_weights(sizes: Sequence[int], seed: int) -> tuple[list[Any], list[Any]]:
    """Host weights ``W_l ~ N(0, 1/fan_in)`` of shape (out, in) and biases ``0.1 N(0, 1)``."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [0.1 * rng.standard_normal(o) for o in sizes[1:]]
    return ws, bs


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        msg = f"activation must be one of {ACTIVATIONS}; got {activation!r}"
        raise ValueError(msg)


def torch_mlp(weights: Sequence[Any], biases: Sequence[Any], activation: str = "tanh") -> Any:
    """``torch.nn.Sequential`` of float64 ``Linear`` layers holding copies of the host weights."""
    torch = pytest.importorskip("torch")
    _check_activation(activation)
    layers: list[Any] = []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        w, b = np.asarray(w), np.asarray(b)
        layer = torch.nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(w))
            layer.bias.copy_(torch.as_tensor(b))
        layers.append(layer)
        if i < len(weights) - 1:
            layers.append(torch.nn.Tanh() if activation == "tanh" else torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def jax_mlp(
    weights: Sequence[Any],
    biases: Sequence[Any],
    activation: str = "tanh",
    *,
    layout: str = "tuple",
) -> tuple[Callable[[Any, Any], Any], list[Any]]:
    """``(apply_fn, params)`` for the JAX adapter, holding copies of the host weights.

    ``layout="tuple"``: ``params = [(W, b), ...]`` (flattened like NumPy and torch);
    ``layout="dict"``: ``params = [{"w": W, "b": b}, ...]`` (flattened ``b`` first).
    """
    pytest.importorskip("jax")
    import jax.numpy as jnp

    _check_activation(activation)
    if layout not in ("tuple", "dict"):
        msg = f"layout must be 'tuple' or 'dict'; got {layout!r}"
        raise ValueError(msg)
    pairs = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(weights, biases, strict=True)]
    params: list[Any] = pairs if layout == "tuple" else [{"w": w, "b": b} for w, b in pairs]

    def act(h: Any) -> Any:
        return jnp.tanh(h) if activation == "tanh" else jnp.maximum(h, 0.0)

    def apply_fn(p: Any, x: Any) -> Any:
        for i, layer in enumerate(p):
            w, b = (layer["w"], layer["b"]) if isinstance(layer, dict) else layer
            x = x @ w.T + b
            if i < len(p) - 1:
                x = act(x)
        return x

    return apply_fn, params


def jax_dict_order(blocks: Sequence[Any]) -> np.ndarray:
    """Permutation from the NumPy layout ``(W, b)`` per layer to ``jax_mlp(layout="dict")``'s.

    ``blocks`` are the NumPy model's blocks (``MLP.blocks``: W and b of each layer in turn).
    """
    order: list[int] = []
    for blk_w, blk_b in zip(blocks[0::2], blocks[1::2]):
        order += list(range(blk_b.offset, blk_b.offset + blk_b.size))
        order += list(range(blk_w.offset, blk_w.offset + blk_w.size))
    return np.array(order)
