"""Page-cache write throughput with 1 and 2 writing processes: what output can a second GPU worker add?

    python benchmarks/write_scaling.py [--gigabytes 8] [--piece-mb 64] [--folder /tmp] [--processes 1 2 1 2]

Each process writes its share of ``--gigabytes`` into its own files, one ``os.pwrite`` of
``--piece-mb`` per piece from one reused buffer, as dsub's tasks write their stacks
(``export.write_pieces``): a file of 256 pieces (a stack) at a time, files opened as the tasks
do. The same bytes in total whatever the process count, so GB/s compare directly; the files are
deleted and the disk synced between runs (no run is throttled by an earlier one's dirty pages).
Timed from the moment every process has started until the last one has written its share.
With ``--threads T`` each process writes from T threads at once (each into its own file).
``--direct`` writes with ``O_DIRECT`` from page-aligned buffers (no page cache: disk speed).
Prints one table row per run: processes, threads, seconds, GB/s, GB/s per process.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def write_files(folder: str, name: str, total_bytes: int, piece_bytes: int, direct: bool) -> None:
    """Write ``total_bytes`` as files of 256 pieces under ``folder``, each piece one pwrite."""
    buffer = mmap.mmap(-1, piece_bytes)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(1 << 20) * (piece_bytes >> 20))
    view = memoryview(buffer)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0)
    pieces_left, stack = total_bytes // piece_bytes, 0
    while pieces_left > 0:
        fd = os.open(os.path.join(folder, f"{name}-{stack}.mrcs"), flags, 0o644)
        try:
            for piece in range(min(256, pieces_left)):
                offset = piece * piece_bytes
                written = 0
                while written < piece_bytes:
                    written += os.pwrite(fd, view[written:], offset + written)
            pieces_left -= min(256, pieces_left)
        finally:
            os.close(fd)
        stack += 1


def one_process(folder: str, index: int, total_bytes: int, piece_bytes: int, threads: int, direct: bool,
                start, times) -> None:
    share = total_bytes // threads
    start.wait()  # every process has started: the writes begin together
    began = time.perf_counter()  # CLOCK_MONOTONIC: comparable between processes
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(write_files, folder, f"p{index}t{t}", share, piece_bytes, direct)
                       for t in range(threads)]:
            future.result()
    times.put((began, time.perf_counter()))


def run(folder: Path, processes: int, threads: int, total_bytes: int, piece_bytes: int, direct: bool) -> float:
    """Seconds for ``processes`` processes to write ``total_bytes`` between them."""
    target = Path(tempfile.mkdtemp(dir=folder, prefix="write-scaling-"))
    context = multiprocessing.get_context("spawn")
    start, times = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=one_process, args=(str(target), i, total_bytes // processes, piece_bytes,
                                                         threads, direct, start, times)) for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(worker.exitcode for worker in workers):
        raise SystemExit(f"a writer failed (exit codes {[w.exitcode for w in workers]})")
    spans = [times.get() for _ in workers]
    seconds = max(end for _, end in spans) - min(began for began, _ in spans)
    shutil.rmtree(target)
    os.sync()
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=8.0)
    parser.add_argument("--piece-mb", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--direct", action="store_true", help="O_DIRECT writes (no page cache)")
    args = parser.parse_args()
    piece = args.piece_mb << 20
    total = int(args.gigabytes * 2**30) // piece * piece
    print(f"{total / 1e9:.1f} GB in pieces of {args.piece_mb} MiB to {args.folder}"
          f"{' with O_DIRECT' if args.direct else ' (page cache)'}; {os.cpu_count()} cores")
    print("| processes | threads each | s | GB/s | GB/s per process |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        for processes in args.processes:
            seconds = run(args.folder, processes, threads, total, piece, args.direct)
            print(f"| {processes} | {threads} | {seconds:.2f} | {total / seconds / 1e9:.2f} | "
                  f"{total / seconds / 1e9 / processes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
