"""The Zarr store every task writes into.

Layout of ``OUTDIR/subtracted.zarr``:

* ``images``      float32 (n, box, box), one Zarr chunk per particle chunk; ``box`` is the
  output box (``--new-box``, else the particles' box);
* ``contrast``    float32 (n,), the contrast scale α each particle was subtracted with;
* ``skipped``     uint8 (n,), 1 for particles left out (``--skip-bad-particles``);
* ``chunk_done``  uint8 (n_chunks,), set to 1 after a chunk's images,
  contrast and skip marks are written, so a rerun knows what is finished;
* attributes: the run's parameters and inputs (``run``).

The coordinator creates every array before any task runs; a task then writes
only the Zarr chunks it owns, so tasks never write the same chunk and no lock
is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

STORE_NAME = "subtracted.zarr"


def chunk_bounds(count: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``chunk_size`` particles."""
    return [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


def create_store(path: Path, count: int, box: int, chunk_size: int, run_attrs: dict) -> zarr.Group:
    """A fresh store for ``count`` particles of ``box``² pixels, replacing any store at ``path``."""
    group = zarr.open_group(str(path), mode="w")
    n_chunks = len(chunk_bounds(count, chunk_size))
    group.create_array(
        "images", shape=(count, box, box), chunks=(chunk_size, box, box), dtype="float32",
        fill_value=0.0, compressors=None,
    )
    group.create_array(
        "contrast", shape=(count,), chunks=(chunk_size,), dtype="float32", fill_value=float("nan"),
        compressors=None,
    )
    group.create_array("skipped", shape=(count,), chunks=(chunk_size,), dtype="uint8", fill_value=0)
    group.create_array("chunk_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
    group.attrs["run"] = run_attrs
    return group


def open_store(path: Path, mode: str = "r") -> zarr.Group:
    """Open an existing store."""
    return zarr.open_group(str(path), mode=mode)


def write_chunk(path: Path, chunk_index: int, start: int, images: np.ndarray, contrast: np.ndarray,
                skipped: np.ndarray | None = None) -> None:
    """Write one chunk's results, then mark the chunk finished (in that order)."""
    group = open_store(path, mode="r+")
    stop = start + images.shape[0]
    group["images"][start:stop] = images
    group["contrast"][start:stop] = contrast
    if skipped is not None and skipped.any():
        group["skipped"][start:stop] = skipped.astype(np.uint8)
    group["chunk_done"][chunk_index] = 1


def finished_chunks(path: Path) -> np.ndarray:
    """Boolean array: which chunks are complete."""
    return np.asarray(open_store(path)["chunk_done"][:], dtype=bool)
