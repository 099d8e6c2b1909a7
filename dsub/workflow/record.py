"""The run record: every attempt of a run, the command, versions and inputs, for ``dsub_run.json``.

A run may take several attempts: killed, preempted, stopped by an error, then
resumed by the same command. Each attempt is kept in the store's attributes
(``attempts``) from its start, and updated as chunks finish, so a resumed run
still knows what the earlier ones did; ``dsub_run.json`` (written only when a
run completes) lists them all. An attempt's ``status`` is ``running`` while it
runs, then ``finished``, ``failed`` (with the error), ``interrupted`` (Ctrl-C),
or ``stopped`` when it ended without a word (killed, preempted, its node lost, or
an error on a full disk, where its record could not be rewritten): the next
attempt finds it still ``running`` and counts its chunks from the store.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import socket
import time
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..errors import INTERRUPTED, TERMINATED, DsubError, Terminated, error_line
from . import store
from .outdir import modified
from .transcript import utc_now

#: Libraries whose versions a run records (cupy only where installed).
LIBRARIES = ("numpy", "scipy", "dask", "distributed", "dask-jobqueue", "zarr", "mrcfile", "starfile", "pandas")
#: The names CuPy's wheels are published under (https://docs.cupy.dev/en/stable/install.html).
CUPY_WHEELS = ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy-rocm-6-0", "cupy-rocm-5-0", "cupy")
#: Seconds between updates of a running attempt in the store.
SAVE_INTERVAL_S = 10.0


def versions() -> dict:
    """dsub, Python and library versions; CuPy's under whatever wheel name it was installed as."""
    found = {"dsub": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    for distribution in CUPY_WHEELS:  # looked up by name: listing every installed package takes a second
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found["cupy"] = f"{importlib.metadata.version(distribution)} ({distribution})"
            break
    return found


def describe_file(identity: dict) -> dict:
    """An input file for people: path, size in bytes and modification time (UTC)."""
    return {"path": identity["path"], "bytes": identity["bytes"], "modified": modified(identity)}


def input_files(identity: dict) -> dict:
    """Each input's path, size and modification time, from a run identity (``pipeline.run_identity``)."""
    inputs = {name: describe_file(identity[name]) for name in ("particles", "half_a", "half_b", "mask")}
    inputs["stacks"] = [describe_file(stack) for stack in identity["stacks"]]
    return inputs


class AttemptRecorder:
    """Records one attempt of a run in the store, from ``begin`` to ``finish`` or ``fail``.

    Before ``begin`` (the store does not exist yet) ``fail`` does nothing: an
    attempt refused while checking its inputs leaves no trace in the record.
    """

    def __init__(self):
        self.store_path: Path | None = None
        self.attempts: list[dict] = []
        self.started = time.monotonic()
        self._saved = 0.0

    @property
    def current(self) -> dict:
        return self.attempts[-1]

    def begin(self, store_path: Path, scheduler: str, device: str, chunks_total: int,
              done_before: int | None = None) -> dict:
        """Start an attempt: settle the earlier ones, note what is already done, save.

        ``done_before``: chunks already finished, when the caller has read the store's marks (else read here).
        """
        self.store_path = Path(store_path)
        group = store.open_store(self.store_path)
        self.attempts = [dict(attempt) for attempt in group.attrs.get("attempts", [])]
        if done_before is None:
            done_before = int(store.finished_chunks(self.store_path).sum())
        for attempt in self.attempts:
            if attempt.get("status") == "running":  # it ended without a word: killed or preempted
                last = attempt["last_update"]  # its last chunk saved (at most SAVE_INTERVAL_S apart)
                attempt.update(status="stopped", ended=last, chunks_done=done_before - attempt["chunks_done_before"],
                               seconds=(datetime.fromisoformat(last) - datetime.fromisoformat(attempt["started"]))
                               .total_seconds())
        self.attempts.append({
            "attempt": len(self.attempts) + 1,
            "status": "running",
            "started": utc_now(),
            "ended": None,
            "last_update": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "scheduler": scheduler,
            "device": device,
            "chunks_total": chunks_total,
            "chunks_done_before": done_before,
            "chunks_done": 0,
            "devices": [],
        })
        self._save(force=True)
        return self.current

    def chunk_finished(self, device_label) -> None:
        """A chunk of this attempt finished on ``device_label`` (what ``tasks.run_chunk`` returns)."""
        if self.store_path is None:
            return
        attempt = self.current
        attempt["chunks_done"] += 1
        if device_label is not None and device_label not in attempt["devices"]:
            attempt["devices"] = sorted([*attempt["devices"], str(device_label)])
        self._save()

    def finish(self, summary: dict, phases: dict, workers) -> dict:
        """Close the attempt as finished; returns ``summary`` with the whole run's record added.

        ``phases``: {label: PhaseRate} from the runner. The summary's ``seconds``
        and ``devices`` become the whole run's (all attempts); each attempt keeps
        its own figures.
        """
        attempt = self.current
        attempt.update(
            status="finished", workers=workers,
            seconds=summary.get("seconds"), phase_seconds=summary.get("phase_seconds"),
            particles_per_second={label: round(rate.items_per_second, 1)
                                  for label, rate in phases.items() if rate.items_per_second},
        )
        self._close_attempt()
        devices = sorted({device for each in self.attempts for device in each.get("devices", [])})
        return {
            **summary,
            "seconds": round(sum(each.get("seconds") or 0.0 for each in self.attempts), 3),
            "devices": devices,
            "attempts": self.attempts,
        }

    def fail(self, status: str, error: str | None = None) -> None:
        """Close the attempt as ``failed`` (with the error line) or ``interrupted``; never raises."""
        if self.store_path is None or not self.attempts:
            return
        self.current.update(status=status, error=error, seconds=round(time.monotonic() - self.started, 3))
        with contextlib.suppress(Exception):  # the original error matters more than the record
            self._close_attempt()

    def _close_attempt(self) -> None:
        attempt = self.current
        attempt["ended"] = attempt["last_update"] = utc_now()
        if self.store_path is not None:
            with contextlib.suppress(Exception):  # count from the store: it knows what was written
                done = int(store.finished_chunks(self.store_path).sum())
                attempt["chunks_done"] = done - attempt["chunks_done_before"]
        self._save(force=True)

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved < SAVE_INTERVAL_S:
            return
        self._saved = now
        self.current["last_update"] = self.current["ended"] or utc_now()
        try:
            store.open_store(self.store_path, mode="r+").attrs["attempts"] = self.attempts
        except OSError:
            if force:
                raise


def run_description(command: str | None, identity: dict) -> dict:
    """The parts of dsub_run.json that describe the run itself: command, folder, versions, inputs."""
    return {
        "command": command,
        "working_directory": os.getcwd(),
        "versions": versions(),
        "inputs": input_files(identity),
    }


def throughput_line(phases: dict) -> str | None:
    """``Particles/s: subtract 1 530, export 25 000`` for the phases that processed particles."""
    from ..cluster.progress import rate

    rates = [f"{label} {rate(phase.items_per_second)}" for label, phase in phases.items() if phase.items_per_second]
    return f"Particles/s: {', '.join(rates)}" if rates else None


@contextlib.contextmanager
def failure_recorded(attempt: AttemptRecorder, transcript):
    """Inside: an error or interrupt closes the attempt with the line the user sees, also put in dsub.log."""
    try:
        yield
    except KeyboardInterrupt as exc:
        line = TERMINATED if isinstance(exc, Terminated) else INTERRUPTED
        transcript.log_only(line)
        attempt.fail("interrupted", line)
        raise
    except BaseException as exc:
        line = error_line(exc if isinstance(exc, DsubError) else f"{type(exc).__name__}: {exc}")
        transcript.log_only(line)
        attempt.fail("failed", line)
        raise
