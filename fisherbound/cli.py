"""The command line: fisherbound demo and fisherbound report.

'fisherbound demo' trains a small classifier on scikit-learn's bundled digits
(no download) and writes a report folder on its Fisher information: the diagonal
per layer with its bounds and error bars, the estimators compared, the core-space
spectrum, the top of the Fisher spectrum, local dimension and razor, and the loss
landscape. 'fisherbound report MODEL DATA' runs the same analysis on your own
torch module and data. Both write report.md, index.html, PNG figures and
report.json into the output folder (default ./fisherbound-report).

Run 'fisherbound COMMAND --help' for the options; docs/cli.md explains every
section of the report.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fisherbound.report import Settings, Subject

Array = Any

#: Where the demo's and the report's files go unless ``--out`` says otherwise.
DEFAULT_OUT = Path("fisherbound-report")

#: ``--family`` choices of ``fisherbound report``.
FAMILIES = ("categorical", "bernoulli")

#: Keys accepted in the DATA .npz file (inputs, labels).
DATA_KEYS = (("x", "y"), ("inputs", "labels"))


class UsageError(ValueError):
    """Bad input on the command line: printed as ``fisherbound CMD: error: ...``, exit 2."""


# --------------------------------------------------------------------------- #
# argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"must be a positive integer; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be a positive integer; got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"must be a positive number; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0.0 < value < float("inf"):
        msg = f"must be a positive finite number; got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _require(module: str, package: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        msg = (
            f"this needs {package}, which is not installed; install the '{extra}' extra: "
            f'python3 -m pip install -e ".[{extra}]" (or pip install {package}).'
        )
        raise UsageError(msg)


def _settings(args: argparse.Namespace) -> Settings:
    if args.target_error is not None and args.num_probes < 2:
        msg = (
            "--target-error needs --num-probes >= 2 (a standard error needs two probes per "
            f"round); got --num-probes {args.num_probes}."
        )
        raise UsageError(msg)
    steps = args.lanczos_steps
    if steps is not None and steps < max(args.top_k, args.max_count + 1, 2):
        msg = (
            f"--lanczos-steps must be at least --top-k ({args.top_k}), --max-count + 1 "
            f"({args.max_count + 1}) and 2; got {steps}."
        )
        raise UsageError(msg)
    return Settings(
        num_probes=args.num_probes,
        target_error=args.target_error,
        seed=args.seed,
        top_k=args.top_k,
        prior_variance=args.prior_variance,
        slq_probes=args.slq_probes,
        lanczos_steps=steps,
        max_count=args.max_count,
        grid_points=args.grid,
        trace_probes=args.trace_probes,
        repeats=args.repeats,
        progress=False if args.quiet else None,
    )


@contextlib.contextmanager
def _threads(count: int | None, *, torch: bool = False) -> Iterator[None]:
    """Limit the BLAS / OpenMP thread pools (NumPy, torch) to ``count`` threads, then restore.

    Small arrays gain nothing from several threads, and on a busy machine idle
    BLAS threads that spin and wait cost far more than they give. ``torch=True``
    imports torch first (if installed), so that its thread pool is limited too.
    """
    if count is None:
        yield
        return
    if torch and importlib.util.find_spec("torch") is not None:
        import torch as _torch  # noqa: F401 - loads its OpenMP runtime before the limits
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("threadpoolctl") is not None:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=count))
        if "torch" in sys.modules:
            import torch as pt

            stack.callback(pt.set_num_threads, pt.get_num_threads())
            pt.set_num_threads(count)
        yield


def _bar(total: int, desc: str, progress: bool | None) -> Any:
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    disable = None if progress is None else False  # None: only on a terminal
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=disable)


# --------------------------------------------------------------------------- #
# fisherbound demo


@dataclass
class _Trainer:
    """One framework's version of the demo MLP: flat parameters, gradient, subject."""

    theta: Array
    gradient: Callable[[Array, Any, Any], Array]  # (θ, x host, y host) → ∇ mean loss
    subject: Callable[[Array], Subject]


def _numpy_trainer(init: Any, description: str) -> _Trainer:
    from fisherbound.adapters.numpy import loss_function
    from fisherbound.report import numpy_subject

    def gradient(theta: Array, x: Any, y: Any) -> Array:
        model = init.with_parameters(theta)
        return loss_function(model, x, y, reduction="mean").gradient()

    return _Trainer(
        init.parameters(),
        gradient,
        lambda theta: numpy_subject(init.with_parameters(theta), description=description),
    )


def _torch_trainer(init: Any, description: str) -> _Trainer:
    import torch
    from torch import nn

    from fisherbound.report import torch_subject

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
    return _Trainer(theta0, gradient, subject)


def _jax_trainer(init: Any, description: str) -> _Trainer:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from fisherbound.report import jax_subject

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

    return _Trainer(
        theta0,
        lambda theta, x, y: grad_fn(theta, jnp.asarray(x), jnp.asarray(y)),
        lambda theta: jax_subject(apply_fn, unravel(theta), description=description),
    )


TRAINERS = {"numpy": _numpy_trainer, "torch": _torch_trainer, "jax": _jax_trainer}


def _train(
    trainer: _Trainer, x: Any, y: Any, args: argparse.Namespace, progress: bool | None
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
    bar = _bar(args.epochs * per_epoch, "training", progress)
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
    if bar is not None:
        bar.close()
    return theta, step


def _accuracy_and_loss(subject: Subject, x: Any, y: Any) -> tuple[float, float]:
    import numpy as np

    from fisherbound._lib import to_host

    z = np.asarray(to_host(subject.linearize(subject.inputs(x)).logits), dtype=float)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -float(np.mean(logp[np.arange(len(y)), y]))
    return float(np.mean(np.argmax(z, axis=1) == y)), loss


@contextlib.contextmanager
def _framework_context(framework: str) -> Iterator[None]:
    """float64 everywhere: JAX needs x64 switched on (only for the demo's run)."""
    if framework == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def _demo(args: argparse.Namespace) -> int:
    _require("sklearn", "scikit-learn", "demo")
    _require("matplotlib", "matplotlib", "demo")
    if args.framework != "numpy":
        _require(args.framework, args.framework, args.framework)
    settings = _settings(args)
    import numpy as np
    from sklearn.datasets import load_digits

    from fisherbound.adapters.numpy import MLP
    from fisherbound.report import analyse, write_report

    start = time.perf_counter()
    digits = load_digits()
    x_all, y_all = digits.data / 16.0, np.asarray(digits.target)
    total = int(y_all.shape[0])
    if args.test_inputs > total - 100:
        msg = (
            f"--test-inputs must leave at least 100 of the {total} digits for training; "
            f"got {args.test_inputs}."
        )
        raise UsageError(msg)
    order = np.random.default_rng(args.seed).permutation(total)
    test, train = order[: args.test_inputs], order[args.test_inputs :]
    landscape = train[: args.landscape_inputs]
    sizes = [64, *args.hidden, 10]
    init = MLP.random(sizes, activation="tanh", rng=args.seed)
    arch = "-".join(str(s) for s in sizes)
    description = f"MLP {arch} (tanh), float64, {init.num_params} parameters"
    with _framework_context(args.framework):
        trainer = TRAINERS[args.framework](init, description)
        t0 = time.perf_counter()
        theta, steps = _train(trainer, x_all[train], y_all[train], args, settings.progress)
        subject = trainer.subject(theta)
        train_seconds = time.perf_counter() - t0
        train_acc, train_loss = _accuracy_and_loss(subject, x_all[train], y_all[train])
        context = {
            "title": f"fisherbound demo: MLP {arch} on the digits ({args.framework})",
            "command": "fisherbound " + " ".join(args.argv),
            "model": {"description": description, "sizes": sizes, "activation": "tanh"},
            "data": {
                "description": (
                    f"scikit-learn digits (8×8 images / 16, 10 classes): {len(train)} for "
                    f"training, {len(test)} held out and analysed; the landscape on the "
                    f"first {len(landscape)} training digits"
                ),
                "num_train": len(train),
                "num_test": len(test),
                "num_landscape": len(landscape),
            },
            "training": {
                "description": (
                    f"Adam (lr {args.learning_rate:g}) on the mean cross-entropy, "
                    f"{args.epochs} epochs of mini-batches of {min(args.batch_size, len(train))}"
                    f" ({steps} steps)"
                ),
                "steps": steps,
                "seconds": train_seconds,
                "train_accuracy": train_acc,
                "train_loss": train_loss,
            },
        }
        analysis = analyse(
            subject,
            x_all[test],
            y_all[test],
            landscape=[(x_all[landscape], y_all[landscape])],
            settings=settings,
            context=context,
        )
        analysis.numbers["timing"]["total_seconds"] = time.perf_counter() - start
        index = write_report(analysis, args.out)
    an = analysis.numbers["analysed"]
    print(
        f"fisherbound demo ({args.framework}): MLP {arch}, test accuracy "
        f"{100 * an['accuracy']:.1f}%, D = {an['num_params']}, N = {an['num_inputs']}; report "
        f"in {time.perf_counter() - start:.1f} s: {index}"
    )
    return 0


# --------------------------------------------------------------------------- #
# fisherbound report: loading the user's model and data


def _split_model_spec(spec: str, factory: str | None) -> tuple[Path, str | None]:
    if factory is not None:
        return Path(spec), factory
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        return Path(head), tail
    return Path(spec), None


def _import_file(path: Path) -> Any:
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


def _script_wrapper(scripted: Any) -> Any:
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


def _load_model(spec: str, factory: str | None) -> tuple[Any, str]:
    """The user's module and a description of where it came from."""
    import torch
    from torch import nn

    path, name = _split_model_spec(spec, factory)
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
        module = _import_file(path)
        fn = getattr(module, name, None)
        if fn is None or not callable(fn):
            found = sorted(
                k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
            )
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
                f"{_first_line(jit_err)}) nor with torch.load ({type(err).__name__}: "
                f"{_first_line(err)})."
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
    return _script_wrapper(scripted), f"TorchScript module from {path}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def _load_data(path: Path) -> tuple[Any, Any, str]:
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
            f"DATA {path} does not load as an .npz archive: {type(err).__name__}: "
            f"{_first_line(err)}"
        )
        raise UsageError(msg) from None
    msg = (
        f"DATA {path} must hold the inputs and labels under the keys x and y (or inputs "
        f"and labels); found keys {keys}."
    )
    raise UsageError(msg)


def _check_outputs(model: Any, subject: Subject, x: Any, y: Any, family: str) -> None:
    """Run the model once and check that its outputs are logits that fit the labels."""
    import numpy as np
    import torch

    xt = subject.inputs(x)
    try:
        with torch.no_grad():
            z = model(xt)
    except Exception as err:
        msg = (
            f"the model rejects the inputs of DATA (shape {tuple(x.shape)}, dtype "
            f"{xt.dtype}): {type(err).__name__}: {_first_line(err)}"
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
    c = int(zh.shape[1])
    if family == "categorical":
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
    else:
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


def _report(args: argparse.Namespace) -> int:
    _require("torch", "torch", "torch")
    _require("matplotlib", "matplotlib", "demo")
    settings = _settings(args)
    import numpy as np

    from fisherbound.families import Bernoulli, Categorical
    from fisherbound.report import analyse, torch_subject, write_report

    start = time.perf_counter()
    x, y, keys = _load_data(Path(args.data))
    if int(np.shape(y)[0] if np.ndim(y) else -1) != int(x.shape[0]):
        msg = (
            f"DATA {args.data} must hold one label per input; got {x.shape[0]} inputs "
            f"(shape {x.shape}) and labels of shape {np.shape(y)}."
        )
        raise UsageError(msg)
    total = int(x.shape[0])
    if total == 0:
        msg = f"DATA {args.data} holds no inputs."
        raise UsageError(msg)
    x, y = x[: args.max_inputs], y[: args.max_inputs]
    model, origin = _load_model(args.model, args.factory)
    model.eval()
    available = [n for n, p in model.named_parameters() if p.requires_grad]
    if not available:
        msg = "the model has no trainable parameters (requires_grad=True) to analyse."
        raise UsageError(msg)
    names = None
    if args.params:
        unknown = [n for n in args.params if n not in available]
        if unknown:
            msg = (
                f"--params names unknown parameters {unknown}; the model's trainable "
                f"parameters are {available}."
            )
            raise UsageError(msg)
        names = list(dict.fromkeys(args.params))
    family = Categorical() if args.family == "categorical" else Bernoulli()
    count = sum(p.numel() for n, p in model.named_parameters() if n in (names or available))
    subject = torch_subject(
        model, family=family, params=names, description=f"{origin}, {count} parameters"
    )
    _check_outputs(model, subject, x, y, args.family)
    context = {
        "title": f"fisherbound report: {args.model} on {args.data}",
        "command": "fisherbound " + " ".join(args.argv),
        "model": {"description": f"{origin}, {count} parameters", "params": names},
        "data": {
            "description": (
                f"{args.data} (keys {keys}): the first {int(x.shape[0])} of {total} inputs"
            ),
            "num_inputs_in_file": total,
        },
        "training": None,
    }
    analysis = analyse(subject, x, y, settings=settings, context=context)
    analysis.numbers["timing"]["total_seconds"] = time.perf_counter() - start
    index = write_report(analysis, args.out)
    an = analysis.numbers["analysed"]
    print(
        f"fisherbound report: D = {an['num_params']}, N = {an['num_inputs']}, C = "
        f"{an['num_outputs']}; report in {time.perf_counter() - start:.1f} s: {index}"
    )
    return 0


# --------------------------------------------------------------------------- #
# the parser


def _add_analysis_options(p: argparse.ArgumentParser, threads: int | None) -> None:
    group = p.add_argument_group("analysis")
    group.add_argument(
        "--num-probes",
        type=_positive_int,
        default=32,
        metavar="M",
        help="probes of detach-and-mix, samples of Monte Carlo (default 32)",
    )
    group.add_argument(
        "--target-error",
        type=_positive_float,
        default=None,
        metavar="E",
        help="draw rounds of M probes until the relative standard error of the "
        "detach-and-mix trace is at most E (e.g. 0.05)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument(
        "--top-k",
        type=_positive_int,
        default=10,
        metavar="K",
        help="top eigenvalues of the Fisher metric (default 10)",
    )
    group.add_argument(
        "--prior-variance",
        type=_positive_float,
        default=1.0,
        metavar="S2",
        help="σ² of the razor's Gaussian prior; local dimension at ε = 100/σ², 1/σ², "
        "0.01/σ² (default 1)",
    )
    group.add_argument(
        "--slq-probes",
        type=_positive_int,
        default=10,
        metavar="Q",
        help="probes of stochastic Lanczos quadrature: spectral density, local dimension, "
        "razor (default 10)",
    )
    group.add_argument(
        "--lanczos-steps",
        type=_positive_int,
        default=None,
        metavar="L",
        help="Lanczos steps per run (top eigenvalues, Hessian directions, local dimension) "
        "and per quadrature probe (default: the library's, about 40-100)",
    )
    group.add_argument(
        "--max-count",
        type=_positive_int,
        default=32,
        metavar="K",
        help="count up to K eigenvalues above ε exactly (Lanczos), estimate beyond (default 32)",
    )
    group.add_argument(
        "--grid",
        type=_positive_int,
        default=21,
        metavar="G",
        help="landscape grid points per direction (default 21)",
    )
    group.add_argument(
        "--trace-probes",
        type=_positive_int,
        default=64,
        metavar="P",
        help="probes of the loss-only Hessian trace (default 64)",
    )
    group.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        metavar="R",
        help="timed runs per estimator (at least; more for fast ones), after one warm-up; "
        "the fastest counts (default 3)",
    )
    output = p.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"report folder, created if needed (default ./{DEFAULT_OUT})",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    output.add_argument(
        "--threads",
        type=_positive_int,
        default=threads,
        metavar="T",
        help="BLAS / OpenMP threads of NumPy and torch (default "
        + ("1: small arrays, and no oversubscription on a busy machine)" if threads else "")
        + ("the libraries' own)" if threads is None else ""),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherbound",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small classifier on the bundled digits and write a report on it",
        description=(
            "Train an MLP (64-32-10, tanh, float64) on scikit-learn's bundled digits with "
            "Adam, then write a report folder (report.md, index.html, PNG figures, "
            "report.json) on its Fisher information, measured on held-out digits. Needs the "
            "'demo' extra (scikit-learn, matplotlib, tqdm); no network. --framework torch "
            "or jax trains and analyses the same network (same initial weights) there."
        ),
    )
    demo.add_argument(
        "--framework",
        choices=tuple(TRAINERS),
        default="numpy",
        help="numpy (the hand-written reference MLP, default), torch or jax (if installed)",
    )
    model = demo.add_argument_group("model and training")
    model.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        default=[32],
        metavar="H",
        help="hidden layer widths (default 32)",
    )
    model.add_argument(
        "--epochs", type=_positive_int, default=15, help="training epochs (default 15)"
    )
    model.add_argument(
        "--batch-size", type=_positive_int, default=128, help="mini-batch size (default 128)"
    )
    model.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=0.01,
        metavar="LR",
        help="Adam step size (default 0.01)",
    )
    model.add_argument(
        "--landscape-inputs",
        type=_positive_int,
        default=500,
        metavar="N",
        help="training digits whose mean loss the landscape shows (default 500)",
    )
    model.add_argument(
        "--test-inputs",
        type=_positive_int,
        default=360,
        metavar="N",
        help="held-out digits analysed (default 360; the rest train the model)",
    )
    _add_analysis_options(demo, threads=1)
    demo.set_defaults(run=_demo, subparser=demo)

    report = sub.add_parser(
        "report",
        help="the same analysis for your own torch model and data",
        description=(
            "Analyse a trained torch classifier on your data and write the report folder. "
            "MODEL is a Python file with a factory (model.py:make_model, or model.py with "
            "--factory make_model; called with no arguments, it returns the nn.Module with "
            "its weights loaded), or a TorchScript file (torch.jit.save), or a whole module "
            "saved with torch.save. WARNING: a torch.save file is loaded with "
            "torch.load(weights_only=False), which unpickles and so EXECUTES code from the "
            "file: use only files you trust (a Python factory executes your code, too). "
            "DATA is an .npz file (numpy.savez) with the inputs and labels under the keys "
            "x and y (or inputs and labels): class indices (N,) for the categorical "
            "family, 0/1 rows (N, C) for the Bernoulli family. The model is put in eval "
            "mode and must return logits (N, C) (log-softmax outputs are fine, "
            "probabilities are not)."
        ),
    )
    report.add_argument(
        "model", metavar="MODEL", help="model.py:factory, TorchScript or torch.save file"
    )
    report.add_argument("data", metavar="DATA", help=".npz file with x/y or inputs/labels")
    report.add_argument(
        "--factory", default=None, metavar="NAME", help="factory name in a MODEL .py file"
    )
    report.add_argument(
        "--family",
        choices=FAMILIES,
        default="categorical",
        help="output family: categorical (softmax over C classes, default) or bernoulli "
        "(C independent sigmoids, multi-label)",
    )
    report.add_argument(
        "--params",
        nargs="+",
        default=None,
        metavar="NAME",
        help="analyse only these parameters (names from model.named_parameters()); "
        "put this option after MODEL and DATA",
    )
    report.add_argument(
        "--max-inputs",
        type=_positive_int,
        default=512,
        metavar="N",
        help="analyse the first N inputs of DATA (default 512)",
    )
    _add_analysis_options(report, threads=None)
    report.set_defaults(run=_report, subparser=report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fisherbound`` command (and of ``python -m fisherbound``).

    Bad input ends with a message on stderr and exit status 2 (``SystemExit``),
    without a traceback.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(arguments)
    args.argv = arguments
    try:
        uses_torch = args.command == "report" or getattr(args, "framework", "") == "torch"
        with _threads(args.threads, torch=uses_torch):
            return int(args.run(args))
    except UsageError as err:
        args.subparser.error(str(err))
    return 2  # pragma: no cover - error() exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
