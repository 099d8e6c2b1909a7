"""The particle table on disk, in columns that tasks read by row range.

A task of a million-particle run must not carry its chunk's table through the
scheduler (48 kB each, thousands at once). The coordinator writes the table
once into ``OUTDIR/subtracted.zarr/particle_table/``: one ``.npy`` file per
per-particle array of ``ParticleTable`` (``<field>.npy``, rows first; one row for
an array that is the same for all, ``particles.same_for_all``), the stack
paths as a category (``image_paths.json``: the distinct paths; ``image_path_codes.npy``:
int32 index of each row's path into them) and ``table.json`` (the fields that
are not per particle). A task carries a ``ParticleRows`` (the folder and a row
range); ``load_particles`` memory-maps each file and copies only those rows.
The folder is deleted once every chunk is stored (``pipeline``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..particles import ParticleTable, is_same_for_all

FOLDER = "particle_table"
_DESCRIPTION = "table.json"
_PATHS = "image_paths.json"
_PATH_CODES = "image_path_codes.npy"


@dataclass(frozen=True)
class ParticleRows:
    """Rows ``start:stop`` of the particle table written in ``folder`` (see ``write_table``)."""

    folder: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def _per_particle(table: ParticleTable) -> dict[str, np.ndarray]:
    """The arrays of ``table`` with one row per particle."""
    count = len(table)
    return {name: value for name, value in vars(table).items()
            if isinstance(value, np.ndarray) and value.shape[:1] == (count,)}


def write_table(table: ParticleTable, folder: str | os.PathLike) -> Path:
    """Write ``table``'s per-particle arrays into ``folder`` (replacing what is there); returns the folder.

    The raw metadata (``source``) and ``extra`` stay out: tasks do not need them.
    Written into ``folder.partial`` and renamed, so a folder that exists is whole.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    arrays = _per_particle(table)
    del arrays["image_paths"]
    codes, uniques = table.image_path_codes()
    (partial / _PATHS).write_text(json.dumps([str(path) for path in uniques]))
    np.save(partial / _PATH_CODES, codes)
    shared = sorted(name for name, values in arrays.items() if is_same_for_all(values))
    for name, values in arrays.items():
        np.save(partial / f"{name}.npy", np.ascontiguousarray(values[:1] if name in shared else values),
                allow_pickle=False)
    description = {
        "count": len(table),
        "arrays": sorted(arrays),
        "same_for_all": shared,  # saved as their one row
        "source_format": table.source_format,
        "source_path": None if table.source_path is None else str(table.source_path),
    }
    (partial / _DESCRIPTION).write_text(json.dumps(description))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def table_rows(folder: str | os.PathLike, start: int, stop: int) -> ParticleRows:
    """A reference to rows ``start:stop`` of the table in ``folder``, for a task."""
    return ParticleRows(str(folder), int(start), int(stop))


def load_particles(particles) -> ParticleTable:
    """The ``ParticleTable`` a task works on: ``particles`` itself, or the rows a ``ParticleRows`` names.

    Only the rows asked for are read (the files are memory-mapped, once per
    process and table: ``_opened_table``). Raises ``FileNotFoundError`` when the
    folder is gone and ``IndexError`` for rows beyond the table.
    """
    if isinstance(particles, ParticleTable):
        return particles
    folder = Path(particles.folder)
    description, stored, paths, codes = _opened_table(folder)
    start, stop = particles.start, particles.stop
    if not 0 <= start <= stop <= description["count"]:
        raise IndexError(f"rows {start}:{stop} are outside the table of {description['count']} particles in {folder}")
    values = {name: np.repeat(np.asarray(array), stop - start, axis=0) if name in description["same_for_all"]
              else np.array(array[start:stop]) for name, array in stored.items()}
    source_path = description["source_path"]
    return ParticleTable(
        image_paths=paths[codes[start:stop]], source_format=description["source_format"],
        source_path=None if source_path is None else Path(source_path), **values,
    )


_opened: dict = {}
_opened_lock = threading.Lock()


def _opened_table(folder: Path):
    """(description, {name: memory-mapped array}, distinct paths, path codes) of the table in ``folder``.

    Kept for the last table this process read: parsing twenty ``.npy`` headers
    for every task cost more than reading its rows. The key holds the
    description file's inode and modification time, so a table written anew
    at the same place (the next run in a long-lived worker) is opened afresh.
    """
    stat = os.stat(folder / _DESCRIPTION)
    key = (str(folder), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _opened_lock:
        if key not in _opened:
            description = json.loads((folder / _DESCRIPTION).read_text())
            stored = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in description["arrays"]}
            paths = np.array(json.loads((folder / _PATHS).read_text()), dtype=object)
            _opened.clear()
            _opened[key] = (description, stored, paths, np.load(folder / _PATH_CODES, mmap_mode="r"))
        return _opened[key]
