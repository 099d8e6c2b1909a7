"""The extraction field's transforms along x, both maps of a particle in one complex transform.

``_model_cuda.extract_in_field`` takes every row of a particle's two images (the
whole and the masked map's projection, real, ``box`` long) into the field along x
before ``_field_cuda`` takes the columns along y, and back after it. Through cuFFT
that was three passes over twice the box's width: a kernel writing each row
zero-padded to the field's ``size``, cuFFT's R2C of those rows, and after the
columns cuFFT's C2R back into rows of ``size`` of which only the box's were kept.
Here one kernel takes row y of both maps of a particle as one complex signal
``a + i·b`` of ``size`` points, zero beyond the box (in shared memory, never
written to global memory), transforms it and separates the two real signals'
spectra by Hermitian symmetry (``A[k] = (Z[k] + conj Z[-k]) / 2``,
``B[k] = (Z[k] - conj Z[-k]) / 2i``), writing ``size/2 + 1`` coefficients of each
(the layout of cuFFT's R2C output that the column kernel reads). The inverse
forms ``Z = A + i·B`` over the whole circle from the two half spectra (``Z[-k] =
conj A[k] + i·conj B[k]``; the real parts only at k = 0 and size/2, as ``irfft``),
transforms it back and writes only the box's ``box`` points of the real part (the
whole map) and of the imaginary part (the masked map) into contiguous images.
Each image is read once and written once; the padding is never stored.

Sharing one transform, the two maps share its float32 rounding: the masked map's
error follows the whole map's size, not its own. In a float32 NumPy model of one
forward row (256 points in 512, the same packing, against float64): 1.3e-7 of the masked spectrum's largest
value with both maps alike, 9e-7 with the masked map 10 times weaker, 8e-6 at
100, 9e-5 at 1 000 (separate transforms: 1.3e-7 throughout); the inverse adds
about as much. Against the whole map that is float32 rounding, far below the
projector's 6.8e-4, and a region a thousand times weaker than the map is hardly
worth subtracting.

The transforms are ``_field_cuda``'s Stockham stages (its radices; a size with
another prime factor, or whose rows do not fit a block's shared memory, uses
cuFFT's passes instead), with each transform contiguous in shared memory and a
warp's 32 threads on consecutive points of one transform, so that a row's loads
and stores are whole 128-byte runs of global memory.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _field_cuda

#: Rows (transforms) a block holds in shared memory, and threads per block (``LANES`` = 32 threads a row).
ROWS = 8
THREADS = 256
LANES = THREADS // ROWS


def source(size: int, box: int, rows: int = ROWS, threads: int = THREADS) -> str:
    """CUDA source of ``field_rows_forward`` and ``field_rows_inverse`` for a field of ``size`` points and a
    box of ``box`` points."""
    used = set(_field_cuda.radices(size))
    used |= {2, 4} if 8 in used else {2} if 4 in used else set()
    functions = "\n".join(_field_cuda._dft(radix, sign) for radix in sorted(used) for sign in (-1, 1))
    forward, forward_result = _field_cuda._transform(size, -1, "data", rows_in=box)
    inverse, inverse_result = _field_cuda._transform(size, 1, "data", rows_out=box)
    return r"""
#include <cupy/complex.cuh>
""" + f"""
#define SIZE {size}
#define BOX {box}
#define COLUMNS {rows}
#define THREADS {threads}
#define LANES (THREADS / COLUMNS)
#define AT(row, column) ((column) * SIZE + (row))
""" + functions + r"""

// shared memory: two copies of COLUMNS transforms of SIZE points (each contiguous), then the twiddles; the
// units (a particle's row of both maps) of a batch of n particles, and the length of a row's half spectrum
#define SHARED_ARRAYS \
    extern __shared__ float2 shared[]; \
    float2* data = shared; \
    float2* spare = shared + SIZE * COLUMNS; \
    float2* twiddles = shared + 2 * SIZE * COLUMNS; \
    const int column = threadIdx.x / LANES, lane = threadIdx.x % LANES; \
    for (int m = threadIdx.x; m < SIZE; m += THREADS) { \
        float s, c; \
        sincospif(-2.f * (float)m / (float)SIZE, &s, &c); \
        twiddles[m] = make_float2(c, s); \
    } \
    const long long units = (long long)n * BOX; \
    const int half_width = SIZE / 2 + 1;

// Rows y of particle p's two images (map 0: images[p], map 1: images[n + p], each (BOX, BOX) row-major), as the
// signal index u = p * BOX + y: transformed along x into spectra (BOX, capacity, SIZE/2 + 1) at (y, m * n + p).
extern "C" __global__ void __launch_bounds__(THREADS) field_rows_forward(
    const float* __restrict__ images, complex<float>* __restrict__ spectra, const int n, const long long capacity)
{
    SHARED_ARRAYS
    for (long long group = blockIdx.x; group * COLUMNS < units; group += gridDim.x) {
        const long long u = group * COLUMNS + column;
        const bool valid = u < units;
        const float* first = images + (valid ? u : 0) * BOX;          // map 0's row
        const float* second = first + (long long)n * BOX * BOX;      // map 1's row
        for (int x = lane; x < BOX; x += LANES) {
            data[AT(x, column)] = valid ? make_float2(first[x], second[x]) : make_float2(0.f, 0.f);
        }
        __syncthreads();
""" + forward + r"""
        if (valid) {
            const long long p = u / BOX, y = u - p * BOX;
            complex<float>* a = spectra + (y * capacity + p) * half_width;
            complex<float>* b = spectra + (y * capacity + n + p) * half_width;
            for (int k = lane; k < half_width; k += LANES) {
                const float2 z = """ + forward_result + r"""[AT(k, column)];
                const float2 w = """ + forward_result + r"""[AT((SIZE - k) % SIZE, column)];  // Z[-k]
                a[k] = complex<float>(0.5f * (z.x + w.x), 0.5f * (z.y - w.y));   // (Z[k] + conj Z[-k]) / 2
                b[k] = complex<float>(0.5f * (z.y + w.y), 0.5f * (w.x - z.x));   // (Z[k] - conj Z[-k]) / 2i
            }
        }
        __syncthreads();
    }
}

// The inverse: spectra (BOX, capacity, SIZE/2 + 1) at (y, m * n + p) back along x; the first BOX points of
// map m's row y into images[m * n + p] (each (BOX, BOX) row-major). Unnormalised, as cuFFT's C2R.
extern "C" __global__ void __launch_bounds__(THREADS) field_rows_inverse(
    const complex<float>* __restrict__ spectra, float* __restrict__ images, const int n, const long long capacity)
{
    SHARED_ARRAYS
    for (long long group = blockIdx.x; group * COLUMNS < units; group += gridDim.x) {
        const long long u = group * COLUMNS + column;
        const bool valid = u < units;
        const long long p = valid ? u / BOX : 0, y = valid ? u - p * BOX : 0;
        const complex<float>* a = spectra + (y * capacity + p) * half_width;
        const complex<float>* b = spectra + (y * capacity + n + p) * half_width;
        for (int k = lane; k < half_width; k += LANES) {
            complex<float> s = valid ? a[k] : complex<float>(0.f, 0.f), t = valid ? b[k] : complex<float>(0.f, 0.f);
            if (k == 0 || 2 * k == SIZE) {  // irfft reads only the real parts there
                s = complex<float>(s.real(), 0.f);
                t = complex<float>(t.real(), 0.f);
            }
            data[AT(k, column)] = make_float2(s.real() - t.imag(), s.imag() + t.real());   // A + iB
            if (k > 0 && 2 * k < SIZE) {
                data[AT(SIZE - k, column)] = make_float2(s.real() + t.imag(), t.real() - s.imag());  // conj A + i conj B
            }
        }
        __syncthreads();
""" + inverse + r"""
        if (valid) {
            float* first = images + u * BOX;
            float* second = first + (long long)n * BOX * BOX;
            for (int x = lane; x < BOX; x += LANES) {
                const float2 z = """ + inverse_result + r"""[AT(x, column)];
                first[x] = z.x;
                second[x] = z.y;
            }
        }
        __syncthreads();
    }
}
"""


def shared_bytes(size: int, rows: int = ROWS) -> int:
    """Shared memory of one block: twice ``rows`` transforms of ``size`` complex64 points, and the twiddles."""
    return 8 * size * (2 * rows + 1)


def fits(size: int) -> bool:
    """Whether a field of ``size`` points is 2-3-5 smooth and ``BLOCKS_PER_SM`` blocks of ``ROWS`` of its rows fit
    an SM of the current device (``_model_cuda.extract_in_field`` uses cuFFT's passes otherwise)."""
    import cupy

    return _fits(cupy.cuda.Device().id, size)


@functools.lru_cache(maxsize=64)
def _fits(device: int, size: int) -> bool:
    import cupy

    attributes = cupy.cuda.Device(device).attributes
    limit = min(attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 2**10),
                attributes.get("MaxSharedMemoryPerMultiprocessor", 0) // BLOCKS_PER_SM)
    return _field_cuda.radices(size) is not None and shared_bytes(size) <= limit


#: Blocks an SM must hold at once for the kernels to pay: at box 512 (a field of 1 024, 139 KB a block, one
#: an SM) they were slower than cuFFT's passes (box 512: 20 400 against 22 200 particles/s).
BLOCKS_PER_SM = 2


_kernels = {}


def _compiled(size: int, box: int, name: str):
    import cupy

    key = (cupy.cuda.Device().id, size, box, name)
    if key not in _kernels:
        kernel = cupy.RawKernel(source(size, box), name)
        kernel.max_dynamic_shared_size_bytes = shared_bytes(size)
        _kernels[key] = kernel
    return _kernels[key]


def _launch(name: str, size: int, box: int, count: int, arguments, max_blocks: int | None) -> None:
    import cupy

    groups = -(-count * box // ROWS)
    if groups == 0:
        return
    blocks = min(groups, max_blocks or 16 * cupy.cuda.Device().attributes["MultiProcessorCount"])
    _compiled(size, box, name)((blocks,), (THREADS,), arguments, shared_mem=shared_bytes(size))


def transform_rows(images, spectra, size: int, max_blocks: int | None = None) -> None:
    """Both maps' rows along x into the field: ``images`` C-contiguous float32 (2, n, box, box) (map 0 the whole
    map's, 1 the masked map's), ``spectra`` C-contiguous complex64 (box, capacity, size//2 + 1) with capacity ≥
    2n: row y of map m of particle p goes to ``spectra[y, m·n + p]``, as cuFFT's R2C of the row zero-padded to
    ``size``. ``max_blocks``: at most this many blocks (default 16 an SM). Raises ValueError for other shapes."""
    count, box = images.shape[1], images.shape[-1]
    _check(images, spectra, size)
    _launch("field_rows_forward", size, box, count,
            (images, spectra, np.int32(count), np.int64(spectra.shape[1])), max_blocks)


def transform_rows_back(spectra, images, size: int, max_blocks: int | None = None) -> None:
    """``transform_rows``'s inverse (unnormalised, as cuFFT's C2R; only each row's first ``box`` points): from
    ``spectra`` (box, capacity, size//2 + 1) into ``images`` (2, n, box, box), both C-contiguous."""
    count, box = images.shape[1], images.shape[-1]
    _check(images, spectra, size)
    _launch("field_rows_inverse", size, box, count,
            (spectra, images, np.int32(count), np.int64(spectra.shape[1])), max_blocks)


def _check(images, spectra, size: int) -> None:
    import cupy

    if (images.ndim != 4 or images.shape[0] != 2 or images.shape[2] != images.shape[3] or images.dtype != cupy.float32
            or not images.flags.c_contiguous):
        raise ValueError("images must be C-contiguous float32 (2, n, box, box)")
    box, count = images.shape[-1], images.shape[1]
    if (spectra.ndim != 3 or spectra.dtype != cupy.complex64 or not spectra.flags.c_contiguous
            or spectra.shape[0] != box or spectra.shape[1] < 2 * count or spectra.shape[2] != size // 2 + 1):
        raise ValueError(f"spectra must be C-contiguous complex64 ({box}, ≥ {2 * count}, {size // 2 + 1})")
    if _field_cuda.radices(size) is None or size < box:
        raise ValueError(f"a field of {size} points: a prime factor above 5, or smaller than the box ({box})")
