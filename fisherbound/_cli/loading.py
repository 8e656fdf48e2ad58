"""``fisherbound report``: loading the user's model and data, and checking them.

MODEL is a Python file with a factory, a TorchScript file or a module saved with
``torch.save``; DATA is an ``.npz`` archive of inputs and labels. Every problem
is a ``UsageError`` that says what was found and what to do.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from fisherbound._cli.usage import UsageError, first_line
from fisherbound._report.subjects import Subject

#: Keys accepted in the DATA .npz file (inputs, labels).
DATA_KEYS = (("x", "y"), ("inputs", "labels"))


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
            for xk, yk in DATA_KEYS:
                if xk in keys and yk in keys:
                    return np.asarray(data[xk]), np.asarray(data[yk]), f"{xk}/{yk}"
    except UsageError:
        raise
    except Exception as err:
        msg = (
            f"DATA {path} does not load as an .npz archive: {type(err).__name__}: {first_line(err)}"
        )
        raise UsageError(msg) from None
    msg = (
        f"DATA {path} must hold the inputs and labels under the keys x and y (or inputs "
        f"and labels); found keys {keys}."
    )
    raise UsageError(msg)


def check_outputs(model: Any, subject: Subject, x: Any, y: Any, family: str) -> None:
    """Run the model once and check that its outputs are logits that fit the labels."""
    logits = model_logits(model, subject, x)
    if family == "categorical":
        check_categorical(logits, y)
    else:
        check_bernoulli(logits, y)


def model_logits(model: Any, subject: Subject, x: Any) -> Any:
    """The model's outputs on ``x`` as a host float64 array, checked to be logits (N, C)."""
    import numpy as np
    import torch

    xt = subject.inputs(x)
    try:
        with torch.no_grad():
            z = model(xt)
    except Exception as err:
        msg = (
            f"the model rejects the inputs of DATA (shape {tuple(x.shape)}, dtype "
            f"{xt.dtype}): {type(err).__name__}: {first_line(err)}"
        )
        raise UsageError(msg) from None
    n = int(x.shape[0])
    if not isinstance(z, torch.Tensor):
        msg = (
            "the model must return a tensor of logits of shape (N, C); got "
            f"{type(z).__module__}.{type(z).__name__}."
        )
        raise UsageError(msg)
    if z.ndim != 2 or int(z.shape[0]) != n:
        msg = (
            f"the model's outputs must be logits of shape (N, C) = ({n}, C) for the {n} "
            f"inputs; got shape {tuple(z.shape)}."
        )
        raise UsageError(msg)
    if not z.is_floating_point():
        msg = f"the model's outputs must be floating-point logits; got dtype {z.dtype}."
        raise UsageError(msg)
    zh = z.detach().cpu().double().numpy()
    bad = np.flatnonzero(~np.all(np.isfinite(zh), axis=1))
    if bad.size:
        msg = (
            f"the model's outputs must be finite logits; got NaN or infinity in "
            f"{bad.size} rows, e.g. {bad[:10].tolist()}."
        )
        raise UsageError(msg)
    return zh


def check_categorical(zh: Any, y: Any) -> None:
    """Logits (N, C ≥ 2), not probabilities, and class indices in [0, C) as labels."""
    import numpy as np

    c = int(zh.shape[1])
    if c < 2:
        msg = (
            f"the categorical family needs C >= 2 outputs; the model has C = {c}. For one "
            "binary output use --family bernoulli."
        )
        raise UsageError(msg)
    if np.all(zh >= 0.0) and np.allclose(zh.sum(axis=1), 1.0, rtol=0.0, atol=1e-4):
        msg = (
            "the model's outputs look like softmax probabilities (every row is "
            "non-negative and sums to 1), not logits: remove the final softmax. "
            "Log-softmax outputs are fine (logits up to a constant per row), softmax "
            "probabilities are not."
        )
        raise UsageError(msg)
    labels = np.asarray(y)
    if labels.ndim != 1:
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
    out = np.flatnonzero((labels < 0) | (labels >= c))
    if out.size:
        msg = (
            f"labels must be class indices in [0, C) = [0, {c}) for the model's {c} "
            f"outputs; got {out.size} outside, e.g. values "
            f"{sorted({int(v) for v in labels[out][:10]})} at rows {out[:10].tolist()}."
        )
        raise UsageError(msg)


def check_bernoulli(zh: Any, y: Any) -> None:
    """0/1 label rows of the logits' shape (N, C)."""
    import numpy as np

    n, c = (int(s) for s in zh.shape)
    labels = np.asarray(y)
    if labels.shape != (n, c):
        msg = (
            f"Bernoulli labels must be 0/1 rows of shape (N, C) = ({n}, {c}); got shape "
            f"{labels.shape}."
        )
        raise UsageError(msg)
    if not np.all((labels == 0) | (labels == 1)):
        msg = "Bernoulli labels must be 0 or 1; got other values."
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
