"""Runners: run Dask delayed tasks on the chosen scheduler, showing their progress (``progress.py``).

* ``threads`` / ``sync``: Dask's local schedulers in this process (NumPy or one GPU).
* ``local``: a distributed ``LocalCluster``; one worker process per visible GPU,
  each pinned to its GPU, or CPU worker processes where there is no GPU.
* ``slurm`` / ``pbs``: dask-jobqueue ``SLURMCluster`` / ``PBSCluster``, set up
  from dask's config (``jobqueue.slurm`` / ``jobqueue.pbs``) and ``--cluster-config``.
* ``tcp://HOST:PORT``: an existing Dask scheduler.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import dask

from ..errors import OptionError
from .config import cluster_config
from .progress import PhaseRate, Progress, setup_step

SCHEDULERS = ("threads", "sync", "local", "slurm", "pbs")


@dataclass
class ClusterSpec:
    """How and where to run: the scheduler and the size of the cluster."""

    scheduler: str = "threads"
    workers: int | None = None
    adapt: tuple[int, int] | None = None
    cluster_config: str | None = None
    worker_timeout: float = 300.0
    dashboard_address: str = "127.0.0.1:8787"
    interface: str | None = None
    secure: bool = False
    progress: bool = True
    log: object = field(default=None, repr=False)  # None: sys.stdout at the time of writing
    device: str = "auto"  # where workers compute: decides whether batch jobs ask for a GPU
    worker_memory_bytes: int | None = None  # host memory each batch job must have (the run's estimate)

    @property
    def out(self):
        return self.log or sys.stdout

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS and not self.scheduler.startswith("tcp://"):
            raise OptionError(
                f"--scheduler must be one of {', '.join(SCHEDULERS)} or tcp://HOST:PORT, not {self.scheduler!r}"
            )
        if self.workers is not None and self.workers < 1:
            raise OptionError(f"--workers must be at least 1, not {self.workers}")
        if self.adapt is not None and self.scheduler not in ("slurm", "pbs", "local"):
            raise OptionError("--adapt works with --scheduler local, slurm or pbs")
        if self.secure and self.scheduler.startswith("tcp://"):
            raise OptionError(
                "--secure starts a cluster with fresh TLS credentials, so it cannot join a running scheduler; "
                "give that scheduler's TLS settings in dask's config (distributed.comm.tls) instead"
            )
        if self.worker_timeout <= 0:
            raise OptionError(f"--worker-timeout must be positive, not {self.worker_timeout}")

    @property
    def distributed(self) -> bool:
        return self.scheduler not in ("threads", "sync")


def parse_adapt(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) for adaptive scaling."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise OptionError(f"--adapt takes MIN:MAX (e.g. 1:8), not {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise OptionError(f"--adapt needs 0 <= MIN <= MAX and MAX >= 1, not {text!r}")
    return low, high


def say(spec: ClusterSpec, message: str) -> None:
    print(message, file=spec.out, flush=True)


def start_progress(spec: ClusterSpec, label: str, sizes, waiting: str | None, unit: str) -> Progress | None:
    """A progress display for one phase on the spec's output (none with --quiet).

    Where the output also goes to OUTDIR/dsub.log (a stream with ``screen`` and
    ``files``), the bar or lines go to the screen and plain lines to the log.
    """
    if not spec.progress:
        return None
    out = spec.out
    return Progress(label, sizes, getattr(out, "screen", out), unit=unit, waiting=waiting,
                    extra_logs=getattr(out, "files", ())).start()


class _Runner:
    """What both runners share: each phase's figures (tasks, particles, seconds) for the run record."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.phases: dict[str, PhaseRate] = {}

    def _finish(self, progress: Progress | None, label: str, sizes, started: float, unit: str) -> None:
        rate = progress.close(completed=sys.exc_info()[0] is None) if progress is not None else None
        self.phases[label] = rate or PhaseRate(label, len(sizes), sum(sizes), time.monotonic() - started, unit)


class ThreadRunner(_Runner):
    """Dask's threaded (or synchronous) scheduler in this process."""

    def __init__(self, spec: ClusterSpec):
        super().__init__(spec)
        self.workers = spec.workers or (os.cpu_count() or 1)
        self.description = f"{spec.scheduler} scheduler, {self.workers if spec.scheduler == 'threads' else 1} thread(s)"

    def compute(self, tasks, label: str, sizes=None, waiting: str | None = None, on_result=None,
                unit: str = "chunks"):
        """Run delayed ``tasks``; returns their results in order.

        ``sizes``: particles per task (for particles/s); ``waiting``: what happens
        before the first task finishes; ``on_result(result)`` is called as each
        task finishes; ``unit``: what a task is, for the progress lines.
        """
        if not tasks:
            return []
        from dask.callbacks import Callback

        sizes = list(sizes) if sizes is not None else [1] * len(tasks)
        kwargs = {"scheduler": self.spec.scheduler}
        if self.spec.scheduler == "threads":
            kwargs["num_workers"] = self.workers
        order = {task.key: index for index, task in enumerate(tasks)}
        started = time.monotonic()
        progress = start_progress(self.spec, label, sizes, waiting, unit)

        def finished(key, result, *_):
            if key in order:
                if progress is not None:
                    progress.task_done(order[key])
                if on_result is not None:
                    on_result(result)

        try:
            with Callback(posttask=finished):
                return list(dask.compute(*tasks, **kwargs))
        finally:
            self._finish(progress, label, sizes, started, unit)

    def capacities(self, device: str) -> None:
        """No separate workers: the machine itself is checked before the run."""
        return None


class DistributedRunner(_Runner):
    """A distributed Client on a cluster dsub started (or an existing scheduler)."""

    def __init__(self, client, cluster, spec: ClusterSpec, description: str):
        super().__init__(spec)
        self.client, self.cluster, self.description = client, cluster, description
        self.workers = len(client.scheduler_info().get("workers", {}))

    def compute(self, tasks, label: str, sizes=None, waiting: str | None = None, on_result=None,
                unit: str = "chunks"):
        """As ``ThreadRunner.compute``, on the cluster's workers."""
        if not tasks:
            return []
        sizes = list(sizes) if sizes is not None else [1] * len(tasks)
        started = time.monotonic()
        futures = self.client.compute(tasks)
        order = {future.key: index for index, future in enumerate(futures)}
        results = [None] * len(futures)
        progress = start_progress(self.spec, label, sizes, waiting, unit)
        try:
            for future in self.completed(futures):
                index = order[future.key]
                results[index] = future.result()  # re-raises a task's exception here
                if progress is not None:
                    progress.task_done(index)
                if on_result is not None:
                    on_result(results[index])
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            self._finish(progress, label, sizes, started, unit)
        self.workers = len(self.client.scheduler_info().get("workers", {}))
        return results

    def completed(self, futures, poll: float = 2.0):
        """Yield futures as they finish; stop with ``WorkersLost`` when no worker is left for too long.

        A batch job that dies (preemption, walltime, a failed node) is not
        replaced without --adapt, so without this check the run would wait forever.
        """
        from distributed import wait

        pending = set(futures)
        alone_since = None
        while pending:
            try:
                done, pending = wait(pending, timeout=poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            yield from done
            if done or self.client.scheduler_info().get("workers"):
                alone_since = None
                continue
            alone_since = alone_since or time.monotonic()
            if time.monotonic() - alone_since > self.spec.worker_timeout:
                raise WorkersLost(self.spec.worker_timeout)

    def capacities(self, device: str) -> dict:
        """Each worker's device, memory limit, free GPU memory and threads ({address: {...}})."""
        from ..workflow.resources import worker_capacity

        return self.client.run(worker_capacity, device)


class WorkersLost(RuntimeError):
    """Every worker left and none came back within the worker time-out."""

    def __init__(self, waited: float):
        super().__init__(f"no worker for {waited:.0f} s")
        self.waited = waited


@contextlib.contextmanager
def open_runner(spec: ClusterSpec):
    """Start what ``spec`` asks for, yield a runner, and stop it again (cancelling batch jobs)."""
    if not spec.distributed:
        yield ThreadRunner(spec)
        return
    with cluster_config(spec.cluster_config):
        from .start import start_cluster

        with contextlib.ExitStack() as started:
            with setup_step(spec.out, starting_words(spec), done="The first worker was ready"):
                client, cluster, description = started.enter_context(start_cluster(spec))
            if client.dashboard_link:
                say(spec, f"Dask dashboard: {client.dashboard_link}")
            yield DistributedRunner(client, cluster, spec, description)


def starting_words(spec: ClusterSpec) -> str:
    """What starting the cluster involves, said before it starts (a batch queue may take minutes)."""
    if spec.scheduler.startswith("tcp://"):
        return f"Connecting to the Dask scheduler at {spec.scheduler} and waiting for a worker"
    if spec.scheduler == "local":
        return "Starting a local Dask cluster"
    return (f"Submitting worker jobs to {spec.scheduler.upper()} and waiting for the first to start "
            f"(at most {spec.worker_timeout:g} s, --worker-timeout)")
