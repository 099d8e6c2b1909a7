"""CUDA device code for a particle's transfer (CTF times shift phases), computed where it is used.

The GPU twin of ``subtract.ParticleTransfer.values`` (``optics.particle_transfer``
without aberrations or magnification, ``ctf.ctf_at_frequencies`` and
``projector.shift_phases``): kernels that multiply a spectrum by the transfer
evaluate it per coefficient from 16 numbers per particle instead of reading a
precomputed array: the CTF's phase in float64 as the NumPy path, its sine,
cosine and envelope and the shift phases in float32. Particles with aberrations or
a magnification matrix bring their CTF as an array (``given``), and only the
shift phases are evaluated here. Results agree with the NumPy twin to float32
rounding (tests/test_gpu.py).
"""

from __future__ import annotations

import numpy as np

from .ctf import electron_wavelength_angstrom

#: Numbers per particle in ``transfer_parameters`` (a row of float64).
PARAMETERS = 16

SOURCE = r"""
#define TRANSFER_PARAMETERS 16

// scale * CTF (squared where t[14] != 0) times exp(+2 pi i (kx ox + ky oy) / size), with kx, ky in
// cycles per ``size``; ``t`` is the particle's row of transfer_parameters. ``given``: the transfer
// without the shift, one value per coefficient (``index``), or null to evaluate the CTF here.
__device__ __forceinline__ complex<float> particle_transfer(
    const double* __restrict__ t, const float kx, const float ky, const int size,
    const complex<float>* __restrict__ given, const long long index)
{
    float sp, cp;
    sincospif(2.f * (kx * (float)t[12] + ky * (float)t[13]) / size, &sp, &cp);
    const complex<float> shift(cp, sp);
    if (given != nullptr) {
        return given[index] * shift;
    }
    const double frequency = t[15] * (1.0 / size);              // 1 / (size * pixel size), in 1/Å per cycle
    const double sx = kx * frequency, sy = ky * frequency;
    const double s2 = sx * sx + sy * sy;
    const double along = sx * t[3] + sy * t[4];                 // |s| cos(theta - phi)
    // defocus(theta) s^2 = (U cos^2 + V sin^2) s^2 with cos^2 = along^2 / s^2: no division (float64's is slow)
    const double along2 = along * along;
    const double chi = t[5] * (t[1] * along2 + t[2] * (s2 - along2)) - t[6] * s2 * s2 + t[7];
    // chi in float64, reduced to [-pi, pi] before the float32 sine and cosine (float32 rounding of the result)
    const float reduced = (float)(chi - 6.283185307179586 * rint(chi * 0.15915494309189535));
    float sc, cc;
    sincosf(reduced, &sc, &cc);
    float ctf = (float)(t[8] * sc + t[9] * cc) * expf((float)(-t[10] * s2 / 4.0)) * (float)t[11];
    if (t[14] != 0.0) {
        ctf = ctf * ctf;
    }
    return shift * ctf;
}
"""


def plain_optics(particles) -> bool:
    """True when no particle has aberrations, beam tilt or a magnification matrix (the CTF is then evaluated on the GPU)."""
    mag = np.asarray(particles.mag_matrix, dtype=np.float64).reshape(-1, 2, 2)
    return (
        not (particles.even_zernike.shape[1] and np.any(particles.even_zernike))
        and not (particles.odd_zernike.shape[1] and np.any(particles.odd_zernike))
        and not np.any(particles.beam_tilt_mrad)
        and np.array_equal(mag, np.broadcast_to(np.eye(2), mag.shape))
    )


def transfer_parameters(particles, squared=None) -> np.ndarray:
    """Per particle (n, 16) float64: what ``particle_transfer`` reads.

    Pixel size (Å), defocus U and V (Å), cos and sin of the astigmatism angle,
    π λ, π Cs λ³ / 2 (Å), phase shift (rad), √(1 - Q0²), Q0, B-factor (Å²), CTF
    scale, origin x and y (pixels), 1 where the CTF is squared (``squared``),
    and 1 / pixel size (1/Å).
    """
    n = len(particles)
    wavelength = electron_wavelength_angstrom(np.asarray(particles.voltage_kv, dtype=np.float64))
    angle = np.deg2rad(np.asarray(particles.defocus_angle_degrees, dtype=np.float64))
    q0 = np.asarray(particles.amplitude_contrast, dtype=np.float64)
    origins = np.asarray(particles.origins_pixels, dtype=np.float32).astype(np.float64)
    table = np.zeros((n, PARAMETERS), dtype=np.float64)
    columns = (
        particles.pixel_size_angstrom, particles.defocus_u_angstrom, particles.defocus_v_angstrom,
        np.cos(angle), np.sin(angle), np.pi * wavelength,
        0.5 * np.pi * np.asarray(particles.spherical_aberration_mm, dtype=np.float64) * 1e7 * wavelength**3,
        np.deg2rad(np.asarray(particles.phase_shift_degrees, dtype=np.float64)), np.sqrt(1.0 - q0 * q0), q0,
        particles.ctf_bfactor, particles.ctf_scale, origins[:, 0], origins[:, 1],
        np.zeros(n) if squared is None else np.asarray(squared, dtype=np.float64),
        1.0 / np.asarray(particles.pixel_size_angstrom, dtype=np.float64),
    )
    for column, values in enumerate(columns):
        table[:, column] = np.broadcast_to(np.asarray(values, dtype=np.float64), (n,))
    return table
