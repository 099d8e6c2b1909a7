"""Local worker processes that ignore Ctrl-C from their first instruction on.

A terminal's Ctrl-C sends SIGINT to every process of its foreground group:
dsub's coordinator stops the run and its cluster and says so in one line. A
local worker that takes the signal while Python is still starting (its imports
take seconds on a loaded machine, before the preload ``warm_up`` sets SIGINT
aside) dies printing a ``KeyboardInterrupt`` traceback on the terminal.

A thread's signal mask is inherited by the threads it starts and by the
processes they fork, and it is kept across ``execve`` (POSIX: ``pthread_sigmask``,
``fork``, ``execve``; CPython's ``_posixsubprocess`` restores the calling thread's
mask in the child before its exec). A blocked SIGINT is never delivered, and the
preload ``warm_up`` later sets it to be ignored, which discards one that is
pending. So while a local cluster is made (``start.local_cluster``), the making
thread blocks SIGINT: distributed's event-loop thread and the threads it starts
for each worker process (``distributed.process.AsyncProcess``, which spawns it
through multiprocessing's "spawn" context), made then or later, inherit the mask,
and so does every worker process, from its first instruction. The process-wide
dispositions are untouched: the coordinator's other threads still take Ctrl-C.
A run's local cluster is always made in a thread of its own (``early.EarlyCluster``,
started beside the input checks or when the run takes it up), so the main thread,
which waits for it, takes a Ctrl-C at once. SIGTERM, and a worker's exit when the coordinator
goes away (Dask's parent-alive pipe), are left as they are. multiprocessing's
resource tracker is started before, without the mask (it ignores SIGINT and
SIGTERM by its own design). Workers forked from the fork server
(``dsub.fork_server``) inherit the mask the server was started with.

Until 2026-11 a two-line ``/bin/sh`` script in a temporary folder did this (it
ignored SIGINT and exec'd the interpreter, set with ``spawn.set_executable``): a
nanny that restarted a SIGTERM'd worker after the run had removed the folder
printed "/bin/sh: cannot open …" on the terminal, about one stopped run in twenty.
"""

from __future__ import annotations

import contextlib
import os
import signal

from ..fork_server import signals_blocked


@contextlib.contextmanager
def workers_ignore_ctrl_c():
    """While the block runs, this thread blocks SIGINT: threads it starts, and the processes they spawn, keep
    it blocked (POSIX; elsewhere nothing changes). Wrap only the making of a local cluster: Ctrl-C still
    reaches the coordinator through its other threads, and through this one once the block ends (a SIGINT
    that arrived meanwhile with no other thread to take it is delivered then)."""
    if os.name != "posix" or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    with signals_blocked({signal.SIGINT}):
        yield
