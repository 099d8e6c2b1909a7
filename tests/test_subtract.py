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
        out[members], fitted = subtract_batch(np, images[members], table.subset(members), model, settings)
        alpha[members] = fitted.alpha
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
    with pytest.raises(ValueError, match="band is empty: --fit-highres"):
        ContrastFit(low_resolution_angstrom=8.0, high_resolution_angstrom=20.0)


@pytest.mark.parametrize("settings", [SubtractionSettings(), SubtractionSettings(projector="relion"),
                                      SubtractionSettings(extension=3.0), SubtractionSettings(field_slice=True)])
def test_memory_model_matches_measured_allocation(settings, maps_traced_by_tracemalloc):
    import tracemalloc

    from dsub.physics.memory import batch_bytes_per_particle, prepared_map_bytes
    from dsub.physics.subtract import ctf_delocalisation_pixels

    box, count = 48, 8
    rng = np.random.default_rng(2)
    phantom = two_domain_phantom(box, rng)
    mask = soft_sphere_mask(phantom, 2, box)
    sim = simulate_particles((phantom, phantom), 2, count, box, 1.5, rng, snr=0.1)
    table = to_particle_table(sim)
    table.half_set[:] = HALF_A
    volume = phantom.voxelize(box)
    # Once before measuring: the compiled kernels' first call imports and compiles them, which is no batch memory.
    subtract_batch(np, sim.images[:1], table.subset(np.arange(1)), prepare_half_map(np, volume, mask, settings),
                   settings)
    tracemalloc.start()
    try:
        models = [prepare_half_map(np, volume, mask, settings) for _ in (HALF_A, HALF_B)]
        resident = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        subtract_batch(np, sim.images, table, models[0], settings)
        working = (tracemalloc.get_traced_memory()[1] - start) / count
    finally:
        tracemalloc.stop()
    assert resident == pytest.approx(prepared_map_bytes(box, settings), rel=0.02)
    expected = batch_bytes_per_particle(box, settings, ctf_delocalisation_pixels(table))
    assert working == pytest.approx(expected, rel=0.25)


@pytest.fixture(scope="module")
def extracted_real_map(shared_data):
    """EMD-3488 cropped to box 64, particles extracted from a 3x field by the independent finufft simulator."""
    pytest.importorskip("finufft")
    from dsub.oracle import extraction_scene, real_map, soft_sphere

    box = 64
    volume = real_map(shared_data / "emd3488" / "emd_3488.mrc", box)
    mask = soft_sphere(box, 13.0, centre_xyz=(4.0, -3.0, 1.0), edge=3.0)
    scenes = {ctf: extraction_scene(volume, mask, 6, 1.56, 3.0, ctf, seed=4) for ctf in (False, True)}
    return volume, mask, scenes


@pytest.mark.parametrize("ctf, limit", [(False, 0.002), (True, 0.005)])
def test_model_matches_particles_extracted_from_a_larger_field(extracted_real_map, ctf, limit):
    from dsub.oracle import in_circle_norm
    from dsub.physics.subtract import model_images

    volume, mask, scenes = extracted_real_map
    scene = scenes[ctf]
    box = volume.shape[0]

    def left(settings):
        _, masked = model_images(np, prepare_half_map(np, volume, mask, settings), scene.table, box, settings)
        return in_circle_norm(masked - scene.masked) / in_circle_norm(scene.masked)

    assert left(SubtractionSettings()) <= limit
    # Sampling the slice on the field's grid also keeps the projection's ringing tails (the map's
    # spectrum ends sharply at Nyquist) that overflow the box: better still.
    assert left(SubtractionSettings(field_slice=True)) <= 0.5 * limit
    if ctf:  # RELION's box-grid CTF wraps what the CTF delocalises: several per cent at box 64
        assert left(SubtractionSettings(projector="relion")) > 0.05


def test_premultiplied_model_is_box_ctf_times_cropped_field_model(extracted_real_map):
    from dsub.oracle import in_circle_norm
    from dsub.physics.subtract import model_images

    volume, mask, scenes = extracted_real_map
    scene = scenes[True]
    box = volume.shape[0]
    table = dataclasses.replace(scene.table, ctf_premultiplied=np.ones(len(scene.contrast), dtype=bool))
    expected = np.empty_like(scene.masked)
    for i in range(len(expected)):  # the premultiplication happened on the extracted box
        ctf = ctf_full_plane(box, 1.56, table.defocus_u_angstrom[i], table.defocus_v_angstrom[i],
                             table.defocus_angle_degrees[i], 300.0, 2.7, 0.1)
        expected[i] = apply_ctf(scene.masked[i], ctf)
    settings = SubtractionSettings()
    _, masked = model_images(np, prepare_half_map(np, volume, mask, settings), table, box, settings)
    assert in_circle_norm(masked - expected) / in_circle_norm(expected) <= 0.005


def test_field_grows_with_ctf_delocalisation():
    from dsub.physics.subtract import ctf_delocalisation_pixels

    sim = simulate_particles((two_domain_phantom(32, np.random.default_rng(1)),) * 2, 2, 4, 32, 1.5,
                             np.random.default_rng(1), snr=None)
    table = to_particle_table(sim)
    table.defocus_u_angstrom[:] = table.defocus_v_angstrom[:] = 20000.0
    table.spherical_aberration_mm[:] = 0.0
    # λ(300 kV) = 0.019687 Å; λ Δf / (2 pixel²) = 0.019687 * 20000 / (2 * 1.5²) = 87.5 pixels
    assert ctf_delocalisation_pixels(table) == pytest.approx(87.5, rel=1e-3)
    settings = SubtractionSettings()
    assert settings.field_size(32) == 64
    assert settings.field_size(32, 87.5) >= 32 + 87.5
    assert settings.field_size(256, 87.5) == 512


@pytest.mark.parametrize("change, message", [({"extension": 1.5}, "extension"), ({"corners": "cube"}, "corners"),
                                             ({"padding": 0.5}, "padding"), ({"projector": "padded"}, "projector")])
def test_settings_refuse_values_outside_their_range(change, message):
    with pytest.raises(ValueError, match=message):
        SubtractionSettings(**change)


@pytest.mark.parametrize("projector, rounded", [("gridding", True), ("relion", False)])
def test_half_map_model_rounds_the_default_maps_to_float16(projector, rounded):
    """The default's prepared maps hold float16 values on NumPy too (the GPU stores them so); RELION's
    projector keeps single precision."""
    from dsub.physics.projector import prepare_volume, projector_kernel, rounded_to_float16

    rng = np.random.default_rng(6)
    volume = rng.normal(size=(16,) * 3).astype(np.float32)
    mask = np.ones_like(volume)
    settings = SubtractionSettings(projector=projector, fit=ContrastFit(weighting="none"))
    model = prepare_half_map(np, volume, mask, settings)
    kernel, oversampling = projector_kernel(projector)
    exact = prepare_volume(np, volume, kernel, oversampling)
    expected = rounded_to_float16(np, prepare_volume(np, volume, kernel, oversampling)) if rounded else exact
    np.testing.assert_array_equal(model.full.transform, expected.transform)
    assert rounded == (not np.array_equal(model.full.transform, exact.transform))
