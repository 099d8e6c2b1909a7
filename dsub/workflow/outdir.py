"""The output folder: what identifies a run, and whether OUTDIR may be used or resumed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import DiskFullError, DsubError, InputFileError, OptionError, OutputExistsError
from . import export, store


def file_identity(path) -> dict:
    """What identifies an input file's content cheaply: absolute path, size, modification time."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_fingerprint(identity: dict) -> str:
    """A short hash of a run's inputs and parameters; equal fingerprints mean a run can resume."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prepare_outdir(outdir: Path, fingerprint: str, overwrite: bool) -> bool:
    """Make the output folder ready; True if an identical earlier run's store can be resumed."""
    store_path = outdir / store.STORE_NAME
    if store_path.exists():
        try:
            previous = store.open_store(store_path).attrs.get("run", {}).get("fingerprint")
        except Exception:  # an unreadable store is as good as none
            previous = None
        if previous == fingerprint and not overwrite:
            return True
        if not overwrite:
            raise OutputExistsError(
                f"{outdir}: holds the results of a different run (other inputs or parameters). "
                "Choose another output folder, or add --overwrite to replace them."
            )
        shutil.rmtree(store_path)
    elif not overwrite:
        if any((outdir / name).exists() for name in (export.STAR_NAME, export.CS_NAME, export.STACK_FOLDER)):
            raise OutputExistsError(
                f"{outdir}: holds dsub outputs without their store. Choose another output folder, "
                "or add --overwrite to replace them."
            )
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"{outdir}: cannot create the output folder ({exc.strerror}). "
                          "Choose a folder you can write to with -o.") from exc
    if not os.access(outdir, os.W_OK):
        raise OptionError(f"{outdir}: the output folder is not writable. Choose a folder you can write to with -o.")
    return False


def explain_os_error(exc: OSError, outdir: Path) -> DsubError | None:
    """The one clear message for an OS error that the user can fix, or None for any other.

    A full disk or quota, and a file or folder dsub may not read or write, wherever
    they happen: checking the inputs, in a task, or during the export.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(exc, outdir)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return access_denied(exc, outdir)
    return None


def disk_full(exc: OSError, outdir: Path) -> DiskFullError:
    """A full disk (or quota) while writing: what to do, and that finished chunks are kept."""
    where = exc.filename or outdir
    what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return DiskFullError(
        f"{where}: {what} while writing the results. Free space and rerun the same command: finished "
        "chunks are kept (or choose another -o and start afresh)."
    )


def access_denied(exc: OSError, outdir: Path) -> DsubError:
    """A permission error: in OUTDIR (or on its way) the folder to fix, elsewhere the file to make readable."""
    where = Path(exc.filename) if exc.filename else outdir
    target, folder = Path(os.path.abspath(where)), Path(os.path.abspath(outdir))
    if exc.errno == errno.EROFS or target.is_relative_to(folder) or folder.is_relative_to(target):
        return OptionError(
            f"{where}: cannot write there ({exc.strerror}). Make the output folder writable and rerun the "
            "same command (finished chunks are kept), or choose another folder with -o."
        )
    return InputFileError(where, f"cannot be opened ({exc.strerror}).",
                          "Check its permissions, and those of the folders above it, for your user.")
