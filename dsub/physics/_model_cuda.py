"""GPU twins of the particle model's steps (``subtract.project_images``, ``subtract.extract_in_field``,
``subtract.subtract_scaled``): fused CUDA kernels and batched cuFFT transforms.

* ``project_images``: one launch per map samples its slices, multiplies them by
  the transfer and by ``(-1)^(kx+ky)`` (which centres the inverse transform, so
  no ``fftshift`` copy) into one array, then one batched inverse FFT, in place.
* ``extract_in_field``: one kernel writes the zero field with the images in its
  middle, one batched rfft2, one kernel multiplies both maps' spectra by the
  transfer evaluated once per coefficient, one in-place inverse FFT; the box is a
  view of the field. The ``ifftshift`` before and the ``fftshift`` after the
  field's transforms cancel (each is ``(-1)^(kx+ky)`` on an even grid, and the
  transfer is a multiplication), so neither is done.

cuFFT plans are kept by CuPy's plan cache, so a batch of the same shape reuses them.
"""

from __future__ import annotations

import numpy as np

from ._slice_cuda import extract_slices_cuda, pointer
from ._transfer_cuda import SOURCE as TRANSFER_SOURCE

_TRANSFER_KERNEL = r"""
#include <cupy/complex.cuh>
""" + TRANSFER_SOURCE + r"""
extern "C" __global__ void apply_transfer(
    complex<float>* __restrict__ spectra,        // (maps, n, size, size/2 + 1), multiplied in place
    const int maps, const int n, const int size,
    const double* __restrict__ transfer,          // (n, TRANSFER_PARAMETERS)
    const complex<float>* __restrict__ given)     // (n, size, size/2 + 1) CTF without the shift, or null
{
    const int half_width = size / 2 + 1;
    const long long total = (long long)n * size * half_width;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int ix = (int)(idx % half_width);
        const int iy = (int)((idx / half_width) % size);
        const int p = (int)(idx / ((long long)half_width * size));
        const float ky = (float)(iy < (size + 1) / 2 ? iy : iy - size);
        const complex<float> factor =
            particle_transfer(transfer + TRANSFER_PARAMETERS * p, (float)ix, ky, size, given, idx);
        for (int map = 0; map < maps; ++map) {
            spectra[map * total + idx] *= factor;
        }
    }
}
"""

_kernels = {}


def _kernel(name):
    import cupy

    if name not in _kernels:
        if name == "apply_transfer":
            _kernels[name] = cupy.RawKernel(_TRANSFER_KERNEL, name)
        elif name == "pad":
            _kernels[name] = cupy.ElementwiseKernel(
                "raw float32 images, int32 box, int32 size, int32 start", "float32 field",
                """
                const long long plane = (long long)size * size;
                const long long image = i / plane;
                const int y = (int)((i % plane) / size) - start;
                const int x = (int)(i % size) - start;
                field = (x >= 0 && x < box && y >= 0 && y < box) ? images[(image * box + y) * box + x] : 0.f;
                """,
                "dsub_pad_images",
            )
        elif name == "subtract":
            _kernels[name] = cupy.ElementwiseKernel(
                "float32 image, float32 alpha, float32 model", "float32 out", "out = image - alpha * model",
                "dsub_subtract_scaled",
            )
    return _kernels[name]


def _launch(total):
    threads = 256
    return (int(max(1, min((total + threads - 1) // threads, 65535 * 8))),), (threads,)


def project_images(volumes, rotations, corners: str, box: int, size: int, table, given):
    """(len(volumes), n, box, box) float32 centred images (``subtract.project_images`` on CuPy).

    ``table``: CuPy (n, 16) float64 transfer parameters or None; ``given``: the
    CTF part as a complex64 array, or None to evaluate it in the kernel.
    """
    import cupy
    import cupyx.scipy.fft as cufft

    from .projector import spectra_to_images

    even = size % 2 == 0
    rotations = cupy.asarray(rotations, dtype=cupy.float32)  # one copy to the GPU for every map
    spectra = cupy.empty((len(volumes), len(rotations), size, size // 2 + 1), dtype=cupy.complex64)
    for index, volume in enumerate(volumes):
        extract_slices_cuda(volume, rotations, corners, size, checkerboard=even, transfer=table, given=given,
                            out=spectra[index])
    if not even:  # (-1)^k is not a shift by half an odd grid: the plain path
        return spectra_to_images(cupy, spectra, box)
    images = cufft.irfft2(spectra, s=(size, size), overwrite_x=True)
    start = size // 2 - box // 2
    return images[..., start : start + box, start : start + box] if size != box else images


def extract_in_field(images, size: int, table, given):
    """``subtract.extract_in_field`` on CuPy for an even ``size``: (m, n, box, box) float32, a view of the field."""
    import cupy
    import cupyx.scipy.fft as cufft

    maps, count, box = images.shape[0], images.shape[1], images.shape[-1]
    start = size // 2 - box // 2
    field = cupy.empty((maps, count, size, size), dtype=cupy.float32)
    _kernel("pad")(cupy.ascontiguousarray(images, dtype=cupy.float32), np.int32(box), np.int32(size),
                   np.int32(start), field)
    spectra = cufft.rfft2(field, overwrite_x=True)
    del field
    total = count * size * (size // 2 + 1)
    if total:
        grid, block = _launch(total)
        _kernel("apply_transfer")(grid, block, (spectra, np.int32(maps), np.int32(count), np.int32(size), table,
                                               pointer(given)))
    extracted = cufft.irfft2(spectra, s=(size, size), overwrite_x=True)
    return extracted[..., start : start + box, start : start + box]


def subtract_scaled(images, alpha, models):
    """``images - alpha[:, None, None] * models`` in one pass (``models`` may be a strided view)."""
    import cupy

    return _kernel("subtract")(images, cupy.asarray(alpha, dtype=cupy.float32)[:, None, None], models)
