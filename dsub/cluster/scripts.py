"""``dsub job-script``: the batch script of one worker, for an admin to review."""

from __future__ import annotations

import os
import tempfile

import dask

from .config import cluster_config, load_dask_jobqueue
from .runner import ClusterSpec
from .start import batch_cluster


def job_script(scheduler: str, config_path=None, memory_bytes: int | None = None, device: str = "auto") -> str:
    """The job script dask-jobqueue would submit for one worker under ``scheduler`` (slurm or pbs).

    ``memory_bytes``: the host memory a run needs per worker (raises a smaller
    ``memory`` of the profile, as a run does); ``device`` "cpu" asks for no GPU.

    dask-jobqueue creates a relative log directory when it sets up a cluster;
    for a script that is only shown, that happens in a throw-away folder.
    """
    # dask-jobqueue's defaults are loaded before dask.config.set below: on exit it drops the top-level
    # keys added meanwhile, and the cluster's close then found no ``jobqueue`` settings.
    load_dask_jobqueue()

    config_path = None if config_path is None else os.path.abspath(config_path)
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch, cluster_config(config_path):
        os.chdir(scratch)
        try:
            # Only the script is shown: its throw-away scheduler serves its dashboard on any free port.
            options = dask.config.get(f"jobqueue.{scheduler}.scheduler-options", None) or {}
            with dask.config.set({f"jobqueue.{scheduler}.scheduler-options": {**options,
                                                                                "dashboard_address": "127.0.0.1:0"}}):
                spec = ClusterSpec(scheduler=scheduler, device=device, worker_memory_bytes=memory_bytes,
                                   dashboard_address="127.0.0.1:0", cluster_config=config_path)
                cluster = batch_cluster(spec)
            try:
                return cluster.job_script()
            finally:
                cluster.close()
        finally:
            os.chdir(here)
