"""The torch adapter's shared set-up: validation and the functional call of a module.

Private to ``fisherbound.adapters.torch`` (the linearization) and its loss
function: the checks of the model, the inputs and the parameter selection with
their house messages, the operand check, and ``FunctionalModel``, a module called
functionally at a selection of its parameters.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch  # noqa: TID253
from torch import nn  # noqa: TID253
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: TID253
from torch.nn.modules.dropout import _DropoutNd  # noqa: TID253

from fisherbound.linearization import make_blocks

Tensor = torch.Tensor

_JVP_READY = False


def check_tensor_operand(
    x: object,
    name: str,
    shape: tuple[int | None, ...],
    what: str,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``x`` if it is a tensor of ``shape`` (None: any size), ``dtype`` and ``device``."""
    if not isinstance(x, torch.Tensor):
        msg = (
            f"{name} must be a torch.Tensor of shape {what}; got "
            f"{type(x).__module__}.{type(x).__name__}. Convert with torch.as_tensor(...)."
        )
        raise TypeError(msg)
    if x.ndim != len(shape) or any(s is not None and x.shape[i] != s for i, s in enumerate(shape)):
        msg = f"{name} must have shape {what}; got {tuple(x.shape)}."
        raise ValueError(msg)
    if x.dtype != dtype:
        msg = (
            f"{name} must have the parameters' dtype {dtype}; got {x.dtype}. "
            f"Convert with {name}.to({dtype})."
        )
        raise TypeError(msg)
    if x.device != device:
        msg = (
            f"{name} must be on the parameters' device {device}; got "
            f"{x.device}. Move it with {name}.to({str(device)!r})."
        )
        raise ValueError(msg)
    return x


def ensure_forward_ad() -> None:
    # torch loads its forward-AD decompositions lazily on the first jvp, through
    # torch.jit.script, which emits a DeprecationWarning on recent versions.
    global _JVP_READY
    if not _JVP_READY:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch._decomp.decompositions_for_jvp  # noqa: F401
        _JVP_READY = True


@contextlib.contextmanager
def transformable() -> Iterator[None]:
    """Run a forward pass that torch.func can transform in every mode.

    The fused inference kernels of ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` and the flash / memory-efficient attention
    kernels support neither forward-mode AD nor vmap; the math kernel does.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# ---------------------------------------------------------------------------
# Validation of the model, the inputs and the parameter selection
# ---------------------------------------------------------------------------


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        got = f"{type(model).__module__}.{type(model).__name__}"
        msg = f"model must be a torch.nn.Module; got {got}."
        raise TypeError(msg)
    return model


def as_inputs(inputs: object) -> tuple[Tensor, ...]:
    items = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    if not items:
        msg = "inputs must be a tensor or a non-empty tuple of tensors; got an empty sequence."
        raise ValueError(msg)
    for i, x in enumerate(items):
        if not isinstance(x, torch.Tensor):
            where = (
                "inputs"
                if len(items) == 1 and not isinstance(inputs, tuple | list)
                else (f"inputs[{i}]")
            )
            msg = (
                f"{where} must be a torch.Tensor (a tuple of tensors is passed as positional "
                f"arguments); got {type(x).__module__}.{type(x).__name__}. Convert with "
                "torch.as_tensor(...)."
            )
            raise TypeError(msg)
    return tuple(x.detach() for x in items)


class Selection(NamedTuple):
    """A module and the parameters θ selected in it, in flat-vector order."""

    model: nn.Module
    names: tuple[str, ...]
    tensors: tuple[Tensor, ...]


def select_parameters(model: nn.Module, params: Sequence[str] | None) -> Selection:
    if params is None:
        chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not chosen:
            total = sum(1 for _ in model.parameters())
            msg = (
                "no parameter selected: the model has no parameter with requires_grad=True "
                f"({total} frozen). Name the parameters to differentiate with params=[...]."
            )
            raise ValueError(msg)
        return Selection(model, tuple(n for n, _ in chosen), tuple(p for _, p in chosen))
    if isinstance(params, str) or not isinstance(params, Iterable):
        msg = (
            "params must be None or a list of parameter names; got "
            f"{type(params).__name__} {params!r}. Write params=[{params!r}] for one name."
        )
        raise TypeError(msg)
    names = list(params)
    if not names:
        msg = "no parameter selected: params is empty. Pass None to select every trainable one."
        raise ValueError(msg)
    every = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        if not isinstance(name, str):
            msg = f"params must contain parameter names (str); got {type(name).__name__} {name!r}."
            raise TypeError(msg)
        if name not in every:
            close = difflib.get_close_matches(name, list(every), n=3)
            hint = (
                f"did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else f"available: {', '.join(repr(c) for c in list(every)[:12])}"
                + (", ..." if len(every) > 12 else "")
                + "."
            )
            msg = f"params names unknown parameter {name!r}; {hint}"
            raise ValueError(msg)
    seen: dict[int, str] = {}
    for name in names:
        key = id(every[name])
        if key in seen:
            if seen[key] == name:
                msg = f"params lists {name!r} twice; list each parameter once."
            else:
                msg = (
                    f"params selects {seen[key]!r} and {name!r}, which are one tied tensor; "
                    "keep one of the two names."
                )
            raise ValueError(msg)
        seen[key] = name
    return Selection(model, tuple(names), tuple(every[n] for n in names))


def check_parameters(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    first_name, first = names[0], tensors[0]
    for name, p in zip(names, tensors, strict=True):
        if not p.is_floating_point():
            msg = (
                f"parameter {name!r} must have a real floating-point dtype; got {p.dtype}. "
                "Leave it out of params."
            )
            raise TypeError(msg)
        if p.dtype != first.dtype:
            msg = (
                "all selected parameters must share one dtype; "
                f"{first_name!r} is {first.dtype} but {name!r} is {p.dtype}. "
                f"Convert the model with model.to({first.dtype})."
            )
            raise TypeError(msg)
        if p.device != first.device:
            msg = (
                "all selected parameters must be on one device; "
                f"{first_name!r} is on {first.device} but {name!r} is on {p.device}. "
                f"Move the model with model.to({str(first.device)!r})."
            )
            raise ValueError(msg)


def check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        label = f"module {name or '<root>'!r} ({type(m).__name__})"
        if isinstance(m, _BatchNorm):
            if m.training:
                msg = (
                    f"{label} is in training mode: it normalises with batch statistics, which "
                    "couple the examples of a batch, and updates its running statistics on "
                    "every call. Call model.eval() first."
                )
                raise ValueError(msg)
            if m.running_mean is None:
                msg = (
                    f"{label} has track_running_stats=False, so it normalises with batch "
                    "statistics even in eval mode, which couples the examples of a batch. "
                    "Use running statistics or a per-example normalisation (LayerNorm, "
                    "GroupNorm)."
                )
                raise ValueError(msg)
        random_dropout = isinstance(m, _DropoutNd) and m.p > 0
        random_attention = isinstance(m, nn.MultiheadAttention) and m.dropout > 0
        if m.training and (random_dropout or random_attention):
            msg = (
                f"{label} is random in training mode (dropout), so the logits are not a "
                "function of the parameters. Call model.eval() first."
            )
            raise ValueError(msg)


def check_inputs_device(inputs: Sequence[Tensor], device: torch.device) -> None:
    for i, x in enumerate(inputs):
        if x.device != device:
            msg = (
                f"inputs must be on the parameters' device {device}; input {i} is on "
                f"{x.device}. Move it with x.to({str(device)!r})."
            )
            raise ValueError(msg)


def check_batch(selection: Selection, inputs: object) -> tuple[Tensor, ...]:
    """The inputs of one batch as detached tensors, checked with the selection.

    The inputs are tensors, the selected parameters share one floating dtype and
    device, the module is deterministic, and the inputs are on that device.
    """
    batch = as_inputs(inputs)
    check_parameters(selection.names, selection.tensors)
    check_deterministic(selection.model)
    check_inputs_device(batch, selection.tensors[0].device)
    return batch


# ---------------------------------------------------------------------------
# The module called functionally
# ---------------------------------------------------------------------------


class FunctionalModel:
    """A module called functionally at a selection of its parameters.

    The set-up shared by linearizations and loss functions: the selected tensors
    (their names, sizes and shapes in flat-vector order), every other parameter as
    a detached constant, and the functional call.
    """

    def _bind(self, selection: Selection, inputs: tuple[Tensor, ...]) -> None:
        model, names, tensors = selection
        self._model = model
        self._inputs = inputs
        self._names = names
        self._primals = tuple(p.detach() for p in tensors)
        self._sizes = tuple(p.numel() for p in tensors)
        self._shapes = tuple(tuple(p.shape) for p in tensors)
        self._param_dtype = tensors[0].dtype
        self._param_device = tensors[0].device
        selected = {id(p) for p in tensors}
        # Every other parameter enters as a constant (no autograd graph for it).
        self._constants = {
            n: p.detach() for n, p in model.named_parameters() if id(p) not in selected
        }
        self._blocks = make_blocks(zip(names, self._shapes, strict=True))

    def _call(self, params: Sequence[Tensor], inputs: tuple[Tensor, ...]) -> Tensor:
        mapping = dict(self._constants)
        mapping.update(zip(self._names, params, strict=True))
        with transformable():
            return torch.func.functional_call(self._model, mapping, inputs)

    def _split(self, v: Tensor, lead: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
        parts = torch.split(v, list(self._sizes), dim=len(lead))
        return tuple(p.reshape(*lead, *s) for p, s in zip(parts, self._shapes, strict=True))

    def _operand(self, x: object, name: str, shape: tuple[int | None, ...], what: str) -> Tensor:
        return check_tensor_operand(x, name, shape, what, self._param_dtype, self._param_device)


def is_tensor_or_text(x: object) -> bool:
    """Whether ``x`` is one batch (a tensor) or text, not an iterable of batches."""
    return isinstance(x, torch.Tensor | str | bytes)
