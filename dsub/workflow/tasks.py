"""What one task does: read a chunk's images, subtract, write its region of the store.

The prepared half-maps are built once per worker process from the map files
(on its GPU when it uses one) and cached for all later tasks there, so they
never travel between processes: a task carries only its chunk's metadata and
file paths.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..formats.mrc import read_images, read_map
from ..particles import HALF_A, HALF_B
from ..physics.backend import device_label, get_xp, resolve_device, to_numpy
from ..physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch
from . import store

#: Rough per-particle working memory of one batch, in complex64 arrays of the slice size.
_ARRAYS_PER_PARTICLE = 16
_BATCH_BYTES = {"cpu": 512 * 2**20, "gpu": 4 * 2**30}


@dataclass(frozen=True)
class MapFiles:
    """The three maps of a run; each worker reads them itself."""

    half_a: str
    half_b: str
    mask: str


_models: dict = {}
_models_lock = threading.Lock()


def half_map_models(maps: MapFiles, settings: SubtractionSettings, device: str) -> dict:
    """Prepared models {HALF_A: ..., HALF_B: ...} for this process, built on first use."""
    key = (maps, settings.projector, settings.padding, settings.mask_keeps, device)  # what the prepared maps depend on
    with _models_lock:
        if key not in _models:
            xp = get_xp(device)
            mask, _ = read_map(maps.mask)
            _models.clear()  # one run's models at a time per process
            _models[key] = {
                HALF_A: prepare_half_map(xp, read_map(maps.half_a)[0], mask, settings),
                HALF_B: prepare_half_map(xp, read_map(maps.half_b)[0], mask, settings),
            }
        return _models[key]


def batch_size(box: int, settings: SubtractionSettings, device: str) -> int:
    """How many particles to process at once so a batch fits the device's working memory."""
    size = settings.field_size(box)
    per_particle = _ARRAYS_PER_PARTICLE * size * (size // 2 + 1) * 8
    return max(1, _BATCH_BYTES[device] // per_particle)


def subtract_particles(images: np.ndarray, particles, models: dict, settings, device: str):
    """Subtract every particle with its own half set's model; returns (subtracted, alpha) as NumPy."""
    xp = get_xp(device)
    subtracted = np.empty(images.shape, dtype=np.float32)
    alpha = np.empty(images.shape[0], dtype=np.float32)
    step = batch_size(images.shape[-1], settings, device)
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(particles.half_set == half)
        for first in range(0, members.size, step):
            batch = members[first : first + step]
            result, scale = subtract_batch(xp, images[batch], particles.subset(batch), models[half], settings)
            subtracted[batch] = to_numpy(result)
            alpha[batch] = to_numpy(scale)
    return subtracted, alpha


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


def run_chunk(chunk_index: int, start: int, particles, maps: MapFiles, settings, store_path: str, device: str,
              skip_bad: bool = False):
    """Task body: subtract particles ``start:start+len(particles)`` and store them.

    ``device`` may be "auto": each worker decides for itself (a login node
    without a GPU submits to GPU nodes). Images with NaN or infinite values stop
    the run, or with ``skip_bad`` are stored as zeros and marked skipped.
    Returns the device used ("cpu", "gpu:N").
    """
    device = resolve_device(device)
    models = half_map_models(maps, settings, device)
    images = read_images(particles.image_paths, particles.image_indices)
    bad = bad_images(images, particles, skip_bad)
    images[bad] = 0.0
    subtracted, alpha = subtract_particles(images, particles, models, settings, device)
    subtracted[bad] = 0.0
    alpha[bad] = np.nan
    store.write_chunk(Path(store_path), chunk_index, start, subtracted, alpha, bad)
    return device_label(device)


def fit_sample(particles, maps: MapFiles, settings, device: str):
    """Task body: fitted contrast of a sample of particles (for the polarity check)."""
    device = resolve_device(device)
    images = read_images(particles.image_paths, particles.image_indices)
    good = ~bad_images(images, particles, skip=True)
    models = half_map_models(maps, settings, device)
    return subtract_particles(images[good], particles.subset(np.flatnonzero(good)), models, settings, device)[1]
