"""How the ``dsub`` process turns Ctrl-C and SIGTERM into exceptions, and never inside an import.

Standard library only, so that the console command can install it before it
loads dsub's libraries (``command.run``).

Python runs a signal handler in the main thread between two bytecodes, so an
exception it raises can surface anywhere, also inside ``importlib._bootstrap``
(pure Python) between the acquisition of the interpreter's import lock and the
``try`` that releases it. A run imports modules lazily in its main thread while
a background thread imports others (the report's matplotlib warm-up): an
interrupt at that point left the import lock held for good, the background
thread waiting on it, and the stopping run waiting on that thread, for ever.
dsub's handlers therefore put the exception off while the interrupted frame is
import machinery: they raise the signal again a moment later
(``RETRY_SECONDS``) and raise the exception once the main thread is back in
ordinary code. While the command loads its libraries a Ctrl-C is only noted
(a library's ``except:`` around an optional import would swallow the
exception, and the run would go on); it is raised when loading is done.

A SIGINT that the process inherited as ignored (a batch script's ``cmd &``
without job control) stays ignored, as POSIX asks of programs and as Python does.
"""

from __future__ import annotations

import signal
import threading

from .errors import Terminated

#: How long a handler that found the main thread inside the import machinery waits before the signal is raised again.
RETRY_SECONDS = 0.02

#: The interpreter's import machinery: an exception raised in these frames can leave the import lock held.
IMPORT_MACHINERY = frozenset({"<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"})


def inside_import_machinery(frame) -> bool:
    """Whether ``frame`` (the one a signal interrupted) is running ``importlib``'s own code."""
    return frame is not None and frame.f_code.co_filename in IMPORT_MACHINERY


def _again_later(signum: int) -> None:
    """Send ``signum`` to the main thread again after ``RETRY_SECONDS`` (its handler then runs anew).

    To the main thread itself (``pthread_kill``), so that a blocking call there
    is interrupted as by the first signal.
    """
    timer = threading.Timer(RETRY_SECONDS, signal.pthread_kill, (threading.main_thread().ident, signum))
    timer.daemon = True
    timer.start()


_noted = False


def _note(signum, frame):
    """The SIGINT handler while the command loads (``note_ctrl_c_while_loading``): remember it, raise nothing."""
    global _noted
    _noted = True


def note_ctrl_c_while_loading() -> None:
    """Until ``stop_once_on_ctrl_c``, a Ctrl-C is remembered, not raised (not where SIGINT is ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _note)


def _interrupted(signum, frame):
    """dsub's SIGINT handler (``stop_once_on_ctrl_c``): ignore the next ones, raise ``KeyboardInterrupt``
    (put off while the main thread is in the import machinery)."""
    if inside_import_machinery(frame):
        _again_later(signum)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _terminated(signum, frame):
    """dsub's SIGTERM handler (``terminate_on_sigterm``): raise ``Terminated`` (put off like ``_interrupted``)."""
    if inside_import_machinery(frame):
        _again_later(signum)
        return
    raise Terminated()


def stop_once_on_ctrl_c() -> None:
    """The first SIGINT raises ``KeyboardInterrupt``; later ones are ignored until the process ends.

    A run that stops closes its cluster (dsub's clean-up, then distributed's
    exit-time ``close_clusters``), which takes a second or more; a Ctrl-C
    pressed again meanwhile would interrupt that clean-up and print its
    traceback after dsub's one line. Only for the ``dsub`` process itself
    (``cli.entry``): ``main`` called from Python leaves the caller's handler
    alone. A SIGINT ignored already is left ignored. Raises ``KeyboardInterrupt``
    for a Ctrl-C noted while the command loaded (``note_ctrl_c_while_loading``).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if current is signal.SIG_IGN:
        return
    if current is _note and _noted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, _interrupted)


def ignore_further_ctrl_c() -> None:
    """Where dsub's own handler is in place, ignore SIGINT from now on (a stop raised without a signal)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def terminate_on_sigterm():
    """Turn SIGTERM (a batch system's time limit or preemption) into ``Terminated``; returns the old handler.

    Only the main thread can install it; elsewhere nothing changes (None).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)
