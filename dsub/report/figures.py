"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state).

Each function takes the gathered ``ReportData`` and a folder, writes one PNG and
returns its file name, or None when the run recorded nothing to draw.

Drawn for speed (the report is drawn at the end of every run): margins fixed in
inches instead of a layout engine (constrained layout measured every text a
second time), histograms counted by NumPy and drawn as one outline each
(``stairs``) rather than a patch per bar, and PNGs compressed lightly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .gather import HALF_NAMES, ReportData

DPI = 100
#: zlib level of the PNGs: 1 writes several times faster than matplotlib's 6, for files about a third larger.
PNG_COMPRESSION = 1
#: Size of a one-panel figure (inches), and its margins: left, right, bottom, top (room for two title lines).
PANEL = (6.4, 4.2)
MARGINS = (0.85, 0.2, 0.6, 0.7)
COLOURS = {"input": "#1f4e99", "model": "#d9730d", "result": "#2a9d3f", "outlier": "#c0262d", "kept": "#5b7fb5"}
#: Resolutions (Å) offered as tick labels on the frequency axes.
RESOLUTION_TICKS = (100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5)


def save(figure: Figure, folder: Path, name: str) -> str:
    figure.savefig(folder / name, dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return name


def panels(count: int, gap: float = 0.9):
    """A figure of ``count`` panels side by side with fixed margins (``MARGINS``, ``gap`` inches between)."""
    left, right, bottom, top = MARGINS
    width, height = PANEL[0] * count, PANEL[1]
    figure = Figure(figsize=(width, height))
    panel = (width - left - right - (count - 1) * gap) / count
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=gap / panel)
    return figure, figure.subplots(1, count, squeeze=False)[0]


def warm_up() -> None:
    """Draw a small figure with text into memory: matplotlib loads its fonts and caches once per process."""
    import io

    figure, axes = panels(1)
    axes[0].plot([0, 1], [0, 1], label="α Å")
    axes[0].set_title("warm-up")
    axes[0].legend()
    figure.savefig(io.BytesIO(), format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESSION})


def histogram(axes, values: np.ndarray, edges, color: str, label: str | None = None) -> np.ndarray:
    """Counts of ``values`` in ``edges``, drawn as one filled outline; returns the counts."""
    counts, edges = np.histogram(values, bins=edges)
    axes.stairs(counts, edges, fill=True, color=color, label=label)
    return counts


def scale_bar_angstrom(box_angstrom: float) -> float:
    """A round length near a quarter of the box, for a scale bar."""
    for length in (500, 200, 100, 50, 20, 10, 5, 2, 1):
        if length <= box_angstrom / 4:
            return float(length)
    return box_angstrom / 4


def draw_scale_bar(axes, box: int, pixel_size_angstrom: float, x: float = 0.0, y: float = 0.0) -> None:
    """A white bar of a round length in the image whose top left pixel is at (``x``, ``y``) in ``axes``."""
    length = scale_bar_angstrom(box * pixel_size_angstrom)
    pixels = length / pixel_size_angstrom
    x0, y0 = x + 0.06 * box, y + 0.92 * box
    axes.plot([x0, x0 + pixels], [y0, y0], color="white", linewidth=3, solid_capstyle="butt")
    axes.text(x0 + pixels / 2, y0 - 0.04 * box, f"{length:g} Å", color="white", ha="center", va="bottom",
              fontsize=8, fontweight="bold")


def grey_levels(images: list[np.ndarray], reference: np.ndarray) -> list[np.ndarray]:
    """``images`` on the grey scale of ``reference``: its 1st and 99th percentiles to 0 and 1, clipped."""
    low, high = np.percentile(reference, [1, 99])
    span = high - low if high > low else 1.0
    return [np.clip((image - low) / span, 0.0, 1.0) for image in images]


def examples_figure(data: ReportData, folder: Path) -> str | None:
    """One column per particle: input, subtracted model and result on the input's grey scale.

    The images are laid out in one mosaic drawn as one image in one axes (18
    axes took most of this figure's time), white between them.
    """
    if not data.examples:
        return None
    rows = [("input", "input"), ("model", "subtracted\nmodel"), ("result", "result")]
    if data.examples[0].input is None:
        rows = [("result", "result")]
    box = data.examples[0].result.shape[-1]
    columns, side = len(data.examples), 1.9  # inches per image
    left, top, gap = 0.45, 0.9, 0.08  # inches: row labels; title and three lines per particle; between images
    gap_pixels = max(1, int(round(box * gap / side)))
    step = box + gap_pixels
    mosaic = np.ones((len(rows) * step - gap_pixels, columns * step - gap_pixels), dtype=np.float32)
    for c, example in enumerate(data.examples):
        reference = example.input if example.input is not None else example.result
        shown = grey_levels([getattr(example, key) for key, _ in rows], reference)
        for r, image in enumerate(shown):
            mosaic[r * step:r * step + box, c * step:c * step + box] = image
    inches = side / box  # per mosaic pixel
    width, height = left + mosaic.shape[1] * inches + 0.1, top + mosaic.shape[0] * inches + 0.05
    figure = Figure(figsize=(width, height))
    axes = figure.add_axes((left / width, 0.05 / height, mosaic.shape[1] * inches / width,
                            mosaic.shape[0] * inches / height))
    axes.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    for c, example in enumerate(data.examples):
        axes.text(c * step + box / 2, -0.03 * box,
                  f"{shorten(example.image_name, 28)}\nhalf {HALF_NAMES.get(example.half_set, '?')} · "
                  f"defocus {example.defocus_angstrom / 1e4:.2f} µm\nα = {example.contrast:.3f}",
                  fontsize=8, ha="center", va="bottom", linespacing=1.3)
    for r, (_, label) in enumerate(rows):
        axes.text(-0.06 * box, r * step + box / 2, label, fontsize=10, ha="right", va="center", rotation=90,
                  multialignment="center")
    draw_scale_bar(axes, box, data.display_pixel_size_angstrom)
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
    figure, (axes,) = panels(1)
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


#: Outliers marked one by one under the contrast histogram (the farthest are in its edge bins anyway).
MARKED_OUTLIERS = 2000


def contrast_figure(data: ReportData, folder: Path) -> str | None:
    """Histogram of the contrast used, outliers in red; with --scale input, fitted against input."""
    values = data.contrast[np.isfinite(data.contrast)]
    if values.size == 0:
        return None
    figure, axes = panels(2 if data.sample_fit is not None else 1)
    flagged = data.outliers[np.isfinite(data.contrast)]
    edges, shown = contrast_bins(values, flagged)
    histogram(axes[0], shown[~flagged], edges, COLOURS["kept"], "within bounds")
    if flagged.any():
        clipped = " (far ones at the edges)" if (shown != values).any() else ""
        histogram(axes[0], shown[flagged], edges, COLOURS["outlier"], f"outliers ({flagged.sum()}){clipped}")
        # a marker per outlier: a single particle is visible beside hundreds in one bin (the farthest, if many)
        marked = shown[flagged]
        marked = marked[np.argsort(-np.abs(marked - np.median(values)))[:MARKED_OUTLIERS]]
        axes[0].plot(marked, np.zeros(marked.size), linestyle="none", marker="^", markersize=9,
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
    figure, axes = panels(len(recorded))
    for ax, (name, values) in zip(axes, recorded):
        title, label = QUALITY_LABELS.get(name, (name, name))
        histogram(ax, values, min(60, max(10, values.size // 20)), COLOURS["kept"])
        median = float(np.median(values))
        ax.axvline(median, color="black", linewidth=1.2, label=f"median {median:.3g}")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(label)
        ax.set_ylabel("particles")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=9)
    return save(figure, folder, "fit_quality.png")


FIGURES = (examples_figure, spectra_figure, contrast_figure, quality_figure)
