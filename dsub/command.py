"""The ``dsub`` command's entry point, light enough that an interrupt while Python loads dsub ends in one line.

Loading dsub's libraries (NumPy, pandas, Dask, Zarr) takes about a second; a
Ctrl-C then would print the import's traceback. ``dsub.interrupts`` and
``dsub.errors`` import only the standard library.
"""

from __future__ import annotations

import os
import signal
import sys


def run() -> None:
    """Load the command line and run it (``cli.entry``); Ctrl-C while loading: one line, exit status 130.

    ``entry`` never returns (it ends the process); a ``KeyboardInterrupt`` that
    leaves it came before ``main``'s own handling took over (between the import
    and ``entry``'s handler, or while the arguments are read): nothing was written.
    """
    one_blas_thread_under_an_address_space_limit()
    try:
        from .interrupts import stop_once_on_ctrl_c

        stop_once_on_ctrl_c()  # before the libraries load: no Ctrl-C is raised inside importlib's own code
        from .cli import entry

        entry()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would cut this line short
        from .errors import INTERRUPTED_BEFORE_WRITING

        print(INTERRUPTED_BEFORE_WRITING, file=sys.stderr, flush=True)
        os._exit(130)


def one_blas_thread_under_an_address_space_limit() -> None:
    """Under ``ulimit -v``, set ``OPENBLAS_NUM_THREADS=1`` (where not set) before NumPy loads OpenBLAS.

    OpenBLAS maps a work buffer for each of its threads (one per core) and, where
    the address space runs out, prints "Memory allocation still failed after 10
    retries, giving up" and ends the process with status 1 (OpenBLAS
    ``driver/others/memory.c``, ``blas_memory_alloc``): no line of dsub's, no
    cleanup. dsub's work is FFTs and compiled kernels, not BLAS, so one thread
    costs nothing; the variable is inherited by a local cluster's workers.
    Without a limit nothing is changed.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
