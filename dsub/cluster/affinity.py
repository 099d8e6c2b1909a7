"""A local GPU worker's threads kept on the CPUs beside its GPU.

Each GPU hangs off one CPU socket's PCIe root: its NUMA node. A worker whose
threads run on the other socket moves every image across the sockets' link
(page cache to page-locked buffer, buffer to GPU and back, buffer to page
cache), and the buffers and pages it allocates land on whichever node the
thread happened to run. dask-cuda's ``LocalCUDACluster`` pins each worker to
its GPU's CPUs for that reason (``dask_cuda.utils.get_cpu_affinity``, from
NVML's ``nvmlDeviceGetCpuAffinity``); dsub reads the same CPUs from Linux's
sysfs (``/sys/bus/pci/devices/<PCI bus id>/local_cpulist``,
Documentation/ABI/testing/sysfs-bus-pci), which needs no NVML, and keeps only
those this process may use (its cpuset: a batch job's or a container's).

The coordinator finds each GPU's CPUs (``gpu_cpus``) and hands them to the
worker it spawns for that GPU in ``DSUB_WORKER_CPUS`` (``gpus.PinnedGPUCluster``);
the worker's preload (``warm_up``) pins all its threads to them first thing
(``pin_this_process``), so the threads it starts later inherit them. Nothing is
pinned where a GPU's CPUs are all the CPUs there are (one NUMA node), where
sysfs does not say, or with ``DSUB_GPU_CPU_AFFINITY=0`` in the environment.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable

WORKER_CPUS = "DSUB_WORKER_CPUS"
SWITCH = "DSUB_GPU_CPU_AFFINITY"
PCI_DEVICES = Path("/sys/bus/pci/devices")


def parse_cpu_list(text: str) -> set[int]:
    """CPU numbers from the kernel's list format (``"0-15,32-47"``; cpuset(7), "List format").

    Raises ValueError for anything else.
    """
    cpus: set[int] = set()
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        first, _, last = item.partition("-")
        start, stop = int(first), int(last or first)
        if stop < start:
            raise ValueError(f"CPU range {item!r} runs backwards")
        cpus.update(range(start, stop + 1))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's list format of ``cpus``: runs of consecutive numbers as ``first-last``."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def cuda_pci_bus_id(ordinal: int) -> str:
    """The PCI bus id (``"0000:1B:00.0"``) of the CUDA device ``ordinal`` as this process numbers them."""
    import cupy

    return cupy.cuda.runtime.deviceGetPCIBusId(ordinal)


def gpu_cpus(gpu_count: int, bus_id: Callable[[int], str] = cuda_pci_bus_id,
             devices: Path = PCI_DEVICES) -> list[set[int] | None]:
    """For CUDA devices ``0 .. gpu_count-1``: the CPUs of its NUMA node that this process may use, or None.

    None for every device where pinning would change nothing or cannot be
    decided: ``DSUB_GPU_CPU_AFFINITY=0``, a bus id or sysfs file that cannot be
    read, no allowed CPU beside the GPU, or every GPU's CPUs being all the
    allowed ones (a machine of one NUMA node).
    """
    if os.environ.get(SWITCH, "1").strip() == "0" or gpu_count <= 0:
        return [None] * max(gpu_count, 0)
    allowed = os.sched_getaffinity(0)
    found: list[set[int] | None] = []
    for ordinal in range(gpu_count):
        try:
            text = (devices / bus_id(ordinal).lower() / "local_cpulist").read_text()
            cpus = parse_cpu_list(text) & allowed
        except (OSError, ValueError, ImportError, RuntimeError, AttributeError):
            cpus = set()
        found.append(cpus or None)
    if all(cpus is None or cpus == allowed for cpus in found):
        return [None] * gpu_count
    return found


def pin_this_process(cpus: set[int]) -> bool:
    """Every thread of this process (and so the threads they start) on ``cpus``; False where the kernel refused."""
    pinned = False
    for _ in range(2):  # a thread started while the first pass ran is caught by the second
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task), cpus)
                pinned = True
    return pinned


def pin_from_environment() -> None:
    """A worker's preload: pin this process to ``DSUB_WORKER_CPUS`` where its spawner set it."""
    text = os.environ.get(WORKER_CPUS, "").strip()
    if not text:
        return
    with contextlib.suppress(ValueError):
        pin_this_process(parse_cpu_list(text))
