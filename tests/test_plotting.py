"""fisherbound.plotting: the figures are produced, saved as PNG and say what they show."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fisherbound.adapters.numpy import MLP, linearize, loss_function
from fisherbound.estimators import detach_and_mix
from fisherbound.fisher import fisher_bounds, fisher_diagonal
from fisherbound.landscape import (
    Surface,
    hessian_directions,
    hessian_operator,
    random_directions,
    surface,
)
from fisherbound.linalg import lanczos_quadrature, smoothed_density
from fisherbound.plotting import (
    plot_fisher_diagonal,
    plot_spectral_density,
    plot_surface,
    plot_surfaces,
)


@pytest.fixture(scope="module")
def trained() -> Any:
    """A reference tanh MLP trained by gradient descent (its own loss gradient) on 3 blobs."""
    rng = np.random.default_rng(0)
    centers = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    y = np.arange(60) % 3
    x = centers[y] + 0.8 * rng.standard_normal((60, 4))
    model = MLP.random([4, 8, 3], rng=1)
    for _ in range(150):
        loss = loss_function(model, x, y, reduction="mean")
        model = model.with_parameters(model.parameters() - 0.5 * loss.gradient())
    loss = loss_function(model, x, y, reduction="mean")
    rand = random_directions(loss, num_directions=2, kind="filter", rng=2)
    hess = hessian_directions(loss, num_matvecs=loss.num_params, rng=0)
    return model, x, y, loss, rand, hess


def saved(fig: Any, path: Any) -> int:
    fig.savefig(path, dpi=80)
    size = path.stat().st_size
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return size


def test_surface_plots(trained: Any, tmp_path: Any) -> None:
    _, _, _, loss, rand, hess = trained
    s_rand = surface(loss, rand, num_points=25, span=1.0)
    s_hess = surface(loss, hess, num_points=25, span=1.0)
    fig = plot_surface(s_rand, title="filter-normalised random directions")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "α"
    assert ax.get_ylabel() == "β"
    assert ax.get_title() == "filter-normalised random directions"
    assert len(fig.axes) == 2  # the plot and its colour bar
    assert saved(fig, tmp_path / "contour_random.png") > 5000
    fig3 = plot_surface(s_hess, kind="3d", title="Hessian directions")
    assert fig3.axes[0].name == "3d"
    assert fig3.axes[0].get_zlabel() == "loss"
    assert saved(fig3, tmp_path / "surface3d_hessian.png") > 5000
    both = plot_surfaces(
        [s_rand, s_hess],
        titles=["random (filter-normalised)", "Hessian (λ_max, λ_min)"],
        kind="both",
    )
    assert [a.name for a in both.axes].count("3d") == 2
    titles = [a.get_title() for a in both.axes if a.name != "3d"]
    assert "random (filter-normalised)" in titles
    assert "Hessian (λ_max, λ_min)" in titles
    assert saved(both, tmp_path / "random_vs_hessian.png") > 10000
    one = surface(loss, hess.directions[1:, :], num_points=41, span=2.0)
    fig1 = plot_surface(one, title="along the smallest-eigenvalue direction")
    (line,) = [ln for ln in fig1.axes[0].get_lines() if len(ln.get_xdata()) == 41]
    np.testing.assert_allclose(line.get_ydata(), one.values)
    assert saved(fig1, tmp_path / "section_1d.png") > 3000
    # The Hessian plane's surface is curved as the eigenvalues say: along α (λ_max)
    # the loss rises faster than along β (λ_min).
    mid = 12
    assert s_hess.values[mid + 3, mid] - s_hess.values[mid, mid] > (
        s_hess.values[mid, mid + 3] - s_hess.values[mid, mid]
    )


def test_spectral_density_plot(trained: Any, tmp_path: Any) -> None:
    _, _, _, loss, _, hess = trained
    op = hessian_operator(loss)
    quad = lanczos_quadrature(op, num_probes=6, num_matvecs=30, rng=0)
    lam_max, lam_min = (float(v) for v in hess.eigenvalues)
    grid = np.linspace(lam_min - 0.2, lam_max + 0.2, 400)
    per_probe = np.stack(
        [
            smoothed_density((quad.nodes[i : i + 1], quad.weights[i : i + 1]), grid, width=0.02)
            for i in range(6)
        ]
    )
    density = SimpleNamespace(
        grid=grid, density=per_probe.mean(0), std_error=per_probe.std(0, ddof=1) / np.sqrt(6)
    )
    fig = plot_spectral_density(
        density, markers=hess.eigenvalues, log=True, title="Hessian spectral density"
    )
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["density", "±2 standard errors", "marked eigenvalues"]
    marked = [ln.get_xdata()[0] for ln in ax.get_lines()[1:]]
    np.testing.assert_allclose(sorted(marked), [lam_min, lam_max])
    assert saved(fig, tmp_path / "hessian_density.png") > 5000
    plain = plot_spectral_density(per_probe[0], grid=grid)
    assert plain.axes[0].get_yscale() == "linear"


def test_fisher_diagonal_plot(trained: Any, tmp_path: Any) -> None:
    model, x, _, _, _, _ = trained
    lin = linearize(model, x)
    exact = fisher_diagonal(lin)
    bounds = fisher_bounds(lin)
    est = detach_and_mix(lin, num_probes=16, rng=0)
    fig = plot_fisher_diagonal(
        lin, exact=exact, bounds=bounds, estimate=est, max_points_per_block=20
    )
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.texts if t.get_gid() == "block-label"]
    assert names == [b.name for b in lin.blocks]
    shown = sum(min(b.size, 20) for b in lin.blocks)
    (exact_line,) = [ln for ln in ax.get_lines() if ln.get_label() == "exact"]
    assert exact_line.get_xdata().size == shown
    # A small block gets at least 1/40 of the axis: the x span covers both.
    spans = [max(min(b.size, 20), shown / 40) for b in lin.blocks]
    assert ax.get_xlim() == pytest.approx((-0.5, sum(spans) - 0.5))
    (exact_line,) = [ln for ln in ax.get_lines() if ln.get_label() == "exact"]
    # Within each block the exact values are sorted.
    y = exact_line.get_ydata()
    start = 0
    for b in lin.blocks:
        n = min(b.size, 20)
        assert np.all(np.diff(y[start : start + n]) >= 0)
        start += n
    assert saved(fig, tmp_path / "fisher_diagonal.png") > 5000
    only_bounds = plot_fisher_diagonal(lin.blocks, bounds=bounds, log=False)
    assert only_bounds.axes[0].get_yscale() == "linear"


def labelled_blocks(sizes: list[int], names: list[str]) -> list[Any]:
    blocks, offset = [], 0
    for name, size in zip(names, sizes, strict=True):
        blocks.append(SimpleNamespace(name=name, shape=(size,), offset=offset, size=size))
        offset += size
    return blocks


def drawn_block_names(names: list[str], sizes: list[int], points: int) -> tuple[Any, ...]:
    """The figure of random diagonals over these blocks, its block names and their boxes,
    checked: no two names overlap, all inside the figure."""
    blocks = labelled_blocks(sizes, names)
    exact = np.random.default_rng(0).lognormal(size=sum(sizes))
    fig = plot_fisher_diagonal(blocks, exact=exact, max_points_per_block=points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_gid() == "block-label"]
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two block names overlap"
    page = fig.bbox
    assert all(page.x0 <= b.x0 and b.x1 <= page.x1 and b.y1 <= page.y1 for b in boxes)
    return fig, labels, boxes, renderer


def test_block_names_never_overlap() -> None:
    """Long names over tiny blocks (a CNN's biases) are stacked, not drawn over each other."""
    names = [f"features.{i}.{kind}" for i in range(6) for kind in ("weight", "bias")]
    sizes = [400 if n.endswith("weight") else 4 for n in names]
    fig, labels, boxes, renderer = drawn_block_names(names, sizes, 100)
    assert [t.get_text() for t in labels] == names
    assert len({round(b.y0) for b in boxes}) > 1  # they did need a second row
    title = fig.axes[0].title.get_window_extent(renderer)
    assert not any(title.overlaps(b) for b in boxes)


def test_many_blocks_keep_three_rows_of_names_and_say_what_is_left_out(tmp_path: Any) -> None:
    """A transformer's 120 blocks: at most MAX_LABEL_ROWS rows of names, none overlapping,
    the rest counted in the title; no layout warning (warnings are errors here)."""
    from fisherbound.plotting import MAX_LABEL_ROWS

    names = [f"layers.{i}.attention.{kind}" for i in range(60) for kind in ("weight", "bias")]
    sizes = [64 if n.endswith("weight") else 8 for n in names]
    fig, labels, boxes, _ = drawn_block_names(names, sizes, 20)
    assert len({round(b.y0) for b in boxes}) <= MAX_LABEL_ROWS
    omitted = len(names) - len(labels)
    assert omitted > 0
    assert f"({omitted} of 120 block names left out for space)" in fig.axes[0].get_title()
    assert saved(fig, tmp_path / "many.png") > 5000


def test_exactly_zero_entries_are_drawn_apart(tmp_path: Any) -> None:
    """Zeros of diag F get their own strip and a count, not a floor value on the log axis."""
    blocks = labelled_blocks([30, 10], ["w", "b"])
    exact = np.linspace(1e-3, 1.0, 40)
    exact[[0, 3, 7, 35]] = 0.0
    fig = plot_fisher_diagonal(blocks, exact=exact, bounds=(0.5 * exact, 2.0 * exact))
    ax, strip = fig.axes
    (legend,) = fig.legends  # below the axes, covering no point
    labels = [t.get_text() for t in legend.get_texts()]
    assert "exactly 0: 4 of 40 entries (10.0%) (strip below)" in labels
    (exact_line,) = [ln for ln in ax.get_lines() if ln.get_label() == "exact"]
    assert np.all(exact_line.get_ydata() > 0.0)  # no dot at a made-up floor
    assert exact_line.get_ydata().size == 36
    # The axis starts a decade below the smallest positive value drawn (the lower bound).
    assert ax.get_ylim()[0] == pytest.approx(0.1 * 0.5 * exact[1])
    (marks,) = strip.get_lines()[:1]
    assert marks.get_xdata().size == 4
    assert [t.get_text() for t in strip.get_yticklabels()] == ["exactly 0"]
    assert saved(fig, tmp_path / "zeros.png") > 5000
    # Into a given axes they are crosses at the bottom, still counted in the legend.
    from matplotlib.figure import Figure

    given = Figure().add_subplot()
    plot_fisher_diagonal(blocks, exact=exact, ax=given)
    assert len(given.figure.axes) == 1
    legend = given.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert "exactly 0: 4 of 40 entries (10.0%) (at the bottom)" in labels
    nonzero = plot_fisher_diagonal(blocks, exact=exact + 1.0)
    assert len(nonzero.axes) == 1


def test_reflected_density_has_no_mass_below_the_lower_end() -> None:
    """smoothed_density(..., lower=a): 0 below a, the mirror image added above, mass 1."""
    rule = (np.array([[0.0, 0.3, 2.0]]), np.array([[1.0, 2.0, 1.0]]))
    t = np.linspace(-1.0, 4.0, 5001)
    plain = smoothed_density(rule, t, width=0.2)
    reflected = smoothed_density(rule, t, width=0.2, lower=0.0)
    assert np.all(reflected[t < 0] == 0.0)
    assert np.all(reflected[t >= 0] >= plain[t >= 0])
    step = t[1] - t[0]
    assert float(np.sum(plain[t < 0]) * step) > 0.1  # the artefact: mass below 0
    assert float(np.sum(reflected) * step) == pytest.approx(1.0, abs=1e-3)
    mirror = smoothed_density(rule, -t, width=0.2)  # φ(−t): the Gaussians mirrored at 0
    np.testing.assert_allclose(reflected[t >= 0], (plain + mirror)[t >= 0], rtol=1e-12)
    # A node below lower by rounding is taken as lower; further below is an error.
    near = (np.array([[-1e-14, 1.0]]), np.array([[1.0, 1.0]]))
    assert np.all(np.isfinite(smoothed_density(near, t, width=0.2, lower=0.0)))
    far = (np.array([[-0.5, 1.0]]), np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="must bound the spectrum from below; got a quadrature"):
        smoothed_density(far, t, width=0.2, lower=0.0)
    with pytest.raises(ValueError, match="lower must be None or a finite real number"):
        smoothed_density(rule, t, width=0.2, lower=float("nan"))
    with pytest.raises(TypeError, match=r"lower must be None or a finite real number .* str '0'"):
        smoothed_density(rule, t, width=0.2, lower="0")  # type: ignore[arg-type]


def test_plotting_errors(trained: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, loss, rand, _ = trained
    s = surface(loss, rand, num_points=3)
    with pytest.raises(TypeError, match="surface must be a Surface"):
        plot_surface(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="kind must be one of 'contour', '3d', 'both'"):
        plot_surface(s, kind="heatmap")
    with pytest.raises(ValueError, match="values have the shape of its coordinates"):
        plot_surface(Surface((np.zeros(3), np.zeros(2)), np.zeros((3, 3)), rand, "sum"))
    with pytest.raises(ValueError, match="titles must be a list of 2 strings"):
        plot_surfaces([s, s], titles=["one"])
    with pytest.raises(TypeError, match="surfaces must be a non-empty list"):
        plot_surfaces([])
    fig = plot_surface(s)
    with pytest.raises(ValueError, match="ax must be a 3-D axes"):
        plot_surface(s, kind="3d", ax=fig.axes[0])
    with pytest.raises(ValueError, match="ax must be None for kind='both'"):
        plot_surface(s, kind="both", ax=fig.axes[0])
    with pytest.raises(ValueError, match="grid is required when density is an array"):
        plot_spectral_density(np.ones(3))
    with pytest.raises(ValueError, match="density and grid must be 1-D arrays of the same length"):
        plot_spectral_density(np.ones(3), grid=np.ones(4))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_fisher_diagonal(loss)
    with pytest.raises(ValueError, match=r"exact must be a flat diagonal of shape \(67,\)"):
        plot_fisher_diagonal(loss, exact=np.ones(5))
    with pytest.raises(TypeError, match="estimate must be an Estimate"):
        plot_fisher_diagonal(loss, estimate=np.ones(67))
    with pytest.raises(TypeError, match="blocks must be a non-empty sequence of ParameterBlock"):
        plot_fisher_diagonal([], exact=np.ones(67))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib, which is not installed"):
        plot_surface(s)


def test_importing_plotting_imports_no_matplotlib() -> None:
    code = (
        "import sys, fisherbound.plotting, fisherbound.landscape; "
        "bad = [m for m in ('matplotlib', 'torch', 'jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
