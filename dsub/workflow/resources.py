"""The memory one worker needs: estimated before any work, printed, and checked against each worker.

Built on ``physics.memory`` (prepared maps, batch working memory) plus what a
worker holds besides: its Python process, a chunk's images in and out and the
Zarr write of each task it runs at once. Where a limit is known (this
machine's free memory or GPU memory for ``threads``/``sync``, each Dask
worker's memory limit and free GPU memory once it has joined) a run that
cannot fit is refused in one line before any map is prepared. Later failures
(``MemoryError``, a worker killed by its nanny or lost with its node) end in
one line too, with the estimate and where the worker logs are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
from dataclasses import dataclass

import dask

from ..cluster.runner import WorkersLost, threaded_scheduler_threads
from ..errors import DsubError, out_of_memory
from ..physics.memory import (
    COMPILED_GATHER_HOST_BYTES,
    batch_bytes_per_particle,
    compiled_gather_installed,
    prepared_map_bytes,
    preparation_peak_bytes,
)
from ..physics.projector import GRIDDING_OVERSAMPLING, projector_kernel

#: A batch on a GPU needs this much more per particle than NumPy's count (cuFFT work areas and plans for the
#: extraction field; CuPy's pool at box 512, batch 256, on an H200: 63 MB against 45 MB, BENCHMARKS.md).
GPU_BATCH_FACTOR = 1.4


def particle_bytes(box: int, settings, device: str) -> float:
    """Working bytes per particle of a batch on ``device``."""
    return batch_bytes_per_particle(box, settings) * (GPU_BATCH_FACTOR if device == "gpu" else 1.0)

#: Resident memory of a worker process with dsub, NumPy, SciPy, Zarr and Dask loaded (measured: 175-195 MB),
#: with room for its tasks' reading and writing threads (a box-64 run peaked 15 MB above a 200 MB baseline).
#: The libraries' share varies by up to 100 MB with the machine's page cache (the same box-64 run of
#: tests/test_memory.py peaked at 0.67-0.80 GB on one machine and 0.82 GB in a clean clone on another).
BASELINE_HOST_BYTES = 330 * 2**20
#: Host memory of a CUDA context and CuPy in a GPU worker (rough; depends on the driver).
GPU_HOST_OVERHEAD_BYTES = 512 * 2**20
#: A chunk's images as read, as subtracted, and as encoded for the Zarr write.
IMAGE_COPIES_PER_TASK = 3
#: Largest batch per task worth making, in working bytes (``particle_bytes``). On a GPU larger ones do not run
#: faster. On a CPU smaller ones run faster: a batch whose working arrays stay in the core's caches between the
#: model's passes (slices, transforms, transfer, fit) beats one that goes out to memory at each (one core, box
#: 256: the default 223-232 particles/s in batches of 1-4 against 185-198 in batches of 8-64, ``relion``
#: 568-580 in batches of 2-4 against 494 in batches of 64; box 128: the default 678-709 in batches of 1-4,
#: 577 in 64, ``relion`` 2 583 in 8, 2 434 in 64; BENCHMARKS.md).
BATCH_CAP_BYTES = {"cpu": 4 * 2**20, "gpu": 4 * 2**30}
#: Share of a Dask worker's memory limit dsub plans to use: distributed pauses a worker at 80 %.
DEFAULT_USABLE_FRACTION = 0.8

GB = 1e9


def gigabytes(count: int) -> str:
    """Bytes for people: ``2.4 GB``, or ``40 MB`` below a tenth of a GB (never ``0.0 GB``)."""
    return f"{count / GB:.1f} GB" if count >= 0.1 * GB else f"{max(1, round(count / 1e6))} MB"


class NotEnoughMemoryError(DsubError, MemoryError):
    """A worker (or this machine) cannot hold what the run needs."""


class WorkerLostError(DsubError, RuntimeError):
    """A worker died or was lost while running tasks."""


@dataclass(frozen=True)
class WorkerMemory:
    """Memory one worker needs (bytes), for a box, device, tasks at once and batch size."""

    box: int
    device: str
    threads: int
    batch: int
    host_bytes: int
    gpu_bytes: int

    def describe(self) -> str:
        gpu = f" and {gigabytes(self.gpu_bytes)} of GPU memory" if self.device == "gpu" else " (no GPU)"
        return (f"each worker needs about {gigabytes(self.host_bytes)} of host memory{gpu} for box {self.box} "
                f"({self.threads} task(s) at once, batches of {self.batch})")


def usable_fraction() -> float:
    """Share of a worker's memory limit it may fill before distributed pauses or restarts it."""
    fractions = [dask.config.get(f"distributed.worker.memory.{name}", None) for name in ("pause", "terminate")]
    fractions = [float(value) for value in fractions if value not in (None, False)]
    return min(fractions) if fractions else 1.0


def task_io_bytes(box: int, chunk_size: int) -> int:
    """Host bytes of one task's images: read, subtracted, and encoded for Zarr."""
    return IMAGE_COPIES_PER_TASK * chunk_size * box * box * 4


#: Host bytes per voxel of the cube that a map of another box is cropped or padded to before it is
#: Fourier-resampled to the particles' box (``optics.fit_map_to_box``, in float64/complex128; one map at a
#: time): 44 by tracemalloc (tests/test_memory.py); a 684³ cube (a 100-voxel map at 1.05 Å brought to 256 px
#: at 2.806 Å) peaked at 13 GB resident.
REBOX_BYTES_PER_VOXEL = 45


def worker_memory(box: int, settings, device: str, threads: int, chunk_size: int, batch: int,
                  map_voxels: int = 0) -> WorkerMemory:
    """Host and GPU bytes of one worker running ``threads`` tasks at once with batches of ``batch``.

    ``map_voxels``: the side of the cube a map of another box is brought through
    (``MapFiles.extent_voxels``), 0 when the maps are at the particles' box.
    """
    maps_read = 3 * box**3 * 4  # both half maps and the mask as read from their files
    maps_read = max(maps_read, REBOX_BYTES_PER_VOXEL * int(map_voxels) ** 3)
    # On a GPU one task at a time computes (``tasks.gpu_turn``); every running task keeps its chunk's images
    # in and out there while they cross the bus around its turn.
    on_gpu = threads * 2 * chunk_size * box * box * 4 if device == "gpu" else 0
    working = (1 if device == "gpu" else threads) * batch * particle_bytes(box, settings, device) + on_gpu
    io = threads * task_io_bytes(box, chunk_size)
    # The maps' preparation peaks before any batch runs; then the prepared maps stay beside the batches.
    physics = max(preparation_peak_bytes(box, settings, device), prepared_map_bytes(box, settings, device) + working)
    if device == "gpu":  # each thread also keeps its chunk's images in and out in page-locked buffers
        pinned = threads * 2 * chunk_size * box * box * 4
        host = BASELINE_HOST_BYTES + GPU_HOST_OVERHEAD_BYTES + maps_read + io + pinned
        gpu = physics
    else:
        compiler = COMPILED_GATHER_HOST_BYTES if compiled_gather_installed() else 0
        host = BASELINE_HOST_BYTES + compiler + maps_read + physics + io
        gpu = 0
    return WorkerMemory(box, device, threads, batch, host, gpu)


def batch_cap(box: int, settings, device: str, threads: int, chunk_size: int) -> int:
    """The batch a task uses when memory is plentiful (one task at a time on a GPU: ``tasks.gpu_turn``)."""
    budget = BATCH_CAP_BYTES[device]
    largest = int(budget // particle_bytes(box, settings, device))
    return int(max(1, min(chunk_size, largest)))


def batch_within(budget_bytes: float, box: int, settings, device: str, threads: int, chunk_size: int) -> int:
    """Largest batch (>= 1, at most the cap) whose working memory for ``threads`` tasks fits ``budget_bytes``.

    On a GPU the tasks take turns (``tasks.gpu_turn``): one task's batch must fit.
    """
    tasks = 1 if device == "gpu" else max(1, threads)
    fits = int(budget_bytes // (tasks * particle_bytes(box, settings, device)))
    return max(1, min(batch_cap(box, settings, device, threads, chunk_size), fits))


# --- what this machine or a worker has -----------------------------------------------------------

#: Files whose figure caps this process's memory where it is above 0: cgroup v1 hard and soft limits, cgroup v2
#: max, high and low, the files ``distributed.system.memory_limit`` reads.
CGROUP_LIMIT_FILES = (
    "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.soft_limit_in_bytes",
    "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.high", "/sys/fs/cgroup/memory.low",
)


def memory_limit() -> int:
    """Bytes of memory this machine lets the process hold: the total, capped by its cgroup and ``RLIMIT_RSS``.

    The rule of Dask's ``distributed.system.memory_limit`` (which Dask workers
    take for their limit), written out here because importing it imports all of
    ``distributed``: 0.2 s on a 2-core VM and 1.0-1.7 s on the GPU hosts
    (BENCHMARKS.md) that a run on ``threads`` needs for nothing else.
    """
    import psutil

    limit = psutil.virtual_memory().total
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as f:
                capped = int(f.read())
        except (OSError, ValueError):  # absent, or "max" (cgroup v2 without a limit)
            continue
        if capped > 0:
            limit = min(limit, capped)
    hard = resource.getrlimit(resource.RLIMIT_RSS)[1]
    if 0 < hard < limit:
        limit = hard
    return limit


#: Address space a malloc arena reserves (glibc's ``HEAP_MAX_SIZE`` on 64-bit: 2 x 32 MiB), which a thread
#: that allocates takes on its first ``malloc``, up to ``ARENAS_PER_CORE`` arenas per core (glibc's
#: ``M_ARENA_MAX`` default). The reservation counts against ``ulimit -v`` although it is not resident.
ARENA_ADDRESS_BYTES = 64 * 2**20
ARENAS_PER_CORE = 8
#: Threads a run on this machine starts beside its tasks and its main thread: dsub's own (read-ahead, content
#: hashes, report preparation and warm-up, progress display), and Zarr's I/O loop (``zarr_io``) with its
#: asyncio pool (``asyncio_N``, ``zarr_asyncio_threads``). Measured on a box-256 run on ``threads``:
#: at most 8 beside the tasks at once, 13 names in all.
DSUB_HELPER_THREADS = 4


def address_space_limit() -> int | None:
    """The soft ``RLIMIT_AS`` (``ulimit -v``) in bytes, or None without one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft in (resource.RLIM_INFINITY, -1) else int(soft)


def thread_stack_bytes() -> int:
    """Address space of one new thread's stack: Python's ``threading.stack_size()`` where set, else the
    ``RLIMIT_STACK`` soft limit that glibc takes for a thread's stack (8 MiB where unlimited)."""
    import threading

    chosen = threading.stack_size()
    if chosen:
        return int(chosen)
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    return 8 * 2**20 if soft in (resource.RLIM_INFINITY, -1) else int(soft)


def zarr_asyncio_threads() -> int:
    """Zarr's I/O loop thread and its asyncio pool's (``threading.max_workers``, else asyncio's default
    ``min(32, cores + 4)``)."""
    try:
        import zarr

        chosen = zarr.config.get("threading.max_workers", None)
    except ImportError:
        chosen = None
    return 1 + int(chosen or min(32, (os.cpu_count() or 1) + 4))


def run_threads(tasks: int) -> int:
    """Threads of a process running ``tasks`` tasks at once at its busiest: its main thread, the tasks,
    dsub's helpers and Zarr's (``DSUB_HELPER_THREADS``, ``zarr_asyncio_threads``)."""
    return 1 + max(1, int(tasks)) + DSUB_HELPER_THREADS + zarr_asyncio_threads()


def threads_address_bytes(threads_at_peak: int, threads_now: int) -> int:
    """Address space the threads still to start will map: a stack each, and an arena each up to the arena
    limit (``arena_cap``, the main thread's heap included)."""
    new = max(0, threads_at_peak - threads_now)
    arena_limit = arena_cap()
    arenas = max(0, min(threads_at_peak, arena_limit) - min(threads_now, arena_limit))
    return new * thread_stack_bytes() + arenas * ARENA_ADDRESS_BYTES


def arena_cap() -> int:
    """malloc arenas a process may have: ``MALLOC_ARENA_MAX`` where set (the command sets it under an
    address-space limit, ``command.lean_threads_under_an_address_space_limit``), else glibc's default."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("MALLOC_ARENA_MAX", "0")) > 0:
            return int(os.environ["MALLOC_ARENA_MAX"])
    return ARENAS_PER_CORE * (os.cpu_count() or 1)


def host_memory_available(threads_at_peak: int = 0) -> int:
    """Bytes this process may still allocate: free memory, cgroup and rlimit caps (whichever is least).

    Under an address-space limit (``ulimit -v``) what counts is the address space
    mapped now (``vms``: libraries, thread stacks, malloc arenas, mapped files,
    far above the resident memory), less what the threads the run has not
    started yet will map (``threads_address_bytes``) when ``threads_at_peak``
    (``run_threads``) says how many it will have. Counting the threads to come
    rather than those running makes the answer the same whether a helper
    thread (Zarr's I/O loop, opened by a rerun's look at its store) started
    before it was asked or after.
    """
    import psutil

    process = psutil.Process().memory_info()
    room = [psutil.virtual_memory().available, memory_limit() - process.rss]
    under_limit = address_space_room(threads_at_peak)
    if under_limit is not None:
        room.append(under_limit)
    return max(0, int(min(room)))


def address_space_room(threads_at_peak: int = 0) -> int | None:
    """Bytes left under this process's address-space limit (None without one): the limit less what is
    mapped now, less what the threads still to start will map (``threads_address_bytes``, where
    ``threads_at_peak`` is given)."""
    import threading

    import psutil

    soft = address_space_limit()
    if soft is None:
        return None
    ahead = threads_address_bytes(threads_at_peak, threading.active_count()) if threads_at_peak else 0
    return int(soft - psutil.Process().memory_info().vms - ahead)


def gpu_memory_free() -> int:
    """Free bytes on this process's current GPU, counting CuPy's cached free blocks.

    A limit on CuPy's memory pool (``CUPY_GPU_MEMORY_LIMIT``, ``set_limit``) counts
    too: what the pool may still take is the smaller of the two.
    """
    import cupy

    pool = cupy.get_default_memory_pool()
    free, _ = cupy.cuda.runtime.memGetInfo()
    free = int(free + pool.free_bytes())
    limit = int(pool.get_limit())
    if limit:
        free = min(free, limit - int(pool.used_bytes()))
    return max(0, free)


def worker_capacity(device: str, dask_worker=None) -> dict:
    """Run on each Dask worker (``client.run``): its device, memory limit, free GPU memory and threads."""
    from ..physics.backend import resolve_device

    try:
        resolved = resolve_device(device)
    except RuntimeError:
        resolved = "none"
    limit = dask_worker.memory_manager.memory_limit if dask_worker is not None else None
    threads = dask_worker.state.nthreads if dask_worker is not None else 1
    return {
        "device": resolved,
        "host_limit": int(limit) if limit else None,
        "gpu_free": gpu_memory_free() if resolved == "gpu" else None,
        "threads": threads,
        # Under ``ulimit -v`` (a local cluster's workers inherit it): what the worker's tasks may still map.
        "address_room": address_space_room(run_threads(threads)),
        "address_limit": address_space_limit(),
    }


# --- the coordinator's own address space ---------------------------------------------------------

#: Address space the QC report's drawing library maps as it loads and draws its first figure (matplotlib, its
#: fonts): 153 MB measured with two malloc arenas (2026-11-30). The run loads it while the maps are prepared.
DRAWING_LIBRARY_BYTES = 160 * 2**20
#: Threads a Dask client adds to the coordinator beside ``run_threads`` (its event loop, offload and
#: communication threads): a box-96 run on ``local`` peaked at 19-20 threads on 2 cores (2026-11-30).
DASK_CLIENT_THREADS = 6
#: The QC report's own memory (``dsub.report``), measured 2026-11-30 (``benchmarks/report_memory.py``: 300
#: particles, two malloc arenas, preparation and drawing as a run does them): 95-104 MB mapped, 72-75 MB
#: resident at box 128, 256 and 384 with 1 Å pixels (examples binned to 128 px), and up to 161 MB mapped,
#: 134 MB resident with 3 Å pixels at box 256 and 512 (examples shown at 256 px). It reads the spectrum sample in
#: blocks (``report.sizes.SPECTRUM_BLOCK_BYTES`` of input and of result images, with their transforms), holds
#: the examples' images at full size, and draws them in one mosaic whose pixels the drawing library copies in
#: float64 RGBA (about 70 bytes a pixel measured). Each part below is an upper bound of what was measured;
#: ``REPORT_FIXED_BYTES``: what does not depend on the box (the figures' canvases, the store's arrays).
REPORT_FIXED_BYTES = 96 * 2**20
REPORT_BLOCK_COPIES = 5
REPORT_EXAMPLE_COPIES = 4
REPORT_DISPLAY_BYTES_PER_PIXEL = 80
REPORT_BYTES_PER_PARTICLE = 100


#: Copies of the examples' input images that the report's preparation (``report.start_preparation``, in a
#: thread while the chunks run) holds: the images read, kept until the report is drawn.
REPORT_PREPARATION_COPIES = 2


def report_example_bytes(box: int) -> int:
    """Bytes of the report's example images of ``box``² float32 pixels, one of input, model or result."""
    from ..report.sizes import EXAMPLES_PER_HALF

    return 2 * EXAMPLES_PER_HALF * box * box * 4


def report_preparation_bytes(box: int) -> int:
    """Peak bytes of the QC report's preparation, which runs beside the chunks on the coordinator."""
    return REPORT_PREPARATION_COPIES * report_example_bytes(box)


def report_bytes(particles: int, box: int) -> int:
    """Bytes the QC report needs at its peak for ``particles`` of ``box``² pixels: an upper bound of what was
    measured, which does not grow with the box beyond the examples' few images (see ``REPORT_FIXED_BYTES``)."""
    from ..report.sizes import DISPLAY_PIXELS_MOST, EXAMPLES_PER_HALF, SPECTRUM_BLOCK_BYTES, SPECTRUM_SAMPLE

    image = box * box * 4
    block = min(int(particles), SPECTRUM_SAMPLE, max(1, SPECTRUM_BLOCK_BYTES // image)) * image
    shown = min(box, DISPLAY_PIXELS_MOST)
    mosaic = 3 * 2 * EXAMPLES_PER_HALF * shown * shown  # input, model and result of each example
    return int(REPORT_FIXED_BYTES + REPORT_BLOCK_COPIES * block + REPORT_EXAMPLE_COPIES * report_example_bytes(box)
               + REPORT_DISPLAY_BYTES_PER_PIXEL * mosaic + REPORT_BYTES_PER_PARTICLE * int(particles))


def said(count: int, other: int) -> str:
    """``gigabytes(count)``, with two decimals where one would read as ``other`` does."""
    return gigabytes(count) if gigabytes(count) != gigabytes(other) else f"{count / GB:.2f} GB"


def drawing_library_bytes() -> int:
    """``DRAWING_LIBRARY_BYTES`` where matplotlib is not loaded yet, else 0."""
    import sys

    return 0 if "matplotlib" in sys.modules else DRAWING_LIBRARY_BYTES


def check_coordinator(plan: "MemoryPlan", particles: int, box: int) -> None:
    """Under an address-space limit (``ulimit -v``), refuse a run whose coordinator, this process, would not find
    room for its own peak: what it maps now, the threads it will start (a Dask client's too), the QC report's
    drawing library and the report itself (``report_bytes``), drawn after the last chunk.

    On ``threads``/``sync`` the tasks run here too and the prepared maps are still held while the report is
    drawn; the subtraction's own need is checked by ``check_this_machine``, with the drawing library counted.
    """
    limit = address_space_limit()
    if limit is None:
        return
    local = plan.scheduler in ("threads", "sync")
    mapped, held, report = coordinator_address_bytes(plan, particles, box)
    need = mapped + held + report
    if need > limit:
        # A local cluster's workers inherit the limit: the figure given must let them start too (``check_workers``).
        enough = max(need, local_worker_address_bytes(plan))
        raise NotEnoughMemoryError(
            f"this process (the coordinator{', which runs the tasks too' if local else ''}) needs about "
            f"{said(need, limit)} of address space: {gigabytes(mapped)} for its libraries and threads, "
            + (f"{gigabytes(held)} for the prepared maps, " if held else "")
            + f"{gigabytes(report)} for the QC report of {particles} particles of box "
            f"{box} drawn at the end, but the address-space limit (ulimit -v) is {said(limit, need)}."
            + limit_that_would_do(limit, enough - limit, "for it and for a local worker, which inherits the limit"
                                  if enough > need else ""))


def coordinator_address_bytes(plan: "MemoryPlan", particles: int, box: int, tasks: int | None = None,
                              ) -> tuple[int, int, int]:
    """(mapped, held, report): the address space this process, the coordinator, needs at its peak under an
    address-space limit (call only under one): what it maps now with the stacks and arenas of the threads still
    to start (a Dask client's too), the prepared maps it still holds on ``threads``/``sync`` on the CPU, and
    the QC report of ``particles`` images of ``box`` px with its drawing library. ``tasks``: tasks at once on
    ``threads``/``sync`` (default: the plan's)."""
    local = plan.scheduler in ("threads", "sync")
    tasks = (plan.need.threads if tasks is None else tasks) if local else 0
    threads_at_peak = run_threads(tasks) + (0 if local else DASK_CLIENT_THREADS)
    mapped = address_space_limit() - address_space_room(threads_at_peak)
    held = plan.prepared_bytes if local else 0
    return int(mapped), int(held), int(report_bytes(particles, box) + drawing_library_bytes())


def local_worker_address_bytes(plan: "MemoryPlan") -> int:
    """The address-space limit a worker of a local cluster needs to pass ``check_workers`` (0 on other
    schedulers), estimated before it starts: this process's mapped address space now (the same libraries and
    more: 0.46 GB against a worker's 0.34 GB at box 256 on 2 cores, 2026-11-30), with the stacks and arenas of
    a worker's threads, and the leanest worker's need beside its libraries (``plan.minimum``)."""
    if plan.scheduler != "local" or address_space_limit() is None:
        return 0
    mapped = address_space_limit() - address_space_room(run_threads(plan.minimum.threads))
    return int(mapped + plan.minimum.host_bytes - BASELINE_HOST_BYTES + worker_thread_allowance())


#: Threads a Dask worker may start after it has joined beside ``run_threads`` (its offload, communication and
#: profiling threads), whose stacks its address room at joining may not count yet: at box 256 on 2 cores a local
#: worker's room under the same limit varied by 40-50 MB between runs (2026-11-30), so a limit given with no
#: allowance (1.6 GB) was refused in turn, asking for 1.7 GB.
DASK_WORKER_THREADS = 6


def worker_thread_allowance() -> int:
    """Address space kept in a limit given to a Dask worker for ``DASK_WORKER_THREADS`` more threads' stacks."""
    return DASK_WORKER_THREADS * thread_stack_bytes()


# --- the plan made on the coordinator --------------------------------------------------------------

@dataclass
class MemoryPlan:
    """The estimate a run prints, and what it asks of batch jobs."""

    need: WorkerMemory
    minimum: WorkerMemory  # batches of one particle
    scheduler: str
    log_directory: str | None = None
    worker_limit: int | None = None  # the smallest memory limit a worker reported
    map_voxels: int = 0  # the cube maps of another box are brought through (``worker_memory``)
    padding: float | None = None  # the prepared maps' oversampling (None: unknown, so never suggested lower)
    gpu_possible: bool = False  # a GPU the run could use instead: visible here, or GPU jobs a batch system gives
    cpu_need: WorkerMemory | None = None  # an existing scheduler's workers with --device auto: if on the CPU
    room: int | None = None  # threads/sync: host bytes this process had left when planned (``host_memory_available``)
    prepared_bytes: int = 0  # threads/sync on the CPU: the prepared maps, held here while the QC report is drawn
    # threads/sync with more than one task at once: (tasks, host bytes at batches of one, room) for each fewer
    # number of tasks, the room read as ``room`` is (``room_for_tasks``); empty: not known
    fewer_tasks: tuple = ()

    def describe(self) -> str:
        """The estimate as the run prints it.

        An existing scheduler's (``tcp://``) workers are not known before they
        answer: neither their threads (the estimate is for one task at a time)
        nor, with ``--device auto``, whether they have a GPU, so the line gives
        a GPU worker's and a CPU worker's figures. Each worker is checked against
        its own device, memory limit and threads as it joins (``check_workers``).
        """
        if self.scheduler == "local" and self.need.batch > self.minimum.batch:
            # Its workers size their batches from their own room (``tasks.batch_size``), which the plan does not
            # know: under ``ulimit -v`` a run needing 2.1 GB here at box 256 finished under 1.7 GB of address space.
            return (f"{self.need.describe()}, or less where a worker has less room: it then takes smaller batches, "
                    f"down to about {gigabytes(self.minimum.host_bytes)} with batches of one particle")
        if not self.scheduler.startswith("tcp://"):
            return self.need.describe()
        on = [self.need] if self.cpu_need is None else [self.need, self.cpu_need]
        figures = ", or ".join(
            f"{gigabytes(need.host_bytes)} of host memory"
            + (f" and {gigabytes(need.gpu_bytes)} of GPU memory" if need.device == "gpu" else "")
            + (f" {'if it computes on a GPU' if need.device == 'gpu' else 'on its CPU alone'} (batches of {need.batch})"
               if self.cpu_need is not None else f" ({'on a GPU' if need.device == 'gpu' else 'no GPU'}, batches of "
                                                 f"{need.batch})")
            for need in on)
        return (f"each worker of the scheduler at {self.scheduler} needs about {figures}"
                f"{',' if self.cpu_need is not None else ''} for box {self.need.box}, "
                "with one task at a time; each is checked against its own device, memory limit and threads as "
                "it joins")

    @property
    def request_bytes(self) -> int:
        """Memory to ask of a batch job so the estimate stays below distributed's pause threshold."""
        return int(math.ceil(self.need.host_bytes / usable_fraction() / 1e8) * 1e8)


def planned_device(options) -> str:
    """The device the estimate is for; 'auto' is decided where it can be (a GPU here, or GPU jobs)."""
    spec = options.cluster
    if options.device != "auto":
        return options.device
    if spec.scheduler in ("threads", "sync"):
        from ..physics.backend import gpu_available

        return "gpu" if gpu_available() else "cpu"
    if spec.scheduler == "local":
        from ..cluster.gpus import visible_gpus

        return "gpu" if visible_gpus() else "cpu"
    if spec.scheduler in ("slurm", "pbs"):
        from ..cluster.start import gpus_per_job, worker_device

        declared = worker_device(spec)
        if declared != "auto":
            return declared
        return "gpu" if gpus_per_job(spec) > 0 else "cpu"
    return "gpu"  # an existing scheduler: each worker is checked once it answers


def tasks_per_worker(spec, device: str = "auto") -> int:
    """How many tasks one worker runs at once (threads); ``device``: where they compute (cpu, gpu, auto)."""
    if spec.scheduler == "sync":
        return 1
    if spec.scheduler == "threads":
        return threaded_scheduler_threads(dataclasses.replace(spec, device=device))
    if spec.scheduler == "local":
        from ..cluster.start import local_layout

        return local_layout(spec)[1]
    if spec.scheduler in ("slurm", "pbs"):
        cores = dask.config.get(f"jobqueue.{spec.scheduler}.cores", None) or 1
        processes = dask.config.get(f"jobqueue.{spec.scheduler}.processes", None) or 1
        return max(1, int(cores) // int(processes))
    return 1


def plan_memory(box: int, settings, options, map_voxels: int = 0) -> MemoryPlan:
    """The estimate for this run's workers (call with the cluster config applied); ``map_voxels`` as in ``worker_memory``."""
    spec = options.cluster
    device = planned_device(options)
    threads = tasks_per_worker(spec, device)
    chunk = options.chunk_size or 256  # unresolved (a script for any run): the default chunk
    batch = batch_cap(box, settings, device, threads, chunk)
    room, fewer_tasks = None, ()
    if spec.scheduler in ("threads", "sync"):  # the limit is known now: plan batches within it
        # Read once: the batches and the check (``check_this_machine``) are planned on the same figure.
        room = room_for_tasks(threads, box)
        fewer_tasks = tuple((tasks, worker_memory(box, settings, device, tasks, chunk, 1, map_voxels).host_bytes,
                             room_for_tasks(tasks, box)) for tasks in range(1, threads))
        budget = (gpu_memory_free() - prepared_map_bytes(box, settings, "gpu") if device == "gpu" else
                  room + BASELINE_HOST_BYTES - worker_memory(box, settings, "cpu", threads, chunk, 0, map_voxels).host_bytes)
        batch = batch_within(budget, box, settings, device, threads, chunk)
    log_directory = None
    if spec.scheduler in ("slurm", "pbs"):
        log_directory = os.path.abspath(dask.config.get(f"jobqueue.{spec.scheduler}.log-directory", None) or ".")
    cpu_need = None
    if spec.scheduler.startswith("tcp://") and options.device == "auto":  # a GPU or not: known as workers join
        cpu_need = worker_memory(box, settings, "cpu", threads, chunk, batch_cap(box, settings, "cpu", threads, chunk),
                                 map_voxels)
    return MemoryPlan(
        need=worker_memory(box, settings, device, threads, chunk, batch, map_voxels),
        minimum=worker_memory(box, settings, device, threads, chunk, 1, map_voxels),
        scheduler=spec.scheduler, log_directory=log_directory, map_voxels=int(map_voxels), cpu_need=cpu_need,
        padding=projector_kernel(settings.projector, settings.padding)[1],
        gpu_possible=device != "gpu" and gpu_possible(spec.scheduler),
        room=room,
        prepared_bytes=prepared_map_bytes(box, settings) if device == "cpu" and room is not None else 0,
        fewer_tasks=fewer_tasks,
    )


def room_for_tasks(tasks: int, box: int) -> int:
    """threads/sync: host bytes this process has left for ``tasks`` tasks at once (``host_memory_available``
    with their threads counted ahead), less the QC report's preparation, which reads its sample beside the
    chunks, and under an address-space limit its drawing library, loaded beside the maps' preparation."""
    room = host_memory_available(run_threads(tasks)) - report_preparation_bytes(box)
    if address_space_limit() is not None:
        room -= drawing_library_bytes()
    return max(0, room)


def gpu_possible(scheduler: str) -> bool:
    """Whether a run on ``scheduler`` could compute on a GPU: one visible here (``threads``, ``sync``,
    ``local``), or GPU jobs the batch system can give (``slurm``, ``pbs``); unknown (False) for the
    workers of a running scheduler."""
    if scheduler in ("threads", "sync", "local"):
        from ..physics.backend import gpu_available

        return gpu_available()
    return scheduler in ("slurm", "pbs")


def raise_limit(scheduler: str, workers: int) -> str:
    """How to give a worker of ``scheduler`` more memory (a sentence without its full stop)."""
    if scheduler == "local":  # LocalCluster shares this machine's memory among its workers
        fewer = " fewer --workers (each gets an equal share of this machine's memory)," if workers > 1 else ""
        return f"Use{fewer} --scheduler threads (no worker limit), or a machine with more memory"
    if scheduler in ("slurm", "pbs"):
        return "Raise 'memory' in the cluster config (or put fewer worker processes on each job)"
    return "Start the workers with a larger --memory-limit"


def remedies(need: WorkerMemory, plan: MemoryPlan, fewer_fits: int | None = None) -> list[str]:
    """What a user can change for a worker to need less memory than ``need`` (clauses, lower case).

    Only what applies: a lower ``--padding`` where the maps are oversampled
    above the default projector's 1.25 (``GRIDDING_OVERSAMPLING``, the leanest),
    fewer tasks at once where a worker runs more than one, a GPU where one could
    be used (``plan.gpu_possible``) and the run is not on one. May be empty.
    ``fewer_fits``: on threads/sync, the most tasks at once that would fit (0: none, so fewer tasks are not
    suggested; None: not known).
    """
    found = []
    if plan.padding is not None and plan.padding > GRIDDING_OVERSAMPLING + 1e-9:
        found.append(f"lower --padding (now {plan.padding:g}; the default projector's {GRIDDING_OVERSAMPLING:g} "
                     "is the leanest)")
    if need.threads > 1:
        if plan.scheduler in ("threads", "sync") and fewer_fits is None:
            found.append(f"use fewer --workers (tasks at once, now {need.threads})")
        elif plan.scheduler in ("threads", "sync") and fewer_fits:
            found.append(f"use --workers {fewer_fits} (tasks at once, now {need.threads})")
        elif plan.scheduler in ("slurm", "pbs"):
            found.append(f"run fewer tasks at once on each worker (now {need.threads}: give each worker process "
                         "fewer 'cores' in the cluster config)")
    if need.device != "gpu" and plan.gpu_possible:
        found.append("run on a GPU (--device gpu)")
    return found


def either(clauses: list[str]) -> str:
    """``a, or b, or c`` (empty for no clause)."""
    return ", or ".join(clauses)


def sentence(clause: str) -> str:
    return clause[:1].upper() + clause[1:]


def memory_granted() -> tuple[int, str]:
    """(bytes, why) of the memory this process may hold: the smallest of the machine's memory, its cgroup and
    ``RLIMIT_RSS`` caps (``memory_limit``) and its address-space limit (``ulimit -v``, ``RLIMIT_AS``)."""
    granted, why = memory_limit(), "this machine's memory or its cgroup's limit"
    soft = address_space_limit()
    if soft is not None and soft < granted:
        granted, why = soft, "the address-space limit (ulimit -v), which counts the libraries mapped too, and the stacks and malloc arenas of the threads the run will start"
    return int(granted), why


def nothing_leaner(need: WorkerMemory, plan: MemoryPlan) -> str:
    """The sentence for a run with nothing left to make leaner (``need``: its minimum): what it needs, where to run it."""
    padding = f"padding {plan.padding:g}, " if plan.padding is not None else ""
    gpu = f" and {gigabytes(need.gpu_bytes)} of GPU memory" if need.device == "gpu" else ""
    return (f"Nothing in this run can be made leaner ({padding}{need.threads} task(s) at once, batches of "
            f"{need.batch}): run it where a worker gets at least {gigabytes(need.host_bytes)} of host memory{gpu}")


def check_this_machine(plan: MemoryPlan, particles: int = 0, report_box: int = 0) -> None:
    """threads/sync: refuse when this machine's free memory (or free GPU memory) cannot hold the minimum.

    Fewer tasks at once are suggested only where that alone makes the run fit
    (``plan.fewer_tasks``). Where the address-space limit (``ulimit -v``) binds,
    the line gives the limit that would do, for the run as asked and (where fewer
    tasks alone would not do) for one task at a time; with ``particles`` (the QC
    report's, of ``report_box`` px) each figure covers the coordinator's own
    check too (``check_coordinator``), so that following it once lets the run start.
    """
    need = plan.minimum
    if need.device == "gpu":
        free = gpu_memory_free()
        if need.gpu_bytes > free:
            raise NotEnoughMemoryError(
                f"{need.describe()}, but the GPU has {gigabytes(free)} free. "
                f"{sentence(either([*remedies(need, plan), 'use a GPU with more memory']))}.")
    # The figure the batches were planned on (``plan_memory``), so a run let through has batches that fit it.
    room = (plan.room if plan.room is not None else host_memory_available(run_threads(need.threads))) + BASELINE_HOST_BYTES
    if need.host_bytes > room:
        granted, why = memory_granted()
        fitting = [tasks for tasks, host, left in plan.fewer_tasks if host <= left + BASELINE_HOST_BYTES]
        fixes = remedies(need, plan, max(fitting, default=0) if plan.fewer_tasks else None)
        available = gigabytes(room) if gigabytes(room) != gigabytes(need.host_bytes) else f"{room / GB:.2f} GB"
        if fixes:
            advice = sentence(either(fixes))
        elif plan.fewer_tasks:  # more than one task at once, and one alone would not fit either
            _, one_task, _ = plan.fewer_tasks[0]
            advice = (f"Fewer --workers alone would not make it fit: with --workers 1 it needs about "
                      f"{gigabytes(one_task)} of host memory")
        else:
            advice = nothing_leaner(need, plan)
        raise NotEnoughMemoryError(
            f"{need.describe()}, but this machine has {available} available to dsub (of {gigabytes(granted)} "
            f"under {why}). {advice}." + limits_that_would_do_here(plan, need.host_bytes - room, fitting,
                                                                    particles, report_box or need.box))


def limits_that_would_do_here(plan: MemoryPlan, short: int, fitting: list[int], particles: int, box: int) -> str:
    """threads/sync, where the address-space limit binds: the limit that would do for the run as asked (``short``
    bytes more, and at least the coordinator's own need, ``coordinator_address_bytes``) and, where fewer tasks
    alone would not do, for one task at a time; else ""."""
    limit = address_space_limit()
    if limit is None or memory_granted()[0] != limit:
        return ""

    def needed(tasks: int, short: int) -> int:
        coordinator = sum(coordinator_address_bytes(plan, particles, box, tasks)) if particles else 0
        return max(limit + short, coordinator)

    as_asked = enough_limit(needed(plan.minimum.threads, short))
    said_now = f" Under the address-space limit, {as_asked}"
    if plan.fewer_tasks and not fitting:
        tasks, host, left = plan.fewer_tasks[0]
        leaner = enough_limit(needed(tasks, host - BASELINE_HOST_BYTES - left))
        if leaner != as_asked:
            said_now += f"; with --workers 1, {leaner}"
    return said_now + "."


def limit_that_would_do(limit: int | None, short: int, why: str = "") -> str:
    """The address-space limit that would leave ``short`` bytes more than ``limit``, rounded up to 0.1 GB, as a
    sentence ("" without a limit); ``why``: a clause saying what it covers."""
    if not limit:
        return ""
    return f" Under the address-space limit, {enough_limit(limit + short)}{' ' + why if why else ''}."


def enough_limit(needed: int) -> str:
    """``about 1.7 GB would do ('ulimit -v 1660156')``: ``needed`` bytes rounded up to 0.1 GB, in KiB for ulimit."""
    enough = int(math.ceil(needed / (GB / 10)) * (GB / 10))
    return f"about {gigabytes(enough)} would do ('ulimit -v {enough // 1024}')"


def address_limit_that_would_do(short: int, binding_only: bool = True) -> str:
    """Where the address-space limit (``ulimit -v``) is what leaves ``short`` bytes too few: the limit that
    would do, rounded up to 0.1 GB, as a sentence (else ""). ``binding_only``: say it only where that limit is
    below this machine's memory (what ``memory_granted`` gives); False: wherever there is one."""
    limit = address_space_limit()
    if limit is None or (binding_only and memory_granted()[0] != limit):  # not the limit that binds
        return ""
    return limit_that_would_do(limit, short)


def check_workers(plan: MemoryPlan, capacities: dict, box: int, settings, chunk_size: int) -> None:
    """Distributed runs: refuse when a worker's memory limit or free GPU memory cannot hold the minimum.

    The minimum is one particle per batch, with the maps' preparation (through
    ``plan.map_voxels``³ when the maps have another box) as the run will do it.
    A worker under an address-space limit (``ulimit -v``, which a local
    cluster's workers inherit while their Dask memory limit is the machine's
    share) must also have room for it beside what it has mapped already
    (``worker_capacity``'s ``address_room``).
    """
    fraction = usable_fraction()
    limits = [c["host_limit"] for c in capacities.values() if c.get("host_limit")]
    plan.worker_limit = min(limits) if limits else None
    for address, capacity in sorted(capacities.items()):
        if capacity["device"] == "none":
            raise NotEnoughMemoryError(f"worker {address} has no GPU, but --device gpu was asked for. "
                                       "Check the GPU request of the worker jobs (dsub job-script).")
        need = worker_memory(box, settings, capacity["device"], capacity["threads"], chunk_size, 1, plan.map_voxels)
        limit = capacity.get("host_limit")
        if limit and need.host_bytes > limit * fraction:
            raise NotEnoughMemoryError(
                f"{need.describe()}, but worker {address} has a memory limit of "
                f"{gigabytes(limit)} (Dask pauses it at {fraction:.0%} of that). {raise_limit(plan.scheduler, len(capacities))}"
                + "".join(f"; or {fix}" for fix in remedies(need, plan)) + ".")
        room = capacity.get("address_room")
        if room is not None and need.host_bytes - BASELINE_HOST_BYTES > room:  # its libraries are mapped already
            raise NotEnoughMemoryError(
                f"{need.describe()}, but worker {address} has "
                f"{gigabytes(max(0, room))} of address space left under its address-space limit (ulimit -v, "
                f"{gigabytes(capacity['address_limit'])}, which counts the libraries and thread stacks mapped too). "
                "Raise the limit ('ulimit -v') for the command that starts the workers"
                + "".join(f"; or {fix}" for fix in remedies(need, plan)) + "."
                + limit_that_would_do(capacity["address_limit"],
                                      need.host_bytes - BASELINE_HOST_BYTES - room + worker_thread_allowance()))
        free = capacity.get("gpu_free")
        if capacity["device"] == "gpu" and free is not None and need.gpu_bytes > free:
            raise NotEnoughMemoryError(
                f"{need.describe()}, but worker {address}'s GPU has {gigabytes(free)} free. "
                f"{sentence(either([*remedies(need, plan), 'use GPUs with more memory']))}.")


# --- failures after the start ------------------------------------------------------------------------

def where_logs_are(plan: MemoryPlan) -> str:
    if plan.scheduler in ("slurm", "pbs"):
        return f"Worker logs: {plan.log_directory}."
    if plan.scheduler == "local":
        return "Local workers keep no log files: rerun with --scheduler threads to see the failure here."
    return "Worker logs: wherever that scheduler's workers write them."


def memory_figures(plan: MemoryPlan) -> str:
    need = plan.need
    had = f"each worker had {gigabytes(plan.worker_limit)}" if plan.worker_limit else "the worker's limit is unknown"
    gpu = f" and {gigabytes(need.gpu_bytes)} of GPU memory" if need.device == "gpu" else ""
    return f"{had}; the estimate needs about {gigabytes(need.host_bytes)} of host memory{gpu} for box {need.box}"


def killed_worker_error(exc, plan: MemoryPlan) -> WorkerLostError:
    """One line for distributed's KilledWorker: which task, the likely cause and where the logs are."""
    task = getattr(exc, "task", None) or (exc.args[0] if exc.args else "a task")
    tries = getattr(exc, "allowed_failures", None)
    times = f" {tries + 1} time(s)" if isinstance(tries, int) else ""
    tight = plan.worker_limit is not None and plan.need.host_bytes > plan.worker_limit * usable_fraction()
    cause = ("the memory limit (" + memory_figures(plan) + ")" if tight or plan.worker_limit is None else
             "a lost node or a preempted or expired job, or the memory limit (" + memory_figures(plan) + ")")
    return WorkerLostError(
        f"the workers running {task} died{times}, so Dask gave up on it. Likely cause: {cause}. "
        f"{where_logs_are(plan)} Finished chunks are kept: fix the cause (e.g. raise 'memory' in the cluster "
        "config) and rerun the same command to resume.")


def workers_lost_error(plan: MemoryPlan, waited: float) -> WorkerLostError:
    """One line when every worker is gone and none came back."""
    return WorkerLostError(
        f"every Dask worker was lost and none came back within {waited:.0f} s. Likely cause: the worker jobs were "
        f"preempted, hit their walltime or a node failed, or the memory limit ({memory_figures(plan)}). "
        f"{where_logs_are(plan)} Finished chunks are kept: rerun the same command to resume.")


def out_of_memory_error(exc: BaseException, plan: MemoryPlan, where=None) -> NotEnoughMemoryError:
    """One line for running out of memory: the estimate, what the run could change, or else what it got against
    what it needs.

    ``where``: the worker and task it happened on (``runner.FailedOn``), named
    first where known; ``exc`` a ``MemoryError``, or any failure
    ``errors.out_of_memory`` counts (an ``ENOMEM``, a refused thread, a library
    with no room) raised on a worker.
    """
    said = " ".join(str(exc).split())
    fixes = remedies(plan.need, plan)
    if fixes:
        advice = sentence(either(fixes))
    else:
        if plan.scheduler in ("threads", "sync"):
            granted, why = memory_granted()
            got = f"; this one got {gigabytes(granted)}, under {why}"
        else:
            got = f"; each worker had {gigabytes(plan.worker_limit)}" if plan.worker_limit else ""
        advice = nothing_leaner(plan.minimum, plan) + got
    happened = where.happened("ran out of memory") if where is not None else "out of memory"
    return NotEnoughMemoryError(
        f"{happened} ({said or type(exc).__name__}): {plan.need.describe()}. {advice}. "
        "Finished chunks are kept: rerun the same command to resume.")


@contextlib.contextmanager
def failures_explained(plan: MemoryPlan):
    """Turn MemoryError and distributed's KilledWorker, wherever raised, into one-line dsub errors.

    A worker's task that ran out of memory (any failure ``errors.out_of_memory``
    counts, a ``MemoryError`` or an ``ENOMEM`` alike) is named in the line: the
    worker's address and the task (``subtract-chunk-00012``), as ``runner.failed_on``
    found them.
    """
    try:
        yield
    except DsubError:
        raise
    except MemoryError as exc:  # NumPy, and CuPy's OutOfMemoryError
        raise out_of_memory_error(exc, plan, getattr(exc, "failed_on", None)) from exc
    except WorkersLost as exc:
        raise workers_lost_error(plan, exc.waited) from exc
    except Exception as exc:
        where = getattr(exc, "failed_on", None)  # set where a worker's task raised it (``runner.failed_on``)
        if where is not None and out_of_memory(exc):
            raise out_of_memory_error(exc, plan, where) from exc
        if type(exc).__name__ == "KilledWorker":  # distributed.scheduler.KilledWorker, without importing it
            raise killed_worker_error(exc, plan) from exc
        raise
