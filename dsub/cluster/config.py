"""Cluster settings from dask's config and from a ``--cluster-config`` YAML file.

The file has the format of dask-jobqueue's own ``~/.config/dask/jobqueue.yaml``
(``jobqueue: {slurm: {...}, pbs: {...}}``) and may also set other dask keys
(``distributed: ...``). Its values are applied on top of dask's config for the
duration of a run, leaf by leaf, so keys it does not name keep their defaults.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import signal
import sys
import threading
from pathlib import Path

import dask
import yaml

from ..errors import InputFileError, MissingInputError, first_and_more, warn

#: Schedulers whose workers dask-jobqueue starts, each configured by ``jobqueue.<scheduler>``.
BATCH_SCHEDULERS = ("slurm", "pbs")
#: dsub's own keys that only batch jobs read (``start.gpus_per_job``, ``start.worker_device``).
BATCH_ONLY_KEYS = ("dsub.gpus-per-worker", "dsub.worker-device")
#: The settings of a cluster config's ``dsub:`` section (all of them read by batch jobs only).
DSUB_SETTINGS = tuple(key.split(".", 1)[1] for key in BATCH_ONLY_KEYS)
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
    refuse_misspelt_sections(path, tree)
    check_setting_types(path, tree)
    return flatten(tree)


#: Top-level sections a cluster config is written for: a near miss of one of these is a misspelling.
CLUSTER_SECTIONS = ("jobqueue", "dsub", "distributed")


def known_sections() -> set[str]:
    """The top-level config sections that dask, distributed, dask-jobqueue or dsub read (dask's defaults)."""
    import distributed  # noqa: F401 -- registers its defaults

    known = {str(key).replace("_", "-") for defaults in dask.config.defaults for key in defaults}
    return known | set(CLUSTER_SECTIONS)


def refuse_misspelt_sections(path, tree: dict) -> None:
    """Refuse a cluster config with a top-level section named almost like ``jobqueue``, ``dsub`` or
    ``distributed`` (``jobque:``, ``dsubb:``): nothing would read any of its settings, and the worker
    jobs would go out with the defaults. Raises ``InputFileError`` naming the section and its likely intent.
    """
    known = known_sections()
    for key in tree:
        name = str(key).replace("_", "-")
        guess = None if name in known else nearest(name.lower(), CLUSTER_SECTIONS)  # DSUB: too
        if guess:
            raise InputFileError(
                path, f"has a section '{key}:', which nothing reads (did you mean '{guess}:'?): its settings would "
                      "all be ignored and the worker jobs use the defaults.", f"Name the section '{guess}:'.")


#: Settings of a batch system (``jobqueue.<system>.<name>``) by the kind of value dask-jobqueue takes.
WHOLE_NUMBER_SETTINGS = ("cores", "processes", "job-cpu")
NUMBER_SETTINGS = ("death-timeout",)
BYTES_SETTINGS = ("memory", "job-mem")
TEXT_SETTINGS = ("name", "queue", "account", "walltime", "python", "interface", "shebang", "log-directory",
                 "local-directory", "shared-temp-directory", "worker-command", "project", "resource-spec")
LIST_SETTINGS = ("job-extra-directives", "job-directives-skip", "worker-extra-args", "job-script-prologue")
MAPPING_SETTINGS = ("scheduler-options",)
WORKER_DEVICES = ("auto", "cpu", "gpu")


def check_setting_types(path, tree: dict) -> None:
    """Refuse, naming the file and the setting, a cluster config whose values dask-jobqueue or dsub cannot take.

    The sections (``jobqueue``, each batch system under it, ``distributed``,
    ``dsub``) must be mappings; a batch system's settings of the kinds above must
    hold that kind of value (``memory`` as dask reads byte sizes, e.g. ``16GB``);
    ``dsub.gpus-per-worker`` a whole number ≥ 0, ``dsub.worker-device`` one of
    ``WORKER_DEVICES``. Settings not named here are left to dask-jobqueue. Raises
    ``InputFileError``.
    """
    from dask.utils import parse_bytes

    def refuse(name: str, value, needed: str):
        raise InputFileError(path, f"{name} is {value!r}: {needed} is needed.",
                             "Correct it (dask-jobqueue's own jobqueue.yaml shows each setting), or leave it out.")

    for section in ("jobqueue", "distributed", "dsub"):
        if section in tree and tree[section] is not None and not isinstance(tree[section], dict):
            refuse(section, tree[section], "a mapping of settings")
    for system, settings in (tree.get("jobqueue") or {}).items():
        if settings is not None and not isinstance(settings, dict):
            refuse(f"jobqueue.{system}", settings, "a mapping of settings")
        for key, value in (settings or {}).items():
            name, kind = f"jobqueue.{system}.{key}", str(key).replace("_", "-")
            if value is None:
                continue
            whole = isinstance(value, int) and not isinstance(value, bool)
            if kind in WHOLE_NUMBER_SETTINGS and not (whole and value >= 1):
                refuse(name, value, "a whole number of at least 1")
            if kind in NUMBER_SETTINGS and (isinstance(value, bool) or not isinstance(value, (int, float))):
                refuse(name, value, "a number (seconds)")
            if kind in BYTES_SETTINGS:
                try:
                    parse_bytes(value)
                except (ValueError, TypeError):
                    refuse(name, value, "a size such as 16GB")
            if kind in TEXT_SETTINGS and not isinstance(value, str):
                refuse(name, value, "text")
            if kind in LIST_SETTINGS and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                refuse(name, value, "a list of text lines")
            if kind in MAPPING_SETTINGS and not isinstance(value, dict):
                refuse(name, value, "a mapping of settings")
    own = tree.get("dsub") or {}
    gpus = own.get("gpus-per-worker", own.get("gpus_per_worker"))
    if gpus is not None and not (isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 0):
        refuse("dsub.gpus-per-worker", gpus, "a whole number of at least 0")
    device = own.get("worker-device", own.get("worker_device"))
    if device is not None and device not in WORKER_DEVICES:
        refuse("dsub.worker-device", device, f"one of {', '.join(WORKER_DEVICES)}")


def scheduler_address_configured(path, scheduler: str) -> bool:
    """Whether dask's config or the file ``path`` gives a batch cluster's scheduler its own host or interface.

    dask-jobqueue's ``interface`` is then the workers' alone
    (``scheduler-options: {interface: ...}`` or ``{host: ...}``).
    """
    settings = {key.replace("_", "-"): value for key, value in (load_cluster_config(path) if path else {}).items()}
    configured = dask.config.get(f"jobqueue.{scheduler}.scheduler-options", None) or {}
    return any(configured.get(name) or settings.get(f"jobqueue.{scheduler}.scheduler-options.{name}")
               for name in ("host", "interface"))


def jobqueue_settings() -> dict[str, set[str]]:
    """{batch system: the names of its settings} as dask-jobqueue's own default config (its jobqueue.yaml) has them.

    Read from the installed package's file, without importing it.
    """
    spec = importlib.util.find_spec("dask_jobqueue")
    tree = yaml.safe_load((Path(spec.origin).parent / "jobqueue.yaml").read_text())
    return {system: set(settings or {}) for system, settings in tree["jobqueue"].items()}


def nearest(name: str, known) -> str | None:
    """The known name most like ``name`` (a misspelling's likely intent), or None (``difflib``)."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_settings(settings: dict) -> list[tuple[str, str | None]]:
    """(key, the nearest known key or None) for each key of a flattened cluster config that nobody reads.

    Under ``jobqueue.<system>`` what dask-jobqueue's own config does not name
    (dask-jobqueue reads only those, and ignores the rest without a word), a
    ``jobqueue.<system>`` that is no batch system of dask-jobqueue, and under
    ``dsub`` what is not one of ``DSUB_SETTINGS``, and a top-level section that
    dask, distributed, dask-jobqueue and dsub do not read (``known_sections``).
    dask treats ``_`` and ``-`` in names alike; inside ``distributed`` and the
    other sections of dask itself nothing is checked.
    """
    systems = jobqueue_settings()
    sections = known_sections()
    unknown = []
    for key in settings:
        parts = key.split(".")
        if parts[0].replace("_", "-") not in sections:  # a section nobody reads (near misses are refused on loading)
            unknown.append((parts[0], None))
        elif parts[0] == "jobqueue" and len(parts) >= 2:
            system = parts[1].replace("_", "-")
            if system not in systems:
                guess = nearest(system, systems)
                unknown.append((f"jobqueue.{parts[1]}", guess and f"jobqueue.{guess}"))
            elif len(parts) >= 3 and parts[2].replace("_", "-") not in systems[system]:
                guess = nearest(parts[2].replace("_", "-"), systems[system])
                unknown.append((".".join(parts[:3]), guess and f"jobqueue.{parts[1]}.{guess}"))
        elif parts[0] == "dsub" and len(parts) >= 2 and parts[1].replace("_", "-") not in DSUB_SETTINGS:
            guess = nearest(parts[1].replace("_", "-"), DSUB_SETTINGS)
            unknown.append((".".join(parts[:2]), guess and f"dsub.{guess}"))
    return list(dict.fromkeys(unknown))  # a misspelt system's settings: its name once


def warn_unknown_settings(path, settings: dict) -> None:
    """One warning naming the keys of ``path`` that neither dask-jobqueue nor dsub knows, each with its likely intent."""
    unknown = unknown_settings(settings)
    sections = [key for key, _ in unknown if "." not in key]
    if sections:  # another library's section (dask-cuda's cuda:...): nothing for dsub to correct
        unknown = [(key, guess) for key, guess in unknown if "." in key]
        warn(f"--cluster-config {path}: {'section' if len(sections) == 1 else 'sections'} "
             f"{', '.join(sections)} {'is' if len(sections) == 1 else 'are'} read by neither dask, dask-jobqueue "
             f"nor dsub, and left as {'it is' if len(sections) == 1 else 'they are'} (another program may read "
             "this file).")
    if not unknown:
        return
    named = ", ".join(f"{key} (did you mean {guess}?)" if guess else key for key, guess in unknown)
    warn(f"--cluster-config {path}: {'this setting is' if len(unknown) == 1 else 'these settings are'} not known to "
         f"dask-jobqueue or dsub, which ignore {'it' if len(unknown) == 1 else 'them all'}: {named}. Correct the "
         f"name{'s' if len(unknown) > 1 else ''} (dask-jobqueue's own jobqueue.yaml lists its settings, the README "
         "dsub's).")


#: What the example profiles in cluster/ hold where a site's own path belongs (marked EDIT there).
PLACEHOLDER = "/path/to/"


def placeholders(settings: dict, scheduler: str) -> list[tuple[str, str]]:
    """(key, value) of the ``jobqueue.<scheduler>`` settings whose value, or an item of it, still holds the
    example profiles' ``PLACEHOLDER``."""
    found = []
    for key, value in settings.items():
        if key.startswith(f"jobqueue.{scheduler}."):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and PLACEHOLDER in item:
                    found.append((key, item))
    return found


def warn_placeholders(path, settings: dict, scheduler: str) -> None:
    """One warning naming the settings of ``path`` that still hold an example profile's placeholder path."""
    found = placeholders(settings, scheduler)
    if found:
        named = "; ".join(f"{key}: {value!r}" for key, value in found)
        warn(f"--cluster-config {path}: still the example profile's placeholder where a path of this site belongs "
             f"({named}); each worker job runs it as it is. Edit the lines marked EDIT (cluster/README.md).")


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
    """Warn, in one line each, naming the file and the keys, about settings of ``path`` that ``scheduler`` does
    not read: names nobody knows (``unknown_settings``), then settings for other schedulers (``unused_settings``).

    For ``subtract`` and ``job-script`` alike.
    """
    if path is None:
        return
    settings = load_cluster_config(path)
    warn_unknown_settings(path, settings)
    warn_placeholders(path, settings, scheduler)
    unused = unused_settings(settings, scheduler)
    if not unused:
        return
    named = first_and_more(unused, NAMED_KEYS)
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
