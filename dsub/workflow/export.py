"""Export the Zarr store to what RELION and cryoSPARC read.

* ``OUTDIR/Particles/subtracted_NNNN.mrcs``: float32 stacks, pixel size in the header;
* ``OUTDIR/particles_subtracted.star``: every input row, in input order, with
  ``rlnImageName`` pointing at the new stacks (by default relative to the
  current folder, RELION's project folder, when OUTDIR is inside it, else
  absolute: ``formats.paths.written_paths``) and the old name in
  ``rlnImageOriginalName``;
* ``OUTDIR/particles_subtracted.cs``: every input field passed through, with
  ``blob/path`` / ``blob/idx`` pointing at the new stacks (by default relative
  to the cryoSPARC project folder when there is one and OUTDIR is inside it,
  else absolute) and ``alignments3D/alpha`` holding the contrast each particle
  was subtracted with;
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
from ..formats.paths import written_paths
from . import store

STACK_FOLDER = "Particles"
STAR_NAME = "particles_subtracted.star"
CS_NAME = "particles_subtracted.cs"
SKIPPED_NAME = "skipped_particles.star"
#: Store array -> star label / .cs field for what the contrast fit measured of each particle.
FIT_COLUMNS = {"contrast": "rlnDsubContrast", "contrast_sigma": "rlnDsubContrastSigma",
               "fit_correlation": "rlnDsubFitCorrelation"}
FIT_FIELDS = {"contrast_sigma": "dsub/contrast_sigma", "fit_correlation": "dsub/fit_correlation"}


def stack_layout(count: int, particles_per_stack: int) -> list[tuple[str, int, int]]:
    """(relative path, start, stop) of each output stack."""
    return [
        (f"{STACK_FOLDER}/subtracted_{number:04d}.mrcs", start, min(start + particles_per_stack, count))
        for number, start in enumerate(range(0, count, particles_per_stack))
    ]


def write_stack_from_store(store_path: Path, outdir: Path, relative: str, start: int, stop: int,
                           pixel_size: float) -> str:
    """Copy particles ``start:stop`` of the store into one float32 .mrcs stack."""
    target = outdir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    images = store.open_store(store_path)["images"]
    step = images.chunks[0]
    low, high, total, squares = np.inf, -np.inf, 0.0, 0.0
    with write_stack(partial, (stop - start, images.shape[1], images.shape[2]), pixel_size) as mrc:
        for first in range(start, stop, step):  # one Zarr chunk at a time: memory stays bounded
            last = min(first + step, stop)
            block = np.asarray(images[first:last])
            mrc.data[first - start : last - start] = block
            flat = block.reshape(-1)
            low, high = min(low, float(flat.min())), max(high, float(flat.max()))
            total += float(flat.sum())  # numpy sums float32 pairwise: accurate enough here
            squares += float(np.dot(flat, flat))  # BLAS; float32 is plenty for a header statistic
        count = mrc.data.size
        mean = total / count
        mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = low, high, mean
        mrc.header.rms = np.sqrt(max(squares / count - mean * mean, 0.0))
    os.replace(partial, target)
    return relative


def new_image_locations(count: int, particles_per_stack: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative stack path and 0-based index of every particle in the exported stacks."""
    paths = np.empty(count, dtype=object)
    indices = np.empty(count, dtype=np.int64)
    for relative, start, stop in stack_layout(count, particles_per_stack):
        paths[start:stop] = relative
        indices[start:stop] = np.arange(stop - start)
    return paths, indices


def write_metadata(table, outdir: Path, particles_per_stack: int, contrast: np.ndarray,
                   skipped: np.ndarray | None = None, exported=None, paths_mode: str = "auto",
                   fit: dict | None = None) -> None:
    """Write the star and .cs files that point at the exported stacks (skipped particles left out).

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
    relative, indices = new_image_locations(len(table), particles_per_stack)
    star_paths = written_paths(relative, outdir, paths_mode, Path.cwd())
    paths = written_paths(relative, outdir, paths_mode, table.extra.get("project_folder"))
    names = np.array([f"{index + 1:06d}@{path}" for path, index in zip(star_paths, indices)], dtype=object)
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
    measured = {"contrast": np.asarray(contrast), **(fit or {})}
    columns = {FIT_COLUMNS[name]: np.asarray(values, np.float32)[keep] for name, values in measured.items()}
    fields = {FIT_FIELDS[name]: np.asarray(values, "<f4")[keep] for name, values in measured.items()
              if name in FIT_FIELDS}
    star_format.write_particles(kept, outdir / STAR_NAME, names[keep], extra_columns=columns)
    cs_format.write_particles(kept, outdir / CS_NAME, paths[keep], indices[keep], contrast[keep],
                              extra_fields=fields)


def original_image_names(table) -> np.ndarray:
    """Each particle's input image as ``N@path`` (1-based), as the input named it where possible."""
    source = table.source
    if table.source_format == "star" and source is not None and "rlnImageName" in source["particles"]:
        return source["particles"]["rlnImageName"].astype(str).to_numpy(dtype=object)
    return np.array([f"{i + 1:06d}@{p}" for i, p in zip(table.image_indices, table.image_paths)], dtype=object)
