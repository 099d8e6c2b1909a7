"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state).

Each function takes the gathered ``ReportData`` and a folder, writes one PNG and
returns its file name, or None when the run recorded nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .gather import HALF_NAMES, ReportData

DPI = 110
COLOURS = {"input": "#1f4e99", "model": "#d9730d", "result": "#2a9d3f", "outlier": "#c0262d", "kept": "#5b7fb5"}
#: Resolutions (Å) offered as tick labels on the frequency axes.
RESOLUTION_TICKS = (100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5)


def save(figure: Figure, folder: Path, name: str) -> str:
    figure.savefig(folder / name, dpi=DPI)
    return name


def scale_bar_angstrom(box_angstrom: float) -> float:
    """A round length near a quarter of the box, for a scale bar."""
    for length in (500, 200, 100, 50, 20, 10, 5, 2, 1):
        if length <= box_angstrom / 4:
            return float(length)
    return box_angstrom / 4


def draw_scale_bar(axes, box: int, pixel_size_angstrom: float) -> None:
    length = scale_bar_angstrom(box * pixel_size_angstrom)
    pixels = length / pixel_size_angstrom
    x0, y = 0.06 * box, 0.92 * box
    axes.plot([x0, x0 + pixels], [y, y], color="white", linewidth=3, solid_capstyle="butt")
    axes.text(x0 + pixels / 2, y - 0.04 * box, f"{length:g} Å", color="white", ha="center", va="bottom",
              fontsize=8, fontweight="bold")


def examples_figure(data: ReportData, folder: Path) -> str | None:
    """One column per particle: input, subtracted model and result on the input's grey scale."""
    if not data.examples:
        return None
    rows = [("input", "input"), ("model", "subtracted\nmodel"), ("result", "result")]
    if data.examples[0].input is None:
        rows = [("result", "result")]
    columns, side = len(data.examples), 1.9  # inches per image
    left, top, gap = 0.45, 0.9, 0.08  # inches: row labels; title and three lines per particle; between images
    width, height = left + columns * side + (columns - 1) * gap + 0.1, top + len(rows) * (side + gap) + 0.05
    figure = Figure(figsize=(width, height))  # fixed layout: much faster than a layout engine for 18 axes
    figure.subplots_adjust(left=left / width, right=1 - 0.1 / width, top=1 - top / height, bottom=0.05 / height,
                           wspace=gap / side, hspace=gap / side)
    grid = figure.subplots(len(rows), columns, squeeze=False)
    for c, example in enumerate(data.examples):
        reference = example.input if example.input is not None else example.result
        low, high = np.percentile(reference, [1, 99])
        for r, (key, label) in enumerate(rows):
            axes = grid[r, c]
            axes.imshow(getattr(example, key), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            axes.set_xticks([]), axes.set_yticks([])
            if r == 0:
                axes.set_title(f"{shorten(example.image_name, 28)}\nhalf {HALF_NAMES.get(example.half_set, '?')} · "
                               f"defocus {example.defocus_angstrom / 1e4:.2f} µm\nα = {example.contrast:.3f}",
                               fontsize=8)
            if c == 0:
                axes.set_ylabel(label, fontsize=10)
                if r == 0:
                    draw_scale_bar(axes, example.result.shape[-1], data.display_pixel_size_angstrom)
    figure.suptitle(f"Example particles, low-pass filtered to {data.display_resolution_angstrom:g} Å "
                    "(one grey scale per particle)", fontsize=11, y=1 - 0.12 / height, va="top")
    return save(figure, folder, "examples.png")


def shorten(image_name: str, width: int) -> str:
    """``N@folder/stack.mrcs`` as ``N@stack.mrcs``, the stack's name cut from the left to fit ``width``."""
    number, _, stack = image_name.rpartition("@")
    stack = Path(stack).name
    room = max(4, width - len(number) - 1)
    if len(stack) > room:
        stack = "…" + stack[-(room - 1):]
    return f"{number}@{stack}" if number else stack


def resolution_axis(axes, frequency: np.ndarray) -> None:
    """Label a spatial-frequency axis (1/Å) with resolutions in Å."""
    top = float(frequency.max())
    ticks = [r for r in RESOLUTION_TICKS if 1.0 / r <= top * 1.001]
    # keep tick labels apart: at least 6 % of the axis between neighbours
    chosen = []
    for r in ticks:
        if not chosen or (1.0 / r - 1.0 / chosen[-1]) >= 0.06 * top:
            chosen.append(r)
    axes.set_xticks([1.0 / r for r in chosen], [f"{r:g}" for r in chosen])
    axes.set_xlim(0, top)
    axes.set_xlabel("resolution (Å)")


def spectra_figure(data: ReportData, folder: Path) -> str | None:
    """Rotationally averaged power of input, subtracted model and result, against resolution."""
    spectra = data.spectra
    if spectra is None:
        return None
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    s = spectra.frequency_per_angstrom
    for key, label in (("input", "input images"), ("model", "subtracted model"), ("result", "result")):
        values = getattr(spectra, key)
        if values is not None:
            axes.semilogy(s, values, color=COLOURS[key], label=label, linewidth=1.8)
    fit = data.identity.get("settings", {}).get("fit", {})
    low, high = fit.get("low_resolution_angstrom"), fit.get("high_resolution_angstrom")
    if data.scale == "fit":
        axes.axvspan(1.0 / low if low else 0.0, 1.0 / high if high else s.max(), color="#888888", alpha=0.12,
                     label="contrast fit band")
    resolution_axis(axes, s)
    axes.set_ylabel("power per pixel (image units²)")
    axes.set_title(f"Rotationally averaged power spectrum\n(mean of {spectra.sample_size} particles)", fontsize=11)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=9)
    return save(figure, folder, "power_spectra.png")


def contrast_figure(data: ReportData, folder: Path) -> str | None:
    """Histogram of the contrast used, outliers in red; with --scale input, fitted against input."""
    values = data.contrast[np.isfinite(data.contrast)]
    if values.size == 0:
        return None
    panels = 2 if data.sample_fit is not None else 1
    figure = Figure(figsize=(6.4 * panels, 4.2), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    flagged = data.outliers[np.isfinite(data.contrast)]
    edges, shown = contrast_bins(values, flagged)
    axes[0].hist(shown[~flagged], bins=edges, color=COLOURS["kept"], label="within bounds")
    if flagged.any():
        clipped = " (far ones at the edges)" if (shown != values).any() else ""
        axes[0].hist(shown[flagged], bins=edges, color=COLOURS["outlier"],
                     label=f"outliers ({flagged.sum()}){clipped}")
        # a marker per outlier: a single particle is visible beside hundreds in one bin
        axes[0].plot(shown[flagged], np.zeros(int(flagged.sum())), linestyle="none", marker="^", markersize=9,
                     color=COLOURS["outlier"], clip_on=False, zorder=3)
    median = float(np.median(values))
    axes[0].axvline(median, color="black", linewidth=1.2, label=f"median {median:.3f}")
    low, high = data.outlier_bounds
    for bound in (low, high):
        if np.isfinite(bound) and edges[0] <= bound <= edges[-1]:
            axes[0].axvline(bound, color=COLOURS["outlier"], linestyle="--", linewidth=1)
    if np.isfinite(low):  # named in the legend even when the bounds lie outside the histogram
        axes[0].plot([], [], color=COLOURS["outlier"], linestyle="--", linewidth=1,
                     label=f"outlier bounds {low:.2f} to {high:.2f}")
    what = {"fit": "fitted", "input": "from the input", "none": "fixed at 1"}.get(data.scale, data.scale)
    axes[0].set_title(f"Contrast α used ({what}):\n{values.size} particles, {int(flagged.sum())} outliers",
                      fontsize=11)
    axes[0].set_xlabel("contrast scale α (dimensionless)")
    axes[0].set_ylabel("particles")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=9)
    if data.sample_fit is not None:
        given, fitted = data.sample_fit["input"], data.sample_fit["fitted"]
        axes[1].scatter(given, fitted, s=14, color=COLOURS["input"], alpha=0.8)
        span = np.concatenate([given, fitted, [0.0]])
        line = [float(span.min()), float(span.max())]
        axes[1].plot(line, line, color="black", linewidth=1, label="fitted = input")
        ratio = float(np.median(fitted) / np.median(given)) if np.median(given) else float("nan")
        axes[1].set_title(f"Fitted against input α on {given.size} particles\n(median ratio {ratio:.2f})",
                          fontsize=11)
        axes[1].set_xlabel("input contrast α")
        axes[1].set_ylabel("fitted contrast α")
        axes[1].legend(fontsize=9)
    return save(figure, folder, "contrast.png")


def contrast_bins(values: np.ndarray, flagged: np.ndarray, widest: float = 4.0):
    """Histogram edges sized to the particles within bounds, and the values to draw.

    Outliers stretch the axis up to ``widest`` times the span of the others;
    farther ones are drawn in the first or last bin, so one absurd value cannot
    squeeze every other particle into a single bar.
    """
    inside = values[~flagged] if (~flagged).any() else values
    bins = int(np.clip(inside.size // 15, 10, 40))
    low, high = float(inside.min()), float(inside.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    step = (high - low) / bins
    reach = widest * (high - low) / 2
    centre = (low + high) / 2
    shown_low = max(float(values.min()), centre - reach)
    shown_high = min(float(values.max()), centre + reach)
    first = low - np.ceil((low - shown_low) / step) * step
    count = int(np.ceil((shown_high - first) / step)) or 1
    edges = first + step * np.arange(count + 1)
    return edges, np.clip(values, edges[0], edges[-1])


QUALITY_LABELS = {
    "fit_correlation": ("Correlation of image and full model over the fit band", "correlation"),
    "contrast_sigma": ("Standard error of the fitted contrast", "σ(α)"),
}


def quality_figure(data: ReportData, folder: Path) -> str | None:
    """Histograms of the per-particle fit-quality arrays the run recorded; None if it recorded none."""
    recorded = [(name, values[np.isfinite(values)]) for name, values in data.quality.items()]
    recorded = [(name, values) for name, values in recorded if values.size]
    if not recorded:
        return None
    figure = Figure(figsize=(6.4 * len(recorded), 4.2), layout="constrained")
    axes = figure.subplots(1, len(recorded), squeeze=False)[0]
    for ax, (name, values) in zip(axes, recorded):
        title, label = QUALITY_LABELS.get(name, (name, name))
        ax.hist(values, bins=min(60, max(10, values.size // 20)), color=COLOURS["kept"])
        median = float(np.median(values))
        ax.axvline(median, color="black", linewidth=1.2, label=f"median {median:.3g}")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(label)
        ax.set_ylabel("particles")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=9)
    return save(figure, folder, "fit_quality.png")


FIGURES = (examples_figure, spectra_figure, contrast_figure, quality_figure)
