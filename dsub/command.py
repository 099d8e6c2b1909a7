"""The ``dsub`` command's entry point, light enough that an interrupt while Python loads dsub ends in one line.

Loading dsub's libraries (NumPy, pandas, Dask, Zarr) takes about a second; a
Ctrl-C then would print the import's traceback. ``dsub.interrupts`` and
``dsub.errors`` import only the standard library: a Ctrl-C while the rest
loads is noted and raised once it has loaded (``interrupts``).
"""

from __future__ import annotations

import os
import signal
import sys

from .interrupts import note_ctrl_c_while_loading


def run() -> None:
    """Load the command line and run it (``cli.entry``); Ctrl-C while loading: one line, exit status 130.

    ``entry`` never returns (it ends the process); a ``KeyboardInterrupt`` that
    leaves it came before ``main``'s own handling took over (while dsub loads,
    or while the arguments are read): nothing was written.
    """
    try:
        note_ctrl_c_while_loading()  # raised by entry once dsub is loaded
        from .cli import entry

        entry()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would cut this line short
        from .errors import INTERRUPTED_BEFORE_WRITING

        print(INTERRUPTED_BEFORE_WRITING, file=sys.stderr, flush=True)
        os._exit(130)
