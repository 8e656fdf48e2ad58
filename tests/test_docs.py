"""The documentation: the Sphinx build (warnings are errors) and the quickstart's examples.

The build runs ``python -m sphinx -W --keep-going -b html docs <tmp>`` in a
subprocess, as CI and a developer would, and checks that every page exists and
carries its module's API from the docstrings. The quickstart's Python blocks are
run and their output compared with the ``text`` block printed after each one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# page -> strings its HTML must contain: for module pages, API entries that only
# autodoc (not the hand-written prose) puts there, i.e. the object's anchor id.
PAGES: dict[str, tuple[str, ...]] = {
    "index": ("quickstart.html", "theory.html", "comparison.html"),
    "quickstart": ("fisher_diagonal", "detach_and_mix"),
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
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
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


def test_theory_cites_the_four_papers_and_renders_formulas() -> None:
    theory = (DOCS / "theory.md").read_text(encoding="utf-8")
    for arxiv in ("2505.13614", "2107.04205", "1905.11027", "2208.13219"):
        assert f"arXiv:{arxiv}" in theory
    assert theory.count("$$") >= 10, "the theory page should display its formulas as math"


# --- the quickstart's examples --------------------------------------------------------

_BLOCK = re.compile(
    r"^## (?P<section>[^\n]+)$|^```(?P<lang>python|text)\n(?P<body>.*?)^```$", re.M | re.S
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _quickstart_sections() -> dict[str, list[tuple[str, str]]]:
    """Section title -> [(code, expected output)] in page order."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    sections: dict[str, list[tuple[str, str]]] = {}
    section, code = "", None
    for m in _BLOCK.finditer(text):
        if m["section"]:
            section, code = m["section"].strip(), None
        elif m["lang"] == "python":
            code = m["body"]
        elif code is not None:
            sections.setdefault(section, []).append((code, m["body"]))
            code = None
    return sections


def _same_output(got: str, expected: str) -> bool:
    """Equal text; numbers written with a decimal point may differ by float rounding.

    A decimal number matches within one unit of its last printed digit (a float32
    sum may round either way); integers (shapes, counts) must match exactly.
    """
    got_lines, exp_lines = got.strip().splitlines(), expected.strip().splitlines()
    if len(got_lines) != len(exp_lines):
        return False
    for g, e in zip(got_lines, exp_lines):
        if _NUMBER.sub("#", g) != _NUMBER.sub("#", e):
            return False
        for gn, en in zip(_NUMBER.findall(g), _NUMBER.findall(e)):
            if "." not in en:
                if gn != en:
                    return False
                continue
            unit = 10.0 ** -len(en.split(".")[1])
            if abs(float(gn) - float(en)) > unit * (1 + 1e-9):
                return False
    return True


def test_same_output_compares_numbers_and_text() -> None:
    assert _same_output("tr F = 238.6, (16, 4)", "tr F = 238.7, (16, 4)")
    assert not _same_output("tr F = 238.9, (16, 4)", "tr F = 238.7, (16, 4)")
    assert not _same_output("tr F = 238.6, (16, 5)", "tr F = 238.6, (16, 4)")
    assert not _same_output("tr G = 238.6", "tr F = 238.6")
    assert not _same_output("True\nTrue", "True")


QUICKSTART = _quickstart_sections()
_NEEDS = {"NumPy": None, "torch": "torch", "JAX": "jax"}


def test_quickstart_has_the_three_frameworks() -> None:
    assert set(_NEEDS) <= set(QUICKSTART), sorted(QUICKSTART)


@pytest.mark.parametrize("section", sorted(_NEEDS))
def test_quickstart_examples_print_what_the_page_says(section: str) -> None:
    module = _NEEDS[section]
    if module is not None:
        pytest.importorskip(module)
    namespace: dict[str, object] = {"__name__": f"quickstart_{section}"}
    with contextlib.ExitStack() as stack:
        if module == "jax":
            import jax

            # conftest switches x64 on for the suite; the page runs in JAX's default mode.
            stack.enter_context(jax.enable_x64(False))
        outputs = []
        for k, (code, _) in enumerate(QUICKSTART[section]):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, f"docs/quickstart.md [{section} {k}]", "exec"), namespace)
            outputs.append(buffer.getvalue())
    for k, ((_, expected), got) in enumerate(zip(QUICKSTART[section], outputs)):
        assert _same_output(got, expected), (
            f"docs/quickstart.md, {section} example {k}: the page says\n{expected}\n"
            f"but it prints\n{got}\n(update the page if the change is intended)"
        )
