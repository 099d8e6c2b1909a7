"""Fourier-slice projection of a 3D map, with RELION's geometry.

The 2D transform of a projection at image frequency ``k = (kx, ky)`` (cycles
per box) equals the 3D transform of the map at ``Aᵀ·(kx, ky, 0)``, where ``A``
is RELION's rotation (map frame -> image frame; any 3x3 matrix is accepted, so
magnification can be folded into its rows) and the real-space projection is the
line *sum* along the beam. A map is prepared once (``prepare_volume``): divided
by its interpolation kernel's transform (``gridding.py``), zero-padded to a grid
of ``P`` ≥ oversampling · box points, and transformed. Slices are read off that
grid with the kernel (``extract_slices``), one value per box-grid frequency.

Two projectors:

* ``relion``: trilinear interpolation at padding 2, RELION's model
  (``Projector::project``), the parity mode.
* ``gridding`` (default): a Kaiser-Bessel kernel of width 4 at oversampling
  1.25, β 1.3 times Beatty's.

Choice of the default, measured against a finufft type-2 transform (tolerance
1e-9) at the exact slice points of the real map EMD-3488 (box 100 padded to 128,
1.05 Å, masked by a soft sphere off-centre), as ``||P - P_oracle|| / ||P_oracle||``
inside the Nyquist circle (benchmarks/projector_oracle.py; table in
benchmarks/README.md): trilinear leaves 0.74 % at padding 2 and 0.33 % at padding
3; Kaiser-Bessel at σ 1.25 leaves 2.1 / 0.37 / 0.06 % at width 3 / 4 / 5 with
Beatty's β, and 0.84 / 0.068 / 0.004 % with β × 1.3 (the larger β lowers the
kernel's side lobes, which alias; beyond about × 1.4 the fall-off of its
transform across the box costs more, most where the map fills the box). Width 4
at σ 1.25 with β × 1.3 is the cheapest setting under the 0.2 % target with a
margin of three (0.073 % at worst over the masked and whole map at box 100 and
128): 64 taps per point, and a grid of 1.25³ box³ that keeps both half sets'
four prepared maps at 4.3 GB for box 512 (trilinear at padding 3: 78.7 GB).
σ 1.5 would reach 0.02 % but needs 7.3 GB at box 512.

Outside the Nyquist circle (the spectrum's corners) the slice holds either the
map's content where the 3D point lies inside the map's Nyquist cube (``corners =
"map"``), or nothing (``"zero"``, as RELION); see ``slice_coordinates``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec

import numpy as np

from .backend import fft_module
from .ctf import frequency_grid
from .gridding import GriddingKernel, grid_size, gridding_profile, kaiser_bessel

PROJECTORS = ("gridding", "relion")
CORNERS = ("map", "zero")
#: RELION's padding factor (``--pad 2`` of relion_project / relion_particle_subtract).
RELION_PADDING = 2
#: The default projector's kernel: width, oversampling and β relative to Beatty's (module docstring).
GRIDDING_WIDTH = 4
GRIDDING_OVERSAMPLING = 1.25
GRIDDING_BETA_SCALE = 1.3
#: Projectors whose half-map models keep their prepared maps in float16 on a GPU (``prepare_volumes``;
#: ``subtract.prepare_half_map``): the default; ``relion`` keeps RELION's single precision.
FLOAT16_PROJECTORS = ("gridding",)


def projector_kernel(projector: str, oversampling: float | None = None, width: int | None = None):
    """(kernel, oversampling) of a projector, with its defaults where a value is None."""
    if projector == "relion":
        return GriddingKernel("trilinear", 2), float(oversampling or RELION_PADDING)
    if projector == "gridding":
        oversampling = float(oversampling or GRIDDING_OVERSAMPLING)
        beatty = kaiser_bessel(int(width or GRIDDING_WIDTH), oversampling)
        return GriddingKernel(beatty.kind, beatty.width, GRIDDING_BETA_SCALE * beatty.beta), oversampling
    raise ValueError(f"projector must be one of {PROJECTORS}, not {projector!r}")


@dataclass
class PreparedVolume:
    """The oversampled 3D rfft of a map (axes z, y, x), ready for slicing.

    ``transform`` is complex64 of shape (P, P, P//2 + 1 + 2·reach): the rfft
    along x extended by ``reach`` columns on both sides from Hermitian symmetry,
    so column ``reach + x`` holds frequency x for x in [-reach, P/2 + reach].
    Where a map is stored in float16 (``prepare_volumes``, on CuPy) it is
    float16 of shape (P, P, P//2 + 1 + 2·reach, 2), real and imaginary parts,
    and ``scale`` (a power of two) times its values is the transform.
    """

    transform: object
    box: int
    kernel: GriddingKernel
    scale: float = 1.0
    #: On a GPU, the pair this map belongs to in a 3D texture as well (``_slice_cuda.PairTexture``), or None
    texture: object = None

    @property
    def grid_size(self) -> int:
        return int(self.transform.shape[0])


def prepared_shape(box: int, kernel: GriddingKernel, oversampling: float) -> tuple:
    """Shape of ``PreparedVolume.transform`` for a map of ``box``³."""
    size = grid_size(box, oversampling)
    return (size, size, size // 2 + 1 + 2 * kernel.reach)


def prepare_volume(xp, volume, kernel: GriddingKernel, oversampling: float, out=None) -> PreparedVolume:
    """Grid-correct, zero-pad to P = grid_size(box, oversampling) and transform a cubic map (z, y, x).

    The transform is ``rfftn`` of the corrected map centred in a zero P³ grid
    and ``ifftshift``-ed (its centre voxel at index 0), done axis by axis inside
    the result without transforming the zeros: along x the box² rows that hold
    the map, one z plane at a time; along y the box planes; along z the whole
    half spectrum (in place on NumPy). Single precision throughout. ``out``
    (NumPy): a zero-filled complex64 array (or view) of ``prepared_shape`` to
    fill instead of a new one (on CuPy too). Raises ValueError for a map that is not cubic or
    an ``out`` of another shape. Working memory beside the result
    (P²·(P/2 + 2·reach + 1) complex64): one plane's rows on NumPy, on CuPy a
    copy of the result's size for the last two axes' transforms.
    """
    box = int(volume.shape[0])
    if volume.ndim != 3 or volume.shape != (box, box, box):
        raise ValueError(f"volume must be cubic, got shape {tuple(volume.shape)}")
    shape = prepared_shape(box, kernel, oversampling)
    size, reach = shape[0], kernel.reach
    fft = fft_module(xp)
    in_place = {"overwrite_x": True} if xp.__name__ == "numpy" else {}
    volume = xp.asarray(volume, dtype="float32")
    inverse = xp.asarray(1.0 / gridding_profile(kernel, box, size), dtype="float32")
    # Voxel v (offset v - box//2 from the centre) lands at index (v - box//2) mod P on each axis:
    # the upper part of the map at the grid's start, the lower part at its end.
    parts = ((slice(box // 2, box), slice(0, box - box // 2)), (slice(0, box // 2), slice(size - box // 2, size)))
    if out is None:
        transform = xp.zeros(shape, dtype="complex64")
    elif tuple(out.shape) != shape or out.dtype != np.complex64:
        raise ValueError(f"out must be complex64 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    else:
        transform = out
    half = transform[:, :, reach : reach + size // 2 + 1]
    rows = xp.zeros((box, size), dtype="float32")
    plane_correction = inverse[:, None] * inverse[None, :]
    for v in range(box):
        corrected = volume[v] * (plane_correction * inverse[v])
        for source, target in parts:
            rows[:, target] = corrected[:, source]
        spectra = fft.rfft(rows, axis=1)  # (box, P/2 + 1): this plane's rows along x
        plane = half[(v - box // 2) % size]
        for source, target in parts:
            plane[target] = spectra[source]
    del rows, spectra
    for _, target in parts:  # along y, the planes that hold the map
        planes = half[target]
        transformed = fft.fft(planes, axis=1, **in_place)
        if not _same_memory(xp, transformed, planes):
            planes[...] = transformed
    transformed = fft.fft(half, axis=0, **in_place)  # along z, everything
    if not _same_memory(xp, transformed, half):
        half[...] = transformed
    del transformed
    # F[z, y, x] = conj(F[-z, -y, -x]) fills the columns outside the half space.
    for column in range(1, reach + 1):
        for target, source in ((reach - column, column), (reach + size // 2 + column, size // 2 - column)):
            transform[:, :, target] = xp.conj(xp.roll(half[::-1, ::-1, source], (1, 1), axis=(0, 1)))
    return PreparedVolume(transform=transform, box=box, kernel=kernel)


def prepare_volumes(xp, volumes, kernel: GriddingKernel, oversampling: float, float16: bool = False) -> tuple:
    """``prepare_volume`` of several maps of one box (z, y, x), in order: a tuple of ``PreparedVolume``.

    On CuPy, and on NumPy with numba installed (the compiled gather), two maps are
    prepared side by side: their transforms are the two halves of one array
    (P, P, C, 2) complex64 (views of ``prepared_shape``), so the slice kernels
    (``_slice_cuda.extract_slice_pair_cuda``, ``_slice_cpu.extract_slices_of_numba``)
    read both maps' taps of a point in one load; the values are those of
    ``prepare_volume``. On NumPy that array lies on 4 kB pages (``small_page_zeros``).
    Elsewhere (no numba, another count) each map has its own array. numba is
    found here, not imported (its import belongs to the first slice). On CuPy a
    complex64 pair of ``pair_in_texture``'s size is also copied into a 3D texture
    (``pair_texture``; each volume's ``texture``), which the pair's slices read.

    ``float16``: every value rounded to float16 after scaling each map by the power
    of two that puts its largest part in (2¹⁴, 2¹⁵] (``rounded_to_float16``): on CuPy
    the two maps side by side are then stored so, one float16 array (P, P, C, 4) of
    half the bytes (each map a (P, P, C, 2) view, ``PreparedVolume.scale`` undoing the
    scaling), which halves the slice kernel's memory traffic; on NumPy the rounded
    values are kept in complex64, so both give the same values. The rounding's
    relative error is 2⁻¹² at most a value; over a slice's taps it averages to about
    1e-4 of the slice's norm in every frequency shell (real map, box 256 and 512,
    BENCHMARKS.md), beside the default projector's 6.8e-4 (module docstring).
    """
    paired = xp.__name__ == "cupy" or (xp.__name__ == "numpy" and find_spec("numba") is not None)
    if len(volumes) != 2 or not paired:
        prepared = tuple(prepare_volume(xp, volume, kernel, oversampling) for volume in volumes)
        return tuple(rounded_to_float16(xp, p) for p in prepared) if float16 else prepared
    box = int(volumes[0].shape[0])
    shape = prepared_shape(box, kernel, oversampling) + (2,)
    pair = small_page_zeros(shape, np.complex64) if xp.__name__ == "numpy" else xp.zeros(shape, dtype=np.complex64)
    prepared = tuple(prepare_volume(xp, volume, kernel, oversampling, out=pair[..., i])
                     for i, volume in enumerate(volumes))
    if not float16:
        texture = pair_texture(xp, pair) if xp.__name__ == "cupy" and pair_in_texture(pair.nbytes) else None
        return prepared if texture is None else tuple(dataclasses.replace(p, texture=texture) for p in prepared)
    if xp.__name__ == "numpy":
        return tuple(rounded_to_float16(xp, p) for p in prepared)
    parts = pair.view(np.float32)  # (P, P, C, 4): each map's real and imaginary parts
    exponents = [float16_exponent(xp, parts[..., 2 * i : 2 * i + 2]) for i in range(2)]
    stored = xp.empty(parts.shape, dtype=np.float16)
    for start in range(0, len(parts), _PLANES):  # a few planes at a time: no copy of the whole pair
        for i, exponent in enumerate(exponents):
            stored[start : start + _PLANES, ..., 2 * i : 2 * i + 2] = (
                parts[start : start + _PLANES, ..., 2 * i : 2 * i + 2] * np.float32(2.0**exponent))
    del pair, parts, prepared
    return tuple(PreparedVolume(transform=stored[..., 2 * i : 2 * i + 2], box=box, kernel=kernel,
                                scale=2.0**-exponent) for i, exponent in enumerate(exponents))


#: Complex64 pairs larger than the first and up to the second size are also copied into a 3D texture on a
#: GPU (``prepare_volumes``).
PAIR_TEXTURE_BYTES = (256 * 2**20, 4 * 2**30)


def pair_in_texture(pair_bytes: int) -> bool:
    """Whether a complex64 pair of ``pair_bytes`` is also kept in a 3D texture on a GPU (``prepare_volumes``).

    The slice kernel then reads its taps through the texture cache, whose layout
    keeps neighbouring grid points along y and z close as well as along x: on an
    H200 the pair's slices (``relion``, padding 2, box 256, 1 024 particles) took
    1.67 instead of 2.08 ms, box 384 1.93 instead of 2.47 (BENCHMARKS.md), with the
    same values (point sampling: no interpolation by the hardware). The copy costs
    the pair's size again, so larger pairs (box 512 at padding 2: 8.6 GB) are read
    where they lie; a pair the 50 MB L2 cache holds much of (box 128: 0.14 GB) gains
    nothing (its engine ran at 272 904/s back to back through the texture). The
    default's float16 pair read through a texture of 16-bit texels was slower (its
    64-tap slices 3.98 against 3.29 ms at box 256), so it is not copied.
    """
    low, high = PAIR_TEXTURE_BYTES
    return low < int(pair_bytes) <= high


def pair_texture(cupy, pair):
    """``_slice_cuda.PairTexture`` of a complex64 pair on a GPU, or None where this GPU's 3D textures cannot
    hold its grid or there is no room for the copy (after CuPy's pool gave back its free blocks): its slices
    are then read where the pair lies, the same values a little slower."""
    from ._slice_cuda import PairTexture, texture_fits

    if not texture_fits(pair):
        return None
    for _ in range(2):
        try:
            return PairTexture(pair)
        except cupy.cuda.runtime.CUDARuntimeError as error:  # the array lies outside CuPy's pool
            if "cudaErrorMemoryAllocation" not in str(error):
                raise
            cupy.get_default_memory_pool().free_all_blocks()
    return None


def small_page_zeros(shape, dtype) -> np.ndarray:
    """A zero-filled NumPy array of ``shape`` and ``dtype`` on 4 kB pages: a memory map of its own.

    NumPy asks Linux for transparent huge pages for every large array
    (``madvise(MADV_HUGEPAGE)``). Where the machine's memory is backed only when
    first used (a virtual machine whose host takes back free memory), each huge
    page handed over costs about 2 s of system time a GB, while 4 kB pages come
    mostly from memory the machine has used before: both half sets' prepared maps
    at box 256 with ``--projector relion`` (2.2 GB) took 6.5 s to set up on huge
    pages and 3.1-3.2 s on 4 kB pages, and the slice gather read them 4-7 % slower
    (BENCHMARKS.md, "RELION side by side on the CPU; maps on 4 kB pages"). A
    private anonymous map: its pages start as zeros and belong to this process
    alone, as NumPy's own memory. Elsewhere than Linux the hint is left out.
    """
    count = int(np.prod(shape))
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # Python's default is shared
    mapping = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), **private)
    no_huge_pages = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if no_huge_pages is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages refuses the hint: none to avoid
            mapping.madvise(no_huge_pages)
    # The mapping is the array's base, so views of the array (each map of a pair) have the array as theirs.
    return np.ndarray(shape, dtype=dtype, buffer=mapping)


#: ``float16_exponent`` scales a map's largest part into (FLOAT16_TOP / 2, FLOAT16_TOP]: float16's normal
#: numbers reach 65 504, and below 2⁻¹⁴ they lose precision, so the largest values sit near the top.
FLOAT16_TOP = 2.0**15


def float16_exponent(xp, values) -> int:
    """The integer e for which ``2**e · max|values|`` lies in (FLOAT16_TOP / 2, FLOAT16_TOP] (0 for zeros)."""
    if not values.size:
        return 0
    largest = max(float(xp.abs(values[start : start + _PLANES]).max()) for start in range(0, len(values), _PLANES))
    if not largest > 0 or not np.isfinite(largest):
        return 0
    exponent = int(np.floor(np.log2(FLOAT16_TOP / largest)))
    return exponent - 1 if largest * 2.0**exponent > FLOAT16_TOP else exponent


def rounded_to_float16(xp, prepared: PreparedVolume) -> PreparedVolume:
    """``prepared`` with each value rounded as float16 storage rounds it (``prepare_volumes``), in place.

    The complex64 transform's parts are scaled by ``2**float16_exponent``, rounded to
    float16 (round to nearest even, as CuPy's cast) and scaled back: exact in float32.
    On NumPy where numba imports, in one compiled pass (``_float16_cpu``: NumPy's
    cast to float16 took 2.8 s of a worker's 4.4 s set-up at box 256), the same values.
    """
    transform = prepared.transform
    if transform.flags.c_contiguous:  # (P, P, C) complex64: its parts (P, P, C, 2)
        whole, columns = transform.view(np.float32).reshape(transform.shape + (2,)), slice(0, 2)
    else:  # one map of a side-by-side pair: its parts are every other pair of the pair's floats
        pair = transform.base
        if (pair is None or pair.ndim != 4 or pair.shape[3] != 2 or pair.dtype != np.complex64
                or not pair.flags.c_contiguous):
            raise ValueError("a prepared transform to round must be contiguous or one map of a side-by-side pair")
        whole, columns = pair.view(np.float32), _pair_index(transform)
    parts = whole[..., columns]
    exponent = float16_exponent(xp, parts)
    if xp.__name__ == "numpy":
        try:
            from ._float16_cpu import round_to_float16_in_place
        except (ImportError, RuntimeError):  # no numba (or nowhere to cache its code): NumPy's cast below
            pass
        else:
            round_to_float16_in_place(whole, columns, exponent)
            return prepared
    scale = np.float32(2.0**exponent)
    for start in range(0, len(parts), _PLANES):  # a few planes at a time: no copy of the whole map
        planes = parts[start : start + _PLANES]
        planes[...] = (planes * scale).astype(np.float16).astype(np.float32) / scale
    return prepared


#: Planes of a prepared map that ``rounded_to_float16`` and ``float16_exponent`` take at a time.
_PLANES = 8


def _pair_index(transform):
    """The slice of a side-by-side pair's float32 parts (P, P, C, 4) that holds ``transform``'s."""
    pair = transform.base
    offset = transform.__array_interface__["data"][0] - pair.__array_interface__["data"][0]
    return slice(offset // 4, offset // 4 + 2)


def _same_memory(xp, result, target) -> bool:
    """Whether an FFT asked to overwrite its input wrote its result there (scipy.fft may, cupy.fft never)."""
    return xp.__name__ == "numpy" and np.shares_memory(result, target)


def slice_coordinates(xp, rotations, box: int, size: int, corners: str = "zero"):
    """3D points (cycles per box) of each particle's central slice on an rfft2 grid of ``size``.

    The grid samples the projection as it lies in a ``size``² field (frequency
    step box/size cycles per box). Returns ``(qx, qy, qz)``, each
    (n, size, size//2 + 1) float32, and the in-band mask: "zero" keeps
    frequencies within the Nyquist circle (RELION); "map" keeps every frequency
    whose 3D point lies inside the map's Nyquist cube, so the corners of the
    image spectrum get the map's content.
    """
    kx, ky = frequency_grid(xp, size)
    rot = xp.asarray(rotations, dtype="float32") * np.float32(box / float(size))
    # q = Aᵀ (kx, ky, 0) = kx * A[0, :] + ky * A[1, :]
    q = [kx[None] * rot[:, 0, axis, None, None] + ky[None] * rot[:, 1, axis, None, None] for axis in range(3)]
    if corners == "zero":
        in_band = ((kx * kx + ky * ky) <= (size / 2.0) ** 2)[None]
    elif corners == "map":
        limit = box / 2.0
        in_band = (xp.abs(q[0]) <= limit) & (xp.abs(q[1]) <= limit) & (xp.abs(q[2]) <= limit)
    else:
        raise ValueError(f"corners must be one of {CORNERS}, not {corners!r}")
    return q, in_band


def extract_slices(xp, prepared: PreparedVolume, rotations, corners: str = "zero", size: int | None = None):
    """Central slices of ``prepared`` on an rfft2 grid of ``size`` (default: the box), complex64
    (n, size, size//2 + 1).

    ``corners`` and ``size`` as in ``slice_coordinates``. On CuPy a CUDA kernel
    does the same arithmetic (``_slice_cuda.py``); on NumPy a numba kernel
    (``_slice_cpu.py``) where numba is installed, else the NumPy gather
    (``_extract_slices_numpy``).
    """
    if corners not in CORNERS:
        raise ValueError(f"corners must be one of {CORNERS}, not {corners!r}")
    size = prepared.box if size is None else int(size)
    if xp.__name__ == "cupy":
        from ._slice_cuda import extract_slices_cuda

        return extract_slices_cuda(prepared, rotations, corners, size)
    compiled = compiled_cpu_gather()
    if compiled is not None:
        return compiled(prepared, rotations, corners, size)
    return _extract_slices_numpy(xp, prepared, rotations, corners, size)


def extract_slices_of(xp, volumes, rotations, corners: str = "zero", size: int | None = None):
    """``extract_slices`` of several prepared volumes of one box and kernel: complex64
    (len(volumes), n, size, size//2 + 1).

    On NumPy with numba one compiled pass serves all the volumes
    (``_slice_cpu.extract_slices_of_numba``: each point's coordinates and weights
    are computed once); otherwise one ``extract_slices`` per volume.
    """
    if corners not in CORNERS:
        raise ValueError(f"corners must be one of {CORNERS}, not {corners!r}")
    size = volumes[0].box if size is None else int(size)
    if xp.__name__ == "numpy" and compiled_cpu_gather() is not None:
        from ._slice_cpu import extract_slices_of_numba

        return extract_slices_of_numba(tuple(volumes), rotations, corners, size)
    return xp.stack([extract_slices(xp, volume, rotations, corners, size) for volume in volumes])


@lru_cache(maxsize=1)
def compiled_cpu_gather():
    """``_slice_cpu.extract_slices_numba`` where numba imports, else None (then the NumPy gather serves).

    numba raises RuntimeError at import where it has nowhere to write its cache of
    compiled code (a read-only install without a writable home): the NumPy gather
    computes the same values there too.
    """
    try:
        from ._slice_cpu import extract_slices_numba
    except (ImportError, RuntimeError):
        return None
    return extract_slices_numba


def _axis_taps(xp, kernel: GriddingKernel, coordinate):
    """First tap, and the weights of the ``width`` taps, of each coordinate (grid units)."""
    first = xp.ceil(coordinate - kernel.width / 2.0)
    offsets = xp.arange(kernel.width, dtype="float32")
    weights = kernel.weights(xp, coordinate[:, None] - (first[:, None] + offsets))
    return first.astype("int64"), weights


def _extract_slices_numpy(xp, prepared: PreparedVolume, rotations, corners: str, size: int):
    """The kernel sum at every in-band point, with Hermitian symmetry for qx < 0."""
    box, kernel = prepared.box, prepared.kernel
    grid, reach = prepared.grid_size, kernel.reach
    columns = prepared.transform.shape[2]
    (qx, qy, qz), in_band = slice_coordinates(xp, rotations, box, size, corners)
    in_band = xp.broadcast_to(in_band, qx.shape)
    points = xp.flatnonzero(in_band)
    step = grid / float(box)
    qx, qy, qz = (axis.ravel()[points] * step for axis in (qx, qy, qz))
    negative = qx < 0
    sign = xp.where(negative, -1.0, 1.0).astype("float32")
    x0, wx = _axis_taps(xp, kernel, qx * sign)
    y0, wy = _axis_taps(xp, kernel, qy * sign)
    z0, wz = _axis_taps(xp, kernel, qz * sign)
    flat = prepared.transform.reshape(-1)
    index = "int32" if flat.size < 2**31 else "int64"
    taps = xp.arange(kernel.width, dtype=index)
    x0 = xp.clip(x0 + reach, 0, columns - kernel.width).astype(index)[:, None] + taps
    rows = [(((y0 + b) % grid) * columns).astype(index) for b in range(kernel.width)]
    value = xp.zeros(points.shape, dtype="complex64")
    for a in range(kernel.width):
        plane = (((z0 + a) % grid) * (grid * columns)).astype(index)
        for b in range(kernel.width):
            # the row's taps along x, contiguous in memory, summed with their weights
            value += xp.einsum("pj,pj->p", flat[(plane + rows[b])[:, None] + x0], wx) * (wz[:, a] * wy[:, b])
    value = xp.where(negative, xp.conj(value), value)
    out = xp.zeros(in_band.size, dtype="complex64")
    out[points] = value
    return out.reshape(in_band.shape)


def shift_phases(xp, size: int, origins_pixels):
    """Phase factors that move each projection by ``-origin`` (RELION's origin sign).

    ``exp(+2πi (kx ox + ky oy) / size)``, shape (n, size, size//2 + 1).
    """
    origins = xp.asarray(origins_pixels, dtype="float32")
    kx = xp.fft.rfftfreq(size).astype("float32") * size
    ky = xp.fft.fftfreq(size).astype("float32") * size
    scale = np.float32(2 * np.pi / size)
    along_x = xp.exp(1j * (scale * kx[None, :] * origins[:, 0, None])).astype("complex64")
    along_y = xp.exp(1j * (scale * ky[None, :] * origins[:, 1, None])).astype("complex64")
    return along_y[:, :, None] * along_x[:, None, :]


def image_spectra(xp, images):
    """rfft2 of images whose centre is pixel ``box//2`` (origin moved to index 0)."""
    return fft_module(xp).rfft2(xp.fft.ifftshift(xp.asarray(images, dtype="float32"), axes=(-2, -1)))


def spectra_to_images(xp, spectra, box: int):
    """Inverse of ``image_spectra`` at the spectra's size, cropped to ``box`` about the centre."""
    size = spectra.shape[-2]
    images = xp.fft.fftshift(fft_module(xp).irfft2(spectra, s=(size, size)), axes=(-2, -1))
    start = size // 2 - box // 2
    return images[..., start : start + box, start : start + box].astype("float32")


def pad_images(xp, images, size: int):
    """Images (n, box, box) centred in a zero field (n, size, size): centre box//2 -> size//2."""
    box = images.shape[-1]
    field = xp.zeros(images.shape[:-2] + (size, size), dtype="float32")
    start = size // 2 - box // 2
    field[..., start : start + box, start : start + box] = images
    return field
