"""What one task does: read a chunk's images, subtract, write its region of the store.

The prepared half-maps are built once per worker process from the map files
(on its GPU when it uses one) and cached for all later tasks there, so they
never travel between processes: a task carries only its chunk's metadata and
file paths.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..formats.mrc import map_header, read_images, read_map
from ..particles import HALF_A, HALF_B
from ..physics.backend import device_label, get_xp, resolve_device, to_numpy
from ..physics.contrast import ContrastResult
from ..physics.fsc import fourier_shell_correlation
from ..physics.lowpass import lowpass_map
from ..physics.optics import fit_map_to_box
from ..physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch
from . import resources, store
from .rebox import rebox_images
from .metadata import load_particles

#: Share of the free memory measured at a task's start that its batches may use (others run alongside).
BATCH_SHARE_OF_FREE = 0.8


@dataclass(frozen=True)
class MapFiles:
    """The three maps of a run; each worker reads them itself."""

    half_a: str
    half_b: str
    mask: str
    pixel_size_angstrom: float | None = None  # the maps' voxel size (None: each particle's own)
    box: int | None = None  # the particles' box, to bring maps of another box to
    extent_voxels: int | None = None  # the map voxels that box spans (physics.optics.map_extent_voxels)

    def load(self, path: str, density: bool = True) -> tuple[np.ndarray, float | None]:
        """A map at the particles' box, and its voxel size there (see ``physics.optics.fit_map_to_box``)."""
        volume, _ = read_map(path)
        if self.box is None or volume.shape[0] == self.box:
            return volume, self.pixel_size_angstrom
        fitted = fit_map_to_box(volume, self.extent_voxels, self.box, density)
        return fitted, self.pixel_size_angstrom * self.extent_voxels / self.box


_models: dict = {}
_models_lock = threading.Lock()


def half_map_models(maps: MapFiles, settings: SubtractionSettings, device: str) -> dict:
    """Prepared models {HALF_A: ..., HALF_B: ...} for this process, built on first use."""
    key = (maps, settings.projector, settings.padding, settings.mask_keeps, settings.lowpass_angstrom,
           settings.fit.weighting, device)  # what the prepared maps depend on
    with _models_lock:
        if key not in _models:
            xp = get_xp(device)
            mask, _ = maps.load(maps.mask, density=False)
            mask = np.clip(mask, 0.0, 1.0)  # a re-boxed soft mask may ring a little past [0, 1]
            _models.clear()  # one run's models at a time per process
            (half_a, voxel), (half_b, _) = maps.load(maps.half_a), maps.load(maps.half_b)
            fsc_voxel = voxel or map_header(maps.half_a)[1]  # None: maps at each particle's own pixel size (header only)
            if settings.lowpass_angstrom:
                half_a, half_b = (lowpass_map(xp, half, fsc_voxel, settings.lowpass_angstrom) for half in (half_a, half_b))
            # One map for all (--single-map): no second half to tell signal from noise.
            fsc = None if maps.half_a == maps.half_b else fourier_shell_correlation(xp, half_a, half_b, fsc_voxel)
            _models[key] = {
                HALF_A: prepare_half_map(xp, half_a, mask, settings, fsc, voxel),
                HALF_B: prepare_half_map(xp, half_b, mask, settings, fsc, voxel),
            }
        return _models[key]


def worker_threads_and_limit() -> tuple[int, int | None]:
    """Tasks this process runs at once, and its Dask memory limit (None outside a Dask worker or unlimited)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return os.cpu_count() or 1, None  # the threaded scheduler: one task per core at most
    limit = worker.memory_manager.memory_limit
    return worker.state.nthreads, int(limit) if limit else None


def batch_size(box: int, settings: SubtractionSettings, device: str, chunk_size: int) -> int:
    """How many particles to process at once, from what this worker has free now.

    On a GPU: its free memory (the prepared maps already hold theirs). On the
    CPU: the room left under the Dask worker's memory limit (below the point
    where distributed pauses it), or this machine's available memory. Shared by
    the tasks running at once, at most ``resources.BATCH_CAP_BYTES`` each.
    """
    import psutil

    threads, limit = worker_threads_and_limit()
    if device == "gpu":
        free = resources.gpu_memory_free()
    elif limit:
        free = limit * resources.usable_fraction() - psutil.Process().memory_info().rss
    else:
        free = resources.host_memory_available()
    return resources.batch_within(BATCH_SHARE_OF_FREE * free, box, settings, device, threads, chunk_size)


def subtract_particles(images: np.ndarray, particles, models: dict, settings, device: str):
    """Subtract every particle with its own half set's model.

    Returns (subtracted (n, box, box), ``ContrastResult`` of (n,) arrays), all NumPy float32.
    """
    xp = get_xp(device)
    count = images.shape[0]
    subtracted = np.empty(images.shape, dtype=np.float32)
    contrast = ContrastResult(*(np.empty(count, dtype=np.float32) for _ in range(3)))
    step = batch_size(images.shape[-1], settings, device, count)
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(particles.half_set == half)
        for first in range(0, members.size, step):
            batch = members[first : first + step]
            result, fitted = subtract_batch(xp, images[batch], particles.subset(batch), models[half], settings)
            subtracted[batch] = to_numpy(result)
            for name in ("alpha", "sigma", "correlation"):
                getattr(contrast, name)[batch] = to_numpy(getattr(fitted, name))
    return subtracted, contrast


def bad_images(images: np.ndarray, particles, skip: bool) -> np.ndarray:
    """Which images hold NaN or infinite values: an error naming the first, or a mask to skip them."""
    bad = ~np.isfinite(images).all(axis=(1, 2))
    if bad.any() and not skip:
        first = int(np.flatnonzero(bad)[0])
        raise InputFileError(
            particles.image_paths[first],
            f"image {particles.image_indices[first] + 1} (1-based) contains NaN or infinite values"
            f"{f' ({int(bad.sum())} such images in this chunk)' if bad.sum() > 1 else ''}.",
            "Re-extract the particles, or add --skip-bad-particles to leave such particles out.",
        )
    return bad


def check_float16_range(subtracted: np.ndarray, particles) -> None:
    """Refuse subtracted images (n, box, box) beyond float16's ±65504 (``--float16``): they would become inf.

    Normalised particles (RELION's extraction: background mean 0, σ 1) stay far
    inside that range; values beyond it mean unnormalised images, which clipping
    would corrupt, so the run stops with one error naming the first such image.
    """
    peaks = np.abs(subtracted).max(axis=(1, 2), initial=0.0)
    beyond = np.flatnonzero(peaks > store.FLOAT16_MAX)
    if beyond.size:
        first = int(beyond[0])
        raise InputFileError(
            particles.image_paths[first],
            f"image {particles.image_indices[first] + 1} (1-based): the subtracted image reaches "
            f"{float(peaks[first]):.4g}, beyond the ±{store.FLOAT16_MAX:g} that --float16 can store.",
            "Rerun without --float16 (add --overwrite, the store is float16), or normalise the particles "
            "(RELION's extraction with --norm).",
        )


def run_chunk(chunk_index: int, start: int, particles, maps: MapFiles, settings, store_path: str, device: str,
              skip_bad: bool = False, reboxing=None):
    """Task body: subtract particles ``start:start+len(particles)`` and store them.

    ``device`` may be "auto": each worker decides for itself (a login node
    without a GPU submits to GPU nodes). Images with NaN or infinite values stop
    the run, or with ``skip_bad`` are stored as zeros and marked skipped. With
    ``reboxing`` (a ``rebox.Reboxing``) the subtracted images are re-centred and
    re-boxed before they are stored. Returns the device used ("cpu", "gpu:N").
    """
    particles = load_particles(particles)
    device = resolve_device(device)
    models = half_map_models(maps, settings, device)
    images = read_images(particles.image_paths, particles.image_indices)
    bad = bad_images(images, particles, skip_bad)
    images[bad] = 0.0
    subtracted, contrast = subtract_particles(images, particles, models, settings, device)
    if reboxing is not None:
        subtracted = rebox_images(np, subtracted, particles, reboxing)
    subtracted[bad] = 0.0
    if store.image_dtype(Path(store_path)) == np.float16:
        check_float16_range(subtracted, particles)
    for values in (contrast.alpha, contrast.sigma, contrast.correlation):
        values[bad] = np.nan
    store.write_chunk(Path(store_path), chunk_index, start, subtracted, contrast, bad)
    return device_label(device)


def fit_sample(particles, maps: MapFiles, settings, device: str):
    """Task body: contrast fit of a sample of particles, for the checks before the long run.

    Returns (fit, control): the ``ContrastResult`` of the sample with its own
    poses, and the fit correlation of each image with the model in another
    sample particle's pose and origin (its own CTF and half set), a baseline of
    what a model that does not belong to the image explains. Images with NaN or
    infinite values get NaN throughout. ``settings.scale`` should be "fit".
    """
    particles = load_particles(particles)
    device = resolve_device(device)
    images = read_images(particles.image_paths, particles.image_indices)
    good = np.flatnonzero(~bad_images(images, particles, skip=True))
    models = half_map_models(maps, settings, device)
    chosen = particles.subset(good)
    others = dataclasses.replace(
        chosen, rotations=np.roll(chosen.rotations, 1, axis=0),
        origins_angstrom=np.roll(chosen.origins_angstrom, 1, axis=0),
    )
    fit = ContrastResult(*(np.full(len(particles), np.nan, dtype=np.float32) for _ in range(3)))
    control = np.full(len(particles), np.nan, dtype=np.float32)
    if good.size:
        own = subtract_particles(images[good], chosen, models, settings, device)[1]
        for name in ("alpha", "sigma", "correlation"):
            getattr(fit, name)[good] = getattr(own, name)
        control[good] = subtract_particles(images[good], others, models, settings, device)[1].correlation
    return fit, control
