"""Where the chunk tasks run: threads, a local Dask cluster, SLURM, PBS, or an existing scheduler.

``open_runner(spec)`` returns a context manager whose ``compute(tasks, label)``
runs Dask delayed tasks with a progress bar; everything about starting and
stopping workers stays in this package.
"""

from .runner import ClusterSpec, open_runner, parse_adapt

__all__ = ["ClusterSpec", "open_runner", "parse_adapt"]
