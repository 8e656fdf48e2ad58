"""The subject of a report: one trained model seen through one adapter.

A :class:`Subject` is what the analysis needs from a framework: linearizations,
loss functions and the conversion of host (NumPy) arrays into the model's
arrays. ``numpy_subject``, ``torch_subject`` and ``jax_subject`` build one for
the NumPy reference models, a ``torch.nn.Module`` and a JAX function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Array = Any


@dataclass(frozen=True)
class Subject:
    """A trained model seen through one adapter.

    Attributes
    ----------
    framework
        ``"numpy"``, ``"torch"`` or ``"jax"``.
    description
        One line for the report, e.g. ``"MLP 64-32-10 (tanh), float64"``.
    family
        The output family (``Categorical()`` or ``Bernoulli()``).
    linearize
        inputs (backend array) → a linearization (``fisherbound.linearization``).
    loss_function
        (inputs, labels, reduction) → a ``LossFunction`` (negative log-likelihood).
    inputs, labels
        Host (NumPy) array → backend array of the model's dtype and device.
    """

    framework: str
    description: str
    family: Any
    linearize: Callable[[Array], Any]
    loss_function: Callable[[Array, Array, str], Any]
    inputs: Callable[[Any], Array]
    labels: Callable[[Any], Array]


def numpy_subject(model: Any, *, family: Any = None, description: str | None = None) -> Subject:
    """A NumPy reference model (``fisherbound.adapters.numpy.MLP`` or ``LinearSoftmax``)."""
    import numpy as np

    from fisherbound.adapters import numpy as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    return Subject(
        framework="numpy",
        description=repr(model) if description is None else description,
        family=fam,
        linearize=lambda x: adapter.linearize(model, x),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            model, x, y, family=fam, reduction=reduction
        ),
        inputs=lambda a: np.asarray(a, dtype=model.dtype),
        labels=lambda a: np.asarray(a),
    )


def torch_subject(
    model: Any,
    *,
    family: Any = None,
    params: Sequence[str] | None = None,
    description: str | None = None,
) -> Subject:
    """A ``torch.nn.Module`` (in eval mode) through ``fisherbound.adapters.torch``.

    Floating inputs are cast to the dtype of the first selected parameter; integer
    inputs (token ids) are kept. Categorical labels become int64, Bernoulli labels
    the parameters' dtype.
    """
    import numpy as np
    import torch

    from fisherbound.adapters import torch as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    named = dict(model.named_parameters())
    first = named[params[0]] if params else next(iter(named.values()))
    dtype, device = first.dtype, first.device
    names = None if params is None else list(params)

    def inputs(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def labels(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        t = t.to(torch.int64) if isinstance(fam, Categorical) else t.to(dtype)
        return t.to(device)

    return Subject(
        framework="torch",
        description=(type(model).__name__ if description is None else description),
        family=fam,
        linearize=lambda x: adapter.linearize(model, x, params=names),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            model, x, y, family=fam, reduction=reduction, params=names
        ),
        inputs=inputs,
        labels=labels,
    )


def jax_subject(
    apply_fn: Callable[..., Any],
    params: Any,
    *,
    family: Any = None,
    description: str = "JAX function",
) -> Subject:
    """``apply_fn(params, x)`` through ``fisherbound.adapters.jax``.

    Inputs are cast to the parameters' dtype (float64 needs ``jax.enable_x64``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fisherbound.adapters import jax as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    dtype = jax.tree_util.tree_leaves(params)[0].dtype

    def labels(a: Any) -> Any:
        host = np.asarray(a)
        return jnp.asarray(host) if isinstance(fam, Categorical) else jnp.asarray(host, dtype)

    return Subject(
        framework="jax",
        description=description,
        family=fam,
        linearize=lambda x: adapter.linearize(apply_fn, params, x),
        loss_function=lambda x, y, reduction: adapter.loss_function(
            apply_fn, params, x, y, family=fam, reduction=reduction
        ),
        inputs=lambda a: jnp.asarray(np.asarray(a), dtype=dtype),
        labels=labels,
    )
