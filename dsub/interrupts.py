"""How the ``dsub`` command takes Ctrl-C and SIGTERM: one stop, never raised inside Python's import code,
never lost in a finalizer.

Python runs a signal's handler in the main thread between two of its bytecode
instructions, wherever it is. The exception the handler raises
(``KeyboardInterrupt``, ``errors.Terminated``) is unsafe in two kinds of place:

* importlib's own code (``<frozen importlib._bootstrap>``). It takes the
  interpreter's global import lock with ``_imp.acquire_lock()`` one instruction
  before the ``try`` that releases it, in ``_get_module_lock`` and in the
  weak-reference callback that drops each module's lock once it is imported
  (CPython 3.11). Raised there, the exception leaves the lock with the main
  thread for good: every other thread that imports (a task thread, a cluster's
  start) then waits for it, and the run hangs. A Ctrl-C while dsub loaded did
  just that, four threads waiting in ``_imp.acquire_lock``.
* a finalizer or weak-reference callback (that callback among them): Python
  prints "Exception ignored in ..." and drops the exception, and the run went on
  to its end, deaf to any further Ctrl-C.

So dsub's handlers put a stop off while importlib's code runs (``put_off_in_import_code``:
the signal is asked again ``RETRY_S`` later, until it lands elsewhere), and a
stop dropped in a finalizer is asked again (``sys.unraisablehook``). Only
modules that a starting interpreter has loaded already (and ``signal``) are
imported here: the console command sets this up before it loads the rest of
dsub (``dsub.command``), so few imports run under Python's own handler.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import time

from .errors import Terminated

#: Seconds after which a signal put off in importlib's code is asked again.
RETRY_S = 0.005

#: Where importlib's code runs (frozen modules: these are its code objects' file names).
IMPORT_CODE = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")

_stopping = False  # a Ctrl-C has raised dsub's stop; later ones are ignored (``stop_once_on_ctrl_c``)
_retrying: set[int] = set()  # signals to be asked again, each by one thread at a time
_previous_unraisablehook = None
_main_thread: int | None = None  # its ident, where dsub's SIGINT handler is in place


def in_import_code(frame) -> bool:
    """Whether ``frame`` (where a signal handler was called) runs importlib's own code."""
    return frame is not None and frame.f_code.co_filename in IMPORT_CODE


def ask_again_soon(signum: int) -> None:
    """Have ``signum``'s Python handler called again in ``RETRY_S``, as for a new signal.

    From a plain thread of ``_thread``: a handler must not take ``threading``'s
    own locks, which the code it interrupted may hold; and a signal asked for
    from here would be handled at once, here (by this handler, or in a
    finalizer that Python drops it from). SIGINT is sent to the main thread as a
    signal (``signal.pthread_kill``), which also ends a wait it is blocked in.
    """
    if signum in _retrying:
        return
    _retrying.add(signum)

    def again():
        time.sleep(RETRY_S)
        _retrying.discard(signum)
        if signum == signal.SIGINT and signal.getsignal(signum) is _interrupted and _main_thread is not None:
            # A signal itself: it also ends a wait the main thread has gone into meanwhile (a lock, a
            # sleep), where a tripped flag alone waits with it. Safe: dsub's handler only ever gives way to
            # SIG_IGN, never to the default that would end the process.
            signal.pthread_kill(_main_thread, signum)
        else:
            _thread.interrupt_main(signum)  # does nothing once the signal is no longer Python's to handle

    _thread.start_new_thread(again, ())


def put_off_in_import_code(signum: int, frame) -> bool:
    """For a handler called at ``frame``: True, with ``signum`` asked again soon, where ``frame`` is
    importlib's code and raising there could leave the import lock held; else False (raise now)."""
    if not in_import_code(frame):
        return False
    ask_again_soon(signum)
    return True


def stop_for(signum: int, stop: KeyboardInterrupt) -> KeyboardInterrupt:
    """``stop`` (to raise from ``signum``'s handler), marked so that Python dropping it is noticed."""
    stop.dsub_signal = signum
    return stop


def _interrupted(signum, frame):
    """dsub's SIGINT handler (``stop_once_on_ctrl_c``): the first Ctrl-C raises ``KeyboardInterrupt``
    (not inside importlib's code), later ones are ignored."""
    global _stopping
    if _stopping or put_off_in_import_code(signum, frame):
        return
    _stopping = True
    raise stop_for(signum, KeyboardInterrupt())


def _redeliver_dropped_stops(unraisable) -> None:
    """``sys.unraisablehook``: a stop of dsub's handlers that Python dropped (raised in a finalizer) is
    asked again; anything else goes to the hook that was there before."""
    global _stopping
    signum = getattr(unraisable.exc_value, "dsub_signal", None)
    if signum is not None and callable(signal.getsignal(signum)):  # a Python handler, to raise it again
        if signum == signal.SIGINT:
            _stopping = False  # that stop was never taken: the next one is
        ask_again_soon(signum)
        return
    _previous_unraisablehook(unraisable)


def stop_once_on_ctrl_c() -> None:
    """The first SIGINT raises ``KeyboardInterrupt``; later ones are ignored until the process ends.

    A run that stops closes its cluster (dsub's clean-up, then distributed's
    exit-time ``close_clusters``), which takes a second or more; a Ctrl-C
    pressed again meanwhile would interrupt that clean-up and print its
    traceback after dsub's one line. A stop is never raised inside importlib's
    code and one dropped in a finalizer is asked again (see the module's
    docstring). Only for the ``dsub`` process itself (``command.run``,
    ``cli.entry``): ``main`` called from Python leaves the caller's handling alone.
    A SIGINT the process started with ignored (a script without job control
    starts ``dsub ... &`` so) stays ignored, as POSIX asks and Python does.
    """
    global _previous_unraisablehook, _main_thread
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread: only it may set a handler
        return
    if hasattr(signal, "pthread_kill"):
        _main_thread = _thread.get_ident()
    if sys.unraisablehook is not _redeliver_dropped_stops:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _redeliver_dropped_stops


def ignore_further_ctrl_c() -> None:
    """Where dsub's own handler is in place, ignore SIGINT from now on (a stop raised without a signal)."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        with contextlib.suppress(ValueError):  # not the main thread: only it may set a handler
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def terminate_on_sigterm():
    """Turn SIGTERM (a batch system's time limit or preemption) into ``errors.Terminated``, put off like a
    Ctrl-C inside importlib's code; returns the old handler.

    Only the main thread can install it; elsewhere nothing changes (None).
    """
    def terminated(signum, frame):
        if not put_off_in_import_code(signum, frame):  # raised there, it could leave the import lock held
            raise stop_for(signum, Terminated())

    try:
        return signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread: only it may set a handler
        return None
