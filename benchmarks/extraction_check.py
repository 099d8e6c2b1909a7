#!/usr/bin/env python
"""The particle model against particles extracted from a larger field, on a real map.

Truth (``dsub.oracle``, independent of ``dsub.physics``): EMD-3488 projected by a
finufft type-2 transform (1e-9) onto a field of ``--field`` boxes, shifted and
multiplied by its CTF there (the simulator's own CTF), cropped to the box.
dsub's model (``model_images``) is compared with it inside the Nyquist circle:

* ``model``: ``||model_masked - truth_masked|| / ||truth_masked||`` with the true contrast
  (the projector and the extraction model alone);
* ``input`` / ``fit``: after subtraction from noisy particles (SNR per pixel over the box),
  what is left of the masked signal, ``||out - (image - α truth_masked)|| / ||α truth_masked||``,
  with each particle's true contrast given (``--scale input``) or fitted.

Run from the repository root:  .venv/bin/python benchmarks/extraction_check.py [--box 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsub.oracle import extracted_particles, real_map, soft_sphere  # noqa: E402
from dsub.particles import ParticleTable  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, model_images, prepare_half_map, subtract_batch  # noqa: E402
from dsub.simulate import random_rotations  # noqa: E402

MAP = Path(os.environ.get("DSUB_SHARED_DATA", REPO.parent / "shared" / "data")) / "emd3488" / "emd_3488.mrc"


@dataclasses.dataclass
class Scene:
    table: ParticleTable
    full: np.ndarray  # (n, box, box) extracted particles of the whole map, contrast 1
    masked: np.ndarray  # the same of the masked map
    contrast: np.ndarray


def make_scene(volume, mask, count, pixel_size, field_boxes, ctf: bool, seed: int) -> Scene:
    """Particles of ``volume`` (and of ``volume * mask``) extracted from a field of ``field_boxes`` boxes."""
    box = volume.shape[0]
    rng = np.random.default_rng(seed)
    rotations = random_rotations(count, rng)
    origins = rng.uniform(-4, 4, size=(count, 2))
    defocus_u = rng.uniform(8000, 25000, size=count) if ctf else np.zeros(count)
    defocus_v = defocus_u - rng.uniform(0, 600, size=count) if ctf else np.zeros(count)
    angle = rng.uniform(-180, 180, size=count)
    cs_mm, q0 = (2.7, 0.1) if ctf else (0.0, 1.0)  # no CTF: defocus 0, Cs 0, Q0 1 gives CTF = 1
    ctfs = [dict(pixel_size=pixel_size, defocus_u=defocus_u[i], defocus_v=defocus_v[i], angle_degrees=angle[i],
                 voltage_kv=300.0, cs_mm=cs_mm, q0=q0) for i in range(count)] if ctf else None
    field = int(round(field_boxes * box))
    field += field % 2
    full = extracted_particles(volume, rotations, origins, box, field, ctfs)
    masked = extracted_particles(volume * mask, rotations, origins, box, field, ctfs)

    def column(value):
        return np.full(count, value, dtype=float)

    table = ParticleTable(
        rotations=rotations, origins_angstrom=origins * pixel_size, defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_v, defocus_angle_degrees=angle, phase_shift_degrees=column(0.0),
        voltage_kv=column(300.0), spherical_aberration_mm=column(cs_mm), amplitude_contrast=column(q0),
        ctf_bfactor=column(0.0), ctf_premultiplied=np.zeros(count, dtype=bool), half_set=np.ones(count, np.int8),
        image_paths=np.array(["particles.mrcs"] * count, dtype=object), image_indices=np.arange(count),
        pixel_size_angstrom=column(pixel_size), box_size=np.full(count, box), optics_group=np.ones(count, np.int64),
        input_contrast=rng.uniform(0.7, 1.3, size=count),
    )
    return Scene(table, full, masked, table.input_contrast.copy())


def in_circle_norm(images: np.ndarray) -> float:
    """Norm of the images' spectra inside the Nyquist circle."""
    box = images.shape[-1]
    spectra = np.fft.rfft2(images)
    ky, kx = np.fft.fftfreq(box) * box, np.fft.rfftfreq(box) * box
    inside = (ky[:, None] ** 2 + kx[None, :] ** 2) <= (box / 2) ** 2
    return float(np.linalg.norm(spectra[:, inside]))


def model_error(scene: Scene, volume, mask, settings: SubtractionSettings) -> float:
    model = prepare_half_map(np, volume, mask, settings)
    _, masked = model_images(np, model, scene.table, volume.shape[0], settings)
    return in_circle_norm(masked - scene.masked) / in_circle_norm(scene.masked)


def subtraction_left(scene: Scene, volume, mask, settings: SubtractionSettings, snr: float, seed: int) -> float:
    alpha = scene.contrast[:, None, None]
    signal = alpha * scene.full
    sigma = np.sqrt(np.mean(signal**2) / snr)
    images = (signal + np.random.default_rng(seed).normal(0, sigma, size=signal.shape)).astype(np.float32)
    model = prepare_half_map(np, volume, mask, settings)
    out, _ = subtract_batch(np, images, scene.table, model, settings)
    removed = alpha * scene.masked
    return in_circle_norm(out - (images - removed)) / in_circle_norm(removed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--pixel-size", type=float, default=1.56)
    parser.add_argument("--field", type=float, default=3.0, help="field the truth is extracted from, in boxes")
    parser.add_argument("--snr", type=float, default=0.1)
    args = parser.parse_args(argv)
    volume = real_map(MAP, args.box)
    mask = soft_sphere(args.box, 0.2 * args.box, centre_xyz=(0.05 * args.box, -0.03 * args.box, 0.02 * args.box))
    variants = [("relion", SubtractionSettings(projector="relion"))]
    for extension in (2.0, 2.5, 3.0):
        variants.append((f"gridding, field {extension:g}", SubtractionSettings(extension=extension)))
        variants.append((f"gridding, field {extension:g}, field slice",
                         SubtractionSettings(extension=extension, field_slice=True)))
    variants.append(("gridding, field 2, corners zero", SubtractionSettings(corners="zero")))
    print(f"EMD-3488 box {args.box}, {args.pixel_size:g} Å, truth from a {args.field:g}x field, "
          f"{args.count} particles, SNR {args.snr:g}; % of the masked signal left inside the Nyquist circle")
    print(f"| {'model':38s} | {'no CTF':>7s} | {'CTF':>7s} | {'input α':>7s} | {'fit α':>7s} | {'ms/particle':>11s} |")
    scenes = {ctf: make_scene(volume, mask, args.count, args.pixel_size, args.field, ctf, seed=5) for ctf in (False, True)}
    for label, settings in variants:
        started = time.perf_counter()
        with_ctf = model_error(scenes[True], volume, mask, settings)
        elapsed = (time.perf_counter() - started) / args.count
        without = model_error(scenes[False], volume, mask, settings)
        given = subtraction_left(scenes[True], volume, mask, dataclasses.replace(settings, scale="input"), args.snr, 9)
        fitted = subtraction_left(scenes[True], volume, mask, settings, args.snr, 9)
        print(f"| {label:38s} | {100 * without:7.3f} | {100 * with_ctf:7.3f} | {100 * given:7.3f} | "
              f"{100 * fitted:7.3f} | {1e3 * elapsed:11.1f} |")


if __name__ == "__main__":
    main()
