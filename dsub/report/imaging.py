"""Image measures for the report: a low-pass filter for display and rotationally averaged power.

Plain NumPy on a small sample of images (the report never touches every particle).
"""

from __future__ import annotations

import numpy as np
import scipy.fft


def spatial_frequency_grid(box: int, pixel_size_angstrom: float) -> np.ndarray:
    """|s| in 1/Å of every coefficient of ``numpy.fft.rfft2`` of a ``box``² image, shape (box, box//2+1)."""
    ky = np.fft.fftfreq(box)[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    return np.hypot(kx, ky) / pixel_size_angstrom


def low_pass(images: np.ndarray, pixel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    """Gaussian low-pass filter for display, half height at ``resolution_angstrom``.

    ``images``: float (n, box, box). Transfer ``H(s) = 2^-(s·R)²`` with ``s`` the
    spatial frequency in 1/Å and ``R`` the resolution: ``H = 1/2`` at ``s = 1/R``.
    Returns float32 of the same shape.
    """
    images = np.asarray(images, dtype=np.float32)
    box = images.shape[-1]
    s = spatial_frequency_grid(box, pixel_size_angstrom)
    transfer = np.exp2(-((s * resolution_angstrom) ** 2)).astype(np.float32)
    return scipy.fft.irfft2(image_spectra(images) * transfer, s=images.shape[-2:], workers=-1).astype(np.float32)


def image_spectra(images: np.ndarray) -> np.ndarray:
    """``rfft2`` of float (n, box, box) images as complex64, on all CPU cores (SciPy keeps single precision)."""
    return scipy.fft.rfft2(np.asarray(images, dtype=np.float32), workers=-1)


def bin_images(images: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``×``factor`` pixel blocks of (n, box, box) images (box cropped to a multiple)."""
    if factor <= 1:
        return images
    n, box = images.shape[0], images.shape[-1] // factor * factor
    return images[:, :box, :box].reshape(n, box // factor, factor, box // factor, factor).mean(axis=(2, 4))


def radial_power_spectrum(spectra: np.ndarray, pixel_size_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotationally averaged power spectrum, averaged over images.

    ``spectra``: ``rfft2`` of (n, box, box) square images (``image_spectra``).
    Shells are one Fourier pixel wide (``round(|k|)``), from 1 (DC left out) to
    ``box//2`` (Nyquist). Power is ``|F|²/box²``, i.e. per pixel (Parseval: white
    noise of variance σ² has power σ² in every shell), so images of any box
    compare. Returns (spatial frequency in 1/Å of each shell, mean power per
    shell), both float64 of length ``box//2``. The mean of ``shell_powers``:
    a sample may be reduced in blocks of images and the rows averaged after.
    """
    return shell_frequencies(spectra.shape[-2], pixel_size_angstrom), shell_powers(spectra).mean(axis=0)


def shell_frequencies(box: int, pixel_size_angstrom: float) -> np.ndarray:
    """Spatial frequency (1/Å) of the shells 1 .. ``box//2`` of ``shell_powers``, float64."""
    return np.arange(1, box // 2 + 1) / (box * pixel_size_angstrom)


def shell_powers(spectra: np.ndarray) -> np.ndarray:
    """Power per pixel of each image in each shell: float64 (n, box//2); ``radial_power_spectrum`` per image.

    ``spectra``: ``rfft2`` of (n, box, box) square images. Works one image at a
    time: beside ``spectra`` it holds two float64 planes of one image.
    """
    box = spectra.shape[-2]
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.fft.rfftfreq(box, 1.0 / box)[None, :]
    shell = np.rint(np.hypot(kx, ky)).astype(np.int64)
    # rfft2 holds the kx > 0 half once; each such coefficient stands for itself and its mirror.
    weight = np.broadcast_to(np.where((kx > 0) & (kx < box / 2), 2.0, 1.0), shell.shape)
    inside = (shell >= 1) & (shell <= box // 2)
    shell, weight = shell[inside], weight[inside]
    counts = np.bincount(shell, weights=weight, minlength=box // 2 + 1)[1:]
    out = np.empty((spectra.shape[0], box // 2), dtype=np.float64)
    for k, image in enumerate(spectra):
        power = np.abs(image[inside]).astype(np.float64) ** 2 / box**2
        out[k] = np.bincount(shell, weights=power * weight, minlength=box // 2 + 1)[1:] / counts
    return out
