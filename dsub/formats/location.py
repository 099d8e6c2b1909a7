"""Where each particle lies on its micrograph: RELION's columns as cryoSPARC's ``location/*`` fields, and back.

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
``rlnMicrographName`` (as pyem maps it) rebased from the folder RELION runs in
to the cryoSPARC project folder, as the stacks' ``blob/path`` are
(``cryosparc_micrograph_paths``).

A star holds no micrograph shape, so dsub reads it from each micrograph's MRC
header, looked up as the stacks are (the current folder, then the star's folder
and its parents: ``paths.star_roots``). Where any micrograph cannot be found or
read, the fractions and the shape are left out for every particle (a field must
hold a value in every row, and a made-up shape would place particles wrongly),
and ``micrograph_path`` is written alone. ``location/micrograph_uid``, the
cryoSPARC exposure's uid, is not written: a star input comes from no cryoSPARC
exposure, and the reference notes give no rule for making one up.

The way back (a .cs input's star, ``cs_star_columns``) is pyem's conversion
itself, with ``micrograph_path`` rebased from the cryoSPARC project folder to
the folder RELION runs in, as the stacks' names are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsub.formats.mrc import image_shape
from dsub.formats.paths import is_inside, path_codes, star_roots

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


def star_micrograph_base(names, roots: list[Path]) -> Path | None:
    """The folder a star's relative ``rlnMicrographName`` values start from: the first of ``roots``
    (``paths.star_roots``) that holds the first relative one, as ``paths.resolve_stack_names`` does for
    stacks; the current folder where every name is absolute; None where no root holds it (not on this machine)."""
    relative = next((str(name) for name in names if not os.path.isabs(str(name))), None)
    if relative is None:
        return Path(os.getcwd())
    return next((root for root in roots if (root / relative).is_file()), None)


def micrograph_shapes(names, base: Path | None) -> np.ndarray | None:
    """``[ny, nx]`` of each micrograph of ``names`` (k,) from its MRC header, (k, 2) int64; None if any is
    missing or unreadable, or ``base`` (where relative names start, ``star_micrograph_base``) is None.
    """
    from concurrent.futures import ThreadPoolExecutor

    if base is None:
        return None
    paths = [os.path.join(base, str(name)) for name in names]  # an absolute name stays itself
    with ThreadPoolExecutor(max_workers=min(HEADER_READERS, max(1, len(paths)))) as readers:
        shapes = list(readers.map(image_shape, paths))
    if any(shape is None for shape in shapes):
        return None
    return np.asarray(shapes, dtype=np.int64).reshape(-1, 2)


def cryosparc_micrograph_paths(names, base: Path | None, project) -> list[str]:
    """``location/micrograph_path`` for each of a star's ``rlnMicrographName`` values (k,).

    cryoSPARC opens them from its project folder (formats.md §1.2), as
    ``blob/path``: each micrograph found from ``base`` (``star_micrograph_base``)
    is written relative to ``project`` (the .cs's project folder,
    ``table.extra["project_folder"]``) where it lies inside it, else absolute
    (the rule of ``paths.written_paths``' ``auto``); without a ``base`` (the
    micrographs are not on this machine) the names are written as the star
    gives them, as pyem's ``star2cs`` writes them.
    """
    if base is None:
        return [str(name) for name in names]
    written = []
    for name in names:
        absolute = os.path.normpath(os.path.join(base, str(name)))
        inside = project is not None and is_inside(absolute, project)
        written.append(os.path.relpath(absolute, os.path.abspath(project)) if inside else absolute)
    return written


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
    base = star_micrograph_base(names, star_roots(table.source_path))
    written = [name.encode() for name in cryosparc_micrograph_paths(names, base, table.extra.get("project_folder"))]
    paths = np.array(written, dtype=f"S{max([len(name) for name in written] + [1])}")
    coordinates = None
    shapes = None
    if all(label in particles.columns for label in COORDINATE_LABELS):
        numbers = [particles[label] for label in COORDINATE_LABELS]
        if all(column.dtype.kind in "iuf" and np.isfinite(column.to_numpy()).all() for column in numbers):
            shapes = micrograph_shapes(names, base)
            coordinates = tuple(numbers) if shapes is not None else None
    return StarLocations(codes=codes, paths=paths, shapes=shapes, coordinates=coordinates)


# --- the way back: a .cs's location/* as RELION's columns ------------------------------------------

#: The ``location/*`` fields the star's coordinates are computed from.
FRACTION_FIELDS = ("location/center_x_frac", "location/center_y_frac", "location/micrograph_shape")


def micrograph_base(names, roots: list[Path], project: Path | None) -> Path | None:
    """The folder a .cs's relative ``location/micrograph_path`` values start from, or None where unknown.

    cryoSPARC stores them relative to its project folder (``J3/motioncorrected/...``,
    formats.md §1.2), as ``blob/path``: the first of ``roots`` (``paths.cs_roots``:
    ``--cs-root``, else the project folder above the .cs, the .cs folder and its
    parents) holding the first relative micrograph; where none does (the
    micrographs are not on this machine), ``project`` (``--cs-root``, or the
    project folder above the .cs) when known; else None. Where every name is
    absolute, the current folder (any would do).
    """
    relative = next((name for name in names if not os.path.isabs(name)), None)
    if relative is None:  # all absolute (a .cs dsub wrote outside any cryoSPARC project): any folder serves
        return Path(os.getcwd())
    return next((root for root in roots if (root / relative).is_file()), project)


def relion_micrograph_names(names, base: Path | None) -> list[str]:
    """``rlnMicrographName`` for each of ``names`` (a .cs's ``location/micrograph_path``, one leading ``>`` of an
    exported group already stripped) starting from ``base`` (``micrograph_base``).

    As RELION opens names from the folder it runs in (its project folder, the
    current folder), as the star's ``rlnImageName`` are written by default
    (``paths.written_paths``, ``auto``): relative to the current folder where
    the micrograph lies inside it, else absolute. Without a ``base`` the names
    are written as stored, as pyem's ``csparc2star`` writes them.
    """
    if base is None:
        return [str(name) for name in names]
    here = os.getcwd()
    written = []
    for name in names:
        absolute = os.path.normpath(os.path.join(base, name))
        written.append(os.path.relpath(absolute, here) if is_inside(absolute, here) else absolute)
    return written


def cs_star_columns(table) -> dict:
    """RELION's location columns for a .cs input's particles ({label: (n,) values}); empty without ``location/*``.

    ``table``: a ``ParticleTable`` read from a .cs (its ``source`` row for row
    with its particles; ``extra["location_roots"]``: (``paths.cs_roots``, the
    project folder or None), set by the reader). As pyem's ``csparc2star``
    converts them with its defaults (``--swapxy`` and ``--inverty``:
    ``pyem/metadata/cryosparc2.py``, ``cryosparc_2_cs_particle_locations``, and
    ``pyem/cli/csparc2star.py`` at commit de18347)::

        rlnMicrographName = location/micrograph_path
        rlnCoordinateX = round(center_x_frac · nx)
        rlnCoordinateY = round((1 − center_y_frac) · ny)     ([ny, nx] = location/micrograph_shape)

    in pixels of the micrograph, y counted from the other edge (cryoSPARC's
    origin is the bottom left, RELION's the top left), rounded to whole pixels
    as pyem does; the name rebased from the cryoSPARC project folder to RELION's
    (``micrograph_base``, ``relion_micrograph_names``). The inverse of
    ``StarLocations``, so a star's integer coordinates and names come back
    through a .cs unchanged. ``rlnMicrographName`` is a categorical (each
    micrograph's name once); the coordinates are float64 and written only where
    the .cs holds all of ``FRACTION_FIELDS``. ``location/micrograph_uid`` (a
    cryoSPARC exposure's uid) has no RELION label and is left out, as pyem does.
    """
    import pandas as pd

    source = table.source
    if table.source_format != "cs" or source is None:
        return {}
    names = source.dtype.names
    columns = {}
    if "location/micrograph_path" in names:
        raw = np.asarray(source["location/micrograph_path"])
        stored, codes = np.unique(raw, return_inverse=True)  # decoded once per micrograph, not per row
        texts = [value.decode() if isinstance(value, bytes) else str(value) for value in stored]
        texts = [text[1:] if text.startswith(">") else text for text in texts]  # an exported group's (pyem does too)
        roots, project = table.extra.get("location_roots", ([], None))
        written = relion_micrograph_names(texts, micrograph_base(texts, roots, project))
        categories, renumber = np.unique(np.asarray(written, dtype=object), return_inverse=True)
        columns[NAME_LABEL] = pd.Categorical.from_codes(
            renumber.reshape(-1)[codes.reshape(-1)].astype(np.int32), categories=list(categories))
    if all(field in names for field in FRACTION_FIELDS):
        shape = np.asarray(source["location/micrograph_shape"]).reshape(len(source), 2).astype(np.float64)  # [ny, nx]
        x = np.asarray(source["location/center_x_frac"], dtype=np.float64)
        y = np.asarray(source["location/center_y_frac"], dtype=np.float64)
        columns[COORDINATE_LABELS[0]] = np.round(x * shape[:, 1])
        columns[COORDINATE_LABELS[1]] = np.round((1.0 - y) * shape[:, 0])
    return columns
