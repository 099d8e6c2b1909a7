#!/usr/bin/env python
"""How often a whole run hashes the particles' image paths (``formats.paths.path_codes``), where, and its CPU time.

Runs ``dsub subtract`` on the threads scheduler (CPU, box 32) on a star written by
``benchmarks/scale.py`` (metadata only), with ``path_codes`` wrapped: each call's
caller and the calling thread's CPU time (``time.thread_time``: the worker threads
subtracting meanwhile are not counted). Calls on fewer rows than the table (the
export's per-stack pieces) are listed too.

    .venv/bin/python benchmarks/scale.py --rows 1000000 --rows-run 0 --write-rows --folder scale_data
    .venv/bin/python benchmarks/path_codes_calls.py --folder scale_data --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="the folder of benchmarks/scale.py's data set")
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()

    from dsub.cluster import ClusterSpec
    from dsub.formats import paths
    from dsub.physics.subtract import SubtractionSettings
    from dsub.workflow.pipeline import RunOptions, subtract

    original = paths.path_codes
    calls = []

    def counted(values):
        started = time.thread_time()
        result = original(values)
        frame = traceback.extract_stack(limit=2)[0]  # the caller of path_codes
        calls.append((len(values), time.thread_time() - started, f"{Path(frame.filename).name}:{frame.name}"))
        return result

    for module in list(sys.modules.values()):  # every module that imported the name
        if getattr(module, "__name__", "").startswith("dsub") and getattr(module, "path_codes", None) is original:
            module.path_codes = counted
    folder = Path(args.folder).resolve()
    os.chdir(folder)
    with tempfile.TemporaryDirectory(dir=folder) as outdir:
        options = RunOptions(outdir=Path(outdir), overwrite=True, chunk_size=256, device="cpu",
                             cluster=ClusterSpec(scheduler="threads", workers=2, progress=False))
        subtract(f"particles_{args.rows}.star", "half_A.mrc", "half_B.mrc", "mask.mrc",
                 SubtractionSettings(projector="relion", padding=2.0), options)
    print("| rows | thread CPU s | caller |\n|---:|---:|---|")
    for rows, seconds, caller in calls:
        print(f"| {rows} | {seconds:.3f} | {caller} |")
    whole = [seconds for rows, seconds, _ in calls if rows == args.rows]
    print(f"\n{len(whole)} calls on all {args.rows} rows, {sum(whole):.3f} s; {len(calls)} calls in all, "
          f"{sum(seconds for _, seconds, _ in calls):.3f} s")


if __name__ == "__main__":
    main()
