"""Where a whole run's wall time goes: a timeline of the coordinator's steps and of every task's stages.

    python benchmarks/run_timeline.py [--particles 20000] [--box 256] [--device gpu] [--folder DIR]
                                      [--cold] [--extra relion,float16] [--threads 16 4] [--switch-interval 0 0.0005]

Runs ``dsub.workflow.pipeline.subtract`` in this process on the threaded
scheduler (the tasks' code is the same on a cluster's workers), with the
pipeline's steps and each task's stages wrapped in timers: reading the particle
table, the map and stack checks, map preparation, the sample fit, the store and
stacks set-up, the subtract phase, the export, the QC report; per task: its
metadata, the images' read, the NaN check, waiting for the GPU turn, the turn
itself, the re-boxing, the stacks' write, the statistics and the store's
bookkeeping. Prints each step's wall time, and per task stage its summed time
and its share of the phase's thread time, so the limit of the subtract phase
shows (the GPU turn, the reads, or the host work around them). ``--cold``
empties the page cache of the data set first (as ``bench.py`` does). Several
``--threads`` and ``--switch-interval`` values run one after the other on the
same data set (the interpreter's switch interval decides how long a thread that
wants the GIL waits for it; the GPU's thread competes with the task threads).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

started_process = time.perf_counter()
from bench import evict  # noqa: E402
from multi_gpu import write_dataset  # noqa: E402

from dsub.cluster import ClusterSpec  # noqa: E402
from dsub.physics.subtract import SubtractionSettings  # noqa: E402
from dsub.workflow import export, pipeline, store, tasks, validate, region  # noqa: E402

steps: list[tuple[str, float, float]] = []  # (step, start, stop) of the coordinator
stages: dict[str, list[float]] = defaultdict(list)  # task stage -> durations
lock = threading.Lock()


def timed(module, name: str, record) -> None:
    """Wrap ``module.name`` so each call ends with ``record(start, stop)`` (``time.perf_counter`` seconds)."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record(start, time.perf_counter())

    setattr(module, name, wrapper)


def timed_step(module, name: str, label: str | None = None) -> None:
    """Each call of ``module.name`` is one step of the coordinator's timeline."""
    timed(module, name, lambda start, stop: steps.append((label or name, start, stop)))


def timed_stage(module, name: str, label: str | None = None) -> None:
    """Each call of ``module.name`` adds to a task stage's summed time."""
    def record(start, stop):
        with lock:
            stages[label or name].append(stop - start)

    timed(module, name, record)


def instrument() -> None:
    for module, name in ((pipeline, "read_particles"), (validate, "check_maps"), (region, "density_share"),
                         (validate, "check_images"), (pipeline, "prepare_maps_where_visible"),
                         (pipeline, "plan_resources"), (pipeline, "prepare_outdir"),
                         (store, "create_store"), (export, "prepare_stacks"), (export, "finish_stacks"),
                         (export, "write_metadata"), (store, "delete_images"), (pipeline, "write_qc_report"),
                         (pipeline.metadata, "write_table")):
        timed_step(module, name)
    timed_step(pipeline.diagnostics, "check_sample")
    original_compute = None

    from dsub.cluster import runner as runner_module

    original_compute = runner_module.ThreadRunner.compute

    def compute(self, task_list, label, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original_compute(self, task_list, label, *args, **kwargs)
        finally:
            steps.append((f"phase: {label}", start, time.perf_counter()))

    runner_module.ThreadRunner.compute = compute
    for name, label in (("load_particles", "task: metadata"), ("half_map_models", "task: prepared maps"),
                        ("read_images", "task: read images"), ("bad_images", "task: NaN check"),
                        ("subtract_particles", "task: subtract (turn wait + turn)")):
        timed_stage(tasks, name, label)
    timed_stage(tasks.export, "write_pieces", "task: write stacks")
    timed_stage(tasks.export, "image_statistics", "task: image statistics")
    timed_stage(tasks.store, "write_chunk", "task: store bookkeeping")
    original_turn = tasks.gpu_turn

    def turn(work):
        asked = time.perf_counter()

        def timed_work():
            got = time.perf_counter()
            try:
                return work()
            finally:
                with lock:
                    stages["task: wait for the GPU turn"].append(got - asked)
                    stages["task: GPU turn held"].append(time.perf_counter() - got)

        return original_turn(timed_work)

    tasks.gpu_turn = turn


def one_run(paths: dict, folder: Path, args, threads: int | None, interval: float | None) -> None:
    """One measured run with ``threads`` task threads and the interpreter's switch interval ``interval``."""
    steps.clear()
    stages.clear()
    extra = set(filter(None, args.extra.split(",")))
    settings = SubtractionSettings(projector="relion", padding=2) if "relion" in extra else SubtractionSettings()
    if args.cold:
        evict([folder])
    default_interval = sys.getswitchinterval()
    if interval:
        sys.setswitchinterval(interval)
    wall = time.perf_counter()
    try:
        summary = pipeline.subtract(
            paths["star"], paths["half_a"], paths["half_b"], paths["mask"], settings,
            pipeline.RunOptions(outdir=folder / "out", device=args.device, float16="float16" in extra, overwrite=True,
                                cluster=ClusterSpec(workers=threads, progress=False)))
    finally:
        sys.setswitchinterval(default_interval)
    wall = time.perf_counter() - wall
    print(f"\n== {summary.get('workers')} threads, switch interval {interval or default_interval:g} s: "
          f"{wall:.2f} s wall, {args.particles / wall:.0f} particles/s; phases {summary['phase_seconds']}")
    first = min(start for _, start, _ in steps)
    print(f"{'coordinator step':42s} {'from s':>7s} {'to s':>7s} {'seconds':>8s}")
    for label, start, stop in sorted(steps, key=lambda step: step[1]):
        print(f"{label:42s} {start - first:7.2f} {stop - first:7.2f} {stop - start:8.3f}")
    phase = next((stop - start for label, start, stop in steps if label == "phase: subtract"), None)
    workers = summary.get("workers") or 1
    print(f"{'task stage':42s} {'calls':>6s} {'sum s':>8s} {'mean ms':>8s} {'share of thread time':>21s}")
    for label, values in sorted(stages.items(), key=lambda item: -sum(item[1])):
        share = sum(values) / (phase * workers) if phase else float("nan")
        print(f"{label:42s} {len(values):6d} {sum(values):8.2f} {1e3 * sum(values) / len(values):8.1f} {share:21.1%}")
    print(f"(subtract phase {phase:.2f} s on {workers} threads)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="task threads per run (0: one per core)")
    parser.add_argument("--switch-interval", type=float, nargs="+", default=[0.0],
                        help="sys.setswitchinterval per run, seconds (0: Python's default)")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--extra", default="", help="relion | float16 (comma separated)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        made = time.perf_counter()
        paths = write_dataset(folder, args.particles, args.box)
        print(f"data set: {args.particles} particles of {args.box} px in {time.perf_counter() - made:.1f} s "
              f"(imports before it: {made - started_process:.2f} s)")
        if args.device == "gpu":  # kernels compiled and cached before the measured runs
            small = folder / "warm"
            small.mkdir()
            warm = write_dataset(small, 64, args.box)
            pipeline.subtract(warm["star"], warm["half_a"], warm["half_b"], warm["mask"], SubtractionSettings(),
                              pipeline.RunOptions(outdir=small / "out", device="gpu",
                                                  cluster=ClusterSpec(progress=False)))
        instrument()
        for threads in args.threads:
            for interval in args.switch_interval:
                one_run(paths, folder, args, threads or None, interval or None)


if __name__ == "__main__":
    main()
