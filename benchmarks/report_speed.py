"""How long the QC report takes on a large run: it reads a sample of images, never all of them.

    python benchmarks/report_speed.py [--particles 20000] [--box 128] [--unique-images 4096]

Builds a finished run's output folder without running the subtraction: an input
stack of ``--unique-images`` noise images that the star's rows reference in turn
(as symmetry expansion does: a million rows need not mean a million images),
result stacks = 0.9 × input for every row, the star and .cs files written by
dsub's own export, and a store holding the per-particle contrast and fit arrays
but no images. Then, each in a fresh process (its peak memory printed):

* ``run``: as ``dsub subtract`` draws it: ``start_preparation`` (in the run, a
  background thread while the chunks run: the report columns written into the
  store, the sample's input images, matplotlib imported), then
  ``write_report(OUTDIR, preparation)``, what is left after the run;
* ``report``: ``write_report(OUTDIR)`` as ``dsub report OUTDIR`` runs it, twice
  (the first includes importing matplotlib);
* ``star``: the same on a store without report columns (a run of an earlier
  version): the exported star is parsed.

Each also gives the time of reading what the report shows (``gather``) and of each figure.

CPU time is printed beside wall time, as wall time on a busy machine says little.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dsub.formats import read_particles
from dsub.formats import star as star_format
from dsub.formats.mrc import read_images, write_stack
from dsub.simulate import to_particle_table
from dsub.workflow import export, store
from dsub.workflow.pipeline import RUN_SUMMARY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import noise_metadata  # noqa: E402  (the metadata of bench.py's data set)

PER_STACK = 4096
CHUNK = 256
PIXEL_SIZE = 1.0


def write_dataset(folder: Path, count: int, box: int, unique: int) -> Path:
    """An input star of ``count`` rows referencing ``unique`` noise images in turn; returns the star's path."""
    rng = np.random.default_rng(0)
    unique = min(unique, count)
    stack = folder / "particles.mrcs"
    with write_stack(stack, (unique, box, box), PIXEL_SIZE) as mrc:
        for start in range(0, unique, 512):
            stop = min(start + 512, unique)
            mrc.data[start:stop] = rng.normal(size=(stop - start, box, box)).astype(np.float32)
    table = to_particle_table(noise_metadata(count, box, rng, PIXEL_SIZE), str(stack))
    path = folder / "particles.star"
    names = np.char.add(np.char.zfill((np.arange(count) % unique + 1).astype(str), 6), "@particles.mrcs")
    star_format.write_particles(table, path, names.astype(object))
    return path


def finished_run(star: Path, outdir: Path) -> None:
    """OUTDIR as a finished run without ``--keep-store`` leaves it."""
    table = read_particles(star)
    count, box = len(table), int(table.box_size[0])
    stack = str(star.parent / "particles.mrcs")
    unique = int(table.image_indices.max()) + 1
    source = read_images([stack] * unique, np.arange(unique))
    for relative, rows, _ in export.stack_layout(count, PER_STACK):
        (outdir / relative).parent.mkdir(parents=True, exist_ok=True)
        with write_stack(outdir / relative, (rows.size, box, box), PIXEL_SIZE) as mrc:
            for first in range(0, rows.size, 512):
                part = rows[first:first + 512]
                mrc.data[first:first + part.size] = 0.9 * source[table.image_indices[part]]
    rng = np.random.default_rng(1)
    fit = {"contrast": rng.normal(1.0, 0.15, count).astype(np.float32),
           "contrast_sigma": rng.uniform(0.02, 0.08, count).astype(np.float32),
           "fit_correlation": rng.uniform(0.05, 0.4, count).astype(np.float32)}
    group = store.create_store(outdir / store.STORE_NAME, count, box, CHUNK, {
        "dsub": "benchmark", "particles": {"path": str(star)}, "settings": {"scale": "fit"}, "chunk_size": CHUNK},
        keep_images=False)
    for name, values in fit.items():
        group[name][:] = values
    group["chunk_done"][:] = 1
    contrast = fit.pop("contrast")
    export.write_metadata(table, outdir, PER_STACK, contrast, fit=fit)
    (outdir / RUN_SUMMARY).write_text(json.dumps({"particles": count, "box": box, "scale": "fit"}))
    store.delete_images(outdir / store.STORE_NAME)


def timed(step):
    started, cpu = time.perf_counter(), time.process_time()
    value = step()
    return value, time.perf_counter() - started, time.process_time() - cpu


def parts(outdir: Path, prepared=None) -> dict:
    """The time of reading what the report shows (``gather``) and of each figure, after one full report."""
    from dsub.report import figures
    from dsub.report.gather import gather

    data, wall, cpu = timed(lambda: gather(outdir) if prepared is None else gather(outdir, prepared))
    out = {"gather": (wall, cpu)}
    with tempfile.TemporaryDirectory() as folder:
        for draw in figures.FIGURES:
            _, wall, cpu = timed(lambda: draw(data, Path(folder)))
            out[draw.__name__] = (wall, cpu)
    return out


def child_run(outdir: Path, star: Path) -> dict:
    """As ``dsub subtract`` draws it: prepared (while the chunks run), then drawn after the run."""
    from dsub.formats import read_particles
    from dsub.report import start_preparation, write_report

    table = read_particles(star)  # the run holds its table already: not timed
    preparation, wall, cpu = timed(lambda: start_preparation(outdir, table, PER_STACK).result())
    if preparation is None:
        raise SystemExit("the report's preparation failed")
    _, after, after_cpu = timed(lambda: write_report(outdir, preparation))
    return {"prepare (background, imports matplotlib)": (wall, cpu), "after the run": (after, after_cpu),
            **parts(outdir, preparation)}


def child_report(outdir: Path, star: Path) -> dict:
    """``dsub report OUTDIR``: everything read from the folder (the first call imports matplotlib)."""
    from dsub.report import write_report

    _, first, first_cpu = timed(lambda: write_report(outdir))
    _, second, second_cpu = timed(lambda: write_report(outdir))
    return {"dsub report, first": (first, first_cpu), "dsub report, second": (second, second_cpu), **parts(outdir)}


def child_star(outdir: Path, star: Path) -> dict:
    """``dsub report OUTDIR`` of a run whose store has no report columns (an earlier version): the star is read."""
    import shutil

    from dsub.report.columns import FOLDER

    shutil.rmtree(outdir / store.STORE_NAME / FOLDER, ignore_errors=True)
    return child_report(outdir, star)


CHILDREN = {"run": child_run, "report": child_report, "star": child_star}
DESCRIPTIONS = {"run": "at the end of dsub subtract", "report": "dsub report OUTDIR",
                "star": "dsub report OUTDIR, store without report columns (earlier version)"}


def peak_memory_bytes() -> int:
    """This process's peak resident memory since it started (``VmHWM``).

    Not ``ru_maxrss``: Linux carries that over from the parent through fork and
    exec, so the child would report the parent's peak (which built the data set).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(mode: str, outdir: Path, star: Path) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(outdir), str(star)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=20000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--unique-images", type=int, default=4096)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, outdir, star = args.child
        figures = CHILDREN[mode](Path(outdir), Path(star))
        figures["peak_rss_gb"] = peak_memory_bytes() / 1e9
        print(json.dumps(figures))
        return
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        star = write_dataset(folder, args.particles, args.box, args.unique_images)
        outdir = folder / "out"
        finished_run(star, outdir)
        print(f"finished run of {args.particles} particles of {args.box} px built in "
              f"{time.perf_counter() - started:.1f} s (star {(outdir / export.STAR_NAME).stat().st_size / 1e6:.1f} MB)")
        for mode in ("run", "report", "star"):
            figures = run_child(mode, outdir, star)
            print(f"{DESCRIPTIONS[mode]} (peak memory of the process {figures.pop('peak_rss_gb'):.2f} GB):")
            for key, (wall, cpu) in figures.items():
                print(f"  {key}: {wall:.2f} s wall, {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
