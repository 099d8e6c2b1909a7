"""Whole pipeline on the GPU vs on the CPU, on the demo dataset.

    python benchmarks/gpu_pipeline_check.py [--particles 300] [--box 64]

Runs ``dsub subtract`` twice on one simulated dataset (``--device gpu`` and
``--device cpu``), compares the exported images, and reports each run's
residual of the masked domain against the simulator's truth.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from dsub.cluster import ClusterSpec
from dsub.demo import make_dataset, residual_of_masked_region
from dsub.formats.mrc import read_images
from dsub.formats.star import read_particles
from dsub.physics.subtract import SubtractionSettings
from dsub.workflow.pipeline import RunOptions, subtract


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--box", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths, sim = make_dataset(folder / "data", count=args.particles, box=args.box)
        results = {}
        for device in ("gpu", "cpu"):
            outdir = folder / device
            options = RunOptions(outdir=outdir, chunk_size=64, device=device, cluster=ClusterSpec(progress=False))
            summary = subtract(paths["star"], paths["half_a"], paths["half_b"], paths["mask"],
                               SubtractionSettings(), options)
            table = read_particles(outdir / "particles_subtracted.star")
            results[device] = read_images(table.image_paths, table.image_indices)
            print(f"{device}: {summary['seconds']:.2f} s, residual of masked domain "
                  f"{residual_of_masked_region(outdir, sim):.3%}")
        gpu, cpu = results["gpu"], results["cpu"]
        print(f"max |gpu - cpu| / max |cpu| = {np.max(np.abs(gpu - cpu)) / np.max(np.abs(cpu)):.2e}")


if __name__ == "__main__":
    main()
