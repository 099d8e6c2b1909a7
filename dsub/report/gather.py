"""Everything the report shows, in two parts: what the run's inputs decide, and what its results do.

``prepare`` (before or while the chunks run; it needs only the particle table):

* ``ReportColumns`` from the table (half set, optics group, defocus and both
  images of every particle), also written into the store for ``dsub report``;
* the sample: ``SPECTRUM_SAMPLE`` particles spread over the run for the power
  spectra and ``EXAMPLES_PER_HALF`` examples per half set;
* the input images of the examples, read in one pass per stack sorted by
  index (each image's bytes only: ``read_images(...)``).

``gather`` (after the run; it reads results, and the sample's inputs again):

* from ``subtracted.zarr``: ``skipped``, the contrast ``contrast`` each particle
  was subtracted with and, when the run recorded them, ``fit_correlation`` and
  ``contrast_sigma``; the run's identity (attribute ``run``); never ``images``;
* ``dsub_run.json``: the run summary (timings, scheduler, devices, ...), and
  the warnings of ``dsub.log``;
* the exported images of the sample and, for the power spectra, their input
  images again, in blocks of ``SPECTRUM_BLOCK_BYTES`` reduced to shell powers
  one block at a time, so that the report's memory does not grow with the
  sample times the box²; the input images of an example that was skipped and
  replaced by its neighbour.

Without a ``Prepared`` (``dsub report OUTDIR``), ``prepare_from_store`` takes its
place: the columns from the store, or from ``particles_subtracted.star`` for a
run of an earlier version (every row parsed: slow for millions). No step reads
per-particle text of more rows than the report shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DsubError, OptionError
from ..formats.mrc import read_images
from ..workflow.transcript import LOG_NAME
from ..particles import HALF_A, HALF_B
from ..workflow import export, store
from ..workflow.pipeline import RUN_SUMMARY
from .columns import FOLDER, ReportColumns
from .imaging import bin_images, image_spectra, low_pass, shell_frequencies, shell_powers
from .sizes import (DISPLAY_PIXELS, DISPLAY_PIXELS_MOST, DISPLAY_RESOLUTION_ANGSTROM, DISPLAY_RESOLUTION_PIXELS,
                    EXAMPLES_PER_HALF, SPECTRUM_BLOCK_BYTES, SPECTRUM_SAMPLE)

#: A contrast farther than this many robust standard deviations (1.4826 MAD) from the median is flagged.
OUTLIER_SIGMAS = 4.0
#: Per-particle fit-quality arrays that a run may record in the store.
QUALITY_ARRAYS = ("fit_correlation", "contrast_sigma")
HALF_NAMES = {HALF_A: "A", HALF_B: "B"}


@dataclass
class Example:
    """One particle shown side by side; images low-pass filtered (and binned for display when large)."""

    row: int  # position among the exported particles: its row in particles_subtracted.star (0-based)
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


@dataclass
class Prepared:
    """What the report needs that the run's results do not change (``prepare``).

    ``spectrum_rows``, ``example_rows``: input rows of the sample, ascending;
    ``example_inputs``: {input row: float32 (box, box) input image} of the
    examples, None when the input images are not shown (``input_note`` says
    why, or ``show_inputs`` is false: re-centred or re-boxed particles). The
    inputs of the spectrum sample are read after the run with the results
    (``sample_spectra``): held here, they would grow with the box².
    """

    columns: ReportColumns
    spectrum_rows: np.ndarray
    example_rows: np.ndarray
    show_inputs: bool = True
    example_inputs: dict | None = None
    input_note: str | None = None


def prepare(outdir, table, particles_per_stack: int, show_inputs: bool = True) -> Prepared:
    """The part of the report that depends only on the run's inputs; call it once the store exists.

    Made to run in a background thread while the chunks run (``report.start_preparation``):
    it builds ``ReportColumns`` from ``table`` (the run's ``ParticleTable``, not
    modified) and writes them into ``outdir``'s store, chooses the sample and
    reads its examples' input images. ``particles_per_stack``: the run's
    ``--particles-per-stack`` (where each particle lies in the exported stacks).
    ``show_inputs`` false (re-centred or re-boxed particles, whose input is not
    on the results' grid): no input image is read. A stack that cannot be read
    is not an error: ``input_note`` says so on the page.
    """
    outdir = Path(outdir)
    store_path = outdir / store.STORE_NAME
    fingerprint = store.open_store(store_path).attrs.get("run", {}).get("fingerprint")
    columns = ReportColumns.from_table(table, outdir, particles_per_stack, fingerprint)
    columns.write(store_path / FOLDER)
    return prepared_sample(columns, None, show_inputs)


def prepare_from_store(outdir: Path, identity: dict, skipped: np.ndarray, show_inputs: bool) -> Prepared:
    """``prepare`` for a finished run (``dsub report``): the columns the run kept in its store, else its star.

    Raises ``OptionError`` when the star and the store describe different runs.
    """
    columns = None
    try:
        columns = ReportColumns.read(outdir / store.STORE_NAME / FOLDER, outdir)
    except (OSError, ValueError, KeyError):  # none (a run of an earlier version) or not whole
        pass
    if columns is not None and (len(columns) != skipped.size or columns.fingerprint != identity.get("fingerprint")):
        columns = None  # another run's
    if columns is None:
        exported_rows = np.flatnonzero(~skipped)
        try:
            columns = ReportColumns.from_star(outdir, exported_rows, skipped.size,
                                              (identity.get("particles") or {}).get("path"))
        except ValueError as exc:
            raise OptionError(
                f"{outdir / export.STAR_NAME}: {exc}: the folder mixes two runs. Rerun the subtraction."
            ) from exc
    return prepared_sample(columns, skipped, show_inputs)


def prepared_sample(columns: ReportColumns, skipped: np.ndarray | None, show_inputs: bool) -> Prepared:
    """Choose the sample among the particles not ``skipped`` (None: all) and read its examples' input images."""
    candidates = np.arange(len(columns)) if skipped is None else np.flatnonzero(~skipped)
    half_set = np.asarray(columns.half_set)
    spectrum_rows = evenly_spaced(candidates, SPECTRUM_SAMPLE)
    example_rows = np.concatenate([
        evenly_spaced(candidates[half_set[candidates] == half], EXAMPLES_PER_HALF) for half in (HALF_A, HALF_B)
    ]).astype(np.int64)
    prepared = Prepared(columns, spectrum_rows, np.sort(example_rows), show_inputs)
    if show_inputs and candidates.size:
        rows = np.unique(example_rows)
        images, prepared.input_note = read_inputs(columns, rows)
        if images is not None:
            prepared.example_inputs = {int(row): image for row, image in zip(rows.tolist(), images)}
    return prepared


def read_inputs(columns: ReportColumns, rows: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The input images of ``rows`` (float32 (k, box, box)), or None and why they could not be read here."""
    try:
        return read_images(*columns.images.inputs(rows)), None
    except (DsubError, OSError, ValueError, KeyError) as exc:  # moved, deleted or renamed since the run
        return None, (f"The input images could not be read here ({' '.join(str(exc).split())}), so only the "
                      "results are shown.")


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


def run_warnings(outdir: Path) -> list[str]:
    """The warnings of the run's attempts (``dsub: warning:`` lines of dsub.log), each once, in order.

    Every part of dsub.log is an attempt of the run whose results OUTDIR holds (a
    different run is refused, or replaces the log with ``--overwrite``); a rerun
    that only finds the run finished, or draws a missing report, says no warning
    of its own, so the last part alone would drop those of the attempts that
    computed the results.
    """
    log = outdir / LOG_NAME
    if not log.is_file():
        return []
    prefix = "dsub: warning: "
    lines = log.read_text(errors="replace").splitlines()
    return list(dict.fromkeys(line[len(prefix):] for line in lines if line.startswith(prefix)))


def gather(outdir: Path, prepared: Prepared | None = None) -> ReportData:
    """Read what the report shows from ``outdir``; raises ``OptionError`` if no finished run is there.

    ``prepared``: this run's ``prepare``; without it (``dsub report OUTDIR``),
    ``prepare_from_store``. Reads each per-particle array of the store once
    (4 bytes a particle), and images of the sample only.
    """
    outdir = Path(outdir)
    finished_run_files(outdir)
    summary = json.loads((outdir / RUN_SUMMARY).read_text())
    results = store.open_store(outdir / store.STORE_NAME)
    identity = dict(results.attrs.get("run", {}))
    arrays = store.read_arrays(outdir / store.STORE_NAME, ("skipped", "contrast", *QUALITY_ARRAYS))
    skipped = arrays["skipped"].astype(bool)
    show_inputs = not summary.get("rebox")  # translated and windowed: input and result are not on one grid
    if prepared is None or len(prepared.columns) != skipped.size:
        prepared = prepare_from_store(outdir, identity, skipped, show_inputs)
    columns = prepared.columns
    exported_rows = np.flatnonzero(~skipped)
    contrast_all = arrays["contrast"].astype(np.float64)
    contrast = contrast_all[exported_rows]
    outliers, bounds = contrast_outliers(contrast)
    data = ReportData(
        outdir=outdir,
        summary=summary,
        identity=identity,
        box=int(summary.get("box") or 0),
        pixel_size_angstrom=columns.pixel_size_angstrom,
        particles_total=int(skipped.size),
        exported_rows=exported_rows,
        contrast=contrast,
        half_set=np.asarray(columns.half_set)[exported_rows],
        optics=optics_counts(columns, exported_rows),
        image_names=RowNames(columns, exported_rows),
        outliers=outliers,
        outlier_bounds=bounds,
        quality={name: arrays[name].astype(np.float64)[exported_rows] for name in QUALITY_ARRAYS if name in arrays},
        sample_fit=sample_fit(summary, contrast_all),
        warnings=run_warnings(outdir),
    )
    data.display_resolution_angstrom = max(DISPLAY_RESOLUTION_ANGSTROM,
                                           DISPLAY_RESOLUTION_PIXELS * data.pixel_size_angstrom)
    if not show_inputs:
        data.notes.append("The particles were re-centred or re-boxed (--recenter, --center, --new-box), so the "
                          "input images are not on the results' grid: only the results are shown.")
    read_sample_images(data, prepared, skipped)
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


def optics_counts(columns: ReportColumns, exported_rows: np.ndarray) -> list[dict]:
    """Each optics group of ``columns.optics`` with ``particles``: how many of ``exported_rows`` are in it."""
    groups, counts = np.unique(np.asarray(columns.optics_group)[exported_rows], return_counts=True)
    found = dict(zip(groups.tolist(), counts.tolist()))
    return [{**group, "particles": int(found.get(group["group"], 0))} for group in columns.optics
            if group["group"] in found]


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
    ``names[i]`` is the name of the ``i``-th exported particle (input row ``exported_rows[i]``).
    """

    def __init__(self, columns: ReportColumns, exported_rows: np.ndarray):
        self.columns, self.exported_rows = columns, exported_rows

    def __len__(self) -> int:
        return self.exported_rows.size

    def __getitem__(self, position) -> str:
        return self.columns.images.names(self.exported_rows[int(position)])[0]


def replace_skipped(rows: np.ndarray, half_set: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """``rows`` with each skipped one replaced by the nearest particle of its half set that was not skipped."""
    rows = np.asarray(rows, dtype=np.int64)
    out = []
    for row in rows:
        if not skipped[row]:
            out.append(int(row))
            continue
        others = np.flatnonzero((half_set == half_set[row]) & ~skipped)
        others = others[~np.isin(others, rows)]
        if others.size:
            out.append(int(others[np.argmin(np.abs(others - row))]))
    return np.unique(np.asarray(out, dtype=np.int64))


def read_sample_images(data: ReportData, prepared: Prepared, skipped: np.ndarray) -> None:
    """Example images and power spectra of the sample (input, model, result): the exported images read here.

    Holds the examples' images (input, result, model: ``2 * EXAMPLES_PER_HALF``
    each) and a block of the spectrum sample at a time (``sample_spectra``).
    """
    columns = prepared.columns
    if data.exported_rows.size == 0:
        data.notes.append("No particle was exported, so there are no images to show.")
        return
    half_set = np.asarray(columns.half_set)
    spectrum_rows = prepared.spectrum_rows[~skipped[prepared.spectrum_rows]]
    example_rows = replace_skipped(prepared.example_rows, half_set, skipped)
    result = read_images(*columns.images.results(example_rows))
    data.box = int(result.shape[-1])
    show_inputs = prepared.show_inputs and not data.summary.get("rebox")
    example_inputs, note = None, None
    if show_inputs:
        note = prepared.input_note
        if note is None:
            example_inputs = dict(prepared.example_inputs or {})
            missing = np.array([row for row in example_rows if row not in example_inputs], dtype=np.int64)
            if missing.size:  # an example that was skipped and replaced by its neighbour, or not prepared
                images, note = read_inputs(columns, missing)
                example_inputs = None if images is None else {**example_inputs, **dict(zip(missing.tolist(), images))}
    pixel = data.pixel_size_angstrom
    data.spectra, spectra_note = sample_spectra(columns, spectrum_rows, data.box, pixel,
                                                with_inputs=example_inputs is not None)
    if data.spectra.input is None:
        example_inputs = None  # input and model shown for all or none
    for text in dict.fromkeys(filter(None, (note, spectra_note))):
        data.notes.append(text)
    resolution = data.display_resolution_angstrom
    # Shown smaller than the box: average pixel blocks, as far as the low-pass leaves nothing to alias, and at
    # least as far as DISPLAY_PIXELS_MOST (the figure shows fewer pixels than that anyway).
    factor = max(1, min(-(-data.box // DISPLAY_PIXELS), int(resolution / (2 * pixel))),
                 -(-data.box // DISPLAY_PIXELS_MOST))
    data.display_pixel_size_angstrom = pixel * factor

    def filtered(image):
        return bin_images(low_pass(image[None], pixel, resolution), factor)[0]

    names = columns.images.names(example_rows)
    positions = np.searchsorted(data.exported_rows, example_rows)
    for k, row in enumerate(example_rows):
        original = None if example_inputs is None else example_inputs.pop(int(row))
        data.examples.append(Example(
            row=int(positions[k]), image_name=names[k], half_set=int(half_set[row]),
            defocus_angstrom=float(columns.defocus_angstrom[row]), contrast=float(data.contrast[positions[k]]),
            result=filtered(result[k]), input=None if original is None else filtered(original),
            model=None if original is None else filtered(original - result[k]),
        ))
    data.examples.sort(key=lambda example: (example.half_set, example.row))


def sample_spectra(columns: ReportColumns, rows: np.ndarray, box: int, pixel_size_angstrom: float,
                   with_inputs: bool) -> tuple[Spectra, str | None]:
    """Rotationally averaged power of the results of ``rows`` and, ``with_inputs``, of their inputs and models.

    The model is input - result, its transform ``rfft2(input) - rfft2(result)``.
    ``box``: the results' box. Reads and reduces ``SPECTRUM_BLOCK_BYTES`` of images at a time
    (``imaging.shell_powers``); the spectra are the means of the per-image
    shell powers, as ``imaging.radial_power_spectrum`` of the whole sample. An
    input that cannot be read leaves input and model out (None) and returns
    why as the note.
    """
    powers = {"result": [], "input": [], "model": []}
    note = None
    per_block = max(1, SPECTRUM_BLOCK_BYTES // (box * box * 4))
    for start in range(0, rows.size, per_block):
        block = rows[start:start + per_block]
        result = image_spectra(read_images(*columns.images.results(block)))
        powers["result"].append(shell_powers(result))
        if with_inputs:
            images, note = read_inputs(columns, block)
            if images is None:
                with_inputs = False
            else:
                inputs = image_spectra(images)
                del images
                powers["input"].append(shell_powers(inputs))
                inputs -= result
                powers["model"].append(shell_powers(inputs))
                del inputs
        del result
    mean = {key: np.concatenate(values).mean(axis=0) if values else None for key, values in powers.items()}
    if not with_inputs:
        mean["input"] = mean["model"] = None
    return Spectra(frequency_per_angstrom=shell_frequencies(box, pixel_size_angstrom), result=mean["result"],
                   input=mean["input"], model=mean["model"], sample_size=int(rows.size)), note
