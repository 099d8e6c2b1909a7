"""Which GPUs this machine has, and pinning one worker process to each."""

from __future__ import annotations

import os

from distributed.diagnostics.plugin import WorkerPlugin


def visible_gpus() -> list[str]:
    """IDs of the GPUs CuPy sees here (respecting CUDA_VISIBLE_DEVICES), as strings."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, or no device
        return []
    if declared:
        ids = [item.strip() for item in declared.split(",") if item.strip()]
        return ids[:count]
    return [str(index) for index in range(count)]


class PinGPU(WorkerPlugin):
    """Give each local worker process its own GPU before it first touches CUDA.

    LocalCluster names its workers 0, 1, ...; worker ``i`` sees only GPU
    ``gpus[i % len(gpus)]`` through CUDA_VISIBLE_DEVICES, so its CuPy work and
    its cached half-maps live on that GPU.
    """

    name = "dsub-pin-gpu"

    def __init__(self, gpus: list[str]):
        self.gpus = list(gpus)

    def setup(self, worker):
        try:
            index = int(worker.name)
        except (TypeError, ValueError):
            index = abs(hash(worker.name))
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[index % len(self.gpus)]
