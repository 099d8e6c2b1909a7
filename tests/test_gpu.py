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


@pytest.mark.parametrize("projector, premultiplied", [("gridding", False), ("gridding", True), ("relion", True)])
def test_subtraction_on_gpu_matches_cpu(cupy, projector, premultiplied):
    box = 64
    rng = np.random.default_rng(3)
    phantom = two_domain_phantom(box, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    mask = soft_sphere_mask(phantom, 2, box)
    sim = simulate_particles(halves, 2, 24, box, 1.5, rng, snr=0.1)
    table = to_particle_table(sim)
    table.ctf_premultiplied[::2] = premultiplied
    settings = SubtractionSettings(projector=projector)
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(table.half_set == half)
        volume = halves[half - 1].voxelize(box)
        cpu, alpha_cpu = subtract_batch(np, sim.images[members], table.subset(members),
                                        prepare_half_map(np, volume, mask, settings), settings)
        gpu, alpha_gpu = subtract_batch(cupy, sim.images[members], table.subset(members),
                                        prepare_half_map(cupy, volume, mask, settings), settings)
        np.testing.assert_allclose(alpha_gpu.get(), alpha_cpu, rtol=1e-4)
        assert np.max(np.abs(gpu.get() - cpu)) <= 1e-4 * np.max(np.abs(cpu))


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
