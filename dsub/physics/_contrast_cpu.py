"""Compiled CPU kernel for the contrast fit: the numba twin of ``_contrast_cuda.fit_contrast``.

It computes what ``contrast.fit_spectra`` computes from NumPy arrays, in two
passes over each particle's rfft2 half plane instead of a dozen temporaries the
size of the batch: the sums ``Σ h Re(X conj M)``, ``Σ h |M|²`` and ``Σ h |X|²``
over the band, then with α the sandwich sum ``Σ h |M|² |X - α M|²`` (the GPU
kernel sums that one expanded in α in its single pass; here a particle's half
plane is still in the core's cache for the second pass). The band
weight ``h`` is evaluated in place in float32, as ``contrast.band_weights``;
the sums are accumulated in float64, as on the GPU. Results agree with the
NumPy arrays to float32 rounding (tests/test_contrast_cpu.py). Runs without
the GIL.

``contrast.fit_spectra`` uses it on NumPy where numba imports.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _fit(images, models, pixel_size, box, low, high, alpha, sigma, correlation):
    """Fill ``alpha``, ``sigma`` and ``correlation`` (n,) from spectra (n, box, box//2 + 1) complex64.

    ``low`` and ``high``: band limits in 1/Å (float32; below 0: none). Each row's
    band weights come first (a loop of their own), then the row's sums with every
    coefficient weighted, 0 outside the band, so the compiler vectorises both: the
    float64 sums are then taken in another order (``fastmath`` reassociation), which
    changes them in their last bits only.
    """
    half_width = box // 2 + 1
    nyquist_column = half_width - 1 if box % 2 == 0 else -1
    half_box = np.float32(0.5 * box)
    weights = np.empty(half_width, dtype=np.float64)
    for p in range(images.shape[0]):
        extent = np.float32(box) * pixel_size[p]
        cross = 0.0
        model_power = 0.0
        image_power = 0.0
        for iy in range(box):
            ky = np.float32(iy if iy < (box + 1) // 2 else iy - box)
            for ix in range(half_width):
                weights[ix] = _band_weight(ix, ky, extent, half_box, low, high, nyquist_column)
            for ix in range(half_width):
                h = weights[ix]
                a = images[p, iy, ix]
                b = models[p, iy, ix]
                ar, ai, br, bi = np.float64(a.real), np.float64(a.imag), np.float64(b.real), np.float64(b.imag)
                cross += h * (ar * br + ai * bi)
                model_power += h * (br * br + bi * bi)
                image_power += h * (ar * ar + ai * ai)
        fitted = model_power > 0.0
        scale = cross / model_power if fitted else 0.0
        spread = 0.0
        for iy in range(box):
            ky = np.float32(iy if iy < (box + 1) // 2 else iy - box)
            for ix in range(half_width):
                weights[ix] = _band_weight(ix, ky, extent, half_box, low, high, nyquist_column)
            for ix in range(half_width):
                a = images[p, iy, ix]
                b = models[p, iy, ix]
                br, bi = np.float64(b.real), np.float64(b.imag)
                rr = np.float64(a.real) - scale * br
                ri = np.float64(a.imag) - scale * bi
                spread += weights[ix] * (br * br + bi * bi) * (rr * rr + ri * ri)
        alpha[p] = scale
        sigma[p] = math.sqrt(spread) / model_power if fitted else np.nan
        norm = math.sqrt(model_power * image_power)
        correlation[p] = cross / norm if norm > 0.0 else 0.0


@numba.njit(nogil=True, cache=True, inline="always")
def _band_weight(ix, ky, extent, half_box, low, high, nyquist_column):
    """``contrast.band_weights`` at column ``ix`` and row frequency ``ky``: 0, 1 or 2 (float32 arithmetic)."""
    kx = np.float32(ix)
    radius = np.sqrt(kx * kx + ky * ky)
    inverse = radius / extent
    keep = radius > np.float32(0.0) and radius <= half_box and inverse >= np.float32(0.0)
    if low >= np.float32(0.0):
        keep = keep and inverse >= low
    if high >= np.float32(0.0):
        keep = keep and inverse <= high
    if not keep:
        return 0.0
    return 1.0 if ix == 0 or ix == nyquist_column else 2.0


def fit_spectra_numba(image_ft, model_ft, box: int, pixel_size_angstrom, low_inverse, high_inverse):
    """(alpha, sigma, correlation), each float32 (n,), of ``contrast.fit_spectra`` on the CPU, compiled.

    ``image_ft``, ``model_ft``: complex64 (n, box, box//2 + 1); band limits in
    1/Å (None: no limit). Raises ValueError for spectra of another shape.
    """
    image_ft = np.ascontiguousarray(image_ft, dtype=np.complex64)
    model_ft = np.ascontiguousarray(model_ft, dtype=np.complex64)
    count = image_ft.shape[0]
    if image_ft.shape != (count, box, box // 2 + 1) or model_ft.shape != image_ft.shape:
        raise ValueError(f"spectra of shape {image_ft.shape} and {model_ft.shape} do not fit box {box}")
    pixel = np.ascontiguousarray(np.broadcast_to(np.asarray(pixel_size_angstrom, dtype=np.float32).reshape(-1),
                                                 (count,)))
    out = [np.empty(count, dtype=np.float32) for _ in range(3)]
    _fit(image_ft, model_ft, pixel, box, np.float32(-1.0 if low_inverse is None else low_inverse),
         np.float32(-1.0 if high_inverse is None else high_inverse), *out)
    return tuple(out)
