"""Where each particle lies on its micrograph: RELION's columns as cryoSPARC's ``location/*`` fields.

RELION writes a particle's micrograph as ``rlnMicrographName`` and its centre as
``rlnCoordinateX/Y``, in pixels of that micrograph. cryoSPARC keeps the same in
the ``location`` slot (reference notes, formats.md §1.3): ``micrograph_path``,
``micrograph_shape`` ``[ny, nx]`` (``<u4``) and the centre as fractions of that
shape, ``center_x_frac`` and ``center_y_frac`` (``<f4``), with ``y`` counted from
the other edge. The conversion is the inverse of pyem's ``csparc2star`` default
(``pyem/metadata/cryosparc2.py``, ``cryosparc_2_cs_particle_locations`` with
``swapxy`` and ``inverty``, formats.md §3.5)::

    rlnCoordinateX = round(center_x_frac · nx)
    rlnCoordinateY = round((1 − center_y_frac) · ny)
    =>  center_x_frac = X / nx,   center_y_frac = 1 − Y / ny

which is also how cryoSPARC's own Import Particles reads RELION coordinates
(it inverts y: pyem issue #101, the maintainer). ``micrograph_path`` is
``rlnMicrographName`` as the star writes it, as pyem maps it.

A star holds no micrograph shape, so dsub reads it from each micrograph's MRC
header, looked up as the stacks are (the current folder, then the star's folder
and its parents: ``paths.star_roots``). Where any micrograph cannot be found or
read, the fractions and the shape are left out for every particle (a field must
hold a value in every row, and a made-up shape would place particles wrongly),
and ``micrograph_path`` is written alone. ``location/micrograph_uid``, the
cryoSPARC exposure's uid, is not written: a star input comes from no cryoSPARC
exposure, and the reference notes give no rule for making one up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsub.formats.mrc import image_shape
from dsub.formats.paths import path_codes, star_roots

NAME_LABEL = "rlnMicrographName"
COORDINATE_LABELS = ("rlnCoordinateX", "rlnCoordinateY")


@dataclass
class StarLocations:
    """Each particle's micrograph and position, ready to be written as ``location/*`` a block of rows at a time.

    ``codes`` (n,) int32: each particle's micrograph among ``paths`` (k,) bytes;
    ``shapes`` (k, 2) ``[ny, nx]`` of each micrograph, or None where any is
    unknown; ``coordinates`` the star's (X, Y) columns (pandas Series, pixels),
    or None where the star has none or the shapes are unknown.
    """

    codes: np.ndarray
    paths: np.ndarray
    shapes: np.ndarray | None
    coordinates: tuple | None

    def fields(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The ``location/*`` fields of rows ``start:stop``."""
        codes = self.codes[start:stop]
        fields = {"location/micrograph_path": self.paths[codes]}
        if self.coordinates is not None and self.shapes is not None:
            shape = self.shapes[codes]  # [ny, nx]
            x, y = (np.asarray(column.iloc[start:stop], dtype=np.float64) for column in self.coordinates)
            fields["location/micrograph_shape"] = shape.astype("<u4")
            fields["location/center_x_frac"] = (x / shape[:, 1]).astype("<f4")
            fields["location/center_y_frac"] = (1.0 - y / shape[:, 0]).astype("<f4")
        return fields


#: Micrograph headers read at once (reading is waiting on the file system, not computing).
HEADER_READERS = 16


def micrograph_shapes(names, roots: list[Path]) -> np.ndarray | None:
    """``[ny, nx]`` of each micrograph of ``names`` (k,) from its MRC header, (k, 2) int64; None if any is
    missing or unreadable.

    Relative names start from the first of ``roots`` that holds the first
    relative one (as ``paths.resolve_stack_names`` does for stacks); when none
    does, the shapes are unknown at once, without looking for the others.
    """
    from concurrent.futures import ThreadPoolExecutor

    names = [str(name) for name in names]
    relative = next((name for name in names if not os.path.isabs(name)), None)
    root = None
    if relative is not None:
        root = next((root for root in roots if (root / relative).is_file()), None)
        if root is None:
            return None
    paths = [name if os.path.isabs(name) else os.path.join(root, name) for name in names]
    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, max(1, len(paths)))) as readers:
        shapes = list(readers.map(image_shape, paths))
    if any(shape is None for shape in shapes):
        return None
    return np.asarray(shapes, dtype=np.int64).reshape(-1, 2)


def micrograph_codes(column) -> tuple[np.ndarray, list[str]]:
    """(codes int32 (n,), names) of a star's ``rlnMicrographName`` column (pandas Series of text).

    A categorical column (as the star reader gives name columns) brings its own
    codes: no string is made per row (``to_numpy(dtype=object)`` of a categorical
    makes one object per row, about 95 bytes a row: 1.4 GB at 10 M rows); other
    columns are coded by ``paths.path_codes``.
    """
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        if codes.size == 0 or codes.min() >= 0:  # -1: a missing name, which path_codes counts as a name
            return codes.astype(np.int32), [str(name) for name in column.cat.categories]
    codes, names = path_codes(column.to_numpy(dtype=object))  # text already (star.NAME_COLUMNS)
    return codes, [str(name) for name in names]


def star_locations(table) -> StarLocations | None:
    """The ``location/*`` fields a star input's particles get in a .cs; None without ``rlnMicrographName``.

    ``table``: a ``ParticleTable`` read from a star, its ``source["particles"]``
    row for row with its particles.
    """
    source = table.source
    if table.source_format != "star" or source is None or NAME_LABEL not in source["particles"].columns:
        return None
    particles = source["particles"]
    codes, names = micrograph_codes(particles[NAME_LABEL])
    width = max([len(name.encode()) for name in names] + [1])
    paths = np.array([name.encode() for name in names], dtype=f"S{width}")
    coordinates = None
    shapes = None
    if all(label in particles.columns for label in COORDINATE_LABELS):
        numbers = [particles[label] for label in COORDINATE_LABELS]
        if all(column.dtype.kind in "iuf" and np.isfinite(column.to_numpy()).all() for column in numbers):
            shapes = micrograph_shapes(names, star_roots(table.source_path))
            coordinates = tuple(numbers) if shapes is not None else None
    return StarLocations(codes=codes, paths=paths, shapes=shapes, coordinates=coordinates)
