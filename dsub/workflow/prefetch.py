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


def byte_ranges(paths, indices, order=None) -> list[tuple[str, int, int]]:
    """(stack path, byte offset, byte count) of the images ``indices`` of stacks ``paths``, in reading order.

    ``paths`` (n,) and ``indices`` (n,) 0-based, as in the particle table;
    ``order``: the rows in the order the run reads them (default: table order).
    Rows that follow each other in one stack's consecutive images are one range,
    cut into ``PIECE_BYTES`` pieces; a range equal to the one before it (an image
    named again, as symmetry expansion does) is left out.
    """
    codes, stacks = pd.factorize(np.asarray(paths, dtype=object))
    indices = np.asarray(indices, dtype=np.int64)
    if order is not None:
        codes, indices = codes[order], indices[order]
    if codes.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(codes) != 0) | (np.diff(indices) != 1)) + 1
    firsts, lasts = np.r_[0, breaks], np.r_[breaks - 1, codes.size - 1]
    layout = {}  # stack code -> (data offset, bytes per image), or None where it has no file map
    ranges, previous = [], None
    for first, last in zip(firsts.tolist(), lasts.tolist()):
        code = int(codes[first])
        if code not in layout:
            stack = open_stack(stacks[code])
            offset = getattr(stack, "offset", None)
            layout[code] = None if offset is None else (offset, stack[0].nbytes)
        if layout[code] is None:
            continue
        offset, image_bytes = layout[code]
        start, stop = offset + int(indices[first]) * image_bytes, offset + (int(indices[last]) + 1) * image_bytes
        if (code, start, stop) == previous:
            continue
        previous = (code, start, stop)
        for piece in range(start, stop, PIECE_BYTES):
            ranges.append((str(stacks[code]), piece, min(PIECE_BYTES, stop - piece)))
    return ranges


class StackPrefetch:
    """A background thread reading the stacks of ``table`` ahead into the page cache; ``stop()`` ends it."""

    def __init__(self, table, budget_bytes: int, order=None):
        self._stopped = threading.Event()
        self.requested_bytes = 0
        self._thread = threading.Thread(target=self._run, args=(table, budget_bytes, order), name="dsub-prefetch",
                                        daemon=True)
        self._thread.start()

    def _run(self, table, budget_bytes: int, order) -> None:
        with contextlib.suppress(Exception):
            descriptors: dict[str, int] = {}
            try:
                for path, offset, count in byte_ranges(table.image_paths, table.image_indices, order):
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


def start(table, scheduler: str, available_bytes: int | None = None, order=None):
    """Read ``table``'s stacks ahead when its tasks run on this machine; returns an object with ``stop()``.

    ``available_bytes``: the memory available now (default: psutil's figure);
    the read-ahead stays within ``PAGE_CACHE_SHARE`` of it. ``order``: the rows
    in the order the tasks read them (``byte_ranges``).
    """
    if scheduler not in SAME_MACHINE or not hasattr(os, "posix_fadvise"):
        return _NoPrefetch()
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    return StackPrefetch(table, int(PAGE_CACHE_SHARE * available_bytes), order)
