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
    # shells beyond Nyquist (the cube's corners) are counted in one extra bin, then dropped
    shell = xp.minimum(_shell_index(xp, box), shells).ravel()

    def shell_sum(values):
        return xp.bincount(shell, weights=values.ravel(), minlength=shells + 1)[:shells]

    cross = shell_sum(transform_a.real * transform_b.real + transform_a.imag * transform_b.imag)
    power_a = shell_sum(transform_a.real * transform_a.real + transform_a.imag * transform_a.imag)
    del transform_a
    power_b = shell_sum(transform_b.real * transform_b.real + transform_b.imag * transform_b.imag)
    del transform_b
    norm = xp.sqrt(power_a * power_b)
    fsc = xp.where(norm > 0, cross / xp.where(norm > 0, norm, 1.0), 0.0)
    values = to_numpy(fsc).astype(np.float64)
    counts = to_numpy(xp.bincount(shell, minlength=shells + 1)[:shells]).astype(np.int64)
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
    factor = xp.clip(curve.significant().at(xp, _radius(xp, box) / np.float32(box * voxel)), 0.0, 1.0)
    fft = fft_module(xp)
    spectrum = fft.rfftn(volume)
    spectrum *= factor
    return fft.irfftn(spectrum, s=volume.shape, axes=(0, 1, 2)).astype("float32", copy=False)


def _radius(xp, box: int):
    """|k| (voxels of frequency) on the rfftn half grid of a box³ map, float32 (box, box, box//2 + 1)."""
    k = xp.asarray(np.fft.fftfreq(box) * box, dtype="float32")
    kx = k[: box // 2 + 1].copy()
    kx[-1] = abs(kx[-1])  # rfftfreq: the last column is +Nyquist
    return xp.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def _shell_index(xp, box: int):
    """Shell of each rfftn coefficient: |k| rounded to the nearest integer (RELION), int32."""
    return xp.rint(_radius(xp, box)).astype("int32")
