"""What the record of an earlier dsub run says about a run on its output: said before the long work.

A run on dsub's own output (``table.extra["dsub_output"]``) reads that run's
``dsub_run.json`` when it lies beside the input star or .cs and its outputs name
that file, and from there the records of the runs before it (each record names
its own input, ``inputs.particles``; up to ``MAX_CHAIN`` runs back). What comes
from them, each one ``dsub: warning:`` line:

* the contrast ``--scale input`` would reuse was fitted low: the earlier run
  fitted it (``--scale fit``) on an even earlier run's output with maps that
  still held the region removed there, and its sample check found the fit
  below that run's contrast (``diagnostics.check_earlier_contrast``:
  ``fit_below_earlier``). The contrast column cannot tell this: only the record
  can. A ``--scale input`` run that reused such a contrast records where it
  came from (``contrast_fitted_low``), so a run on its output is told too;
* this run's mask is the one an earlier run subtracted with (same content,
  same side kept): that region was already subtracted;
* else, much of the density in this run's region lies in a region an earlier
  run subtracted (``region_overlaps``: the share of the half maps' positive
  density inside this run's region that is also inside the earlier one, at
  least ``OVERLAP_WARNING``): that part would be subtracted twice, leaving
  negative density. Masks of neighbouring domains share only their soft edges.

A record that is missing, unreadable or written for other files gives nothing:
no warning, no error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import warn
from ..physics.subtract import subtraction_region
from .outdir import HASH_KEY, content_hash, file_identity, modified

#: The run record's file name (``pipeline.RUN_SUMMARY``).
RECORD_NAME = "dsub_run.json"
#: Output keys of a record that name the metadata files a later run may read.
OUTPUT_KEYS = ("star", "cs")
#: How many runs back the records are followed.
MAX_CHAIN = 16
#: Share of this region's density inside an earlier run's region from which the overlap is warned about.
OVERLAP_WARNING = 0.10
#: Planes of an earlier mask read at once (memory: this many planes, not the whole map).
PLANES_AT_ONCE = 16


def earlier_record(table, particles_path) -> tuple[Path, dict] | None:
    """(path, contents) of the record of the dsub run that wrote ``particles_path``; None where there is none.

    Only for dsub's output (``table.extra["dsub_output"]``), only a
    ``dsub_run.json`` in the input's own folder whose ``outputs`` name the
    input's file name (``record_of``); a missing or unreadable record is None.
    """
    if table.extra.get("dsub_output") is None:
        return None
    return record_of(particles_path)


def hash_of(path: Path) -> str:
    """``outdir.content_hash`` of ``path``, once per file content (path, size, modification time): the
    records of a chain compare the same masks again."""
    status = os.stat(path)
    return _hash_of_version(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _hash_of_version(path: str, size: int, modified_ns: int) -> str:
    return content_hash(path)


def record_of(particles_path) -> tuple[Path, dict] | None:
    """(path, contents) of the ``dsub_run.json`` beside ``particles_path`` whose outputs name it; else None."""
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


def earlier_records(table, particles_path, limit: int = MAX_CHAIN) -> list[tuple[Path, dict]]:
    """The records of the runs that led to ``particles_path``, the nearest first (``earlier_record``, then
    each record's own input, ``inputs.particles.path``); at most ``limit``, a record never twice."""
    found = earlier_record(table, particles_path)
    records: list[tuple[Path, dict]] = []
    while found is not None and len(records) < limit and found[0] not in {path for path, _ in records}:
        records.append(found)
        earlier_input = ((found[1].get("inputs") or {}).get("particles") or {})
        path = earlier_input.get("path") if isinstance(earlier_input, dict) else None
        found = record_of(path) if isinstance(path, str) else None
    return records


def holds_recorded_content(path, entry: dict) -> bool:
    """Whether the file at ``path`` has the content a record's file entry (``record.describe_file``) describes:
    its size and content hash (``outdir.content_hash``) where the entry holds one, else its path, size and
    modification time."""
    path = Path(path)
    try:
        if entry.get("bytes") != path.stat().st_size:
            return False
        if entry.get(HASH_KEY):
            return hash_of(path) == entry[HASH_KEY]
        return entry.get("path") == str(path.resolve()) and entry.get("modified") == modified(file_identity(path))
    except OSError:
        return False


def earlier_mask(contents: dict) -> tuple[Path, bool] | None:
    """(path, mask_keeps) of the mask an earlier run subtracted with, where that file is still the one it
    read (``holds_recorded_content``); else None."""
    earlier = (contents.get("inputs") or {}).get("mask")
    keeps = (contents.get("subtracted_region") or {}).get("mask_keeps", False)
    if not isinstance(earlier, dict) or not isinstance(earlier.get("path"), str):
        return None
    path = Path(earlier["path"])
    return (path, bool(keeps)) if holds_recorded_content(path, earlier) else None


def region_overlaps(records, half_map_a, half_map_b, mask, mask_keeps: bool) -> dict[Path, float]:
    """Per earlier record: the share of the positive density of (half_map_a + half_map_b) inside this run's
    region that also lies inside the region that run subtracted, in [0, 1].

    ``half_map_a``, ``half_map_b``, ``mask``: this run's maps, (N, N, N) float
    arrays as read (``validate.check_maps``); the region is ``mask``, or
    ``1 − mask`` with ``mask_keeps`` (``physics.subtract.subtraction_region``),
    as for the earlier run with its own ``mask_keeps``. An earlier mask that is
    gone, changed since (``earlier_mask``), unreadable or of another shape is
    left out. The earlier mask is read ``PLANES_AT_ONCE`` planes at a time.
    """
    shares: dict[Path, float] = {}
    for record_path, contents in records:
        with contextlib.suppress(Exception):  # an earlier mask that cannot be compared: nothing to say
            found = earlier_mask(contents)
            if found is None:
                continue
            path, earlier_keeps = found
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header
                shape = (int(header.nz), int(header.ny), int(header.nx))
                dtype = mrcfile.utils.data_dtype_from_header(header)
                offset = 1024 + int(header.nsymbt)
            if shape != tuple(mask.shape):
                continue
            plane = shape[1] * shape[2]
            inside = both = 0.0
            with open(path, "rb") as stream:
                for first in range(0, shape[0], PLANES_AT_ONCE):
                    planes = slice(first, min(first + PLANES_AT_ONCE, shape[0]))
                    count = (planes.stop - planes.start) * plane
                    stream.seek(offset + first * plane * dtype.itemsize)
                    earlier = np.fromfile(stream, dtype=dtype, count=count)
                    if earlier.size != count:
                        raise ValueError(f"{path} is shorter than its header says")
                    earlier = earlier.astype(np.float32).reshape(-1, *shape[1:])
                    density = np.maximum(np.asarray(half_map_a[planes], dtype=np.float32)
                                         + np.asarray(half_map_b[planes], dtype=np.float32), 0.0)
                    density *= subtraction_region(np, np.asarray(mask[planes], dtype=np.float32), mask_keeps)
                    inside += float(density.sum(dtype=np.float64))
                    both += float((density * subtraction_region(np, earlier, earlier_keeps)).sum(dtype=np.float64))
            if inside > 0:
                shares[record_path] = both / inside
    return shares


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
    """Whether ``mask`` has the content of the mask the earlier run subtracted with, the same side kept
    (``holds_recorded_content``)."""
    earlier = ((contents.get("inputs") or {}).get("mask") or {})
    region = contents.get("subtracted_region") or {}
    if not isinstance(earlier, dict) or region.get("mask_keeps", False) != mask_keeps:
        return False
    return holds_recorded_content(mask, earlier)


def check_earlier_records(records, mask, scale: str, mask_keeps: bool, overlaps: dict | None = None) -> dict:
    """Warn, from the earlier runs' records (``earlier_records``, the nearest first), as the module says;
    ``overlaps``: ``region_overlaps`` of them. Returns what goes under "chain" in this run's
    ``dsub_run.json`` (empty where there is no record). Never raises on a bad record."""
    if not records:
        return {}
    overlaps = overlaps or {}
    record_path, contents = records[0]
    figures: dict = {"earlier_record": str(record_path)}
    repeated = low = None
    for earlier_path, earlier_contents in records:
        with contextlib.suppress(Exception):  # a record of another shape: nothing to say (the warnings come after)
            if same_mask(earlier_path, earlier_contents, mask, mask_keeps):
                repeated = (earlier_path, (earlier_contents.get("inputs") or {}).get("mask", {}).get("path", mask))
                break
    with contextlib.suppress(Exception):
        low = fitted_low(record_path, contents) if scale == "input" else None
    if repeated:
        figures["mask_already_subtracted"] = True
        which = "the run that wrote these particles" if repeated[0] == record_path else "an earlier run"
        warn(f"this mask ({mask}) is the one {which} subtracted with ({repeated[1]}, "
             f"per {repeated[0]}): its region was already subtracted by that run, and subtracting it again removes "
             "only what that run left of it. Give the mask of the region still to be removed.")
    elif overlaps:
        earlier_path, share = max(overlaps.items(), key=lambda item: item[1])
        figures["region_already_subtracted_share"] = round(share, 4)
        if share >= OVERLAP_WARNING:
            earlier = dict(records).get(earlier_path, {})
            earlier_mask_path = ((earlier.get("inputs") or {}).get("mask") or {}).get("path")
            figures["region_already_subtracted_record"] = str(earlier_path)
            warn(f"{share:.0%} of the density in this mask's region ({mask}) lies in the region an earlier run "
                 f"already subtracted from these particles ({earlier_mask_path}, per {earlier_path}): that part "
                 "would be subtracted a second time, leaving negative density there. Give a mask of the region "
                 "still to be removed, without the part already subtracted.")
    if low is not None:
        figures["contrast_fitted_low"] = low
        ratio = low["ratio"]
        warn(f"the contrast --scale input would reuse was fitted low: the run recorded in {low['record']} "
             f"fitted it with --scale fit on an earlier dsub run's output, at {ratio:.2f} times that run's "
             f"contrast, so this run would subtract at about {ratio:.0%} of the right strength and leave about "
             f"{1 - ratio:.0%} of this mask's region in the images. Rerun that step with --scale input from "
             "its own input, then this step on its output.")
    return figures
