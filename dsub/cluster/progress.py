"""Progress of a phase of tasks, for a terminal and for a batch log.

On a terminal a live tqdm bar; anywhere else (a SLURM/PBS job log, a file)
plain lines at a steady pace, such as::

    subtract: chunks 12/80, 1 530 particles/s, about 3 min left

Until the first task finishes, a note says what the workers are doing (for
example preparing the maps), with the time spent so far, so a run that is
setting up never looks hung. Set-up steps outside the task graph are announced
with :func:`setup_step`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass

#: Seconds between plain progress lines where the output is not a terminal.
LOG_INTERVAL_S = 10.0
#: Seconds between progress lines in OUTDIR/dsub.log (kept short for long runs).
LOG_FILE_INTERVAL_S = 60.0
#: Seconds between redraws of the terminal bar while nothing finishes.
TERMINAL_REFRESH_S = 1.0
#: A set-up step that takes at least this long reports its time when it ends.
REPORT_STEP_AFTER_S = 1.0


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (a live bar) rather than a log (plain lines).

    A terminal that says it is 0 columns wide (``script`` started without a size) gets plain lines: a bar
    there drew only blank lines.
    """
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # no file descriptor (a stand-in), or no size to ask for
        return True


def number(value: float) -> str:
    """A count for people: ``1 530`` (a space between thousands, as SI writes it)."""
    return f"{value:,.0f}".replace(",", " ")


def rate(per_second: float) -> str:
    """A rate for people: ``1 530``, or ``0.4`` where whole numbers would round it away."""
    return f"{per_second:.1f}" if per_second < 10 else number(per_second)


def binary_size(count: float) -> str:
    """Bytes for people in binary units: ``5.4 GiB``, or ``40 MiB`` below a tenth of a GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 0.1 * 2**30 else f"{max(1, round(count / 2**20))} MiB"


def duration(seconds: float) -> str:
    """A rough duration: ``40 s``, ``3 min``, ``2 h 5 min``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


@dataclass(frozen=True)
class PhaseRate:
    """What a finished phase did: tasks (``unit``: chunks, stacks), items (particles), wall time in seconds."""

    label: str
    tasks: int
    items: int
    seconds: float
    unit: str = "tasks"
    set_up_seconds: float = 0.0  # within ``seconds``, spent setting up (``Progress.task_done``): not in the rate

    @property
    def items_per_second(self) -> float | None:
        working = self.seconds - self.set_up_seconds
        return self.items / working if working > 0 and self.items else None

    def line(self, item_name: str = "particles") -> str:
        per_second = self.items_per_second
        speed = f", {rate(per_second)} {item_name}/s" if per_second else ""
        unit = self.unit[:-1] if self.tasks == 1 and self.unit.endswith("s") else self.unit
        set_up = (f" ({self.set_up_seconds:.1f} s of it setting up: compiled kernels, and maps where none were "
                  "ready)" if self.set_up_seconds >= 0.05 else "")
        return (f"{self.label}: {self.tasks} {unit}, {number(self.items)} {item_name} in {self.seconds:.1f} s"
                f"{set_up}{speed}")


class Progress:
    """Counts finished tasks of one phase and shows them: a bar on a terminal, lines in a log.

    ``sizes`` gives the items (particles) of each task, in task order; a task is
    one ``unit`` (chunks, stacks). ``waiting`` says what happens before the
    first task finishes (e.g. "preparing the maps on the workers"). ``extra_logs``
    are further streams (OUTDIR/dsub.log) that get plain lines every
    ``LOG_FILE_INTERVAL_S``. ``clock`` is for tests.
    """

    def __init__(self, label: str, sizes: list[int], out, *, unit: str = "chunks", item_name: str = "particles",
                 waiting: str | None = None, extra_logs=(), clock=time.monotonic):
        self.label, self.sizes, self.unit, self.item_name, self.waiting = label, list(sizes), unit, item_name, waiting
        self.clock = clock
        self.started = clock()
        self.done_tasks = self.done_items = 0
        self.set_up_seconds = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bar = None
        self.logs: list[list] = []  # [stream, interval, time of the last line]
        if is_terminal(out):
            from tqdm import tqdm

            # smoothing=0: the bar's rate and time left too are the average since the start, not an
            # average of the gaps between updates (``items_per_second``).
            self.bar = tqdm(total=sum(self.sizes), desc=label, unit=item_name.removesuffix("s"), file=out,
                            postfix=waiting, smoothing=0)
        else:
            self.logs.append([out, LOG_INTERVAL_S, self.started])
        self.logs.extend([stream, LOG_FILE_INTERVAL_S, self.started] for stream in extra_logs)

    @property
    def total_tasks(self) -> int:
        return len(self.sizes)

    @property
    def total_items(self) -> int:
        return sum(self.sizes)

    def start(self) -> Progress:
        """Start the clock that redraws the bar or writes a line while no task finishes."""
        self._thread = threading.Thread(target=self._tick_until_stopped, name=f"dsub-progress-{self.label}",
                                        daemon=True)
        self._thread.start()
        return self

    def _tick_until_stopped(self) -> None:
        period = TERMINAL_REFRESH_S if self.bar is not None else min(LOG_INTERVAL_S, 1.0)
        while not self._stop.wait(period):
            self.tick()

    def task_done(self, index: int, set_up_seconds: float = 0.0) -> None:
        """Task ``index`` (its position in ``sizes``) has finished.

        ``set_up_seconds``: what the task spent setting up before its timed work
        (the sample fit's maps and its compiled kernels' first call: numba's
        compilation on a cold cache, CuPy's on a GPU), left out of the rate. For
        a phase of one task (the sample fit) that is wall time not spent on its
        particles; tasks running side by side would overlap theirs.
        """
        with self._lock:
            self.done_tasks += 1
            self.done_items += self.sizes[index]
            self.set_up_seconds += set_up_seconds
            if self.bar is not None:
                self._set_note()
                self.bar.update(self.sizes[index])
        self.tick()

    def items_per_second(self) -> float | None:
        """Items per second: the items finished over the time since the phase started (its tasks were submitted).

        Never the gap between two completions: tasks running side by side finish
        in waves, and two that end a few milliseconds apart (``--scheduler
        threads``) made a rate counted from the first one's end soar (``about 1 s
        left`` for a phase with half its 17 s still to run). Counted from the
        start, the workers' set-up within the phase (maps prepared on their first
        task) is in the time too, so early estimates err on the long side and
        draw nearer the truth as the phase goes on; only what a task reports as
        its set-up (``task_done``) is left out.
        """
        elapsed = self.clock() - self.started - self.set_up_seconds
        return self.done_items / elapsed if elapsed > 0 and self.done_items else None

    def status(self) -> str:
        """One plain line: ``subtract: chunks 12/80, 1 530 particles/s, about 3 min left``."""
        head = f"{self.label}: {self.unit} {self.done_tasks}/{self.total_tasks}"
        if self.done_tasks == 0:
            note = f", {self.waiting}" if self.waiting else ", waiting for the first to finish"
            return f"{head}{note} ({duration(self.clock() - self.started)} so far)"
        per_second = self.items_per_second()
        if not per_second:
            return head
        left = (self.total_items - self.done_items) / per_second
        ending = f", about {duration(left)} left" if self.done_tasks < self.total_tasks else ""
        return f"{head}, {rate(per_second)} {self.item_name}/s{ending}"

    def tick(self) -> None:
        """Write a plain line to each log whose interval has passed; redraw the bar."""
        with self._lock:
            now = self.clock()
            due = [entry for entry in self.logs if now - entry[2] >= entry[1]]
            if due:
                line = self.status()
                for entry in due:
                    entry[2] = now
                    _write_line(entry[0], line)
            if self.bar is not None:
                self.bar.refresh()

    def _set_note(self) -> None:
        if self.done_tasks == 0:
            self.bar.set_postfix_str(self.waiting or "", refresh=False)
        else:
            self.bar.set_postfix_str(f"{self.unit} {self.done_tasks}/{self.total_tasks}", refresh=False)

    def close(self, completed: bool = True) -> PhaseRate:
        """Stop the clock, write the final line (logs) or close the bar; returns the phase's figures.

        A phase that did not complete (an error, an interrupt) ends with where it stopped.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        finished = PhaseRate(self.label, self.done_tasks, self.done_items, self.clock() - self.started, self.unit,
                             self.set_up_seconds)
        if self.bar is not None:
            self.bar.close()
        last = finished.line(self.item_name) if completed else f"{self.status()}: stopped"
        for stream, *_ in self.logs:
            _write_line(stream, last)
        return finished


def _write_line(stream, line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # a full disk or a closed log must not stop the run
        stream.write(line + "\n")
        stream.flush()


@contextlib.contextmanager
def setup_step(out, doing: str, estimate: str | None = None, done: str | None = None):
    """Announce a set-up step before it starts (``doing``, with an estimate of its cost), and its time after.

    The time (``done`` + " in 12.3 s", by default ``doing`` + ": done") is
    reported only for steps of at least ``REPORT_STEP_AFTER_S``, so small runs
    stay short.
    """
    _write_line(out, f"{doing}{f', {estimate}' if estimate else ''} ...")
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    if elapsed >= REPORT_STEP_AFTER_S:
        _write_line(out, f"{done or doing + ': done'} in {elapsed:.1f} s")


@dataclass(frozen=True)
class Estimate:
    """An expected cost: wall time in seconds, and memory in bytes where a measured model exists."""

    seconds: float | None = None
    memory_bytes: int | None = None

    def text(self) -> str | None:
        parts = []
        if self.seconds is not None:
            parts.append(f"about {duration(self.seconds)} on one CPU")
        if self.memory_bytes is not None:
            parts.append(f"about {binary_size(self.memory_bytes)}")
        return ", ".join(parts) or None


#: Seconds a map voxel of the particles' box to read both half maps and the mask, compute their FSC and
#: Wiener-filter both (three maps read, four 3D transforms of the box): about 1 s at box 256 on one core.
_PREPARE_SECONDS_PER_BOX_VOXEL = 6.5e-8
#: Seconds per (padded voxel × log2 padded voxels) to prepare the four maps (whole and masked, both half
#: sets) on their padded grid, transforming only what the map fills. At box 256 on one core (2026-12-01,
#: ``benchmarks/relion_side_by_side.py`` and ``cpu_throughput.py``): the whole set-up 2.0-2.6 s on a 320³
#: grid (the default) and 3.1-3.9 s on a 512³ grid (``--projector relion``), the grid's part 1.0-1.3 and
#: 2.3-2.8 s, i.e. (0.65-1.6)e-9.
_PREPARE_SECONDS_PER_VOXEL_LOG = 1.0e-9
#: The same for each map brought through the cube of another box's extent (``workflow.rebox``): a real trial
#: (a 100³ map through a 684³ cube to box 256) took about 60 s on the 2-core VM for the three maps.
_REBOX_SECONDS_PER_VOXEL_LOG = 1.75e-9


def map_preparation_estimate(grid: int, memory_bytes: int | None = None, rebox_voxels: int = 0,
                             box: int = 0) -> Estimate:
    """Expected cost of preparing both half-maps (read, FSC, mask, pad to ``grid``³, FFT) on one CPU.

    The maps at the particles' ``box`` (0: left out) are read, compared (FSC)
    and filtered: time grows as box³; four padded FFTs of n = ``grid``³ voxels
    (``grid``: the prepared maps' side, ``physics.gridding.grid_size``) grow as
    n·log2 n (constants measured on a CPU, see BENCHMARKS.md). ``memory_bytes``:
    the peak, from ``physics.memory.preparation_peak_bytes``. ``rebox_voxels``:
    the side of the cube maps of another box are brought through first (0: none).
    """
    voxels = float(grid) ** 3
    seconds = (_PREPARE_SECONDS_PER_BOX_VOXEL * float(box) ** 3
               + _PREPARE_SECONDS_PER_VOXEL_LOG * voxels * math.log2(voxels))
    if rebox_voxels:  # three maps (half maps, mask) each through an FFT of that cube
        cube = float(rebox_voxels) ** 3
        seconds += 3 * _REBOX_SECONDS_PER_VOXEL_LOG * cube * math.log2(cube)
    return Estimate(seconds=seconds, memory_bytes=memory_bytes)
