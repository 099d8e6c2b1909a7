"""One subtraction run, from input files to exported outputs.

1. read the particle table and check every input (``validate``);
2. examine OUTDIR; for a run with work to do, state the memory each worker needs and
   refuse here one that this machine cannot hold (``announce_resources``); refuse a run
   whose outputs OUTDIR's file system cannot hold (``disk``; before
   anything there changes); create the Zarr store, or reopen the store of an identical earlier run and
   keep its finished chunks; create the output stacks at full size under
   temporary names, or take up those of that run (``export.prepare_stacks``);
3. run one task per unfinished chunk of particles on the Dask scheduler: each
   writes its images straight into their stacks and records the chunk in the store;
4. write the stacks' header statistics and give them their names, then write
   the star and .cs files and ``dsub_run.json``;
5. mark the store as holding no images (they are in it only with ``--keep-store``).

A rerun of a finished run without ``--keep-store`` does nothing and says so;
only when it would name the stacks otherwise (``--paths``, ``--cs-root``) does
it write the star and .cs files again (``finished_run``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dask
import numpy as np

from .. import __version__
from ..cluster import ClusterSpec, open_runner
from ..cluster.early import start_early
from ..cluster.config import cluster_config, warn_unused_settings
from ..cluster.progress import map_preparation_estimate, number, setup_step
from ..errors import (DsubError, InputFileError, OptionError, add_overwrite_note, first_and_more, one_task_at_a_time,
                      warn)
from ..formats import read_particles, select_rows
from ..formats.cs import joined_line
from ..formats.mrc import map_header, read_map
from ..formats.paths import cryosparc_project_folder, written_base
from ..particles import HALF_A
from ..physics.backend import gpu_available, resolve_device, start_gpu_warm_up
from ..physics.gridding import grid_size
from ..physics.memory import preparation_peak_bytes
from ..physics.optics import map_extent_voxels
from ..physics.projector import projector_kernel
from ..physics.subtract import SubtractionSettings
from ..report import REPORT_FOLDER, start_preparation, start_warming_up
from . import blank, chain, diagnostics, disk, export, metadata, prefetch, rebox, record, region, resources, store, validate
from .options import check_run_options, check_writable
from .outputs import RUN_SUMMARY, holds_finished_run
from .outdir import (AUTOMATIC_KEY, CONTENT_HASHED, HASH_KEY, REMOVED_STORE_NAME, OutdirLock,
                     explain_os_error, file_identity, prepare_outdir, refuse_inputs_in_replaced_outputs, remove_store,
                     run_fingerprint, same_run, with_content_hashes)
from .tasks import MapFiles, half_map_models, prepare_models, refuse_nonfinite, run_chunk
from .transcript import LOG_NAME, Transcript

#: What a finished export leaves beside the stacks; none of it may outlive a failed run.
METADATA = (export.STAR_NAME, export.CS_NAME, export.SKIPPED_NAME, RUN_SUMMARY)


@dataclass
class RunOptions:
    """How a run is carried out (as opposed to the physics, in ``SubtractionSettings``)."""

    outdir: Path
    chunk_size: int | None = None  # None: ``resolved_chunk_size`` decides
    particles_per_stack: int | None = None  # None: ``resolved_particles_per_stack`` decides
    device: str = "auto"
    overwrite: bool = False
    cs_root: str | None = None
    passthrough: tuple = ()
    paths: str = "auto"
    resolution_angstrom: float | None = None
    single_map: bool = False
    skip_bad_particles: bool = False
    recenter: bool = False  # centre on the kept region's centre of mass
    center_voxels: tuple | None = None  # or on this map point (x, y, z), voxels from the map centre
    new_box: int | None = None  # output box in pixels
    float16: bool = False  # float16 store and MRC mode 12 stacks
    keep_store: bool = False  # keep the store's images after the export
    rescale_maps: bool = False  # project maps within 1 % of no optics group's pixel size (``validate.check_voxel_size``)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    command: str | None = None  # the command line, for the run record

    def __post_init__(self):
        check_run_options(self.chunk_size, self.particles_per_stack, self.paths, self.resolution_angstrom,
                          self.device, self.recenter, self.center_voxels, self.new_box)

    @property
    def log(self):
        return self.cluster.log


#: Particles per chunk unless --chunk-size says otherwise (fewer for small sets on threads: ``resolved_chunk_size``).
DEFAULT_CHUNK_SIZE = 256
#: Smallest chunk chosen automatically: below it the per-task overhead shows.
SMALLEST_AUTOMATIC_CHUNK = 16


def resolved_chunk_size(options: RunOptions, count: int, store_path: Path) -> int:
    """Particles per chunk: --chunk-size; else the earlier attempt's (a resume keeps its chunks); else automatic.

    Automatic: ``DEFAULT_CHUNK_SIZE``, but on the threaded scheduler a set too
    small to give every thread a chunk is cut into one chunk per thread (at
    least ``SMALLEST_AUTOMATIC_CHUNK`` particles each), so that every core works.
    """
    if options.chunk_size is not None:
        return options.chunk_size
    earlier = earlier_run(options, store_path).get("chunk_size")
    if isinstance(earlier, int) and earlier >= 1:
        return earlier
    if options.cluster.scheduler != "threads":
        return DEFAULT_CHUNK_SIZE
    threads = options.cluster.workers or os.cpu_count() or 1
    return int(min(DEFAULT_CHUNK_SIZE, max(SMALLEST_AUTOMATIC_CHUNK, -(-count // threads))))


def resolved_particles_per_stack(options: RunOptions, store_path: Path) -> int:
    """Particles per output stack once ``options.chunk_size`` is known: --particles-per-stack (rounded down to
    whole chunks); else the earlier attempt's where it had the same chunks (a resume keeps its stacks, as
    its chunks; a run with other chunks is another run, refused naming both); else
    ``export.DEFAULT_PARTICLES_PER_STACK`` rounded down to whole chunks."""
    if options.particles_per_stack is not None:
        return export.whole_chunks(options.particles_per_stack, options.chunk_size)
    earlier = earlier_run(options, store_path)
    stacks = earlier.get("particles_per_stack")
    if earlier.get("chunk_size") == options.chunk_size and isinstance(stacks, int) and stacks >= 1:
        return export.whole_chunks(stacks, options.chunk_size)
    return export.default_stack_size(options.chunk_size)


def earlier_run(options: RunOptions, store_path: Path) -> dict:
    """The identity an earlier attempt recorded in the store (``run_identity``), which a resume keeps; {} with
    --overwrite, without a store, or where it cannot be read (``prepare_outdir`` decides what to do then)."""
    if options.overwrite or not store_path.exists():
        return {}
    with contextlib.suppress(Exception):
        run = store.open_store(store_path).attrs.get("run", {})
        return run if isinstance(run, dict) else {}
    return {}


def check_device(options: RunOptions) -> None:
    """--device gpu on the threaded scheduler needs a GPU here; elsewhere the workers decide."""
    if options.device == "gpu" and not options.cluster.distributed and not gpu_available():
        raise OptionError("--device gpu was asked for, but CuPy is not installed or sees no GPU")


def say(options: RunOptions, message: str) -> None:
    print(message, file=options.log or sys.stdout, flush=True)


def project_of_outdir(table, outdir: Path, options: RunOptions) -> None:
    """Without --cs-root, make the cryoSPARC project folder above OUTDIR the one the output .cs's ``blob/path``
    start from (``table.extra["project_folder"]``); said in one line where the input did not give it already.

    That is the nearest folder above OUTDIR holding ``project.json`` (or the
    parent of a ``J<n>`` job folder holding ``job.json``, as
    ``paths.cryosparc_project_folder`` finds it above a .cs): the project the
    output .cs will be imported into, whose own ``blob/path`` start there. A .cs
    input's ``blob/path`` are still read from the project above that .cs.
    """
    if options.cs_root is not None:
        return
    project = cryosparc_project_folder(outdir / export.CS_NAME)
    if project is None or project == table.extra.get("project_folder"):
        return
    table.extra["project_folder"] = project
    say(options, f"The output folder lies in the cryoSPARC project {project}: the .cs's blob/path are written "
                 "relative to it (--cs-root chooses another folder).")


def star_base_line(table, outdir: Path, paths_mode: str) -> str | None:
    """The line saying where the output star's names start; else None.

    That folder is the one the input star's relative image names start from
    (``export.star_names_base``), found from above or below it: RELION's project
    folder. Said where the names are written relative to it and it is not the
    current folder, or (``--paths auto``) where OUTDIR lies outside it and they
    are absolute for that reason, also when run from that folder; not where
    ``--paths absolute`` or ``outdir`` chose the form.
    """
    base = export.star_names_base(table)
    if paths_mode in ("absolute", "outdir"):
        return None
    here = base == Path(os.path.abspath(os.getcwd()))
    said = f"The input star's image names start from {'this folder, ' if here else ''}{base} (RELION's project folder)"
    if written_base(outdir, paths_mode, base) is None:  # said also from the project itself: a change of form
        return f"{said}, which does not hold the output folder: the output star's names are absolute."
    return None if here else f"{said}: the output star's names are written from there too."


def star_folder_text(table, outdir: Path, paths_mode: str) -> str | None:
    """The folder the output star's ``rlnImageName`` start from, for dsub_run.json (None: they are absolute,
    or relative to OUTDIR with ``--paths outdir``); as ``paths.written_paths`` decides for ``paths_mode``."""
    return written_base(outdir, paths_mode, export.star_names_base(table))


def stack_names(table, outdir: Path, paths_mode: str) -> dict:
    """``export.written_stack_names`` of the run's star and .cs, from the folders they start from."""
    return export.written_stack_names(outdir, paths_mode, table.extra.get("project_folder"),
                                      export.star_names_base(table))


def project_folder_text(table, outdir: Path, paths_mode: str) -> str | None:
    """The folder the output .cs's ``blob/path`` start from, for dsub_run.json (None: none, they are absolute,
    or relative to OUTDIR with ``--paths outdir``); as ``paths.written_paths`` decides for ``paths_mode``."""
    return written_base(outdir, paths_mode, table.extra.get("project_folder"))


def maps_to_box_line(map_box: int, box: int, extent: int, pixel_size: float) -> str:
    """How maps of another box are brought to the particles' box, in one line (``tasks.MapFiles``).

    The maps are cropped or zero-padded about their centre to the ``extent``
    voxels the particles' box spans, then Fourier-resampled to ``box`` voxels,
    which changes the voxel size; where ``extent`` is ``box`` (maps at the
    particles' pixel size) nothing is resampled.
    """
    if map_box > extent:
        steps = [f"cropped to the {extent} voxels about their centre that the particles' box spans"]
    elif map_box < extent:
        steps = [f"zero-padded about their centre to the {extent} voxels that the particles' box spans"]
    else:
        steps = []
    if extent != box:
        steps.append(f"resampled to {box} voxels of {pixel_size * extent / box:.4f} Å")
    else:
        steps[-1] += ", at their own voxel size (no resampling)"
    return (f"Maps of {map_box} voxels at {pixel_size:.4f} Å brought to the particles' {box} px box: "
            f"{', then '.join(steps)}.")


def prepare_maps_where_visible(maps: MapFiles, settings, options: RunOptions, box: int,
                               workers_device: str = "gpu") -> str | None:
    """Prepare the half-maps in view of the user; returns what the progress shows while workers do it.

    On threads the maps are prepared here, before any task, with a line that says
    so; the tasks then find them ready. Workers of a cluster prepare their own
    (those connected at the start all at once, ``prepare_models``; later ones on
    their first task): the progress says so until a chunk finishes.

    The memory stated is the preparation's peak on the device that does it
    (``memory.preparation_peak_bytes``): NumPy's (four prepared volumes and the
    masked map) where it runs on a CPU, here or on a cluster's CPU workers
    (``workers_device``, the device the memory plan was made for: a local
    cluster without a visible GPU, ``--device cpu``, CPU batch jobs); the GPU's
    (three volumes and cuFFT's scratch, the larger) on GPU workers, and as the
    bound for workers whose device is known only as they join (``auto``: an
    existing scheduler with ``--device auto``). On a GPU the time is not stated
    (the model is one CPU's).
    """
    _, oversampling = projector_kernel(settings.projector, settings.padding)
    size = grid_size(box, oversampling)
    rebox = maps.extent_voxels if maps.box is not None and maps.extent_voxels != maps.box else 0
    here = None if options.cluster.distributed else resolve_device(options.device)
    device = here or workers_device
    peak = max(preparation_peak_bytes(box, settings, "cpu" if device == "cpu" else "gpu"),
               resources.REBOX_BYTES_PER_VOXEL * rebox**3)
    estimate = map_preparation_estimate(size, peak, rebox, box)
    if device != "cpu":  # the time model is one CPU's
        estimate = dataclasses.replace(estimate, seconds=None)
    estimate = estimate.text() + {"cpu": "", "gpu": " of GPU memory",
                                  "auto": " of GPU memory on a GPU worker, less on a CPU one"}[device]
    # Maps of another box are first cropped or padded to the cube their extent needs, then resampled.
    transforms = (f"each map through a {rebox}³ cube to the particles' {box}³, then {size}³ transforms" if rebox
                  else f"{size}³ transforms")
    if options.cluster.distributed:
        say(options, f"The workers read the maps and prepare them now, beside the sample fit; a worker that joins "
                     f"later does so on its first task ({transforms}, {estimate}).")
        return "the workers preparing their maps, then the first task"
    with setup_step(options.log, f"Preparing the maps on {here} ({transforms})", estimate, done="Maps prepared"):
        half_map_models(maps, settings, here)
    return None


def subtract(particles_path, half_a, half_b, mask, settings: SubtractionSettings, options: RunOptions) -> dict:
    """Run a whole subtraction; returns the run summary (also written to ``dsub_run.json``).

    ``half_b`` may be None with ``options.single_map``: every particle then uses ``half_a``.
    What it prints also goes to ``OUTDIR/dsub.log``; each attempt is recorded (``record``).
    """
    transcript = Transcript(options.cluster.out)
    options = dataclasses.replace(options, cluster=dataclasses.replace(options.cluster, log=transcript))
    attempt = record.AttemptRecorder()
    lock = OutdirLock(Path(options.outdir))
    try:
        with transcript.capturing_warnings(), \
                record.failure_recorded(attempt, transcript, lambda: left_to_resume(options, attempt),
                                        one_task_at_a_time(options.cluster)), \
                contextlib.ExitStack() as cleanup:
            finished = False
            try:
                summary = _subtract(particles_path, half_a, half_b, mask, settings, options, attempt, lock, cleanup)
                finished = True
                return summary
            except DsubError as exc:
                log_refusal_beside_earlier_runs(transcript, lock, options)
                raise overwrite_noted(exc, options, attempt)
            except OSError as exc:  # wherever it happened, on this machine or a worker: one message
                explained = explain_os_error(exc, Path(options.outdir))
                if explained is None:
                    raise
                raise overwrite_noted(explained, options, attempt) from exc
            finally:
                if not finished:  # stopped before writing anything (a scheduler out of reach): OUTDIR as it was
                    lock.leave_as_found(transcript.log.created)
                lock.release()
    finally:
        transcript.close()  # OUTDIR/dsub.log complete on disk before the command returns


def log_refusal_beside_earlier_runs(transcript: Transcript, lock: OutdirLock, options: RunOptions) -> None:
    """A run refused once it held OUTDIR's lock (a different run there, too little room, ...) and before it
    opened OUTDIR/dsub.log: where that log exists (earlier runs'), the refused command goes into it, with what
    it printed and, from ``record.failure_recorded``, its error line, as an attempt's would. A folder without
    a log is left as it was, and so is one that another run holds (this run never had its lock)."""
    outdir = Path(options.outdir)
    if lock.fd is not None and not transcript.log.is_open and (outdir / LOG_NAME).is_file():
        transcript.open_log(outdir, fresh=False, command=options.command)


def left_to_resume(options: RunOptions, attempt: record.AttemptRecorder) -> dict:
    """What a stopped run leaves to its rerun, as marks for the stop line (``errors.interrupted_line``).

    ``nothing_written``: OUTDIR holds no store of this run. With ``--overwrite``
    a store there is this run's once it was created with its identity (the earlier
    one is deleted first, ``replace_earlier_outputs``; a store stopped while it was
    created is none, ``store.creation_stopped``), or once its attempt began in it (a
    requeued job's); rerun with ``--overwrite`` it would be deleted again, so
    ``overwrite_given`` asks for the rerun without it. ``earlier_replaced``: the
    earlier run's outputs were removed, or are being: ``earlier_store_whole`` where
    the stop came before their store was renamed aside (``outdir.remove_store``),
    so that it is still there, whole; after that nothing of it is left to resume.
    """
    store_path = Path(options.outdir) / store.STORE_NAME
    there = store_path.exists()
    if not options.overwrite:
        return {"nothing_written": not there}
    ours = there and (attempt.store_path is not None
                      or (attempt.creating_store and store.identity_written(store_path)))
    return {"nothing_written": not ours, "overwrite_given": ours, "earlier_replaced": attempt.replaced_earlier,
            "earlier_store_whole": attempt.replaced_earlier and not attempt.creating_store and there}


def overwrite_noted(error: DsubError, options: RunOptions, attempt: record.AttemptRecorder) -> DsubError:
    """``error``, telling a run with ``--overwrite`` whose store is there (``left_to_resume``) that only a rerun
    without ``--overwrite`` resumes, where it says to rerun the same command (``errors.add_overwrite_note``)."""
    if left_to_resume(options, attempt).get("overwrite_given"):
        add_overwrite_note(error)
    return error


def _subtract(particles_path, half_a, half_b, mask, settings: SubtractionSettings, options: RunOptions,
              attempt: record.AttemptRecorder, lock: OutdirLock, cleanup: contextlib.ExitStack) -> dict:
    started = time.monotonic()
    outdir = Path(options.outdir)
    check_writable(outdir)  # before the long reading and checks
    if options.cluster.scheduler in ("slurm", "pbs"):  # no sbatch/qsub here: said before the particles are read
        from ..cluster.start import require_batch_commands

        require_batch_commands(options.cluster.scheduler)
    warn_unused_settings(options.cluster.cluster_config, options.cluster.scheduler)
    # A local cluster starts beside the checks below (a batch queue's jobs wait for them); stopped on leaving.
    spec = dataclasses.replace(options.cluster, device=options.device)
    # The rerun of a finished command starts no worker (a lost stack to compute again starts the cluster later)
    finished = not options.overwrite and not options.keep_store and options.command is not None \
        and holds_finished_run(outdir, options.command)
    early = None if finished else start_early(spec)
    if early is not None:
        cleanup.callback(early.stop)
    if not options.cluster.distributed and options.device != "cpu":  # this process computes on its GPU
        cleanup.callback(start_gpu_warm_up().join)
    with setup_step(options.log, f"Reading the particles from {particles_path}"):
        table = read_particles(particles_path, cs_root=options.cs_root, passthrough=options.passthrough)
    refuse_reading_what_is_replaced(outdir, particles_path, table, half_a, half_b, mask, options.overwrite)
    for join in table.extra.get("passthrough_joins", []):
        say(options, joined_line(join, particles_path))
    project_of_outdir(table, outdir, options)
    where_names_start = star_base_line(table, outdir, options.paths)
    if where_names_start is not None:
        say(options, where_names_start)
    validate.check_metadata(table)
    validate.check_classes(table)
    box = validate.particle_box(table)
    chosen = [] if options.chunk_size is not None else ["chunk_size"]  # by dsub (resolved_chunk_size), not the user
    # A requeued batch job whose command has --overwrite takes up the run it began (``take_up_requeued_run``).
    requeued = record.requeued_job_began(outdir / store.STORE_NAME) if options.overwrite else None
    resumed = dataclasses.replace(options, overwrite=False) if requeued else options
    options = dataclasses.replace(options, chunk_size=resolved_chunk_size(resumed, len(table), outdir / store.STORE_NAME))
    given_stacks = options.particles_per_stack
    # Stacks hold whole chunks, so an export task never reads half a chunk.
    options = dataclasses.replace(options, particles_per_stack=resolved_particles_per_stack(
        dataclasses.replace(resumed, chunk_size=options.chunk_size), outdir / store.STORE_NAME))
    if given_stacks is not None and given_stacks != options.particles_per_stack:
        say(options, f"--particles-per-stack {given_stacks}: stacks of {options.particles_per_stack} particles, "
                     f"whole chunks of {options.chunk_size}.")
    bounds = store.chunk_bounds(len(table), options.chunk_size)
    layout = export.stack_layout(len(table), options.particles_per_stack, table.pixel_size_angstrom)
    run_order = export.chunk_run_order(bounds, layout)
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
            "has no per-particle contrast (alignments3D/alpha in a .cs, rlnDsubContrast or rlnCtfScalefactor in a "
            "star), "
            "which --scale input needs.",
            "Use --scale fit to fit each particle's contrast instead.",
        )
    with setup_step(options.log, "Checking the maps and the particle stacks"):
        pixel_size, map_box, volumes = validate.check_maps(
            half_a, half_b, mask, box, table, resolution_angstrom=options.resolution_angstrom,
            lowpass_angstrom=settings.lowpass_angstrom, single_map=options.single_map, scale=settings.scale)
        extent = map_extent_voxels(map_box, box, float(np.max(table.pixel_size_angstrom)), pixel_size)
        projected_voxel = pixel_size * extent / box  # Å: the maps' voxel once brought to the particles' box
        validate.check_voxel_size(half_a, pixel_size, projected_voxel, table, options.rescale_maps)
        # The disk reads the stacks ahead, in the chunks' order, while the rest is checked, the maps
        # prepared and the workers started; after the maps, which would otherwise queue behind it.
        read_ahead = prefetch.start(table, options.cluster.scheduler, order=np.concatenate(
            [np.arange(*bounds[index]) for index in run_order]) if prefetch.reads_ahead(options.cluster.scheduler)
            and len(bounds) else None)
        cleanup.callback(read_ahead.stop)
        share = region.density_share((volumes["half map A"], volumes["half map B"]), volumes["mask"],
                                     settings.mask_keeps)
        # On an earlier run's output: the records of the runs before, and how much of this region they removed.
        earlier_runs = chain.earlier_records(table, particles_path)
        overlaps = chain.region_overlaps(earlier_runs, volumes["half map A"], volumes["half map B"],
                                         volumes["mask"], settings.mask_keeps)
        del volumes
        validate.check_images(table, box)
    say(options, region.report_region(share, mask, settings.mask_keeps))
    # On an earlier run's output, what the records say (a contrast fitted low, this region already subtracted).
    chained = chain.check_earlier_records(earlier_runs, mask, settings.scale, settings.mask_keeps, overlaps)
    sizes = validate.group_pixel_sizes(table)
    if sizes.size > 1:
        say(options, f"Optics groups at {', '.join(f'{size:g}' for size in sizes)} Å: each particle is projected "
                     f"at its own pixel size from maps at {projected_voxel:.4f} Å, and exported to "
                     "stacks of one pixel size.")
    if map_box != box:
        say(options, maps_to_box_line(map_box, box, extent, pixel_size))
    check_device(options)
    particle_files = [particles_path, *table.extra.get("passthrough", [])]  # the metadata's size follows theirs
    outputs = disk.plan_disk(outdir, layout, len(table), options.new_box or box, options.chunk_size, options.float16,
                             options.keep_store, particle_files, count_freed=False)
    plan, spec = plan_resources(box, settings, options, extent if map_box != box else 0)
    device = options.device
    maps = MapFiles(str(Path(half_a).resolve()), str(Path(half_b).resolve()), str(Path(mask).resolve()),
                    pixel_size, box, extent)
    reboxing, centre_from = reboxing_of_run(maps, settings, options, pixel_size)
    out_box = reboxing.output_box(box) if reboxing else box

    identity = run_identity(particles_path, maps, table, box, settings, options)
    if reboxing is not None:  # only then: runs without re-boxing keep their identity
        identity["rebox"] = dataclasses.asdict(reboxing)
    fingerprint = run_fingerprint(identity)
    store_path = outdir / store.STORE_NAME
    lock.acquire()  # from here on this run alone writes in OUTDIR
    if requeued and take_up_requeued_run(store_path, identity, fingerprint, requeued, options):
        options = dataclasses.replace(options, overwrite=False)
    if options.skip_bad_particles and not options.overwrite:
        adopt_strict_run(store_path, identity, fingerprint)
    def before_changes(resumes: bool) -> None:
        # Once OUTDIR is examined: a rerun with nothing to compute needs no worker, so states no memory.
        need = disk_need(outdir, layout, len(table), out_box, options, particle_files, resumes)
        if not nothing_to_compute(store_path, outdir, layout, bounds, out_box, options, resumes):
            left = need[0].total if need is not None and need[1] else None  # taken up: only what is left
            announce_resources(plan, options, outputs, particles=len(table), report_box=out_box, left_to_write=left)
        if need is not None:
            disk.check_room(outdir, *need, options.float16, options.keep_store)

    resuming = prepare_outdir(outdir, fingerprint, options.overwrite, identity, lambda line: say(options, line),
                              before_changes=before_changes)
    if resuming:  # this run's history, read before anything replaces its store
        attempt.read_earlier(store_path)
    # The maps' content hashes for a new store, read while the maps are prepared and the sample fitted.
    hashing = None if resuming else ContentHashes(identity)
    # The QC report's drawing library is loaded while the maps are prepared and the workers start, not
    # while the chunks run; joined before the run returns (a thread still importing at exit can crash).
    cleanup.callback(start_warming_up().join)
    if resuming:  # the finished chunks' images need no reading
        read_ahead.stop()
    # With --overwrite the earlier run's log goes with its results (``replace_earlier_outputs``), not before.
    options.log.open_log(outdir, fresh=False, command=options.command)
    if resuming and store.images_deleted(store_path):
        stacks = export.stack_sizes(layout, out_box, np.float16 if options.float16 else np.float32)
        afresh = lost_from_finished_run(outdir, stacks)
        if afresh is None:
            return finished_run(outdir, stacks, options, table, settings.scale, reboxing)
        # The images are gone and the export is not complete: compute afresh, and say why.
        say(options, f"dsub: {afresh}: computing all {number(len(table))} particles again.")
        resuming = False
    else:
        afresh = None
    if not options.overwrite:  # with it, the earlier results stay until this run writes its own
        remove_metadata(outdir)  # never leave old metadata that looks complete

    timings = {"check_inputs": time.monotonic() - started}
    saved = sample_check_if_all_done(store_path, outdir, layout, bounds, out_box, options) if resuming else None
    if saved is not None:
        # A rerun after a stop in the export (or of a finished --keep-store run): no worker, no map, no sample fit.
        if early is not None:
            early.stop()
        checked, sample_check = saved["figures"], saved["input_contrast_check"]
        attempt.begin(store_path, options.cluster.scheduler, device, len(bounds), len(bounds))
        pending, devices, workers, phases = [], [], 0, {}
        say(options, f"dsub: {len(table)} particles of {box} px in {len(bounds)} chunk{'s' if len(bounds) != 1 else ''}, "
                     "all already done: no worker started and no map prepared; the sample fit of the attempt "
                     "that computed them is kept.")
        preparation = start_preparation(outdir, table, options.particles_per_stack, show_inputs=reboxing is None)
        cleanup.callback(preparation.result)
    else:
        with contextlib.ExitStack() as running:
            running.enter_context(resources.failures_explained(plan))
            runner = running.enter_context(open_runner(spec, early))
            timings["start_workers"] = time.monotonic() - started - sum(timings.values())
            capacities = runner.capacities(device)
            if capacities:
                resources.check_workers(plan, capacities, box, settings, options.chunk_size)
            runner.start_on_each_worker(prepare_models, maps, settings, device)  # beside the sample fit
            waiting = prepare_maps_where_visible(maps, settings, options, box,
                                                 "auto" if plan.cpu_need is not None else plan.need.device)
            if waiting is None:  # prepared here (on workers it is part of their first chunk)
                timings["prepare_maps"] = time.monotonic() - started - sum(timings.values())
            sample, task = diagnostics.sample_task(table, maps, settings, device)
            sample_fit = runner.compute([task], "sample fit", [len(sample)], waiting, unit="tasks")[0]
            if sample_fit.nonfinite is not None and not options.skip_bad_particles:  # refused now, not in a chunk
                refuse_nonfinite(sample_fit.nonfinite, table.subset(sample), skip=False)
            if sample_fit.blank is not None:  # a blank sample passes the checks below: 0 is no worse than 0
                blank.refuse_blank_sample(table, sample, sample_fit.blank,
                                          ~np.isfinite(sample_fit.fit.alpha) & ~sample_fit.blank)
            # Maps off every optics group's pixel size that explain almost nothing: their header is likely wrong.
            refuse = (partial(validate.wrong_voxel_size, half_a, pixel_size, table)
                      if validate.far_from_every_group(table, projected_voxel) else None)
            checked = diagnostics.check_sample(table, sample, sample_fit, settings.scale,
                                               lambda line: say(options, line), refuse_unexplained=refuse,
                                               region_subtracted_before=bool(chained.get("mask_already_subtracted")))
            timings["sample_fit"] = time.monotonic() - started - sum(timings.values())  # its checks included
            sample_check = None
            if settings.scale == "input":  # for the report: fitted against input contrast
                fitted = np.asarray(sample_fit[0].alpha)
                usable = np.isfinite(fitted)
                sample_check = {"index": sample[usable].tolist(), "fitted_contrast": fitted[usable].tolist()}
            if resuming and not store_takes_up(store_path, options):
                resuming = False
            if not resuming:
                if options.overwrite:  # this run writes from here: the earlier one's outputs go now
                    replace_earlier_outputs(outdir, attempt, options.log)
                export.remove_stacks(outdir)  # an earlier run's stacks must not stay beside this run's
                attempt.creating_store = True  # from here a store there is this run's once it has its identity
                store.create_store(store_path, len(table), out_box, options.chunk_size,
                                   {**(hashing or ContentHashes(identity)).result(), "fingerprint": fingerprint,
                                    AUTOMATIC_KEY: chosen},
                                   float16=options.float16,
                                   keep_images=options.keep_store)
            # The chunk marks are read once: a fresh store has none.
            done = store.finished_chunks(store_path) if resuming else np.zeros(len(bounds), dtype=bool)
            pieces, done = stacks_taken_up(store_path, outdir, layout, bounds, out_box, done, options)
            store.save_sample_check(store_path, checked, sample_check)
            attempt.begin(store_path, options.cluster.scheduler, device, len(bounds), int(done.sum()), note=afresh)
            pending = [int(i) for i in run_order if not done[i]]  # running chunks write into different stacks
            say(options, f"dsub: {len(table)} particles of {box} px in {len(bounds)} chunk{'s' if len(bounds) != 1 else ''} "
                         f"({len(bounds) - len(pending)} already done) on {runner.description}.")
            if reboxing is not None:
                say(options, rebox.describe(reboxing, centre_from, box))
            # Tasks carry a row range of the table written once beside the store, built as they are submitted.
            columns = store_path / metadata.FOLDER
            if pending:
                metadata.write_table(table, columns)
            # What the QC report needs from the inputs is gathered while the chunks run (after the table is
            # written: both take memory in proportion to the particles, 0.2-0.5 GB each at 10 M rows).
            preparation = start_preparation(outdir, table, options.particles_per_stack, show_inputs=reboxing is None)
            cleanup.callback(preparation.result)  # never left running at exit (a run that fails meanwhile)
            tasks = (
                dask.delayed(run_chunk, pure=False)(
                    index, bounds[index][0], metadata.table_rows(columns, *bounds[index]), maps, settings,
                    str(store_path), device, options.skip_bad_particles, reboxing, pieces[index],
                    dask_key_name=f"subtract-chunk-{index:05d}",
                )
                for index in pending
            )
            recorder = store.ChunkRecorder(store_path, on_flush=attempt.save_progress)

            def chunk_finished(result: store.ChunkResult) -> str:
                attempt.chunk_finished(result.device)
                return recorder.add(result)

            try:
                devices = sorted(set(runner.compute(tasks, "subtract", [bounds[i][1] - bounds[i][0] for i in pending],
                                                    waiting, on_result=chunk_finished)))
            except BaseException:
                with contextlib.suppress(BaseException):  # what finished is kept for the rerun; the first error matters
                    recorder.close()
                raise
            recorder.close()
            shutil.rmtree(columns, ignore_errors=True)  # every chunk is stored: no task reads it again
            read_ahead.stop()
            timings["subtract"] = time.monotonic() - started - sum(timings.values())
            workers, phases = runner.workers, runner.phases
            # The workers stop while the metadata is written (a local cluster takes seconds to close).
            cleanup.callback(close_in_background(running.pop_all()).join)
    fit = store.per_particle(store_path)
    contrast = fit.pop("contrast")
    skipped = store.skipped_particles(store_path)
    diagnosed = {"sample": checked, "all": diagnostics.check_results(
        {"contrast": contrast, **fit}, skipped, settings.scale, checked)}
    diagnosed["all"].update(blank.warn_blank_particles(table, fit["fit_correlation"], skipped))
    with all_metadata_or_none(outdir):
        exported = rebox.reboxed_table(table, reboxing) if reboxing is not None else None
        staging = export.staging_folder(outdir)  # moved into OUTDIR together at the end, the record last
        export.write_metadata(table, outdir, options.particles_per_stack,
                              None if settings.scale == "none" else contrast, skipped, exported, options.paths, fit,
                              into=staging)
        timings["export"] = time.monotonic() - started - sum(timings.values())
        kept = contrast[~skipped]
        summary = {
            "particles": len(table),
            "box": out_box,
            **({"rebox": rebox_report(reboxing, centre_from, box)} if reboxing is not None else {}),
            "chunks_total": len(bounds),
            "chunks_skipped": len(bounds) - len(pending),
            "seconds": round(time.monotonic() - started, 3),
            "phase_seconds": {phase: round(value, 3) for phase, value in timings.items()},
            "scheduler": options.cluster.scheduler,
            "workers": workers,
            "devices": devices,
            "scale": settings.scale,
            "subtracted_region": {"mask_keeps": settings.mask_keeps, "density_share": round(share, 4)},
            "contrast_median": float(np.median(kept)) if kept.size else None,
            "contrast_negative_fraction": float(np.mean(kept < 0)) if kept.size else None,
            "skipped_particles": skipped_report(table, skipped),
            "input_contrast_check": sample_check,
            "diagnostics": diagnosed,
            **({"chain": chained} if chained else {}),
            "outputs": {"store": store.STORE_NAME, "star": export.STAR_NAME, "cs": export.CS_NAME,
                        "stacks": export.STACK_FOLDER, "stack_dtype": "float16" if options.float16 else "float32",
                        "store_images": "kept" if options.keep_store else "deleted", "paths": options.paths,
                        "star_root": star_folder_text(table, outdir, options.paths),
                        "cs_root": project_folder_text(table, outdir, options.paths),
                        "stack_names": stack_names(table, outdir, options.paths)},
        }
        summary = {**record.run_description(options.command, stored_hashes(store_path, identity)),
                   **attempt.finish(summary, phases, workers)}
        (staging / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        # The stacks get their headers (the tasks wrote the images) and names only now, just before the metadata
        # that points at them: a run stopped while the metadata was written leaves no named stack without it.
        export.finish_stacks(outdir, layout, store.image_statistics(store_path))
        export.publish_metadata(staging, outdir, RUN_SUMMARY)
    if not options.keep_store:  # only now: a rerun of a run cut short takes up its store and stacks
        store.delete_images(store_path)
    throughput = record.throughput_line(phases)
    if throughput:
        say(options, throughput)
    report(summary, outdir, options)
    write_qc_report(outdir, options, preparation)
    return summary


def stored_hashes(store_path: Path, identity: dict) -> dict:
    """``identity`` with the maps' and mask's content hashes the store holds (a store of an earlier version may
    hold none: then without), for the record's inputs."""
    try:
        stored = dict(store.open_store(store_path).attrs.get("run", {}))
    except Exception:  # the record is written all the same, without hashes
        return identity
    return {**identity, **{name: {**identity[name], HASH_KEY: stored[name][HASH_KEY]} for name in CONTENT_HASHED
                           if isinstance(stored.get(name), dict) and stored[name].get(HASH_KEY)
                           and stored[name].get("path") == identity[name]["path"]}}


def stacks_taken_up(store_path: Path, outdir: Path, layout, bounds, box: int, done: np.ndarray,
                    options: RunOptions | None = None):
    """Make the stacks ready for the chunks (``export.prepare_stacks``); returns (pieces, done).

    ``done``: the chunks finished before, (n_chunks,) bool; those whose images
    went with a lost stack (and are not in the store) are marked to be computed
    again, in the store and in the ``done`` returned. With ``options``, a lost
    stack that held finished chunks is said (``lost_stacks_line``).
    """
    pieces = export.chunk_pieces(layout, outdir, bounds)
    on_lost = (lambda *lost: say(options, lost_stacks_line(*lost))) if options is not None else None
    redo = export.prepare_stacks(outdir, layout, pieces, bounds, box, store.image_dtype(store_path), done, store_path,
                                 on_lost=on_lost)
    store.reset_chunks(store_path, redo)
    done = done.copy()
    done[redo] = False
    return pieces, done


def lost_stacks_line(stacks: list[str], chunks: int, from_store: bool) -> str:
    """The line for finished chunks whose output stack was missing or cut short (``export.prepare_stacks``)."""
    named = first_and_more(stacks, 3)
    what = "was" if len(stacks) == 1 else "were"
    done = ("written again from the store (--keep-store)" if from_store
            else "computed again (the store keeps no images without --keep-store)")
    return (f"Output stack{'s' if len(stacks) != 1 else ''} {named} {what} missing or not of full size: "
            f"the {chunks} finished chunk{'s' if chunks != 1 else ''} with images in "
            f"{'it' if len(stacks) == 1 else 'them'} {'is' if chunks == 1 else 'are'} {done}.")


def sample_check_if_all_done(store_path: Path, outdir: Path, layout, bounds, box: int,
                             options: RunOptions) -> dict | None:
    """The saved sample fit (``store.saved_sample_check``) of a resumed run with every chunk done and its
    stacks in place; None where something is left to compute (the run then goes the usual way)."""
    saved = store.saved_sample_check(store_path)
    if saved is None or not store_takes_up(store_path, options):
        return None
    done = store.finished_chunks(store_path)
    if not done.all():
        return None
    _, done = stacks_taken_up(store_path, outdir, layout, bounds, box, done, options)
    return saved if done.all() else None


class ContentHashes:
    """``outdir.with_content_hashes(identity)`` computed in a thread of its own (``result`` waits for it).

    Hashing reads the maps and mask whole (about 0.7 s of CPU for a 512³ map;
    ``hashlib`` releases the GIL), so a new run does it beside the maps'
    preparation and the sample fit. An error while reading is raised by ``result``.
    """

    def __init__(self, identity: dict):
        self._identity, self._hashed, self._error = identity, None, None
        self._thread = threading.Thread(target=self._run, name="dsub-content-hashes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._hashed = with_content_hashes(self._identity)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller by result()
            self._error = exc

    def result(self) -> dict:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashed


def close_in_background(closing: contextlib.ExitStack) -> threading.Thread:
    """Close ``closing`` (the runner and its cluster) in a thread; join it before the run returns.

    Its failures are not the run's: every result is in by then.
    """
    def close():
        with contextlib.suppress(Exception):
            closing.close()

    thread = threading.Thread(target=close, name="dsub-close-cluster", daemon=True)
    thread.start()
    return thread


def store_takes_up(store_path: Path, options: RunOptions) -> bool:
    """Whether an identical earlier run's store can be taken up by this one.

    Not a store of an earlier version (no per-image statistics), nor one
    without images when this run keeps them (``--keep-store``): the run then
    starts afresh, since the store would lack the finished chunks' images.
    """
    if not store.has_statistics(store_path):
        return False
    return store.has_images(store_path) or not options.keep_store


#: From this size on the line stating the memory a run needs also states the disk its outputs take.
DISK_STATED_BYTES = 10**9


def plan_resources(box: int, settings, options: RunOptions, map_voxels: int = 0):
    """Estimate the memory each worker needs (``resources.plan_memory``; stated and checked by
    ``announce_resources`` once the run is known to have work to do).

    Returns the plan and the cluster spec to start, which asks batch jobs for
    that memory and, unless the run is on the CPU, one GPU each.
    """
    with cluster_config(options.cluster.cluster_config):
        plan = resources.plan_memory(box, settings, options, map_voxels)
    request = plan.request_bytes if options.cluster.scheduler in ("slurm", "pbs") else None
    return plan, dataclasses.replace(options.cluster, device=options.device, worker_memory_bytes=request)


def announce_resources(plan, options: RunOptions, outputs: disk.DiskNeed | None = None, particles: int = 0,
                       report_box: int = 0, left_to_write: int | None = None) -> None:
    """Print the memory each worker needs (the ``Memory:`` line); refuse here when this machine cannot hold it,
    or when under an address-space limit this process cannot hold its own share and the QC report of
    ``particles`` images of ``report_box`` px (``resources.check_coordinator``).

    Called once OUTDIR is examined and before anything there changes, for a run
    with work to do (``nothing_to_compute``): a rerun of a finished run starts
    no worker and says only that it is finished. ``outputs``: what the run
    writes (``disk.plan_disk``), stated in the same line from ``DISK_STATED_BYTES`` on; ``left_to_write``:
    on a resume, the bytes of it that the earlier attempts left to write, said beside it.
    """
    written = (f"; the outputs take about {outputs.describe()} of disk"
               if outputs is not None and outputs.total >= DISK_STATED_BYTES else "")
    if written and left_to_write is not None and left_to_write < outputs.total:
        written += f", {disk.size_text(left_to_write)} of it still to write"
    say(options, f"Memory: {plan.describe()}{written}.")
    if not options.cluster.distributed:
        resources.check_this_machine(plan, particles, report_box or plan.need.box)
    resources.check_coordinator(plan, particles, report_box or plan.need.box)


def nothing_to_compute(store_path: Path, outdir: Path, layout, bounds, box: int, options: RunOptions,
                       resumes: bool) -> bool:
    """Whether a run that takes up an earlier identical run (``resumes``) has no chunk to compute: that run
    finished (its store holds no images and no stack is lost: ``finished_run``), or every chunk is done and
    only the export is left (``sample_check_if_all_done``). ``box``: the output box."""
    if not resumes:
        return False
    if store.images_deleted(store_path):
        stacks = export.stack_sizes(layout, box, np.float16 if options.float16 else np.float32)
        return lost_from_finished_run(outdir, stacks) is None
    return sample_check_if_all_done(store_path, outdir, layout, bounds, box, options) is not None


def disk_need(outdir: Path, layout, count: int, box: int, options: RunOptions, particle_files,
              resumes: bool) -> tuple[disk.DiskNeed, bool] | None:
    """What the run writes into OUTDIR, for ``disk.check_room`` before anything there changes: (``DiskNeed``,
    whether it takes up an earlier run's store and stacks), or None where it writes no stack.

    ``resumes``: the run takes up an identical earlier run's store
    (``prepare_outdir``): then only what that run left is counted, unless it
    finished (nothing to compute, unless it lost a stack: then all of it again)
    or its store cannot be taken up (``store_takes_up``). ``box``: the output box.
    """
    store_path = outdir / store.STORE_NAME
    takes_up = resumes
    if resumes and store.images_deleted(store_path):
        written = export.stack_sizes(layout, box, np.float16 if options.float16 else np.float32)
        if lost_from_finished_run(outdir, written) is None:
            return None  # finished: at most the star and .cs are written again
        takes_up = False
    elif resumes and not store_takes_up(store_path, options):
        takes_up = False
    need = disk.plan_disk(outdir, layout, count, box, options.chunk_size, options.float16, options.keep_store,
                          particle_files, takes_up)
    return need, takes_up


def write_qc_report(outdir: Path, options: RunOptions, preparation=None) -> None:
    """OUTDIR/report/index.html; a failure to draw it only warns: the subtraction itself is finished.

    ``preparation``: the ``report.start_preparation`` begun while the chunks ran (None: all read afterwards).
    """
    from ..report import write_report

    try:
        say(options, f"Report: {write_report(outdir, preparation)}")
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (Terminated): the results are complete already
        exc.results_complete = str(outdir)
        # The report is moved into place whole (``report.write_report``): a stop put off until after that
        # (``interrupts``: never inside an import) finds it complete, and the line must not say otherwise.
        exc.report_complete = report_drawn(outdir)
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure here must not fail a finished run
        warn(f"the QC report could not be written ({type(exc).__name__}: {exc}); the subtraction is complete. "
             f"Try again with: dsub report {outdir}")
def report_drawn(outdir: Path) -> bool:
    """Whether OUTDIR holds a whole QC report: its page, which ``report.write_report`` moves into place with the
    rest of the folder once all of it is drawn."""
    from ..report import PAGE_NAME

    return (outdir / REPORT_FOLDER / PAGE_NAME).is_file()


def reboxing_of_run(maps: MapFiles, settings, options: RunOptions, pixel_size: float):
    """The run's ``rebox.Reboxing`` and where its centre came from; (None, None) without those options.

    ``--recenter`` takes the centre of mass of the kept region of the half maps'
    average (``rebox.kept_region_centre``); ``--center`` is checked to lie in the map.
    """
    if not (options.recenter or options.center_voxels is not None or options.new_box):
        return None, None
    centre, centre_from, voxel = None, None, pixel_size
    if options.recenter:
        half_a, voxel = read_map(maps.half_a)
        half_b = half_a if options.single_map else read_map(maps.half_b)[0]
        kept = rebox.kept_weight(read_map(maps.mask)[0], settings.mask_keeps)
        centre = rebox.kept_region_centre(0.5 * (half_a + half_b), kept, maps.mask)
        centre_from = "centre of mass of the kept region"
    elif options.center_voxels is not None:
        map_box, voxel = map_header(maps.half_a)
        rebox.check_center(options.center_voxels, map_box)
        centre, centre_from = np.asarray(options.center_voxels, dtype=np.float64), "--center"
    voxel = voxel if voxel > 0 else pixel_size  # check_maps warned already
    reboxing = rebox.Reboxing(
        center_voxels=None if centre is None else tuple(float(v) for v in centre),
        map_pixel_size=float(voxel), new_box=options.new_box,
    )
    return reboxing, centre_from


def rebox_report(reboxing, centre_from, box: int) -> dict:
    """The re-centring and re-boxing, for dsub_run.json."""
    return {
        "center_voxels": None if reboxing.center_voxels is None else list(reboxing.center_voxels),
        "center_from": centre_from,
        "map_pixel_size": reboxing.map_pixel_size,
        "input_box": box,
        "new_box": reboxing.output_box(box),
    }


def remove_metadata(outdir: Path) -> None:
    """Remove the star, .cs and summary files and the QC report of an earlier export."""
    for name in METADATA:
        (outdir / name).unlink(missing_ok=True)
    shutil.rmtree(outdir / export.STAGING_FOLDER, ignore_errors=True)  # an export stopped before it moved out
    shutil.rmtree(outdir / REPORT_FOLDER, ignore_errors=True)  # an old run's report must not outlive it


def refuse_reading_what_is_replaced(outdir: Path, particles_path, table, half_a, half_b, mask,
                                    overwrite: bool) -> None:
    """Refuse a run whose inputs lie among OUTDIR's results that ``replace_earlier_outputs`` removes
    (``outdir.refuse_inputs_in_replaced_outputs``): the particle file, the stacks it names, its passthrough
    files, the maps and the mask. Checked before anything in OUTDIR changes."""
    refuse_inputs_in_replaced_outputs(outdir, {
        "the particles": [particles_path],
        f"the stacks {Path(particles_path).name} names": table.image_path_codes()[1],
        "the passthrough files": table.extra.get("passthrough", []),
        "--half-a": [half_a], "--half-b": [half_b], "--mask": [mask],
    }, overwrite, files=(*METADATA, LOG_NAME),
        folders=(REPORT_FOLDER, store.STORE_NAME, REMOVED_STORE_NAME, export.STAGING_FOLDER))


def replace_earlier_outputs(outdir: Path, attempt: record.AttemptRecorder, log: Transcript) -> None:
    """Remove an earlier run's outputs from OUTDIR (``--overwrite``), where the new run starts to write.

    The metadata and report go first, then the stacks, then the store (``remove_store``):
    a stop on the way leaves the earlier store, which a rerun recognises (the same run
    resumes, computing what is missing; another is refused without ``--overwrite``),
    and never a star or stacks without it; a stop once it is renamed aside leaves
    nothing to resume. ``attempt`` is marked first, for the stop line, where there
    is anything to remove (``left_to_resume``). ``log`` then holds only this run's lines.
    """
    log.drop_earlier()
    stacks = outdir / export.STACK_FOLDER
    if not any((outdir / name).exists() for name in (store.STORE_NAME, *METADATA, REPORT_FOLDER)) and not (
            stacks.is_dir() and any(export.is_stack_name(path.name) for path in stacks.iterdir())):
        return
    attempt.replaced_earlier = True
    remove_metadata(outdir)
    export.remove_stacks(outdir)
    remove_store(outdir / store.STORE_NAME)


@contextlib.contextmanager
def all_metadata_or_none(outdir: Path):
    """Write the export's metadata inside; if that fails (a full disk, an interrupt), none of it is left."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            remove_metadata(outdir)
        raise


def take_up_requeued_run(store_path: Path, identity: dict, fingerprint: str, job: str, options: RunOptions) -> bool:
    """Whether a requeued batch job (``record.requeued_job_began``: ``job`` began the store) resumes this run
    instead of replacing it, as its ``--overwrite`` would: where the store holds this very run; says so.

    The job script runs the same command again after a preemption or a node
    failure; with ``--overwrite`` that would delete the chunks the job's first run
    finished. A store of another run is replaced, as ``--overwrite`` asks.
    """
    try:
        earlier = dict(store.open_store(store_path).attrs.get("run", {}))
    except Exception:
        return False
    if not same_run(earlier, fingerprint, identity):
        return False
    say(options, f"dsub: this batch job ({job}) was requeued and {store_path.parent} holds the run it began: "
                 "resuming it rather than starting over, as --overwrite would.")
    return True


def adopt_strict_run(store_path: Path, identity: dict, fingerprint: str) -> None:
    """Let --skip-bad-particles resume a run that stopped at a bad image (the fix its error message gives).

    That run's finished chunks held no bad image, so they are exactly what this
    run would write: its store takes this run's fingerprint (and a later rerun
    without the flag is then refused as a different run, as it should be).
    """
    if not store_path.exists():
        return
    strict = {**identity, "skip_bad_particles": False}
    try:
        group = store.open_store(store_path, mode="r+")
        earlier = dict(group.attrs.get("run", {}))
        if not same_run(earlier, run_fingerprint(strict), strict):
            return
    except Exception:  # unreadable: prepare_outdir decides
        return
    # The same inputs (the fingerprints agree): the maps keep their content hashes, the record what dsub chose.
    group.attrs["run"] = {**earlier, **{key: value for key, value in identity.items() if key not in CONTENT_HASHED},
                          "fingerprint": fingerprint}


#: How many lost files of a finished run the line saying so names before it only counts them.
NAMED_LOST = 3


def lost_from_finished_run(outdir: Path, stacks: dict) -> str | None:
    """What a finished run (its store holding no images) has lost, in one phrase; None if nothing.

    ``stacks``: {path relative to ``outdir``: its size in bytes}. E.g.
    ``out/Particles/subtracted_0000.mrcs of the finished run is missing and its
    images are not kept (--keep-store)``: the run must then be computed again.
    """
    # The star and .cs alone are written again from the store (``finished_run``) while the record that the
    # export completed (dsub_run.json, written last) is there.
    metadata = (export.STAR_NAME, export.CS_NAME, RUN_SUMMARY) if not (outdir / RUN_SUMMARY).is_file() else ()
    lost = [(outdir / name, "is missing") for name in metadata if not (outdir / name).is_file()]
    for relative, size in stacks.items():
        path = outdir / relative
        if not export.has_size(path, size):
            found = path.stat().st_size if path.is_file() else None
            lost.append((path, "is missing" if found is None else
                         f"is {'cut short' if found < size else 'longer than it was written'} "
                         f"({number(found)} of {number(size)} bytes)"))
    if not lost:
        return None
    (first, what), more = lost[0], len(lost) - 1
    named = ", ".join(str(path) for path, _ in lost[:NAMED_LOST]) + (
        f" and {more + 1 - NAMED_LOST} more" if more + 1 > NAMED_LOST else "")
    line = (f"{first} of the finished run {what}" if not more
            else f"{named} of the finished run are missing or not of the size written")
    if any(Path(path).parent.name == export.STACK_FOLDER for path, _ in lost):
        line += " and its images are not kept (--keep-store)"
    return line


def finished_run(outdir: Path, stacks: dict, options: RunOptions, table=None, scale: str = "fit",
                 reboxing=None) -> dict | None:
    """The summary of this very run when it already finished in ``outdir`` (its store holding no images).

    Says so and returns the recorded summary when the star, .cs and
    ``dsub_run.json`` (written last, so the export completed) are there and
    every stack of ``stacks`` ({path relative to ``outdir``: its size in bytes})
    is there at its full size; else None: a stack is lost or cut short, and
    the run must be computed again.

    ``--paths`` and ``--cs-root`` are no part of the run's identity: when the
    star and .cs, as recorded, name the stacks otherwise than this command would
    (another ``--paths``, another cryoSPARC project folder, another current
    folder where the star's names start there (``export.star_names_base``: a
    .cs input, or a star of absolute names), a moved OUTDIR), they are written
    again from ``table`` (the input particles), ``scale`` (``--scale``),
    ``reboxing`` and the store's per-particle figures; no image is computed.
    If that fails, no metadata is left, so the next run computes afresh. A star
    or .cs lost since (``dsub_run.json`` still there) is written again the same way.
    """
    if not (outdir / RUN_SUMMARY).is_file():
        return None
    if not all(export.has_size(outdir / relative, size) for relative, size in stacks.items()):
        return None
    # A stop while the report was drawn left none (it is moved into place whole): drawn below, and said.
    drawing = "" if report_drawn(outdir) else "its QC report was missing: drawing it now"
    summary = json.loads((outdir / RUN_SUMMARY).read_text())
    names = None if table is None else stack_names(table, outdir, options.paths)
    missing = [name for name in (export.STAR_NAME, export.CS_NAME) if not (outdir / name).is_file()]
    if missing and table is None:
        return None
    if missing or (names is not None and summary.get("outputs", {}).get("stack_names") != names):
        store_path = outdir / store.STORE_NAME
        fit = store.per_particle(store_path)
        contrast = fit.pop("contrast")
        skipped = store.skipped_particles(store_path)
        with all_metadata_or_none(outdir):
            exported = rebox.reboxed_table(table, reboxing) if reboxing is not None else None
            staging = export.staging_folder(outdir)
            export.write_metadata(table, outdir, options.particles_per_stack, None if scale == "none" else contrast,
                                  skipped, exported, options.paths, fit, into=staging)
            summary["outputs"] = {**summary.get("outputs", {}), "paths": options.paths,
                                  "star_root": star_folder_text(table, outdir, options.paths),
                                  "cs_root": project_folder_text(table, outdir, options.paths), "stack_names": names}
            (staging / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
            export.publish_metadata(staging, outdir, RUN_SUMMARY)
        project = project_folder_text(table, outdir, options.paths)
        star_root = star_folder_text(table, outdir, options.paths)
        from_star = f", the star's names from {star_root}" if star_root not in (None, os.getcwd()) else ""
        from_project = f" and the .cs's from {project}" if project is not None else ""
        why = f" ({' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} missing)" if missing else ""
        say(options, f"dsub: {outdir} already holds the finished results of this run{why}; {export.STAR_NAME} and "
                     f"{export.CS_NAME} written again with --paths {options.paths}{from_star}{from_project} "
                     f"(stacks named as {names['star']} in the star, {names['cs']} in the .cs), no image computed "
                     f"again{'; ' + drawing if drawing else ''}. Add --overwrite to compute it again.")
    else:
        say(options, f"dsub: {outdir} already holds the finished results of this run ({export.STAR_NAME}, "
                     f"{export.CS_NAME}, {export.STACK_FOLDER}/); {drawing or 'nothing to do'}. Add --overwrite to "
                     "compute it again" + (" (that run kept no images in its store)." if options.keep_store else "."))
    if drawing:
        write_qc_report(outdir, options)
    return summary


def run_identity(particles_path, maps: MapFiles, table, box: int, settings, options: RunOptions) -> dict:
    """Everything the results depend on; stored in the store so an identical rerun can resume."""
    return {
        "dsub": __version__,
        "particles": file_identity(particles_path),
        "half_a": file_identity(maps.half_a),
        "half_b": file_identity(maps.half_b),
        "mask": file_identity(maps.mask),
        "stacks": [file_identity(path) for path in sorted({str(path) for path in table.image_path_codes()[1]})],
        "passthrough": [file_identity(path) for path in table.extra.get("passthrough", [])],
        # --padding as used: the projector's default when not given (the command line and Python alike)
        "settings": {**dataclasses.asdict(settings), "padding": projector_kernel(settings.projector, settings.padding)[1]},
        "chunk_size": options.chunk_size,
        "single_map": options.single_map,
        "skip_bad_particles": options.skip_bad_particles,
        "count": len(table),
        "box": box,
        **({"float16": True} if options.float16 else {}),  # absent for float32: earlier runs keep their identity
        # The stacks' layout; absent at the default, so earlier runs keep their identity.
        **({"particles_per_stack": options.particles_per_stack}
           if options.particles_per_stack != export.default_stack_size(options.chunk_size) else {}),
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
    skipped = summary["skipped_particles"]["count"]
    subtracted = summary["particles"] - skipped
    counted = f"{subtracted} of {summary['particles']}" if skipped else f"{subtracted}"
    attempts = len(summary.get("attempts") or [])  # the seconds are all attempts' (record.AttemptRecorder.finish)
    say(options, f"Subtracted {counted} particles in {summary['seconds']:.1f} s"
                 + (f" over {attempts} attempts" if attempts > 1 else "")
                 + (f" (contrast median {median:.3f})." if median is not None else "."))
    if skipped:
        warn(f"{skipped} particle{'s' if skipped != 1 else ''} with NaN or infinite values "
             f"{'were' if skipped != 1 else 'was'} left out; listed in {export.SKIPPED_NAME} and {RUN_SUMMARY}")
    negative = summary["contrast_negative_fraction"] or 0.0
    if 0 < negative <= 0.5:
        say(options, f"{negative:.1%} of the contrast scales are negative.")
    say(options, f"Outputs in {outdir}: {export.STAR_NAME}, {export.CS_NAME}, {export.STACK_FOLDER}/, "
                 f"{store.STORE_NAME}, {RUN_SUMMARY}")
