"""CUDA kernel for Fourier-slice extraction: the GPU twin of
``projector._extract_slices_numpy``, one thread per output coefficient.

Each thread computes its 3D point, flips it into the stored half space (x ≥ 0)
by Hermitian symmetry, evaluates the separable kernel's ``width`` weights per
axis (tent, or Kaiser-Bessel through ``cyl_bessel_i0f``) and sums the
``width³`` taps straight from the prepared transform, so a slice costs one pass
over the output. Results agree with the NumPy twin to float32 rounding
(tests/test_gpu.py).

The same launch can multiply each value by the particle's transfer
(``_transfer_cuda.py``) and by ``(-1)^(kx+ky)``, which puts the centre of the
inverse transform in the middle of the image (``fftshift`` for an even size);
``_model_cuda.project_images`` uses that. (Sampling the whole and the masked
map in one launch, sharing the weights, was slower on an H200: 10.6 ms against
8.5 ms for two launches, box 256, 1 024 particles; the two volumes then compete
for the L2 cache.)
"""

from __future__ import annotations

import numpy as np

from ._transfer_cuda import SOURCE as TRANSFER_SOURCE

_SOURCE = r"""
#include <cupy/complex.cuh>

#define MAX_WIDTH 8
""" + TRANSFER_SOURCE + r"""
__device__ __forceinline__ void axis_taps(float q, int width, int kind, float beta, int* first, float* w)
{
    const float start = ceilf(q - 0.5f * width);
    *first = (int)start;
    for (int j = 0; j < width; ++j) {
        const float d = q - (start + j);
        if (kind == 0) {
            w[j] = fmaxf(1.f - fabsf(d), 0.f);
        } else {
            const float r = 2.f * d / width;
            w[j] = fabsf(r) <= 1.f ? cyl_bessel_i0f(beta * sqrtf(fmaxf(1.f - r * r, 0.f))) - 1.f : 0.f;
        }
    }
}

extern "C" __global__ void extract_slices(
    const complex<float>* __restrict__ volume,   // (P, P, C) extended rfft, axes z, y, x
    const float* __restrict__ rotations,         // (n, 9) RELION A, row-major
    complex<float>* __restrict__ out,            // (n, size, size/2 + 1)
    const int n, const int size, const int box, const int padded, const int columns, const int reach,
    const float scale, const float step, const int width, const int kind, const float beta,
    const int cube,                               // 1: keep points inside the map's Nyquist cube
    const int checkerboard,                       // 1: multiply by (-1)^(kx + ky)
    const double* __restrict__ transfer,          // (n, TRANSFER_PARAMETERS), or null: no transfer
    const complex<float>* __restrict__ given)     // (n, size, size/2 + 1) CTF without the shift, or null
{
    const int half_width = size / 2 + 1;
    const long long total = (long long)n * size * half_width;
    const float radius2 = 0.25f * size * size;
    const float limit = 0.5f * box;
    float wx[MAX_WIDTH], wy[MAX_WIDTH], wz[MAX_WIDTH];
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int ix = (int)(idx % half_width);
        const int iy = (int)((idx / half_width) % size);
        const int p = (int)(idx / ((long long)half_width * size));
        const float kx = (float)ix;
        const float ky = (float)(iy < (size + 1) / 2 ? iy : iy - size);
        const float* a = rotations + 9 * p;
        float qx = kx * (scale * a[0]) + ky * (scale * a[3]);
        float qy = kx * (scale * a[1]) + ky * (scale * a[4]);
        float qz = kx * (scale * a[2]) + ky * (scale * a[5]);
        const bool in_band = cube ? (fabsf(qx) <= limit && fabsf(qy) <= limit && fabsf(qz) <= limit)
                                  : (kx * kx + ky * ky <= radius2);
        if (!in_band) {
            out[idx] = complex<float>(0.f, 0.f);
            continue;
        }
        const bool negative = qx < 0.f;
        const float sign = negative ? -1.f : 1.f;
        int x0, y0, z0;
        axis_taps(sign * step * qx, width, kind, beta, &x0, wx);
        axis_taps(sign * step * qy, width, kind, beta, &y0, wy);
        axis_taps(sign * step * qz, width, kind, beta, &z0, wz);
        x0 = min(max(x0 + reach, 0), columns - width);
        complex<float> v(0.f, 0.f);
        for (int c = 0; c < width; ++c) {
            const int z = ((z0 + c) % padded + padded) % padded;
            for (int b = 0; b < width; ++b) {
                const int y = ((y0 + b) % padded + padded) % padded;
                const complex<float>* row = volume + ((long long)z * padded + y) * columns + x0;
                const float wzy = wz[c] * wy[b];
                for (int j = 0; j < width; ++j) {
                    v += row[j] * (wzy * wx[j]);
                }
            }
        }
        if (negative) {
            v = conj(v);
        }
        complex<float> factor(((ix + iy) & 1) && checkerboard ? -1.f : 1.f, 0.f);
        if (transfer != nullptr) {
            factor *= particle_transfer(transfer + TRANSFER_PARAMETERS * p, kx, ky, size, given, idx);
        }
        out[idx] = v * factor;
    }
}
"""

_kernel = None


def pointer(array):
    """A kernel argument for an optional array: the array, or a null pointer (CuPy passes None as -1)."""
    return np.uint64(0) if array is None else array


def _compiled():
    global _kernel
    if _kernel is None:
        import cupy

        _kernel = cupy.RawKernel(_SOURCE, "extract_slices")
    return _kernel


def extract_slices_cuda(prepared, rotations, corners: str, size: int, checkerboard: bool = False,
                        transfer=None, given=None, out=None):
    """Central slices on the GPU; same contract as ``projector.extract_slices``.

    ``out``: a C-contiguous complex64 (n, size, size//2 + 1) CuPy array to write
    into (returned), or None for a new one. ``checkerboard``
    multiplies by ``(-1)^(kx+ky)``; ``transfer`` (a CuPy (n, 16) float64 array of
    ``_transfer_cuda.transfer_parameters``) by the particle's transfer on this
    grid, with ``given`` (complex64 (n, size, size//2 + 1) or None) its CTF part.
    """
    import cupy

    transform = cupy.ascontiguousarray(prepared.transform, dtype=cupy.complex64)
    rot = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=cupy.float32).reshape(-1, 9))
    count, box = rot.shape[0], prepared.box
    shape = (count, size, size // 2 + 1)
    if out is None:
        out = cupy.empty(shape, dtype=cupy.complex64)
    elif out.shape != shape or out.dtype != cupy.complex64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous complex64 of shape {shape}")
    total = count * size * (size // 2 + 1)
    if total == 0:
        return out
    if given is not None:
        given = cupy.ascontiguousarray(given, dtype=cupy.complex64)
        if given.shape != shape:
            raise ValueError(f"given transfer has shape {given.shape}, expected {shape}")
    threads = 256
    blocks = int(min((total + threads - 1) // threads, 65535 * 8))
    kernel = prepared.kernel
    _compiled()(
        (blocks,),
        (threads,),
        (
            transform,
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
            np.int32(kernel.width),
            np.int32(0 if kernel.kind == "trilinear" else 1),
            np.float32(kernel.beta),
            np.int32(corners == "map"),
            np.int32(bool(checkerboard)),
            pointer(transfer),
            pointer(given),
        ),
    )
    return out
