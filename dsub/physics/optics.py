"""Per-optics-group optics beyond the plain CTF, with RELION's model.

Everything here follows RELION 3.1+ (``src/jaz/single_particle/obs_model.cpp``,
``src/jaz/single_particle/ctf/tilt_helper.cpp``, ``src/jaz/math/Zernike.cpp``,
``src/ctf.h``, ``src/particle_subtractor.cpp``); the conventions are listed in
``dsub.conventions`` ("Optics"). For a particle at pixel size ``p`` and image box
``B`` subtracted with a map of voxel size ``a`` and box ``S``:

* frequencies: image index ``k`` is ``k / (B p)`` in 1/Å; a magnification matrix
  ``M`` (``rlnMagMat00..11``) maps them, ``k' = M k``, before the CTF, the
  aberrations and the projection see them;
* projection: the map is sampled at ``Aᵀ (M k, 0) · S a / (B p)``, which is
  RELION's ``applyAnisoMag`` and ``applyScaleDifference`` on ``A``
  (``slice_matrices``);
* odd aberrations (``rlnOddZernike``, with ``rlnBeamTiltX/Y`` added as RELION's
  ``TiltHelper::insertTilt`` does) multiply the projection by ``exp(i φ_odd)``;
* even aberrations (``rlnEvenZernike``) add to the CTF's phase ``gamma``;
* ``rlnCtfScalefactor`` multiplies the CTF, and CTF-premultiplied images get
  ``(scale · CTF)²`` (``particle_subtractor.cpp`` squares ``Fctf`` after reading
  the scaled CTF), then the odd phase factor (``demodulatePhase(..., true)``).

Zernike polynomials are RELION's unnormalised ``Z(m, n)`` evaluated at the
physical frequency in 1/Å (not a unit disc), so coefficients are radians.
"""

from __future__ import annotations

from math import factorial

import numpy as np

from .ctf import ctf_at_frequencies, electron_wavelength_angstrom, frequency_grid


def odd_zernike_index_to_mn(i: int) -> tuple[int, int]:
    """(m, n) of RELION's i-th odd Zernike coefficient (``Zernike::oddIndexToMN``)."""
    k = int((np.sqrt(1 + 4 * i) - 1.0) / 2.0)
    n = 2 * k + 1
    return 2 * (i - (k * k + k)) - n, n


def even_zernike_index_to_mn(i: int) -> tuple[int, int]:
    """(m, n) of RELION's i-th even Zernike coefficient (``Zernike::evenIndexToMN``)."""
    k = int(np.sqrt(i))
    return 2 * (i - k * k - k), 2 * k


def zernike_cartesian(xp, m: int, n: int, x, y):
    """RELION's ``Zernike::Z_cart(m, n, x, y)``: R_n^|m|(ρ) cos(mφ), or sin(|m|φ) for m < 0."""
    rho = xp.sqrt(x * x + y * y)
    phi = xp.arctan2(y, x)
    mm = abs(m)
    radial = xp.zeros_like(rho)
    if (n - mm) % 2 == 0:
        for k in range((n - mm) // 2 + 1):
            coefficient = (-1) ** k * factorial(n - k) / (
                factorial(k) * factorial((n + mm) // 2 - k) * factorial((n - mm) // 2 - k)
            )
            radial = radial + coefficient * rho ** (n - 2 * k)
    return radial * (xp.cos(m * phi) if m >= 0 else xp.sin(mm * phi))


def zernike_phase(xp, coefficients, index_to_mn, x, y):
    """Σ_i c_i Z(m_i, n_i)(x, y) for per-particle coefficients (n, k); x, y (n, h, w) in 1/Å."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    phase = xp.zeros(x.shape, dtype="float64")
    for i in range(coefficients.shape[1]):
        column = coefficients[:, i]
        if not column.any():
            continue
        m, n = index_to_mn(i)
        weight = xp.asarray(column).reshape(-1, 1, 1)
        phase = phase + weight * zernike_cartesian(xp, m, n, x, y)
    return phase


def odd_zernike_with_beam_tilt(odd_zernike, beam_tilt_mrad, spherical_aberration_mm, voltage_kv):
    """Odd coefficients (n, max(k, 5)) with the beam tilt added as ``TiltHelper::insertTilt``.

    ``Z3 = -π Cs λ² · 2e4 · tilt / 3`` (Cs in mm, λ in Å, tilt in mrad), added
    twice to the linear term (index 1 for x, 0 for y) and once to the coma term
    (4 for x, 3 for y): a phase of ``-2π Cs λ² (tilt · s) |s|²`` in all.
    """
    odd = np.asarray(odd_zernike, dtype=np.float64)
    tilt = np.asarray(beam_tilt_mrad, dtype=np.float64).reshape(-1, 2)
    n = tilt.shape[0]
    odd = odd.reshape(n, -1)
    if not tilt.any():
        return odd
    if odd.shape[1] < 5:
        odd = np.concatenate([odd, np.zeros((n, 5 - odd.shape[1]))], axis=1)
    else:
        odd = odd.copy()
    wavelength = electron_wavelength_angstrom(np.asarray(voltage_kv, dtype=np.float64))
    scale = np.asarray(spherical_aberration_mm, dtype=np.float64) * 20000 * wavelength**2 * 3.141592654
    z3x = -scale * tilt[:, 0] / 3.0
    z3y = -scale * tilt[:, 1] / 3.0
    odd[:, 1] += 2.0 * z3x
    odd[:, 0] += 2.0 * z3y
    odd[:, 4] += z3x
    odd[:, 3] += z3y
    return odd


def particle_frequencies(xp, particles, size: int):
    """Frequencies (sx, sy) in 1/Å of each particle's rfft2 grid of ``size``, mapped by its ``M``.

    Shapes (n, size, size//2 + 1), float64; ``k / (size · pixel_size)`` before ``M``.
    """
    kx, ky = frequency_grid(xp, size, dtype="float64")
    psize = xp.asarray(particles.pixel_size_angstrom, dtype="float64").reshape(-1, 1, 1)
    x = kx[None] / (size * psize)
    y = ky[None] / (size * psize)
    mag = np.asarray(particles.mag_matrix, dtype=np.float64).reshape(-1, 2, 2)
    if np.array_equal(mag, np.broadcast_to(np.eye(2), mag.shape)):
        return x, y
    m = [[xp.asarray(mag[:, r, c]).reshape(-1, 1, 1) for c in range(2)] for r in range(2)]
    return m[0][0] * x + m[0][1] * y, m[1][0] * x + m[1][1] * y


def particle_transfer(xp, particles, size: int, square_premultiplied: bool = True, aberration_phase: bool = True):
    """What multiplies each projection's spectrum: complex64 (n, size, size//2 + 1).

    ``scale · CTF`` (or ``(scale · CTF)²`` for CTF-premultiplied images, unless
    ``square_premultiplied`` is False) with the even aberrations in the CTF
    phase, times ``exp(i φ_odd)`` from the odd aberrations and beam tilt (unless
    ``aberration_phase`` is False: then the real ``scale · CTF`` that
    premultiplied images were multiplied by). Frequencies ``k / (size ·
    pixel_size)``, so ``size`` may exceed the box (a finer grid for the same
    particle).
    """
    sx, sy = particle_frequencies(xp, particles, size)
    even = None
    if particles.even_zernike.shape[1] and np.any(particles.even_zernike):
        even = zernike_phase(xp, particles.even_zernike, even_zernike_index_to_mn, sx, sy)
    ctf = ctf_at_frequencies(
        xp, sx, sy, particles.defocus_u_angstrom, particles.defocus_v_angstrom,
        particles.defocus_angle_degrees, particles.voltage_kv, particles.spherical_aberration_mm,
        particles.amplitude_contrast, particles.phase_shift_degrees, particles.ctf_bfactor, even,
    )
    ctf = ctf * xp.asarray(particles.ctf_scale, dtype="float64").reshape(-1, 1, 1)
    premultiplied = xp.asarray(particles.ctf_premultiplied, dtype=bool).reshape(-1, 1, 1)
    if square_premultiplied:
        ctf = xp.where(premultiplied, ctf * ctf, ctf)
    if not aberration_phase:
        return ctf.astype("complex64")
    odd = odd_zernike_with_beam_tilt(
        particles.odd_zernike, particles.beam_tilt_mrad, particles.spherical_aberration_mm,
        particles.voltage_kv,
    )
    if odd.shape[1] and odd.any():
        phase = zernike_phase(xp, odd, odd_zernike_index_to_mn, sx, sy)
        return (ctf * xp.exp(1j * phase)).astype("complex64")
    return ctf.astype("complex64")


def slice_matrices(particles, map_pixel_size_angstrom=None, map_box: int | None = None) -> np.ndarray:
    """Each particle's effective slice matrix (n, 3, 3) float64 for the projector.

    The projector samples the map at ``kx · A[0] + ky · A[1]``; rows 0 and 1
    become ``c · Mᵀ A[:2]`` with ``c = S a / (B p)`` (map box S and voxel size a,
    particle box B and pixel size p): RELION's ``applyAnisoMag`` (``M⁻¹ A``) and
    ``applyScaleDifference`` seen through the projector's ``A⁻¹``. Row 2 is
    kept. Without a map pixel size, ``c = 1`` (the map is taken at each
    particle's own pixel size). ``particles.rotations`` is left untouched.
    """
    rotations = np.asarray(particles.rotations, dtype=np.float64)
    mag = np.asarray(particles.mag_matrix, dtype=np.float64).reshape(-1, 2, 2)
    out = rotations.copy()
    out[:, :2, :] = np.einsum("nji,njk->nik", mag, rotations[:, :2, :])
    if map_pixel_size_angstrom is not None:
        box = np.asarray(particles.box_size, dtype=np.float64)
        map_box = box if map_box is None else float(map_box)
        ratio = (map_box * float(map_pixel_size_angstrom)) / (box * particles.pixel_size_angstrom)
        out[:, :2, :] *= ratio[:, None, None]
    return out


def map_extent_voxels(map_box: int, box: int, largest_pixel_angstrom: float, map_pixel_angstrom: float) -> int:
    """How many of the map's voxels span the particles' box (their largest pixel size); the map box if equal."""
    if map_box == box:
        return int(map_box)
    return max(1, int(round(box * largest_pixel_angstrom / map_pixel_angstrom)))


def crop_or_pad(volume: np.ndarray, size: int) -> np.ndarray:
    """A cubic map cropped or zero-padded to ``size`` voxels about its centre voxel ``N//2``."""
    box = volume.shape[0]
    if size == box:
        return volume
    out = np.zeros((size, size, size), dtype=volume.dtype)
    if size < box:
        start = box // 2 - size // 2
        return volume[start : start + size, start : start + size, start : start + size].copy()
    start = size // 2 - box // 2
    out[start : start + box, start : start + box, start : start + box] = volume
    return out


def fourier_resample(volume: np.ndarray, size: int) -> np.ndarray:
    """A cubic map Fourier-cropped or -padded to ``size`` voxels: same extent, voxel × N/size.

    The unnormalised transform keeps its values at each physical frequency.
    """
    box = volume.shape[0]
    if size == box:
        return volume
    spectrum = np.fft.fftshift(np.fft.fftn(np.asarray(volume, dtype=np.float64)))
    small = min(size, box)
    lo_in, lo_out = box // 2 - small // 2, size // 2 - small // 2
    out = np.zeros((size, size, size), dtype=np.complex128)
    window_in = slice(lo_in, lo_in + small)
    window_out = slice(lo_out, lo_out + small)
    out[window_out, window_out, window_out] = spectrum[window_in, window_in, window_in]
    return np.fft.ifftn(np.fft.ifftshift(out)).real.astype(volume.dtype)


def fit_map_to_box(volume: np.ndarray, extent_voxels: int, box: int, density: bool = True) -> np.ndarray:
    """The map brought to the particles' box: crop/pad to ``extent_voxels``, then Fourier-resample to ``box``.

    Its voxel size becomes ``voxel · extent_voxels / box`` (give that to
    ``slice_matrices``), so each particle is sampled where RELION's
    ``applyScaleDifference`` samples a map of another box S. Values are scaled by
    ``(box / S)²``: RELION normalises the map's transform by ``(pad·S)³`` and
    multiplies it by ``normfft = pad³·S`` (``Projector::computeFourierTransformMap``),
    and the images' transforms by ``box²``, so a map of box S predicts ``(box/S)²``
    times the line sum through its voxels. ``density=False`` (a mask) keeps the
    values themselves instead (a mask of ones stays ones).
    """
    original = volume.shape[0]
    if original == box:
        return volume
    fitted = fourier_resample(crop_or_pad(np.asarray(volume), int(extent_voxels)), int(box))
    factor = (box / original) ** 2 if density else (box / extent_voxels) ** 3
    return (fitted * factor).astype(fitted.dtype)
