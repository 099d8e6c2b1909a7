"""Time and peak memory of preparing one half-map (whole and masked) on the CPU, per box size.

The progress display's estimate (``dsub.cluster.progress.map_preparation_estimate``)
uses, for the padded grid's part, the constant printed here: seconds per padded voxel × log2(padded
voxels) (beside a term for the maps at the particles' box).

    python benchmarks/map_preparation.py --boxes 64 96 128 --padding 3
"""

import argparse
import math
import time
import tracemalloc

import numpy as np

from dsub.physics.subtract import SubtractionSettings, prepare_half_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--padding", type=int, default=3)
    args = parser.parse_args()
    settings = SubtractionSettings(padding=args.padding)
    print("box  seconds  peak MiB  s/(n log2 n)  peak bytes/n   (n = padded voxels, one half-map)")
    for box in args.boxes:
        half_map = np.random.default_rng(0).standard_normal((box,) * 3).astype(np.float32)
        mask = np.full_like(half_map, 0.5)
        tracemalloc.start()
        started = time.perf_counter()
        prepare_half_map(np, half_map, mask, settings)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        voxels = float(box * args.padding) ** 3
        print(f"{box:4d} {seconds:8.2f} {peak / 2**20:9.0f} {seconds / (voxels * math.log2(voxels)):13.2e} "
              f"{peak / voxels:12.1f}")


if __name__ == "__main__":
    main()
