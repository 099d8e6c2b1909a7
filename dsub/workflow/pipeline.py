"""One subtraction run, from input files to exported outputs.

1. read the particle table and check every input (``validate``);
2. create the Zarr store, or reopen the store of an identical earlier run and
   keep its finished chunks;
3. run one task per unfinished chunk of particles on the Dask scheduler;
4. export stacks, then the star and .cs files, and write ``dsub_run.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np

from .. import __version__
from ..cluster import ClusterSpec, open_runner
from ..errors import DsubError, InputFileError, OptionError, warn
from ..formats import read_particles, select_rows
from ..particles import HALF_A
from ..physics.backend import gpu_available
from ..physics.optics import map_extent_voxels
from ..physics.subtract import SubtractionSettings
from . import export, store, validate
from .outdir import explain_os_error, file_identity, prepare_outdir, run_fingerprint
from .tasks import MapFiles, fit_sample, run_chunk

RUN_SUMMARY = "dsub_run.json"
#: What a finished export leaves beside the stacks; none of it may outlive a failed run.
METADATA = (export.STAR_NAME, export.CS_NAME, export.SKIPPED_NAME, RUN_SUMMARY)
POLARITY_SAMPLE = 64


@dataclass
class RunOptions:
    """How a run is carried out (as opposed to the physics, in ``SubtractionSettings``)."""

    outdir: Path
    chunk_size: int = 256
    particles_per_stack: int = 4096
    device: str = "auto"
    overwrite: bool = False
    cs_root: str | None = None
    single_map: bool = False
    skip_bad_particles: bool = False
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def __post_init__(self):
        if self.chunk_size < 1:
            raise OptionError(f"--chunk-size must be at least 1, not {self.chunk_size}")
        if self.particles_per_stack < 1:
            raise OptionError(f"--particles-per-stack must be at least 1, not {self.particles_per_stack}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise OptionError(f"--device must be auto, cpu or gpu, not {self.device!r}")
        # Stacks hold whole chunks, so an export task never reads half a chunk.
        self.particles_per_stack = max(self.chunk_size, self.particles_per_stack // self.chunk_size * self.chunk_size)

    @property
    def log(self):
        return self.cluster.log


def check_device(options: RunOptions) -> None:
    """--device gpu on the threaded scheduler needs a GPU here; elsewhere the workers decide."""
    if options.device == "gpu" and not options.cluster.distributed and not gpu_available():
        raise OptionError("--device gpu was asked for, but CuPy is not installed or sees no GPU")


def say(options: RunOptions, message: str) -> None:
    print(message, file=options.log or sys.stdout, flush=True)


def polarity_task(table, maps: MapFiles, settings, device: str):
    """A task that fits α on a sample of particles, to check the input contrast's polarity."""
    sample = np.unique(np.linspace(0, len(table) - 1, min(POLARITY_SAMPLE, len(table))).astype(int))
    particles = dataclasses.replace(table.subset(sample), source=None)
    return sample, dask.delayed(fit_sample, pure=False)(
        particles, maps, dataclasses.replace(settings, scale="fit"), device, dask_key_name="polarity-check"
    )


def check_polarity(table, sample, fitted, options: RunOptions) -> None:
    """With input contrast, refuse when a fit on a sample finds the opposite sign."""
    given_values = table.input_contrast[sample]
    given, measured = np.sign(np.median(given_values)), np.sign(np.median(fitted))
    if given != measured:
        raise InputFileError(
            table.source_path,
            f"the input contrast scales are {'positive' if given > 0 else 'negative'} but a fit on "
            f"{sample.size} particles finds them {'positive' if measured > 0 else 'negative'}: the images "
            "have the opposite polarity to what the metadata implies.",
            "Use --scale fit (it absorbs the polarity), or check the stacks' contrast inversion.",
        )
    say(options, f"Polarity check: input contrast agrees with a fit on {sample.size} particles "
                 f"(median fitted {np.median(fitted):.3f}, median input {np.median(given_values):.3f}).")


def subtract(particles_path, half_a, half_b, mask, settings: SubtractionSettings, options: RunOptions) -> dict:
    """Run a whole subtraction; returns the run summary (also written to ``dsub_run.json``).

    ``half_b`` may be None with ``options.single_map``: every particle then uses ``half_a``.
    """
    try:
        return _subtract(particles_path, half_a, half_b, mask, settings, options)
    except DsubError:
        raise
    except OSError as exc:  # wherever it happened, on this machine or a worker: one message
        explained = explain_os_error(exc, Path(options.outdir))
        if explained is None:
            raise
        raise explained from exc


def _subtract(particles_path, half_a, half_b, mask, settings: SubtractionSettings, options: RunOptions) -> dict:
    started = time.monotonic()
    outdir = Path(options.outdir)
    table = read_particles(particles_path, cs_root=options.cs_root)
    validate.check_metadata(table)
    box = validate.particle_box(table)
    if options.single_map:
        unused = "; --half-b is not used" if half_b is not None else ""
        warn(f"--single-map: every particle is subtracted with --half-a{unused}; gold-standard independence "
             "of the half sets is broken for anything refined from the result")
        table.half_set[:] = HALF_A
        half_b = half_a
    elif half_b is None:
        raise OptionError("--half-b is required (or --single-map to subtract every particle with --half-a)")
    else:
        validate.check_half_sets(table)
    if settings.scale == "input" and table.input_contrast is None:
        raise InputFileError(
            particles_path,
            "has no per-particle contrast (alignments3D/alpha in a .cs, rlnCtfScalefactor in a star), "
            "which --scale input needs.",
            "Use --scale fit to fit each particle's contrast instead.",
        )
    pixel_size, map_box = validate.check_maps(half_a, half_b, mask, box, table)
    extent = map_extent_voxels(map_box, box, float(np.max(table.pixel_size_angstrom)), pixel_size)
    validate.warn_far_pixel_size(table, pixel_size * extent / box)
    sizes = np.unique(np.round(table.pixel_size_angstrom, 4))
    if sizes.size > 1:
        say(options, f"Optics groups at {', '.join(f'{size:g}' for size in sizes)} Å: each particle is projected "
                     f"at its own pixel size from maps at {pixel_size * extent / box:.4f} Å, and exported to "
                     "stacks of one pixel size.")
    if map_box != box:
        say(options, f"Maps of {map_box} voxels at {pixel_size:.4f} Å brought to the particles' {box} px box: "
                     f"{extent} voxels kept, resampled to {box} (voxel {pixel_size * extent / box:.4f} Å).")
    validate.check_images(table, box)
    check_device(options)
    device = options.device
    maps = MapFiles(str(Path(half_a).resolve()), str(Path(half_b).resolve()), str(Path(mask).resolve()),
                    pixel_size, box, extent)

    identity = run_identity(particles_path, maps, table, box, settings, options)
    fingerprint = run_fingerprint(identity)
    store_path = outdir / store.STORE_NAME
    if options.skip_bad_particles and not options.overwrite:
        adopt_strict_run(store_path, identity, fingerprint)
    resuming = prepare_outdir(outdir, fingerprint, options.overwrite)
    remove_metadata(outdir)  # never leave old metadata that looks complete
    bounds = store.chunk_bounds(len(table), options.chunk_size)

    timings = {"check_inputs": time.monotonic() - started}
    with open_runner(options.cluster) as runner:
        timings["start_workers"] = time.monotonic() - started - sum(timings.values())
        if settings.scale == "input":
            sample, task = polarity_task(table, maps, settings, device)
            check_polarity(table, sample, runner.compute([task], "polarity check")[0], options)
        if not resuming:
            store.create_store(store_path, len(table), box, options.chunk_size,
                               {**identity, "fingerprint": fingerprint})
        done = store.finished_chunks(store_path)
        pending = [i for i in range(len(bounds)) if not done[i]]
        say(options, f"dsub: {len(table)} particles of {box} px in {len(bounds)} chunks "
                     f"({len(bounds) - len(pending)} already done) on {runner.description}.")
        tasks = []
        for index in pending:
            start, stop = bounds[index]
            chunk = dataclasses.replace(table.subset(np.arange(start, stop)), source=None)
            tasks.append(
                dask.delayed(run_chunk, pure=False)(
                    index, start, chunk, maps, settings, str(store_path), device, options.skip_bad_particles,
                    dask_key_name=f"subtract-chunk-{index:05d}",
                )
            )
        devices = sorted(set(runner.compute(tasks, "subtract")))
        timings["subtract"] = time.monotonic() - started - sum(timings.values())
        export_tasks = [
            dask.delayed(export.write_stack_from_store, pure=False)(
                store_path, outdir, relative, rows, pixel_size, dask_key_name=f"export-stack-{number:04d}",
            )
            for number, (relative, rows, pixel_size) in enumerate(
                export.stack_layout(len(table), options.particles_per_stack, table.pixel_size_angstrom))
        ]
        runner.compute(export_tasks, "export")
        workers = runner.workers
    results = store.open_store(store_path)
    contrast = np.asarray(results["contrast"][:])
    skipped = np.asarray(results["skipped"][:], dtype=bool)
    with all_metadata_or_none(outdir):
        export.write_metadata(table, outdir, options.particles_per_stack,
                              None if settings.scale == "none" else contrast, skipped)
        timings["export"] = time.monotonic() - started - sum(timings.values())
        kept = contrast[~skipped]
        summary = {
            "particles": len(table),
            "box": box,
            "chunks_total": len(bounds),
            "chunks_skipped": len(bounds) - len(pending),
            "seconds": round(time.monotonic() - started, 3),
            "phase_seconds": {phase: round(value, 3) for phase, value in timings.items()},
            "scheduler": options.cluster.scheduler,
            "workers": workers,
            "devices": devices,
            "scale": settings.scale,
            "contrast_median": float(np.median(kept)) if kept.size else None,
            "contrast_negative_fraction": float(np.mean(kept < 0)) if kept.size else None,
            "skipped_particles": skipped_report(table, skipped),
            "outputs": {"store": store.STORE_NAME, "star": export.STAR_NAME, "cs": export.CS_NAME,
                        "stacks": export.STACK_FOLDER},
        }
        (outdir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    report(summary, outdir, options)
    return summary


def remove_metadata(outdir: Path) -> None:
    """Remove the star, .cs and summary files of an earlier export."""
    for name in METADATA:
        (outdir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def all_metadata_or_none(outdir: Path):
    """Write the export's metadata inside; if that fails (a full disk, an interrupt), none of it is left."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            remove_metadata(outdir)
        raise


def adopt_strict_run(store_path: Path, identity: dict, fingerprint: str) -> None:
    """Let --skip-bad-particles resume a run that stopped at a bad image (the fix its error message gives).

    That run's finished chunks held no bad image, so they are exactly what this
    run would write: its store takes this run's fingerprint (and a later rerun
    without the flag is then refused as a different run, as it should be).
    """
    if not store_path.exists():
        return
    strict = run_fingerprint({**identity, "skip_bad_particles": False})
    try:
        group = store.open_store(store_path, mode="r+")
        if group.attrs.get("run", {}).get("fingerprint") != strict:
            return
    except Exception:  # unreadable: prepare_outdir decides
        return
    group.attrs["run"] = {**identity, "fingerprint": fingerprint}


def run_identity(particles_path, maps: MapFiles, table, box: int, settings, options: RunOptions) -> dict:
    """Everything the results depend on; stored in the store so an identical rerun can resume."""
    return {
        "dsub": __version__,
        "particles": file_identity(particles_path),
        "half_a": file_identity(maps.half_a),
        "half_b": file_identity(maps.half_b),
        "mask": file_identity(maps.mask),
        "stacks": [file_identity(path) for path in np.unique(np.asarray(table.image_paths, dtype=str))],
        "cs_root": options.cs_root,
        "settings": dataclasses.asdict(settings),
        "chunk_size": options.chunk_size,
        "single_map": options.single_map,
        "skip_bad_particles": options.skip_bad_particles,
        "count": len(table),
        "box": box,
    }


def skipped_report(table, skipped: np.ndarray, limit: int = 1000) -> dict:
    """Which particles were left out and why, for dsub_run.json (the first ``limit`` listed)."""
    rows = np.flatnonzero(skipped)
    names = export.original_image_names(select_rows(table, skipped))[:limit] if rows.size else []
    return {
        "count": int(rows.size),
        "listed": [{"index": int(i), "image": str(name), "reason": "NaN or infinite values in the image"}
                   for i, name in zip(rows[:limit], names)],
        "file": export.SKIPPED_NAME if rows.size else None,
    }


def report(summary: dict, outdir: Path, options: RunOptions) -> None:
    """Tell the user what happened and where the results are."""
    median = summary["contrast_median"]
    say(options, f"Subtracted {summary['particles']} particles in {summary['seconds']:.1f} s"
                 + (f" (contrast median {median:.3f})." if median is not None else "."))
    skipped = summary["skipped_particles"]["count"]
    if skipped:
        say(options, f"WARNING: {skipped} particles with NaN or infinite values were left out; they are "
                     f"listed in {export.SKIPPED_NAME} and {RUN_SUMMARY}.")
    negative = summary["contrast_negative_fraction"] or 0.0
    if summary["scale"] == "fit" and negative > 0.5:
        say(options, f"WARNING: {negative:.0%} of the fitted contrast scales are negative: the images have "
                     "the opposite contrast to the maps (inverted stacks). The subtraction is still right, "
                     "because the fit absorbs the sign, but check the polarity before refining.")
    elif negative > 0:
        say(options, f"{negative:.1%} of the contrast scales are negative.")
    say(options, f"Outputs in {outdir}: {export.STAR_NAME}, {export.CS_NAME}, {export.STACK_FOLDER}/, "
                 f"{store.STORE_NAME}, {RUN_SUMMARY}")
