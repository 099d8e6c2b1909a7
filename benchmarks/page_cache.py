"""How the host's page cache takes writes and gives reads from one process and from several.

    python benchmarks/page_cache.py [--gigabytes 8] [--processes 1 2 4] [--piece-mb 64] [--folder /tmp]

Each run moves the same total of bytes: with P processes, each writes its own
file of total/P bytes in pieces of ``--piece-mb`` MB (one ``pwrite`` a piece from
one buffer, as dsub's tasks write their stacks), then every file is read back
from the cache the same way (``preadv`` into one buffer), then copied piece by
piece into a new file each (read a piece, write it: a task's I/O). Files are deleted and
the disk synced before each run, so no run meets an earlier run's dirty pages.
Prints the aggregate rates and each one's ratio to one process: what a second
GPU worker on the same host can gain in the parts of a run that read images
from the cache and write stacks into it (issue 11's two-GPU account).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


#: Page-locked (CUDA pinned) buffers instead of ordinary memory, as dsub's GPU tasks use (``--pinned``).
PINNED = False


def _buffer(piece: int) -> np.ndarray:
    if PINNED:
        import cupyx

        return cupyx.empty_pinned((piece,), dtype=np.uint8)
    return np.empty(piece, dtype=np.uint8)


def _write(path: str, size: int, piece: int, start, done):
    buffer = _buffer(piece)
    buffer[:] = np.random.default_rng(0).integers(0, 255, piece, dtype=np.uint8)
    start.wait()
    began = time.perf_counter()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, piece):
            os.pwrite(descriptor, memoryview(buffer)[: min(piece, size - offset)], offset)
    finally:
        os.close(descriptor)
    done.put(time.perf_counter() - began)


def _read(path: str, size: int, piece: int, start, done):
    buffer = _buffer(piece)
    start.wait()
    began = time.perf_counter()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, size, piece):
            os.preadv(descriptor, [memoryview(buffer)[: min(piece, size - offset)]], offset)
    finally:
        os.close(descriptor)
    done.put(time.perf_counter() - began)


def _copy(path: str, size: int, piece: int, start, done):
    """Read a piece of ``path`` (cached) and write it to ``path + '.out'``, piece after piece: a task's I/O."""
    buffer = _buffer(piece)
    start.wait()
    began = time.perf_counter()
    source = os.open(path, os.O_RDONLY)
    target = os.open(path + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, piece):
            view = memoryview(buffer)[: min(piece, size - offset)]
            os.preadv(source, [view], offset)
            os.pwrite(target, view, offset)
    finally:
        os.close(source)
        os.close(target)
    done.put(time.perf_counter() - began)


def timed_run(function, paths, size: int, piece: int, threads: bool = False) -> float:
    """Wall seconds from a common start until every process (or thread of this process) has moved its
    ``size`` bytes."""
    if threads:
        start, done = threading.Barrier(len(paths) + 1), queue.Queue()
        workers = [threading.Thread(target=function, args=(str(path), size, piece, start, done)) for path in paths]
    else:
        context = multiprocessing.get_context("fork")
        start, done = context.Barrier(len(paths) + 1), context.Queue()
        workers = [context.Process(target=function, args=(str(path), size, piece, start, done)) for path in paths]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - began
    if done.qsize() != len(paths):
        raise SystemExit("a writer or reader failed")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=8.0, help="bytes moved by each run, all processes together")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--piece-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--pinned", action="store_true", help="CUDA page-locked buffers (needs CuPy), as dsub's GPU tasks")
    parser.add_argument("--threads", action="store_true",
                        help="threads of one process instead of processes (as a worker's task threads)")
    args = parser.parse_args()
    global PINNED
    PINNED = args.pinned
    total, piece = int(args.gigabytes * 2**30), args.piece_mb * 2**20
    print(f"{args.gigabytes:g} GiB a run in pieces of {args.piece_mb} MiB; {os.cpu_count()} cores; "
          f"{'threads of one process' if args.threads else 'processes'}{', pinned buffers' if args.pinned else ''}")
    print("| writers | write GB/s | × one | read GB/s (cache) | × one | read + write GB/s (each way) | × one |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="page-cache-") as folder:
        first = None
        for _ in range(args.repeats):
            for count in args.processes:
                paths = [Path(folder) / f"part{i}.bin" for i in range(count)]
                size = total // count
                for path in paths:
                    path.unlink(missing_ok=True)
                os.sync()
                write = timed_run(_write, paths, size, piece, args.threads)
                read = timed_run(_read, paths, size, piece, args.threads)
                os.sync()
                copy = timed_run(_copy, paths, size, piece, args.threads)
                rates = (size * count / write / 1e9, size * count / read / 1e9, size * count / copy / 1e9)
                first = rates if first is None else first
                print(f"| {count} | {rates[0]:.2f} | {rates[0] / first[0]:.2f} | {rates[1]:.2f} | "
                      f"{rates[1] / first[1]:.2f} | {rates[2]:.2f} | {rates[2] / first[2]:.2f} |", flush=True)
                for path in paths:
                    path.unlink()
                    Path(str(path) + ".out").unlink()
                os.sync()


if __name__ == "__main__":
    main()
