"""The ``dsub`` command line."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":  # ``python -m dsub.cli``: the ``dsub`` command itself, before the libraries load
    from .command import run

    run()  # its settings, its Ctrl-C and SIGTERM handling while it loads this module as dsub.cli; never returns

from . import __version__  # noqa: E402 -- after the block above
from .cluster import ClusterSpec, parse_adapt
from .errors import (
    DsubError, DsubWarning, MissingInputError, OptionError, Terminated,
    error_line, interrupted_line, one_task_at_a_time, resource_failure_line, warn,
)
from .formats.paths import PATH_MODES
from .interrupts import ignore_further_ctrl_c, stop_once_on_ctrl_c, terminate_on_sigterm
from .physics.contrast import SCALE_MODES, WEIGHTINGS, ContrastFit
from .physics.projector import CORNERS, PROJECTORS, projector_kernel
from .physics.subtract import EXTENSION, SubtractionSettings


def refuse_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """One ``dsub: error:`` line for arguments ``parser`` does not know, naming its nearest option for each."""
    import difflib

    known = [option for action in parser._actions for option in action.option_strings]
    guesses = [close[0] for word in unknown if word.startswith("--")
               and (close := difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.7))]
    parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                 + (f" (did you mean {' or '.join(guesses)}?)" if guesses else ""))


class OneLineParser(argparse.ArgumentParser):
    """argparse with dsub's error form: one ``dsub: error:`` line and a pointer to --help, exit status 2.

    Options are taken only as written in full: argparse's unique prefixes (``--mask-keep`` for
    ``--mask-keeps``, one letter from the flag that flips the region) are refused with the option meant.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        to_stderr(f"dsub: error: {message} (see '{self.prog} --help').")
        sys.exit(2)


#: ``--dashboard-address``'s default.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dsub", description="Distributed particle subtraction for cryo-EM (RELION and cryoSPARC)."
    )
    parser.add_argument("--version", action="version", version=f"dsub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "subtract",
        help="subtract the masked region's projection from every particle",
        description="Subtract the projection of the masked region of each particle's own half-map.",
    )
    run.add_argument("particles", help="RELION .star or cryoSPARC particle .cs")
    run.add_argument("--half-a", required=True, help="half-map A (.mrc): rlnRandomSubset 1, split 0")
    run.add_argument("--half-b", default=None,
                     help="half-map B (.mrc): rlnRandomSubset 2, split 1 (required unless --single-map)")
    run.add_argument("--mask", required=True, help="soft mask (.mrc, values in [0, 1]) of the region to subtract")
    run.add_argument("-o", "--outdir", required=True, help="output folder")
    run.add_argument("--mask-keeps", action="store_true",
                     help="RELION's convention: the mask covers the region to KEEP; subtract map*(1-mask)")
    run.add_argument("--scale", choices=SCALE_MODES, default="fit",
                     help="contrast scale per particle: fit it (default), take it from the input "
                          "(alignments3D/alpha; rlnDsubContrast, else rlnCtfScalefactor), or none (1)")
    run.add_argument("--window-inner", type=float, default=None,
                     help="fit the contrast inside a soft circular window: inner radius as a fraction of the box "
                          "half-width (cryoSPARC's default is 0.85; default here: no window, see README)")
    run.add_argument("--window-outer", type=float, default=None,
                     help="outer radius of that window (cryoSPARC: 0.99)")
    run.add_argument("--fit-lowres", type=float, default=100.0,
                     help="low-resolution limit of the contrast fit in Å (100; 0 = include all but DC)")
    run.add_argument("--fit-highres", type=float, default=0.0,
                     help="high-resolution limit of the contrast fit in Å (0 = Nyquist)")
    run.add_argument("--fit-weighting", choices=WEIGHTINGS, default="fsc",
                     help="fsc: weight the contrast fit by the half maps' FSC, so their noise does not bias it "
                          "(default); none: the plain least-squares fit (for maps without noise)")
    run.add_argument("--projector", choices=PROJECTORS, default="gridding",
                     help="gridding: Kaiser-Bessel slice, shift and CTF on an extraction field, crop (accurate, "
                          "default); relion: trilinear slice, shift and CTF on the box as relion_particle_subtract")
    run.add_argument("--padding", type=float, default=None,
                     help="oversampling of the prepared maps (gridding: 1.25; relion: 2)")
    run.add_argument("--corners", choices=CORNERS, default="map",
                     help="what the image spectrum's corners beyond the Nyquist circle get: the map's content "
                          "(map, default) or nothing (zero, as RELION); relion always uses zero")
    run.add_argument("--extension", type=float, default=EXTENSION,
                     help=f"least side of the extraction field the shift and CTF are applied on, in boxes "
                          f"({EXTENSION:g}; grown for the CTF's delocalisation; gridding only)")
    run.add_argument("--field-slice", action="store_true",
                     help="sample the slice on the extraction field's grid (exact when the map's projection "
                          "overflows the box; four times the slice cost; gridding only)")
    run.add_argument("--chunk-size", type=int, default=None,
                     help="particles per task and Zarr chunk (256; on --scheduler threads a smaller set is cut "
                          "into one chunk per thread, at least 16 particles each; a resumed run keeps its chunks)")
    run.add_argument("--particles-per-stack", type=int, default=None,
                     help="particles per exported .mrcs stack (4096, rounded down to whole chunks; a resumed run "
                          "keeps its stacks); stacks are written in parallel")
    run.add_argument("--float16", action="store_true",
                     help="write float16 stacks (MRC mode 12, read by RELION >= 4.0 and cryoSPARC >= 4.4) and a "
                          "float16 store: half the bytes; values beyond ±65504 stop the run")
    run.add_argument("--keep-store", action="store_true",
                     help="also keep a copy of the images in the store (by default the tasks write them only into "
                          "the stacks; the store keeps what a resume needs)")
    add_cluster_arguments(run)
    run.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                     help="where the physics runs: a GPU through CuPy when there is one (auto)")
    run.add_argument("--cs-root", default=None,
                     help="the cryoSPARC project folder: blob/path in an input .cs is relative to it (default: the "
                          "project folder above the .cs, else the .cs folder and its parents), and the output .cs's "
                          "blob/path are written relative to it (for star input too)")
    run.add_argument("--passthrough", action="append", default=[], metavar="FILE",
                     help="a .cs whose fields are joined to the input .cs's on uid (repeatable); the job's own "
                          "J<n>_passthrough_particles*.cs beside the input is joined without asking")
    run.add_argument("--paths", choices=PATH_MODES, default="auto",
                     help="how the outputs name the new stacks: auto (star: relative to the current folder when "
                          "OUTDIR is inside it, as RELION's jobs write; .cs: relative to the cryoSPARC project "
                          "folder when OUTDIR is inside it; else absolute), relative (to those folders, with ../), "
                          "absolute, or outdir (relative to OUTDIR)")
    run.add_argument("--lowpass", type=float, default=None, metavar="Å",
                     help="low-pass filter both half maps to this resolution (soft edge) before subtracting")
    run.add_argument("--rescale-maps", action="store_true",
                     help="project maps whose voxel size is more than 1 %% from every optics group's pixel size at "
                          "their own voxel size, rescaled to each particle's (refused without it: the header may "
                          "be wrong)")
    run.add_argument("--resolution", type=float, default=None, metavar="Å",
                     help="the maps' resolution: the mask's soft edge is checked against 5 x resolution / pixel size")
    run.add_argument("--overwrite", action="store_true", help="replace the results of a different run in OUTDIR")
    run.add_argument("--single-map", action="store_true",
                     help="subtract every particle with --half-a, for particles without (or with only one) half "
                          "set; breaks gold-standard independence, so dsub warns")
    run.add_argument("--skip-bad-particles", action="store_true",
                     help="leave out particles whose images hold NaN or infinite values (listed in "
                          "skipped_particles.star and dsub_run.json) instead of stopping")
    add_rebox_arguments(run)
    run.add_argument("--quiet", action="store_true",
                     help="no progress (bar or lines); messages, warnings and errors still show")

    script = commands.add_parser(
        "job-script", help="print the batch job script dsub would submit for each worker",
        description="Print the job script of one SLURM or PBS worker, for review before a run.",
    )
    script.add_argument("--scheduler", choices=("slurm", "pbs"), required=True)
    script.add_argument("--cluster-config", default=None, help="YAML file in dask-jobqueue's jobqueue.yaml format")
    script.add_argument("--box", type=int, default=None,
                        help="box size of the particles: the script then asks for the memory a run needs per worker")
    script.add_argument("--padding", type=float, default=None, help="as for subtract (the projector's default)")
    script.add_argument("--projector", choices=PROJECTORS, default="gridding", help="as for subtract (gridding)")
    script.add_argument("--chunk-size", type=int, default=256, help="as for subtract (256)")
    script.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="cpu: the workers ask for no GPU (default: one GPU per worker job)")

    qc = commands.add_parser(
        "report", help="write the QC report of a finished run (OUTDIR/report/index.html)",
        description="Draw example particles, power spectra, the contrast and fit quality of a finished run, with "
                    "its counts, parameters and timings, into OUTDIR/report/index.html (written at the end of "
                    "every run too).",
    )
    qc.add_argument("outdir", help="output folder of a finished dsub subtract run")

    demo = commands.add_parser("demo", help="simulate a small dataset, subtract it and report the accuracy")
    demo.add_argument("-o", "--outdir", default="demo_out", help="folder for the dataset and results (demo_out)")
    demo.add_argument("--particles", type=int, default=400, help="number of particles (400)")
    demo.add_argument("--box", type=int, default=64, help="box size in pixels (64; at least 24)")
    parser.command_parsers = commands.choices  # each command's own parser, for its unknown arguments
    return parser


def add_rebox_arguments(parser) -> None:
    group = parser.add_argument_group("re-centring and re-boxing (relion_particle_subtract's --recenter_on_mask, "
                                      "--center_x/y/z, --new_box)")
    centre = group.add_mutually_exclusive_group()
    centre.add_argument("--recenter", action="store_true",
                        help="centre each subtracted particle on the projection of the kept region's centre of "
                             "mass (half maps x region kept); the sub-pixel rest goes into the origins")
    centre.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="centre on the projection of this map point: voxels from the map's centre voxel "
                             "N//2 (RELION's --center_x/y/z)")
    group.add_argument("--new-box", type=int, default=None, metavar="B",
                       help="write the subtracted particles in a box of B px (even): cropped about the (new) "
                            "centre, or padded with zeros; rlnImageSize and blob/shape follow")


def add_cluster_arguments(parser) -> None:
    group = parser.add_argument_group("where it runs")
    group.add_argument("--scheduler", default="threads",
                       help="threads (default: this process), sync (one thread, for debugging), local (a local "
                            "Dask cluster: one worker per GPU), slurm, pbs (dask-jobqueue; one GPU per worker), "
                            "or tcp://HOST:PORT of a running Dask scheduler")
    group.add_argument("--workers", type=int, default=None,
                       help="threads (threads), worker processes (local) or batch jobs (slurm, pbs)")
    group.add_argument("--adapt", default=None, metavar="MIN:MAX",
                       help="adaptive scaling between MIN and MAX workers/jobs instead of a fixed --workers")
    group.add_argument("--cluster-config", default=None,
                       help="YAML file with dask-jobqueue settings (jobqueue.yaml format), applied on top of "
                            "~/.config/dask/jobqueue.yaml; see cluster/ for GPU profiles")
    group.add_argument("--worker-timeout", type=float, default=300.0,
                       help="seconds to wait for the first worker before giving up (300)")
    group.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD_ADDRESS,
                       help="where the Dask dashboard listens (127.0.0.1:8787: this machine only; reach it from "
                            "elsewhere through an SSH tunnel)")
    group.add_argument("--interface", default=None,
                       help="network interface the scheduler (and batch workers) listen on, e.g. ib0 (default: "
                            "loopback for local, dask-jobqueue's 'interface' setting for slurm/pbs)")
    group.add_argument("--secure", action="store_true",
                       help="TLS between client, scheduler and workers with credentials made for this run only")


def cluster_from_args(args) -> ClusterSpec:
    """The ``ClusterSpec`` of the command line; options the scheduler does not use are named in one warning
    (a run with ``threads``/``sync`` starts no scheduler, ``tcp://`` joins one that has its own address and dashboard).
    """
    if args.scheduler in ("threads", "sync") or args.scheduler.startswith("tcp://"):
        unused = ([f"--interface {args.interface}"] if args.interface else []) + (
            [f"--dashboard-address {args.dashboard_address}"]
            if args.dashboard_address != DEFAULT_DASHBOARD_ADDRESS else [])
        if unused:
            warn(f"{' and '.join(unused)}: not used by --scheduler {args.scheduler}, which starts no Dask scheduler "
                 "here; they set where a local or SLURM/PBS cluster's scheduler listens.")
    return ClusterSpec(
        scheduler=args.scheduler, workers=args.workers,
        adapt=parse_adapt(args.adapt) if args.adapt else None, cluster_config=args.cluster_config,
        worker_timeout=args.worker_timeout, dashboard_address=args.dashboard_address,
        interface=args.interface, secure=args.secure, progress=not getattr(args, "quiet", False),
    )


def effective_padding(args) -> float:
    """--padding, or the projector's default oversampling, so runs record the value they used."""
    if args.padding is not None and not args.padding >= 1:
        raise OptionError(f"--padding must be at least 1, not {args.padding:g}")
    return projector_kernel(args.projector, args.padding)[1]


def settings_from_args(args) -> SubtractionSettings:
    for option, value in (("--fit-lowres", args.fit_lowres), ("--fit-highres", args.fit_highres)):
        if not value >= 0:
            raise OptionError(f"{option} must be a resolution in Å, or 0 for no limit, not {value:g}")
    try:
        fit = ContrastFit(
            window_inner=args.window_inner,
            window_outer=args.window_outer,
            low_resolution_angstrom=args.fit_lowres or None,
            high_resolution_angstrom=args.fit_highres or None,
            weighting=args.fit_weighting,
        )
        return SubtractionSettings(
            projector=args.projector, padding=effective_padding(args), scale=args.scale, mask_keeps=args.mask_keeps, fit=fit,
            lowpass_angstrom=args.lowpass,
            corners=args.corners, extension=args.extension, field_slice=args.field_slice,
        )
    except ValueError as exc:
        raise OptionError(str(exc)) from exc


def run_subtract(args) -> int:
    settings = settings_from_args(args)
    for path, option in ((args.particles, "the particles"), (args.half_a, "--half-a"), (args.half_b, "--half-b"),
                         (args.mask, "--mask")):
        if path is not None and not Path(path).exists():
            if not args.overwrite:
                from .workflow.outputs import finished_without_input

                finished = finished_without_input(Path(args.outdir), shlex.join(args.command_line))
                if finished is not None:
                    print(f"dsub: {path} ({option}) is gone, but {finished}", flush=True)
                    return 0
            raise MissingInputError(path, given_as=option)
    from .workflow.pipeline import RunOptions, subtract

    options = RunOptions(
        outdir=Path(args.outdir), chunk_size=args.chunk_size, particles_per_stack=args.particles_per_stack,
        device=args.device, overwrite=args.overwrite, cs_root=args.cs_root, passthrough=tuple(args.passthrough),
        paths=args.paths, resolution_angstrom=args.resolution, single_map=args.single_map,
        skip_bad_particles=args.skip_bad_particles, recenter=args.recenter,
        center_voxels=tuple(args.center) if args.center is not None else None, new_box=args.new_box,
        float16=args.float16, keep_store=args.keep_store, rescale_maps=args.rescale_maps,
        cluster=cluster_from_args(args), command=shlex.join(args.command_line),
    )
    subtract(args.particles, args.half_a, args.half_b, args.mask, settings, options)
    return 0


#: The demo's smallest box: below it the simulated domains are too close for a clean mask (``demo.make_dataset``).
DEMO_SMALLEST_BOX = 24


def run_demo(args) -> int:
    from .demo import make_dataset, residual_of_masked_region
    from .workflow.pipeline import RunOptions, subtract

    if args.particles < 1:
        raise OptionError(f"--particles must be at least 1, not {args.particles}")
    if args.box < DEMO_SMALLEST_BOX:
        raise OptionError(f"--box must be at least {DEMO_SMALLEST_BOX} pixels for the demo (its two domains need room "
                          f"for a clean mask), not {args.box}")
    if args.box % 2:
        raise OptionError(f"--box {args.box} is odd; RELION and cryoSPARC work with even boxes: use {args.box - 1} or "
                          f"{args.box + 1}")
    outdir = Path(args.outdir)
    for folder in (outdir, *outdir.parents):  # checked before the simulation, which takes a while
        if folder.exists() and not folder.is_dir():
            raise OptionError(f"-o {outdir}: {folder} is a file, not a folder: give a folder for the demo's data "
                              "and results")
    try:
        (outdir / "data").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OptionError(f"-o {outdir}: the folder cannot be made there ({error.strerror}): give a folder you can "
                          "write to") from None
    print(f"Simulating {args.particles} particles of {args.box} px in {outdir / 'data'} ...", flush=True)
    paths, sim = make_dataset(outdir / "data", count=args.particles, box=args.box)
    options = RunOptions(outdir=outdir / "subtracted", chunk_size=64, overwrite=True,
                         command=shlex.join(args.command_line))
    subtract(paths["star"], paths["half_a"], paths["half_b"], paths["mask"], SubtractionSettings(), options)
    residual = residual_of_masked_region(outdir / "subtracted", sim)
    print(f"\nWhat is left of the masked domain: {residual:.2%} (RMS, relative to the subtracted signal;"
          " at this noise level almost all of it is noise in each particle's fitted contrast).")
    print(f"Inputs:  {outdir / 'data'}  (particles.star, half_A.mrc, half_B.mrc, mask.mrc)")
    print(f"Outputs: {outdir / 'subtracted'}  (particles_subtracted.star / .cs, Particles/*.mrcs)")
    return 0


def run_report(args) -> int:
    from .report import write_report

    print(f"Report: {write_report(Path(args.outdir))}")
    return 0


#: What ``dsub job-script`` says of the worker command's scheduler address and name (dask-jobqueue's stand-ins).
PLACEHOLDER_NOTE = ("# In the worker command, the scheduler address and --name dummy-name stand in for what a run "
                    "fills in: its scheduler's address and each worker's name.")


def run_job_script(args) -> int:
    from .cluster.config import cluster_config, warn_unused_settings
    from .cluster.scripts import job_script
    from .workflow.pipeline import RunOptions
    from .workflow.resources import plan_memory

    warn_unused_settings(args.cluster_config, args.scheduler)  # as subtract warns
    memory = None
    if args.box is not None:
        if args.box < 2:
            raise OptionError(f"--box must be at least 2 pixels, not {args.box}")
        try:
            settings = SubtractionSettings(projector=args.projector, padding=effective_padding(args))
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
        spec = ClusterSpec(scheduler=args.scheduler, cluster_config=args.cluster_config)
        options = RunOptions(outdir=Path("."), chunk_size=args.chunk_size, device=args.device, cluster=spec)
        with cluster_config(args.cluster_config):
            plan = plan_memory(args.box, settings, options)
        memory = plan.request_bytes
    script = job_script(args.scheduler, args.cluster_config, memory, args.device)
    # After the shebang: the printed script stays one a batch system runs.
    shebang, _, rest = script.partition("\n")
    notes = [PLACEHOLDER_NOTE] + ([f"# Memory: {plan.need.describe()}."] if args.box is not None else [])
    script = "\n".join([shebang, *notes, rest])
    print(script)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    if not given or given[0].startswith("-") and given[0] not in ("-h", "--help", "--version"):
        commands = list(parser.command_parsers)
        parser.error(f"give a command first: {', '.join(commands[:-1])} or {commands[-1]}")
    command = parser.command_parsers.get(given[0])
    if command is not None:  # a mistyped option before argparse's "required" line, which would hide it
        known = {option for action in command._actions for option in action.option_strings}
        options = given[1:given.index("--")] if "--" in given else given[1:]  # after "--" only positionals
        mistyped = [word for word in options if word.startswith("--") and " " not in word
                    and word.split("=")[0] not in known]
        if mistyped:
            refuse_unknown(command, mistyped)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, with the option it is nearest to
        refuse_unknown(parser.command_parsers[args.command], unknown)
    args.command_line = ["dsub", *map(str, sys.argv[1:] if argv is None else argv)]
    handlers = {"subtract": run_subtract, "demo": run_demo, "job-script": run_job_script, "report": run_report}
    previous = terminate_on_sigterm()
    try:
        with warnings.catch_warnings():
            # dsub's own warnings reach the user; libraries' deprecation notices do not.
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", DsubWarning)
            warnings.showwarning = lambda message, *rest, **kw: to_stderr(f"dsub: warning: {message}")
            return handlers[args.command](args)
    except DsubError as exc:
        to_stderr(error_line(exc))  # always one line
        return 2
    except (MemoryError, RuntimeError, ImportError) as exc:
        # Fewer tasks at once only where there were several (not --workers 1, not --scheduler sync).
        line = resource_failure_line(exc, one_task_at_a_time(args))
        if line is None:
            raise
        to_stderr(line)
        return 2
    except BrokenPipeError:  # what dsub printed was cut off by its reader (dsub job-script | head): no error
        return 128 + signal.SIGPIPE
    except OSError as exc:
        to_stderr(os_error_line(exc))
        return 2
    except Terminated as exc:
        stopped_before_the_run(exc, args)
        to_stderr(interrupted_line(exc))
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as exc:
        ignore_further_ctrl_c()  # the clean-up is done; distributed's exit-time handlers are still to run
        stopped_before_the_run(exc, args)
        to_stderr(interrupted_line(exc))
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def to_stderr(line: str) -> None:
    """A line on stderr. A stderr that is gone (a closed pipe: ``dsub subtract ... 2>&1 | head``) is dropped
    for the rest of the process and the run goes on, its lines still in OUTDIR/dsub.log; a warning written
    there had ended the run with nothing written."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def stopped_before_the_run(exc: KeyboardInterrupt, args) -> None:
    """A ``subtract`` stopped outside its run (the run marks its own stops): nothing was written, unless the
    run got under way and OUTDIR holds its store, as the run itself decides (a stop that lands as the run
    returns comes after its results)."""
    if args.command == "subtract" and not hasattr(exc, "nothing_written"):
        store = sys.modules.get(f"{__package__}.workflow.store")  # loaded (1.5 s) only once the run is under way
        exc.nothing_written = store is None or not (Path(args.outdir) / store.STORE_NAME).exists()


#: What to do about an operating-system error that reached the command line, by errno.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space there, or write elsewhere (-o)",
    errno.EDQUOT: "free space in your quota, or write elsewhere (-o)",
    errno.ENOMEM: "give dsub more memory (a higher 'ulimit -v': mapped stacks count against it, or a larger batch job)",
    errno.EACCES: "check the permissions of that path",
    errno.EROFS: "write elsewhere (-o): that file system is read-only",
}


def os_error_line(exc: OSError) -> str:
    """One ``dsub: error:`` line for an operating-system error: the file, the system's reason, a fix."""
    where = f"{exc.filename}: " if exc.filename else ""
    fix = _OS_ERROR_FIXES.get(exc.errno, "check that path and rerun the same command (finished work is kept)")
    return f"dsub: error: {where}{exc.strerror or exc}. {fix[0].upper()}{fix[1:]}."


def entry() -> None:
    """The ``dsub`` command: ``main``, its exit-time handlers, then the process ends at once.

    When ``main`` returns, every output is written and closed. What Python would
    do next, freeing every module's objects one by one (and on a GPU the CUDA
    context and page-locked buffers, which the kernel frees anyway), took 0.6 s
    of a 2-core machine after a small run (BENCHMARKS.md) and serves nobody. The
    handlers registered with ``atexit`` (multiprocessing's, which reaps a local
    cluster's processes, among them) still run; then ``os._exit``.
    """
    stop_once_on_ctrl_c()
    code = main()
    ignore_further_ctrl_c()  # every output is closed; a Ctrl-C now would only interrupt the exit-time handlers
    atexit._run_exitfuncs()  # what a normal exit runs first
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (dsub ... | head)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
