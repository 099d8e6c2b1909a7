"""Everything the report shows, read from a finished run's output folder.

Sources, all inside OUTDIR except the input stacks:

* ``particles_subtracted.star``: the exported particles (skipped ones left out),
  their CTF, half set and optics group; ``rlnImageName`` points at the exported
  stacks, ``rlnImageOriginalName`` at the input images (resolved from the input
  particle file's folder, as dsub resolved them when it ran);
* ``subtracted.zarr``: the contrast ``contrast`` each particle was subtracted with,
  ``skipped``, the run's identity (attribute ``run``) and, when the run recorded
  them, ``fit_correlation`` and ``contrast_sigma``; the store's ``images`` are not read;
* ``dsub_run.json``: the run summary (timings, scheduler, devices, ...).

Images are read for a sample of particles only, so a report of a large run takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DsubError, OptionError
from ..formats import star as star_format
from ..formats.mrc import read_images
from ..formats.paths import cs_roots, resolve_stack_names, star_roots
from ..workflow.transcript import LOG_NAME
from ..particles import HALF_A, HALF_B
from ..workflow import export, store
from ..workflow.pipeline import RUN_SUMMARY
from .imaging import bin_images, image_spectra, low_pass, radial_power_spectrum

#: Particles whose images are read for the power spectra.
SPECTRUM_SAMPLE = 256
#: Example particles shown per half set.
EXAMPLES_PER_HALF = 3
#: Display low-pass: at least this resolution, and never finer than this many pixels.
DISPLAY_RESOLUTION_ANGSTROM = 10.0
DISPLAY_RESOLUTION_PIXELS = 3.0
#: Example images larger than this are shown binned (figures draw them at about this many pixels).
DISPLAY_PIXELS = 128
#: A contrast farther than this many robust standard deviations (1.4826 MAD) from the median is flagged.
OUTLIER_SIGMAS = 4.0
#: Per-particle fit-quality arrays that a run may record in the store.
QUALITY_ARRAYS = ("fit_correlation", "contrast_sigma")
HALF_NAMES = {HALF_A: "A", HALF_B: "B"}


@dataclass
class Example:
    """One particle shown side by side; images low-pass filtered (and binned for display when large)."""

    row: int  # row in particles_subtracted.star (0-based)
    image_name: str  # its input image, N@stack as the input named it
    half_set: int
    defocus_angstrom: float  # mean of defocus U and V
    contrast: float
    result: np.ndarray
    input: np.ndarray | None  # None when the input stacks cannot be read here
    model: np.ndarray | None  # input - result: α times the CTF-modulated projection of the masked region


@dataclass
class Spectra:
    """Rotationally averaged power over a sample; frequency in 1/Å, power per pixel."""

    frequency_per_angstrom: np.ndarray
    result: np.ndarray
    input: np.ndarray | None
    model: np.ndarray | None
    sample_size: int


@dataclass
class ReportData:
    """What the figures and the page show."""

    outdir: Path
    summary: dict  # dsub_run.json
    identity: dict  # the store's ``run`` attribute: inputs, settings, version
    box: int
    pixel_size_angstrom: float
    particles_total: int  # rows of the input
    exported_rows: np.ndarray  # (m,) index into the input of each exported particle
    contrast: np.ndarray  # (m,) α of each exported particle
    half_set: np.ndarray  # (m,)
    optics: list[dict]  # one per optics group: group, name, particles, pixel size, voltage
    image_names: "RowNames"  # input image names (N@stack) of the exported rows
    outliers: np.ndarray  # (m,) bool: contrast flagged as outlying
    outlier_bounds: tuple[float, float]
    quality: dict = field(default_factory=dict)  # name -> (m,) array, for each of QUALITY_ARRAYS recorded
    sample_fit: dict | None = None  # {"input": (k,), "fitted": (k,)} for --scale input, when recorded
    examples: list[Example] = field(default_factory=list)
    spectra: Spectra | None = None
    display_resolution_angstrom: float = DISPLAY_RESOLUTION_ANGSTROM
    display_pixel_size_angstrom: float = 0.0  # pixel size of the example images as shown (after binning)
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why
    warnings: list[str] = field(default_factory=list)  # what the run warned about (dsub.log)

    @property
    def scale(self) -> str:
        return self.identity.get("settings", {}).get("scale", self.summary.get("scale", "fit"))


def finished_run_files(outdir: Path) -> None:
    """Refuse a folder without a finished run: one message naming what is missing."""
    if not outdir.is_dir():
        raise OptionError(f"{outdir}: no such folder. Give the output folder (-o) of a finished dsub subtract run.")
    needed = (export.STAR_NAME, RUN_SUMMARY, store.STORE_NAME)
    missing = [name for name in needed if not (outdir / name).exists()]
    if missing:
        raise OptionError(
            f"{outdir}: holds no finished dsub run ({', '.join(missing)} missing). Give the output folder (-o) "
            "of a finished dsub subtract run, or rerun its command to finish it."
        )


def exported_stacks(outdir: Path, paths) -> np.ndarray:
    """The exported stacks as they lie in ``outdir`` now.

    The star names them as ``--paths`` chose (from the project folder, absolute,
    ...): a run copied off a cluster keeps them in ``OUTDIR/Particles`` under the
    same file names, where they are looked for when the named path is not there.
    """
    paths = np.asarray(paths, dtype=object)
    found = {}
    for path in np.unique(paths.astype(str)):
        local = outdir / export.STACK_FOLDER / Path(path).name
        found[path] = path if Path(path).is_file() or not local.is_file() else str(local)
    return np.array([found[str(path)] for path in paths], dtype=object)


def run_warnings(outdir: Path) -> list[str]:
    """The warnings the last attempt printed (``dsub: warning:`` lines of its part of dsub.log)."""
    log = outdir / LOG_NAME
    if not log.is_file():
        return []
    lines = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("==== ")]
    last = lines[starts[-1] + 1:] if starts else lines
    prefix = "dsub: warning: "
    return list(dict.fromkeys(line[len(prefix):] for line in last if line.startswith(prefix)))


def gather(outdir: Path) -> ReportData:
    """Read what the report shows from ``outdir``; raises ``OptionError`` if no finished run is there."""
    outdir = Path(outdir)
    finished_run_files(outdir)
    summary = json.loads((outdir / RUN_SUMMARY).read_text())
    results = store.open_store(outdir / store.STORE_NAME)
    identity = dict(results.attrs.get("run", {}))
    skipped = np.asarray(results["skipped"][:], dtype=bool)
    exported_rows = np.flatnonzero(~skipped)
    table = star_format.read_particles(outdir / export.STAR_NAME, require_ctf=False)
    table.image_paths = exported_stacks(outdir, table.image_paths)
    if len(table) != exported_rows.size:
        raise OptionError(
            f"{outdir / export.STAR_NAME}: lists {len(table)} particles but {store.STORE_NAME} holds "
            f"{exported_rows.size} exported ones: the folder mixes two runs. Rerun the subtraction."
        )
    contrast = np.asarray(results["contrast"][:], dtype=np.float64)[exported_rows]
    outliers, bounds = contrast_outliers(contrast)
    data = ReportData(
        outdir=outdir,
        summary=summary,
        identity=identity,
        box=int(table.box_size[0]),
        pixel_size_angstrom=float(table.pixel_size_angstrom[0]),
        particles_total=int(skipped.size),
        exported_rows=exported_rows,
        contrast=contrast,
        half_set=table.half_set.astype(int),
        optics=optics_groups(table),
        image_names=RowNames(table.source["particles"]["rlnImageOriginalName"]),
        outliers=outliers,
        outlier_bounds=bounds,
        quality={name: np.asarray(results[name][:], dtype=np.float64)[exported_rows]
                 for name in QUALITY_ARRAYS if name in results},
        sample_fit=sample_fit(summary, np.asarray(results["contrast"][:], dtype=np.float64)),
        warnings=run_warnings(outdir),
    )
    data.display_resolution_angstrom = max(DISPLAY_RESOLUTION_ANGSTROM,
                                           DISPLAY_RESOLUTION_PIXELS * data.pixel_size_angstrom)
    read_sample_images(data, table)
    return data


def contrast_outliers(contrast: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Contrasts beyond median ± ``OUTLIER_SIGMAS`` robust σ (1.4826 × median absolute deviation).

    Also flags negative contrast when the median is positive (and the reverse):
    such a particle was subtracted with the wrong sign. Returns (flags, (low, high)).
    """
    finite = contrast[np.isfinite(contrast)]
    if finite.size == 0:
        return np.zeros(contrast.shape, dtype=bool), (np.nan, np.nan)
    median = float(np.median(finite))
    sigma = 1.4826 * float(np.median(np.abs(finite - median)))
    low, high = median - OUTLIER_SIGMAS * sigma, median + OUTLIER_SIGMAS * sigma
    if median > 0:
        low = max(low, 0.0)
    elif median < 0:
        high = min(high, 0.0)
    with np.errstate(invalid="ignore"):
        flags = ~((contrast >= low) & (contrast <= high))
    return flags, (low, high)


def optics_groups(table) -> list[dict]:
    """Particles per optics group, with the group's name, pixel size and voltage."""
    optics = table.source.get("optics") if table.source is not None else None
    names = {}
    if optics is not None and "rlnOpticsGroupName" in optics.columns:
        names = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnOpticsGroupName"].astype(str)))
    groups = []
    for group in np.unique(table.optics_group):
        rows = table.optics_group == group
        first = int(np.argmax(rows))
        groups.append({
            "group": int(group), "name": names.get(int(group), f"opticsGroup{group}"),
            "particles": int(rows.sum()),
            "pixel_size_angstrom": float(table.pixel_size_angstrom[first]),
            "voltage_kv": float(table.voltage_kv[first]),
        })
    return groups


def sample_fit(summary: dict, contrast_used: np.ndarray) -> dict | None:
    """The --scale input check's fitted contrast against the input contrast, if the run recorded it."""
    record = summary.get("input_contrast_check")
    if not record:
        return None
    index = np.asarray(record["index"], dtype=np.int64)
    fitted = np.asarray(record["fitted_contrast"], dtype=np.float64)
    if index.shape != fitted.shape or index.size == 0 or index.max() >= contrast_used.size:
        return None
    given = contrast_used[index]
    paired = np.isfinite(given) & np.isfinite(fitted)  # a bad image in the sample has neither
    return {"input": given[paired], "fitted": fitted[paired]} if paired.any() else None


def evenly_spaced(rows: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` of ``rows``, spread evenly from first to last."""
    if rows.size <= count:
        return rows
    return rows[np.unique(np.linspace(0, rows.size - 1, count).round().astype(int))]


class RowNames:
    """Input image names (``N@stack``) of the exported rows, made into strings only for the rows asked for.

    A run of millions of particles has millions of names: the report shows a few.
    """

    def __init__(self, column):
        self.column = column  # pandas Series, one entry per exported row

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, row) -> str:
        return str(self.column.iloc[int(row)])


def input_image_locations(data: ReportData, table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stack paths and 0-based indices of the input images of ``rows``, from ``rlnImageOriginalName``.

    Relative names are resolved as dsub did when it read them: from the current
    folder, then the input particle file's folder and its parents
    (``formats.paths``).
    """
    names = table.source["particles"]["rlnImageOriginalName"].iloc[rows].astype(str)
    parts = names.str.split("@", n=1, expand=True)
    indices = parts[0].astype(np.int64).to_numpy() - 1
    input_path = data.identity.get("particles", {}).get("path")
    anchor = Path(input_path) if input_path else data.outdir / export.STAR_NAME
    roots = cs_roots(anchor) if anchor.suffix == ".cs" else star_roots(anchor)
    paths, _ = resolve_stack_names(parts[1].to_numpy(dtype=object), roots, anchor.parent)
    return paths, indices


def read_sample_images(data: ReportData, table) -> None:
    """Example images and power spectra from a sample of particles (input, model, result)."""
    count = len(table)
    if count == 0:
        data.notes.append("No particle was exported, so there are no images to show.")
        return
    spectrum_rows = evenly_spaced(np.arange(count), SPECTRUM_SAMPLE)
    example_rows = np.concatenate([
        evenly_spaced(np.flatnonzero(table.half_set == half), EXAMPLES_PER_HALF) for half in (HALF_A, HALF_B)
    ])
    rows = np.union1d(spectrum_rows, example_rows)
    result = read_images(table.image_paths[rows], table.image_indices[rows])
    original = None
    if data.summary.get("rebox"):  # translated and windowed: input and result are not on one grid
        data.notes.append("The particles were re-centred or re-boxed (--recenter, --center, --new-box), so the "
                          "input images are not on the results' grid: only the results are shown.")
    else:
        try:
            paths, indices = input_image_locations(data, table, rows)
            original = read_images(paths, indices)
        except (DsubError, OSError, ValueError, KeyError) as exc:  # moved, deleted or renamed since the run
            data.notes.append(f"The input images could not be read here ({' '.join(str(exc).split())}), so "
                              "only the results are shown.")
    model = None if original is None else original - result
    in_spectrum = np.isin(rows, spectrum_rows)
    pixel = data.pixel_size_angstrom
    result_spectra = image_spectra(result[in_spectrum])
    frequency, power_result = radial_power_spectrum(result_spectra, pixel)
    input_spectra = None if original is None else image_spectra(original[in_spectrum])
    data.spectra = Spectra(
        frequency_per_angstrom=frequency, result=power_result,
        input=None if original is None else radial_power_spectrum(input_spectra, pixel)[1],
        model=None if original is None else radial_power_spectrum(input_spectra - result_spectra, pixel)[1],
        sample_size=int(in_spectrum.sum()),
    )
    del result_spectra, input_spectra
    shown = np.isin(rows, example_rows)
    resolution = data.display_resolution_angstrom
    # Shown smaller than the box: average pixel blocks, as far as the low-pass leaves nothing to alias.
    factor = max(1, min(-(-data.box // DISPLAY_PIXELS), int(resolution / (2 * pixel))))
    data.display_pixel_size_angstrom = pixel * factor

    def filtered(images):
        return None if images is None else bin_images(low_pass(images[shown], pixel, resolution), factor)

    result_f, input_f, model_f = filtered(result), filtered(original), filtered(model)
    defocus = (table.defocus_u_angstrom + table.defocus_v_angstrom) / 2
    for k, row in enumerate(rows[shown]):
        data.examples.append(Example(
            row=int(row), image_name=str(data.image_names[row]), half_set=int(table.half_set[row]),
            defocus_angstrom=float(defocus[row]), contrast=float(data.contrast[row]), result=result_f[k],
            input=None if input_f is None else input_f[k], model=None if model_f is None else model_f[k],
        ))
    data.examples.sort(key=lambda example: (example.half_set, example.row))
