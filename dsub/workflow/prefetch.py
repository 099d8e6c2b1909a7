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

from ..formats.mrc import stack_layout

#: Schedulers whose tasks read the stacks on this machine.
SAME_MACHINE = ("threads", "sync", "local")
#: Share of the memory available at the start that the read-ahead may fill.
PAGE_CACHE_SHARE = 0.5
#: Bytes asked for at once: small enough to stop soon, large enough for the disk to stream.
PIECE_BYTES = 32 * 2**20


#: Rows looked at a time: the read-ahead's own memory stays small whatever the table's length.
BLOCK_ROWS = 2**16


def byte_ranges(paths, indices, order=None):
    """(stack path, byte offset, byte count) of the images ``indices`` of stacks ``paths``, in reading order.

    ``paths`` (n,) and ``indices`` (n,) 0-based, as in the particle table;
    ``order``: the rows in the order the run reads them (default: table order).
    Rows that follow each other in one stack's consecutive images (or name an
    image again, as symmetry expansion does) are one range, cut into
    ``PIECE_BYTES`` pieces; a range equal to the one before it is left out. A generator that looks
    at ``BLOCK_ROWS`` rows at a time.
    """
    paths = np.asarray(paths, dtype=object)
    indices = np.asarray(indices, dtype=np.int64)
    order = np.arange(paths.size) if order is None else np.asarray(order, dtype=np.int64)
    layout: dict = {}  # stack path -> (data offset, bytes per image)
    previous = None
    for block in range(0, order.size, BLOCK_ROWS):
        rows = order[block : block + BLOCK_ROWS]
        codes, stacks = pd.factorize(paths[rows])
        wanted = indices[rows]
        step = np.diff(wanted)  # 0: the same image again (symmetry expansion), 1: the next one
        breaks = np.flatnonzero((np.diff(codes) != 0) | ((step != 0) & (step != 1))) + 1
        for first, last in zip(np.r_[0, breaks].tolist(), np.r_[breaks - 1, rows.size - 1].tolist()):
            path = str(stacks[codes[first]])
            if path not in layout:
                stack = stack_layout(path)
                layout[path] = (stack.offset, stack.image_bytes)
            offset, image_bytes = layout[path]
            start, stop = offset + int(wanted[first]) * image_bytes, offset + (int(wanted[last]) + 1) * image_bytes
            if (path, start, stop) == previous:
                continue
            previous = (path, start, stop)
            for piece in range(start, stop, PIECE_BYTES):
                yield path, piece, min(PIECE_BYTES, stop - piece)


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


def reads_ahead(scheduler: str) -> bool:
    """Whether a run on ``scheduler`` reads ahead here (its tasks share this machine's page cache)."""
    return scheduler in SAME_MACHINE and hasattr(os, "posix_fadvise")


def start(table, scheduler: str, available_bytes: int | None = None, order=None):
    """Read ``table``'s stacks ahead when its tasks run on this machine; returns an object with ``stop()``.

    ``available_bytes``: the memory available now (default: psutil's figure);
    the read-ahead stays within ``PAGE_CACHE_SHARE`` of it. ``order``: the rows
    in the order the tasks read them (``byte_ranges``).
    """
    if not reads_ahead(scheduler):
        return _NoPrefetch()
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    return StackPrefetch(table, int(PAGE_CACHE_SHARE * available_bytes), order)
