"""The QC report of a finished run: ``OUTDIR/report/index.html`` with PNG figures beside it.

``gather`` reads what to show (a sample of images, the contrast, counts, the run
record), ``figures`` draws the PNGs with matplotlib, ``page`` writes the HTML.
The folder links only its own files by relative name, so it can be copied
anywhere and opened in a browser.

A run draws it in two steps, so that only reading results and drawing are left
for after the last chunk:

1. once the store exists, ``start_preparation(outdir, table, particles_per_stack)``
   runs ``gather.prepare`` in a background thread (what the particle table
   decides: the report's per-particle columns, written into the store, the
   sample and its examples' input images) and loads matplotlib;
2. after the export, ``write_report(outdir, preparation)`` reads the store's
   per-particle arrays and the sample's exported and input images (a block of
   them at a time, so its memory does not grow with the box), and draws.

``dsub report OUTDIR`` calls ``write_report(outdir)`` alone: the columns then come
from the store (or, for a run of an earlier version, from the exported star).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

REPORT_FOLDER = "report"
PAGE_NAME = "index.html"


class Preparation:
    """``gather.prepare`` running in a daemon thread; ``result()`` waits for it.

    Any failure is kept, not raised: ``write_report`` then reads from the store
    as ``dsub report`` does (``error`` holds what happened).
    """

    def __init__(self, outdir, table, particles_per_stack: int, show_inputs: bool = True):
        self.prepared, self.error = None, None
        self._thread = threading.Thread(target=self._run, args=(outdir, table, particles_per_stack, show_inputs),
                                        name="dsub-report-preparation", daemon=True)
        self._thread.start()

    def _run(self, outdir, table, particles_per_stack, show_inputs):
        try:
            from .gather import prepare

            self.prepared = prepare(outdir, table, particles_per_stack, show_inputs)
            warm_up_drawing()  # at once where ``start_warming_up`` did it already
        except Exception as exc:  # noqa: BLE001 -- the report is drawn without it
            self.error = exc

    def result(self):
        """The ``gather.Prepared``, or None when preparing failed; waits for the thread."""
        self._thread.join()
        return self.prepared


_warming_up = threading.Lock()
_warmed_up = False


def warm_up_drawing() -> None:
    """Import matplotlib and draw a small figure once per process (its fonts and caches); later calls wait
    for the first, then return."""
    global _warmed_up
    with _warming_up:
        if not _warmed_up:
            from . import figures

            figures.warm_up()
            _warmed_up = True


def start_warming_up() -> threading.Thread:
    """``warm_up_drawing`` in a daemon thread, started early in a run.

    Importing matplotlib and loading its fonts is about a second of interpreter
    time; done while the maps are prepared and the workers start, it is not
    taken from the threads that feed the GPU later. Join the thread before the
    run returns: a thread still importing when Python exits can abort it.
    Its failures are left to the report, which draws without the warm-up.
    """
    def warm_up():
        with contextlib.suppress(Exception):
            warm_up_drawing()

    thread = threading.Thread(target=warm_up, name="dsub-report-warm-up", daemon=True)
    thread.start()
    return thread


def start_preparation(outdir, table, particles_per_stack: int, show_inputs: bool = True) -> Preparation:
    """Start preparing the report of the run writing ``outdir``, in a background thread.

    Call it after the run's store is created (``store.create_store``, or taken up
    on a resume) and before the chunks run. ``table``: the run's ``ParticleTable``
    (read, not modified); ``particles_per_stack``: the run's value (where each
    particle lies in the exported stacks); ``show_inputs`` false for re-centred
    or re-boxed particles (``--recenter``, ``--center``, ``--new-box``), whose
    inputs are not shown. Pass the returned ``Preparation`` to ``write_report``.
    """
    return Preparation(outdir, table, particles_per_stack, show_inputs)


def write_report(outdir, preparation=None) -> Path:
    """Write ``outdir/report/`` (replacing an earlier one) and return the path of its ``index.html``.

    ``preparation``: what ``start_preparation`` returned for this run (or a
    ``gather.Prepared``); without it, or when it failed, everything is read
    from ``outdir``. Raises ``OptionError`` when ``outdir`` holds no finished
    run. The page is built in a temporary folder beside it and moved into place
    when complete.
    """
    from . import figures, page  # matplotlib's Figure API on the Agg canvas: no display needed
    from .gather import gather

    outdir = Path(outdir)
    prepared = preparation.result() if isinstance(preparation, Preparation) else preparation
    data = gather(outdir, prepared)
    if data.scale == "input" and data.sample_fit is None:
        data.notes.append("The contrast fitted on a sample against the input's (--scale input) was not recorded "
                          "by this run.")
    target = outdir / REPORT_FOLDER
    partial = outdir / f".{REPORT_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        drawn = {draw.__name__: draw(data, partial) for draw in figures.FIGURES}
        (partial / PAGE_NAME).write_text(page.render(data, drawn), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target / PAGE_NAME
