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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch  # noqa: TID253
from torch import nn  # noqa: TID253
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: TID253
from torch.nn.modules.dropout import _DropoutNd  # noqa: TID253

from fisherbound._finite import check_inputs_finite, check_parameters_finite
from fisherbound._lib import HALF_PRECISION, check_materialized
from fisherbound._shell import MaskWords, check_mask_array
from fisherbound._shell import check_mask_spec as _check_mask_spec
from fisherbound.linearization import make_blocks, mask_source

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
        msg = (
            f"model must be a torch.nn.Module, or a function f(params, *inputs) with "
            f"params= a dict of tensors; got {got}."
        )
        raise TypeError(msg)
    return model


_FUNCTION_REASON = "a function model's tensor (its layers are not modules)"


class _Holder(nn.Module):
    """The holder of a function model's tensors under a dotted prefix."""

    no_fast_rule = _FUNCTION_REASON


class FunctionModel(nn.Module):
    """A function ``f(params, *args, **kwargs)`` of a dict of tensors, as a module.

    ``torch.func.functional_call`` style (curvlinops' ``model_func``): the
    parameters are the values of ``params``, registered under their keys (a
    dotted key ``"0.weight"`` as parameter ``weight`` of an empty submodule
    ``"0"``), so ``named_parameters()`` gives the keys, in order, and every
    module path of the adapter applies. ``buffers`` (optional) are registered
    the same way as buffers: state that ``f`` reads and is never differentiated
    (running statistics, frozen weights, masks). ``forward`` hands ``f`` the
    current tensors (swapped in by ``functional_call``) in one dict, the keys of
    ``params`` then those of ``buffers``, as ``functional_call``'s
    ``parameters_and_buffers``.
    The layers inside ``f`` are not modules, so the fast exact diagonal does not
    see them: every parameter takes the generic per-example path
    (``fast_path_reasons`` says so), and the module checks (BatchNorm or Dropout
    in training mode, the landscape's kinked modules) cannot see inside ``f``
    either; only the repeated-forward check of a random output applies.
    Two keys holding one tensor are two parameters, as for ``functional_call``.
    """

    no_fast_rule = _FUNCTION_REASON

    def __init__(
        self,
        function: Callable[..., Any],
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self._fb_function = function
        self._fb_keys = tuple(params)
        self._fb_buffer_keys = tuple(buffers or {})
        for key, value in params.items():
            self._place(key, "params", nn.Parameter(value.detach(), requires_grad=True))
        for key, value in (buffers or {}).items():
            self._place(key, "buffers", value.detach())
        self.eval()

    def _place(self, key: str, argument: str, value: Tensor) -> None:
        """Register ``value`` under the dotted ``key`` (a parameter or a buffer)."""
        *path, leaf = key.split(".")
        owner: nn.Module = self
        try:
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = _Holder()
                    owner.add_module(part, child)
                owner = child
            if isinstance(value, nn.Parameter):
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value)
        except KeyError as err:  # a name taken: torch's own ("to", "eval") or another key's
            msg = (
                f"{argument} key {key!r} cannot name a tensor: {err.args[0]} (keys may not be "
                "torch.nn.Module attributes, nor a prefix or a copy of another key of params "
                "or buffers)."
            )
            raise TypeError(msg) from err

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``f({key: current tensor}, *args, **kwargs)``, parameters then buffers."""
        current: dict[str, Tensor] = dict(self.named_parameters(remove_duplicate=False))
        current.update(self.named_buffers(remove_duplicate=False))
        keys = self._fb_keys + self._fb_buffer_keys
        return self._fb_function({k: current[k] for k in keys}, *args, **kwargs)


def resolve_model(model: object, params: object, buffers: object = None) -> tuple[nn.Module, Any]:
    """(module, params) for the fronts: a module as it is, a function wrapped.

    A function ``model`` needs ``params``, a non-empty dict from str keys (no
    empty dotted segment) to floating tensors; the result selects all of them,
    in the dict's order. ``buffers``: None, or for a function a dict from such
    keys to tensors (any dtype), never differentiated.
    """
    if isinstance(model, nn.Module) or not callable(model):
        if isinstance(params, Mapping):
            msg = (
                "params must be None or a list of parameter names for a torch.nn.Module; got "
                "a dict (that form is for a function model f(params, *inputs))."
            )
            raise TypeError(msg)
        if buffers is not None:
            msg = (
                "buffers must be None for a torch.nn.Module (its buffers are its own); got "
                f"{type(buffers).__name__}. buffers= is for a function model f(params, *inputs)."
            )
            raise TypeError(msg)
        return check_model(model), params
    if not isinstance(params, Mapping) or not params:
        got = type(params).__name__ if not isinstance(params, Mapping) else "an empty dict"
        msg = (
            "params must be a non-empty dict of tensors (name -> torch.Tensor) when model "
            f"is a function f(params, *inputs); got {got}."
        )
        raise TypeError(msg)
    _check_tensor_dict(params, "params", floating=True)
    if buffers is not None and not isinstance(buffers, Mapping):
        msg = (
            "buffers must be None or a dict of tensors (name -> torch.Tensor); got "
            f"{type(buffers).__name__}."
        )
        raise TypeError(msg)
    _check_tensor_dict(buffers or {}, "buffers", floating=False)
    return FunctionModel(model, params, buffers), list(params)  # θ in the dict's order


def _check_tensor_dict(tensors: Mapping[Any, Any], argument: str, *, floating: bool) -> None:
    """Keys that name tensors (str, no empty dotted part), values torch tensors.

    ``floating``: the values must also be floating-point (parameters).
    """
    kind = "floating-point torch tensors" if floating else "torch tensors"
    for key, value in tensors.items():
        if not isinstance(key, str) or "" in key.split("."):
            msg = (
                f"{argument} keys must be names (str, no empty dotted part) for a function "
                f"model; got {key!r}."
            )
            raise TypeError(msg)
        if not isinstance(value, torch.Tensor) or (floating and not value.is_floating_point()):
            what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else None
            msg = (
                f"{argument} must map names to {kind} for a function model; "
                f"{argument}[{key!r}] is {what or type(value).__name__}."
            )
            raise TypeError(msg)


class Inputs(NamedTuple):
    """The inputs of one batch: positional and keyword tensors, examples on axis 0."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]

    def items(self) -> list[tuple[str, Tensor]]:
        """(how a message names it, tensor) for every input, positional first."""
        named = [(f"inputs[{i}]", x) for i, x in enumerate(self.args)]
        return named + [(f"inputs[{k!r}]", x) for k, x in self.kwargs.items()]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Inputs:
        """The inputs with ``fn`` applied to every tensor."""
        return Inputs(tuple(fn(x) for x in self.args), {k: fn(x) for k, x in self.kwargs.items()})

    @property
    def leading(self) -> int:
        """The size of axis 0 shared by every input (``as_inputs`` checked it)."""
        return int(next(x for _, x in self.items()).shape[0])


def as_inputs(inputs: object) -> Inputs:
    """The inputs of one batch as detached tensors: a tensor, a tuple/list or a dict.

    A tuple or list is passed as positional arguments, a dict (str keys) as
    keyword arguments. Every tensor has the examples on axis 0, all with the same
    number of rows (the logits may still put them elsewhere, see the per-example
    products).
    """
    if isinstance(inputs, Mapping):
        if not inputs:
            msg = "inputs must be a tensor, a tuple or a dict of tensors; got an empty dict."
            raise ValueError(msg)
        for key, x in inputs.items():
            if not isinstance(key, str):
                msg = (
                    "inputs must be a dict with str keys (the keyword arguments of the model); "
                    f"got key {key!r} of type {type(key).__name__}."
                )
                raise TypeError(msg)
            if not isinstance(x, torch.Tensor):
                msg = (
                    f"inputs[{key!r}] must be a torch.Tensor (a dict of tensors is passed as "
                    f"keyword arguments); got {type(x).__module__}.{type(x).__name__}. "
                    "Convert with torch.as_tensor(...) or leave it out of the dict."
                )
                raise TypeError(msg)
        batch = Inputs((), {k: x.detach() for k, x in inputs.items()})
    else:
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
        batch = Inputs(tuple(x.detach() for x in items), {})
    _check_leading(batch, single=isinstance(inputs, torch.Tensor))
    return batch


def _check_leading(batch: Inputs, *, single: bool) -> None:
    first_name, first = batch.items()[0]
    for name, x in batch.items():
        where = "inputs" if single else name
        if x.ndim == 0:
            msg = (
                f"{where} must hold the examples on axis 0; got a 0-d tensor. Give it a "
                "leading axis of N rows (x.expand(N, ...)) or make it a module buffer."
            )
            raise ValueError(msg)
        if x.shape[0] != first.shape[0]:
            msg = (
                "inputs must all hold the same N examples on axis 0; "
                f"{first_name} has {first.shape[0]} rows but {name} has {x.shape[0]} "
                f"(shapes {tuple(first.shape)} and {tuple(x.shape)})."
            )
            raise ValueError(msg)


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
        check_materialized(p, f"parameter {name!r}")
        if not p.is_floating_point():
            msg = (
                f"parameter {name!r} must have a real floating-point dtype; got {p.dtype}. "
                "Leave it out of params."
            )
            raise TypeError(msg)
        if p.dtype in (torch.float16, torch.bfloat16):
            msg = (
                f"parameter {name!r} must be float32 or float64; got {p.dtype}. {HALF_PRECISION} "
                "Convert the model with model.float() (inputs too)."
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


def check_inputs_device(inputs: Inputs, device: torch.device) -> None:
    for i, (name, x) in enumerate(inputs.items()):
        if x.device != device:
            which = f"input {i}" if i < len(inputs.args) else f"input {name[7:-1]}"
            msg = (
                f"inputs must be on the parameters' device {device}; {which} is on "
                f"{x.device}. Move it with x.to({str(device)!r})."
            )
            raise ValueError(msg)


def check_batch(selection: Selection, inputs: object, *, parameters: bool = True) -> Inputs:
    """The inputs of one batch as detached tensors, checked with the selection.

    The inputs are tensors (a tensor, a tuple/list or a dict of them) sharing the
    size of axis 0, the selected parameters share one floating dtype and device,
    the module is deterministic, and the inputs are on that device and finite. With
    ``parameters`` the selected parameters are checked finite too (one pass over
    them): every ``linearize`` / ``loss_function`` call, and the first batch of
    each stream (a later optimiser step, fused or not, is seen by the next call).
    """
    batch = as_inputs(inputs)
    check_parameters(selection.names, selection.tensors)
    check_deterministic(selection.model)
    check_inputs_device(batch, selection.tensors[0].device)
    if parameters:  # a stream checks them on its first batch (same θ for every batch)
        check_parameters_finite(list(zip(selection.names, selection.tensors, strict=True)))
    check_inputs_finite(batch.items())
    return batch


# ---------------------------------------------------------------------------
# The outputs: selector, class axis, mask
# ---------------------------------------------------------------------------

#: What ``output=`` accepts.
OutputSelector = str | int | Callable[[Any], Any] | None


class OutputSpec(NamedTuple):
    """How the logits come out of the model's output: the selector and the class axis."""

    output: OutputSelector = None
    class_axis: int = -1


def check_output_options(output: object, class_axis: object) -> OutputSpec:
    """``OutputSpec(output, class_axis)`` after checking their types and class_axis != 0."""
    if isinstance(output, bool) or not (
        output is None or isinstance(output, str | int) or callable(output)
    ):
        msg = (
            "output must be None, a str (dict key or attribute, e.g. 'logits'), an int "
            f"(index into a tuple output) or a callable out -> logits; got "
            f"{type(output).__name__} {output!r}."
        )
        raise TypeError(msg)
    if isinstance(class_axis, bool) or not isinstance(class_axis, int):
        msg = f"class_axis must be an int (default -1); got {type(class_axis).__name__}."
        raise TypeError(msg)
    if class_axis == 0:
        msg = (
            "class_axis must not be 0: axis 0 of the model output holds the N examples; got "
            "class_axis=0. Use -1 for (N, ..., C) outputs or 1 for (N, C, ...) outputs."
        )
        raise ValueError(msg)
    return OutputSpec(output, class_axis)


def _describe(out: object) -> str:
    """What came out of the model, and its keys / attributes, for selector messages."""
    what = f"{type(out).__module__}.{type(out).__name__}"
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:12])
        return f"{what} with keys [{keys}]"
    if isinstance(out, tuple | list):
        kinds = ", ".join(
            f"{i}: tensor {tuple(x.shape)}"
            if isinstance(x, torch.Tensor)
            else f"{i}: {type(x).__name__}"
            for i, x in enumerate(out[:12])
        )
        return f"{what} of length {len(out)} ({kinds})"
    attrs = [
        a
        for a in dir(out)
        if not a.startswith("_") and isinstance(getattr(out, a, None), torch.Tensor)
    ]
    return f"{what} with tensor attributes [{', '.join(repr(a) for a in attrs[:12])}]"


def select_output(out: object, output: OutputSelector) -> Any:
    """The logits picked from the model output ``out`` by the selector ``output``.

    None: ``out`` itself; a str: the key (``out`` a Mapping holding it) or else the
    attribute; an int: ``out[index]`` of a tuple or list; a callable: ``output(out)``.
    A selector that finds nothing raises a ValueError naming ``output``, what came
    and its keys / attributes. Whether the result is a tensor of logits is checked
    by the caller.
    """
    if output is None:
        return out
    if isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if not isinstance(out, Mapping | torch.Tensor) and hasattr(out, output):
            got = getattr(out, output)
            if got is not None:
                return got
        msg = (
            f"output={output!r} selects nothing from the model output: got {_describe(out)}. "
            "Name one of its keys or attributes."
        )
        raise ValueError(msg)
    if isinstance(output, int):
        if isinstance(out, tuple | list) and -len(out) <= output < len(out):
            return out[output]
        msg = (
            f"output={output!r} selects nothing from the model output: got {_describe(out)}. "
            "An int selects an element of a tuple or list output."
        )
        raise ValueError(msg)
    return output(out)


def class_axis_index(class_axis: int, shape: tuple[int, ...]) -> int:
    """The non-negative class axis of an output of ``shape``; never 0, always in range."""
    ndim = len(shape)
    if not -ndim <= class_axis < ndim:
        msg = (
            f"class_axis must be an axis of the model output of shape {shape} "
            f"(between {-ndim} and {ndim - 1}, not 0); got {class_axis}."
        )
        raise ValueError(msg)
    axis = class_axis % ndim
    if axis == 0:
        msg = (
            f"class_axis={class_axis} is axis 0 of the model output of shape {shape}, which "
            "holds the N examples; the classes must be on another axis."
        )
        raise ValueError(msg)
    return axis


def classes_last(z: Tensor, class_axis: int) -> Tensor:
    """``z`` with its class axis moved last (a view; nothing to do for the last axis)."""
    axis = class_axis_index(class_axis, tuple(z.shape))
    return z if axis == z.ndim - 1 else torch.movedim(z, axis, -1)


#: What ``mask=`` accepts: a boolean tensor, a key of dict inputs or inputs -> mask.
MaskSpec = Tensor | str | Callable[[Any], Any] | None


def without_key(inputs: Any, label_key: str | None) -> Any:
    """Dict inputs without the entry ``label_key`` (the labels of a collated batch)."""
    if label_key is not None and isinstance(inputs, Mapping) and label_key in inputs:
        return {k: v for k, v in inputs.items() if k != label_key}
    return inputs


def resolve_mask(mask: MaskSpec, raw_inputs: object, z: Tensor) -> Tensor | None:
    """The boolean (N, ∗S) mask of one batch whose logits (classes last) are ``z``.

    ``mask`` is None (every position counts), a boolean tensor (or 0/1 integers),
    a key of dict ``raw_inputs`` (the entry, converted with ``!= 0``) or a callable
    ``raw_inputs -> mask`` (a bool tensor, or values converted with ``!= 0``);
    ``check_mask_array`` checks it (the house messages, in torch's words).
    """
    if mask is None:
        return None
    value, where = mask_source(mask, raw_inputs, is_array=_is_tensor)
    checked = check_mask_array(value, where, z, nonzero=where != "mask", words=_MASK_WORDS)
    return checked.detach()


def _is_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor)


#: The torch names in the shared mask checks' messages.
_MASK_WORDS = MaskWords(
    _is_tensor, "torch.Tensor", "mask.bool() or mask != 0", "Move it with mask.to({device!r})."
)


def check_mask_spec(mask: object, *, stream: bool = False) -> MaskSpec:
    """``mask`` if it is None, a tensor, a str or a callable; else a TypeError."""
    return _check_mask_spec(mask, _MASK_WORDS, stream=stream)


def apply_mask(z: Tensor, mask: Tensor | None) -> Tensor:
    """``z`` with the same values but no derivative at masked positions.

    where(mask[..., None], z, z.detach()): the Jacobian rows of positions where
    ``mask`` is False are zero under every transform (jvp, vjp, vmap).
    """
    if mask is None:
        return z
    return torch.where(mask.unsqueeze(-1), z, z.detach())


# ---------------------------------------------------------------------------
# The module called functionally
# ---------------------------------------------------------------------------


class FunctionalModel:
    """A module called functionally at a selection of its parameters.

    The set-up shared by linearizations and loss functions: the selected tensors
    (their names, sizes and shapes in flat-vector order), every other parameter as
    a detached constant, the functional call and the logits picked from its
    output (selector, class axis moved last, mask).
    """

    _spec: OutputSpec = OutputSpec()

    @property
    def output(self) -> Any:
        """The output selector (None, a str, an int or a callable; see ``linearize``)."""
        return self._spec.output

    @property
    def class_axis(self) -> int:
        """The class axis of the model's output, moved last in ``logits``."""
        return self._spec.class_axis

    def _bind(self, selection: Selection, inputs: Inputs, spec: OutputSpec | None = None) -> None:
        model, names, tensors = selection
        self._model = model
        self._batch = inputs
        self._inputs = inputs.args  # the positional inputs, as ``model(*lin._inputs)``
        self._spec = spec if spec is not None else OutputSpec()
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

    def _suspects(self) -> tuple[Tensor, list[tuple[str, Tensor]]]:
        """(flat θ, named inputs): what the message of a failed finite check reads."""
        return torch.cat([p.reshape(-1) for p in self._primals]), self._batch.items()

    def _call(self, params: Sequence[Tensor], inputs: Inputs) -> Any:
        """The model's raw output at ``params``."""
        mapping = dict(self._constants)
        mapping.update(zip(self._names, params, strict=True))
        with transformable():
            return torch.func.functional_call(self._model, mapping, inputs.args, inputs.kwargs)

    def _z(
        self,
        params: Sequence[Tensor],
        inputs: Inputs,
        mask: Tensor | None = None,
        check: Callable[[Any], None] | None = None,
    ) -> Tensor:
        """The logits (N, ∗S, C) at ``params``: selected, classes last, ``mask`` applied.

        ``check`` sees the selected output before its class axis moves.
        """
        if check is None:
            raw = self._call(params, inputs)
        else:  # the first call, at build: the model's own errors become house errors
            before = rng_states(self._param_device)
            try:
                raw = self._call(params, inputs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                raise call_error(err, inputs, self._param_dtype) from err
            except TypeError as err:  # the call's signature: how the inputs were passed
                raise signature_error(err, inputs) from err
        out = select_output(raw, self._spec.output)
        if check is not None:
            check(out)
            after = rng_states(self._param_device)
            if not all(map(torch.equal, before, after)):  # it drew random numbers: random?
                self._check_repeatable(out, params, inputs)
        return apply_mask(classes_last(out, self._spec.class_axis), mask)

    def _check_repeatable(self, out: Tensor, params: Sequence[Tensor], inputs: Inputs) -> None:
        """A second forward pass must give the same output (a model that drew random numbers).

        Cost: one more forward pass, only for a model that used torch's random
        generator in its forward pass (functional dropout, noise layers).
        """
        with torch.no_grad():
            again = select_output(self._call(params, inputs), self._spec.output)
        if torch.equal(again, out.detach()):
            return
        diff = float((again - out.detach()).abs().max())
        msg = (
            "model must be a deterministic function of its parameters; two forward passes "
            f"on the same batch drew random numbers and disagree (max |difference| {diff:.3g}). "
            "Something in forward is random in training mode (torch.nn.functional.dropout "
            "with training=True, noise); call model.eval() and make it follow self.training."
        )
        raise ValueError(msg)

    def _split(self, v: Tensor, lead: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
        parts = torch.split(v, list(self._sizes), dim=len(lead))
        return tuple(p.reshape(*lead, *s) for p, s in zip(parts, self._shapes, strict=True))

    def _operand(self, x: object, name: str, shape: tuple[int | None, ...], what: str) -> Tensor:
        return check_tensor_operand(x, name, shape, what, self._param_dtype, self._param_device)

    def _output_check(self, what: str = "logits") -> Callable[[Any], None]:
        """The check of the selected model output (tensor, rank >= 2, floating, dtype)."""
        return lambda out: check_output_tensor(out, self._spec, self._param_dtype, what)


def rng_states(device: torch.device) -> list[Tensor]:
    """The states of torch's default random generators on the CPU and ``device``.

    Compared before and after the first forward pass: a change means the model
    drew random numbers. Cost: a copy of a few kilobytes.
    """
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def call_error(err: RuntimeError, inputs: Inputs, dtype: torch.dtype) -> Exception:
    """A TypeError / ValueError naming ``inputs`` for the model's failure on them.

    Floating input tensors in another dtype than the parameters give a TypeError
    (torch's "mat1 and mat2 must have the same dtype"); anything else a ValueError
    with the inputs' shapes and dtypes and torch's message (a wrong width, a wrong
    number of axes, ...).
    """
    leaves = torch.utils._pytree.tree_leaves((inputs.args, inputs.kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    seen = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors[:4])
    floating = {t.dtype for t in tensors if t.is_floating_point()}
    if floating - {dtype}:
        return TypeError(
            f"inputs must have the model's parameter dtype {dtype}; got {seen}. Convert "
            f"them with x.to({dtype}) (or the model with model.to(x.dtype)). The model "
            f"raised: {err}"
        )
    if "dtype" in str(err) and any(not t.is_floating_point() for t in tensors):
        return TypeError(
            f"the model cannot take integer inputs ({seen}) where it multiplies them with "
            f"its {dtype} parameters; convert them with x.to({dtype}) unless the model "
            f"embeds them. The model raised: {err}"
        )
    return ValueError(
        f"model(inputs) raised {type(err).__name__} on inputs {seen}: {err}. Check that "
        "the inputs have the shape the model expects (e.g. the width of its first layer)."
    )


def signature_error(err: TypeError, inputs: Inputs) -> TypeError:
    """A TypeError saying how inputs are passed, for a model that cannot take them."""
    parts = [f"{len(inputs.args)} positional"] if inputs.args else []
    parts += [f"keywords {sorted(inputs.kwargs)}"] if inputs.kwargs else []
    msg = (
        f"model(inputs) raised TypeError with {' and '.join(parts)} input tensor(s): {err}. "
        "A tensor is passed as model(x), a tuple or list of tensors as positional "
        "arguments model(x1, x2, ...), a dict as keyword arguments model(**inputs); pass "
        "the inputs the model's forward takes."
    )
    return TypeError(msg)


def check_output_tensor(out: object, spec: OutputSpec, dtype: torch.dtype, what: str) -> None:
    """``out`` is a non-empty floating tensor in ``dtype`` with at least 2 axes."""
    if not isinstance(out, torch.Tensor):
        hint = (
            "Wrap the model in a module that returns the logits, or select them with "
            "output=... (a key, an attribute, an index or a callable)."
            if spec.output is None
            else f"output={spec.output!r} must select a tensor."
        )
        msg = (
            f"model(inputs) must return a tensor of {what} of shape (N, C) or (N, ..., C); "
            f"got {type(out).__name__}. {hint}"
        )
        raise ValueError(msg)
    if out.ndim < 2 or 0 in tuple(out.shape):
        msg = (
            f"model(inputs) must return {what} of shape (N, C) or (N, ..., C), at least "
            f"2-D and non-empty; got shape {tuple(out.shape)}. Select the outputs with "
            "output=... or in a wrapper module."
        )
        raise ValueError(msg)
    class_axis_index(spec.class_axis, tuple(out.shape))
    if not out.is_floating_point():
        msg = f"model(inputs) must return floating-point {what}; got dtype {out.dtype}."
        raise ValueError(msg)
    if out.dtype != dtype:
        msg = (
            f"model(inputs) must return {what} in the parameters' dtype {dtype}; "
            f"got {out.dtype}. Remove the cast in the model or convert it with "
            f"model.to({out.dtype})."
        )
        raise ValueError(msg)


def is_tensor_or_text(x: object) -> bool:
    """Whether ``x`` is one batch (a tensor or a dict of inputs) or text, not batches."""
    return isinstance(x, torch.Tensor | str | bytes | Mapping)
