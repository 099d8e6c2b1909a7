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
from .addresses import check_dashboard_address, check_interface
from .config import cluster_config, scheduler_address_configured
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
            raise OptionError(f"--worker-timeout must be positive (seconds), not {self.worker_timeout:g}")
        if self.scheduler in ("local", "slurm", "pbs"):  # they start a scheduler (and its dashboard) here
            check_dashboard_address(self.dashboard_address)
            # A batch cluster's scheduler listens on --interface too, unless its config gives it its own.
            if self.interface is not None and not (self.scheduler != "local" and scheduler_address_configured(
                    self.cluster_config, self.scheduler)):
                check_interface(self.interface)

    @property
    def distributed(self) -> bool:
        return self.scheduler not in ("threads", "sync")


def parse_adapt(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) for adaptive scaling."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise OptionError(f"--adapt takes MIN:MAX (e.g. 1:8), not {text!r}") from None
    if not 1 <= low <= high:
        # MIN 0 would never start a worker: Dask adds workers for tasks waiting, and dsub hands out
        # the chunks once a first worker has joined (it asks the workers' memory and device first).
        raise OptionError(f"--adapt needs 1 <= MIN <= MAX (dsub waits for a first worker before it hands out "
                          f"the chunks), not {text!r}")
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


def set_up_of(result, elapsed: float) -> float:
    """Seconds of a finished task's phase (``elapsed`` so far) that its rate leaves out.

    A result that reports ``work_seconds`` (the timed part of a phase of one
    task, the sample fit) was setting up for all the rest: on a cluster that is
    where the worker starts, imports dsub and prepares its maps before (or
    beside) the task, none of which the task itself can time. Otherwise its own
    ``set_up_seconds``, or 0.
    """
    work = getattr(result, "work_seconds", None)
    if work is not None:
        return max(0.0, elapsed - float(work))
    return float(getattr(result, "set_up_seconds", 0.0))


#: Tasks submitted and not yet finished, per thread of the workers (at least ``MIN_IN_FLIGHT``):
#: enough to keep every thread busy, while the graph in flight stays small whatever the run's size.
IN_FLIGHT_PER_THREAD = 4
MIN_IN_FLIGHT = 8


def task_sizes(tasks, sizes):
    """(tasks, sizes as a list): ``tasks`` may be any iterable when ``sizes`` gives its length."""
    if sizes is None:
        tasks = list(tasks)
        return tasks, [1] * len(tasks)
    return tasks, list(sizes)


class _Runner:
    """What both runners share: each phase's figures (tasks, particles, seconds) for the run record.

    ``compute(tasks, label, sizes, waiting, on_result, unit)`` runs Dask delayed
    ``tasks`` (a list, or any iterable -- a generator builds each task only when it
    is submitted -- with ``sizes`` giving one entry per task) in bounded waves:
    never more than ``in_flight_limit()`` submitted and unfinished, so neither the
    graph nor the data submitted grows with the run. Returns the results in the
    order of ``tasks``. ``sizes``: particles per task (for particles/s);
    ``waiting``: what happens before the first task finishes; ``on_result(result)``
    is called as each task finishes, in the order they finish, and what it
    returns is kept in the result's place; ``unit``: what a
    task is, for the progress lines. A result with ``set_up_seconds`` has that
    time left out of the phase's rate; one with ``work_seconds`` (the sample
    fit's ``SampleFit``, a phase of one task) has all the rest of the phase's
    time until it finished left out (``set_up_of``). The first task that fails stops the phase:
    tasks not yet started are cancelled and its exception is raised.
    """

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.phases: dict[str, PhaseRate] = {}
        self.in_flight_peak = 0  # the most tasks submitted and unfinished at once, over all phases

    def _finish(self, progress: Progress | None, label: str, sizes, started: float, unit: str,
                set_up: float = 0.0) -> None:
        rate = progress.close(completed=sys.exc_info()[0] is None) if progress is not None else None
        self.phases[label] = rate or PhaseRate(label, len(sizes), sum(sizes), time.monotonic() - started, unit,
                                               set_up)

    def _result_of(self, handle):
        """A finished handle's result (its task's exception raised here)."""
        return handle.result()

    def _run_waves(self, tasks, sizes, label, waiting, on_result, unit, submit, next_done, cancel):
        """The bounded-wave loop both runners share (see the class docstring).

        ``submit(list of tasks)`` -> handles; ``next_done(set of handles)`` yields
        finished handles (removing them from the set), each giving its result
        through ``handle.result()``; ``cancel(set of handles)`` on failure.
        """
        tasks, sizes = task_sizes(tasks, sizes)
        if not sizes:
            return []
        results = [None] * len(sizes)
        remaining = iter(enumerate(tasks))
        pending: set = set()
        order: dict = {}
        started = time.monotonic()
        set_up = [0.0]  # what the tasks reported as their set-up (``set_up_seconds`` of a result)
        progress = start_progress(self.spec, label, sizes, waiting, unit)

        def top_up():
            batch = []
            for _ in range(self.in_flight_limit() - len(pending)):
                item = next(remaining, None)
                if item is None:
                    break
                batch.append(item)
            if batch:
                for (index, _), handle in zip(batch, submit([task for _, task in batch])):
                    order[handle] = index
                    pending.add(handle)
            self.in_flight_peak = max(self.in_flight_peak, len(pending))

        try:
            top_up()
            for handle in next_done(pending):
                index = order.pop(handle)
                results[index] = self._result_of(handle)  # re-raises a task's exception here
                spent = set_up_of(results[index], time.monotonic() - started)
                set_up[0] += spent
                if progress is not None:
                    progress.task_done(index, spent)
                if on_result is not None:
                    results[index] = on_result(results[index])
                top_up()
        except BaseException:
            cancel(pending)
            raise
        finally:
            self._finish(progress, label, sizes, started, unit, set_up[0])
        return results


class _Done:
    """A task run at once in this thread (``sync``): its result, or the exception it raised."""

    def __init__(self, task):
        try:
            self.value, self.error = _compute_here(task), None
        except Exception as exc:  # noqa: BLE001 -- re-raised by result(), as a future would
            self.value, self.error = None, exc

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


#: Most tasks that feed one GPU at once (reading and writing around it): more threads only compete
#: with the GPU's own thread for the interpreter lock (one H200, box 256: a GPU turn took 14 ms with
#: 8 task threads and 48 ms with 16; BENCHMARKS.md).
GPU_TASK_THREADS = 8  # the threads scheduler's, and each GPU worker's of a local cluster (``start.local_layout``)


def threaded_scheduler_threads(spec: ClusterSpec) -> int:
    """Task threads of the ``threads`` scheduler: ``--workers``; else one per core, at most
    ``GPU_TASK_THREADS`` where the tasks compute on a GPU (``spec.device``: cpu, gpu or auto)."""
    if spec.workers:
        return spec.workers
    cores = os.cpu_count() or 1
    if spec.device == "cpu":
        return cores
    from ..physics.backend import gpu_available

    return min(cores, GPU_TASK_THREADS) if spec.device == "gpu" or gpu_available() else cores


class ThreadRunner(_Runner):
    """Threads of this process (``threads``), or this thread alone (``sync``)."""

    def __init__(self, spec: ClusterSpec):
        super().__init__(spec)
        self.workers = threaded_scheduler_threads(spec)
        self.description = f"{spec.scheduler} scheduler, {self.workers if spec.scheduler == 'threads' else 1} thread(s)"

    def in_flight_limit(self) -> int:
        if self.spec.scheduler != "threads":
            return 1
        return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * self.workers)

    def compute(self, tasks, label: str, sizes=None, waiting: str | None = None, on_result=None,
                unit: str = "chunks"):
        """Run delayed ``tasks`` here, at most ``in_flight_limit()`` built at once; see ``_Runner``."""
        if self.spec.scheduler != "threads":
            return self._run_waves(tasks, sizes, label, waiting, on_result, unit,
                                   lambda batch: [_Done(task) for task in batch], _drain, lambda pending: None)
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        def next_done(pending):
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=order_of_submission.get):
                    pending.discard(future)  # one at a time: a slot frees when its result is handed over
                    yield future

        order_of_submission: dict = {}

        def submit(batch):
            futures = [pool.submit(_compute_here, task) for task in batch]
            for future in futures:
                order_of_submission[future] = len(order_of_submission)
            return futures

        def cancel(pending):
            for future in pending:
                future.cancel()

        with ThreadPoolExecutor(self.workers, thread_name_prefix="dsub-task") as pool:
            return self._run_waves(tasks, sizes, label, waiting, on_result, unit, submit, next_done, cancel)

    def capacities(self, device: str) -> None:
        """No separate workers: the machine itself is checked before the run."""
        return None

    def start_on_each_worker(self, function, *args) -> None:
        """Nothing to start: the tasks run in this process (``DistributedRunner.start_on_each_worker``)."""


def _compute_here(task):
    """One delayed task, computed in the calling thread.

    Dask's synchronous scheduler given as the function itself: named ("sync"),
    Dask first imports distributed to look for a client (0.1-0.5 s, in the
    threads scheduler's first task).
    """
    from dask.local import get_sync

    return dask.compute(task, scheduler=get_sync)[0]


def _drain(pending: set):
    """Finished handles of ``pending`` (all of them: ``sync`` runs each task as it is submitted)."""
    while pending:
        yield pending.pop()


class DistributedRunner(_Runner):
    """A distributed Client on a cluster dsub started (or an existing scheduler)."""

    def __init__(self, client, cluster, spec: ClusterSpec, description: str):
        super().__init__(spec)
        self.client, self.cluster, self.description = client, cluster, description
        self._fetched: dict = {}  # finished futures -> their results, fetched as they finished
        self._started: list = []  # start_on_each_worker's futures, held while the run goes on
        self.workers = len(client.scheduler_info().get("workers", {}))

    def in_flight_limit(self) -> int:
        """``IN_FLIGHT_PER_THREAD`` per thread of the workers connected now (at least ``MIN_IN_FLIGHT``)."""
        workers = self.client.scheduler_info().get("workers", {})
        threads = sum(int(info.get("nthreads", 1)) for info in workers.values())
        return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * threads)

    def compute(self, tasks, label: str, sizes=None, waiting: str | None = None, on_result=None,
                unit: str = "chunks"):
        """Run delayed ``tasks`` on the cluster's workers in bounded waves; see ``_Runner``."""
        results = self._run_waves(tasks, sizes, label, waiting, on_result, unit, self.client.compute,
                                  self.completed, lambda pending: self.client.cancel(list(pending)))
        self.workers = len(self.client.scheduler_info().get("workers", {}))
        return results

    def completed(self, pending: set, poll: float = 2.0):
        """Yield futures of ``pending`` as they finish (removing them; the caller may add more meanwhile);
        stop with ``WorkersLost`` when no worker is left for too long.

        A batch job that dies (preemption, walltime, a failed node) is replaced
        (``start``: the jobs are held at their number), but where none comes
        back (a queue that no longer runs the job) the run would otherwise wait
        forever. Workers that leave are said at once (``workers_left_line``).
        """
        from distributed import wait

        alone = _Alone(self.client, self.spec.worker_timeout)
        known = self._worker_addresses()
        while pending:
            try:
                done, _ = wait(list(pending), timeout=poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            now = self._worker_addresses()
            lost = workers_lost(known, now, self.spec)
            if lost:
                say(self.spec, workers_left_line(lost, len(now), self.spec))
            known = now
            for future in done:
                pending.discard(future)  # one at a time: a slot frees when its result is handed over
                self._fetched[future] = self._fetch(future, poll, alone)
                yield future
            if done:
                alone.reset()
            else:
                alone.check()

    def _worker_addresses(self) -> set:
        return set(self.client.scheduler_info().get("workers", {}))

    def _fetch(self, future, poll: float, alone: "_Alone"):
        """The result of a finished future, waiting while it is recomputed; ``WorkersLost`` if no worker is left.

        A result lives on the worker that computed it: when that worker is lost
        before the result is fetched, the future goes back to pending and is
        computed again, which never happens once every worker is gone.
        """
        while True:
            try:
                return future.result(timeout=poll)
            except TimeoutError:
                alone.check()
            except Exception as exc:
                exc.failed_on = failed_on(self.client, future.key)  # named in the error line (resources)
                raise

    def _result_of(self, handle):
        return self._fetched.pop(handle)

    def capacities(self, device: str) -> dict:
        """Each worker's device, memory limit, free GPU memory and threads ({address: {...}})."""
        from ..workflow.resources import worker_capacity

        return self.client.run(worker_capacity, device)

    def start_on_each_worker(self, function, *args) -> None:
        """Start ``function(*args)`` once on every worker connected now, and go on without waiting.

        For what each worker would otherwise do on its first task (preparing the
        maps): the workers do it at once, while the coordinator goes on. Its
        results and errors are not read (a failure there comes back from the
        first task that needs the same work); workers that join later do it on
        their first task.
        """
        workers = sorted(self.client.scheduler_info().get("workers", {}))
        self._started = [self.client.submit(function, *args, workers=[address], allow_other_workers=False,
                                            pure=False) for address in workers]  # held: released futures are cancelled


@dataclass(frozen=True)
class FailedOn:
    """Where a task's exception was raised: the task that raised it (its Dask key) and the worker it ran on."""

    task: str
    worker: str | None

    def happened(self, what: str) -> str:
        """``worker tcp://10.0.0.7:4242 {what} while computing subtract-chunk-00012`` ("a worker" where unknown)."""
        return f"{'worker ' + self.worker if self.worker else 'a worker'} {what} while computing {self.task}"


def failed_on(client, key) -> FailedOn:
    """Which task raised the exception of the future ``key``, and on which worker, as the scheduler recorded it.

    The scheduler keeps, for an erred task, the task that raised first
    (``TaskState.exception_blame``: the future's own task, or the one it waits
    on) and the workers it erred on (``erred_on``). Asked of the scheduler
    after the failure; where that fails (the scheduler gone), only the key is known.
    """
    def erred_on(dask_scheduler, key=key):
        task = dask_scheduler.tasks.get(key)
        blamed = (getattr(task, "exception_blame", None) or task) if task is not None else None
        if blamed is None:
            return str(key), []
        return str(blamed.key), sorted(getattr(blamed, "erred_on", None) or ())

    try:
        task, workers = client.run_on_scheduler(erred_on)
    except Exception:  # noqa: BLE001 -- the error being reported matters, not this question
        return FailedOn(str(key), None)
    return FailedOn(task, ", ".join(workers) or None)


def workers_lost(before: set, now: set, spec: ClusterSpec) -> int:
    """How many of the workers at ``before`` (their addresses) are gone ``now``, as a loss to say: any with a
    fixed number of workers, even where a new one has taken its place (a local nanny restarts a killed
    worker process within a second, on a new address); with ``--adapt``, only once fewer than its minimum
    are left (above it, workers retired as the work runs out)."""
    gone = len(set(before) - set(now))
    return gone if spec.adapt is None or len(now) < spec.adapt[0] else 0


def workers_left_line(lost: int, left: int, spec: ClusterSpec) -> str:
    """The line said as soon as ``lost`` Dask workers leave a run (``left`` remain): what happens next."""
    if spec.scheduler in ("slurm", "pbs"):
        then = "a new worker job is asked for in place of each"
    elif spec.scheduler == "local":
        then = "the local cluster starts new worker processes"
    else:
        then = "the scheduler's other workers take their chunks"
    wait = (f"; with none left the run waits up to {spec.worker_timeout:.0f} s (--worker-timeout) for one"
            if not left else "")
    return (f"dsub: {lost} Dask worker{'s' if lost != 1 else ''} left the run ({left} remain{'s' if left == 1 else ''}): "
            f"their unfinished chunks run again, and {then}{wait}.")


class _Alone:
    """How long a client has had no worker: ``check`` raises ``WorkersLost`` past the worker time-out."""

    def __init__(self, client, timeout: float):
        self.client, self.timeout, self.since = client, timeout, None

    def reset(self) -> None:
        self.since = None

    def check(self) -> None:
        if self.client.scheduler_info().get("workers"):
            self.since = None
            return
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since > self.timeout:
            raise WorkersLost(self.timeout)


class WorkersLost(RuntimeError):
    """Every worker left and none came back within the worker time-out."""

    def __init__(self, waited: float):
        super().__init__(f"no worker for {waited:.0f} s")
        self.waited = waited


@contextlib.contextmanager
def open_runner(spec: ClusterSpec, early=None):
    """Start what ``spec`` asks for, yield a runner, and stop it again (cancelling batch jobs).

    ``early``: an ``early.EarlyCluster`` started beside the input checks; taken up
    where it is the cluster ``spec`` asks for, else stopped and a cluster started here.
    """
    if not spec.distributed:
        yield ThreadRunner(spec)
        return
    if early is not None:
        if early.serves(spec):
            with early.runner(spec) as runner:
                yield runner
            return
        early.stop()
    if spec.scheduler == "local":  # made in a thread of its own: this one keeps taking Ctrl-C meanwhile
        from .early import start_in_a_thread

        with start_in_a_thread(spec, f"{starting_words(spec)} ...").runner(spec) as runner:
            yield runner
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
