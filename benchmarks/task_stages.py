"""Timers around each stage of a task, in whatever process runs the tasks.

Used by ``run_timeline.py``: in its own process for the threaded scheduler,
and as a Dask worker preload for ``--scheduler local`` (``distributed.worker.preload``
in a ``--cluster-config`` file names this file; its ``dask_setup`` wraps the
stages in each worker, and ``dask_teardown`` writes that worker's records as
JSON into the folder named by ``DSUB_TIMELINE_DIR``; ``DSUB_TIMELINE_SWITCH_INTERVAL``
sets the worker's ``sys.setswitchinterval``).

A record is (stage, start, stop, process id, thread name), times in seconds
since the epoch (``time.time``), so records of several processes line up. Each
stage also gets a record "<stage>: CPU" whose length is the CPU time its thread
spent in it (``time.thread_time``): a stage whose wall time is well above its
CPU time waited (a lock, the interpreter, the kernel's I/O), one whose CPU time
grows with a second process ran slower (the memory, the sockets' link). Each
worker adds one record naming the CPUs it may run on.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time

records: list[tuple[str, float, float, int, str]] = []
_lock = threading.Lock()
_done = False

#: (module attribute path in dsub.workflow.tasks, stage label)
STAGES = (
    ("load_particles", "metadata"),
    ("half_map_models", "prepared maps"),
    ("read_images", "read images"),
    ("nonfinite_images", "NaN check (on the CPU path)"),
    ("subtract_particles", "subtract (turn wait + turn)"),
    ("export.write_pieces", "write stacks"),
    ("export.image_statistics", "image statistics"),
    ("store.write_images", "store images (--keep-store)"),
    ("run_chunk", "whole task"),
)


def record(stage: str, start: float, stop: float) -> None:
    with _lock:
        records.append((stage, start, stop, os.getpid(), threading.current_thread().name))


def timed(owner, name: str, on_call) -> None:
    """Wrap ``owner.name`` so that each call ends with ``on_call(start, stop)`` (``time.time`` seconds)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            on_call(start, time.time())

    setattr(owner, name, wrapper)


def timed_with_cpu(owner, name: str, stage: str) -> None:
    """Wrap ``owner.name``: each call records ``stage`` (wall) and ``stage: CPU`` (its thread's CPU time)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start, cpu = time.time(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            record(stage, start, time.time())
            record(f"{stage}: CPU", start, start + time.thread_time() - cpu)

    setattr(owner, name, wrapper)


def tasks_module():
    from dsub.workflow import tasks

    return tasks


def instrument() -> None:
    """Wrap the task stages of ``dsub.workflow.tasks`` in this process (once)."""
    global _done
    if _done:
        return
    _done = True
    from dsub.workflow import tasks

    for path, stage in STAGES:
        owner = tasks
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        timed_with_cpu(owner, name, stage)
    original_turn = tasks.gpu_turn

    def turn(work):
        asked = time.time()

        def timed_work():
            got, cpu = time.time(), time.thread_time()
            try:
                return work()
            finally:
                stop = time.time()
                record("wait for the GPU turn", asked, got)
                record("GPU turn held", got, stop)
                record("GPU turn: its thread's CPU time", got, got + time.thread_time() - cpu)

        return original_turn(timed_work)

    tasks.gpu_turn = turn


def dask_setup(worker) -> None:
    instrument()
    interval = float(os.environ.get("DSUB_TIMELINE_SWITCH_INTERVAL") or 0)
    if interval:
        import sys

        sys.setswitchinterval(interval)


def dask_teardown(worker) -> None:
    folder = os.environ.get("DSUB_TIMELINE_DIR")
    now = time.time()
    cpus = sorted(os.sched_getaffinity(0))  # after dsub's preload pinned the worker (``affinity``)
    record(f"ran on {len(cpus)} CPUs {cpus[0]}..{cpus[-1]}", now, now)
    if folder:
        with _lock, open(os.path.join(folder, f"worker-{os.getpid()}.json"), "w") as out:
            json.dump(records, out)
