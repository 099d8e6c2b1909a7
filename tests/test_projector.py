"""The projector against independent truth: an exact NUFFT of a real map, exact line integrals of
Gaussian blobs, the kernels' transforms by quadrature, and RELION's own projections."""

import numpy as np
import pytest
from scipy import integrate

from dsub.physics import projector as projector_module

from dsub.formats.mrc import read_images, read_map
from dsub.formats.star import read_particles
from dsub.physics.gridding import GriddingKernel, grid_size, kaiser_bessel
from dsub.physics.projector import (
    FLOAT16_TOP,
    PreparedVolume,
    extract_slices,
    float16_exponent,
    image_spectra,
    prepare_volume,
    prepare_volumes,
    projector_kernel,
    rounded_to_float16,
    shift_phases,
    spectra_to_images,
)
from dsub.simulate import GaussianPhantom, random_rotations

BOX = 64


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def cpu_gather(request, monkeypatch):
    """Every test here runs on both CPU gathers: the compiled kernel (``_slice_cpu``) and the NumPy one."""
    if request.param == "numba":
        pytest.importorskip("numba")
        assert projector_module.compiled_cpu_gather() is not None
    else:
        monkeypatch.setattr(projector_module, "compiled_cpu_gather", lambda: None)
    return request.param


def project(volume, rotations, origins, projector):
    """Shifted projections (n, box, box) of ``volume`` by a projector with its default kernel."""
    kernel, oversampling = projector_kernel(projector)
    prepared = prepare_volume(np, volume, kernel, oversampling)
    box = volume.shape[0]
    corners = "zero" if projector == "relion" else "map"
    spectra = extract_slices(np, prepared, rotations, corners) * shift_phases(np, box, origins)
    return spectra_to_images(np, spectra, box)


@pytest.mark.parametrize("kernel", [GriddingKernel("trilinear", 2), kaiser_bessel(4, 1.25), kaiser_bessel(3, 2.0)])
def test_kernel_transform_matches_quadrature(kernel):
    for frequency in (0.0, 0.1, 0.3, 0.45):
        half = kernel.width / 2

        def integrand(u):
            return float(kernel.weights(np, np.float64(u))) * np.cos(2 * np.pi * u * frequency)

        expected = integrate.quad(integrand, -half, half, limit=200)[0]
        assert kernel.transform(frequency) == pytest.approx(expected, rel=1e-4)


def test_grid_size_is_even_and_fft_friendly():
    assert grid_size(512, 1.25) == 640
    assert grid_size(100, 1.25) == 128  # 126 = 2 * 3^2 * 7 is not 5-smooth
    for box in (48, 100, 128, 200, 333):
        size = grid_size(box, 1.25)
        assert size >= 1.25 * box and size % 2 == 0


def blob_phantom(spread: float, seed: int = 0) -> GaussianPhantom:
    rng = np.random.default_rng(seed)
    return GaussianPhantom(
        centres=rng.uniform(-spread, spread, size=(12, 3)),
        sigmas=rng.uniform(1.2, 2.5, size=12),
        amplitudes=rng.uniform(0.5, 1.0, size=12),
        domains=np.ones(12, dtype=int),
    )


@pytest.mark.parametrize("spread, projector, limit", [(8, "relion", 0.01), (8, "gridding", 0.002), (14, "gridding", 0.002)])
def test_projection_matches_exact_line_integral(spread, projector, limit):
    phantom = blob_phantom(spread)
    rotations = random_rotations(6, np.random.default_rng(3))
    origins = np.random.default_rng(4).uniform(-3, 3, size=(6, 2))
    images = project(phantom.voxelize(BOX), rotations, origins, projector)
    exact = np.array([phantom.project(r, o, BOX) for r, o in zip(rotations, origins)])
    assert np.linalg.norm(images - exact) / np.linalg.norm(exact) <= limit


@pytest.fixture(scope="module")
def real_map_scene(shared_data):
    """EMD-3488 cropped to 64³ about its centre, masked by a soft sphere off-centre, and its NUFFT slices."""
    pytest.importorskip("finufft")
    from dsub.oracle import nufft_slices, real_map, soft_sphere

    volume = real_map(shared_data / "emd3488" / "emd_3488.mrc", BOX)
    masked = volume * soft_sphere(BOX, 18.0, centre_xyz=(4.0, -3.0, 2.0))
    rotations = random_rotations(6, np.random.default_rng(7))
    return masked, rotations, nufft_slices(masked, rotations, BOX)


def oracle_error(real_map_scene, kernel, oversampling):
    """||P - P_oracle|| / ||P_oracle|| inside the Nyquist circle (ratio of norms)."""
    masked, rotations, oracle = real_map_scene
    slices = extract_slices(np, prepare_volume(np, masked, kernel, oversampling), rotations, "zero")
    ky, kx = np.fft.fftfreq(BOX) * BOX, np.fft.rfftfreq(BOX) * BOX
    inside = (ky[:, None] ** 2 + kx[None, :] ** 2) <= (BOX / 2) ** 2
    assert np.all(slices[:, ~inside] == 0)
    return np.linalg.norm((slices - oracle)[:, inside]) / np.linalg.norm(oracle[:, inside])


def test_default_projector_within_0_2_percent_of_nufft_on_real_map(real_map_scene):
    assert oracle_error(real_map_scene, *projector_kernel("gridding")) <= 0.002


def test_default_projector_with_float16_maps_within_0_2_percent_of_nufft_on_real_map(real_map_scene):
    """The half-map models' float16 rounding (``prepare_volumes``) adds about 1e-4 of the slices' norm."""
    masked, rotations, oracle = real_map_scene
    kernel, oversampling = projector_kernel("gridding")
    exact = prepare_volume(np, masked, kernel, oversampling)
    rounded = rounded_to_float16(np, prepare_volume(np, masked, kernel, oversampling))
    assert not np.array_equal(rounded.transform, exact.transform)
    slices = [extract_slices(np, prepared, rotations, "zero") for prepared in (exact, rounded)]
    assert 1e-5 < np.linalg.norm(slices[1] - slices[0]) / np.linalg.norm(slices[0]) < 3e-4
    ky, kx = np.fft.fftfreq(BOX) * BOX, np.fft.rfftfreq(BOX) * BOX
    inside = (ky[:, None] ** 2 + kx[None, :] ** 2) <= (BOX / 2) ** 2  # as oracle_error
    errors = [np.linalg.norm((s - oracle)[:, inside]) / np.linalg.norm(oracle[:, inside]) for s in slices]
    assert errors[1] <= 0.002 and errors[1] == pytest.approx(errors[0], rel=0.02)


def test_float16_rounding_scales_each_map_by_its_own_power_of_two():
    rng = np.random.default_rng(4)
    kernel, oversampling = projector_kernel("gridding")
    volumes = [rng.normal(size=(16,) * 3).astype(np.float32) * weight for weight in (300.0, 0.003)]
    rounded = prepare_volumes(np, volumes, kernel, oversampling, float16=True)
    for volume, prepared in zip(volumes, rounded):
        exact = prepare_volume(np, volume, kernel, oversampling).transform
        parts = np.ascontiguousarray(prepared.transform).view(np.float32)
        exponent = float16_exponent(np, parts)
        scaled = parts * 2.0**exponent
        assert FLOAT16_TOP / 2 < np.abs(scaled).max() <= FLOAT16_TOP
        np.testing.assert_array_equal(scaled.astype(np.float16).astype(np.float32), scaled)  # float16 values
        largest = np.abs(exact.view(np.float32)).max()
        assert np.abs(prepared.transform - exact).max() <= 2.0**-10 * largest  # half an ulp a part
    with pytest.raises(ValueError, match="side-by-side pair"):  # a strided map that is no half of a pair
        rounded_to_float16(np, PreparedVolume(np.zeros((4, 4, 6), np.complex64)[:, :, ::2], 16, kernel))
    assert float16_exponent(np, np.zeros(4, np.float32)) == 0
    assert float16_exponent(np, np.array([FLOAT16_TOP], np.float32)) == 0
    assert float16_exponent(np, np.array([FLOAT16_TOP * 1.0001], np.float32)) == -1
    assert float16_exponent(np, np.array([FLOAT16_TOP / 2], np.float32)) == 1


def float16_test_values(rng) -> np.ndarray:
    """float32 values over float16's whole range, of both signs: random magnitudes from below its smallest
    subnormal to its largest normal, every finite float16 value (2⁻²⁴ ... 65 504), every tie half-way between
    two of them, zero and the ties around the smallest subnormal; a multiple of 4 long (zeros pad it)."""
    spread = np.clip(rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 4.5, 200_000), -65_000, 65_000)
    every = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # 0x7BFF: 65 504
    ties = (every[:-1] + every[1:]) / 2
    values = np.concatenate([spread, every, ties, [0.0, 2.0**-26, 2.0**-25, 3 * 2.0**-25]])
    values = np.concatenate([values, -values]).astype(np.float32)
    return np.concatenate([values, np.zeros(-len(values) % 4, np.float32)])


@pytest.mark.parametrize("exponent", [0, 7, -3])
def test_compiled_float16_rounding_is_numpys_cast_to_the_bit(exponent):
    """``_float16_cpu`` rounds as NumPy's cast to float16 does (ties to even, subnormals, signed zeros), every
    value; of several columns, the columns asked only."""
    pytest.importorskip("numba")
    from dsub.physics._float16_cpu import round_to_float16_in_place

    values = float16_test_values(np.random.default_rng(5)) * np.float32(2.0**-exponent)
    parts = values.reshape(1, 1, -1, 4)
    scale = np.float32(2.0**exponent)
    rounded = parts.copy()
    round_to_float16_in_place(rounded, slice(0, 4), exponent)
    expected = (parts * scale).astype(np.float16).astype(np.float32) / scale
    assert np.array_equal(rounded.view(np.uint32), expected.view(np.uint32))
    assert not np.array_equal(rounded, parts)
    some = parts.copy()
    round_to_float16_in_place(some, slice(1, 3), exponent)
    assert np.array_equal(some[..., 1:3].view(np.uint32), expected[..., 1:3].view(np.uint32))
    assert np.array_equal(some[..., ::3].view(np.uint32), parts[..., ::3].view(np.uint32))  # left as they were
    with pytest.raises(ValueError, match="4-D float32"):
        round_to_float16_in_place(parts[..., ::2], slice(0, 1), 0)


def test_float16_rounding_of_a_pair_is_the_same_with_and_without_numba(monkeypatch):
    """``rounded_to_float16`` of each map of a side-by-side pair: the compiled pass and NumPy's cast agree."""
    pytest.importorskip("numba")
    import builtins

    from dsub.physics import _float16_cpu

    rng = np.random.default_rng(6)
    kernel, oversampling = projector_kernel("gridding")
    volumes = [rng.normal(size=(16,) * 3).astype(np.float32) * weight for weight in (300.0, 0.003)]
    compiled = prepare_volumes(np, volumes, kernel, oversampling, float16=True)
    real_import = builtins.__import__

    def without_the_kernel(name, *args, **kwargs):
        if name.endswith("_float16_cpu") or (args[2:3] and "_float16_cpu" in (args[2] or ())):
            raise ImportError("numba hidden")
        return real_import(name, *args, **kwargs)

    def not_to_be_called(*args, **kwargs):
        raise AssertionError("the compiled rounding ran where numba was hidden")

    monkeypatch.setattr(builtins, "__import__", without_the_kernel)
    monkeypatch.setattr(_float16_cpu, "round_to_float16_in_place", not_to_be_called)
    cast = prepare_volumes(np, volumes, kernel, oversampling, float16=True)
    assert compiled[0].transform.base is compiled[1].transform.base  # the pair's views, both ways
    for ours, numpys in zip(compiled, cast):
        assert np.array_equal(ours.transform.view(np.uint64), numpys.transform.view(np.uint64))


def test_relion_projector_error_against_nufft_is_trilinear_sized(real_map_scene):
    relion = oracle_error(real_map_scene, *projector_kernel("relion"))
    assert 0.002 < relion < 0.05  # the trilinear kernel: a few per mille to a few per cent
    assert oracle_error(real_map_scene, kaiser_bessel(4, 2.0), 2.0) < relion  # a wider kernel does better


def test_slices_follow_hermitian_symmetry_across_qx_zero(real_map_scene):
    # A rotation by 180 degrees about the beam maps k to -k: its slice is the conjugate of the first.
    masked, rotations, _ = real_map_scene
    prepared = prepare_volume(np, masked, *projector_kernel("gridding"))
    flip = np.diag([-1.0, -1.0, 1.0]) @ rotations[0]
    first, flipped = extract_slices(np, prepared, np.stack([rotations[0], flip]), "zero")
    np.testing.assert_allclose(flipped, np.conj(first), atol=1e-4 * np.abs(first).max())


def fourier_crop(volume: np.ndarray, size: int) -> np.ndarray:
    """Crop the centred 3D transform to ``size``³ and invert (how the RELION test set was made)."""
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    centre, half = volume.shape[0] // 2, size // 2
    cropped = spectrum[centre - half : centre + half, centre - half : centre + half, centre - half : centre + half]
    scale = (size / volume.shape[0]) ** 3
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(cropped))).real * scale


@pytest.mark.parametrize("name", ["rln_proj_64_centered", "rln_proj_64_shifted"])
@pytest.mark.parametrize("projector", ["relion", "gridding"])
def test_reproduces_relion_project(shared_data, name, projector):  # conventions!
    folder = shared_data / "relion_projections"
    volume, _ = read_map(folder / "clean70SRibosome_vol_65p.mrc")
    volume = fourier_crop(volume.astype(np.float64), 64)
    table = read_particles(folder / f"{name}.star", require_ctf=False)
    expected = read_images(table.image_paths, table.image_indices)
    images = project(volume, table.rotations, table.origins_pixels, projector)
    for ours, theirs in zip(images, expected):
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.98


def test_image_spectra_puts_origin_at_box_centre():
    image = np.zeros((BOX, BOX), dtype=np.float32)
    image[BOX // 2, BOX // 2] = 1.0
    spectrum = image_spectra(np, image[None])[0]
    np.testing.assert_allclose(spectrum, np.ones_like(spectrum), atol=1e-6)

