"""The ``dsub`` command's entry point, light enough that an interrupt while Python loads dsub ends in one line.

Loading dsub's libraries (NumPy, pandas, Dask, Zarr) takes about a second; a
Ctrl-C then would print the import's traceback. ``dsub.errors`` imports only
the standard library.
"""

from __future__ import annotations

import os
import sys


def run() -> None:
    """Load the command line and run it (``cli.entry``); Ctrl-C while loading: one line, exit status 130."""
    try:
        from .cli import entry
    except KeyboardInterrupt:
        from .errors import INTERRUPTED_BEFORE_WRITING

        print(INTERRUPTED_BEFORE_WRITING, file=sys.stderr, flush=True)
        os._exit(130)
    entry()
