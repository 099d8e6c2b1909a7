"""What one task does: read a chunk's images, subtract, write them into their stacks.

The prepared half-maps are built once per worker process from the map files
(on its GPU when it uses one) and cached for all later tasks there, so they
never travel between processes: a task carries only its chunk's metadata and
file paths.

The tasks of a process form a pipeline around its GPU: each task reads its
images, copies them to the GPU and back on a stream of its own, and writes
its results in its own thread, while the subtraction is queued by the
process's one thread for that device (``gpu_turn``). So one GPU is driven by
one thread whatever the number of tasks: its cuFFT plans (CuPy keeps them per
thread) are made once; the copies, reads and writes of the other tasks overlap
with its work, and a waiting task holds only its images in GPU memory. On the
CPU the tasks run side by side.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputFileError
from ..formats.mrc import map_header, read_images, read_map
from ..particles import HALF_A, HALF_B
from ..physics.backend import device_label, get_xp, resolve_device
from ..physics.contrast import ContrastResult
from ..physics.fsc import fourier_shell_correlation
from ..physics.lowpass import lowpass_map
from ..physics.optics import fit_map_to_box
from ..physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch
from . import export, resources, store
from .blank import blank_images
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
_gpu_threads: dict[int, ThreadPoolExecutor] = {}  # per CUDA device of this process: the one thread driving it
_host_buffers = threading.local()  # each thread's reused host arrays and its CUDA streams
#: cuFFT plans each GPU thread keeps (CuPy's default is 16): a few batch sizes × the model's transforms.
FFT_PLANS_KEPT = 48
#: A GPU batch is rounded up to a multiple of this many particles, so that its cuFFT plans are few and reused.
GPU_BATCH_QUANTUM = 32


def gpu_turn(work):
    """``work()`` run in this process's one thread for the current CUDA device; returns its result.

    The thread is made on first use, on the caller's device, with room for
    ``FFT_PLANS_KEPT`` cuFFT plans; ``work``'s exception is raised here.
    """
    import cupy

    device_id = cupy.cuda.Device().id
    with _models_lock:
        executor = _gpu_threads.get(device_id)
        if executor is None:
            def start_thread():
                cupy.cuda.Device(device_id).use()
                cupy.fft.config.get_plan_cache().set_size(FFT_PLANS_KEPT)

            executor = _gpu_threads[device_id] = ThreadPoolExecutor(
                1, thread_name_prefix=f"dsub-gpu{device_id}", initializer=start_thread)
    return executor.submit(work).result()


def quantum_padded(batch: np.ndarray, quantum: int = GPU_BATCH_QUANTUM) -> np.ndarray:
    """``batch`` (int indices) with its last index repeated up to a multiple of ``quantum`` entries."""
    missing = -batch.size % quantum
    return np.concatenate([batch, np.full(missing, batch[-1], dtype=batch.dtype)]) if missing else batch


def pinned_buffer(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """This thread's page-locked host array ``name`` of ``shape`` (reused while large enough).

    Copies between page-locked memory and the GPU run at the bus's speed and
    asynchronously on a stream; each thread has its own, so a task fills its
    input and reads its output outside its turn on the GPU.
    """
    import cupyx

    return _reused("pinned", cupyx.empty_pinned, name, shape, dtype)


def thread_buffer(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """This thread's host array ``name`` of ``shape`` (reused while large enough); see ``image_buffer``."""
    return _reused("arrays", np.empty, name, shape, dtype)


def _reused(kind: str, allocate, name: str, shape: tuple, dtype) -> np.ndarray:
    """This thread's array ``name`` among its ``kind``, of ``shape``; made anew by ``allocate(count, dtype)``
    only when the one held is too small or of another dtype."""
    buffers = _host_buffers.__dict__.setdefault(kind, {})
    count = int(np.prod(shape))
    held = buffers.get(name)
    if held is None or held.size < count or held.dtype != np.dtype(dtype):
        held = buffers[name] = allocate(count, dtype=dtype)
    return held[:count].reshape(shape)


def image_buffer(device: str):
    """``read_images``'s ``into`` for a task on ``device``: this thread's reused array for its images.

    Page-locked on a GPU (the copy to it then starts from where the images were
    read). A fresh array for each task would be mapped and unmapped every time
    (64 MB for a chunk of 256 at box 256), and each unmap interrupts every core
    that runs a thread of the process. Valid until the thread's next task.
    """
    if device == "cpu":
        return lambda shape: thread_buffer("in", shape)
    return lambda shape: pinned_buffer("in", shape)


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
            if fsc is not None and settings.fit.weighting == "fsc":
                refuse_half_maps_without_common_signal(maps, fsc)
            _models[key] = {
                HALF_A: prepare_half_map(xp, half_a, mask, settings, fsc, voxel),
                HALF_B: prepare_half_map(xp, half_b, mask, settings, fsc, voxel),
            }
        return _models[key]


def refuse_half_maps_without_common_signal(maps: MapFiles, fsc) -> None:
    """Raise ``InputFileError`` where no shell of the half maps' FSC is above its noise (``ShellCurve.significant``).

    The contrast fit weighs each shell by that FSC (``fsc.wiener_filter``): with
    none significant its model is empty, every particle's contrast would be 0
    and its fit correlation 0, as for blank images. Two halves of one
    refinement agree at low resolution whatever their noise; maps that share
    nothing are another run's, or not half maps.
    """
    if np.any(fsc.significant().values > 0):
        return
    raise InputFileError(
        maps.half_a,
        f"shares no signal with {maps.half_b}, the other half map: their Fourier shell correlation is nowhere "
        "above its noise (3σ), so the contrast fit, which weighs each shell by it, would have nothing to fit and "
        "every particle's contrast would be 0.",
        "Give the two half maps of the refinement these particles come from (or --fit-weighting none to fit "
        "against the maps as they are).")


def prepare_models(maps: MapFiles, settings: SubtractionSettings, device: str) -> None:
    """Task body: build this worker's prepared half-maps now (``half_map_models``), ahead of its first chunk."""
    half_map_models(maps, settings, resolve_device(device))


def worker_threads_and_limit() -> tuple[int, int | None]:
    """Tasks this process runs at once, and its Dask memory limit (None outside a Dask worker or unlimited)."""
    # A Dask worker has loaded distributed; the threads scheduler need not (0.1-0.5 s in its first task).
    distributed = sys.modules.get("distributed")
    try:
        worker = distributed.get_worker() if distributed is not None else None
    except (ValueError, AttributeError):  # no worker here; or distributed half-imported by another thread
        worker = None
    if worker is None:
        return os.cpu_count() or 1, None  # the threaded scheduler: one task per core at most
    limit = worker.memory_manager.memory_limit
    return worker.state.nthreads, int(limit) if limit else None


def batch_size(box: int, settings: SubtractionSettings, device: str, chunk_size: int) -> int:
    """How many particles to process at once, from what this worker has free now.

    On a GPU: its free memory (the prepared maps already hold theirs), for the
    one task whose turn it is (``gpu_turn``). On the CPU: the room left under
    the Dask worker's memory limit (below the point where distributed pauses
    it), or this machine's available memory, shared by the tasks running at
    once, and never more than the room under an address-space limit
    (``resources.host_memory_available``). At most ``resources.BATCH_CAP_BYTES`` each.
    """
    import psutil

    threads, limit = worker_threads_and_limit()
    # Under an address-space limit (``ulimit -v``, which a local cluster's workers inherit) the room left under
    # it, less the threads yet to start; without one the machine's available memory. A Dask worker's memory
    # limit (its share of the machine, whatever ``ulimit -v`` allows) caps it further.
    if device == "gpu":  # one task at a time (gpu_turn): batch_within counts one
        free = resources.gpu_memory_free()
    else:
        free = resources.host_memory_available(resources.run_threads(threads))
        if limit:
            free = min(free, limit * resources.usable_fraction() - psutil.Process().memory_info().rss)
    return resources.batch_within(BATCH_SHARE_OF_FREE * free, box, settings, device, threads, chunk_size)


def subtract_particles(images: np.ndarray, particles, models: dict, settings, device: str,
                       statistics: bool = False, nonfinite: bool = False):
    """Subtract every particle with its own half set's model.

    Returns (subtracted (n, box, box), ``ContrastResult`` of (n,) arrays), all NumPy float32.
    On a GPU the subtraction is one turn (``gpu_turn``); the subtracted images
    come back in this thread's page-locked buffer (on the CPU its reused
    array), valid until its next call.
    With ``statistics`` an item follows: on a GPU the subtracted images'
    ``export.image_statistics`` (n, 4) float64, computed there in the same turn;
    on the CPU None (the caller computes them from what it writes).
    With ``nonfinite`` images holding NaN or infinite values are zeroed before
    the subtraction (on a GPU there, in the turn: the host does not scan the
    images again) and a last item follows: which they were, (n,) bool.
    """
    if device != "cpu":
        return _subtract_on_gpu(images, particles, models, settings, statistics, nonfinite)
    if nonfinite:
        bad = nonfinite_images(images)
        images[bad] = 0.0
    count = images.shape[0]
    subtracted = thread_buffer("out", images.shape)
    contrast = ContrastResult(*(np.empty(count, dtype=np.float32) for _ in range(3)))
    step = batch_size(images.shape[-1], settings, device, count)
    for half in (HALF_A, HALF_B):
        members = np.flatnonzero(particles.half_set == half)
        for first in range(0, members.size, step):
            batch = members[first : first + step]
            result, fitted = subtract_batch(np, images[batch], particles.subset(batch), models[half], settings)
            subtracted[batch] = result
            for name in ("alpha", "sigma", "correlation"):
                getattr(contrast, name)[batch] = getattr(fitted, name)
    return (subtracted, contrast) + ((None,) if statistics else ()) + ((bad,) if nonfinite else ())


def _subtract_on_gpu(images: np.ndarray, particles, models: dict, settings, statistics: bool,
                     nonfinite: bool = False):
    """``subtract_particles`` on this process's GPU: copies on the task's own stream, compute in the GPU's turn.

    The task copies its images to its thread's page-locked buffer and on to
    the GPU on a stream of its own before its turn; the turn only queues the
    subtraction on the GPU thread's stream, after the copy's event, and returns
    without waiting for it; the task then copies the results back on its
    stream once the turn's event is reached. So the GPU computes one task while
    the copies of others cross the bus, and the GPU thread queues the next
    turn while the GPU still runs this one.
    """
    import cupy

    count = images.shape[0]
    staged = pinned_buffer("in", images.shape)
    if staged.ctypes.data != images.ctypes.data:  # not read into it already (``image_buffer``)
        np.copyto(staged, images)
    returned = pinned_buffer("out", images.shape)
    figures = pinned_buffer("figures", (3, count))
    sums = pinned_buffer("statistics", (count, 4), np.float64) if statistics else None
    flags = pinned_buffer("nonfinite", (count,), np.bool_) if nonfinite else None
    copies = _thread_stream()
    with copies:
        on_gpu = cupy.empty(images.shape, dtype=cupy.float32)
        on_gpu.set(staged, stream=copies)
        arrived = _event(copies)

    def turn():
        stream = _thread_stream()
        with stream:
            stream.wait_event(arrived)
            bad_on_gpu = zero_nonfinite_on_gpu(on_gpu) if flags is not None else None
            out = cupy.empty_like(on_gpu)
            fitted_all = cupy.empty((3, count), dtype=cupy.float32)
            step = batch_size(images.shape[-1], settings, "gpu", count)
            quantum = GPU_BATCH_QUANTUM if step >= GPU_BATCH_QUANTUM else 1  # no padding where memory is short
            step = step // quantum * quantum
            for half in (HALF_A, HALF_B):
                members = np.flatnonzero(particles.half_set == half)
                for first in range(0, members.size, step):
                    batch = members[first : first + step]
                    padded = quantum_padded(batch, quantum)  # the extra rows repeat the last particle and are dropped
                    result, fitted = subtract_batch(cupy, on_gpu[cupy.asarray(padded)], particles.subset(padded),
                                                    models[half], settings)
                    where = cupy.asarray(batch)
                    out[where] = result[: batch.size]
                    for row, name in enumerate(("alpha", "sigma", "correlation")):
                        fitted_all[row, where] = getattr(fitted, name)[: batch.size]
            statistics_on_gpu = image_statistics_on_gpu(out) if sums is not None else None
            return out, fitted_all, statistics_on_gpu, bad_on_gpu, _event(stream)

    out, fitted_all, statistics_on_gpu, bad_on_gpu, computed = gpu_turn(turn)
    with copies:
        copies.wait_event(computed)
        out.get(stream=copies, out=returned)
        fitted_all.get(stream=copies, out=figures)
        if sums is not None:
            statistics_on_gpu.get(stream=copies, out=sums)
        if flags is not None:
            bad_on_gpu.get(stream=copies, out=flags)
        # Then the GPU is done with every array of this task: they go back to CuPy's pool. A blocking
        # event: the thread sleeps instead of spinning on a core the other tasks' copies need.
        _event(copies, blocking=True).synchronize()
    on_gpu = out = fitted_all = statistics_on_gpu = bad_on_gpu = None  # their memory goes back to CuPy's pool now
    contrast = ContrastResult(*(figures[row].copy() for row in range(3)))
    return ((returned, contrast) + ((sums.copy(),) if statistics else ())
            + ((flags.copy(),) if nonfinite else ()))


def zero_nonfinite_on_gpu(images):
    """Zero, in place, each CuPy image (n, box, box) float32 holding NaN or infinite values.

    Returns which they were, (n,) bool on the GPU: the twin of
    ``nonfinite_images`` followed by ``images[bad] = 0``, in two kernels.
    """
    import cupy

    global _NONFINITE, _ZERO_FLAGGED
    if _NONFINITE is None:
        _NONFINITE = cupy.ReductionKernel("float32 x", "bool y", "!isfinite(x)", "a || b", "y = a", "false",
                                          "dsub_nonfinite_images")
        _ZERO_FLAGGED = cupy.ElementwiseKernel("raw bool bad, int64 pixels", "float32 x",
                                               "if (bad[i / pixels]) x = 0.0f;", "dsub_zero_flagged_images")
    count = images.shape[0]
    bad = _NONFINITE(images.reshape(count, -1), axis=1)
    if count:
        _ZERO_FLAGGED(bad, images[0].size, images)
    return bad


_NONFINITE = _ZERO_FLAGGED = None


def image_statistics_on_gpu(images):
    """``export.image_statistics`` of CuPy images (n, box, box) float32: (n, 4) float64 on the GPU."""
    import cupy

    flat = images.reshape(images.shape[0], -1)
    out = cupy.empty((images.shape[0], 4), dtype=cupy.float64)
    out[:, 0] = flat.min(axis=1)
    out[:, 1] = flat.max(axis=1)
    out[:, 2] = flat.sum(axis=1, dtype=cupy.float64)
    out[:, 3] = _sum_of_squares(flat, axis=1)
    return out


def _sum_of_squares(values, axis: int):
    import cupy

    global _SUM_OF_SQUARES
    if _SUM_OF_SQUARES is None:
        _SUM_OF_SQUARES = cupy.ReductionKernel("float32 x", "float64 y", "(double)x * (double)x", "a + b", "y = a",
                                               "0", "dsub_sum_of_squares")
    return _SUM_OF_SQUARES(values, axis=axis)


_SUM_OF_SQUARES = None


def _event(stream, blocking: bool = False):
    """A CUDA event recorded on ``stream`` now, without timing; ``blocking``: waiting on it sleeps."""
    import cupy

    event = cupy.cuda.Event(block=blocking, disable_timing=True)
    event.record(stream)
    return event


def _thread_stream():
    """This thread's non-blocking CUDA stream on the current device: the GPU thread's for its turns
    (``gpu_turn``), a task thread's for its copies to and from the GPU."""
    import cupy

    streams = _host_buffers.__dict__.setdefault("streams", {})
    key = cupy.cuda.Device().id
    if key not in streams:
        streams[key] = cupy.cuda.Stream(non_blocking=True)
    return streams[key]


def nonfinite_images(images: np.ndarray) -> np.ndarray:
    """Which images (n, box, box) hold NaN or infinite values: (n,) bool."""
    return ~np.isfinite(images).all(axis=(1, 2))


def bad_images(images: np.ndarray, particles, skip: bool) -> np.ndarray:
    """Which images hold NaN or infinite values: an error naming the first, or a mask to skip them."""
    return refuse_nonfinite(nonfinite_images(images), particles, skip)


def refuse_nonfinite(bad: np.ndarray, particles, skip: bool) -> np.ndarray:
    """``bad`` (n,) bool, the images with NaN or infinite values, back when ``skip``; else an error naming the first.

    Raises ``InputFileError`` (the first such image's stack) unless ``skip`` or no image is bad.
    """
    if bad.any() and not skip:
        rows = np.flatnonzero(bad)
        first = int(rows[0])
        # Symmetry-expanded particles share images: count both where they differ.
        images = len({(str(particles.image_paths[row]), int(particles.image_indices[row])) for row in rows})
        if rows.size == 1:
            extra = ""
        elif images == rows.size:
            extra = f" ({images} such images in this chunk)"
        else:
            extra = f" ({rows.size} particles of this chunk use {'it' if images == 1 else f'{images} such images'})"
        raise InputFileError(
            particles.image_paths[first],
            f"image {particles.image_indices[first] + 1} (1-based) contains NaN or infinite values{extra}.",
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
              skip_bad: bool = False, reboxing=None, stacks=()):
    """Task body: subtract particles ``start:start+len(particles)``, write them into their stacks, record them.

    ``device`` may be "auto": each worker decides for itself (a login node
    without a GPU submits to GPU nodes). Images with NaN or infinite values stop
    the run, or with ``skip_bad`` are written as zeros and marked skipped. With
    ``reboxing`` (a ``rebox.Reboxing``) the subtracted images are re-centred and
    re-boxed before they are written. ``stacks``: the chunk's
    ``export.StackPiece`` list, where its images go (the store keeps them too
    with ``--keep-store``). Returns the chunk's ``store.ChunkResult``, for the
    coordinator to record (``store.ChunkRecorder``).
    """
    particles = load_particles(particles)
    device = resolve_device(device)
    models = half_map_models(maps, settings, device)
    images = read_images(particles.image_paths, particles.image_indices, into=image_buffer(device))
    dtype = store.image_dtype(Path(store_path))
    # On a GPU the statistics of what is written come from it, unless re-boxing or float16 changes the images.
    from_gpu = reboxing is None and dtype == np.float32
    # Images with NaN or infinite values are found (and zeroed) where they are subtracted: on a GPU that
    # spares the host a scan of the chunk's images; nothing is written before the refusal below.
    subtracted, contrast, *rest, bad = subtract_particles(images, particles, models, settings, device,
                                                          statistics=from_gpu, nonfinite=True)
    refuse_nonfinite(bad, particles, skip_bad)
    statistics = rest[0] if rest else None
    if reboxing is not None:
        from .rebox import rebox_images  # with the readers it needs (SciPy, pandas): only for re-boxed runs

        subtracted = rebox_images(np, subtracted, particles, reboxing)
    subtracted[bad] = 0.0
    if dtype == np.float16:
        check_float16_range(subtracted, particles)
    written = subtracted.astype(dtype, copy=False)
    for values in (contrast.alpha, contrast.sigma, contrast.correlation):
        values[bad] = np.nan
    if statistics is None:
        statistics = export.image_statistics(written)
    else:
        statistics[bad] = 0.0  # written as zeros
    export.write_pieces(written, stacks)
    if store.keeps_images(Path(store_path)):
        store.write_images(Path(store_path), start, written)
    return store.ChunkResult(chunk_index, start, device_label(device),
                             np.stack([contrast.alpha, contrast.sigma, contrast.correlation]), bad, statistics)


class SampleFit(NamedTuple):
    """What ``fit_sample`` returns: the fit, the control correlations, the seconds it spent setting up in the
    task, and the seconds of its timed fit (``work_seconds``: the progress counts the rest of the phase, a
    worker's start and map preparation included, as set-up, ``runner.set_up_of``)."""

    fit: ContrastResult
    control: np.ndarray
    set_up_seconds: float = 0.0
    work_seconds: float | None = None
    blank: np.ndarray | None = None  # (n,) bool: blank images (``blank.blank_images``), fitted as NaN
    nonfinite: np.ndarray | None = None  # (n,) bool: images with NaN or infinite values, fitted as NaN


def fit_sample(particles, maps: MapFiles, settings, device: str) -> SampleFit:
    """Task body: contrast fit of a sample of particles, for the checks before the long run.

    Returns ``SampleFit(fit, control, set_up_seconds)``: the ``ContrastResult`` of
    the sample with its own poses, and the fit correlation of each image with
    the model in another sample particle's pose and origin (its own CTF and half
    set), a baseline of what a model that does not belong to the image explains.
    Images with NaN or infinite values (returned as ``nonfinite``), and blank
    ones (every pixel the same, ``blank.blank_images``, returned as ``blank``),
    get NaN throughout.
    ``settings.scale`` should be "fit".

    Before the timed fit the task gets the prepared maps (made here where the
    worker has none yet) and subtracts one particle, so that the compiled
    kernels are built (numba's compilation of the CPU kernels on a cold cache,
    several seconds; CuPy's on a GPU): ``set_up_seconds`` is that time.
    ``work_seconds`` is the timed fit alone: the progress leaves everything else
    of the phase out of the sample fit's particles/s (``runner.set_up_of``), so
    that on a cluster the worker's start and its map preparation, which happen
    before the task or beside it on the worker, are not counted as work either.
    """
    particles = load_particles(particles)
    device = resolve_device(device)
    images = read_images(particles.image_paths, particles.image_indices)
    blank = blank_images(images)
    nonfinite = bad_images(images, particles, skip=True)
    good = np.flatnonzero(~nonfinite & ~blank)
    setting_up = time.perf_counter()
    models = half_map_models(maps, settings, device)
    chosen = particles.subset(good)
    if good.size:  # compile before timing: one particle through every kernel the fit uses
        subtract_particles(images[good[:1]], chosen.subset(np.arange(1)), models, settings, device)
    set_up = time.perf_counter() - setting_up
    others = dataclasses.replace(
        chosen, rotations=np.roll(chosen.rotations, 1, axis=0),
        origins_angstrom=np.roll(chosen.origins_angstrom, 1, axis=0),
    )
    fit = ContrastResult(*(np.full(len(particles), np.nan, dtype=np.float32) for _ in range(3)))
    control = np.full(len(particles), np.nan, dtype=np.float32)
    working = time.perf_counter()
    if good.size:
        own = subtract_particles(images[good], chosen, models, settings, device)[1]
        for name in ("alpha", "sigma", "correlation"):
            getattr(fit, name)[good] = getattr(own, name)
        control[good] = subtract_particles(images[good], others, models, settings, device)[1].correlation
    return SampleFit(fit, control, set_up, time.perf_counter() - working, blank, nonfinite)
