"""Where the input checks' wall time goes, thread by thread: ``dsub subtract`` run in this process.

    python benchmarks/check_threads.py subtract STAR --half-a ... [dsub's options]

Runs the command as ``dsub`` would, and at the end of the "check inputs" phase
prints one line to stderr: the phase's wall seconds from the moment a local
cluster starts beside the checks (``pipeline.start_early``), and, over that
window, each thread's CPU seconds and the seconds the main thread waited for a
core (``/proc/<pid>/task/<tid>/schedstat``; Linux only). What is left of the
window is the main thread waiting on something else: the interpreter lock
held by another thread, or the disk. The hook is ``sample_check_if_all_done``,
which a rerun of a finished run reaches right after the checks
(``fixed_costs.py`` makes such a run). Run it from outside the repository with
``PYTHONPATH=TREE`` to compare two trees.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def thread_seconds() -> dict[str, float]:
    """CPU seconds per thread name of this process, and the main thread's seconds spent waiting for a core."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    seconds: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                running_ns, waiting_ns, _ = map(int, f.read().split())
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = names.get(int(tid)) or f.read().strip()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        seconds[name] = seconds.get(name, 0.0) + running_ns / 1e9
        if name == "MainThread":
            seconds["main thread waiting for a core"] = waiting_ns / 1e9
    return seconds


def main() -> int:
    from dsub.cli import main as dsub_main
    from dsub.workflow import pipeline

    start_early, checks_done = pipeline.start_early, pipeline.sample_check_if_all_done
    first: dict[str, float] = {}

    def timed_start_early(*args, **kwargs):
        first.update(thread_seconds(), started=time.monotonic())
        return start_early(*args, **kwargs)

    def timed_checks_done(*args, **kwargs):
        window = time.monotonic() - first["started"]
        spent = {name: value - first.get(name, 0.0) for name, value in thread_seconds().items()}
        shown = " | ".join(f"{name} {value:.2f}" for name, value in sorted(spent.items(), key=lambda item: -item[1])
                           if value >= 0.01)
        print(f"check inputs from the cluster's start: {window:.2f} s wall | {shown}", file=sys.stderr, flush=True)
        return checks_done(*args, **kwargs)

    pipeline.start_early, pipeline.sample_check_if_all_done = timed_start_early, timed_checks_done
    return dsub_main(sys.argv[1:])


if __name__ == "__main__":  # the local cluster's workers are spawned: they import this file too
    sys.exit(main())
