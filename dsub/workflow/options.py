"""Checks of a run's options that read no input: made before any file is read or a local cluster starts.

``RunOptions`` checks its values with ``check_run_options`` as it is made, and
the run checks its output folder with ``check_writable`` before it reads
anything or starts a local cluster. Light on purpose (the standard library only),
so that either can be called before the run's own modules are imported.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import OptionError
from ..formats.paths import PATH_MODES

#: Where the physics may run (``--device``).
DEVICES = ("auto", "cpu", "gpu")


def check_run_options(chunk_size: int | None = None, particles_per_stack: int | None = None, paths: str = "auto",
                      resolution_angstrom: float | None = None, device: str = "auto", recenter: bool = False,
                      center_voxels: tuple | None = None, new_box: int | None = None) -> None:
    """Refuse option values no run can use, each with its option's name (``OptionError``)."""
    if chunk_size is not None and chunk_size < 1:
        raise OptionError(f"--chunk-size must be at least 1, not {chunk_size}")
    if particles_per_stack is not None and particles_per_stack < 1:
        raise OptionError(f"--particles-per-stack must be at least 1, not {particles_per_stack}")
    if paths not in PATH_MODES:
        raise OptionError(f"--paths must be one of {', '.join(PATH_MODES)}, not {paths!r}")
    if resolution_angstrom is not None and not resolution_angstrom > 0:
        raise OptionError(f"--resolution must be a resolution in Å above 0, not {resolution_angstrom:g}")
    if device not in DEVICES:
        raise OptionError(f"--device must be auto, cpu or gpu, not {device!r}")
    if recenter and center_voxels is not None:
        raise OptionError("--recenter and --center both choose the new centre: give only one")
    check_new_box(new_box)


def check_new_box(new_box: int | None) -> None:
    """``--new-box``: a positive even number of pixels, else ``OptionError``.

    ``relion_particle_subtract`` silently makes an odd ``--new_box`` even
    (``boxsize -= boxsize % 2``); dsub says so instead of changing the box.
    """
    if new_box is None:
        return
    if new_box < 2:
        raise OptionError(f"--new-box must be a positive even number of pixels, not {new_box}")
    if new_box % 2:
        raise OptionError(
            f"--new-box {new_box} is odd; RELION and cryoSPARC work with even boxes: use {new_box - 1} "
            f"or {new_box + 1}"
        )


def check_writable(outdir: Path) -> None:
    """Refuse, before any long work, an output folder that cannot be made or written (``OptionError``).

    Makes the missing folders and a probe file as the run would, then removes
    what it made: a run that stops later at a bad input leaves nothing behind.
    """
    outdir = Path(outdir)
    made: list[Path] = []
    try:
        for path in reversed([path for path in (outdir, *outdir.parents) if not path.exists()]):
            path.mkdir()
            made.append(path)
        fd, probe = tempfile.mkstemp(dir=outdir, prefix=".dsub-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OptionError(cannot_create(outdir, exc)) from exc
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


def cannot_create(outdir: Path, exc: OSError) -> str:
    """Why the output folder cannot be made: a file in its place, or the system's reason."""
    blocking = next((path for path in (outdir, *outdir.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        return (f"{outdir}: cannot create the output folder: {blocking} is a file, not a folder. "
                "Give -o a folder (new or existing).")
    if outdir.is_dir():  # it exists: writing in it is what fails
        return (f"{outdir}: cannot write in the output folder ({exc.strerror}). "
                "Choose a folder you can write to with -o.")
    return f"{outdir}: cannot create the output folder ({exc.strerror}). Choose a folder you can write to with -o."
