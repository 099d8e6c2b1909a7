"""A simulator of particle images that shares no code with dsub's engine.

Used by ``make demo`` and as the ground truth in tests. The phantom is a sum of
3D Gaussians in two domains, so every projection is known exactly: the line
integral of a Gaussian is a 2D Gaussian at the rotated centre. The CTF here is
written out again from RELION's published formula on a full FFT grid, on
purpose, so the tests compare the engine with an independent implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass
class GaussianPhantom:
    """Blobs: centres (m, 3) in voxels from the box centre (x, y, z), widths, heights, domain labels."""

    centres: np.ndarray
    sigmas: np.ndarray
    amplitudes: np.ndarray
    domains: np.ndarray

    def select(self, domain: int) -> "GaussianPhantom":
        keep = self.domains == domain
        return GaussianPhantom(self.centres[keep], self.sigmas[keep], self.amplitudes[keep], self.domains[keep])

    def voxelize(self, box: int) -> np.ndarray:
        """The phantom sampled on a box³ grid, array axes (z, y, x), centre voxel box//2."""
        grid = np.arange(box) - box // 2
        volume = np.zeros((box, box, box))
        for (cx, cy, cz), sigma, height in zip(self.centres, self.sigmas, self.amplitudes):
            gx = np.exp(-((grid - cx) ** 2) / (2 * sigma**2))
            gy = np.exp(-((grid - cy) ** 2) / (2 * sigma**2))
            gz = np.exp(-((grid - cz) ** 2) / (2 * sigma**2))
            volume += height * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
        return volume.astype(np.float32)

    def project(self, rotation: np.ndarray, origin_pixels, box: int) -> np.ndarray:
        """Exact line integral along the beam, image axes (y, x); a map point c lands at (A c)_xy - origin."""
        grid = np.arange(box) - box // 2
        image = np.zeros((box, box))
        landed = self.centres @ rotation.T
        for (px, py, _), sigma, height in zip(landed, self.sigmas, self.amplitudes):
            px -= origin_pixels[0]
            py -= origin_pixels[1]
            gx = np.exp(-((grid - px) ** 2) / (2 * sigma**2))
            gy = np.exp(-((grid - py) ** 2) / (2 * sigma**2))
            image += height * np.sqrt(2 * np.pi) * sigma * gy[:, None] * gx[None, :]
        return image


def random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    """Rotation matrices uniform over SO(3): normalised Gaussian quaternions (any SciPy version)."""
    return Rotation.from_quat(rng.normal(size=(count, 4))).as_matrix()


def two_domain_phantom(box: int, rng: np.random.Generator, blobs_per_domain: int = 10) -> GaussianPhantom:
    """Domain 1 (kept) left of centre, domain 2 (to subtract) right of it, a gap between."""
    scale = box / 64.0
    centres, sigmas, domains = [], [], []
    for domain, middle, spread in ((1, (-11.0, 0.0, 0.0), 5.0), (2, (12.0, 1.0, -1.0), 3.0)):
        offsets = rng.uniform(-spread, spread, size=(blobs_per_domain, 3))
        centres.append((np.array(middle) + offsets) * scale)
        sigmas.append(rng.uniform(1.0, 1.6, size=blobs_per_domain) * scale)
        domains.append(np.full(blobs_per_domain, domain))
    return GaussianPhantom(
        centres=np.concatenate(centres),
        sigmas=np.concatenate(sigmas),
        amplitudes=rng.uniform(0.6, 1.0, size=2 * blobs_per_domain),
        domains=np.concatenate(domains),
    )


def perturbed(phantom: GaussianPhantom, rng: np.random.Generator, amount: float = 0.05) -> GaussianPhantom:
    """A slightly different copy (heights ±amount, centres jittered), like an independent half-map."""
    return GaussianPhantom(
        centres=phantom.centres + rng.normal(0, 0.3, size=phantom.centres.shape),
        sigmas=phantom.sigmas.copy(),
        amplitudes=phantom.amplitudes * (1 + rng.uniform(-amount, amount, size=phantom.amplitudes.shape)),
        domains=phantom.domains.copy(),
    )


def soft_sphere_mask(phantom: GaussianPhantom, domain: int, box: int, edge: float = 3.0) -> np.ndarray:
    """A soft spherical mask (values in [0, 1]) around the blobs of ``domain``.

    Checked on the voxel grid: the mask must hold all but 0.2 % of that domain's
    density and take in at most 0.2 % of the other domain's.
    """
    part = phantom.select(domain)
    centre = part.centres.mean(axis=0)
    radius = np.max(np.linalg.norm(part.centres - centre, axis=1) + 3.5 * part.sigmas)
    grid = np.arange(box) - box // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    ramp = np.clip((distance - radius) / edge, 0.0, 1.0)
    mask = (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32)
    inside = part.voxelize(box)
    outside = phantom.select(3 - domain).voxelize(box)
    missing = np.sum((1 - mask) * inside) / np.sum(inside)
    leaking = np.sum(mask * outside) / np.sum(inside)
    if missing > 2e-3 or leaking > 2e-3:
        raise ValueError(f"domains too close for a clean mask (missing {missing:.2%}, leaking {leaking:.2%})")
    return mask


def ctf_full_plane(box: int, pixel_size, defocus_u, defocus_v, angle_degrees, voltage_kv, cs_mm, q0,
                   phase_shift_degrees=0.0, bfactor=0.0) -> np.ndarray:
    """RELION's CTF on a full (not half) fft2 grid of a box² image."""
    freq = np.fft.fftfreq(box) / pixel_size
    sy, sx = np.meshgrid(freq, freq, indexing="ij")
    s2 = sx**2 + sy**2
    volts = voltage_kv * 1000.0
    wavelength = 12.2643247 / np.sqrt(volts * (1 + 0.978466e-6 * volts))
    angle = np.arctan2(sy, sx) - np.radians(angle_degrees)
    defocus = defocus_u * np.cos(angle) ** 2 + defocus_v * np.sin(angle) ** 2
    chi = (np.pi * wavelength * defocus * s2 - np.pi / 2 * cs_mm * 1e7 * wavelength**3 * s2**2
           + np.radians(phase_shift_degrees))
    return (np.sqrt(1 - q0**2) * np.sin(chi) + q0 * np.cos(chi)) * np.exp(-bfactor * s2 / 4)


def apply_ctf(image: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Convolve a centred image with a CTF given on the full fft2 grid."""
    spectrum = np.fft.fft2(np.fft.ifftshift(image))
    return np.fft.fftshift(np.fft.ifft2(spectrum * ctf).real)


@dataclass
class SimulatedParticles:
    """Images plus everything needed to check a subtraction of them."""

    images: np.ndarray  # (n, box, box) float32, noisy
    kept_signal: np.ndarray  # (n, box, box): α·CTF·projection of the kept domain
    subtracted_signal: np.ndarray  # (n, box, box): α·CTF·projection of the masked domain
    rotations: np.ndarray  # (n, 3, 3) RELION A
    origins_pixels: np.ndarray  # (n, 2)
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    contrast: np.ndarray  # (n,) true α
    half_set: np.ndarray  # (n,) 1 or 2
    pixel_size: float
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    noise_sigma: float = 0.0


def simulate_particles(halves, mask_domain: int, count: int, box: int, pixel_size: float,
                       rng: np.random.Generator, snr: float | None = 0.1,
                       contrast_range=(0.7, 1.3), field: int | None = None) -> SimulatedParticles:
    """Noisy CTF-modulated images of the half-phantoms ``halves = (A, B)``, each particle of its own half.

    ``snr`` is the mean signal power over the box divided by the noise variance;
    ``None`` gives noise-free images. ``field``: extract each particle as from a
    micrograph, i.e. project, shift and apply the CTF on a ``field``² image and
    crop the central box (None: everything on the box grid, so what the CTF
    delocalises beyond the box wraps round).
    """
    field = box if field is None else int(field)
    start = field // 2 - box // 2
    rotations = random_rotations(count, rng)
    origins = rng.uniform(-3, 3, size=(count, 2))
    defocus_u = rng.uniform(8000, 25000, size=count)
    defocus_v = defocus_u - rng.uniform(0, 800, size=count)
    angles = rng.uniform(-180, 180, size=count)
    contrast = rng.uniform(*contrast_range, size=count)
    half_set = rng.integers(1, 3, size=count)
    kept = np.empty((count, box, box))
    removed = np.empty((count, box, box))
    for i in range(count):
        phantom = halves[half_set[i] - 1]
        ctf = ctf_full_plane(field, pixel_size, defocus_u[i], defocus_v[i], angles[i], 300.0, 2.7, 0.1)
        for target, domain in ((kept, 3 - mask_domain), (removed, mask_domain)):
            projection = phantom.select(domain).project(rotations[i], origins[i], field)
            target[i] = contrast[i] * apply_ctf(projection, ctf)[start : start + box, start : start + box]
    signal = kept + removed
    sigma = 0.0 if snr is None else float(np.sqrt(np.mean(signal**2) / snr))
    noisy = signal + rng.normal(0, 1, size=signal.shape) * sigma
    return SimulatedParticles(
        images=noisy.astype(np.float32), kept_signal=kept, subtracted_signal=removed,
        rotations=rotations, origins_pixels=origins, defocus_u=defocus_u, defocus_v=defocus_v,
        defocus_angle=angles, contrast=contrast, half_set=half_set, pixel_size=pixel_size,
        noise_sigma=sigma,
    )


def to_particle_table(sim: SimulatedParticles, stack_path: str = "particles.mrcs"):
    """The simulated particles' metadata as a ParticleTable (images in ``stack_path``, in order)."""
    from .particles import ParticleTable

    count = len(sim.contrast)

    def full(value):
        return np.full(count, value, dtype=float)

    return ParticleTable(
        rotations=sim.rotations.copy(),
        origins_angstrom=sim.origins_pixels * sim.pixel_size,
        defocus_u_angstrom=sim.defocus_u.copy(),
        defocus_v_angstrom=sim.defocus_v.copy(),
        defocus_angle_degrees=sim.defocus_angle.copy(),
        phase_shift_degrees=full(0.0),
        voltage_kv=full(sim.voltage_kv),
        spherical_aberration_mm=full(sim.cs_mm),
        amplitude_contrast=full(sim.amplitude_contrast),
        ctf_bfactor=full(0.0),
        ctf_premultiplied=np.zeros(count, dtype=bool),
        half_set=sim.half_set.astype(np.int8),
        image_paths=np.array([str(stack_path)] * count, dtype=object),
        image_indices=np.arange(count, dtype=np.int64),
        pixel_size_angstrom=full(sim.pixel_size),
        box_size=np.full(count, sim.images.shape[-1], dtype=np.int64),
        optics_group=np.ones(count, dtype=np.int64),
        input_contrast=sim.contrast.copy(),
    )
