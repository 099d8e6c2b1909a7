"""The compiled CPU transfer (numba) against an independent full-plane CTF with exact shift phases,
and against its NumPy twin (``ParticleTransfer.values``), which tests/test_optics.py checks against RELION."""

import numpy as np
import pytest

from dsub.physics.subtract import ParticleTransfer
from dsub.simulate import ctf_full_plane, simulate_particles, to_particle_table, two_domain_phantom

pytest.importorskip("numba")

from dsub.physics._transfer_cpu import multiply_by_transfer  # noqa: E402


def particles(rng, count=7, box=32):
    """A table with varied defocus, astigmatism, phase shift, B-factor, CTF scale, origins and voltages."""
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, count, box, 1.3, rng, snr=None)
    table = to_particle_table(sim)
    table.defocus_u_angstrom = rng.uniform(4000, 35000, count)
    table.defocus_v_angstrom = table.defocus_u_angstrom * rng.uniform(0.85, 1.15, count)
    table.defocus_angle_degrees = rng.uniform(-180, 180, count)
    table.phase_shift_degrees = rng.uniform(0, 90, count)
    table.ctf_bfactor = rng.uniform(0, 80, count)
    table.ctf_scale = rng.uniform(0.5, 1.5, count)
    table.voltage_kv = rng.choice([200.0, 300.0], count)
    table.pixel_size_angstrom = rng.uniform(0.8, 1.6, count)
    table.origins_angstrom = rng.uniform(-40, 40, (count, 2))
    return table


@pytest.mark.parametrize("size", [64, 75, 150])
def test_compiled_transfer_matches_an_independent_ctf_and_exact_shifts(size):
    rng = np.random.default_rng(size)
    table = particles(rng)
    squared = np.arange(len(table)) % 3 == 0
    spectra = np.ones((2, len(table), size, size // 2 + 1), dtype=np.complex64)
    multiply_by_transfer(spectra, table, squared)
    assert np.array_equal(spectra[0], spectra[1])  # each map gets the same transfer
    k = np.fft.fftfreq(size) * size  # the full plane's frequencies, cycles per size
    for p in range(len(table)):
        ctf = table.ctf_scale[p] * ctf_full_plane(
            size, table.pixel_size_angstrom[p], table.defocus_u_angstrom[p], table.defocus_v_angstrom[p],
            table.defocus_angle_degrees[p], table.voltage_kv[p], table.spherical_aberration_mm[p],
            table.amplitude_contrast[p], table.phase_shift_degrees[p], table.ctf_bfactor[p])
        if squared[p]:
            ctf = ctf * ctf
        origin = table.origins_pixels[p].astype(np.float32).astype(np.float64)
        shift = np.exp(2j * np.pi * (k[None, :] * origin[0] + k[:, None] * origin[1]) / size)
        expected = (ctf * shift)[:, : size // 2 + 1]
        compared = spectra[0, p]
        # an even size's last column is +size/2 in an rfft, -size/2 in the full plane: its Hermitian mirror,
        # (+size/2, ky) = conj(-size/2, -ky), except on the row ky = -size/2, whose mirror is not on the grid
        if size % 2 == 0:
            expected[:, -1] = np.conj((ctf * shift)[(-np.arange(size)) % size, size // 2])
            expected, compared = np.delete(expected, size // 2, axis=0), np.delete(compared, size // 2, axis=0)
        np.testing.assert_allclose(compared, expected, rtol=0, atol=3e-7 * np.abs(expected).max())


def test_compiled_transfer_matches_the_numpy_twin():
    rng = np.random.default_rng(5)
    table = particles(rng, count=9)
    for size, squared in ((48, None), (100, np.arange(9) % 2 == 0)):
        transfer = ParticleTransfer(table, size, squared)
        spectra = rng.normal(size=(3, 9, size, size // 2 + 1)) + 1j * rng.normal(size=(3, 9, size, size // 2 + 1))
        spectra = spectra.astype(np.complex64)
        expected = spectra * transfer.values(np)
        out = transfer.multiply(np, spectra.copy())
        # the NumPy twin's shift phases are float32 (1e-5 at origins of 40 pixels); the kernel's float64
        np.testing.assert_allclose(out, expected, rtol=0, atol=3e-5 * np.abs(expected).max())


def test_transfer_with_aberrations_takes_the_array_path():
    rng = np.random.default_rng(2)
    table = particles(rng, count=4)
    table.odd_zernike = rng.normal(0, 0.3, (4, 6))
    transfer = ParticleTransfer(table, 40)
    spectra = np.ones((1, 4, 40, 21), dtype=np.complex64)
    np.testing.assert_array_equal(transfer.multiply(np, spectra), transfer.values(np)[None])


def test_bad_spectra_are_refused():
    table = particles(np.random.default_rng(1), count=2)
    with pytest.raises(ValueError, match="complex64"):
        multiply_by_transfer(np.ones((2, 16, 9), dtype=np.complex64), table)
