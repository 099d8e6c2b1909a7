"""The whole command on a GPU: tasks taking turns on one GPU, pinned staging, stacks written by the tasks.

Compared with the same run on the CPU (the NumPy twin). Runs only where CuPy
sees a GPU; CI has none, so these are skipped there and run on a GPU machine
(results in BENCHMARKS.md).
"""

import json
import os
import re
import subprocess
import sys
import threading

import mrcfile
import numpy as np
import pytest

from dsub.physics.backend import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a visible GPU"),
]

from dsub.demo import make_dataset  # noqa: E402
from dsub.formats import star as star_format  # noqa: E402
from dsub.formats.mrc import read_images  # noqa: E402
from dsub.particles import HALF_A, HALF_B  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, prepare_half_map  # noqa: E402
from dsub.simulate import perturbed, simulate_particles, soft_sphere_mask, to_particle_table, two_domain_phantom  # noqa: E402
from dsub.workflow import tasks  # noqa: E402


def test_image_statistics_on_the_gpu_match_numpy():
    import cupy

    from dsub.workflow import export

    rng = np.random.default_rng(1)
    images = (rng.normal(size=(37, 64, 64)) * 3 + 0.5).astype(np.float32)
    images[5] = 0.0
    got = tasks.image_statistics_on_gpu(cupy.asarray(images)).get()
    expected = export.image_statistics(images)
    np.testing.assert_array_equal(got[:, :2], expected[:, :2])
    np.testing.assert_allclose(got[:, 2:], expected[:, 2:], rtol=1e-10, atol=1e-9)


def test_nonfinite_images_are_found_and_zeroed_on_the_gpu_as_on_the_cpu():
    import cupy

    rng = np.random.default_rng(2)
    images = rng.normal(size=(300, 40, 40)).astype(np.float32)
    images[3, 0, 0] = np.nan
    images[150, 39, 39] = np.inf
    images[299, 20, 7] = -np.inf
    expected = tasks.nonfinite_images(images)
    on_gpu = cupy.asarray(images)
    bad = tasks.zero_nonfinite_on_gpu(on_gpu).get()
    np.testing.assert_array_equal(bad, expected)
    assert np.flatnonzero(bad).tolist() == [3, 150, 299]
    zeroed = images.copy()
    zeroed[expected] = 0.0
    np.testing.assert_array_equal(on_gpu.get(), zeroed)


def test_tasks_taking_turns_on_the_gpu_match_the_cpu():
    """Twelve threads subtracting at once through ``subtract_particles``: each gets its own particles back."""
    import cupy

    box = 48
    rng = np.random.default_rng(5)
    phantom = two_domain_phantom(box, rng)
    halves = (perturbed(phantom, rng), perturbed(phantom, rng))
    mask = soft_sphere_mask(phantom, 2, box)
    sim = simulate_particles(halves, 2, 40, box, 1.5, rng, snr=0.1)
    table = to_particle_table(sim)
    settings = SubtractionSettings()
    models = {
        device: {half: prepare_half_map(xp, halves[half - 1].voxelize(box), mask, settings) for half in (HALF_A, HALF_B)}
        for device, xp in (("cpu", np), ("gpu", cupy))
    }
    expected, expected_fit = tasks.subtract_particles(sim.images, table, models["cpu"], settings, "cpu")
    results, errors = {}, []

    def task(index):
        try:
            rows = np.roll(np.arange(len(table)), 7 * index)  # each thread its own order
            for _ in range(3):
                images, fit = tasks.subtract_particles(sim.images[rows], table.subset(rows), models["gpu"],
                                                       settings, "gpu")
                results[index] = rows, images.copy(), fit.alpha.copy()
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    scale = np.max(np.abs(expected))
    for rows, images, alpha in results.values():
        assert np.max(np.abs(images - expected[rows])) <= 1e-4 * scale
        np.testing.assert_allclose(alpha, expected_fit.alpha[rows], rtol=1e-4)


def run(paths, outdir, *extra):
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir),
               "--chunk-size", "16", "--particles-per-stack", "64", "--quiet", *map(str, extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads((outdir / "dsub_run.json").read_text())


def images_via_star(outdir):
    table = star_format.read_particles(outdir / "particles_subtracted.star")
    return read_images(table.image_paths, table.image_indices)


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_whole_command_on_the_gpu_matches_the_cpu(tmp_path_factory, scheduler):
    root = tmp_path_factory.mktemp(scheduler)
    paths, _ = make_dataset(root / "data", count=200, box=48)
    cpu = root / "cpu"
    run(paths, cpu, "--device", "cpu", "--scheduler", "threads")
    gpu = root / "gpu"
    extra = ("--dashboard-address", "127.0.0.1:0") if scheduler == "local" else ("--workers", "12")
    summary = run(paths, gpu, "--device", "gpu", "--scheduler", scheduler, *extra)
    assert summary["devices"] and all(device.startswith("gpu:") for device in summary["devices"])
    reference = images_via_star(cpu)
    assert np.max(np.abs(images_via_star(gpu) - reference)) <= 1e-4 * np.max(np.abs(reference))
    stacks = sorted((gpu / "Particles").glob("*.mrcs"))
    assert len(stacks) == 4 and not list((gpu / "Particles").glob("*.partial"))
    for stack in stacks:
        with mrcfile.open(stack) as mrc:
            assert float(mrc.header.dmax) == pytest.approx(float(mrc.data.max()), rel=1e-6)
            assert float(mrc.header.dmean) == pytest.approx(float(mrc.data.astype(np.float64).mean()), abs=1e-5)


def test_images_with_nan_are_refused_or_skipped_on_the_gpu_as_on_the_cpu(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    paths, _ = make_dataset(root / "data", count=120, box=48)
    stack = paths["stack"]
    with mrcfile.mmap(stack, mode="r+") as mrc:
        mrc.data[9, 3, 5] = np.nan
        mrc.data[70, 0, 0] = np.inf
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "--chunk-size", "16", "--quiet",
               "--device", "gpu"]
    refused = subprocess.run(command + ["-o", str(root / "refused")], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "dsub: error:" in refused.stderr and "contains NaN or infinite values" in refused.stderr
    cpu = root / "cpu"
    run(paths, cpu, "--device", "cpu", "--skip-bad-particles")
    gpu = root / "gpu"
    summary = run(paths, gpu, "--device", "gpu", "--skip-bad-particles")
    assert [entry["index"] for entry in summary["skipped_particles"]["listed"]] == [9, 70]
    reference = images_via_star(cpu)
    assert reference.shape[0] == 118
    assert np.max(np.abs(images_via_star(gpu) - reference)) <= 1e-4 * np.max(np.abs(reference))


def test_gpu_warm_up_loads_cupy_and_makes_the_context_in_the_background():
    """What a threads run starts beside its input checks: CuPy loaded and its memory pool in use after the join."""
    code = ("import sys\n"
            "from dsub.physics.backend import start_gpu_warm_up\n"
            "thread = start_gpu_warm_up()\n"
            "thread.join(timeout=120)\n"
            "assert not thread.is_alive() and 'cupy' in sys.modules\n"
            "print(sys.modules['cupy'].get_default_memory_pool().total_bytes())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0


#: Loaded by each local GPU worker at its start: once another chunk is recorded, chunk 3 limits the worker's CuPy
#: memory pool to 1 MiB, so the engine's own allocation raises CuPy's real ``OutOfMemoryError`` in whichever of
#: the worker's chunks comes to the GPU next (the pool is the process's, not the task's).
GPU_OUT_OF_MEMORY_PRELOAD = '''
import time
from pathlib import Path


def dask_setup(worker):
    from dsub.workflow import tasks

    run_chunk = tasks.run_chunk

    def run_chunk_short_of_gpu_memory(chunk_index, start, particles, maps, settings, store_path, *rest, **options):
        if chunk_index != 3:
            return run_chunk(chunk_index, start, particles, maps, settings, store_path, *rest, **options)
        recorded = Path(store_path) / "chunk_done" / "c"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (recorded.is_dir() and any(recorded.iterdir())):
            time.sleep(0.05)
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_memory_pool().set_limit(size=2**20)
        return run_chunk(chunk_index, start, particles, maps, settings, store_path, *rest, **options)

    tasks.run_chunk = run_chunk_short_of_gpu_memory
'''


def test_a_local_gpu_worker_out_of_gpu_memory_is_named_in_one_line(tmp_path):
    """CuPy's own ``OutOfMemoryError`` in a local GPU worker's task: one line names the worker and the chunk
    that met it (chunk 3, or one of the worker's chunks beside it)."""
    paths, _ = make_dataset(tmp_path / "data", count=120, box=48)
    preload = tmp_path / "gpu_out_of_memory_preload.py"
    preload.write_text(GPU_OUT_OF_MEMORY_PRELOAD)
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "local", "--workers", "1", "--chunk-size", "16",
               "--device", "gpu"]
    environment = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{preload}"]'}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.match(r"dsub: error: worker tcp://127\.0\.0\.1:\d+ ran out of memory while computing "
                    r"subtract-chunk-\d{5} \(", lines[0]), lines[0]
    assert lines[0].endswith("Finished chunks are kept: rerun the same command to resume.")
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()
