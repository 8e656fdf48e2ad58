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
    names = {
        "fisherbound/" + p.relative_to(ROOT / "fisherbound").as_posix()
        for p in (ROOT / "fisherbound").rglob("*.py")
    }
    names |= {
        "fisherbound/adapters/" + p.relative_to(ROOT / "adapters").as_posix()
        for p in (ROOT / "adapters").rglob("*.py")
    }
    return {n for n in names if "__pycache__" not in n}


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
