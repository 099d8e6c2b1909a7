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
    """Load the command line and run it (``cli.entry``); Ctrl-C while loading: one line, exit status 130
    (SIGTERM: one line, 143).

    ``entry`` never returns (it ends the process); a ``KeyboardInterrupt`` that
    leaves it came before ``main``'s own handling took over (between the import
    and ``entry``'s handler, or while the arguments are read): nothing was written.
    """
    lean_threads_under_an_address_space_limit()
    try:
        from .interrupts import stop_once_on_ctrl_c, terminate_on_sigterm

        stop_once_on_ctrl_c()  # before the libraries load: no Ctrl-C is raised inside importlib's own code
        terminate_on_sigterm()  # likewise for SIGTERM, which would otherwise end the process without a word
        from . import fork_server

        fork_server.start(sys.argv[1:])  # a local cluster's workers' libraries load beside this process's
        from .cli import entry

        entry()
    except KeyboardInterrupt as stop:
        for signum in (signal.SIGINT, signal.SIGTERM):  # another stop would cut this line short
            signal.signal(signum, signal.SIG_IGN)
        from .errors import INTERRUPTED_BEFORE_WRITING, TERMINATED_BEFORE_WRITING, Terminated

        terminated = isinstance(stop, Terminated)
        print(TERMINATED_BEFORE_WRITING if terminated else INTERRUPTED_BEFORE_WRITING, file=sys.stderr, flush=True)
        os._exit(143 if terminated else 130)


#: malloc arenas a dsub process keeps under an address-space limit (glibc's ``M_ARENA_MAX``; unlimited, one per
#: thread up to 8 per core, each reserving 64 MiB of address space).
ARENAS_UNDER_A_LIMIT = 2


def lean_threads_under_an_address_space_limit() -> None:
    """Under ``ulimit -v``: ``OPENBLAS_NUM_THREADS=1``, at most ``ARENAS_UNDER_A_LIMIT`` malloc arenas and pyarrow
    on the system's malloc (``ARROW_DEFAULT_MEMORY_POOL=system``), for this process and (through the environment)
    the workers it starts, where the user has not set them.

    OpenBLAS maps a work buffer for each of its threads (one per core) and, where
    the address space runs out, prints "Memory allocation still failed after 10
    retries, giving up" and ends the process with status 1 (OpenBLAS
    ``driver/others/memory.c``, ``blas_memory_alloc``): no line of dsub's, no
    cleanup. glibc gives each thread that allocates an arena of its own, each
    reserving 64 MiB of address space (``HEAP_MAX_SIZE``), which the limit
    counts though little of it is used: a coordinator of 17 threads mapped
    2.7 GB for 0.3 GB resident. pyarrow (which holds pandas' text columns) allocates from
    mimalloc, whose first allocation reserves 1 GiB of address space where the
    limit leaves that much, and less where it does not: a box-96 run on a local
    cluster finished under 1.3 GB and 1.9 GB but found no room for a thread or a
    library under 1.45-1.75 GB (measured 2026-11-30); with the system's malloc
    the coordinator maps 0.83 GB at its peak whatever the limit. dsub's work is
    FFTs and compiled kernels, not BLAS, its large arrays are mapped by
    themselves, not from an arena, and pyarrow holds only the tables' names, so
    none of this costs speed. Set before any thread starts (``mallopt`` here; the
    variable ``MALLOC_ARENA_MAX`` for processes started later). Without a
    limit nothing is changed.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft in (resource.RLIM_INFINITY, -1):
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # read as pyarrow loads its first pool
    if "MALLOC_ARENA_MAX" not in os.environ:
        os.environ["MALLOC_ARENA_MAX"] = str(ARENAS_UNDER_A_LIMIT)
        try:
            import ctypes

            ctypes.CDLL(None).mallopt(-8, ARENAS_UNDER_A_LIMIT)  # M_ARENA_MAX (glibc malloc.h)
        except (OSError, AttributeError):  # not glibc: its own allocator, its own rules
            pass
