"""``fisherbound report MODEL DATA`` on torch models the tests write, and its errors.

A small classifier is written three ways (a Python factory, a ``torch.save``d
module, a TorchScript file) with the same weights; the three reports must agree
on the exact Fisher diagonal and the Hessian, and their bounds must bracket it.
Every bad input ends with exit status 2 and a message on stderr that names the
problem, without a traceback.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from fisherbound.cli import main  # noqa: E402
from fisherbound.report import _jsonable  # noqa: E402

#: Every section runs, with small budgets (the analysis itself is tested elsewhere).
FAST = [
    "--num-probes", "4",
    "--slq-probes", "2",
    "--lanczos-steps", "8",
    "--max-count", "2",
    "--top-k", "2",
    "--grid", "3",
    "--trace-probes", "2",
    "--repeats", "1",
    "--threads", "1",
    "--quiet",
]  # fmt: skip

MODEL_PY = """
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    # log-softmax outputs are logits up to a constant per row: accepted.
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4), nn.LogSoftmax(dim=1)
    ).double()


def make_multilabel():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_softmax():
    return nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=1)).double()


def make_three_d():
    return nn.Sequential(nn.Linear(6, 4), nn.Unflatten(1, (4, 1))).double()


class Infinite(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4).double()

    def forward(self, x):
        z = self.linear(x)
        return torch.cat([z[:1] / 0.0, z[1:]])


def make_infinite():
    return Infinite()


def make_one_output():
    return nn.Linear(6, 1).double()


def not_a_module():
    return 42


def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("user")
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "broken.py").write_text("def make_model(:\n    pass\n")
    sys.path.insert(0, str(folder))
    try:
        import importlib

        spec = importlib.util.spec_from_file_location("user_model_for_tests", folder / "model.py")
        assert spec is not None
        assert spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    model = mod.make_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6))
    y = rng.integers(0, 4, size=40)
    np.savez(folder / "data.npz", x=x, y=y)
    np.savez(folder / "data_keys.npz", inputs=x, labels=y)
    np.savez(folder / "wrong_keys.npz", images=x, targets=y)
    np.savez(folder / "wide.npz", x=rng.standard_normal((40, 7)), y=y)
    np.savez(folder / "short_labels.npz", x=x, y=y[:30])
    np.savez(folder / "big_labels.npz", x=x, y=np.where(np.arange(40) == 3, 9, y))
    np.savez(folder / "multilabel.npz", x=x, y=(rng.random((40, 3)) < 0.4).astype(np.float64))
    (folder / "garbage.pt").write_bytes(b"this is not a model")
    # A plain nn.Sequential pickles without the test's module: torch.save of the module.
    plain = torch.nn.Sequential(*list(model.children())[:3])
    torch.save(plain, folder / "module.pt")
    torch.save(model.state_dict(), folder / "state.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript
        traced = torch.jit.trace(model, torch.as_tensor(x[:2]))
        torch.jit.save(traced, str(folder / "script.pt"))
    return {p.stem if p.suffix != ".py" else p.name: p for p in folder.iterdir()} | {"dir": folder}


def run_report(files: dict[str, Path], model: str, data: str, *extra: str) -> dict[str, Any]:
    out = files["dir"] / f"out-{abs(hash((model, data, extra)))}"
    code = main(["report", model, str(files[data]), "--out", str(out), *FAST, *extra])
    assert code == 0
    text = (out / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    for fig in report["figures"]:
        assert (out / fig["file"]).stat().st_size > 0
    assert "<img" in (out / "index.html").read_text()
    return report


def check_bounds(report: dict[str, Any]) -> None:
    v = {k: np.asarray(x) for k, x in report["fisher_diagonal"]["values"].items()}
    slack = 1e-12 * v["upper"]
    assert np.all(v["lower"] <= v["exact"] + slack)
    assert np.all(v["exact"] <= v["upper"] + slack)
    assert report["fisher_diagonal"]["bounds_hold"]
    assert report["core_space"]["lambda_max_bounds_hold"] == 1.0


@pytest.fixture(scope="module")
def factory_report(files: dict[str, Path]) -> dict[str, Any]:
    return run_report(files, f"{files['model.py']}:make_model", "data")


def test_report_from_a_python_factory(factory_report: dict[str, Any], capsys: Any) -> None:
    r = factory_report
    an = r["analysed"]
    assert (an["num_inputs"], an["num_outputs"], an["num_params"]) == (40, 4, 6 * 12 + 12 + 52)
    assert [b["name"] for b in an["blocks"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "make_model()" in r["model"]["description"]
    assert r["environment"]["framework"] == "torch"
    check_bounds(r)
    assert r["spectrum"]["brackets_hold"]
    for row in r["estimators"]["rows"]:
        assert row["seconds"] > 0
        assert math.isfinite(row["cost_gradient_steps"])


def test_torchscript_file_gives_the_same_report(
    files: dict[str, Path], factory_report: dict[str, Any]
) -> None:
    r = run_report(files, str(files["script"]), "data_keys")  # keys inputs/labels
    assert "TorchScript" in r["model"]["description"]
    assert r["data"]["description"].startswith(f"{files['data_keys']} (keys inputs/labels)")
    ref = factory_report
    for key in ("exact", "lower", "upper", "estimate"):  # same probes, same numbers
        np.testing.assert_allclose(
            r["fisher_diagonal"]["values"][key], ref["fisher_diagonal"]["values"][key], rtol=1e-10
        )
    # The landscape goes through forward-over-reverse Hessian-vector products.
    np.testing.assert_allclose(
        r["landscape"]["hessian"]["eigenvalues"],
        ref["landscape"]["hessian"]["eigenvalues"],
        rtol=1e-8,
    )
    np.testing.assert_allclose(
        r["landscape"]["trace"]["hvp"]["value"], ref["landscape"]["trace"]["hvp"]["value"]
    )


def test_torch_save_file_and_a_parameter_subset(
    files: dict[str, Path], factory_report: dict[str, Any]
) -> None:
    # module.pt is the model without its LogSoftmax: the same Fisher metric.
    r = run_report(files, str(files["module"]), "data", "--params", "2.weight", "2.bias")
    an = r["analysed"]
    assert [b["name"] for b in an["blocks"]] == ["2.weight", "2.bias"]
    assert an["num_params"] == 52
    assert r["model"]["params"] == ["2.weight", "2.bias"]
    full = np.asarray(factory_report["fisher_diagonal"]["values"]["exact"])
    np.testing.assert_allclose(r["fisher_diagonal"]["values"]["exact"], full[84:], rtol=1e-10)
    check_bounds(r)


def test_bernoulli_family_with_a_target_error(files: dict[str, Path]) -> None:
    r = run_report(
        files,
        str(files["model.py"]),
        "multilabel",
        "--factory",
        "make_multilabel",
        "--family",
        "bernoulli",
        "--target-error",
        "0.3",
    )
    assert r["analysed"]["family"] == "Bernoulli"
    assert r["settings"]["target_error"] == 0.3
    check_bounds(r)
    rows = [row for row in r["estimators"]["rows"] if "target" in row["estimator"]]
    assert len(rows) == 1
    assert rows[0]["num_probes"] >= 4
    # Either the target was met, or the report says that it was not.
    fd = r["fisher_diagonal"]
    total = fd["blocks"][-1]
    met = total["estimate_trace_std_error"] <= 0.3 * total["estimate_trace"] * (1 + 1e-9)
    assert met or any("target_relative_error" in w for w in r["warnings"])


# --------------------------------------------------------------------------- #
# bad input: exit status 2, the problem named on stderr


def error_of(argv: list[str], capsys: Any) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "fisherbound report: error: " in err
    return " ".join(err.split())


M = "model.py:make_model"
CASES = [
    ("missing.pt", "data", [], "MODEL file", "does not exist"),
    ("broken.py:make_model", "data", [], "could not be imported: SyntaxError", ""),
    ("garbage.pt", "data", [], "does not load: as TorchScript", "nor with torch.load"),
    ("state.pt", "data", [], "holds a dict (a state dict?), not a module", "model.py:make_model"),
    ("model.py", "data", [], "is a Python file: name the factory", "--factory"),
    ("model.py:nowhere", "data", [], "factory 'nowhere' not found", "make_model"),
    ("model.py:not_a_module", "data", [], "must return a torch.nn.Module", "builtins.int"),
    ("model.py:broken", "data", [], "raised RuntimeError: no weights here", ""),
    (M, "missing", [], "DATA file", "does not exist"),
    (M, "garbage", [], "does not load as an .npz archive", ""),
    (M, "wrong_keys", [], "keys x and y (or inputs and labels)", "['images', 'targets']"),
    (M, "wide", [], "the model rejects the inputs of DATA (shape (40, 7)", "RuntimeError"),
    (M, "short_labels", [], "one label per input; got 40 inputs", "(30,)"),
    (M, "big_labels", [], "class indices in [0, C) = [0, 4)", "values [9] at rows [3]"),
    ("model.py:make_three_d", "data", [], "logits of shape (N, C) = (40, C)", "(40, 4, 1)"),
    ("model.py:make_infinite", "data", [], "must be finite logits", "e.g. [0]"),
    (
        "model.py:make_softmax",
        "data",
        [],
        "look like softmax probabilities",
        "Log-softmax outputs are fine",
    ),
    ("model.py:make_one_output", "data", [], "needs C >= 2 outputs", "--family bernoulli"),
    (
        M,
        "data",
        ["--params", "0.weight", "head.bias"],
        "unknown parameters ['head.bias']",
        "'2.bias'",
    ),
    (
        "model.py:make_multilabel",
        "data",
        ["--family", "bernoulli"],
        "Bernoulli labels must be 0/1 rows of shape (N, C) = (40, 3)",
        "(40,)",
    ),
]


@pytest.mark.parametrize(("model", "data", "extra", "first", "second"), CASES)
def test_bad_input_is_named(
    files: dict[str, Path],
    model: str,
    data: str,
    extra: list[str],
    first: str,
    second: str,
    capsys: Any,
) -> None:
    name, _, factory = model.partition(":")
    path = files.get(name) or files.get(Path(name).stem) or files["dir"] / name
    spec = f"{path}:{factory}" if factory else str(path)
    data_path = files.get(data) or files["dir"] / f"{data}.npz"
    err = error_of(
        ["report", spec, str(data_path), "--out", str(files["dir"] / "x"), *extra], capsys
    )
    assert first in err
    assert second in err


def test_bad_input_exits_2_without_traceback_as_a_process(files: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fisherbound", "report", str(files["garbage"]), str(files["data"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "does not load" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_writes_nan_as_null() -> None:
    value = _jsonable({"a": float("nan"), "b": [1.0, float("inf"), np.float64(2.0)], "c": None})
    assert value == {"a": None, "b": [1.0, None, 2.0], "c": None}
    assert json.dumps(value, allow_nan=False)


# --------------------------------------------------------------------------- #
# the split into fisherbound._report and fisherbound._cli keeps the old names

#: Names that fisherbound.report and fisherbound.cli defined before the split.
FORMER_NAMES = {
    "fisherbound.report": (
        "Analysis Settings Subject analyse jax_subject numpy_subject torch_subject "
        "write_report MAX_JSON_PARAMS FIGURES STAGES Block Array _host _wait _timed _stats "
        "_relative_error _coverage _median_relative_se _bracket_tolerance _Stages _environment "
        "_run _detach_and_mix _mean_se _fisher_diagonal_section _compare_estimators "
        "_core_space _top_spectrum _dimension _curvature _surface_summary _landscape "
        "_jsonable _figures _EstimateView _DensityView _SurfaceView _new_figure "
        "_estimators_figure _core_space_figure _spectrum_figure _fmt _pm _percent _sections "
        "_markdown _CSS _html _inline_code"
    ),
    "fisherbound.cli": (
        "Settings Subject Array DEFAULT_OUT FAMILIES DATA_KEYS UsageError TRAINERS main "
        "_positive_int _positive_float _require _settings _threads _bar _Trainer "
        "_numpy_trainer _torch_trainer _jax_trainer _train _accuracy_and_loss "
        "_framework_context _demo _split_model_spec _import_file _script_wrapper _load_model "
        "_first_line _load_data _check_outputs _report _add_analysis_options _parser"
    ),
}


@pytest.mark.parametrize("module", sorted(FORMER_NAMES))
def test_former_names_stay_importable(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    missing = [name for name in FORMER_NAMES[module].split() if not hasattr(mod, name)]
    assert missing == []


def test_cli_help_is_the_cli_docstring() -> None:
    import fisherbound.cli

    assert fisherbound.cli._parser().description == fisherbound.cli.__doc__
