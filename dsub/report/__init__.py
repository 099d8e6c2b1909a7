"""The QC report of a finished run: ``OUTDIR/report/index.html`` with PNG figures beside it.

``gather`` reads what to show (a sample of images, the contrast, counts, the run
record), ``figures`` draws the PNGs with matplotlib, ``page`` writes the HTML.
The folder links only its own files by relative name, so it can be copied
anywhere and opened in a browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPORT_FOLDER = "report"
PAGE_NAME = "index.html"


def write_report(outdir) -> Path:
    """Write ``outdir/report/`` (replacing an earlier one) and return the path of its ``index.html``.

    Raises ``OptionError`` when ``outdir`` holds no finished run. The page is
    built in a temporary folder beside it and moved into place when complete.
    """
    from . import figures, page  # matplotlib's Figure API on the Agg canvas: no display needed
    from .gather import gather

    outdir = Path(outdir)
    data = gather(outdir)
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
