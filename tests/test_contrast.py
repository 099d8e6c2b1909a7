"""The contrast fit with noisy half maps, against the known true contrast of simulated particles.

Half maps are made as real ones are: the true map plus independent noise in
each half (white noise on a Gaussian-blob phantom, so the FSC falls with
frequency and crosses 0.143 inside the band). Particles come from the *true*
map through the independent simulator (``dsub.simulate``), each with its known
contrast α.
"""

from __future__ import annotations

import numpy as np
import pytest

from dsub.particles import HALF_A, HALF_B
from dsub.physics.contrast import ContrastFit, fit_contrast
from dsub.physics.fsc import ShellCurve, fourier_shell_correlation, wiener_filter
from dsub.physics.subtract import SubtractionSettings, model_images, prepare_half_map
from dsub.simulate import simulate_particles, soft_sphere_mask, to_particle_table, two_domain_phantom

BOX, PIXEL = 48, 1.5


@pytest.fixture(scope="module")
def noisy_maps():
    """(phantom, true map, half maps A and B with independent noise, mask)."""
    rng = np.random.default_rng(7)
    phantom = two_domain_phantom(BOX, rng)
    truth = phantom.voxelize(BOX)
    noise = 1.0 * truth.std()
    halves = [truth + rng.normal(0, noise, truth.shape).astype(np.float32) for _ in range(2)]
    return phantom, truth, halves, soft_sphere_mask(phantom, 2, BOX)


def fit_all(noisy_maps, sim, fit: ContrastFit, with_fsc: bool):
    """Fit every particle against its own half map's full projection; returns the ContrastResult fields."""
    _, _, halves, mask = noisy_maps
    fsc = fourier_shell_correlation(np, halves[0], halves[1], PIXEL) if with_fsc else None
    table = to_particle_table(sim)
    settings = SubtractionSettings(fit=fit)
    alpha, sigma, correlation = (np.empty(len(table)) for _ in range(3))
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(table.half_set == half)
        model = prepare_half_map(np, halves[half - 1], mask, settings, fsc)
        full, _ = model_images(np, model, table.subset(members), BOX, settings)
        result = fit_contrast(np, sim.images[members], full, PIXEL, fit)
        alpha[members], sigma[members], correlation[members] = result.alpha, result.sigma, result.correlation
    return alpha, sigma, correlation


# ----------------------------------------------------------------------------- the FSC itself


def test_fsc_of_signal_plus_independent_noise_matches_its_expectation():
    """Two maps S + N_i: FSC per shell = |S|² / (|S|² + E|N|²), E|N_k|² = σ² · voxels (white noise)."""
    rng = np.random.default_rng(3)
    box, voxel, sigma = 40, 2.0, 0.05
    signal = two_domain_phantom(box, rng).voxelize(box)
    curve = fourier_shell_correlation(np, signal + rng.normal(0, sigma, signal.shape),
                                      signal + rng.normal(0, sigma, signal.shape), voxel)
    np.testing.assert_allclose(curve.frequency_per_angstrom, np.arange(box // 2 + 1) / (box * voxel))
    # Expected value from the signal's own spectrum, shell by shell (rfft half-space, rounded radius).
    spectrum = np.abs(np.fft.rfftn(signal)) ** 2
    k = np.fft.fftfreq(box) * box
    radius = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2
                             + (np.fft.rfftfreq(box) * box)[None, None, :] ** 2)).astype(int)
    for shell in (2, 5, 8, 11, 14, 17):
        inside = radius == shell
        power = spectrum[inside].sum()
        expected = power / (power + inside.sum() * sigma**2 * box**3)
        assert curve.values[shell] == pytest.approx(expected, abs=4 / np.sqrt(inside.sum())), shell
    assert curve.values[2] > 0.9 and curve.values[18] < 0.1  # falls through 0.143 inside the band
    assert 1 / curve.frequency_per_angstrom[18] < curve.resolution_angstrom(0.143) < 1 / curve.frequency_per_angstrom[8]


def test_fsc_of_identical_and_of_unrelated_maps():
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(32, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(fourier_shell_correlation(np, volume, volume, 1.0).values[1:], 1.0, atol=1e-6)
    other = rng.normal(size=volume.shape)
    unrelated = fourier_shell_correlation(np, volume, other, 1.0).values[4:]
    assert np.max(np.abs(unrelated)) < 0.15  # shells of >= 100 voxels: noise of about 1/sqrt(n)
    with pytest.raises(ValueError):
        fourier_shell_correlation(np, volume, volume[:-1], 1.0)


def test_wiener_filter_scales_each_frequency_by_the_curve_at_its_frequency_in_inverse_angstrom():
    """A plane wave of frequency (3, 4, 12) cycles per box (13 shells) in a 64-voxel, 1.3 Å map."""
    box, voxel = 64, 1.3
    frequency = np.arange(box // 2 + 1) / (box * voxel)
    curve = ShellCurve(frequency, 1.0 - 4.0 * frequency, np.full(frequency.size, 10**6))  # linear: exact
    z, y, x = np.meshgrid(*(np.arange(box),) * 3, indexing="ij")
    wave = np.cos(2 * np.pi * (3 * x + 4 * y + 12 * z) / box).astype(np.float32)
    expected = 1.0 - 4.0 * 13 / (box * voxel)
    np.testing.assert_allclose(wiener_filter(np, wave, curve), expected * wave, atol=1e-5)
    # Shells whose FSC is within 3 of its noise (1/sqrt(coefficients)) carry nothing.
    noisy = ShellCurve(frequency, curve.values, np.full(frequency.size, 4))  # noise 0.5: 3 sigma 1.5
    np.testing.assert_allclose(wiener_filter(np, wave, noisy), 0.0, atol=1e-5)
    corner = np.cos(2 * np.pi * (30 * x + 30 * y + 30 * z) / box).astype(np.float32)  # beyond Nyquist shell
    np.testing.assert_allclose(wiener_filter(np, corner, curve), 0.0, atol=1e-5)


# ----------------------------------------------------------------------------- bias, uncertainty, quality


def test_fsc_weighting_removes_the_bias_of_noisy_half_maps(noisy_maps):
    phantom, _, halves, _ = noisy_maps
    curve = fourier_shell_correlation(np, halves[0], halves[1], PIXEL)
    assert 2 * PIXEL < curve.resolution_angstrom(0.143) < 8 * PIXEL  # a realistic half-map FSC
    sim = simulate_particles((phantom, phantom), 2, 120, BOX, PIXEL, np.random.default_rng(8), snr=None)
    plain, _, _ = fit_all(noisy_maps, sim, ContrastFit(weighting="none"), with_fsc=True)
    weighted, sigma, _ = fit_all(noisy_maps, sim, ContrastFit(), with_fsc=True)
    plain_bias = np.mean(plain / sim.contrast) - 1
    weighted_bias = np.mean(weighted / sim.contrast) - 1
    scatter = np.std(weighted / sim.contrast) / np.sqrt(sim.contrast.size)
    # The plain fit is pulled low by the maps' noise (-2.9 % here, over ten times the fit's scatter).
    assert plain_bias < -0.02 and plain_bias < -10 * scatter, (plain_bias, scatter)
    assert abs(weighted_bias) < max(0.01, 3 * scatter), (weighted_bias, scatter)
    # What is left is the maps' own noise in each projection, which sigma accounts for.
    assert np.std(weighted - sim.contrast) == pytest.approx(np.sqrt(np.mean(sigma**2)), rel=0.3)


@pytest.mark.parametrize("snr", [0.1, 0.01])
def test_sigma_matches_the_scatter_of_the_fitted_contrast(noisy_maps, snr):
    phantom = noisy_maps[0]
    sim = simulate_particles((phantom, phantom), 2, 200, BOX, PIXEL, np.random.default_rng(9), snr=snr,
                             contrast_range=(1.0, 1.0))
    alpha, sigma, correlation = fit_all(noisy_maps, sim, ContrastFit(), with_fsc=True)
    empirical = np.std(alpha - 1.0)
    predicted = np.sqrt(np.mean(sigma**2))
    assert predicted == pytest.approx(empirical, rel=0.3), (predicted, empirical)
    assert abs(np.mean(alpha) - 1.0) < 4 * empirical / np.sqrt(alpha.size)
    # The fit correlation follows the images' SNR: clearly positive, and lower for noisier images.
    assert 0.02 < np.median(correlation) < (0.6 if snr == 0.1 else 0.25)


def test_fit_correlation_is_one_for_an_exact_model_and_near_zero_for_noise():
    rng = np.random.default_rng(5)
    models = rng.normal(size=(6, 32, 32)).astype(np.float32)
    exact = fit_contrast(np, 0.7 * models, models, 1.2, ContrastFit())
    np.testing.assert_allclose(exact.alpha, 0.7, rtol=1e-5)
    np.testing.assert_allclose(exact.correlation, 1.0, atol=1e-5)
    np.testing.assert_allclose(exact.sigma, 0.0, atol=1e-5)
    unrelated = fit_contrast(np, rng.normal(size=models.shape).astype(np.float32), models, 1.2, ContrastFit())
    assert np.max(np.abs(unrelated.correlation)) < 4 / 32  # about 1/sqrt(pixels) each
    blank = fit_contrast(np, models, np.zeros_like(models), 1.2, ContrastFit())
    assert np.all(blank.alpha == 0) and np.all(np.isnan(blank.sigma)) and np.all(blank.correlation == 0)
