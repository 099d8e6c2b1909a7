"""The report's HTML page: one self-contained file that links its figures by relative name only."""

from __future__ import annotations

import datetime
from html import escape

import numpy as np

from .gather import HALF_NAMES, OUTLIER_SIGMAS, ReportData

#: Outlying particles listed by name.
OUTLIERS_LISTED = 20

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.4; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.caption { color: #444; font-size: 0.9em; max-width: 60em; }
.note { background: #fff6e0; border-left: 4px solid #e0a500; padding: 0.4em 0.8em; margin: 0.4em 0; }
.warn { background: #fde8e8; border-left: 4px solid #c62828; padding: 0.4em 0.8em; margin: 0.4em 0; }
.missing { color: #777; font-style: italic; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; align-items: flex-start; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 0 2em; }
code { font-size: 0.95em; }
"""


def table(rows, header=None, numeric=()) -> str:
    """An HTML table of ``rows`` (sequences of cell texts); columns listed in ``numeric`` align right."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = [f"<td class=\"num\">{escape(str(v))}</td>" if i in numeric else f"<td>{escape(str(v))}</td>"
                 for i, v in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts as (dotted key, text) pairs; long lists shortened."""
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            pairs += flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return pairs
    if isinstance(value, list) and (len(value) > 8 or any(isinstance(item, (dict, list)) for item in value)):
        return [(prefix, f"{len(value)} entries")]
    if isinstance(value, list):
        return [(prefix, ", ".join(map(str, value)) or "—")]
    if isinstance(value, float):
        return [(prefix, f"{value:.6g}")]
    return [(prefix, "—" if value is None else str(value))]


def figure_block(title: str, name: str | None, caption: str, missing: str) -> str:
    body = (f'<img src="{escape(name)}" alt="{escape(title)}">\n<p class="caption">{caption}</p>' if name
            else f'<p class="missing">{escape(missing)}</p>')
    return f"<div>\n<h2>{escape(title)}</h2>\n{body}\n</div>"


def at_a_glance(data: ReportData) -> list[tuple[str, str]]:
    summary = data.summary
    finite = data.contrast[np.isfinite(data.contrast)]
    rows = [
        ("particles subtracted", f"{data.contrast.size} of {data.particles_total}"),
        ("left out (bad images)", str(data.particles_total - data.contrast.size)),
        ("box, pixel size", f"{data.box} px, {data.pixel_size_angstrom:g} Å"),
        ("contrast", f"--scale {data.scale}"),
        ("median contrast α", f"{np.median(finite):.4f}" if finite.size else "—"),
        ("negative α", f"{np.mean(finite < 0):.1%}" if finite.size else "—"),
        ("contrast outliers", f"{int(data.outliers.sum())}"),
    ]
    correlation = data.quality.get("fit_correlation")
    if correlation is not None and np.isfinite(correlation).any():
        rows.append(("median fit correlation", f"{np.nanmedian(correlation):.3f}"))
    if data.sample_fit is not None and np.median(data.sample_fit["input"]):
        ratio = np.median(data.sample_fit["fitted"]) / np.median(data.sample_fit["input"])
        rows.append(("fitted / input α (sample median)", f"{ratio:.3f}"))
    if "seconds" in summary:
        rows.append(("run time", f"{summary['seconds']:.1f} s"))
    if "devices" in summary:
        rows.append(("devices", ", ".join(map(str, summary["devices"])) or "—"))
    return rows


def counts_section(data: ReportData) -> str:
    halves = [(f"{HALF_NAMES.get(h, h)} (rlnRandomSubset {h})", int((data.half_set == h).sum()))
              for h in np.unique(data.half_set)]
    optics = [(g["group"], g["name"], g["particles"], f"{g['pixel_size_angstrom']:g}", f"{g['voltage_kv']:g}")
              for g in data.optics]
    return ("<div>" + table(halves, ("half set", "particles"), numeric=(1,)) + "</div><div>"
            + table(optics, ("optics group", "name", "particles", "pixel size (Å)", "voltage (kV)"),
                    numeric=(0, 2, 3, 4))
            + "</div>")


def outliers_section(data: ReportData) -> str:
    flagged = np.flatnonzero(data.outliers)
    if flagged.size == 0:
        return ""
    order = flagged[np.argsort(-np.abs(np.nan_to_num(data.contrast[flagged] - np.nanmedian(data.contrast),
                                                     nan=np.inf)))]
    rows = [(int(data.exported_rows[i]) + 1, data.image_names[i], f"{data.contrast[i]:.4f}")
            for i in order[:OUTLIERS_LISTED]]
    more = f" (the {OUTLIERS_LISTED} farthest of {flagged.size})" if flagged.size > OUTLIERS_LISTED else ""
    return (f"<h3>Outlying contrast{more}</h3>\n"
            + table(rows, ("input particle (1-based)", "input image", "α"), numeric=(0, 2)))


def parameters_section(data: ReportData) -> str:
    identity = data.identity
    inputs = [(name, (identity.get(name) or {}).get("path", "—")) for name in ("particles", "half_a", "half_b", "mask")]
    settings = flatten(identity.get("settings", {}))
    settings += flatten({key: identity[key] for key in ("chunk_size", "single_map", "skip_bad_particles", "cs_root")
                         if key in identity})
    phases = data.summary.get("phase_seconds", {})
    timings = [(phase, f"{seconds:.2f}") for phase, seconds in phases.items()]
    if "seconds" in data.summary:
        timings.append(("total", f"{data.summary['seconds']:.2f}"))
    shown = {"phase_seconds", "seconds", "input_contrast_check"}
    record = [(k, v) for k, v in flatten({k: v for k, v in data.summary.items() if k not in shown})]
    return "\n".join([
        "<h2>Run</h2>",
        f"<p>dsub {escape(str(identity.get('dsub', '—')))}</p>",
        "<h3>Inputs</h3>", table(inputs, ("input", "path")),
        "<div class=\"cols\"><div><h3>Parameters</h3>", table(settings, ("parameter", "value")),
        "</div><div><h3>Timings</h3>", table(timings, ("phase", "seconds"), numeric=(1,)),
        "</div></div>",
        "<h3>Run record (dsub_run.json)</h3>", table(record, ("field", "value")),
    ])


def render(data: ReportData, figures: dict[str, str | None]) -> str:
    """The page's HTML; ``figures`` maps figure function names to written PNG names (or None)."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    low, high = data.outlier_bounds
    spectra = data.spectra
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>dsub report: {escape(data.outdir.resolve().name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>dsub subtraction report</h1>",
        f"<p class=\"sub\">{escape(str(data.outdir))} · generated {generated}</p>",
        *[f"<p class=\"warn\"><b>Warning:</b> {escape(warning)}</p>" for warning in data.warnings],
        *[f"<p class=\"note\">{escape(note)}</p>" for note in data.notes],
        "<div class=\"cols\"><div>" + table(at_a_glance(data)) + "</div>" + counts_section(data) + "</div>",
        figure_block(
            "Example particles", figures.get("examples_figure"),
            "Each column is one particle of half set A or B: its input image, the model that was subtracted from it "
            "(the contrast α times the CTF-modulated projection of the masked region, i.e. input − result) and the "
            "result, on the grey scale of the input. A good subtraction removes the masked region's density and "
            "leaves everything else unchanged.",
            "No images to show."),
        "<div class=\"pair\">",
        figure_block(
            "Power spectra", figures.get("spectra_figure"),
            f"Rotationally averaged power of {spectra.sample_size if spectra else 0} particles spread over the run. "
            "The result lies below the input where the subtracted region had signal, and the subtracted model's "
            "curve shows how much power was removed at each resolution. A result above the input means the "
            "subtraction added signal: check the contrast and the maps.",
            "No images to show."),
        figure_block(
            "Contrast", figures.get("contrast_figure"),
            f"The contrast scale α each particle was subtracted with. Red: outside median ± {OUTLIER_SIGMAS:g} "
            f"robust standard deviations ({low:.3g} to {high:.3g}), or of the opposite sign to the median; such "
            "particles were subtracted too weakly, too strongly or with the wrong sign."
            + (" Right: with <code>--scale input</code>, the contrast fitted on a sample before the run against "
               "the input's own." if data.sample_fit is not None else ""),
            "No contrast was recorded."),
        "</div>",
        outliers_section(data),
        figure_block(
            "Fit quality", figures.get("quality_figure"),
            "Per particle: the correlation of the image with the CTF-modulated projection of the full half-map "
            "over the contrast-fit band, and the standard error of the fitted contrast. Particles whose poses, "
            "CTF or maps do not belong to them correlate near zero.",
            "Not recorded by this run."),
        parameters_section(data),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"
