"""Cluster set-up without a scheduler: job scripts, profiles, options, config files."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from dsub.cli import main
from dsub.cluster import ClusterSpec, parse_adapt
from dsub.cluster.config import cluster_config, load_cluster_config
from dsub.cluster.scripts import job_script
from dsub.cluster.start import submission_output
from dsub.errors import DsubError, InputFileError, MissingInputError, OptionError

PROFILES = Path(__file__).resolve().parents[1] / "cluster"


def test_slurm_profile_asks_for_one_gpu_per_worker():
    script = job_script("slurm", PROFILES / "slurm-gpu.yaml")
    assert "#SBATCH --gres=gpu:1" in script
    assert "#SBATCH -p gpu" in script and "#SBATCH --cpus-per-task=8" in script
    assert "source /path/to/dsub/.venv/bin/activate" in script  # the site's environment lines
    assert "--nthreads 8" in script and script.count("dask_worker") == 1  # one worker process per job


def test_pbspro_profile_uses_select_with_ngpus():
    script = job_script("pbs", PROFILES / "pbspro-gpu.yaml")
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB" in script
    assert "module load cuda/12" in script


def test_torque_profile_uses_nodes_ppn_gpus():
    script = job_script("pbs", PROFILES / "torque-gpu.yaml")
    assert "#PBS -l nodes=1:ppn=8:gpus=1" in script
    assert "#PBS -l mem=64GB" in script  # Torque's nodes= spec holds no memory: asked for in a line of its own


def test_torque_jobs_ask_for_the_memory_the_run_needs():
    """A run that needs more than the profile gives: the raised figure is what the job asks of Torque."""
    with pytest.warns(Warning, match="Each worker job asks for 80GB instead"):
        script = job_script("pbs", PROFILES / "torque-gpu.yaml", memory_bytes=int(80e9))
    assert "#PBS -l mem=80GB" in script and "#PBS -l mem=64GB" not in script
    assert "--memory-limit 74.51GiB" in script  # the same figure as Dask's limit (80e9 bytes)


def test_local_slurm_config_advertises_loopback():
    script = job_script("slurm", PROFILES / "local-slurm" / "jobqueue.yaml")
    assert "--interface lo" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH -p debug" in script


def test_job_script_command_prints_the_script(capsys):
    assert main(["job-script", "--scheduler", "slurm", "--cluster-config", str(PROFILES / "slurm-gpu.yaml")]) == 0
    assert "#SBATCH --gres=gpu:1" in capsys.readouterr().out


def test_cluster_config_applies_only_inside_the_block(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("jobqueue:\n  slurm:\n    queue: gpu-long\n")
    import dask_jobqueue  # noqa: F401  (its import adds the jobqueue defaults to dask's config)

    before = dask.config.get("jobqueue.slurm.walltime")
    with cluster_config(path):
        assert dask.config.get("jobqueue.slurm.queue") == "gpu-long"
        assert dask.config.get("jobqueue.slurm.walltime") == before  # untouched keys keep their defaults
    assert dask.config.get("jobqueue.slurm.queue") != "gpu-long"


@pytest.mark.parametrize("content, named", [
    ("jobqueue: 5\n", "jobqueue is 5: a mapping of settings"),
    ("jobqueue:\n  slurm: 7\n", "jobqueue.slurm is 7: a mapping of settings"),
    ("jobqueue:\n  slurm:\n    cores: abc\n", "jobqueue.slurm.cores is 'abc': a whole number of at least 1"),
    ("jobqueue:\n  pbs:\n    memory: lots\n", "jobqueue.pbs.memory is 'lots': a size such as 16GB"),
    ("jobqueue:\n  slurm:\n    job-extra-directives: --gres=gpu:1\n", "a list of text lines"),
    ("dsub:\n  gpus-per-worker: -1\n", "dsub.gpus-per-worker is -1"),
    ("dsub:\n  worker-device: tpu\n", "dsub.worker-device is 'tpu': one of auto, cpu, gpu"),
])
def test_cluster_config_values_of_the_wrong_kind_are_refused_naming_the_setting(tmp_path, capsys, content, named):
    path = tmp_path / "site.yaml"
    path.write_text(content)
    with pytest.raises(InputFileError, match="site.yaml") as caught:
        load_cluster_config(path)
    assert named in str(caught.value)
    assert main(["job-script", "--scheduler", "slurm", "--cluster-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsub: error: {path}: ") and named in err[0]


def test_good_profiles_pass_the_type_checks():
    for profile in sorted((Path(__file__).parent.parent / "cluster").rglob("*.yaml")):
        load_cluster_config(profile)


@pytest.mark.parametrize("content, error", [("jobqueue: [unclosed", InputFileError), ("", InputFileError)])
def test_bad_cluster_config_names_the_file(tmp_path, content, error):
    path = tmp_path / "site.yaml"
    path.write_text(content)
    with pytest.raises(error, match="site.yaml"):
        load_cluster_config(path)


def test_missing_cluster_config(tmp_path):
    with pytest.raises(MissingInputError, match="nothere.yaml: file not found \\(given as --cluster-config\\)"):
        load_cluster_config(tmp_path / "nothere.yaml")


def test_parse_adapt():
    assert parse_adapt("1:8") == (1, 8)
    assert parse_adapt("1:1") == (1, 1)
    for bad in ("8", "4:1", "a:b", "0:0"):
        with pytest.raises(OptionError):
            parse_adapt(bad)
    with pytest.raises(OptionError, match="waits for a first worker"):
        parse_adapt("0:4")  # no worker would ever start


@pytest.mark.parametrize(
    "kwargs",
    [dict(scheduler="condor"), dict(workers=0), dict(scheduler="threads", adapt=(1, 2)), dict(worker_timeout=0)],
)
def test_bad_cluster_options(kwargs):
    with pytest.raises(OptionError):
        ClusterSpec(**kwargs)


def test_scheduler_address_is_accepted():
    assert ClusterSpec(scheduler="tcp://127.0.0.1:8786").distributed


def test_unreachable_scheduler_is_one_clear_error(tmp_path, capsys):
    from dsub.cluster import open_runner

    spec = ClusterSpec(scheduler="tcp://127.0.0.1:9", worker_timeout=2, progress=False)
    with pytest.raises(DsubError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with open_runner(spec):
            pass


def test_scheduler_probe_that_only_times_out_leaves_the_wait_to_dask(monkeypatch):
    """A first connection that times out (packets dropped) proves nothing: Dask's own wait goes on."""
    import socket

    from dsub.cluster import open_runner

    def dropped(address, timeout=None, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", dropped)
    spec = ClusterSpec(scheduler="tcp://127.0.0.1:9", worker_timeout=2, progress=False)
    with pytest.raises(DsubError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9: Timed out trying to "
                                        "connect to tcp://127.0.0.1:9 after 2 s"):
        with open_runner(spec):
            pass


def test_submission_output_keeps_the_batch_systems_words():
    text = ("Command exited with non-zero exit code.\nExit code: 1\nCommand:\nsbatch /tmp/x.sh\nstdout:\n\n"
            "stderr:\nsbatch: error: Batch job submission failed: Invalid account\n\n")
    assert submission_output(text) == "sbatch: error: Batch job submission failed: Invalid account"


def test_job_script_leaves_no_folders_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = job_script("slurm", PROFILES / "slurm-gpu.yaml")
    assert "dsub-worker-logs/" in script  # the profile's relative log folder, as it will be used
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheduler, directive", [("slurm", "#SBATCH"), ("pbs", "#PBS")])
def test_job_script_without_a_cluster_config_in_a_fresh_process(tmp_path, scheduler, directive):
    """dask-jobqueue's own defaults: the script, not a traceback (a fresh process has not imported it yet)."""
    result = subprocess.run([sys.executable, "-m", "dsub.cli", "job-script", "--scheduler", scheduler, "--box", "256"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert directive in result.stdout and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()  # saved as it is, the script runs: the shebang first
    assert lines[0] == "#!/usr/bin/env bash" and lines[2].startswith("# Memory: each worker needs about")
    assert lines[1].startswith("# In the worker command, the scheduler address and --name dummy-name stand in")


@pytest.fixture
def fake_cluster_start(monkeypatch):
    """``start.start_cluster`` replaced: it starts once ``release`` is set and sets ``closed`` when left."""
    import contextlib
    import threading

    from dsub.cluster import start

    events = {"release": threading.Event(), "closed": threading.Event()}

    @contextlib.contextmanager
    def fake_start(spec):
        events["release"].wait(30)  # a start that takes its time (a worker time-out, a stuck import)
        try:
            yield "client", "cluster", "description"
        finally:
            events["closed"].set()

    monkeypatch.setattr(start, "start_cluster", fake_start)
    return events


def test_an_early_cluster_start_that_hangs_does_not_hang_the_run_that_stops(fake_cluster_start):
    """stop() waits a bounded time; a start that finishes later is closed by its own thread."""
    import time

    from dsub.cluster import early

    started = early.EarlyCluster(ClusterSpec(scheduler="local", progress=False))
    began = time.monotonic()
    started.stop(wait=0.2)
    assert time.monotonic() - began < 2 and not fake_cluster_start["closed"].is_set()
    fake_cluster_start["release"].set()  # the start finishes after the run gave up on it: its thread closes it
    assert fake_cluster_start["closed"].wait(10)
    started._thread.join(10)
    assert started._context is None and not started._thread.is_alive()


def test_an_early_cluster_stopped_after_its_start_is_closed_by_stop(fake_cluster_start):
    from dsub.cluster import early

    fake_cluster_start["release"].set()  # a quick start
    started = early.EarlyCluster(ClusterSpec(scheduler="local", progress=False))
    started._thread.join(10)
    assert not fake_cluster_start["closed"].is_set()
    started.stop()
    assert fake_cluster_start["closed"].is_set()
    started.stop()  # a second stop does nothing


@pytest.mark.parametrize("configured, expected", [
    ({}, (["dsub.cluster.warm_up"], [])),
    ({"preload": "json"}, (["json", "dsub.cluster.warm_up"], [])),  # one name, as Dask takes it too
    ({"preload": ["json", "string"], "preload-argv": ["--x"]}, (["json", "string", "dsub.cluster.warm_up"], ["--x"])),
    ({"preload": ["json"], "preload-argv": [["--x"]]}, (["json", "dsub.cluster.warm_up"], [["--x"], []])),
])
def test_local_workers_preload_dsub_after_the_configured_preloads(configured, expected):
    from distributed.preloading import process_preloads

    from dsub.cluster.start import worker_preloads

    with dask.config.set({f"distributed.worker.{key}": value for key, value in configured.items()}):
        options = worker_preloads()
    assert (options["preload"], options["preload_argv"]) == expected
    # what Dask does with them: one preload object per name, no mismatch
    assert len(process_preloads(None, options["preload"], options["preload_argv"])) == len(options["preload"])


def cluster_config_warnings(path, scheduler) -> list[str]:
    import warnings

    from dsub.cluster.config import warn_unused_settings
    from dsub.errors import DsubWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_unused_settings(path, scheduler)
    return [str(item.message) for item in caught if issubclass(item.category, DsubWarning)]


@pytest.mark.parametrize("scheduler", ["local", "threads", "tcp://127.0.0.1:8786"])
def test_jobqueue_only_config_is_named_as_unused_without_batch_jobs(scheduler):
    path = PROFILES / "slurm-gpu.yaml"
    (message,) = cluster_config_warnings(path, scheduler)
    assert message.startswith(f"--cluster-config {path}: its jobqueue settings are not used by ")
    assert "none of its settings is used" in message and "jobqueue.slurm." in message


def test_partly_used_config_names_exactly_what_is_ignored(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("jobqueue:\n  slurm:\n    queue: gpu\n    memory: 64GB\ndistributed:\n  comm:\n"
                    "    timeouts:\n      connect: 60s\ndsub:\n  gpus-per-worker: 0\n")
    (message,) = cluster_config_warnings(path, "local")
    assert "1 of its 4 settings are used, these are not: jobqueue.slurm.queue, jobqueue.slurm.memory, " \
           "dsub.gpus-per-worker." in message


@pytest.mark.parametrize("scheduler, content", [
    ("slurm", "jobqueue:\n  slurm:\n    queue: gpu\n  pbs:\n    queue: gpuq\n"),  # a profile for both
    ("slurm", "distributed:\n  comm:\n    timeouts:\n      connect: 60s\n"),
    ("local", "distributed:\n  worker:\n    daemon: false\n"),
])
def test_settings_the_run_reads_give_no_warning(tmp_path, scheduler, content):
    path = tmp_path / "site.yaml"
    path.write_text(content)
    assert cluster_config_warnings(path, scheduler) == []


def test_other_batch_systems_profile_is_named_as_unused():
    (message,) = cluster_config_warnings(PROFILES / "pbspro-gpu.yaml", "slurm")
    assert "not used by --scheduler slurm, which reads jobqueue.slurm" in message and "jobqueue.pbs." in message


def test_local_run_warns_once_about_a_jobqueue_config(tmp_path, capsys):
    from dsub.demo import make_dataset

    paths, _ = make_dataset(tmp_path / "data", count=8, box=32, snr=None)
    config = tmp_path / "site.yaml"
    config.write_text("jobqueue:\n  slurm:\n    queue: gpu\n")
    code = main(["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
                 "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"), "--quiet", "--scheduler", "sync",
                 "--cluster-config", str(config)])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [line for line in err.splitlines() if "--cluster-config" in line]
    assert warned == [f"dsub: warning: --cluster-config {config}: its jobqueue settings are not used by --scheduler "
                      "sync (tasks in this process, no Dask cluster); none of its settings is used: "
                      "jobqueue.slurm.queue. jobqueue settings configure SLURM/PBS worker jobs (--scheduler slurm "
                      "or pbs); leave the file out here, or use it with those."]
    assert warned[0] in (tmp_path / "out" / "dsub.log").read_text()


def subtract_with(tmp_path, *options) -> list[str]:
    """A subtract command line on small inputs, with ``options``."""
    from dsub.demo import make_dataset

    paths, _ = make_dataset(tmp_path / "data", count=8, box=32, snr=None)
    return ["subtract", str(paths["star"]), "--half-a", str(paths["half_a"]), "--half-b", str(paths["half_b"]),
            "--mask", str(paths["mask"]), "-o", str(tmp_path / "out"), "--quiet", *options]


@pytest.mark.parametrize("scheduler", ["local", "slurm"])
def test_unknown_interface_is_one_line_before_any_work(tmp_path, capsys, scheduler):
    import psutil

    code = main(subtract_with(tmp_path, "--scheduler", scheduler, "--interface", "nosuchif"))
    out, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [f"dsub: error: --interface nosuchif: no such network interface on this machine (it "
                                f"has {', '.join(psutil.net_if_addrs())}). Give one of those (on a cluster, its "
                                "internal network, e.g. ib0)."]
    assert out == "" and not (tmp_path / "out").exists()  # refused before the inputs were read


@pytest.mark.parametrize("address, words", [
    ("nonsense", "give HOST:PORT (e.g. 127.0.0.1:8787"),
    ("127.0.0.1:99999", "the port 99999 is beyond 0-65535"),
    ("127.0.0.1:http", "the port 'http' is not a number"),
    ("no-such-host.invalid:8787", "this machine cannot resolve the host no-such-host.invalid"),
])
def test_bad_dashboard_address_is_one_line_before_any_work(tmp_path, capsys, address, words):
    code = main(subtract_with(tmp_path, "--scheduler", "local", "--dashboard-address", address))
    out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"dsub: error: --dashboard-address {address}: ") and words in line
    assert out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:8787", ":0", "8787", "localhost:0,127.0.0.1:0"])
def test_dashboard_addresses_dask_reads_are_accepted(address):
    assert ClusterSpec(scheduler="local", dashboard_address=address).dashboard_address == address


def test_interface_of_the_workers_alone_is_not_checked_here(tmp_path):
    """A batch cluster's scheduler with its own interface (scheduler-options): --interface is the workers'."""
    config = tmp_path / "site.yaml"
    config.write_text("jobqueue:\n  slurm:\n    scheduler-options:\n      interface: lo\n")
    assert ClusterSpec(scheduler="slurm", interface="ib0-on-the-nodes", cluster_config=str(config)).interface
    with pytest.raises(OptionError, match="--interface ib0-on-the-nodes: no such network interface"):
        ClusterSpec(scheduler="slurm", interface="ib0-on-the-nodes")


def test_cluster_that_dask_cannot_start_is_one_line_quoting_dask(tmp_path, capsys):
    """Whatever Dask refuses as the cluster starts (here a dashboard on an address not of this machine)."""
    code = main(subtract_with(tmp_path, "--scheduler", "local", "--dashboard-address", "192.0.2.1:8787"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "Cluster failed to start" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dsub: error:")]
    assert line.startswith("dsub: error: the local Dask cluster failed to start; Dask says: [Errno 99] Cannot "
                           "assign requested address. Check the network settings")


def test_interface_in_a_cluster_config_that_dask_refuses_is_one_line(tmp_path, capsys):
    config = tmp_path / "site.yaml"
    config.write_text("jobqueue:\n  slurm:\n    interface: nosuchif\n")
    code = main(["job-script", "--scheduler", "slurm", "--cluster-config", str(config)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("dsub: error: the slurm Dask cluster failed to start; Dask says: 'nosuchif' is not a valid "
                          "network interface.") and len(err.splitlines()) == 1


def test_misspelt_settings_are_named_with_the_nearest_known_one(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("jobqueue:\n  slurm:\n    queu: gpu\n    memroy: 4GB\n    job_extra_directives: [--exclusive]\n"
                    "dsub:\n  gpus-per-workers: 0\n")
    (message,) = cluster_config_warnings(path, "slurm")
    assert message == (f"--cluster-config {path}: these settings are not known to dask-jobqueue or dsub, which ignore "
                       "them all: jobqueue.slurm.queu (did you mean jobqueue.slurm.queue?), jobqueue.slurm.memroy (did "
                       "you mean jobqueue.slurm.memory?), dsub.gpus-per-workers (did you mean dsub.gpus-per-worker?). "
                       "Correct the names (dask-jobqueue's own jobqueue.yaml lists its settings, the README dsub's).")


def test_known_settings_are_dask_jobqueues_own():
    """What counts as known is read from the installed dask-jobqueue's default config, for every batch system."""
    import dask_jobqueue  # noqa: F401 -- its defaults join dask's config as it is imported

    from dsub.cluster.config import jobqueue_settings

    known = jobqueue_settings()
    for system in ("slurm", "pbs", "sge", "lsf"):
        assert known[system] == set(dask.config.get(f"jobqueue.{system}"))


@pytest.mark.parametrize("profile", sorted(p.relative_to(PROFILES) for p in PROFILES.rglob("*.yaml")))
def test_shipped_profiles_hold_no_unknown_settings(profile):
    from dsub.cluster.config import unknown_settings

    assert unknown_settings(load_cluster_config(PROFILES / profile)) == []


def test_misspelt_batch_system_is_named(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("jobqueue:\n  slrum:\n    queue: gpu\n    cores: 4\n")
    (unknown, unused) = cluster_config_warnings(path, "slurm")
    assert "not known to dask-jobqueue or dsub, which ignore it: jobqueue.slrum (did you mean jobqueue.slurm?)." \
        in unknown
    assert "not used by --scheduler slurm" in unused


@pytest.mark.parametrize("scheduler, config, words", [
    ("slurm", "jobqueue:\n  slurm:\n    queu: gpu\n", "jobqueue.slurm.queu (did you mean jobqueue.slurm.queue?)"),
    ("pbs", str(PROFILES / "slurm-gpu.yaml"), "its jobqueue settings are not used by --scheduler pbs"),
])
def test_job_script_warns_about_the_cluster_config_as_a_run_does(tmp_path, capsys, scheduler, config, words):
    path = Path(config) if config.endswith(".yaml") else tmp_path / "site.yaml"
    if not config.endswith(".yaml"):
        path.write_text(config)
    assert main(["job-script", "--scheduler", scheduler, "--cluster-config", str(path)]) == 0
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith(f"dsub: warning: --cluster-config {path}: ") and words in line
    assert out.startswith("#!")


def test_run_warns_about_misspelt_settings(tmp_path, capsys):
    """The run's warning, before any work (the run is refused at its inputs: no SLURM is asked)."""
    config = tmp_path / "site.yaml"
    config.write_text("jobqueue:\n  slurm:\n    memroy: 4GB\n")
    code = main(subtract_with(tmp_path, "--scheduler", "slurm", "--cluster-config", str(config), "--interface",
                              "nosuchif"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[0].startswith("dsub: error: --interface nosuchif")  # options first: nothing read yet
    code = main(subtract_with(tmp_path, "--scheduler", "slurm", "--cluster-config", str(config), "--half-b",
                              str(config)))  # refused as it is read, after the warning
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[0] == (f"dsub: warning: --cluster-config {config}: this setting is not known to "
                                   "dask-jobqueue or dsub, which ignore it: jobqueue.slurm.memroy (did you mean "
                                   "jobqueue.slurm.memory?). Correct the name (dask-jobqueue's own jobqueue.yaml "
                                   "lists its settings, the README dsub's).")


def stop_a_local_run(tmp_path, at: str, delay_s: float, prelude: str = "") -> tuple[int, str, str]:
    """``dsub subtract --scheduler local`` in a process group of its own, SIGTERM to the group (as a batch
    system or ``kill -TERM -PGID`` sends it) ``delay_s`` after the line that starts with ``at``.

    Returns the exit status, stderr, and the processes of the group still there once it ended (``ps``).
    """
    import signal
    import time

    if not (tmp_path / "data").exists():
        subtract_with(tmp_path)  # makes the inputs
    command = [sys.executable, "-c", f"{prelude}\nfrom dsub.command import run; run()",
               *[arg for arg in subtract_with(tmp_path, "--scheduler", "local") if arg != "--quiet"],
               "--workers", "2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    assert any(line.startswith(at) for line in iter(run.stdout.readline, "")), f"no line {at!r}"
    time.sleep(delay_s)
    os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    left = ""
    for _ in range(20):  # processes a parent's exit ends go within moments
        left = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(run.pid)], capture_output=True, text=True).stdout
        if not left.strip():
            break
        time.sleep(0.25)
    for pid in [int(line.split()[0]) for line in left.splitlines() if line.strip()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # none should be: the test fails below
    return run.returncode, err, left.strip()


def test_sigterm_while_a_local_cluster_starts_ends_in_one_line_and_no_worker_left(tmp_path):
    """SIGTERM to the run's process group as the local cluster starts beside the input checks, at several
    points of its start: the one stop line, exit status 143, and none of its processes left."""
    from dsub.errors import TERMINATED_BEFORE_WRITING

    for at, delay_s in [("Starting a local Dask cluster", 0.2), ("Starting a local Dask cluster", 0.6),
                        ("Memory:", 0.0)]:
        code, err, left = stop_a_local_run(tmp_path, at, delay_s)
        assert (code, err.strip().splitlines(), left) == (143, [TERMINATED_BEFORE_WRITING], ""), (at, delay_s)


def test_a_cluster_whose_close_is_cut_short_leaves_no_traceback_at_exit(tmp_path):
    """distributed's exit-time ``close_clusters`` closes a cluster still open; where that close ends in a
    ``CancelledError`` (a worker's start cancelled as SIGTERM killed its process) distributed's ``sync``
    raised ``UnboundLocalError``, printed after dsub's line. Here every close of a cluster is cut short so."""
    from dsub.errors import TERMINATED_BEFORE_WRITING

    cut_short = ("import asyncio\nfrom distributed.deploy.spec import SpecCluster\n"
                 "async def cancelled(self):\n    raise asyncio.CancelledError\n"
                 "SpecCluster._close = cancelled")
    code, err, left = stop_a_local_run(tmp_path, "Memory:", 0.5, prelude=cut_short)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert (code, err.strip().splitlines(), left) == (143, [TERMINATED_BEFORE_WRITING], "")


@pytest.mark.parametrize("cause, said", [
    (RuntimeError("can't start new thread"), "a local Dask worker failed to start (can't start new thread): it ran "
                                             "out of memory, threads or address space"),
    (ValueError("bad preload"), "a local Dask worker failed to start: ValueError: bad preload. Rerun"),
    (None, "a local Dask worker failed to start (Nanny failed to start.): it ran out of memory"),
])
def test_a_local_worker_that_fails_to_start_is_one_line_with_its_own_error(cause, said):
    """distributed raises ``RuntimeError("Nanny failed to start.")`` from the worker's own error (under a low
    ``ulimit -v``: a thread the system refuses): one line naming that error, not a traceback."""
    from dsub.cluster.start import ClusterStartError, dask_start_errors

    def fail():
        with dask_start_errors(ClusterSpec(scheduler="local")):
            if cause is None:
                raise RuntimeError("Nanny failed to start.")
            raise RuntimeError("Nanny failed to start.") from cause

    with pytest.raises(ClusterStartError) as caught:
        fail()
    assert str(caught.value).startswith(said), str(caught.value)


def test_a_local_cluster_of_cpu_workers_on_few_cores_says_threads_is_faster(monkeypatch):
    """On 2 cores a local cluster's workers each start Python and prepare their own maps (its sample fit took
    15 s against 2 s on threads): the run says so once, with the alternative; with more cores or GPUs not."""
    from dsub.cluster import start

    monkeypatch.setattr(start, "visible_gpus", lambda: [])
    monkeypatch.setattr(start.os, "cpu_count", lambda: 2)
    note = start.few_cores_note(ClusterSpec(scheduler="local"))
    assert note is not None and "on 2 cores" in note and "--scheduler threads" in note
    assert "2 worker process(es)" in note
    assert start.few_cores_note(ClusterSpec(scheduler="threads")) is None
    monkeypatch.setattr(start, "visible_gpus", lambda: ["0"])
    assert start.few_cores_note(ClusterSpec(scheduler="local")) is None  # GPU workers: what local is for
    assert start.few_cores_note(ClusterSpec(scheduler="local", device="cpu")) is not None
    monkeypatch.setattr(start.os, "cpu_count", lambda: 16)
    assert start.few_cores_note(ClusterSpec(scheduler="local", device="cpu")) is None


@pytest.mark.parametrize("device, kept", [("auto", True), ("gpu", True), ("cpu", False)])
def test_gpu_workers_are_kept_on_their_gpus_cpus_and_cpu_work_keeps_every_core(monkeypatch, device, kept):
    """A local cluster on a machine with GPUs: GPU workers get their GPU's CPUs (``affinity.gpu_cpus``) and
    its warm-up; with --device cpu the workers are neither kept to a NUMA node nor warmed up."""
    from dsub.cluster import start

    made = {}

    class Recorded:  # what the cluster would be started with, without starting processes
        def __init__(self, gpus, warm_up_gpu=True, gpu_cpus=None, **options):
            made.update(gpus=gpus, warm_up_gpu=warm_up_gpu, gpu_cpus=gpu_cpus)

        def scale(self, count):
            made["scaled"] = count

    monkeypatch.setattr(start, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(start, "gpu_cpus", lambda count: [{0, 1}, {2, 3}][:count])
    monkeypatch.setattr(start, "PinnedGPUCluster", Recorded)
    _, description = start.local_cluster(ClusterSpec(scheduler="local", device=device))
    assert made["gpus"] == ["0", "1"] and made["scaled"] == 2 and made["warm_up_gpu"] is kept
    assert made["gpu_cpus"] == ([{0, 1}, {2, 3}] if kept else [None, None])
    assert description.startswith("local cluster, 2 GPU worker(s) on GPUs 0, 1")
    assert ("each kept on its GPU's CPUs: GPU 0 0-1; GPU 1 2-3" in description) is kept


class _FakeBatchCluster:
    """What ``start.preflight`` and ``start.diagnose`` read of a dask-jobqueue cluster."""

    def __init__(self, memory="64GB", job_ids=()):
        from types import SimpleNamespace

        self.dsub_memory = memory
        self.dsub_submit_errors = []
        self.workers = {str(i): SimpleNamespace(job_id=job_id) for i, job_id in enumerate(job_ids)}

    def job_script(self):
        return "#!/bin/sh\n"


def test_missing_batch_commands_are_refused_at_once(tmp_path, monkeypatch, capsys):
    """No sbatch where dsub runs: one line before the cluster starts, not a wait for workers that can never be
    submitted (``start.start_cluster`` asks this first for a batch scheduler)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder without SLURM's commands (nor PBS's)
    from dsub.cluster import start

    with pytest.raises(DsubError) as refused:
        start.require_batch_commands("slurm")
    assert str(refused.value).startswith("--scheduler slurm: sbatch, scancel and squeue are not on PATH")
    assert "add their folder to PATH" in str(refused.value)
    with pytest.raises(DsubError, match="qsub, qdel and qstat are not on PATH"):
        start.require_batch_commands("pbs")
    with pytest.raises(DsubError, match="sbatch, scancel and squeue are not on PATH"):
        with start.start_cluster(ClusterSpec(scheduler="slurm", progress=False)):
            pass
    # The command says so before it reads the particles (here empty files, which it would refuse).
    inputs = [tmp_path / name for name in ("particles.star", "a.mrc", "b.mrc", "m.mrc")]
    for path in inputs:
        path.write_bytes(b"")
    assert main(["subtract", str(inputs[0]), "--half-a", str(inputs[1]), "--half-b", str(inputs[2]), "--mask",
                 str(inputs[3]), "-o", str(tmp_path / "out"), "--scheduler", "slurm", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsub: error: --scheduler slurm: sbatch, scancel and squeue are not on PATH"), err


def test_slurm_refusal_tells_an_unreachable_controller_from_a_refused_job(monkeypatch):
    from dsub.cluster import start

    monkeypatch.setattr(start.shutil, "which", lambda command: f"/usr/bin/{command}")
    spec = ClusterSpec(scheduler="slurm", worker_memory_bytes=int(0.7e9))
    said = {"words": "Unable to contact slurm controller (connect failure)"}
    monkeypatch.setattr(start, "sbatch_test_only", lambda script: said["words"])
    with pytest.raises(DsubError) as unreachable:
        start.preflight(_FakeBatchCluster(), spec)
    assert str(unreachable.value).startswith("SLURM's controller did not answer sbatch --test-only: Unable to contact "
                                             "slurm controller (connect failure). Check that SLURM is up")
    said["words"] = "allocation failure: Requested node configuration is not available"
    with pytest.raises(DsubError) as refused:
        start.preflight(_FakeBatchCluster("64GB"), spec)
    assert str(refused.value).startswith(
        "SLURM refuses the worker job: allocation failure: Requested node configuration is not available. Each job "
        "asks for 64GB of memory (the cluster config's memory), more than the 0.7 GB this run needs")
    with pytest.raises(DsubError) as fitting:
        start.preflight(_FakeBatchCluster("1GB"), spec)
    assert "Each job asks for 1GB of memory, what this run needs of each worker job" in str(fitting.value)
    said["words"] = "Batch job submission failed: Invalid partition name specified"
    with pytest.raises(DsubError) as named:  # a wrong name: nothing said of memory
        start.preflight(_FakeBatchCluster("64GB"), spec)
    assert str(named.value) == (
        "SLURM refuses the worker job: Batch job submission failed: Invalid partition name specified. Check the "
        "partition and resources in your cluster config (dsub job-script --scheduler slurm shows the job script).")
    said["words"] = None
    start.preflight(_FakeBatchCluster(), spec)  # accepted: nothing said


def test_a_failed_submission_ends_the_wait_for_workers_and_the_queue_shown_is_the_runs_own(monkeypatch):
    import time as clock

    from dsub.cluster import start

    class NoWorkers:
        def wait_for_workers(self, count, timeout):
            clock.sleep(min(timeout, 0.05))
            raise TimeoutError

    cluster = _FakeBatchCluster(job_ids=["101", "102"])
    cluster.dsub_submit_errors.append("qsub: Job exceeds queue resource limits MSG=cannot satisfy")
    spec = ClusterSpec(scheduler="pbs", worker_timeout=300)
    started = clock.monotonic()
    with pytest.raises(start.NoWorkersError) as failed:
        start.wait_for_workers(NoWorkers(), cluster, spec, "pbs jobs")
    assert clock.monotonic() - started < 5
    assert str(failed.value).startswith("the pbs jobs could not be submitted: qsub: Job exceeds queue resource "
                                        "limits MSG=cannot satisfy. Check the cluster config")
    asked = []
    monkeypatch.setattr(start.shutil, "which", lambda command: f"/usr/bin/{command}")
    monkeypatch.setattr(start, "sbatch_test_only", lambda script: None)
    monkeypatch.setattr(start.subprocess, "run", lambda command, **options: asked.append(command) or
                        __import__("types").SimpleNamespace(stdout="101 PENDING Priority\n", returncode=0))
    said = start.diagnose(_FakeBatchCluster(job_ids=["101", "102"]), ClusterSpec(scheduler="slurm"))
    assert asked == [["squeue", "-h", "-o", "%i %T %r", "-j", "101,102"]]
    assert said == " squeue (this run's jobs): 101 PENDING Priority"


@pytest.mark.parametrize("section, intent", [("jobque", "jobqueue"), ("dsubb", "dsub"), ("distributd", "distributed"),
                                             ("DSUB", "dsub")])
def test_a_misspelt_section_of_a_cluster_config_is_refused_naming_its_intent(tmp_path, capsys, section, intent):
    """Every setting below a misspelt section would be ignored, and the jobs go out with the defaults: refused."""
    config = tmp_path / "site.yaml"
    config.write_text(f"{section}:\n  slurm:\n    queue: gpu\n")
    assert main(["job-script", "--scheduler", "slurm", "--cluster-config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dsub: error: {config}: has a section '{section}:', which nothing reads (did you mean "
                   f"'{intent}:'?): its settings would all be ignored and the worker jobs use the defaults. "
                   f"Name the section '{intent}:'.")


def test_a_section_nobody_reads_is_warned_about(tmp_path, capsys):
    """A section that is no near miss (another library's, here dask-cuda's) is named, not refused."""
    config = tmp_path / "site.yaml"
    config.write_text("cuda:\n  rmm-pool-size: 1GB\njobqueue:\n  slurm:\n    queue: gpu\n")
    assert main(["job-script", "--scheduler", "slurm", "--cluster-config", str(config)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsub: warning:")]
    assert warnings == [f"dsub: warning: --cluster-config {config}: section cuda is read by neither dask, "
                        "dask-jobqueue nor dsub, and left as it is (another program may read this file)."], warnings


def test_the_line_for_workers_that_leave_says_what_happens_next():
    from dsub.cluster.runner import workers_left_line

    local = workers_left_line(2, 3, ClusterSpec(scheduler="local"))
    assert local == ("dsub: 2 Dask workers left the run (3 remain): their unfinished chunks run again, and the local "
                     "cluster starts new worker processes.")
    existing = workers_left_line(1, 1, ClusterSpec(scheduler="tcp://127.0.0.1:8786"))
    assert existing.startswith("dsub: 1 Dask worker left the run (1 remains)") and "other workers take" in existing
    alone = workers_left_line(1, 0, ClusterSpec(scheduler="pbs", worker_timeout=60))
    assert alone.endswith("a new worker job is asked for in place of each; with none left the run waits up to 60 s "
                          "(--worker-timeout) for one.")


def test_a_refused_job_is_told_the_largest_node_of_its_partition(monkeypatch):
    import dask

    from dsub.cluster import start

    asked = []
    monkeypatch.setattr(start.subprocess, "run", lambda command, **options: asked.append(command) or
                        __import__("types").SimpleNamespace(stdout="16000\n257000+\n", returncode=0))
    with dask.config.set({"jobqueue.slurm.queue": "gpu"}):
        assert start.largest_node_memory() == " The largest node of partition gpu has 251 GB of memory (sinfo)."
    assert asked == [["sinfo", "-h", "-o", "%m", "-p", "gpu"]]
    monkeypatch.setattr(start.subprocess, "run", lambda command, **options: __import__("types").SimpleNamespace(
        stdout="", returncode=1))
    assert start.largest_node_memory() == ""


def test_workers_retired_by_adapt_are_no_loss_but_a_drop_below_its_minimum_is():
    from dsub.cluster.runner import workers_lost

    def addresses(count, first=0):
        return {f"tcp://127.0.0.1:{port}" for port in range(first, first + count)}

    fixed = ClusterSpec(scheduler="slurm", workers=4)
    assert workers_lost(addresses(4), addresses(3), fixed) == 1
    assert workers_lost(addresses(3), addresses(4), fixed) == 0 and workers_lost(addresses(4), addresses(4), fixed) == 0
    assert workers_lost(addresses(4), addresses(3) | addresses(1, 100), fixed) == 1  # replaced before it was seen
    adaptive = ClusterSpec(scheduler="slurm", adapt=(2, 16))
    assert workers_lost(addresses(16), addresses(2), adaptive) == 0  # the work runs out: Dask retires idle workers
    assert workers_lost(addresses(2), addresses(1), adaptive) == 1 and workers_lost(addresses(9), set(), adaptive) == 9


@pytest.mark.parametrize("scheduler, profile", [("slurm", "slurm-gpu.yaml"), ("pbs", "pbspro-gpu.yaml"),
                                                ("pbs", "torque-gpu.yaml")])
def test_an_example_profiles_placeholder_path_is_said(capsys, scheduler, profile):
    """The shipped profiles' /path/to/dsub stands where the site's path belongs: job-script (and a run) say so."""
    path = PROFILES / profile
    assert main(["job-script", "--scheduler", scheduler, "--cluster-config", str(path)]) == 0
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith(f"dsub: warning: --cluster-config {path}: still the example profile's placeholder")
    assert f"jobqueue.{scheduler}.job-script-prologue: 'source /path/to/dsub/.venv/bin/activate'" in line
    assert "source /path/to/dsub/.venv/bin/activate" in out  # the script as it would be submitted


def test_a_site_profile_without_placeholders_is_not_warned_about():
    assert cluster_config_warnings(PROFILES / "local-slurm" / "jobqueue.yaml", "slurm") == []


def test_a_local_cluster_taken_up_at_once_is_made_in_a_thread_of_its_own(monkeypatch, capsys):
    """A run without an early cluster (a rerun that only restores a stack): its local cluster is made in a
    thread of its own, so the main thread never has SIGINT blocked (the maker's mask, which its workers
    inherit) and takes a Ctrl-C at once."""
    import signal
    import threading

    from dsub.cluster import start
    from dsub.cluster.runner import open_runner

    seen = {}
    main_thread = threading.main_thread()

    def sigint_blocked(thread) -> bool:
        status = Path(f"/proc/self/task/{thread.native_id}/status").read_text().splitlines()
        mask = next(line for line in status if line.startswith("SigBlk:"))
        return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))

    class Client:
        dashboard_link = None

        def scheduler_info(self):
            return {"workers": {}}

    @contextlib.contextmanager
    def made_here(spec):
        from dsub.cluster.ctrl_c import workers_ignore_ctrl_c

        with workers_ignore_ctrl_c():  # as local_cluster makes the LocalCluster
            seen["maker"] = threading.current_thread()
            seen["maker blocks"] = sigint_blocked(seen["maker"])
            seen["main blocks"] = sigint_blocked(main_thread)
        yield Client(), None, "a local cluster"
        seen["closed"] = True

    monkeypatch.setattr(start, "start_cluster", made_here)
    spec = ClusterSpec(scheduler="local", workers=1, progress=False)
    with open_runner(spec) as runner:
        assert runner.description == "a local cluster"
    assert seen == {"maker": seen["maker"], "maker blocks": True, "main blocks": False, "closed": True}
    assert seen["maker"] is not main_thread and not sigint_blocked(main_thread)
    assert "Starting a local Dask cluster ..." in capsys.readouterr().out
