"""Sphinx configuration for the fisherbound documentation.

Build (the same command the test suite runs, warnings are errors):

    python3 -m sphinx -W -n --keep-going -b html docs docs/_build/html

The pages are Markdown (MyST); each module page pulls its API from the docstrings
with ``automodule``. The docstrings are numpydoc, read by napoleon.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import typing
from pathlib import Path

from sphinx.ext import intersphinx
from sphinx.util import inspect as _sphinx_inspect

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

# --- API reference, nitpicky references, offline math (issue 23) -----------------
# Summary tables: the ``autosummary`` directive on each module page, with no stub
# pages (the entries link to the automodule documentation below the table).
# MathJax is served from _static/mathjax (sphinx-mathjax-offline), so formulas
# render without network, e.g. from a local build opened as file://.
extensions += ["sphinx.ext.autosummary", "sphinx.ext.intersphinx", "sphinx-mathjax-offline"]
autosummary_generate = False
# ``Array = Any`` in the modules, and the argument kinds of ``fisherbound._lib._types``
# (``Source``, ``LossSource``, ``RngLike``, ``ProcessGroup``): signatures say the name
# (each documented in conventions.md, "Types in signatures"), not ``Any``.
autodoc_type_aliases = {
    name: name for name in ("Array", "Source", "LossSource", "RngLike", "ProcessGroup")
}
# Sphinx 9 writes an alias inside a generic (``dict[str, Array]``) as the repr of
# its placeholder, "TypeAliasForwardRef('Array')": have it write the alias's name.
if hasattr(_sphinx_inspect, "TypeAliasForwardRef"):  # Sphinx internals: guarded
    _sphinx_inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name  # type: ignore[method-assign]

# The build passes with -n (nitpicky, tests/test_docs.py): every cross-reference
# resolves. Our own names resolve to their documented entries: re-exports of
# private modules are found by ``_public_target`` below, ``Array`` is documented
# in conventions.md, and TypeVars (``T``) are rendered as plain text, having
# nothing to link to. External types need intersphinx inventories, which are
# fetched over the network at build time; the test suite and CI build offline.
# So intersphinx is used only when asked for:
#
#     FISHERBOUND_DOCS_INTERSPHINX=1 python -m sphinx -W -n --keep-going -b html docs out
#
# links torch.Tensor, collections.abc.Callable, ... to their documentation (and
# fails if an inventory cannot be fetched). Without it, exactly the external names
# below are exempt from nitpicky: each is a real type of a signature, whose
# documentation lives elsewhere; any other unresolved reference still fails. Add a
# name (with its inventory) only when a signature comes to need it.
_EXTERNAL_TYPES = {
    "collections.abc.Callable": "python",
    "collections.abc.Iterable": "python",
    "collections.abc.Iterator": "python",
    "collections.abc.Mapping": "python",
    "collections.abc.Sequence": "python",
    "torch.Tensor": "torch",
    "torch.nn.Module": "torch",
    "matplotlib.axes.Axes": "matplotlib",
    "scipy.sparse.linalg.LinearOperator": "scipy",
}
if os.environ.get("FISHERBOUND_DOCS_INTERSPHINX"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "jax": ("https://docs.jax.dev/en/latest", None),
        "matplotlib": ("https://matplotlib.org/stable", None),
    }
else:
    intersphinx_mapping = {}
    nitpick_ignore = [("py:class", name) for name in _EXTERNAL_TYPES]
# Signatures show a default's value where it is a named constant
# (``max_params=4096``, ``max_memory=2**27``; ``_constant_defaults``).
# --- end of issue 23's block --------------------------------------------------------

# --- examples gallery (issue 23): sphinx-gallery ---------------------------------
# The scripts examples/plot_*.py run at build time, in this process, one after the
# other, in file-name order; sphinx-gallery writes their pages, figures and output
# to docs/auto_examples/ (git-ignored), linked from the "Gallery" toctree of
# index.md, and the run times to docs/sg_execution_times.rst (git-ignored too).
# matplotlib draws on Agg (sphinx-gallery selects it), every script seeds its own
# random numbers and reads nothing from the network (scikit-learn's bundled digits
# or generated data); a script that fails fails the build. The whole gallery takes
# about 12 s on 2 cores (docs/sg_execution_times.rst after a build). Build the pages
# without running the scripts (to check prose only): add ``-D plot_gallery=0``.
# The scripts' torch runs on one thread: their models are small, and on a shared
# 2-core machine a second thread spends its time waiting (the first script took 3
# times as long with two, the machine busy). Set before anything imports torch; an
# explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
extensions += ["sphinx_gallery.gen_gallery"]
source_suffix[".rst"] = "restructuredtext"  # the gallery's generated pages
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "capture_repr": (),  # show what the scripts print, not the repr of a last expression
    "download_all_examples": False,
    "show_signature": False,
}
# --- end of the gallery block ---------------------------------------------------


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


# --- issue 23: reference resolution, THEORY links, constant defaults ---------------
#: External classes whose ``__module__`` is not the name they are documented under.
_PUBLIC_NAMES = {"torch.nn.modules.module.Module": "torch.nn.Module"}


def _public_target(app, env, node, contnode):
    """Resolve what nitpicky would report among our own names (see the block above).

    A private module's class re-exported publicly (``fisherbound._finite.Product``)
    links to its one documented entry; a TypeVar is plain text; an external class
    named by its defining module gets its public name (for intersphinx and for
    ``nitpick_ignore``). Anything else is left to Sphinx, which warns.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    if target in _PUBLIC_NAMES:
        node["reftarget"] = _PUBLIC_NAMES[target]
        if app.config.intersphinx_mapping:
            return intersphinx.missing_reference(app, env, node, contnode)
        return contnode  # offline: exempt, as its public name is (nitpick_ignore)
    modname, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(modname) if modname else None
    except ImportError:
        module = None
    if isinstance(getattr(module, name, None), typing.TypeVar):
        return contnode
    if not target.startswith("fisherbound.") or module is None:
        return None
    py = env.get_domain("py")
    found = [full for full in py.objects if full.startswith("fisherbound.")]
    found = [full for full in found if full.rpartition(".")[2] == name]
    if len(found) == 1 and "._" in "." + modname:  # a documented re-export
        node["reftarget"] = found[0]
        return py.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], found[0], node, contnode
        )
    if not found and ("._" in "." + modname or name not in getattr(module, "__all__", ())):
        # An internal type in a public signature (the constructor of an adapter's
        # linearization, a helper's return type): plain text, there is no page.
        return contnode
    return None  # a public name without an entry: a gap in the docs, Sphinx warns


def _no_inline_type(app, what, name, obj, options, lines):
    """Undo napoleon's reading of an attribute docstring's first line as its type.

    For attributes and properties napoleon takes ``TYPE: description`` from the
    first line and emits ``:type: TYPE``; ours carry their type in the annotation
    and write prose with a colon there ("The logits z of the batch, shape
    (N, ∗S, C): N examples, ..."), which became a bogus type (and, under -n, a
    dozen unresolved references). Runs after napoleon (priority 600) and puts the
    text back in front of the description.
    """
    del app, name, obj, options
    if what not in ("attribute", "property", "data"):
        return
    types = [k for k, line in enumerate(lines) if line.startswith(":type: ")]
    first = next((k for k, line in enumerate(lines) if line.strip()), None)
    if len(types) == 1 and first is not None and first < types[0]:
        head = lines.pop(types[0])[len(":type: ") :]
        lines[first] = f"{head}: {lines[first].lstrip()}"


#: "THEORY §n" (docstrings, pages) -> a link to section n of theory.md (label theory-n).
_THEORY = re.compile(r"THEORY §([1-6])\b(?: and §([1-6])\b)?")


def _theory_sub(role: str, text: str) -> str:
    """``THEORY §3 and §4`` -> the role's links to labels theory-3 and theory-4."""

    def link(m: re.Match[str]) -> str:
        out = f"{role}`THEORY §{m[1]} <theory-{m[1]}>`"
        return out + (f" and {role}`§{m[2]} <theory-{m[2]}>`" if m[2] else "")

    return _THEORY.sub(link, text)


def _theory_links_rst(text: str) -> str:
    # Outside ``literals`` only: split on the double backquotes, odd parts are literal.
    parts = text.split("``")
    parts[::2] = [_theory_sub(":ref:", part) for part in parts[::2]]
    return "``".join(parts)


def _theory_docstring(app, what, name, obj, options, lines):
    del app, what, name, obj, options  # the autodoc-process-docstring event's signature
    lines[:] = [_theory_links_rst(line) if "THEORY §" in line else line for line in lines]


def _theory_source(app, docname, source):
    del app
    if docname == "theory" or "THEORY §" not in source[0]:
        return
    # Markdown pages: {ref} roles, outside ``` fences and `code`.
    out = []
    for k, chunk in enumerate(re.split(r"(^```.*?^```)", source[0], flags=re.S | re.M)):
        if k % 2 == 0:
            parts = chunk.split("`")
            parts[::2] = [_theory_sub("{ref}", p) for p in parts[::2]]
            chunk = "`".join(parts)
        out.append(chunk)
    source[0] = "".join(out)


_CONSTANT = re.compile(r"\b[A-Z][A-Z0-9_]{2,}\b")


def _constant_defaults(app, what, name, obj, options, signature, return_annotation):
    """Show a default that is a named int constant as its value (``max_params=4096``).

    autodoc_preserve_defaults keeps ``Categorical()`` readable, but also shows
    ``DEFAULT_MAX_PARAMS``; powers of two from 2**16 on read as ``2**k``.
    """
    del app, what, name, options
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if not signature or module is None:
        return None

    def value(match):
        v = getattr(module, match.group(0), None)
        if type(v) is not int:
            return match.group(0)
        return f"2**{v.bit_length() - 1}" if v >= 2**16 and v & (v - 1) == 0 else str(v)

    return _CONSTANT.sub(value, signature), return_annotation


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("missing-reference", _public_target, priority=400)
    app.connect("autodoc-process-docstring", _theory_docstring)
    app.connect("autodoc-process-docstring", _no_inline_type, priority=600)
    app.connect("source-read", _theory_source)
    app.connect("autodoc-process-signature", _constant_defaults)
