#!/usr/bin/env python
"""CPU throughput of the physics on one core: particles per CPU-second, map preparation apart.

Times ``subtract_batch`` (model of the full and masked maps, contrast fit, subtraction) with
NumPy in this process, in CPU seconds of the process (``time.process_time``, so other load on the
machine does not count; run with OMP_NUM_THREADS=1 so that one core is used).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_throughput.py [--boxes 128 256] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_throughput import scene  # noqa: E402

from dsub.physics.memory import prepared_map_bytes  # noqa: E402
from dsub.physics.subtract import SubtractionSettings, prepare_half_map, subtract_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| box | projector | prepare one half-map (CPU s) | particles per CPU-second | prepared maps, both half sets (GB) |")
    print("|---|---|---|---|---|")
    for box in args.boxes:
        for projector in ("gridding", "relion"):
            settings = SubtractionSettings(projector=projector)
            volume, mask, images, table = scene(box, args.batch, rng)
            started = time.process_time()
            model = prepare_half_map(np, volume, mask, settings)
            prepare_s = time.process_time() - started
            started = time.process_time()
            subtract_batch(np, images, table, model, settings)
            rate = args.batch / (time.process_time() - started)
            print(f"| {box} | {projector} | {prepare_s:.2f} | {rate:.1f} | {prepared_map_bytes(box, settings) / 1e9:.2f} |")


if __name__ == "__main__":
    main()
