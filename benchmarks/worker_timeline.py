"""Where a local worker's seconds go, from the command's launch to its first chunk (``--scheduler local``).

    python benchmarks/worker_timeline.py [--particles 20000] [--box 256] [--device gpu] [--runs 2] [--folder DIR]

Writes a data set (``multi_gpu.write_dataset``), then runs ``dsub subtract
--scheduler local`` on it ``--runs`` times, cold (page cache emptied as
``bench.py`` does), with this file as a Dask worker preload (through a
``--cluster-config`` file, as a user would add one). In each worker process the
preload records, in seconds since the command was launched: the process's
start, the preload's run (Dask imported, the worker made), the end of each of
dsub's loading threads (``cluster/warm_up.py``: the task module's import, CuPy
and the CUDA context), and the first start and end of the map preparation
(``tasks.half_map_models``), the sample fit (``tasks.fit_sample``) and a chunk
(``tasks.run_chunk``). Prints them beside the run's phases (``dsub_run.json``)
and its wall time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TIMELINE_DIR = "DSUB_WORKER_TIMELINE_DIR"
_events: dict[str, float] = {}


def _note(name: str) -> None:
    _events.setdefault(name, time.time())


def _wrapped(function, name: str):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        _note(f"{name} starts")
        try:
            return function(*args, **kwargs)
        finally:
            _note(f"{name} ends")

    return timed


def _watch_loading() -> None:
    """Wait for dsub's loading threads (started by the next preload) and note when each ends."""
    from dsub.cluster import warm_up

    while not warm_up._threads:
        time.sleep(0.002)
    for thread in list(warm_up._threads):
        thread.join()
        _note(f"{thread.name.removeprefix('dsub-worker-warm-up')} done")
    import dsub.workflow.tasks as tasks

    for name in ("half_map_models", "fit_sample", "run_chunk"):
        setattr(tasks, name, _wrapped(getattr(tasks, name), name))


def _process_start() -> float:
    """When this process started (``time.time``), from its start in clock ticks since boot and the uptime
    (/proc: 10 ms steps; the boot time that ``psutil`` adds is whole seconds)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def dask_setup(worker) -> None:
    _events["process start"] = _process_start()
    _note("preload (Dask imported, worker made)")
    threading.Thread(target=_watch_loading, daemon=True).start()


def dask_teardown(worker) -> None:
    folder = os.environ.get(TIMELINE_DIR)
    if folder:
        Path(folder, f"worker-{os.getpid()}.json").write_text(json.dumps(_events))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(repo), str(repo / "benchmarks")]
    from bench import evict
    from multi_gpu import write_dataset

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        (folder / "data").mkdir()
        paths = write_dataset(folder / "data", args.particles, args.box)
        config = folder / "cluster.json"
        config.write_text(json.dumps({"distributed": {"worker": {"preload": [str(Path(__file__).resolve())]}}}))
        for run in range(args.runs):
            records, outdir = folder / f"records{run}", folder / f"out{run}"
            records.mkdir()
            evict([paths["star"].parent])
            command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a",
                       str(paths["half_a"]), "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]),
                       "-o", str(outdir), "--scheduler", "local", "--device", args.device, "--quiet",
                       "--dashboard-address", "127.0.0.1:0", "--cluster-config", str(config)]
            launched = time.time()
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, TIMELINE_DIR: str(records)})
            wall = time.time() - launched
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            phases = json.loads((outdir / "dsub_run.json").read_text())["phase_seconds"]
            print(f"run {run}: wall {wall:.2f} s; phases " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
            for path in sorted(records.glob("worker-*.json")):
                events = json.loads(path.read_text())
                for name, when in sorted(events.items(), key=lambda item: item[1]):
                    print(f"  {when - launched:6.2f} s  {name}")
            shutil.rmtree(outdir)


if __name__ == "__main__":
    main()
