"""CUDA kernel for Fourier-slice extraction: the GPU twin of
``projector._extract_slices_numpy``, one thread per output coefficient.

Each thread computes its 3D point, flips it into the stored half space (x ≥ 0)
by Hermitian symmetry, evaluates the separable kernel's ``width`` weights per
axis (tent, or Kaiser-Bessel through ``cyl_bessel_i0f``) and sums the
``width³`` taps straight from the prepared transform, so a slice costs one pass
over the output. Results agree with the NumPy twin to float32 rounding
(tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np

_SOURCE = r"""
#include <cupy/complex.cuh>

#define MAX_WIDTH 8

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
    const int cube)                               // 1: keep points inside the map's Nyquist cube
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
        out[idx] = negative ? conj(v) : v;
    }
}
"""

_kernel = None


def _compiled():
    global _kernel
    if _kernel is None:
        import cupy

        _kernel = cupy.RawKernel(_SOURCE, "extract_slices")
    return _kernel


def extract_slices_cuda(prepared, rotations, corners: str, size: int):
    """Central slices on the GPU; same contract as ``projector.extract_slices``."""
    import cupy

    transform = cupy.ascontiguousarray(prepared.transform, dtype=cupy.complex64)
    rot = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=cupy.float32).reshape(-1, 9))
    count, box = rot.shape[0], prepared.box
    out = cupy.empty((count, size, size // 2 + 1), dtype=cupy.complex64)
    total = out.size
    if total == 0:
        return out
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
        ),
    )
    return out
