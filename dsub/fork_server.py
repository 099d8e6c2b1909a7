"""Local workers forked from a server that loads their libraries while the coordinator starts.

A local cluster's worker process is otherwise spawned: a fresh interpreter that
imports Dask's distributed and then, in its preload (``cluster/warm_up.py``),
dsub's task module, one after the other and only once the coordinator has
imported its own modules, checked the inputs' first part and made the
cluster's scheduler. On a GPU host that put the worker's first instruction 2.3 s
after the command's launch and its imports done 2 s later, the longest path to
the first chunk (``benchmarks/worker_timeline.py``; BENCHMARKS.md). Forked from
the server, a worker made its worker 0.1 s after its first instruction (1.2-1.3
s spawned) and had CUDA ready 0.2 s later, before the coordinator's checks
ended; its first chunk began 0.9-1.2 s sooner.

``start(argv)``, called by the command's entry point before it imports anything
but the standard library where the command line asks for ``--scheduler
local``, starts multiprocessing's fork server (``multiprocessing.forkserver``,
Python's own; Dask supports it as ``distributed.worker.multiprocessing-method:
forkserver``) with those modules as its preload: it imports them in a process
of its own, beside the coordinator's imports, and every worker is then forked
from it with them loaded. CUDA is never touched in the server (CuPy is not
among its modules): each worker makes its own context after the fork, pinned
to its GPU as before (``gpus.PinnedGPUCluster``).

What Dask sets in a spawned worker's environment before it starts
(``distributed.nanny.pre-spawn-environ``: glibc's trim threshold, one BLAS
thread, and the hash seed the nanny adds) must be in place before the
interpreter starts, and a forked worker inherits the server's: the server is
started with them (``SERVER_ENVIRON``), and ``method()`` names the fork server
for a cluster only where Dask's configuration asks for those same values and
for its default start method, else the workers are spawned as Dask does.

Ctrl-C: the server and every worker forked from it inherit a blocked SIGINT
(the server is started from a thread that blocks it, the mask kept across
``execve`` and ``fork``), as ``cluster/ctrl_c.py`` does for spawned workers;
multiprocessing's resource tracker is started first, without the mask, told
to keep quiet. SIGTERM (a batch system's stop, sent to the whole process
group): the workers die of it as spawned ones do, the server ignores it
(``outlast_sigterm``) and ends when the coordinator does (multiprocessing's
"alive" pipe). A server killed by it had been started again by
multiprocessing as soon as a nanny restarted its worker, after the signal, and
its children, forked after the coordinator had gone, printed tracebacks on the
terminal. A server killed otherwise (SIGKILL) is started again so too: it
loads dsub's modules (``use_in_dask``) but does not outlast a SIGTERM.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys

#: Modules the server imports before it forks workers: what a worker needs up to its first task. Not
#: ``dsub.cli``: a worker of ``python -m dsub.cli`` runs that module as its ``__mp_main__`` (multiprocessing's
#: spawn preparation), which warns on every worker where the module itself is loaded already; its imports are.
PRELOAD = ("dsub.fork_server", "distributed", "dsub.cluster", "dsub.workflow.tasks", "dsub.cluster.warm_up")
#: Dask's default ``distributed.nanny.pre-spawn-environ``, and the hash seed its nanny adds (``Nanny.__init__``).
SERVER_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "6640"}
#: In the server's environment only: this module, imported there first, makes the server outlast a SIGTERM.
SERVER_MARK = "DSUB_IN_FORK_SERVER"
#: ``DSUB_FORK_SERVER=0`` in the environment: no fork server, the workers spawned as Dask does.
SWITCH = "DSUB_FORK_SERVER"
#: A ``-W`` option: the resource tracker's "leaked semaphore objects to clean up at shutdown" warnings.
RESOURCE_TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"

_started = False


def outlast_sigterm() -> None:
    """In the fork server: ignore SIGTERM, and give each forked child SIGTERM's default back (``os.register_at_fork``).

    The server is started with SIGTERM blocked (``start``), so one that comes
    before this runs waits, and setting it ignored discards it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


if os.environ.pop(SERVER_MARK, None) == "1":  # imported as the fork server's first preload
    outlast_sigterm()


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started now (without SIGINT blocked), and told to keep quiet.

    It cleans up the semaphores of worker processes a stopped run leaves (SIGTERM to
    the group) and warns about each on the terminal after dsub's own line: it takes
    this process's -W options (``util._args_from_interpreter_flags``), so that
    warning is left out.
    """
    from multiprocessing import resource_tracker

    if RESOURCE_TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(RESOURCE_TRACKER_QUIET)
    resource_tracker.ensure_running()


@contextlib.contextmanager
def signals_blocked(signals: set):
    """While the block runs, this thread blocks ``signals`` (the threads it starts, and the processes they
    start, keep them blocked: POSIX, across ``fork`` and ``execve``); the resource tracker is started first,
    without them (``start_resource_tracker``)."""
    start_resource_tracker()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def asks_for_local_cluster(argv: list[str]) -> bool:
    """Whether a command line (without the program's name) runs ``subtract`` on ``--scheduler local``."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    if "subtract" not in words or "-h" in words or "--help" in words:
        return False
    return "--scheduler=local" in words or any(
        word == "--scheduler" and following == "local" for word, following in zip(words, words[1:]))


def start(argv: list[str]) -> None:
    """Start the fork server now where ``argv`` asks for a local cluster (POSIX with fork servers only;
    not with ``DSUB_FORK_SERVER=0``)."""
    global _started
    if _started or os.environ.get(SWITCH) == "0" or not asks_for_local_cluster(argv) \
            or not hasattr(signal, "pthread_sigmask") or "forkserver" not in multiprocessing.get_all_start_methods():
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    saved = {name: os.environ.get(name) for name in (*SERVER_ENVIRON, SERVER_MARK)}
    with signals_blocked({signal.SIGINT, signal.SIGTERM}):
        try:
            os.environ.update({**SERVER_ENVIRON, SERVER_MARK: "1"})
            forkserver.ensure_running()  # spawns the server and returns; it imports PRELOAD on its own
            _started = True
        except OSError:  # no server: the workers are spawned as Dask does
            pass
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def method() -> str | None:
    """"forkserver" where ``start`` started the server and Dask's configuration (imported here) would spawn
    workers with ``SERVER_ENVIRON``; else None (Dask's own start method)."""
    if not _started:
        return None
    import dask
    import distributed  # noqa: F401 -- its configuration's defaults

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") != "spawn":
        return None
    configured = {name: str(value) for name, value in
                  (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()}
    if configured.get("PYTHONHASHSEED") in (None, "0"):  # the nanny's own seed then (``Nanny.__init__``)
        configured["PYTHONHASHSEED"] = SERVER_ENVIRON["PYTHONHASHSEED"]
    return "forkserver" if configured == SERVER_ENVIRON else None


def use_in_dask() -> bool:
    """Fork Dask's local workers from the server from now on, where ``method`` allows; whether it does.

    Sets ``distributed.worker.multiprocessing-method`` for this process (every
    worker a cluster adds or restarts later reads it as it starts), and keeps
    ``PRELOAD`` as the modules of a server multiprocessing starts again (Dask
    names its own list once, in ``distributed.utils.get_mp_context``).
    """
    chosen = method()
    if chosen is None:
        return False
    import dask
    from distributed.utils import get_mp_context

    dask.config.set({"distributed.worker.multiprocessing-method": chosen})
    get_mp_context()
    multiprocessing.get_context(chosen).set_forkserver_preload(list(PRELOAD))
    return True
