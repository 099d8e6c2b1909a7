"""Local worker processes that ignore Ctrl-C from their first instruction on.

A terminal's Ctrl-C sends SIGINT to every process of its foreground group:
dsub's coordinator stops the run and its cluster and says so in one line. A
local worker that takes the signal while Python is still starting (its imports
take seconds on a loaded machine, before the preload ``warm_up`` sets SIGINT
aside) dies printing a ``KeyboardInterrupt`` traceback on the terminal.

A signal set to be ignored stays ignored across ``execve`` (POSIX), and CPython
installs its ``KeyboardInterrupt`` handler only where SIGINT had the default
disposition at start-up (``Modules/signalmodule.c``, ``signal_install_handlers``).
So while a dsub local cluster is open, multiprocessing's spawn starts its
processes through a two-line ``/bin/sh`` script that ignores SIGINT and execs the
same interpreter with the same arguments (``multiprocessing.spawn.set_executable``,
the one hook that every spawned process goes through: Dask's nannies spawn their
workers with multiprocessing's "spawn" context by default, and its "forkserver"
server likewise). SIGTERM, and a worker's exit when the coordinator goes away
(Dask's parent-alive pipe), are left as they are. multiprocessing's resource
tracker is started before, with the interpreter itself (it ignores SIGINT and
SIGTERM by its own design). Where no folder allows executing a file (``noexec``
mounts) the interpreter is used as before and the preload's handler remains.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_users = 0
_previous: str | bytes | None = None
_folder: Path | None = None

WRAPPER_NAME = "python-ignoring-ctrl-c"


def _executable_folder() -> Path | None:
    """A new private folder from which a file may be executed, or None."""
    candidates = [tempfile.gettempdir(), os.environ.get("XDG_RUNTIME_DIR"), os.path.expanduser("~/.cache")]
    for candidate in candidates:
        if not candidate or not os.path.isdir(candidate):
            continue
        try:
            if os.statvfs(candidate).f_flag & getattr(os, "ST_NOEXEC", 0):
                continue
            return Path(tempfile.mkdtemp(prefix="dsub-spawn-", dir=candidate))
        except OSError:
            continue
    return None


def write_wrapper(folder: Path, python: str) -> Path:
    """``folder/python-ignoring-ctrl-c``: ignores SIGINT, then execs ``python`` with its own arguments."""
    path = folder / WRAPPER_NAME
    path.write_text(f"#!/bin/sh\ntrap '' INT\nexec {shlex.quote(python)} \"$@\"\n")
    path.chmod(0o700)
    return path


#: The process's wrapper folder, made once and kept until the interpreter exits: a cluster whose close was cut
#: short (SIGTERM as a worker starts) may still spawn through the wrapper after the last block ended, and
#: ``/bin/sh`` would say "cannot open" on the terminal had the file gone.
_kept: Path | None = None


def _remove_kept() -> None:
    if _kept is not None:
        shutil.rmtree(_kept, ignore_errors=True)


# Registered as this module is imported (with dsub's cluster start, before distributed's exit-time handlers and
# dsub's, which close the clusters): exit-time handlers run last-registered first, so this one runs after them.
atexit.register(_remove_kept)


def _start() -> None:
    global _previous, _folder, _kept
    from multiprocessing import resource_tracker, spawn

    resource_tracker.ensure_running()  # with the interpreter itself, before the executable changes
    previous = spawn.get_executable()
    wrapper = _kept / WRAPPER_NAME if _kept is not None else None
    if wrapper is None or not wrapper.is_file():
        folder = _executable_folder()
        if folder is None:
            return
        try:
            wrapper = write_wrapper(folder, os.fsdecode(previous))
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            return
        _remove_kept()
        _kept = folder
    _previous, _folder = previous, _kept
    spawn.set_executable(str(wrapper))


def _stop() -> None:
    """The interpreter restored for later spawns; the wrapper's folder stays until exit (``_kept``)."""
    global _previous, _folder
    from multiprocessing import spawn

    if _folder is None:
        return
    spawn.set_executable(_previous)
    _previous = _folder = None


@contextlib.contextmanager
def workers_ignore_ctrl_c():
    """While the block runs, processes that multiprocessing spawns start with SIGINT ignored (POSIX).

    Re-entrant and safe across threads (an early cluster starts in a thread of
    its own): the interpreter is restored when the last block ends. This
    process's own SIGINT handling is untouched.
    """
    global _users
    if os.name != "posix" or not os.path.exists("/bin/sh"):
        yield
        return
    with _lock:
        if _users == 0:
            _start()
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _stop()
