"""How long ``dsub report`` takes on a large run: it reads a sample of images, never all of them.

    python benchmarks/report_speed.py [--particles 4096] [--box 256]

Builds a finished run's output folder without running the subtraction (noise
input stacks as in multi_gpu.py, result stacks = 0.9 × input, the star and .cs
files written by dsub's own export, a store holding contrast but no images),
then times ``write_report`` twice: the first includes importing matplotlib.
CPU time is printed too, as wall time on a busy machine says little.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import write_dataset  # noqa: E402

from dsub.formats import read_particles  # noqa: E402
from dsub.formats.mrc import open_stack, write_stack  # noqa: E402
from dsub.workflow import export, store  # noqa: E402
from dsub.workflow.pipeline import RUN_SUMMARY  # noqa: E402

PER_STACK = 4096
CHUNK = 256


def finished_run(paths: dict, outdir: Path) -> None:
    table = read_particles(paths["star"])
    count, box = len(table), int(table.box_size[0])
    source = open_stack(paths["star"].parent / "particles.mrcs")
    for relative, start, stop in export.stack_layout(count, PER_STACK):
        (outdir / relative).parent.mkdir(parents=True, exist_ok=True)
        with write_stack(outdir / relative, (stop - start, box, box), 1.0) as mrc:
            for first in range(start, stop, 512):
                last = min(first + 512, stop)
                mrc.data[first - start:last - start] = 0.9 * source[first:last]
    contrast = np.random.default_rng(1).normal(1.0, 0.15, count).astype(np.float32)
    group = store.create_store(outdir / store.STORE_NAME, count, box, CHUNK, {
        "dsub": "benchmark", "particles": {"path": str(paths["star"])}, "settings": {"scale": "fit"}})
    group["contrast"][:] = contrast
    export.write_metadata(table, outdir, PER_STACK, contrast)
    (outdir / RUN_SUMMARY).write_text(json.dumps({"particles": count, "box": box, "scale": "fit"}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=4096)
    parser.add_argument("--box", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = write_dataset(folder, args.particles, args.box)
        outdir = folder / "out"
        finished_run(paths, outdir)
        from dsub.report import write_report

        for attempt in ("first (imports matplotlib)", "second"):
            started, cpu = time.perf_counter(), time.process_time()
            write_report(outdir)
            print(f"report of {args.particles} particles of {args.box} px, {attempt}: "
                  f"{time.perf_counter() - started:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
