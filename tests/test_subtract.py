"""Subtraction against ground truth from the independent Gaussian-phantom simulator."""

import dataclasses

import numpy as np
import pytest

from dsub.particles import HALF_A, HALF_B
from dsub.physics.contrast import ContrastFit, soft_window
from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch
from dsub.simulate import (
    apply_ctf,
    ctf_full_plane,
    perturbed,
    simulate_particles,
    soft_sphere_mask,
    to_particle_table,
    two_domain_phantom,
)

BOX = 64


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(11)
    phantom = two_domain_phantom(BOX, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    mask = soft_sphere_mask(phantom, 2, BOX)
    maps = {HALF_A: halves[0].voxelize(BOX), HALF_B: halves[1].voxelize(BOX)}
    # Particles extracted from a 3x larger field, as from a micrograph.
    clean = simulate_particles(halves, 2, 40, BOX, 1.5, rng, snr=None, field=3 * BOX)
    return maps, mask, clean, halves


def run(maps, mask, sim, settings, images=None, swap_halves=False, table=None):
    """Subtract every simulated particle; returns (subtracted, alpha)."""
    table = to_particle_table(sim) if table is None else table
    images = sim.images if images is None else images
    models = {half: prepare_half_map(np, maps[half], mask, settings) for half in (HALF_A, HALF_B)}
    out = np.empty_like(images)
    alpha = np.empty(len(table))
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(table.half_set == half)
        model = models[3 - half] if swap_halves else models[half]
        out[members], alpha[members] = subtract_batch(np, images[members], table.subset(members), model, settings)
    return out, alpha


def residual(out, sim):
    """What is left of the masked domain, relative to the signal that should have gone."""
    truth = sim.images - sim.subtracted_signal
    return np.linalg.norm(out - truth) / np.linalg.norm(sim.subtracted_signal)


def test_noise_free_subtraction_removes_masked_domain(scene):
    maps, mask, sim, _ = scene
    out, alpha = run(maps, mask, sim, SubtractionSettings())
    assert residual(out, sim) < 0.005
    np.testing.assert_allclose(alpha, sim.contrast, rtol=0.005)
    # the kept domain survives untouched
    kept = sim.kept_signal
    assert np.linalg.norm(out - kept) / np.linalg.norm(kept) < 0.005


def test_relion_projector_matches_box_grid_particles_but_not_extracted_ones(scene):
    maps, mask, extracted, halves = scene
    relion = SubtractionSettings(projector="relion")
    # RELION's own model (CTF on the box grid): particles simulated that way are subtracted well.
    box_grid = simulate_particles(halves, 2, 20, BOX, 1.5, np.random.default_rng(12), snr=None)
    assert residual(run(maps, mask, box_grid, relion)[0], box_grid) < 0.03
    # Extracted particles: the CTF's delocalised signal left the box, which only the default models.
    default = residual(run(maps, mask, extracted, SubtractionSettings())[0], extracted)
    assert 10 * default < residual(run(maps, mask, extracted, relion)[0], extracted)


def test_wrong_half_map_is_measurably_worse(scene):
    maps, mask, sim, _ = scene
    settings = SubtractionSettings(scale="input")
    right = residual(run(maps, mask, sim, settings)[0], sim)
    wrong = residual(run(maps, mask, sim, settings, swap_halves=True)[0], sim)
    assert wrong > 5 * right


def test_mask_keeps_with_inverted_mask_gives_same_result(scene):
    maps, mask, sim, _ = scene
    cryosparc_way = run(maps, mask, sim, SubtractionSettings())[0]
    relion_way = run(maps, 1.0 - mask, sim, SubtractionSettings(mask_keeps=True))[0]
    scale = np.abs(cryosparc_way).max()
    np.testing.assert_allclose(relion_way, cryosparc_way, atol=1e-4 * scale)


def test_scale_none_subtracts_unit_contrast(scene):
    maps, mask, sim, _ = scene
    out, alpha = run(maps, mask, sim, SubtractionSettings(scale="none"))
    assert np.all(alpha == 1.0)
    unit = dataclasses.replace(sim, subtracted_signal=sim.subtracted_signal / sim.contrast[:, None, None])
    assert residual(out, unit) < 0.005


def test_ctf_premultiplied_images_subtract_ctf_squared(scene):
    maps, mask, sim, _ = scene
    premultiplied = np.empty_like(sim.images)
    removed = np.empty_like(sim.subtracted_signal)
    for i in range(len(sim.contrast)):
        ctf = ctf_full_plane(BOX, sim.pixel_size, sim.defocus_u[i], sim.defocus_v[i], sim.defocus_angle[i],
                             300.0, 2.7, 0.1)
        premultiplied[i] = apply_ctf(sim.images[i], ctf)
        removed[i] = apply_ctf(sim.subtracted_signal[i], ctf)
    table = to_particle_table(sim)
    table.ctf_premultiplied[:] = True
    target = dataclasses.replace(sim, images=premultiplied, subtracted_signal=removed)
    out, alpha = run(maps, mask, target, SubtractionSettings(), table=table)
    assert residual(out, target) < 0.01
    np.testing.assert_allclose(alpha, sim.contrast, rtol=0.01)


def test_noisy_particles_contrast_recovered_and_beats_one_scale_for_all(scene):
    maps, mask, _, halves = scene
    rng = np.random.default_rng(5)
    sim = simulate_particles(halves, 2, 80, BOX, 1.5, rng, snr=0.1, field=3 * BOX)
    out, alpha = run(maps, mask, sim, SubtractionSettings())
    relative_error = alpha / sim.contrast - 1
    assert abs(np.mean(relative_error)) < 0.02  # unbiased
    assert np.sqrt(np.mean(relative_error**2)) < 0.08  # box 64, SNR 0.1: about 5 %
    assert residual(out, sim) < 0.08
    # Contrast varies ±30 % between particles: fitting beats assuming one scale for all.
    unscaled, _ = run(maps, mask, sim, SubtractionSettings(scale="none"))
    assert residual(out, sim) < 0.5 * residual(unscaled, sim)


def test_cryosparc_window_leaves_contrast_unbiased(scene):
    maps, mask, sim, _ = scene
    windowed = SubtractionSettings(fit=ContrastFit(window_inner=0.85, window_outer=0.99))
    out, alpha = run(maps, mask, sim, windowed)
    np.testing.assert_allclose(alpha, sim.contrast, rtol=0.005)
    assert residual(out, sim) < 0.005


def test_soft_window_profile():
    window = soft_window(np, 64, 0.5, 0.9)
    centre = 32
    assert window[centre, centre] == 1.0 and window[centre, centre + 15] == 1.0  # inside 0.5 * 32 px
    assert window[centre, centre + 29] == 0.0 and window[0, 0] == 0.0  # beyond 0.9 * 32 px, corners
    profile = window[centre, centre:]
    assert np.all(np.diff(profile) <= 0)  # falls monotonically
    assert 0 < window[centre, centre + 22] < 1  # soft in between


def test_fit_band_excludes_frequencies_outside_it(scene):
    maps, mask, sim, _ = scene
    # A band between 20 and 8 Å still recovers the contrast of noise-free particles.
    banded = SubtractionSettings(fit=ContrastFit(low_resolution_angstrom=20.0, high_resolution_angstrom=8.0))
    _, alpha = run(maps, mask, sim, banded)
    np.testing.assert_allclose(alpha, sim.contrast, rtol=0.01)
    with pytest.raises(ValueError, match="fit band is empty"):
        ContrastFit(low_resolution_angstrom=8.0, high_resolution_angstrom=20.0)
