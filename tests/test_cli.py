"""``fisherbound demo``: the plain command runs end to end and its report is sound.

The demo is run once per module (small sizes, as a subprocess: the README's
``python3 -m fisherbound demo``), then its report.json, report.md and index.html
are checked: the sections are there with finite numbers, the certified bounds
bracket the exact diagonal, the error bars are honest, and every figure the page
shows exists and is a non-empty PNG (rendered in headless Chromium when one is
installed, parsed with html.parser otherwise).
"""

from __future__ import annotations

import html.parser
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fisherbound.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: Small sizes: a 64-8-10 MLP, 60 analysed digits; every section still runs.
SMALL = [
    "--hidden", "8",
    "--epochs", "2",
    "--test-inputs", "60",
    "--landscape-inputs", "100",
    "--grid", "5",
    "--trace-probes", "4",
    "--num-probes", "4",
    "--slq-probes", "4",
    "--repeats", "1",
    "--top-k", "3",
    "--quiet",
]  # fmt: skip

FIGURES = {
    "fisher_diagonal.png",
    "estimators.png",
    "core_space.png",
    "fisher_spectrum.png",
    "landscape.png",
}

SECTIONS = (
    "analysed",
    "fisher_diagonal",
    "estimators",
    "core_space",
    "spectrum",
    "dimension",
    "landscape",
    "timing",
    "figures",
)


def _no_nan(token: str) -> Any:
    msg = f"report.json must write NaN and infinities as null; found {token}"
    raise AssertionError(msg)


def load_report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "report.json").read_text(), parse_constant=_no_nan)


def finite(*values: Any) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    sklearn = pytest.importorskip("sklearn")
    assert sklearn
    pytest.importorskip("matplotlib")
    # Run where a user would: in a git repository, with the default report folder.
    repo = tmp_path_factory.mktemp("demo")
    if shutil.which("git") is not None:
        subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=60)
    cmd = [sys.executable, "-m", "fisherbound", "demo", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return repo / "fisherbound-report", proc


def test_demo_default_folder_is_ignored_by_git(demo: Any) -> None:
    out, _ = demo
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=out.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert (out / "index.html").is_file()
    assert status.stdout == "", status.stdout


# --------------------------------------------------------------------------- #
# the plain command and its files


def test_demo_is_a_plain_command_with_a_one_line_summary(demo: Any) -> None:
    out, proc = demo
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fisherbound demo (numpy): MLP 64-8-10")
    assert lines[0].endswith(str(out / "index.html"))
    assert "Traceback" not in proc.stderr


def test_demo_writes_the_report_folder(demo: Any) -> None:
    out, _ = demo
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "index.html"} | FIGURES <= names


def test_report_json_has_every_section_with_finite_numbers(demo: Any) -> None:
    out, _ = demo
    r = load_report(out)
    for key in SECTIONS:
        assert key in r, key
    an = r["analysed"]
    assert (an["num_inputs"], an["num_outputs"], an["num_params"]) == (60, 10, 64 * 8 + 8 + 90)
    assert an["family"] == "Categorical"
    assert 0.0 <= an["accuracy"] <= 1.0
    assert r["training"]["steps"] == 2 * ((1797 - 60) // 128)
    assert {f["file"] for f in r["figures"]} == FIGURES
    for row in r["fisher_diagonal"]["blocks"]:
        assert finite(row["lower_trace"], row["exact_trace"], row["upper_trace"])
        assert finite(row["estimate_trace"], row["estimate_trace_std_error"])
    es = r["estimators"]
    assert es["gradient_step_seconds"] > 0
    for row in es["rows"]:
        assert row["seconds"] > 0
        assert row["cost_gradient_steps"] > 0
        if row["call"] == "fisher_bounds":
            assert finite(row["lower_relative_error"], row["upper_relative_error"])
        else:
            assert finite(row["relative_error"], row["trace_relative_error"])
    for key in ("lambda_max", "trace", "effective_rank", "log_pseudo_determinant"):
        assert finite(*r["core_space"][key].values())
    sp = r["spectrum"]
    for kernel in ("exact", "lower", "upper"):
        vals = sp[kernel]["eigenvalues"]
        assert len(vals) == 3
        assert finite(*vals)
        assert vals == sorted(vals, reverse=True)
    assert finite(*sp["density"]["density"])
    dim = r["dimension"]
    assert [c["eps"] for c in dim["local_dimension"]] == [100.0, 1.0, 0.01]
    for c in dim["local_dimension"]:
        assert finite(c["value"], c["std_error"])
        assert 0 <= c["value"] <= an["num_params"]
    assert finite(*(dim["razor"][k] for k in ("value", "neg_log_likelihood", "half_log_det")))
    ls = r["landscape"]
    assert finite(*ls["hessian"]["eigenvalues"])
    for plane in ("random_plane", "hessian_plane"):
        values = np.asarray(ls[plane]["surface"]["values"], dtype=float)
        assert values.shape == (5, 5)
        assert np.all(np.isfinite(values))
    assert finite(ls["trace"]["loss_only"]["value"], ls["trace"]["hvp"]["value"])


def test_report_bounds_bracket_the_exact_diagonal(demo: Any) -> None:
    out, _ = demo
    fd = load_report(out)["fisher_diagonal"]
    v = {k: np.asarray(x, dtype=float) for k, x in fd["values"].items()}
    slack = 1e-12 * v["upper"] + 1e-300
    assert np.all(v["lower"] <= v["exact"] + slack)
    assert np.all(v["exact"] <= v["upper"] + slack)
    assert np.all(v["lower"] >= 0)
    assert fd["bounds_hold"]
    for row in fd["blocks"]:
        assert row["bounds_hold"]
        assert row["lower_trace"] <= row["exact_trace"] * (1 + 1e-12)
        assert row["exact_trace"] <= row["upper_trace"] * (1 + 1e-12)
    assert fd["blocks"][-1]["block"] == "total"
    assert fd["blocks"][-1]["exact_trace"] == pytest.approx(v["exact"].sum(), rel=1e-12)


def test_report_other_brackets_hold(demo: Any) -> None:
    out, _ = demo
    r = load_report(out)
    assert r["core_space"]["lambda_max_bounds_hold"] == 1.0
    assert r["core_space"]["lower_bound_ratio"]["max"] <= 1 + 1e-9
    assert r["core_space"]["upper_bound_ratio"]["min"] >= 1 - 1e-9
    sp = r["spectrum"]
    assert sp["brackets_hold"]
    tr = r["fisher_diagonal"]["blocks"][-1]["exact_trace"]
    assert sp["trace"] == pytest.approx(tr, rel=1e-12)
    assert 0 < sp["exact"]["eigenvalues"][0] <= tr * (1 + 1e-9)


def test_report_estimates_carry_honest_error_bars(demo: Any) -> None:
    out, _ = demo
    r = load_report(out)
    fd = r["fisher_diagonal"]
    est = np.asarray(fd["values"]["estimate"])
    for blk, row in zip(r["analysed"]["blocks"], fd["blocks"], strict=False):
        # The block trace and its error bar come from the same probes as the diagonal.
        part = est[blk["offset"] : blk["offset"] + blk["size"]].sum()
        assert row["estimate_trace"] == pytest.approx(part, rel=1e-9)
        # Fixed seed: the exact trace lies within 5 standard errors (STYLE's tolerance).
        assert (
            abs(row["estimate_trace"] - row["exact_trace"]) <= 5 * row["estimate_trace_std_error"]
        )
    rows = {row["call"]: row for row in r["estimators"]["rows"]}
    assert rows["fisher_diagonal"]["relative_error"] == pytest.approx(0.0, abs=1e-12)
    assert rows["fisher_bounds"]["lower_relative_error"] > 0
    assert rows["empirical"]["coverage_95"] is None  # zero standard error: no claim


def test_report_markdown_shows_the_numbers_and_figures(demo: Any) -> None:
    out, _ = demo
    md = (out / "report.md").read_text()
    r = load_report(out)
    for title in (
        "## Fisher diagonal per layer",
        "## Estimators compared",
        "## Core space",
        "## Top of the Fisher spectrum",
        "## Local dimension and razor",
        "## Loss landscape",
    ):
        assert title in md
    for name in FIGURES:
        assert f"]({name})" in md
    assert f"{r['fisher_diagonal']['blocks'][-1]['exact_trace']:.4g}" in md


# --------------------------------------------------------------------------- #
# the page opens in a browser and every figure is a real image


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")
        elif tag == "table":
            self.tables += 1


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file(), path
    assert path.stat().st_size > 0, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    assert pixels.ndim == 3, (path, pixels.shape)
    assert min(pixels.shape[:2]) >= 100, (path, pixels.shape)
    flat = pixels.reshape(-1, pixels.shape[-1])
    assert np.ptp(flat, axis=0).max() > 0.1, f"{path} is a single flat colour"


def test_index_html_shows_every_figure(demo: Any, tmp_path: Path) -> None:
    out, _ = demo
    page = out / "index.html"
    text = page.read_text(encoding="utf-8")
    browser = _browser()
    if browser is not None:  # render it as a user would see it
        shot = tmp_path / "page.png"
        base = [browser, "--headless", "--no-sandbox", "--disable-gpu"]
        dom = subprocess.run(
            [*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
        )
        assert dom.returncode == 0, dom.stderr[-2000:]
        text = dom.stdout
        subprocess.run(
            [*base, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
            capture_output=True,
            timeout=120,
            check=True,
        )
        check_png(shot)
    parser = _Images()
    parser.feed(text)
    assert parser.tables >= 6
    assert set(parser.sources) == FIGURES
    for src in parser.sources:
        assert "/" not in src
        assert not src.startswith(("http", "data:"))
        check_png(out / src)


# --------------------------------------------------------------------------- #
# help and bad input


def test_python_dash_m_help_lists_the_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fisherbound", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "demo" in proc.stdout
    assert "report" in proc.stdout
    assert "'fisherbound COMMAND --help'" in proc.stdout


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        ("demo", ["--framework", "{numpy,torch,jax}", "--out", "--seed", "digits", "--num-probes"]),
        (
            "report",
            ["MODEL", "DATA", "--factory", "--family", "--params", "--target-error", "EXECUTES"],
        ),
    ],
)
def test_subcommand_help(command: str, needles: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in needles:
        assert needle in text


def test_demo_names_the_missing_extra(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--framework", "jax"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs jax, which is not installed" in err
    assert 'pip install -e ".[jax]"' in err


def test_demo_target_error_needs_two_probes(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--target-error", "0.1", "--num-probes", "1"])
    assert exit_info.value.code == 2
    assert "--target-error needs --num-probes >= 2" in capsys.readouterr().err


def test_skip_names_the_sections(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--skip", "razor"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--skip: invalid choice: 'razor'" in err
    assert "'dimension'" in err


def test_demo_rejects_a_bad_number(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--num-probes", "0"])
    assert exit_info.value.code == 2
    assert "--num-probes: must be a positive integer; got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "first", "kind"),
    [
        (ValueError("x must be finite; got inf\nmore"), "x must be finite; got inf", "house"),
        (RuntimeError("linalg.eigh: failed to converge"), "unexpected RuntimeError", "bug"),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), "CUDA out", "house"),
    ],
)
def test_any_failure_is_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, error: Exception, first: str, kind: str
) -> None:
    """No traceback escapes the command: house errors read as they are, others as a bug;
    --debug shows the traceback (the exception propagates)."""
    import fisherbound._cli.parser as parser_module

    def fail(args: Any) -> int:
        raise error

    monkeypatch.setattr(parser_module, "run_demo", fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"fisherbound demo: error: {first}")
    assert "Traceback" not in err
    if kind == "bug":
        assert "a bug in fisherbound or in the model; run again with --debug" in err
    else:
        assert "more" not in err
    with pytest.raises(type(error)):
        main(["demo", "--quiet", "--debug"])


# --------------------------------------------------------------------------- #
# the other frameworks train the same network
#
# A whole demo run on torch or JAX is not fast (JAX compiles a kernel per shape);
# their analysis is the one ``fisherbound report`` runs in tests/test_report.py.
# What the demo adds per framework, the model and its training, is checked here.


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_demo_trains_the_same_network_on_every_framework(framework: str) -> None:
    import argparse

    pytest.importorskip(framework)
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from fisherbound.adapters.numpy import MLP
    from fisherbound.cli import TRAINERS, _framework_context, _train
    from fisherbound.fisher import fisher_diagonal

    digits = sklearn_datasets.load_digits()
    x, y = digits.data[:260] / 16.0, digits.target[:260]
    init = MLP.random([64, 6, 10], activation="tanh", rng=3)
    args = argparse.Namespace(learning_rate=0.01, batch_size=50, epochs=2, seed=3)
    results = {}
    for name in ("numpy", framework):
        with _framework_context(name):
            trainer = TRAINERS[name](init, "test MLP")
            theta, steps = _train(trainer, x[:200], y[:200], args, progress=False)
            subject = trainer.subject(theta)
            lin = subject.linearize(subject.inputs(x[200:]))
            results[name] = (
                steps,
                np.asarray(lin.logits),
                np.sort(np.asarray(fisher_diagonal(lin, progress=False))),
            )
    (steps, logits, diag), (steps_ref, logits_ref, diag_ref) = results[framework], results["numpy"]
    assert steps == steps_ref == 2 * (200 // 50)
    # Same initial weights, batches and Adam steps: the same trained network (the
    # parameter order may differ between frameworks, so the diagonals are sorted).
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(diag, diag_ref, rtol=1e-8, atol=1e-12 * diag_ref.max())
    assert not np.allclose(logits_ref, np.asarray(init(x[200:])), atol=1e-3)  # it trained


# --------------------------------------------------------------------------- #
# README


def test_readme_set_up_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert 'python3 -m pip install -e ".[demo]" && python3 -m fisherbound demo' in readme
    assert 'python3 -m pip install -e ".[test]" && python3 -m pytest -p no:cacheprovider' in readme


def test_readme_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    lower, exact, upper = namespace["lower"], namespace["exact"], namespace["upper"]
    assert (lower <= exact + 1e-12).all()
    assert (exact <= upper + 1e-12).all()


def test_report_help_names_the_options_for_position_axes(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "outputs with position axes",
        "--output SEL",
        "--class-axis A",
        "--ignore-index I",
        "(default -100; 'none': every label is a class)",
        "x_NAME",
        "key mask",
    ):
        assert needle in text, needle


def test_bernoulli_data_labels_may_be_soft_targets() -> None:
    # DATA's Bernoulli labels: binary or soft targets in [0, 1], of the logits' shape.
    from fisherbound._cli.loading import check_label_rows
    from fisherbound._cli.usage import UsageError

    logits = np.zeros((4, 3))
    check_label_rows(logits, np.array([[0.0, 1.0, 0.5]] * 4), "bernoulli")  # soft targets pass
    for bad in (1.5, -0.1, np.nan):
        with pytest.raises(UsageError, match=r"binary labels 0 / 1 or soft targets in \[0, 1\]"):
            check_label_rows(logits, np.full((4, 3), bad), "bernoulli")
    with pytest.raises(UsageError, match=r"rows in \[0, 1\] of shape \(N, C\) = \(4, 3\)"):
        check_label_rows(logits, np.zeros((4, 2)), "bernoulli")


def test_gaussian_data_targets_are_finite_rows() -> None:
    # DATA's Gaussian targets: finite reals of the logits' shape; a one-output model's
    # targets (N,) get the hint to save them as (N, 1).
    from fisherbound._cli.loading import check_label_rows
    from fisherbound._cli.usage import UsageError

    check_label_rows(np.zeros((4, 3)), np.full((4, 3), -7.5), "gaussian")
    with pytest.raises(UsageError, match=r"^Gaussian labels must be finite real targets; got "):
        check_label_rows(np.zeros((4, 3)), np.full((4, 3), np.inf), "gaussian")
    with pytest.raises(UsageError, match=r"dtype <U1\.$"):
        check_label_rows(np.zeros((4, 1)), np.full((4, 1), "a"), "gaussian")
    with pytest.raises(
        UsageError,
        match=r"real targets of shape \(N, C\) = \(4, 1\); got shape \(4,\)\. A model with one "
        r"output takes targets \(N, 1\): save y\[:, None\]\.",
    ):
        check_label_rows(np.zeros((4, 1)), np.zeros(4), "gaussian")


def test_categorical_target_distributions_of_data() -> None:
    # --soft-targets: rows of the logits' shape summing to 1; masked rows are not read.
    from fisherbound._cli.loading import check_target_distributions
    from fisherbound._cli.usage import UsageError

    logits = np.zeros((2, 3, 4))
    rows = np.full((2, 3, 4), 0.25)
    check_target_distributions(logits, rows)
    padded = rows.copy()
    padded[1, 2] = -100.0
    mask = np.ones((2, 3), dtype=np.int64)
    mask[1, 2] = 0
    check_target_distributions(logits, padded, mask=mask)  # the padded row is not read
    with pytest.raises(UsageError, match=r"--soft-targets: .*entries in \[0, 1\]"):
        check_target_distributions(logits, padded)
    with pytest.raises(UsageError, match=r"--soft-targets: .*rows summing to 1"):
        check_target_distributions(logits, rows * 0.9)
    with pytest.raises(UsageError, match=r"must have the logits' shape \(2, 3, 4\).*\(2, 3\)"):
        check_target_distributions(logits, rows[..., 0])
    with pytest.raises(UsageError, match=r"needs C >= 2 outputs"):
        check_target_distributions(np.zeros((2, 1)), np.ones((2, 1)))
