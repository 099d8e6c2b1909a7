"""Export the Zarr store to what RELION and cryoSPARC read.

* ``OUTDIR/Particles/subtracted_NNNN.mrcs``: float32 (MRC mode 2) stacks, float16 (mode 12)
  when the store is float16 (``--float16``), each holding particles of one
  pixel size (in input order), with that pixel size in the header;
* ``OUTDIR/particles_subtracted.star``: every input row, in input order, with
  ``rlnImageName`` pointing at the new stacks (by default relative to the
  current folder, RELION's project folder, when OUTDIR is inside it, else
  absolute: ``formats.paths.written_paths``) and the old name in
  ``rlnImageOriginalName``;
* ``OUTDIR/particles_subtracted.cs``: every input field passed through, with
  ``blob/path`` / ``blob/idx`` pointing at the new stacks (by default relative
  to the cryoSPARC project folder when there is one and OUTDIR is inside it,
  else absolute) and ``alignments3D/alpha`` holding the contrast each particle
  was subtracted with (with ``--scale none``, the input's alpha, or 1);
* re-centred or re-boxed particles (``rebox``): the star and .cs carry their
  new origins and box (``rlnImageSize``, ``blob/shape``);
* both carry the contrast fit's uncertainty and quality (``FIT_COLUMNS``,
  ``FIT_FIELDS``): dsub's own labels, since neither program defines one;
* ``OUTDIR/skipped_particles.star``: with ``--skip-bad-particles``, the input
  rows of the particles left out (their slots in the stacks hold zeros, and no
  metadata row points at them).

Each stack is written under a temporary name and renamed when full; the two
metadata files are written last, so their presence means the export finished.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import warn
from ..formats import cs as cs_format
from ..formats import star as star_format
from ..formats import select_rows
from ..formats.mrc import write_stack
from ..formats.paths import StackRefs, written_paths
from . import store

STACK_FOLDER = "Particles"
STAR_NAME = "particles_subtracted.star"
CS_NAME = "particles_subtracted.cs"
SKIPPED_NAME = "skipped_particles.star"
#: Store array -> star label / .cs field for what the contrast fit measured of each particle.
FIT_COLUMNS = {"contrast": "rlnDsubContrast", "contrast_sigma": "rlnDsubContrastSigma",
               "fit_correlation": "rlnDsubFitCorrelation"}
FIT_FIELDS = {"contrast_sigma": "dsub/contrast_sigma", "fit_correlation": "dsub/fit_correlation"}


def stack_layout(count: int, particles_per_stack: int, pixel_sizes=None) -> list[tuple[str, np.ndarray, float]]:
    """(relative path, rows, pixel size) of each output stack.

    Each stack holds particles of one pixel size (``pixel_sizes``, length
    ``count``; None: all alike, reported as 0), in input order, at most
    ``particles_per_stack``; pixel sizes in order of first appearance.
    """
    sizes = np.zeros(count) if pixel_sizes is None else np.round(np.asarray(pixel_sizes, dtype=np.float64), 6)
    _, first = np.unique(sizes, return_index=True)
    layout = []
    for size in sizes[np.sort(first)]:
        rows = np.flatnonzero(sizes == size)
        for start in range(0, rows.size, particles_per_stack):
            relative = f"{STACK_FOLDER}/subtracted_{len(layout):04d}.mrcs"
            layout.append((relative, rows[start : start + particles_per_stack], float(size)))
    return layout


def write_stack_from_store(store_path: Path, outdir: Path, relative: str, rows, pixel_size: float) -> str:
    """Copy the particles ``rows`` (ascending store indices) into one .mrcs stack.

    The stack takes the store's dtype: MRC mode 2 (float32) or 12 (float16,
    ``--float16``; MRC2014, read by RELION >= 4.0 and cryoSPARC >= 4.4). Header
    statistics are computed in float32 whatever the dtype.
    """
    target = outdir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    images = store.open_store(store_path)["images"]
    rows = np.asarray(rows, dtype=np.int64)
    step = images.chunks[0]
    low, high, total, squares = np.inf, -np.inf, 0.0, 0.0
    mode = 12 if np.dtype(images.dtype) == np.float16 else 2
    with write_stack(partial, (rows.size, images.shape[1], images.shape[2]), pixel_size, mrc_mode=mode) as mrc:
        for first in range(0, rows.size, step):  # a chunk's worth at a time: memory stays bounded
            wanted = rows[first : first + step]
            if wanted[-1] - wanted[0] + 1 == wanted.size:  # contiguous: a plain slice
                block = np.asarray(images[int(wanted[0]) : int(wanted[-1]) + 1])
            else:
                block = np.asarray(images.oindex[wanted])
            mrc.data[first : first + wanted.size] = block
            flat = block.reshape(-1).astype(np.float32, copy=False)  # float16 sums would overflow
            low, high = min(low, float(flat.min())), max(high, float(flat.max()))
            total += float(flat.sum())  # numpy sums float32 pairwise: accurate enough here
            squares += float(np.dot(flat, flat))  # BLAS; float32 is plenty for a header statistic
        count = mrc.data.size
        mean = total / count
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
        mrc.header.rms = np.sqrt(max(squares / count - mean * mean, 0.0))
    os.replace(partial, target)
    return relative


def new_image_locations(count: int, particles_per_stack: int, pixel_sizes=None) -> tuple[np.ndarray, np.ndarray]:
    """Relative stack path and 0-based index of every particle in the exported stacks."""
    paths = np.empty(count, dtype=object)
    indices = np.empty(count, dtype=np.int64)
    for relative, rows, _ in stack_layout(count, particles_per_stack, pixel_sizes):
        paths[rows] = relative
        indices[rows] = np.arange(rows.size)
    return paths, indices


def new_stack_refs(count: int, particles_per_stack: int, pixel_sizes=None) -> StackRefs:
    """Each particle's place in the exported stacks (paths relative to OUTDIR), as ``new_image_locations``."""
    layout = stack_layout(count, particles_per_stack, pixel_sizes)
    codes = np.empty(count, dtype=np.int32)
    indices = np.empty(count, dtype=np.int32)
    for number, (_, rows, _) in enumerate(layout):
        codes[rows] = number
        indices[rows] = np.arange(rows.size)
    return StackRefs([relative for relative, _, _ in layout], codes, indices)


def write_metadata(table, outdir: Path, particles_per_stack: int, contrast: np.ndarray,
                   skipped: np.ndarray | None = None, exported=None, paths_mode: str = "auto",
                   fit: dict | None = None) -> None:
    """Write the star and .cs files that point at the exported stacks (skipped particles left out).

    ``contrast`` None (``--scale none``) keeps the input's ``alignments3D/alpha`` (or 1).
    ``exported`` is the table that describes the exported images when it differs
    from the input ``table`` (re-centred or re-boxed particles: new origins and
    box); the skipped particles' rows, which point at their input images, always
    come from ``table``. ``paths_mode`` (``--paths``): how stack paths are
    written, see ``formats.paths.written_paths``; the star's start from the
    current folder, the .cs's from ``table.extra["project_folder"]`` (the
    cryoSPARC project folder). ``fit``: {store array name: (n,) values} of
    ``store.PER_PARTICLE`` besides ``contrast``, written under ``FIT_COLUMNS`` /
    ``FIT_FIELDS``.
    """
    exported = table if exported is None else exported
    locations = new_stack_refs(len(table), particles_per_stack, table.pixel_size_angstrom)
    names = locations.with_paths(written_paths(locations.paths, outdir, paths_mode, Path.cwd()))
    paths = locations.with_paths(written_paths(locations.paths, outdir, paths_mode, table.extra.get("project_folder")))
    keep = np.ones(len(table), dtype=bool) if skipped is None else ~np.asarray(skipped, dtype=bool)
    (outdir / SKIPPED_NAME).unlink(missing_ok=True)
    if not keep.all():
        left_out = select_rows(table, ~keep)
        originals = original_image_names(left_out)
        star_format.write_particles(left_out, outdir / SKIPPED_NAME, originals, original_names=originals)
    kept = select_rows(exported, keep)
    if np.any(kept.ctf_premultiplied):
        warn(f"{CS_NAME}: the images are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied), and a cryoSPARC "
             "particle .cs has no field that says so: cryoSPARC would treat them as plain images. Continue "
             f"from {STAR_NAME} in RELION, which keeps the flag.")
    rows = slice(None) if keep.all() else keep  # all kept: views, no copies of millions of values
    measured = {**({"contrast": np.asarray(contrast)} if contrast is not None else {}), **(fit or {})}
    columns = {FIT_COLUMNS[name]: np.asarray(values, np.float32)[rows] for name, values in measured.items()}
    fields = {FIT_FIELDS[name]: np.asarray(values, "<f4")[rows] for name, values in measured.items()
              if name in FIT_FIELDS}
    star_format.write_particles(kept, outdir / STAR_NAME, names.select(rows), extra_columns=columns)
    cs_format.write_particles(kept, outdir / CS_NAME, paths.select(rows), None,
                              None if contrast is None else contrast[rows], extra_fields=fields)


def original_image_names(table) -> np.ndarray:
    """Each particle's input image as ``N@path`` (1-based), as the input named it where possible."""
    source = table.source
    if table.source_format == "star" and source is not None and "rlnImageName" in source["particles"]:
        return source["particles"]["rlnImageName"].astype(str).to_numpy(dtype=object)
    return np.array([f"{i + 1:06d}@{p}" for i, p in zip(table.image_indices, table.image_paths)], dtype=object)
