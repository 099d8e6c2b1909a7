"""The ``dsub`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .cluster import ClusterSpec, parse_adapt
from .errors import DsubError, DsubWarning, OptionError
from .physics.contrast import SCALE_MODES, ContrastFit
from .physics.projector import CORNERS, PROJECTORS
from .physics.subtract import EXTENSION, SubtractionSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
                          "(alignments3D/alpha, rlnCtfScalefactor), or none (1)")
    run.add_argument("--window-inner", type=float, default=None,
                     help="fit the contrast inside a soft circular window: inner radius as a fraction of the box "
                          "half-width (cryoSPARC's default is 0.85; default here: no window, see README)")
    run.add_argument("--window-outer", type=float, default=None,
                     help="outer radius of that window (cryoSPARC: 0.99)")
    run.add_argument("--fit-lowres", type=float, default=100.0,
                     help="low-resolution limit of the contrast fit in Å (100; 0 = include all but DC)")
    run.add_argument("--fit-highres", type=float, default=0.0,
                     help="high-resolution limit of the contrast fit in Å (0 = Nyquist)")
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
    run.add_argument("--chunk-size", type=int, default=256, help="particles per task and Zarr chunk (256)")
    run.add_argument("--particles-per-stack", type=int, default=4096,
                     help="particles per exported .mrcs stack (4096, rounded to whole chunks); stacks are "
                          "written in parallel")
    add_cluster_arguments(run)
    run.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                     help="where the physics runs: a GPU through CuPy when there is one (auto)")
    run.add_argument("--cs-root", default=None,
                     help="folder that blob/path in a .cs is relative to (default: the .cs folder, then its "
                          "parents up to the cryoSPARC project folder)")
    run.add_argument("--overwrite", action="store_true", help="replace the results of a different run in OUTDIR")
    run.add_argument("--single-map", action="store_true",
                     help="subtract every particle with --half-a, for particles without (or with only one) half "
                          "set; breaks gold-standard independence, so dsub warns")
    run.add_argument("--skip-bad-particles", action="store_true",
                     help="leave out particles whose images hold NaN or infinite values (listed in "
                          "skipped_particles.star and dsub_run.json) instead of stopping")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    script = commands.add_parser(
        "job-script", help="print the batch job script dsub would submit for each worker",
        description="Print the job script of one SLURM or PBS worker, for review before a run.",
    )
    script.add_argument("--scheduler", choices=("slurm", "pbs"), required=True)
    script.add_argument("--cluster-config", default=None, help="YAML file in dask-jobqueue's jobqueue.yaml format")

    demo = commands.add_parser("demo", help="simulate a small dataset, subtract it and report the accuracy")
    demo.add_argument("-o", "--outdir", default="demo_out", help="folder for the dataset and results (demo_out)")
    demo.add_argument("--particles", type=int, default=400, help="number of particles (400)")
    demo.add_argument("--box", type=int, default=64, help="box size in pixels (64)")
    return parser


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
    group.add_argument("--dashboard-address", default="127.0.0.1:8787",
                       help="where the Dask dashboard listens (127.0.0.1:8787: this machine only; reach it from "
                            "elsewhere through an SSH tunnel)")
    group.add_argument("--interface", default=None,
                       help="network interface the scheduler (and batch workers) listen on, e.g. ib0 (default: "
                            "loopback for local, dask-jobqueue's 'interface' setting for slurm/pbs)")
    group.add_argument("--secure", action="store_true",
                       help="TLS between client, scheduler and workers with credentials made for this run only")


def cluster_from_args(args) -> ClusterSpec:
    return ClusterSpec(
        scheduler=args.scheduler, workers=args.workers,
        adapt=parse_adapt(args.adapt) if args.adapt else None, cluster_config=args.cluster_config,
        worker_timeout=args.worker_timeout, dashboard_address=args.dashboard_address,
        interface=args.interface, secure=args.secure, progress=not getattr(args, "quiet", False),
    )


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
        )
        return SubtractionSettings(
            projector=args.projector, padding=args.padding, scale=args.scale, mask_keeps=args.mask_keeps, fit=fit,
            corners=args.corners, extension=args.extension, field_slice=args.field_slice,
        )
    except ValueError as exc:
        raise OptionError(str(exc)) from exc


def run_subtract(args) -> int:
    from .workflow.pipeline import RunOptions, subtract

    settings = settings_from_args(args)
    options = RunOptions(
        outdir=Path(args.outdir), chunk_size=args.chunk_size, particles_per_stack=args.particles_per_stack,
        device=args.device, overwrite=args.overwrite, cs_root=args.cs_root, single_map=args.single_map,
        skip_bad_particles=args.skip_bad_particles, cluster=cluster_from_args(args),
    )
    subtract(args.particles, args.half_a, args.half_b, args.mask, settings, options)
    return 0


def run_demo(args) -> int:
    from .demo import make_dataset, residual_of_masked_region
    from .workflow.pipeline import RunOptions, subtract

    outdir = Path(args.outdir)
    print(f"Simulating {args.particles} particles of {args.box} px in {outdir / 'data'} ...", flush=True)
    paths, sim = make_dataset(outdir / "data", count=args.particles, box=args.box)
    options = RunOptions(outdir=outdir / "subtracted", chunk_size=64, overwrite=True)
    subtract(paths["star"], paths["half_a"], paths["half_b"], paths["mask"], SubtractionSettings(), options)
    residual = residual_of_masked_region(outdir / "subtracted", sim)
    print(f"\nWhat is left of the masked domain: {residual:.2%} (RMS, relative to the subtracted signal;"
          " at this noise level almost all of it is noise in each particle's fitted contrast).")
    print(f"Inputs:  {outdir / 'data'}  (particles.star, half_A.mrc, half_B.mrc, mask.mrc)")
    print(f"Outputs: {outdir / 'subtracted'}  (particles_subtracted.star / .cs, Particles/*.mrcs)")
    return 0


def run_job_script(args) -> int:
    from .cluster.scripts import job_script

    print(job_script(args.scheduler, args.cluster_config))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"subtract": run_subtract, "demo": run_demo, "job-script": run_job_script}
    try:
        with warnings.catch_warnings():
            # dsub's own warnings reach the user; libraries' deprecation notices do not.
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", DsubWarning)
            warnings.showwarning = lambda message, *rest, **kw: print(f"dsub: warning: {message}", file=sys.stderr)
            return handlers[args.command](args)
    except DsubError as exc:
        print(f"dsub: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("dsub: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
