"""The contrast transfer function, with RELION's formula and units.

Defocus U/V in Å (positive = underfocus), astigmatism angle and phase shift in
degrees, Cs in mm, voltage in kV, amplitude contrast Q0 as a fraction:

    λ  = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))      (Å, V in volts)
    Δf = U cos²(θ - φ) + V sin²(θ - φ)
    χ  = π λ Δf s² - (π/2) Cs λ³ s⁴ + phase_shift
    CTF = sqrt(1 - Q0²) sin(χ - γ_even) + Q0 cos(χ - γ_even),  times exp(-B s² / 4)

This is RELION's ``-sin(gamma)`` (``ctf.h: CTF::getCTF``, ``K3 = atan(Q0/sqrt(1-Q0²))``),
with ``γ_even`` its even-Zernike offset (``obs_model.cpp: getGammaOffset``) added
to ``gamma``. With a magnification matrix the frequencies are first mapped by it
(``getCTF``: ``Xd = M00 X + M01 Y``, ``Yd = M10 X + M11 Y``). The CTF scale
factor, the premultiplied square and the odd (beam-tilt) phase factor are applied
in ``dsub.physics.optics.particle_transfer``.
"""

from __future__ import annotations


def electron_wavelength_angstrom(voltage_kv):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / (volts * (1.0 + 0.978466e-6 * volts)) ** 0.5


def frequency_grid(xp, size: int, dtype="float32"):
    """Frequencies (kx, ky) of an rfft2 half-plane of a ``size``² image, in cycles per box.

    Returns two arrays of shape (size, size//2 + 1): kx along the last axis
    (0 .. size/2) and ky along the first (0 .. size/2-1, then negative).
    """
    ky = xp.fft.fftfreq(size).astype(dtype) * size
    kx = xp.fft.rfftfreq(size).astype(dtype) * size
    return xp.broadcast_to(kx[None, :], (size, size // 2 + 1)), xp.broadcast_to(
        ky[:, None], (size, size // 2 + 1)
    )


def ctf_2d(xp, size: int, pixel_size_angstrom, *parameters):
    """CTFs of a batch of particles on an rfft2 half-plane, float32 (n, size, size//2+1).

    ``parameters`` are those of ``ctf_at_frequencies`` after ``sy`` (defocus U,
    V, angle, voltage, Cs, amplitude contrast, phase shift, B-factor), each of
    length n or a scalar; ``size`` is the box the CTF is sampled for, so
    frequencies are ``k / (size * pixel_size)``.
    """
    kx, ky = frequency_grid(xp, size, dtype="float64")
    psize = xp.asarray(pixel_size_angstrom, dtype="float64").reshape(-1, 1, 1)
    return ctf_at_frequencies(xp, kx[None] / (size * psize), ky[None] / (size * psize), *parameters).astype("float32")


def ctf_at_frequencies(
    xp,
    sx,
    sy,
    defocus_u_angstrom,
    defocus_v_angstrom,
    defocus_angle_degrees,
    voltage_kv,
    spherical_aberration_mm,
    amplitude_contrast,
    phase_shift_degrees,
    bfactor,
    even_phase=None,
):
    """CTFs (float64) at frequencies ``sx``, ``sy`` in 1/Å, each (n, h, w) or broadcastable.

    The frequencies are those the CTF sees, i.e. already mapped by any
    magnification matrix. ``even_phase`` (radians, same shape, or None) is
    RELION's even-Zernike ``gammaOffset``; the other parameters are per
    particle, length n.
    """

    def column(value):
        return xp.asarray(value, dtype="float64").reshape(-1, 1, 1)

    s2 = sx * sx + sy * sy
    theta = xp.arctan2(sy, sx)
    phi = xp.deg2rad(column(defocus_angle_degrees))
    cos2 = xp.cos(theta - phi) ** 2
    defocus = column(defocus_u_angstrom) * cos2 + column(defocus_v_angstrom) * (1.0 - cos2)
    wavelength = electron_wavelength_angstrom(column(voltage_kv))
    cs_angstrom = column(spherical_aberration_mm) * 1e7
    chi = (
        xp.pi * wavelength * defocus * s2
        - 0.5 * xp.pi * cs_angstrom * wavelength**3 * s2 * s2
        + xp.deg2rad(column(phase_shift_degrees))
    )
    if even_phase is not None:
        chi = chi - even_phase
    q0 = column(amplitude_contrast)
    ctf = xp.sqrt(1.0 - q0 * q0) * xp.sin(chi) + q0 * xp.cos(chi)
    bfactor = column(bfactor)
    return ctf * xp.exp(-bfactor * s2 / 4.0)
