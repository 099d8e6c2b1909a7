"""The extraction field's columns in one CUDA kernel: forward transform along y, transfer, inverse.

``_model_cuda.extract_in_field`` transforms the box's rows along x (cuFFT),
then every column of the field along y, multiplies by the particle's transfer
and transforms every column back; only the box's rows are read back along x.
Through cuFFT the middle three steps are separate passes over the whole field's
spectra (twice the box's rows, the upper half zeros that must be written
first): about 13 GB of memory traffic for 1 024 particles of 256 px. Here one
kernel takes each column's ``box`` values from global memory, pads them with
zeros in shared memory, transforms them (``size`` points), multiplies them by
the transfer evaluated there (``_transfer_cuda.py``), transforms them back and
writes only the ``box`` rows the crop keeps: one read and one write of the
box's rows.

The transforms are mixed-radix Stockham autosort FFTs (radices 8, 4, 2, 3, 5:
every size ``subtract.SubtractionSettings.field_size`` gives, which is 2-3-5
smooth), as in Govindaraju et al., "High performance discrete Fourier transforms
on graphics processors", SC 2008 (section 4, ``FftIteration``): each stage
multiplies a butterfly's inputs by ``exp(∓2πi (j mod Ns) r / (Ns R))``, takes
their R-point DFT and writes them ``Ns`` apart from ``(j div Ns) Ns R + j mod
Ns``. Each block keeps ``COLUMNS`` neighbouring columns in shared memory twice
(each stage reads one copy and writes the other, so no thread holds values
across a barrier; neighbouring columns adjacent, so a warp's loads and stores
are coalesced and its shared-memory reads free of bank conflicts; a first
stage's writes, ``radix`` rows apart, are not) with a table of the size's
twiddles. The first stage reads only the box's rows (the
others are zeros) and the last writes only the box's rows. A particle's maps
(the whole and the masked map) are columns of the same block, so the transfer
is evaluated once for both. Inverse transforms are unnormalised, as cuFFT's;
the caller's ``scale`` multiplies the transfer.

The columns kx = 0 and kx = size/2 keep only their real part before the C2R
transform along x: NumPy's ``irfft`` discards those imaginary parts and cuFFT's
C2R of some sizes (powers of two) does not; they are not zero where the
transfer at +size/2 is not the conjugate of the transfer at -size/2
(astigmatism, a shift by a fraction of a pixel), and the two paths differed by
2-3 % of the largest value on white images until both did the same.

On an H200 at box 256 (field 512, 1 024 particles, both maps) the kernel takes
3.2 ms where cuFFT's passes took about 5 ms, and the whole batch 13.2 ms instead
of 15.2 ms (BENCHMARKS.md). Results agree with the cuFFT path and the NumPy
twin to float32 rounding (tests/test_gpu.py).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ._transfer_cuda import SOURCE as TRANSFER_SOURCE

#: Radices of the Stockham stages, largest first (each stage's butterflies are written out below).
RADICES = (8, 4, 2, 3, 5)
#: Neighbouring columns a block holds in shared memory, and threads per block (``LANES`` = 32 threads a
#: column); ``block_shape`` takes fewer columns where a device's shared memory cannot hold them.
COLUMNS = 8
THREADS = 256
LANES = THREADS // COLUMNS


def radices(size: int) -> tuple[int, ...] | None:
    """The Stockham stages' radices for a transform of ``size`` points; None where ``size`` has
    another prime factor (the caller then uses cuFFT)."""
    if size < 2:
        return None
    stages = []
    for radix in RADICES:
        while size % radix == 0:
            stages.append(radix)
            size //= radix
    return tuple(stages) if size == 1 else None


def _dft(radix: int, sign: int) -> str:
    """A device function taking the ``radix``-point DFT of ``v`` in place, ``exp(sign 2πi rq/R)``."""
    name = f"dft{radix}_{'f' if sign < 0 else 'i'}"
    lines = [f"__device__ __forceinline__ void {name}(complex<float>* v)", "{"]
    if radix == 2:
        lines += ["    const complex<float> a = v[0], b = v[1];", "    v[0] = a + b; v[1] = a - b;"]
    elif radix in (4, 8):
        # radix 2 on two halves: v[k] = E[k] + w^k O[k], v[k + R/2] = E[k] - w^k O[k]
        half = radix // 2
        lines.append("    complex<float> e[%d], o[%d];" % (half, half))
        lines.append("    " + " ".join(f"e[{k}] = v[{2 * k}]; o[{k}] = v[{2 * k + 1}];" for k in range(half)))
        sub = "dft2" if half == 2 else "dft4"
        lines.append(f"    {sub}_{'f' if sign < 0 else 'i'}(e); {sub}_{'f' if sign < 0 else 'i'}(o);")
        for k in range(half):
            lines.append(f"    const complex<float> t{k} = {_twiddled(f'o[{k}]', k, radix, sign)};")
        for k in range(half):
            lines.append(f"    v[{k}] = e[{k}] + t{k}; v[{k + half}] = e[{k}] - t{k};")
    else:  # a direct DFT with the roots as literals
        lines.append("    const complex<float> " + ", ".join(f"x{r} = v[{r}]" for r in range(radix)) + ";")
        for q in range(radix):
            terms = ["x0"] + [_twiddled(f"x{r}", r * q, radix, sign) for r in range(1, radix)]
            lines.append(f"    v[{q}] = " + " + ".join(terms) + ";")
    return "\n".join(lines + ["}"])


def _twiddled(value: str, k: int, radix: int, sign: int) -> str:
    """``value · exp(sign 2πi k / radix)`` as a CUDA expression, the trivial roots without a multiplication."""
    k %= radix
    if k == 0:
        return value
    if 4 * k == radix:  # sign·i
        return f"complex<float>({-sign}.f * ({value}).imag(), {sign}.f * ({value}).real())"
    if 2 * k == radix:
        return f"(-({value}))"
    if 4 * k == 3 * radix:  # -sign·i
        return f"complex<float>({sign}.f * ({value}).imag(), {-sign}.f * ({value}).real())"
    angle = sign * 2.0 * math.pi * k / radix
    return f"(({value}) * complex<float>({math.cos(angle)!r}f, {math.sin(angle)!r}f))"


def _stage(size: int, radix: int, span: int, sign: int, source: str, target: str, rows_in: int = 0,
           rows_out: int = 0) -> str:
    """One Stockham stage over the block's columns in shared memory, from ``source`` into ``target``
    (``span``: Ns, the product of the radices before it). ``rows_in``: only the first rows of
    ``source`` are read, the others taken as zeros; ``rows_out``: only the first rows of ``target``
    are written (0: all). Element ``row`` of the thread's ``column`` lies at ``AT(row, column)``, a macro
    of the kernel (rows outermost here; ``_rows_cuda`` lays each transform out contiguously)."""
    butterflies = size // radix
    step = size // (span * radix)
    conjugate = "" if sign < 0 else "conj"
    read = f"if (j + r * {butterflies} < {rows_in}) " if rows_in else ""
    write = f"if (first + r * {span} < {rows_out}) " if rows_out else ""
    return f"""
    for (int j = lane; j < {butterflies}; j += LANES) {{
        const int k = j % {span};
        complex<float> v[{radix}];
#pragma unroll
        for (int r = 0; r < {radix}; ++r) {{
            v[r] = complex<float>(0.f, 0.f);
            {read}{{
                const float2 x = {source}[AT(j + r * {butterflies}, column)];
                const float2 w = twiddles[k * r * {step}];
                v[r] = complex<float>(x.x, x.y) * {conjugate}(complex<float>(w.x, w.y));
            }}
        }}
        dft{radix}_{'f' if sign < 0 else 'i'}(v);
        const int first = (j / {span}) * {span * radix} + k;
#pragma unroll
        for (int r = 0; r < {radix}; ++r) {{
            {write}{target}[AT(first + r * {span}, column)] = make_float2(v[r].real(), v[r].imag());
        }}
    }}
    __syncthreads();"""


def _transform(size: int, sign: int, source: str, rows_in: int = 0, rows_out: int = 0) -> tuple[str, str]:
    """The stages of a transform whose input is in shared array ``source`` ("data" or "spare"): their
    code, and the array that holds the result (the stages alternate between the two). ``rows_in``:
    the input's rows beyond are zeros, never read; ``rows_out``: only these first rows of the result
    are written."""
    stages, span = [], 1
    other = {"data": "spare", "spare": "data"}
    factors = radices(size)
    for index, radix in enumerate(factors):
        stages.append(_stage(size, radix, span, sign, source, other[source], rows_in if index == 0 else 0,
                             rows_out if index == len(factors) - 1 else 0))
        source, span = other[source], span * radix
    return "".join(stages), source


def source(size: int, box: int, maps: int, columns: int = COLUMNS, threads: int = THREADS) -> str:
    """The CUDA source of ``field_columns`` for a field of ``size`` points, a box of ``box`` rows and
    ``maps`` images a particle (``COLUMNS // maps`` particles' columns a block, each with its maps')."""
    used = set(radices(size))
    used |= {2, 4} if 8 in used else {2} if 4 in used else set()
    functions = "\n".join(_dft(radix, sign) for radix in sorted(used) for sign in (-1, 1))
    forward, transformed = _transform(size, -1, "data", rows_in=box)
    inverse, result = _transform(size, 1, transformed, rows_out=box)
    return r"""
#include <cupy/complex.cuh>
""" + TRANSFER_SOURCE + f"""
#define SIZE {size}
#define BOX {box}
#define MAPS {maps}
#define COLUMNS {columns}
#define UNITS (COLUMNS / MAPS)
#define THREADS {threads}
#define LANES (THREADS / COLUMNS)
#define AT(row, column) ((row) * COLUMNS + (column))
""" + functions + r"""

extern "C" __global__ void __launch_bounds__(THREADS) field_columns(
    complex<float>* __restrict__ spectra,        // the box's rows of every image, transformed along x
    const int n, const long long row_stride, const long long image_stride,  // map m's particles at m * n
    const float scale,
    const double* __restrict__ transfer,          // (n, TRANSFER_PARAMETERS)
    const complex<float>* __restrict__ given)     // (n, SIZE, SIZE/2 + 1) CTF without the shift, or null
{
    extern __shared__ float2 shared[];
    float2* data = shared;                        // (SIZE, COLUMNS): neighbouring columns adjacent
    float2* spare = shared + SIZE * COLUMNS;      // the same: each stage reads one and writes the other
    float2* twiddles = shared + 2 * SIZE * COLUMNS;  // exp(-2 pi i m / SIZE)
    // column j of a block: map j / UNITS of the particle column (particle, kx) u = group * UNITS + j % UNITS
    const int column = threadIdx.x % COLUMNS, lane = threadIdx.x / COLUMNS;
    const int half_width = SIZE / 2 + 1;
    const int units = n * half_width;
    for (int m = threadIdx.x; m < SIZE; m += THREADS) {
        float s, c;
        sincospif(-2.f * (float)m / (float)SIZE, &s, &c);
        twiddles[m] = make_float2(c, s);
    }
    for (int group = blockIdx.x; group * UNITS < units; group += gridDim.x) {
        const int u = group * UNITS + column % UNITS;
        const bool valid = u < units;
        const int particle = u / half_width;
        const long long c = ((long long)(column / UNITS) * n + particle) * image_stride + (u - particle * half_width);
        // every load of the column in flight at once, then into shared memory (rows from BOX on are zeros
        // that the first stage does not read)
        complex<float> staged[(BOX + LANES - 1) / LANES];
#pragma unroll
        for (int i = 0; i < (BOX + LANES - 1) / LANES; ++i) {
            const int y = lane + i * LANES;
            staged[i] = valid && y < BOX ? spectra[y * row_stride + c] : complex<float>(0.f, 0.f);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < (BOX + LANES - 1) / LANES; ++i) {
            const int y = lane + i * LANES;
            if (y < BOX) {
                data[y * COLUMNS + column] = make_float2(staged[i].real(), staged[i].imag());
            }
        }
        __syncthreads();
""" + forward + r"""
        // the transfer, once for every map of a particle: thread t takes unit t % UNITS, rows t / UNITS + ...
        {
            const int unit = threadIdx.x % UNITS;
            const int v = group * UNITS + unit;
            if (v < units) {
                const int p = v / half_width;
                const int ix = v - p * half_width;
                for (int k = threadIdx.x / UNITS; k < SIZE; k += THREADS / UNITS) {
                    const float ky = (float)(k < (SIZE + 1) / 2 ? k : k - SIZE);
                    const complex<float> factor = scale * particle_transfer(
                        transfer + TRANSFER_PARAMETERS * p, (float)ix, ky, SIZE, given,
                        ((long long)p * SIZE + k) * half_width + ix);
#pragma unroll
                    for (int map = 0; map < MAPS; ++map) {
                        float2* at = """ + transformed + r""" + k * COLUMNS + map * UNITS + unit;
                        const complex<float> y = complex<float>(at->x, at->y) * factor;
                        *at = make_float2(y.real(), y.imag());
                    }
                }
            }
        }
        __syncthreads();
""" + inverse + r"""
        if (valid) {
            // the columns kx = 0 and SIZE/2 keep only their real part: the C2R transform along x that follows
            // then gives what NumPy's irfft gives (it discards those imaginary parts; cuFFT's C2R of some
            // sizes does not, and they are not zero where the transfer at +SIZE/2 is not the conjugate of
            // the transfer at -SIZE/2)
            const int ix = u % half_width;
            const float keep = (ix == 0 || 2 * ix == SIZE) ? 0.f : 1.f;
            for (int y = lane; y < BOX; y += LANES) {
                const float2 x = """ + result + r"""[y * COLUMNS + column];
                spectra[y * row_stride + c] = complex<float>(x.x, keep * x.y);
            }
        }
    }
}
"""


_kernels = {}


def _compiled(size: int, box: int, maps: int, columns: int, threads: int):
    """``field_columns`` for these constants, compiled once each (per process), with the shared memory it needs."""
    import cupy

    key = (cupy.cuda.Device().id, size, box, maps, columns, threads)  # the shared-memory opt-in is per device
    if key not in _kernels:
        kernel = cupy.RawKernel(source(size, box, maps, columns, threads), "field_columns")
        kernel.max_dynamic_shared_size_bytes = shared_bytes(size, columns)
        _kernels[key] = kernel
    return _kernels[key]


def shared_bytes(size: int, columns: int = COLUMNS) -> int:
    """Shared memory of one block: twice ``columns`` columns of ``size`` complex64 values, and the twiddles."""
    return 8 * size * (2 * columns + 1)


def block_shape(size: int, maps: int, shared_limit: int) -> tuple[int, int] | None:
    """(columns, threads) of a block for a field of ``size`` points and ``maps`` maps a particle within
    ``shared_limit`` bytes of shared memory a block: ``COLUMNS`` columns, or fewer (a multiple of
    ``maps``) where they do not fit; None where no block fits (or ``size`` has a prime factor above
    5): the caller then uses cuFFT."""
    if radices(size) is None:
        return None
    columns = COLUMNS
    while columns >= maps and columns % maps == 0:
        if shared_bytes(size, columns) <= shared_limit:
            return columns, LANES * columns
        columns //= 2
    return None


def device_block_shape(size: int, maps: int) -> tuple[int, int] | None:
    """``block_shape`` with the current CUDA device's shared memory a block may opt in to."""
    import cupy

    return _device_block_shape(cupy.cuda.Device().id, size, maps)


@functools.lru_cache(maxsize=64)
def _device_block_shape(device: int, size: int, maps: int) -> tuple[int, int] | None:
    import cupy

    limit = cupy.cuda.Device(device).attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 2**10)
    return block_shape(size, maps, limit)


def transform_columns(spectra, size: int, maps: int, count: int, scale: float, table, given,
                      columns: int = COLUMNS, threads: int = THREADS, max_blocks: int | None = None) -> None:
    """Every column of the field along y, the transfer, and back, in place.

    ``spectra``: complex64, the box's rows of ``maps · count`` images transformed along
    x (image ``m · count + p`` is map ``m`` of particle ``p``; images beyond are left
    alone), laid out (box, images, size//2 + 1); the field's other ``size - box`` rows
    are zero. ``table``:
    CuPy (count, 16) float64 transfer parameters; ``given``: complex64 (count, size,
    size//2 + 1) or None. The transfer is evaluated once per particle and coefficient
    for all its maps. ``columns``, ``threads``: a block's columns and threads;
    ``max_blocks``: at most this many blocks, each taking its share of the columns
    in turn (default: 16 an SM).
    Raises ValueError for a ``size`` with a prime factor above 5 (``radices``),
    ``maps`` not a divisor of ``columns``, or ``spectra`` of another layout.
    """
    import cupy

    from ._slice_cuda import pointer

    if radices(size) is None:
        raise ValueError(f"a field of {size} points has a prime factor above 5")
    if columns % maps or threads % columns:
        raise ValueError(f"{maps} maps, {columns} columns and {threads} threads a block do not divide")
    half = size // 2 + 1
    box, images = spectra.shape[:2]
    if (spectra.dtype != cupy.complex64 or not spectra.flags.c_contiguous or spectra.ndim != 3
            or spectra.shape[2] != half or images < maps * count):
        raise ValueError("spectra must be contiguous complex64 (box, images, size//2 + 1)")
    row_stride, image_stride = images * half, half
    groups = -(-count * half // (columns // maps))
    if groups == 0:
        return
    blocks = min(groups, max_blocks or 16 * cupy.cuda.Device().attributes["MultiProcessorCount"])
    _compiled(size, box, maps, columns, threads)(
        (blocks,), (threads,), (spectra, np.int32(count), np.int64(row_stride), np.int64(image_stride),
                                np.float32(scale), table, pointer(given)),
        shared_mem=shared_bytes(size, columns))
