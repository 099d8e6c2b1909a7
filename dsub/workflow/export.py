"""Export the Zarr store to what RELION and cryoSPARC read.

* ``OUTDIR/Particles/subtracted_NNNN.mrcs``: float32 stacks, pixel size in the header;
* ``OUTDIR/particles_subtracted.star``: every input row, in input order, with
  ``rlnImageName`` pointing at the new stacks (relative to OUTDIR) and the old
  name in ``rlnImageOriginalName``;
* ``OUTDIR/particles_subtracted.cs``: every input field passed through, with
  ``blob/path`` / ``blob/idx`` pointing at the new stacks (relative to OUTDIR)
  and ``alignments3D/alpha`` holding the contrast each particle was subtracted with.

Each stack is written under a temporary name and renamed when full; the two
metadata files are written last, so their presence means the export finished.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..formats import cs as cs_format
from ..formats import star as star_format
from ..formats.mrc import write_stack
from . import store

STACK_FOLDER = "Particles"
STAR_NAME = "particles_subtracted.star"
CS_NAME = "particles_subtracted.cs"


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


def write_metadata(table, outdir: Path, particles_per_stack: int, contrast: np.ndarray) -> None:
    """Write the star and .cs files that point at the exported stacks."""
    paths, indices = new_image_locations(len(table), particles_per_stack)
    names = [f"{index + 1:06d}@{path}" for path, index in zip(paths, indices)]
    star_format.write_particles(table, outdir / STAR_NAME, names)
    cs_format.write_particles(table, outdir / CS_NAME, paths, indices, contrast)
