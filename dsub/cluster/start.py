"""Starting and stopping the Dask clusters dsub runs on."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import dask

from .. import fork_server
from ..errors import DsubError, out_of_memory, warn
from .ctrl_c import workers_ignore_ctrl_c
from .dashboard import dashboard_on_request
from .affinity import format_cpu_list, gpu_cpus
from .gpus import PinnedGPUCluster, visible_gpus
from .runner import GPU_TASK_THREADS


class NoWorkersError(DsubError, TimeoutError):
    """No worker joined the scheduler in time."""


class ClusterStartError(DsubError, RuntimeError):
    """Dask could not start the cluster's scheduler (an address it cannot listen on, an unknown interface)."""


#: How distributed's ``SpecCluster`` words any failure of its scheduler's start.
DASK_START_FAILURE = "Cluster failed to start:"


#: How distributed words a local worker's failed start (``Server.start``: ``f"{type(self).__name__} failed to
#: start."``), the worker's own error chained as the cause.
WORKER_START_FAILURES = ("Nanny failed to start", "Worker failed to start")


@contextlib.contextmanager
def dask_start_errors(spec):
    """Turn distributed's ``RuntimeError("Cluster failed to start: ...")`` into one line quoting Dask's reason,
    and a local worker's failed start (``WORKER_START_FAILURES``) into one line naming the worker's own error:
    running out of memory, threads or address space (``ulimit -v``) says what to raise."""
    try:
        yield
    except RuntimeError as exc:
        said = " ".join(str(exc).split())
        if said.startswith(WORKER_START_FAILURES):
            root = exc
            while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
                root = root.__cause__ or root.__context__
            why = " ".join(str(root).split()) or type(root).__name__
            if out_of_memory(root) or root is exc:
                raise ClusterStartError(
                    f"a local Dask worker failed to start ({why}): it ran out of memory, threads or address space "
                    "as it started, or was stopped. Raise 'ulimit -v' (mapped libraries and thread stacks count "
                    "against it) or 'ulimit -u', or give the command more memory, and rerun the same command."
                ) from exc
            raise ClusterStartError(f"a local Dask worker failed to start: {type(root).__name__}: {why}. "
                                    "Rerun the same command; if it happens again, run with --scheduler threads.") from exc
        if not said.startswith(DASK_START_FAILURE):
            raise
        reason = said[len(DASK_START_FAILURE):].strip() or type(exc.__cause__).__name__
        where = "in the cluster config (its interface and scheduler-options) or " if spec.cluster_config else ""
        raise ClusterStartError(
            f"the {spec.scheduler} Dask cluster failed to start; Dask says: {reason}. Check the network settings "
            f"{where}of --interface and --dashboard-address (127.0.0.1:0 takes any free port of this machine)."
        ) from exc


@contextlib.contextmanager
def start_cluster(spec):
    """Yield (client, cluster or None, description) for ``spec.scheduler``; always clean up."""
    from distributed import Client

    quiet_lost_results()
    close_clusters_quietly_at_exit()
    if spec.scheduler.startswith("tcp://"):
        try:
            probe_scheduler(spec.scheduler)
            client = Client(spec.scheduler, timeout=min(spec.worker_timeout, 30))
        except OSError as exc:
            raise DsubError(f"cannot reach the Dask scheduler at {spec.scheduler}: {' '.join(str(exc).split())}. "
                            "Check that it is running and that this machine can reach that address and port "
                            "(dask scheduler prints it as it starts).") from exc
        try:
            wait_for_workers(client, None, spec, "the existing scheduler's workers")
            yield client, None, f"scheduler {spec.scheduler}"
        finally:
            client.close()
        return

    with quiet_submission_errors():
        yield from _start_own_cluster(spec, Client)


def _start_own_cluster(spec, Client):
    if spec.scheduler == "local":
        with dask_start_errors(spec):
            cluster, description = local_cluster(spec)
    else:
        require_batch_commands(spec.scheduler)
        cluster, description = batch_cluster(spec), f"{spec.scheduler} jobs"
        try:
            preflight(cluster, spec)
        except BaseException:
            stop_cluster(cluster)
            raise
    try:
        if spec.scheduler == "local":
            cluster.dsub_dashboard = dashboard_on_request(cluster)
        client = Client(cluster)
        try:
            if spec.adapt is not None and spec.scheduler == "local":
                cluster.adapt(minimum=spec.adapt[0], maximum=spec.adapt[1])
            elif spec.adapt is not None:
                cluster.adapt(minimum_jobs=spec.adapt[0], maximum_jobs=spec.adapt[1])
            elif spec.scheduler != "local":
                # Held at that many jobs: one that is preempted, hits its walltime or loses its node is
                # replaced (a plain scale() would leave the run a worker short for good).
                jobs = spec.workers or 1
                cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
            wait_for_workers(client, cluster, spec, description)
            yield client, cluster, description
        finally:
            client.close()
    finally:
        stop_cluster(cluster)


#: Seconds a first plain TCP connection to an existing scheduler may take before Dask's own wait takes over.
PROBE_TIMEOUT_S = 3.0

#: Seconds the exit-time close of a cluster still open may take (distributed's ``close_clusters`` gives 10).
CLOSE_AT_EXIT_S = 10.0
#: Seconds a worker process left at exit is given to end after SIGTERM, before SIGKILL.
WORKER_EXIT_S = 3.0


def close_clusters_at_exit() -> None:
    """distributed's exit-time ``close_clusters``, never raising; then no local worker process is left.

    distributed closes every cluster still open as the interpreter exits
    (``distributed.deploy.spec.close_clusters``, an ``atexit`` handler). A run
    stopped while a local cluster starts (SIGTERM to its process group, which also
    kills the workers being spawned) can leave one whose close ends in
    ``asyncio.CancelledError``, which distributed's ``sync`` does not catch: it
    raised ``UnboundLocalError`` there, and Python printed that traceback after
    dsub's stop line. Here any error of a close is dropped, and the worker
    processes still running are ended, SIGTERM then SIGKILL: multiprocessing's
    daemonic children (a local cluster's nannies spawn their workers so), which
    multiprocessing's own exit-time handler would terminate but not kill.
    """
    import asyncio
    import multiprocessing

    from distributed.core import Status
    from distributed.deploy.spec import SpecCluster

    from distributed.nanny import Nanny

    for cluster in list(SpecCluster._instances):
        if getattr(cluster, "shutdown_on_close", False) and getattr(cluster, "status", Status.closed) != Status.closed:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                cluster.close(timeout=CLOSE_AT_EXIT_S)
        # A nanny whose close was cut short restarts its worker when the lines below end it: spawned as this
        # process exits, the new one found its parent's pipe empty and printed an EOFError traceback. A nanny
        # marked closing restarts nothing (``Nanny._on_worker_exit``); its own close has been tried above.
        for worker in list(getattr(cluster, "workers", {}).values()):
            if isinstance(worker, Nanny) and worker.status != Status.closed:
                worker.status = Status.closing
    children = [child for child in multiprocessing.active_children() if child.daemon]  # as multiprocessing ends
    for child in children:
        with contextlib.suppress(Exception):
            child.terminate()
    for child in children:
        with contextlib.suppress(Exception):
            child.join(WORKER_EXIT_S)
            if child.is_alive():
                child.kill()
                child.join(WORKER_EXIT_S)


def close_clusters_quietly_at_exit() -> None:
    """Put ``close_clusters_at_exit`` in place of distributed's own exit-time handler (once distributed is loaded).

    Registered again on each call, it runs before the handlers registered
    earlier: multiprocessing's, which reaps the processes it leaves, among them.
    """
    import atexit

    from distributed.deploy import spec

    atexit.unregister(spec.close_clusters)
    atexit.unregister(close_clusters_at_exit)
    atexit.register(close_clusters_at_exit)


def probe_scheduler(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``OSError`` at once where a ``tcp://`` scheduler's port refuses (or its host is unknown).

    Dask's ``Client`` retries such an address until its time-out (30 s), as it
    would a scheduler still starting; a refused port answers at once. A probe
    that only times out (a firewall dropping packets, a slow network) proves
    nothing: Dask's wait goes on.
    """
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError:  # no port: what Dask makes of it is Dask's to say
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return
    except ConnectionRefusedError:
        raise ConnectionRefusedError(f"nothing listens on port {port} of {host} (connection refused)") from None
    except socket.gaierror as exc:
        raise OSError(f"the host {host} is not known to this machine ({exc.strerror})") from None


@contextlib.contextmanager
def quiet_submission_errors():
    """dask-jobqueue logs a failed sbatch/qsub with a traceback; dsub reports it itself."""
    logger = logging.getLogger("tornado.application")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


#: Loggers of this process that report, with tracebacks, a result lost with its worker while it was
#: fetched: the scheduler's "Couldn't gather keys" and the fetch abandoned when the run stops (asyncio's
#: "Task exception was never retrieved", at exit). dsub says what happened in one line (``WorkersLost``).
LOST_RESULT_LOGGERS = ("distributed.scheduler", "distributed.client", "asyncio")


def quiet_lost_results() -> None:
    """Keep the coordinator's log to dsub's own lines when workers are lost (for the rest of the process)."""
    for name in LOST_RESULT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def stop_cluster(cluster) -> None:
    """Close a cluster; if that fails (a job that never started), cancel the batch jobs directly."""
    try:
        cluster.close()
    except Exception:  # distributed asserts on workers that never started; jobs must still go
        cancel = getattr(getattr(cluster, "job_cls", None), "cancel_command", None)
        submitted = job_ids(cluster)
        if cancel and submitted:
            subprocess.run([cancel, *submitted], capture_output=True, timeout=60)


#: The batch system's commands dsub runs: submitting and cancelling worker jobs, and reading the queue.
BATCH_COMMANDS = {"slurm": ("sbatch", "scancel", "squeue"), "pbs": ("qsub", "qdel", "qstat")}
#: What SLURM's commands say when its controller cannot be reached (not a refusal of the job).
UNREACHABLE = ("unable to contact slurm controller", "socket timed out", "connection refused",
               "zero bytes were transmitted", "communications connection failure")


def require_batch_commands(scheduler: str) -> None:
    """Refuse at once where the batch system's client commands are not on PATH (its jobs could never start).

    Raises ``DsubError`` naming the missing commands.
    """
    missing = [command for command in BATCH_COMMANDS.get(scheduler, ()) if shutil.which(command) is None]
    if missing:
        named = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise DsubError(
            f"--scheduler {scheduler}: {named} {'is' if len(missing) == 1 else 'are'} not on PATH, "
            f"and dsub submits and watches its worker jobs with {'it' if len(missing) == 1 else 'them'}. Run dsub "
            f"where {scheduler.upper() if scheduler == 'slurm' else 'PBS'}'s client commands work (a login node, "
            "or a batch job of the cluster), or add their folder to PATH.")


def sentence(text: str) -> str:
    """``text`` ending with a full stop (a batch system's words, then dsub's)."""
    text = text.strip()
    return text if not text or text[-1] in ".!?" else f"{text}."


def preflight(cluster, spec) -> None:
    """Ask SLURM whether it would run the worker job at all, before waiting for one."""
    if spec.scheduler != "slurm" or not shutil.which("sbatch"):
        return
    said = sbatch_test_only(cluster.job_script())
    if said is None:
        return
    if any(words in said.lower() for words in UNREACHABLE):
        raise DsubError(
            f"SLURM's controller did not answer sbatch --test-only: {sentence(said)} Check that SLURM is up "
            "and reachable from this machine (sinfo), then rerun; nothing was submitted.")
    # the memory asked for and the nodes' largest matter where SLURM refused the resources, not a name
    named = any(words in said.lower() for words in NAME_REFUSALS)
    resources = "" if named else f"{memory_asked(cluster, spec)}{largest_node_memory()}"
    raise DsubError(f"SLURM refuses the worker job: {sentence(said)}{resources} Check the partition and resources "
                    "in your cluster config (dsub job-script --scheduler slurm shows the job script).")


#: What sbatch says of a name in the job that does not exist (a partition, account or QOS): no resource refused.
NAME_REFUSALS = ("invalid partition", "invalid account", "invalid qos")


def largest_node_memory() -> str:
    """A sentence on the most memory a node of the configured partition has (``sinfo``), or '' where unknown."""
    partition = dask.config.get("jobqueue.slurm.queue", None)
    command = ["sinfo", "-h", "-o", "%m", *(["-p", str(partition)] if partition else [])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        sizes = [int(word.rstrip("+")) for word in result.stdout.split() if word.rstrip("+").isdigit()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""
    if result.returncode != 0 or not sizes:
        return ""
    where = f"partition {partition}" if partition else "this cluster"
    return f" The largest node of {where} has {max(sizes) / 1024:.0f} GB of memory (sinfo)."


def memory_asked(cluster, spec) -> str:
    """A sentence on the memory each worker job asks for against the run's estimate, for a refusal; '' if unknown."""
    from dask.utils import parse_bytes

    asked, needed = getattr(cluster, "dsub_memory", None), spec.worker_memory_bytes
    if not asked or not needed:
        return ""
    try:
        more = parse_bytes(asked) > 1.5 * needed
    except (ValueError, TypeError):
        return ""
    if more:
        return (f" Each job asks for {asked} of memory (the cluster config's memory), more than the "
                f"{needed / 1e9:.1f} GB this run needs of each worker job: a smaller memory fits more nodes.")
    return f" Each job asks for {asked} of memory, what this run needs of each worker job (see the estimate above)."


def sbatch_test_only(script: str) -> str | None:
    """What ``sbatch --test-only`` says against ``script`` if it refuses it, else None."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.sh"
        path.write_text(script)
        result = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).strip().replace("sbatch: error: ", "")


def local_layout(spec) -> tuple[int, int, list[str]]:
    """(worker processes, threads per worker, GPUs) of the LocalCluster for ``spec``."""
    gpus = visible_gpus()
    cores = os.cpu_count() or 1
    if gpus:
        workers = spec.workers or len(gpus)
        # The tasks take turns on their GPU (workflow.tasks.gpu_turn) while the others read and write:
        # threads beyond two only add reads and writes in flight, the GPU's memory stays one task's.
        threads = max(2, min(GPU_TASK_THREADS, cores // workers))
    else:
        workers = spec.workers or max(1, min(4, cores))
        threads = max(1, cores // workers)
    return workers, threads, gpus


#: Up to this many cores a local cluster of CPU workers costs more than it gains (``few_cores_note``).
FEW_CORES = 4


def few_cores_note(spec) -> str | None:
    """A line for a local cluster of CPU workers on a machine of ``FEW_CORES`` cores or fewer, else None.

    Each worker process starts its own Python, imports dsub and prepares its own
    maps, work that ``threads`` does once in this process; on two cores the
    demo's sample fit took 1.3-1.5 s against 0.5-0.7 s. GPUs are looked for only on such
    a machine (``visible_gpus`` imports CuPy): a local cluster of GPU workers is
    what a machine with GPUs should use.
    """
    cores = os.cpu_count() or 1
    if spec.scheduler != "local" or cores > FEW_CORES:
        return None
    if spec.device != "cpu" and visible_gpus():
        return None
    workers, _, _ = local_layout(spec)
    return (f"Note: on {cores} cores a local cluster of CPU workers costs more than it gains: each of its "
            f"{workers} worker process(es) starts Python and prepares its own maps; --scheduler threads runs "
            "the same tasks on every core and prepares the maps once, in this process.")


def local_cluster(spec):
    """A LocalCluster: one worker per visible GPU (pinned as it is spawned), else CPU worker processes.

    Each worker loads what its first task needs as it starts (``warm_up``, after
    the preloads of dask's config). Its scheduler starts without the dashboard,
    which ``dashboard.dashboard_on_request`` loads when it is first opened.
    """
    from distributed import LocalCluster
    from distributed.worker_memory import parse_memory_limit

    workers, threads, gpus = local_layout(spec)
    # LocalCluster's silence_logs quiets distributed's handlers only while it is open and restores them as it
    # closes; a worker's comm closing after that (a SIGTERM as the run stops) then logged an INFO line with a
    # traceback on the terminal. This process says what happens itself: distributed's records stay below it.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    if gpus:
        used = gpus[:max(1, workers)]  # worker i on GPU i modulo their count (``PinnedGPUCluster``)
        description = (f"local cluster, {workers} GPU worker(s) on GPU{'s' if len(used) > 1 else ''} {', '.join(used)}"
                       + (f", {threads} task thread(s) each" if workers else ""))
    else:
        description = f"local cluster, {workers} CPU worker(s) x {threads} thread(s)"
    options = dict(
        threads_per_worker=threads, processes=True,
        host=None if spec.interface else "127.0.0.1", interface=spec.interface,
        dashboard_address=spec.dashboard_address, silence_logs=logging.CRITICAL,
        # Its HTTP server listens at the address now; the dashboard is loaded when first opened (``dashboard``).
        scheduler_kwargs={"dashboard": False},
        # The machine's memory shared by the layout's workers (what LocalCluster does for n_workers).
        memory_limit=parse_memory_limit("auto", 1, max(1, workers), logger=logging.getLogger("distributed.worker")),
        **worker_preloads(),
        **security_options(spec),
    )
    if spec.adapt is not None:
        workers = spec.adapt[0]
    fork_server.use_in_dask()  # where the command started the fork server: every worker of the run forked from it
    # Its workers, spawned now and whenever the cluster adds or restarts one (from the threads made now),
    # leave Ctrl-C to the coordinator from their first instruction on, not only once their preload runs.
    if not gpus:
        with workers_ignore_ctrl_c():
            return LocalCluster(n_workers=workers, **options), description
    # CPU work on a GPU machine keeps every core: only GPU workers are kept beside their GPU.
    cpus = gpu_cpus(len(gpus)) if spec.device != "cpu" else [None] * len(gpus)
    if any(cpus):
        description += " (each kept on its GPU's CPUs: " + "; ".join(
            f"GPU {gpu} {format_cpu_list(c) if c else 'any'}" for gpu, c in zip(gpus, cpus)) + ")"
    with workers_ignore_ctrl_c():
        cluster = PinnedGPUCluster(gpus, warm_up_gpu=spec.device != "cpu", gpu_cpus=cpus, n_workers=0, **options)
    if workers:
        cluster.scale(workers)
    return cluster, description


def worker_preloads() -> dict:
    """``preload`` and ``preload_argv`` for a local cluster's workers: dask's configured ones, then ``warm_up``.

    As Dask reads them (``distributed.preloading.process_preloads``): a preload
    may be one name or a list; its arguments one list for every preload, or one
    list per preload, which then gets an empty one for dsub's.
    """
    preload = dask.config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.worker.preload-argv", None) or []
    if argv and all(isinstance(item, (list, tuple)) for item in argv):
        argv = [*map(list, argv), []]
    return {"preload": [*preload, "dsub.cluster.warm_up"], "preload_argv": list(argv)}


def security_options(spec) -> dict:
    """TLS with credentials made for this run only (``--secure``): nobody without them can connect."""
    if not spec.secure:
        return {}
    from distributed.security import Security

    return {"security": Security.temporary(), "protocol": "tls://"}


def batch_cluster(spec):
    """A dask-jobqueue cluster configured by dask's config (jobqueue.slurm / jobqueue.pbs)."""
    from .config import load_dask_jobqueue

    jobqueue = load_dask_jobqueue()
    cls = {"slurm": jobqueue.SLURMCluster, "pbs": jobqueue.PBSCluster}[spec.scheduler]
    options = {}
    if dask.config.get(f"jobqueue.{spec.scheduler}.cores", None) is None:
        options.update(cores=1)
    if dask.config.get(f"jobqueue.{spec.scheduler}.processes", None) is None:
        options.update(processes=1)  # one worker process per job: one GPU each
    options.update(job_resources(spec))
    scheduler_options = dict(dask.config.get(f"jobqueue.{spec.scheduler}.scheduler-options", None) or {})
    scheduler_options.setdefault("dashboard_address", spec.dashboard_address)  # loopback unless configured
    options.update(scheduler_options=scheduler_options)
    if spec.interface:
        options.update(interface=spec.interface)
    if spec.secure:
        # Workers read the run's certificates from a folder they share with the coordinator.
        options.update(security_options(spec))
        if dask.config.get(f"jobqueue.{spec.scheduler}.shared-temp-directory", None) is None:
            options.update(shared_temp_directory=os.getcwd())
    errors: list[str] = []
    try:
        with dask_start_errors(spec):
            cluster = cls(job_cls=recording_job_class(cls.job_cls, errors), **options)
    except (ValueError, TypeError) as exc:
        raise DsubError(f"cannot set up the {spec.scheduler} cluster: {exc}") from exc
    cluster.dsub_submit_errors = errors
    cluster.dsub_memory = options.get("memory") or dask.config.get(f"jobqueue.{spec.scheduler}.memory", None)
    return cluster


#: Host memory per worker job when neither the profile nor an estimate says.
DEFAULT_JOB_MEMORY = "8GB"
GPU_DIRECTIVES = ("--gres=gpu", "--gpus", "-G ", "--gpus-per-node", "--gpus-per-task")


def gpus_per_job(spec) -> int:
    """GPUs each worker job gets: 1 by default, 0 with --device cpu or ``dsub: {gpus-per-worker: 0}``.

    A profile that already asks for GPUs itself (``--gres``/``--gpus`` directives,
    ``ngpus``/``gpus`` in a PBS resource-spec) keeps its own request.
    """
    configured = dask.config.get("dsub.gpus-per-worker", None)
    if configured is not None:
        return int(configured)
    return 0 if getattr(spec, "device", "auto") == "cpu" else 1


def worker_device(spec) -> str:
    """What batch workers compute on: --device, else the profile's ``dsub: {worker-device: ...}``, else auto."""
    device = getattr(spec, "device", "auto")
    if device != "auto":
        return device
    return str(dask.config.get("dsub.worker-device", None) or "auto")


def profile_asks_for_gpus(scheduler: str) -> bool:
    if scheduler == "slurm":
        directives = dask.config.get("jobqueue.slurm.job-extra-directives", None) or []
        return any(text.strip().startswith(GPU_DIRECTIVES) for text in directives)
    spec = dask.config.get("jobqueue.pbs.resource-spec", None) or ""
    return "gpus=" in spec


def job_resources(spec) -> dict:
    """dask-jobqueue options for memory and GPUs: what the profile says, raised to what the run needs.

    ``spec.worker_memory_bytes`` (the estimate, from ``dsub.workflow.resources``)
    raises a smaller ``memory`` of the profile, with a notice: dask-jobqueue uses
    that figure both as the job's request and as the Dask worker's memory limit,
    so a smaller one only gets the worker killed. One GPU per job is added unless
    the profile asks for GPUs itself or ``gpus_per_job`` is 0.
    """
    from dask.utils import parse_bytes

    scheduler = spec.scheduler
    options = {}
    configured = dask.config.get(f"jobqueue.{scheduler}.memory", None)
    memory = configured or DEFAULT_JOB_MEMORY
    needed = getattr(spec, "worker_memory_bytes", None)
    if needed and parse_bytes(memory) < needed:
        raised = f"{math.ceil(needed / 1e9)}GB"  # whole GB: PBS takes integer sizes only
        if configured:
            from ..workflow.resources import usable_fraction

            fraction = usable_fraction()
            # One estimate: the request is the Memory: line's figure with Dask's headroom, said as such.
            warn(f"the cluster config gives each worker {memory}, less than the {needed / 1e9:.1f} GB this run "
                 f"asks of each worker job: the estimate of the Memory: line divided by {fraction:g}, since Dask "
                 f"pauses a worker at {fraction:.0%} of its memory limit. Each worker job asks for {raised} "
                 "instead")
        memory = raised
    if memory != configured:
        options.update(memory=memory)
    gpus = gpus_per_job(spec)
    resource_spec = dask.config.get(f"jobqueue.{scheduler}.resource-spec", None)
    if scheduler == "pbs" and resource_spec and "mem=" in resource_spec and memory != configured:
        resource_spec = re.sub(r"mem=[^:,+\s]+", f"mem={memory}", resource_spec)
        options.update(resource_spec=resource_spec)
    elif scheduler == "pbs" and resource_spec and resource_spec.startswith("nodes=") and "mem=" not in resource_spec:
        # Torque's nodes= spec holds no memory: the job asks for it in a -l line of its own (as --mem in SLURM),
        # else it gets the queue's default whatever the worker's limit says.
        directives = list(dask.config.get("jobqueue.pbs.job-extra-directives", None) or [])
        if not any("mem=" in directive for directive in directives):
            options.update(job_extra_directives=[*directives, f"-l mem={memory}"])
    if gpus and not profile_asks_for_gpus(scheduler):
        if scheduler == "slurm":
            directives = list(dask.config.get("jobqueue.slurm.job-extra-directives", None) or [])
            options.update(job_extra_directives=[*directives, f"--gres=gpu:{gpus}"])
        elif resource_spec:
            joiner = ":gpus=" if resource_spec.startswith("nodes=") else ":ngpus="
            options.update(resource_spec=f"{resource_spec}{joiner}{gpus}")
        else:  # dask-jobqueue's own default is PBS Pro's select syntax
            cores = dask.config.get("jobqueue.pbs.cores", None) or 1
            options.update(resource_spec=f"select=1:ncpus={cores}:ngpus={gpus}:mem={memory}")
    return options


def submission_output(text: str) -> str:
    """The batch system's own words from dask-jobqueue's 'Command exited ...' error, on one line."""
    if "stdout:" in text:
        text = text.split("stdout:", 1)[1].replace("stderr:", " ")
    return " ".join(text.split())


def recording_job_class(job_cls, errors: list):
    """A dask-jobqueue Job class that keeps what sbatch/qsub said when a submission fails."""

    class RecordingJob(job_cls):
        async def start(self):
            try:
                await super().start()
            except Exception as exc:
                errors.append(submission_output(str(exc)))
                raise

    RecordingJob.__name__ = job_cls.__name__
    return RecordingJob


#: Seconds between looks at whether a batch job's submission failed while the first worker is awaited.
SUBMISSION_LOOK_S = 2.0


def wait_for_workers(client, cluster, spec, description: str) -> None:
    """Wait for the first worker; on time-out, say why, with the batch system's own words.

    A batch job whose submission failed (sbatch or qsub said so) ends the wait
    at once: no worker can come from it.
    """
    deadline = time.monotonic() + spec.worker_timeout
    batch = own_jobs(cluster, spec)  # looked at every SUBMISSION_LOOK_S; others wait once
    step = SUBMISSION_LOOK_S if batch else spec.worker_timeout
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.01, min(deadline - time.monotonic(), step)))
            return
        except (TimeoutError, OSError) as exc:
            submitted = getattr(cluster, "dsub_submit_errors", None) or []
            if submitted:
                raise NoWorkersError(
                    f"the {description} could not be submitted: {sentence(submitted[-1])} Check the cluster "
                    "config (dsub job-script shows the job script) and that the batch system takes jobs from here."
                ) from exc
            if batch and time.monotonic() < deadline:
                continue
            detail = diagnose(cluster, spec) if cluster is not None else ""
            raise NoWorkersError(
                f"no Dask worker started within {spec.worker_timeout:.0f} s ({description}).{detail} "
                "Check the queue, the resources the job asks for (dsub job-script shows the script) "
                "or raise --worker-timeout."
            ) from exc


def own_jobs(cluster, spec) -> bool:
    """Whether ``cluster`` submits batch jobs of its own (dask-jobqueue), whose submission can fail."""
    return spec.scheduler in BATCH_COMMANDS and cluster is not None and hasattr(cluster, "dsub_submit_errors")


def job_ids(cluster) -> list[str]:
    """The batch job ids of ``cluster``'s worker jobs (dask-jobqueue's ``Job.job_id``) that were submitted."""
    found = [getattr(job, "job_id", None) for job in getattr(cluster, "workers", {}).values()]
    return [str(job_id) for job_id in found if job_id]


def diagnose(cluster, spec) -> str:
    """What the batch system says about the job dsub could not start."""
    if spec.scheduler not in ("slurm", "pbs"):
        return ""
    lines = []
    submitted = getattr(cluster, "dsub_submit_errors", [])
    if submitted:
        return f" The job submission failed: {submitted[-1]}"
    if spec.scheduler == "slurm" and shutil.which("sbatch"):
        said = sbatch_test_only(cluster.job_script())
        if said:
            lines.append(f"sbatch --test-only says: {said}")
    mine = job_ids(cluster)  # this run's jobs only: a cluster's queue holds everyone's
    queue = {"slurm": ["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(mine)], "pbs": ["qstat", *mine]}[spec.scheduler]
    if mine and shutil.which(queue[0]):
        result = subprocess.run(queue, capture_output=True, text=True, timeout=30)
        if result.stdout.strip():
            lines.append(f"{queue[0]} (this run's jobs): " + " | ".join(result.stdout.strip().splitlines()[:5]))
    return (" " + "; ".join(lines)) if lines else ""
