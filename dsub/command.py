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
