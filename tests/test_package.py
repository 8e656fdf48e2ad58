"""Packaging and hygiene: what is installed, what importing costs, lint and types."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "tensorflow", "scipy", "matplotlib")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_import_fisherbound_imports_no_framework(tmp_path: Path) -> None:
    code = (
        "import sys, fisherbound, fisherbound.adapters, fisherbound.linearization\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_adapters_is_not_a_top_level_package(tmp_path: Path) -> None:
    out = _run("import adapters", tmp_path)
    assert out.returncode != 0
    assert "No module named 'adapters'" in out.stderr
    out = _run("import fisherbound.adapters as a; print(a.__name__)", tmp_path)
    assert out.stdout.strip() == "fisherbound.adapters", out.stderr


def _source_modules() -> set[str]:
    """Every library module's path inside the wheel (``fisherbound/adapters/torch.py``)."""
    return {
        name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for name, path in _module_files().items()
    }


def test_wheel_contains_every_source_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("fisherbound-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.endswith(".py")}
    missing = _source_modules() - shipped
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    assert not any(n.startswith("adapters/") for n in shipped)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_clean() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- #
# The layering rules of docs/architecture.md


def _module_files() -> dict[str, Path]:
    """Every library module's dotted name (``adapters/`` installs as fisherbound.adapters)."""
    out = {}
    for base, package in (
        (ROOT / "fisherbound", "fisherbound"),
        (ROOT / "adapters", "fisherbound.adapters"),
    ):
        for path in base.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules ``name`` imports when it is imported (not in functions or
    ``if TYPE_CHECKING:``)."""
    import ast

    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = name.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    files = _module_files()
    graph = {m: _module_level_imports(m, p, set(files)) for m, p in files.items()}
    # The graph is read right: the analyses sit on the stream, the adapters on their helpers.
    assert "fisherbound._stream" in graph["fisherbound.fisher"]
    assert "fisherbound.adapters._jax_checks" in graph["fisherbound.adapters._jax_model"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles(graph) == []


def test_no_private_name_imported_from_a_public_module() -> None:
    """What two modules share lives in a private module (``_stream``, ``_lib``, ...):
    no module imports ``_name`` from a public one such as ``fisher`` or ``estimators``."""
    import ast

    files = _module_files()
    bad = []
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in files:
                continue
            if node.module.rsplit(".", 1)[-1].startswith("_") or node.module == name:
                continue
            bad += [
                f"{name} imports {node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and f"{node.module}.{a.name}" not in files
            ]
    assert not bad, bad


def test_no_library_module_over_about_900_lines() -> None:
    """One job per module (issue 12): a module that grows past this is split."""
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in _module_files().items()
    }
    assert sizes["fisherbound.fisher"] > 100  # the files were read
    assert {n: s for n, s in sizes.items() if s > 950} == {}
