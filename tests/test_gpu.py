"""The GPU path (CuPy + the CUDA slice kernel) against the NumPy twin.

Runs only where CuPy sees a GPU; CI has none, so these are skipped there and
run on a GPU machine (results in BENCHMARKS.md).
"""

import numpy as np
import pytest

from dsub.physics.backend import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a visible GPU"),
]

from dsub.cluster.gpus import visible_gpus  # noqa: E402
from dsub.particles import HALF_A, HALF_B  # noqa: E402
from dsub.physics.projector import extract_slices, prepare_volume, projector_kernel  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch  # noqa: E402
from dsub.simulate import perturbed, simulate_particles, soft_sphere_mask, to_particle_table, two_domain_phantom  # noqa: E402


@pytest.fixture(scope="module")
def cupy():
    import cupy

    return cupy


@pytest.mark.parametrize(
    "box, projector, corners, size",
    [(64, "relion", "zero", None), (64, "gridding", "map", None), (65, "gridding", "zero", None),
     (64, "gridding", "map", 128), (48, "gridding", "zero", 100)],
)
def test_slice_kernel_matches_numpy(cupy, box, projector, corners, size):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(box, box, box)).astype(np.float32)
    rotations = np.array([np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(7)])
    rotations[0] = np.eye(3)  # lattice points: taps at the kernel's edge
    rotations[1, :2] *= 1.03  # magnification folded into the rows
    kernel, oversampling = projector_kernel(projector)
    cpu = extract_slices(np, prepare_volume(np, volume, kernel, oversampling), rotations, corners, size)
    prepared = prepare_volume(cupy, volume, kernel, oversampling)
    np.testing.assert_allclose(prepared.transform.get(), prepare_volume(np, volume, kernel, oversampling).transform,
                               atol=1e-4 * float(np.abs(cpu).max()))
    gpu = extract_slices(cupy, prepared, rotations, corners, size).get()
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-5


@pytest.mark.parametrize("tile_x", [None, 16, 8])
@pytest.mark.parametrize("projector, corners, size, float16", [
    ("relion", "zero", None, False), ("gridding", "map", None, False), ("gridding", "zero", 100, False),
    ("gridding", "map", None, True), ("gridding", "zero", 100, True)])
def test_slice_pair_kernel_matches_numpy(cupy, projector, corners, size, float16, tile_x, monkeypatch):
    """Two maps prepared side by side on the GPU, sliced in one launch (with the transfer and the
    checkerboard), against NumPy's slices of each map prepared alone; threads over rows (the choice for
    maps this small) and over tiles of 16 and 8 columns (a plane of 51 columns: partial tiles). ``float16``:
    the pair stored in float16 (half the bytes), against NumPy's maps rounded the same way; the masked map
    ten times weaker than the whole, so that each map's own scaling shows."""
    from dsub.physics import _slice_cuda
    from dsub.physics._slice_cuda import extract_slice_pair_cuda, side_by_side

    monkeypatch.setattr(_slice_cuda, "TILE_X", tile_x)
    from dsub.physics._transfer_cuda import transfer_parameters
    from dsub.physics.projector import prepare_volumes
    from dsub.physics.subtract import ParticleTransfer

    from dsub.physics.projector import rounded_to_float16

    rng = np.random.default_rng(3)
    box = 48
    volumes = [rng.normal(size=(box, box, box)).astype(np.float32) * weight for weight in (1.0, 0.1)]
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, 6, box, 1.5, rng, snr=None)
    table = to_particle_table(sim)
    kernel, oversampling = projector_kernel(projector)
    paired = prepare_volumes(cupy, [cupy.asarray(v) for v in volumes], kernel, oversampling, float16=float16)
    pair = side_by_side(paired)
    assert pair is not None and pair.shape[-1] == (4 if float16 else 2)
    assert pair.dtype == (np.float16 if float16 else np.complex64)
    alone = [prepare_volume(np, v, kernel, oversampling) for v in volumes]
    if float16:
        alone = [rounded_to_float16(np, reference) for reference in alone]
        assert pair.nbytes == alone[0].transform.nbytes  # both maps in the bytes of one complex64 map
    for volume, reference in zip(paired, alone):
        stored = volume.transform.get()
        values = (stored[..., 0] + 1j * stored[..., 1].astype(np.float32)) * volume.scale if float16 else stored
        np.testing.assert_allclose(values, reference.transform,
                                   atol=(1e-3 if float16 else 1e-4) * float(np.abs(reference.transform).max()))
    grid = size or box
    transfer = ParticleTransfer(table, grid).values(np)
    checkerboard = (-1.0) ** np.add.outer(np.arange(grid), np.arange(grid // 2 + 1))
    got = extract_slice_pair_cuda(paired, table.rotations, corners, grid, checkerboard=True,
                                  transfer=cupy.asarray(transfer_parameters(table))).get()
    assert got.shape == (2, len(table), grid, grid // 2 + 1)
    for index, reference in enumerate(alone):
        expected = extract_slices(np, reference, table.rotations, corners, size) * transfer * checkerboard
        # float16: a value GPU and NumPy prepare a float32 rounding apart may round to neighbouring float16s
        assert np.linalg.norm(got[index] - expected) / np.linalg.norm(expected) < (3e-5 if float16 else 1e-5)
        one = extract_slices(cupy, paired[index], table.rotations, corners, size).get()  # one map of the pair alone
        assert np.linalg.norm(one * transfer * checkerboard - got[index]) / np.linalg.norm(expected) < 1e-6


def test_fsc_and_wiener_filter_on_gpu_match_numpy(cupy):
    from dsub.physics.fsc import fourier_shell_correlation, wiener_filter

    rng = np.random.default_rng(5)
    signal = two_domain_phantom(48, rng).voxelize(48)
    halves = [signal + rng.normal(0, 0.05, signal.shape).astype(np.float32) for _ in range(2)]
    cpu = fourier_shell_correlation(np, *halves, 1.5)
    gpu = fourier_shell_correlation(cupy, *(cupy.asarray(h) for h in halves), 1.5)
    np.testing.assert_allclose(gpu.values, cpu.values, atol=1e-5)
    np.testing.assert_array_equal(gpu.coefficients, cpu.coefficients)
    filtered = wiener_filter(cupy, cupy.asarray(halves[0]), cpu).get()
    np.testing.assert_allclose(filtered, wiener_filter(np, halves[0], cpu), atol=1e-5 * np.abs(halves[0]).max())


def with_optics(table, rng):
    """The table with per-particle aberrations, beam tilt, a magnification matrix and CTF scale factors."""
    n = len(table)
    table.even_zernike = rng.normal(0, 0.3, (n, 9))
    table.odd_zernike = rng.normal(0, 0.3, (n, 6))
    table.beam_tilt_mrad = rng.normal(0, 0.5, (n, 2))
    table.mag_matrix = np.eye(2) + rng.normal(0, 0.01, (n, 2, 2))
    table.ctf_scale = rng.uniform(0.5, 1.5, n)
    return table


@pytest.mark.parametrize(
    "projector, premultiplied, variant",
    [("gridding", False, None), ("gridding", True, None), ("relion", True, None), ("gridding", True, "optics"),
     ("relion", True, "optics"), ("gridding", False, "field slice")],
)
def test_subtraction_on_gpu_matches_cpu(cupy, projector, premultiplied, variant):
    box = 64
    rng = np.random.default_rng(3)
    phantom = two_domain_phantom(box, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    mask = soft_sphere_mask(phantom, 2, box)
    sim = simulate_particles(halves, 2, 24, box, 1.5, rng, snr=0.1)
    table = to_particle_table(sim)
    table.ctf_premultiplied[::2] = premultiplied
    if variant == "optics":  # the CTF comes to the kernels as an array
        table = with_optics(table, rng)
    settings = SubtractionSettings(projector=projector, field_slice=variant == "field slice")
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(table.half_set == half)
        volume = halves[half - 1].voxelize(box)
        cpu, alpha_cpu = subtract_batch(np, sim.images[members], table.subset(members),
                                        prepare_half_map(np, volume, mask, settings), settings)
        gpu, alpha_gpu = subtract_batch(cupy, sim.images[members], table.subset(members),
                                        prepare_half_map(cupy, volume, mask, settings), settings)
        for name in ("alpha", "sigma", "correlation"):
            np.testing.assert_allclose(getattr(alpha_gpu, name).get(), getattr(alpha_cpu, name), rtol=1e-4)
        assert np.max(np.abs(gpu.get() - cpu)) <= 1e-4 * np.max(np.abs(cpu))


def test_optics_on_gpu_match_cpu(cupy, shared_data):
    from dsub.formats import star as star_format
    from dsub.physics.optics import particle_transfer

    table = star_format.read_particles(shared_data / "cryodrgn/relion31.6opticsgroups.star")
    table.ctf_scale = np.linspace(0.5, 1.5, len(table))
    for size in (196, 392):  # the box, and the extended grid a projector may ask for
        cpu = particle_transfer(np, table, size)
        gpu = particle_transfer(cupy, table, size).get()
        assert np.max(np.abs(gpu - cpu)) < 1e-4 * np.max(np.abs(cpu))


@pytest.mark.skipif(not gpu_available() or len(visible_gpus()) < 2, reason="needs two GPUs")
def test_local_cluster_uses_every_gpu(tmp_path):
    import json
    import subprocess
    import sys

    from dsub.demo import make_dataset

    paths, _ = make_dataset(tmp_path / "data", count=128, box=48)
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"),
               "--scheduler", "local", "--chunk-size", "8", "--quiet", "--dashboard-address", "127.0.0.1:0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "dsub_run.json").read_text())
    assert summary["workers"] >= 2
    assert len({d for d in summary["devices"] if d.startswith("gpu:")}) >= 2


@pytest.mark.parametrize("box", [64, 128])
def test_memory_estimate_bounds_the_gpu_pool_peak(cupy, box):
    """The prepared-map estimate (counted for NumPy) is an upper bound on the GPU, and not a wasteful one."""
    from dsub.physics._slice_cuda import side_by_side
    from dsub.physics.memory import prepared_map_bytes, preparation_peak_bytes

    settings = SubtractionSettings()
    rng = np.random.default_rng(box)
    halves = [rng.normal(size=(box,) * 3).astype(np.float32) for _ in range(2)]
    mask = rng.uniform(0, 1, (box,) * 3).astype(np.float32)
    pool = cupy.get_default_memory_pool()
    cupy.fft.config.get_plan_cache().clear()
    pool.free_all_blocks()
    before = pool.total_bytes()  # the pool only grows: what it holds afterwards is its peak
    models = [prepare_half_map(cupy, half, mask, settings) for half in halves]
    cupy.cuda.Device().synchronize()
    peak = pool.total_bytes() - before
    assert models and peak <= preparation_peak_bytes(box, settings) <= 1.6 * peak
    # the default's maps stay in float16 on the GPU: the resident figure the plan counts
    resident = sum(side_by_side((model.full, model.masked)).nbytes for model in models)
    assert resident == prepared_map_bytes(box, settings, "gpu") == prepared_map_bytes(box, settings) // 2


@pytest.mark.parametrize("box", [64, 65])
def test_relion_pair_read_through_its_texture_gives_the_same_slices(cupy, box, monkeypatch):
    """A complex64 pair is also kept in a 3D texture (point sampling): the slices read through it are those
    of the pair where it lies, to the bit, and the plan counts its bytes."""
    import dataclasses

    from dsub.physics._slice_cuda import extract_slice_pair_cuda, side_by_side
    from dsub.physics.memory import prepared_map_bytes, texture_bytes
    from dsub.simulate import random_rotations

    from dsub.physics import projector

    monkeypatch.setattr(projector, "PAIR_TEXTURE_BYTES", (0, 2**30))  # pairs this small go in a texture too
    settings = SubtractionSettings(projector="relion")
    rng = np.random.default_rng(box)
    halves = [rng.normal(size=(box,) * 3).astype(np.float32) for _ in range(2)]
    mask = rng.uniform(0, 1, (box,) * 3).astype(np.float32)
    models = [prepare_half_map(cupy, half, mask, settings) for half in halves]
    volumes = (models[0].full, models[0].masked)
    assert volumes[0].texture is not None and volumes[1].texture is volumes[0].texture
    pair = side_by_side(volumes)
    assert volumes[0].texture.nbytes == pair.nbytes
    plain = tuple(dataclasses.replace(volume, texture=None) for volume in volumes)
    rotations = np.concatenate([random_rotations(40, rng), np.eye(3)[None]])
    for corners in ("zero", "map"):
        through_texture = extract_slice_pair_cuda(volumes, rotations, corners, box, checkerboard=True)
        where_it_lies = extract_slice_pair_cuda(plain, rotations, corners, box, checkerboard=True)
        assert float(cupy.abs(where_it_lies).max()) > 0
        assert bool(cupy.array_equal(through_texture, where_it_lies))
    pairs = sum(side_by_side((model.full, model.masked)).nbytes for model in models)
    assert pairs + texture_bytes(models) == prepared_map_bytes(box, settings, "gpu") == 2 * prepared_map_bytes(box, settings)
    monkeypatch.undo()
    assert prepare_half_map(cupy, halves[0], mask, settings).full.texture is None  # 1 MB: read where it lies
    assert prepared_map_bytes(box, settings, "gpu") == prepared_map_bytes(box, settings)


def test_no_room_for_the_texture_leaves_the_pair_where_it_lies(cupy, monkeypatch):
    """A texture the GPU has no room for is not made: the slices are read from the pair, and the run goes on."""
    from dsub.physics import _slice_cuda, projector

    def no_room(pair):
        raise cupy.cuda.runtime.CUDARuntimeError(2)  # cudaErrorMemoryAllocation

    monkeypatch.setattr(projector, "PAIR_TEXTURE_BYTES", (0, 2**30))
    monkeypatch.setattr(_slice_cuda, "PairTexture", no_room)
    settings = SubtractionSettings(projector="relion")
    rng = np.random.default_rng(3)
    half = rng.normal(size=(48,) * 3).astype(np.float32)
    model = prepare_half_map(cupy, half, np.ones_like(half), settings)
    assert model.full.texture is None and model.masked.texture is None
    sim = simulate_particles((two_domain_phantom(48, rng),) * 2, 2, 4, 48, 1.3, rng, snr=None)
    table = to_particle_table(sim)
    subtracted, _ = subtract_batch(cupy, sim.images, table, model, settings)
    assert subtracted.shape == sim.images.shape


@pytest.mark.parametrize("box, new_box", [(64, 48), (64, 96)])
def test_translate_and_window_matches_numpy(cupy, box, new_box):
    from dsub.workflow.rebox import translate_and_window

    rng = np.random.default_rng(box + new_box)
    images = rng.normal(size=(9, box, box)).astype(np.float32)
    shifts = rng.integers(-box // 2, box // 2, size=(9, 2))
    cpu = translate_and_window(np, images, shifts, new_box)
    gpu = translate_and_window(cupy, cupy.asarray(images), shifts, new_box)
    np.testing.assert_array_equal(gpu.get(), cpu)


def test_lowpass_matches_numpy(cupy):
    from dsub.physics.lowpass import lowpass_map

    volume = np.random.default_rng(3).normal(size=(48, 48, 48)).astype(np.float32)
    cpu = lowpass_map(np, volume, 1.5, 8.0)
    gpu = cupy.asnumpy(lowpass_map(cupy, cupy.asarray(volume), 1.5, 8.0))
    np.testing.assert_allclose(gpu, cpu, atol=1e-5 * float(np.abs(cpu).max()))


@pytest.mark.parametrize("optics, size", [(False, 64), (True, 64), (False, 150), (True, 150)])
def test_transfer_kernel_matches_numpy(cupy, optics, size):
    """The transfer the kernels evaluate (CTF, squared CTF, shift phases) against ``ParticleTransfer.values``."""
    from dsub.physics._model_cuda import extract_in_field
    from dsub.physics.subtract import ParticleTransfer

    rng = np.random.default_rng(size + optics)
    box = 48
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, 9, box, 1.3, rng, snr=None)
    table = to_particle_table(sim)
    table.phase_shift_degrees = rng.uniform(0, 90, len(table))
    table.ctf_bfactor = rng.uniform(0, 50, len(table))
    if optics:
        table = with_optics(table, rng)
    squared = np.arange(len(table)) % 3 == 0
    transfer = ParticleTransfer(table, size, squared)
    expected = transfer.values(np)
    parameters, given = transfer.for_kernels(cupy)
    assert (given is None) != optics
    # a unit impulse at the field's centre: its field spectrum is (-1)^(kx+ky) · transfer; read back through
    # the kernel that multiplies spectra, compared in real space on the whole field
    impulse = np.zeros((1, len(table), size, size), dtype=np.float32)
    impulse[:, :, size // 2, size // 2] = 1.0
    gpu = extract_in_field(cupy.asarray(impulse), size, parameters, given).get()[0]
    cpu = np.fft.fftshift(np.fft.irfft2(expected, s=(size, size)), axes=(-2, -1))
    assert np.max(np.abs(gpu - cpu)) < 1e-5 * np.max(np.abs(cpu))


@pytest.mark.parametrize("optics, box, size", [(False, 48, 100), (True, 48, 100), (False, 48, 96), (True, 40, 90),
                                               (False, 64, 144), (False, 36, 98), (True, 128, 256)])
def test_field_extraction_matches_numpy(cupy, optics, box, size):
    """Images extracted from a larger field on the GPU, through the pruned transforms (laid out by rows) with
    the columns in one kernel (sizes of radices 4·5·5, 8·4·3, 2·3·3·5, 8·2·3·3, 8·8·4; 98 has a factor 7 and
    goes through cuFFT) and through cuFFT, and through the whole field's transforms, against the NumPy twin."""
    from dsub.physics._field_cuda import radices
    from dsub.physics._model_cuda import extract_in_field
    from dsub.physics.subtract import ParticleTransfer, _extract_in_field_numpy

    from dsub.physics._field_cuda import device_block_shape

    rng = np.random.default_rng(11 + optics + size)
    assert (radices(size) is None) == (size == 98)
    assert (device_block_shape(size, 2) is None) == (size == 98)  # the kernel takes all other sizes
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, 7, box, 1.3, rng, snr=None)
    table = to_particle_table(sim)
    if optics:
        table = with_optics(table, rng)
    transfer = ParticleTransfer(table, size, np.arange(len(table)) % 2 == 0)
    images = rng.normal(size=(2, len(table), box, box)).astype(np.float32)
    parameters, given = transfer.for_kernels(cupy)
    images[1] *= 0.1  # the masked map weaker than the whole: the rows kernels carry both in one transform
    expected = _extract_in_field_numpy(np, images, size, transfer)
    for pruned, columns, rows in ((True, "fused", "fused"), (True, "fused", "cufft"), (True, "cufft", "fused"),
                                  (False, "fused", "fused")):
        got = extract_in_field(cupy.asarray(images), size, parameters, given, pruned=pruned, columns=columns,
                               rows=rows).get()
        assert got.shape == expected.shape
        for index in range(2):  # each map against its own largest value
            assert np.max(np.abs(got[index] - expected[index])) < 1e-5 * np.max(np.abs(expected[index])), (
                pruned, columns, rows, index)


@pytest.mark.parametrize("size, box, count", [(512, 256, 3), (128, 64, 5), (100, 48, 3), (96, 48, 2), (90, 40, 3),
                                              (150, 75, 3)])
@pytest.mark.parametrize("max_blocks", [None, 3])
def test_field_rows_kernels_match_cufft(cupy, size, box, count, max_blocks):
    """Both maps' rows along x into the field as one complex transform, and back (``_rows_cuda``), against
    cuFFT's R2C of each row zero-padded and its C2R (real parts only at kx = 0 and size/2, as irfft); sizes
    of each radix, an odd box (rows not a multiple of a block's), blocks that take several turns."""
    from dsub.physics import _rows_cuda

    rng = np.random.default_rng(size + box)
    images = cupy.asarray(rng.normal(size=(2, count, box, box)), dtype=cupy.float32)
    images[1] *= 0.1
    capacity = 2 * count + 3  # room beyond the images, left alone
    spectra = cupy.full((box, capacity, size // 2 + 1), 7 + 7j, dtype=cupy.complex64)
    _rows_cuda.transform_rows(images, spectra, size, max_blocks=max_blocks)
    padded = cupy.zeros((2 * count, box, size), dtype=cupy.float32)
    padded[:, :, :box] = images.reshape(2 * count, box, box)
    expected = cupy.fft.rfft(padded, axis=-1).transpose(1, 0, 2)  # (y, image, kx)
    for index in range(2):
        part = slice(index * count, (index + 1) * count)
        error = float(abs(spectra[:, part] - expected[:, part]).max() / abs(expected[:, part]).max())
        assert error < 1e-5, (index, error)
    assert bool((spectra[:, 2 * count:] == 7 + 7j).all())
    spectra[:, : 2 * count] = cupy.asarray(rng.normal(size=(box, 2 * count, size // 2 + 1))
                                           + 1j * rng.normal(size=(box, 2 * count, size // 2 + 1)), dtype=cupy.complex64)
    back = cupy.empty_like(images)
    _rows_cuda.transform_rows_back(spectra, back, size, max_blocks=max_blocks)
    inverse = cupy.fft.irfft(spectra[:, : 2 * count], n=size, axis=-1) * size  # unnormalised, as cuFFT's C2R
    inverse = inverse[..., :box].transpose(1, 0, 2).reshape(2, count, box, box)
    assert float(abs(back - inverse).max() / abs(inverse).max()) < 1e-5


def test_field_rows_kernels_keep_a_much_weaker_masked_map_to_its_limit(cupy):
    """The masked map a hundred times weaker than the whole: sharing one transform, its error follows the
    whole map's rounding (``_rows_cuda``: about 8e-6 of its own largest value a way in a float32 model); well
    under 1e-4 there and back."""
    from dsub.physics import _rows_cuda

    rng = np.random.default_rng(5)
    size, box, count = 512, 256, 2
    images = cupy.asarray(rng.normal(size=(2, count, box, box)), dtype=cupy.float32)
    images[1] *= 0.01
    spectra = cupy.empty((box, 2 * count, size // 2 + 1), dtype=cupy.complex64)
    _rows_cuda.transform_rows(images, spectra, size)
    padded = cupy.zeros((count, box, size), dtype=cupy.float64)
    padded[:, :, :box] = images[1]
    expected = cupy.fft.rfft(padded, axis=-1).transpose(1, 0, 2)
    assert float(abs(spectra[:, count:] - expected).max() / abs(expected).max()) < 1e-4
    back = cupy.empty_like(images)
    _rows_cuda.transform_rows_back(spectra, back, size)
    assert float(abs(back[1] / size - images[1]).max() / abs(images[1]).max()) < 1e-4  # C2R is unnormalised


@pytest.mark.parametrize("block", [(4, 128), (2, 64)])
def test_field_columns_with_fewer_columns_a_block(cupy, monkeypatch, block):
    """The field kernel with the blocks a device of less shared memory gets (``_field_cuda.block_shape``)."""
    from dsub.physics import _field_cuda
    from dsub.physics._model_cuda import extract_in_field
    from dsub.physics.subtract import ParticleTransfer, _extract_in_field_numpy

    rng = np.random.default_rng(5)
    box, size = 48, 96
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, 9, box, 1.3, rng, snr=None)
    table = with_optics(to_particle_table(sim), rng)
    transfer = ParticleTransfer(table, size)
    images = rng.normal(size=(2, len(table), box, box)).astype(np.float32)
    expected = _extract_in_field_numpy(np, images, size, transfer)
    monkeypatch.setattr(_field_cuda, "device_block_shape", lambda size, maps: block)
    got = extract_in_field(cupy.asarray(images), size, *transfer.for_kernels(cupy)).get()
    assert np.max(np.abs(got - expected)) < 1e-5 * np.max(np.abs(expected))


def test_field_columns_with_blocks_that_take_several_turns(cupy):
    """Three blocks for all the columns of 40 particles: each block takes its columns in turns (the grid-stride
    loop, its shared memory reused), against one block for every group of columns."""
    from dsub.physics import _field_cuda
    from dsub.physics.subtract import ParticleTransfer

    rng = np.random.default_rng(9)
    box, size, count = 48, 96, 40
    sim = simulate_particles((two_domain_phantom(box, rng),) * 2, 2, count, box, 1.3, rng, snr=None)
    parameters, given = ParticleTransfer(to_particle_table(sim), size).for_kernels(cupy)
    shape = (box, 2 * count, size // 2 + 1)
    rows = cupy.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), dtype=cupy.complex64)
    results = []
    for max_blocks in (None, 3):
        spectra = rows.copy()
        _field_cuda.transform_columns(spectra, size, 2, count, 1.0, parameters, given, max_blocks=max_blocks)
        results.append(spectra.get())
    assert -(-count * (size // 2 + 1) // 4) > 3 * 100  # many turns a block
    np.testing.assert_array_equal(results[1], results[0])


def test_fit_kernel_matches_numpy(cupy):
    from dsub.physics.contrast import ContrastFit, fit_spectra

    rng = np.random.default_rng(8)
    box, count = 40, 12
    shape = (count, box, box // 2 + 1)
    models = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    images = (0.7 * models + rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    models[3] = 0  # no power in the band: α 0, σ NaN
    images[5] = 0.7 * models[5]  # explained exactly: σ of float32 rounding's order on both
    pixel = rng.uniform(1.0, 2.0, count)
    for fit in (ContrastFit(), ContrastFit(low_resolution_angstrom=20.0, high_resolution_angstrom=4.0),
                ContrastFit(low_resolution_angstrom=None)):
        cpu = fit_spectra(np, images, models, box, pixel, fit)
        gpu = fit_spectra(cupy, cupy.asarray(images), cupy.asarray(models), box, pixel, fit)
        for name in ("alpha", "sigma", "correlation"):
            np.testing.assert_allclose(getattr(gpu, name).get(), getattr(cpu, name), rtol=1e-4, atol=1e-6)
        assert gpu.alpha.get()[3] == 0 and np.isnan(gpu.sigma.get()[3])


def test_scaled_subtraction_reads_models_where_they_lie(cupy):
    """``images - α · models`` on the GPU against NumPy: contiguous models, the field's (y, image, x) rows seen
    as (image, y, x), and a view whose x pixels are not adjacent (the elementwise fallback)."""
    from dsub.physics._model_cuda import subtract_scaled

    rng = np.random.default_rng(11)
    count, box = 5, 24
    images = rng.normal(size=(count, box, box)).astype(np.float32)
    alpha = rng.uniform(0.5, 1.5, count).astype(np.float32)
    rows = rng.normal(size=(box, count + 3, 2 * box)).astype(np.float32)  # (y, image, x), wider than the box
    views = {
        "contiguous": cupy.asarray(rows[:, :count, :box].transpose(1, 0, 2).copy()),
        "field rows": cupy.asarray(rows)[:, :count, :box].transpose(1, 0, 2),
        "x not adjacent": cupy.asarray(rows)[:, :count, : 2 * box : 2].transpose(1, 0, 2),
    }
    for name, models in views.items():
        expected = images - alpha[:, None, None] * models.get()
        got = subtract_scaled(cupy.asarray(images), cupy.asarray(alpha), models).get()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_rfft2_of_a_view_reads_the_images_where_they_lie(cupy):
    """The field's models are a view of its (y, image, x) rows: their rfft2 through one strided cuFFT plan equals
    cupyx's of a contiguous copy; a layout a plan cannot read (columns not adjacent) is left to cupyx."""
    from cupyx.scipy import fft as cufft

    from dsub.physics._model_cuda import rfft2_of_view
    from dsub.physics.contrast import _rfft2

    rng = np.random.default_rng(8)
    box, size, images = 48, 96, 10
    rows = cupy.asarray(rng.normal(size=(box, images, size)), dtype=cupy.float32)  # (y, image, x)
    view = rows[..., :box].transpose(1, 0, 2)[:7]  # (image, y, x): 7 images of 48 x 48
    got = rfft2_of_view(view)
    expected = cufft.rfft2(cupy.ascontiguousarray(view))
    assert got.shape == expected.shape == (7, box, box // 2 + 1)
    np.testing.assert_allclose(got.get(), expected.get(), rtol=0, atol=1e-4 * float(abs(expected).max()))
    np.testing.assert_allclose(_rfft2(cupy, view).get(), expected.get(), rtol=0, atol=1e-4 * float(abs(expected).max()))
    assert rfft2_of_view(rows[..., ::2][..., :box // 2].transpose(1, 0, 2)) is None  # every other column
    odd = rows[:, :, 1 : box + 1].transpose(1, 0, 2)  # a crop from an odd column: cuFFT refuses its start
    assert rfft2_of_view(odd) is None
    np.testing.assert_allclose(_rfft2(cupy, odd).get(), cufft.rfft2(cupy.ascontiguousarray(odd)).get(), rtol=0,
                               atol=1e-4 * float(abs(expected).max()))
