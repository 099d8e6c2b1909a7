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

from dsub.oracle import in_circle_norm, extraction_scene, real_map, soft_sphere  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, model_images, prepare_half_map, subtract_batch  # noqa: E402

MAP = Path(os.environ.get("DSUB_SHARED_DATA", REPO.parent / "shared" / "data")) / "emd3488" / "emd_3488.mrc"


def model_error(scene, volume, mask, settings: SubtractionSettings) -> float:
    model = prepare_half_map(np, volume, mask, settings)
    _, masked = model_images(np, model, scene.table, volume.shape[0], settings)
    return in_circle_norm(masked - scene.masked) / in_circle_norm(scene.masked)


def subtraction_left(scene, volume, mask, settings: SubtractionSettings, snr: float, seed: int) -> float:
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
    scenes = {ctf: extraction_scene(volume, mask, args.count, args.pixel_size, args.field, ctf, seed=5) for ctf in (False, True)}
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
