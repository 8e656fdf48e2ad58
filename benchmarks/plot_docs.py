"""The figures of docs/benchmarks.md (and docs/comparison.md), drawn from their own tables.

Every plot reads its numbers from the Markdown tables of ``docs/benchmarks.md`` and
``docs/comparison.md`` (never from ``benchmarks/results/``), so a figure cannot
disagree with the table it sits under. A table has a figure when the first non-blank
line after it is a Markdown image ``![...](figures/NAME.png)``; ``SPECS[NAME]`` says
which columns the figure shows and how. Run from anywhere::

    python benchmarks/plot_docs.py [--page PAGE.md ...] [--out docs/figures]
                                   [--only NAME ...] [--list]

The parsing half (``parse_tables``, ``figure_data``) needs no matplotlib; the test
``tests/test_benchmarks.py`` runs it on the pages and checks every plotted number
against the text of its cell.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
PAGES = [PAGE, ROOT / "docs" / "comparison.md"]
FIGURES = ROOT / "docs" / "figures"
DPI = 160

# A number as the tables write it: 1,070,794  2949.6  6.89e+03  -1.0799e+05  −0.65.
# A sign counts only after a space, a bracket or the start ("158-172" is a range).
NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
IMAGE = re.compile(r"^!\[[^\]]*\]\(figures/([\w\-]+)\.png\)\s*$")


def to_float(token: str) -> float:
    """The value of one ``NUMBER`` token."""
    return float(token.replace(",", "").replace("−", "-"))


def numbers(cell: str) -> list[tuple[str, float]]:
    """Every number in a cell, in order, as (its text, its value)."""
    return [(m.group(), to_float(m.group())) for m in NUMBER.finditer(cell)]


# --------------------------------------------------------------------------- #
# the page's tables


@dataclass
class Table:
    line: int  # 1-based line of the header row
    heading: str  # the nearest heading above
    header: list[str]
    rows: list[list[str]]
    figure: str | None  # NAME of the image right under it, if any


def split_row(line: str) -> list[str]:
    """The cells of one table row; ``\\|`` is a literal bar inside a cell."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def parse_tables(text: str) -> list[Table]:
    """Every pipe table of a Markdown page, with the figure under it."""
    lines = text.splitlines()
    tables: list[Table] = []
    heading, fence, i = "", False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif (
            not fence
            and line.startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|\s*:?-{3}", lines[i + 1])
        ):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            k = j
            while k < len(lines) and not lines[k].strip():
                k += 1
            image = IMAGE.match(lines[k]) if k < len(lines) else None
            tables.append(
                Table(
                    line=i + 1,
                    heading=heading,
                    header=split_row(line),
                    rows=[split_row(r) for r in lines[i + 2 : j]],
                    figure=image.group(1) if image else None,
                )
            )
            i = j
            continue
        i += 1
    return tables


# --------------------------------------------------------------------------- #
# what a figure shows


@dataclass
class Point:
    series: str  # colour and legend entry
    where: str | float  # a category (bars, dots) or an x value (lines)
    value: float
    text: str  # the number as the cell writes it
    row: int  # where it comes from: rows[row][col]
    col: int
    err: float | None = None  # a ± error bar, where the cell gives one


@dataclass
class Panel:
    kind: str  # "bars", "dots" or "lines"
    xlabel: str
    ylabel: str = ""
    title: str = ""
    log: bool = False  # log value axis (and log x for lines)
    ref: float | None = None  # a reference line at this value
    points: list[Point] = field(default_factory=list)


@dataclass
class Figure:
    name: str
    title: str
    panels: list[Panel]
    note: str = ""  # one line under the axes (rows not drawn, say)


def _cell_number(table: Table, r: int, c: int, k: int = 0) -> tuple[str, float] | None:
    found = numbers(table.rows[r][c])
    return found[k] if len(found) > k else None


def _col(table: Table, name: str) -> int:
    for c, h in enumerate(table.header):
        if h == name:
            return c
    raise KeyError(f"table at line {table.line}: no column {name!r} in {table.header}")


def _filled(table: Table, c: int) -> list[str]:
    """Column c with blank cells taken from the row above (continuation rows)."""
    out, last = [], ""
    for row in table.rows:
        last = row[c] or last
        out.append(last)
    return out


def bars(
    table: Table,
    label: Callable[[int], str],
    columns: dict[str, int],
    xlabel: str,
    *,
    kind: str = "bars",
    log: bool = False,
    ref: float | None = None,
    rows: Callable[[int], bool] = lambda r: True,
    every: bool = False,
) -> Panel:
    """One bar (or dot) per row and column: columns maps a series name to a column.

    With every=True each number of a cell is a point (cells listing several runs).
    """
    panel = Panel(kind=kind, xlabel=xlabel, log=log, ref=ref)
    for r in range(len(table.rows)):
        if not rows(r):
            continue
        for series, c in columns.items():
            found = numbers(table.rows[r][c])
            for text, value in found if every else found[:1]:
                panel.points.append(Point(series, label(r), value, text, r, c))
    return panel


def lines(
    table: Table,
    series: Callable[[int], str],
    x: Callable[[int, int], tuple[str, float] | None],
    y: Callable[[int, int], tuple[str, float] | None],
    columns: list[int],
    xlabel: str,
    ylabel: str,
    *,
    title: str = "",
) -> Panel:
    """One line per series(row) through the points (x(r, c), y(r, c)), c in columns."""
    panel = Panel(kind="lines", xlabel=xlabel, ylabel=ylabel, log=True, title=title)
    for r in range(len(table.rows)):
        for c in columns:
            xy, yy = x(r, c), y(r, c)
            if xy is None or yy is None:
                continue
            panel.points.append(Point(series(r), xy[1], yy[1], yy[0], r, c))
    return panel


def _row_label(table: Table, *cols: int) -> Callable[[int], str]:
    filled = [_filled(table, c) for c in cols]
    return lambda r: ", ".join(f[r] for f in filled if f[r])


def _header_x(table: Table) -> Callable[[int, int], tuple[str, float] | None]:
    """x from the column's header: "C = 1,000" -> 1000."""
    return lambda r, c: numbers(table.header[c])[-1]


def _cell_y(table: Table, k: int = 0) -> Callable[[int, int], tuple[str, float] | None]:
    return lambda r, c: _cell_number(table, r, c, k)


# -- the figures, by the name of their image ------------------------------- #

STEPS = "cost in gradient steps (log scale)"


def _exact_diagonal(t: Table, name: str) -> Figure:
    p = bars(t, _row_label(t, 0), {"median": 2}, STEPS, log=True, ref=1.0)
    model = name.rsplit("_", 1)[-1].upper()
    return Figure(name, f"Exact Fisher diagonal on the {model}: time in gradient steps", [p])


def _exact_diagonal_full(t: Table, name: str) -> Figure:
    p = bars(t, _row_label(t, 0), {"median": 2, "minimum": 5}, STEPS, log=True, ref=1.0)
    model = name.rsplit("_", 1)[-1].upper()
    return Figure(name, f"Exact Fisher diagonal on the {model}: time in gradient steps", [p])


def _estimators_headline(t: Table, name: str) -> Figure:
    cols = {t.header[1]: 1, t.header[2]: 2}
    p = bars(t, _row_label(t, 0), cols, STEPS, log=True, ref=1.0, rows=lambda r: r < 6)
    return Figure(
        name,
        "Fisher-diagonal estimators: cost in gradient steps, MLP and CNN",
        [p],
        note="The trace row (100 draws) is left out: another quantity.",
    )


def _secular(t: Table, name: str) -> Figure:
    c_of = lambda r, c: _cell_number(t, r, 0)  # noqa: E731
    series = {1: "secular equation", 2: "dense numpy eigvalsh"}
    p = Panel(kind="lines", xlabel="number of classes C", ylabel="time (s)", log=True)
    for r in range(len(t.rows)):
        for c, s in series.items():
            y = _cell_number(t, r, c)
            assert y is not None
            p.points.append(Point(s, c_of(r, c)[1], y[1], y[0], r, c))
    return Figure(name, "Core-space spectrum: secular equation against dense eigvalsh", [p])


def _spectrum(t: Table, name: str) -> Figure:
    col = _col(t, "× gradient step")
    p = bars(t, _row_label(t, 0), {"time": col}, STEPS, log=True, ref=1.0)
    return Figure(name, "Fisher spectrum on a 1.07M-parameter CNN: cost in gradient steps", [p])


def _landscape(t: Table, name: str) -> Figure:
    def label(r: int) -> str:
        return f"{t.rows[r][0]}, {t.rows[r][1]} per call" if t.rows[r][1] else t.rows[r][0]

    p = bars(t, label, {"per probe": 3}, "gradient steps per probe", ref=1.0)
    return Figure(name, "Hessian trace: loss values only against Hessian-vector products", [p])


def _lm_cost(t: Table, name: str) -> Figure:
    cols = {h.replace(" (× step)", ""): c for c, h in enumerate(t.header) if c >= 2}
    p = Panel(kind="bars", xlabel=STEPS, log=True, ref=1.0)
    for r, row in enumerate(t.rows):
        model = "V = 1000" if "V = 1000" in row[0] else "V = 50,257"
        for label, c in cols.items():
            text, value = numbers(row[c])[0]
            p.points.append(Point(model, label, value, text, r, c))
    return Figure(name, "GPT-2 Fisher diagonal: detach-and-mix against per-token Monte Carlo", [p])


def _lm_accuracy(t: Table, name: str) -> Figure:
    label = _row_label(t, 0)
    p = lines(
        t,
        label,
        lambda r, c: _cell_number(t, r, 2),
        lambda r, c: _cell_number(t, r, 3),
        [3],
        "time in gradient steps (log scale)",
        "relative error ‖est − F‖₂ / ‖F‖₂",
    )
    return Figure(name, "GPT-2 Fisher diagonal: error against time, 1 to 64 probes", [p])


def _before_after(t: Table, name: str, first: int, title: str, every: bool = False) -> Figure:
    """Tables of rows (model, code = before/after, cells...): one category per cell."""
    p = Panel(kind="dots" if every else "bars", xlabel=STEPS, log=True, ref=1.0)
    for r, row in enumerate(t.rows):
        for c in range(first, len(row)):
            found = numbers(row[c])
            # "1.25 (1.25), 1.13 (1.23)": the medians of two pairs, minima in parentheses
            picks = found[::2] if every else found[:1]
            for text, value in picks:
                where = f"{row[0]}: {t.header[c].replace(' (× step)', '')}"
                p.points.append(Point(row[1], where, value, text, r, c))
    note = "Dots: the medians of each pair of runs." if every else ""
    return Figure(name, title, [p], note)


def _lm_ratio(t: Table, name: str) -> Figure:
    p = Panel(
        kind="dots",
        xlabel="error ratio at equal time (< 1: detach-and-mix more accurate)",
        ref=1.0,
    )
    for r, row in enumerate(t.rows):
        probes = [s.strip() for s in row[1].split(",")]
        method = row[0].replace(" (against ", " vs ")
        method = method.rstrip(")")
        for c, series in ((2, "before"), (3, "after")):
            # "0.99, 0.98": the two pairs of runs; "0.49, 0.42; 0.49, 0.42": per pair,
            # one number per probe count (16, then 64)
            for pair in row[c].split(";") if len(probes) > 1 else [row[c]]:
                found = numbers(pair)
                labels = probes if len(probes) > 1 else probes * len(found)
                for probe, (text, value) in zip(labels, found, strict=True):
                    p.points.append(Point(series, f"{method}, M = {probe}", value, text, r, c))
    return Figure(name, "GPT-2: error ratio to Monte Carlo at equal time, before and after", [p])


def _eigsh(t: Table, name: str) -> Figure:
    label = lambda r: f"k = {t.rows[r][0]}"  # noqa: E731
    method = lambda r: t.rows[r][1].split(" (")[0].split(":")[0]  # noqa: E731
    panels = []
    for col, xlabel, log in (
        ("products", "Fisher products", False),
        ("median (s)", "median time (s, log scale)", True),
    ):
        c = _col(t, col)
        p = Panel(kind="bars", xlabel=xlabel, log=log)
        for r in range(len(t.rows)):
            text, value = numbers(t.rows[r][c])[0]
            p.points.append(Point(method(r), label(r), value, text, r, c))
        panels.append(p)
    return Figure(name, "Top-k eigenpairs: fisherbound eigsh against SciPy ARPACK", panels)


def _eigsh_block(t: Table, name: str) -> Figure:
    """The block rows of bench_eigsh (``--blocks``): the same panels as ``_eigsh``."""
    title = "Top-k eigenpairs: block Lanczos (block_size) against block_size = 1 and ARPACK"
    return Figure(name, title, _eigsh(t, name).panels)


def _hessian_directions(t: Table, name: str) -> Figure:
    label = _row_label(t, 0, 1)
    p1 = bars(t, label, {"products": 2}, "Hessian-vector products")
    p2 = bars(t, label, {"time": 4}, "time relative to PyHessian (log scale)", log=True, ref=1.0)
    return Figure(name, "Extreme Hessian eigenvalues: fisherbound against PyHessian", [p1, p2])


def _eigsh_partial(t: Table, name: str) -> Figure:
    """Partial reorthogonalisation: eigsh's time and the time outside its products."""
    label = lambda r: f"k = {t.rows[r][0]}"  # noqa: E731
    p1 = bars(t, label, {"before": 2, "after": 3}, "median time (s, log scale)", log=True)
    p2 = bars(t, label, {"before": 4, "after": 5}, "outside the products (s, log scale)", log=True)
    title = "Top Fisher eigenpairs: eigsh before and after partial reorthogonalisation"
    return Figure(name, title, [p1, p2])


def _hessian_steps(change: str) -> Callable[[Table, str], Figure]:
    """Hessian directions and PyHessian in gradient steps, before and after ``change``."""

    def plot(t: Table, name: str) -> Figure:
        label = lambda r: t.rows[r][0].split(" (")[0]  # noqa: E731
        p = bars(t, label, {"before": 2, "after": 3}, STEPS, kind="dots", log=True, every=True)
        title = f"Hessian eigenpairs: gradient steps before and after {change}"
        return Figure(name, title, [p], "Dots: one per run.")

    return plot


def _jax_compiled_count(t: Table, name: str) -> Figure:
    """The compiled count and Hessian directions against the Python loops they replace."""
    label = lambda r: t.rows[r][0]  # noqa: E731
    p1 = bars(t, label, {"first call": 2, "later calls": 3}, "time (s, log scale)", log=True)
    title = "JAX: the compiled count and Hessian directions against the Python loops"
    return Figure(name, title, [p1])


def _kfac_rerun(t: Table, name: str) -> Figure:
    """kfac-jax's time over fisherbound's, eager and jitted (> 1: fisherbound faster)."""
    label = lambda r: t.rows[r][0]  # noqa: E731
    p = bars(
        t, label, {"eager": 5, "jitted": 6},
        "kfac-jax's time / fisherbound's (> 1: fisherbound faster, log scale)",
        log=True, ref=1.0,
    )  # fmt: skip
    return Figure(name, "Exact Fisher diagonal with JAX: kfac-jax over fisherbound", [p])


def _estimator_cost(t: Table, name: str) -> Figure:
    p = bars(
        t, _row_label(t, 0), {"before": 1, "after": 2}, STEPS, kind="dots", log=True, every=True
    )
    return Figure(name, "Detach-and-mix and exact diagonal cost, before and after", [p])


def _architecture_cost(t: Table, name: str) -> Figure:
    p = bars(
        t, _row_label(t, 0), {"before": 1, "after": 2}, STEPS, kind="dots", log=True, every=True
    )
    return Figure(name, "Exact diagonal and estimators before and after the restructuring", [p])


def _local_dimension(t: Table, name: str) -> Figure:
    label = _row_label(t, 0)
    panels = []
    for c, xlabel in ((1, "Fisher products (log scale)"), (2, STEPS)):
        p = Panel(kind="bars", xlabel=xlabel, log=True)
        for r, row in enumerate(t.rows):
            found = numbers(row[c])  # "231 → 54"
            for series, (text, value) in zip(("before", "after"), found, strict=False):
                p.points.append(Point(series, label(r), value, text, r, c))
        panels.append(p)
    return Figure(name, "Local dimension: products and time before and after", panels)


def _jax(t: Table, name: str) -> Figure:
    label = _row_label(t, 0)
    p = bars(
        t,
        label,
        {"first call (compilation included)": 2, "later calls (median)": 3},
        "time (s, log scale)",
        log=True,
    )
    return Figure(name, "JAX Lanczos, SLQ and eigsh: fisherbound against matfree", [p])


def _jax_diagonal(t: Table, name: str) -> Figure:
    """Milliseconds of the layer rules, the vmap and torch; then kfac-jax, JAX alone."""
    label = lambda r: t.rows[r][0].split(" (")[0]  # noqa: E731
    p1 = bars(t, label, {
        "layer rules": 1, "layer rules, jitted": 2, "vmap": 3, "torch fast path": 4,
    }, "time (ms, log scale)", log=True)  # fmt: skip
    p2 = bars(t, label, {
        "kfac-jax (jitted)": 5, "fisherbound": 6, "fisherbound, jitted": 7,
    }, "time (ms, log scale), JAX 0.9.0 alone", log=True)  # fmt: skip
    title = "Exact Fisher diagonal with JAX: layer rules, vmap, torch; kfac-jax"
    return Figure(name, title, [p1, p2])


def _finite(t: Table, name: str) -> Figure:
    p = bars(
        t,
        _row_label(t, 0, 1),
        {"checked / unchecked": 4},
        "time with the checks / time without (1: no cost)",
        kind="dots",
        ref=1.0,
    )
    return Figure(name, "Cost of the finite checks: checked against unchecked time", [p])


def _estimators_full(t: Table, name: str) -> Figure:
    label = _row_label(t, 0)
    p1 = bars(t, label, {"cost": 1}, STEPS, log=True, ref=1.0)
    p2 = bars(t, label, {"memory": 2}, "peak memory (MiB)")
    model = name.split("_")[3].upper()
    return Figure(
        name, f"Fisher-diagonal estimators on the {model}: cost and peak memory", [p1, p2]
    )


def _error_by_draws(t: Table, name: str) -> Figure:
    cols = list(range(1, len(t.header)))
    if "(" in t.rows[0][1]:  # "1.400 (1.2)": error, then cost in gradient steps
        p = lines(
            t,
            _row_label(t, 0),
            _cell_y(t, 1),
            _cell_y(t, 0),
            cols,
            "cost in gradient steps (log scale)",
            "relative error of the diagonal",
        )
        model = name.split("_")[3].upper()
        title = f"Diagonal estimators on the {model}: relative error against cost"
    else:
        p = lines(
            t,
            _row_label(t, 0),
            _header_x(t),
            _cell_y(t, 0),
            cols,
            "number of draws k (log scale)",
            "relative error of the diagonal",
        )
        title = "Diagonal estimators on a trained, confident MLP: error by draws"
    return Figure(name, title, [p])


def _full_spectrum(t: Table, name: str) -> Figure:
    p = bars(t, _row_label(t, 0), {"time": 3}, STEPS, log=True, ref=1.0)
    return Figure(name, "Fisher spectrum on a 1.07M-parameter CNN: cost in gradient steps", [p])


def _trace_estimates(t: Table, name: str) -> Figure:
    p = Panel(kind="dots", xlabel="estimate of tr H (± one standard error)", ref=0.0)
    for r, row in enumerate(t.rows):
        for c, series in ((3, "from loss values"), (4, "from HVPs, same probes")):
            (text, value), (_, err) = numbers(row[c])[:2]
            p.points.append(Point(series, f"{row[0]}, {row[1]}", value, text, r, c, err))
    return Figure(name, "Hessian trace: loss-value estimate against HVP estimate", [p])


def _peers(t: Table, name: str) -> Figure:
    def label(r: int) -> str:
        return f"{t.rows[r][0]}: {t.rows[r][1]}"

    p = bars(t, label, {"time": 3}, STEPS, log=True, ref=1.0)
    quantity = name.removeprefix("bench_full_peers_").replace("_", " ")
    return Figure(name, f"fisherbound and its peers, {quantity}: time in gradient steps", [p])


def _memory(t: Table, name: str) -> Figure:
    xname = "number of classes C" if t.header[1].startswith("C") else "batch size N"
    label = _row_label(t, 0)
    cols = list(range(1, len(t.header)))
    short = lambda r: label(r).replace(" (cross-entropy sum, backward)", "")  # noqa: E731

    def k_mem(r: int, c: int) -> tuple[str, float] | None:
        # "3.2 MB (2.78×), 0.0139 s (6.19×)"; "—" and "out of memory at the cap" are no point
        return numbers(t.rows[r][c])[0] if " MB" in t.rows[r][c] else None

    def k_time(r: int, c: int) -> tuple[str, float] | None:
        cell = t.rows[r][c]
        return numbers(cell)[2 if "×" in cell else 1] if " s" in cell else None

    p1 = lines(t, short, _header_x(t), k_mem, cols, xname, "peak extra memory (MB)", title="memory")
    p2 = lines(t, short, _header_x(t), k_time, cols, xname, "time (s)", title="time")
    return Figure(
        name,
        f"Peak memory and time against {xname.split()[-1]}, {name.split('_')[2]} the change:"
        " fisherbound, BackPACK, curvlinops",
        [p1, p2],
        note="Missing points: not run (—) or out of memory at the 10 GiB cap.",
    )


def _comparison(t: Table, name: str) -> Figure:
    """docs/comparison.md: one group per quantity, one bar per library that has it."""
    p = Panel(kind="bars", xlabel=STEPS, log=True, ref=1.0)
    for r, row in enumerate(t.rows):
        quantity = row[0].split(" (")[0]
        for c in range(1, len(row)):
            found = numbers(row[c])  # "5.05 (1.4e-07)": time, then the agreement
            if found:
                p.points.append(Point(t.header[c], quantity, found[0][1], found[0][0], r, c))
    return Figure(
        name,
        "fisherbound beside its peers: time in gradient steps, per quantity",
        [p],
        note="The first number of each cell; alternatives and agreements in the table.",
    )


SPECS: dict[str, Callable[[Table, str], Figure]] = {
    "comparison_peers": _comparison,
    "bench_exact_diagonal_mlp": _exact_diagonal,
    "bench_exact_diagonal_cnn": _exact_diagonal,
    "bench_estimators": _estimators_headline,
    "bench_secular": _secular,
    "bench_spectrum": _spectrum,
    "bench_landscape": _landscape,
    "bench_lm_cost": _lm_cost,
    "bench_lm_accuracy": _lm_accuracy,
    "bench_lm_elementwise": lambda t, n: _before_after(
        t, n, 3, "GPT-2: cost in gradient steps before and after removing elementwise overhead"
    ),
    "bench_lm_fused_softmax": lambda t, n: _before_after(
        t, n, 2, "GPT-2: detach-and-mix before and after one fused log-softmax", every=True
    ),
    "bench_lm_in_place": lambda t, n: _before_after(
        t, n, 3, "GPT-2: cost before and after in-place cotangents", every=True
    ),
    "bench_lm_in_place_ratio": _lm_ratio,
    "bench_lm_signs": lambda t, n: _before_after(
        t, n, 3, "GPT-2: cost before and after the one-probe signs kernel", every=True
    ),
    "bench_eigsh": _eigsh,
    "bench_eigsh_block": _eigsh_block,
    "bench_hessian_directions": _hessian_directions,
    "bench_eigsh_partial": _eigsh_partial,
    "bench_hessian_partial": _hessian_steps("partial reorthogonalisation"),
    "bench_hessian_passes": _hessian_steps("the four-pass Lanczos step"),
    "bench_jax_compiled_count": _jax_compiled_count,
    "bench_kfac_rerun": _kfac_rerun,
    "bench_estimator_cost": _estimator_cost,
    "bench_local_dimension": _local_dimension,
    "bench_jax_lanczos": _jax,
    "bench_jax_diagonal": _jax_diagonal,
    "bench_finite_checks": _finite,
    "bench_architecture_cost": _architecture_cost,
    "bench_full_secular": _secular,
    "bench_full_exact_diagonal_mlp": _exact_diagonal_full,
    "bench_full_exact_diagonal_cnn": _exact_diagonal_full,
    "bench_full_estimators_mlp": _estimators_full,
    "bench_full_estimators_mlp_draws": _error_by_draws,
    "bench_full_estimators_mlp_trained": _error_by_draws,
    "bench_full_estimators_cnn": _estimators_full,
    "bench_full_estimators_cnn_draws": _error_by_draws,
    "bench_full_spectrum": _full_spectrum,
    "bench_full_landscape": _landscape,
    "bench_full_trace_estimates": _trace_estimates,
    "bench_full_peers_exact_diagonal": _peers,
    "bench_full_peers_exact_trace": _peers,
    "bench_full_peers_fisher_vector_product": _peers,
    "bench_full_peers_trace_100_probes": _peers,
    "bench_full_peers_top_5_eigenvalues": _peers,
    "bench_full_peers_hessian_trace": _peers,
    "bench_full_peers_largest_hessian_eigenvalue": _peers,
    "bench_full_peers_diagonal_1_sample": _peers,
    "bench_full_peers_diagonal_10_samples": _peers,
    "bench_memory_before_classes": _memory,
    "bench_memory_before_batch": _memory,
    "bench_memory_after_classes": _memory,
    "bench_memory_after_batch": _memory,
}


def data_digest(fig_data: Figure) -> str:
    """A fingerprint of what a figure shows, stored in its PNG (the test compares it)."""
    import hashlib

    rows = [fig_data.title, fig_data.note]
    for i, panel in enumerate(fig_data.panels):
        rows.append(f"{i} {panel.kind} {panel.xlabel} {panel.ylabel} {panel.log} {panel.ref}")
        rows += [f"{i} {p.series} {p.where} {p.value!r} {p.err!r}" for p in panel.points]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def figure_data(table: Table) -> Figure:
    """What the figure under a table shows (the table must have a figure)."""
    if table.figure is None:
        raise ValueError(f"the table at line {table.line} has no figure under it")
    if table.figure not in SPECS:
        raise KeyError(f"no SPECS entry for the figure {table.figure!r} (line {table.line})")
    return SPECS[table.figure](table, table.figure)


# --------------------------------------------------------------------------- #
# drawing


def _wrap(label: str, width: int = 44) -> str:
    label = label.replace("`", "")
    return "\n".join(textwrap.wrap(label, width)) or label


def _draw_categories(
    ax, panel: Panel, colors: dict[str, str], show_labels: bool, legend: bool
) -> None:
    categories = list(dict.fromkeys(p.where for p in panel.points))
    series = list(dict.fromkeys(p.series for p in panel.points))
    n = len(series)
    height = 0.8 / n
    for s_i, s in enumerate(series):
        offset = (s_i - (n - 1) / 2) * height
        pts = [p for p in panel.points if p.series == s]
        ys = [categories.index(p.where) + offset for p in pts]
        xs = [p.value for p in pts]
        if panel.kind == "bars":
            base = 0.0
            if panel.log:
                low = min([p.value for p in panel.points if p.value > 0] + [panel.ref or 1e300])
                base = low / 2
            ax.barh(
                ys, [x - base for x in xs], left=base, height=height * 0.9, color=colors[s], label=s
            )
            for y, p in zip(ys, pts, strict=True):
                ax.annotate(
                    p.text,
                    (p.value, y),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7.5,
                )
        else:
            errs = [p.err for p in pts]
            ax.errorbar(
                xs,
                ys,
                xerr=errs if any(e is not None for e in errs) else None,
                fmt="o",
                color=colors[s],
                label=s,
                markersize=5,
                capsize=3,
            )
    ax.set_yticks(range(len(categories)))
    if show_labels:
        ax.set_yticklabels([_wrap(str(c)) for c in categories])
    else:
        ax.tick_params(labelleft=False)
    ax.set_ylim(len(categories) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3, which="both")
    if panel.log:
        ax.set_xscale("log")
    if panel.ref is not None:
        ax.axvline(panel.ref, color="0.4", lw=0.8, ls="--")
    if panel.kind == "bars":
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * (2.5 if panel.log else 1.12))
    if panel.log:
        _readable_log_ticks(ax)
    ax.set_xlabel(panel.xlabel)
    if n > 1 and legend:
        ax.legend(
            fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=min(n, 3), frameon=False
        )


def _readable_log_ticks(ax) -> None:
    """Within about a decade and a half, ticks at 1, 2 and 5 times powers of ten, as plain
    numbers: matplotlib's own labels of the minor ticks run into each other there."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    inside = [v for v in locator.tick_values(lo, hi) if lo <= v <= hi] if lo > 0 else []
    if len(inside) >= 2 and hi / lo < 30:  # else matplotlib's own ticks
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _draw_lines(ax, panel: Panel, colors: dict[str, str]) -> None:
    for s in dict.fromkeys(p.series for p in panel.points):
        pts = sorted((p for p in panel.points if p.series == s), key=lambda p: p.where)
        ax.plot(
            [p.where for p in pts],
            [p.value for p in pts],
            "o-",
            color=colors[s],
            label=_wrap(s, 40),
            markersize=4,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3, which="both")
    if panel.title:
        ax.set_title(panel.title, fontsize=10)


def draw(fig_data: Figure, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = fig_data.panels
    all_series = list(dict.fromkeys(p.series for panel in panels for p in panel.points))
    cmap = plt.get_cmap("tab10")
    colors = {s: cmap(i % 10) for i, s in enumerate(all_series)}
    if panels[0].kind == "lines":
        many = len(all_series) > 5
        size = (4.6 * len(panels) + (0.2 if many else 1.8), 4.0 + (0.9 if many else 0))
        fig, axes = plt.subplots(1, len(panels), figsize=size)
        axes = list(axes) if len(panels) > 1 else [axes]
        for ax, panel in zip(axes, panels, strict=True):
            _draw_lines(ax, panel, colors)
        handles, labels = axes[0].get_legend_handles_labels()
        for ax in axes[1:]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if many:
            fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
        else:
            fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:
        rows = max(
            len(dict.fromkeys(p.where for p in panel.points))
            * max(1, len(dict.fromkeys(p.series for p in panel.points)) * 0.45)
            for panel in panels
        )
        height = 1.3 + 0.32 * rows
        # panels of several series each are stacked (wide enough to read), others side by side
        stacked = len(panels) > 1 and any(
            len({p.series for p in panel.points}) > 1 for panel in panels
        )
        if stacked:
            fig, axes = plt.subplots(len(panels), 1, figsize=(7.8, (height - 0.4) * len(panels)))
        else:
            width = 3.2 * len(panels) + 3.4
            fig, axes = plt.subplots(1, len(panels), figsize=(width, height), sharey=True)
        axes = list(axes) if len(panels) > 1 else [axes]
        first = {p.series for p in panels[0].points}
        for i, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
            # a stacked panel whose series the first one's legend does not name has its own
            own = stacked and bool({p.series for p in panel.points} - first)
            _draw_categories(ax, panel, colors, show_labels=stacked or i == 0, legend=i == 0 or own)
    fig.suptitle(fig_data.title, fontsize=11, fontweight="bold")
    if fig_data.note:
        fig.text(0.01, 0.005, fig_data.note, fontsize=7.5, color="0.35", va="bottom")
    bottom = 0.03 if fig_data.note else 0.0
    if panels[0].kind == "lines" and len(all_series) > 5:
        bottom = 0.2
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = out / f"{fig_data.name}.png"
    digest = data_digest(fig_data)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Comment": f"data {digest}"})
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--page", type=Path, nargs="+", default=PAGES)
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--only", nargs="*", default=None, help="figure names to draw")
    parser.add_argument("--list", action="store_true", help="list the tables and their figures")
    args = parser.parse_args(argv)
    tables = [t for page in args.page for t in parse_tables(page.read_text(encoding="utf-8"))]
    if args.list:
        for t in tables:
            print(f"line {t.line:4d}  {t.figure or '-':45s}  {t.heading[:60]}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for t in tables:
        if t.figure is None or (args.only is not None and t.figure not in args.only):
            continue
        print(draw(figure_data(t), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
