"""Compiled CPU kernel that multiplies spectra by each particle's transfer (CTF times shift phases).

The numba twin of the GPU's ``_transfer_cuda.particle_transfer``, and of
``subtract.ParticleTransfer.values`` (``optics.particle_transfer`` without
aberrations or magnification, ``ctf.ctf_at_frequencies`` and
``projector.shift_phases``), for particles with plain optics. It reads the same
16 numbers per particle (``_transfer_cuda.transfer_parameters``) and evaluates
the transfer per coefficient where it multiplies the spectra, once for all the
maps given, instead of building complex arrays the size of the spectra.

Arithmetic, per coefficient at frequency ``s = k / (size · pixel)``:

    χ + K = π λ (V s² + (U - V) (s · u_φ)²) - (π/2) Cs λ³ s⁴ + phase shift + K,   K = atan2(Q0, √(1 - Q0²))

in float64 (``(s · u_φ)² = |s|² cos²(θ - φ)``, so no angle is computed), and the CTF
``√(1 - Q0²) sin χ + Q0 cos χ = sin(χ + K)`` (RELION's ``K3``, ``ctf.h``) from a
float64 polynomial after reducing the angle to [-π/2, π/2] (below 1e-12 of the
true sine), which the compiler vectorises. The B-factor envelope
``exp(-B s²/4)`` and the shift phases ``exp(2πi (kx ox + ky oy)/size)`` are
separable in x and y: one factor per row and one per column, in float64. The
result multiplies the complex64 spectra in place; it agrees with the NumPy
arrays to float32 rounding (tests/test_transfer_cpu.py). Runs without the GIL.

``subtract.ParticleTransfer.multiply`` uses it where numba imports and the optics are plain.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._transfer_cuda import transfer_parameters

#: Taylor coefficients of sin x = x (1 + c1 x² + c2 x⁴ + ...), to x¹⁹: the first left out is below 1e-14 at π/2.
_SINE_TERMS = np.array([(-1.0) ** k / math.factorial(2 * k + 1) for k in range(10)], dtype=np.float64)


@numba.njit(nogil=True, cache=True, inline="always")
def _sine(angle, terms):
    """sin(angle) for any float64 angle: reduced to [-π, π], folded to [-π/2, π/2], then Taylor by Horner."""
    x = angle - 2.0 * math.pi * np.rint(angle * (0.5 / math.pi))
    if x > 0.5 * math.pi:
        x = math.pi - x
    if x < -0.5 * math.pi:
        x = -math.pi - x
    x2 = x * x
    total = terms[9]
    for k in range(8, -1, -1):
        total = terms[k] + total * x2
    return x * total


@numba.njit(nogil=True, cache=True, inline="always")
def _axis_factors(out, k, frequency, bfactor, scale, shift, size, squared):
    """One axis's separable factor: ``scale`` × B-factor envelope (squared where ``squared``) × shift phase.

    ``out[i]`` for frequency ``k[i]`` (cycles per ``size``), ``frequency`` Å⁻¹ per cycle, ``shift`` pixels.
    """
    for i in range(k.size):
        s = k[i] * frequency
        envelope = math.exp(-bfactor * s * s / 4.0) * scale
        if squared:
            envelope = envelope * envelope
        angle = 2.0 * math.pi * k[i] * shift / size
        out[i] = complex(envelope * math.cos(angle), envelope * math.sin(angle))


@numba.njit(nogil=True, cache=True)
def _multiply(spectra, table, kx, ky, size, terms):
    """``spectra[j, p] *= transfer of particle p`` for every map j; spectra (m, n, rows, half) complex64.

    Row ``iy`` is frequency ``ky[iy]``, column ``ix`` frequency ``kx[ix]`` (cycles per ``size``).
    """
    maps, count, rows, half = spectra.shape
    ctf = np.empty(half, dtype=np.float64)
    column = np.empty(half, dtype=np.complex128)
    row = np.empty(rows, dtype=np.complex128)
    for p in range(count):
        t = table[p]
        frequency = 1.0 / (size * t[0])
        squared = t[14] != 0.0
        offset = t[7] + math.atan2(t[9], t[8])
        astigmatism = t[1] - t[2]
        # separable factors: envelope and shift along x per column, along y (and the scale) per row
        _axis_factors(column, kx, frequency, t[10], 1.0, t[12], size, squared)
        _axis_factors(row, ky, frequency, t[10], t[11], t[13], size, squared)
        for iy in range(rows):
            sy = ky[iy] * frequency
            for ix in range(half):  # the CTF along the row, vectorised
                sx = kx[ix] * frequency
                s2 = sx * sx + sy * sy
                along = sx * t[3] + sy * t[4]
                chi = t[5] * (t[2] * s2 + astigmatism * along * along) - t[6] * s2 * s2 + offset
                value = _sine(chi, terms)
                ctf[ix] = value * value if squared else value
            factor = row[iy]
            for ix in range(half):
                value = ctf[ix] * (factor * column[ix])
                for j in range(maps):
                    spectra[j, p, iy, ix] = spectra[j, p, iy, ix] * np.complex64(value)


def multiply_by_transfer(spectra, particles, squared=None):
    """Multiply ``spectra`` (m, n, size, size//2 + 1) complex64, C-contiguous, in place by each particle's transfer.

    ``particles`` must have plain optics (``_transfer_cuda.plain_optics``);
    ``squared`` as ``subtract.ParticleTransfer``. Returns ``spectra``.
    """
    size = spectra.shape[-2]
    if spectra.dtype != np.complex64 or not spectra.flags.c_contiguous or spectra.ndim != 4:
        raise ValueError("spectra must be C-contiguous complex64 of shape (maps, n, size, size//2 + 1)")
    table = transfer_parameters(particles, squared)
    ky = np.fft.ifftshift(np.arange(size) - size // 2).astype(np.float64)  # 0 .. size/2 - 1, then negative
    kx = np.abs(ky[: size // 2 + 1])  # 0 .. size/2, as the GPU's kernels
    if spectra.size:
        _multiply(spectra, table, kx[: spectra.shape[-1]], ky, size, _SINE_TERMS)
    return spectra
