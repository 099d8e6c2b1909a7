"""Choosing the array module (NumPy or CuPy) the physics runs on."""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np


def array_module(array):
    """The module (numpy or cupy) that owns ``array``."""
    module = type(array).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime/driver error
        return False


def start_gpu_warm_up() -> threading.Thread:
    """Load CuPy and create this process's CUDA context on its current device, in a daemon thread.

    About 1.1 s on a GPU host (CuPy's import, the driver's context), otherwise
    spent when the maps are first prepared; started as a run begins, it runs
    beside the input checks, which mostly wait on the disk. Nothing happens
    where CuPy is missing or sees no GPU. Join it before the process exits (a
    thread still importing then can abort it); its failures are left to the run,
    which meets them again where it uses the GPU.
    """
    def warm_up():
        try:
            if gpu_available():
                import cupy

                cupy.empty(1, dtype=cupy.float32)  # the context, and CuPy's memory pool
        except Exception:  # noqa: BLE001 -- the run reports what the GPU refuses, where it uses it
            pass

    thread = threading.Thread(target=warm_up, name="dsub-gpu-warm-up", daemon=True)
    thread.start()
    return thread


def get_xp(device: str):
    """Array module for ``device``: "cpu" -> numpy, "gpu" -> cupy."""
    if device == "cpu":
        return np
    if device == "gpu":
        import cupy

        return cupy
    raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")


def to_numpy(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    return np.asarray(array)


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' where CuPy sees a GPU in this process, else 'cpu'; 'gpu' must have one."""
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError("device 'gpu' was asked for, but CuPy is not installed or sees no GPU here")
    return device


def device_label(device: str) -> str:
    """Which device this process computes on, for run summaries: 'cpu' or 'gpu:<CUDA device>'."""
    if device != "gpu":
        return device
    import os

    import cupy

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = cupy.cuda.Device().id
    if visible:
        ids = [item.strip() for item in visible.split(",")]
        return f"gpu:{ids[index] if index < len(ids) else index}"
    return f"gpu:{index}"


def fft_module(xp):
    """The FFT functions for ``xp``'s arrays: ``scipy.fft`` for NumPy, ``cupy.fft`` for CuPy.

    Both keep float32/complex64 in single precision. On NumPy arrays scipy.fft's
    forward real transforms are about 3× faster than ``numpy.fft``'s (NumPy 2.4,
    one core: rfft2 of 32 × 512² float32 0.026 s against 0.087 s; inverse
    transforms alike), with the same pocketfft arithmetic.
    """
    if xp.__name__ == "numpy":
        import scipy.fft  # here, not with the module: GPU workers need not load SciPy

        return scipy.fft
    return xp.fft
