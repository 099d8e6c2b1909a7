"""Where the chunk tasks run: threads, a local Dask cluster, SLURM, PBS, or an existing scheduler.

``open_runner(spec)`` returns a context manager whose ``compute(tasks, label,
sizes, waiting, on_result, unit)`` runs Dask delayed tasks and shows their
progress (``progress.py``: a bar on a terminal, plain lines in a log); its
``phases`` hold each phase's tasks, particles and seconds. Everything about
starting and stopping workers stays in this package.
"""

from .runner import ClusterSpec, open_runner, parse_adapt

__all__ = ["ClusterSpec", "open_runner", "parse_adapt"]
