"""Files written whole or not at all: written to a hidden temporary name beside the target, then renamed.

A process killed while it writes (``kill -9``, a node lost) leaves its
temporary file behind; ``remove_leftovers`` deletes those of earlier
processes before a file is written again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden file beside ``path`` that this process writes before renaming it to ``path``:
    ``.<name>.<pid>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def leftovers(path: str | os.PathLike) -> list[Path]:
    """The temporary files of ``path`` (``temporary_name`` of any process) now in its folder, sorted."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.tmp")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / name for name in names if pattern.fullmatch(name))


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that earlier writers of ``path`` left (a write killed midway); returns them.

    Only for a file that no other process writes at the same time (dsub holds
    the output folder's lock when it writes its metadata).
    """
    removed = []
    for leftover in leftovers(path):
        try:
            leftover.unlink()
        except FileNotFoundError:
            continue
        removed.append(leftover)
    return removed
