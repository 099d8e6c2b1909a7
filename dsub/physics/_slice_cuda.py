"""CUDA kernel for Fourier-slice extraction: the GPU twin of
``projector._extract_slices_trilinear``, one thread per output coefficient.

The NumPy version gathers eight corner arrays per slice and builds several
temporary arrays the size of the output; here each thread reads its eight
corners straight from the padded transform and writes one value, so the slice
costs one pass over the output. Results agree with the NumPy twin to float32
rounding (tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np

_SOURCE = r"""
#include <cupy/complex.cuh>

extern "C" __global__ void extract_slices(
    const complex<float>* __restrict__ volume,   // (P, P, H) padded rfft, axes z, y, x
    const float* __restrict__ rotations,         // (n, 9) RELION A, row-major
    complex<float>* __restrict__ out,            // (n, size, size/2 + 1)
    const int n, const int size, const int padded, const int half, const float step,
    const int cube)                               // 1: keep points inside the map's Nyquist cube
{
    const int width = size / 2 + 1;
    const long long total = (long long)n * size * width;
    const float radius2 = 0.25f * size * size;
    const float limit = 0.5f * padded;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int ix = (int)(idx % width);
        const int iy = (int)((idx / width) % size);
        const int p = (int)(idx / ((long long)width * size));
        const float kx = (float)ix;
        const float ky = (float)(iy < (size + 1) / 2 ? iy : iy - size);
        if (!cube && kx * kx + ky * ky > radius2) {
            out[idx] = complex<float>(0.f, 0.f);
            continue;
        }
        const float* a = rotations + 9 * p;
        float qx = step * (kx * a[0] + ky * a[3]);
        float qy = step * (kx * a[1] + ky * a[4]);
        float qz = step * (kx * a[2] + ky * a[5]);
        if (cube && (fabsf(qx) > limit || fabsf(qy) > limit || fabsf(qz) > limit)) {
            out[idx] = complex<float>(0.f, 0.f);
            continue;
        }
        const bool negative = qx < 0.f;
        if (negative) { qx = -qx; qy = -qy; qz = -qz; }
        const float fx0 = floorf(qx), fy0 = floorf(qy), fz0 = floorf(qz);
        const float fx = qx - fx0, fy = qy - fy0, fz = qz - fz0;
        int x0 = min((int)fx0, half - 1);
        int x1 = min((int)fx0 + 1, half - 1);
        int y0 = ((int)fy0 % padded + padded) % padded;
        int y1 = (y0 + 1) % padded;
        int z0 = ((int)fz0 % padded + padded) % padded;
        int z1 = (z0 + 1) % padded;
        const long long row00 = ((long long)z0 * padded + y0) * half;
        const long long row01 = ((long long)z0 * padded + y1) * half;
        const long long row10 = ((long long)z1 * padded + y0) * half;
        const long long row11 = ((long long)z1 * padded + y1) * half;
        complex<float> v =
              volume[row00 + x0] * ((1.f - fx) * (1.f - fy) * (1.f - fz))
            + volume[row00 + x1] * (fx * (1.f - fy) * (1.f - fz))
            + volume[row01 + x0] * ((1.f - fx) * fy * (1.f - fz))
            + volume[row01 + x1] * (fx * fy * (1.f - fz))
            + volume[row10 + x0] * ((1.f - fx) * (1.f - fy) * fz)
            + volume[row10 + x1] * (fx * (1.f - fy) * fz)
            + volume[row11 + x0] * ((1.f - fx) * fy * fz)
            + volume[row11 + x1] * (fx * fy * fz);
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


def extract_slices_cuda(prepared, rotations, size: int, band: str = "circle"):
    """Central slices on the GPU; same contract as ``projector.extract_slices``."""
    import cupy

    transform = cupy.ascontiguousarray(prepared.transform, dtype=cupy.complex64)
    rot = cupy.ascontiguousarray(cupy.asarray(rotations, dtype=cupy.float32).reshape(-1, 9))
    count = rot.shape[0]
    out = cupy.empty((count, size, size // 2 + 1), dtype=cupy.complex64)
    total = out.size
    if total == 0:
        return out
    threads = 256
    blocks = int(min((total + threads - 1) // threads, 65535 * 8))
    padded = prepared.padded_size
    _compiled()(
        (blocks,),
        (threads,),
        (
            transform,
            rot,
            out,
            np.int32(count),
            np.int32(size),
            np.int32(padded),
            np.int32(transform.shape[2]),
            np.float32(padded / float(size)),
            np.int32(band == "cube"),
        ),
    )
    return out
