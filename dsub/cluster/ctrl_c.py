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
import sys
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_users = 0
_previous: str | bytes | None = None
_folder: Path | None = None

WRAPPER_NAME = "python-ignoring-ctrl-c"
#: A ``-W`` option: the resource tracker's "leaked semaphore objects to clean up at shutdown" warnings.
RESOURCE_TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"


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


def _start() -> None:
    global _previous, _folder
    from multiprocessing import resource_tracker, spawn

    # multiprocessing's resource tracker cleans up the semaphores of worker processes a stopped run leaves
    # (SIGTERM to the group) and warns about each on the terminal after dsub's own line: it takes this
    # process's -W options (``util._args_from_interpreter_flags``), so that warning is left out.
    if RESOURCE_TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(RESOURCE_TRACKER_QUIET)
    resource_tracker.ensure_running()  # with the interpreter itself, before the executable changes
    folder = _executable_folder()
    if folder is None:
        return
    previous = spawn.get_executable()
    try:
        wrapper = write_wrapper(folder, os.fsdecode(previous))
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        return
    _previous, _folder = previous, folder
    spawn.set_executable(str(wrapper))
    # A run that ends without closing its cluster (Ctrl-C while it starts) removes the folder at exit.
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def _stop() -> None:
    global _previous, _folder
    from multiprocessing import spawn

    if _folder is None:
        return
    spawn.set_executable(_previous)
    shutil.rmtree(_folder, ignore_errors=True)
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
