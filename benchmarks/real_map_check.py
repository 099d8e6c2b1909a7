#!/usr/bin/env python
"""Acceptance check of dsub on particles simulated from a real map by an independent simulator.

The check the project is judged on: run dsub on particles simulated by a different program from a
real map (box 128, SNR about 0.1 per pixel, contrast varying ±30 % between particles, two distinct
half maps, a soft mask).  What remains of the masked region must be <= 3.5 % (RMS) of the
subtracted signal with ``--scale fit``, and <= 1 % from a ``.cs`` with ``alignments3D/alpha`` and
``--scale input``; ``--mask-keeps`` with the inverted mask must give the same result.

What this script shares with dsub: only its file *writers* (star, cs, mrc: I/O) and the
independent CTF of ``dsub/simulate.py`` (``ctf_full_plane`` / ``apply_ctf``, written apart from
the engine on purpose).  Nothing from ``dsub.physics`` or ``dsub.workflow`` is imported; dsub runs
as a separate process through its command line, and its outputs are read back with ``starfile``
and ``mrcfile`` directly.

The simulator projects in *real space*: the map is Fourier-upsampled (default x2, i.e. its own
band-limited interpolant), turned into cubic-spline coefficients, and sampled with
``scipy.ndimage.map_coordinates`` along the beam of every image pixel, following DESIGN.md:
a map point c (voxels from the centre N//2, order x, y, z) lands at image position
``(A c)_xy - origin`` with ``A = Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True)
.as_matrix().T``; the projection is the line integral along the beam (sum with voxel step 1).
Particles are extracted as from a micrograph: projected onto a field of ``--field`` boxes (3),
multiplied by their CTF there and cropped to the box (``--field 1``: the CTF on the box grid).

Run from the repository root:  .venv/bin/python benchmarks/real_map_check.py  [--help]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import starfile
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# dsub's I/O only (writers), and the independent CTF of the simulator module.
from dsub.formats import cs as cs_format  # noqa: E402
from dsub.formats import star as star_format  # noqa: E402
from dsub.formats.mrc import write_map, write_stack  # noqa: E402
from dsub.particles import ParticleTable  # noqa: E402
from dsub.simulate import apply_ctf, ctf_full_plane  # noqa: E402

DATA = Path(os.environ.get("DSUB_SHARED_DATA", REPO.parent / "shared" / "data")) / "emd3488"
MAP_PATH = DATA / "emd_3488.mrc"
PDB_PATH = DATA / "5me2.pdb"
DSUB = REPO / ".venv" / "bin" / "dsub"

VOLTAGE_KV, CS_MM, Q0 = 300.0, 2.7, 0.1
FIT_LIMIT, INPUT_LIMIT = 0.035, 0.01


# ----------------------------------------------------------------------------------------------
# Map, model, mask, half maps
# ----------------------------------------------------------------------------------------------
@dataclass
class RealMap:
    volume: np.ndarray  # (z, y, x) float64, box N, centre voxel N//2
    voxel: float
    offset: np.ndarray  # (x, y, z) added to the original map's voxel indices to get padded indices


def load_map(path: Path, box: int) -> RealMap:
    """The map padded (or cropped) to ``box`` with its centre voxel n//2 moved to box//2."""
    with mrcfile.open(path, permissive=True) as mrc:
        header = mrc.header
        axes = (int(header.mapc), int(header.mapr), int(header.maps))
        data = np.asarray(mrc.data, dtype=np.float64)
        voxel = float(mrc.voxel_size.x)
    if axes != (1, 2, 3):
        raise SystemExit(f"{path}: axis order {axes} not handled (expected 1 2 3)")
    n = data.shape[0]
    out = np.zeros((box, box, box))
    shift = box // 2 - n // 2
    src = slice(max(0, -shift), min(n, box - shift))
    dst = slice(max(0, shift), max(0, shift) + (src.stop - src.start))
    out[dst, dst, dst] = data[src, src, src]
    return RealMap(out, voxel, np.full(3, shift, dtype=float))


def read_pdb(path: Path):
    """(xyz in Å (n, 3), chain ids (n,)) of ATOM and HETATM records (hetero groups included)."""
    xyz, chains = [], []
    for line in open(path):
        if line.startswith(("ATOM", "HETATM")):
            xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
            chains.append(line[21])
    return np.array(xyz), np.array(chains)


def atoms_to_voxels(xyz: np.ndarray, map_path: Path, real_map: RealMap) -> np.ndarray:
    """Atom positions as padded-map voxel indices (x, y, z), from the header's origin and nxstart."""
    with mrcfile.open(map_path, permissive=True) as mrc:
        h = mrc.header
        origin = np.array([float(h.origin.x), float(h.origin.y), float(h.origin.z)])
        start = np.array([int(h.nxstart), int(h.nystart), int(h.nzstart)], dtype=float)
    return (xyz - origin) / real_map.voxel - start + real_map.offset


def registration_report(volume: np.ndarray, atoms_vox: np.ndarray) -> str:
    """Mean map value at the atoms, as registered and shifted by ±0.5 voxel along each axis."""
    def mean_at(shift):
        return float(ndimage.map_coordinates(volume, (atoms_vox + shift)[:, ::-1].T, order=1).mean())

    here = mean_at(np.zeros(3))
    shifted = max(mean_at(s * np.eye(3)[a]) for a in range(3) for s in (-0.5, 0.5))
    scramble = mean_at(np.array([7.0, -5.0, 6.0]))
    ok = here > shifted
    return (f"map value at atoms {here:.4f} (best ±0.5-voxel shift {shifted:.4f}, 6-9 voxels off "
            f"{scramble:.4f}, map mean {volume[volume != 0].mean():.4f}) -> registration "
            f"{'OK' if ok else 'SUSPECT'}")


def distance_to_atoms(atoms_vox: np.ndarray, box: int, voxel: float, cutoff_angstrom: float) -> np.ndarray:
    """Distance in Å from every voxel centre to the nearest atom (capped at ``cutoff``), (z, y, x)."""
    g = np.arange(box, dtype=np.float64)
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    points = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    tree = cKDTree(atoms_vox)
    dist, _ = tree.query(points, distance_upper_bound=cutoff_angstrom / voxel + 1, workers=-1)
    dist = np.minimum(dist * voxel, cutoff_angstrom)
    return dist.reshape(box, box, box)


def soft_mask_from_distance(dist: np.ndarray, dilate: float, edge: float) -> np.ndarray:
    """1 within ``dilate`` Å of an atom, raised-cosine fall to 0 at ``dilate + edge`` Å."""
    ramp = np.clip((dist - dilate) / edge, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * ramp))


def b_factor_blur(volume: np.ndarray, voxel: float, bfactor: float) -> np.ndarray:
    """Multiply the map's transform by exp(-B s²/4)."""
    if bfactor == 0:
        return volume.copy()
    n = volume.shape[0]
    f = np.fft.fftfreq(n) / voxel
    fr = np.fft.rfftfreq(n) / voxel
    s2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2
    return np.fft.irfftn(np.fft.rfftn(volume) * np.exp(-bfactor * s2 / 4.0), s=volume.shape, axes=(0, 1, 2))


def make_half_maps(volume, voxel, envelope, rng, b_factors=(0.0, 2.0), noise_level=0.02,
                   noise_smooth_voxels=1.2):
    """Two distinct half maps: a slightly different B-factor each, plus independent smooth noise.

    The noise is white Gaussian noise smoothed by a Gaussian of ``noise_smooth_voxels`` and
    confined to the molecular ``envelope``, with an RMS of ``noise_level`` times the map's RMS
    inside the envelope.
    """
    inside = envelope > 0.5
    map_rms = np.sqrt(np.mean(volume[inside] ** 2))
    halves = []
    for bfactor in b_factors:
        noise = ndimage.gaussian_filter(rng.normal(size=volume.shape), noise_smooth_voxels) * envelope
        noise *= noise_level * map_rms / np.sqrt(np.mean(noise[inside] ** 2))
        halves.append(b_factor_blur(volume, voxel, bfactor) + noise)
    return halves


# ----------------------------------------------------------------------------------------------
# Independent real-space projector
# ----------------------------------------------------------------------------------------------
def fourier_upsample(volume: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (trigonometric) interpolation onto a grid ``factor`` times finer.

    Sample i of the input becomes sample factor*i of the output; the Nyquist planes of an even
    box are split between +N/2 and -N/2 so the result stays real and exact at the samples.
    """
    if factor == 1:
        return np.asarray(volume, dtype=np.float64)
    n = volume.shape[0]
    m = n * factor
    spec = np.fft.fftn(volume)
    for axis in range(3):
        shape = list(spec.shape)
        shape[axis] = m
        out = np.zeros(shape, dtype=np.complex128)

        def sl(a, b):
            s = [slice(None)] * 3
            s[axis] = slice(a, b)
            return tuple(s)

        h = n // 2
        if n % 2 == 0:
            out[sl(0, h)] = spec[sl(0, h)]
            out[sl(m - h + 1, m)] = spec[sl(h + 1, n)]
            out[sl(h, h + 1)] = 0.5 * spec[sl(h, h + 1)]
            out[sl(m - h, m - h + 1)] = 0.5 * spec[sl(h, h + 1)]
        else:
            out[sl(0, h + 1)] = spec[sl(0, h + 1)]
            out[sl(m - h, m)] = spec[sl(h + 1, n)]
        spec = out
    return np.fft.ifftn(spec).real * factor**3


@dataclass
class SplineVolume:
    """Cubic-spline coefficients of a (possibly upsampled) map and its support sphere."""

    coeffs: np.ndarray
    box: int
    upsample: int
    centre: np.ndarray  # (x, y, z) voxels from the map centre
    radius: float  # voxels


def spline_volume(volume: np.ndarray, upsample: int = 2, margin: float = 4.0, tol: float = 1e-6) -> SplineVolume:
    box = volume.shape[0]
    support = np.argwhere(np.abs(volume) > tol * np.abs(volume).max())  # (z, y, x)
    xyz = support[:, ::-1] - box // 2
    centre = 0.5 * (xyz.min(axis=0) + xyz.max(axis=0))
    radius = float(np.sqrt(((xyz - centre) ** 2).sum(axis=1)).max()) + margin
    coeffs = ndimage.spline_filter(fourier_upsample(volume, upsample), order=3, mode="grid-constant",
                                   output=np.float64)
    return SplineVolume(coeffs, box, upsample, centre.astype(float), radius)


def project_real_space(vol: SplineVolume, rotation: np.ndarray, origin, beam_step: float = 1.0,
                       size: int | None = None) -> np.ndarray:
    """Line integral along the beam, image (y, x): pixel u collects the points c with (A c)_xy = u + o.

    Only rays through the support sphere are sampled, at points w = w_centre + j*beam_step.
    The image is ``size``² (default the map's box) with its centre at pixel size//2.
    """
    n = vol.box
    size = n if size is None else int(size)
    A = np.asarray(rotation, dtype=np.float64)
    o = np.asarray(origin, dtype=np.float64)
    landed = A @ vol.centre  # where the support centre goes, before the origin shift
    ps = landed[:2] - o
    r = vol.radius
    lo = np.maximum(np.ceil(ps - r).astype(int), -(size // 2))
    hi = np.minimum(np.floor(ps + r).astype(int), size - size // 2 - 1)
    image = np.zeros((size, size))
    if np.any(hi < lo):
        return image
    ux = np.arange(lo[0], hi[0] + 1, dtype=np.float64)
    uy = np.arange(lo[1], hi[1] + 1, dtype=np.float64)
    jmax = int(np.floor(r / beam_step))
    w = np.arange(-jmax, jmax + 1) * beam_step
    UY, UX, W = np.meshgrid(uy, ux, w, indexing="ij")
    keep = (UX - ps[0]) ** 2 + (UY - ps[1]) ** 2 + W**2 <= r * r
    tx = UX[keep] + o[0]
    ty = UY[keep] + o[1]
    tz = W[keep] + landed[2]
    c = A.T @ np.stack([tx, ty, tz])  # (x, y, z) voxels from the centre
    scale = vol.upsample
    coords = scale * (c[::-1] + n // 2)  # (z, y, x) indices on the upsampled grid
    values = ndimage.map_coordinates(vol.coeffs, coords, order=3, prefilter=False, mode="grid-constant")
    pixel = ((UY[keep] + size // 2) * size + (UX[keep] + size // 2)).astype(np.int64)
    image.ravel()[:] = np.bincount(pixel, weights=values, minlength=size * size) * beam_step
    return image


# ----------------------------------------------------------------------------------------------
# Projector checks
# ----------------------------------------------------------------------------------------------
def gaussian_blobs(rng, count=16, spread=28.0, sigma=(1.2, 2.5)):
    return (rng.uniform(-spread, spread, size=(count, 3)), rng.uniform(*sigma, size=count),
            rng.uniform(0.5, 1.0, size=count))


def voxelize_blobs(blobs, box):
    centres, sigmas, heights = blobs
    g = np.arange(box) - box // 2
    vol = np.zeros((box, box, box))
    for (cx, cy, cz), s, h in zip(centres, sigmas, heights):
        gx = np.exp(-((g - cx) ** 2) / (2 * s * s))
        gy = np.exp(-((g - cy) ** 2) / (2 * s * s))
        gz = np.exp(-((g - cz) ** 2) / (2 * s * s))
        vol += h * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return vol


def project_blobs_exact(blobs, rotation, origin, box):
    """Analytic line integral: each Gaussian becomes a 2D Gaussian at (A c)_xy - o."""
    centres, sigmas, heights = blobs
    g = np.arange(box) - box // 2
    image = np.zeros((box, box))
    for c, s, h in zip(centres, sigmas, heights):
        px, py, _ = rotation @ c
        px -= origin[0]
        py -= origin[1]
        image += h * np.sqrt(2 * np.pi) * s * np.exp(-((g[:, None] - py) ** 2 + (g[None, :] - px) ** 2) / (2 * s * s))
    return image


def projector_checks(box, real_volume, seed, quick=False):
    """Relative RMS error of the real-space projector against exact blob projections, and
    its convergence on the real map (upsample 1/2/3)."""
    rng = np.random.default_rng(seed + 17)
    blobs = gaussian_blobs(rng, spread=0.22 * box)
    vol = voxelize_blobs(blobs, box)
    rotations = Rotation.random(4, random_state=seed + 5).as_matrix()
    origins = rng.uniform(-3, 3, size=(4, 2))
    exact = [project_blobs_exact(blobs, R, o, box) for R, o in zip(rotations, origins)]
    results = {}
    configs = [(1, 1.0), (2, 1.0), (2, 0.5)]
    for upsample, step in configs:
        sv = spline_volume(vol, upsample)
        err = [np.linalg.norm(project_real_space(sv, R, o, step) - e) / np.linalg.norm(e)
               for R, o, e in zip(rotations, origins, exact)]
        results[f"blobs U={upsample} step={step}"] = float(np.sqrt(np.mean(np.square(err))))
    if not quick:  # convergence on the real map's own content (sharpened, 3-4.5 Å dominated)
        rotations = Rotation.random(3, random_state=seed + 6).as_matrix()
        origins = rng.uniform(-3, 3, size=(3, 2))
        projections = {}
        for upsample in (1, 2, 3):
            sv = spline_volume(real_volume, upsample)
            projections[upsample] = [project_real_space(sv, R, o) for R, o in zip(rotations, origins)]
            del sv
        for upsample in (1, 2):
            err = [np.linalg.norm(a - b) / np.linalg.norm(b)
                   for a, b in zip(projections[upsample], projections[3])]
            results[f"real map U={upsample} vs U=3"] = float(np.sqrt(np.mean(np.square(err))))
    return results


# ----------------------------------------------------------------------------------------------
# Simulation (worker processes share the spline volumes by fork)
# ----------------------------------------------------------------------------------------------
_SIM: dict = {}


def _project_particle(i):
    s = _SIM
    half = s["half"][i] - 1
    R, o, step, field = s["rotations"][i], s["origins"][i], s["beam_step"], s["field"]
    masked = project_real_space(s["masked"][half], R, o, step, field)
    rest = project_real_space(s["rest"][half], R, o, step, field)
    other = project_real_space(s["masked"][1 - half], R, o, step, field) if i < s["control"] else None
    return i, masked, rest, other


@dataclass
class Simulation:
    images: np.ndarray  # (n, N, N) float32
    subtracted_truth: np.ndarray  # α·CTF·P(half·mask)
    kept_truth: np.ndarray  # α·CTF·P(half·(1-mask))
    wrong_half_subtracted: np.ndarray  # for the first `control` particles: α·CTF·P(other half·mask)
    angles: np.ndarray  # (n, 3) rot, tilt, psi (degrees)
    rotations: np.ndarray  # (n, 3, 3) A
    origins: np.ndarray  # (n, 2) pixels
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    alpha: np.ndarray
    half: np.ndarray
    noise_sigma: float
    seconds: float


def simulate(halves_masked, halves_rest, count, box, voxel, snr, rng, beam_step, processes, control, field):
    """Particles as extracted: projected onto a ``field``² image, CTF applied there, central box cropped."""
    angles = Rotation.random(count, random_state=int(rng.integers(2**31))).as_euler("ZYZ", degrees=True)
    rotations = np.stack([Rotation.from_euler("ZYZ", a, degrees=True).as_matrix().T for a in angles])
    origins = rng.uniform(-3, 3, size=(count, 2))
    defocus_u = rng.uniform(8000, 25000, size=count)
    defocus_v = defocus_u - rng.uniform(0, 1000, size=count)
    defocus_angle = rng.uniform(-180, 180, size=count)
    alpha = rng.uniform(0.7, 1.3, size=count)
    half = rng.integers(1, 3, size=count)
    _SIM.update(masked=halves_masked, rest=halves_rest, rotations=rotations, origins=origins,
                half=half, beam_step=beam_step, control=control, field=field)
    started = time.monotonic()
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_project_particle, range(count), chunksize=4)
    else:
        results = [_project_particle(i) for i in range(count)]
    sub = np.empty((count, box, box))
    kept = np.empty((count, box, box))
    wrong = np.empty((control, box, box))
    start = field // 2 - box // 2
    crop = (slice(start, start + box), slice(start, start + box))
    for i, masked, rest, other in results:
        ctf = ctf_full_plane(field, voxel, defocus_u[i], defocus_v[i], defocus_angle[i], VOLTAGE_KV, CS_MM, Q0)
        sub[i] = alpha[i] * apply_ctf(masked, ctf)[crop]
        kept[i] = alpha[i] * apply_ctf(rest, ctf)[crop]
        if other is not None:
            wrong[i] = alpha[i] * apply_ctf(other, ctf)[crop]
    signal = sub + kept
    noise_sigma = 0.0 if not snr or not np.isfinite(snr) else float(np.sqrt(np.mean(signal**2) / snr))
    images = signal + noise_sigma * rng.normal(size=signal.shape)
    return Simulation(images.astype(np.float32), sub, kept, wrong, angles, rotations, origins,
                      defocus_u, defocus_v, defocus_angle, alpha, half, noise_sigma,
                      time.monotonic() - started)


# ----------------------------------------------------------------------------------------------
# Input files (dsub's writers) and runs
# ----------------------------------------------------------------------------------------------
def particle_table(sim: Simulation, voxel: float, box: int, stack: str) -> ParticleTable:
    n = len(sim.alpha)

    def full(value):
        return np.full(n, value, dtype=float)

    return ParticleTable(
        rotations=sim.rotations.copy(), origins_angstrom=sim.origins * voxel,
        defocus_u_angstrom=sim.defocus_u.copy(), defocus_v_angstrom=sim.defocus_v.copy(),
        defocus_angle_degrees=sim.defocus_angle.copy(), phase_shift_degrees=full(0.0),
        voltage_kv=full(VOLTAGE_KV), spherical_aberration_mm=full(CS_MM), amplitude_contrast=full(Q0),
        ctf_bfactor=full(0.0), ctf_premultiplied=np.zeros(n, dtype=bool),
        half_set=sim.half.astype(np.int8), image_paths=np.array([stack] * n, dtype=object),
        image_indices=np.arange(n, dtype=np.int64), pixel_size_angstrom=full(voxel),
        box_size=np.full(n, box, dtype=np.int64), optics_group=np.ones(n, dtype=np.int64),
        input_contrast=sim.alpha.copy(),
    )


def write_inputs(folder: Path, sim: Simulation, halves, mask, voxel, box):
    paths = {name: folder / f for name, f in (
        ("half_a", "half_A.mrc"), ("half_b", "half_B.mrc"), ("mask", "mask.mrc"),
        ("mask_inverted", "mask_inverted.mrc"), ("stack", "particles.mrcs"),
        ("star", "particles.star"), ("cs", "particles.cs"))}
    write_map(paths["half_a"], halves[0], voxel)
    write_map(paths["half_b"], halves[1], voxel)
    write_map(paths["mask"], mask, voxel)
    write_map(paths["mask_inverted"], 1.0 - mask, voxel)
    with write_stack(paths["stack"], sim.images, voxel):
        pass
    n = len(sim.alpha)
    table = particle_table(sim, voxel, box, str(paths["stack"]))
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    star_format.write_particles(table, paths["star"], names, original_names=names)
    cs_format.write_particles(table, paths["cs"], ["particles.mrcs"] * n, np.arange(n), contrast=sim.alpha)
    return paths, names


def check_written_metadata(paths, sim: Simulation, names) -> str:
    """Read the written star/.cs back *without dsub* and compare poses, origins, halves, alpha."""
    blocks = starfile.read(paths["star"], always_dict=True)
    p = blocks["particles"]
    angles = p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    mats = np.stack([Rotation.from_euler("ZYZ", a, degrees=True).as_matrix().T for a in angles])
    star_rot = float(np.abs(mats - sim.rotations).max())
    star_org = float(np.abs(p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
                            / blocks["optics"]["rlnImagePixelSize"].iloc[0] - sim.origins).max())
    star_half = bool((p["rlnRandomSubset"].to_numpy() == sim.half).all())
    star_names = bool((p["rlnImageName"].astype(str).to_numpy() == np.array(names)).all())
    cs = np.load(paths["cs"])
    cs_rot = np.stack([Rotation.from_rotvec(v).as_matrix().T for v in cs["alignments3D/pose"].astype(float)])
    cs_rot_err = float(np.abs(cs_rot - sim.rotations).max())
    cs_shift = float(np.abs(cs["alignments3D/shift"] - sim.origins).max())
    cs_half = bool((cs["alignments3D/split"] + 1 == sim.half).all())
    cs_alpha = float(np.abs(cs["alignments3D/alpha"] - sim.alpha).max())
    return (f"star: max|ΔA| {star_rot:.1e}, max|Δorigin| {star_org:.1e} px, halves ok {star_half}, "
            f"names ok {star_names}; cs: max|ΔA| {cs_rot_err:.1e}, max|Δshift| {cs_shift:.1e} px, "
            f"halves ok {cs_half}, max|Δalpha| {cs_alpha:.1e}")


def run_dsub(label, particles, paths, outdir: Path, extra, log_folder: Path):
    cmd = [str(DSUB), "subtract", str(particles), "--half-a", str(paths["half_a"]),
           "--half-b", str(paths["half_b"]), "-o", str(outdir), "--quiet", "--overwrite"] + extra
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    (log_folder / f"{outdir.name}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr)
        raise SystemExit(f"dsub failed ({label}), exit {proc.returncode}")
    notes = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "Polarity" in line or "warning" in line.lower() or "negative" in line]
    return wall, notes


def read_outputs(outdir: Path, names):
    """Subtracted images (input order checked via rlnImageOriginalName) and α, without dsub."""
    p = starfile.read(outdir / "particles_subtracted.star", always_dict=True)["particles"]

    def key(name):  # (1-based number, stack file name): a .cs input records absolute stack paths
        number, stack = str(name).split("@", 1)
        return int(number), os.path.basename(stack)

    if [key(n) for n in p["rlnImageOriginalName"]] != [key(n) for n in names]:
        raise SystemExit(f"{outdir}: output rows are not in input order")
    images = None
    stacks = {}
    for row, name in enumerate(p["rlnImageName"].astype(str)):
        number, stack = name.split("@", 1)
        if stack not in stacks:
            with mrcfile.open(outdir / stack, permissive=True) as mrc:
                stacks[stack] = np.asarray(mrc.data, dtype=np.float32).reshape(-1, *mrc.data.shape[-2:])
        image = stacks[stack][int(number) - 1]
        if images is None:
            images = np.empty((len(p),) + image.shape, dtype=np.float32)
        images[row] = image
    alpha = np.load(outdir / "particles_subtracted.cs")["alignments3D/alpha"].astype(np.float64)
    summary = json.loads((outdir / "dsub_run.json").read_text())
    return images, alpha, summary


def evaluate(images_out, alpha_out, sim: Simulation):
    truth = sim.images.astype(np.float64) - sim.subtracted_truth
    residual = float(np.linalg.norm(images_out - truth) / np.linalg.norm(sim.subtracted_truth))
    rel = (alpha_out - sim.alpha) / sim.alpha
    result = {
        "residual": residual,
        "alpha_rel_rms": float(np.sqrt(np.mean(rel**2))),
        "alpha_rel_bias": float(np.mean(rel)),
        "alpha_negative": float(np.mean(alpha_out < 0)),
    }
    # What the α error alone leaves: ||(α_fit - α) C P_masked|| / ||α C P_masked||.
    per = np.linalg.norm(sim.subtracted_truth.reshape(len(rel), -1), axis=1)
    result["alpha_part"] = float(np.sqrt(np.sum((rel * per) ** 2)) / np.linalg.norm(per))
    # Residual after removing the α error: the model (projector) part.
    model = (images_out - truth) - (-(rel[:, None, None]) * sim.subtracted_truth)
    result["model_part"] = float(np.linalg.norm(model) / np.linalg.norm(sim.subtracted_truth))
    return result


# ----------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--snr", type=float, default=0.1, help="signal power / noise variance; 0 = no noise")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--keep", default=None, help="keep all files in this folder (default: a temp dir)")
    ap.add_argument("--chain", default="A", help="chain of 5me2.pdb to mask (A)")
    ap.add_argument("--upsample", type=int, default=2, help="Fourier upsampling before the spline (2)")
    ap.add_argument("--field", type=float, default=3.0,
                    help="extract the particles from a field of this many boxes (3; 1 = CTF on the box grid)")
    ap.add_argument("--beam-step", type=float, default=1.0, help="sampling step along the beam, voxels")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="simulation processes")
    ap.add_argument("--no-relion", action="store_true", help="skip the --projector relion comparison runs")
    ap.add_argument("--quick-checks", action="store_true", help="skip the real-map projector convergence check")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    rng = np.random.default_rng(args.seed)
    box = args.box

    if args.keep:
        work = Path(args.keep).resolve()
        work.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.mkdtemp(prefix="dsub_realmap_")
        work = Path(cleanup)
    print(f"Work folder: {work}")

    # 1. Map, registration, mask, half maps -------------------------------------------------
    real = load_map(MAP_PATH, box)
    voxel = real.voxel
    xyz, chains = read_pdb(PDB_PATH)
    atoms = atoms_to_voxels(xyz, MAP_PATH, real)
    print(f"[map] EMD-3488 padded to {box}³ at {voxel:.3f} Å; {len(xyz)} atoms, chains "
          f"{''.join(sorted(set(chains)))}")
    print(f"[map] {registration_report(real.volume, atoms)}")
    chain_atoms = atoms[chains == args.chain]
    dist_chain = distance_to_atoms(chain_atoms, box, voxel, 12.0)
    mask = soft_mask_from_distance(dist_chain, 3.0, 6.0)
    envelope = soft_mask_from_distance(distance_to_atoms(atoms, box, voxel, 12.0), 3.0, 6.0)
    vol = real.volume
    pos = np.clip(vol, 0, None)
    frac_all = float((vol * mask).sum() / vol.sum())
    frac_pos = float((pos * mask).sum() / pos.sum())
    other_atoms = atoms[chains != args.chain]
    m_at_other = ndimage.map_coordinates(mask, other_atoms[:, ::-1].T, order=1)
    m_at_chain = ndimage.map_coordinates(mask, chain_atoms[:, ::-1].T, order=1)
    print(f"[mask] chain {args.chain} ({len(chain_atoms)} atoms, {len(chain_atoms) / len(atoms):.1%} of the model), "
          f"3 Å dilation + 6 Å cosine edge; values [{mask.min():.2f}, {mask.max():.2f}], "
          f"{(mask > 0.5).mean():.2%} of the box > 0.5")
    print(f"[mask] map density inside: {frac_all:.1%} (positive part {frac_pos:.1%}); chain atoms with "
          f"mask=1: {np.mean(m_at_chain > 0.999):.1%}; other chains' atoms with mask>0.5: "
          f"{np.mean(m_at_other > 0.5):.1%}, >0: {np.mean(m_at_other > 0):.1%}")
    halves = make_half_maps(vol, voxel, envelope, rng)
    diff_all = np.linalg.norm(halves[0] - halves[1]) / np.linalg.norm(0.5 * (halves[0] + halves[1]))
    diff_mask = (np.linalg.norm((halves[0] - halves[1]) * mask)
                 / np.linalg.norm(0.5 * (halves[0] + halves[1]) * mask))
    print(f"[halves] B-factors 0 / 2 Å² + independent smooth noise (2 % RMS in the envelope): "
          f"||A-B|| / ||mean|| = {diff_all:.1%} (whole map), {diff_mask:.1%} (masked region)")

    # 2. Projector checks --------------------------------------------------------------------
    t = time.monotonic()
    checks = projector_checks(box, load_map(MAP_PATH, 100).volume, args.seed, args.quick_checks)
    for name, value in checks.items():
        print(f"[projector] {name}: {value:.3%} RMS")
    print(f"[projector] checks took {time.monotonic() - t:.1f} s")

    # 3. Simulation ------------------------------------------------------------------------
    t = time.monotonic()
    masked_vols = [spline_volume(h * mask, args.upsample) for h in halves]
    rest_vols = [spline_volume(h * (1.0 - mask), args.upsample) for h in halves]
    prep = time.monotonic() - t
    control = min(16, args.particles)
    field = int(round(args.field * box))
    field += field % 2
    sim = simulate(masked_vols, rest_vols, args.particles, box, voxel, args.snr, rng, args.beam_step,
                   args.processes, control, field)
    del masked_vols, rest_vols
    sub_power = np.mean(sim.subtracted_truth**2) / np.mean((sim.subtracted_truth + sim.kept_truth) ** 2)
    print(f"[sim] {args.particles} particles of {box} px: spline prep {prep:.1f} s, projections "
          f"{sim.seconds:.1f} s ({args.processes} processes); SNR {args.snr or 'inf'} -> noise σ "
          f"{sim.noise_sigma:.4g}; masked part carries {sub_power:.1%} of the signal power")
    wrong = np.linalg.norm(sim.wrong_half_subtracted - sim.subtracted_truth[:control]) / np.linalg.norm(
        sim.subtracted_truth[:control])
    # Least-squares floor of a contrast fit against the exact full model (all frequencies, no window):
    # var(α_i) = σ² / ||M_i||², M_i = CTF·P_full,i, leaving (α_fit - α_i)·CTF·P_masked,i.
    n = args.particles
    model_energy = np.sum(((sim.subtracted_truth + sim.kept_truth) / sim.alpha[:, None, None]).reshape(n, -1) ** 2, 1)
    sub_energy = np.sum(sim.subtracted_truth.reshape(n, -1) ** 2, 1)
    alpha_floor = float(np.sqrt(np.sum(sim.noise_sigma**2 / model_energy * sub_energy / sim.alpha**2))
                        / np.sqrt(sub_energy.sum()))
    alpha_floor_rel = float(np.sqrt(np.mean(sim.noise_sigma**2 / model_energy / sim.alpha**2)))
    # Signal in the 2D frequency corners (beyond the Nyquist circle): a projector that keeps only
    # |k| <= Nyquist (RELION's choice) cannot model it.
    f = np.fft.fftfreq(box)
    corners = np.hypot(f[:, None], f[None, :]) > 0.5
    spec = np.abs(np.fft.fft2(sim.subtracted_truth)) ** 2
    corner_rms = float(np.sqrt(spec[:, corners].sum() / spec.sum()))
    print(f"[sim] control: subtracting with the OTHER half map would leave {wrong:.2%} "
          f"(first {control} particles)")
    print(f"[sim] subtracted signal beyond the Nyquist circle (2D corners): {corner_rms:.2%} RMS")
    print(f"[sim] ideal least-squares contrast fit (exact model, no window, all frequencies) would leave "
          f"{alpha_floor:.2%} (α rel RMS {alpha_floor_rel:.2%})")

    paths, names = write_inputs(work, sim, halves, mask.astype(np.float32), voxel, box)
    print(f"[io] {check_written_metadata(paths, sim, names)}")
    np.savez_compressed(work / "truth.npz", subtracted_truth=sim.subtracted_truth.astype(np.float32),
                        alpha=sim.alpha, half=sim.half)

    # 4. dsub runs -----------------------------------------------------------------------------
    mask_args = ["--mask", str(paths["mask"])]
    runs = [
        ("star --scale fit", paths["star"], "out_fit", mask_args + ["--scale", "fit"], FIT_LIMIT),
        ("cs --scale input", paths["cs"], "out_input", mask_args + ["--scale", "input"], INPUT_LIMIT),
        ("star fit --mask-keeps inverted", paths["star"], "out_keeps",
         ["--mask", str(paths["mask_inverted"]), "--mask-keeps", "--scale", "fit"], FIT_LIMIT),
    ]
    if not args.no_relion:
        relion = ["--projector", "relion", "--padding", "2"]
        runs += [
            ("star fit, relion pad 2", paths["star"], "out_fit_relion2", mask_args + ["--scale", "fit"] + relion, None),
            ("cs input, relion pad 2", paths["cs"], "out_input_relion2", mask_args + ["--scale", "input"] + relion, None),
        ]
    rows = []
    outputs = {}
    for label, particles, outname, extra, limit in runs:
        wall, notes = run_dsub(label, particles, paths, work / outname, extra, work)
        images_out, alpha_out, summary = read_outputs(work / outname, names)
        outputs[outname] = images_out
        result = evaluate(images_out, alpha_out, sim)
        result.update(label=label, wall=wall, dsub_seconds=summary["seconds"], limit=limit, notes=notes)
        rows.append(result)
        print(f"[dsub] {label}: residual {result['residual']:.3%}, α rel RMS {result['alpha_rel_rms']:.3%}, "
              f"wall {wall:.1f} s (dsub {summary['seconds']:.1f} s)" + "".join(f"\n        {n}" for n in notes))
    keeps_diff = float(np.abs(outputs["out_keeps"] - outputs["out_fit"]).max())
    keeps_rel = keeps_diff / float(np.abs(sim.subtracted_truth).max())

    # 5. Table ---------------------------------------------------------------------------------
    print()
    print(f"dsub on EMD-3488 particles: {args.particles} x {box} px, SNR {args.snr or 'inf (no noise)'}, "
          f"α in [0.7, 1.3], chain {args.chain} masked, seed {args.seed}")
    header = f"{'run':34s} {'residual':>9s} {'limit':>6s} {'pass':>5s} {'α-part':>7s} {'model':>7s} " \
             f"{'α rel RMS':>9s} {'α bias':>7s} {'α<0':>5s} {'wall s':>7s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        limit = f"{r['limit']:.1%}" if r["limit"] else "-"
        ok = ("yes" if r["residual"] <= r["limit"] else "NO") if r["limit"] else "-"
        print(f"{r['label']:34s} {r['residual']:9.3%} {limit:>6s} {ok:>5s} {r['alpha_part']:7.3%} "
              f"{r['model_part']:7.3%} {r['alpha_rel_rms']:9.3%} {r['alpha_rel_bias']:+7.2%} "
              f"{r['alpha_negative']:5.1%} {r['wall']:7.1f}")
    print(f"--mask-keeps (inverted mask) vs default: max |Δ| = {keeps_diff:.3g} "
          f"({keeps_rel:.2e} of the largest subtracted-signal pixel) -> "
          f"{'same' if keeps_rel < 1e-4 else 'DIFFERENT'}")
    print("residual = ||out - (images - subtracted_truth)|| / ||subtracted_truth||; α-part: what the α "
          "error alone leaves; model: what is left after correcting α (projector/CTF/geometry).")
    print(f"least-squares floor of the α fit (exact model, no window, all frequencies): {alpha_floor:.2%} "
          f"(α rel RMS {alpha_floor_rel:.2%}); other half map instead of own: {wrong:.2%}")
    print("projector self-check: " + ", ".join(f"{k} {v:.3%}" for k, v in checks.items()))
    print(f"total {time.monotonic() - t0:.0f} s")
    record = {"args": vars(args), "checks": checks, "runs": rows, "keeps_max_diff": keeps_diff,
              "alpha_fit_floor": alpha_floor, "alpha_fit_floor_rel": alpha_floor_rel, "corner_rms": corner_rms,
              "mask_density_fraction": frac_all, "half_map_difference": diff_all, "wrong_half_control": wrong}
    (work / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
