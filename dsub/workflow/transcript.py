"""What a run prints, on the screen and appended to ``OUTDIR/dsub.log``.

The log holds every attempt of a run (a resumed run appends), each opened by a
line with the time and the command. It gets the same messages as the screen,
dsub's warnings and the final error line, and progress as plain lines once a
minute (never a terminal bar's carriage returns). Lines printed before OUTDIR
is ready (checking the inputs) are kept and written when the log opens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__

LOG_NAME = "dsub.log"


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LogFile:
    """The log file as a stream; holds what is written until it is opened, ignores write errors.

    Written from the main thread and the progress display's thread, hence the lock.
    """

    def __init__(self):
        self._file = None
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self.created: Path | None = None  # the file, where opening it created it
        self._path: Path | None = None
        self._start = 0  # the byte where this run's lines begin in the file

    def open(self, path: Path, fresh: bool, heading: str) -> None:
        existed = path.exists()
        # Line-buffered: a run killed outright (kill -9, the kernel's out-of-memory killer) keeps its lines.
        self._file = open(path, "w" if fresh else "a", encoding="utf-8", buffering=1)
        self.created = None if existed else path
        self._path, self._start = path, self._file.tell()
        self.write(f"==== {heading}\n")
        for text in self._pending:
            self.write(text)
        self._pending = []
        self.flush()

    def drop_earlier(self) -> None:
        """Leave in the file only what this run wrote (an earlier run's log, replaced with --overwrite)."""
        with self._lock:
            if self._file is None or not self._start:
                return
            with contextlib.suppress(OSError, ValueError):
                self._file.flush()
                with open(self._path, "r+b") as file:  # this run's lines moved to the start; then appended to
                    file.seek(self._start)
                    ours = file.read()
                    file.seek(0)
                    file.write(ours)
                    file.truncate()
                self._start = 0

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def write(self, text: str) -> None:
        with self._lock:
            if self._file is None:
                self._pending.append(text)
                return
            with contextlib.suppress(OSError, ValueError):  # a full disk must not hide the real error
                self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            self._file = None


class Transcript:
    """A text stream for dsub's messages: the screen (``screen``) and OUTDIR/dsub.log (``files``).

    Progress displays write their bar to ``screen`` only and plain lines to
    ``files`` (see ``dsub.cluster.progress``).
    """

    def __init__(self, screen):
        self.screen = screen
        self.log = LogFile()

    @property
    def files(self) -> tuple:
        return (self.log,)

    def write(self, text: str) -> None:
        self._to_screen(lambda: self.screen.write(text))
        self.log.write(text)

    def flush(self) -> None:
        self._to_screen(self.screen.flush)
        self.log.flush()

    def _to_screen(self, action) -> None:
        """``action`` on the screen; a screen that is gone (a closed pipe: ``dsub ... | head``) is dropped
        and the run goes on, its lines still in the log."""
        try:
            action()
        except (OSError, ValueError):
            self.screen = open(os.devnull, "w", encoding="utf-8")

    def isatty(self) -> bool:
        try:
            return self.screen.isatty()
        except (AttributeError, ValueError):
            return False

    def fileno(self) -> int:
        """The screen's file descriptor (for its size: ``progress.is_terminal``, tqdm's width); raises as the
        screen's own does where it has none."""
        return self.screen.fileno()

    def open_log(self, outdir: Path, fresh: bool, command: str | None) -> None:
        """Start appending to OUTDIR/dsub.log (``fresh``: replace it; ``drop_earlier`` does so later)."""
        heading = f"{utc_now()} dsub {__version__} on {socket.gethostname()}: {command or '(called from Python)'}"
        try:
            self.log.open(Path(outdir) / LOG_NAME, fresh, heading)
        except OSError:  # no log is better than no run; writing the results will say what is wrong
            pass

    def drop_earlier(self) -> None:
        """Leave in OUTDIR/dsub.log only this run's lines (``--overwrite``, as it replaces the earlier results)."""
        self.log.drop_earlier()

    def log_only(self, line: str) -> None:
        """A line for the log alone (the screen has it from elsewhere, e.g. the error line)."""
        self.log.write(line + "\n")
        self.log.flush()

    def close(self) -> None:
        self.log.close()

    @contextlib.contextmanager
    def capturing_warnings(self):
        """Copy dsub's warnings, as the command line prints them, into the log while the run lasts."""
        shown = warnings.showwarning

        def show(message, category, *rest, **kwargs):
            self.log_only(f"dsub: warning: {message}")
            shown(message, category, *rest, **kwargs)

        warnings.showwarning = show
        try:
            yield self
        finally:
            warnings.showwarning = shown
            self.close()
