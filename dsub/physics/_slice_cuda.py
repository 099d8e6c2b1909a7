"""CUDA kernel for Fourier-slice extraction: the GPU twin of
``projector._extract_slices_numpy``, one thread per output coefficient.

Each thread computes its 3D point, flips it into the stored half space (x ≥ 0)
by Hermitian symmetry, evaluates the separable kernel's ``width`` weights per
axis (tent, or Kaiser-Bessel as ``gridding.kaiser_bessel_series``' polynomial) and sums the
``width³`` taps straight from the prepared transform, so a slice costs one pass
over the output. Results agree with the NumPy twin to float32 rounding
(tests/test_gpu.py).

The same launch can multiply each value by the particle's transfer
(``_transfer_cuda.py``) and by ``(-1)^(kx+ky)``, which puts the centre of the
inverse transform in the middle of the image (``fftshift`` for an even size);
``_model_cuda.project_images`` uses that.

Two maps prepared side by side (``projector.prepare_volumes``: one (P, P, C, 2)
array) are sampled in one launch (``extract_slice_pair_cuda``): each tap is one
16-byte load of both maps' values, and each point's weights and transfer are
computed once. On an H200 at box 256 (1 024 particles) that took the slices of
both maps from 8.7 to 5.7 ms (default) and 4.5 to 2.9 ms (relion); one launch
over two separate arrays had been slower than two launches (10.6 against 8.5 ms:
the two volumes compete for the L2 cache). BENCHMARKS.md has the figures.

A pair stored in float16 (``projector.prepare_volumes``: one (P, P, C, 4) array,
the default projector's half-map models) is read by the same kernel compiled
with ``HALF``: each tap one 8-byte load, converted to float32 and summed in
float32, each map's sum times its own power of two (``PreparedVolume.scale``).
At box 256 (1 024 particles) that took the slices of both maps from 5.2 to
4.0 ms, at box 512 (256 particles) from 5.4 to 3.7 ms.

A complex64 pair may also lie in a 3D texture (``PairTexture``,
``projector.pair_in_texture``): compiled with ``TEXTURE`` the kernel reads each
tap with ``tex3D`` and point sampling, the same values through the texture
cache, whose layout keeps grid points close along y and z as well as x
(``relion`` at box 256: the slices 1.67 instead of 2.08 ms).
"""

from __future__ import annotations

import numpy as np

from ._transfer_cuda import SOURCE as TRANSFER_SOURCE
from .gridding import kaiser_bessel_series

_SOURCE = r"""
#include <cupy/complex.cuh>

#ifndef MAPS
#define MAPS 1
#endif
#ifndef WIDTH
#define WIDTH 2
#endif
#ifndef KIND
#define KIND 0
#endif
#ifndef TILE_X
#define TILE_X 0
#endif
#ifndef HALF
#define HALF 0
#endif
#ifndef TEXTURE
#define TEXTURE 0
#endif
#ifndef KB_SERIES
#define KB_SERIES 0.f
#endif
""" + TRANSFER_SOURCE + r"""
#if HALF
// two float16 values (the low half first) of one 32-bit word as float32
__device__ __forceinline__ float2 halves(unsigned int word)
{
    float low, high;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(low), "=f"(high) : "r"(word));
    return make_float2(low, high);
}
#endif

// WIDTH and KIND are given at compilation (one kernel per interpolation kernel), so the weights stay in
// registers and the tap loops unroll.
__device__ __forceinline__ void axis_taps(float q, float beta, int* first, float* w)
{
    const int width = WIDTH, kind = KIND;
    const float start = ceilf(q - 0.5f * width);
    *first = (int)start;
#pragma unroll
    for (int j = 0; j < width; ++j) {
        const float d = q - (start + j);
        if (kind == 0) {
            w[j] = fmaxf(1.f - fabsf(d), 0.f);
        } else {
            // I0(beta sqrt(u)) - 1 = sum_k (beta^2 u / 4)^k / (k!)^2 for u = 1 - r^2: a polynomial in u with positive
            // coefficients (KB_SERIES, from the kernel's beta), by Horner's rule; no square root, no division
            const float r = 2.f * d / width;
            const float u = fmaxf(1.f - r * r, 0.f);
            const float series[] = {KB_SERIES};
            float s = series[0];
#pragma unroll
            for (int k = 1; k < (int)(sizeof(series) / sizeof(float)); ++k) {
                s = fmaf(s, u, series[k]);
            }
            w[j] = fabsf(r) <= 1.f ? s * u : 0.f;
        }
    }
}

// One thread per output coefficient: blocks along y take particles, along x a particle's coefficients,
// so the per-coefficient index arithmetic is 32-bit. MAPS 2: ``volume`` holds two maps side by side,
// (P, P, C, 2) complex64, and each tap is one 16-byte load of both maps' values (same weights).
extern "C" __global__ void extract_slices(
    const complex<float>* __restrict__ volume,   // (P, P, C) extended rfft, axes z, y, x (see interleave)
    const int interleave,                         // MAPS 1: complex values between neighbouring grid points
    const float* __restrict__ rotations,         // (n, 9) RELION A, row-major
    complex<float>* __restrict__ out,            // (MAPS, n, size, size/2 + 1)
    const int n, const int size, const int box, const int padded, const int columns, const int reach,
    const float scale, const float step, const float beta,  // the kernel's width and kind: WIDTH, KIND
    const int cube,                               // 1: keep points inside the map's Nyquist cube
    const int checkerboard,                       // 1: multiply by (-1)^(kx + ky)
    const float first_scale, const float second_scale,  // each map's values times these (an inverse FFT's 1/N)
    const double* __restrict__ transfer,          // (n, TRANSFER_PARAMETERS), or null: no transfer
    const complex<float>* __restrict__ given,     // (n, size, size/2 + 1) CTF without the shift, or null
    const cudaTextureObject_t texture)            // TEXTURE: the pair in a 3D array, float4 texels (x, y, z)
{
    const int half_width = size / 2 + 1;
    const int plane = size * half_width;
#if MAPS == 2
    const long long total = (long long)n * plane;  // the second map's slices follow the first's
#endif
    const float radius2 = 0.25f * size * size;
    const float limit = 0.5f * box;
    const int width = WIDTH;
    float wx[WIDTH], wy[WIDTH], wz[WIDTH];
    for (int p = blockIdx.y; p < n; p += gridDim.y) {
        const float* a = rotations + 9 * p;
        const float a0 = scale * a[0], a1 = scale * a[1], a2 = scale * a[2];
        const float a3 = scale * a[3], a4 = scale * a[4], a5 = scale * a[5];
#if TILE_X
        // each block takes tiles of TILE_X columns by blockDim.x / TILE_X rows of the plane
        const int tiles_x = (half_width + TILE_X - 1) / TILE_X, tile_rows = blockDim.x / TILE_X;
        const int tiles = tiles_x * ((size + tile_rows - 1) / tile_rows);
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const int iy = (tile / tiles_x) * tile_rows + threadIdx.x / TILE_X;
            const int ix = (tile % tiles_x) * TILE_X + threadIdx.x % TILE_X;
            if (ix >= half_width || iy >= size) {
                continue;
            }
            const int pixel = iy * half_width + ix;
#else
        for (int pixel = blockIdx.x * blockDim.x + threadIdx.x; pixel < plane; pixel += blockDim.x * gridDim.x) {
            const int iy = pixel / half_width;
            const int ix = pixel - iy * half_width;
#endif
            const long long idx = (long long)p * plane + pixel;
            const float kx = (float)ix;
            const float ky = (float)(iy < (size + 1) / 2 ? iy : iy - size);
            const float qx = kx * a0 + ky * a3;
            const float qy = kx * a1 + ky * a4;
            const float qz = kx * a2 + ky * a5;
            const bool in_band = cube ? (fabsf(qx) <= limit && fabsf(qy) <= limit && fabsf(qz) <= limit)
                                      : (kx * kx + ky * ky <= radius2);
            if (!in_band) {
                out[idx] = complex<float>(0.f, 0.f);
#if MAPS == 2
                out[total + idx] = complex<float>(0.f, 0.f);
#endif
                continue;
            }
            const bool negative = qx < 0.f;
            const float sign = negative ? -1.f : 1.f;
            int x0, y0, z0;
            axis_taps(sign * step * qx, beta, &x0, wx);
            axis_taps(sign * step * qy, beta, &y0, wy);
            axis_taps(sign * step * qz, beta, &z0, wz);
            x0 = min(max(x0 + reach, 0), columns - width);
#if MAPS == 2 && HALF
            const uint2* pairs = reinterpret_cast<const uint2*>(volume);
            float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#elif MAPS == 2
            const float4* pairs = reinterpret_cast<const float4*>(volume);
            float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#else
            complex<float> v(0.f, 0.f);
#endif
            // the taps wrap around the grid: the first tap brought into it once a point (by one add for a point
            // in the band; a modulo only for one beyond it), the others by a compare
            z0 = z0 < 0 ? z0 + padded : z0;
            y0 = y0 < 0 ? y0 + padded : y0;
            if (z0 < 0 || z0 >= padded) z0 = (z0 % padded + padded) % padded;
            if (y0 < 0 || y0 >= padded) y0 = (y0 % padded + padded) % padded;
#pragma unroll
            for (int c = 0; c < width; ++c) {
                const int z = z0 + c >= padded ? z0 + c - padded : z0 + c;
#pragma unroll
                for (int b = 0; b < width; ++b) {
                    const int y = y0 + b >= padded ? y0 + b - padded : y0 + b;
                    const long long first = ((long long)z * padded + y) * columns + x0;
                    const float wzy = wz[c] * wy[b];
#if MAPS == 2
                    const auto* row = pairs + first;
#pragma unroll
                    for (int j = 0; j < width; ++j) {
#if HALF
                        const uint2 h = row[j];
                        const float2 h0 = halves(h.x), h1 = halves(h.y);
                        const float4 t = make_float4(h0.x, h0.y, h1.x, h1.y);
#else
#if TEXTURE
                        // point sampling at the texel's centre: the stored values, read through the texture cache
                        const float4 t = tex3D<float4>(texture, (float)(x0 + j) + 0.5f, (float)y + 0.5f, (float)z + 0.5f);
#else
                        const float4 t = row[j];
#endif
#endif
                        const float w = wzy * wx[j];
                        sum.x += t.x * w;
                        sum.y += t.y * w;
                        sum.z += t.z * w;
                        sum.w += t.w * w;
                    }
#else
                    const complex<float>* row = volume + first * interleave;
#pragma unroll
                    for (int j = 0; j < width; ++j) {
                        v += row[j * interleave] * (wzy * wx[j]);
                    }
#endif
                }
            }
            complex<float> factor(((ix + iy) & 1) && checkerboard ? -1.f : 1.f, 0.f);
            if (transfer != nullptr) {
                factor *= particle_transfer(transfer + TRANSFER_PARAMETERS * p, kx, ky, size, given, idx);
            }
#if MAPS == 2
            complex<float> v(sum.x, sum.y), u(sum.z, sum.w);
            if (negative) {
                v = conj(v);
                u = conj(u);
            }
            out[idx] = v * (factor * first_scale);
            out[total + idx] = u * (factor * second_scale);
#else
            if (negative) {
                v = conj(v);
            }
            out[idx] = v * (factor * first_scale);
#endif
        }
    }
}
"""

_kernels = {}


def pointer(array):
    """A kernel argument for an optional array: the array, or a null pointer (CuPy passes None as -1)."""
    return np.uint64(0) if array is None else array


#: Columns of the plane in a block's tile (rows: 256 / TILE_X), 0 for 256 coefficients of a row, or None:
#: chosen by ``tile_columns``.
TILE_X = None
#: Prepared maps larger than this are sampled in tiles (``tile_columns``).
TILED_ABOVE_BYTES = 256 * 2**20


def tile_columns(transform) -> int:
    """Columns of a block's tile for sampling ``transform``: 16 (16 × 16 coefficients a block) where the prepared
    map is larger than ``TILED_ABOVE_BYTES``, else 0 (each block takes 256 coefficients of a row).

    A block's coefficients close together in the plane touch nearby taps, which the
    L1 and L2 caches then share; rows do as well where the map is small enough for the
    50 MB L2 to hold much of it. On an H200 at batch 1 024 (BENCHMARKS.md, 2026-11-30):
    box 512 default 34.5 → 18.1 ms, relion 10.5 → 8.9 ms; box 256 relion (1.1 GB)
    2.35 → 2.15 ms; box 256 default (0.27 GB) 4.39 against 4.54 ms and box 128 0.92
    against 1.04 ms in favour of rows. The values are the same to the bit. With the default's maps in
    float16 (box 384: 0.45 GB) tiles still won (batch 256: 1.79 against 2.04 ms), so the threshold fell
    from 512 to 256 MiB; box 256's float16 pair (0.14 GB) stays on rows.
    """
    if TILE_X is not None:
        return TILE_X
    return 16 if transform.nbytes > TILED_ABOVE_BYTES else 0


def _compiled(maps: int, width: int, kind: int, tile_x: int, half: int = 0, beta: float = 0.0, texture: int = 0):
    """The slice kernel for ``maps`` maps and an interpolation kernel of ``width`` taps per axis, ``kind`` 0
    (trilinear) or 1 (Kaiser-Bessel of ``beta``), threads over tiles of ``tile_x`` columns (``TILE_X``), maps
    stored in float16 (``half``), a pair read through its texture (``texture``), compiled once each."""
    key = (maps, width, kind, tile_x, half, beta if kind else 0.0, texture)
    if key not in _kernels:
        import cupy

        series = ",".join(f"{float(c)!r}f" for c in kaiser_bessel_series(beta)) if kind else "0.f"
        _kernels[key] = cupy.RawKernel(_SOURCE, "extract_slices", options=(
            f"-DMAPS={maps}", f"-DWIDTH={width}", f"-DKIND={kind}", f"-DTILE_X={tile_x}", f"-DHALF={half}",
            f"-DTEXTURE={texture}", f"-DKB_SERIES={series}"))
    return _kernels[key]


def side_by_side(volumes):
    """The array that holds two prepared volumes side by side (``projector.prepare_volumes``): (P, P, C, 2)
    complex64, or (P, P, C, 4) float16 for maps stored in float16; None when ``volumes`` are not such a pair."""
    if len(volumes) != 2:
        return None
    pair = volumes[0].transform.base
    if pair is None or volumes[1].transform.base is not pair or pair.ndim != 4 or not pair.flags.c_contiguous:
        return None
    if pair.dtype == np.complex64 and pair.shape[3] == 2:
        step = 8
    elif pair.dtype == np.float16 and pair.shape[3] == 4:
        step = 4
    else:
        return None
    if any(v.transform.data.ptr != pair.data.ptr + step * i or v.transform.strides[:3] != pair.strides[:3]
           for i, v in enumerate(volumes)):
        return None
    return pair


def _interleave(transform) -> int:
    """Complex values between neighbouring grid points of a prepared transform: 1 when contiguous, 2 for
    one map of a side-by-side pair; 0 for any other layout (then it is copied)."""
    z, y, x = transform.shape
    for interleave in (1, 2):
        if transform.strides == (8 * interleave * y * x, 8 * interleave * x, 8 * interleave):
            return interleave
    return 0


def launch_grid(count: int, per_particle: int):
    """(grid, block) of dsub's per-particle kernels: blocks along y over ``count`` particles (or rows), along x
    over each one's ``per_particle`` elements; the kernels loop where either exceeds the grid's 65 535."""
    threads = 256
    return (int(max(1, min((per_particle + threads - 1) // threads, 65535))), int(max(1, min(count, 65535)))), (threads,)


def extract_slices_cuda(prepared, rotations, corners: str, size: int, checkerboard: bool = False,
                        transfer=None, given=None, out=None, scale: float = 1.0):
    """Central slices on the GPU; same contract as ``projector.extract_slices``.

    ``out``: a C-contiguous complex64 (n, size, size//2 + 1) CuPy array to write
    into (returned), or None for a new one. ``checkerboard``
    multiplies by ``(-1)^(kx+ky)``; ``transfer`` (a CuPy (n, 16) float64 array of
    ``_transfer_cuda.transfer_parameters``) by the particle's transfer on this
    grid, with ``given`` (complex64 (n, size, size//2 + 1) or None) its CTF part;
    ``scale`` multiplies every value (an unnormalised inverse FFT's 1/N, which then
    costs no pass of its own). A volume that is one of a side-by-side pair is read
    where it lies.
    """
    import cupy

    transform = prepared.transform
    if transform.dtype == cupy.float16:  # stored in float16 (projector.prepare_volumes): a complex64 copy
        transform = transform[..., 0].astype(cupy.complex64) + 1j * transform[..., 1].astype(cupy.complex64)
    scale *= prepared.scale
    interleave = _interleave(transform) if transform.dtype == cupy.complex64 else 0
    if interleave == 0:
        transform, interleave = cupy.ascontiguousarray(transform, dtype=cupy.complex64), 1
    return _launch_slices(1, transform, interleave, prepared, rotations, corners, size, checkerboard,
                          transfer, given, out, (scale, scale))


def extract_slice_pair_cuda(volumes, rotations, corners: str, size: int, checkerboard: bool = False,
                            transfer=None, given=None, out=None, scales=(1.0, 1.0)):
    """Both maps' slices of a side-by-side pair (``side_by_side``) in one pass: complex64
    (2, n, size, size//2 + 1), the same values as ``extract_slices_cuda`` of each.

    Each point's kernel weights and transfer are computed once and each tap is one
    16-byte load holding both maps' values. ``out``: a C-contiguous complex64
    array of that shape, or None; ``scales``: each map's values times its own
    (``extract_slices_cuda``'s ``scale``). Raises ValueError when ``volumes`` are not a pair.
    """
    pair = side_by_side(volumes)
    if pair is None:
        raise ValueError("the volumes are not prepared side by side (projector.prepare_volumes)")
    scales = tuple(scale * volume.scale for scale, volume in zip(scales, volumes))
    texture = volumes[0].texture if volumes[1].texture is volumes[0].texture else None  # the pair's, or None
    return _launch_slices(2, pair, 2, volumes[0], rotations, corners, size, checkerboard, transfer, given, out,
                          scales, texture)


class PairTexture:
    """A complex64 pair (P, P, C, 2) copied into a 3D CUDA array of float4 texels (x, y, z), one texel a grid
    point's values of both maps, and the texture object that reads it with point sampling (no interpolation:
    the stored values). ``nbytes``: the array's size."""

    def __init__(self, pair):
        import cupy
        from cupy.cuda import runtime, texture

        planes, rows, columns, _ = pair.shape
        channels = texture.ChannelFormatDescriptor(32, 32, 32, 32, runtime.cudaChannelFormatKindFloat)
        self.array = texture.CUDAarray(channels, columns, rows, planes)
        self.array.copy_from(cupy.ascontiguousarray(pair).view(cupy.float32).reshape(planes, rows, columns * 4))
        resource = texture.ResourceDescriptor(runtime.cudaResourceTypeArray, cuArr=self.array)
        reading = texture.TextureDescriptor([runtime.cudaAddressModeClamp] * 3, runtime.cudaFilterModePoint,
                                            runtime.cudaReadModeElementType, 0)
        self.texture = texture.TextureObject(resource, reading)
        self.nbytes = int(pair.nbytes)


def texture_fits(pair) -> bool:
    """Whether this GPU's 3D textures hold ``pair``'s grid (``maxTexture3D``, texels along x, y, z)."""
    import cupy

    limits = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["maxTexture3D"]
    planes, rows, columns = pair.shape[:3]
    return columns <= limits[0] and rows <= limits[1] and planes <= limits[2]


def _launch_slices(maps, transform, interleave, prepared, rotations, corners, size, checkerboard, transfer,
                   given, out, scales, texture=None):
    import cupy

    rot = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=cupy.float32).reshape(-1, 9))
    count, box = rot.shape[0], prepared.box
    shape = (count, size, size // 2 + 1) if maps == 1 else (maps, count, size, size // 2 + 1)
    if out is None:
        out = cupy.empty(shape, dtype=cupy.complex64)
    elif out.shape != shape or out.dtype != cupy.complex64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous complex64 of shape {shape}")
    if count * size * (size // 2 + 1) == 0:
        return out
    if given is not None:
        given = cupy.ascontiguousarray(given, dtype=cupy.complex64)
        if given.shape != shape[-3:]:
            raise ValueError(f"given transfer has shape {given.shape}, expected {shape[-3:]}")
    kernel = prepared.kernel
    tile_x, half_width = tile_columns(transform), size // 2 + 1
    if tile_x:  # a block per tile
        rows = 256 // tile_x
        grid, block = launch_grid(count, 256 * -(-half_width // tile_x) * -(-size // rows))
    else:
        grid, block = launch_grid(count, size * half_width)
    half = int(transform.dtype == cupy.float16)
    _compiled(maps, int(kernel.width), 0 if kernel.kind == "trilinear" else 1, tile_x, half, float(kernel.beta),
              int(texture is not None))(
        grid,
        block,
        (
            transform,
            np.int32(interleave),
            rot,
            out,
            np.int32(count),
            np.int32(size),
            np.int32(box),
            np.int32(prepared.grid_size),
            np.int32(transform.shape[2]),
            np.int32(kernel.reach),
            np.float32(box / float(size)),
            np.float32(prepared.grid_size / float(box)),
            np.float32(kernel.beta),
            np.int32(corners == "map"),
            np.int32(bool(checkerboard)),
            np.float32(scales[0]),
            np.float32(scales[1]),
            pointer(transfer),
            pointer(given),
            np.uint64(0) if texture is None else texture.texture,
        ),
    )
    return out
