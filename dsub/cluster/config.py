"""Cluster settings from dask's config and from a ``--cluster-config`` YAML file.

The file has the format of dask-jobqueue's own ``~/.config/dask/jobqueue.yaml``
(``jobqueue: {slurm: {...}, pbs: {...}}``) and may also set other dask keys
(``distributed: ...``). Its values are applied on top of dask's config for the
duration of a run, leaf by leaf, so keys it does not name keep their defaults.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import dask
import yaml

from ..errors import InputFileError, MissingInputError, warn

#: Schedulers whose workers dask-jobqueue starts, each configured by ``jobqueue.<scheduler>``.
BATCH_SCHEDULERS = ("slurm", "pbs")
#: dsub's own keys that only batch jobs read (``start.gpus_per_job``, ``start.worker_device``).
BATCH_ONLY_KEYS = ("dsub.gpus-per-worker", "dsub.worker-device")
#: How many ignored keys a warning names before it only counts them.
NAMED_KEYS = 6


def load_dask_jobqueue():
    """Import dask-jobqueue (its defaults join dask's config), keeping this process's Ctrl-C handling.

    dask-jobqueue's ``runner`` module sets SIGINT to ``sys.exit()`` as it is
    imported: a Ctrl-C would then end a run with ``SystemExit``, exit status 0,
    no line and tracebacks from the clean-up. Setting a signal handler works in
    the main thread only, so the first import must happen there.
    """
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    keep = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if keep else None
    import dask_jobqueue

    if keep and handler is not None:
        signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def load_cluster_config(path) -> dict:
    """Read and check a cluster config file; returns its flattened dask keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(path, given_as="--cluster-config")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputFileError(path, f"is not valid YAML ({exc}).") from exc
    if not isinstance(tree, dict) or not tree:
        raise InputFileError(
            path, "holds no settings.", "Write it as dask-jobqueue's jobqueue.yaml is written: 'jobqueue: {slurm: {...}}'."
        )
    return flatten(tree)


def scheduler_address_configured(path, scheduler: str) -> bool:
    """Whether dask's config or the file ``path`` gives a batch cluster's scheduler its own host or interface.

    dask-jobqueue's ``interface`` is then the workers' alone
    (``scheduler-options: {interface: ...}`` or ``{host: ...}``).
    """
    settings = {key.replace("_", "-"): value for key, value in (load_cluster_config(path) if path else {}).items()}
    configured = dask.config.get(f"jobqueue.{scheduler}.scheduler-options", None) or {}
    return any(configured.get(name) or settings.get(f"jobqueue.{scheduler}.scheduler-options.{name}")
               for name in ("host", "interface"))


def unused_settings(settings: dict, scheduler: str) -> list[str]:
    """The keys of a flattened cluster config that a run on ``scheduler`` does not read.

    Only dask-jobqueue's batch clusters read ``jobqueue.*`` (and dsub's
    ``dsub.gpus-per-worker``/``dsub.worker-device``), so a local cluster, the
    threads and an existing scheduler read none of them. A SLURM or PBS run
    reads its own ``jobqueue.<scheduler>`` section; the other section is named
    only when the file has none for this scheduler (a profile may well hold
    both).
    """
    batch_keys = [key for key in settings if key.startswith("jobqueue.") or key in BATCH_ONLY_KEYS]
    if scheduler not in BATCH_SCHEDULERS:
        return batch_keys
    own = f"jobqueue.{scheduler}."
    jobqueue = [key for key in settings if key.startswith("jobqueue.")]
    if any(key.startswith(own) for key in jobqueue):
        return []
    return jobqueue


def scheduler_words(scheduler: str) -> str:
    if scheduler == "local":
        return "a local cluster (--scheduler local)"
    if scheduler.startswith("tcp://"):
        return f"an existing scheduler's workers (--scheduler {scheduler})"
    if scheduler in BATCH_SCHEDULERS:
        return f"--scheduler {scheduler}, which reads jobqueue.{scheduler}"
    return f"--scheduler {scheduler} (tasks in this process, no Dask cluster)"


def warn_unused_settings(path, scheduler: str) -> None:
    """Warn, in one line naming the file and the keys, when settings of ``path`` do not apply to ``scheduler``."""
    if path is None:
        return
    settings = load_cluster_config(path)
    unused = unused_settings(settings, scheduler)
    if not unused:
        return
    named = ", ".join(unused[:NAMED_KEYS]) + (f" and {len(unused) - NAMED_KEYS} more" if len(unused) > NAMED_KEYS
                                              else "")
    which = ("none of its settings is used" if len(unused) == len(settings)
             else f"{len(settings) - len(unused)} of its {len(settings)} settings are used, these are not")
    if scheduler in BATCH_SCHEDULERS:
        remedy = (f"Give the file a 'jobqueue: {{{scheduler}: ...}}' section (cluster/ holds profiles for "
                  "SLURM, PBS Pro and Torque), or use the --scheduler it was written for.")
    else:
        remedy = ("jobqueue settings configure SLURM/PBS worker jobs (--scheduler slurm or pbs); "
                  "leave the file out here, or use it with those.")
    warn(f"--cluster-config {path}: its jobqueue settings are not used by {scheduler_words(scheduler)}; "
         f"{which}: {named}. {remedy}")


@contextlib.contextmanager
def cluster_config(path=None):
    """Apply a cluster config file on top of dask's config while the block runs."""
    if path is None:
        yield
        return
    settings = load_cluster_config(path)
    # Load dask-jobqueue's defaults first: dask.config.set drops, on exit, any
    # top-level key that did not exist on entry, defaults loaded meanwhile included.
    load_dask_jobqueue()

    with dask.config.set(settings):
        yield
