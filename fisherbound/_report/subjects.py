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

from fisherbound._report.positions import label_rows

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
        (inputs, mask=None) → a linearization (``fisherbound.linearization``);
        ``mask`` (a backend boolean array (N, ∗S), True = the position counts)
        for models whose logits have position axes, (N, ∗S, C).
    loss_function
        (inputs, labels, reduction, mask=None) → a ``LossFunction`` (negative
        log-likelihood over the counted positions; ``"mean"`` divides by their
        number).
    inputs, labels
        Host (NumPy) array → backend array of the model's dtype and device
        (``inputs`` may also be a dict of host arrays: keyword inputs). Labels
        with a class axis (Bernoulli) have it last, as the linearization's logits.
    """

    framework: str
    description: str
    family: Any
    linearize: Callable[..., Any]
    loss_function: Callable[..., Any]
    inputs: Callable[[Any], Any]
    labels: Callable[[Any], Array]


def numpy_subject(model: Any, *, family: Any = None, description: str | None = None) -> Subject:
    """A NumPy reference model (``fisherbound.adapters.numpy.MLP`` or ``LinearSoftmax``)."""
    import numpy as np

    from fisherbound.adapters import numpy as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family

    def no_mask(mask: Any) -> None:
        if mask is not None:
            msg = "the NumPy reference models have no position axes to mask; got a mask."
            raise ValueError(msg)

    def linearize(x: Any, mask: Any = None) -> Any:
        no_mask(mask)
        return adapter.linearize(model, x)

    def loss_function(x: Any, y: Any, reduction: str, mask: Any = None) -> Any:
        no_mask(mask)
        return adapter.loss_function(model, x, y, family=fam, reduction=reduction)

    return Subject(
        framework="numpy",
        description=repr(model) if description is None else description,
        family=fam,
        linearize=linearize,
        loss_function=loss_function,
        inputs=lambda a: np.asarray(a, dtype=model.dtype),
        labels=lambda a: np.asarray(a),
    )


def torch_subject(
    model: Any,
    *,
    family: Any = None,
    params: Sequence[str] | None = None,
    description: str | None = None,
    output: Any = None,
    class_axis: int = -1,
) -> Subject:
    """A ``torch.nn.Module`` (in eval mode) through ``fisherbound.adapters.torch``.

    Floating inputs are cast to the dtype of the first selected parameter; integer
    inputs (token ids) are kept; a dict of host arrays becomes keyword inputs.
    Categorical labels become int64, Bernoulli labels the parameters' dtype.
    ``output`` and ``class_axis`` say where the logits are in the model's output
    (as in ``fisherbound.adapters.torch.linearize``); the labels the subject is
    given have their class axis last, as the linearization's logits, and are
    moved back to ``class_axis`` for the loss. Masked positions (``mask``) count
    nowhere: not in the Fisher quantities, not in the loss (``ignore_index`` is
    left to the caller, who folds it into the mask).
    """
    import numpy as np
    import torch

    from fisherbound.adapters import torch as adapter
    from fisherbound.families import Categorical

    fam = Categorical() if family is None else family
    named = dict(model.named_parameters())
    first = named[params[0]] if params else next(iter(named.values()))
    dtype, device = first.dtype, first.device
    # The analysed parameters and where the logits are: one for linearizations and losses.
    options: dict[str, Any] = {
        "params": None if params is None else list(params),
        "output": output,
        "class_axis": class_axis,
    }
    categorical = isinstance(fam, Categorical)

    def tensor(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def inputs(a: Any) -> Any:
        if isinstance(a, dict):
            return {k: tensor(v) for k, v in a.items()}
        return tensor(a)

    def labels(a: Any) -> Any:
        t = torch.as_tensor(np.asarray(a))
        t = t.to(dtype) if label_rows(fam, a) else t.to(torch.int64)
        return t.to(device)

    def linearize(x: Any, mask: Any = None) -> Any:
        return adapter.linearize(model, x, mask=mask, **options)

    def loss_function(x: Any, y: Any, reduction: str, mask: Any = None) -> Any:
        rows = not categorical or y.is_floating_point()
        if rows and class_axis not in (-1, y.ndim - 1):
            y = torch.movedim(y, -1, class_axis)  # the model output's layout
        return adapter.loss_function(
            model, x, y, family=fam, reduction=reduction, mask=mask, ignore_index=None, **options
        )

    return Subject(
        framework="torch",
        description=(type(model).__name__ if description is None else description),
        family=fam,
        linearize=linearize,
        loss_function=loss_function,
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
        return jnp.asarray(host, dtype) if label_rows(fam, host) else jnp.asarray(host)

    def linearize(x: Any, mask: Any = None) -> Any:
        if mask is None:
            return adapter.linearize(apply_fn, params, x)
        return adapter.linearize(apply_fn, params, x, mask=mask)

    def loss_function(x: Any, y: Any, reduction: str, mask: Any = None) -> Any:
        if mask is None:
            return adapter.loss_function(apply_fn, params, x, y, family=fam, reduction=reduction)
        return adapter.loss_function(
            apply_fn, params, x, y, family=fam, reduction=reduction, mask=mask, ignore_index=None
        )

    return Subject(
        framework="jax",
        description=description,
        family=fam,
        linearize=linearize,
        loss_function=loss_function,
        inputs=lambda a: jnp.asarray(np.asarray(a), dtype=dtype),
        labels=labels,
    )
