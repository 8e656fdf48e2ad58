"""Sphinx configuration for the fisherbound documentation.

Build (the same command the test suite runs, warnings are errors):

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are Markdown (MyST); each module page pulls its API from the docstrings
with ``automodule``. The docstrings are numpydoc, read by napoleon.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Build from a plain checkout too: the package itself is importable from the root.
# (``fisherbound.adapters`` needs the installed package-dir mapping, as in the README.)
if importlib.util.find_spec("fisherbound") is None:
    sys.path.insert(0, str(ROOT))

project = "fisherbound"
author = "the fisherbound authors"
copyright = "the fisherbound authors"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: $...$ and $$...$$ for formulas (rendered by MathJax), heading anchors so
# that links like theory.md#notation resolve.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc: members in source order, signatures without the ``Any`` aliases spelled out.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# The torch and JAX adapters import their framework at module level; a docs-only
# install (the ``docs`` extra) need not have them, so mock what is missing. With
# the ``test`` extra both are installed and nothing is mocked.
autodoc_mock_imports = [
    name for name in ("torch", "jax", "jaxlib") if importlib.util.find_spec(name) is None
]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_title = "fisherbound"
html_theme = "furo" if importlib.util.find_spec("furo") is not None else "alabaster"
html_static_path: list[str] = []


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Leave out the ``Alias for field number k`` members of NamedTuples.

    Every public NamedTuple describes its fields in its own ``Attributes`` section,
    which napoleon renders as attribute entries; autodoc would describe the same
    fields a second time from the generated property docstrings.
    """
    del app, what, name, skip, options  # the autodoc-skip-member event's signature
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
