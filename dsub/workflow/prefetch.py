"""Reading the particle stacks ahead while the run gets ready.

Before its first chunk a run checks its inputs, prepares the maps, starts its
workers and fits a sample: seconds in which the disk would otherwise sit idle.
Where the tasks run on this machine (``threads``, ``sync``, ``local``) they
share its page cache, so a background thread here asks the kernel to read the
stacks' images in the order the chunks will need them
(``posix_fadvise(POSIX_FADV_WILLNEED)``, which reads into the page cache without
copying anything into this process). It stops at a share of the memory
available at the start (``PAGE_CACHE_SHARE``), so what it reads is still
cached when the tasks come to it, and as soon as the run no longer needs it
(``StackPrefetch.stop``). Any error here is ignored: the run's own checks and
reads report problems with the stacks.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pandas as pd

from ..formats.mrc import open_stack

#: Schedulers whose tasks read the stacks on this machine.
SAME_MACHINE = ("threads", "sync", "local")
#: Share of the memory available at the start that the read-ahead may fill.
PAGE_CACHE_SHARE = 0.5
#: Bytes asked for at once: small enough to stop soon, large enough for the disk to stream.
PIECE_BYTES = 32 * 2**20


def byte_ranges(paths, indices) -> list[tuple[str, int, int]]:
    """(stack path, byte offset, byte count) of the images ``indices`` of stacks ``paths``, in reading order.

    ``paths`` (n,) and ``indices`` (n,) 0-based, as in the particle table; the
    stacks come in the order the table first names them, each one's images
    merged into runs of consecutive images and cut into ``PIECE_BYTES`` pieces.
    """
    codes, stacks = pd.factorize(np.asarray(paths, dtype=object))
    indices = np.asarray(indices, dtype=np.int64)
    first_row = np.full(len(stacks), len(codes), dtype=np.int64)
    np.minimum.at(first_row, codes, np.arange(len(codes)))
    ranges = []
    for code in np.argsort(first_row, kind="stable"):
        stack = open_stack(stacks[code])
        offset, image_bytes = getattr(stack, "offset", None), stack[0].nbytes
        if offset is None:
            continue
        wanted = np.unique(indices[codes == code])
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        for run in np.split(wanted, breaks):
            start, stop = offset + int(run[0]) * image_bytes, offset + (int(run[-1]) + 1) * image_bytes
            for piece in range(start, stop, PIECE_BYTES):
                ranges.append((str(stacks[code]), piece, min(PIECE_BYTES, stop - piece)))
    return ranges


class StackPrefetch:
    """A background thread reading the stacks of ``table`` ahead into the page cache; ``stop()`` ends it."""

    def __init__(self, table, budget_bytes: int):
        self._stopped = threading.Event()
        self.requested_bytes = 0
        self._thread = threading.Thread(target=self._run, args=(table, budget_bytes), name="dsub-prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self, table, budget_bytes: int) -> None:
        with contextlib.suppress(Exception):
            descriptors: dict[str, int] = {}
            try:
                for path, offset, count in byte_ranges(table.image_paths, table.image_indices):
                    if self._stopped.is_set() or self.requested_bytes + count > budget_bytes:
                        return
                    fd = descriptors.get(path)
                    if fd is None:
                        fd = descriptors[path] = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, offset, count, os.POSIX_FADV_WILLNEED)
                    self.requested_bytes += count
            finally:
                for fd in descriptors.values():
                    os.close(fd)

    def stop(self) -> None:
        """Stop asking for more (a request under way finishes on its own)."""
        self._stopped.set()


class _NoPrefetch:
    requested_bytes = 0

    def stop(self) -> None:
        pass


def start(table, scheduler: str, available_bytes: int | None = None):
    """Read ``table``'s stacks ahead when its tasks run on this machine; returns an object with ``stop()``.

    ``available_bytes``: the memory available now (default: psutil's figure);
    the read-ahead stays within ``PAGE_CACHE_SHARE`` of it.
    """
    if scheduler not in SAME_MACHINE or not hasattr(os, "posix_fadvise"):
        return _NoPrefetch()
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    return StackPrefetch(table, int(PAGE_CACHE_SHARE * available_bytes))
