#!/usr/bin/env python
"""Contrast fit with noisy half maps: bias, scatter, uncertainty and what is left of the masked signal.

Half maps are made as reconstructions are: the true map (EMD-3488, 100³ at 1.05 Å, blurred with B = 50 Å² as an
unsharpened reconstruction) plus independent
Gaussian noise in each half, its spectrum set shell by shell so that the half maps' FSC follows a
realistic curve, 1 / (1 + (s/s_c)^8), through 0.143 at a given resolution (white noise would not
do: this sharpened map's spectrum is nearly flat, so white noise gives an FSC near 0.2 at every
resolution). Particles come from the *true* map: random poses and origins, contrast α uniform
in [0.7, 1.3], defocus 0.8–2.5 µm, CTF and noise from the independent ``dsub.simulate`` functions,
SNR = mean signal power / noise variance. The masked region is chain A of 5me2 (3 Å dilation, 6 Å
soft edge, as ``real_map_check.py``).

The signal and the models come from the same projector (dsub's ``padded``), so projector error
cancels and the table isolates the contrast fit: what map noise and image noise do to α.

For each case it reports, for the plain least-squares fit (``--fit-weighting none``), the
FSC-weighted fit (default) and the FSC-weighted fit shrunk toward the population
(empirical Bayes, offline: prior mean = median α̂, prior variance = var α̂ − mean σ²):

* bias: mean(α̂/α) − 1, and the scatter std(α̂/α);
* σ ratio: RMS of the reported σ_α over the empirical std(α̂ − α);
* residual: ‖α̂·C·P_masked(half map) − α·C·P_masked(true map)‖ / ‖α·C·P_masked(true map)‖ over
  all particles, i.e. what is left of the masked signal after subtraction (the half map's own
  noise included: the row "true α" shows that part alone).

Run from the repository root:  .venv/bin/python benchmarks/contrast_fit.py  [--particles 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from real_map_check import (  # noqa: E402
    MAP_PATH, PDB_PATH, atoms_to_voxels, b_factor_blur, distance_to_atoms, load_map, read_pdb,
    soft_mask_from_distance,
)

from dsub.physics.contrast import ContrastFit, fit_contrast  # noqa: E402
from dsub.physics.fsc import fourier_shell_correlation  # noqa: E402
from dsub.physics.projector import (  # noqa: E402
    extract_slices, prepare_volume, projector_kernel, shift_phases, spectra_to_images,
)
from dsub.physics.subtract import SubtractionSettings, model_images, prepare_half_map  # noqa: E402
from dsub.simulate import apply_ctf, ctf_full_plane, random_rotations, to_particle_table  # noqa: E402
from dsub.simulate import SimulatedParticles  # noqa: E402

VOLTAGE_KV, CS_MM, Q0 = 300.0, 2.7, 0.1


def target_fsc(frequency, resolution: float, steepness: float = 8.0):
    """A realistic half-map FSC: 1 / (1 + (s/s_c)^p), falling through 0.143 at ``resolution`` Å."""
    cutoff = (1.0 / resolution) / 6.0 ** (1.0 / steepness)
    return 1.0 / (1.0 + (np.asarray(frequency) / cutoff) ** steepness)


def noisy_half_maps(volume: np.ndarray, voxel: float, resolution: float, rng) -> list[np.ndarray]:
    """True map + independent Gaussian noise per half, its spectrum set shell by shell for ``target_fsc``.

    Two halves S + N_i have FSC = P / (P + E|N|²) per shell (P: mean |F_S|² of the shell), so the noise
    power of a shell is P · (1/FSC − 1), down to FSC 0.01.
    """
    box = volume.shape[0]
    transform = np.fft.rfftn(volume)
    k = np.fft.fftfreq(box) * box
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + (np.fft.rfftfreq(box) * box)[None, None, :] ** 2)
    shell = np.rint(radius).astype(int)
    shell = np.minimum(shell, box // 2)  # the cube's corners get the noise of the Nyquist shell
    power = np.bincount(shell.ravel(), np.abs(transform.ravel()) ** 2) / np.maximum(np.bincount(shell.ravel()), 1)
    fsc = target_fsc(np.arange(power.size) / (box * voxel), resolution)
    noise_power = power * (1.0 / fsc - 1.0)
    # Beyond the shell where the FSC reaches 0.01 the noise spectrum stays flat (a reconstruction's noise
    # does not grow without bound); the FSC then keeps falling with the map's own spectrum.
    last = int(np.flatnonzero(fsc >= 0.01)[-1])
    noise_power[last + 1:] = noise_power[last]
    halves = []
    for _ in range(2):
        white = np.fft.rfftn(rng.normal(size=volume.shape))  # E|W|² = voxels
        noise = np.fft.irfftn(white * np.sqrt(noise_power[shell] / volume.size), s=volume.shape, axes=(0, 1, 2))
        halves.append((volume + noise).astype(np.float32))
    return halves


def true_images(volume, mask, rotations, origins, ctfs, box, padding):
    """α-free CTF-modulated projections of the true map, (full, masked), via the independent CTF."""
    out = []
    for part in (volume, volume * mask):
        prepared = prepare_volume(np, part, *projector_kernel("gridding"))
        spectra = extract_slices(np, prepared, rotations, "map") * shift_phases(np, box, origins)
        images = spectra_to_images(np, spectra, box)
        out.append(np.stack([apply_ctf(image, ctf) for image, ctf in zip(images, ctfs)]))
    return out


def shrink(alpha, sigma):
    """Empirical-Bayes posterior mean of each α: normal prior from the population, normal errors σ."""
    prior_mean = np.median(alpha)
    prior_var = max(np.var(alpha) - np.mean(sigma**2), 1e-6)
    weight = prior_var / (prior_var + sigma**2)
    return weight * alpha + (1 - weight) * prior_mean


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--padding", type=int, default=2)
    ap.add_argument("--bfactor", type=float, default=50.0, help="B-factor (Å²) applied to the true map")
    ap.add_argument("--resolutions", type=float, nargs="+", default=[3.8, 8.0],
                    help="where the half maps' FSC crosses 0.143 (Å)")
    ap.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.01])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    real = load_map(MAP_PATH, 100)
    voxel, box = real.voxel, 100
    # The deposited map is sharpened; a reconstruction's signal falls off (B = 50 Å², unsharpened-like).
    volume = b_factor_blur(real.volume, voxel, args.bfactor).astype(np.float32)
    xyz, chains = read_pdb(PDB_PATH)
    atoms = atoms_to_voxels(xyz, MAP_PATH, real)
    mask = soft_mask_from_distance(distance_to_atoms(atoms[chains == "A"], box, voxel, 12.0), 3.0, 6.0)
    mask = mask.astype(np.float32)

    count = args.particles
    rotations = random_rotations(count, rng)
    origins = rng.uniform(-3, 3, size=(count, 2))
    defocus_u = rng.uniform(8000, 25000, count)
    defocus_v = defocus_u - rng.uniform(0, 1000, count)
    angles = rng.uniform(-180, 180, count)
    contrast = rng.uniform(0.7, 1.3, count)
    half_set = rng.integers(1, 3, count)
    ctfs = [ctf_full_plane(box, voxel, u, v, a, VOLTAGE_KV, CS_MM, Q0) for u, v, a in zip(defocus_u, defocus_v, angles)]
    started = time.monotonic()
    full_true, masked_true = true_images(volume, mask, rotations, origins, ctfs, box, args.padding)
    print(f"{count} particles of {box} px at {voxel} Å; true projections in {time.monotonic() - started:.0f} s")
    signal = contrast[:, None, None] * full_true
    removed = contrast[:, None, None] * masked_true
    rows = []
    for resolution in args.resolutions:
        halves = noisy_half_maps(volume, voxel, resolution, rng)
        fsc = fourier_shell_correlation(np, halves[0], halves[1], voxel)
        sim = SimulatedParticles(
            images=signal.astype(np.float32), kept_signal=None, subtracted_signal=removed, rotations=rotations,
            origins_pixels=origins, defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle=angles,
            contrast=contrast, half_set=half_set, pixel_size=voxel,
        )
        table = to_particle_table(sim)
        models = {}  # weighting -> (full, masked) model images
        for weighting in ("none", "fsc"):
            settings = SubtractionSettings(padding=args.padding, fit=ContrastFit(weighting=weighting))
            full_model = np.empty_like(signal, dtype=np.float32)
            masked_model = np.empty_like(full_model)
            for half in (1, 2):
                members = np.flatnonzero(half_set == half)
                prepared = prepare_half_map(np, halves[half - 1], mask, settings, fsc)
                full_model[members], masked_model[members] = model_images(
                    np, prepared, table.subset(members), box, settings)
            models[weighting] = full_model, masked_model
        print(f"half maps: FSC 0.143 at {fsc.resolution_angstrom():.2f} Å (aimed at {resolution} Å)")
        for snr in args.snrs:
            noise = float(np.sqrt(np.mean(signal**2) / snr))
            images = (signal + rng.normal(0, noise, signal.shape)).astype(np.float32)
            for label, weighting in (("plain", "none"), ("FSC-weighted", "fsc")):
                full_model, masked_model = models[weighting]
                result = fit_contrast(np, images, full_model, voxel, ContrastFit(weighting=weighting))
                estimates = [(label, result.alpha)]
                if weighting == "fsc":
                    estimates.append(("FSC-weighted, shrunk", shrink(result.alpha, result.sigma)))
                    estimates.append(("true α (the maps' noise alone)", contrast))
                for name, alpha in estimates:
                    ratio = alpha / contrast
                    left = alpha[:, None, None] * masked_model - removed
                    rows.append({
                        "FSC 0.143 (Å)": fsc.resolution_angstrom(), "SNR": snr, "fit": name,
                        "bias": float(np.mean(ratio) - 1), "scatter": float(np.std(ratio)),
                        "sigma ratio": (float(np.sqrt(np.mean(result.sigma**2)) / np.std(alpha - contrast))
                                        if name == label and np.std(alpha - contrast) > 0 else float("nan")),
                        "residual": float(np.linalg.norm(left) / np.linalg.norm(removed)),
                    })
                    print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in rows[-1].items()), flush=True)
    print()
    print("| half maps: FSC = 0.143 at | SNR | fit | bias of α | scatter of α/α_true | σ_α / empirical | residual |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['FSC 0.143 (Å)']:.1f} Å | {row['SNR']:g} | {row['fit']} | {row['bias']:+.1%} | "
              f"{row['scatter']:.1%} | {row['sigma ratio']:.2f} | {row['residual']:.1%} |")
    print(f"\n{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
