"""Worker preload (``distributed.worker.preload``) of a local cluster: Ctrl-C left to the coordinator,
and what a worker's first task needs loaded as it starts.

A local cluster's worker otherwise imports dsub's task module when its first
task arrives (1.6 s on a GPU host: NumPy, Zarr, mrcfile, dsub's physics) and
then loads CuPy and makes its CUDA context (1.1 s), one after the other, while
the run waits for the sample fit. Here each starts in a thread of its own as
the worker process starts, beside the coordinator's input checks and beside
each other (the driver makes the context without Python's lock); a task that
arrives meanwhile waits for the import in progress (Python's import lock),
never imports twice. The GPU is warmed up only where the worker was started
pinned to one (``DSUB_WARM_UP_GPU`` beside its ``CUDA_VISIBLE_DEVICES``, set as
it is spawned: ``start.PinnedGPUCluster``), so CUDA never starts before the
pinning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from .affinity import pin_from_environment

WARM_UP_GPU = "DSUB_WARM_UP_GPU"

_threads: list[threading.Thread] = []


def _import_tasks() -> None:
    import dsub.workflow.tasks  # noqa: F401


def _warm_up_gpu() -> None:
    from dsub.physics.backend import start_gpu_warm_up

    start_gpu_warm_up().join()  # CuPy's import and the CUDA context


def _quietly(load) -> None:
    try:
        load()
    except Exception:  # noqa: BLE001 -- the first task meets the same failure and reports it
        pass


def dask_setup(worker) -> None:
    """Keep to the GPU's CPUs, ignore Ctrl-C, and start loading in threads; the worker goes on starting.

    A terminal's Ctrl-C reaches every process of its group: the coordinator
    stops the run and its cluster, and says so in one line; a local worker
    that took it too would die printing a KeyboardInterrupt traceback. dsub's
    local clusters spawn their workers with SIGINT ignored from exec on
    (``ctrl_c``); this covers workers spawned otherwise (a "fork" start method,
    a system without ``/bin/sh`` or an executable temporary folder).
    """
    pin_from_environment()  # first: the threads started below inherit the GPU's CPUs (``affinity``)
    with contextlib.suppress(ValueError):  # only a process's main thread may set it (the worker's is)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    loads = [_warm_up_gpu, _import_tasks] if os.environ.get(WARM_UP_GPU) == "1" else [_import_tasks]
    for load in loads:
        thread = threading.Thread(target=_quietly, args=(load,), name=f"dsub-worker-warm-up{load.__name__}", daemon=True)
        thread.start()
        _threads.append(thread)


def dask_teardown(worker) -> None:
    """Wait for the loading before the worker closes (a thread still importing at exit can abort it)."""
    for thread in _threads:
        thread.join()
