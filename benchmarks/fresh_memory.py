"""What the CPU path's map preparation costs on memory the machine hands over fresh, and on memory it has touched.

    python benchmarks/fresh_memory.py [--box 256] [--projector relion] [--repeats 2]

In one process, alternately: touch an array of the size of one half set's two
prepared maps (zeros, then every element written: the kernel hands the pages
over), and prepare one half set's two maps as a worker does
(``projector.prepare_volumes``). Prints each step's wall, user and system CPU
seconds and minor page faults. On a virtual machine whose host backs guest
memory when it is first touched, the first touch of fresh memory costs system
time that a second touch of the same amount does not; the preparation's own
work is what is left once the memory has been touched (issue 8's CPU set-up
target against RELION's 4.9 s).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsub.physics.projector import prepare_volumes, prepared_shape, projector_kernel  # noqa: E402


def usage():
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), own.ru_utime, own.ru_stime, own.ru_minflt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--projector", default="relion", choices=("relion", "gridding"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    kernel, oversampling = projector_kernel(args.projector)
    volume = np.random.default_rng(0).normal(size=(args.box,) * 3).astype(np.float32)
    shape = prepared_shape(args.box, kernel, oversampling) + (2,)
    gigabytes = np.prod(shape) * 8 / 1e9
    print(f"box {args.box}, {args.projector}: one half set's two prepared maps {gigabytes:.2f} GB")
    print("| step | wall s | user s | system s | minor faults |")
    print("|---|---|---|---|---|")
    for _ in range(args.repeats):
        for step in ("touch fresh memory", "prepare two maps"):
            before = usage()
            if step == "touch fresh memory":
                array = np.zeros(shape, dtype=np.complex64)
                array[...] = 1
            else:
                array = prepare_volumes(np, [volume, volume], kernel, oversampling)
            del array
            after = usage()
            wall, user, system, faults = (b - a for a, b in zip(before, after))
            print(f"| {step} | {wall:.2f} | {user:.2f} | {system:.2f} | {faults} |", flush=True)


if __name__ == "__main__":
    main()
