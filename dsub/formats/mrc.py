"""MRC maps and image stacks, through ``mrcfile``.

A stack's header is read once per process (``stack_layout``, cached), and its
images with ``os.preadv`` into the caller's array: no stack is memory-mapped, so
what a process maps does not grow with the stacks it reads (an address-space
limit, ``ulimit -v``, counts a map's full size). Images come back as float32
whatever the file's mode (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from dsub import __version__ as dsub_version
from dsub.errors import InputFileError, MissingInputError

#: MRC modes dsub reads as real images: int8, int16, float32, uint16, float16.
READABLE_MODES = (0, 1, 2, 6, 12)
#: Bytes per voxel of every MRC mode (101 packs two 4-bit voxels in a byte).
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2, 101: 0.5}
_HEADER_BYTES = 1024
_COMPRESSED = (b"\x1f\x8b", b"BZh")  # gzip, bzip2
_NOT_MRC_FIX = {
    "stack": "Check that the particle metadata points at the extracted .mrcs stacks (a text file or an "
             "incomplete download is no stack).",
    "map": "Give a map in MRC format (.mrc).",
}
_TRUNCATED_FIX = "Copy the file again or re-extract it: an interrupted transfer or a full disk leaves such files."
_STACK_CACHE_SIZE = 4096  # stack layouts kept per process (a few hundred bytes each)
#: The one text label of every MRC file dsub writes. mrcfile's own first label holds the time the file was
#: created, so two runs of one command (or a run and its resumption) would write stacks equal in their images
#: but not byte for byte; this one has no time. RELION and cryoSPARC do not read labels.
CREATED_BY = f"Created by dsub (version {dsub_version})"


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map: (float32 array indexed z, y, x; voxel size in Å).

    A voxel size of 0 in the header is returned as 0.0: the caller decides
    whether to take it from the particles instead.
    """
    path = Path(path)
    if path.is_dir():
        raise InputFileError(path, "is a folder, not a map file.", "Give the .mrc file itself.")
    if not path.is_file():
        raise MissingInputError(path)
    check_mrc_file(path, "map")
    try:
        with mrcfile.open(path, mode="r") as mrc:
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = mrc.voxel_size
    except (ValueError, OSError) as exc:
        raise InputFileError(
            path, f"is not a readable MRC file ({exc}).", "Give a map in MRC format (.mrc)."
        ) from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputFileError(
            path,
            f"is not a cubic 3D map (data shape {data.shape}).",
            "dsub needs maps and masks of N x N x N voxels, the particles' box size.",
        )
    sizes = {float(voxel.x), float(voxel.y), float(voxel.z)}
    if len(sizes) != 1:
        raise InputFileError(
            path,
            f"has different voxel sizes along x, y, z ({voxel.x}, {voxel.y}, {voxel.z}) Å.",
            "Resample the map to cubic voxels.",
        )
    return data, sizes.pop()


def map_header(path: str | os.PathLike) -> tuple[int, float]:
    """(box in voxels along x, voxel size in Å) of a map, from its header alone (0.0 when unset)."""
    check_mrc_file(path, "map")
    try:
        with mrcfile.open(path, mode="r", header_only=True) as mrc:
            return int(mrc.header.nx), float(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise InputFileError(path, f"is not a readable MRC header ({exc}).", "Give a map in MRC format.") from exc


def _plausible_header(raw: bytes) -> np.ndarray | None:
    """The 1024-byte header read in the byte order that makes sense of it, or None if none does."""
    stamp = raw[212:214]
    orders = (">", "<") if stamp == b"\x11\x11" else ("<", ">")
    for order in orders:
        header = np.frombuffer(raw, dtype=mrcfile.dtypes.HEADER_DTYPE.newbyteorder(order))[0]
        dims = (int(header["nx"]), int(header["ny"]), int(header["nz"]))
        if int(header["mode"]) in _MODE_BYTES and min(dims) > 0 and int(header["nsymbt"]) >= 0:
            return header
    return None


def image_shape(path: str | os.PathLike) -> tuple[int, int] | None:
    """(ny, nx) of an MRC image (a micrograph) from its 1024-byte header; None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
    except OSError:
        return None
    header = _plausible_header(raw) if len(raw) == _HEADER_BYTES else None
    return None if header is None else (int(header["ny"]), int(header["nx"]))


def check_mrc_file(path: str | os.PathLike, kind: str = "stack") -> None:
    """Check an MRC file's header against its size without reading the data.

    Reads only the 1024-byte header, so it is cheap for any stack. Refuses, with
    a message naming the file, what is no MRC at all (a text file saved as
    .mrcs) and a file shorter than its header says (an interrupted copy).
    ``kind`` is "stack" or "map"; a gzip or bzip2 map is left to mrcfile.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
    if raw.startswith(_COMPRESSED):
        if kind == "map":
            return
        raise InputFileError(path, "is a compressed (gzip or bzip2) stack, which cannot be memory-mapped.",
                             "Decompress it (gunzip, bunzip2) and point the metadata at the result.")
    header = _plausible_header(raw) if len(raw) == _HEADER_BYTES else None
    if header is None:
        what = (f"{size} bytes, shorter than an MRC header" if len(raw) < _HEADER_BYTES
                else "its first 1024 bytes are no MRC header: no 'MAP ' ID, unknown data mode")
        raise InputFileError(path, f"is not a readable MRC {'image stack' if kind == 'stack' else 'file'} ({what}).",
                             _NOT_MRC_FIX[kind])
    nx, ny, nz, mode, extended = (int(header[name]) for name in ("nx", "ny", "nz", "mode", "nsymbt"))
    section_bytes = int(np.ceil(nx * ny * _MODE_BYTES[mode]))
    expected = _HEADER_BYTES + extended + nz * section_bytes
    if size < expected:
        if kind == "stack":
            whole = max(0, size - _HEADER_BYTES - extended) // section_bytes
            says, holds = f"{nz} images of {nx}x{ny} px", f"{size} bytes ({whole} whole images)"
        else:
            says, holds = f"a map of {nx}x{ny}x{nz} voxels", f"{size} bytes"
        raise InputFileError(path, f"is truncated: its header says {says}, {expected} bytes, but the file "
                             f"holds only {holds}.", _TRUNCATED_FIX)


@dataclass(frozen=True)
class StackLayout:
    """Where an image stack's images lie in its file, from its header: nothing of the file is mapped.

    ``shape``: (n, ny, nx) (a 2D file is a stack of one); ``dtype``: the images'
    as stored (byte order included); ``offset``: bytes before the first image.
    """

    filename: str
    shape: tuple
    dtype: np.dtype
    offset: int

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize


def stack_layout(path: str | os.PathLike) -> StackLayout:
    """The ``StackLayout`` of an image stack, from its header (checked: ``check_mrc_file``).

    Cached per process by path, file size and modification time, so a
    rewritten file is read afresh. Nothing is memory-mapped: a map of a whole
    stack counts against an address-space limit (``ulimit -v``) for its full
    size, and the QC report's sample, a few images spread over every output
    stack, had them all mapped at once (49 stacks, 0.8 GB for 37 MB read).
    """
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise MissingInputError(path) from None
    return _stack_layout_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_STACK_CACHE_SIZE)
def _stack_layout_cached(path: str, size: int, mtime_ns: int) -> StackLayout:
    """``path``'s ``StackLayout`` from its header; dtype and shape by mrcfile's own rules (``mrcfile.utils``).

    The file is not opened through ``mrcfile``, whose permissive mode reports
    through ``warnings``: catching them is process-wide and not thread-safe, and
    stacks are opened from background threads (the read-ahead, the QC report's
    preparation) while the run's own warnings are being captured.
    """
    check_mrc_file(path, "stack")
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
    header = np.frombuffer(raw, dtype=_plausible_header(raw).dtype).view(np.recarray)[0]  # as mrcfile keeps it
    mode = int(header["mode"])
    if mode not in READABLE_MODES:
        raise InputFileError(
            path,
            f"has MRC mode {mode}; dsub reads real-valued images in modes {READABLE_MODES}.",
            "Convert the stack to float32 (mode 2).",
        )
    try:
        dtype = np.dtype(mrcfile.utils.data_dtype_from_header(header))
        shape = tuple(int(n) for n in mrcfile.utils.data_shape_from_header(header))
    except (ValueError, OSError) as exc:
        raise InputFileError(path, f"is not a readable MRC image stack ({exc}).", "Give .mrcs/.mrc stacks.") from exc
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise InputFileError(path, f"has {len(shape)}-dimensional data, not an image stack.")
    return StackLayout(path, shape, dtype, _HEADER_BYTES + int(header["nsymbt"]))


def read_images(paths, indices, into=None) -> np.ndarray:
    """Images ``indices[i]`` (0-based) of stacks ``paths[i]``, float32 (n, ny, nx).

    Reads each stack once, in index order within the stack, so chunks of
    particles that share stacks touch each file sequentially; each run of
    consecutive images is one ``os.preadv`` (``_copy_images``), which also reads
    a few images spread over large stacks (the QC report's sample) without the
    read-ahead around each page fault of a memory map (about 2 MB measured).
    ``into(shape)``: the float32 C-contiguous array of ``shape`` to read into
    (a buffer the caller reuses); None: a new array.
    """
    paths = np.asarray(paths, dtype=object)
    indices = np.asarray(indices, dtype=np.int64)
    if paths.shape != indices.shape or paths.ndim != 1:
        raise ValueError("paths and indices must be 1D and of equal length")
    out: np.ndarray | None = None
    for path in dict.fromkeys(paths.tolist()):
        rows = np.flatnonzero(paths == path)
        stack = stack_layout(path)
        wanted = indices[rows]
        bad = wanted[(wanted < 0) | (wanted >= stack.shape[0])]
        if bad.size:
            raise InputFileError(
                path,
                f"image index {int(bad[0]) + 1} (1-based) is beyond the stack's "
                f"{stack.shape[0]} images.",
                "Check the particle file's image names (N@stack) or blob/idx against the stack.",
            )
        if out is None:
            shape = (len(paths),) + stack.shape[1:]
            out = np.empty(shape, dtype=np.float32) if into is None else into(shape)
        elif stack.shape[1:] != out.shape[1:]:
            raise InputFileError(
                path,
                f"holds {stack.shape[2]}x{stack.shape[1]} images; other stacks of the same "
                f"particles hold {out.shape[2]}x{out.shape[1]}.",
                "All particles of one run must have the same box size.",
            )
        order = np.argsort(wanted, kind="stable")
        _copy_images(stack, wanted[order], out, rows[order])
    if out is None:
        return np.empty((0, 0, 0), dtype=np.float32)
    return out


def _runs(sorted_indices: np.ndarray) -> list[tuple[int, int]]:
    """(first, stop) positions of the runs of consecutive values in ``sorted_indices``."""
    breaks = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
    edges = np.concatenate(([0], breaks, [sorted_indices.size]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _copy_images(stack: StackLayout, indices: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
    """``out[rows] = stack[indices]`` as float32, ``indices`` ascending; each run of consecutive images one
    ``os.preadv``.

    A memory map faults its pages in 4 kB at a time; one ``preadv`` per run of
    consecutive images asks the kernel for the whole run at once, several
    times faster from the page cache and from a disk alike. Native float32
    images are read straight into ``out`` where their rows follow each other
    there; others through a buffer in the file's dtype, converted as copied.
    """
    direct = stack.dtype == np.dtype(np.float32) and out.flags.c_contiguous
    fd = os.open(stack.filename, os.O_RDONLY)
    try:
        for first, stop in _runs(indices):
            targets = rows[first:stop]
            into_place = direct and targets[-1] - targets[0] == stop - first - 1
            buffer = (out[targets[0] : targets[-1] + 1] if into_place
                      else np.empty((stop - first,) + stack.shape[1:], dtype=stack.dtype))
            _read_exactly(fd, memoryview(buffer).cast("B"), stack.offset + int(indices[first]) * stack.image_bytes,
                          stack.filename)
            if not into_place:
                out[targets] = buffer
    finally:
        os.close(fd)


def _read_exactly(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset`` of the open file ``fd``; an ``InputFileError`` if the file ends first."""
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise InputFileError(name, "ended before the images its header promises (truncated while read?).",
                                 _TRUNCATED_FIX)
        view, offset = view[got:], offset + got


def write_stack(
    path: str | os.PathLike,
    data_or_shape,
    voxel_size: float,
    *,
    mrc_mode: int = 2,
):
    """Create an image stack ``path`` and return its open, writable ``MrcMemmap``.

    ``data_or_shape`` is either the images (n, ny, nx), written at once, or the
    shape to allocate and fill afterwards through ``mrc.data``. ``mrc_mode`` is
    2 (float32) or 12 (float16, read by RELION >= 4.0 and cryoSPARC >= 4.4).
    Use as ``with write_stack(...) as mrc:``; call ``mrc.update_header_stats()``
    after filling if the statistics matter. The header holds no time
    (``CREATED_BY``): the same images and voxel size give the same bytes.
    """
    if mrc_mode not in (2, 12):
        raise ValueError(f"mrc_mode must be 2 (float32) or 12 (float16), not {mrc_mode}")
    data = None
    if isinstance(data_or_shape, np.ndarray):
        data = data_or_shape if data_or_shape.ndim == 3 else data_or_shape[np.newaxis]
        shape = data.shape
    else:
        shape = tuple(int(s) for s in data_or_shape)
    if len(shape) != 3:
        raise ValueError(f"an image stack has shape (n, ny, nx), not {shape}")
    mrc = mrcfile.new_mmap(path, shape, mrc_mode=mrc_mode, overwrite=True)
    # set_image_stack() first: voxel size is cella / m{x,y,z}, and a stack has mz = 1.
    mrc.set_image_stack()
    mrc.voxel_size = float(voxel_size)
    _label_as_dsub(mrc)
    if data is not None:
        mrc.data[...] = data
        mrc.update_header_stats()
    return mrc


def write_map(path: str | os.PathLike, volume: np.ndarray, voxel_size: float) -> None:
    """Write a 3D map (z, y, x) as float32 MRC with voxel size ``voxel_size`` Å."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"a map is 3D, not shape {volume.shape}")
    with mrcfile.new(path, data=volume, overwrite=True) as mrc:
        mrc.voxel_size = float(voxel_size)
        mrc.update_header_stats()
        _label_as_dsub(mrc)


def _label_as_dsub(mrc) -> None:
    """Make ``CREATED_BY`` the header's only text label, in place of mrcfile's time-stamped one."""
    mrc.header.label[:] = b""
    mrc.header.label[0] = CREATED_BY.encode("ascii")
    mrc.header.nlabl = 1
