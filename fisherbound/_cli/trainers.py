"""The demo's model in each framework, and its training.

The same MLP (same initial weights, from ``fisherbound.adapters.numpy.MLP``) as
flat parameters in NumPy, torch or JAX, with the gradient of its mean
cross-entropy and the report's ``Subject`` of the trained weights; ``train``
runs Adam on it with the same mini-batches in every framework.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fisherbound._lib import close_bar
from fisherbound._report.subjects import Subject, jax_subject, numpy_subject, torch_subject
from fisherbound._report.timing import progress_bar

Array = Any


@dataclass
class Trainer:
    """One framework's version of the demo MLP: flat parameters, gradient, subject."""

    theta: Array
    gradient: Callable[[Array, Any, Any], Array]  # (θ, x host, y host) → ∇ mean loss
    subject: Callable[[Array], Subject]


def numpy_trainer(init: Any, description: str) -> Trainer:
    """The demo MLP as the NumPy reference model (``fisherbound.adapters.numpy``)."""
    from fisherbound.adapters.numpy import loss_function

    def gradient(theta: Array, x: Any, y: Any) -> Array:
        model = init.with_parameters(theta)
        return loss_function(model, x, y, reduction="mean").gradient()

    return Trainer(
        init.parameters(),
        gradient,
        lambda theta: numpy_subject(init.with_parameters(theta), description=description),
    )


def torch_trainer(init: Any, description: str) -> Trainer:
    """The demo MLP as an ``nn.Sequential`` of float64 ``nn.Linear`` and ``nn.Tanh``."""
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(zip(init.weights, init.biases, strict=True)):
        linear = nn.Linear(int(w.shape[1]), int(w.shape[0])).double()
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w))
            linear.bias.copy_(torch.as_tensor(b))
        layers.append(linear)
        if i < len(init.weights) - 1:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    params = list(model.parameters())

    def gradient(theta: Array, x: Any, y: Any) -> Array:
        nn.utils.vector_to_parameters(theta, params)
        z = model(torch.as_tensor(x))
        loss = nn.functional.cross_entropy(z, torch.as_tensor(y))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    def subject(theta: Array) -> Subject:
        nn.utils.vector_to_parameters(theta.detach().clone(), params)
        model.eval()
        return torch_subject(model, description=description)

    theta0 = nn.utils.parameters_to_vector(params).detach().clone()
    return Trainer(theta0, gradient, subject)


def jax_trainer(init: Any, description: str) -> Trainer:
    """The demo MLP as a JAX function of a parameter pytree (float64: needs x64)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    last = len(init.weights) - 1

    def apply_fn(params: Any, x: Any) -> Any:
        h = x
        for i, layer in enumerate(params["layers"]):
            h = h @ layer["weight"].T + layer["bias"]
            if i < last:
                h = jnp.tanh(h)
        return h

    params0 = {
        "layers": [
            {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
            for w, b in zip(init.weights, init.biases, strict=True)
        ]
    }
    theta0, unravel = ravel_pytree(params0)

    @jax.jit
    def grad_fn(theta: Any, x: Any, y: Any) -> Any:
        def loss(t: Any) -> Any:
            logp = jax.nn.log_softmax(apply_fn(unravel(t), x))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        return jax.grad(loss)(theta)

    return Trainer(
        theta0,
        lambda theta, x, y: grad_fn(theta, jnp.asarray(x), jnp.asarray(y)),
        lambda theta: jax_subject(apply_fn, unravel(theta), description=description),
    )


TRAINERS = {"numpy": numpy_trainer, "torch": torch_trainer, "jax": jax_trainer}


def fit(
    trainer: Trainer, x: Any, y: Any, args: argparse.Namespace, progress: bool | None
) -> tuple[Array, int]:
    """Adam on the mean cross-entropy, mini-batches of a fixed size (partial ones dropped)."""
    import numpy as np

    from fisherbound._lib import array_namespace

    theta = trainer.theta
    xp = array_namespace(theta)
    m, v = xp.zeros_like(theta), xp.zeros_like(theta)
    b1, b2, lr = 0.9, 0.999, args.learning_rate
    n = int(x.shape[0])
    size = min(args.batch_size, n)
    per_epoch = n // size
    rng = np.random.default_rng(args.seed + 1)
    bar = progress_bar(args.epochs * per_epoch, "training", progress)
    step = 0
    for _ in range(args.epochs):
        order = rng.permutation(n)
        for k in range(per_epoch):
            idx = order[k * size : (k + 1) * size]
            g = trainer.gradient(theta, x[idx], y[idx])
            step += 1
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * (g * g)
            m_hat = m / (1.0 - b1**step)
            v_hat = v / (1.0 - b2**step)
            theta = theta - lr * m_hat / (xp.sqrt(v_hat) + 1e-8)
            if bar is not None:
                bar.update(1)
    close_bar(bar)
    return theta, step


def accuracy_and_loss(subject: Subject, x: Any, y: Any) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``subject`` on host inputs and labels."""
    import numpy as np

    from fisherbound._lib import to_host

    z = np.asarray(to_host(subject.linearize(subject.inputs(x)).logits), dtype=float)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -float(np.mean(logp[np.arange(len(y)), y]))
    return float(np.mean(np.argmax(z, axis=1) == y)), loss


@contextlib.contextmanager
def framework_context(framework: str) -> Iterator[None]:
    """float64 everywhere: JAX needs x64 switched on (only for the demo's run)."""
    if framework == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield
