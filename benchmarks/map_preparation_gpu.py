"""Where a worker's map preparation time goes, on the device a run would use.

    python benchmarks/map_preparation_gpu.py [--box 256] [--device gpu] [--repeats 2] [--top 25]

Writes two half-maps and a mask of ``--box`` voxels (random values: the work
does not depend on them), then in this fresh process prepares them as a worker
does before its first chunk (``tasks.half_map_models``: read the maps, the
mask's clip, the FSC, both half-maps whole and masked), ``--repeats`` times
with a new key each time (the first also loads CuPy's kernels and makes cuFFT's
plans). Prints each round's wall time, then cProfile's functions by cumulative
time for the first and the last round.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsub.formats.mrc import write_map  # noqa: E402
from dsub.physics.subtract import SubtractionSettings  # noqa: E402
from dsub.workflow import tasks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name in ("half_a", "half_b", "mask"):
            paths[name] = str(Path(folder) / f"{name}.mrc")
            volume = rng.random((args.box,) * 3, dtype=np.float32)
            write_map(paths[name], volume, 1.0)
        sync = (lambda: __import__("cupy").cuda.Device().synchronize()) if args.device == "gpu" else (lambda: None)
        for round_number in range(args.repeats):
            maps = tasks.MapFiles(paths["half_a"], paths["half_b"], paths["mask"],
                                  pixel_size_angstrom=1.0 + 1e-6 * round_number)  # a new key each round
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            tasks.half_map_models(maps, SubtractionSettings(), args.device)
            sync()
            profiler.disable()
            print(f"round {round_number + 1}: {time.perf_counter() - started:.3f} s")
            if round_number in (0, args.repeats - 1):
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
                print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
