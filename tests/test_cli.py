"""The command line: ``fisherbound demo`` runs end to end and checks its own bounds."""

from __future__ import annotations

import subprocess
import sys

from fisherbound.cli import main


def test_demo_runs_and_reports_valid_bounds(capsys) -> None:
    code = main(["demo", "--inputs", "16", "--width", "6", "--probes", "20", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "spectrum of I_Δ (secular equation): [0.           0.1255969349 0.3344030651]" in out
    assert "diag F_LR ≤ diag F ≤ diag F_DG entrywise: True" in out
    lanczos = out.split("Top eigenvalues, Lanczos: ")[1].splitlines()[0]
    dense = out.split("Top eigenvalues, dense:   ")[1].splitlines()[0]
    assert lanczos == dense


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fisherbound", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_readme_example_runs() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    lower, exact, upper = namespace["lower"], namespace["exact"], namespace["upper"]
    assert (lower <= exact + 1e-12).all()
    assert (exact <= upper + 1e-12).all()
