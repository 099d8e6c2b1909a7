"""Stack paths inside particle metadata: where they are read from and how they are written.

Reading. RELION opens every image name relative to the folder it runs in, its
project folder (``relion_refine`` and the GUI run there), while the star file
usually sits one or two folders down (``Refine3D/job012/run_data.star``).
cryoSPARC's ``blob/path`` is relative to its project folder (``J19/extract/...``),
the folder that holds ``project.json`` and the ``J<n>`` job folders (each with
a ``job.json``). dsub tries, for a star file: the current folder, then the star
file's folder, its parent and grandparent; for a ``.cs``: ``--cs-root``, else the
project folder above the ``.cs`` when there is one, else the ``.cs`` folder, its
parent and grandparent. The first folder in which a referenced stack exists wins.

Writing (``--paths``, see ``written_paths``): ``auto`` writes what each program
opens from its project folder -- ``rlnImageName`` relative to RELION's project
folder when OUTDIR lies inside it (as RELION's own jobs write
``Subtract/job011/...``), else absolute; that folder is the one a star input's
relative names were found from (``resolve_stack_names``), so that the new and
the original names start from one folder, else the current folder
(``workflow.export.star_names_base``); ``.cs``
``blob/path`` relative to the cryoSPARC project folder when there is one and
OUTDIR lies inside it, else absolute. That folder is ``--cs-root``, else the
project above OUTDIR (``pipeline.project_of_outdir``), else the input .cs's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

#: ``--paths`` choices (see ``written_paths``).
PATH_MODES = ("auto", "relative", "absolute", "outdir")
_JOB_FOLDER = re.compile(r"J\d+")


#: Rows ``path_codes`` hands pandas at once: ``pd.factorize`` sizes its hash table by the rows it is
#: given (66 bytes a row measured), not by the few distinct stacks, so one call over a 10 M-row table
#: took 0.66 GB of the coordinator's peak.
PATH_CODE_ROWS = 1 << 18


def path_codes(paths) -> tuple[np.ndarray, list]:
    """Integer codes of ``paths`` ((n,) str or object): (codes int32 (n,), the distinct paths).

    The distinct paths come in order of first appearance and ``codes[i]`` is
    the position of ``paths[i]`` among them, as ``pd.factorize`` gives them
    (a missing value is one path too); hashed a block of rows at a time.
    """
    import pandas as pd

    paths = np.asarray(paths, dtype=object)
    codes = np.empty(paths.shape[0], dtype=np.int32)
    position: dict = {}
    for start in range(0, paths.shape[0], PATH_CODE_ROWS):
        piece_codes, piece_paths = pd.factorize(paths[start : start + PATH_CODE_ROWS], use_na_sentinel=False)
        mapping = np.asarray([position.setdefault(path, len(position)) for path in piece_paths], dtype=np.int32)
        codes[start : start + PATH_CODE_ROWS] = mapping[piece_codes]
    return codes, list(position)


def cryosparc_project_folder(metadata_path) -> Path | None:
    """The cryoSPARC project folder above ``metadata_path``, or None.

    The nearest folder holding ``project.json``; else the parent of the nearest
    job folder (``J<n>`` holding ``job.json``), which is where cryoSPARC keeps
    its jobs.
    """
    folder = Path(os.path.abspath(metadata_path)).parent
    above = (folder, *folder.parents)
    for candidate in above:
        if (candidate / "project.json").is_file():
            return candidate
    for candidate in above:
        if _JOB_FOLDER.fullmatch(candidate.name) and (candidate / "job.json").is_file():
            return candidate.parent
    return None


def star_roots(star_path) -> list[Path]:
    """Folders a star file's relative image names may start from, RELION's own rule (current folder) first."""
    folder = Path(os.path.abspath(star_path)).parent
    return [Path(os.getcwd()), folder, folder.parent, folder.parent.parent]


def cs_roots(cs_path, cs_root=None) -> list[Path]:
    """Folders a ``.cs``'s relative ``blob/path`` may start from, most likely first."""
    if cs_root is not None:
        return [Path(os.path.abspath(cs_root))]
    folder = Path(os.path.abspath(cs_path)).parent
    project = cryosparc_project_folder(cs_path)
    return ([project] if project is not None else []) + [folder, folder.parent, folder.parent.parent]


def resolve_stack_names(names, roots: list[Path], fallback: Path) -> tuple[np.ndarray, Path]:
    """Absolute, normalised paths for ``names`` (str) and the folder they were resolved against.

    The first of ``roots`` in which a relative stack of ``names`` exists is
    used for all of them; when none holds one, ``fallback`` (so that the
    missing-file error names the place a user expects). Each distinct name is
    resolved once.
    """
    names = np.asarray(names, dtype=object)
    if names.size == 0:
        return np.empty(0, dtype=object), fallback
    uniques, inverse = np.unique(names.astype(str), return_inverse=True)
    probes = [str(names[0])] + [u for u in uniques if u != names[0]][:20]
    probe = next((p for p in probes if not os.path.isabs(p)), None)
    chosen = next((r for r in roots if probe is not None and (r / probe).is_file()), fallback)
    resolved = np.array([os.path.normpath(os.path.join(chosen, u)) for u in uniques], dtype=object)
    return resolved[inverse.reshape(-1)], chosen


def is_inside(path, folder) -> bool:
    """Whether ``path`` lies inside ``folder`` (or is it), comparing absolute normalised paths."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def written_paths(relative_to_outdir, outdir, mode: str, base) -> np.ndarray:
    """Stack paths as they go into the output metadata.

    ``relative_to_outdir``: paths relative to OUTDIR (str). ``base``: the folder
    the reading program starts from (RELION's project folder for a star,
    ``workflow.export.star_names_base``; the cryoSPARC project folder for a
    ``.cs``; None when unknown). ``mode``:
    ``auto`` (relative to ``base`` when OUTDIR lies inside it, else absolute),
    ``relative`` (relative to ``base``, with ``..`` where needed; the current
    folder when ``base`` is None), ``absolute``, or ``outdir`` (relative to
    OUTDIR, for moving OUTDIR as a whole).
    """
    if mode not in PATH_MODES:
        raise ValueError(f"paths mode must be one of {PATH_MODES}, not {mode!r}")
    names = np.asarray(relative_to_outdir, dtype=object)
    if mode == "outdir":
        return names
    outdir = os.path.abspath(outdir)
    uniques, inverse = np.unique(names.astype(str), return_inverse=True)
    absolute = [os.path.normpath(os.path.join(outdir, u)) for u in uniques]
    start = written_base(outdir, mode, base)
    written = absolute if start is None else [os.path.relpath(p, start) for p in absolute]
    return np.array(written, dtype=object)[inverse.reshape(-1)]


def written_base(outdir, mode: str, base) -> str | None:
    """The folder ``written_paths`` writes paths relative to, absolute; None where they are absolute (or,
    with ``mode`` "outdir", relative to OUTDIR itself)."""
    if mode == "relative":
        return os.path.abspath(base if base is not None else os.getcwd())
    if mode == "auto" and base is not None and is_inside(os.path.abspath(outdir), base):
        return os.path.abspath(base)
    return None


class StackRefs:
    """Each particle's image as (stack path, 0-based index), with the stack paths held as a category.

    ``paths``: the k distinct stack paths (str); ``codes``: (n,) index of each
    particle's path into them; ``indices``: (n,) 0-based image index in its stack.
    The writers build ``N@path`` names (1-based, six digits, as RELION writes
    them) and ``blob/path`` bytes a block of rows at a time, so millions of
    particles never become millions of Python strings at once.
    """

    def __init__(self, paths, codes, indices):
        self.paths = np.asarray(paths, dtype=object)
        self.codes = np.asarray(codes).reshape(-1)  # any integer type: int32 halves ten million of them
        self.indices = np.asarray(indices).reshape(-1)
        if self.codes.dtype.kind not in "iu" or self.indices.dtype.kind not in "iu":
            raise ValueError(f"stack codes and image indices must be integers, not {self.codes.dtype}, "
                             f"{self.indices.dtype}")
        if self.codes.shape != self.indices.shape:
            raise ValueError(f"{self.codes.size} path codes but {self.indices.size} image indices")

    @classmethod
    def from_paths(cls, paths, indices) -> "StackRefs":
        """From a path for every particle ((n,) str or object array)."""
        codes, uniques = path_codes(paths)
        return cls([str(path) for path in uniques], codes, np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.codes.size)

    def select(self, rows) -> "StackRefs":
        """The particles ``rows`` (a boolean mask or indices)."""
        return StackRefs(self.paths, self.codes[rows], self.indices[rows])

    def with_paths(self, paths) -> "StackRefs":
        """The same particles with each distinct path replaced by ``paths`` (same order)."""
        return StackRefs(paths, self.codes, self.indices)

    def names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``N@path`` of rows ``start:stop`` as an object array of str."""
        paths = self.paths[self.codes[start:stop]].tolist()
        indices = self.indices[start:stop].tolist()
        return np.array([f"{index + 1:06d}@{path}" for index, path in zip(indices, paths)], dtype=object)

    def path_width(self) -> int:
        """Bytes of the longest stack path any particle has (at least 1)."""
        used = np.unique(self.codes)
        return max([len(os.fspath(self.paths[code]).encode()) for code in used] + [1])

    def path_bytes(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stack path of rows ``start:stop`` as bytes (``S<path_width()>``)."""
        encoded = np.array([os.fspath(path).encode() for path in self.paths] + [b""],
                           dtype=f"S{self.path_width()}")
        return encoded[self.codes[start:stop]]
