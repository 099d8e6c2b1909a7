"""Where one chunk's time goes: read, prepare maps, subtract, write to Zarr, export.

    python benchmarks/chunk_profile.py [--particles 2048] [--box 256] [--chunk-size 256] [--device gpu]

Times each step of a task separately on a dataset of noise images (see
multi_gpu.py), so the end-to-end figures can be explained.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu import write_dataset  # noqa: E402

from dsub.formats import read_particles  # noqa: E402
from dsub.formats.mrc import read_images  # noqa: E402
from dsub.physics.backend import get_xp  # noqa: E402
from dsub.physics.subtract import SubtractionSettings  # noqa: E402
from dsub.workflow import export, store  # noqa: E402
from dsub.workflow.tasks import MapFiles, half_map_models, subtract_particles  # noqa: E402


def synchronize(device):
    if device == "gpu":
        get_xp("gpu").cuda.Device().synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="gpu")
    args = parser.parse_args()
    settings = SubtractionSettings()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = write_dataset(folder, args.particles, args.box)
        table = read_particles(paths["star"])
        maps = MapFiles(str(paths["half_a"]), str(paths["half_b"]), str(paths["mask"]))
        started = time.perf_counter()
        models = half_map_models(maps, settings, args.device)
        synchronize(args.device)
        print(f"prepare both half-maps (4 volumes, padding {settings.padding}): {time.perf_counter() - started:.2f} s")
        store_path = folder / "s.zarr"
        store.create_store(store_path, len(table), args.box, args.chunk_size, {})
        steps = {"read": [], "subtract": [], "write": []}
        for index, (start, stop) in enumerate(store.chunk_bounds(len(table), args.chunk_size)):
            chunk = table.subset(np.arange(start, stop))
            t0 = time.perf_counter()
            images = read_images(chunk.image_paths, chunk.image_indices)
            t1 = time.perf_counter()
            subtracted, contrast = subtract_particles(images, chunk, models, settings, args.device)
            t2 = time.perf_counter()
            store.write_chunk(store_path, index, start, subtracted, contrast)
            t3 = time.perf_counter()
            if index:  # the first chunk pays for FFT plans and kernel compilation
                steps["read"].append(t1 - t0)
                steps["subtract"].append(t2 - t1)
                steps["write"].append(t3 - t2)
        per_chunk = {step: float(np.median(values)) for step, values in steps.items()}
        t0 = time.perf_counter()
        export.write_stack_from_store(store_path, folder, "Particles/x.mrcs", 0, len(table), 1.0)
        export_s = time.perf_counter() - t0
        megabytes = args.chunk_size * args.box * args.box * 4 / 2**20
        print(f"per chunk of {args.chunk_size} particles ({megabytes:.0f} MiB), median:")
        for step, seconds in per_chunk.items():
            print(f"  {step:9s} {seconds * 1e3:8.1f} ms  ({args.chunk_size / seconds:,.0f} particles/s)")
        print(f"export one stack of {len(table)}: {export_s:.2f} s ({len(table) / export_s:,.0f} particles/s)")


if __name__ == "__main__":
    main()
