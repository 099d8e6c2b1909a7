"""The output folder: what identifies a run, and whether OUTDIR may be used or resumed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import DiskFullError, OptionError, OutputExistsError
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


def disk_full(exc: OSError, outdir: Path) -> DiskFullError | None:
    """The one message for a full disk while writing, or None for other OS errors."""
    if exc.errno != errno.ENOSPC:
        return None
    where = exc.filename or outdir
    return DiskFullError(
        f"{where}: no space left on device while writing the results. Free space (or choose another -o) and "
        "rerun the same command: finished chunks are kept."
    )


