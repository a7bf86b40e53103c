"""The report's charts as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built with the object API (``Figure`` + ``FigureCanvasAgg``), never ``pyplot``:
no global figure state, no display backend to select, nothing left open after a chart. They
are small (dpi 100) so that the self-contained HTML stays a few MB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def grouped_bars(
    panels: dict[str, dict[str, dict[str, float | None]]],
    categories: Sequence[str],
    ylabel: str,
    errors: dict[str, dict[str, dict[str, float | None]]] | None = None,
) -> bytes:
    """Side-by-side panels of grouped bars: per category (stage), one bar per run.

    Args:
        panels: Panel title -> run -> category -> value (None: no bar).
        categories: The x-axis groups, in order.
        ylabel: The y-axis label.
        errors: Like ``panels``: each bar's error bar half-height (None: none).
    """
    figure = Figure(figsize=(5 * len(panels), 3.5))
    for index, (title, runs) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        width = 0.8 / max(len(runs), 1)
        positions = np.arange(len(categories))
        for offset, (run, values) in enumerate(runs.items()):
            heights = [np.nan if values.get(c) is None else values[c] for c in categories]
            spread = (errors or {}).get(title, {}).get(run, {})
            yerr = [np.nan if spread.get(c) is None else spread[c] for c in categories]
            axes.bar(
                positions + offset * width - 0.4 + width / 2, heights, width, label=run,
                yerr=None if all(np.isnan(yerr)) else yerr, capsize=3,
            )  # fmt: skip
        axes.set_xticks(positions, list(categories))
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        axes.legend(fontsize="small")
    return _png(figure)


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> bytes:
    """One line per run (``name -> (x, y)``), overlaid."""
    figure = Figure(figsize=(5.2, 3.0))
    axes = figure.add_subplot()
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, (x, y) in series.items():
        axes.plot(x, y, label=name, marker="." if len(x) < 20 else None)
    if log_y:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _png(figure)


def stage_curves(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    title: str,
    ylabel: str,
    runs: Sequence[str],
) -> bytes:
    """One panel per stage, each with a line per run (``stage -> run -> (x, y)``).

    A run keeps its colour (by its place in ``runs``) in every panel, also where the runs
    before it have no line; a panel without data says so.
    """
    colours = {name: f"C{index % 10}" for index, name in enumerate(runs)}
    figure = Figure(figsize=(3.2 * len(panels), 3.0))
    figure.suptitle(title)
    for index, (stage, series) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, (x, y) in series.items():
            axes.plot(x, y, label=name, color=colours[name], marker="." if len(x) < 20 else None)
        if not series:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(stage)
        axes.set_xlabel("step")
        if index == 0:
            axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if series:
            axes.legend(fontsize="small")
    return _png(figure)


def violins(
    distances: dict[str, dict[str, np.ndarray]], stages: Sequence[str], ylabel: str
) -> bytes:
    """Violins per stage, the runs side by side within each stage (the paper's Fig. 3).

    Args:
        distances: Run -> stage -> one distance per image.
        stages: The x-axis groups, in order.
        ylabel: The y-axis label.
    """
    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    width = 0.8 / max(len(distances), 1)
    bodies = []
    for offset, per_stage in enumerate(distances.values()):
        positions = [i + offset * width - 0.4 + width / 2 for i in range(len(stages))]
        parts = axes.violinplot(
            [per_stage[s] for s in stages], positions, widths=width, showmedians=True
        )
        bodies.append(parts["bodies"][0])
    axes.set_xticks(range(len(stages)), list(stages))
    axes.set_ylabel(ylabel)
    axes.legend(bodies, list(distances), fontsize="small")
    axes.grid(alpha=0.3, axis="y")
    return _png(figure)


def gradient_grid(images: np.ndarray, maps: dict[str, np.ndarray], title: str) -> bytes:
    """Per image (rows): the image, then each level's gradient magnitude (the paper's Fig. 4).

    Args:
        images: uint8 ``[N, H, W, 3]``.
        maps: Level -> ``[N, h, w]`` non-negative gradient magnitudes; each map is scaled to
            its own maximum, since the levels' losses differ in scale by orders of magnitude.
        title: The figure's title (the run).
    """
    rows, columns = images.shape[0], 1 + len(maps)
    figure = Figure(figsize=(1.6 * columns, 1.6 * rows + 0.4))
    figure.suptitle(title)
    extent = (0, images.shape[2], images.shape[1], 0)
    for row in range(rows):
        axes = figure.add_subplot(rows, columns, row * columns + 1)
        axes.imshow(images[row])
        axes.set_axis_off()
        if row == 0:
            axes.set_title("image", fontsize="small")
        for column, (level, level_maps) in enumerate(maps.items(), start=2):
            axes = figure.add_subplot(rows, columns, row * columns + column)
            heat = level_maps[row] / max(float(level_maps[row].max()), 1e-30)
            axes.imshow(
                heat, cmap="inferno", vmin=0, vmax=1, extent=extent, interpolation="nearest"
            )
            axes.set_axis_off()
            if row == 0:
                axes.set_title(f"∂L_{level}/∂z_res2", fontsize="small")
    return _png(figure)


def heatmap(labels: Sequence[str], matrix: np.ndarray, title: str) -> bytes:
    """A symmetric matrix in [-1, 1] (correlations), with the values written in the cells."""
    size = 1.5 + 0.7 * len(labels)
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_xticks(range(len(labels)), list(labels), rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), list(labels))
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            color = "white" if abs(value) > 0.6 else "black"  # legible on dark cells
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small", color=color)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _png(figure)
