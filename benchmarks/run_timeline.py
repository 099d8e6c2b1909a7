"""Where a whole run's wall time goes: a timeline of the coordinator's steps and of every task's stages.

    python benchmarks/run_timeline.py [--particles 20000] [--box 256] [--device gpu] [--folder DIR]
                                      [--cold] [--extra relion,float16] [--threads 16 4] [--switch-interval 0 0.0005]
    python benchmarks/run_timeline.py --scheduler local --workers 1 2 [--task-threads 4] [...]

Runs ``dsub.workflow.pipeline.subtract`` in this process with the pipeline's
steps and each task's stages wrapped in timers (``task_stages.py``): reading
the particle table, the map and stack checks, map preparation, the sample fit,
the store and stacks set-up, each phase, the export, the QC report; per task:
its metadata, the images' read, the NaN check, waiting for the GPU turn, the
turn itself, the stacks' write, the statistics and the store's bookkeeping.
With the threaded scheduler the tasks run in this process; with ``--scheduler
local`` each worker process loads ``task_stages.py`` as a Dask worker preload
(through a ``--cluster-config`` file, as a user would) and hands its records
back when it closes.

Prints each step's wall time and, per worker process, each task stage's summed
time and share of the subtract phase's thread time, the share of the phase its
GPU was held, and how many tasks ran at once: the limit of the subtract phase
shows (the GPU turn, the reads, or the host work around them). ``--cold``
empties the page cache of the data set first (as ``bench.py`` does). Several
``--threads``, ``--workers`` and ``--switch-interval`` values run one after the
other on the same data set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

started_process = time.perf_counter()
import task_stages  # noqa: E402
from bench import evict  # noqa: E402
from multi_gpu import write_dataset  # noqa: E402

from dsub.cluster import ClusterSpec  # noqa: E402
from dsub.cluster import start as start_module  # noqa: E402
from dsub.cluster.start import local_layout  # noqa: E402
from dsub.physics.subtract import SubtractionSettings  # noqa: E402
from dsub.workflow import export, pipeline, store, validate, region  # noqa: E402

DSUB_TASK_THREADS = start_module.GPU_TASK_THREADS
steps: list[tuple[str, float, float]] = []  # (step, start, stop) of the coordinator, time.time seconds


def timed_step(module, name: str, label: str | None = None) -> None:
    """Each call of ``module.name`` is one step of the coordinator's timeline."""
    task_stages.timed(module, name, lambda start, stop: steps.append((label or name, start, stop)))


def instrument(scheduler: str) -> None:
    """Time the coordinator's steps, and the task stages where the tasks run in this process.

    With ``local`` the workers wrap their own stages (the preload); wrapping them
    here too would make the task functions differ from their modules' and travel
    by value.
    """
    for module, name in ((pipeline, "read_particles"), (validate, "check_maps"), (region, "density_share"),
                         (validate, "check_images"), (pipeline, "prepare_maps_where_visible"),
                         (pipeline, "plan_resources"), (pipeline, "prepare_outdir"),
                         (store, "create_store"), (export, "prepare_stacks"), (export, "finish_stacks"),
                         (export, "write_metadata"), (store, "delete_images"), (pipeline, "write_qc_report"),
                         (pipeline.metadata, "write_table")):
        timed_step(module, name)
    timed_step(pipeline.diagnostics, "check_sample")
    from dsub.cluster import runner as runner_module

    for runner_class in (runner_module.ThreadRunner, runner_module.DistributedRunner):
        time_phases(runner_class)
    if scheduler == "threads":
        task_stages.instrument()
        pipeline.run_chunk = task_stages.tasks_module().run_chunk  # the pipeline's own name for it


def time_phases(runner_class) -> None:
    """Each ``compute`` call of ``runner_class`` is a phase of the coordinator's timeline."""
    original_compute = runner_class.compute

    def compute(self, task_list, label, *args, **kwargs):
        start = time.time()
        try:
            return original_compute(self, task_list, label, *args, **kwargs)
        finally:
            steps.append((f"phase: {label}", start, time.time()))

    runner_class.compute = compute


def busy_seconds(spans) -> float:
    """Length of the union of (start, stop) spans."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def print_stages(records, phase: tuple[float, float], threads: int) -> None:
    """Per process: each stage's summed time, its share of the phase's thread time, GPU held, tasks at once."""
    length = phase[1] - phase[0]
    by_process = defaultdict(list)
    for record in records:
        by_process[record[3]].append(record)
    for number, (pid, mine) in enumerate(sorted(by_process.items())):
        sums = defaultdict(list)
        for stage, start, stop, *_ in mine:
            sums[stage].append(stop - start)
        tasks = [(start, stop) for stage, start, stop, *_ in mine if stage == "whole task"]
        held = [(start, stop) for stage, start, stop, *_ in mine if stage == "GPU turn held"]
        first, last = (min(s for s, _ in tasks), max(e for _, e in tasks)) if tasks else phase
        print(f"-- process {number} (pid {pid}): {len(tasks)} tasks from {first - phase[0]:.2f} to "
              f"{last - phase[0]:.2f} s of the phase; GPU held {busy_seconds(held):.2f} s "
              f"({busy_seconds(held) / length:.0%} of the phase); tasks at once on average "
              f"{sum(e - s for s, e in tasks) / max(last - first, 1e-9):.1f}")
        print(f"   {'task stage':40s} {'calls':>6s} {'sum s':>8s} {'mean ms':>8s} {'share of thread time':>21s}")
        for label, values in sorted(sums.items(), key=lambda item: -sum(item[1])):
            share = sum(values) / (length * threads)
            print(f"   {label:40s} {len(values):6d} {sum(values):8.2f} {1e3 * sum(values) / len(values):8.1f} "
                  f"{share:21.1%}")


def one_run(paths: dict, folder: Path, args, scheduler: str, workers: int | None, interval: float | None,
            task_threads: int | None = None) -> None:
    """One measured run: ``workers`` task threads (threads) or worker processes (local) of ``task_threads``."""
    steps.clear()
    task_stages.records.clear()
    extra = set(filter(None, args.extra.split(",")))
    settings = SubtractionSettings(projector="relion", padding=2) if "relion" in extra else SubtractionSettings()
    if args.cold:
        evict([folder])
    default_interval = sys.getswitchinterval()
    if interval:
        sys.setswitchinterval(interval)
    records_folder = Path(tempfile.mkdtemp(dir=folder))
    config = folder / "timeline-cluster.yaml"
    config.write_text(json.dumps({"distributed": {"worker": {"preload": [str(Path(task_stages.__file__))]}}}))
    os.environ["DSUB_TIMELINE_DIR"] = str(records_folder)
    os.environ["DSUB_TIMELINE_SWITCH_INTERVAL"] = str(interval or 0)  # the workers' (local)
    start_module.GPU_TASK_THREADS = task_threads or DSUB_TASK_THREADS
    wall = time.perf_counter()
    try:
        summary = pipeline.subtract(
            paths["star"], paths["half_a"], paths["half_b"], paths["mask"], settings,
            pipeline.RunOptions(outdir=folder / "out", device=args.device, float16="float16" in extra, overwrite=True,
                                cluster=ClusterSpec(scheduler=scheduler, workers=workers, progress=False,
                                                    dashboard_address=":0",
                                                    cluster_config=str(config) if scheduler == "local" else None)))
    finally:
        sys.setswitchinterval(default_interval)
    wall = time.perf_counter() - wall
    records = list(task_stages.records)
    threads = (summary.get("workers") or 1) if scheduler == "threads" else local_layout(ClusterSpec(
        scheduler="local", workers=workers))[1]
    for path in records_folder.glob("worker-*.json"):
        records += [tuple(record) for record in json.loads(path.read_text())]
    print(f"\n== {scheduler}, {summary.get('workers')} {'threads' if scheduler == 'threads' else 'workers'} "
          f"({threads} task threads each), "
          f"switch interval {interval or default_interval:g} s: {wall:.2f} s wall, "
          f"{args.particles / wall:.0f} particles/s; phases {summary['phase_seconds']}")
    first = min(start for _, start, _ in steps)
    print(f"{'coordinator step':42s} {'from s':>7s} {'to s':>7s} {'seconds':>8s}")
    for label, start, stop in sorted(steps, key=lambda step: step[1]):
        print(f"{label:42s} {start - first:7.2f} {stop - first:7.2f} {stop - start:8.3f}")
    phase = next(((start, stop) for label, start, stop in steps if label == "phase: subtract"), None)
    if phase and records:
        print_stages(records, phase, threads)
        print(f"(subtract phase {phase[1] - phase[0]:.2f} s)")
    elif not records:
        print("(no task records came back)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--scheduler", choices=("threads", "local"), default="threads")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="threads: task threads per run (0: dsub's choice)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="local: worker processes per run (0: one per GPU)")
    parser.add_argument("--task-threads", type=int, nargs="+", default=[0],
                        help="local: task threads per GPU worker (GPU_TASK_THREADS as dsub.cluster.start reads it; "
                             "0: dsub's)")
    parser.add_argument("--switch-interval", type=float, nargs="+", default=[0.0],
                        help="sys.setswitchinterval per run, seconds (0: Python's default)")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--extra", default="", help="relion | float16 (comma separated)")
    parser.add_argument("--cpu-affinity", nargs="+", choices=("on", "off"), default=["on"],
                        help="local GPU workers kept on their GPU's CPUs (on, the default) or not; several: each in turn")
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
        instrument(args.scheduler)
        counts = args.threads if args.scheduler == "threads" else args.workers
        for count, affinity in [(count, affinity) for affinity in args.cpu_affinity for count in counts]:
            os.environ["DSUB_GPU_CPU_AFFINITY"] = "1" if affinity == "on" else "0"
            print(f"\n#### workers kept on their GPU's CPUs: {affinity}")
            for task_threads in args.task_threads:
                for interval in args.switch_interval:
                    one_run(paths, folder, args, args.scheduler, count or None, interval or None, task_threads or None)


if __name__ == "__main__":
    main()
