"""Worker resources: the memory and GPUs batch jobs ask for, refusals, and worker deaths in one line.

The SLURM tests need the single-node SLURM of ``make slurm-up`` (23 GB, two
stand-in GPUs) and are skipped without it.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsub.cli import main
from dsub.cluster.scripts import job_script
from dsub.demo import make_dataset
from dsub.physics.subtract import SubtractionSettings
from dsub.workflow import resources
from test_distributed import LOCAL_SLURM, needs_slurm

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "cluster"


def profile(tmp_path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_a_profile_without_gpu_lines_gets_one_gpu_per_worker(tmp_path):
    slurm = job_script("slurm", profile(tmp_path, "jobqueue:\n  slurm:\n    queue: gpu\n"))
    assert slurm.count("--gres=gpu:1") == 1
    pbs = job_script("pbs", profile(tmp_path, "jobqueue:\n  pbs:\n    queue: gpu\n    cores: 4\n"))
    assert "#PBS -l select=1:ncpus=4:ngpus=1:mem=8GB" in pbs
    torque = job_script("pbs", profile(tmp_path, "jobqueue:\n  pbs:\n    resource-spec: nodes=1:ppn=4\n"))
    assert "#PBS -l nodes=1:ppn=4:gpus=1" in torque


def test_the_profile_decides_gpus_when_it_says(tmp_path):
    typed = job_script("slurm", profile(tmp_path, 'jobqueue:\n  slurm:\n    job-extra-directives: ["--gpus=a100:2"]\n'))
    assert "--gpus=a100:2" in typed and "--gres" not in typed
    none = job_script("slurm", profile(tmp_path, "jobqueue:\n  slurm:\n    queue: cpu\ndsub:\n  gpus-per-worker: 0\n"))
    assert "gpu" not in none.replace("-p cpu", "")
    cpu = job_script("pbs", profile(tmp_path, "jobqueue:\n  pbs:\n    queue: cpu\n"), device="cpu")
    assert "gpus" not in cpu


def test_memory_request_is_raised_to_the_estimate_with_a_notice(tmp_path, capsys):
    assert main(["job-script", "--scheduler", "pbs", "--cluster-config", str(PROFILES / "pbspro-gpu.yaml"),
                 "--box", "400", "--padding", "4", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    needed = float(re.search(r"# Memory: each worker needs about ([\d.]+) GB of host memory", out).group(1))
    asked = int(re.search(r"#PBS -l select=1:ncpus=8:ngpus=1:mem=(\d+)GB", out).group(1))
    assert asked >= needed / 0.8 > 64  # below the share where Dask pauses a worker, above the profile's 64GB
    assert "gives each worker 64GB" in err and f"asks for {asked}GB instead" in err
    # The warning's figure is the Memory: line's, with the headroom said, not a second estimate.
    request = float(re.search(r"less than the ([\d.]+) GB this run asks of each worker job: the estimate of the "
                              r"Memory: line divided by 0.8, since Dask pauses a worker at 80% of its memory limit",
                              err).group(1))
    assert request == pytest.approx(needed / 0.8, abs=0.15)
    assert f"--memory-limit {asked}" not in out  # dask-jobqueue writes the limit in GiB
    assert re.search(r"--memory-limit [\d.]+GiB", out)


def test_a_profile_with_enough_memory_is_left_alone(capsys):
    assert main(["job-script", "--scheduler", "slurm", "--cluster-config", str(PROFILES / "slurm-gpu.yaml"),
                 "--box", "256"]) == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --mem=60G" in out and "--gres=gpu:1" in out  # 64 GB in dask-jobqueue's GiB
    (line,) = err.splitlines()  # only the profile's placeholder path is warned about, not its memory
    assert "still the example profile's placeholder" in line


def plan(scheduler="slurm", device="cpu", box=128, limit=None, padding=1.25, threads=1, gpu_possible=False):
    need = resources.worker_memory(box, SubtractionSettings(), device, threads, 256, 8)
    return resources.MemoryPlan(need=need, minimum=need, scheduler=scheduler,
                                log_directory="/scratch/dsub-worker-logs", worker_limit=limit, padding=padding,
                                gpu_possible=gpu_possible)


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_killed_worker_becomes_one_line_with_the_figures_and_the_logs():
    from distributed.scheduler import KilledWorker

    exc = KilledWorker("subtract-chunk-00003", "tcp://10.0.0.7:4242", allowed_failures=3)
    small = plan(box=400, limit=2e9)
    with pytest.raises(resources.WorkerLostError) as caught, resources.failures_explained(small):
        raise exc
    text = one_line(caught.value)
    assert "subtract-chunk-00003" in text and "died 4 time(s)" in text
    assert "each worker had 2.0 GB" in text and f"needs about {small.need.host_bytes / 1e9:.1f} GB" in text
    assert "Likely cause: the memory limit" in text
    assert "/scratch/dsub-worker-logs" in text and "rerun the same command to resume" in text


def test_memory_error_anywhere_becomes_one_line_with_the_estimate():
    threads = plan("threads")
    with pytest.raises(resources.NotEnoughMemoryError) as caught, resources.failures_explained(threads):
        raise MemoryError("Unable to allocate 6.59 GiB for an array with shape (960, 960, 960) and data type float64")
    text = one_line(caught.value)
    assert "Unable to allocate 6.59 GiB" in text
    assert f"each worker needs about {threads.need.host_bytes / 1e9:.1f} GB of host memory" in text
    assert "--padding" not in text  # at the leanest padding already


@pytest.mark.parametrize("failure", [
    MemoryError("Unable to allocate 1.00 GiB"),
    OSError(errno.ENOMEM, "Cannot allocate memory", "/data/stack.mrcs"),
    RuntimeError("can't start new thread"),
    ImportError("/venv/scipy/linalg/_fblas.so: failed to map segment from shared object"),
])
def test_out_of_memory_on_a_worker_names_it(failure):
    """Every way a worker's task runs out of memory or address space, raised on a known worker: the line names it
    and its task; raised where no worker was recorded for it (``runner.failed_on``), the line says so."""
    from dsub.cluster.runner import FailedOn

    failure.failed_on = FailedOn("subtract-chunk-00007", "tcp://10.0.0.7:4242")
    with pytest.raises(resources.NotEnoughMemoryError) as caught, resources.failures_explained(plan()):
        raise failure
    text = one_line(caught.value)
    assert text.startswith("worker tcp://10.0.0.7:4242 ran out of memory while computing subtract-chunk-00007 (")
    assert " ".join(str(failure).split()) in text and text.endswith("rerun the same command to resume.")
    failure.failed_on = FailedOn("sample-fit", None)
    with pytest.raises(resources.NotEnoughMemoryError) as caught, resources.failures_explained(plan()):
        raise failure
    assert one_line(caught.value).startswith("a worker ran out of memory while computing sample-fit (")


def test_other_failures_on_a_worker_pass_through():
    """Only running out of memory is turned into the memory line; any other OSError keeps its own handling."""
    from dsub.cluster.runner import FailedOn

    failure = OSError(errno.ENOSPC, "No space left on device", "/data/out/Particles/subtracted_0000.mrcs")
    failure.failed_on = FailedOn("subtract-chunk-00007", "tcp://10.0.0.7:4242")
    with pytest.raises(OSError) as caught, resources.failures_explained(plan()):
        raise failure
    assert caught.value is failure


ADVICE = ("--padding", "--workers", "--device gpu")


def test_memory_advice_names_only_what_applies(monkeypatch):
    """Lower --padding above 1.25, fewer --workers with more than one task at once, a GPU where there is one."""
    monkeypatch.setattr(resources, "host_memory_available", lambda threads_at_peak=0: 0)
    monkeypatch.setattr(resources, "memory_granted", lambda: (2_560_000_000, "the address-space limit (ulimit -v)"))
    cases = {  # (padding, tasks at once, a GPU to use): the advice expected
        (1.25, 1, False): (), (2.0, 1, False): ("--padding",), (1.25, 3, False): ("--workers",),
        (1.25, 1, True): ("--device gpu",), (2.0, 4, True): ADVICE,
    }
    for (padding, threads, gpu), expected in cases.items():
        lean = plan("threads", padding=padding, threads=threads, gpu_possible=gpu)
        with pytest.raises(resources.NotEnoughMemoryError) as caught:
            resources.check_this_machine(lean)
        text = one_line(caught.value)
        assert [word for word in ADVICE if word in text] == list(expected), (padding, threads, gpu, text)
        if padding > 1.25:
            assert "lower --padding (now 2; the default projector's 1.25 is the leanest)" in text.lower()
        if threads > 1:
            assert f"tasks at once, now {threads}" in text
        if not expected:  # nothing to change: what it needs, and what it got
            assert "Nothing in this run can be made leaner (padding 1.25, 1 task(s) at once" in text
            assert f"at least {lean.minimum.host_bytes / 1e9:.1f} GB of host memory" in text
            assert "of 2.6 GB under the address-space limit (ulimit -v)" in text
        with pytest.raises(resources.NotEnoughMemoryError) as caught, resources.failures_explained(lean):
            raise MemoryError("Unable to allocate 1.00 GiB")
        text = one_line(caught.value)
        assert [word for word in ADVICE if word in text] == list(expected), (padding, threads, gpu, text)
        if not expected:
            assert "this one got 2.6 GB, under the address-space limit (ulimit -v)" in text


def test_a_run_at_its_leanest_on_a_cpu_is_told_what_it_needs(tmp_path, monkeypatch, capsys):
    """``ulimit -v 2500000; dsub subtract ... --workers 1`` on a CPU machine: no advice it cannot follow."""
    paths, _ = make_dataset(tmp_path / "data", count=4, box=32, seed=4, snr=None)
    monkeypatch.setattr(resources, "host_memory_available", lambda threads_at_peak=0: 0)
    monkeypatch.setattr(resources, "gpu_possible", lambda scheduler: False)  # as on a machine without a GPU
    assert main(["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"), "--workers", "1", "--device", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsub: error: each worker needs about") and err.count("\n") == 1
    assert not any(word in err for word in ADVICE), err
    assert "Nothing in this run can be made leaner (padding 1.25, 1 task(s) at once, batches of 1)" in err


def test_worker_with_too_small_a_limit_is_refused_before_any_work():
    capacities = {"tcp://10.0.0.7:4242": {"device": "cpu", "host_limit": 2_000_000_000, "gpu_free": None,
                                          "threads": 1}}
    with pytest.raises(resources.NotEnoughMemoryError) as caught:
        resources.check_workers(plan(box=400), capacities, 400, SubtractionSettings(), 256)
    text = one_line(caught.value)
    assert "tcp://10.0.0.7:4242 has a memory limit of 2.0 GB" in text and "Raise 'memory'" in text
    capacities["tcp://10.0.0.7:4242"].update(device="gpu", gpu_free=1_000_000_000, host_limit=64_000_000_000)
    with pytest.raises(resources.NotEnoughMemoryError, match="GPU has 1.0 GB free"):
        resources.check_workers(plan(box=400), capacities, 400, SubtractionSettings(), 256)


def test_a_local_workers_limit_is_raised_with_local_remedies():
    capacities = {f"tcp://127.0.0.1:{port}": {"device": "cpu", "host_limit": 2_000_000_000, "gpu_free": None,
                                              "threads": 1} for port in (4242, 4243)}
    with pytest.raises(resources.NotEnoughMemoryError) as caught:
        resources.check_workers(plan("local", box=400), capacities, 400, SubtractionSettings(), 256)
    text = one_line(caught.value)
    assert "fewer --workers" in text and "--scheduler threads" in text and "Raise 'memory'" not in text
    assert "even with batches of one particle" not in text and "batches of 1)" in text  # said once


def test_worker_limit_is_checked_against_the_preparation_of_maps_of_another_box():
    """Maps far larger than the particles' box go through a large cube first: the check counts it."""
    capacities = {"tcp://10.0.0.7:4242": {"device": "cpu", "host_limit": 8_000_000_000, "gpu_free": None,
                                          "threads": 1}}
    at_the_box = plan(box=128)
    resources.check_workers(at_the_box, capacities, 128, SubtractionSettings(), 256)  # fits
    through_a_cube = dataclasses.replace(at_the_box, map_voxels=684)  # 45 B per voxel of 684³: 14 GB
    with pytest.raises(resources.NotEnoughMemoryError) as caught:
        resources.check_workers(through_a_cube, capacities, 128, SubtractionSettings(), 256)
    assert "has a memory limit of 8.0 GB" in one_line(caught.value)


def dsub(paths, outdir, *extra):
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "slurm", "--worker-timeout", "120", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(outdir).parent)


@needs_slurm
def test_local_profile_2gb_workers_run_a_box_128_data_set(tmp_path):
    paths, _ = make_dataset(tmp_path / "data", count=8, box=128, seed=4)
    result = dsub(paths, tmp_path / "out", "--cluster-config", str(LOCAL_SLURM), "--chunk-size", "4")
    assert result.returncode == 0, result.stderr
    needed = float(re.search(r"Memory: each worker needs about ([\d.]+) GB of host memory[^\n]*for box 128",
                             result.stdout).group(1))
    assert needed < 0.8 * 2.0 and "gives each worker 2GB" not in result.stderr  # the profile's 2 GB hold it
    assert (tmp_path / "out" / "particles_subtracted.star").exists()


@needs_slurm
def test_workers_too_small_for_the_job_end_in_one_line(tmp_path):
    paths, _ = make_dataset(tmp_path / "data", count=8, box=48, seed=4)
    # Padding 28 needs ~40 GB per worker: more than the node has, so SLURM cannot run the raised request.
    result = dsub(paths, tmp_path / "out", "--cluster-config", str(LOCAL_SLURM), "--padding", "28")
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("dsub: warning:")]
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and "Traceback" not in result.stderr
    assert "Requested node configuration is not available" in lines[0]
    assert re.search(r"Each job asks for \d+GB of memory", lines[0])
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


def project_slurm() -> bool:
    """Whether the SLURM here is the project's own single-node one (``make slurm-up``: cluster dsub-local), which a
    test may take partitions of down; never a site's."""
    result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    return result.returncode == 0 and re.search(r"^ClusterName\s*=\s*dsub-local$", result.stdout, re.M) is not None


@needs_slurm
def test_all_workers_lost_ends_in_one_line_and_keeps_finished_chunks(tmp_path):
    if not project_slurm():
        pytest.skip("takes a partition down: only on the project's own SLURM (make slurm-up)")
    from test_distributed import finished_chunks, wait_for_chunks

    # enough chunks of one particle (at about 250 a second) that the run outlasts the job's cancellation
    paths, _ = make_dataset(tmp_path / "data", count=1500, box=48, seed=7)
    outdir = tmp_path / "out"
    name = f"dsub-lost-{os.getpid()}"  # only this run's jobs are cancelled
    config = tmp_path / "named.yaml"
    config.write_text(LOCAL_SLURM.read_text().replace("  slurm:\n", f"  slurm:\n    name: {name}\n", 1))
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "slurm", "--workers", "1", "--chunk-size", "1",
               "--cluster-config", str(config), "--worker-timeout", "10"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for_chunks(run, outdir, 3)
    jobs = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert jobs, "no worker job of this run in the queue"
    # the node is lost: its partition takes no job (the replacement job dsub submits stays pending), and the
    # worker job ends
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True)
    try:
        subprocess.run(["scancel", *jobs], check=True)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:  # its pending replacement job is cancelled as it ends
            run.kill()
            run.wait()
            subprocess.run(["scancel", "-n", name], check=False)
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=True)
    assert run.returncode == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("dsub: warning:")]
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and "Traceback" not in err
    assert "every Dask worker was lost" in lines[0] and "Worker logs: /tmp/dsub-slurm/worker-logs" in lines[0]
    assert finished_chunks(outdir) >= 3 and not (outdir / "particles_subtracted.star").exists()


def test_killed_worker_on_a_local_cluster_ends_in_one_line(tmp_path, dask_workers):
    import signal

    import psutil

    from test_distributed import finished_chunks, wait_for_chunks

    paths, _ = make_dataset(tmp_path / "data", count=240, box=48, seed=7)
    outdir = tmp_path / "out"
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "local", "--workers", "1", "--chunk-size", "4"]
    # Dask gives up on a task at the first death of its worker, as it does after the nanny's third restart.
    environment = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env=environment)
    wait_for_chunks(run, outdir, 1)  # the first chunk is recorded at once, the next ones a second later
    workers = dask_workers(psutil.Process(run.pid))
    assert workers, "no worker process found"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)  # mid-task, as the kernel's or the nanny's memory killer does
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and "Traceback" not in err
    assert re.search(r"the workers running subtract-chunk-\d+ died 1 time\(s\)", lines[0])
    assert "Likely cause:" in lines[0] and "the estimate needs about" in lines[0]
    assert finished_chunks(outdir) >= 1 and not (outdir / "particles_subtracted.star").exists()


def test_local_workers_too_small_for_the_job_are_refused_as_they_join(tmp_path):
    import psutil

    paths, _ = make_dataset(tmp_path / "data", count=8, box=48, seed=4)
    # Distributed gives each of 2 local workers half of this machine's memory; choose a padding that needs more.
    padding = next(p for p in range(4, 40) if resources.worker_memory(
        48, SubtractionSettings(padding=p), "cpu", 1, 256, 1).host_bytes > 0.6 * psutil.virtual_memory().total)
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"),
               "--quiet", "--dashboard-address", "127.0.0.1:0", "--scheduler", "local", "--workers", "2",
               "--padding", str(padding), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and "Traceback" not in result.stderr
    assert re.search(r"but worker tcp://127\.0\.0\.1:\d+ has a memory limit of [\d.]+ GB", lines[0])
    assert "for box 48" in lines[0]
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


#: Loaded by each local worker at its start (``distributed.worker.preload``): chunk ``FAILING_CHUNK`` runs out of
#: memory on its worker once another chunk is recorded, as a worker under a low ``ulimit -v`` does.
OUT_OF_MEMORY_PRELOAD = '''
import errno, os, time
from pathlib import Path


def dask_setup(worker):
    from dsub.workflow import tasks

    failing, run_chunk = int(os.environ["FAILING_CHUNK"]), tasks.run_chunk

    def run_chunk_or_fail(chunk_index, start, particles, maps, settings, store_path, *rest, **options):
        if chunk_index != failing:
            return run_chunk(chunk_index, start, particles, maps, settings, store_path, *rest, **options)
        recorded = Path(store_path) / "chunk_done" / "c"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (recorded.is_dir() and any(recorded.iterdir())):
            time.sleep(0.05)
        if os.environ["FAILURE"] == "MemoryError":
            raise MemoryError("Unable to allocate 1.00 GiB for an array with shape (1024, 1024, 128) and data type "
                              "float64")
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM), str(Path(store_path).parent / "particles.mrcs"))

    tasks.run_chunk = run_chunk_or_fail
'''


@pytest.mark.parametrize("failure", ["MemoryError", "ENOMEM"])
def test_a_local_worker_out_of_memory_is_named_in_one_line(tmp_path, failure):
    """``ulimit -v`` low enough that a worker's task fails: one line names the worker and its chunk; a rerun resumes.

    A real limit hits the workers and the coordinator alike, wherever each
    allocates, so the worker's failure is made where it arrives: a
    ``MemoryError`` or an ``OSError`` with ``ENOMEM`` (``mmap`` of a stack)
    raised by one chunk's task on its worker, after another chunk finished.
    """
    from test_distributed import finished_chunks

    paths, _ = make_dataset(tmp_path / "data", count=60, box=32, seed=4)
    outdir = tmp_path / "out"
    preload = tmp_path / "out_of_memory_preload.py"
    preload.write_text(OUT_OF_MEMORY_PRELOAD)
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "local", "--workers", "2", "--chunk-size", "6",
               "--device", "cpu"]
    environment = {**os.environ, "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{preload}"]', "FAILING_CHUNK": "3",
                   "FAILURE": failure}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and "Traceback" not in result.stderr, result.stderr
    assert re.match(r"dsub: error: worker tcp://127\.0\.0\.1:\d+ ran out of memory while computing "
                    r"subtract-chunk-00003 \(", lines[0]), lines[0]
    said = "Unable to allocate 1.00 GiB" if failure == "MemoryError" else "[Errno 12] Cannot allocate memory"
    assert said in lines[0] and "each worker needs about" in lines[0]
    assert lines[0].endswith("Finished chunks are kept: rerun the same command to resume.")
    kept = finished_chunks(outdir)
    assert kept >= 1 and not (outdir / "particles_subtracted.star").exists()

    # The same command without the failure resumes from the finished chunks.
    del environment["DASK_DISTRIBUTED__WORKER__PRELOAD"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr
    done = int(re.search(r"in 10 chunks \((\d+) already done\)", result.stdout).group(1))
    assert done >= 1 and (outdir / "particles_subtracted.star").exists()


def test_a_workers_batches_stay_under_its_address_space_limit(monkeypatch):
    """A local worker's Dask memory limit is its share of the machine whatever ``ulimit -v`` allows (with
    ``--workers 1`` the whole machine): its batches must still fit the room under the address-space limit."""
    from dsub.workflow import tasks

    settings = SubtractionSettings()
    per_particle = resources.particle_bytes(64, settings, "cpu")
    room = 10 * per_particle  # left under ulimit -v, the threads still to start counted (host_memory_available)
    asked = []

    def available(threads_at_peak=0):
        asked.append(threads_at_peak)
        return room

    monkeypatch.setattr(tasks, "worker_threads_and_limit", lambda: (1, 100 * 10**9))  # 100 GB: the machine's share
    monkeypatch.setattr(resources, "host_memory_available", available)
    assert tasks.batch_size(64, settings, "cpu", 256) == int(tasks.BATCH_SHARE_OF_FREE * room // per_particle)
    assert asked == [resources.run_threads(1)]  # the worker's threads to come are counted


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limits as Linux enforces them")
def test_a_local_worker_under_a_real_address_space_limit_is_refused_before_any_work(tmp_path):
    """``ulimit -v`` of about 4 GB on the command, a run whose workers need far more (``--padding 24``: one
    transform of 3.4 GiB) while the coordinator fits: the worker's room under the limit (which its Dask memory
    limit, the machine's memory, does not see) refuses the run in one line naming the worker, before any work."""
    import psutil
    import resource

    need = resources.worker_memory(32, SubtractionSettings(padding=24), "cpu", 2, 6, 1).host_bytes
    if need > 0.7 * psutil.virtual_memory().total:
        pytest.skip("the local worker's memory limit (this machine's memory) would refuse the run before any work")
    paths, _ = make_dataset(tmp_path / "data", count=12, box=32, seed=4, snr=None)
    limit = 4_000_000 * 1024  # ulimit -v 4000000

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"), "--quiet",
               "--dashboard-address", "127.0.0.1:0", "--scheduler", "local", "--workers", "1", "--device", "cpu",
               "--padding", "24"]
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # fewer thread stacks mapped
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment,
                            preexec_fn=limited)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.match(r"dsub: error: each worker needs about [\d.]+ GB of host memory .* but worker "
                    r"tcp://127\.0\.0\.1:\d+ has [\d.]+ GB of address space left under its address-space limit "
                    r"\(ulimit -v, 4\.1 GB", lines[0]), lines[0]
    assert "--padding" in lines[0]  # what would make it leaner
    assert not (tmp_path / "out" / "subtracted.zarr").exists()
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


def refusal_with_rooms(monkeypatch, room_for: dict) -> str:
    """The refusal of a two-task run on ``threads`` under ``ulimit -v`` 2 GB, where ``room_for[tasks]`` is the host
    memory available to that many tasks at once (what ``host_memory_available`` reads)."""
    from pathlib import Path

    from dsub.cluster.runner import ClusterSpec
    from dsub.workflow.pipeline import RunOptions

    monkeypatch.setattr(resources, "address_space_limit", lambda: 2 * 10**9)
    monkeypatch.setattr(resources, "memory_limit", lambda: 64 * 10**9)
    monkeypatch.setattr(resources, "planned_device", lambda options: "cpu")
    monkeypatch.setattr(resources, "drawing_library_bytes", lambda: 0)
    monkeypatch.setattr(resources, "host_memory_available",
                        lambda threads_at_peak=0: room_for[threads_at_peak - resources.run_threads(0) + 1])
    options = RunOptions(outdir=Path("out"), chunk_size=48, device="cpu",
                         cluster=ClusterSpec(scheduler="threads", workers=2))
    lean = resources.plan_memory(128, SubtractionSettings(), options)
    assert lean.need.threads == 2 and [tasks for tasks, _, _ in lean.fewer_tasks] == [1]
    with pytest.raises(resources.NotEnoughMemoryError) as caught:
        resources.check_this_machine(lean)
    return one_line(caught.value)


def leanest(tasks: int) -> int:
    return resources.worker_memory(128, SubtractionSettings(), "cpu", tasks, 48, 1).host_bytes


def ulimit_for(room: int, need: int) -> int:
    """The ulimit -v figure (KiB) that leaves ``need`` where 2 GB left ``room`` (the report's preparation aside)."""
    short = need - resources.BASELINE_HOST_BYTES - (room - resources.report_preparation_bytes(128))
    return int(math.ceil((2 * 10**9 + short) / 1e8) * 1e8) // 1024


def test_fewer_workers_are_advised_only_where_that_alone_fits(monkeypatch):
    """Two tasks do not fit, one does: '--workers 1', and one limit (for the run as asked)."""
    extra = resources.report_preparation_bytes(128) - resources.BASELINE_HOST_BYTES
    room_for = {1: leanest(1) + extra, 2: leanest(1) + extra - 10 * 2**20}
    assert leanest(2) > room_for[2] - extra  # two tasks do not fit
    text = refusal_with_rooms(monkeypatch, room_for)
    assert "Use --workers 1 (tasks at once, now 2)" in text, text
    assert re.findall(r"'ulimit -v (\d+)'", text) == [str(ulimit_for(room_for[2], leanest(2)))], text


def test_where_fewer_workers_alone_do_not_fit_the_limits_for_both_are_given(monkeypatch):
    """Neither two tasks nor one fit: no advice of fewer --workers on its own; the limit that would do as asked
    and the one with --workers 1, each computed for its own tasks."""
    barely = leanest(1) + resources.report_preparation_bytes(128) - resources.BASELINE_HOST_BYTES - 2**20
    room_for = {1: barely, 2: barely - 200 * 10**6}  # one task falls 1 MiB short
    text = refusal_with_rooms(monkeypatch, room_for)
    assert "Use --workers" not in text and "use fewer --workers" not in text.lower(), text
    assert "Fewer --workers alone would not make it fit: with --workers 1 it needs about" in text, text
    assert "Nothing in this run can be made leaner" not in text, text
    expected = [ulimit_for(room_for[2], leanest(2)), ulimit_for(room_for[1], leanest(1))]
    figures = [int(figure) for figure in re.findall(r"'ulimit -v (\d+)'", text)]
    assert figures == expected and figures[1] < figures[0], (text, expected)


def test_a_local_clusters_memory_line_says_its_workers_take_smaller_batches_where_they_have_less_room():
    """The figure is for the batches a worker takes where memory is plentiful; under a lower limit (``ulimit -v``)
    each worker sizes its own smaller batches, so the line gives the leanest figure too."""
    roomy = resources.worker_memory(256, SubtractionSettings(), "cpu", 1, 256, 163)
    leanest_worker = resources.worker_memory(256, SubtractionSettings(), "cpu", 1, 256, 1)
    local = resources.MemoryPlan(need=roomy, minimum=leanest_worker, scheduler="local")
    said = local.describe()
    assert said.startswith(roomy.describe()) and roomy.host_bytes > leanest_worker.host_bytes
    assert said.endswith(f"down to about {leanest_worker.host_bytes / 1e9:.1f} GB with batches of one particle")
    assert resources.MemoryPlan(need=roomy, minimum=leanest_worker, scheduler="slurm").describe() == roomy.describe()
