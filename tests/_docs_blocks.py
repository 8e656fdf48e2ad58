"""The code blocks of the documentation, each run on its own in a fresh interpreter.

A page shows ```python blocks, each a complete script; a ```text block right after
one (nothing but blank lines between them) is what it prints. A block whose first
line is ``# needs: <module>`` runs against an optional peer library (``backpack``,
``curvlinops``, ``laplace``); any block is skipped where a library it imports is
not installed. ``page_runs(page)`` runs a page's blocks in fresh interpreters, two
at a time, once per test session. A plain helper module (no tests): the tests
folder is on ``sys.path`` (see ``conftest.py``), so ``from _docs_blocks import ...``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

DOCS = Path(__file__).resolve().parents[1] / "docs"

# Any info string (``{literalinclude} path`` included), so that no closing fence is
# taken for an opening one.
_FENCE = re.compile(r"^## (?P<section>.+?)$|^```(?P<lang>[^`\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
_NEEDS = re.compile(r"\A# needs: (?P<module>[\w.]+)\n")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")

#: The scripts run with torchrun (several processes), shown verbatim on a page and
#: executed by tests/test_distributed.py.
TORCHRUN_SCRIPTS = (DOCS / "examples" / "torchrun_fisher.py",)


class Block(NamedTuple):
    """One ```python block, the ```text block right after it (or None), what it needs."""

    section: str
    code: str
    expected: str | None
    needs: str | None  # the module named by a first line ``# needs: <module>``
    line: int  # where the block starts on its page


def page_path(page: str) -> Path:
    """``docs/<page>.md``, or the repository's README.md for ``page="README"``."""
    return DOCS.parent / "README.md" if page == "README" else DOCS / f"{page}.md"


def page_blocks(page: str) -> list[Block]:
    """Every ```python block of ``page_path(page)``, in page order."""
    text = page_path(page).read_text(encoding="utf-8")
    blocks: list[Block] = []
    section, last_end = "", -1
    for m in _FENCE.finditer(text):
        if m["section"]:
            section = m["section"].strip()
        elif m["lang"] == "python":
            needs = _NEEDS.match(m["body"])
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(Block(section, m["body"], None, needs["module"] if needs else None, line))
            last_end = m.end()
            continue
        elif m["lang"] == "text" and last_end >= 0 and not text[last_end : m.start()].strip():
            blocks[-1] = blocks[-1]._replace(expected=m["body"])
        last_end = -1
    return blocks


def python_blocks(page: str) -> list[Block]:
    """The blocks of ``page`` that show what they print."""
    return [b for b in page_blocks(page) if b.expected is not None]


def imported_modules(code: str) -> set[str]:
    """The top-level packages ``code`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def missing_modules(block: Block) -> list[str]:
    """The modules ``block`` imports (or ``needs``) that are not installed."""
    wanted = imported_modules(block.code) | ({block.needs} if block.needs else set())
    return sorted(m for m in wanted if importlib.util.find_spec(m) is None)


class Run(NamedTuple):
    """What a block did in its own interpreter."""

    returncode: int
    stdout: str
    stderr: str


def run_alone(code: str, timeout: float = 600.0) -> Run:
    """Run ``code`` as ``python -c`` in a fresh interpreter and an empty folder.

    One thread per process (the blocks run two at a time on the test machines).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("XLA_FLAGS", None)  # JAX's default single host device, as a reader has
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@functools.cache
def page_runs(page: str) -> tuple[Run | None, ...]:
    """Each block of ``page`` run alone (None: skipped, a module missing, or torchrun)."""
    blocks = page_blocks(page)
    runnable = [not missing_modules(b) and not is_torchrun(b) for b in blocks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(run_alone, b.code) if ok else None
            for b, ok in zip(blocks, runnable, strict=True)
        ]
        return tuple(None if f is None else f.result() for f in futures)


def is_torchrun(block: Block) -> bool:
    """Whether ``block`` is a torchrun script (several processes, run elsewhere)."""
    return "torchrun --nproc-per-node" in block.code


def skeleton(line: str) -> str:
    """The line with every number replaced by ``#``."""
    return _NUMBER.sub("#", line)


def same_line(got: str, expected: str) -> bool:
    """Same text; a decimal number within one unit of its last printed digit in
    ``expected``, an integer (shapes, counts) exactly."""
    if skeleton(got) != skeleton(expected):
        return False
    for g, e in zip(_NUMBER.findall(got), _NUMBER.findall(expected)):
        if "." not in e:
            if g != e:
                return False
            continue
        unit = 10.0 ** -len(e.split(".")[1])
        if abs(float(g) - float(e)) > unit * (1 + 1e-9):
            return False
    return True


def same_output(got: str, expected: str) -> bool:
    """Line by line ``same_line``, the same number of lines."""
    got_lines, exp_lines = got.strip().splitlines(), expected.strip().splitlines()
    return len(got_lines) == len(exp_lines) and all(map(same_line, got_lines, exp_lines))


def code_lines(code: str) -> list[str]:
    """The non-blank lines of ``code`` that are not comments, stripped."""
    lines = (line.strip() for line in code.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
