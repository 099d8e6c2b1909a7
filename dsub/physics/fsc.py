"""Fourier shell correlation of two half maps, as a function of spatial frequency in 1/Å.

For shells of integer radius r (voxels of frequency, rounded as RELION does):

    FSC(r) = Σ_shell Re(F_A · conj(F_B)) / sqrt(Σ_shell |F_A|² · Σ_shell |F_B|²)

(van Heel & Schatz 2005, J. Struct. Biol. 151:250; RELION ``getFSC`` in
``src/fftw.cpp`` sums the rfft half-space the same way). Shell r is at
frequency r / (N · voxel size) 1/Å.

Why dsub needs it: each half map is the true map S plus its own noise N of
equal power, so the FSC of the two halves estimates S² / (S² + N²) shell by
shell -- the fraction of a half map's power that is signal. Multiplying the
half map's transform by it (``wiener_filter``) gives the least-squares
estimate of S, the model that makes the contrast fit unbiased (``contrast.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import fft_module, to_numpy


@dataclass(frozen=True)
class ShellCurve:
    """A curve over Fourier shells: ``values[i]`` at ``frequency_per_angstrom[i]`` (NumPy, shape (m,))."""

    frequency_per_angstrom: np.ndarray
    values: np.ndarray
    coefficients: np.ndarray | None = None  # (m,) Fourier coefficients summed in each shell

    def significant(self, sigmas: float = 3.0) -> "ShellCurve":
        """The curve with shells not above ``sigmas`` times their noise (1/sqrt(coefficients)) set to 0.

        The FSC of two unrelated maps scatters about 0 with a standard deviation of
        about 1/sqrt(n) for n coefficients in the shell.
        """
        if self.coefficients is None:
            return self
        noise = sigmas / np.sqrt(np.maximum(self.coefficients, 1))
        return ShellCurve(self.frequency_per_angstrom, np.where(self.values > noise, self.values, 0.0),
                          self.coefficients)

    def at(self, xp, frequency_per_angstrom):
        """The curve linearly interpolated at ``frequency_per_angstrom`` (any shape, 1/Å), float32.

        Beyond the last shell (the map's Nyquist) the curve is 0.
        """
        frequency = xp.asarray(self.frequency_per_angstrom, dtype="float32")
        values = xp.asarray(self.values, dtype="float32")
        return xp.interp(xp.asarray(frequency_per_angstrom, dtype="float32"), frequency, values,
                         right=0.0).astype("float32")

    def resolution_angstrom(self, threshold: float = 0.143) -> float:
        """Resolution (Å) of the first shell after DC where the curve falls below ``threshold``; inf if never."""
        below = np.flatnonzero(self.values[1:] < threshold)
        if below.size == 0:
            return float(1.0 / self.frequency_per_angstrom[-1])
        return float(1.0 / self.frequency_per_angstrom[1 + below[0]])


def fourier_shell_correlation(xp, half_a, half_b, voxel_size_angstrom: float) -> ShellCurve:
    """FSC of two cubic maps (z, y, x) of the same shape, shells 0 .. N//2 (NumPy results).

    ``voxel_size_angstrom`` sets the frequency scale. Shells where either map has
    no power get FSC 0. Raises ValueError for maps of different or non-cubic shape.
    """
    half_a = xp.asarray(half_a, dtype="float32")
    half_b = xp.asarray(half_b, dtype="float32")
    if half_a.shape != half_b.shape or half_a.ndim != 3 or len(set(half_a.shape)) != 1:
        raise ValueError(f"half maps must be cubic and of one shape, got {half_a.shape} and {half_b.shape}")
    box = int(half_a.shape[0])
    fft = fft_module(xp)
    transform_a = fft.rfftn(half_a)
    transform_b = fft.rfftn(half_b)
    shells = box // 2 + 1
    sums = xp.zeros((4, shells + 1), dtype="float64")  # cross, power a, power b, coefficients
    for planes in _plane_chunks(box):
        # shells beyond Nyquist (the cube's corners) are counted in one extra bin, then dropped
        shell = xp.minimum(xp.rint(_radius(xp, box, planes)).astype("int32"), shells).ravel()
        a, b = transform_a[planes], transform_b[planes]
        for row, values in enumerate((a.real * b.real + a.imag * b.imag, a.real * a.real + a.imag * a.imag,
                                      b.real * b.real + b.imag * b.imag)):
            sums[row] += xp.bincount(shell, weights=values.ravel(), minlength=shells + 1)
        sums[3] += xp.bincount(shell, minlength=shells + 1)
    del transform_a, transform_b
    cross, power_a, power_b, counts = sums[:, :shells]
    norm = xp.sqrt(power_a * power_b)
    fsc = xp.where(norm > 0, cross / xp.where(norm > 0, norm, 1.0), 0.0)
    values = to_numpy(fsc).astype(np.float64)
    counts = to_numpy(counts).astype(np.int64)
    frequency = np.arange(shells) / (box * float(voxel_size_angstrom))
    return ShellCurve(frequency_per_angstrom=frequency, values=values, coefficients=counts)


def wiener_filter(xp, volume, curve: ShellCurve):
    """``volume`` (cubic, z y x, the maps' box and voxel size) with each shell scaled by the significant FSC.

    Factor per voxel of frequency: ``curve.significant()`` clipped to [0, 1] at
    that frequency (0 beyond the last shell, the map's Nyquist). Returns float32.
    """
    volume = xp.asarray(volume, dtype="float32")
    box = int(volume.shape[0])
    voxel = 1.0 / (box * float(curve.frequency_per_angstrom[1]))
    fft = fft_module(xp)
    spectrum = fft.rfftn(volume)
    curve = curve.significant()
    for planes in _plane_chunks(box):
        radius = _radius(xp, box, planes)
        spectrum[planes] *= xp.clip(curve.at(xp, radius / np.float32(box * voxel)), 0.0, 1.0)
    return fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2)).astype("float32", copy=False)


def _plane_chunks(box: int, planes: int = 16):
    """Slices of ``planes`` z planes covering a box: the per-shell sums run a few planes at a time,
    so their temporaries stay small (reused by the allocator instead of fresh pages each time)."""
    return [slice(start, min(start + planes, box)) for start in range(0, box, planes)]


def _radius(xp, box: int, planes: slice):
    """|k| (voxels of frequency) of z ``planes`` of the rfftn half grid of a box³ map, float32."""
    k = np.fft.fftfreq(box) * box
    kx = np.abs(k[: box // 2 + 1])  # rfftfreq: the last column of an even box is +Nyquist
    k, kz, kx = (xp.asarray(values, dtype="float32") for values in (k, k[planes], kx))
    return xp.sqrt(kz[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
