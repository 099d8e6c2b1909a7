#!/usr/bin/env python
"""dsub's CPU path against RELION's ``relion_project --subtract_exp`` on the same data, in the same run.

    python benchmarks/relion_side_by_side.py [--box 256] [--particles 4096] [--small 64] [--repeats 2]
                                             [--folder DIR] [--relion relion_project]

Issue 8's CPU targets compare one core of dsub with one core of RELION: set-up (what happens once
before the first particle) and particles per CPU-second after it. RELION's figures depend on the
machine's state as much as dsub's do: on a virtual machine the first touch of memory the host has
not backed yet costs 1-2 s of system time a GB (BENCHMARKS.md, "CPU set-up against RELION's"), and
both programs hold 2-3 GB at box 256. So both are measured here, one after the other, ``--repeats``
times, in fresh processes, with CPU seconds (user + system) of each process:

- RELION (``relion_project`` from the PATH; Debian's package ``relion`` has it): the same noise data
  set (``multi_gpu.write_dataset``: half maps, soft mask, a stack and a RELION 3.1 star with poses and
  CTFs) subtracted twice, with the first ``--small`` particles and with all ``--particles``. Its
  cost a particle is the difference of the two runs' CPU seconds over the difference of their
  counts; its set-up is the small run less that many particles. It projects one map (``--i``, half
  map A masked by ``--mask``) with CTF; it fits no contrast. It is single-threaded, and it holds
  every subtracted image in memory until it writes them at its end (its resident memory grows by
  about a third of a MB a particle at box 256), so its cost a particle counts that memory's pages:
  more particles, a lower rate (about 250/s over 1 024 particles, about 180/s over 4 096 on the
  2-core VM); the default 4 096 is still a small run of a real data set.
- dsub's engine (``dsub.physics``, NumPy and numba, ``OMP_NUM_THREADS=1``) in a process of its own:
  set-up is reading both half maps and the mask, the FSC and both half sets' whole (Wiener-filtered)
  and masked maps prepared; the rate is ``subtract_batch`` over the data set's own particles (read
  from its stack in the command's own batches, ``resources.batch_cap``, each half set with its own
  model) after one warm-up batch, CPU seconds of the batches only. ``--projector relion`` and the default are both run.

Prints one table; its figures go into BENCHMARKS.md with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))



def children_cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def timed_child(command: list, **kwargs) -> tuple[float, float]:
    """Run ``command``; its (user, system) CPU seconds. Raises SystemExit with its output's tail if it fails."""
    before = children_cpu()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")
    after = children_cpu()
    return after[0] - before[0], after[1] - before[1]


def first_rows(star: Path, count: int, into: Path) -> Path:
    """A copy of ``star`` with its optics table and only its first ``count`` particles."""
    import starfile

    tables = starfile.read(star, always_dict=True)
    tables["particles"] = tables["particles"].head(count)
    starfile.write(tables, into)
    return into


def relion_run(relion: str, paths: dict, star: Path, output: Path, count: int, box: int) -> tuple[float, float]:
    """``relion_project --subtract_exp`` of ``star``'s ``count`` particles: (user, system) CPU seconds.

    Raises SystemExit where it wrote no stack of ``count`` images of ``box``² (a program that did nothing)."""
    seconds = timed_child([relion, "--i", str(paths["half_a"]), "--mask", str(paths["mask"]), "--ang", str(star),
                           "--subtract_exp", "--ctf", "--o", str(output)], cwd=star.parent)
    stack = output.with_suffix(".mrcs")
    expected = 1024 + count * box * box * 4  # MRC header, float32 images
    if not stack.is_file() or stack.stat().st_size < expected:
        raise SystemExit(f"{relion} wrote no stack of {count} images of {box} px ({stack}): is it RELION's "
                         "relion_project?")
    stack.unlink()  # the next run writes to a disk as empty as this one's
    return seconds


def engine_run(folder: Path, projector: str) -> dict:
    """dsub's engine on the data set in ``folder``, in a fresh process: its JSON figures."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--engine", projector, "--folder", str(folder)],
                            capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"dsub's engine failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def engine(folder: Path, projector: str) -> dict:
    """Set-up and rate of dsub's engine on one core (run in its own process by ``engine_run``)."""
    from dsub.formats import read_particles
    from dsub.formats.mrc import read_images, read_map
    from dsub.particles import HALF_A, HALF_B
    from dsub.physics.fsc import fourier_shell_correlation
    from dsub.physics.projector import FLOAT16_PROJECTORS, extract_slices_of, prepare_volumes, projector_kernel
    from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch
    from dsub.workflow.resources import batch_cap

    table = read_particles(folder / "particles.star")
    # numba's import and its cached kernels' load (the pair's gather, the float16 rounding): once a process
    small = prepare_volumes(np, [np.ones((8, 8, 8), np.float32)] * 2, *projector_kernel(projector),
                            float16=projector in FLOAT16_PROJECTORS)
    extract_slices_of(np, small, np.eye(3)[None], "map", 8)
    settings = SubtractionSettings(projector=projector)
    started, system = time.process_time(), os.times().system
    (half_a, voxel), (half_b, _), (mask, _) = (read_map(folder / f"{name}.mrc")
                                               for name in ("half_a", "half_b", "mask"))
    curve = fourier_shell_correlation(np, half_a, half_b, voxel)
    models = {half: prepare_half_map(np, volume, mask, settings, curve) for half, volume in ((HALF_A, half_a),
                                                                                          (HALF_B, half_b))}
    setup, setup_system = time.process_time() - started, os.times().system - system
    batch = batch_cap(int(half_a.shape[0]), settings, "cpu", 1, 256)  # the command's own batch on a CPU
    batches = []
    for half, model in models.items():
        rows = np.flatnonzero(table.half_set == half)
        batches += [(model, rows[start : start + batch]) for start in range(0, len(rows), batch)]
    model, rows = batches[0]
    subtract_batch(np, read_images(table.image_paths[rows], table.image_indices[rows]), table.subset(rows), model,
                   settings)  # warm-up
    seconds = 0.0
    for model, rows in batches:
        images = read_images(table.image_paths[rows], table.image_indices[rows])
        started = time.process_time()
        subtract_batch(np, images, table.subset(rows), model, settings)
        seconds += time.process_time() - started
    return {"setup_s": setup, "setup_system_s": setup_system, "rate": len(table) / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--particles", type=int, default=4096,
                        help="particles of the data set (RELION holds every output image until its end: its cost "
                             "a particle grows with more)")
    parser.add_argument("--small", type=int, default=64, help="particles of RELION's short run (its set-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None, help="folder for the data set (a temporary one in it)")
    parser.add_argument("--relion", default="relion_project", help="RELION's relion_project")
    parser.add_argument("--engine", choices=("gridding", "relion"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(engine(args.folder, args.engine)))
        return
    relion = shutil.which(args.relion)
    if relion is None:
        raise SystemExit(f"{args.relion} not found: install RELION (Debian: apt-get install relion) or give --relion")
    if not 0 < args.small < args.particles:
        raise SystemExit(f"--small ({args.small}) must be above 0 and below --particles ({args.particles})")
    if args.box < 16 or args.repeats < 1:
        raise SystemExit(f"--box ({args.box}) must be at least 16 and --repeats ({args.repeats}) at least 1")
    if args.folder is not None and not args.folder.is_dir():
        raise SystemExit(f"--folder {args.folder}: no such folder")
    version = subprocess.run([relion, "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    print(f"host: {platform.node()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, numpy "
          f"{np.__version__}, {version or 'RELION'}, date {time.strftime('%Y-%m-%d')}")
    from multi_gpu import write_dataset

    rows = []
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        paths = write_dataset(folder, args.particles, args.box)
        small = first_rows(paths["star"], args.small, folder / "first.star")
        for repeat in range(1, args.repeats + 1):
            short = relion_run(relion, paths, small, folder / "relion_first", args.small, args.box)
            whole = relion_run(relion, paths, paths["star"], folder / "relion_all", args.particles, args.box)
            each = (sum(whole) - sum(short)) / (args.particles - args.small)
            setup = sum(short) - args.small * each
            rows.append((repeat, "RELION relion_project --subtract_exp --ctf", setup, short[1], 1 / each))
            for projector in ("relion", "gridding"):
                figures = engine_run(folder, projector)
                name = "dsub --projector relion" if projector == "relion" else "dsub (default model)"
                rows.append((repeat, name, figures["setup_s"], figures["setup_system_s"], figures["rate"]))
    print(f"\nBox {args.box}, {args.particles} particles (RELION's set-up from its first {args.small}), one core, "
          "CPU seconds (user + system) of each process:")
    print("| repeat | program | set-up (CPU s) | system (s): dsub's set-up, RELION's short run | "
          "particles per CPU-second |")
    print("|---|---|---|---|---|")
    for repeat, name, setup, system, rate in rows:
        print(f"| {repeat} | {name} | {setup:.2f} | {system:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
