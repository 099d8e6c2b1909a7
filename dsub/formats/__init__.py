"""Particle metadata and image formats: RELION .star, cryoSPARC .cs, MRC.

``read_particles`` picks the reader from the file's content (a numpy or
CSDAT magic number means .cs) and, for text, its extension.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from dsub.errors import InputFileError, MissingInputError, OptionError
from dsub.particles import ParticleTable

_ACCEPTED = (
    "dsub reads RELION 3.0/3.1+ particle .star files and cryoSPARC particle .cs files "
    "(numpy format, e.g. J24_005_particles.cs)."
)


def read_particles(
    path: str | os.PathLike, cs_root=None, *, require_ctf: bool = True, passthrough=()
) -> ParticleTable:
    """Read a RELION .star or cryoSPARC .cs particle file into a ``ParticleTable``.

    ``cs_root`` is the cryoSPARC project folder: relative ``blob/path`` values
    of a .cs start from it (default: found above the .cs), and for any input it
    is recorded as ``extra["project_folder"]``, the folder the output .cs's
    ``blob/path`` are written relative to. ``passthrough``: further .cs files
    joined on ``uid`` (a .cs input only; ``OptionError`` for a star).
    ``require_ctf=False`` accepts particles without CTF parameters (simulated
    projections) and gives them a CTF of 1.
    """
    # The readers (pandas, SciPy) are loaded here, not with the package: the workers read stacks only.
    from dsub.formats import cs, star
    from dsub.formats.star_reader import return_free_memory

    path = Path(path)
    if path.is_dir():
        raise InputFileError(path, "is a folder, not a particle file.", _ACCEPTED)
    if not path.is_file():
        raise MissingInputError(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((cs.MAGIC_NUMPY, cs.MAGIC_CSDAT)) or path.suffix.lower() == ".cs":
        return cs.read_particles(path, cs_root, require_ctf=require_ctf, passthrough=passthrough)
    if path.suffix.lower() == ".star" or b"data_" in head:
        if passthrough:
            raise OptionError(f"--passthrough joins cryoSPARC .cs files, but {path} is a RELION star file, which holds "
                              "every column already: leave --passthrough out")
        table = star.read_particles(path, require_ctf=require_ctf)
        return_free_memory()  # what parsing millions of rows freed: back to the system
        if cs_root is not None:
            table.extra["project_folder"] = Path(os.path.abspath(cs_root))
        return table
    raise InputFileError(path, "is neither a RELION .star nor a cryoSPARC .cs file.", _ACCEPTED)


def select_rows(table: ParticleTable, keep) -> ParticleTable:
    """The particles where ``keep`` is true, with their rows of the raw metadata, for the writers."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape == (len(table),) and keep.all():  # all of them: no copy of millions of rows
        return table
    chosen = table.subset(np.flatnonzero(keep))
    source = table.source
    if table.source_format == "star" and source is not None:
        source = {**source, "particles": source["particles"].reset_index(drop=True)[keep].reset_index(drop=True)}
    elif table.source_format == "cs" and source is not None:
        source = source[keep]
    return dataclasses.replace(chosen, source=source)
