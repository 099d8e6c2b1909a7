"""Runners: run Dask delayed tasks with a progress bar on the chosen scheduler.

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


class ThreadRunner:
    """Dask's threaded (or synchronous) scheduler in this process."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.workers = spec.workers or (os.cpu_count() or 1)
        self.description = f"{spec.scheduler} scheduler, {self.workers if spec.scheduler == 'threads' else 1} thread(s)"

    def compute(self, tasks, label: str):
        if not tasks:
            return []
        kwargs = {"scheduler": self.spec.scheduler}
        if self.spec.scheduler == "threads":
            kwargs["num_workers"] = self.workers
        if not self.spec.progress:
            return list(dask.compute(*tasks, **kwargs))
        from dask.diagnostics import ProgressBar

        say(self.spec, f"{label}: {len(tasks)} tasks")
        with ProgressBar(dt=0.5, out=self.spec.out):
            return list(dask.compute(*tasks, **kwargs))

    def capacities(self, device: str) -> None:
        """No separate workers: the machine itself is checked before the run."""
        return None


class DistributedRunner:
    """A distributed Client on a cluster dsub started (or an existing scheduler)."""

    def __init__(self, client, cluster, spec: ClusterSpec, description: str):
        self.client, self.cluster, self.spec, self.description = client, cluster, spec, description
        self.workers = len(client.scheduler_info().get("workers", {}))

    def compute(self, tasks, label: str):
        if not tasks:
            return []
        futures = self.client.compute(tasks)
        order = {future.key: index for index, future in enumerate(futures)}
        results = [None] * len(futures)
        progress = None
        if self.spec.progress:
            from tqdm import tqdm

            progress = tqdm(total=len(futures), desc=label, unit="task", file=self.spec.out)
        try:
            for future in self.completed(futures):
                results[order[future.key]] = future.result()  # re-raises a task's exception here
                if progress is not None:
                    progress.update()
        except BaseException:
            self.client.cancel(futures)
            raise
        finally:
            if progress is not None:
                progress.close()
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

        with start_cluster(spec) as (client, cluster, description):
            if client.dashboard_link:
                say(spec, f"Dask dashboard: {client.dashboard_link}")
            yield DistributedRunner(client, cluster, spec, description)
