"""Independent reference projections of a map, for tests and benchmarks (needs ``finufft``).

Nothing here uses ``dsub.physics``: the projection is a finufft type-2
transform (tolerance 1e-9) of the map's voxels at the exact 3D points of the
slice, and extraction is simulated on a field larger than the box with the
simulator's own CTF (``simulate.ctf_full_plane``), then cropped.

Conventions (DESIGN.md): the map's centre is voxel ``box//2`` on each axis,
array axes (z, y, x); the image frequency ``k`` maps to the 3D point
``kx A[0, :] + ky A[1, :]``; an origin ``o`` moves the particle by ``-o`` pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .simulate import ctf_full_plane, random_rotations


def nufft_slices(volume: np.ndarray, rotations: np.ndarray, size: int, tolerance: float = 1e-9) -> np.ndarray:
    """Transforms of the projections of ``volume`` (even box³) on an rfft2 grid of ``size``.

    Returns complex128 (n, size, size//2 + 1): frequency ``k`` holds the map's
    transform at ``(kx A[0] + ky A[1]) / size`` cycles per voxel, i.e. the
    projection as it would be sampled in a ``size``² field with the particle's
    centre at pixel size//2. Points outside the map's Nyquist cube are zero (the
    projection of the map's band-limited interpolant).
    """
    import finufft

    box = volume.shape[0]
    if box % 2:
        raise ValueError("nufft_slices needs an even box (finufft's modes run -box/2 .. box/2-1)")
    ky = np.fft.fftfreq(size) * size
    kx = np.fft.rfftfreq(size) * size
    kx, ky = np.broadcast_to(kx[None, :], (size, kx.size)), np.broadcast_to(ky[:, None], (size, kx.size))
    modes = np.asarray(volume, dtype=np.complex128)
    out = np.empty((len(rotations),) + kx.shape, dtype=np.complex128)
    for i, rotation in enumerate(np.asarray(rotations, dtype=np.float64)):
        q = [(kx * rotation[0, axis] + ky * rotation[1, axis]) / size for axis in range(3)]  # cycles/voxel
        inside = (np.abs(q[0]) <= 0.5) & (np.abs(q[1]) <= 0.5) & (np.abs(q[2]) <= 0.5)
        values = finufft.nufft3d2(*(2 * np.pi * q[axis][inside] for axis in (2, 1, 0)), modes,
                                  eps=tolerance, isign=-1)
        out[i] = 0
        out[i][inside] = values
    return out


def centred_images(spectra: np.ndarray, size: int) -> np.ndarray:
    """Real images (n, size, size) of rfft2 spectra whose origin is pixel size//2."""
    return np.fft.fftshift(np.fft.irfft2(spectra, s=(size, size)), axes=(-2, -1))


def extracted_particles(volume: np.ndarray, rotations, origins_pixels, box: int, field: int, ctfs=None) -> np.ndarray:
    """Particles as extracted from a micrograph: projected on a ``field``² image, shifted,
    multiplied by their CTF there, cropped to the central ``box``², (n, box, box) float64.

    ``ctfs``: None, or a list of dicts of ``simulate.ctf_full_plane`` arguments
    (without the size), one per particle.
    """
    spectra = nufft_slices(volume, rotations, field)
    ky = np.fft.fftfreq(field) * field
    kx = np.fft.rfftfreq(field) * field
    start = field // 2 - box // 2
    images = np.empty((len(spectra), box, box))
    for i, spectrum in enumerate(spectra):
        ox, oy = origins_pixels[i]
        spectrum = spectrum * np.exp(2j * np.pi * (kx[None, :] * ox + ky[:, None] * oy) / field)
        if ctfs is not None:
            spectrum = spectrum * ctf_full_plane(field, **ctfs[i])[:, : field // 2 + 1]
        images[i] = centred_images(spectrum, field)[start : start + box, start : start + box]
    return images


def real_map(path, box: int) -> np.ndarray:
    """A map (z, y, x) padded or cropped to ``box`` with its centre voxel n//2 moved to box//2 (float64)."""
    from .formats.mrc import read_map

    data, _ = read_map(path)
    n = data.shape[0]
    out = np.zeros((box, box, box))
    shift = box // 2 - n // 2
    src = slice(max(0, -shift), min(n, box - shift))
    dst = slice(max(0, shift), max(0, shift) + src.stop - src.start)
    out[dst, dst, dst] = data[src, src, src]
    return out


def soft_sphere(box: int, radius: float, centre_xyz=(0.0, 0.0, 0.0), edge: float = 4.0) -> np.ndarray:
    """A soft spherical mask (z, y, x) about ``centre_xyz`` voxels from box//2, cosine edge of ``edge`` voxels."""
    grid = np.indices((box, box, box)).astype(float) - box // 2
    centre = np.asarray(centre_xyz, dtype=float)[::-1].reshape(3, 1, 1, 1)
    distance = np.sqrt(((grid - centre) ** 2).sum(axis=0))
    return 0.5 + 0.5 * np.cos(np.pi * np.clip((distance - radius) / edge, 0.0, 1.0))


@dataclass
class ExtractedScene:
    """Particles extracted from a larger field, their metadata, and each one's true contrast."""

    table: object  # ParticleTable
    full: np.ndarray  # (n, box, box) extracted particles of the whole map, contrast 1
    masked: np.ndarray  # the same of the masked map
    contrast: np.ndarray


def extraction_scene(volume, mask, count, pixel_size, field_boxes, ctf: bool, seed: int) -> ExtractedScene:
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

    from .particles import ParticleTable

    table = ParticleTable(
        rotations=rotations, origins_angstrom=origins * pixel_size, defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_v, defocus_angle_degrees=angle, phase_shift_degrees=column(0.0),
        voltage_kv=column(300.0), spherical_aberration_mm=column(cs_mm), amplitude_contrast=column(q0),
        ctf_bfactor=column(0.0), ctf_premultiplied=np.zeros(count, dtype=bool), half_set=np.ones(count, np.int8),
        image_paths=np.array(["particles.mrcs"] * count, dtype=object), image_indices=np.arange(count),
        pixel_size_angstrom=column(pixel_size), box_size=np.full(count, box), optics_group=np.ones(count, np.int64),
        input_contrast=rng.uniform(0.7, 1.3, size=count),
    )
    return ExtractedScene(table, full, masked, table.input_contrast.copy())


def in_circle_norm(images: np.ndarray) -> float:
    """Norm of the images' spectra inside the Nyquist circle."""
    box = images.shape[-1]
    spectra = np.fft.rfft2(images)
    ky, kx = np.fft.fftfreq(box) * box, np.fft.rfftfreq(box) * box
    inside = (ky[:, None] ** 2 + kx[None, :] ** 2) <= (box / 2) ** 2
    return float(np.linalg.norm(spectra[:, inside]))
