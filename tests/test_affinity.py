"""A local GPU worker kept on its GPU's CPUs: the kernel's CPU lists, sysfs read as Linux lays it out, pinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dsub.cluster import affinity

ALLOWED = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("text, cpus", [
    ("0-3,8-11\n", {0, 1, 2, 3, 8, 9, 10, 11}),
    ("5", {5}),
    ("0,2,4-5", {0, 2, 4, 5}),
    ("", set()),
])
def test_cpu_lists_read_and_written_in_the_kernels_format(text, cpus):
    assert affinity.parse_cpu_list(text) == cpus
    assert affinity.parse_cpu_list(affinity.format_cpu_list(cpus)) == cpus


def test_cpu_list_format_joins_runs():
    assert affinity.format_cpu_list([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"


@pytest.mark.parametrize("text", ["a-b", "4-2", "1;2"])
def test_malformed_cpu_lists_are_refused(text):
    with pytest.raises(ValueError):
        affinity.parse_cpu_list(text)


def fake_sysfs(root, lists: dict[str, str]):
    """``root/<bus id>/local_cpulist`` as /sys/bus/pci/devices lays it out (lower-case bus ids)."""
    for bus, text in lists.items():
        (root / bus).mkdir(parents=True)
        (root / bus / "local_cpulist").write_text(text + "\n")
    return root


BUS = {0: "0000:1B:00.0", 1: "0000:9C:00.0"}  # as CUDA writes them: upper case


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs to give two GPUs CPUs of their own")
def test_each_gpu_gets_the_allowed_cpus_of_its_numa_node(tmp_path, monkeypatch):
    monkeypatch.delenv(affinity.SWITCH, raising=False)
    first, second = ALLOWED[0], ALLOWED[1]
    outside = max(ALLOWED) + 1  # a CPU of the node that this process may not use (a batch job's cpuset)
    devices = fake_sysfs(tmp_path, {"0000:1b:00.0": f"{first},{outside}", "0000:9c:00.0": f"{second}"})
    assert affinity.gpu_cpus(2, BUS.__getitem__, devices) == [{first}, {second}]


def test_nothing_is_pinned_where_pinning_changes_nothing_or_cannot_be_decided(tmp_path, monkeypatch):
    monkeypatch.delenv(affinity.SWITCH, raising=False)
    everything = affinity.format_cpu_list(ALLOWED)
    one_node = fake_sysfs(tmp_path / "one", {"0000:1b:00.0": everything, "0000:9c:00.0": everything})
    assert affinity.gpu_cpus(2, BUS.__getitem__, one_node) == [None, None]
    missing = fake_sysfs(tmp_path / "missing", {"0000:1b:00.0": str(ALLOWED[0])})
    assert affinity.gpu_cpus(2, BUS.__getitem__, missing) == ([{ALLOWED[0]}, None] if len(ALLOWED) > 1 else [None, None])
    outside_only = fake_sysfs(tmp_path / "outside", {"0000:1b:00.0": str(max(ALLOWED) + 1)})
    assert affinity.gpu_cpus(1, BUS.__getitem__, outside_only) == [None]

    def no_cuda(ordinal):
        raise RuntimeError("cudaErrorNoDevice")

    assert affinity.gpu_cpus(2, no_cuda, one_node) == [None, None]
    assert affinity.gpu_cpus(0, BUS.__getitem__, one_node) == []


def test_the_switch_turns_pinning_off(tmp_path, monkeypatch):
    devices = fake_sysfs(tmp_path, {"0000:1b:00.0": str(ALLOWED[0])})
    monkeypatch.setenv(affinity.SWITCH, "0")
    assert affinity.gpu_cpus(1, BUS.__getitem__, devices) == [None]


def test_a_worker_pins_every_thread_and_the_threads_it_starts_later():
    """In a fresh process (as a spawned worker): the preload pins the threads running already, and the
    threads started after it (Dask's task threads) inherit the CPUs."""
    script = textwrap.dedent(f"""
        import json, os, threading
        stop = threading.Event()
        early = threading.Thread(target=stop.wait)  # running before the preload, as Dask's threads are
        early.start()
        os.environ["{affinity.WORKER_CPUS}"] = "{ALLOWED[-1]}"
        from dsub.cluster import warm_up
        warm_up.dask_setup(None)
        later = []
        thread = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
        thread.start(); thread.join()
        seen = {{"main": sorted(os.sched_getaffinity(0)), "early": sorted(os.sched_getaffinity(early.native_id)),
                "later": later[0]}}
        stop.set(); early.join()
        warm_up.dask_teardown(None)
        print(json.dumps(seen))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"main": [ALLOWED[-1]], "early": [ALLOWED[-1]], "later": [ALLOWED[-1]]}


def test_a_worker_without_cpus_to_keep_to_is_left_as_it_is():
    script = ("import os; os.environ.pop('DSUB_WORKER_CPUS', None)\n"
              "from dsub.cluster import affinity; affinity.pin_from_environment()\n"
              "print(sorted(os.sched_getaffinity(0)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == str(ALLOWED)
