"""Blank particle images (every pixel the same, usually 0): a failed or empty extraction.

A blank image holds nothing to fit or subtract: its fitted contrast and fit
correlation are exactly 0 (``physics.contrast.fit_contrast``: no power in the
fit band, which leaves out the mean), so the checks of the sample fit, which
compare correlations, see nothing wrong when every image is blank (0 is no
better than 0, and no worse). This module looks for them by themselves:

* before the long run, ``refuse_blank_sample``: every image of the sample blank
  (a blank stack, a failed extraction) refuses the run in one error line naming
  the stacks;
* after it, ``warn_blank_particles``: some blank images among many (one blank
  stack of several, a few empty boxes at a micrograph's edge) are one warning
  naming the stacks that hold them and how many, the run's results kept.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputFileError, first_and_more, warn

#: Stacks named in a line; the rest are counted.
NAMED_STACKS = 3


def blank_images(images: np.ndarray) -> np.ndarray:
    """Which images (n, box, box) are blank: finite and every pixel equal. (n,) bool.

    Images with NaN or infinite values are not blank (``tasks.nonfinite_images``
    finds those).
    """
    flat = np.asarray(images).reshape(len(images), -1)
    if not flat.shape[1]:
        return np.zeros(len(images), dtype=bool)
    with np.errstate(invalid="ignore"):
        return (flat.max(axis=1) == flat.min(axis=1)) & np.isfinite(flat[:, 0])


def _stacks_and_counts(paths: np.ndarray, rows: np.ndarray) -> str:
    """``a.mrcs (all its 300), b.mrcs (12 of its 300) and 2 more stacks`` for the particles ``rows`` of ``paths``."""
    paths = np.asarray(paths, dtype=object)
    named, totals = np.unique(paths.astype(str), return_counts=True)
    total_of = dict(zip(named, totals))
    stacks, counts = np.unique(paths[rows].astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")  # the emptiest first
    words = [f"{stacks[i]} ({'all its ' + str(counts[i]) if counts[i] == total_of[stacks[i]] else f'{counts[i]} of its {total_of[stacks[i]]}'})"
             for i in order[:NAMED_STACKS]]
    if len(stacks) > NAMED_STACKS:
        words.append(f"{len(stacks) - NAMED_STACKS} more stack{'s' if len(stacks) - NAMED_STACKS > 1 else ''}")
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def refuse_blank_sample(table, sample: np.ndarray, blank: np.ndarray, nonfinite: np.ndarray | None = None) -> None:
    """Refuse the run when every readable image of the sample (rows ``sample`` of ``table``) is blank.

    ``blank``, ``nonfinite``: (len(sample),) bool from the sample task. Raises
    ``InputFileError`` naming the particle file and the stacks; returns when at
    least one sample image holds something (the rest is for
    ``warn_blank_particles`` once every particle is known).
    """
    blank = np.asarray(blank, dtype=bool)
    readable = ~np.asarray(nonfinite, dtype=bool) if nonfinite is not None else np.ones(blank.size, bool)
    if not blank.any() or (blank != readable).any():
        return
    rows = np.asarray(sample)[blank]
    paths = np.asarray(table.image_paths, dtype=object)
    stacks = sorted(set(paths[rows].astype(str)))
    named = first_and_more(stacks, NAMED_STACKS)
    raise InputFileError(
        table.source_path or paths[rows[0]],
        f"all {rows.size} sample particle images (spread over its {len(table)} particles, from "
        f"{f'{len(stacks)} stacks: ' if len(stacks) > 1 else 'the stack '}{named}) "
        "are blank, every pixel the same value (as where nothing was extracted), so there is "
        "nothing to fit or subtract.",
        "Check the extraction that wrote these stacks (re-extract the particles), then run again.",
    )


def warn_blank_particles(table, correlation: np.ndarray, skipped: np.ndarray) -> dict:
    """Warn, naming the stacks, when some particles' images were blank; figures for ``dsub_run.json``.

    ``correlation``: every particle's stored fit correlation (n,), exactly 0 for
    an image with no power in the fit band (``contrast.fit_spectra`` on the CPU
    and the GPU alike): an all-zero image always, a constant one unless a
    ``--window-inner`` window shapes it; ``skipped``: (n,) bool, particles left
    out. Returns ``{"blank_particles": count}``.
    """
    blank = (np.asarray(correlation) == 0) & ~np.asarray(skipped, dtype=bool)
    count = int(blank.sum())
    if count:
        rows = np.flatnonzero(blank)
        warn(f"{count} of {len(table)} particle images are blank (every pixel the same value, no signal to fit: "
             f"a failed or empty extraction): {_stacks_and_counts(table.image_paths, rows)}. Their subtracted "
             "images mean nothing: re-extract those stacks, or leave their particles out of the input and run "
             "again.")
    return {"blank_particles": count}
