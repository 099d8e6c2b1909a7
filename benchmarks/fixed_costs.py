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
and 98 304 rows then take 0.5 GB of stacks and 1.6 GB of output.
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


def star_head(star: Path, folder: Path, rows: int = 100) -> Path:
    """The first ``rows`` particles of ``star`` (header and optics included) as a star file in ``folder``."""
    lines = star.read_text().splitlines(keepends=True)
    first_row = next(number for number, line in enumerate(lines) if "@" in line)
    head = folder / "head.star"
    head.write_text("".join(lines[:first_row + rows]))
    return head


def per_row_steps(paths: dict, outdir: Path) -> dict:
    """CPU seconds of the coordinator's per-row steps, each run here on its own.

    Each step is timed on its second call (the first loads what it imports),
    but the star is read once, after a small star of its first rows: ``starfile``
    keeps the lines of a file it read (``linecache``), so a second reading of
    the same file would be faster than the command's one.
    """
    from dsub.formats import read_particles
    from dsub.workflow import export, store

    store_path = outdir / store.STORE_NAME
    seconds = {}

    def timed(name, step, first=None):
        (first or step)()  # the first call loads what the step imports
        started = time.process_time()
        value = step()
        seconds[name] = time.process_time() - started
        return value

    with tempfile.TemporaryDirectory() as folder:
        head = star_head(paths["star"], Path(folder))
        table = timed("read the star", lambda: read_particles(paths["star"]), lambda: read_particles(head))
    timed("read the store's statistics", lambda: store.image_statistics(store_path))
    fit = timed("read the store's per-particle figures", lambda: store.per_particle(store_path))
    contrast = fit.pop("contrast")
    skipped = np.zeros(len(table), dtype=bool)
    with tempfile.TemporaryDirectory() as folder:
        timed("write the star and .cs", lambda: export.write_metadata(
            table, Path(folder), export.DEFAULT_PARTICLES_PER_STACK, contrast, skipped, None, "auto", dict(fit)))
    return seconds


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
    base = args.folder / f"dsub_fixed_costs_{args.particles}x{args.referenced}_{args.box}"
    paths = dataset(base / "data", args.particles, args.box, args.referenced)
    outdir = base / "out"
    computed(paths, outdir, rows, args.device)
    print(f"| scheduler | wall s | check inputs s | export s | rest s (imports, QC report, exit) |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeats):
        for scheduler in args.schedulers:
            run = rerun(paths, outdir, scheduler, args.device)
            print(f"| {scheduler} | {run['wall']:.2f} | {run['check_inputs']:.2f} | {run['export']:.2f} | "
                  f"{run['rest']:.2f} |", flush=True)
    steps = per_row_steps(paths, outdir)
    print(f"\nper-row steps at {rows} rows (CPU s, µs a row):")
    for name, seconds in steps.items():
        print(f"  {name}: {seconds:.3f} s, {1e6 * seconds / rows:.1f} µs")


if __name__ == "__main__":
    main()
