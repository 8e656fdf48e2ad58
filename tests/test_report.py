"""``fisherbound report MODEL DATA`` on torch models the tests write, and its errors.

A small classifier is written three ways (a Python factory, a ``torch.save``d
module, a TorchScript file) with the same weights; the three reports must agree
on the exact Fisher diagonal and the Hessian, and their bounds must bracket it.
Every bad input ends with exit status 2 and a message on stderr that names the
problem, without a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
import warnings
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

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


def make_nonfinite():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # hidden behind a saturated tanh
    return model


class Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4).double()

    def forward(self, x):
        return self.linear(nn.functional.dropout(x, 0.5, training=True))


def make_random():
    return Random()


def make_half():
    return nn.Linear(6, 4).half()


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
    x[:, 5] = 0.0  # an input that is 0 everywhere: its 12 weights have F_ii = 0 exactly
    np.savez(folder / "data.npz", x=x, y=y)
    np.savez(folder / "data_keys.npz", inputs=x, labels=y)
    np.savez(folder / "wrong_keys.npz", images=x, targets=y)
    np.savez(folder / "wide.npz", x=rng.standard_normal((40, 7)), y=y)
    np.savez(folder / "short_labels.npz", x=x, y=y[:30])
    np.savez(folder / "infinite.npz", x=np.where(np.arange(40)[:, None] == 5, np.inf, x), y=y)
    np.savez(folder / "big_labels.npz", x=x, y=np.where(np.arange(40) == 3, 9, y))
    np.savez(folder / "multilabel.npz", x=x, y=(rng.random((40, 3)) < 0.4).astype(np.float64))
    np.savez(folder / "regression.npz", x=x, y=rng.standard_normal((40, 3)))
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
    report["_folder"] = out  # not in report.json: where the tests find the files
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


def test_report_intervals_are_the_estimates_own(factory_report: dict[str, Any]) -> None:
    """The 95% intervals in report.json: around the estimate, their coverage recomputed."""
    fd = factory_report["fisher_diagonal"]
    v = {k: np.asarray(x, dtype=float) for k, x in fd["values"].items()}
    # JSON has no infinity: an unbounded upper end (few probes) is written as null.
    v["interval_high"] = np.where(np.isnan(v["interval_high"]), np.inf, v["interval_high"])
    assert np.all(v["interval_low"] <= v["estimate"])
    assert np.all(v["estimate"] <= v["interval_high"])
    random = np.isfinite(v["std_error"]) & (v["std_error"] > 0)
    inside = (v["interval_low"] <= v["exact"]) & (v["exact"] <= v["interval_high"])
    assert fd["coverage_95"] == pytest.approx(float(np.mean(inside[random])))
    for row in fd["blocks"]:
        low, high = row["estimate_trace_interval"]
        assert low <= row["estimate_trace"] <= (math.inf if high is None else high)
    # The razor's interval is half that of its log det, shifted by the exact terms.
    rz = factory_report["dimension"]["razor"]
    if "not_run" not in rz and rz["interval"] is not None:
        shift = rz["value"] - rz["half_log_det"]
        np.testing.assert_allclose(rz["interval"], np.add(rz["half_log_det_interval"], shift))
    hvp = factory_report["landscape"]["trace"]["hvp"]
    assert hvp["interval"][0] <= hvp["value"] <= hvp["interval"][1]


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


def test_gaussian_family_with_a_variance(files: dict[str, Path]) -> None:
    """--family gaussian --variance σ²: the exact diagonal is the library's for
    Gaussian(variance=σ²) (1/σ² times the unit one); the overview gives the RMSE."""
    from fisherbound.adapters.torch import linearize
    from fisherbound.families import Gaussian
    from fisherbound.fisher import fisher_diagonal

    argv = ["--factory", "make_multilabel", "--family", "gaussian", "--variance", "0.25"]
    r = run_report(files, str(files["model.py"]), "regression", *argv)
    an = r["analysed"]
    assert (an["family"], an["variance"]) == ("Gaussian", 0.25)
    assert "accuracy" not in an
    spec = importlib.util.spec_from_file_location("user_model_gaussian", files["model.py"])
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = np.load(files["regression"])
    model = mod.make_multilabel().eval()
    z = model(torch.as_tensor(data["x"])).detach().numpy()
    assert an["rmse"] == pytest.approx(float(np.sqrt(np.mean((z - data["y"]) ** 2))), rel=1e-12)
    lin = linearize(model, torch.as_tensor(data["x"]))
    unit = fisher_diagonal(lin, Gaussian()).numpy()
    exact = np.asarray(r["fisher_diagonal"]["values"]["exact"])
    np.testing.assert_allclose(exact, 4.0 * unit, rtol=1e-10, atol=1e-14)
    check_bounds(r)
    text = (r["_folder"] / "report.md").read_text()
    assert "Gaussian (regression, σ² = 0.25)" in text
    assert "root mean squared error on them" in text


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
    (M, "infinite", [], "the inputs (key x) must be finite; got inf in examples [5]", ""),
    (M, "data", ["--grid", "1"], "argument --grid: must be an integer of at least 2", "got 1"),
    (M, "data", ["--seed", "-1"], "argument --seed: must be a non-negative integer", "got -1"),
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
    ("model.py:make_nonfinite", "data", [], "parameters must be finite", "['0.weight']"),
    ("model.py:make_random", "data", [], "two forward passes on the same batch", "disagree"),
    ("model.py:make_half", "data", [], "must be float32 or float64; got torch.float16", ""),
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
        "Bernoulli labels must be rows in [0, 1] of shape (N, C) = (40, 3)",
        "(40,)",
    ),
    (
        "model.py:make_multilabel",
        "data",
        ["--family", "gaussian"],
        "Gaussian labels must be real targets of shape (N, C) = (40, 3)",
        "(40,)",
    ),
    (M, "data", ["--variance", "2"], "--variance is for the gaussian family", "categorical"),
    (M, "data", ["--variance", "0"], "argument --variance: must be a positive", "got 0"),
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


# --------------------------------------------------------------------------- #
# models whose logits have position axes: a tiny token classifier (N, T, C)

SEQ_PY = """
import torch
from torch import nn


class Tagger(nn.Module):
    '''Token ids (N, T) -> logits (N, T, C): embedding, causal self-attention, head.'''

    def __init__(self, vocab=7, dim=4, classes=5, length=6, layout="ntc"):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.3 * torch.randn(length, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)
        self.layout = layout

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        t = input_ids.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        z = self.head(torch.tanh(h + scores.softmax(-1) @ v))
        if self.layout == "nct":  # PyTorch's (N, C, T), in a dict: --output, --class-axis
            return {"logits": z.transpose(1, 2), "hidden": h}
        return z


def make_model():
    torch.manual_seed(3)
    return Tagger().double().eval()


def make_dict_model():
    model = make_model()
    model.layout = "nct"
    return model
"""

#: Sequence DATA: N = 4 sequences of T = 6 tokens, padding masked, labels -100 there.
SEQ_N, SEQ_T, SEQ_C = 4, 6, 5


@pytest.fixture(scope="module")
def seq_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("seq")
    (folder / "seq.py").write_text(SEQ_PY)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 7, size=(SEQ_N, SEQ_T))
    mask = np.ones((SEQ_N, SEQ_T), dtype=bool)
    mask[0, 4:] = False  # padding
    mask[2, 2:] = False
    y = rng.integers(0, SEQ_C, size=(SEQ_N, SEQ_T))
    y[~mask] = -100
    y[1, 0] = -100  # an ignored label inside a sequence (a prompt token)
    np.savez(folder / "seq.npz", x=ids, y=y, mask=mask)
    np.savez(
        folder / "keywords.npz",
        x_input_ids=ids,
        x_attention_mask=mask.astype(np.int64),
        y=y,
    )
    short = rng.integers(0, SEQ_C, size=(SEQ_N, SEQ_T - 1))
    np.savez(folder / "bad_mask_shape.npz", x=ids, y=y, mask=mask[:, :-1])
    np.savez(folder / "bad_mask_values.npz", x=ids, y=y, mask=2 * mask.astype(np.int64))
    np.savez(folder / "bad_label_shape.npz", x=ids, y=short)
    np.savez(folder / "all_masked.npz", x=ids, y=np.where(mask, -100, y), mask=mask)
    np.savez(folder / "big_label.npz", x=ids, y=np.where(np.arange(SEQ_T) == 1, 9, y), mask=mask)
    np.savez(folder / "both_inputs.npz", x=ids, x_input_ids=ids, y=y)
    np.savez(folder / "ragged.npz", x_input_ids=ids, x_attention_mask=mask[:3], y=y)
    soft = rng.dirichlet(np.ones(SEQ_C), size=(SEQ_N, SEQ_T))  # target distributions
    np.savez(folder / "soft.npz", x=ids, y=np.where(mask[..., None], soft, -100.0), mask=mask)
    np.savez(folder / "soft_bad.npz", x=ids, y=soft * 0.9, mask=mask)
    return {"dir": folder, "ids": ids, "mask": mask, "y": y, "soft": soft}


def run_seq(seq: dict[str, Any], factory: str, data: str, *extra: str) -> dict[str, Any]:
    folder = seq["dir"]
    out = folder / f"out-{factory}-{data}"
    argv = ["report", f"{folder / 'seq.py'}:{factory}", str(folder / f"{data}.npz")]
    assert main([*argv, "--out", str(out), *FAST, *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    report["markdown"] = (out / "report.md").read_text()
    report["html"] = (out / "index.html").read_text()
    return report


@pytest.fixture(scope="module")
def seq_report(seq_files: dict[str, Any]) -> dict[str, Any]:
    return run_seq(seq_files, "make_model", "seq")


def _seq_model(seq: dict[str, Any]) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("seq_model_for_tests", seq["dir"] / "seq.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_model()


def test_sequence_report_counts_the_positions(
    seq_files: dict[str, Any], seq_report: dict[str, Any]
) -> None:
    an = seq_report["analysed"]
    assert an["output_shape"] == [SEQ_N, SEQ_T, SEQ_C]
    assert (an["num_inputs"], an["num_outputs"]) == (SEQ_N, SEQ_C)
    counted = seq_files["mask"] & (seq_files["y"] != -100)
    assert an["positions"] == {
        "shape": [SEQ_T],
        "per_example": SEQ_T,
        "total": SEQ_N * SEQ_T,
        "counted": int(counted.sum()),  # 24 - 6 padded - 1 ignored = 17
        "masked": SEQ_N * SEQ_T - int(counted.sum()),
        "masked_by_mask": 6,
        "ignored_labels": 1,
        "ignore_index": -100,
    }
    assert int(counted.sum()) == 17
    assert seq_report["data"]["mask_key"] == "mask"
    assert seq_report["core_space"]["num_inputs"] == 17  # one metric per counted position
    assert seq_report["dimension"]["rank_bound"]["counted_positions"] == 17
    assert seq_report["landscape"]["num_counted"] == 17  # the mean is over them
    assert seq_report["landscape"]["num_inputs"] == SEQ_N
    for key in ("fisher_diagonal", "estimators", "core_space", "spectrum", "landscape"):
        assert "not_run" not in seq_report[key], seq_report[key]
    v = {k: np.asarray(x) for k, x in seq_report["fisher_diagonal"]["values"].items()}
    # Some entries are zero up to rounding (1e-33): allow rounding of the largest entry.
    slack = 1e-12 * (v["upper"] + np.max(v["upper"]))
    assert np.all(v["lower"] <= v["exact"] + slack)
    assert np.all(v["exact"] <= v["upper"] + slack)
    assert seq_report["fisher_diagonal"]["bounds_hold"]
    assert seq_report["core_space"]["lambda_max_bounds_hold"] == 1.0
    assert seq_report["spectrum"]["brackets_hold"]
    md = seq_report["markdown"]
    assert "| logits | (N, T, C) = (4, 6, 5) |" in md
    assert "| positions per input P | 6 |" in md
    assert (
        "| counted positions K | 17 of N P = 24 (7 masked: 6 by the mask, 1 labelled with "
        "the ignore index -100) |"
    ) in md
    assert "Per-token convention: every Fisher quantity is the SUM over the inputs and " in md
    assert "MEAN loss over the K counted positions" in md
    assert "at each of the 17 counted positions" in md
    assert "The mean loss over the 17 counted positions of 4 inputs near θ" in md
    assert "Not run" not in md
    assert "17 counted positions" in seq_report["html"]


def test_sequence_report_numbers_against_direct_computations(
    seq_files: dict[str, Any], seq_report: dict[str, Any]
) -> None:
    from torch.nn import functional as F

    from fisherbound.adapters.torch import linearize
    from fisherbound.families import Categorical
    from fisherbound.fisher import fisher_diagonal

    model = _seq_model(seq_files)
    ids = torch.as_tensor(seq_files["ids"])
    y = torch.as_tensor(seq_files["y"])
    counted = torch.as_tensor(seq_files["mask"]) & (y != -100)
    got = np.asarray(seq_report["fisher_diagonal"]["values"]["exact"])
    lin = linearize(model, ids, mask=counted)
    np.testing.assert_allclose(got, fisher_diagonal(lin, Categorical()).numpy(), rtol=1e-10)
    # Independently: Σ_x Σ_t counted (J_xtᵀ (diag p − p pᵀ) J_xt)_ii by dense Jacobians.
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(*flat: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (ids,))

    jac = torch.func.jacrev(logits, argnums=tuple(range(len(names))))(*params.values())
    j = torch.cat([g.reshape(SEQ_N, SEQ_T, SEQ_C, -1) for g in jac], dim=-1)
    p = logits(*params.values()).softmax(-1)
    metric = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    per = torch.einsum("ntcd,ntce,nted->ntd", j, metric, j)
    want = (per * counted[..., None]).sum(dim=(0, 1))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-14)
    # The landscape's loss at θ is the mean cross-entropy over the counted positions.
    z = logits(*params.values())
    target = torch.where(counted, y, -100)
    ce = F.cross_entropy(z.reshape(-1, SEQ_C), target.reshape(-1), ignore_index=-100)
    at_theta = seq_report["landscape"]["random_plane"]["surface"]["loss_at_theta"]
    assert at_theta == pytest.approx(float(ce), rel=1e-10)
    # The accuracy is over the counted positions.
    right = (z.argmax(-1) == y)[counted]
    assert seq_report["analysed"]["accuracy"] == pytest.approx(float(right.double().mean()))


def test_sequence_report_with_soft_targets(seq_files: dict[str, Any], capsys: Any) -> None:
    # --soft-targets: DATA's labels are target distributions (N, T, C); padding holds -100.
    from torch.nn import functional as F

    report = run_seq(seq_files, "make_model", "soft", "--soft-targets")
    mask = torch.as_tensor(seq_files["mask"])
    assert report["analysed"]["positions"]["counted"] == int(mask.sum())  # 18: no ignore index
    for key in ("fisher_diagonal", "estimators", "landscape"):
        assert "not_run" not in report[key], report[key]
    model = _seq_model(seq_files)
    with torch.no_grad():
        z = model(torch.as_tensor(seq_files["ids"]))
    soft = torch.as_tensor(seq_files["soft"])
    ce = F.cross_entropy(z.transpose(1, 2), soft.transpose(1, 2), reduction="none")[mask].mean()
    at_theta = report["landscape"]["random_plane"]["surface"]["loss_at_theta"]
    assert at_theta == pytest.approx(float(ce), rel=1e-10)  # the mean soft cross-entropy
    right = (z.argmax(-1) == soft.argmax(-1))[mask]
    assert report["analysed"]["accuracy"] == pytest.approx(float(right.double().mean()))
    folder = seq_files["dir"]
    argv = ["report", f"{folder / 'seq.py'}:make_model", str(folder / "soft_bad.npz")]
    err = error_of([*argv, "--soft-targets", "--out", str(folder / "out-soft-bad")], capsys)
    assert "--soft-targets: y must hold target distributions: rows summing to 1" in err
    err = error_of([*argv, "--soft-targets", "--family", "bernoulli"], capsys)
    assert "--soft-targets is for the categorical family" in err


def test_keyword_inputs_dict_output_and_class_axis(
    seq_files: dict[str, Any], seq_report: dict[str, Any], capsys: Any
) -> None:
    # x_input_ids / x_attention_mask -> model(input_ids=..., attention_mask=...); the
    # attention mask is the mask; the model returns {"logits": (N, C, T), ...}.
    r = run_seq(seq_files, "make_dict_model", "keywords", "--output", "logits", "--class-axis", "1")
    assert "P = 6, K = 17 counted positions" in capsys.readouterr().out
    assert r["analysed"]["positions"] == seq_report["analysed"]["positions"]
    assert r["data"]["mask_key"] == "x_attention_mask"
    assert "the keyword input x_attention_mask is the mask" in r["data"]["description"]
    np.testing.assert_allclose(
        r["fisher_diagonal"]["values"]["exact"],
        seq_report["fisher_diagonal"]["values"]["exact"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        r["landscape"]["hessian"]["eigenvalues"],
        seq_report["landscape"]["hessian"]["eigenvalues"],
        rtol=1e-8,
    )


SEQ_CASES = [
    (
        "make_model",
        "bad_mask_shape",
        [],
        "the mask (key mask) must have the shape (N, *S)",
        "(4, 5)",
    ),
    ("make_model", "bad_mask_values", [], "the mask (key mask) must be boolean or 0/1", "[0, 2]"),
    (
        "make_model",
        "bad_label_shape",
        [],
        "logits of shape (N, T, C) = (4, 5, C) for the labels' positions",
        "got shape (4, 6, 5)",
    ),
    ("make_model", "all_masked", [], "no position counts", "--ignore-index"),
    (
        "make_model",
        "big_label",
        [],
        "class indices in [0, C) = [0, 5) for the model's 5 outputs, or the ignore index",
        "values [9]",
    ),
    ("make_model", "both_inputs", [], "holds both x and keyword inputs x_NAME", "x_input_ids"),
    ("make_model", "ragged", [], "every keyword input must have the same N rows", "3"),
    ("make_dict_model", "keywords", [], "must return a tensor of logits", "--output"),
    (
        "make_dict_model",
        "keywords",
        ["--output", "scores"],
        "--output scores: output='scores' selects nothing",
        "logits",
    ),
    (
        "make_dict_model",
        "keywords",
        ["--output", "logits", "--class-axis", "5"],
        "--class-axis must be an axis of the model's output of shape (4, 5, 6)",
        "got 5",
    ),
    ("make_model", "seq", ["--class-axis", "0"], "--class-axis: must not be 0", ""),
    ("make_model", "seq", ["--ignore-index", "x"], "--ignore-index: must be an integer", ""),
]


@pytest.mark.parametrize(("factory", "data", "extra", "first", "second"), SEQ_CASES)
def test_bad_sequence_data_is_named(
    seq_files: dict[str, Any],
    factory: str,
    data: str,
    extra: list[str],
    first: str,
    second: str,
    capsys: Any,
) -> None:
    folder = seq_files["dir"]
    argv = ["report", f"{folder / 'seq.py'}:{factory}", str(folder / f"{data}.npz")]
    err = error_of([*argv, "--out", str(folder / "x"), *extra], capsys)
    assert first in err
    assert second in err
    assert len(err.strip().splitlines()[-1]) > 0


@pytest.mark.slow  # about 5-10 s: the analysis of the sequence model, less two stages
def test_a_refused_analysis_is_reported_not_raised(
    seq_files: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fisherbound.dimension
    import fisherbound.fisher
    from fisherbound.report import Settings, analyse, torch_subject, write_report

    refusal = "exact quantities need 30 cotangents per example, above max_cotangents = 4"

    def refuse(*args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        raise ValueError(refusal)

    monkeypatch.setattr(fisherbound.fisher, "fisher_diagonal", refuse)
    monkeypatch.setattr(fisherbound.dimension, "razor", refuse)
    settings = Settings(
        num_probes=2, slq_probes=2, lanczos_steps=6, max_count=2, top_k=2, grid_points=3,
        trace_probes=2, repeats=1, progress=False,
    )  # fmt: skip
    model = _seq_model(seq_files)
    subject = torch_subject(model)
    ids, y, mask = seq_files["ids"], seq_files["y"], seq_files["mask"]
    analysis = analyse(subject, ids, y, mask=mask, ignore_index=-100, settings=settings)
    numbers = analysis.numbers
    assert numbers["fisher_diagonal"] == {"not_run": f"ValueError: {refusal}"}
    assert "exact Fisher diagonal" in numbers["estimators"]["not_run"]
    assert numbers["dimension"]["razor"] == {"not_run": f"ValueError: {refusal}"}
    assert numbers["spectrum"]["top_fraction_of_trace"] is None  # no exact trace
    assert "not_run" not in numbers["landscape"]
    write_report(analysis, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert f"## Fisher diagonal per layer\n\nNot run for this model: ValueError: {refusal}" in md
    assert "## Estimators compared\n\nNot run for this model: it needs the exact" in md
    assert f"The razor complexity (razor) did not run: ValueError: {refusal}" in md
    files = {f["file"] for f in json.loads((tmp_path / "report.json").read_text())["figures"]}
    assert files == {"core_space.png", "fisher_spectrum.png", "landscape.png"}
    # A model without positions still raises: nothing is hidden there.
    rng = np.random.default_rng(0)
    flat = torch.nn.Linear(3, 4).double()
    with pytest.raises(ValueError, match="max_cotangents"):
        analyse(
            torch_subject(flat), rng.standard_normal((5, 3)), rng.integers(0, 4, 5),
            settings=settings,
        )  # fmt: skip


def test_skipped_sections_say_so(files: dict[str, Path]) -> None:
    r = run_report(
        files, f"{files['model.py']}:make_model", "data", "--skip", "estimators", "landscape"
    )
    assert r["estimators"]["not_run"] == "skipped on request (--skip estimators)"
    assert r["landscape"]["skipped"] == "landscape"
    assert "exact" in r["spectrum"]  # the others ran
    assert len(r["dimension"]["local_dimension"]) == 3
    assert {f["file"] for f in r["figures"]} == {
        "fisher_diagonal.png",
        "core_space.png",
        "fisher_spectrum.png",
    }
    from fisherbound._report.sections import build_sections

    titles = dict(build_sections(r, r["figures"]))
    assert titles["Estimators compared"] == [
        ("p", "Not run: skipped on request (--skip estimators).")
    ]


def test_the_cheapest_estimator_per_error_level() -> None:
    from fisherbound._report.diagonal import cheapest
    from fisherbound._report.sections import cheapest_marks

    def row(name: str, call: str, cost: float, error: float | None) -> dict[str, Any]:
        return {"estimator": name, "call": call, "cost_gradient_steps": cost,
                "relative_error": error}  # fmt: skip

    rows = [
        row("exact", "fisher_diagonal", 12.0, 0.0),
        row("bounds", "fisher_bounds", 1.0, None),
        row("one probe", "detach_and_mix(num_probes=1)", 1.2, 0.9),
        row("32 probes", "detach_and_mix(num_probes=32)", 8.0, 0.08),
        row("empirical", "empirical", 0.5, 0.05),  # biased: never the answer
    ]
    out = cheapest(rows, (0.01, 0.1, 1.0))
    assert [e["estimator"] for e in out] == ["exact", "32 probes", "one probe"]
    assert out[1]["cost_gradient_steps"] == 8.0
    assert cheapest(rows[1:3], (0.01,))[0]["estimator"] is None
    marks = cheapest_marks({"cheapest": out})
    assert marks == {"exact": "≤ 1.0%", "32 probes": "≤ 10.0%", "one probe": "≤ 100.0%"}


def test_the_loss_only_trace_is_shown_with_its_caveat() -> None:
    from fisherbound._report.landscape import LOSS_ONLY_CAVEAT
    from fisherbound._report.sections import trace_text

    hvp = {"value": 2767.0, "std_error": 324.0, "interval": [2001.0, 3533.0]}
    alone = trace_text({"num_probes": 8, "hvp": hvp, "loss_only": None})
    assert "2767 ± 3.2e+02 (95% interval 2001 … 3533)" in alone
    assert "loss values" not in alone
    kinks = "loss_trace(method='loss'): the loss functions report kinked modules"
    lo = {"value": -6896.0, "std_error": 1240.0, "caveats": [LOSS_ONLY_CAVEAT, kinks]}
    text = trace_text({"num_probes": 8, "hvp": hvp, "loss_only": lo})
    assert text.index("2767") < text.index("-6896")  # the HVP trace first
    assert f"Caveat: {LOSS_ONLY_CAVEAT} {kinks}" in text


def test_the_loss_only_trace_records_the_kink_warning() -> None:
    from fisherbound._report.landscape import LOSS_ONLY_CAVEAT, loss_only_trace
    from fisherbound._report.settings import Settings
    from fisherbound.adapters.torch import loss_function

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    out = loss_only_trace([loss_function(model, x, y)], Settings(trace_probes=4), 0)
    assert out["caveats"][0] == LOSS_ONLY_CAVEAT
    assert "kinks" in out["reasons"]
    assert len(out["caveats"]) == 1 + len(out["reasons"])
    assert math.isfinite(out["value"])


def test_intervals_are_shown_with_their_ends() -> None:
    from fisherbound._report.sections import ci

    assert ci(12.0, 1.5, [9.5, 14.25]) == "12 [9.5, 14.25]"
    assert ci(12.0, 1.5, [9.5, math.inf]) == "12 [9.5, ∞]"  # few probes: no upper bound
    assert ci(12.0, 0.0, [12.0, 12.0]) == "12"  # exact: no interval to show
    assert ci(12.0, 1.5, None) == "12 ± 1.5"  # an older report.json without intervals


# --------------------------------------------------------------------------- #
# the report folder as a reader gets it: links, figures, the numbers of the text


class Links(HTMLParser):
    """Every href and src of a page, and the attributes of every <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.links += [found[k] for k in ("href", "src") if k in found]
        if tag == "img":
            self.images.append(found)


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The chunks of a PNG file by type, each CRC checked (the first of each type)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        crc = int.from_bytes(data[at + 8 + length : at + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.setdefault(kind, body)
        at += 12 + length
        if kind == b"IEND":
            break
    assert b"IHDR" in chunks
    assert b"IEND" in chunks
    return chunks


def test_the_html_has_no_broken_links_or_images(factory_report: dict[str, Any]) -> None:
    """Every local href/src is a file of the folder; every <img> a valid PNG at 2 × 80 dpi."""
    import matplotlib.image

    from fisherbound._report.render import CSS_PER_INCH

    folder = factory_report["_folder"]
    parser = Links()
    parser.feed((folder / "index.html").read_text(encoding="utf-8"))
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    local = [
        link
        for link in parser.links + re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
        if not re.match(r"[a-z][a-z0-9+.-]*:|#", link)
    ]
    assert local, "the page links no figure"
    for link in local:
        path = (folder / unquote(link)).resolve()
        assert path.is_file(), f"{link} is not a file of the report folder"
        assert path.parent == folder.resolve(), f"{link} points outside the report folder"
    figures = {f["file"]: f for f in factory_report["figures"]}
    assert sorted(img["src"] for img in parser.images) == sorted(figures)
    for img in parser.images:
        data = (folder / img["src"]).read_bytes()
        chunks = png_chunks(data)
        width = int.from_bytes(chunks[b"IHDR"][:4], "big")
        height = int.from_bytes(chunks[b"IHDR"][4:8], "big")
        pixels = matplotlib.image.imread(folder / img["src"])  # decodes every row
        assert pixels.shape[:2] == (height, width)
        entry = figures[img["src"]]
        assert (entry["width"], entry["height"], entry["dpi"]) == (width, height, 160)
        # pHYs: pixels per metre, the same on both axes; 160 dpi is twice the former 80.
        per_metre = int.from_bytes(chunks[b"pHYs"][:4], "big")
        assert round(per_metre * 0.0254) == 2 * 80
        assert width >= 1000, f"{img['src']} is {width} pixels wide"
        # Shown at CSS_PER_INCH pixels per inch: the PNG has 1.6 pixels per CSS pixel.
        assert int(img["width"]) == round(width * CSS_PER_INCH / 160)
        assert int(img["height"]) == round(height * CSS_PER_INCH / 160)
        assert img["alt"]


def test_exactly_zero_entries_are_counted_and_said(factory_report: dict[str, Any]) -> None:
    """The weights from the input that is 0 everywhere: counted, per block, and in the text."""
    fd = factory_report["fisher_diagonal"]
    exact = np.asarray(fd["values"]["exact"])
    count = int(np.count_nonzero(exact == 0.0))
    assert count == 12  # 0.weight[:, 5], one per hidden unit
    assert fd["zero_entries"] == {"count": count, "of": exact.size, "fraction": count / 136}
    blocks = factory_report["analysed"]["blocks"]
    for row in fd["blocks"]:
        if row["block"] == "total":
            assert row["zero_entries"] == count
            continue
        (b,) = [b for b in blocks if b["name"] == row["block"]]
        part = exact[b["offset"] : b["offset"] + b["size"]]
        assert row["zero_entries"] == int(np.count_nonzero(part == 0.0))
    # Exactly the weights of input 5 are 0; every other weight of the layer moves an output.
    w0 = exact[:72].reshape(12, 6)
    assert np.all(w0[:, 5] == 0.0)
    assert np.all(w0[:, :5] > 0.0)
    md = (factory_report["_folder"] / "report.md").read_text(encoding="utf-8")
    assert (
        f"{count} of the D = 136 entries of diag F (8.8%) are exactly 0 (0.weight 12 of 72)" in md
    )
    assert "8.8% of the parameters have F_ii = 0 exactly" in md


def test_the_spectral_density_lives_on_0_to_infinity(factory_report: dict[str, Any]) -> None:
    """F is PSD: the report's density is reflected at 0, integrates to 1 on [0, ∞)."""
    d = factory_report["spectrum"]["density"]
    grid, phi = np.asarray(d["grid"]), np.asarray(d["density"])
    assert grid[0] == 0.0
    assert np.all(np.diff(grid) > 0)
    assert np.all(phi >= 0.0)
    step = grid[1] - grid[0]
    # Trapezoid rule; the grid stops 3 widths above the largest node (≤ 0.2% lost).
    assert float(np.sum(phi) * step - 0.5 * step * (phi[0] + phi[-1])) == pytest.approx(
        1.0, abs=0.01
    )
    assert d["support"] == [0.0, None]
    # Without the reflection part of the mass sat below 0 (the artefact).
    assert 0.0 < d["mass_below_zero_unreflected"] < 1.0


def test_the_hessian_plane_numbers_match_its_text(factory_report: dict[str, Any]) -> None:
    """The text says H_αβ = diag(λ_max, λ_min); the numbers printed are H_αβ's eigenvalues."""
    from fisherbound._report.sections import fmt

    ls = factory_report["landscape"]
    c = ls["hessian_plane"]["curvature"]
    h = np.asarray(c["projected_hessian"])
    eig = np.linalg.eigvalsh(h)[::-1]
    np.testing.assert_allclose(c["hessian_eigenvalues"], eig, rtol=1e-12, atol=1e-15)
    lam, res = ls["hessian"]["eigenvalues"], ls["hessian"]["residuals"]
    for i in range(2):  # a Ritz pair's Rayleigh quotient is its Ritz value
        assert abs(eig[i] - lam[i]) <= 1e-8 * abs(lam[0]) + res[i]
    # The graph curvatures are a different number: those of z = f(α, β) with slope g.
    g = np.asarray(c["gradient"])
    assert c["slope_norm"] == pytest.approx(float(np.linalg.norm(g)))
    w = 1.0 + g @ g
    gauss = np.linalg.det(h) / w**2
    mean = ((1 + g[1] ** 2) * h[0, 0] - 2 * g[0] * g[1] * h[0, 1] + (1 + g[0] ** 2) * h[1, 1]) / (
        2 * w**1.5
    )
    root = math.sqrt(max(mean**2 - gauss, 0.0))
    np.testing.assert_allclose(c["principal"], [mean + root, mean - root], rtol=1e-9, atol=1e-12)
    md = (factory_report["_folder"] / "report.md").read_text(encoding="utf-8")
    assert f"the 2 × 2 projected Hessian H_αβ of the Hessian plane are {fmt(eig[0])} and " in md
    assert f"| Hessian | {fmt(eig[0])}, {fmt(eig[1])} | {fmt(c['slope_norm'], 3)} |" in md
    # Every section ends with its plain-words paragraph.
    assert md.count("> **What this means.**") == len(re.findall(r"^## ", md, flags=re.M)) == 8
