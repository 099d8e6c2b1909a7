"""What a run tells its user and keeps: progress in logs, the run record, dsub.log, refusals that say why."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from dsub.cli import main
from dsub.cluster.progress import Progress, duration, map_preparation_estimate, number, rate
from dsub.demo import make_dataset
from dsub.errors import INTERRUPTED


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    paths, _ = make_dataset(tmp_path_factory.mktemp("data"), count=24, box=32, seed=3)
    return paths


def subtract_args(paths, outdir, *extra):
    return ["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
            "--mask", str(paths["mask"]), "-o", str(outdir), "--chunk-size", "8", *extra]


# ----------------------------------------------------------------------------- progress


def test_log_lines_are_plain_paced_and_count_particles_per_second():
    """Chunks of 100 particles every 5 s after 20 s of set-up: the rate counts from the phase's start."""
    clock, out = FakeClock(), io.StringIO()
    shown = Progress("subtract", [100] * 8, out, waiting="preparing the maps on the workers", clock=clock)
    for second in range(1, 60):  # the ticking thread's calls, one a second
        clock.now += 1
        if second >= 20 and second % 5 == 0 and shown.done_tasks < 8:
            shown.task_done(shown.done_tasks)
        else:
            shown.tick()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "subtract: chunks 0/8, preparing the maps on the workers (10 s so far)"
    # At 30 s: chunks at 20, 25, 30 s -> 300 particles in 30 s; 500 left at 10/s.
    assert lines[2] == "subtract: chunks 3/8, 10 particles/s, about 50 s left"
    assert len(lines) == 5  # one line per 10 s over 59 s, not one per update
    assert lines[4] == "subtract: chunks 7/8, 14 particles/s, about 7 s left"  # 700 in 50 s; 100 left
    final = shown.close()
    assert final.tasks == 8 and final.items == 800 and final.seconds == pytest.approx(59)
    assert out.getvalue().splitlines()[-1] == "subtract: 8 chunks, 800 particles in 59.0 s, 14 particles/s"


def test_chunks_finishing_together_do_not_make_the_rate_soar():
    """Two threads finish their chunks at almost the same moment: the rate is what the phase did in its time.

    As ``--scheduler threads`` with 2 threads ran 4 chunks of 250 particles in 17.2 s: the first two
    chunks ended 8.6 s in, 10 ms apart. Counting from the first one's end gave 250 particles in 10 ms.
    """
    clock, out = FakeClock(), io.StringIO()
    shown = Progress("subtract", [250] * 4, out, clock=clock)
    clock.now += 8.6
    shown.task_done(0)
    clock.now += 0.01
    shown.task_done(1)
    assert shown.items_per_second() == pytest.approx(500 / 8.61)
    assert shown.status() == "subtract: chunks 2/4, 58 particles/s, about 9 s left"
    clock.now += 8.59
    shown.task_done(2)
    shown.task_done(3)
    assert shown.close().line() == "subtract: 4 chunks, 1 000 particles in 17.2 s, 58 particles/s"


def test_extra_log_gets_lines_once_a_minute():
    clock, out, log = FakeClock(), io.StringIO(), io.StringIO()
    shown = Progress("subtract", [10] * 1000, out, extra_logs=[log], clock=clock)
    for index in range(300):
        clock.now += 1
        shown.task_done(index)
    assert len(out.getvalue().splitlines()) == 30 and len(log.getvalue().splitlines()) == 5


def test_words_for_people():
    assert number(1530.4) == "1 530" and number(12) == "12"
    assert rate(0.42) == "0.4" and rate(9.96) == "10.0" and rate(1530.4) == "1 530"
    assert duration(40) == "40 s" and duration(185) == "3 min" and duration(7500) == "2 h 5 min"
    # FFTs of the padded grid cost n log n: a grid of 768 against one of 192
    small, large = map_preparation_estimate(192).seconds, map_preparation_estimate(768).seconds
    n_small, n_large = 192.0**3, 768.0**3
    assert large / small == pytest.approx(n_large * math.log2(n_large) / (n_small * math.log2(n_small)))
    # Against the set-up measured at box 256 on one core (BENCHMARKS.md): 2.0-2.6 s on the default's 320³ grid,
    # 3.1-3.9 s on --projector relion's 512³
    assert 1.5 < map_preparation_estimate(320, box=256).seconds < 3.0
    assert 3.0 < map_preparation_estimate(512, box=256).seconds < 5.5


# ----------------------------------------------------------------------------- the CLI in a log


def progress_line(line: str) -> bool:
    """Whether ``line`` says where a phase is (``Progress.status``: ``subtract: chunks 12/80, ...``), as a log
    gets it at its own pace while the phase runs, rather than a message or a phase's final line."""
    return re.fullmatch(r"[a-z ]+: [a-z]+ \d+/\d+(, .+)?", line) is not None


def test_progress_lines_are_told_from_messages_and_final_lines():
    clock, out = FakeClock(), io.StringIO()
    shown = Progress("sample fit", [24], out, unit="tasks", clock=clock)
    clock.now += 10
    shown.tick()
    assert progress_line(shown.status()) and progress_line(out.getvalue().splitlines()[0])
    shown.task_done(0)
    assert not progress_line(shown.close().line())
    assert not progress_line("dsub: 24 particles of 32 px in 3 chunks (0 already done) on threads scheduler, 2 "
                             "thread(s).")


def test_the_sample_fits_rate_leaves_out_its_set_up():
    """The sample fit's one task reports the seconds it spent on the maps and its kernels' compilation: its
    particles/s counts only the rest, in the final line and in the phase's figures for the record."""
    clock, out = FakeClock(), io.StringIO()
    shown = Progress("sample fit", [64], out, unit="tasks", clock=clock)
    clock.now += 8.0  # of which 6.0 compiling (numba, cold cache)
    shown.task_done(0, set_up_seconds=6.0)
    finished = shown.close()
    assert finished.items_per_second == pytest.approx(64 / 2.0)
    assert finished.line() == ("sample fit: 1 task, 64 particles in 8.0 s (6.0 s of it setting up: compiled "
                               "kernels, and maps where none were ready), 32 particles/s")
    assert out.getvalue().splitlines()[-1] == finished.line()


def test_the_sample_fits_rate_leaves_out_what_a_worker_did_before_the_task():
    """On a cluster the worker starts and prepares its maps before the sample task runs (or beside it), where
    the task cannot time it: the phase counts all but the task's timed fit as set-up, so its particles/s is the
    particles' own rate, as the README says."""
    import time as time_module

    import dask

    from dsub.cluster.runner import ClusterSpec, ThreadRunner
    from dsub.physics.contrast import ContrastResult
    from dsub.workflow.tasks import SampleFit

    def worker_then_fit():
        time_module.sleep(1.0)  # the worker's start and map preparation, outside the task's own clock
        fit_started = time_module.perf_counter()
        time_module.sleep(0.25)  # the timed fit of 64 particles
        nothing = np.zeros(64, np.float32)
        return SampleFit(ContrastResult(nothing, nothing, nothing), nothing, 0.0,
                         time_module.perf_counter() - fit_started)

    runner = ThreadRunner(ClusterSpec(scheduler="sync", progress=False))
    runner.compute([dask.delayed(worker_then_fit)()], "sample fit", [64], unit="tasks")
    phase = runner.phases["sample fit"]
    assert phase.set_up_seconds >= 1.0
    assert phase.seconds - phase.set_up_seconds == pytest.approx(0.25, abs=0.1)
    assert phase.items_per_second > 64 / 0.4  # not 64 / 1.25: the worker's set-up is not in the rate


def test_the_sample_fit_compiles_before_it_is_timed(small, tmp_path, monkeypatch, capsys):
    """A real run: the first call of the subtraction in the sample task (where numba compiles its kernels on a
    cold cache, here made to take 1.5 s) is set-up, and the rate printed and recorded leaves it out."""
    import time as time_module

    from dsub.workflow import tasks

    real, calls = tasks.subtract_particles, []

    def compiling_first(images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == 1:
            time_module.sleep(1.5)  # as a cold cache's compilation
        return real(images, *args, **kwargs)

    monkeypatch.setattr(tasks, "subtract_particles", compiling_first)
    assert main(subtract_args(small, tmp_path / "out", "--scheduler", "sync")) == 0
    assert calls[0] == 1  # one particle first, to compile, before the timed fit of the whole sample
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sample fit: 1 task"))
    found = re.fullmatch(r"sample fit: 1 task, (\d+) particles in ([\d.]+) s \(([\d.]+) s of it setting up: compiled "
                         r"kernels, and maps where none were ready\), (\d[\d ]*(?:\.\d+)?) particles/s", line)  # 1 059
    assert found, line
    count, seconds, set_up = int(found[1]), float(found[2]), float(found[3])
    per_second = float(found[4].replace(" ", ""))
    assert set_up >= 1.5
    # the rate of the time after the set-up (both printed to 0.1 s), not one counting the set-up in
    assert per_second >= 0.9 * count / (seconds - set_up + 0.1) > count / seconds
    recorded = json.loads((tmp_path / "out" / "dsub_run.json").read_text())
    assert recorded["attempts"][-1]["particles_per_second"]["sample fit"] == pytest.approx(per_second, rel=0.1)


def test_cli_output_to_a_file_is_plain_lines_and_goes_to_dsub_log(small, tmp_path):
    outdir = tmp_path / "out"
    with open(tmp_path / "job.log", "w") as job_log:  # as a batch system's job log
        done = subprocess.run([sys.executable, "-m", "dsub.cli", *subtract_args(small, outdir, "--single-map")],
                              stdout=job_log, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = (tmp_path / "job.log").read_text()
    assert "\r" not in printed and "|" not in printed  # no bar redrawn on one endless line
    # A phase that lasts 10 s or more (the sample fit on a loaded machine) prints where it is every 10 s in
    # between, and into dsub.log once a minute: those lines apart, the screen and the log hold the same.
    printed_paced = [line for line in printed.splitlines() if progress_line(line)]
    lines = [line for line in printed.splitlines() if not progress_line(line)]
    preparing = next(i for i, line in enumerate(lines) if line.startswith("Preparing the maps on cpu ("))
    chunks = next(i for i, line in enumerate(lines) if line.startswith("dsub: 24 particles"))
    assert preparing < chunks  # the maps are prepared, in view, before the chunks run
    assert re.fullmatch(r"subtract: 3 chunks, 24 particles in [\d.]+ s, [\d .]+ particles/s", lines[chunks + 1])
    assert any(re.fullmatch(r"Particles/s: (sample fit [\d .]+, )?subtract [\d .]+", line) for line in lines)

    log = (outdir / "dsub.log").read_text().splitlines()
    assert log[0].startswith("==== ") and log[0].endswith(" ".join(["dsub", *subtract_args(small, outdir,
                                                                                             "--single-map")]))
    log_paced = [line for line in log[1:] if progress_line(line)]
    # What was printed, warning included; progress lines at most as often as on the screen.
    assert sorted(line for line in log[1:] if not progress_line(line)) == sorted([*lines, *done.stderr.splitlines()])
    assert len(log_paced) <= len(printed_paced)
    assert done.stderr.startswith("dsub: warning: --single-map")


def test_a_reader_that_stops_early_does_not_stop_the_run(small, tmp_path):
    """``dsub subtract ... | head -1``: the screen is gone after a line, the run finishes and logs every line."""
    outdir = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "dsub.cli", *subtract_args(small, outdir, "--single-map")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = run.stdout.readline()
    run.stdout.close()  # as head does after its lines
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert first.startswith("Reading the particles") and "Traceback" not in err and "Broken pipe" not in err
    log = (outdir / "dsub.log").read_text()
    assert "Outputs in" in log and (outdir / "dsub_run.json").is_file()


def test_a_warning_to_a_closed_stderr_does_not_stop_the_run(small, tmp_path):
    """``dsub subtract ... 2>&1 >/dev/null | head -0``: the warning (--single-map) meets a closed pipe; the run
    goes on and finishes, the warning in OUTDIR/dsub.log (it had ended the run with exit 141, nothing written)."""
    outdir = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "dsub.cli", *subtract_args(small, outdir, "--single-map")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    run.stderr.close()  # before dsub writes anything there
    assert run.wait(timeout=300) == 0
    log = (outdir / "dsub.log").read_text()
    assert "dsub: warning: --single-map" in log and "Outputs in" in log and (outdir / "dsub_run.json").is_file()


# ----------------------------------------------------------------------------- the run record


def test_run_record_names_command_versions_and_inputs(small, tmp_path):
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["command"].startswith("dsub subtract ") and "--chunk-size 8" in summary["command"]
    assert summary["versions"]["numpy"] and summary["versions"]["zarr"] and summary["versions"]["dask"]
    half_a = summary["inputs"]["half_a"]
    assert half_a["path"] == str(small["half_a"].resolve()) and half_a["bytes"] == os.path.getsize(small["half_a"])
    assert half_a["modified"].startswith(str(__import__("datetime").datetime.fromtimestamp(
        os.path.getmtime(small["half_a"]), __import__("datetime").timezone.utc).date()))
    assert [stack["path"] for stack in summary["inputs"]["stacks"]] == [str(small["stack"].resolve())]
    [attempt] = summary["attempts"]
    assert attempt["status"] == "finished" and attempt["chunks_done"] == 3 and attempt["devices"] == ["cpu"]
    assert attempt["particles_per_second"]["subtract"] > 0
    # the sample fit and its checks have a phase of their own, apart from the chunks' subtraction
    phases = summary["phase_seconds"]
    assert list(phases)[-3:] == ["sample_fit", "subtract", "export"] and phases["sample_fit"] > 0
    assert sum(phases.values()) <= summary["seconds"] + 0.01


def test_rerun_of_a_finished_run_keeps_the_first_attempts_figures(small, tmp_path):
    outdir = tmp_path / "out"  # the store's images kept: the rerun exports again, as a second attempt
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    first = json.loads((outdir / "dsub_run.json").read_text())["attempts"][0]
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["attempts"][0] == first
    assert summary["attempts"][1]["chunks_done"] == 0 and summary["attempts"][1]["chunks_done_before"] == 3
    assert summary["devices"] == ["cpu"]  # the run's devices, though the rerun computed nothing
    assert summary["seconds"] >= first["seconds"]
    assert (outdir / "dsub.log").read_text().count("==== ") == 2


def test_the_maps_preparation_states_the_memory_of_the_device_that_prepares_them(small, tmp_path, capsys,
                                                                                   monkeypatch):
    """The same maps and box on threads and on a local cluster of CPU workers: the same CPU preparation, so the
    same figure, NumPy's peak (``preparation_peak_bytes(..., "cpu")``, checked against tracemalloc in
    tests/test_memory.py), not the GPU's bound; a cluster of GPU workers states the GPU's, as GPU memory."""
    from dsub.cluster.progress import binary_size
    from dsub.physics.memory import preparation_peak_bytes
    from dsub.physics.subtract import SubtractionSettings

    cpu = binary_size(preparation_peak_bytes(32, SubtractionSettings(), "cpu"))
    gpu = binary_size(preparation_peak_bytes(32, SubtractionSettings(), "gpu"))
    assert cpu != gpu
    stated = {}
    for scheduler in ("threads", "local"):
        assert main(subtract_args(small, tmp_path / scheduler, "--scheduler", scheduler, "--workers", "1",
                                  "--device", "cpu", "--dashboard-address", "127.0.0.1:0")) == 0
        out = capsys.readouterr().out
        found = re.findall(r"(?:Preparing the maps on cpu|prepare them now).*?about ([\d.]+ [MG]iB)((?: of GPU memory[^.)]*)?)", out)
        assert len(found) == 1, out
        stated[scheduler] = found[0]
    assert stated == {"threads": (cpu, ""), "local": (cpu, "")}, stated

    from dsub.workflow.pipeline import RunOptions, prepare_maps_where_visible
    from dsub.cluster.runner import ClusterSpec
    from dsub.workflow.tasks import MapFiles

    said = []
    monkeypatch.setattr("dsub.workflow.pipeline.say", lambda options, line: said.append(line))
    maps = MapFiles(str(small["half_a"]), str(small["half_b"]), str(small["mask"]), 1.0, 32, 32)
    options = RunOptions(outdir=tmp_path, cluster=ClusterSpec(scheduler="slurm"))
    for device, tail in (("gpu", " of GPU memory"), ("auto", " of GPU memory on a GPU worker, less on a CPU one")):
        prepare_maps_where_visible(maps, SubtractionSettings(), options, 32, device)
        assert said.pop().endswith(f"(40³ transforms, about {gpu}{tail}).")


def test_a_rerun_with_nothing_to_compute_states_no_memory(small, tmp_path, monkeypatch, capsys):
    """The ``Memory:`` line is for a run that will start workers: a finished run rerun (and one with every chunk
    done, --keep-store) says it is finished and neither states nor checks memory; one with chunks left does both."""
    from dsub.workflow import resources, store

    outdir, kept = tmp_path / "out", tmp_path / "kept"
    assert main(subtract_args(small, outdir)) == 0
    assert main(subtract_args(small, kept, "--keep-store")) == 0
    assert capsys.readouterr().out.count("Memory: each worker needs about") == 2

    def refused(plan, *report):
        raise resources.NotEnoughMemoryError("no memory left (this run has nothing to compute: never asked)")

    monkeypatch.setattr(resources, "check_this_machine", refused)
    assert main(subtract_args(small, outdir)) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "Memory:" not in out, out
    assert main(subtract_args(small, kept, "--keep-store")) == 0
    out = capsys.readouterr().out
    assert "all already done: no worker started" in out and "Memory:" not in out, out
    # With chunks left (the store's record of one chunk removed) the memory is stated and checked again.
    store.reset_chunks(kept / store.STORE_NAME, [0])
    assert main(subtract_args(small, kept, "--keep-store")) == 2
    captured = capsys.readouterr()
    assert "Memory: each worker needs about" in captured.out
    assert "no memory left" in captured.err


def test_a_rerun_with_every_chunk_done_starts_nothing_and_keeps_the_sample_fit(small, tmp_path, monkeypatch, capsys):
    """A finished --keep-store run rerun (or one stopped in its export): no map prepared, no sample fit again."""
    import dsub.workflow.diagnostics as diagnostics
    import dsub.workflow.pipeline as pipeline

    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    first = json.loads((outdir / "dsub_run.json").read_text())
    def star_rows():  # the star without its header comment (which has the time it was written)
        return [line for line in (outdir / "particles_subtracted.star").read_text().splitlines()
                if not line.startswith("#")]

    star = star_rows()
    stacks = {path.name: path.read_bytes() for path in (outdir / "Particles").iterdir()}
    capsys.readouterr()

    def not_again(*args, **kwargs):
        raise AssertionError("nothing is left to compute")

    monkeypatch.setattr(pipeline, "half_map_models", not_again)
    monkeypatch.setattr(diagnostics, "sample_task", not_again)
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    out = capsys.readouterr().out
    assert "all already done: no worker started and no map prepared" in out
    assert re.search(r"Subtracted \d+ particles in [\d.]+ s over 2 attempts", out), out
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["diagnostics"]["sample"] == first["diagnostics"]["sample"]
    assert summary["attempts"][1]["status"] == "finished" and summary["attempts"][1]["chunks_done"] == 0
    assert star_rows() == star
    assert {path.name: path.read_bytes() for path in (outdir / "Particles").iterdir()} == stacks


@pytest.mark.parametrize("failure", ["disk full", "memory", "thread", "library"])
def test_failed_attempt_is_recorded_with_its_error(small, tmp_path, monkeypatch, capsys, failure):
    """The attempt in dsub_run.json and dsub.log hold the very line the command printed, also for running out of
    memory, threads or address space (a library the loader cannot map)."""
    import dsub.workflow.export as export

    def broken(*args, **kwargs):
        raise {"disk full": OSError(28, "No space left on device", str(tmp_path / "out" / "x")),
               "memory": MemoryError("Unable to allocate 8.00 MiB for an array"),
               "thread": RuntimeError("can't start new thread"),
               "library": ImportError("/x/_qhull.so: failed to map segment from shared object")}[failure]

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", broken)
        assert main(subtract_args(small, outdir)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dsub: error:") and "\n" not in error and "Error:" not in error, error
    assert error in (outdir / "dsub.log").read_text()
    assert main(subtract_args(small, outdir)) == 0
    failed, finished = json.loads((outdir / "dsub_run.json").read_text())["attempts"]
    assert failed["status"] == "failed" and failed["error"] == error and failed["chunks_done"] == 3
    assert finished["status"] == "finished" and finished["chunks_done"] == 0


# ----------------------------------------------------------------------------- refusals


def refusal(paths, outdir, capsys, *extra) -> str:
    capsys.readouterr()
    assert main(subtract_args(paths, outdir, *extra)) == 2
    return capsys.readouterr().err.strip()


def test_refusal_says_which_values_dsub_chose_itself(small, tmp_path, capsys):
    """A first run without --chunk-size (dsub cut the set into one chunk per thread), then one with it."""
    outdir = tmp_path / "out"
    first = [arg for arg in subtract_args(small, outdir) if arg not in ("--chunk-size", "8")]
    assert main(first + ["--workers", "2"]) == 0
    chosen = json.loads((outdir / "dsub_run.json").read_text())["chunks_total"]
    assert chosen == 2  # one chunk per thread
    line = refusal(small, outdir, capsys)  # --chunk-size 8 now
    assert re.search(r"--chunk-size was \d+ \(chosen by dsub for that run\), now 8\.", line), line
    line = refusal(small, outdir, capsys, "--chunk-size", "12")  # the stacks' default follows: not named again
    assert re.search(r"--chunk-size was \d+ \(chosen by dsub for that run\), now 12\.", line), line
    assert "--particles-per-stack" not in line, line
    line = refusal(small, outdir, capsys, "--chunk-size", "12", "--particles-per-stack", "100")  # given: named (rounded to chunks)
    assert "--particles-per-stack was 4096 (chosen by dsub for that run), now 96" in line, line
    given = tmp_path / "given"  # the user's own value is quoted as such
    assert main(subtract_args(small, given)) == 0
    line = refusal(small, given, capsys, "--chunk-size", "16")
    assert "--chunk-size was 8, now 16" in line and "chosen by dsub" not in line


def test_refusal_names_the_changed_parameter_and_input_file(small, tmp_path, capsys):
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0

    line = refusal(small, outdir, capsys, "--padding", "2", "--scale", "none")
    assert re.search(r"--padding was 1\.25, now 2\b", line) and "--scale was fit, now none" in line
    assert line.count("\n") == 0 and "--overwrite" in line
    # the earlier run's log keeps the refused command and its error line, after the run's own lines
    log = (outdir / "dsub.log").read_text().splitlines()
    headings = [index for index, text in enumerate(log) if text.startswith("==== ")]
    assert len(headings) == 2 and "--padding 2 --scale none" in log[headings[1]]
    assert log[-1] == line

    stat, mask = os.stat(small["half_a"]), os.stat(small["mask"])
    try:
        os.utime(small["half_a"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_600 * 10**9))  # touched an hour later
        os.utime(small["mask"], ns=(mask.st_atime_ns, mask.st_mtime_ns + 3_600 * 10**9))
        line = refusal(small, outdir, capsys, "--padding", "2")  # the maps' content is the same: not named
        assert re.search(r"--padding was 1\.25, now 2\.", line) and "--half-a" not in line, line
        assert main(subtract_args(small, outdir)) == 0
        out = capsys.readouterr().out
        assert f"--half-a {small['half_a'].resolve()}: its modification time changed since that run" in out
        assert "--half-b" not in out
    finally:
        os.utime(small["half_a"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.utime(small["mask"], ns=(mask.st_atime_ns, mask.st_mtime_ns))

    stack = os.stat(small["stack"])
    try:
        os.utime(small["stack"], ns=(stack.st_atime_ns, stack.st_mtime_ns + 10**9))
        line = refusal(small, outdir, capsys)
        assert f"particle stack changed since that run: {small['stack'].resolve()} (modified " in line
        assert " → " in line.split("(modified ")[1]  # before and after
    finally:
        os.utime(small["stack"], ns=(stack.st_atime_ns, stack.st_mtime_ns))
    assert main(subtract_args(small, outdir)) == 0  # all back as it was: the same run, resumed



class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_bar_and_the_log_plain_lines():
    clock, screen, log = FakeClock(), Terminal(), io.StringIO()
    shown = Progress("subtract", [50] * 4, screen, waiting="preparing the maps", extra_logs=[log], clock=clock)
    for index in range(4):
        clock.now += 30
        shown.task_done(index)
    shown.close()
    assert "\r" in screen.getvalue() and "preparing the maps" in screen.getvalue()
    assert "200/200" in screen.getvalue() and "chunks 4/4" in screen.getvalue()
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines()[-1] == "subtract: 4 chunks, 200 particles in 120.0 s, 1.7 particles/s"


def test_a_terminal_of_no_width_gets_plain_lines():
    """Under ``script`` without a size the terminal is 0 columns wide, where a bar drew only blank lines."""
    import fcntl
    import struct
    import termios

    from dsub.cluster.progress import is_terminal

    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))
        assert terminal.isatty() and not is_terminal(terminal)
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert is_terminal(terminal)
    os.close(leader)
    assert is_terminal(Terminal())  # a stand-in without a descriptor: a bar, as before


def test_the_bar_counts_its_rate_from_the_start_too(monkeypatch):
    """tqdm's own rate and time left are the average since the start, not a smoothed average of update gaps."""
    import tqdm.std

    clock, screen = FakeClock(), Terminal()
    monkeypatch.setattr(tqdm.std, "time", clock)  # the bar's clock
    shown = Progress("subtract", [250] * 4, screen, clock=clock)
    clock.now += 8.6
    shown.task_done(0)
    clock.now += 0.01
    shown.task_done(1)
    assert "500/1000 [00:08<00:08, 58.07particle/s, chunks 2/4]" in str(shown.bar)
    shown.close()


def test_a_phase_that_fails_does_not_end_with_a_complete_looking_line():
    clock, out = FakeClock(), io.StringIO()
    shown = Progress("subtract", [10] * 4, out, clock=clock)
    clock.now += 4
    shown.task_done(0)
    shown.close(completed=False)
    assert out.getvalue().splitlines()[-1].startswith("subtract: chunks 1/4") and out.getvalue().endswith(
        ": stopped\n")


def test_interrupted_attempt_is_recorded(small, tmp_path, monkeypatch, capsys):
    import dsub.workflow.export as export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", interrupt)
        assert main(subtract_args(small, outdir)) == 130
    assert capsys.readouterr().err.strip() == "dsub: interrupted; rerun the same command to resume"
    assert (outdir / "dsub.log").read_text().splitlines()[-1] == "dsub: interrupted; rerun the same command to resume"
    assert main(subtract_args(small, outdir)) == 0
    interrupted, finished = json.loads((outdir / "dsub_run.json").read_text())["attempts"]
    assert interrupted["status"] == "interrupted" and interrupted["chunks_done"] == 3
    assert finished["chunks_done_before"] == 3


OVERWRITE_STOP = ("dsub: interrupted; rerun the command without --overwrite to resume (the same command with "
                  "--overwrite starts over)")


def test_a_run_with_overwrite_that_is_stopped_says_to_resume_without_it(small, tmp_path, monkeypatch, capsys):
    """The same command with --overwrite would delete the finished chunks again: the line says to leave it out,
    and the rerun without it resumes them."""
    import dsub.workflow.export as export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", interrupt)
        assert main(subtract_args(small, outdir, "--overwrite")) == 130
    assert capsys.readouterr().err.strip() == OVERWRITE_STOP
    assert (outdir / "dsub.log").read_text().splitlines()[-1] == OVERWRITE_STOP
    assert main(subtract_args(small, outdir)) == 0
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 3
    assert [attempt["status"] for attempt in summary["attempts"]] == ["interrupted", "finished"]
    assert summary["attempts"][0]["error"] == OVERWRITE_STOP


def test_a_run_with_overwrite_stopped_by_sigterm_says_the_same(small, tmp_path, monkeypatch, capsys):
    import signal

    import dsub.workflow.export as export

    def preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", preempted)
        assert main(subtract_args(small, outdir, "--overwrite")) == 143
    line = capsys.readouterr().err.strip()
    assert line.startswith("dsub: stopped by SIGTERM") and line.endswith(
        "rerun the command without --overwrite to resume (the same command with --overwrite starts over)"), line


def test_a_run_with_overwrite_stopped_before_its_store_says_to_start(small, tmp_path, monkeypatch, capsys):
    """Stopped while its inputs are checked, an --overwrite run over an earlier run's results has written nothing:
    the same command starts it, and the earlier results are still there."""
    import dsub.workflow.validate as validate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(validate, "check_images", interrupt)
        assert main(subtract_args(small, outdir, "--overwrite", "--padding", "2")) == 130
    line = capsys.readouterr().err.strip()
    assert line == "dsub: interrupted before anything was written; rerun the command to start"
    assert (outdir / "particles_subtracted.star").is_file()


def outputs_of(outdir) -> dict:
    """Every file in OUTDIR but the lock and log, by path relative to it: its bytes."""
    return {str(path.relative_to(outdir)): path.read_bytes() for path in sorted(outdir.rglob("*"))
            if path.is_file() and path.name not in (".dsub.lock", "dsub.log")}


def test_ctrl_c_of_an_overwrite_run_as_it_starts_leaves_the_earlier_results_whole(small, tmp_path, capsys):
    """Ctrl-C at the ``Memory:`` line of a run with --overwrite over a finished run (as the map preparation
    begins, the line after it): the earlier results are all there, unchanged, as the line says, and the
    command without --overwrite finds them finished. (The earlier run's store and metadata were deleted as
    OUTDIR was examined, leaving its stacks alone, and the line said nothing was written.)"""
    import signal

    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    capsys.readouterr()
    before = outputs_of(outdir)
    assert {"particles_subtracted.star", "particles_subtracted.cs", "dsub_run.json", "report/index.html",
            "Particles/subtracted_0000.mrcs", "subtracted.zarr/zarr.json"} <= set(before)
    command = [sys.executable, "-c", "from dsub.command import run; run()",
               *subtract_args(small, outdir, "--overwrite")]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = iter(run.stdout.readline, "")
    assert any(line.startswith("Memory:") for line in lines)
    assert next(lines).startswith("Preparing the maps")
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.strip().splitlines() == [
        "dsub: interrupted before anything was written; rerun the command to start"], err
    assert outputs_of(outdir) == before
    log = (outdir / "dsub.log").read_text()  # the earlier run's, this attempt's lines appended
    assert log.count("==== ") == 2 and "Subtracted 24 particles" in log.split("==== ")[1], log
    assert log.splitlines()[-1] == "dsub: interrupted before anything was written; rerun the command to start"
    assert main(subtract_args(small, outdir)) == 0
    assert "already holds" in capsys.readouterr().out
    assert outputs_of(outdir) == before


def overwrite_stopped_in(step: str, small, outdir, monkeypatch, capsys, module=None, stop=None) -> str:
    """A finished run in ``outdir``, then a different one with ``--overwrite`` stopped by Ctrl-C in
    ``module``'s (``dsub.workflow.export`` unless given) ``step`` (replaced by ``stop`` where given,
    else by a function that raises at once): its one stop line."""
    import dsub.workflow.export as export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    assert main(subtract_args(small, outdir)) == 0
    with monkeypatch.context() as patch:
        patch.setattr(module or export, step, stop or interrupt)
        assert main(subtract_args(small, outdir, "--overwrite", "--padding", "2")) == 130
    return capsys.readouterr().err.strip()


#: The stop line of an --overwrite run stopped after the earlier store was renamed aside, before its own had
#: its identity (``errors.EARLIER_REMOVED``).
NOTHING_LEFT = ("dsub: interrupted after the earlier results in the output folder were removed (--overwrite), before "
                "this run's store was written: nothing of either run is left to resume; rerun the command (with "
                "--overwrite) to start")


def test_an_overwrite_run_stopped_after_it_began_to_write_says_the_earlier_results_were_replaced(
        small, tmp_path, monkeypatch, capsys):
    outdir = tmp_path / "out"
    line = overwrite_stopped_in("write_metadata", small, outdir, monkeypatch, capsys)
    assert line == ("dsub: interrupted; the earlier results in the output folder were replaced by this run's: rerun "
                    "the command without --overwrite to resume (the same command with --overwrite starts over)")
    assert not (outdir / "particles_subtracted.star").exists() and not (outdir / "report").exists()
    log = (outdir / "dsub.log").read_text()  # this run's lines alone: the earlier run's went with its results
    assert log.startswith("==== ") and log.count("==== ") == 1 and "--padding 2" in log.splitlines()[0], log
    assert "Subtracted 24 particles" not in log and log.splitlines()[-1] == line
    assert main(subtract_args(small, outdir, "--padding", "2")) == 0
    assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == 3


def test_an_overwrite_run_stopped_while_it_removes_the_earlier_results_leaves_their_store(
        small, tmp_path, monkeypatch, capsys):
    """The metadata go first and the store last: stopped in between, OUTDIR holds the earlier run's store and
    stacks, no star; the line says so; the earlier command finishes that run again, the new one
    without --overwrite is refused as a different run, named."""
    outdir = tmp_path / "out"
    line = overwrite_stopped_in("remove_stacks", small, outdir, monkeypatch, capsys)
    assert line == ("dsub: interrupted while the earlier results in the output folder were removed (--overwrite), "
                    "before their store was: it is whole, and the command that made it finishes that run again; "
                    "rerun this command (with --overwrite) to start this run")
    assert (outdir / "subtracted.zarr").is_dir() and (outdir / "Particles" / "subtracted_0000.mrcs").is_file()
    assert not (outdir / "particles_subtracted.star").exists() and not (outdir / "dsub_run.json").exists()
    assert main(subtract_args(small, outdir, "--padding", "2")) == 2
    assert "holds the results of a different run: --padding was" in capsys.readouterr().err
    assert main(subtract_args(small, outdir)) == 0
    assert (outdir / "particles_subtracted.star").is_file()


def test_an_overwrite_run_stopped_just_before_it_renames_the_earlier_store_says_it_is_whole(
        small, tmp_path, monkeypatch, capsys):
    """The last moment of (a): the metadata and stacks removed, the store not yet renamed aside."""
    import dsub.workflow.pipeline as pipeline

    outdir = tmp_path / "out"
    line = overwrite_stopped_in("remove_store", small, outdir, monkeypatch, capsys, module=pipeline)
    assert "before their store was: it is whole" in line, line
    assert (outdir / "subtracted.zarr" / "zarr.json").is_file()
    assert not (outdir / "Particles" / "subtracted_0000.mrcs").exists()
    assert main(subtract_args(small, outdir)) == 0  # the earlier command computes the stacks again
    assert (outdir / "Particles" / "subtracted_0000.mrcs").is_file()


def test_an_overwrite_run_stopped_once_the_earlier_store_is_renamed_aside_says_nothing_is_left(
        small, tmp_path, monkeypatch, capsys):
    """(b): the earlier store renamed aside (not yet deleted), the new one not begun: nothing of either run."""
    import dsub.workflow.outdir as outdir_module
    import dsub.workflow.pipeline as pipeline

    def rename_then_stop(store_path):
        os.replace(store_path, Path(store_path).with_name(outdir_module.REMOVED_STORE_NAME))
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    line = overwrite_stopped_in("remove_store", small, outdir, monkeypatch, capsys, module=pipeline,
                                stop=rename_then_stop)
    assert line == NOTHING_LEFT
    assert not (outdir / "subtracted.zarr").exists() and not (outdir / "particles_subtracted.star").exists()
    assert main(subtract_args(small, outdir, "--overwrite", "--padding", "2")) == 0
    assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == 0
    assert not (outdir / outdir_module.REMOVED_STORE_NAME).exists()


def test_an_overwrite_run_stopped_while_it_creates_its_store_leaves_nothing_a_rerun_takes_for_a_run(
        small, tmp_path, monkeypatch, capsys):
    """(b) too: the new store has its group and some arrays but no identity yet (stopped in ``create_store``).
    The line says nothing is left; a rerun removes that store and says so: the earlier command is refused for
    what OUTDIR holds (named), the new one with --overwrite starts."""
    import zarr

    real = zarr.Group.create_array
    calls = []

    def stop_at_third_array(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    outdir = tmp_path / "out"
    line = overwrite_stopped_in("create_array", small, outdir, monkeypatch, capsys, module=zarr.Group,
                                stop=stop_at_third_array)
    assert line == NOTHING_LEFT
    store_path = outdir / "subtracted.zarr"
    assert (store_path / "zarr.json").is_file() and not (store_path / "chunk_done").exists()
    assert main(subtract_args(small, outdir)) == 2  # the earlier command: not "a different run"
    err = "".join(capsys.readouterr())
    assert f"dsub: {store_path}: a store whose creation was stopped (it records no run): nothing to resume, " \
           "removed." in err, err
    assert "holds a Particles/ folder (empty) but no dsub store" in err and "different run" not in err
    assert not store_path.exists()
    assert main(subtract_args(small, outdir, "--overwrite", "--padding", "2")) == 0
    assert json.loads((outdir / "dsub_run.json").read_text())["chunks_skipped"] == 0


def test_an_overwrite_run_stopped_once_its_store_has_its_identity_says_to_resume_without_overwrite(
        small, tmp_path, monkeypatch, capsys):
    """(c): stopped right after ``create_store`` wrote the new run's identity, before its attempt began: the
    store is this run's, which the rerun without --overwrite resumes; the earlier command is refused, named."""
    import dsub.workflow.pipeline as pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    line = overwrite_stopped_in("stacks_taken_up", small, outdir, monkeypatch, capsys, module=pipeline,
                                stop=interrupt)
    assert line == ("dsub: interrupted; the earlier results in the output folder were replaced by this run's: rerun "
                    "the command without --overwrite to resume (the same command with --overwrite starts over)")
    assert main(subtract_args(small, outdir)) == 2
    err = capsys.readouterr().err  # the store is this run's, stopped before any chunk: said so, and how to go on
    assert f"{outdir}: holds an unfinished run (0 of 3 chunks done) that differs from this one: --padding was 2" in err
    assert "Rerun that run's command (without --overwrite) to finish it" in err and "different run" not in err
    assert main(subtract_args(small, outdir, "--padding", "2")) == 0
    assert "--padding 2" in (outdir / "dsub.log").read_text()


def test_remove_store_takes_a_store_away_whole_and_what_an_earlier_stop_left(tmp_path):
    from dsub.workflow.outdir import REMOVED_STORE_NAME, remove_store

    store_path = tmp_path / "subtracted.zarr"
    (store_path / "chunk_done").mkdir(parents=True)
    (store_path / "zarr.json").write_text("{}")
    (tmp_path / REMOVED_STORE_NAME / "contrast").mkdir(parents=True)  # renamed, then stopped while deleted
    remove_store(store_path)
    assert os.listdir(tmp_path) == []
    remove_store(store_path)  # none there: nothing to do


def test_a_store_that_cannot_be_read_is_named_not_taken_for_a_different_run(tmp_path):
    from dsub.errors import OutputExistsError
    from dsub.workflow.outdir import prepare_outdir

    store_path = tmp_path / "subtracted.zarr"
    store_path.mkdir()
    (store_path / "zarr.json").write_text("{damaged")
    with pytest.raises(OutputExistsError, match=r"subtracted.zarr: this store cannot be read \(") as refused:
        prepare_outdir(tmp_path, "fingerprint", overwrite=False, identity={})
    assert "different run" not in str(refused.value) and store_path.is_dir()


def test_an_error_of_a_run_with_overwrite_says_to_resume_without_it(small, tmp_path, monkeypatch, capsys):
    import errno

    import dsub.workflow.export as export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "particles_subtracted.star"))

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", full)
        assert main(subtract_args(small, outdir, "--overwrite")) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "no space left on device" in line
    assert line.endswith("This command has --overwrite: rerun it without --overwrite to resume; with it, it starts "
                         "over.")


def test_a_requeued_batch_job_with_overwrite_resumes_the_run_it_began(small, tmp_path, monkeypatch, capsys):
    """A job script's command with --overwrite, run again by SLURM after a requeue (the same SLURM_JOB_ID,
    SLURM_RESTART_COUNT 1), resumes the job's own run; run again in the same job without a requeue (an
    interactive allocation), --overwrite starts over as it says."""
    import dsub.workflow.export as export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", interrupt)
        assert main(subtract_args(small, outdir, "--overwrite")) == 130
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setenv("SLURM_RESTART_COUNT", "1")
        assert main(subtract_args(small, outdir, "--overwrite")) == 0
    assert (f"dsub: this batch job (slurm:4242) was requeued and {outdir} holds the run it began: resuming it"
            in capsys.readouterr().out)
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 3
    assert [attempt["batch_job"] for attempt in summary["attempts"]] == ["slurm:4242"] * 2

    assert main(subtract_args(small, outdir, "--overwrite")) == 0  # no requeue: computed afresh
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 0 and len(summary["attempts"]) == 1


def test_sigterm_is_recorded_as_an_interrupted_attempt(small, tmp_path, monkeypatch, capsys):
    """A batch system's time limit or preemption sends SIGTERM: one line, exit 143, the attempt recorded."""
    import os
    import signal

    import dsub.workflow.export as export

    def preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the real signal, to dsub's own handler

    outdir = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(export, "write_metadata", preempted)
        assert main(subtract_args(small, outdir)) == 143
    line = capsys.readouterr().err.strip()
    assert line.startswith("dsub: stopped by SIGTERM") and line.endswith("rerun the same command to resume")
    assert (outdir / "dsub.log").read_text().splitlines()[-1] == line
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is put back
    assert main(subtract_args(small, outdir)) == 0
    stopped, finished = json.loads((outdir / "dsub_run.json").read_text())["attempts"]
    assert stopped["status"] == "interrupted" and stopped["chunks_done"] == 3
    assert finished["chunks_done_before"] == 3


def test_sigterm_in_importlibs_own_code_is_raised_once_out_of_it():
    """Raised where importlib holds the interpreter's import lock, ``Terminated`` could leave the lock held:
    dsub's handler puts it off, and it is raised a few milliseconds later, elsewhere."""
    import importlib.abc
    import signal
    import time

    from dsub.cli import terminate_on_sigterm
    from dsub.errors import Terminated

    frames = []

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "dsub_no_such_module":
                frames.append(sys._getframe(1))  # importlib's code, looking for the module
            return None

    sys.meta_path.insert(0, finder := Finder())
    try:
        with pytest.raises(ImportError):
            import dsub_no_such_module  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
    assert frames[0].f_code.co_filename == "<frozen importlib._bootstrap>"
    previous = terminate_on_sigterm()
    try:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frames[0])  # as Python calls it there: put off
        with pytest.raises(Terminated):
            for _ in range(200):
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_modification_times_that_differ_below_a_second_print_differently():
    from dsub.workflow.outdir import identity_differences

    earlier = {"path": "/data/half_A.mrc", "bytes": 10, "mtime_ns": 1_764_410_400_000_000_000}
    now = {**earlier, "mtime_ns": earlier["mtime_ns"] + 1_500}
    change, = identity_differences({"half_a": earlier}, {"half_a": now})
    before, after = change.split("(modified ")[1].rstrip(")").split(" → ")
    assert before == "2025-11-29T10:00:00.000000000+00:00" and after == "2025-11-29T10:00:00.000001500+00:00"


def test_small_memory_figures_are_never_zero():
    from dsub.cluster.progress import binary_size
    from dsub.workflow.resources import gigabytes

    assert binary_size(40 * 2**20) == "40 MiB" and binary_size(5.4 * 2**30) == "5.4 GiB"
    assert gigabytes(3e7) == "30 MB" and gigabytes(2.44e9) == "2.4 GB" and gigabytes(1e3) == "1 MB"


@pytest.mark.parametrize("stop, code, line", [
    ("SIGINT", 130, "dsub: interrupted before anything was written; rerun the command to start"),
    ("SIGTERM", 143, "dsub: stopped by SIGTERM (a batch system's time limit, a preemption or a cancel) before "
                     "anything was written; rerun the command to start"),
])
@pytest.mark.parametrize("delay_s", [0.05, 0.3])
def test_ctrl_c_while_dsub_loads_ends_in_one_line(small, tmp_path, delay_s, stop, code, line):
    """The console command loads its libraries after its own interrupt and SIGTERM handling is in place (a
    SIGTERM then had ended it without a word)."""
    import signal
    import time

    started = "import sys; print('started', file=sys.stderr, flush=True); from dsub.command import run; run()"
    command = [sys.executable, "-c", started, *subtract_args(small, tmp_path / "out")]
    # As from a terminal: SIGINT not ignored (a shell without job control starts `cmd &` with it ignored).
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert run.stderr.readline() == "started\n"  # Python is up (its own Ctrl-C handling too); dsub is loading
    time.sleep(delay_s)
    run.send_signal(getattr(signal, stop))
    _, err = run.communicate(timeout=120)
    assert run.returncode == code and "Traceback" not in err, err
    assert err.strip().splitlines() == [line]


@pytest.mark.parametrize("delay_s", [0.12, 0.2])
def test_ctrl_c_while_python_m_dsub_cli_loads_ends_in_one_line(small, tmp_path, delay_s):
    """``python -m dsub.cli`` is the ``dsub`` command: a Ctrl-C while it loads its libraries is one line too
    (it printed the import's traceback when the libraries were loaded before the command's handling)."""
    import signal
    import time

    command = [sys.executable, "-m", "dsub.cli", *subtract_args(small, tmp_path / "out")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay_s)  # Python is up, dsub's libraries loading (a few tenths of a second)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dsub: interrupted"), err


def test_a_sigint_ignored_from_the_start_stays_ignored(small, tmp_path):
    """A shell without job control starts `dsub ... &` with SIGINT ignored; dsub keeps it so (POSIX), as Python does."""
    import signal
    import time

    started = "import sys; print('started', file=sys.stderr, flush=True); from dsub.command import run; run()"
    command = [sys.executable, "-c", started, *subtract_args(small, tmp_path / "out")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert run.stderr.readline() == "started\n"
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert (tmp_path / "out" / "particles_subtracted.star").is_file()


def test_ctrl_c_while_the_arguments_are_read_ends_in_one_line(small, tmp_path):
    """A Ctrl-C after dsub has loaded but before ``main``'s own handling (building the parser) is one line too."""

    interrupted = ("import dsub.cli; dsub.cli.build_parser = lambda: (_ for _ in ()).throw(KeyboardInterrupt); "
                   "from dsub.command import run; run()")
    command = [sys.executable, "-c", interrupted, *subtract_args(small, tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 130 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == ["dsub: interrupted before anything was written; rerun the command to start"]
    assert not (tmp_path / "out").exists()


#: A ``python -c`` prelude: the first time importlib's weak-reference callback that drops a module's lock has
#: taken the global import lock (``_imp.acquire_lock()``, the line before its ``try``), the SIGINT handler in
#: place (once it is dsub's) is called there, as Python calls it when a Ctrl-C is pending as that call returns.
CTRL_C_AS_IMPORTLIB_TAKES_ITS_LOCK = """
import importlib._bootstrap as bootstrap, signal, sys, types
real = bootstrap._imp
proxy = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real) if not name.startswith("__")})
pending = [True]
def acquire_lock():
    real.acquire_lock()
    caller, handler = sys._getframe(1), signal.getsignal(signal.SIGINT)
    if pending and caller.f_code.co_name == "cb" and handler is not signal.default_int_handler:
        pending.clear()
        handler(signal.SIGINT, caller)
proxy.acquire_lock = acquire_lock
bootstrap._imp = proxy
"""


def test_ctrl_c_as_importlib_takes_the_import_lock_ends_in_one_line(small, tmp_path):
    """Raised there, the ``KeyboardInterrupt`` left the interpreter's import lock with the main thread and was
    dropped (a weak-reference callback): the run went on, deaf to Ctrl-C, and hung once a task thread imported."""
    code = CTRL_C_AS_IMPORTLIB_TAKES_ITS_LOCK + "from dsub.command import run; run()"
    command = [sys.executable, "-c", code, *subtract_args(small, tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 130, run.stderr
    assert run.stderr.strip().splitlines() == ["dsub: interrupted before anything was written; rerun the command to start"]


def test_ctrl_c_dropped_in_a_finalizer_is_taken_again(small, tmp_path):
    """A Ctrl-C whose ``KeyboardInterrupt`` is raised in a weak-reference callback (or a ``__del__``), which
    Python drops ("Exception ignored in ..."): the run stops all the same, in one line."""
    code = ("import os, signal, time, weakref, dsub.cli\n"
            "build_parser, references = dsub.cli.build_parser, []\n"
            "def parser_after_a_finalizer():\n"
            "    class Finalized: pass\n"
            "    finalized = Finalized()\n"
            "    references.append(weakref.ref(finalized, lambda ref: os.kill(os.getpid(), signal.SIGINT)))\n"
            "    del finalized  # the callback runs here, and the Ctrl-C's handler inside it\n"
            "    for _ in range(200):  # the stop is asked again within milliseconds: it ends this wait\n"
            "        time.sleep(0.01)\n"
            "    return build_parser()\n"
            "dsub.cli.build_parser = parser_after_a_finalizer\n"
            "from dsub.command import run; run()")
    command = [sys.executable, "-c", code, *subtract_args(small, tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 130, run.stderr
    assert run.stderr.strip().splitlines() == ["dsub: interrupted before anything was written; rerun the command to start"]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_put_off_in_importlibs_code_ends_a_wait_the_run_went_into_meanwhile(tmp_path):
    """Asked again as a signal, not as a flag that a thread blocked on a lock (waiting for a task) would
    only see once the lock is released."""
    code = ("import importlib.abc, signal, sys, threading\n"
            "from dsub.interrupts import stop_once_on_ctrl_c\n"
            "frames = []\n"
            "class Finder(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        frames.append(sys._getframe(1))  # importlib's code, looking for the module\n"
            "sys.meta_path.insert(0, Finder())\n"
            "try:\n"
            "    import dsub_no_such_module\n"
            "except ImportError:\n"
            "    pass\n"
            "stop_once_on_ctrl_c()\n"
            "signal.getsignal(signal.SIGINT)(signal.SIGINT, frames[0])  # a Ctrl-C there: put off\n"
            "held = threading.Lock()\n"
            "held.acquire()\n"
            "try:\n"
            "    held.acquire()  # a wait that nothing but the stop ends\n"
            "except KeyboardInterrupt:\n"
            "    print('stopped')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout == "stopped\n", run.stderr


def test_ctrl_c_as_the_run_returns_does_not_say_that_nothing_was_written(small, tmp_path):
    """The results are written: the line says to rerun (which finds them finished), not to start again."""
    code = ("import dsub.cli\n"
            "run_subtract = dsub.cli.run_subtract\n"
            "def run_then_ctrl_c(args):\n"
            "    run_subtract(args)\n"
            "    raise KeyboardInterrupt  # as a Ctrl-C lands the moment the run returns\n"
            "dsub.cli.run_subtract = run_then_ctrl_c\n"
            "from dsub.command import run; run()")
    outdir = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", code, *subtract_args(small, outdir)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 130 and run.stderr.strip().splitlines() == [INTERRUPTED], run.stderr
    assert json.loads((outdir / "dsub_run.json").read_text())["attempts"][-1]["status"] == "finished"


def test_a_run_from_python_with_default_padding_is_the_same_run_as_the_command_line(small, tmp_path, capsys):
    """``dsub demo`` runs the pipeline with ``padding=None``; the command line says 1.25: the same run."""
    from dsub.physics.subtract import SubtractionSettings
    from dsub.workflow.pipeline import RunOptions, subtract

    outdir = tmp_path / "out"
    subtract(small["star"], small["half_a"], small["half_b"], small["mask"], SubtractionSettings(),
             RunOptions(outdir=outdir, chunk_size=8))
    capsys.readouterr()
    assert main(subtract_args(small, outdir)) == 0
    assert "already holds the finished results of this run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- attempts killed outright


def test_an_attempt_killed_outright_keeps_its_time_and_devices(tmp_path):
    """SIGKILL of the whole process group while the chunks run: the rerun records the killed attempt with
    its start (the command's), the end of its last recorded chunk and its devices, and counts its time."""
    import signal
    import time
    from datetime import datetime, timezone

    from dsub.workflow.store import saved_progress

    paths, _ = make_dataset(tmp_path / "data", count=2000, box=64, seed=7)
    outdir = tmp_path / "out"
    args = [*subtract_args(paths, outdir), "--chunk-size", "4", "--workers", "1", "--quiet"]
    launched = datetime.now(timezone.utc)
    run = subprocess.Popen([sys.executable, "-m", "dsub.cli", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    # The coordinator records finished chunks some at a time (at most a second apart while chunks finish):
    # their marks, then the attempt's progress (time, chunks, devices), which is what a kill leaves.
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and run.poll() is None:
        progress = saved_progress(outdir / "subtracted.zarr")
        if progress is not None and progress["chunks_done"] >= 3:
            break
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before it could be killed"
    assert progress is not None and progress["chunks_done"] >= 3, progress
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    killed_at = datetime.now(timezone.utc)

    rerun = subprocess.run([sys.executable, "-m", "dsub.cli", *args], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert len(summary["attempts"]) == 2, (summary["attempts"], rerun.stdout)
    killed, resumed = summary["attempts"]
    started, ended = (datetime.fromisoformat(killed[key]) for key in ("started", "ended"))
    recorded = datetime.fromisoformat(progress["last_update"])  # a recorded chunk's time, seen before the kill
    assert killed["status"] == "stopped" and killed["pid"] == run.pid and killed["devices"] == ["cpu"]
    # From the command's start to its last recorded chunk (times to the millisecond, rounded down).
    assert launched <= started < recorded <= ended <= killed_at
    assert killed["seconds"] == pytest.approx((ended - started).total_seconds(), abs=1e-3)
    assert killed["chunks_done"] == summary["chunks_skipped"] >= progress["chunks_done"]
    assert summary["seconds"] == round(killed["seconds"] + resumed["seconds"], 3)
    total = re.search(r"Subtracted 2000 particles in ([\d.]+) s over 2 attempts", rerun.stdout)
    assert total and total.group(1) == f"{summary['seconds']:.1f}", rerun.stdout


def test_a_stack_lost_from_a_finished_run_is_named_and_the_run_keeps_its_history(small, tmp_path, capsys):
    """The finished run kept no images in its store: the rerun says which stack is gone before computing
    everything again, and the run record keeps the first run's attempt beside the new one."""
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    first, = json.loads((outdir / "dsub_run.json").read_text())["attempts"]
    stack = outdir / "Particles" / "subtracted_0000.mrcs"
    stack.unlink()
    capsys.readouterr()
    assert main(subtract_args(small, outdir)) == 0
    lines = capsys.readouterr().out.splitlines()
    why = lines.index(f"dsub: {stack} of the finished run is missing and its images are not kept (--keep-store): "
                      "computing all 24 particles again.")
    work = next(i for i, line in enumerate(lines) if line.startswith("dsub: 24 particles of 32 px in 3 chunks"))
    assert why < work and "(0 already done)" in lines[work]
    summary = json.loads((outdir / "dsub_run.json").read_text())
    earlier, again = summary["attempts"]
    assert earlier == first
    assert again["attempt"] == 2 and again["status"] == "finished" and again["chunks_done"] == 3
    assert again["afresh"] == f"{stack} of the finished run is missing and its images are not kept (--keep-store)"
    assert summary["seconds"] == round(earlier["seconds"] + again["seconds"], 3)
    assert stack.is_file()


def test_a_stack_cut_short_and_lost_metadata_are_named_too(tmp_path):
    from dsub.workflow.pipeline import lost_from_finished_run

    outdir = tmp_path / "out"
    (outdir / "Particles").mkdir(parents=True)
    for name in ("particles_subtracted.star", "particles_subtracted.cs", "dsub_run.json"):
        (outdir / name).write_text("x")
    (outdir / "Particles" / "subtracted_0000.mrcs").write_bytes(b"x" * 100)
    stacks = {"Particles/subtracted_0000.mrcs": 100}
    assert lost_from_finished_run(outdir, stacks) is None
    (outdir / "Particles" / "subtracted_0000.mrcs").write_bytes(b"x" * 40)
    assert lost_from_finished_run(outdir, stacks) == (
        f"{outdir}/Particles/subtracted_0000.mrcs of the finished run is cut short (40 of 100 bytes) and its "
        "images are not kept (--keep-store)")
    (outdir / "Particles" / "subtracted_0000.mrcs").write_bytes(b"x" * 100)
    (outdir / "particles_subtracted.star").unlink()
    assert lost_from_finished_run(outdir, stacks) is None  # written again from the store: dsub_run.json is there
    (outdir / "dsub_run.json").unlink()  # the export's completion is not recorded: nothing can be trusted
    assert lost_from_finished_run(outdir, stacks) == (
        f"{outdir}/particles_subtracted.star, {outdir}/dsub_run.json of the finished run are missing or not of the "
        "size written")


def test_a_finished_runs_lost_star_and_cs_are_written_again_without_computing(small, tmp_path, capsys):
    """The stacks and dsub_run.json are there: the star and .cs come back from the store, no image computed."""
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    star, cs = outdir / "particles_subtracted.star", outdir / "particles_subtracted.cs"
    def contents():  # the star less its "# Created by ... at" line
        return {path: b"".join(line for line in path.read_bytes().splitlines(keepends=True)
                                if not line.startswith(b"# ")) for path in (star, cs)}

    before = contents()
    stacks = {path: path.stat().st_mtime_ns for path in (outdir / "Particles").glob("*.mrcs")}
    for path in (star, cs):
        path.unlink()
    capsys.readouterr()
    assert main(subtract_args(small, outdir)) == 0
    out = capsys.readouterr().out
    assert (f"dsub: {outdir} already holds the finished results of this run (particles_subtracted.star and "
            "particles_subtracted.cs were missing); particles_subtracted.star and particles_subtracted.cs written "
            "again") in out, out
    assert "no image computed again" in out
    assert contents() == before  # the same files
    assert {path: path.stat().st_mtime_ns for path in stacks} == stacks  # the stacks untouched


# ----------------------------------------------------------------------------- maps touched, not changed


def test_a_map_whose_time_alone_changed_resumes_and_one_whose_content_changed_is_refused(tmp_path, capsys):
    """``touch mask.mrc`` (or a copy without -p): same content, the run resumes and says so; other content of
    the same size is refused as before; a store without content hashes (an earlier dsub) refuses a touch."""
    import zarr

    paths, _ = make_dataset(tmp_path / "data", count=24, box=32, seed=3)
    outdir = tmp_path / "out"
    assert main(subtract_args(paths, outdir)) == 0
    mask = paths["mask"]

    def touch(path, seconds):
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))

    touch(mask, 3600)
    capsys.readouterr()
    assert main(subtract_args(paths, outdir)) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "its modification time changed" in line)
    assert re.fullmatch(rf"dsub: --mask {re.escape(str(mask.resolve()))}: its modification time changed since "
                        r"that run \(\S+ → \S+\), its content did not: resuming\.", line), line
    assert "already holds the finished results of this run" in out
    assert main(subtract_args(paths, outdir)) == 0  # the store took the new time: nothing more to say
    assert "modification time changed" not in capsys.readouterr().out

    with open(mask, "r+b") as file:  # other content, same size: a label in the MRC header
        file.seek(300)
        file.write(b"edited")
    touch(mask, 60)
    line = refusal(paths, outdir, capsys)
    assert f"--mask {mask.resolve()} has changed since that run (modified " in line and "--overwrite" in line

    fresh = tmp_path / "fresh"
    assert main(subtract_args(paths, fresh)) == 0
    group = zarr.open_group(str(fresh / "subtracted.zarr"), mode="r+")
    run = dict(group.attrs["run"])
    assert all(len(run[name]["blake2b"]) == 64 for name in ("half_a", "half_b", "mask"))
    assert "blake2b" not in str(run["stacks"]) and "blake2b" not in str(run["particles"])
    group.attrs["run"] = {**run, **{name: {key: value for key, value in run[name].items() if key != "blake2b"}
                                    for name in ("half_a", "half_b", "mask")}}  # as an earlier dsub wrote it
    assert main(subtract_args(paths, fresh)) == 0  # the same fingerprint without hashes: still this run
    touch(paths["half_b"], 5)
    line = refusal(paths, fresh, capsys)
    assert f"--half-b {paths['half_b'].resolve()} has changed since that run (modified " in line


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_before_anything_is_written_says_so(small, tmp_path, monkeypatch, capsys, signal_name):
    """Stopped during the sample fit (OUTDIR made, locked, logged; no store yet): the folder goes again, and the
    line says that nothing was written rather than to resume."""
    import signal

    import dsub.workflow.diagnostics as diagnostics

    def stop(*args, **kwargs):
        assert (tmp_path / "out" / ".dsub.lock").is_file()  # OUTDIR is made and locked by now
        if signal_name == "SIGINT":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(diagnostics, "sample_task", stop)
        assert main(subtract_args(small, outdir)) == (130 if signal_name == "SIGINT" else 143)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("before anything was written; rerun the command to start"), line
    assert line.startswith("dsub: interrupted" if signal_name == "SIGINT" else "dsub: stopped by SIGTERM")
    assert not outdir.exists()


def test_a_stop_while_the_report_is_drawn_says_the_results_are_complete(small, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the QC report is drawn: the star, .cs and stacks are complete and the record says finished;
    the line says so and how to draw the report, not to resume."""
    import dsub.report as report_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(report_module, "write_report", stop)
        assert main(subtract_args(small, outdir)) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"dsub: interrupted while the QC report was drawn; the results in {outdir} are complete (star, "
                    f".cs, stacks). Draw the report with: dsub report {outdir}")
    assert (outdir / "particles_subtracted.star").is_file() and (outdir / "particles_subtracted.cs").is_file()
    assert json.loads((outdir / "dsub_run.json").read_text())["attempts"][-1]["status"] == "finished"


def test_a_stop_that_lands_after_the_report_is_in_place_says_the_report_is_complete(small, tmp_path, monkeypatch,
                                                                                      capsys):
    """A Ctrl-C put off until the report was moved into place (never inside an import) said "interrupted while
    the QC report was drawn" beside a whole report/index.html: the line now says the report is complete."""
    import dsub.report as report_module

    real = report_module.write_report

    def drawn_then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(report_module, "write_report", drawn_then_stopped)
        assert main(subtract_args(small, outdir)) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"dsub: interrupted as the run ended; the results in {outdir} are complete (star, .cs, "
                    "stacks), and so is its QC report.")
    assert (outdir / "report" / "index.html").is_file()


def test_a_rerun_draws_a_report_that_a_stop_left_undrawn(small, tmp_path, monkeypatch, capsys):
    import dsub.report as report_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    outdir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(report_module, "write_report", stop)
        assert main(subtract_args(small, outdir)) == 130
    assert not (outdir / "report" / "index.html").exists()
    (outdir / "report").mkdir(exist_ok=True)  # a folder without its page is no report
    capsys.readouterr()
    assert main(subtract_args(small, outdir)) == 0
    assert "already holds the finished results" in capsys.readouterr().out
    assert (outdir / "report" / "index.html").is_file()


#: Runs dsub with a kill -9 of itself (``os._exit``: nothing after it runs, no cleanup) right after ``TARGET``.
KILLED_IN_EXPORT = """
import os, sys
from dsub.formats import star
from dsub.workflow import export

def killed_after(module, name, when=lambda *args: True):
    real = getattr(module, name)
    def then_killed(*args, **kwargs):
        real(*args, **kwargs)
        if when(*args):
            os._exit(9)
    setattr(module, name, then_killed)

TARGET
from dsub.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("after", ["star", "publish"])
def test_kill_9_in_the_export_leaves_no_record_and_the_rerun_finishes(small, tmp_path, after):
    """kill -9 once the star was written left a complete particles_subtracted.star (and final-named stacks)
    without .cs or dsub_run.json. The star and .cs are now written aside and moved in with the record last:
    killed before that, OUTDIR holds neither star nor record; the rerun finishes the export."""
    outdir = tmp_path / "out"
    target = {"star": 'killed_after(star, "write_particles", lambda table, path, *rest: path.name == "particles_subtracted.star")',
              "publish": 'killed_after(export, "publish_metadata")'}[after]
    script = KILLED_IN_EXPORT.replace("TARGET", target)
    done = subprocess.run([sys.executable, "-c", script, *subtract_args(small, outdir, "--quiet")],
                          capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    if after == "star":
        assert not (outdir / "particles_subtracted.star").exists()
        assert not (outdir / "particles_subtracted.cs").exists() and not (outdir / "dsub_run.json").exists()
    else:
        assert (outdir / "particles_subtracted.star").is_file() and (outdir / "dsub_run.json").is_file()
    assert main(subtract_args(small, outdir, "--quiet")) == 0
    assert len(starfile.read(outdir / "particles_subtracted.star")["particles"]) == 24
    assert (outdir / "particles_subtracted.cs").is_file() and (outdir / "dsub_run.json").is_file()
    assert not (outdir / ".metadata.partial").exists()


def test_a_particles_folder_of_the_users_own_is_named_and_kept_by_overwrite(small, tmp_path, capsys):
    outdir = tmp_path / "out"
    (outdir / "Particles").mkdir(parents=True)
    (outdir / "Particles" / "mine.mrcs").write_bytes(b"my own stack")
    line = refusal(small, outdir, capsys)
    assert line.startswith(f"dsub: error: {outdir}: holds a Particles/ folder (mine.mrcs) but no dsub store "
                           "(subtracted.zarr): no run of dsub to resume"), line
    assert "without --overwrite" in line and "leaves any other in place" in line
    assert main(subtract_args(small, outdir, "--overwrite")) == 0
    assert (outdir / "Particles" / "mine.mrcs").read_bytes() == b"my own stack"  # what the line promised
    assert (outdir / "Particles" / "subtracted_0000.mrcs").is_file()

    other = tmp_path / "other"
    other.mkdir()
    (other / "particles_subtracted.star").write_text("results of an earlier run\n")
    line = refusal(small, other, capsys)
    assert f"{other}: holds particles_subtracted.star but no dsub store" in line


def test_the_line_for_maps_of_another_box_says_what_is_done_to_them():
    from dsub.workflow.pipeline import maps_to_box_line

    head = "Maps of 128 voxels at 1.0000 Å brought to the particles' 256 px box: "
    assert maps_to_box_line(128, 256, 256, 1.0) == head + (
        "zero-padded about their centre to the 256 voxels that the particles' box spans, at their own voxel size "
        "(no resampling).")
    assert maps_to_box_line(400, 256, 256, 1.0) == head.replace("128", "400") + (
        "cropped to the 256 voxels about their centre that the particles' box spans, at their own voxel size "
        "(no resampling).")
    assert maps_to_box_line(128, 256, 200, 1.0) == head + (
        "zero-padded about their centre to the 200 voxels that the particles' box spans, then resampled to 256 "
        "voxels of 0.7812 Å.")
    assert maps_to_box_line(200, 256, 200, 1.0) == head.replace("128", "200") + "resampled to 256 voxels of 0.7812 Å."


@pytest.mark.parametrize("option, value, expected", [
    ("--particles", "0", "dsub: error: --particles must be at least 1, not 0"),
    ("--box", "16", "dsub: error: --box must be at least 24 pixels for the demo"),
    ("--box", "33", "dsub: error: --box 33 is odd; RELION and cryoSPARC work with even boxes: use 32 or 34"),
])
def test_demo_checks_its_values_before_simulating(tmp_path, capsys, option, value, expected):
    assert main(["demo", "-o", str(tmp_path / "demo"), option, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(expected) and "Traceback" not in captured.err
    assert "Simulating" not in captured.out and not (tmp_path / "demo").exists()


def test_demo_refuses_an_output_that_is_a_file_before_simulating(tmp_path, capsys):
    taken = tmp_path / "afile"
    taken.write_text("not a folder")
    for outdir in (taken, taken / "inside"):
        assert main(["demo", "-o", str(outdir)]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip() == (f"dsub: error: -o {outdir}: {taken} is a file, not a folder: give a folder for "
                                        "the demo's data and results")
        assert "Simulating" not in captured.out
    assert taken.read_text() == "not a folder"


def test_changed_passthrough_file_is_named_with_its_size_and_time_before_and_after():
    """As for a changed particle stack: the file, then its size and time before → after; no Python repr."""
    from dsub.workflow.outdir import identity_differences

    earlier = {"path": "/data/J15_passthrough_particles.cs", "bytes": 344_332, "mtime_ns": 1_796_032_665_915_993_812}
    now = {**earlier, "bytes": 344_400, "mtime_ns": earlier["mtime_ns"] + 10**9}
    change, = identity_differences({"passthrough": [earlier]}, {"passthrough": [now]})
    assert change.startswith("passthrough file changed since that run: /data/J15_passthrough_particles.cs (")
    assert "344 332 → 344 400 bytes" in change and change.count(" → ") == 2, change
    assert "{" not in change and "mtime_ns" not in change
    other = {**earlier, "path": "/data/J16_passthrough_particles.cs"}
    added, gone = identity_differences({"passthrough": [earlier]}, {"passthrough": [other]})
    assert added == "passthrough file new: /data/J16_passthrough_particles.cs"
    assert gone == "passthrough file no longer used: /data/J15_passthrough_particles.cs"


def test_a_project_moved_as_a_whole_resumes_as_the_same_run(tmp_path, capsys):
    """Inputs and OUTDIR moved together (``mv`` of the project folder): the same files under another folder are
    the same run; the store takes the new paths. A stack changed on the way makes it a different run."""
    import dsub.workflow.export as export

    project = tmp_path / "P3"
    paths, _ = make_dataset(project / "data", count=24, box=32, seed=3)
    outdir = project / "out"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    original = export.write_metadata
    export.write_metadata = interrupt  # the chunks are done, the metadata not: a resume is left
    try:
        assert main(subtract_args(paths, outdir)) == 130
    finally:
        export.write_metadata = original
    capsys.readouterr()
    moved = tmp_path / "elsewhere" / "PX"
    moved.parent.mkdir()
    shutil.move(str(project), moved)
    moved_paths = {name: moved / Path(path).relative_to(project) for name, path in paths.items()}
    assert main(subtract_args(moved_paths, moved / "out")) == 0
    out = capsys.readouterr().out
    assert f"dsub: the inputs moved from {project} to {moved} since that run" in out, out
    summary = json.loads((moved / "out" / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 3  # every chunk resumed, none computed again
    assert (moved / "out" / "particles_subtracted.star").is_file()
    # moved back with one stack touched on the way: not the same files, so a different run
    shutil.move(str(moved), project)
    stack = Path(paths["stack"])
    os.utime(stack, ns=(stack.stat().st_atime_ns, stack.stat().st_mtime_ns + 10**9))
    assert main(subtract_args(paths, outdir)) == 2
    assert "holds the results of a different run" in capsys.readouterr().err


def test_a_rerun_that_draws_the_missing_report_says_so(small, tmp_path, capsys):
    """A run stopped while its QC report was drawn left none (it is moved into place whole): the rerun draws it and
    says so, not that there is nothing to do."""
    import shutil

    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir)) == 0
    shutil.rmtree(outdir / "report")
    capsys.readouterr()
    assert main(subtract_args(small, outdir)) == 0
    out = capsys.readouterr().out
    assert "nothing to do" not in out, out
    assert "its QC report was missing: drawing it" in out, out
    assert (outdir / "report" / "index.html").is_file()
    assert main(subtract_args(small, outdir)) == 0  # with the report there: nothing to do
    out = capsys.readouterr().out
    assert "nothing to do" in out and "QC report" not in out, out


def test_a_stack_lost_from_a_finished_keep_store_run_is_said_and_written_again_from_the_store(small, tmp_path,
                                                                                             capsys):
    """--keep-store: the rerun writes the lost stack's images again from the store, the same bytes, and says so."""
    outdir = tmp_path / "out"
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    stack = outdir / "Particles" / "subtracted_0000.mrcs"
    before = stack.read_bytes()
    stack.unlink()
    capsys.readouterr()
    assert main(subtract_args(small, outdir, "--keep-store")) == 0
    out = capsys.readouterr().out
    assert ("Output stack Particles/subtracted_0000.mrcs was missing or not of full size: the 3 finished chunks "
            "with images in it are written again from the store (--keep-store).") in out, out
    assert stack.read_bytes() == before


def test_a_sigterm_in_a_slurm_job_with_overwrite_says_that_a_requeue_resumes(monkeypatch):
    """SLURM's requeue reruns the job's own command, --overwrite included, and that resumes the run it began."""
    from dsub.errors import Terminated, interrupted_line

    stopped = Terminated()
    stopped.overwrite_given = True
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    outside = interrupted_line(stopped)
    assert "rerun the command without --overwrite to resume" in outside and "requeue" not in outside
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert interrupted_line(stopped) == (f"{outside}; a job that SLURM requeues (--requeue, a preemption) resumes by "
                                         "itself, --overwrite and all")


def test_a_mistyped_option_is_named_with_the_nearest_one(capsys):
    """An option the command does not know: one line, the command's own help, and the option it is nearest to."""
    with pytest.raises(SystemExit) as stopped:
        main(["subtract", "p.star", "--half-a", "a.mrc", "--mask", "m.mrc", "-o", "out", "--chunksize", "5"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("dsub: error: unrecognized arguments: --chunksize (did you mean "
                                       "--chunk-size?) (see 'dsub subtract --help').\n")
    with pytest.raises(SystemExit):
        main(["demo", "surplus"])
    assert capsys.readouterr().err == "dsub: error: unrecognized arguments: surplus (see 'dsub demo --help').\n"


def test_a_mistyped_required_option_is_named_before_the_missing_one(capsys):
    """``--halfa`` for ``--half-a``: the mistyped option and the one meant, not argparse's "required: --half-a";
    and no option is taken from a prefix (``--mask-keep`` would have subtracted the other region)."""
    for typed, meant in (("--halfa", "--half-a"), ("--mask-keep", "--mask-keeps")):
        with pytest.raises(SystemExit) as stopped:
            main(["subtract", "p.star", typed, *(["a.mrc"] if typed == "--halfa" else []), "--mask", "m.mrc",
                  "-o", "out", *(["--half-a", "a.mrc"] if typed != "--halfa" else [])])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dsub: error: unrecognized arguments: {typed} (did you mean {meant}?)"), err


def test_words_after_a_double_dash_are_positionals_not_mistyped_options(capsys):
    """``-- --x.star``: argparse takes the word as the particles; the mistyped-option check leaves it alone."""
    assert main(["subtract", "--half-a", "a.mrc", "--mask", "m.mrc", "-o", "out", "--", "--x.star"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: --x.star: file not found (given as the particles)"), err


def test_changed_numbers_are_said_with_every_digit_given():
    from dsub.workflow.outdir import shown

    assert [shown(value) for value in (2.0000001, 2.0, 1.25, True, False, None, "fit", 16)] == [
        "2.0000001", "2", "1.25", "on", "off", "not given", "fit", "16"]


@pytest.mark.parametrize("argv", [[], ["--outdir", "out"]])
def test_no_command_is_one_line_naming_the_commands(capsys, argv):
    """A bare ``dsub`` (or options before any command) names the commands, not argparse's "required: command"."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("dsub: error: give a command first: subtract, job-script, report or demo "
                                       "(see 'dsub --help').\n")
