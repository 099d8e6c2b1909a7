#!/usr/bin/env python
"""CPU throughput of the physics on one core: set-up, particles per CPU-second, and where the time goes.

Set-up is what each worker does once per run: the two half maps' FSC and, per half set, the
Wiener-filtered whole map and the masked map prepared for projection (four ``prepare_volume``).
The rate times ``subtract_batch`` (model of the full and masked maps, contrast fit, subtraction)
after one warm-up batch (which compiles the slice kernel where numba is installed). Everything
is NumPy in this process, timed in CPU seconds of the process (``time.process_time``, so other
load on the machine does not count); run with OMP_NUM_THREADS=1 so that one core is used.

The stage breakdown wraps the functions ``dsub.physics.subtract`` calls (slice gather, FFTs,
transfer, contrast fit), so it follows whatever flow ``model_images`` has; each stage's time
excludes the wrapped calls inside it (the extraction field's FFTs exclude the transfer they
call); "rest" is the arithmetic between them (crops, the subtraction itself).

``--threads 2`` also runs batches in one thread, then in two at once (as a worker with two task
slots does), and prints the rate each would have on cores of its own (each thread's wall time
less its wait for a core, from Linux's schedstat, since other jobs may share the machine) and the
share of time a thread was blocked (on the GIL or a lock): two threads add up when that is ~0.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_throughput.py [--boxes 128 256] [--particles 32] [--batch N]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import scene  # noqa: E402

from dsub.physics import fsc, projector, subtract  # noqa: E402
from dsub.physics.memory import prepared_map_bytes  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch  # noqa: E402
from dsub.workflow.resources import batch_cap  # noqa: E402

#: (module, function name, stage): what the breakdown times. Nested calls count in the outer stage only.
STAGES = [
    (subtract, "extract_slices", "slice gather"),
    (subtract, "extract_slices_of", "slice gather"),
    (subtract.ParticleTransfer, "multiply", "transfer (CTF, shift)"),
    (subtract, "spectra_to_images", "FFT (inverse)"),
    (subtract, "image_spectra", "FFT (forward)"),
    (subtract, "_extract_in_field_numpy", "field FFTs"),
    (subtract, "pad_images", "pad to field"),
    (subtract, "particle_ctfs", "CTF arrays"),
    (subtract, "premultiplied_ctfs", "CTF arrays"),
    (subtract, "shift_phases", "phase arrays"),
    (subtract, "fit_contrast", "contrast fit"),
    (subtract, "fit_spectra", "contrast fit"),
    (subtract, "wiener_filter", "Wiener filter"),
    (subtract, "prepare_volumes", "prepare_volume"),
]


class StageClock:
    """CPU seconds spent in each wrapped function, less what wrapped functions inside it took (per thread)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.local = threading.local()

    def wrap(self, function, stage):
        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("inner", [])
            stack.append(0.0)
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.process_time() - started
                self.seconds[stage] += elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed

        return timed

    @contextmanager
    def installed(self):
        saved = [(module, name, getattr(module, name)) for module, name, _ in STAGES if hasattr(module, name)]
        for module, name, stage in STAGES:
            if hasattr(module, name):
                setattr(module, name, self.wrap(getattr(module, name), stage))
        try:
            yield self
        finally:
            for module, name, function in saved:
                setattr(module, name, function)


def half_maps(box, rng):
    """Two half maps (signal plus independent noise), the mask, noise images and their particle table."""
    volume, mask, images, table = scene(box, 1, rng)
    noise = 0.3 * float(volume.std())
    halves = [(volume + rng.normal(0, noise, volume.shape)).astype(np.float32) for _ in range(2)]
    return halves, mask


def set_up(halves, mask, settings, clock):
    """Both half sets' models as a worker prepares them; CPU seconds of the FSC, of all, and of all in
    the kernel (system time: mostly first-touch page faults of fresh memory, which vary with what
    else the machine holds)."""
    started, kernel = time.process_time(), os.times().system
    curve = fsc.fourier_shell_correlation(np, halves[0], halves[1], 1.0)
    fsc_s = time.process_time() - started
    with clock.installed():
        models = [prepare_half_map(np, half, mask, settings, curve, None) for half in halves]
    return models, fsc_s, time.process_time() - started, os.times().system - kernel


def in_batches(images, table, model, settings, batch):
    """``subtract_batch`` over ``images`` in batches of ``batch`` particles, as a task does."""
    for start in range(0, len(images), batch):
        rows = np.arange(start, min(start + batch, len(images)))
        subtract_batch(np, images[rows], table.subset(rows), model, settings)


def batch_rate(model, settings, box, particles, batch, rng, repeats, clock=None):
    """Particles per CPU-second of ``subtract_batch`` over ``particles`` particles in batches of ``batch`` (best
    of ``repeats``), after one warm-up batch."""
    _, _, images, table = scene(box, particles, rng)
    in_batches(images[:batch], table.subset(np.arange(batch)), model, settings, batch)
    best = 0.0
    for _ in range(repeats):
        started = time.process_time()
        if clock is None:
            in_batches(images, table, model, settings, batch)
        else:
            with clock.installed():
                in_batches(images, table, model, settings, batch)
        best = max(best, particles / (time.process_time() - started))
    return best, images, table


def thread_clock():
    """(wall, on-CPU, waiting for a core) seconds of the calling thread so far (Linux schedstat)."""
    on_cpu, waiting, _ = open(f"/proc/self/task/{threading.get_native_id()}/schedstat").read().split()
    return time.perf_counter(), int(on_cpu) / 1e9, int(waiting) / 1e9


def two_threads(model, settings, images, table, batch, rounds):
    """One thread, then two, each running over ``images`` ``rounds`` times in batches of ``batch``: rate on free
    cores and time blocked.

    This machine's cores may be busy with other jobs, so each thread's time waiting
    for a core (schedstat's run delay) is taken out of its wall time: the rate is
    particles / (slowest thread's wall - its wait for a core), what the run would
    take on cores of its own. "Blocked" is the rest of the wall time that the
    thread neither ran nor waited for a core: time on the GIL or a lock.
    """
    def run(threads):
        results = [None] * threads

        def work(slot):
            before = thread_clock()
            for _ in range(rounds):
                in_batches(images, table, model, settings, batch)
            after = thread_clock()
            wall, on_cpu, waiting = (b - a for a, b in zip(before, after))
            results[slot] = (wall - waiting, wall - on_cpu - waiting)

        workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        own_cores = max(result[0] for result in results)
        blocked = sum(result[1] for result in results) / sum(result[0] for result in results)
        return threads * rounds * len(images) / own_cores, blocked

    return run(1), run(2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--projectors", nargs="+", default=["gridding", "relion"])
    parser.add_argument("--particles", type=int, default=32, help="particles timed (each box and projector)")
    parser.add_argument("--batch", type=int, default=None,
                        help="particles a batch (default: the command's own, resources.batch_cap)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()
    from dsub.physics.projector import compiled_cpu_gather

    started = time.process_time()
    gather = compiled_cpu_gather()
    if gather is not None:  # import numba and load the kernel (compiled on the first run, then cached on disk)
        volume = projector.prepare_volume(np, np.ones((8, 8, 8), np.float32), *projector.projector_kernel("gridding"))
        gather(volume, np.eye(3)[None], "map", 8)
    print(f"slice gather: {'NumPy' if gather is None else 'numba'} (loaded in {time.process_time() - started:.2f} "
          f"CPU s); {args.particles} particles in batches of "
          f"{args.batch or 'the command’s own size (resources.batch_cap)'}")
    rows, breakdowns, scaling = [], [], []
    for box in args.boxes:
        for name in args.projectors:
            settings = SubtractionSettings(projector=name)
            batch = args.batch or batch_cap(box, settings, "cpu", 1, args.particles)
            rng = np.random.default_rng(0)
            halves, mask = half_maps(box, rng)
            setup_clock = StageClock()
            models, fsc_s, setup_s, system_s = set_up(halves, mask, settings, setup_clock)
            clock = StageClock()
            rate, images, table = batch_rate(models[0], settings, box, args.particles, batch, rng, args.repeats)
            batch_rate(models[0], settings, box, args.particles, batch, rng, 1, clock)
            rows.append(f"| {box} | {name} | {batch} | {setup_s:.2f} (system {system_s:.2f}; FSC {fsc_s:.2f}, Wiener "
                        f"{setup_clock.seconds['Wiener filter']:.2f}, prepare_volume ×4 "
                        f"{setup_clock.seconds['prepare_volume']:.2f}) | {rate:.1f} | "
                        f"{prepared_map_bytes(box, settings) / 1e9:.2f} |")
            total = sum(clock.seconds.values())
            stages = ", ".join(f"{stage} {1e3 * s / args.particles:.2f}" for stage, s in
                               sorted(clock.seconds.items(), key=lambda item: -item[1]))
            per_particle = 1e3 / rate
            breakdowns.append(f"| {box} | {name} | {per_particle:.2f} | {stages}, rest "
                              f"{max(per_particle - 1e3 * total / args.particles, 0):.2f} |")
            if args.threads == 2:
                (one, one_blocked), (two, two_blocked) = two_threads(models[0], settings, images, table, batch, 2)
                scaling.append(f"| {box} | {name} | {one:.1f} ({100 * one_blocked:.0f} %) | {two:.1f} "
                               f"({100 * two_blocked:.0f} %) | {two / one:.2f} |")
            del models
    print("\n| box | projector | batch | set-up, both half sets (CPU s) | particles per CPU-second "
          "| prepared maps (GB) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| box | projector | ms per particle | stages (ms per particle) |")
    print("|---|---|---|---|")
    print("\n".join(breakdowns))
    if scaling:
        print("\n| box | projector | 1 thread: particles/s on its own core (blocked) | 2 threads: particles/s "
              "on their own cores (blocked) | ratio |")
        print("|---|---|---|---|---|")
        print("\n".join(scaling))


if __name__ == "__main__":
    main()
