"""Figures for the loss landscape and the Fisher metric (matplotlib, optional).

- ``plot_surface``: one loss surface of ``fisherbound.landscape.surface``: a
  filled contour plot, a 3-D surface, or a curve for a 1-D section;
- ``plot_surfaces``: several surfaces side by side (random against Hessian
  directions), as contours, 3-D surfaces, or both;
- ``plot_spectral_density``: a (smoothed) spectral density with its pointwise
  error band, e.g. ``fisherbound.dimension.spectral_density`` or the Hessian's
  from ``fisherbound.linalg.lanczos_quadrature``, with optional markers (the
  extreme eigenvalues);
- ``plot_fisher_diagonal``: the Fisher diagonal block by block: the exact values,
  the certified bounds as a band and a random estimate with error bars.

matplotlib is imported inside the functions, so ``import fisherbound.plotting``
works without it; every function raises an ImportError naming the remedy when
it is missing. Figures are built with ``matplotlib.figure.Figure`` (no pyplot
state, no display needed): save them with ``fig.savefig(path)``. Every function
returns the Figure (the one of ``ax`` when an axes is given). Arrays of any
namespace and device are copied to the host (they are small: grids, spectra,
one diagonal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fisherbound._lib import Estimate, check_choice, check_positive_int, is_array, to_host

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    import matplotlib.axes

    import fisherbound.fisher

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "plot_surface",
    "plot_surfaces",
    "plot_spectral_density",
    "plot_fisher_diagonal",
    "SURFACE_KINDS",
]

#: ``kind=`` of the surface plots.
SURFACE_KINDS = ("contour", "3d", "both")


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        msg = (
            "fisherbound.plotting needs matplotlib, which is not installed; install it with "
            "`pip install matplotlib` (or `pip install fisherbound[demo]`)."
        )
        raise ImportError(msg) from err
    return Figure


def _host(x: Any, name: str) -> Any:
    import numpy as np

    if is_array(x):
        return np.asarray(to_host(x), dtype=float)
    msg = f"{name} must be an array of an array-API library; got {type(x).__name__}."
    raise TypeError(msg)


def _check_surface(surface: Any, name: str = "surface") -> tuple[list[Any], Any]:
    coords = getattr(surface, "coordinates", None)
    values = getattr(surface, "values", None)
    if coords is None or values is None or not isinstance(coords, tuple | list):
        msg = (
            f"{name} must be a Surface (coordinates, values, ...) as returned by "
            f"fisherbound.landscape.surface; got {type(surface).__name__}."
        )
        raise TypeError(msg)
    axes = [_host(c, f"{name}.coordinates[{i}]") for i, c in enumerate(coords)]
    z = _host(values, f"{name}.values")
    if len(axes) not in (1, 2) or z.shape != tuple(a.shape[0] for a in axes):
        msg = (
            f"{name} must be a 1-D or 2-D surface whose values have the shape of its "
            f"coordinates; got {len(axes)} coordinate arrays and values of shape {z.shape}."
        )
        raise ValueError(msg)
    return axes, z


def _draw_contour(fig: Any, ax: Any, axes: list[Any], z: Any, levels: int, title: str) -> None:
    import numpy as np

    a, b = np.meshgrid(axes[0], axes[1], indexing="ij")
    filled = ax.contourf(a, b, z, levels=levels, cmap="viridis")
    ax.contour(a, b, z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10, linestyle="none", label="θ")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_title(title)


def _draw_3d(ax: Any, axes: list[Any], z: Any, title: str) -> None:
    import numpy as np

    a, b = np.meshgrid(axes[0], axes[1], indexing="ij")
    ax.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss", labelpad=8)
    ax.set_title(title)


def _draw_curve(ax: Any, axes: list[Any], z: Any, title: str) -> None:
    ax.plot(axes[0], z, color="C0")
    ax.axvline(0.0, color="red", linewidth=0.8, linestyle="--")
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    ax.set_title(title)


def plot_surface(
    surface: Any,
    /,
    *,
    kind: str = "contour",
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
    levels: int = 30,
) -> Any:
    r"""Plot a loss surface from ``fisherbound.landscape.surface``.

    A 2-D surface as filled contours with contour lines, a colour bar and :math:`\theta`
    (the origin) marked by a red star (``kind="contour"``), as a 3-D surface
    (``"3d"``), or both side by side (``"both"``); a 1-D section as a curve with
    :math:`\theta` marked (``kind`` is then ignored).

    Parameters
    ----------
    surface
        A ``Surface`` (coordinates, values, ...).
    kind
        ``"contour"``, ``"3d"`` or ``"both"``.
    ax
        An existing matplotlib axes to draw into (a 3-D one for ``"3d"``; not with
        ``"both"``); default a new figure.
    title
        The axes title (default: "loss surface").
    levels
        Number of contour levels.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.landscape import Surface
    >>> t = np.linspace(-1.0, 1.0, 5)
    >>> s = Surface((t, t), t[:, None] ** 2 - t[None, :] ** 2, np.eye(2), "sum")
    >>> fig = plot_surface(s)  # doctest: +SKIP
    >>> fig.savefig("saddle.png")  # doctest: +SKIP
    """
    kind = check_choice(kind, "kind", SURFACE_KINDS)
    levels = check_positive_int(levels, "levels")
    axes, z = _check_surface(surface)
    figure_class = _figure_class()
    label = "loss surface" if title is None else title
    if ax is not None and kind == "both" and len(axes) == 2:
        msg = "ax must be None for kind='both' (it draws two axes); pass kind='contour' or '3d'."
        raise ValueError(msg)
    if len(axes) == 1:
        fig = figure_class(figsize=(5.0, 3.6), layout="constrained") if ax is None else ax.figure
        target = fig.add_subplot() if ax is None else ax
        _draw_curve(target, axes, z, label)
        return fig
    if kind == "both":
        fig = figure_class(figsize=(10.0, 4.0), layout="constrained")
        _draw_contour(fig, fig.add_subplot(1, 2, 1), axes, z, levels, label)
        _draw_3d(fig.add_subplot(1, 2, 2, projection="3d"), axes, z, label)
        return fig
    if ax is None:
        fig = figure_class(figsize=(5.5, 4.2), layout="constrained")
        ax = fig.add_subplot(projection="3d") if kind == "3d" else fig.add_subplot()
    else:
        fig = ax.figure
    if kind == "3d":
        if getattr(ax, "name", "") != "3d":
            msg = "ax must be a 3-D axes (projection='3d') for kind='3d'; got a 2-D axes."
            raise ValueError(msg)
        _draw_3d(ax, axes, z, label)
    else:
        _draw_contour(fig, ax, axes, z, levels, label)
    return fig


def plot_surfaces(
    surfaces: Sequence[Any],
    /,
    *,
    titles: Sequence[str] | None = None,
    kind: str = "contour",
    levels: int = 30,
) -> Any:
    """Several loss surfaces side by side, e.g. random against Hessian directions.

    One column per surface; ``kind="both"`` gives two rows (contours above, 3-D
    surfaces below). Each panel has its own colour scale (the losses along
    different directions can differ by orders of magnitude).

    Parameters
    ----------
    surfaces
        A sequence of ``Surface`` (1-D or 2-D; 1-D ones are drawn as curves).
    titles
        One title per surface (default "surface 1", "surface 2", ...).
    kind, levels
        As in ``plot_surface``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    kind = check_choice(kind, "kind", SURFACE_KINDS)
    levels = check_positive_int(levels, "levels")
    if not isinstance(surfaces, Sequence) or isinstance(surfaces, str) or not surfaces:
        msg = (
            f"surfaces must be a non-empty list of Surface objects; got {type(surfaces).__name__}."
        )
        raise TypeError(msg)
    data = [_check_surface(s, f"surfaces[{i}]") for i, s in enumerate(surfaces)]
    if titles is None:
        titles = [f"surface {i + 1}" for i in range(len(data))]
    if isinstance(titles, str) or len(titles) != len(data):
        msg = f"titles must be a list of {len(data)} strings, one per surface; got {titles!r}."
        raise ValueError(msg)
    figure_class = _figure_class()
    cols = len(data)
    rows = 2 if kind == "both" else 1
    fig = figure_class(figsize=(5.2 * cols, 4.2 * rows), layout="constrained")
    for j, ((axes, z), title) in enumerate(zip(data, titles, strict=True)):
        if len(axes) == 1:
            _draw_curve(fig.add_subplot(rows, cols, j + 1), axes, z, title)
            continue
        if kind in ("contour", "both"):
            _draw_contour(fig, fig.add_subplot(rows, cols, j + 1), axes, z, levels, title)
        if kind in ("3d", "both"):
            index = j + 1 + (cols if kind == "both" else 0)
            _draw_3d(fig.add_subplot(rows, cols, index, projection="3d"), axes, z, title)
    return fig


def plot_spectral_density(
    density: Any,
    /,
    *,
    grid: Array | None = None,
    std_error: Array | None = None,
    num_probes: int | None = None,
    markers: Array | Sequence[float] | None = None,
    log: bool = False,
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
    xlabel: str = "eigenvalue",
) -> Any:
    r"""A spectral density with its pointwise 95% confidence band.

    The band is the Student-t interval over the :math:`M` probes (``Estimate.interval``
    with :math:`M - 1` degrees of freedom; the per-probe densities are :math:`\ge 0`, so on
    the cube-root scale). When :math:`M` is unknown (a bare ``std_error`` without
    ``num_probes``) it is :math:`\pm 2` standard errors, labelled so.

    Parameters
    ----------
    density
        An object with ``grid``, ``density`` and (optionally) ``std_error`` (a
        ``fisherbound.dimension.SpectralDensity``), or a 1-D density array with
        ``grid=``.
    grid, std_error
        When ``density`` is an array: the points (same length) and, optionally, the
        pointwise standard error.
    num_probes
        :math:`M`, the probes the density averages (default: ``density.num_probes``, or
        the rows of ``density.nodes`` of a ``SpectralDensity``).
    markers
        Eigenvalues to mark with vertical dashed lines (e.g. the extreme Hessian
        eigenvalues of ``hessian_directions``): an array or a list of numbers.
    log
        Logarithmic density axis (values below 1e−12 of the maximum are clipped).
    ax, title, xlabel
        Axes to draw into (default a new figure), title and x label.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import numpy as np

    if hasattr(density, "grid") and hasattr(density, "density"):
        grid = density.grid
        std_error = getattr(density, "std_error", None)
        if num_probes is None:
            num_probes = getattr(density, "num_probes", None)
        nodes = getattr(density, "nodes", None)
        if num_probes is None and nodes is not None and len(getattr(nodes, "shape", ())) == 2:
            num_probes = int(nodes.shape[0])
        density = density.density
    if grid is None:
        msg = (
            "grid is required when density is an array (pass grid=...), or pass a "
            "SpectralDensity (grid, density, std_error)."
        )
        raise ValueError(msg)
    t = _host(grid, "grid")
    phi = _host(density, "density")
    if t.ndim != 1 or phi.shape != t.shape:
        msg = (
            "density and grid must be 1-D arrays of the same length; got shapes "
            f"{phi.shape} and {t.shape}."
        )
        raise ValueError(msg)
    se = None if std_error is None else _host(std_error, "std_error")
    if se is not None and se.shape != t.shape:
        msg = f"std_error must have the shape of grid {t.shape}; got {se.shape}."
        raise ValueError(msg)
    figure_class = _figure_class()
    fig = figure_class(figsize=(6.0, 3.8), layout="constrained") if ax is None else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    floor = 1e-8 * max(float(np.max(np.abs(phi))), 1e-300)
    shown = np.maximum(phi, floor) if log else phi
    ax.plot(t, shown, color="C0", label="density")
    if se is not None:
        if num_probes is None:
            lo, hi, label = phi - 2.0 * se, phi + 2.0 * se, "±2 standard errors"
        else:
            m = check_positive_int(num_probes, "num_probes")
            lo, hi = Estimate(phi, se, m, floor=0.0).interval(0.95)
            hi = np.where(np.isfinite(hi), hi, np.max(np.abs(phi)) * 2.0)
            label = f"95% interval ({m} probes)"
        if log:
            lo, hi = np.maximum(lo, floor), np.maximum(hi, floor)
        ax.fill_between(t, lo, hi, color="C0", alpha=0.25, label=label)
    if markers is not None:
        values = _host(markers, "markers") if is_array(markers) else np.asarray(markers, float)
        for i, v in enumerate(np.ravel(values)):
            ax.axvline(
                float(v),
                color="C3",
                linestyle="--",
                linewidth=1.0,
                label="marked eigenvalues" if i == 0 else None,
            )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title("spectral density" if title is None else title)
    ax.legend(loc="best", fontsize="small")
    return fig


def _block_list(blocks: Any) -> list[Any]:
    if hasattr(blocks, "blocks"):
        blocks = blocks.blocks
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        msg = (
            "blocks must be a non-empty sequence of ParameterBlock (or a linearization or "
            f"loss function with .blocks); got {type(blocks).__name__}."
        )
        raise TypeError(msg)
    for i, b in enumerate(blocks):
        if not all(hasattr(b, a) for a in ("name", "offset", "size")):
            msg = f"blocks[{i}] must be a ParameterBlock (name, shape, offset, size); got {b!r}."
            raise TypeError(msg)
    return list(blocks)


def plot_fisher_diagonal(
    blocks: Any,
    /,
    *,
    exact: Array | None = None,
    bounds: fisherbound.fisher.Bounds | tuple[Array, Array] | None = None,
    estimate: Any = None,
    max_points_per_block: int = 200,
    log: bool = True,
    ax: matplotlib.axes.Axes | None = None,
    title: str | None = None,
) -> Any:
    r"""The Fisher diagonal per parameter block, with its bounds and error bars.

    Within each block (separated by vertical lines and labelled by name) the
    entries are sorted by the exact value (or by the estimate when there is no
    exact value) and, for large blocks, thinned to ``max_points_per_block`` evenly
    spaced ranks. Every block gets at least 1/40 of the x axis, so a small block (a
    bias) stays visible; the block names are stacked in rows above the axes so that
    no two overlap. Drawn: the exact diagonal (dots), the certified bounds
    :math:`\operatorname{diag} F_\mathrm{LR} \le \operatorname{diag} F
    \le \operatorname{diag} F_\mathrm{DG}` (a shaded band between the two curves) and
    a random estimate with its 95% confidence intervals (``estimate.interval(0.95)``:
    Student t with the estimate's degrees of freedom, see ``fisherbound.Estimate``).

    Entries that are exactly 0 (of the exact diagonal when given; a parameter that
    changes no output on the inputs, e.g. a weight from an input pixel that is
    always 0 or into a dead ReLU unit) have no place on a log axis: with ``log``
    and a new figure they are drawn in a strip of their own below the axes,
    labelled "exactly 0" with their count (:math:`n` of :math:`D` entries, percent); into a given
    ``ax`` they are drawn at the bottom of the axes as grey crosses, with the count
    in the legend.

    Parameters
    ----------
    blocks
        The parameter blocks (``lin.blocks``), or a linearization / loss function.
    exact
        :math:`\operatorname{diag} F` (D,), e.g. ``fisherbound.fisher.fisher_diagonal(lin)``.
    bounds
        ``(lower, upper)`` (D,) each, e.g. ``fisherbound.fisher.fisher_bounds(lin)``.
    estimate
        An ``Estimate`` with ``value`` and ``std_error`` (D,), e.g.
        ``fisherbound.estimators.detach_and_mix(lin, num_probes=16)``; its
        ``interval(0.95)`` gives the error bars (an unbounded upper end is drawn
        to the top of the axes).
    max_points_per_block
        Entries shown per block.
    log
        Logarithmic y axis (the log axis starts a decade below the smallest
        positive value; exactly-zero entries are shown apart, see above).
    ax, title
        Axes to draw into (default a new figure) and title.

    Returns
    -------
    matplotlib.figure.Figure
        Its first axes holds the diagonal; with zero entries and a new figure the
        second is the "exactly 0" strip. A new figure has its legend below the axes
        (``fig.legends[0]``), a given ``ax`` its own (``ax.get_legend()``).
    """
    import numpy as np

    blocks = _block_list(blocks)
    per_block = check_positive_int(max_points_per_block, "max_points_per_block")
    series = _diagonal_series(blocks, exact, bounds, estimate)
    key: Any = next(series[k] for k in ("exact", "estimate", "upper") if k in series)
    order, x, starts = _block_order(blocks, key, per_block)
    zero = key == 0.0
    num_zero, d = int(np.count_nonzero(zero)), int(key.shape[0])
    figure_class = _figure_class()
    strip, own = None, ax is None
    if ax is None:
        fig = figure_class(figsize=(10.0, 5.4), layout="constrained")
        if log and num_zero:
            grid = fig.add_gridspec(2, 1, height_ratios=(9, 1), hspace=0.0)
            ax = fig.add_subplot(grid[0])
            strip = fig.add_subplot(grid[1], sharex=ax)
        else:
            ax = fig.add_subplot()
    else:
        fig = ax.figure
    values = np.concatenate([v for k, v in series.items() if k not in ("std_error", "low", "high")])
    positive = values[values > 0]
    floor = 0.1 * float(np.min(positive)) if positive.size else 1e-12
    shown_zero = zero[order] if log else np.zeros(order.shape, dtype=bool)
    _draw_diagonal(ax, series, order, x, floor, log, shown_zero)
    zero_label = (
        f"exactly 0: {num_zero} of {d} entries ({100.0 * num_zero / d:.1f}%)" if num_zero else ""
    )
    if log and num_zero:
        xz = x[zero[order]]
        target, y0 = (strip, 0.5) if strip is not None else (ax, floor)
        target.plot(xz, np.full(xz.shape, y0), "x", color="0.35", markersize=4)
        # The count goes into the main legend, where it cannot cover a marker.
        where = " (strip below)" if strip is not None else " (at the bottom)"
        ax.plot([], [], "x", color="0.35", markersize=4, label=zero_label + where)
        if strip is not None:
            strip.set_ylim(0.0, 1.0)
            strip.set_yticks([0.5], labels=["exactly 0"])
            ax.tick_params(axis="x", labelbottom=False)
    for start, _stop, _name in starts:
        if start > -0.5:
            for target in (ax, strip):
                if target is not None:
                    target.axvline(start, color="0.5", linewidth=0.6)
    if log:
        ax.set_yscale("log")
        if num_zero:
            ax.set_ylim(bottom=floor)
    ax.set_xlim(-0.5, float(x[-1]) + 0.5 if x.size else 0.5)
    bottom = strip if strip is not None else ax
    bottom.set_xticks([])
    bottom.set_xlabel("parameters, sorted within each block")
    ax.set_xticks([])
    ax.set_ylabel("Fisher diagonal F_ii")
    height, omitted = _label_blocks(fig, ax, starts)
    heading = "Fisher diagonal per block" if title is None else title
    if omitted:  # many narrow blocks (a transformer): the widest are named
        heading += f"\n({omitted} of {len(starts)} block names left out for space)"
    ax.set_title(heading, pad=4.0 + height)
    if own:  # below the axes, where it cannot cover a point
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    else:
        ax.legend(loc="best", fontsize="small")
    return fig


#: Every block gets at least this fraction of the x axis of ``plot_fisher_diagonal``.
MIN_BLOCK_FRACTION = 1.0 / 40.0

#: At most this many rows of block names above ``plot_fisher_diagonal``'s axes.
MAX_LABEL_ROWS = 3


def _label_blocks(fig: Any, ax: Any, starts: list[tuple[float, float, str]]) -> tuple[float, int]:
    """Name the blocks above the axes, in at most ``MAX_LABEL_ROWS`` rows, none overlapping.

    The names are measured with the figure's renderer and placed greedily, widest
    block first: each in the lowest row where it clears its neighbours by a small
    gap; a name that fits in no row is left out (with many narrow blocks).
    Returns the height of the rows in points and the number of names left out.
    """
    import numpy as np

    if not starts:
        return 0.0, 0
    renderer = _renderer(fig)
    left, right = ax.get_xlim()
    box = ax.get_window_extent(renderer)
    scale = box.width / (right - left)  # pixels per x unit
    fontsize, size, omitted = "small", 0.0, 0
    taken: list[list[tuple[float, float]]] = []  # the (left, right) pixels used in each row
    gap = 4.0 * fig.dpi / 72.0
    placed: list[tuple[int, str, float, int]] = []  # (block, name, centre, row)
    widest_first = sorted(range(len(starts)), key=lambda k: starts[k][0] - starts[k][1])
    for k in widest_first:
        start, stop, name = starts[k]
        probe = fig.text(0.0, 0.0, name, fontsize=fontsize)
        width = probe.get_window_extent(renderer).width
        size = probe.get_fontsize()  # points
        probe.remove()
        centre = box.x0 + scale * (0.5 * (start + stop) - left)
        centre = float(np.clip(centre, box.x0 + 0.5 * width, box.x1 - 0.5 * width))
        lo, hi = centre - 0.5 * width - gap, centre + 0.5 * width + gap
        row = next(
            (i for i, spans in enumerate(taken) if all(hi <= a or lo >= b for a, b in spans)),
            None,
        )
        if row is None and len(taken) < MAX_LABEL_ROWS:
            row = len(taken)
            taken.append([])
        if row is None:
            omitted += 1
            continue
        taken[row].append((lo, hi))
        placed.append((k, name, centre, row))
    for _, name, centre, row in sorted(placed):  # drawn in block order
        ax.annotate(
            name,
            xy=(left + (centre - box.x0) / scale, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0.0, 2.0 + 1.25 * size * row),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=fontsize,
            annotation_clip=False,
            gid="block-label",
        )
    return 2.0 + 1.25 * size * len(taken), omitted


def _renderer(fig: Any) -> Any:
    """The figure's renderer, after one layout pass (an Agg canvas when it has none)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _diagonal_series(blocks: list[Any], exact: Any, bounds: Any, estimate: Any) -> dict[str, Any]:
    """The host vectors to draw (exact, lower, upper, estimate, std_error), checked."""
    series: dict[str, Any] = {}
    if exact is not None:
        series["exact"] = _host(exact, "exact")
    if bounds is not None:
        if not isinstance(bounds, tuple) or len(bounds) != 2:
            msg = f"bounds must be a pair (lower, upper) of arrays; got {type(bounds).__name__}."
            raise TypeError(msg)
        series["lower"] = _host(bounds[0], "bounds.lower")
        series["upper"] = _host(bounds[1], "bounds.upper")
    if estimate is not None:
        if not hasattr(estimate, "value") or not hasattr(estimate, "std_error"):
            msg = (
                "estimate must be an Estimate (value, std_error, num_probes); got "
                f"{type(estimate).__name__}."
            )
            raise TypeError(msg)
        series["estimate"] = _host(estimate.value, "estimate.value")
        series["std_error"] = _host(estimate.std_error, "estimate.std_error")
        if hasattr(estimate, "interval"):
            low, high = estimate.interval(0.95)
        else:  # value and std_error alone: M unknown, the normal interval
            low = series["estimate"] - 1.959963984540054 * series["std_error"]
            high = series["estimate"] + 1.959963984540054 * series["std_error"]
        series["low"] = _host(low, "estimate.interval low")
        series["high"] = _host(high, "estimate.interval high")
    if not series:
        msg = "nothing to plot: pass at least one of exact=, bounds=, estimate=."
        raise ValueError(msg)
    d = int(blocks[-1].offset) + int(blocks[-1].size)
    for name, values in series.items():
        if values.shape != (d,):
            msg = (
                f"{name} must be a flat diagonal of shape ({d},), the size of the blocks; "
                f"got {values.shape}."
            )
            raise ValueError(msg)
    return series


def _block_order(
    blocks: list[Any], key: Any, per_block: int
) -> tuple[Any, Any, list[tuple[float, float, str]]]:
    """Entries sorted by ``key`` within each block, thinned; their x and each block's span.

    A block of n shown entries spans max(n, a fraction ``MIN_BLOCK_FRACTION`` of the
    total) x units, its entries evenly spread over it, so that a small block stays
    visible; ``starts`` holds (start, stop, name) of each span, the first from −0.5.
    """
    import numpy as np

    picked: list[tuple[Any, str]] = []
    for b in blocks:
        idx = np.arange(b.offset, b.offset + b.size)
        if idx.size == 0:
            continue
        idx = idx[np.argsort(key[idx], kind="stable")]
        if idx.size > per_block:
            idx = idx[np.linspace(0, idx.size - 1, per_block).round().astype(int)]
        picked.append((idx, b.name))
    total = sum(idx.size for idx, _ in picked)
    least = MIN_BLOCK_FRACTION * total
    positions, xs, starts = [], [], []
    x0 = -0.5
    for idx, name in picked:
        span = max(float(idx.size), least)
        xs.append(x0 + (np.arange(idx.size) + 0.5) * (span / idx.size))
        starts.append((x0, x0 + span, name))
        positions.append(idx)
        x0 += span
    return np.concatenate(positions), np.concatenate(xs), starts


def _draw_diagonal(
    ax: Any, series: dict[str, Any], order: Any, x: Any, floor: float, log: bool, zero: Any
) -> None:
    """The band of the bounds, the estimate with its 95% intervals and the exact dots.

    ``zero`` marks the shown entries that are exactly 0: they are drawn apart (none
    of the three series is drawn at a floor for them).
    """
    import numpy as np

    keep = ~zero

    def shown(v: Any) -> Any:
        return np.maximum(v, floor) if log else v

    if "lower" in series:
        ax.fill_between(
            x,
            shown(series["lower"][order]),
            shown(series["upper"][order]),
            where=keep,
            step="mid",
            color="C2",
            alpha=0.3,
            label="bounds diag F_LR … diag F_DG",
        )
    if "estimate" in series:
        est = series["estimate"][order]
        low, high = series["low"][order], series["high"][order]
        # NaN (one probe: no interval) draws no bar; an unbounded end reaches the top.
        top = float(np.max(np.where(np.isfinite(high), high, est), initial=floor)) * 2.0
        high = np.where(np.isnan(high), est, np.minimum(high, top))
        low = np.where(np.isnan(low), est, low)
        below = shown(est) - np.maximum(low, floor) if log else est - low
        ax.errorbar(
            x[keep],
            shown(est)[keep],
            yerr=[np.maximum(below, 0.0)[keep], np.maximum(high - est, 0.0)[keep]],
            fmt="none",
            ecolor="C1",
            elinewidth=0.6,
            alpha=0.7,
        )
        ax.plot(
            x[keep], shown(est)[keep], ".", color="C1", markersize=3, label="estimate, 95% interval"
        )
    if "exact" in series:
        ax.plot(
            x[keep],
            shown(series["exact"][order])[keep],
            ".",
            color="k",
            markersize=3,
            label="exact",
        )
