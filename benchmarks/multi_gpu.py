"""Throughput of ``dsub subtract --scheduler local`` with 1 and 2 GPU workers.

    python benchmarks/multi_gpu.py [--particles 4096] [--box 256] [--workers 1 2 1 2] [--referenced 3]
                                   [--cpu-affinity on off]

Writes a dataset of noise images with realistic metadata (the cost of the
physics does not depend on the image content), runs the whole command (cluster
start, half-map preparation, subtraction, Zarr, export) for each worker count,
and prints particles/s and the GPUs the summary says were used. The runs go in
the order given (repeat counts to see the spread); each run's output is deleted
and the disk synced before the next, so that none is throttled by an earlier
run's output still being written. ``--cpu-affinity on off`` runs every worker
count with each worker kept on its GPU's CPUs (dsub's default where the machine
has several NUMA nodes: ``dsub.cluster.affinity``) and with no pinning
(``DSUB_GPU_CPU_AFFINITY=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np


from dsub.formats import star as star_format
from dsub.formats.mrc import write_map, write_stack
from dsub.simulate import (
    SimulatedParticles, perturbed, random_rotations, soft_sphere_mask, to_particle_table, two_domain_phantom,
)


def noise_metadata(count: int, box: int, rng, pixel_size: float) -> SimulatedParticles:
    """Realistic metadata for ``count`` noise particles of ``box`` px: random poses, origins, defoci, half sets."""
    return SimulatedParticles(
        images=np.empty((0, box, box), dtype=np.float32),  # only the box size is read from it
        kept_signal=None, subtracted_signal=None,
        rotations=random_rotations(count, rng), origins_pixels=rng.uniform(-3, 3, (count, 2)),
        defocus_u=rng.uniform(8e3, 2.5e4, count), defocus_v=rng.uniform(8e3, 2.5e4, count),
        defocus_angle=rng.uniform(0, 180, count), contrast=np.ones(count), half_set=rng.integers(1, 3, count),
        pixel_size=pixel_size,
    )


def write_dataset(folder: Path, count: int, box: int, referenced: int = 1) -> dict:
    """``count`` noise images of ``box`` px and a star of ``count * referenced`` rows: each image is
    referenced by ``referenced`` consecutive rows with their own poses, as after symmetry expansion
    (more rows, and output, than the input stack holds)."""
    rng = np.random.default_rng(0)
    phantom = two_domain_phantom(box, rng)
    paths = {name: folder / f"{name}.mrc" for name in ("half_a", "half_b", "mask")}
    write_map(paths["half_a"], perturbed(phantom, rng).voxelize(box), 1.0)
    write_map(paths["half_b"], perturbed(phantom, rng).voxelize(box), 1.0)
    write_map(paths["mask"], soft_sphere_mask(phantom, 2, box), 1.0)
    stack = folder / "particles.mrcs"
    with write_stack(stack, (count, box, box), 1.0) as mrc:
        for start in range(0, count, 512):
            stop = min(start + 512, count)
            mrc.data[start:stop] = rng.normal(size=(stop - start, box, box)).astype(np.float32)
    rows = count * referenced
    table = to_particle_table(noise_metadata(rows, box, rng, 1.0), str(stack))
    paths["star"] = folder / "particles.star"
    star_format.write_particles(table, paths["star"], [f"{i // referenced + 1:06d}@particles.mrcs" for i in range(rows)])
    return paths


def print_topology() -> None:
    """The machine's NUMA nodes and, per visible GPU, its PCI bus id and the CPUs beside it (sysfs)."""
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    print(f"NUMA nodes: " + "; ".join(f"{node.name} CPUs {(node / 'cpulist').read_text().strip()}" for node in nodes))
    try:
        import cupy

        for ordinal in range(cupy.cuda.runtime.getDeviceCount()):
            bus = cupy.cuda.runtime.deviceGetPCIBusId(ordinal).lower()
            device = Path("/sys/bus/pci/devices") / bus
            read = lambda name: (device / name).read_text().strip() if (device / name).exists() else "?"
            print(f"GPU {ordinal}: {bus}, NUMA node {read('numa_node')}, CPUs beside it {read('local_cpulist')}")
    except Exception as error:  # noqa: BLE001 -- only a report
        print(f"(no GPU topology: {error})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=4096)
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--particles-per-stack", type=int, nargs="+", default=[4096],
                        help="output stack sizes to compare (each runs every --workers value)")
    parser.add_argument("--referenced", type=int, default=1,
                        help="star rows per image (symmetry expansion): more particles than the stack holds")
    parser.add_argument("--warm-up", action="store_true",
                        help="a small run first, so CuPy's kernel cache is filled before the measured runs")
    parser.add_argument("--float16", action="store_true", help="runs with --float16 (half the bytes written)")
    parser.add_argument("--cpu-affinity", nargs="+", choices=("on", "off"), default=["on"],
                        help="workers kept on their GPU's CPUs (on, the default) or not (off); several: each in turn")
    args = parser.parse_args()
    print_topology()
    rows, first = [], None
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        paths = write_dataset(folder, args.particles, args.box, args.referenced)
        count = args.particles * args.referenced
        print(f"dataset: {args.particles} images of {args.box} px, {count} particles, written in "
              f"{time.perf_counter() - started:.1f} s")
        limits = {name: Path(f"/proc/sys/vm/{name}").read_text().strip() for name in
                  ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes")
                  if Path(f"/proc/sys/vm/{name}").exists()}
        print(f"the kernel's limits on unwritten output: {limits}")
        runs = ([("warm-up", max(args.workers), args.particles_per_stack[0], "on")] if args.warm_up else []) + [
            (None, w, stack, affinity) for stack in args.particles_per_stack for affinity in args.cpu_affinity
            for w in args.workers]
        os.sync()  # the data set on the disk: the runs start from a warm cache with nothing dirty
        for number, (warm_up, workers, per_stack, affinity) in enumerate(runs):
            outdir = folder / f"out{number}"
            command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]),
                       "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]),
                       "-o", str(outdir), "--scheduler", "local", "--workers", str(workers),
                       "--chunk-size", str(args.chunk_size), "--particles-per-stack", str(per_stack), "--quiet",
                       "--dashboard-address", "127.0.0.1:0"] + (["--float16"] if args.float16 else [])
            started = time.perf_counter()
            environment = {**os.environ, "DSUB_GPU_CPU_AFFINITY": "1" if affinity == "on" else "0"}
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            wall = time.perf_counter() - started
            if result.returncode != 0:
                print(result.stdout, result.stderr)
                raise SystemExit(f"dsub failed with {workers} workers")
            if not warm_up:
                summary = json.loads((outdir / "dsub_run.json").read_text())
                stacks = sorted((outdir / "Particles").glob("*.mrcs"))
                images = mrcfile.mmap(stacks[0], mode="r").data[: min(args.particles_per_stack)]
                difference = 0.0 if first is None else float(np.abs(images.astype(np.float32) - first).max()
                                                             / np.abs(first).max())
                first = np.array(images, dtype=np.float32) if first is None else first
                del images
            # Each run starts with no earlier output waiting for the disk: a run's output is left in the
            # page cache (as dsub leaves it), and a backlog of an earlier run's dirty pages would throttle
            # the next run's writes (the kernel's dirty limits), whatever the GPUs do.
            shutil.rmtree(outdir)
            synced = time.perf_counter()
            os.sync()
            synced = time.perf_counter() - synced
            if warm_up:
                print(f"warm-up run with {workers} workers: {wall:.1f} s")
                continue
            phases = summary["phase_seconds"]
            rows.append((workers, per_stack, affinity, wall, phases, count / phases["subtract"], count / wall,
                         summary["devices"], difference, synced))
    print("| workers | particles per stack | kept on the GPU's CPUs | wall s | check inputs s | start workers s | subtract s | export s | particles/s in subtract | "
          "particles/s whole command | devices | max diff vs the first | sync after s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workers, per_stack, affinity, wall, phases, rate, whole, devices, difference, synced in rows:
        print(f"| {workers} | {per_stack} | {affinity} | {wall:.1f} | {phases['check_inputs']:.1f} | {phases['start_workers']:.1f} | "
              f"{phases['subtract']:.1f} | {phases['export']:.1f} | {rate:,.0f} | {whole:,.0f} | "
              f"{', '.join(devices)} | {difference:.1e} | {synced:.1f} |")


if __name__ == "__main__":
    main()
