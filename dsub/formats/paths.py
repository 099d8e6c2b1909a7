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
opens from its project folder -- ``rlnImageName`` relative to the current
folder when OUTDIR lies inside it (as RELION's own jobs write
``Subtract/job011/...`` when run from the project folder), else absolute; ``.cs``
``blob/path`` relative to the cryoSPARC project folder when there is one and
OUTDIR lies inside it, else absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

#: ``--paths`` choices (see ``written_paths``).
PATH_MODES = ("auto", "relative", "absolute", "outdir")
_JOB_FOLDER = re.compile(r"J\d+")


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
    the reading program starts from (the current folder for RELION, the
    cryoSPARC project folder for a ``.cs``; None when unknown). ``mode``:
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
    if mode == "relative":
        start = os.path.abspath(base if base is not None else os.getcwd())
        written = [os.path.relpath(p, start) for p in absolute]
    elif mode == "auto" and base is not None and is_inside(outdir, base):
        written = [os.path.relpath(p, os.path.abspath(base)) for p in absolute]
    else:
        written = absolute
    return np.array(written, dtype=object)[inverse.reshape(-1)]
