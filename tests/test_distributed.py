"""Runs on real schedulers: a local Dask cluster, a killed-and-resumed run, SLURM and PBS.

The SLURM and PBS tests need the single-node SLURM of ``make slurm-up``
(CI starts it); they are skipped where there is none. Every run here is a
real ``dsub`` process, as a user would start it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from dsub.demo import make_dataset

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = ROOT / "cluster" / "local-slurm" / "jobqueue.yaml"


def slurm_ready() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and any(s.startswith(("idle", "mix")) for s in result.stdout.split())


needs_slurm = pytest.mark.skipif(not slurm_ready(), reason="no local SLURM (run make slurm-up)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    paths, _ = make_dataset(folder, count=96, box=48, seed=7)
    return paths


def dsub(paths, outdir, *extra, timeout=300, **popen):
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir), "--quiet",
               "--dashboard-address", "127.0.0.1:0", *extra]
    cwd = Path(outdir).parent  # batch systems may drop job output files in the working directory
    cwd.mkdir(parents=True, exist_ok=True)
    if popen:
        # As from a terminal: SIGINT not ignored (a shell without job control starts `cmd &` with it ignored).
        popen.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, **popen)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def stacks(outdir) -> np.ndarray:
    files = sorted((Path(outdir) / "Particles").glob("*.mrcs"))
    return np.concatenate([mrcfile.read(f) for f in files])


def same_images(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def threaded(dataset, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("threads") / "out"
    result = dsub(dataset, outdir, "--chunk-size", "16")
    assert result.returncode == 0, result.stderr
    return stacks(outdir)


def test_local_cluster_matches_threads(dataset, threaded, tmp_path):
    result = dsub(dataset, tmp_path / "out", "--chunk-size", "16", "--scheduler", "local", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "Starting a local Dask cluster beside the input checks" in result.stdout
    assert "Dask dashboard: http://127.0.0.1:" in result.stdout
    assert "The workers read the maps and prepare them now, beside the sample fit" in result.stdout
    assert same_images(stacks(tmp_path / "out"), threaded) <= 1e-5
    alpha = np.load(tmp_path / "out" / "particles_subtracted.cs")["alignments3D/alpha"]
    assert alpha.shape == (96,) and np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    summary = json.loads((tmp_path / "out" / "dsub_run.json").read_text())
    assert summary["scheduler"] == "local" and summary["workers"] == 2 and summary["chunks_total"] == 6


def workers_running() -> list[str]:
    """Command lines of this process's local cluster workers still running."""
    import psutil

    from conftest import is_dask_worker

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if is_dask_worker(child) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(child.cmdline()))
        except psutil.Error:  # gone meanwhile
            pass
    return found


def test_local_cluster_started_beside_the_checks_is_stopped_when_they_refuse(dataset, tmp_path, capsys,
                                                                           monkeypatch):
    """The cluster starts before the inputs are checked; a refusal stops it before the error leaves the run."""
    from dsub.cluster import ClusterSpec, early
    from dsub.errors import DsubError
    from dsub.physics.subtract import SubtractionSettings
    from dsub.workflow.pipeline import RunOptions, subtract

    stops = []
    original_stop = early.EarlyCluster.stop

    def stop(self):
        original_stop(self)  # waits for the start to finish, then stops the cluster
        stops.append((self._entered is not None, workers_running()))

    monkeypatch.setattr(early.EarlyCluster, "stop", stop)
    wrong_box = tmp_path / "mask_of_another_box.mrc"
    with mrcfile.new(wrong_box) as mrc:
        mrc.set_data(np.ones((40, 40, 40), dtype=np.float32))
        mrc.voxel_size = 1.0
    spec = ClusterSpec(scheduler="local", workers=2, dashboard_address="127.0.0.1:0", progress=False)
    with pytest.raises(DsubError, match="mask_of_another_box"):
        subtract(dataset["star"], dataset["half_a"], dataset["half_b"], wrong_box, SubtractionSettings(),
                 RunOptions(outdir=tmp_path / "out", cluster=spec))
    assert "Starting a local Dask cluster beside the input checks" in capsys.readouterr().out
    assert stops == [(True, [])]  # the started cluster was stopped, once, and no worker outlived it
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


@pytest.mark.parametrize("refusal", ["option", "input"])
def test_local_cluster_is_not_started_or_left_behind_when_the_run_is_refused(dataset, tmp_path, capsys, refusal):
    """An option no run can use is refused before any worker starts; a run its input checks refuse leaves no
    worker behind; the start is said once."""
    from dsub.cli import main

    extra = ["--resolution", "0"] if refusal == "option" else ["--mask", str(dataset["star"])]
    args = ["subtract", str(dataset["star"]), "--half-a", str(dataset["half_a"]), "--half-b", str(dataset["half_b"]),
            "--mask", str(dataset["mask"]), "-o", str(tmp_path / "out"), "--scheduler", "local", "--workers", "1",
            "--dashboard-address", "127.0.0.1:0", *extra]
    assert main(args) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert line.startswith("dsub: error:"), err
    assert out.count("Starting a local Dask cluster beside the input checks") == (refusal == "input")
    import threading

    starts = [thread for thread in threading.enumerate() if thread.name == "dsub-cluster-start"]
    assert starts == [] and workers_running() == []  # none started, or stopped before the error left the run
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


def test_rerun_of_a_finished_local_run_starts_no_worker(dataset, tmp_path, capsys, monkeypatch):
    """README: the rerun of a finished command starts no worker; with a stack lost, the rerun computes it again
    on a cluster it starts then."""
    import threading

    from dsub.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["subtract", str(dataset["star"]), "--half-a", str(dataset["half_a"]), "--half-b", str(dataset["half_b"]),
            "--mask", str(dataset["mask"]), "-o", "out", "--scheduler", "local", "--workers", "1",
            "--dashboard-address", "127.0.0.1:0", "--chunk-size", "48"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "Starting a local Dask cluster" not in out
    assert not [thread for thread in threading.enumerate() if thread.name == "dsub-cluster-start"]
    assert workers_running() == []
    stack = next((tmp_path / "out" / "Particles").glob("*.mrcs"))
    kept = stack.read_bytes()
    stack.unlink()
    assert main(args) == 0
    assert stack.read_bytes() == kept


def test_local_cluster_with_a_cluster_config_starts_beside_the_checks(dataset, threaded, tmp_path):
    """A --cluster-config is applied to the cluster started in the background (dask-jobqueue, which it loads,
    may only be imported in the main thread)."""
    config = tmp_path / "cluster.yaml"
    config.write_text("distributed:\n  scheduler:\n    work-stealing: false\n")
    result = dsub(dataset, tmp_path / "out", "--chunk-size", "16", "--scheduler", "local", "--workers", "1",
                  "--cluster-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "Starting a local Dask cluster beside the input checks" in result.stdout
    assert same_images(stacks(tmp_path / "out"), threaded) <= 1e-5


def test_local_cluster_serves_its_dashboard_loaded_when_first_opened(monkeypatch):
    """The local scheduler starts without the dashboard (importing it took the interpreter from the input checks
    beside which the cluster starts): its HTTP server listens at --dashboard-address, and the link printed for it
    answers with the dashboard's page (bokeh is installed with dsub), loaded by that first request. A dashboard
    that cannot be loaded answers 503 with the reason, and the next request tries again."""
    import urllib.error
    import urllib.request

    from dsub.cluster import ClusterSpec, dashboard, start

    spec = ClusterSpec(scheduler="local", workers=1, dashboard_address="127.0.0.1:0", progress=False, device="cpu")
    with start.start_cluster(spec) as (client, cluster, _):
        link = client.dashboard_link  # what the run prints
        base = link.rsplit("/", 1)[0]
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        with urllib.request.urlopen(f"{base}/health", timeout=30) as answer:  # Dask's plain routes, without it
            assert answer.read() == b"ok"
        assert not cluster.dsub_dashboard.attached
        monkeypatch.setattr(dashboard, "DASHBOARD_MODULE", "distributed.dashboard.no_such_module")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(link, timeout=60)
        assert refused.value.code == 503 and b"no_such_module" in refused.value.read()
        monkeypatch.undo()
        with urllib.request.urlopen(link, timeout=120) as page:
            assert (page.status, page.url) == (200, link)
            assert b"bokeh" in page.read().lower()
        assert cluster.dsub_dashboard.attached
        with urllib.request.urlopen(f"{base}/", timeout=60) as page:  # the dashboard's own routes, attached
            assert page.url == link


def _pinning_and_loading():
    threads_cpus = {tuple(sorted(os.sched_getaffinity(int(task)))) for task in os.listdir("/proc/self/task")}
    return (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("DSUB_WARM_UP_GPU"),
            "dsub.workflow.tasks" in sys.modules, sorted(threads_cpus))


def test_local_gpu_workers_are_pinned_as_they_are_spawned_and_load_the_task_module(monkeypatch):
    """Each GPU worker gets its own CUDA_VISIBLE_DEVICES in its environment from the start (workers added
    later too), all its threads on its GPU's CPUs where that GPU has some of its own, and loads dsub's
    task module before any task, after the preloads of dask's config."""
    import dask

    from dsub.cluster import ClusterSpec, start

    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(start, "visible_gpus", lambda: ["5", "7"])  # two GPUs, as the coordinator sees them
    # GPU 5 beside the first allowed CPU (a NUMA node of its own); GPU 7's CPUs unknown: not pinned.
    monkeypatch.setattr(start, "gpu_cpus", lambda count: [{allowed[0]}, None])
    spec = ClusterSpec(scheduler="local", workers=2, dashboard_address="127.0.0.1:0", progress=False, device="auto")
    # GPUs 5 and 7 need not exist: where NVML is installed, Dask's GPU monitoring would fail the workers
    # on them (NVMLError_InvalidArgument), so it is off here.
    with dask.config.set({"distributed.worker.preload": ["json"], "distributed.diagnostics.nvml": False}):
        with start.start_cluster(spec) as (client, cluster, description):
            assert cluster.new_spec["options"]["preload"] == ["json", "dsub.cluster.warm_up"]
            assert f"kept on its GPU's CPUs: GPU 5 {allowed[0]}; GPU 7 any" in description
            client.wait_for_workers(2, timeout=120)
            deadline = time.monotonic() + 60
            while True:
                seen = sorted(client.run(_pinning_and_loading).values())
                if all(loaded for _, _, loaded, _ in seen) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            # Every thread of GPU 5's worker on its CPU; the GPU warm-up asked for (where CuPy or the
            # GPU is missing it gives up quietly, and the first task would report it).
            assert seen == [("5", "1", True, [(allowed[0],)]), ("7", "1", True, [tuple(allowed)])]
            cluster.scale(3)
            client.wait_for_workers(3, timeout=120)
            pinned = sorted(device for device, *_ in client.run(_pinning_and_loading).values())
            assert pinned == ["5", "5", "7"]


def test_killed_run_resumes_only_unfinished_chunks(tmp_path, threaded):
    paths, _ = make_dataset(tmp_path / "data", count=240, box=48, seed=7)
    outdir = tmp_path / "out"
    run = dsub(paths, outdir, "--chunk-size", "4", "--workers", "1", start_new_session=True)
    done_folder = outdir / "subtracted.zarr" / "chunk_done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if done_folder.is_dir() and len(list(done_folder.iterdir())) >= 3:
            break
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # the whole process group, as a scheduler's preemption would
    run.wait()
    assert not (outdir / "particles_subtracted.star").exists()

    rerun = dsub(paths, outdir, "--chunk-size", "4", "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert 0 < summary["chunks_skipped"] < summary["chunks_total"] == 60
    killed, resumed = summary["attempts"]  # the killed attempt is kept, with what it did
    assert killed["status"] == "stopped" and killed["chunks_done"] == summary["chunks_skipped"]
    assert resumed["status"] == "finished" and resumed["chunks_done_before"] == summary["chunks_skipped"]
    assert killed["chunks_done"] + resumed["chunks_done"] == 60 and resumed["devices"] == ["cpu"]
    assert killed["started"] <= resumed["started"] and killed["pid"] == run.pid
    assert summary["seconds"] == round(killed["seconds"] + resumed["seconds"], 3) and killed["seconds"] >= 0
    assert (outdir / "dsub.log").read_text().count("==== ") == 2

    clean = dsub(paths, tmp_path / "clean", "--chunk-size", "4")
    assert clean.returncode == 0, clean.stderr
    assert same_images(stacks(outdir), stacks(tmp_path / "clean")) <= 1e-6


@needs_slurm
@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_batch_scheduler_matches_threads_and_leaves_queue_empty(dataset, threaded, tmp_path, scheduler):
    if scheduler == "pbs" and not shutil.which("qsub"):
        pytest.skip("no qsub (slurm-wlm-torque)")
    result = dsub(dataset, tmp_path / "out", "--chunk-size", "16", "--scheduler", scheduler, "--workers", "2",
                  "--cluster-config", str(LOCAL_SLURM), "--worker-timeout", "120")
    assert result.returncode == 0, result.stderr
    assert same_images(stacks(tmp_path / "out"), threaded) <= 1e-5
    queue = ""
    for _ in range(20):  # cancelled jobs leave the queue within a second or two
        queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()
        if not queue:
            break
        time.sleep(0.5)
    assert queue == ""


@needs_slurm
def test_impossible_slurm_request_fails_fast_with_sbatch_words(dataset, tmp_path):
    config = tmp_path / "greedy.yaml"
    config.write_text(LOCAL_SLURM.read_text().replace("--gres=gpu:1", "--gres=gpu:9"))
    started = time.monotonic()
    result = dsub(dataset, tmp_path / "out", "--scheduler", "slurm", "--cluster-config", str(config),
                  "--worker-timeout", "60")
    assert result.returncode == 2
    assert "Requested node configuration is not available" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # refused before any waiting
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


@needs_slurm
def test_pbs_submission_failure_is_reported_at_once(dataset, tmp_path):
    """qsub refuses the job: no worker can come, so the run stops without waiting out --worker-timeout."""
    if not shutil.which("qsub"):
        pytest.skip("no qsub (slurm-wlm-torque)")
    config = tmp_path / "greedy.yaml"
    config.write_text(LOCAL_SLURM.read_text().replace("gpus=1", "gpus=9"))
    started = time.monotonic()
    result = dsub(dataset, tmp_path / "out", "--scheduler", "pbs", "--cluster-config", str(config),
                  "--worker-timeout", "120")
    assert result.returncode == 2
    assert "dsub: error: the pbs jobs could not be submitted:" in result.stderr
    assert "Requested node configuration is not available" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_secure_cluster_refuses_clients_without_its_credentials():
    from distributed import Client
    from distributed.security import Security

    from dsub.cluster import ClusterSpec, open_runner

    spec = ClusterSpec(scheduler="local", workers=1, secure=True, dashboard_address="127.0.0.1:0", progress=False)
    with open_runner(spec) as runner:
        address = runner.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        with pytest.raises((OSError, TimeoutError)):  # a plain connection
            Client(address.replace("tls://", "tcp://"), timeout=3)
        with pytest.raises((OSError, TimeoutError)):  # TLS, but with someone else's certificates
            Client(address, security=Security.temporary(), timeout=3)
        # dsub's own client holds the credentials and gets work done
        assert runner.compute([dask_delayed_sum(2, 3)], "check") == [5]


def dask_delayed_sum(a, b):
    import dask

    return dask.delayed(lambda x, y: x + y, pure=True)(a, b)


def finished_chunks(outdir) -> int:
    folder = Path(outdir) / "subtracted.zarr" / "chunk_done" / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def wait_for_chunks(run, outdir, count, limit=120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and run.poll() is None and finished_chunks(outdir) < count:
        time.sleep(0.02)
    assert run.poll() is None, "the run finished before the fault could be injected"


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory):
    """Enough small chunks that a run lasts several seconds."""
    folder = tmp_path_factory.mktemp("slow")
    paths, _ = make_dataset(folder / "data", count=240, box=48, seed=7)
    clean = folder / "clean"
    result = dsub(paths, clean, "--chunk-size", "4")
    assert result.returncode == 0, result.stderr
    return paths, stacks(clean)


@pytest.mark.parametrize("switch, forked", [(None, True), ("0", False)])
def test_local_workers_are_forked_from_the_fork_server_unless_switched_off(slow_dataset, tmp_path, dask_workers,
                                                                          switch, forked):
    """``--scheduler local`` forks its workers from the fork server the command starts (``dsub.fork_server``);
    ``DSUB_FORK_SERVER=0`` spawns them as Dask does. Either way the images are those of ``threads``."""
    import psutil

    paths, clean = slow_dataset
    environment = {key: value for key, value in os.environ.items() if key != "DSUB_FORK_SERVER"}
    if switch is not None:
        environment["DSUB_FORK_SERVER"] = switch
    run = dsub(paths, tmp_path / "out", "--chunk-size", "4", "--scheduler", "local", "--workers", "2",
               env=environment)
    wait_for_chunks(run, tmp_path / "out", 1)
    workers = dask_workers(psutil.Process(run.pid))
    lines = [" ".join(worker.cmdline()) for worker in workers]
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert len(workers) == 2 and all(("multiprocessing.forkserver" in line) is forked for line in lines), lines
    assert all(("spawn_main" in line) is not forked for line in lines), lines
    assert same_images(stacks(tmp_path / "out"), clean) <= 1e-6


def test_worker_killed_mid_run_is_replaced_and_output_is_clean(slow_dataset, tmp_path, dask_workers):
    import psutil

    paths, clean = slow_dataset
    outdir = tmp_path / "out"
    run = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "local", "--workers", "2", start_new_session=True)
    wait_for_chunks(run, outdir, 1)  # the first chunk is recorded at once: most of the run is still to come
    workers = dask_workers(psutil.Process(run.pid))
    assert workers, "no worker process found"
    workers[0].kill()  # SIGKILL, mid-task: the nanny restarts it and the scheduler reruns its task
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    # said though a new worker takes its place within a second (the same number of workers at every poll)
    assert "dsub: 1 Dask worker left the run (" in (outdir / "dsub.log").read_text(), err
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_skipped"] == 0 and summary["chunks_total"] == 60
    assert same_images(stacks(outdir), clean) <= 1e-6


def test_ctrl_c_on_a_local_cluster_is_one_line_and_the_run_resumes(slow_dataset, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the workers leave it to the coordinator."""
    paths, clean = slow_dataset
    outdir = tmp_path / "out"
    run = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "local", "--workers", "2", start_new_session=True)
    wait_for_chunks(run, outdir, 3)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "dsub: interrupted; rerun the same command to resume"
    resumed = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "local", "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert same_images(stacks(outdir), clean) <= 1e-6


@pytest.mark.parametrize("config", [None, "distributed:\n  comm:\n    timeouts:\n      connect: 60s\n"])
def test_ctrl_c_pressed_again_while_a_local_run_stops_is_still_one_line(slow_dataset, tmp_path, config):
    """Ctrl-C four times, 0.3 s apart, to the whole group: the later ones do not interrupt the clean-up.

    With a cluster config, dask-jobqueue is loaded too (for its defaults), which sets its own SIGINT handler.
    """
    paths, _ = slow_dataset
    outdir = tmp_path / "out"
    extra = []
    if config is not None:
        (tmp_path / "site.yaml").write_text(config)
        extra = ["--cluster-config", str(tmp_path / "site.yaml")]
    run = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "local", "--workers", "2", *extra,
               start_new_session=True)
    wait_for_chunks(run, outdir, 3)
    for _ in range(4):
        with contextlib.suppress(ProcessLookupError):  # the run may be gone before the last one
            os.killpg(run.pid, signal.SIGINT)
        time.sleep(0.3)
    out, err = run.communicate(timeout=300)
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err, err
    assert run.returncode == 130, err
    assert err.strip().splitlines() == ["dsub: interrupted; rerun the same command to resume"]


def slurm_config_naming_jobs(folder: Path, job_name: str) -> Path:
    """The local SLURM profile with its worker jobs named ``job_name``, written in ``folder``."""
    import yaml

    config = yaml.safe_load(LOCAL_SLURM.read_text())
    config["jobqueue"]["slurm"]["name"] = job_name
    named = folder / "jobqueue.yaml"
    named.write_text(yaml.safe_dump(config))
    return named


@needs_slurm
def test_slurm_job_cancelled_mid_run_still_completes(slow_dataset, tmp_path):
    paths, clean = slow_dataset
    outdir = tmp_path / "out"
    job_name = f"dsub-test-{os.getpid()}"  # cancel one of this run's jobs only, whatever else the queue holds
    named = slurm_config_naming_jobs(tmp_path, job_name)
    run = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "slurm", "--workers", "2",
               "--cluster-config", str(named), start_new_session=True)
    wait_for_chunks(run, outdir, 3)
    jobs = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert jobs, f"no worker job named {job_name} in the queue"
    subprocess.run(["scancel", jobs[0]], check=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert same_images(stacks(outdir), clean) <= 1e-6
    for _ in range(20):
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


@needs_slurm
def test_ctrl_c_on_a_slurm_run_is_one_line_and_cancels_its_jobs(slow_dataset, tmp_path):
    """dask-jobqueue sets SIGINT to sys.exit() as it is imported; dsub's own Ctrl-C handling stays."""
    paths, _ = slow_dataset
    outdir = tmp_path / "out"
    job_name = f"dsub-test-{os.getpid()}-ctrl-c"
    named = slurm_config_naming_jobs(tmp_path, job_name)
    run = dsub(paths, outdir, "--chunk-size", "4", "--scheduler", "slurm", "--workers", "1",
               "--cluster-config", str(named), start_new_session=True)
    wait_for_chunks(run, outdir, 3)
    for _ in range(3):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGINT)
        time.sleep(0.3)
    out, err = run.communicate(timeout=300)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert run.returncode == 130, err
    assert err.strip().splitlines() == ["dsub: interrupted; rerun the same command to resume"]
    queued = ["squeue", "-h", "-n", job_name]
    for _ in range(20):
        if not subprocess.run(queued, capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    assert subprocess.run(queued, capture_output=True, text=True).stdout.strip() == ""


def test_adaptive_local_cluster_completes(dataset, threaded, tmp_path):
    result = dsub(dataset, tmp_path / "out", "--chunk-size", "16", "--scheduler", "local", "--adapt", "1:2")
    assert result.returncode == 0, result.stderr
    assert same_images(stacks(tmp_path / "out"), threaded) <= 1e-5


@needs_slurm
def test_adaptive_slurm_cluster_completes_and_leaves_queue_empty(dataset, threaded, tmp_path):
    result = dsub(dataset, tmp_path / "out", "--chunk-size", "16", "--scheduler", "slurm", "--adapt", "1:2",
                  "--cluster-config", str(LOCAL_SLURM), "--worker-timeout", "120")
    assert result.returncode == 0, result.stderr
    assert same_images(stacks(tmp_path / "out"), threaded) <= 1e-5
    for _ in range(20):
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


def test_bad_image_on_a_worker_is_one_clear_error(tmp_path):
    """An image outside the sample (which the coordinator refuses before any chunk) is met by a worker's chunk."""
    from dsub.workflow.diagnostics import SAMPLE_SIZE, sample_rows

    count = 2 * SAMPLE_SIZE + 2
    paths, _ = make_dataset(tmp_path / "data", count=count, box=32, seed=3)
    sampled = set(sample_rows(count).tolist())
    bad = sorted(set(range(count)) - sampled)[len(sampled) // 3]
    with mrcfile.mmap(paths["stack"], mode="r+") as mrc:
        mrc.data[bad, 1, 1] = np.nan
    result = dsub(paths, tmp_path / "out", "--chunk-size", "8", "--scheduler", "local", "--workers", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsub: error:") and str(paths["stack"]) in lines[0]
    assert f"image {bad + 1} (1-based)" in lines[0]
    assert not (tmp_path / "out" / "particles_subtracted.star").exists()


def test_local_workers_ignore_ctrl_c_from_the_start_and_still_stop_on_sigterm(tmp_path):
    """SIGINT is blocked in a worker before any preload runs (inherited through the spawn), and ignored once
    ``warm_up`` has run; SIGTERM still ends it; the coordinator keeps its own handler and the thread that
    made the cluster takes Ctrl-C again."""
    import multiprocessing.spawn

    import dask
    import psutil

    from dsub.cluster import ClusterSpec
    from dsub.cluster.start import start_cluster

    first_preload = tmp_path / "record_sigint.py"  # dask's configured preloads run before dsub's warm_up
    first_preload.write_text("import signal\nAT_IMPORT = signal.pthread_sigmask(signal.SIG_BLOCK, [])\n\n"
                             "def dask_setup(worker):\n    worker.sigint_at_import = signal.SIGINT in AT_IMPORT\n")
    interpreter = multiprocessing.spawn.get_executable()
    coordinator_handler = signal.getsignal(signal.SIGINT)
    spec = ClusterSpec(scheduler="local", workers=1, dashboard_address="127.0.0.1:0", worker_timeout=120)
    with dask.config.set({"distributed.worker.preload": [str(first_preload)]}):
        with start_cluster(spec) as (client, cluster, _):
            assert client.run(lambda dask_worker: dask_worker.sigint_at_import) == {
                address: True for address in client.scheduler_info()["workers"]}
            (pid,) = client.run(os.getpid).values()
            assert sigint_bit(pid, "SigIgn") and sigint_bit(pid, "SigBlk")
            assert signal.getsignal(signal.SIGINT) is coordinator_handler  # the coordinator keeps its own
            assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # and takes it here
            os.kill(pid, signal.SIGTERM)
            psutil.Process(pid).wait(timeout=30)
    assert multiprocessing.spawn.get_executable() == interpreter


def sigint_bit(pid: int, field: str) -> bool:
    """Whether /proc/PID/status's signal set ``field`` (SigIgn, SigCgt) holds SIGINT."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_while_local_workers_start_prints_no_traceback(dataset, tmp_path, dask_workers):
    """Ctrl-C to the whole group while a worker's Python is starting: one line from dsub, exit 130.

    The signal goes as soon as a worker process runs Python with its SIGINT set
    (caught by Python's handler, or ignored): spawned, its imports then take a
    second or more before any preload runs; forked from the fork server
    (``dsub.fork_server``), it unpickles the worker's start and makes the worker.
    """
    import psutil

    python = psutil.Process().exe()
    run = dsub(dataset, tmp_path / "out", "--scheduler", "local", "--workers", "2", start_new_session=True)
    coordinator = psutil.Process(run.pid)
    deadline = time.monotonic() + 120
    starting = False
    while not starting and time.monotonic() < deadline and run.poll() is None:
        for child in dask_workers(coordinator):
            with contextlib.suppress(psutil.Error, OSError, StopIteration):
                if (child.exe() == python
                        and (sigint_bit(child.pid, "SigCgt") or sigint_bit(child.pid, "SigIgn"))):
                    starting = True
        time.sleep(0.002)
    assert starting, "no worker process started"
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == "dsub: interrupted before anything was written; rerun the command to start"


@needs_slurm
def test_a_cancelled_worker_job_is_replaced_and_said(tmp_path):
    """--workers 1 through SLURM, its worker job cancelled mid-run (as preemption does): the run says so at once,
    a new worker job takes over, and the run finishes with every chunk."""
    paths, _ = make_dataset(tmp_path / "data", count=240, box=48, seed=5)
    outdir = tmp_path / "out"
    slow = tmp_path / "slow_chunks.py"  # a worker preload: each chunk takes 0.1 s more, so the run lasts
    slow.write_text("import functools, time\n\ndef dask_setup(worker):\n"
                    "    from dsub.workflow import tasks\n    original = tasks.run_chunk\n\n"
                    "    @functools.wraps(original)\n    def run_chunk(*args, **kwargs):\n"
                    "        time.sleep(0.1)\n        return original(*args, **kwargs)\n\n"
                    "    tasks.run_chunk = run_chunk\n")
    config = tmp_path / "slow.yaml"
    config.write_text(LOCAL_SLURM.read_text().replace(
        "    log-directory: /tmp/dsub-slurm/worker-logs\n  pbs:",
        f"    log-directory: /tmp/dsub-slurm/worker-logs\n    worker-extra-args: [--preload, {slow}]\n  pbs:"))
    command = [sys.executable, "-m", "dsub.cli", "subtract", str(paths["star"]), "--half-a", str(paths["half_a"]),
               "--half-b", str(paths["half_b"]), "--mask", str(paths["mask"]), "-o", str(outdir),
               "--dashboard-address", "127.0.0.1:0", "--chunk-size", "4", "--scheduler", "slurm", "--workers", "1",
               "--cluster-config", str(config), "--worker-timeout", "120"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    done_folder = outdir / "subtracted.zarr" / "chunk_done" / "c"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None:
        if done_folder.is_dir() and len(list(done_folder.iterdir())) >= 3:
            break
        time.sleep(0.02)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert run.poll() is None and jobs, "the run ended before its worker job could be cancelled"
    subprocess.run(["scancel", *jobs], check=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "dsub: 1 Dask worker left the run (0 remain): their unfinished chunks run again, and a new worker job " \
           "is asked for in place of each; with none left the run waits up to 120 s (--worker-timeout) for one." in out
    summary = json.loads((outdir / "dsub_run.json").read_text())
    assert summary["chunks_total"] == 60 and summary["particles"] == 240
    for _ in range(20):
        if not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""
