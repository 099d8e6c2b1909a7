"""The coordinator's share of a whole ``dsub subtract``: the input checks and the export, per row.

    python benchmarks/fixed_costs.py [--particles 32768] [--box 64] [--referenced 3] [--folder /tmp]
                                     [--schedulers threads local] [--repeats 3] [--device cpu]

Writes ``multi_gpu.py``'s data set (noise images, ``--referenced`` star rows per
image as after symmetry expansion) and computes it once with ``--keep-store
--float16``; both are kept in ``--folder`` and taken up by a later call with the
same figures. Then it reruns that command (``--scheduler`` each of
``--schedulers``): a rerun that finds every chunk done starts no worker,
prepares no map and fits no sample, so its phases are the parts of a run that
do not shrink with GPUs and grow with the rows: the input checks (reading the
star, checking maps and stacks; a ``local`` cluster starting beside them in the
same process), the export (the stacks' headers, the per-particle figures read
back from the store, the star and ``.cs`` written) and the rest (imports, the
QC report, the exit). It prints wall seconds per phase, then CPU seconds of the
per-row steps run here one by one: reading the star, writing the star and the
``.cs``, reading the store's figures.

The data set is box 64 by default: the per-row costs do not depend on the box,
and 98 304 rows then take 0.5 GB of stacks and 1.6 GB of output. To compare
two trees, run it from outside the repository with ``PYTHONPATH=TREE`` (from
inside, ``python -m dsub.cli`` finds the repository's own ``dsub`` first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import write_dataset  # noqa: E402


def command(paths: dict, outdir: Path, scheduler: str, device: str) -> list[str]:
    return [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
            "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir),
            "--scheduler", scheduler, "--device", device, "--quiet", "--keep-store", "--float16",
            "--dashboard-address", "127.0.0.1:0"]


def dataset(folder: Path, images: int, box: int, referenced: int) -> dict:
    """The data set in ``folder``, written unless a complete one of these figures is there."""
    marker = folder / "dataset.json"
    figures = {"images": images, "box": box, "referenced": referenced}
    names = {name: folder / f"{name}.mrc" for name in ("half_a", "half_b", "mask")} | {"star": folder / "particles.star"}
    if marker.exists() and json.loads(marker.read_text()) == figures:
        return names
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    paths = write_dataset(folder, images, box, referenced)
    marker.write_text(json.dumps(figures))
    print(f"data set: {images} images of {box} px, {images * referenced} star rows, written in "
          f"{time.perf_counter() - started:.1f} s")
    return paths


def computed(paths: dict, outdir: Path, rows: int, device: str) -> None:
    """The run every rerun takes up, computed unless ``outdir`` holds it."""
    summary = outdir / "dsub_run.json"
    if summary.exists() and json.loads(summary.read_text()).get("particles") == rows:
        return
    shutil.rmtree(outdir, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(command(paths, outdir, "threads", device), check=True, capture_output=True)
    print(f"first run (computing {rows} particles): {time.perf_counter() - started:.1f} s")


def rerun(paths: dict, outdir: Path, scheduler: str, device: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command(paths, outdir, scheduler, device), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"dsub failed:\n{result.stdout}{result.stderr}")
    phases = json.loads((outdir / "dsub_run.json").read_text())["phase_seconds"]
    return {"wall": wall, "check_inputs": phases["check_inputs"], "export": phases["export"],
            "rest": wall - phases["check_inputs"] - phases["export"]}


#: Run in a fresh process, as the command reads the star: a small star of the file's first rows first (what
#: reading imports), then the file; prints its CPU seconds and how much the peak resident memory grew.
READ_ONCE = """
import resource, sys, time
from pathlib import Path
from dsub.formats import read_particles
star, head = Path(sys.argv[1]), Path(sys.argv[2])
lines, rows = [], 0
with open(star) as f:  # line by line: holding the whole file here would hide the reading's own peak
    for line in f:
        lines.append(line)
        rows += "@" in line
        if rows == 100:
            break
head.write_text("".join(lines))
read_particles(head)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.process_time()
read_particles(star)
print(time.process_time() - started, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def per_row_steps(paths: dict, outdir: Path) -> tuple[dict, int]:
    """CPU seconds of the coordinator's per-row steps, each run on its own; and the bytes reading the star added
    to the peak.

    The star is read once in a fresh process (``READ_ONCE``): ``starfile`` keeps
    the lines of a file it read (``linecache``), so a second reading in one
    process is faster than the command's one. The other steps are timed here
    on their second call (the first loads what they import).
    """
    from dsub.formats import read_particles
    from dsub.workflow import export, store

    store_path = outdir / store.STORE_NAME
    seconds = {}

    def timed(name, step):
        step()
        started = time.process_time()
        value = step()
        seconds[name] = time.process_time() - started
        return value

    with tempfile.TemporaryDirectory() as folder:
        read = subprocess.run([sys.executable, "-c", READ_ONCE, str(paths["star"]), str(Path(folder) / "head.star")],
                              capture_output=True, text=True, check=True).stdout.split()
    seconds["read the star"], peak_bytes = float(read[0]), int(read[1])
    table = read_particles(paths["star"])
    timed("read the store's statistics", lambda: store.image_statistics(store_path))
    fit = timed("read the store's per-particle figures", lambda: store.per_particle(store_path))
    contrast = fit.pop("contrast")
    skipped = np.zeros(len(table), dtype=bool)
    with tempfile.TemporaryDirectory() as folder:
        timed("write the star and .cs", lambda: export.write_metadata(
            table, Path(folder), export.DEFAULT_PARTICLES_PER_STACK, contrast, skipped, None, "auto", dict(fit)))
    return seconds, peak_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=32768, help="images in the stack")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--referenced", type=int, default=3, help="star rows per image (symmetry expansion)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--schedulers", nargs="+", default=["threads", "local"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = args.particles * args.referenced
    # A short folder name: the star names the stack by its path, and multi_gpu.py's star of 98 304 rows in a
    # temporary folder (16.0-16.4 MB) is that long too.
    base = args.folder / f"fc{args.particles}x{args.referenced}_{args.box}"
    paths = dataset(base / "d", args.particles, args.box, args.referenced)
    outdir = base / "out"
    computed(paths, outdir, rows, args.device)
    print(f"| scheduler | wall s | check inputs s | export s | rest s (imports, QC report, exit) |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeats):
        for scheduler in args.schedulers:
            run = rerun(paths, outdir, scheduler, args.device)
            print(f"| {scheduler} | {run['wall']:.2f} | {run['check_inputs']:.2f} | {run['export']:.2f} | "
                  f"{run['rest']:.2f} |", flush=True)
    steps, peak_bytes = per_row_steps(paths, outdir)
    print(f"\nper-row steps at {rows} rows (CPU s, µs a row):")
    for name, seconds in steps.items():
        print(f"  {name}: {seconds:.3f} s, {1e6 * seconds / rows:.1f} µs")
    print(f"  reading the star added {peak_bytes / 2**20:.0f} MiB to the peak resident memory")


if __name__ == "__main__":
    main()
