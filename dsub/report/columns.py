"""What the report needs of the particle table, one row per input particle, and where it is kept.

The report shows counts over every particle (half sets, optics groups) and a
few particles in detail (their defocus, images and names). ``ReportColumns``
holds exactly that: three small per-particle arrays and each particle's image
in the input and in the exported stacks, as a code into a short list of stack
paths plus an index, so that names are made only for the rows shown.

``from_table`` builds them from the run's ``ParticleTable`` while the chunks run;
``write`` keeps them in the store (``OUTDIR/subtracted.zarr/report_columns/``, one
``.npy`` per array and ``columns.json``: about 26 bytes per particle), so that
``dsub report OUTDIR`` later reads them instead of the exported star file.
``from_star`` reads them from the star of a run whose store has none (written
by an earlier version): slow for millions of rows, as it parses the whole file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats import star as star_format
from ..formats.paths import cs_roots, resolve_stack_names, star_roots
from ..workflow import export

FOLDER = "report_columns"
_DESCRIPTION = "columns.json"
#: Per-particle arrays, saved as ``<name>.npy``, and their dtypes.
ARRAYS = {"half_set": np.int8, "optics_group": np.int32, "defocus_angstrom": np.float32,
          "input_codes": np.int32, "input_indices": np.int32, "result_codes": np.int32, "result_indices": np.int32}


@dataclass
class ReportColumns:
    """Per input particle (n rows): half set, optics group, defocus, input and exported image.

    ``half_set``: int8 (n,), RELION's rlnRandomSubset (1, 2; 0 unknown, and for
    rows the fallback from the star cannot see: skipped particles);
    ``optics_group``: int32 (n,), 1-based; ``defocus_angstrom``: float32 (n,),
    mean of defocus U and V in Å. ``optics``: one dict per group (``group``,
    ``name``, ``pixel_size_angstrom``, ``voltage_kv``). ``images``: where each
    particle's images are (``StoredImages`` or ``StarImages``).
    """

    half_set: np.ndarray
    optics_group: np.ndarray
    defocus_angstrom: np.ndarray
    optics: list
    pixel_size_angstrom: float
    images: "StoredImages | StarImages"
    fingerprint: str | None = None  # the store's run fingerprint when written

    def __len__(self) -> int:
        return self.half_set.shape[0]

    @classmethod
    def from_table(cls, table, outdir, particles_per_stack: int, fingerprint: str | None = None) -> "ReportColumns":
        """From the run's ``ParticleTable``; the exported stacks in ``outdir`` as ``export.new_stack_refs`` lays them out."""
        count = len(table)
        input_codes, input_paths = table.image_path_codes()
        first = np.unique(input_codes, return_index=True)[1] if count else np.zeros(0, dtype=np.int64)
        result = export.new_stack_refs(count, particles_per_stack, table.pixel_size_angstrom)
        images = StoredImages(
            input_paths=[os.path.abspath(str(path)) for path in input_paths],
            input_names=given_stack_names(table, first, input_paths),
            input_codes=input_codes, input_indices=np.asarray(table.image_indices, dtype=np.int32),
            result_paths=[str(path) for path in result.paths], result_codes=result.codes,
            result_indices=result.indices, outdir=str(outdir),
        )
        return cls(
            half_set=np.asarray(table.half_set, dtype=np.int8),
            optics_group=np.asarray(table.optics_group, dtype=np.int32),
            defocus_angstrom=((np.asarray(table.defocus_u_angstrom, np.float32)
                               + np.asarray(table.defocus_v_angstrom, np.float32)) / 2),
            optics=optics_of(table), pixel_size_angstrom=float(table.pixel_size_angstrom[0]) if count else 0.0,
            images=images, fingerprint=fingerprint,
        )

    def write(self, folder: str | os.PathLike) -> Path:
        """Save into ``folder`` (replacing it): written as ``folder.partial`` and renamed, so a folder is whole."""
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        images = self.images
        arrays = {"half_set": self.half_set, "optics_group": self.optics_group,
                  "defocus_angstrom": self.defocus_angstrom, "input_codes": images.input_codes,
                  "input_indices": images.input_indices, "result_codes": images.result_codes,
                  "result_indices": images.result_indices}
        for name, dtype in ARRAYS.items():
            np.save(partial / f"{name}.npy", np.ascontiguousarray(arrays[name], dtype=dtype), allow_pickle=False)
        description = {"count": len(self), "fingerprint": self.fingerprint, "optics": self.optics,
                       "pixel_size_angstrom": self.pixel_size_angstrom, "input_paths": images.input_paths,
                       "input_names": images.input_names, "result_paths": images.result_paths}
        (partial / _DESCRIPTION).write_text(json.dumps(description))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return folder

    @classmethod
    def read(cls, folder: str | os.PathLike, outdir: Path) -> "ReportColumns":
        """Read what ``write`` saved (memory-mapped: pages are read as rows are used).

        Raises ``FileNotFoundError`` when there is nothing (complete) in ``folder``.
        """
        folder = Path(folder)
        description = json.loads((folder / _DESCRIPTION).read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        images = StoredImages(
            input_paths=description["input_paths"], input_names=description["input_names"],
            input_codes=arrays["input_codes"], input_indices=arrays["input_indices"],
            result_paths=description["result_paths"], result_codes=arrays["result_codes"],
            result_indices=arrays["result_indices"], outdir=str(outdir),
        )
        return cls(half_set=arrays["half_set"], optics_group=arrays["optics_group"],
                   defocus_angstrom=arrays["defocus_angstrom"], optics=description["optics"],
                   pixel_size_angstrom=float(description["pixel_size_angstrom"]), images=images,
                   fingerprint=description["fingerprint"])

    @classmethod
    def from_star(cls, outdir: Path, exported_rows: np.ndarray, count: int, particles_path: str | None):
        """From OUTDIR's exported star (every row parsed), for a run whose store holds no columns.

        ``exported_rows``: the input row of each star row (the store's
        ``skipped`` left out); ``count``: the input's rows. Raises ``ValueError``
        when the star and the store disagree on how many particles were exported.
        """
        table = star_format.read_particles(outdir / export.STAR_NAME, require_ctf=False)
        if len(table) != exported_rows.size:
            raise ValueError(f"lists {len(table)} particles but the store holds {exported_rows.size} exported ones")

        def spread(values, dtype):
            full = np.zeros(count, dtype=dtype)
            full[exported_rows] = values
            return full

        defocus = (np.asarray(table.defocus_u_angstrom) + np.asarray(table.defocus_v_angstrom)) / 2
        images = StarImages(outdir, exported_rows, table, particles_path)
        return cls(half_set=spread(table.half_set, np.int8), optics_group=spread(table.optics_group, np.int32),
                   defocus_angstrom=spread(defocus, np.float32), optics=optics_of(table),
                   pixel_size_angstrom=float(table.pixel_size_angstrom[0]) if len(table) else 0.0, images=images)


def optics_of(table) -> list[dict]:
    """Each optics group's number, name (the input's ``rlnOpticsGroupName``, else opticsGroupN), pixel size, voltage."""
    optics = table.source.get("optics") if isinstance(table.source, dict) else None
    names = {}
    if optics is not None and "rlnOpticsGroupName" in optics.columns:
        names = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnOpticsGroupName"].astype(str)))
    groups, first = np.unique(np.asarray(table.optics_group), return_index=True)
    return [{"group": int(group), "name": names.get(int(group), f"opticsGroup{group}"),
             "pixel_size_angstrom": float(table.pixel_size_angstrom[row]), "voltage_kv": float(table.voltage_kv[row])}
            for group, row in zip(groups, first)]


def given_stack_names(table, first_rows: np.ndarray, resolved_paths) -> list[str]:
    """Each input stack as the input named it (the part after ``@`` of a star's ``rlnImageName``), else resolved."""
    source = table.source
    names = [str(path) for path in resolved_paths]
    if table.source_format == "star" and isinstance(source, dict) and "rlnImageName" in source.get("particles", {}):
        column = source["particles"]["rlnImageName"]
        if len(column) == len(table):
            names = [str(name).partition("@")[2] or str(name) for name in column.iloc[first_rows]]
    return names


def image_name(index: int, stack: str) -> str:
    """RELION's ``N@stack`` for the 0-based ``index``."""
    return f"{int(index) + 1:06d}@{stack}"


@dataclass
class StoredImages:
    """Each particle's input and exported image as (code into a list of stack paths, 0-based index).

    ``input_paths`` are absolute as resolved when the run read them;
    ``input_names`` the same stacks as the input named them (for display);
    ``result_paths`` the exported stacks, relative to ``outdir`` (a run copied
    elsewhere finds them).
    """

    input_paths: list
    input_names: list
    input_codes: np.ndarray
    input_indices: np.ndarray
    result_paths: list
    result_codes: np.ndarray
    result_indices: np.ndarray
    outdir: str

    def inputs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack paths (object) and 0-based indices of the input images of ``rows`` (input rows)."""
        return np.asarray(self.input_paths, dtype=object)[self.input_codes[rows]], np.asarray(self.input_indices[rows])

    def results(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack paths (object) and 0-based indices of the exported images of ``rows``."""
        paths = np.asarray([os.path.join(self.outdir, path) for path in self.result_paths], dtype=object)
        return paths[self.result_codes[rows]], np.asarray(self.result_indices[rows])

    def names(self, rows) -> list[str]:
        """``N@stack`` of the input image of each of ``rows``, as the input named the stack."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return [image_name(index, self.input_names[code])
                for code, index in zip(self.input_codes[rows], self.input_indices[rows])]


class StarImages:
    """Each particle's images as the exported star names them (``rlnImageName``, ``rlnImageOriginalName``).

    The star's names are strings; each is split and resolved only for the rows
    asked for. Input names are resolved as dsub resolved them when it ran:
    from the current folder, then the input particle file's folder and its
    parents (``formats.paths``).
    """

    def __init__(self, outdir: Path, exported_rows: np.ndarray, table, particles_path: str | None):
        self.outdir, self.exported_rows, self.table = outdir, exported_rows, table
        self.particles_path = particles_path

    def _star_rows(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        star_rows = np.searchsorted(self.exported_rows, rows)
        if np.any(star_rows >= self.exported_rows.size) or np.any(self.exported_rows[star_rows] != rows):
            raise KeyError("a particle left out of the star (skipped) has no images there")
        return star_rows

    def _original(self, rows):
        return self.table.source["particles"]["rlnImageOriginalName"].iloc[self._star_rows(rows)].astype(str)

    def inputs(self, rows):
        parts = self._original(rows).str.split("@", n=1, expand=True)
        indices = parts[0].astype(np.int64).to_numpy() - 1
        anchor = Path(self.particles_path) if self.particles_path else self.outdir / export.STAR_NAME
        roots = cs_roots(anchor) if anchor.suffix == ".cs" else star_roots(anchor)
        paths, _ = resolve_stack_names(parts[1].to_numpy(dtype=object), roots, anchor.parent)
        return linked_originals(self.outdir, paths), indices

    def results(self, rows):
        star_rows = self._star_rows(rows)
        return exported_stacks(self.outdir, self.table.image_paths[star_rows]), self.table.image_indices[star_rows]

    def names(self, rows) -> list[str]:
        return list(self._original(rows))


def linked_originals(outdir: Path, paths) -> np.ndarray:
    """Input stacks named through ``OUTDIR/Originals`` (``export.original_stack_links``), as they lie in
    ``outdir`` now: a name written relative to the folder the run ran in is looked for there when it is not
    found from here."""
    paths = np.asarray(paths, dtype=object)
    marker = f"{export.ORIGINALS_FOLDER}/"
    found = {}
    for path in np.unique(paths.astype(str)):
        local = outdir / export.ORIGINALS_FOLDER / path.rsplit(marker, 1)[-1] if marker in path else None
        found[path] = str(local) if local is not None and not Path(path).exists() and local.exists() else path
    return np.array([found[str(path)] for path in paths], dtype=object)


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
