"""The report's PNG figures (matplotlib), drawn from the analysis' host arrays.

The Fisher diagonal per block and the landscape come from
``fisherbound.plotting``; the estimators' error against cost, the core-space
spectrum and the top of the Fisher spectrum are drawn here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fisherbound._report.settings import Analysis

#: Pixels per inch of the saved PNGs: twice matplotlib's screen 80, so that the
#: figures stay sharp on high-density screens; index.html shows them at 100 CSS
#: pixels per inch of figure (``render.CSS_PER_INCH``).
DPI = 160

#: Base font size (points) of the report's figures.
FONT_SIZE = 11

#: File names of the figures, in the order of the report.
FIGURES = (
    "fisher_diagonal.png",
    "estimators.png",
    "core_space.png",
    "fisher_spectrum.png",
    "landscape.png",
)


def ran(numbers: dict[str, Any], key: str) -> bool:
    """Whether the stage behind ``numbers[key]`` ran (a refused one is ``{"not_run": ...}``)."""
    return key in numbers and "not_run" not in numbers[key]


def draw_figures(analysis: Analysis, out: Path) -> list[dict[str, Any]]:
    """Save every figure of the report into ``out``; their file, title, caption and size.

    Each entry has ``width`` and ``height`` (the PNG's pixels, at ``DPI``) and
    ``dpi``. A stage that did not run (a model with positions that an analysis
    refuses) has no figure.
    """
    from matplotlib import rc_context

    with rc_context({"font.size": FONT_SIZE}):
        return draw_all(analysis, out)


def draw_all(analysis: Analysis, out: Path) -> list[dict[str, Any]]:
    """``draw_figures`` under the report's font settings."""
    numbers, arrays = analysis.numbers, analysis.arrays
    made: list[dict[str, Any]] = []

    def save(fig: Any, name: str, title: str, caption: str) -> None:
        fig.savefig(out / name, dpi=DPI)
        width, height = png_size(out / name)
        made.append(
            {
                "file": name,
                "title": title,
                "caption": caption,
                "width": width,
                "height": height,
                "dpi": DPI,
            }
        )

    if "diagonal" in arrays:
        diagonal_figure(numbers, arrays["diagonal"], save)
    if ran(numbers, "estimators"):
        save(
            estimators_figure(numbers["estimators"]),
            "estimators.png",
            "Estimators: error against cost",
            "Relative error ‖diag F̂ − diag F‖ / ‖diag F‖ against wall-clock cost in gradient "
            "steps measured in the same run.",
        )
    if "core_space" in arrays:
        rows = "counted positions" if "positions" in numbers["analysed"] else "inputs"
        save(
            core_space_figure(arrays["core_space"], rows),
            "core_space.png",
            "Core-space spectrum",
            f"Left: λ_max of the output-space metric per {rows[:-1]} with its deterministic "
            f"bounds. Right: all eigenvalues of the metric over the {rows}.",
        )
    if ran(numbers, "spectrum"):
        spectrum_with_density(numbers["spectrum"], arrays.get("density"), save)
    if "landscape" in arrays:
        landscape_figure(arrays["landscape"], save)
    return made


def png_size(path: Path) -> tuple[int, int]:
    """The width and height in pixels of a PNG file, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        msg = f"{path} must be a PNG file; its first bytes are {head[:16]!r}."
        raise ValueError(msg)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def diagonal_figure(numbers: dict[str, Any], d: dict[str, Any], save: Any) -> None:
    """The Fisher diagonal per block: exact, the certified band, the estimate."""
    from fisherbound.plotting import plot_fisher_diagonal

    over = f"{numbers['analysed']['num_inputs']} inputs"
    if "positions" in numbers["analysed"]:
        over += f" and their {numbers['analysed']['positions']['counted']} counted positions"
    est = EstimateView(d["estimate"], d["std_error"], d["interval"])
    fig = plot_fisher_diagonal(
        d["blocks"],
        exact=d["exact"],
        bounds=(d["lower"], d["upper"]),
        estimate=est,
        max_points_per_block=150,
        title=f"Fisher diagonal per block (sum over {over})",
    )
    save(
        fig,
        "fisher_diagonal.png",
        "Fisher diagonal per block",
        "Exact diag F (black), the certified band diag F_LR … diag F_DG (green) and the "
        f"detach-and-mix estimate with {numbers['fisher_diagonal']['num_probes']} probes "
        "and its 95% confidence intervals (orange; Student t, Estimate.interval); entries "
        "sorted within each block. Entries that are exactly 0 (parameters that move no "
        "output on these inputs) have no place on the log axis: they are the crosses in the "
        "'exactly 0' strip below it, counted in the legend.",
    )


def spectrum_with_density(spectrum: dict[str, Any], density: Any, save: Any) -> None:
    """The top of the spectrum, and the spectral density beside it when it ran."""
    from fisherbound.plotting import plot_spectral_density

    fig = spectrum_figure(spectrum)
    if density is not None:
        plot_spectral_density(
            DensityView(**density),
            markers=spectrum["exact"]["eigenvalues"][:3],
            log=True,
            ax=fig.axes[1],
            title="spectral density of F (SLQ), on [0, ∞)",
        )
        fig.axes[1].set_xlim(left=0.0)
    save(
        fig,
        "fisher_spectrum.png",
        "Top of the Fisher spectrum",
        "Left: the top eigenvalues of F_LR ⪯ F ⪯ F_DG (Lanczos). Right: the smoothed "
        "spectral density of F by stochastic Lanczos quadrature with its pointwise 95% "
        "intervals (Student t over the probes), top three eigenvalues marked. F is positive "
        "semi-definite, so the smoothing Gaussians are reflected at 0: the density lives "
        "on [0, ∞) and integrates to 1 there.",
    )


def landscape_figure(land: dict[str, Any], save: Any) -> None:
    """The loss surfaces along random and Hessian directions."""
    from fisherbound.plotting import plot_surfaces

    fig = plot_surfaces(
        [SurfaceView(**land["random"]), SurfaceView(**land["hessian"])],
        titles=["filter-normalised random directions", "Hessian directions (λ_max, λ_min)"],
        kind="contour",
    )
    save(
        fig,
        "landscape.png",
        "Loss landscape",
        "The mean loss on a grid θ + α d₁ + β d₂ along two random (left) and the two "
        "extreme Hessian (right) directions; θ is the red star.",
    )


class EstimateView:
    """An estimate's host arrays, in the shape ``plot_fisher_diagonal`` reads.

    ``bounds`` is its 95% interval ``(low, high)``, computed with the estimate.
    """

    def __init__(self, value: Any, std_error: Any, bounds: tuple[Any, Any]) -> None:
        self.value, self.std_error, self.bounds = value, std_error, bounds

    def interval(self, level: float = 0.95) -> tuple[Any, Any]:
        if level != 0.95:
            msg = f"the report keeps only the 95% interval; got level = {level!r}."
            raise ValueError(msg)
        return self.bounds


class DensityView:
    """A spectral density's host arrays, in the shape ``plot_spectral_density`` reads.

    ``num_probes`` sets the dof of its pointwise intervals.
    """

    def __init__(self, grid: Any, density: Any, std_error: Any, num_probes: int) -> None:
        self.grid, self.density, self.std_error = grid, density, std_error
        self.num_probes = num_probes


class SurfaceView:
    """A loss surface's host arrays, in the shape ``plot_surfaces`` reads."""

    def __init__(self, coordinates: Any, values: Any) -> None:
        self.coordinates, self.values = tuple(coordinates), values


def new_figure(width: float, height: float, cols: int = 1) -> Any:
    """A constrained-layout figure with ``cols`` axes in one row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    for i in range(cols):
        fig.add_subplot(1, cols, i + 1)
    return fig


def estimators_figure(section: dict[str, Any]) -> Any:
    """Each estimator's relative error against its cost in gradient steps."""
    from matplotlib.ticker import FuncFormatter

    fig = new_figure(9.0, 5.0)
    ax = fig.axes[0]
    colour = 0
    for row in section["rows"]:
        cost = row["cost_gradient_steps"]
        if row["call"] == "fisher_bounds":
            points = [
                ("lower bound F_LR", row["lower_relative_error"]),
                ("upper bound F_DG", row["upper_relative_error"]),
            ]
        elif row["call"] == "fisher_diagonal":
            continue
        else:
            points = [(row["estimator"], row["relative_error"])]
        for label, err in points:
            ax.plot([cost], [err], "o", color=f"C{colour % 10}", label=label)
            colour += 1
    exact = next(r for r in section["rows"] if r["call"] == "fisher_diagonal")
    ax.axvline(exact["cost_gradient_steps"], color="k", linestyle="--", linewidth=0.8)
    ax.text(
        exact["cost_gradient_steps"],
        0.02,
        " exact",
        transform=ax.get_xaxis_transform(),
        fontsize="small",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor_label))
    ax.set_xlabel("cost (gradient steps)")
    ax.set_ylabel("relative error of the diagonal")
    ax.set_title("estimators of diag F: error against cost")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def minor_label(value: float, _pos: Any = None) -> str:
    """Minor ticks of a log axis are labelled at 2 and 5 times a power of ten only.

    Labelling every minor tick (2, 3, …, 9) crowds the labels into each other near
    the top of each decade.
    """
    if value <= 0:
        return ""
    mantissa = value / 10.0 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


def core_space_figure(core: dict[str, Any], rows: str = "inputs") -> Any:
    """λ_max per input (or counted position) with its bounds, and all the eigenvalues."""
    import numpy as np

    fig = new_figure(11.2, 4.4, cols=2)
    left, right = fig.axes
    order = np.argsort(core["lambda_max"])
    x = np.arange(order.size)
    left.fill_between(
        x, core["lower"][order], core["upper"][order], color="C2", alpha=0.3, label="bounds"
    )
    left.plot(x, core["lambda_max"][order], color="k", linewidth=1.0, label="λ_max")
    left.set_xlabel(f"{rows}, sorted by λ_max")
    left.set_ylabel("λ_max of the output metric")
    left.set_yscale("log")
    left.set_title("λ_max and its deterministic bounds")
    left.legend(fontsize="small")
    eig = core["eigenvalues"].ravel()
    positive = eig[eig > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()), 40)
        right.hist(positive, bins=bins, color="C0")
        right.set_xscale("log")
    right.set_xlabel("eigenvalue")
    right.set_ylabel("count")
    right.set_title(f"nonzero eigenvalues of the output metric, all {rows}")
    return fig


def spectrum_figure(spectrum: dict[str, Any]) -> Any:
    """The top eigenvalues of F_LR, F and F_DG (the right axes get the density)."""
    import numpy as np

    fig = new_figure(11.2, 4.4, cols=2)
    ax = fig.axes[0]
    k = np.arange(1, spectrum["k"] + 1)
    ax.plot(k, spectrum["upper"]["eigenvalues"], "v", color="C3", label="λ_i(F_DG)")
    ax.plot(k, spectrum["exact"]["eigenvalues"], "o", color="k", label="λ_i(F)")
    ax.plot(k, spectrum["lower"]["eigenvalues"], "^", color="C2", label="λ_i(F_LR)")
    ax.set_yscale("log")
    ax.set_xlabel("i")
    ax.set_ylabel("eigenvalue")
    ax.set_title("top eigenvalues, F_LR ⪯ F ⪯ F_DG")
    ax.legend(fontsize="small")
    return fig
