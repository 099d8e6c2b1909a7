"""Starting and stopping the Dask clusters dsub runs on."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import dask

from ..errors import DsubError
from .gpus import PinGPU, visible_gpus


class NoWorkersError(DsubError, TimeoutError):
    """No worker joined the scheduler in time."""


@contextlib.contextmanager
def start_cluster(spec):
    """Yield (client, cluster or None, description) for ``spec.scheduler``; always clean up."""
    from distributed import Client

    if spec.scheduler.startswith("tcp://"):
        try:
            client = Client(spec.scheduler, timeout=min(spec.worker_timeout, 30))
        except OSError as exc:
            raise DsubError(f"cannot reach the Dask scheduler at {spec.scheduler}: {exc}") from exc
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
        cluster, description, plugin = local_cluster(spec)
    else:
        cluster, description, plugin = batch_cluster(spec), f"{spec.scheduler} jobs", None
        try:
            preflight(cluster, spec)
        except BaseException:
            stop_cluster(cluster)
            raise
    try:
        client = Client(cluster)
        try:
            if plugin is not None:
                client.register_plugin(plugin)
            if spec.adapt is not None and spec.scheduler == "local":
                cluster.adapt(minimum=spec.adapt[0], maximum=spec.adapt[1])
            elif spec.adapt is not None:
                cluster.adapt(minimum_jobs=spec.adapt[0], maximum_jobs=spec.adapt[1])
            elif spec.scheduler != "local":
                cluster.scale(jobs=spec.workers or 1)
            wait_for_workers(client, cluster, spec, description)
            yield client, cluster, description
        finally:
            client.close()
    finally:
        stop_cluster(cluster)


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


def stop_cluster(cluster) -> None:
    """Close a cluster; if that fails (a job that never started), cancel the batch jobs directly."""
    try:
        cluster.close()
    except Exception:  # distributed asserts on workers that never started; jobs must still go
        cancel = getattr(getattr(cluster, "job_cls", None), "cancel_command", None)
        job_ids = [getattr(job, "job_id", None) for job in getattr(cluster, "workers", {}).values()]
        job_ids = [job_id for job_id in job_ids if job_id]
        if cancel and job_ids:
            subprocess.run([cancel, *job_ids], capture_output=True, timeout=60)


def preflight(cluster, spec) -> None:
    """Ask SLURM whether it would run the worker job at all, before waiting for one."""
    if spec.scheduler != "slurm" or not shutil.which("sbatch"):
        return
    said = sbatch_test_only(cluster.job_script())
    if said is not None:
        raise DsubError(
            f"SLURM refuses the worker job: {said} Check the partition and resources in your cluster "
            "config (dsub job-script --scheduler slurm shows the job script)."
        )


def sbatch_test_only(script: str) -> str | None:
    """What ``sbatch --test-only`` says against ``script`` if it refuses it, else None."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.sh"
        path.write_text(script)
        result = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).strip().replace("sbatch: error: ", "")


def local_cluster(spec):
    """A LocalCluster: one worker per visible GPU (pinned), else CPU worker processes."""
    from distributed import LocalCluster

    gpus = visible_gpus()
    cores = os.cpu_count() or 1
    if gpus:
        workers = spec.workers or len(gpus)
        threads = 2  # one reads and writes while the other computes
        plugin = PinGPU(gpus)
        description = f"local cluster, {workers} GPU worker(s) on GPUs {', '.join(gpus)}"
    else:
        workers = spec.workers or max(1, min(4, cores))
        threads = max(1, cores // workers)
        plugin = None
        description = f"local cluster, {workers} CPU worker(s) x {threads} thread(s)"
    if spec.adapt is not None:
        workers = spec.adapt[0]
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=threads, processes=True,
        host=None if spec.interface else "127.0.0.1", interface=spec.interface,
        dashboard_address=spec.dashboard_address, silence_logs=logging.CRITICAL, **security_options(spec),
    )
    return cluster, description, plugin


def security_options(spec) -> dict:
    """TLS with credentials made for this run only (``--secure``): nobody without them can connect."""
    if not spec.secure:
        return {}
    from distributed.security import Security

    return {"security": Security.temporary(), "protocol": "tls://"}


def batch_cluster(spec):
    """A dask-jobqueue cluster configured by dask's config (jobqueue.slurm / jobqueue.pbs)."""
    from dask_jobqueue import PBSCluster, SLURMCluster

    cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[spec.scheduler]
    options = {}
    if dask.config.get(f"jobqueue.{spec.scheduler}.cores", None) is None:
        options.update(cores=1)
    if dask.config.get(f"jobqueue.{spec.scheduler}.memory", None) is None:
        options.update(memory="8GB")
    if dask.config.get(f"jobqueue.{spec.scheduler}.processes", None) is None:
        options.update(processes=1)  # one worker process per job: one GPU each
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
        cluster = cls(job_cls=recording_job_class(cls.job_cls, errors), **options)
    except (ValueError, TypeError) as exc:
        raise DsubError(f"cannot set up the {spec.scheduler} cluster: {exc}") from exc
    cluster.dsub_submit_errors = errors
    return cluster


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


def wait_for_workers(client, cluster, spec, description: str) -> None:
    """Wait for the first worker; on time-out, say why, with the batch system's own words."""
    try:
        client.wait_for_workers(1, timeout=spec.worker_timeout)
    except (TimeoutError, OSError) as exc:
        detail = diagnose(cluster, spec) if cluster is not None else ""
        raise NoWorkersError(
            f"no Dask worker started within {spec.worker_timeout:.0f} s ({description}).{detail} "
            "Check the queue, the resources the job asks for (dsub job-script shows the script) "
            "or raise --worker-timeout."
        ) from exc


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
    queue = {"slurm": ["squeue", "-h", "-o", "%i %T %r"], "pbs": ["qstat"]}[spec.scheduler]
    if shutil.which(queue[0]):
        result = subprocess.run(queue, capture_output=True, text=True, timeout=30)
        if result.stdout.strip():
            lines.append(f"{queue[0]}: " + " | ".join(result.stdout.strip().splitlines()[:5]))
    return (" " + "; ".join(lines)) if lines else ""
