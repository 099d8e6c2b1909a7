"""Peak memory of the QC report against the box: prepared as a run prepares it, then drawn.

    python benchmarks/report_memory.py [--boxes 128 256 384] [--particles 300] [--pixel-size 1.0]

For each box, builds a finished run's output folder as ``report_speed.py`` does
(noise input images, results = 0.9 × input, the star and store dsub's export
writes; no subtraction; ``--pixel-size`` 3 Å or more: the examples are shown
unbinned, the largest figure), then, in a fresh process under two malloc arenas (as
``tests/test_report.py`` measures it), loads the drawing library and Zarr's
threads first (a run has them already) and measures what
``start_preparation(...)`` + ``write_report(OUTDIR, preparation)`` add at their
peak: mapped (VmSize) and resident (RSS) memory, sampled every 2 ms, and the
peak of Python's and NumPy's allocations (``tracemalloc``). Also prints
``resources.report_bytes``, what a run under ``ulimit -v`` plans for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_speed  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402
from report_speed import PER_STACK, finished_run, write_dataset  # noqa: E402


def child(outdir: Path, star: Path) -> dict:
    import tracemalloc

    from dsub.formats import read_particles
    from dsub.report import start_preparation, warm_up_drawing, write_report
    from dsub.workflow import store

    table = read_particles(star)
    warm_up_drawing()
    store.read_arrays(outdir / store.STORE_NAME, ("skipped",))
    with PeakMemory() as peak:
        tracemalloc.start()
        started = time.process_time()
        write_report(outdir, start_preparation(outdir, table, PER_STACK))
        cpu = time.process_time() - started
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"mapped": peak.mapped, "resident": peak.resident, "traced": traced, "cpu_s": cpu}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--pixel-size", type=float, default=report_speed.PIXEL_SIZE, help="Å")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    from dsub.workflow import resources

    report_speed.PIXEL_SIZE = args.pixel_size

    environment = {**os.environ, "MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}
    mb = 2**20
    print(f"{args.particles} particles of {args.pixel_size:g} Å pixels")
    print(f"{'box':>5} {'mapped MB':>10} {'resident MB':>12} {'traced MB':>10} {'CPU s':>6} {'report_bytes MB':>16}")
    for box in args.boxes:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            star = write_dataset(folder, args.particles, box, args.particles)
            outdir = folder / "out"
            finished_run(star, outdir)
            done = subprocess.run([sys.executable, __file__, "--child", str(outdir), str(star)], capture_output=True,
                                  text=True, env=environment)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{box:>5} {figures['mapped'] / mb:>10.0f} {figures['resident'] / mb:>12.0f} "
                  f"{figures['traced'] / mb:>10.0f} {figures['cpu_s']:>6.1f} "
                  f"{resources.report_bytes(args.particles, box) / mb:>16.0f}", flush=True)


if __name__ == "__main__":
    main()
