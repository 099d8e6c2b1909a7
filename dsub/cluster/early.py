"""A local cluster started beside the coordinator's input checks (``--scheduler local``).

A ``LocalCluster`` of GPU workers takes seconds to start (processes spawned,
Dask, CuPy and CUDA loaded: 4 s on a 2-GPU host), and the coordinator's input
checks take as long on a cold disk (2 s: the star, the maps, the stacks'
headers). Neither needs the other, so for ``local`` the cluster starts first, in
a thread, and the run takes it up once its checks are done
(``open_runner(spec, early)``). Batch schedulers are not started early: a job
submitted for a run that its checks then refuse would wait in the queue for
nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time

from .config import cluster_config, load_cluster_config, load_dask_jobqueue
from .progress import REPORT_STEP_AFTER_S

#: Seconds a run that stops waits for a cluster start still under way before it leaves it behind.
STOP_WAIT_S = 15.0

#: ClusterSpec fields that decide the cluster itself (not how its progress is shown).
_CLUSTER_FIELDS = ("scheduler", "workers", "adapt", "cluster_config", "worker_timeout", "dashboard_address",
                   "interface", "secure", "device")


def start_early(spec) -> "EarlyCluster | None":
    """Start ``spec``'s local cluster in a thread now, saying so; None where ``spec`` is not ``local``."""
    if spec.scheduler != "local":
        return None
    return start_in_a_thread(spec, "Starting a local Dask cluster beside the input checks ...")


def start_in_a_thread(spec, announcement: str) -> "EarlyCluster":
    """``spec``'s local cluster started in a thread now, after the few-cores note (if any) and
    ``announcement``: beside the input checks (``start_early``), or for a run that takes it up at once
    (``runner.open_runner``). The cluster's making blocks SIGINT in the thread that makes it
    (``ctrl_c.workers_ignore_ctrl_c``), so the main thread, which waits, keeps taking Ctrl-C."""
    note = _ready_for_a_thread(spec)
    for line in (note, announcement) if note is not None else (announcement,):
        print(line, file=spec.out, flush=True)
    return EarlyCluster(spec)


def _ready_for_a_thread(spec) -> str | None:
    """What the main thread does before a cluster starts in another; returns the few-cores note, if any."""
    if spec.cluster_config is not None:
        load_cluster_config(spec.cluster_config)  # a bad file is refused now, not after the checks
        # dask-jobqueue (which cluster_config loads for its defaults) sets a signal handler as it is
        # imported: only the main thread may do that.
        load_dask_jobqueue()
    # Dask's distributed is imported here, before the thread: a Ctrl-C that stops this thread in the middle
    # of an import can leave that module's import lock held, and the thread, importing the same modules
    # at the same time, would wait on it for ever.
    from . import start
    # In the main thread, before the cluster exists: a run stopped while it starts leaves it to the exit.
    start.close_clusters_quietly_at_exit()
    return start.few_cores_note(spec)


class EarlyCluster:
    """A ``start.start_cluster`` entered in a thread; taken up by ``runner()``, or stopped by ``stop()``.

    What the start raises (no worker in time, a port in use) is raised where
    the run takes the cluster up, as if it had started there.
    """

    def __init__(self, spec):
        self.spec = spec
        self.started = time.monotonic()
        self.ready_after: float | None = None  # seconds from the start to the first worker
        self._context = None
        self._entered = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False  # stop() gave up waiting: the thread closes what it started
        self._thread = threading.Thread(target=self._start, name="dsub-cluster-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from .start import start_cluster

        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(cluster_config(self.spec.cluster_config))
                self._entered = stack.enter_context(start_cluster(self.spec))
                with self._lock:
                    if not self._abandoned:  # else leaving this block closes the cluster, here
                        self._context = stack.pop_all()
            self.ready_after = time.monotonic() - self.started
        except BaseException as exc:  # noqa: BLE001 -- raised again where the run takes the cluster up
            self._error = exc

    def serves(self, spec) -> bool:
        """Whether this cluster is the one ``spec`` asks for."""
        return all(getattr(spec, name) == getattr(self.spec, name) for name in _CLUSTER_FIELDS)

    @contextlib.contextmanager
    def runner(self, spec):
        """Wait for the cluster, say when its first worker was ready, yield a ``DistributedRunner``; stop it after."""
        from .runner import DistributedRunner, say

        waited = time.monotonic()
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        try:
            client, cluster, description = self._entered
            if self.ready_after >= REPORT_STEP_AFTER_S:
                waiting = time.monotonic() - waited
                ahead = self.ready_after - waiting >= 0.05  # started before the run took it up
                say(spec, f"The first worker was ready in {self.ready_after:.1f} s"
                          f"{f' (the run waited {waiting:.1f} s for it)' if waiting >= 0.05 and ahead else ''}")
            if client.dashboard_link:
                say(spec, f"Dask dashboard: {client.dashboard_link}")
            yield DistributedRunner(client, cluster, spec, description)
        finally:
            self.stop()

    def stop(self, wait: float = STOP_WAIT_S) -> None:
        """Stop the cluster; nothing where it is stopped already or never started.

        Waits at most ``wait`` seconds for a start still under way (a run refused
        or interrupted meanwhile must not hang on it: a worker time-out may be
        minutes); past that the start is abandoned, and its thread stops the
        cluster once it has one (or the process's exit ends them both).
        """
        with self._lock:
            if self._abandoned:  # an earlier stop left the start to its thread: nothing to wait for again
                return
        self._thread.join(timeout=wait)
        with self._lock:
            if self._thread.is_alive():
                self._abandoned = True
                return
            context, self._context = self._context, None
        if context is not None:
            context.close()
