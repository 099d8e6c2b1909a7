"""CUDA kernel for the contrast fit: the GPU twin of ``contrast.fit_spectra``.

One block per particle walks the image's and the model's rfft2 half plane
once: the sums ``Σ h Re(X conj M)``, ``Σ h |M|²`` and ``Σ h |X|²`` over the band
(the band weight ``h`` evaluated in place, in float32 as ``contrast.band_weights``),
and the sandwich sum ``Σ h |M|² |X - α M|²`` expanded in α as
``Σ h |M|²|X|² - 2α Σ h |M|² Re(X conj M) + α² Σ h |M|⁴`` (what the NumPy twin
sums in a second pass, with α known). Sums are accumulated in float64, so the
expansion loses nothing that matters where the residual is not float32 rounding
(a model that explains an image exactly gives σ of that rounding's order, or 0);
one pass reads each spectrum once (0.43 → about 0.2 ms for 1 024 particles at
box 256 on an H200). Results agree with the NumPy twin to float32 rounding
(tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np

_THREADS = 256

_SOURCE = r"""
#include <cupy/complex.cuh>

#define THREADS 256

__device__ __forceinline__ float band_weight(int k, int box, int half_width, float extent, float low, float high)
{
    const int ix = k % half_width;
    const int iy = k / half_width;
    const float kx = (float)ix;
    const float ky = (float)(iy < (box + 1) / 2 ? iy : iy - box);
    const float radius = sqrtf(kx * kx + ky * ky);
    const float inverse = radius / extent;            // 1/Å
    bool keep = radius > 0.f && radius <= 0.5f * box && inverse >= 0.f;
    if (low >= 0.f) keep = keep && inverse >= low;
    if (high >= 0.f) keep = keep && inverse <= high;
    if (!keep) return 0.f;
    return (ix == 0 || (box % 2 == 0 && ix == half_width - 1)) ? 1.f : 2.f;
}

__device__ double block_sum(double value, double* shared)
{
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();
    return total;
}

extern "C" __global__ void fit_contrast(
    const complex<float>* __restrict__ images,   // (n, box, box/2 + 1) rfft2 of the images
    const complex<float>* __restrict__ models,   // same shape, of the models
    const float* __restrict__ pixel_size,        // (n,) Å
    const int box, const float low, const float high,   // band limits in 1/Å, < 0: none
    float* __restrict__ alpha, float* __restrict__ sigma, float* __restrict__ correlation)
{
    __shared__ double shared[THREADS];
    const int p = blockIdx.x;
    const int half_width = box / 2 + 1;
    const int count = box * half_width;
    const complex<float>* x = images + (long long)p * count;
    const complex<float>* m = models + (long long)p * count;
    const float extent = (float)box * pixel_size[p];
    double cross = 0.0, model_power = 0.0, image_power = 0.0;
    double weighted_image = 0.0, weighted_cross = 0.0, weighted_model = 0.0;  // the sums times |M|²
    for (int k = threadIdx.x; k < count; k += THREADS) {
        const float h = band_weight(k, box, half_width, extent, low, high);
        if (h == 0.f) continue;
        const complex<float> a = x[k], b = m[k];
        const double c = (double)a.real() * b.real() + (double)a.imag() * b.imag();
        const double mm = (double)b.real() * b.real() + (double)b.imag() * b.imag();
        const double xx = (double)a.real() * a.real() + (double)a.imag() * a.imag();
        cross += h * c;
        model_power += h * mm;
        image_power += h * xx;
        weighted_image += h * mm * xx;
        weighted_cross += h * mm * c;
        weighted_model += h * mm * mm;
    }
    cross = block_sum(cross, shared);
    model_power = block_sum(model_power, shared);
    image_power = block_sum(image_power, shared);
    weighted_image = block_sum(weighted_image, shared);
    weighted_cross = block_sum(weighted_cross, shared);
    weighted_model = block_sum(weighted_model, shared);
    const bool fitted = model_power > 0.0;
    const double scale = fitted ? cross / model_power : 0.0;
    // Σ h |M|² |X - α M|², expanded; never below 0 (rounding, where the model explains the image exactly)
    const double spread = fmax(weighted_image - scale * (2.0 * weighted_cross - scale * weighted_model), 0.0);
    if (threadIdx.x == 0) {
        alpha[p] = (float)scale;
        sigma[p] = fitted ? (float)(sqrt(spread) / model_power) : nanf("");
        const double norm = sqrt(model_power * image_power);
        correlation[p] = norm > 0.0 ? (float)(cross / norm) : 0.f;
    }
}
"""

_kernel = None


def _compiled():
    global _kernel
    if _kernel is None:
        import cupy

        _kernel = cupy.RawKernel(_SOURCE, "fit_contrast")
    return _kernel


def fit_spectra_cuda(image_ft, model_ft, box: int, pixel_size_angstrom, low_inverse, high_inverse):
    """(alpha, sigma, correlation), each CuPy float32 (n,), of ``contrast.fit_spectra`` on the GPU.

    ``image_ft``, ``model_ft``: complex64 (n, box, box//2 + 1); band limits in
    1/Å (None: no limit).
    """
    import cupy

    image_ft = cupy.ascontiguousarray(image_ft, dtype=cupy.complex64)
    model_ft = cupy.ascontiguousarray(model_ft, dtype=cupy.complex64)
    count = image_ft.shape[0]
    if image_ft.shape != (count, box, box // 2 + 1) or model_ft.shape != image_ft.shape:
        raise ValueError(f"spectra of shape {image_ft.shape} and {model_ft.shape} do not fit box {box}")
    pixel = cupy.asarray(pixel_size_angstrom, dtype=cupy.float32).reshape(-1)
    pixel = cupy.ascontiguousarray(cupy.broadcast_to(pixel, (count,)))
    out = [cupy.empty(count, dtype=cupy.float32) for _ in range(3)]
    if count:
        _compiled()((count,), (_THREADS,), (
            image_ft, model_ft, pixel, np.int32(box),
            np.float32(-1.0 if low_inverse is None else low_inverse),
            np.float32(-1.0 if high_inverse is None else high_inverse),
            *out,
        ))
    return tuple(out)
