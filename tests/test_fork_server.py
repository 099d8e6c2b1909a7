"""The fork server that local workers are forked from (``dsub.fork_server``): when it is started, what its
children inherit (the task libraries loaded, no CUDA, Dask's pre-spawn environment, SIGINT blocked, SIGTERM's
default) and what the server itself does with SIGTERM; and that a local run's workers come from it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import pytest

from dsub import fork_server

pytestmark = pytest.mark.skipif(os.name != "posix", reason="fork servers and signal masks are POSIX")


@pytest.mark.parametrize("argv, wanted", [
    (["subtract", "p.star", "--scheduler", "local"], True),
    (["subtract", "p.star", "--scheduler=local", "--workers", "2"], True),
    (["subtract", "p.star"], False),  # threads, the default
    (["subtract", "p.star", "--scheduler", "slurm"], False),
    (["job-script", "--scheduler", "local"], False),
    (["subtract", "--", "--scheduler", "local"], False),  # words after -- are names, not options
    (["subtract", "--scheduler", "local", "--help"], False),  # help only: no cluster
])
def test_the_server_is_started_only_for_a_subtraction_on_a_local_cluster(argv, wanted):
    assert fork_server.asks_for_local_cluster(argv) is wanted


def test_dask_uses_the_server_only_where_its_configuration_matches_the_servers_environment(monkeypatch):
    monkeypatch.setattr(fork_server, "_started", False)
    assert fork_server.method() is None  # never started
    monkeypatch.setattr(fork_server, "_started", True)
    assert fork_server.method() == "forkserver"
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        assert fork_server.method() is None  # the user's own start method
    with dask.config.set({"distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": 4}):
        assert fork_server.method() is None  # an environment the server was not started with
    with dask.config.set({"distributed.nanny.pre-spawn-environ.PYTHONHASHSEED": 6640}):
        assert fork_server.method() == "forkserver"


def signals(pid: int) -> dict:
    """SIGINT and SIGTERM in /proc/PID/status's blocked and ignored sets."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {f"{name} {field}": bool(int(fields[field], 16) & (1 << (number - 1)))
            for field in ("SigBlk", "SigIgn") for name, number in (("INT", signal.SIGINT), ("TERM", signal.SIGTERM))}


SCRIPT = textwrap.dedent("""
    import json, multiprocessing, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_fork_server import signals

    def child(connection):
        connection.send({{"modules": [name in sys.modules for name in ("dsub.workflow.tasks", "distributed", "cupy")],
                         "omp": os.environ.get("OMP_NUM_THREADS"), "seed": os.environ.get("PYTHONHASHSEED"),
                         "mark": os.environ.get("DSUB_IN_FORK_SERVER"), "signals": signals(os.getpid()),
                         "server": os.getppid()}})

    if __name__ == "__main__":
        from dsub import fork_server
        fork_server.start(["subtract", "p.star", "--scheduler", "local"])
        own = {{"omp": os.environ.get("OMP_NUM_THREADS"), "signals": signals(os.getpid())}}
        reading, writing = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.get_context("forkserver").Process(target=child, args=(writing,))
        process.start()
        seen = reading.recv()
        process.join()
        server = seen["server"]
        os.kill(server, signal.SIGTERM)  # ignored: the server outlives it
        alive = os.path.exists(f"/proc/{{server}}")
        print(json.dumps({{"child": seen, "own": own, "server": signals(server), "alive": alive}}))
""")


def test_children_of_the_server_have_the_libraries_and_signals_of_a_dask_worker(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    environment = {key: value for key, value in os.environ.items() if key not in fork_server.SERVER_ENVIRON}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**environment, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    child = seen["child"]
    assert child["modules"] == [True, True, False]  # loaded before the fork; CUDA left to the worker
    assert (child["omp"], child["seed"], child["mark"]) == ("1", "6640", None)
    assert child["signals"] == {"INT SigBlk": True, "TERM SigBlk": False, "INT SigIgn": False, "TERM SigIgn": False}
    assert seen["server"]["TERM SigIgn"] and seen["server"]["INT SigBlk"] and seen["alive"]
    assert seen["own"] == {"omp": None, "signals": {"INT SigBlk": False, "TERM SigBlk": False,
                                                    "INT SigIgn": False, "TERM SigIgn": False}}


def test_dask_forks_every_later_worker_and_a_restarted_server_loads_dsubs_modules(monkeypatch):
    from multiprocessing import forkserver

    monkeypatch.setattr(fork_server, "_started", True)
    before = list(forkserver._forkserver._preload_modules)
    try:
        with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):  # put back as it leaves
            assert fork_server.use_in_dask()
            assert dask.config.get("distributed.worker.multiprocessing-method") == "forkserver"
            assert forkserver._forkserver._preload_modules == list(fork_server.PRELOAD)  # not Dask's own list
        monkeypatch.setattr(fork_server, "_started", False)
        assert not fork_server.use_in_dask()
    finally:
        forkserver._forkserver._preload_modules = before
