"""``dsub job-script``: the batch script of one worker, for an admin to review."""

from __future__ import annotations

from .config import cluster_config
from .runner import ClusterSpec
from .start import batch_cluster


def job_script(scheduler: str, config_path=None) -> str:
    """The job script dask-jobqueue would submit for one worker under ``scheduler`` (slurm or pbs)."""
    with cluster_config(config_path):
        cluster = batch_cluster(ClusterSpec(scheduler=scheduler))
        try:
            return cluster.job_script()
        finally:
            cluster.close()
