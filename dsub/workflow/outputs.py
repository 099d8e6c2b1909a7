"""The names of what a run writes in OUTDIR, and whether OUTDIR holds a command's finished run.

Light on purpose (the standard library only): the command line asks it, where an
input is gone, without importing the run's modules; the run asks it before it
starts a local cluster, so the rerun of a finished command starts no worker
(README: "they start no worker").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

STACK_FOLDER = "Particles"
STAR_NAME = "particles_subtracted.star"
CS_NAME = "particles_subtracted.cs"
SKIPPED_NAME = "skipped_particles.star"
#: The run summary, written last once the export completed.
RUN_SUMMARY = "dsub_run.json"


def is_stack_name(name: str) -> bool:
    """Whether ``name`` is one dsub gives its stacks: ``subtracted_NNNN.mrcs``, or with ``.partial``."""
    return re.fullmatch(r"subtracted_\d{4,}\.mrcs(\.partial)?", name) is not None


def holds_finished_run(outdir: Path, command: str) -> bool:
    """Whether OUTDIR holds ``command``'s finished run, seen without its inputs: ``RUN_SUMMARY`` records
    ``command`` run in this working directory, and the star, the .cs and stacks in ``STACK_FOLDER`` are there.
    Their sizes are not checked against the run's layout, which needs the particles: the run does that."""
    outdir = Path(outdir)
    try:
        summary = json.loads((outdir / RUN_SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("command") != command \
            or summary.get("working_directory") != os.getcwd():
        return False
    folder = outdir / STACK_FOLDER
    try:
        return all((outdir / name).is_file() for name in (STAR_NAME, CS_NAME)) and folder.is_dir() and any(
            is_stack_name(path.name) for path in folder.iterdir())
    except OSError:
        return False


def finished_without_input(outdir: Path, command: str) -> str | None:
    """What to say when an input of ``command`` is gone but OUTDIR holds that very command's finished run
    (``holds_finished_run``: a chained run whose input folder was deleted since); else None."""
    if not holds_finished_run(outdir, command):
        return None
    return (f"{outdir} holds the finished results of this same command ({STAR_NAME}, {CS_NAME}, "
            f"{STACK_FOLDER}/, {RUN_SUMMARY}); nothing to do. The inputs are needed only to compute it again "
            "(--overwrite) or to check the results against them.")
