"""The documentation: the Sphinx build (warnings are errors) and the quickstart's examples.

The build runs ``python -m sphinx -W --keep-going -b html docs <tmp>`` in a
subprocess, as CI and a developer would, and checks that every page exists and
carries its module's API from the docstrings. Every Python block of every page
runs on its own in a fresh interpreter, and prints what the ``text`` block after
it shows.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _docs_blocks import (
    TORCHRUN_SCRIPTS,
    is_torchrun,
    missing_modules,
    page_blocks,
    page_path,
    page_runs,
    same_output,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# page -> strings its HTML must contain: for module pages, API entries that only
# autodoc (not the hand-written prose) puts there, i.e. the object's anchor id.
PAGES: dict[str, tuple[str, ...]] = {
    "index": ("quickstart.html", "theory.html", "comparison.html"),
    "quickstart": ("fisher_diagonal", "detach_and_mix"),
    "recipes": ("EWC penalty", "Fisher-weighted merging", "Laplace log evidence"),
    "theory": ("arXiv:2505.13614", "arXiv:2107.04205", "arXiv:1905.11027", "arXiv:2208.13219"),
    "conventions": ("Sum, not mean", "Which Fisher", "Which trace"),
    "families": (
        'id="fisherbound.families.Categorical"',
        'id="fisherbound.families.Family.eigvalsh"',
    ),
    "linalg": ('id="fisherbound.linalg.hutchinson_trace"', 'id="fisherbound.linalg.eigsh"'),
    "linearization": ('id="fisherbound.linearization.LinearizationBase"',),
    "adapters": (
        'id="fisherbound.adapters.numpy.MLP"',
        'id="fisherbound.adapters.torch.linearize"',
        'id="fisherbound.adapters.jax.linearize"',
    ),
    "fisher": ('id="fisherbound.fisher.fisher_diagonal"', 'id="fisherbound.fisher.fisher_bounds"'),
    "estimators": ('id="fisherbound.estimators.detach_and_mix"',),
    "variance": ('id="fisherbound.variance.detach_and_mix_variance"',),
    "dimension": ('id="fisherbound.dimension.local_dimension"', 'id="fisherbound.dimension.razor"'),
    "landscape": (
        'id="fisherbound.landscape.loss_trace"',
        'id="fisherbound.plotting.plot_surface"',
    ),
    "distributed": (),
    "cli": (),
    "benchmarks": (),
    "comparison": (),
}


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if any(importlib.util.find_spec(name) is None for name in ("sphinx", "myst_parser")):
        pytest.skip("sphinx and myst-parser are not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("html")
    doctrees = tmp_path_factory.mktemp("doctrees")
    # -n (nitpicky): every cross-reference must resolve (docs/conf.py, issue 23).
    cmd = [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-b", "html"]
    cmd += ["-d", str(doctrees), str(DOCS), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sphinx-build failed (exit {proc.returncode}):\n{log[-6000:]}"
    return out, log


def test_docs_build_without_warnings(built_docs: tuple[Path, str]) -> None:
    _, log = built_docs
    assert "build succeeded" in log
    assert "WARNING" not in log, log[-6000:]
    assert "ERROR" not in log, log[-6000:]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_docs_page_exists_with_its_api(built_docs: tuple[Path, str], page: str) -> None:
    out, _ = built_docs
    html_file = out / f"{page}.html"
    assert html_file.is_file(), f"{page}.html missing from the build"
    html = html_file.read_text(encoding="utf-8")
    for needle in PAGES[page]:
        assert needle in html, f"{page}.html lacks {needle!r}"


def test_docs_every_page_is_in_the_toctree() -> None:
    # Every Markdown page must be reachable from the index (Sphinx would only warn
    # "document isn't included in any toctree"; this names the page).
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    toctrees = "\n".join(re.findall(r"```\{toctree\}\n(.*?)```", index, flags=re.S))
    listed = {line.strip() for line in toctrees.splitlines() if line and ":" not in line}
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert pages <= listed, f"pages missing from the toctree: {sorted(pages - listed)}"
    assert set(PAGES) - {"index"} <= listed


def test_docs_module_pages_document_every_public_module() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    documented = set(re.findall(r"\.\. automodule:: (\S+)", text))
    expected = {
        "fisherbound.families",
        "fisherbound.linalg",
        "fisherbound.linearization",
        "fisherbound.fisher",
        "fisherbound.estimators",
        "fisherbound.variance",
        "fisherbound.dimension",
        "fisherbound.landscape",
        "fisherbound.plotting",
        "fisherbound.adapters.numpy",
        "fisherbound.adapters.torch",
        "fisherbound.adapters.jax",
    }
    assert expected <= documented, f"not documented: {sorted(expected - documented)}"


def test_docs_summary_tables_list_every_public_name_in_order() -> None:
    # Each module page opens its API with an ``autosummary`` table of the module's
    # ``__all__``, most used first, in the order autodoc documents them (issue 23).
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    table = r"\.\. currentmodule:: (\S+)\n\n\.\. autosummary::\n(?:   :\S+:.*\n)*\n((?:   \S+\n)+)"
    tables = re.findall(table, text)
    assert len(tables) >= 12
    for module, body in tables:
        names = body.split()
        public = importlib.import_module(module).__all__
        if module != "fisherbound.adapters.torch_rules":  # the page documents a selection
            assert names == list(public), f"{module}: table {names} != __all__ {public}"


def test_theory_cites_the_four_papers_and_renders_formulas() -> None:
    theory = (DOCS / "theory.md").read_text(encoding="utf-8")
    for arxiv in ("2505.13614", "2107.04205", "1905.11027", "2208.13219"):
        assert f"arXiv:{arxiv}" in theory
    assert theory.count("$$") >= 10, "the theory page should display its formulas as math"


# --- every code block runs on its own -------------------------------------------------

#: Every page with ```python blocks, and the README; each block is a complete script.
BLOCK_PAGES = [
    "README",
    *sorted(
        path.stem for path in DOCS.glob("*.md") if "```python" in path.read_text(encoding="utf-8")
    ),
]
BLOCKS = [(page, k) for page in BLOCK_PAGES for k in range(len(page_blocks(page)))]


def test_same_output_compares_numbers_and_text() -> None:
    assert same_output("tr F = 238.6, (16, 4)", "tr F = 238.7, (16, 4)")
    assert not same_output("tr F = 238.9, (16, 4)", "tr F = 238.7, (16, 4)")
    assert not same_output("tr F = 238.6, (16, 5)", "tr F = 238.6, (16, 4)")
    assert not same_output("tr G = 238.6", "tr F = 238.6")
    assert not same_output("True\nTrue", "True")


def test_quickstart_has_the_three_frameworks() -> None:
    sections = {b.section for b in page_blocks("quickstart")}
    assert {"NumPy", "torch", "JAX"} <= sections, sorted(sections)


@pytest.mark.parametrize(("page", "k"), BLOCKS, ids=[f"{p}-{k}" for p, k in BLOCKS])
def test_docs_block_runs_on_its_own(page: str, k: int) -> None:
    """Each ```python block runs alone in a fresh interpreter (an empty folder, JAX's
    default precision) and prints what the ```text block after it shows."""
    block = page_blocks(page)[k]
    where = f"{page_path(page).relative_to(DOCS.parent)}, line {block.line} ({block.section})"
    if is_torchrun(block):  # several processes: tests/test_distributed.py runs the file
        assert any(block.code == path.read_text() for path in TORCHRUN_SCRIPTS), (
            f"{where}: a torchrun script must be one of {TORCHRUN_SCRIPTS}, verbatim"
        )
        return
    missing = missing_modules(block)
    if missing:
        pytest.skip(f"{where} imports {missing}, not installed")
    run = page_runs(page)[k]
    assert run is not None
    assert run.returncode == 0, f"{where} fails on its own:\n{run.stderr[-3000:]}"
    if block.expected is not None:
        assert same_output(run.stdout, block.expected), (
            f"{where}: the page says\n{block.expected}\nbut it prints\n{run.stdout}\n"
            "(update the page if the change is intended)"
        )


# --- the examples gallery (sphinx-gallery runs examples/plot_*.py in the build) -------

GALLERY = sorted(path.stem for path in (ROOT / "examples").glob("plot_*.py"))


def test_gallery_has_its_examples() -> None:
    assert len(GALLERY) >= 6, GALLERY


@pytest.mark.parametrize("example", GALLERY)
def test_gallery_example_page_shows_its_figures_and_output(
    built_docs: tuple[Path, str], example: str
) -> None:
    out, _ = built_docs
    page = out / "auto_examples" / f"{example}.html"
    assert page.is_file(), f"auto_examples/{example}.html missing from the build"
    html = page.read_text(encoding="utf-8")
    figures = [src for src in re.findall(r'<img [^>]*src="([^"]+)"', html) if "sphx_glr_" in src]
    assert figures, f"{example}: no figure on its page (was the script run?)"
    for src in figures:
        assert (page.parent / src).is_file(), f"{example}: image {src} missing from the build"
    assert "sphx-glr-script-out" in html, f"{example}: no printed output on its page"


def test_gallery_index_lists_every_example(built_docs: tuple[Path, str]) -> None:
    out, _ = built_docs
    index = (out / "auto_examples" / "index.html").read_text(encoding="utf-8")
    for example in GALLERY:
        assert f'href="{example}.html"' in index, f"the gallery's index lacks {example}"
    assert "auto_examples/index.html" in (out / "index.html").read_text(encoding="utf-8")


def test_readme_and_landing_page_show_the_gallery_figure(built_docs: tuple[Path, str]) -> None:
    # docs/figures/fisher_diagonal.png is made by examples/plot_1_fisher_diagonal.py.
    out, _ = built_docs
    assert (DOCS / "figures" / "fisher_diagonal.png").is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/figures/fisher_diagonal.png)" in readme  # relative: works on GitHub
    assert "figures/fisher_diagonal.png" in (DOCS / "index.md").read_text(encoding="utf-8")
    landing = (out / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r'<img [^>]*src="([^"]*fisher_diagonal[^"]*)"', landing)
    assert srcs, "index.html does not show the figure"
    assert all((out / src).is_file() for src in srcs)
