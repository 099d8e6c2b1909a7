"""What the record of an earlier dsub run says about a run on its output: said before the long work.

A run on dsub's own output (``table.extra["dsub_output"]``) reads that run's
``dsub_run.json`` when it lies beside the input star or .cs and its outputs name
that file. Two findings come from it, each one ``dsub: warning:`` line:

* the contrast ``--scale input`` would reuse was fitted low: the earlier run
  fitted it (``--scale fit``) on an even earlier run's output with maps that
  still held the region removed there, and its sample check found the fit
  below that run's contrast (``diagnostics.check_earlier_contrast``:
  ``fit_below_earlier``). The contrast column cannot tell this: only the record
  can. A ``--scale input`` run that reused such a contrast records where it
  came from (``contrast_fitted_low``), so a run on its output is told too;
* this run's mask is the one the earlier run subtracted with (same content,
  same side kept): that region was already subtracted.

A record that is missing, unreadable or written for other files gives nothing:
no warning, no error.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..errors import warn
from .outdir import HASH_KEY, content_hash, file_identity, modified

#: The run record's file name (``pipeline.RUN_SUMMARY``).
RECORD_NAME = "dsub_run.json"
#: Output keys of a record that name the metadata files a later run may read.
OUTPUT_KEYS = ("star", "cs")


def earlier_record(table, particles_path) -> tuple[Path, dict] | None:
    """(path, contents) of the record of the dsub run that wrote ``particles_path``; None where there is none.

    Only for dsub's output (``table.extra["dsub_output"]``), only a
    ``dsub_run.json`` in the input's own folder whose ``outputs`` name the
    input's file name; a missing or unreadable record is None.
    """
    if table.extra.get("dsub_output") is None:
        return None
    particles = Path(particles_path)
    path = particles.parent / RECORD_NAME
    try:
        contents = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    outputs = contents.get("outputs") if isinstance(contents, dict) else None
    if not isinstance(outputs, dict) or particles.name not in {outputs.get(key) for key in OUTPUT_KEYS}:
        return None
    return path.resolve(), contents


def fitted_low(record_path: Path, contents: dict) -> dict | None:
    """Where the contrast the earlier run wrote was fitted low: {"record", "ratio"}; else None.

    The earlier run fitted its contrast (``scale`` "fit") and its sample check
    found it below the contrast of the run before (``fit_below_earlier``), or it
    reused (``scale`` "input") a contrast its own record marks as fitted low.
    """
    scale = contents.get("scale")
    if scale == "input":
        inherited = (contents.get("chain") or {}).get("contrast_fitted_low")
        usable = (isinstance(inherited, dict) and isinstance(inherited.get("record"), str)
                  and isinstance(inherited.get("ratio"), (int, float)))
        return {"record": inherited["record"], "ratio": float(inherited["ratio"])} if usable else None
    if scale != "fit":
        return None
    sample = ((contents.get("diagnostics") or {}).get("sample") or {})
    ratio = sample.get("median_ratio_fitted_to_earlier")
    if sample.get("fit_below_earlier") is True and isinstance(ratio, (int, float)):
        return {"record": str(record_path), "ratio": float(ratio)}
    return None


def same_mask(record_path: Path, contents: dict, mask, mask_keeps: bool) -> bool:
    """Whether ``mask`` has the content of the mask the earlier run subtracted with, the same side kept.

    Compared by content hash (``outdir.content_hash``) where the record holds
    one, else by path, size and modification time.
    """
    earlier = ((contents.get("inputs") or {}).get("mask") or {})
    region = contents.get("subtracted_region") or {}
    if not isinstance(earlier, dict) or region.get("mask_keeps", False) != mask_keeps:
        return False
    mask = Path(mask)
    try:
        size = mask.stat().st_size
        if earlier.get("bytes") != size:
            return False
        if earlier.get(HASH_KEY):
            return content_hash(mask) == earlier[HASH_KEY]
        return earlier.get("path") == str(mask.resolve()) and earlier.get("modified") == modified(file_identity(mask))
    except OSError:
        return False


def check_earlier_record(table, particles_path, mask, scale: str, mask_keeps: bool) -> dict:
    """Warn, from the earlier run's record (``earlier_record``), as the module says; returns what goes under
    "chain" in this run's ``dsub_run.json`` (empty where there is no record). Never raises on a bad record."""
    found = earlier_record(table, particles_path)
    if found is None:
        return {}
    record_path, contents = found
    figures: dict = {"earlier_record": str(record_path)}
    repeated = low = None
    with contextlib.suppress(Exception):  # a record of another shape: nothing to say (the warnings come after)
        repeated = same_mask(record_path, contents, mask, mask_keeps)
        earlier_mask = (contents.get("inputs") or {}).get("mask", {}).get("path", mask)
    with contextlib.suppress(Exception):
        low = fitted_low(record_path, contents) if scale == "input" else None
    if repeated:
        figures["mask_already_subtracted"] = True
        warn(f"this mask ({mask}) is the one the run that wrote these particles subtracted with ({earlier_mask}, "
             f"per {record_path}): its region was already subtracted by that run, and subtracting it again removes "
             "only what that run left of it. Give the mask of the region still to be removed.")
    if low is not None:
        figures["contrast_fitted_low"] = low
        ratio = low["ratio"]
        warn(f"the contrast --scale input would reuse was fitted low: the run recorded in {low['record']} "
             f"fitted it with --scale fit on an earlier dsub run's output, at {ratio:.2f} times that run's "
             f"contrast, so this run would subtract at about {ratio:.0%} of the right strength and leave about "
             f"{1 - ratio:.0%} of this mask's region in the images. Rerun that step with --scale input from "
             "its own input, then this step on its output.")
    return figures
