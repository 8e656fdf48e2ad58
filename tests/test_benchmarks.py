"""The benchmark runner: one command, every section, JSON and Markdown out.

Runs ``benchmarks/run.py --quick`` once (tiny models, about half a minute on 2
cores) and checks the files it writes: every section present and measured (the
GPU sections skipped, with the reason, where no GPU is usable), every ratio a
positive finite number, every peer row measured or "not installed" as the
environment says, and the values of the peers agreeing with fisherbound's before
they were timed. No timing is asserted. The GPU timing functions are also called
directly with CPU arrays on both sides (NumPy as host and device namespace, torch
"cpu" as both devices), the code path the GPU sections run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SECTIONS = [
    "eigvalsh",
    "exact_diagonal",
    "jax_diagonal",
    "estimators",
    "spectrum",
    "dimension",
    "eigsh",
    "landscape",
    "peers",
    "finite_checks",
    "gpu_core_space",
    "gpu_torch",
    "language_model",
    "memory",
]
PEERS = ["backpack", "curvlinops", "nngeometry", "pyhessian"]


def _has_cupy_gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def _has_cuda_torch() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return out, proc


@pytest.fixture(scope="module")
def record(quick_run: tuple[Path, subprocess.CompletedProcess]) -> dict[str, Any]:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _ratios(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every entry of every ``ratios`` dict in the record, with where it was found."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ratios":
                assert isinstance(value, dict), path
                found += [(f"{path}/ratios/{k}", v) for k, v in value.items()]
            else:
                found += _ratios(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _ratios(value, f"{path}/{i}")
    return found


def test_writes_json_and_markdown(quick_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "results.json").is_file()
    assert (out / "results.md").is_file()


def test_record_describes_run_and_machine(record: dict[str, Any]) -> None:
    assert record["quick"] is True
    assert "--quick" in record["command"]
    assert record["date"][:4].isdigit()
    machine = record["machine"]
    assert machine["cpu"]
    assert machine["cores"] >= 1
    import torch

    assert machine["torch"] == torch.__version__
    assert machine["numpy"] == np.__version__
    assert machine["gpu"] is None or isinstance(machine["gpu"], str)
    assert set(machine["peers"]) == set(PEERS)


def test_every_section_present_and_measured(record: dict[str, Any]) -> None:
    sections = record["sections"]
    assert list(sections) == SECTIONS
    for name in SECTIONS[:8]:  # the CPU sections
        assert sections[name]["status"] == "measured", (name, sections[name])
        assert sections[name]["result"]["ratios"], name


@pytest.mark.parametrize(
    ("name", "available"), [("gpu_core_space", _has_cupy_gpu), ("gpu_torch", _has_cuda_torch)]
)
def test_gpu_sections_measured_or_skipped_with_reason(
    record: dict[str, Any], name: str, available: Any
) -> None:
    section = record["sections"][name]
    if available():
        assert section["status"] == "measured"
        assert section["result"]["rows"]
        return
    assert section["status"] == "skipped"
    assert section["reason"].startswith("no GPU: ")
    assert len(section["reason"]) > len("no GPU: ")
    # The GPU timing code ran on the CPU instead, and both sides agreed exactly.
    check = section["result"]["self_check"]
    assert "not a GPU measurement" in check["kind"]
    assert check["rows"]
    assert all(row["max_relative_difference"] == 0.0 for row in check["rows"])


def test_language_model_section_measured_or_skipped_with_reason(record: dict[str, Any]) -> None:
    section = record["sections"]["language_model"]
    if importlib.util.find_spec("transformers") is None:
        assert section["status"] == "skipped"
        assert "transformers" in section["reason"]
        return
    assert section["status"] == "measured", section
    assert section["result"]["ratios"]


def test_every_ratio_positive_and_finite(record: dict[str, Any]) -> None:
    ratios = _ratios(record)
    assert len(ratios) > 50
    bad = [
        (where, value)
        for where, value in ratios
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    ]
    assert not bad


def test_peer_rows_measured_or_not_installed(record: dict[str, Any]) -> None:
    result = record["sections"]["peers"]["result"]
    rows = result["rows"]
    for lib in ["fisherbound", *PEERS]:
        mine = [r for r in rows if r["library"] == lib]
        assert mine, lib
        installed = lib == "fisherbound" or importlib.util.find_spec(lib) is not None
        expected = "measured" if installed else "not installed"
        assert {r["status"] for r in mine} == {expected}, lib
        assert (result["libraries"][lib] == "not installed") is not installed, lib
    for r in rows:
        if r["status"] == "measured":
            assert r["agreement"] is not None, r
            assert math.isfinite(r["agreement"]), r
            assert r["ratio_to_gradient_step"] > 0, r
        else:
            assert "seconds" not in r, r


def test_peers_agree_before_timing(record: dict[str, Any]) -> None:
    """Exact quantities agree to float32 accuracy; random ones are within reason."""
    rows = record["sections"]["peers"]["result"]["rows"]
    exact = ("exact diagonal", "exact trace", "one Fisher-vector product", "top ")
    measured = [r for r in rows if r["status"] == "measured"]
    for r in measured:
        if r["quantity"].startswith(exact):
            assert r["agreement"] < 1e-4, r
        elif r["library"] == "fisherbound" and r["ratio_to_fisherbound"] == 1.0:
            assert 0 <= r["agreement"] < 100, r  # a reference row, or fisherbound's own error
        else:  # errors of random estimates and of the power iteration: finite, not absurd
            assert 0 < r["agreement"] < 100, r
    # fisherbound's own rows are the references of the exact groups.
    for r in measured:
        if r["library"] == "fisherbound" and r["quantity"].startswith(exact[:2]):
            assert r["agreement"] == 0.0
            assert r["ratio_to_fisherbound"] == 1.0


def test_exact_values_agree_inside_sections(record: dict[str, Any]) -> None:
    sections = record["sections"]
    for row in sections["eigvalsh"]["result"]["rows"]:
        assert row["max_abs_diff"] < 1e-12
    for model in sections["exact_diagonal"]["result"]["models"].values():
        assert all(v < 1e-5 for v in model["max_relative_difference"].values())
    for model in sections["jax_diagonal"]["result"]["models"].values():
        assert model["max_relative_difference vmap vs fisher_diagonal"] < 1e-5
        assert model["fast_path_reasons"] == ["fast"]  # every parameter by a layer rule
    residuals = sections["spectrum"]["result"]["top_residuals"]
    assert len(residuals) == 3


def test_memory_section_measures_every_row(record: dict[str, Any]) -> None:
    """Each row from its own process: measured, or "not installed" as the environment says."""
    section = record["sections"]["memory"]
    assert section["status"] == "measured", section
    cells = section["result"]["cells"]
    assert cells
    peers = {"bp": "backpack", "cl": "curvlinops"}
    for cell in cells.values():
        rows = cell["methods"]
        assert rows["step"]["status"] == "measured", rows["step"]
        assert rows["step"]["peak_extra_bytes"] > 0
        for method, rec in rows.items():
            peer = peers.get(method.split("_")[0])
            if peer is not None and importlib.util.find_spec(peer) is None:
                assert rec["status"] == "not installed", (method, rec)
                continue
            assert rec["status"] == "measured", (method, rec)
            assert rec["peak_extra_bytes"] >= 0
            assert rec["seconds"] > 0
        if rows.get("bp_exact", {}).get("status") == "measured":
            fb, bp = rows["fb_exact"]["check"]["sum"], rows["bp_exact"]["check"]["sum"]
            assert abs(fb - bp) <= 1e-4 * abs(fb)


def test_markdown_has_every_section(
    record: dict[str, Any], quick_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, _ = quick_run
    text = (out / "results.md").read_text()
    assert record["command"] in text
    for section in record["sections"].values():
        assert f"## {section['title']}" in text
        if section["status"] == "skipped":
            assert f"skipped: {section['reason']}" in text
    assert "| --- |" in text
    assert "quick" in text


# --------------------------------------------------------------------------- #
# the GPU code paths, on CPU arrays


@pytest.fixture
def bench_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu

    return bench_gpu


def test_core_space_with_numpy_as_host_and_device(bench_gpu: Any) -> None:
    result = bench_gpu.core_space(
        np,
        np,
        to_device=np.array,
        to_host=np.asarray,
        shapes=[(50, 7), (5, 30)],
        reps=1,
        warmup=0,
    )
    ops = {(r["operation"], r["N"], r["C"]) for r in result["rows"]}
    assert ops == {
        (op, n, c)
        for op in ("eigvalsh", "sqrt_metric_matvec", "metric_matvec")
        for n, c in [(50, 7), (5, 30)]
    }
    for r in result["rows"]:
        assert r["max_relative_difference"] == 0.0
        assert r["host_s"] > 0
        assert r["device_s"] > 0
    assert len(result["ratios"]) == 6


def test_core_space_detects_disagreeing_device(bench_gpu: Any) -> None:
    """A 'device' that computes something else shows up in the agreement column."""
    result = bench_gpu.core_space(
        np,
        np,
        to_device=lambda a: np.array(a) * 1.5,  # wrong logits and probes on the "device"
        to_host=np.asarray,
        shapes=[(20, 5)],
        reps=1,
        warmup=0,
    )
    assert all(r["max_relative_difference"] > 1e-3 for r in result["rows"])


def test_torch_devices_on_cpu_and_cpu(bench_gpu: Any) -> None:
    result = bench_gpu.torch_devices("cpu", "cpu", quick=True, probes=(1, 3), reps=1, warmup=0)
    assert [r["num_probes"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert r["max_relative_difference"] == 0.0  # same seed, same probes, same device
    assert all(v > 0 for v in result["ratios"].values())
    assert set(result["gradient_step_s"]) == {"host", "device"}


def test_plain_refuses_what_json_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _common import plain

    assert plain({"a": np.float64(2.0), "b": float("nan"), "c": (1, np.int64(3))}) == {
        "a": 2.0,
        "b": None,
        "c": [1, 3],
    }
    with pytest.raises(TypeError, match="cannot store a ndarray in results.json"):
        plain({"x": np.zeros(3)})


# --------------------------------------------------------------------------- #
# the command line


def _runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_list_names_every_section() -> None:
    proc = _runner("--list")
    assert proc.returncode == 0
    assert proc.stdout.split() == SECTIONS


def test_unknown_section_is_refused() -> None:
    proc = _runner("--only", "nonsense")
    assert proc.returncode == 2
    assert "--only" in proc.stderr
    assert "nonsense" in proc.stderr


def test_threads_must_be_positive() -> None:
    proc = _runner("--threads", "0")
    assert proc.returncode == 2
    assert "--threads must be a positive integer; got 0" in proc.stderr


def test_only_runs_the_named_sections(tmp_path: Path) -> None:
    proc = _runner("--quick", "--only", "eigvalsh", "gpu_core_space", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert list(record["sections"]) == ["eigvalsh", "gpu_core_space"]


# --------------------------------------------------------------------------- #
# the figures of docs/benchmarks.md and docs/comparison.md, drawn from their own tables

DOCS = ROOT / "docs"
PAGES_WITH_FIGURES = ["benchmarks.md", "comparison.md"]
# Tables of those pages that have no figure (by the heading above them), and why.
TABLES_WITHOUT_FIGURE = {"Features": "what each library computes: words, not numbers"}


@pytest.fixture(scope="module")
def plot_docs() -> Any:
    spec = importlib.util.spec_from_file_location("plot_docs", BENCHMARKS / "plot_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_docs"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _tables(plot_docs: Any) -> list[tuple[list[str], Any]]:
    """Every table of the pages, with the lines of its page."""
    out = []
    for name in PAGES_WITH_FIGURES:
        text = (DOCS / name).read_text(encoding="utf-8")
        out += [(text.splitlines(), t) for t in plot_docs.parse_tables(text)]
    return out


def test_every_benchmark_table_has_its_figure(plot_docs: Any) -> None:
    tables = [t for _, t in _tables(plot_docs)]
    assert len(tables) >= 40
    without = [t for t in tables if t.figure is None]
    assert [t.heading for t in without] == list(TABLES_WITHOUT_FIGURE)
    names = [t.figure for t in tables if t.figure is not None]
    assert len(names) == len(set(names)), "a figure shown under two tables"
    assert set(names) == set(plot_docs.SPECS), "SPECS and the page's figures differ"


def test_every_referenced_figure_exists() -> None:
    import re

    for page in [DOCS / name for name in PAGES_WITH_FIGURES]:
        images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
        for image in images:
            assert (page.parent / image).is_file(), (page.name, image)


def test_figures_plot_the_numbers_of_their_tables(plot_docs: Any) -> None:
    """Every plotted value is a number written in the table cell it claims to come from."""
    import re

    for page_lines, table in _tables(plot_docs):
        if table.figure is None:
            continue
        data = plot_docs.figure_data(table)
        assert data.name == table.figure
        assert data.title
        points = [p for panel in data.panels for p in panel.points]
        assert points, table.figure
        for panel in data.panels:
            assert panel.xlabel, table.figure
            assert panel.points, table.figure
        for p in points:
            cell = table.rows[p.row][p.col]
            assert cell in page_lines[table.line + 1 + p.row], (table.figure, cell)
            # the cell writes this number, with this text, as a whole token
            assert re.search(rf"(?<![\w.]){re.escape(p.text)}(?![\d])", cell), (table.figure, p)
            plain = p.text.replace(",", "").replace("−", "-")
            assert p.value == float(plain), (table.figure, p)
            assert math.isfinite(p.value)
        # every cell a figure reads from is drawn: no cell is half used
        used = {(p.row, p.col) for p in points}
        assert len(used) >= len(table.rows), table.figure


def test_figure_data_spot_checks(plot_docs: Any) -> None:
    """A few numbers copied by hand from the page, as the figures must read them."""
    by_name = {t.figure: plot_docs.figure_data(t) for _, t in _tables(plot_docs) if t.figure}

    def values(name: str, panel: int = 0) -> dict[tuple[str, Any], list[float]]:
        out: dict[tuple[str, Any], list[float]] = {}
        for p in by_name[name].panels[panel].points:
            out.setdefault((p.series, p.where), []).append(p.value)
        return out

    mlp = values("bench_exact_diagonal_mlp")
    assert mlp["median", "generic vmap path (per-example VJPs)"] == [439.0]
    assert mlp["median", "BackPACK DiagGGNExact"] == [4.19]
    secular = values("bench_secular")
    assert secular["dense numpy eigvalsh", 10000.0] == [316.0]
    assert secular["secular equation", 1000.0] == [0.147]
    fused = values("bench_lm_fused_softmax")
    assert fused["before", "V = 1000, N = 8, T = 64: detach-and-mix, 1 probe"] == [1.25, 1.13]
    cost = values("bench_estimator_cost")
    assert cost["after", "MLP of custom layers (no fast path), batch-level M = 256"] == [158, 172]
    memory = values("bench_memory_after_classes")
    assert memory["BackPACK DiagGGNExact (exact)", 3000.0] == [3458.0]
    assert ("BackPACK DiagGGNExact (exact)", 10000.0) not in memory  # out of memory at the cap
    memory_time = values("bench_memory_after_classes", 1)
    assert memory_time["fisherbound fisher_diagonal (exact)", 10000.0] == [71.7]
    trace = by_name["bench_full_trace_estimates"].panels[0].points
    peers = values("comparison_peers")
    assert peers["PyHessian", "largest Hessian eigenvalue"] == [22.2]
    assert ("curvlinops", "exact Fisher diagonal") not in peers  # "-": no such function
    assert (trace[2].value, trace[2].err) == (-1.0799e05, 4.1e04)


def test_number_tokens(plot_docs: Any) -> None:
    assert plot_docs.numbers("1,070,794 and 2949.6") == [
        ("1,070,794", 1070794.0),
        ("2949.6", 2949.6),
    ]
    assert [v for _, v in plot_docs.numbers("158-172")] == [158.0, 172.0]
    assert [v for _, v in plot_docs.numbers("0.49, 0.42; 16, 64")] == [0.49, 0.42, 16.0, 64.0]
    assert [v for _, v in plot_docs.numbers("-1.0799e+05 ± 4.1e+04")] == [-107990.0, 41000.0]
    assert [v for _, v in plot_docs.numbers("2,093 MB (179×), 114 s (6.89e+03×)")] == [
        2093.0,
        179.0,
        114.0,
        6890.0,
    ]


def test_figures_are_current(plot_docs: Any) -> None:
    """Each PNG was drawn from the table as it reads now (rerun benchmarks/plot_docs.py)."""
    image = pytest.importorskip("PIL.Image")
    stale = []
    for _, table in _tables(plot_docs):
        if table.figure is None:
            continue
        with image.open(DOCS / "figures" / f"{table.figure}.png") as png:
            stored = png.text.get("Comment", "")
        if stored != f"data {plot_docs.data_digest(plot_docs.figure_data(table))}":
            stale.append(table.figure)
    assert not stale, f"redraw with python benchmarks/plot_docs.py: {stale}"
