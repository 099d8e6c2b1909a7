"""The run record: every attempt of a run, the command, versions and inputs, for ``dsub_run.json``.

A run may take several attempts: killed, preempted, stopped by an error, then
resumed by the same command. Each attempt is kept in the store's attributes
(``attempts``) from its start, and updated as chunks finish, so a resumed run
still knows what the earlier ones did; ``dsub_run.json`` (written only when a
run completes) lists them all. An attempt's ``status`` is ``running`` while it
runs, then ``finished``, ``failed`` (with the error), ``interrupted`` (Ctrl-C),
or ``stopped`` when it ended without a word (killed, preempted, its node lost, or
an error on a full disk, where its record could not be rewritten): the next
attempt finds it still ``running`` and closes it with the time, chunks and devices
of its last saved progress (``store.save_progress``, written each time the
coordinator records finished chunks).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import DsubError, error_line, interrupted_line, resource_failure_line
from . import store
from .outdir import HASH_KEY, modified


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the millisecond (an attempt's start, end and saved progress)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

#: Libraries whose versions a run records (cupy only where installed).
LIBRARIES = ("numpy", "scipy", "dask", "distributed", "dask-jobqueue", "zarr", "mrcfile", "starfile", "pandas")
#: The names CuPy's wheels are published under (https://docs.cupy.dev/en/stable/install.html).
CUPY_WHEELS = ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy-rocm-6-0", "cupy-rocm-5-0", "cupy")


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
    """An input file for people: path, size in bytes and modification time (UTC); its content hash
    (``outdir.HASH_KEY``) where the identity holds one (the maps and mask: a later run compares its mask)."""
    return {"path": identity["path"], "bytes": identity["bytes"], "modified": modified(identity),
            **({HASH_KEY: identity[HASH_KEY]} if identity.get(HASH_KEY) else {})}


def input_files(identity: dict) -> dict:
    """Each input's path, size and modification time, from a run identity (``pipeline.run_identity``)."""
    inputs = {name: describe_file(identity[name]) for name in ("particles", "half_a", "half_b", "mask")}
    inputs["stacks"] = [describe_file(stack) for stack in identity["stacks"]]
    return inputs


def batch_job() -> str | None:
    """The batch job this process runs in, ``slurm:<SLURM_JOB_ID>`` or ``pbs:<PBS_JOBID>``; None outside one.

    A requeued job keeps its id, so the attempts record it (``begin``) and a
    requeued run of the same job can tell that it began the store (``requeued_job_began``).
    """
    for system, variable in (("slurm", "SLURM_JOB_ID"), ("pbs", "PBS_JOBID")):
        if os.environ.get(variable):
            return f"{system}:{os.environ[variable]}"
    return None


def requeued_job_began(store_path: Path) -> str | None:
    """This SLURM job's id where it runs again after a requeue (``SLURM_RESTART_COUNT`` at least 1, as SLURM
    sets it in a restarted or requeued job) and an attempt of it is in the store at ``store_path``; else None."""
    job = batch_job()
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    if job is None or not job.startswith("slurm:") or restarts < 1 or not Path(store_path).exists():
        return None
    try:
        attempts = store.open_store(store_path).attrs.get("attempts", [])
    except Exception:  # an unreadable store: prepare_outdir decides what to do with it
        return None
    return job if any(attempt.get("batch_job") == job for attempt in attempts) else None


class AttemptRecorder:
    """Records one attempt of a run in the store, from ``begin`` to ``finish`` or ``fail``.

    The attempt starts when the recorder is made (the command's start: reading
    and checking the inputs count); it enters the store at ``begin``. Before
    ``begin`` (the store does not exist yet) ``fail`` does nothing: an attempt
    refused while checking its inputs leaves no trace in the record.
    """

    def __init__(self):
        self.store_path: Path | None = None
        #: Whether this run (``--overwrite``) began to remove OUTDIR's earlier outputs, to write its own.
        self.replaced_earlier = False
        #: Whether this run (``--overwrite``) began to create its own store, the earlier one gone.
        self.creating_store = False
        self.attempts: list[dict] = []
        self.earlier: list[dict] | None = None  # the run's earlier attempts, settled (``read_earlier``)
        self.started = time.monotonic()
        self.started_utc = utc_now()

    @property
    def current(self) -> dict:
        return self.attempts[-1]

    def read_earlier(self, store_path: Path) -> list[dict]:
        """The earlier attempts of this run, from its store; kept for ``begin``.

        Read before a store is replaced (the run computed afresh: a lost stack of a
        finished run), so its history goes on into the new store. An attempt still
        ``running`` ended without a word: it becomes ``stopped``, ending with its
        last saved progress (``store.saved_progress``: time and devices as of the
        last chunks the coordinator recorded), its chunks counted from the store.
        """
        store_path = Path(store_path)
        try:
            attempts = [dict(attempt) for attempt in store.open_store(store_path).attrs.get("attempts", [])]
        except Exception:  # an unreadable store has no history to keep
            attempts = []
        if any(attempt.get("status") == "running" for attempt in attempts):
            progress = store.saved_progress(store_path) or {}
            try:
                done = int(store.finished_chunks(store_path).sum())
            except Exception:
                done = None
            for attempt in attempts:
                if attempt.get("status") != "running":
                    continue
                saved = progress if progress.get("attempt") == attempt.get("attempt") else {}
                last = saved.get("last_update") or attempt.get("last_update") or attempt["started"]
                # The store's marks, written just before the progress: a kill in between leaves them ahead.
                chunks = saved.get("chunks_done") if done is None else done - attempt.get("chunks_done_before", 0)
                attempt.update(
                    status="stopped", ended=last, last_update=last,
                    chunks_done=chunks if chunks is not None else attempt.get("chunks_done", 0),
                    devices=sorted(set(attempt.get("devices") or []) | set(saved.get("devices") or [])),
                    seconds=round((datetime.fromisoformat(last) - datetime.fromisoformat(attempt["started"]))
                                  .total_seconds(), 3),
                )
        self.earlier = attempts
        return attempts

    def begin(self, store_path: Path, scheduler: str, device: str, chunks_total: int,
              done_before: int | None = None, note: str | None = None) -> dict:
        """Start an attempt in the store: the earlier ones settled (``read_earlier``), what is already done, save.

        ``done_before``: chunks already finished, when the caller has read the store's marks (else read here).
        ``note``: why this attempt computes the run afresh, when it does (a lost stack).
        """
        self.store_path = Path(store_path)
        if self.earlier is None:
            self.read_earlier(self.store_path)
        self.attempts = [dict(attempt) for attempt in self.earlier]
        if done_before is None:
            done_before = int(store.finished_chunks(self.store_path).sum())
        self.attempts.append({
            "attempt": len(self.attempts) + 1,
            "status": "running",
            "started": self.started_utc,
            "ended": None,
            "last_update": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **({"batch_job": job} if (job := batch_job()) else {}),
            "scheduler": scheduler,
            "device": device,
            "chunks_total": chunks_total,
            "chunks_done_before": done_before,
            "chunks_done": 0,
            "devices": [],
            **({"afresh": note} if note else {}),
        })
        self._save()
        self.save_progress()
        return self.current

    def chunk_finished(self, device_label) -> None:
        """A chunk of this attempt finished on ``device_label`` (what ``tasks.run_chunk`` returns).

        Counted here; saved with the chunk's record (``save_progress``, called when the coordinator records chunks).
        """
        if self.store_path is None:
            return
        attempt = self.current
        attempt["chunks_done"] += 1
        if device_label is not None and device_label not in attempt["devices"]:
            attempt["devices"] = sorted([*attempt["devices"], str(device_label)])

    def save_progress(self) -> None:
        """Save the running attempt's time, chunks and devices in the store (a small file, not its attributes).

        Called each time the coordinator has recorded finished chunks
        (``store.ChunkRecorder``'s ``on_flush``): an attempt killed outright
        keeps the time of its last recorded chunk. Never raises: a full disk
        must not hide the run's own error.
        """
        if self.store_path is None or not self.attempts:
            return
        attempt = self.current
        attempt["last_update"] = utc_now()
        with contextlib.suppress(OSError):
            store.save_progress(self.store_path, {key: attempt[key] for key in
                                                  ("attempt", "started", "last_update", "chunks_done", "devices")})

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
        self._save()

    def _save(self) -> None:
        store.open_store(self.store_path, mode="r+").attrs["attempts"] = self.attempts


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
def failure_recorded(attempt: AttemptRecorder, transcript, left=None, one_task: bool = False):
    """Inside: an error or interrupt closes the attempt with the line the user sees, also put in dsub.log.

    Running out of memory, threads or address space is recorded as the command
    prints it (``errors.resource_failure_line``; ``one_task``: one task at a time).
    ``left``: a function giving what an interrupt leaves in OUTDIR for the rerun,
    as attributes to mark it with (``errors.interrupted_line``): ``nothing_written``
    where there is nothing to resume, ``overwrite_given`` where only a rerun
    without ``--overwrite`` resumes.
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        with contextlib.suppress(Exception):
            if left is not None:
                for name, value in left().items():
                    setattr(exc, name, value)
        line = interrupted_line(exc)
        transcript.log_only(line)
        attempt.fail("interrupted", line)
        raise
    except BaseException as exc:
        line = (error_line(exc) if isinstance(exc, DsubError) else resource_failure_line(exc, one_task)
                or error_line(f"{type(exc).__name__}: {exc}"))
        transcript.log_only(line)
        attempt.fail("failed", line)
        raise
