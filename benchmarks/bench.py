"""dsub against the floor that storage sets, measured in the same run.

    python benchmarks/bench.py [--device gpu|cpu] [--boxes 128 256 384 512] [--particles 20000]
                               [--schedulers threads local] [--folder DIR] [--skip-engine] [--skip-command]

1. Engine: ``subtract_batch`` with the data already on the device (GPU) or in memory (CPU), for
   each box and projector: particles/s, and the resident memory of both half sets' prepared maps
   (CuPy's pool on a GPU; ``dsub.physics.memory`` on the CPU).
2. Floor: a data set of ``--particles`` box-256 images is written to local disk (``--folder``,
   default a temporary folder there); its stack is read once and the same bytes written once, with
   the page cache emptied first (``posix_fadvise(DONTNEED)`` after ``fsync``), so the floor is the
   rate of a run that only moves the data: particles/s = n / (read + write seconds).
3. Whole command: ``dsub subtract`` cold (page cache emptied the same way) on that data set with
   each scheduler; particles/s over the whole wall time, and its ratio to the floor; then the
   same with the time to sync its output to the disk added (the floor's write ends with
   ``fsync``, dsub leaves its output in the page cache as any program does). On a GPU a
   run of 64 particles comes first, so that CuPy's kernels are compiled (once per machine,
   cached on disk) before the measured runs. The detail
   column gives the run's phases (``dsub_run.json``) and what lies outside them: starting Python
   and importing dsub before the first phase, the QC report after the last.

Prints one table per part, ending with the summary table; figures go into BENCHMARKS.md with the
device, the command and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from multi_gpu import write_dataset  # noqa: E402  (the same noise data set with realistic metadata)


def evict(paths) -> None:
    """Drop the page cache of ``paths`` (files or folders), so the next read comes from the disk."""
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def floor_rate(stack: Path, folder: Path, count: int) -> tuple[float, float, float]:
    """Read the stack once and write the same bytes once, cold: (particles/s, read s, write s)."""
    evict([stack])
    block = 64 * 2**20
    started = time.perf_counter()
    chunks = []
    with open(stack, "rb", buffering=0) as source:
        while piece := source.read(block):
            chunks.append(piece)
    read_s = time.perf_counter() - started
    target = folder / "floor_copy.mrcs"
    started = time.perf_counter()
    with open(target, "wb", buffering=0) as sink:
        for piece in chunks:
            sink.write(piece)
        os.fsync(sink.fileno())
    write_s = time.perf_counter() - started
    target.unlink()
    return count / (read_s + write_s), read_s, write_s


def engine_rows(device: str, boxes, batch: int, repeats: int):
    """Particles/s of ``subtract_batch`` with data on the device, and resident prepared-map bytes."""
    from gpu_throughput import scene

    from dsub.physics import memory
    from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch

    if device == "gpu":
        import cupy as xp
    else:
        xp = np
    rng = np.random.default_rng(0)
    rows = []
    for box in boxes:
        for projector in ("default", "relion"):
            settings = SubtractionSettings() if projector == "default" else SubtractionSettings(projector="relion")
            count = batch if device == "gpu" else max(8, min(batch, 4 * 2**20 // (box * box)))
            volume, mask, images, table = scene(box, count, rng)
            pool = xp.get_default_memory_pool() if device == "gpu" else None
            if pool is not None:
                pool.free_all_blocks()
                before = pool.used_bytes()
            started = time.perf_counter()
            try:
                models = [prepare_half_map(xp, volume, mask, settings) for _ in range(2)]  # both half sets
            except Exception as exc:  # e.g. CuPy's OutOfMemoryError under CUPY_GPU_MEMORY_LIMIT
                if "OutOfMemory" not in type(exc).__name__:
                    raise
                rows.append((box, projector, float("nan"), float("nan"), float("nan")))
                print(f"box {box}, {projector}: out of GPU memory while preparing the maps ({exc})")
                pool.free_all_blocks()
                continue
            if device == "gpu":
                xp.cuda.Device().synchronize()
            prepare_s = (time.perf_counter() - started) / 2
            resident = ((pool.used_bytes() - before + memory.texture_bytes(models)) if pool is not None
                        else memory.prepared_map_bytes(box, settings))
            on_device = xp.asarray(images)

            def once(on_device=on_device, model=models[0], settings=settings):
                subtract_batch(xp, on_device, table, model, settings)

            try:
                once()
            except Exception as exc:
                if "OutOfMemory" not in type(exc).__name__:
                    raise
                rows.append((box, projector, float("nan"), resident / 1e9, prepare_s))
                print(f"box {box}, {projector}: out of GPU memory for a batch of {count} ({exc})")
                del models, on_device
                pool.free_all_blocks()
                continue
            samples = []
            for _ in range(repeats):
                if device == "gpu":
                    xp.cuda.Device().synchronize()
                started = time.perf_counter()
                once()
                if device == "gpu":
                    xp.cuda.Device().synchronize()
                samples.append(time.perf_counter() - started)
            rows.append((box, projector, count / float(np.median(samples)), resident / 1e9, prepare_s))
            del models, on_device
            if pool is not None:
                pool.free_all_blocks()
    return rows


def command_rate(paths: dict, outdir: Path, scheduler: str, device: str, count: int, extra) -> tuple[float, dict, float]:
    """Whole ``dsub subtract`` cold: (particles/s over the wall time, the run summary, wall seconds)."""
    evict([paths["star"].parent])
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir),
               "--scheduler", scheduler, "--device", device, "--quiet", *extra]
    if scheduler == "local":
        command += ["--dashboard-address", "127.0.0.1:0"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"dsub subtract failed with --scheduler {scheduler}")
    return count / wall, json.loads((outdir / "dsub_run.json").read_text()), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--batch", type=int, default=256, help="particles per engine batch on the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--particles", type=int, default=20000, help="particles of the box-256 data set")
    parser.add_argument("--box", type=int, default=256, help="box of the whole-command data set")
    parser.add_argument("--schedulers", nargs="+", default=["threads", "local"])
    parser.add_argument("--folder", type=Path, default=None, help="local-disk folder for the data set")
    parser.add_argument("--extra", default="", help="more dsub subtract options, one string")
    parser.add_argument("--warm-up", action="store_true", help="a small run before the measured ones (always on a GPU)")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-command", action="store_true")
    args = parser.parse_args()

    print(f"host: {platform.node()}, {os.cpu_count()} CPU cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, date {time.strftime('%Y-%m-%d')}")
    if args.device == "gpu":
        import cupy

        print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, CuPy {cupy.__version__}")

    if not args.skip_engine:
        rows = engine_rows(args.device, args.boxes, args.batch, args.repeats)
        print(f"\nEngine ({args.device}, data on the device, both projections, CTF, fit, subtraction):")
        print("| box | projector | particles/s | prepared maps, both half sets (GB) | prepare one half map (s) |")
        print("|---|---|---|---|---|")
        for box, projector, rate, gigabytes, prepare_s in rows:
            print(f"| {box} | {projector} | {rate:,.0f} | {gigabytes:.2f} | {prepare_s:.2f} |")

    if args.skip_command:
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        started = time.perf_counter()
        paths = write_dataset(folder, args.particles, args.box)
        print(f"\ndata set: {args.particles} particles of {args.box} px "
              f"({(paths['star'].parent / 'particles.mrcs').stat().st_size / 1e9:.2f} GB) written in "
              f"{time.perf_counter() - started:.1f} s to {folder}")
        if args.device == "gpu" or args.warm_up:  # CuPy compiles its kernels once per machine (cached on disk)
            (folder / "warm").mkdir()
            warm = write_dataset(folder / "warm", 64, args.box)
            command_rate(warm, folder / "warm" / "out", "threads", args.device, 64, args.extra.split())
            shutil.rmtree(folder / "warm")
        floor, read_s, write_s = floor_rate(folder / "particles.mrcs", folder, args.particles)
        rows = [("floor: read once + write once, cold", floor, 1.0, f"read {read_s:.1f} s, write {write_s:.1f} s")]
        for scheduler in args.schedulers:
            outdir = folder / f"out_{scheduler}"
            rate, summary, wall = command_rate(paths, outdir, scheduler, args.device, args.particles,
                                               args.extra.split())
            phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary["phase_seconds"].items())
            outside = wall - sum(summary["phase_seconds"].values())
            rows.append((f"dsub subtract --scheduler {scheduler}", rate, rate / floor,
                         f"{phases}, outside the phases (start-up, QC report) {outside:.1f} s, wall {wall:.1f} s; "
                         f"{summary['workers']} worker(s), devices {', '.join(summary.get('devices', []))}"))
            # The floor's write ends with fsync; dsub leaves its output in the page cache. The same run
            # with its output then synced to the disk compares like with like.
            started = time.perf_counter()
            evict([outdir])
            synced = wall + time.perf_counter() - started
            rows.append((f"  the same, output then synced to disk", args.particles / synced, args.particles / synced / floor,
                         f"sync {synced - wall:.1f} s, wall + sync {synced:.1f} s"))
            shutil.rmtree(outdir)  # the next run writes to a disk as empty as this one's
        print(f"\nWhole command, box {args.box}, {args.particles} particles, cold page cache:")
        print("| what | particles/s | ratio to floor | detail |")
        print("|---|---|---|---|")
        for what, rate, ratio, detail in rows:
            print(f"| {what} | {rate:,.0f} | {ratio:.2f} | {detail} |")


if __name__ == "__main__":
    main()
