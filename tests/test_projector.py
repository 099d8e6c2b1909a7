"""The projector against exact line integrals and against RELION's own projections."""

import numpy as np
import pytest

from dsub.formats.mrc import read_images, read_map
from dsub.formats.star import read_particles
from dsub.physics.projector import image_spectra, prepare_volume, project
from dsub.simulate import GaussianPhantom, random_rotations

BOX = 64

def blob_phantom(spread: float, seed: int = 0) -> GaussianPhantom:
    rng = np.random.default_rng(seed)
    return GaussianPhantom(
        centres=rng.uniform(-spread, spread, size=(12, 3)),
        sigmas=rng.uniform(1.2, 2.5, size=12),
        amplitudes=rng.uniform(0.5, 1.0, size=12),
        domains=np.ones(12, dtype=int),
    )

def projection_error(phantom, projector, padding):
    """Relative RMS error of the engine's projections against the analytic line integrals."""
    rotations = random_rotations(6, np.random.default_rng(3))
    origins = np.random.default_rng(4).uniform(-3, 3, size=(6, 2))
    prepared = prepare_volume(np, phantom.voxelize(BOX), padding)
    spectra = project(np, prepared, rotations, origins, projector)
    images = np.fft.fftshift(np.fft.irfft2(spectra, s=(BOX, BOX)), axes=(-2, -1))
    errors = []
    for image, rotation, origin in zip(images, rotations, origins):
        exact = phantom.project(rotation, origin, BOX)
        errors.append(np.linalg.norm(image - exact) / np.linalg.norm(exact))
    return float(np.mean(errors))

@pytest.mark.parametrize(
    "spread, projector, padding, limit",
    [
        (8, "relion", 2, 0.01),  # compact object, RELION-style slice: under 1 %
        (8, "padded", 2, 0.005),
        (14, "padded", 3, 0.005),  # object filling half the box: dsub's default
        (20, "padded", 3, 0.01),  # object filling most of the box
    ],
)
def test_projection_matches_exact_line_integral(spread, projector, padding, limit):
    assert projection_error(blob_phantom(spread), projector, padding) <= limit

def test_padding_and_padded_slice_reduce_error():
    phantom = blob_phantom(14)
    relion2 = projection_error(phantom, "relion", 2)
    padded2 = projection_error(phantom, "padded", 2)
    padded3 = projection_error(phantom, "padded", 3)
    assert padded3 < padded2 < relion2

def fourier_crop(volume: np.ndarray, size: int) -> np.ndarray:
    """Crop the centred 3D transform to ``size``³ and invert (how the RELION test set was made)."""
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    centre, half = volume.shape[0] // 2, size // 2
    cropped = spectrum[centre - half : centre + half, centre - half : centre + half, centre - half : centre + half]
    scale = (size / volume.shape[0]) ** 3
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(cropped))).real * scale

@pytest.mark.parametrize("name", ["rln_proj_64_centered", "rln_proj_64_shifted"])
@pytest.mark.parametrize("projector", ["relion", "padded"])
def test_reproduces_relion_project(shared_data, name, projector):  # conventions!
    folder = shared_data / "relion_projections"
    volume, _ = read_map(folder / "clean70SRibosome_vol_65p.mrc")
    volume = fourier_crop(volume.astype(np.float64), 64)
    table = read_particles(folder / f"{name}.star", require_ctf=False)
    expected = read_images(table.image_paths, table.image_indices)
    prepared = prepare_volume(np, volume, 2)
    spectra = project(np, prepared, table.rotations, table.origins_pixels, projector)
    images = np.fft.fftshift(np.fft.irfft2(spectra, s=(64, 64)), axes=(-2, -1))
    for ours, theirs in zip(images, expected):
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.98

def test_image_spectra_puts_origin_at_box_centre():
    image = np.zeros((BOX, BOX), dtype=np.float32)
    image[BOX // 2, BOX // 2] = 1.0
    spectrum = image_spectra(np, image[None])[0]
    np.testing.assert_allclose(spectrum, np.ones_like(spectrum), atol=1e-6)
