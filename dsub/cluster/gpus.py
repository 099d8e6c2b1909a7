"""Which GPUs this machine has, and a local cluster that pins one worker process to each."""

from __future__ import annotations

import os

from distributed import LocalCluster

from .affinity import WORKER_CPUS, format_cpu_list
from .warm_up import WARM_UP_GPU


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


class PinnedGPUCluster(LocalCluster):
    """A LocalCluster whose worker ``i`` sees only GPU ``gpus[i % len(gpus)]``.

    Its ``CUDA_VISIBLE_DEVICES`` is set in the worker process's environment as
    the nanny spawns it (``Nanny(env=...)``, as dask-cuda's LocalCUDACluster
    does), so nothing in the worker touches CUDA before it is pinned, and its
    CuPy work and cached half-maps live on that GPU; workers that ``adapt``
    adds later are pinned alike. ``warm_up_gpu``: the worker's preload
    (``warm_up``) also makes its CUDA context as it starts. Start it with
    ``n_workers=0`` and ``scale``: LocalCluster's first workers share one spec.
    ``gpu_cpus``: per GPU, the CPUs its worker is kept on (``affinity.gpu_cpus``;
    None: not pinned), handed to it in ``DSUB_WORKER_CPUS``.
    """

    def __init__(self, gpus: list[str], warm_up_gpu: bool = True,
                 gpu_cpus: list[set[int] | None] | None = None, **kwargs):
        self._dsub_gpus = list(gpus)
        self._dsub_warm_up_gpu = warm_up_gpu
        self._dsub_gpu_cpus = list(gpu_cpus) if gpu_cpus else [None] * len(self._dsub_gpus)
        super().__init__(**kwargs)

    def new_worker_spec(self):
        (name, worker), = super().new_worker_spec().items()
        options = dict(worker["options"])
        index = int(name) % len(self._dsub_gpus)
        options["env"] = {**(options.get("env") or {}),
                          "CUDA_VISIBLE_DEVICES": self._dsub_gpus[index],
                          WARM_UP_GPU: "1" if self._dsub_warm_up_gpu else "0"}
        if self._dsub_gpu_cpus[index]:
            options["env"][WORKER_CPUS] = format_cpu_list(self._dsub_gpu_cpus[index])
        return {name: {**worker, "options": options}}
