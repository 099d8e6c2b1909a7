"""The outputs RELION and cryoSPARC read: image stacks written by the tasks, then the metadata.

* ``OUTDIR/Particles/subtracted_NNNN.mrcs``: float32 (MRC mode 2) stacks, float16 (mode 12)
  when the store is float16 (``--float16``), each holding particles of one
  pixel size (in input order), with that pixel size in the header;
* ``OUTDIR/particles_subtracted.star``: every input row, in input order, with
  ``rlnImageName`` pointing at the new stacks and the old name in
  ``rlnImageOriginalName`` (for a star an earlier dsub run wrote, that star's
  ``rlnImageOriginalName``: the extracted images stay the originals), both written from one folder, RELION's project
  folder (``star_names_base``: the folder the input star's relative names
  start from, else the current folder); by default the new names are relative
  to it when OUTDIR is inside it, else absolute (``formats.paths.written_paths``),
  and the originals likewise, absolute where outside it (``written_original_paths``),
  so that a run on this star finds both from the folder it finds the first from;
* ``OUTDIR/particles_subtracted.cs``: every input field passed through, with
  ``blob/path`` / ``blob/idx`` pointing at the new stacks (by default relative
  to the cryoSPARC project folder when there is one and OUTDIR is inside it,
  else absolute) and ``alignments3D/alpha`` holding the contrast each particle
  was subtracted with (with ``--scale none``, the input's alpha, or 1), and
  ``dsub/original_path`` / ``dsub/original_idx`` naming the image each particle
  was subtracted from (``original_images``: for dsub's own output, its
  originals; for ``.mrc`` stacks, the stack itself rather than its link in
  ``Originals``), written from the folder ``blob/path`` starts from
  (``written_original_paths``);
* re-centred or re-boxed particles (``rebox``): the star and .cs carry their
  new origins and box (``rlnImageSize``, ``blob/shape``);
* both carry the contrast fit's uncertainty and quality (``FIT_COLUMNS``,
  ``FIT_FIELDS``): dsub's own labels, since neither program defines one;
* ``OUTDIR/skipped_particles.star``: with ``--skip-bad-particles``, the input
  rows of the particles left out (their slots in the stacks hold zeros, and no
  metadata row points at them);
* ``OUTDIR/Originals/…/NAME.mrcs``: for a cryoSPARC input, whose stacks are
  named ``.mrc``, a symbolic link to each, which the star's
  ``rlnImageOriginalName`` names (RELION reads ``N@NAME.mrc`` as a map, not a
  stack: ``original_stack_links``).

Each stack is created at its full size under a temporary name before the tasks
run (``prepare_stacks``); each task writes its chunk's images straight into
their slots (``write_pieces``) and the store records the chunk as finished.
When every chunk is, the metadata files are written into a hidden folder
(``STAGING_FOLDER``, the ``into`` of ``write_metadata``) with the run's record;
then the stacks' header statistics are written from the store's per-image
figures and the stacks get their names (``finish_stacks``), and the metadata
is moved into OUTDIR by ``publish_metadata``: the star and .cs, then
``dsub_run.json`` last, so a ``dsub_run.json`` in OUTDIR means the export finished (the star and
.cs beside it are whole and of the same export).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputFileError, warn
from ..formats import atomic, select_rows
from ..formats.mrc import write_stack
from ..formats.paths import StackRefs, is_inside, written_base, written_paths
from . import store

from .outputs import CS_NAME, SKIPPED_NAME, STACK_FOLDER, STAR_NAME, is_stack_name  # noqa: F401 -- export's names
#: Hidden folder in OUTDIR where the export's metadata is written before ``publish_metadata`` moves it out.
STAGING_FOLDER = ".metadata.partial"
#: Folder in OUTDIR of ``.mrcs`` links to a cryoSPARC input's ``.mrc`` stacks (``original_stack_links``).
ORIGINALS_FOLDER = "Originals"
#: A stack's name ends in this until the run's end (``finish_stacks``).
PARTIAL_SUFFIX = ".partial"
#: Bytes before a stack's first image: the MRC header (the stacks carry no extended header).
DATA_OFFSET = 1024
#: Store array -> star label / .cs field for what the contrast fit measured of each particle.
FIT_COLUMNS = {"contrast": "rlnDsubContrast", "contrast_sigma": "rlnDsubContrastSigma",
               "fit_correlation": "rlnDsubFitCorrelation"}
FIT_FIELDS = {"contrast_sigma": "dsub/contrast_sigma", "fit_correlation": "dsub/fit_correlation"}


#: Particles per output stack unless --particles-per-stack says otherwise.
DEFAULT_PARTICLES_PER_STACK = 4096


def whole_chunks(particles_per_stack: int, chunk_size: int) -> int:
    """``particles_per_stack`` rounded down to whole chunks of ``chunk_size`` (at least one chunk)."""
    return max(chunk_size, particles_per_stack // chunk_size * chunk_size)


def default_stack_size(chunk_size: int) -> int:
    """The particles per stack of a run with ``chunk_size`` that does not choose them."""
    return whole_chunks(DEFAULT_PARTICLES_PER_STACK, chunk_size)


def stack_layout(count: int, particles_per_stack: int, pixel_sizes=None) -> list[tuple[str, np.ndarray, float]]:
    """(relative path, rows, pixel size) of each output stack.

    Each stack holds particles of one pixel size (``pixel_sizes``, length
    ``count``; None: all alike, reported as 0), in input order, at most
    ``particles_per_stack``; pixel sizes in order of first appearance.
    """
    sizes = np.zeros(count) if pixel_sizes is None else np.round(np.asarray(pixel_sizes, dtype=np.float64), 6)
    _, first = np.unique(sizes, return_index=True)
    layout = []
    for size in sizes[np.sort(first)]:
        rows = np.flatnonzero(sizes == size)
        for start in range(0, rows.size, particles_per_stack):
            relative = f"{STACK_FOLDER}/subtracted_{len(layout):04d}.mrcs"
            layout.append((relative, rows[start : start + particles_per_stack], float(size)))
    return layout


@dataclass(frozen=True)
class StackPiece:
    """Where some of a chunk's images go: one contiguous run of slots in one stack.

    ``path``: the stack's temporary name (``partial_name``); ``chunk_rows``:
    positions within the chunk, ascending; ``first``: the stack slot (0-based)
    of ``chunk_rows[0]``, the others following it.
    """

    path: str
    chunk_rows: tuple
    first: int


def partial_name(outdir: Path, relative: str) -> Path:
    """The temporary name a stack has until the run's end: ``subtracted_NNNN.mrcs.partial``."""
    target = Path(outdir) / relative
    return target.with_name(target.name + PARTIAL_SUFFIX)


def chunk_pieces(layout, outdir: Path, bounds) -> list[list[StackPiece]]:
    """Each chunk's ``StackPiece`` list, from ``stack_layout``'s stacks and ``store.chunk_bounds``.

    With one pixel size a chunk is one piece of one stack; particles of several
    pixel sizes split a chunk's rows over several stacks.
    """
    starts = np.asarray([start for start, _ in bounds], dtype=np.int64)
    pieces: list[list[StackPiece]] = [[] for _ in bounds]
    for relative, rows, _ in layout:
        path = str(partial_name(outdir, relative))
        chunks = np.searchsorted(starts, rows, side="right") - 1  # rows ascend: chunks do too
        edges = np.flatnonzero(np.diff(chunks)) + 1
        for first, part in zip(np.concatenate([[0], edges]), np.split(rows, edges)):
            chunk = int(chunks[first])
            pieces[chunk].append(StackPiece(path, tuple(int(r) for r in part - starts[chunk]), int(first)))
    return pieces


def chunk_run_order(bounds, layout) -> np.ndarray:
    """Chunk indices in the order a run submits them: round-robin over the output stacks they start in.

    ``bounds``: ``store.chunk_bounds``; ``layout``: ``stack_layout``. Buffered
    writes into one file take turns on its inode lock (ext4, XFS): on a 2-GPU
    host's disk one stack took 3 GB/s from 1, 8 or 16 writers alike and eight
    stacks 23 GB/s (BENCHMARKS.md), so the chunks running at once write into
    different stacks. Chunks of one stack keep their order.
    """
    stack_of_row = np.empty(sum(rows.size for _, rows, _ in layout), dtype=np.int64)
    for stack, (_, rows, _) in enumerate(layout):
        stack_of_row[rows] = stack
    first_stack = stack_of_row[np.asarray([start for start, _ in bounds], dtype=np.int64)]
    position = np.zeros(len(bounds), dtype=np.int64)  # the chunk's place among its stack's chunks
    for stack in np.unique(first_stack):
        members = np.flatnonzero(first_stack == stack)
        position[members] = np.arange(members.size)
    return np.lexsort((first_stack, position))


def stack_bytes(count: int, box: int, dtype) -> int:
    """Size in bytes of a stack of ``count`` images of ``box``² pixels in ``dtype`` (header included)."""
    return DATA_OFFSET + count * box * box * np.dtype(dtype).itemsize


def stack_sizes(layout, box: int, dtype) -> dict:
    """{stack path relative to OUTDIR: its size in bytes} of every stack of ``layout`` (``stack_layout``:
    (relative path, rows, ...) per stack) with images of ``box``² pixels in ``dtype``."""
    return {relative: stack_bytes(rows.size, box, dtype) for relative, rows, _ in layout}


def create_partial_stack(outdir: Path, relative: str, count: int, box: int, pixel_size: float, dtype) -> None:
    """Create a stack's file under its temporary name at its full size (sparse: nothing is filled).

    MRC mode 2 (float32) or 12 (float16, ``--float16``; MRC2014, read by RELION
    >= 4.0 and cryoSPARC >= 4.4), ``pixel_size`` in its header; the tasks then
    write their images into it (``write_pieces``) and ``finish_stacks`` writes
    the header statistics and gives it its name.
    """
    partial = partial_name(outdir, relative)
    partial.parent.mkdir(parents=True, exist_ok=True)
    mode = 12 if np.dtype(dtype) == np.float16 else 2
    with write_stack(partial, (count, box, box), pixel_size, mrc_mode=mode) as mrc:
        if int(mrc.header.nsymbt) != 0:  # mrcfile writes none; the slots' offsets rely on it
            raise RuntimeError(f"{partial}: an extended header was written")


def write_pieces(images: np.ndarray, pieces) -> None:
    """Write a chunk's images (n, box, box), in the stacks' dtype, into their stacks' slots.

    Each piece is one ``os.pwrite`` of a contiguous byte range: tasks write
    disjoint ranges of the same files at once without a lock. An ``OSError``
    (a full disk) names the stack.
    """
    image_bytes = images[0].nbytes if images.shape[0] else 0
    for piece in pieces:
        rows = np.asarray(piece.chunk_rows, dtype=np.int64)
        if rows.size and rows[-1] - rows[0] + 1 == rows.size:
            block = np.ascontiguousarray(images[int(rows[0]) : int(rows[-1]) + 1])
        else:
            block = np.ascontiguousarray(images[rows])
        data = memoryview(block.astype(block.dtype.newbyteorder("<"), copy=False)).cast("B")
        offset = DATA_OFFSET + piece.first * image_bytes
        try:
            fd = os.open(piece.path, os.O_WRONLY)
            try:
                while data:
                    written = os.pwrite(fd, data, offset)
                    data, offset = data[written:], offset + written
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, piece.path) from exc


def image_statistics(images: np.ndarray) -> np.ndarray:
    """(n, 4) float64 of images (n, box, box): minimum, maximum, sum and sum of squares of each.

    Computed in float32 whatever the dtype (float16 sums would overflow), summed in float64.
    """
    flat = images.reshape(images.shape[0], -1).astype(np.float32, copy=False)
    statistics = np.empty((images.shape[0], 4), dtype=np.float64)
    if images.shape[0]:
        statistics[:, 0] = flat.min(axis=1)
        statistics[:, 1] = flat.max(axis=1)
        statistics[:, 2] = flat.sum(axis=1, dtype=np.float64)
        statistics[:, 3] = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
    return statistics


def finish_stacks(outdir: Path, layout, statistics: np.ndarray) -> None:
    """Write every stack's header statistics, then give every stack its name (``stack_layout``'s stacks).

    ``statistics``: the store's (n, 4) ``image_statistics``. The names come last,
    all together, so a failure while the headers are written leaves no stack
    that looks complete.
    """
    for relative, rows, _ in layout:
        write_stack_statistics(outdir, relative, statistics[rows])
    for relative, _, _ in layout:
        os.replace(partial_name(outdir, relative), Path(outdir) / relative)


def write_stack_statistics(outdir: Path, relative: str, statistics: np.ndarray) -> None:
    """Write a full stack's header statistics from its images' ``statistics`` (rows, 4), under its temporary name.

    The header's minimum, maximum, mean and RMS deviation from the mean (MRC2014
    ``dmin``, ``dmax``, ``dmean``, ``rms``) over all its pixels; the images
    themselves are not read again.
    """
    partial = partial_name(outdir, relative)
    with open(partial, "r+b") as handle:
        raw = handle.read(DATA_OFFSET)
        header = np.frombuffer(raw, dtype=mrcfile.dtypes.HEADER_DTYPE).copy()[0]
        pixels = int(header["nx"]) * int(header["ny"]) * int(header["nz"])
        mean = float(statistics[:, 2].sum()) / pixels
        header["dmin"], header["dmax"], header["dmean"] = statistics[:, 0].min(), statistics[:, 1].max(), mean
        header["rms"] = np.sqrt(max(float(statistics[:, 3].sum()) / pixels - mean * mean, 0.0))
        handle.seek(0)
        handle.write(header.tobytes())


def prepare_stacks(outdir: Path, layout, pieces, bounds, box: int, dtype, done: np.ndarray,
                   store_path: Path, on_lost=None) -> list[int]:
    """Make every stack of ``layout`` ready for the tasks under its temporary name; returns chunks to redo.

    A stack already there at its full size, under its temporary name or (a run
    that finished its stacks before it stopped) its final one, keeps its
    finished chunks' images; the final name goes back to the temporary one
    until the run's end, so nothing looks complete meanwhile. A stack that is
    missing or of another size is created afresh; the finished chunks
    (``done``, per chunk) with images in it are copied from the store when it
    keeps them (``--keep-store``), else returned to be computed again.
    ``pieces``: ``chunk_pieces`` of ``layout`` and ``bounds`` (``store.chunk_bounds``).
    ``on_lost(stacks, chunks, from_store)``: called once where stacks made afresh
    held finished chunks' images (their names relative to ``outdir``, how many
    chunks, whether the store gave them back).
    """
    size = stack_sizes(layout, box, dtype)
    redo: set[int] = set()
    fresh = []
    for relative, rows, pixel_size in layout:
        partial, target = partial_name(outdir, relative), Path(outdir) / relative
        if has_size(partial, size[relative]):
            target.unlink(missing_ok=True)
        elif has_size(target, size[relative]):
            os.replace(target, partial)
        else:
            target.unlink(missing_ok=True)
            create_partial_stack(outdir, relative, rows.size, box, pixel_size, dtype)
            fresh.append(str(partial))
    if not fresh:
        return []
    images = store.open_store(store_path)["images"] if store.has_images(store_path) else None
    affected: set[int] = set()
    lost_stacks: set[str] = set()
    for chunk, chunk_pieces_ in enumerate(pieces):
        lost = [piece for piece in chunk_pieces_ if piece.path in fresh]
        if not (lost and done[chunk]):
            continue
        affected.add(chunk)
        lost_stacks.update(piece.path for piece in lost)
        if images is None:
            redo.add(chunk)
            continue
        start, stop = bounds[chunk]
        write_pieces(np.asarray(images[start:stop]), lost)
    if affected and on_lost is not None:
        names = sorted(os.path.relpath(path, outdir).removesuffix(PARTIAL_SUFFIX) for path in lost_stacks)
        on_lost(names, len(affected), images is not None)
    return sorted(redo)


def remove_stacks(outdir: Path) -> None:
    """Remove every stack dsub names ``Particles/subtracted_NNNN.mrcs`` (or ``.partial``) in ``outdir``.

    For a run that starts afresh (``--overwrite``, or a store that cannot be
    resumed): an earlier run's stacks that the new layout does not name would
    otherwise stay beside the new ones and look like results.
    """
    folder = Path(outdir) / STACK_FOLDER
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if is_stack_name(path.name):
            path.unlink(missing_ok=True)


def has_size(path: Path, expected: int) -> bool:
    """Whether ``path`` is a file of exactly ``expected`` bytes."""
    try:
        return path.stat().st_size == expected
    except FileNotFoundError:
        return False


def new_image_locations(count: int, particles_per_stack: int, pixel_sizes=None) -> tuple[np.ndarray, np.ndarray]:
    """Relative stack path and 0-based index of every particle in the exported stacks."""
    paths = np.empty(count, dtype=object)
    indices = np.empty(count, dtype=np.int64)
    for relative, rows, _ in stack_layout(count, particles_per_stack, pixel_sizes):
        paths[rows] = relative
        indices[rows] = np.arange(rows.size)
    return paths, indices


def new_stack_refs(count: int, particles_per_stack: int, pixel_sizes=None) -> StackRefs:
    """Each particle's place in the exported stacks (paths relative to OUTDIR), as ``new_image_locations``."""
    layout = stack_layout(count, particles_per_stack, pixel_sizes)
    codes = np.empty(count, dtype=np.int32)
    indices = np.empty(count, dtype=np.int32)
    for number, (_, rows, _) in enumerate(layout):
        codes[rows] = number
        indices[rows] = np.arange(rows.size)
    return StackRefs([relative for relative, _, _ in layout], codes, indices)


def star_names_base(table) -> Path:
    """The folder the output star's image names start from, absolute: RELION's project folder.

    For a star input, the folder its relative image names were found from
    (``extra["star_base"]``: the current folder, else the star's folder or a
    parent, ``formats.paths.star_roots``), so that ``rlnImageName`` and
    ``rlnImageOriginalName`` start from one folder; the current folder for a
    star whose names are all absolute and for a .cs (RELION opens names from
    the folder it runs in).
    """
    base = table.extra.get("star_base") if table.source_format == "star" else None
    if base is not None and names_start_from_own_outdir(table):
        base = None
    return Path(os.path.abspath(base if base is not None else os.getcwd()))


def names_start_from_own_outdir(table) -> bool:
    """Whether ``table`` is an earlier dsub run's star whose image names were found from the star's own folder:
    that run's OUTDIR (written with ``--paths outdir``), not RELION's project folder, so the names this run
    writes start from the current folder instead (``star_names_base``)."""
    base = table.extra.get("star_base")
    return (table.source_format == "star" and base is not None and table.extra.get("dsub_output") is not None
            and table.source_path is not None
            and os.path.abspath(base) == os.path.dirname(os.path.abspath(table.source_path)))


def written_stack_names(outdir: Path, paths_mode: str, project_folder=None, star_base=None) -> dict:
    """How the star and the .cs written from here with ``paths_mode`` name the first stack: {"star": ..., "cs": ...}.

    Every stack lies in one folder, so the first one's name stands for all:
    ``write_metadata`` writes the same (the star's from ``star_base``,
    ``star_names_base``, None: the current folder; the .cs's from
    ``project_folder``, ``formats.paths.written_paths``). Recorded in
    ``dsub_run.json``, it tells whether a rerun with another ``--paths``, from
    another folder or in a moved OUTDIR would name the stacks differently.
    """
    first = [stack_layout(1, 1)[0][0]]
    star_base = Path.cwd() if star_base is None else star_base
    return {"star": str(written_paths(first, outdir, paths_mode, star_base)[0]),
            "cs": str(written_paths(first, outdir, paths_mode, project_folder)[0])}


def write_metadata(table, outdir: Path, particles_per_stack: int, contrast: np.ndarray,
                   skipped: np.ndarray | None = None, exported=None, paths_mode: str = "auto",
                   fit: dict | None = None, into: Path | None = None) -> None:
    """Write the star and .cs files that point at the exported stacks (skipped particles left out).

    ``contrast`` None (``--scale none``) keeps the input's ``alignments3D/alpha`` (or 1).
    ``exported`` is the table that describes the exported images when it differs
    from the input ``table`` (re-centred or re-boxed particles: new origins and
    box); the skipped particles' rows, which point at their input images, always
    come from ``table``. ``paths_mode`` (``--paths``): how stack paths are
    written, see ``formats.paths.written_paths``; the star's start from
    ``star_names_base`` (where the input star's names start, RELION's project
    folder; else the current folder), the .cs's from
    ``table.extra["project_folder"]`` (the cryoSPARC project folder). The
    skipped particles' star keeps their input names, which start from the same
    folder. ``fit``: {store array name: (n,) values} of
    ``store.PER_PARTICLE`` besides ``contrast``, written under ``FIT_COLUMNS`` /
    ``FIT_FIELDS``. The temporary files that earlier attempts killed while
    writing these files left in ``outdir`` (``formats.atomic``) are removed first.
    ``into``: the folder the files are written to (``STAGING_FOLDER``, for
    ``publish_metadata``; default ``outdir``); their names for the stacks are
    those of ``outdir`` either way. Without skipped particles no skipped star is
    written (``publish_metadata`` then removes an earlier one).
    """
    from ..formats import cs as cs_format  # the writers (pandas) are loaded here: the workers write stacks only
    from ..formats import star as star_format

    into = outdir if into is None else Path(into)
    for name in (STAR_NAME, CS_NAME, SKIPPED_NAME):  # left by an attempt killed while writing; this run holds the lock
        atomic.remove_leftovers(outdir / name)
        atomic.remove_leftovers(into / name)
    exported = table if exported is None else exported
    locations = new_stack_refs(len(table), particles_per_stack, table.pixel_size_angstrom)
    star_base = star_names_base(table)
    names = locations.with_paths(written_paths(locations.paths, outdir, paths_mode, star_base))
    project_folder = table.extra.get("project_folder")
    paths = locations.with_paths(written_paths(locations.paths, outdir, paths_mode, project_folder))
    keep = np.ones(len(table), dtype=bool) if skipped is None else ~np.asarray(skipped, dtype=bool)
    originals = original_images(table)  # absolute: the images the particles were subtracted from
    cs_originals = originals.with_paths(written_original_paths(originals.paths, outdir, paths_mode, project_folder))
    # The star's originals start from the folder its rlnImageName do (star_base), so that the next run, which
    # resolves both from one folder, finds them; a plain star's own .mrc names are kept, unlinked.
    linked = None if table.source_format == "star" and table.extra.get("dsub_output") is None else (
        original_stack_links(originals, outdir))  # .mrc stacks, as RELION reads them
    star_originals = (originals.with_paths(written_original_paths(originals.paths, outdir, paths_mode, star_base))
                      if linked is None else linked.with_paths(written_paths(linked.paths, outdir, paths_mode, star_base)))
    (into / SKIPPED_NAME).unlink(missing_ok=True)
    if not keep.all():
        left_out = select_rows(table, ~keep)
        # the input's own images, as RELION reads them: the links, unless they are an earlier run's stacks
        inputs = (star_originals.select(~keep) if table.source_format != "star" and not chained_cs(table)
                  else original_image_names(left_out))
        with named_in_outdir(into, outdir):
            star_format.write_particles(left_out, into / SKIPPED_NAME, inputs,
                                        original_names=star_originals.select(~keep))
    kept = select_rows(exported, keep)
    if np.any(kept.ctf_premultiplied):
        warn(f"{CS_NAME}: the images are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied), and a cryoSPARC "
             "particle .cs has no field that says so: cryoSPARC would treat them as plain images. Continue "
             f"from {STAR_NAME} in RELION, which keeps the flag.")
    rows = slice(None) if keep.all() else keep  # all kept: views, no copies of millions of values
    measured = {**({"contrast": np.asarray(contrast)} if contrast is not None else {}), **(fit or {})}
    columns = {FIT_COLUMNS[name]: np.asarray(values, np.float32)[rows] for name, values in measured.items()}
    fields = {FIT_FIELDS[name]: np.asarray(values, "<f4")[rows] for name, values in measured.items()
              if name in FIT_FIELDS}
    with named_in_outdir(into, outdir):
        star_format.write_particles(kept, into / STAR_NAME, names.select(rows), star_originals.select(rows),
                                    extra_columns=columns)
        cs_format.write_particles(kept, into / CS_NAME, paths.select(rows), None,
                                  None if contrast is None else contrast[rows], extra_fields=fields,
                                  originals=cs_originals.select(rows))


@contextlib.contextmanager
def named_in_outdir(into: Path, outdir: Path):
    """An ``OSError`` (a full disk) about a file written in ``into`` names the file OUTDIR would hold instead."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).parent == into != outdir:
            exc.filename = str(outdir / Path(exc.filename).name)
        raise


def staging_folder(outdir: Path) -> Path:
    """A new, empty ``STAGING_FOLDER`` in ``outdir`` (one a stopped export left is removed first)."""
    staging = Path(outdir) / STAGING_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish_metadata(staging: Path, outdir: Path, record_name: str) -> None:
    """Move the export's files from ``staging`` into ``outdir``: the skipped star, the star and the .cs, then
    the run's record ``record_name`` (``dsub_run.json``) last, each by a rename; then remove ``staging``.

    A stop before the last rename leaves no record in ``outdir``, which the
    README gives as the mark of an export cut short (the rerun exports again).
    A skipped star that this export did not write is removed from ``outdir``.
    """
    staging, outdir = Path(staging), Path(outdir)
    (outdir / record_name).unlink(missing_ok=True)  # from here until the end, no record: not finished
    for name in (SKIPPED_NAME, STAR_NAME, CS_NAME):
        if (staging / name).is_file():
            os.replace(staging / name, outdir / name)
        elif name == SKIPPED_NAME:
            (outdir / name).unlink(missing_ok=True)
    os.replace(staging / record_name, outdir / record_name)
    shutil.rmtree(staging, ignore_errors=True)


def chained_cs(table) -> bool:
    """Whether ``table`` was read from a .cs an earlier dsub run wrote with ``dsub/original_*`` fields."""
    from ..formats import cs as cs_format

    return (table.source_format == "cs" and table.source is not None
            and cs_format.ORIGINAL_PATH_FIELD in table.source.dtype.names)


def original_images(table) -> StackRefs:
    """The image each particle was subtracted from, absolute paths and 0-based indices: what the star's
    ``rlnImageOriginalName`` and the .cs's ``dsub/original_path`` / ``dsub/original_idx`` name.

    For dsub's own output, the earlier run's originals (the extracted images,
    however many runs back): a .cs's ``dsub/original_*`` (``formats.cs.original_images``),
    a star's ``rlnImageOriginalName`` (read from the folder its image names
    were found from, ``star_names_base``; a name through the earlier run's
    ``Originals`` links is followed to the stack itself, which cryoSPARC names
    ``.mrc``). Else the input's own images (``table.image_paths``, ``image_indices``).
    """
    from ..formats import cs as cs_format

    from_cs = cs_format.original_images(table)
    if from_cs is not None:
        return from_cs
    source = table.source
    if (table.source_format == "star" and table.extra.get("dsub_output") is not None and source is not None
            and "rlnImageOriginalName" in source["particles"]):
        return chained_star_originals(table)
    codes, uniques = table.image_path_codes()
    return StackRefs([os.path.normpath(os.path.abspath(str(path))) for path in uniques], codes,
                     np.asarray(table.image_indices, np.int64))


def chained_star_originals(table) -> StackRefs:
    """An earlier dsub run's star's ``rlnImageOriginalName`` as ``StackRefs`` (``star_original_images``),
    relative names read from the folder its image names start from (``table.extra["star_base"]``, where that
    run wrote both from), else the first of the current folder, the star's folder and its parents
    (``formats.paths.star_roots``: a star written before both started from one folder) where every original
    exists. Where none holds them all: a warning naming one, that the trail to the extracted images is lost,
    and the names as given (relative ones left relative: ``written_original_paths`` writes them unchanged).
    """
    from ..formats.paths import star_roots

    names = table.source["particles"]["rlnImageOriginalName"]
    star_path = table.source_path
    links = Path(os.path.abspath(star_path)).parent / ORIGINALS_FOLDER
    roots = [Path(os.path.abspath(table.extra.get("star_base") or os.getcwd())), *star_roots(star_path)]
    first = None
    for root in dict.fromkeys(roots):
        refs = star_original_images(names, root, links, star_path)
        missing = [path for path in refs.paths if not os.path.isfile(path)]
        if not missing:
            return refs
        first = missing[0] if first is None else first
    given = star_original_images(names, None, links, star_path)
    warn(f"{star_path}: its rlnImageOriginalName names images that are not there (such as {first}, looked for "
         "from where its image names start, the current folder and the star's folder and parents): the trail "
         "back to the extracted images is lost. The output's rlnImageOriginalName and dsub/original_path name "
         "them as given; run from RELION's project folder, or fix the earlier star's rlnImageOriginalName, to "
         "keep it.")
    return given


def star_original_images(names, base: Path | None, links: Path, star_path=None) -> StackRefs:
    """``N@path`` names ((n,) str, a Series) as ``StackRefs``: paths absolute (relative ones from ``base``; as
    given where ``base`` is None), those through the symbolic links under ``links`` (``original_stack_links``)
    followed to their stacks.

    Raises ``InputFileError`` (naming ``star_path``) for a name that is not ``N@path`` with N >= 1.
    """
    from ..formats.paths import PATH_CODE_ROWS, path_codes

    names = np.asarray(names, dtype=object)
    codes = np.empty(names.size, dtype=np.int32)
    indices = np.empty(names.size, dtype=np.int64)
    position: dict = {}
    for start in range(0, names.size, PATH_CODE_ROWS):  # a block at a time: no fixed-width text of every row
        parts = np.char.partition(names[start : start + PATH_CODE_ROWS].astype(str), "@")
        numbers, stacks = parts[:, 0], parts[:, 2]
        valid = (parts[:, 1] == "@") & (stacks != "") & np.char.isdigit(numbers)
        block = np.where(valid, numbers, "0").astype(np.int64) - 1
        if not valid.all() or np.any(block < 0):
            bad = str(names[start + np.flatnonzero(~valid | (block < 0))[0]])
            raise InputFileError(star_path, f"names the original image {bad!r} in rlnImageOriginalName, which "
                                 "is not N@stack (N from 1).",
                                 "Give the star the earlier dsub run wrote as it is, or drop its rlnImageOriginalName.")
        block_codes, block_stacks = path_codes(stacks)
        mapping = np.asarray([position.setdefault(stack, len(position)) for stack in block_stacks], dtype=np.int32)
        codes[start : start + PATH_CODE_ROWS] = mapping[block_codes]
        indices[start : start + PATH_CODE_ROWS] = block
    uniques = list(position)
    resolved = []
    for path in uniques:
        if base is None:
            resolved.append(str(path))
            continue
        absolute = os.path.normpath(os.path.join(base, str(path)))
        if os.path.islink(absolute) and is_inside(absolute, links):
            absolute = os.path.realpath(absolute)
        resolved.append(absolute)
    return StackRefs(resolved, codes, indices)


def written_original_paths(absolute, outdir: Path, paths_mode: str, base) -> np.ndarray:
    """How the .cs names original stacks (``absolute``: (k,) absolute paths): from the folder its ``blob/path``
    start from (``formats.paths.written_base``), as ``written_paths`` writes the new stacks; with ``--paths
    auto`` a stack outside that folder stays absolute, as with ``--paths outdir`` (the originals lie outside
    OUTDIR, so names from it would break when OUTDIR moves). A relative path (an original not found,
    ``chained_star_originals``) is written as given."""
    start = None if paths_mode == "outdir" else written_base(outdir, paths_mode, base)
    written = []
    for path in np.asarray(absolute, dtype=object).astype(str):
        if not os.path.isabs(path):
            written.append(path)
            continue
        inside = start is not None and (paths_mode == "relative" or is_inside(path, start))
        written.append(os.path.relpath(path, start) if inside else path)
    return np.array(written, dtype=object)


def original_stack_links(originals: StackRefs, outdir: Path) -> StackRefs | None:
    """For a cryoSPARC input: a ``.mrcs`` link in ``OUTDIR/Originals`` to each stack of ``originals`` (absolute
    paths: ``original_images``), made here; returns each particle's original image under its link's name
    (paths relative to OUTDIR), for ``rlnImageOriginalName``.

    None where the stacks are all named ``.mrcs`` already, or some are not found
    (``chained_star_originals``). Not for a plain star input, whose own stacks
    are kept, as RELION named them.

    cryoSPARC names its particle stacks ``.mrc``. RELION reads ``N@NAME.mrc``
    as a stack only where the caller says the file holds 2D images
    (``Image::read(..., is_2D=true)``), as ``relion_particle_subtract --revert``
    does when it reads one image's header for the box size; everywhere else,
    among them the particle reads of a refinement or classification
    (``MlOptimiser``: ``readFromOpenFile(fn_img, hFile, -1, false)``), it stops
    with "stacks of images in MRC-format should have extension .mrcs; .mrc
    extensions are reserved for 3D maps" (3dem/relion ``src/image.h``,
    ``Image::_read``; ``src/particle_subtractor.cpp``, ``revert``;
    ``src/ml_optimiser.cpp``; commit 73f0a3c0). So the star that ``--revert``
    writes from ours would name images no refinement opens. pyem's
    ``csparc2star`` keeps the ``.mrc`` names (``star.simplify_star_ucsf``), and
    its author's advice for RELION is links named ``.mrcs``
    (asarnow/pyem#48: "the files are really called .mrc by cryoSPARC.
    Unfortunately, Relion insists on .mrcs"), which is what is made here.

    Each link is named after the stack's path below the folder all the input
    stacks share, its ``.mrc`` ending made ``.mrcs`` (``J19/extract/x_particles.mrc``
    → ``Originals/J19/extract/x_particles.mrcs``), so two stacks of one name in
    different jobs get different links. A link points to its stack by a
    relative path (as RELION's own links do), so a project folder moved or
    mounted elsewhere as a whole keeps them working. A link that is there
    already is kept if it points to the same stack, else replaced; links in
    ``Originals`` to stacks this input does not name (an earlier input's,
    before ``--overwrite``) are removed. Where this file system makes no
    symbolic links the names stay the ``.mrc`` paths, with a warning.
    """
    codes = originals.codes
    if not all(os.path.isabs(str(path)) for path in originals.paths):  # not found: named as given
        return None
    stacks = [os.path.abspath(str(path)) for path in originals.paths]
    if not stacks or all(stack.lower().endswith(".mrcs") for stack in stacks):
        return None
    shared = os.path.commonpath(stacks) if len(stacks) > 1 else os.path.dirname(stacks[0])
    links = []
    for stack in stacks:
        below = os.path.relpath(stack, shared)
        links.append(f"{ORIGINALS_FOLDER}/{below}s" if below.lower().endswith(".mrc") else
                     f"{ORIGINALS_FOLDER}/{below}" if below.lower().endswith(".mrcs") else
                     f"{ORIGINALS_FOLDER}/{below}.mrcs")
    try:
        for stack, link in zip(stacks, links):
            where = Path(outdir) / link
            make_link(where, os.path.relpath(stack, os.path.abspath(where.parent)))
        remove_other_links(Path(outdir) / ORIGINALS_FOLDER, {Path(outdir) / link for link in links})
    except OSError as exc:
        warn(f"{Path(outdir) / ORIGINALS_FOLDER}: the .mrcs links to the input's .mrc stacks could not be made "
             f"({exc.strerror or exc}); rlnImageOriginalName names the .mrc stacks, which RELION reads as maps, "
             "not stacks (link them as NAME.mrcs by hand for relion_particle_subtract --revert)")
        links = [os.path.relpath(stack, os.path.abspath(outdir)) for stack in stacks]
    return StackRefs(links, codes, originals.indices)


def make_link(link: Path, target: str) -> None:
    """A symbolic link ``link`` → ``target``, replacing one that points elsewhere (made beside it, then renamed)."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    fresh = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    fresh.unlink(missing_ok=True)
    os.symlink(target, fresh)
    os.replace(fresh, link)


def remove_other_links(folder: Path, kept: set) -> None:
    """Remove the symbolic links under ``folder`` that are not in ``kept`` (never a file or a folder itself)."""
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and path not in kept:
            path.unlink()


def original_image_names(table) -> np.ndarray:
    """Each particle's input image as ``N@path`` (1-based), as the input named it where possible."""
    source = table.source
    if table.source_format == "star" and source is not None and "rlnImageName" in source["particles"]:
        return source["particles"]["rlnImageName"].astype(str).to_numpy(dtype=object)
    return np.array([f"{i + 1:06d}@{p}" for i, p in zip(table.image_indices, table.image_paths)], dtype=object)
