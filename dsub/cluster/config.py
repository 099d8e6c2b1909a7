"""Cluster settings from dask's config and from a ``--cluster-config`` YAML file.

The file has the format of dask-jobqueue's own ``~/.config/dask/jobqueue.yaml``
(``jobqueue: {slurm: {...}, pbs: {...}}``) and may also set other dask keys
(``distributed: ...``). Its values are applied on top of dask's config for the
duration of a run, leaf by leaf, so keys it does not name keep their defaults.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import dask
import yaml

from ..errors import InputFileError, MissingInputError


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


@contextlib.contextmanager
def cluster_config(path=None):
    """Apply a cluster config file on top of dask's config while the block runs."""
    if path is None:
        yield
        return
    settings = load_cluster_config(path)
    # Load dask-jobqueue's defaults first: dask.config.set drops, on exit, any
    # top-level key that did not exist on entry, defaults loaded meanwhile included.
    import dask_jobqueue  # noqa: F401

    with dask.config.set(settings):
        yield
