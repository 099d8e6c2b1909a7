#!/usr/bin/env python
"""Scale benchmark: the coordinator at 1 M and 10 M particle rows, and a whole run at box 32.

Symmetry-expanded data sets are what have millions of rows: few tiny images, each referenced
many times with different poses. This benchmark writes such a RELION star (metadata only: 16
stacks of 64 images of box 32, half maps and a mask), then, each in a fresh process:

* ``coordinator``: runs ``dsub subtract`` (threads scheduler, chunks of 256) until the first chunk
  is stored, and reports the time of each coordinator step (reading the star, checks, building and
  submitting the tasks), the time to the first stored chunk, the coordinator's peak resident memory
  (sampled every 20 ms, and the kernel's ``ru_maxrss``), and the largest task graph in flight
  (pickled size of the tasks submitted and not yet finished);
* ``run``: the whole command at box 32 on the CPU (``--rows-run`` rows), with its phases.

* ``write``: reads the star and writes the output star and ``.cs`` as the export does
  (``--write-rows``), with the time and peak memory of each.

    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000 --write-rows 1000000 10000000 \
        --rows-run 1000000 --folder /tmp/scale

Figures go to stdout as a Markdown table and to FOLDER/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BOX = 32
PIXEL_SIZE = 1.5
STACKS, PER_STACK = 16, 64
MICROGRAPHS = 2000
BLOCK = 250_000


# ---------------------------------------------------------------- the data set
def make_maps(folder: Path) -> None:
    from dsub.formats.mrc import write_map, write_stack
    from dsub.simulate import perturbed, soft_sphere_mask, two_domain_phantom

    rng = np.random.default_rng(11)
    phantom = two_domain_phantom(BOX, rng)
    write_map(folder / "half_A.mrc", perturbed(phantom, rng).voxelize(BOX), PIXEL_SIZE)
    write_map(folder / "half_B.mrc", perturbed(phantom, rng).voxelize(BOX), PIXEL_SIZE)
    write_map(folder / "mask.mrc", soft_sphere_mask(phantom, 2, BOX), PIXEL_SIZE)
    stacks = folder / "Extract"
    stacks.mkdir(exist_ok=True)
    for number in range(STACKS):
        images = rng.normal(size=(PER_STACK, BOX, BOX)).astype(np.float32)
        with write_stack(stacks / f"stack_{number:03d}.mrcs", images, PIXEL_SIZE):
            pass


def star_header() -> str:
    optics = ("\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnOpticsGroupName #2\n_rlnAmplitudeContrast #3\n"
              "_rlnSphericalAberration #4\n_rlnVoltage #5\n_rlnImagePixelSize #6\n_rlnImageSize #7\n"
              f"_rlnImageDimensionality #8\n1 opticsGroup1 0.100000 2.700000 300.000000 {PIXEL_SIZE:.6f} {BOX} 2\n\n")
    labels = ["rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
              "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
              "rlnCtfMaxResolution", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnRandomSubset",
              "rlnClassNumber", "rlnGroupNumber", "rlnNormCorrection", "rlnLogLikeliContribution"]
    columns = "".join(f"_{label} #{i + 1}\n" for i, label in enumerate(labels))
    return "# version 30001\n" + optics + "\n# version 30001\n\ndata_particles\n\nloop_\n" + columns


def star_block(rng, first: int, count: int) -> str:
    """``count`` particle rows: each image of the stacks referenced many times, as after symmetry expansion."""
    import pandas as pd

    row = np.arange(first, first + count)
    image = row // 7 % (STACKS * PER_STACK)  # 7 expanded copies of each particle in a row
    micrograph = image * MICROGRAPHS // (STACKS * PER_STACK)
    frame = pd.DataFrame({
        "x": rng.uniform(0, 4096, count), "y": rng.uniform(0, 4096, count),
        "rot": rng.uniform(-180, 180, count), "tilt": rng.uniform(0, 180, count), "psi": rng.uniform(-180, 180, count),
        "ox": rng.normal(0, 2, count), "oy": rng.normal(0, 2, count),
        "du": rng.uniform(8000, 25000, count), "dv": rng.uniform(8000, 25000, count), "da": rng.uniform(0, 180, count),
        "ps": np.zeros(count), "bf": np.zeros(count), "res": rng.uniform(3, 6, count),
        "name": [f"{i % PER_STACK + 1:06d}@Extract/stack_{i // PER_STACK:03d}.mrcs" for i in image],
        "mic": [f"MotionCorr/job002/Movies/mic_{m:05d}.mrc" for m in micrograph],
        "group": np.ones(count, dtype=np.int64), "half": row // 7 % 2 + 1, "cls": np.ones(count, dtype=np.int64),
        "grp": micrograph % 50 + 1, "norm": rng.uniform(0.8, 1.2, count), "ll": rng.uniform(1e5, 2e5, count),
    })
    return frame.to_csv(sep=" ", header=False, index=False, float_format="%.6f")


def make_star(path: Path, rows: int) -> None:
    rng = np.random.default_rng(rows)
    with open(path, "w") as f:
        f.write(star_header())
        for first in range(0, rows, BLOCK):
            f.write(star_block(rng, first, min(BLOCK, rows - first)))
        f.write("\n")


def make_dataset(folder: Path, rows_list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mask.mrc").exists():
        make_maps(folder)
    for rows in rows_list:
        path = folder / f"particles_{rows}.star"
        if not path.exists():
            started = time.monotonic()
            make_star(path, rows)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s",
                  flush=True)


# ---------------------------------------------------------------- measuring inside the coordinator
class Sampler:
    """Peak resident memory of this process, overall and per named step, sampled every 20 ms."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.step = "start"
        self.peaks: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.cpu_marks: dict[str, float] = {}  # CPU seconds of this process (all its threads): others load the cores
        self.started = time.monotonic()
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.running:
            rss = self.process.memory_info().rss / 1e9
            self.peaks[self.step] = max(self.peaks.get(self.step, 0.0), rss)
            time.sleep(0.02)

    def enter(self, step: str):
        self.marks[step] = round(time.monotonic() - self.started, 2)
        self.cpu_marks[step] = round(time.process_time(), 2)
        self.step = step


def graph_bytes(task) -> int:
    """Pickled size of one delayed task's graph, as the scheduler receives it."""
    import cloudpickle

    return len(cloudpickle.dumps(dict(task.__dask_graph__())))


def instrument(sampler: Sampler, result_path: Path, stop_after_first: bool):
    """Wrap the coordinator's steps so each is timed; optionally stop the process at the first stored chunk."""
    from dsub.cluster import runner as runner_module
    from dsub.workflow import pipeline, record

    figures = {"in_flight_bytes_peak": 0, "task_bytes": []}

    def timed(module, name, step):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            sampler.enter(step)
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    timed(pipeline, "read_particles", "read particles")
    timed(pipeline.validate, "check_metadata", "check metadata")
    timed(pipeline.validate, "check_maps", "check maps, stacks")
    timed(pipeline, "plan_resources", "plan, identity, maps")
    timed(pipeline.diagnostics, "sample_task", "sample fit")
    timed(pipeline.store, "create_store", "create store")
    timed(pipeline.metadata, "write_table", "write particle table")
    timed(pipeline.export, "write_metadata", "write star and .cs")
    timed(pipeline, "write_qc_report", "QC report")
    original_finished = record.AttemptRecorder.chunk_finished

    def finished(self, *args, **kwargs):
        if "first chunk" not in sampler.marks and stop_after_first:
            sampler.enter("first chunk")
            dump(sampler, figures, result_path)
            os._exit(0)
        return original_finished(self, *args, **kwargs)

    record.AttemptRecorder.chunk_finished = finished
    original_compute = runner_module.ThreadRunner.compute

    def compute(self, tasks, label, *args, **kwargs):
        if label == "subtract":
            sampler.enter("tasks: build, submit")
            tasks = list(watched(tasks)) if isinstance(tasks, list) else watched(tasks)
        elif label == "export":
            sampler.enter("export stacks")
        return original_compute(self, tasks, label, *args, **kwargs)

    def watched(tasks):
        for task in tasks:
            if len(figures["task_bytes"]) < 20:
                figures["task_bytes"].append(graph_bytes(task))
            yield task

    runner_module.ThreadRunner.compute = compute
    return figures


def dump(sampler: Sampler, figures: dict, path: Path) -> None:
    sampler.running = False
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    task_bytes = figures["task_bytes"]
    result = {
        "marks_s": sampler.marks,
        "cpu_marks_s": sampler.cpu_marks,
        "peak_rss_gb_by_step": {k: round(v, 3) for k, v in sampler.peaks.items()},
        "peak_rss_gb": round(max(max(sampler.peaks.values()), maxrss), 3),
        "task_graph_bytes": int(np.median(task_bytes)) if task_bytes else None,
        "in_flight_limit": figures.get("in_flight_limit"),
    }
    path.write_text(json.dumps(result, indent=2))


def child(args) -> None:
    from dsub.cluster import ClusterSpec
    from dsub.cluster import runner as runner_module
    from dsub.physics.subtract import SubtractionSettings
    from dsub.workflow.pipeline import RunOptions, subtract

    folder = Path(args.folder)
    sampler = Sampler()
    figures = instrument(sampler, Path(args.result), stop_after_first=args.mode == "coordinator")
    figures["in_flight_limit"] = getattr(runner_module, "IN_FLIGHT_PER_THREAD", None)
    os.chdir(folder)
    options = RunOptions(outdir=Path(args.outdir), overwrite=True, chunk_size=256,
                         device="cpu", cluster=ClusterSpec(scheduler="threads", workers=2, progress=False))
    started = time.monotonic()
    summary = subtract(f"particles_{args.rows}.star", "half_A.mrc", "half_B.mrc", "mask.mrc",
                       SubtractionSettings(projector="relion", padding=2.0), options)
    sampler.enter("end")
    dump(sampler, figures, Path(args.result))
    result = json.loads(Path(args.result).read_text())
    result["whole_run_s"] = round(time.monotonic() - started, 1)
    result["phase_seconds"] = summary["phase_seconds"]
    Path(args.result).write_text(json.dumps(result, indent=2))


def child_write(args) -> None:
    """Read the star, then write the output star and .cs as the export does (every particle kept)."""
    from dsub.formats import read_particles
    from dsub.workflow import export

    folder = Path(args.folder)
    sampler = Sampler()
    sampler.enter("read particles")
    started = time.monotonic()
    table = read_particles(folder / f"particles_{args.rows}.star")
    read_s = time.monotonic() - started
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    fit = {"contrast_sigma": rng.random(len(table), dtype=np.float32),
           "fit_correlation": rng.random(len(table), dtype=np.float32)}
    contrast = rng.random(len(table), dtype=np.float32)
    sampler.enter("write star and .cs")
    started, cpu = time.monotonic(), time.process_time()
    export.write_metadata(table, outdir, 65536, contrast, None, None, "auto", fit)
    write_s, write_cpu = time.monotonic() - started, time.process_time() - cpu
    sampler.enter("end")
    dump(sampler, {"task_bytes": []}, Path(args.result))
    result = json.loads(Path(args.result).read_text())
    result.update(read_s=round(read_s, 1), write_s=round(write_s, 1), write_cpu_s=round(write_cpu, 1),
                  star_mb=round((outdir / export.STAR_NAME).stat().st_size / 1e6),
                  cs_mb=round((outdir / export.CS_NAME).stat().st_size / 1e6))
    Path(args.result).write_text(json.dumps(result, indent=2))


def measure(folder: Path, rows: int, mode: str) -> dict:
    result = folder / f"result_{mode}_{rows}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", mode, "--rows", str(rows), "--folder", str(folder),
               "--outdir", str(folder / f"out_{mode}_{rows}"), "--result", str(result)]
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True)
    if not result.exists():
        sys.exit(f"the {mode} run at {rows} rows failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    figures = json.loads(result.read_text())
    figures["wall_s"] = round(time.monotonic() - started, 1)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="rows of the coordinator measurement")
    parser.add_argument("--rows-run", type=int, default=1_000_000, help="rows of the whole run at box 32 (0: none)")
    parser.add_argument("--folder", default="scale_data")
    parser.add_argument("--write-rows", type=int, nargs="*", default=[1_000_000, 10_000_000],
                        help="rows of the star and .cs writing measurement")
    parser.add_argument("--child", choices=("coordinator", "run", "write"), help=argparse.SUPPRESS)
    parser.add_argument("--outdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder).resolve()
    if args.child:
        args.mode = args.child
        args.rows = args.rows[0]
        (child_write if args.mode == "write" else child)(args)
        return
    make_dataset(folder, sorted(set(args.rows + args.write_rows + ([args.rows_run] if args.rows_run else []))))
    results = {}
    if args.rows:
        print("| rows | star (MB) | read particles (s, CPU s) | first chunk (s, CPU s) | coordinator peak RSS (GB) | "
              "task graph (kB) | peak RSS by step (GB) |")
        print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        figures = measure(folder, rows, "coordinator")
        results[f"coordinator_{rows}"] = figures
        marks = figures["marks_s"]
        size = (folder / f"particles_{rows}.star").stat().st_size / 1e6
        cpu = figures["cpu_marks_s"]
        read_s = marks.get("check metadata", 0) - marks.get("read particles", 0)
        read_cpu = cpu.get("check metadata", 0) - cpu.get("read particles", 0)
        steps = ", ".join(f"{k} {v}" for k, v in figures["peak_rss_gb_by_step"].items())
        print(f"| {rows:,} | {size:.0f} | {read_s:.1f}, {read_cpu:.1f} | {marks.get('first chunk')}, "
              f"{cpu.get('first chunk')} | {figures['peak_rss_gb']} | "
              f"{(figures['task_graph_bytes'] or 0) / 1e3:.1f} | {steps} |", flush=True)
    if args.write_rows:
        print("\n| rows | read star (s) | write star + .cs (s, CPU s) | star, .cs (MB) | peak RSS reading / writing (GB) |")
        print("|---|---|---|---|---|")
    for rows in args.write_rows:
        figures = measure(folder, rows, "write")
        results[f"write_{rows}"] = figures
        peaks = figures["peak_rss_gb_by_step"]
        print(f"| {rows:,} | {figures['read_s']} | {figures['write_s']}, {figures['write_cpu_s']} | "
              f"{figures['star_mb']}, {figures['cs_mb']} | "
              f"{peaks.get('read particles')} / {peaks.get('write star and .cs')} |", flush=True)
    if args.rows_run:
        figures = measure(folder, args.rows_run, "run")
        results[f"run_{args.rows_run}"] = figures
        print(f"\nWhole run, {args.rows_run:,} rows, box {BOX}, CPU: {figures['whole_run_s']} s, phases "
              f"{figures['phase_seconds']}, coordinator peak RSS {figures['peak_rss_gb']} GB")
    (folder / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
