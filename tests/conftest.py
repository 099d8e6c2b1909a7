"""Shared fixtures. Real third-party test data lives in ``../shared/data`` beside the checkout."""

import signal
from pathlib import Path

import numpy as np
import pytest

# A shell without job control starts `make test &` with SIGINT ignored, and every process the tests start
# would inherit that (dsub keeps an inherited ignored SIGINT ignored): the tests' Ctrl-Cs act as a terminal's.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared test-data folder; tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def ctrl_c_after_chunks(monkeypatch):
    """``with ctrl_c_after_chunks(n):`` a run in the block is stopped by Ctrl-C once ``n`` chunks are recorded."""
    import contextlib

    from dsub.workflow import store

    @contextlib.contextmanager
    def stopped_after(count: int):
        original, added = store.ChunkRecorder.add, []

        def add(self, result):
            if len(added) == count:
                raise KeyboardInterrupt  # Ctrl-C once ``count`` chunks are finished
            added.append(result)
            return original(self, result)

        with monkeypatch.context() as patch:
            patch.setattr(store.ChunkRecorder, "add", add)
            yield

    return stopped_after


def is_dask_worker(process) -> bool:
    """Whether a ``psutil.Process`` is a local cluster's worker: spawned (multiprocessing's ``spawn_main``), or
    forked from the fork server that ``dsub.fork_server`` starts (whose children keep its command line)."""
    import psutil

    try:
        line = " ".join(process.cmdline())
        if "spawn_main" in line:
            return True
        parent = process.parent()
        return "multiprocessing.forkserver" in line and parent is not None \
            and "multiprocessing.forkserver" in " ".join(parent.cmdline())
    except psutil.Error:  # gone meanwhile
        return False


@pytest.fixture
def dask_workers():
    """``dask_workers(process)``: the local cluster workers among a ``psutil.Process``'s descendants."""
    return lambda process: [child for child in process.children(recursive=True) if is_dask_worker(child)]


@pytest.fixture
def maps_traced_by_tracemalloc(monkeypatch):
    """The prepared maps' pair made by NumPy (the same bytes), which tracemalloc sees: it sees no memory map,
    which ``projector.small_page_zeros`` makes."""
    from dsub.physics import projector

    monkeypatch.setattr(projector, "small_page_zeros", lambda shape, dtype: np.zeros(shape, dtype))
