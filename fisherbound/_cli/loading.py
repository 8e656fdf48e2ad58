"""``fisherbound report``: loading the user's model and data, and checking them.

MODEL is a Python file with a factory, a TorchScript file or a module saved with
``torch.save``; DATA is an ``.npz`` archive of inputs and labels, with keyword
inputs and a mask of the counted positions for models whose logits have
position axes (N, ∗S, C). Every problem is a ``UsageError`` that says what was
found and what to do.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fisherbound._cli.usage import UsageError, first_line
from fisherbound._finite import check_inputs_finite
from fisherbound._report.subjects import Subject
from fisherbound._shell import masked_label_placeholder
from fisherbound.families import Categorical

#: Keys accepted in the DATA .npz file (inputs, labels).
DATA_KEYS = (("x", "y"), ("inputs", "labels"))

#: Key of the mask of the counted positions in DATA (boolean or 0/1, shape (N, *S)).
MASK_KEY = "mask"

#: A keyword input of this name is also the mask when DATA has no ``mask`` key.
ATTENTION_MASK = "attention_mask"


@dataclass
class Data:
    """What DATA holds: inputs (an array, or a dict of keyword inputs), labels, mask.

    ``keys`` says where they were found (for the report), ``mask_key`` where the
    mask came from (None: no mask).
    """

    inputs: Any
    labels: Any
    mask: Any
    keys: str
    mask_key: str | None

    @property
    def num_rows(self) -> int:
        """N, the rows of the first input."""
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return int(first.shape[0])

    def head(self, n: int) -> Data:
        """The first ``n`` examples."""
        x = (
            {k: v[:n] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[:n]
        )
        mask = None if self.mask is None else self.mask[:n]
        return Data(x, self.labels[:n], mask, self.keys, self.mask_key)


def split_model_spec(spec: str, factory: str | None) -> tuple[Path, str | None]:
    """``model.py:factory`` (or ``--factory``) → the file and the factory name, if any."""
    if factory is not None:
        return Path(spec), factory
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        return Path(head), tail
    return Path(spec), None


def import_file(path: Path) -> Any:
    """Import a Python file as a fresh module, with its folder on ``sys.path`` meanwhile."""
    import importlib.util as iu

    name = f"fisherbound_user_model_{abs(hash(str(path.resolve())))}"
    spec = iu.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"MODEL {path} could not be imported as a Python file."
        raise UsageError(msg)
    module = iu.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        msg = f"MODEL {path} could not be imported: {type(err).__name__}: {err}"
        raise UsageError(msg) from None
    finally:
        sys.path.remove(folder)
    return module


def script_wrapper(scripted: Any) -> Any:
    """A plain module whose parameters feed a TorchScript module, so torch.func can see them.

    ``torch.func.functional_call`` refuses jitted modules; this wrapper mirrors the
    scripted module's parameters (same names) and, at every call, writes the tensors
    it is given into the scripted module before running it, with the graph
    executor's optimisations off (its fused differentiable graphs do not support
    forward-over-reverse differentiation).
    """
    import torch
    from torch import nn

    class ScriptedModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "_scripted", scripted)
            self._names = []
            for name, p in scripted.named_parameters():
                *path, leaf = name.split(".")
                owner: nn.Module = self
                for part in path:
                    if part not in owner._modules:
                        owner.add_module(part, nn.Module())
                    owner = owner._modules[part]  # type: ignore[assignment]
                owner.register_parameter(
                    leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                )
                self._names.append(name)
            scripted.eval()

        def forward(self, *args: Any) -> Any:
            for name in self._names:
                *path, leaf = name.split(".")
                src: Any = self
                dst: Any = self._scripted
                for part in path:
                    src, dst = src._modules[part], getattr(dst, part)
                dst._c.setattr(leaf, getattr(src, leaf))
            run: Any = self._scripted
            with torch.jit.optimized_execution(False):
                return run(*args)

    return ScriptedModule()


def load_model(spec: str, factory: str | None) -> tuple[Any, str]:
    """The user's module and a description of where it came from."""
    path, name = split_model_spec(spec, factory)
    if not path.is_file():
        msg = f"MODEL file {str(path)!r} does not exist (or is not a file)."
        raise UsageError(msg)
    if name is not None or path.suffix == ".py":
        if name is None:
            msg = (
                f"MODEL {path} is a Python file: name the factory that builds the model, as "
                f"{path}:make_model or with --factory make_model."
            )
            raise UsageError(msg)
        return load_factory(path, name)
    return load_torch_file(path)


def load_factory(path: Path, name: str) -> tuple[Any, str]:
    """The module built by the factory ``name`` of the Python file ``path``."""
    from torch import nn

    module = import_file(path)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        msg = (
            f"factory {name!r} not found in {path} (it must be a function or class "
            f"defined there, called with no arguments); callables found: {found}."
        )
        raise UsageError(msg)
    try:
        model = fn()
    except Exception as err:
        msg = f"factory {name}() in {path} raised {type(err).__name__}: {err}"
        raise UsageError(msg) from None
    if not isinstance(model, nn.Module):
        msg = (
            f"factory {name}() in {path} must return a torch.nn.Module; got "
            f"{type(model).__module__}.{type(model).__name__}."
        )
        raise UsageError(msg)
    return model, f"{type(model).__name__} from {path}:{name}()"


def load_torch_file(path: Path) -> tuple[Any, str]:
    """A TorchScript file (wrapped for torch.func), else a module saved with torch.save."""
    import torch
    from torch import nn

    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript in favour of torch.export; its
            # files still load, and the report supports them.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as jit_err:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as err:
            msg = (
                f"MODEL {path} does not load: as TorchScript ({type(jit_err).__name__}: "
                f"{first_line(jit_err)}) nor with torch.load ({type(err).__name__}: "
                f"{first_line(err)})."
            )
            raise UsageError(msg) from None
        if isinstance(loaded, nn.Module):
            return loaded, f"{type(loaded).__name__} from torch.load({path})"
        if isinstance(loaded, dict):
            msg = (
                f"MODEL {path} holds a dict (a state dict?), not a module; write a Python "
                "file with a factory that builds the model and loads the state dict, and "
                "pass it as model.py:make_model."
            )
            raise UsageError(msg) from None
        msg = (
            f"MODEL {path} loads as {type(loaded).__module__}.{type(loaded).__name__}, not "
            "a torch.nn.Module."
        )
        raise UsageError(msg) from None
    if not any(True for _ in scripted.parameters()):
        msg = (
            f"MODEL {path} is a TorchScript module without parameters (frozen with "
            "torch.jit.freeze?); save it without freezing."
        )
        raise UsageError(msg)
    return script_wrapper(scripted), f"TorchScript module from {path}"


def load_data(path: Path) -> tuple[Any, Any, str]:
    """Inputs, labels and the keys they were found under, from an ``.npz`` archive."""
    data = load_dataset(path)
    return data.inputs, data.labels, data.keys


def keyword_inputs(arrays: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keyword inputs ``{name: array}`` of the keys ``prefix_name`` (sorted by key)."""
    start = prefix + "_"
    return {k[len(start) :]: v for k, v in sorted(arrays.items()) if k.startswith(start)}


def load_dataset(path: Path) -> Data:
    """Inputs (an array or keyword inputs), labels and mask from an ``.npz`` archive.

    Inputs are under ``x`` (or ``inputs``), or, for keyword inputs, under
    ``x_NAME`` (``inputs_NAME``): the model is called as ``model(NAME=...)``.
    Labels are under ``y`` (``labels``). The mask of the counted positions is
    under ``mask``, else the keyword input ``attention_mask`` if there is one.
    """
    import numpy as np

    if not path.is_file():
        msg = f"DATA file {str(path)!r} does not exist (or is not a file)."
        raise UsageError(msg)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                msg = (
                    f"DATA {path} must be an .npz archive (numpy.savez) of inputs and labels; "
                    "got a single array."
                )
                raise UsageError(msg)
            keys = list(data.files)
            arrays = {k: np.asarray(data[k]) for k in keys}
    except UsageError:
        raise
    except Exception as err:
        msg = (
            f"DATA {path} does not load as an .npz archive: {type(err).__name__}: {first_line(err)}"
        )
        raise UsageError(msg) from None
    for xk, yk in DATA_KEYS:
        if yk not in keys:
            continue
        named = keyword_inputs(arrays, xk)
        if xk in keys and named:
            msg = (
                f"DATA {path} holds both {xk} and keyword inputs {xk}_NAME "
                f"({sorted(f'{xk}_{k}' for k in named)}); keep one of them."
            )
            raise UsageError(msg)
        if xk in keys or named:
            return dataset(path, arrays, xk, yk, named)
    msg = (
        f"DATA {path} must hold the inputs and labels under the keys x and y (or inputs "
        f"and labels); found keys {keys}."
    )
    raise UsageError(msg)


def dataset(path: Path, arrays: dict[str, Any], xk: str, yk: str, named: dict[str, Any]) -> Data:
    """The ``Data`` of the keys ``xk`` (or keyword inputs ``named``), ``yk`` and the mask."""
    import numpy as np

    inputs: Any = named if named else arrays[xk]
    for key, x in ((f"{xk}_{k}", v) for k, v in named.items()) if named else [(xk, inputs)]:
        try:
            check_inputs_finite([(f"DATA {path}: the inputs (key {key})", x)])
        except ValueError as err:
            raise UsageError(str(err)) from None
    keys = ", ".join(f"{xk}_{k}" for k in named) if named else xk
    keys = f"{keys}/{yk}"
    mask_key = None
    if MASK_KEY in arrays:
        mask_key = MASK_KEY
    elif ATTENTION_MASK in named:
        mask_key = f"{xk}_{ATTENTION_MASK}"
    mask = None
    if mask_key is not None:
        raw = arrays[mask_key]
        if raw.dtype != np.bool_ and not (
            (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating))
            and np.all((raw == 0) | (raw == 1))
        ):
            msg = (
                f"DATA {path}: the mask (key {mask_key}) must be boolean or 0/1 (1 = the position "
                f"counts); got dtype {raw.dtype}"
                + (f" with values {sorted(set(np.unique(raw).tolist()))[:5]}." if raw.size else ".")
            )
            raise UsageError(msg)
        mask = raw != 0
        if mask_key == MASK_KEY:
            keys += f", {MASK_KEY}"
    return Data(inputs, arrays[yk], mask, keys, mask_key)


@dataclass(frozen=True)
class Layout:
    """Where the logits are in the model's output, and the position axes they must have.

    ``output`` (``--output``) picks the logits from the model's output,
    ``class_axis`` (``--class-axis``) is moved last, and ``positions`` is S, the
    position axes the labels ask for (``()``: logits (N, C)).
    """

    output: Any = None
    class_axis: int = -1
    positions: tuple[int, ...] = ()


def check_outputs(
    model: Any,
    subject: Subject,
    x: Any,
    y: Any,
    family: str,
    *,
    output: Any = None,
    class_axis: int = -1,
    positions: tuple[int, ...] = (),
    mask: Any = None,
    ignore_index: int | None = None,
) -> None:
    """Run the model once and check that its outputs are logits that fit the labels.

    ``positions`` is S, the position axes the labels ask for (``()``: logits
    (N, C)); the logits are then (N, ∗S, C) once ``output`` has picked them from
    the model's output and ``class_axis`` has been moved last. Labels of the
    Bernoulli and Gaussian families have their class axis last here (as the logits). ``family``:
    ``"categorical"`` (class indices), ``"soft"`` (categorical target
    distributions, ``--soft-targets``), ``"bernoulli"`` or ``"gaussian"`` (label
    rows, ``check_label_rows``).
    """
    logits = model_logits(model, subject, x, Layout(output, class_axis, positions))
    if family == "categorical":
        check_categorical(logits, y, positions=positions, mask=mask, ignore_index=ignore_index)
    elif family == "soft":
        check_target_distributions(logits, y, mask=mask)
    else:
        check_label_rows(logits, y, family)


def inputs_text(x: Any, xt: Any) -> str:
    """The inputs for a message: ``shape (40, 7), dtype ...`` or each keyword input's."""
    if isinstance(x, dict):
        parts = ", ".join(f"{k} {tuple(v.shape)} {xt[k].dtype}" for k, v in x.items())
        return f"keyword inputs {parts}"
    return f"shape {tuple(x.shape)}, dtype {xt.dtype}"


def call_model(model: Any, subject: Subject, x: Any) -> Any:
    """The model's output on ``x`` (keyword inputs for a dict), without gradients."""
    import torch

    xt = subject.inputs(x)
    try:
        with torch.no_grad():
            return model(**xt) if isinstance(xt, dict) else model(xt)
    except Exception as err:
        msg = (
            f"the model rejects the inputs of DATA ({inputs_text(x, xt)}): "
            f"{type(err).__name__}: {first_line(err)}"
        )
        raise UsageError(msg) from None


def select_logits(out: Any, layout: Layout) -> Any:
    """The logits tensor picked by ``--output``, its ``--class-axis`` moved last."""
    import torch

    from fisherbound.adapters._torch_model import classes_last, select_output

    output, class_axis = layout.output, layout.class_axis
    if output is not None:
        try:
            out = select_output(out, output)
        except ValueError as err:
            msg = f"--output {output}: {first_line(err)}"
            raise UsageError(msg) from None
    if not isinstance(out, torch.Tensor):
        if output is not None:
            msg = f"--output {output} selects a {type(out).__name__}, not a tensor of logits."
        else:
            msg = (
                "the model must return a tensor of logits of shape (N, C); got "
                f"{type(out).__module__}.{type(out).__name__}. Name the logits in it with "
                "--output (a key, an attribute or an index)."
            )
        raise UsageError(msg)
    try:
        return classes_last(out, class_axis)
    except ValueError:
        msg = (
            f"--class-axis must be an axis of the model's output of shape {tuple(out.shape)} "
            f"other than 0 (the inputs), between {1 - out.ndim} and {out.ndim - 1}; got "
            f"{class_axis}."
        )
        raise UsageError(msg) from None


def letters(positions: tuple[int, ...]) -> str:
    """``N, T, C`` for one position axis, ``N, S1, S2, C`` for more."""
    names = ["T"] if len(positions) == 1 else [f"S{i + 1}" for i in range(len(positions))]
    return ", ".join(["N", *names, "C"])


def model_logits(model: Any, subject: Subject, x: Any, layout: Layout) -> Any:
    """The model's outputs on ``x`` as a host float64 array, checked to be logits.

    (N, C), or (N, ∗S, C) for the position axes ``layout.positions`` = S.
    """
    import numpy as np

    z = select_logits(call_model(model, subject, x), layout)
    positions = layout.positions
    first = next(iter(x.values())) if isinstance(x, dict) else x
    n = int(first.shape[0])
    if not positions and (z.ndim != 2 or int(z.shape[0]) != n):
        msg = (
            f"the model's outputs must be logits of shape (N, C) = ({n}, C) for the {n} "
            f"inputs; got shape {tuple(z.shape)}."
        )
        raise UsageError(msg)
    lead = (n, *positions)
    if positions and (z.ndim != len(lead) + 1 or tuple(int(s) for s in z.shape[:-1]) != lead):
        axis = (
            f" (--class-axis {layout.class_axis} moved last)"
            if layout.class_axis != -1
            else "; name the class axis with --class-axis if it is not the last"
        )
        msg = (
            f"the model's outputs must be logits of shape ({letters(positions)}) = "
            f"({', '.join(str(s) for s in lead)}, C) for the labels' positions; got shape "
            f"{tuple(z.shape)}{axis}."
        )
        raise UsageError(msg)
    if not z.is_floating_point():
        msg = f"the model's outputs must be floating-point logits; got dtype {z.dtype}."
        raise UsageError(msg)
    zh = z.detach().cpu().double().numpy()
    bad = np.flatnonzero(~np.all(np.isfinite(zh.reshape(n, -1)), axis=1))
    if bad.size:
        msg = (
            f"the model's outputs must be finite logits; got NaN or infinity in "
            f"{bad.size} rows, e.g. {bad[:10].tolist()}."
        )
        raise UsageError(msg)
    return zh


def check_categorical(
    zh: Any,
    y: Any,
    *,
    positions: tuple[int, ...] = (),
    mask: Any = None,
    ignore_index: int | None = None,
) -> None:
    """Logits (N, ∗S, C ≥ 2), not probabilities, and class indices in [0, C) as labels.

    With positions, a label may also be the ignore index, and the labels of the
    positions the mask leaves out are not read.
    """
    import numpy as np

    c = check_categorical_logits(zh)
    labels = np.asarray(y)
    if not positions and labels.ndim != 1:
        msg = (
            f"categorical labels must be class indices of shape (N,); got shape "
            f"{labels.shape}. For multi-label 0/1 rows use --family bernoulli."
        )
        raise UsageError(msg)
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(labels == np.round(labels)))
    )
    if not integral:
        msg = (
            f"categorical labels must be integer class indices in [0, {c}); got dtype "
            f"{labels.dtype} with non-integer values."
        )
        raise UsageError(msg)
    keep = np.ones(labels.shape, dtype=bool)
    if positions and mask is not None:
        keep = np.asarray(mask)
    if positions and ignore_index is not None:
        keep = keep & (labels != ignore_index)
    wrong = keep & ((labels < 0) | (labels >= c))
    if not np.any(wrong):
        return
    values = sorted({int(v) for v in labels[wrong][:10]})
    if positions:
        ignored = "none" if ignore_index is None else str(ignore_index)
        pairs = [tuple(int(i) for i in idx) for idx in np.argwhere(wrong)[:5]]
        also = f", or the ignore index (--ignore-index {ignored})"
        where = f"(input, position) {pairs}"
    else:
        also, where = "", f"rows {np.flatnonzero(wrong)[:10].tolist()}"
    msg = (
        f"labels must be class indices in [0, C) = [0, {c}) for the model's {c} "
        f"outputs{also}; got {int(np.sum(wrong))} outside, e.g. values {values} at {where}."
    )
    raise UsageError(msg)


def check_categorical_logits(zh: Any) -> int:
    """C >= 2 logits, not softmax probabilities (the library's rule); returns C."""
    import numpy as np

    c = int(zh.shape[-1])
    if c < 2:
        msg = (
            f"the categorical family needs C >= 2 outputs; the model has C = {c}. For one "
            "binary output use --family bernoulli."
        )
        raise UsageError(msg)
    try:  # the library's own rule (Categorical refuses softmax probabilities)
        Categorical()._check_outputs(np.asarray(zh), np, "the model's outputs")
    except ValueError as err:
        raise UsageError(str(err)) from err
    return c


def check_target_distributions(zh: Any, y: Any, *, mask: Any = None) -> None:
    """Categorical target distributions of the logits' shape; masked rows are not read."""
    import numpy as np

    check_categorical_logits(zh)
    targets = np.asarray(y, dtype=np.float64)
    if targets.shape != zh.shape:
        msg = (
            f"--soft-targets: the target distributions must have the logits' shape "
            f"{zh.shape} (class axis last, as --class-axis says for the model's output); got "
            f"shape {targets.shape}."
        )
        raise UsageError(msg)
    if mask is not None:  # masked rows may hold anything: the library's placeholder
        targets = masked_label_placeholder(targets, np.asarray(mask) != 0, np)
    try:  # the library's own rule: entries in [0, 1], rows summing to 1
        Categorical().check_labels(np.asarray(zh, dtype=np.float64), targets)
    except ValueError as err:
        msg = f"--soft-targets: {err}"
        raise UsageError(msg) from err


def check_label_rows(zh: Any, y: Any, family: str) -> None:
    """Label rows of the logits' shape (N, C) or (N, ∗S, C), for ``family``.

    Bernoulli labels in [0, 1] (binary or soft), Gaussian targets finite reals.
    """
    import numpy as np

    labels = np.asarray(y)
    what = "rows in [0, 1]" if family == "bernoulli" else "real targets"
    name = f"{family.capitalize()} labels"
    if labels.shape != zh.shape:
        if zh.ndim == 2:
            n, c = (int(s) for s in zh.shape)
            msg = f"{name} must be {what} of shape (N, C) = ({n}, {c}); got shape {labels.shape}."
            if family == "gaussian" and c == 1 and labels.shape == (n,):
                msg += " A model with one output takes targets (N, 1): save y[:, None]."
        else:
            msg = (
                f"{name} must be {what} of the logits' shape {zh.shape} (class axis last, as "
                f"--class-axis says for the model's output); got shape {labels.shape}."
            )
        raise UsageError(msg)
    if family == "gaussian":
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isfinite(labels)):
            msg = f"Gaussian labels must be finite real targets; got dtype {labels.dtype}"
            msg += " with NaN or inf entries." if np.issubdtype(labels.dtype, np.number) else "."
            raise UsageError(msg)
        return
    if not np.all((labels >= 0) & (labels <= 1)):
        msg = (
            "Bernoulli labels must be binary labels 0 / 1 or soft targets in [0, 1]; got "
            "values outside [0, 1] (or NaN)."
        )
        raise UsageError(msg)


def selected_params(model: Any, params: list[str] | None) -> tuple[list[str] | None, int]:
    """The ``--params`` names (None: every trainable one) and their number of entries."""
    available = [n for n, p in model.named_parameters() if p.requires_grad]
    if not available:
        msg = "the model has no trainable parameters (requires_grad=True) to analyse."
        raise UsageError(msg)
    unknown = [n for n in params or () if n not in available]
    if unknown:
        msg = (
            f"--params names unknown parameters {unknown}; the model's trainable "
            f"parameters are {available}."
        )
        raise UsageError(msg)
    names = list(dict.fromkeys(params)) if params else None
    count = sum(p.numel() for n, p in model.named_parameters() if n in (names or available))
    return names, count
