"""Shared fixtures. Real third-party test data lives in ``../shared/data`` beside the checkout."""

import signal
from pathlib import Path

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
