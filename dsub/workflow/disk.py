"""The disk a run writes: reckoned before any work, stated, and checked against OUTDIR's free space.

What a run writes (``export``, ``store``):

* the stacks, ``Particles/subtracted_NNNN.mrcs``: a 1024-byte header and, per
  particle, box² pixels of 4 bytes (float32), 2 with ``--float16``
  (``export.stack_bytes``); created at full size but sparse
  (``export.create_partial_stack``), so their blocks are taken as the tasks write;
* with ``--keep-store`` a copy of every image in the store (``store.create_store``:
  uncompressed, whole Zarr chunks of ``chunk_size`` images, the last one too),
  kept after the run; without it the store holds no images at all;
* the metadata: the star and the .cs (together at most about three times the
  particle file and its passthrough files), the store's per-particle arrays, the particle table
  in columns and the report's columns (``METADATA_BYTES_PER_PARTICLE``), the QC
  report and the log (``FIXED_METADATA_BYTES``): an estimate, small beside the
  stacks of any real run.

On a resume only what is still to be written counts: a stack (or the store's
image array) that the run takes up has already the blocks its finished chunks
wrote (``allocated_bytes``), and a run that starts afresh first deletes the
stacks and store of the run it replaces, whose blocks count as free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DsubError
from . import export, store

#: Bytes per particle of the store's bookkeeping (per-particle arrays, image statistics, chunk marks), the
#: particle table in columns (``metadata``, while the chunks run) and the report's columns
#: (``report.columns``): measured 200 (127 the table, 72 the rest) at 4 000 particles, rounded up.
METADATA_BYTES_PER_PARTICLE = 256
#: The star and .cs written against the particle file (and passthrough files) read: measured 1.41 and 1.24
#: times a RELION star's size (4 000 particles), so three times it bounds both.
METADATA_INPUT_FACTOR = 3
#: The QC report's figures, dsub.log and dsub_run.json (a report measured 0.2-0.3 MB, the others a few kB).
FIXED_METADATA_BYTES = 10**6


class NotEnoughDiskError(DsubError, OSError):
    """OUTDIR's file system has less free space than the run still has to write."""


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged user may still write on ``folder``'s file system (``f_bavail * f_frsize``).

    None where the file system reports no size at all (``f_blocks`` 0: some
    network and pseudo file systems), or cannot be asked: nothing to check against.
    """
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    if stat.f_blocks == 0:
        return None
    return int(stat.f_bavail) * int(stat.f_frsize)


def allocated_bytes(path: Path) -> int:
    """Bytes of disk ``path`` takes (its blocks, ``st_blocks`` × 512; a sparse file's holes take none),
    summed over the files under it for a folder; 0 where nothing is there."""
    try:
        stat = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0
    total = stat.st_blocks * 512
    if os.path.isdir(path) and not os.path.islink(path):
        for root, folders, files in os.walk(path):
            for name in folders + files:
                try:
                    total += os.stat(os.path.join(root, name), follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    return total


def metadata_bytes(count: int, particle_files) -> int:
    """Estimated bytes of a run's metadata for ``count`` particles: the star and the .cs (together
    ``METADATA_INPUT_FACTOR`` times ``particle_files``, the particle file and its passthrough files), store
    bookkeeping, report and log."""
    inputs = sum(os.path.getsize(path) for path in particle_files if os.path.isfile(path))
    return METADATA_INPUT_FACTOR * inputs + METADATA_BYTES_PER_PARTICLE * count + FIXED_METADATA_BYTES


def size_text(count: float) -> str:
    """Bytes for people, in SI units to three digits: ``393 MB``, ``1.25 TB``, ``60.0 kB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{int(count)} bytes"


@dataclass(frozen=True)
class DiskNeed:
    """Bytes a run writes into OUTDIR.

    ``stacks``, ``store_images`` (``--keep-store``) and ``metadata``: what is
    still to be written; ``freed``: the
    blocks of an earlier run's stacks and store that this run deletes before it
    writes (``--overwrite``, or a store it cannot take up).
    """

    stacks: int
    store_images: int
    metadata: int
    freed: int = 0

    @property
    def total(self) -> int:
        """Bytes still to be written."""
        return self.stacks + self.store_images + self.metadata

    def describe(self) -> str:
        """E.g. ``393 MB (stacks 390 MB, metadata 3.2 MB)``."""
        parts = [f"stacks {size_text(self.stacks)}"]
        if self.store_images:
            parts.append(f"the store's copy of the images {size_text(self.store_images)} (--keep-store)")
        parts.append(f"metadata {size_text(self.metadata)}")
        return f"{size_text(self.total)} ({', '.join(parts)})"


def plan_disk(outdir: Path, layout, count: int, box: int, chunk_size: int, float16: bool, keep_store: bool,
              particle_files, takes_up: bool = False, count_freed: bool = True) -> DiskNeed:
    """What a run writes into ``outdir`` (``DiskNeed``): all of it, or with ``takes_up`` what an identical
    earlier run's store and stacks, which this one resumes, leave to be written.

    ``layout``: ``export.stack_layout``; ``box``: the output box; ``particle_files``:
    the particle file and its passthrough files (the metadata's estimate);
    ``count_freed`` False: the earlier results it would replace are not looked at.
    """
    dtype = np.float16 if float16 else np.float32
    store_path = Path(outdir) / store.STORE_NAME
    stacks, freed = stack_need(outdir, layout, box, dtype, takes_up, count_freed)
    if not takes_up and count_freed:  # a store there is replaced
        freed += allocated_bytes(store_path)
    return DiskNeed(
        stacks=stacks,
        store_images=store_images_need(store_path, count, box, chunk_size, dtype, takes_up) if keep_store else 0,
        metadata=metadata_bytes(count, particle_files),
        freed=freed,
    )


def stack_need(outdir: Path, layout, box: int, dtype, takes_up: bool, count_freed: bool = True) -> tuple[int, int]:
    """(bytes still to be written into the stacks of ``layout``, bytes of old stacks freed first).

    ``takes_up``: the run resumes its store, so ``export.prepare_stacks`` keeps
    each stack found at full size (under its temporary name, else its final
    one) and only its unwritten blocks remain; a stack of another size is
    replaced. Otherwise every stack dsub named in OUTDIR goes first
    (``export.remove_stacks``) and every stack is written whole.
    """
    need = freed = 0
    if not takes_up:
        folder = Path(outdir) / export.STACK_FOLDER
        if count_freed and folder.is_dir():
            for path in folder.iterdir():
                if export.is_stack_name(path.name):
                    freed += allocated_bytes(path)
        return sum(export.stack_sizes(layout, box, dtype).values()), freed
    for relative, size in export.stack_sizes(layout, box, dtype).items():
        partial, target = export.partial_name(outdir, relative), Path(outdir) / relative
        if export.has_size(partial, size):
            kept, replaced = partial, [target]
        elif export.has_size(target, size):
            kept, replaced = target, []
        else:
            kept, replaced = None, [partial, target]
        freed += sum(allocated_bytes(path) for path in replaced)
        need += size - min(size, allocated_bytes(kept)) if kept is not None else size
    return need, freed


def store_images_need(store_path: Path, count: int, box: int, chunk_size: int, dtype, takes_up: bool) -> int:
    """Bytes still to be written into the store's image array (``--keep-store``): whole chunks, uncompressed."""
    chunks = -(-count // chunk_size)
    full = chunks * chunk_size * box * box * np.dtype(dtype).itemsize
    if not takes_up:
        return full
    return max(0, full - allocated_bytes(Path(store_path) / "images"))


def room_line(outdir: Path, need: DiskNeed, free: int, resuming: bool, float16: bool, keep_store: bool) -> str:
    """The refusal: OUTDIR, what is still to be written and what is free, and what to do."""
    fixes = ["free space there", "write elsewhere with -o" + (
        " (a new output folder starts over: the finished chunks stay in this one, where freeing space resumes "
        "the run)" if resuming else "")]
    if keep_store:
        fixes.append("leave out --keep-store (the store's copy of the images)")
    if not float16:
        fixes.append("add --float16, which halves the stacks"
                     + (" (a different run: with --overwrite it starts over)" if resuming else ""))
    advice = ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    freed = f" (with the {size_text(need.freed)} of the earlier results it replaces)" if need.freed else ""
    what = "still has to write" if resuming else "writes"
    return (f"{outdir}: this run {what} about {need.describe()}, but its file system has {size_text(free)} "
            f"free{freed}. {advice[:1].upper()}{advice[1:]}.")


def check_room(outdir: Path, need: DiskNeed, resuming: bool, float16: bool, keep_store: bool) -> None:
    """Refuse (``NotEnoughDiskError``) a run whose outputs cannot fit on OUTDIR's file system.

    Compares ``need.total`` with the free space (``free_bytes``) plus what the run
    deletes first (``need.freed``); a file system that reports no size is not checked.
    A run that fits with little to spare goes on: the estimate of the metadata is
    an upper bound, and other programs may free or fill the disk meanwhile.
    """
    free = free_bytes(outdir)
    if free is None or need.total <= free + need.freed:
        return
    raise NotEnoughDiskError(room_line(outdir, need, free, resuming, float16, keep_store))
