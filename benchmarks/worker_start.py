"""Where the seconds of starting a local cluster's workers go (``--scheduler local``).

    python benchmarks/worker_start.py [--device gpu] [--workers 1] [--repeats 2]

Each step in a fresh process (so that nothing is imported twice), wall seconds:

* ``python -c pass``, ``import distributed``, ``import dsub.workflow.tasks``,
  ``import cupy`` and the first CUDA call: what every worker process pays;
* a bare ``LocalCluster`` (no dashboard) until its first worker: Dask's own start;
* dsub's ``start.start_cluster`` for ``spec`` (GPU pinning, dashboard) until the
  first worker, then ``client.run(worker_capacity)`` (each worker's device and
  free memory: the worker's first CUDA call), as a run does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SNIPPETS = {
    "python -c pass": "pass",
    "import distributed": "import distributed",
    "import dsub.workflow.tasks": "import dsub.workflow.tasks",
    "import cupy + first CUDA call": "import cupy; cupy.zeros(1).sum().get()",
}

CLUSTER = """
import logging, sys, time
from distributed import Client, LocalCluster
if __name__ == "__main__":
    started = time.perf_counter()
    cluster = LocalCluster(n_workers={workers}, threads_per_worker=2, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.CRITICAL)
    client = Client(cluster)
    client.wait_for_workers(1)
    print(time.perf_counter() - started)
    client.close(); cluster.close()
"""

DSUB_CLUSTER = """
import sys, time
if __name__ == "__main__":
    started = time.perf_counter()
    from dsub.cluster.runner import ClusterSpec
    from dsub.cluster.start import start_cluster
    from dsub.workflow.resources import worker_capacity
    spec = ClusterSpec(scheduler="local", workers={workers}, dashboard_address="127.0.0.1:0", progress=False,
                       device="{device}")
    with start_cluster(spec) as (client, cluster, description):
        ready = time.perf_counter() - started
        client.run(worker_capacity, "{device}")
        print(ready, time.perf_counter() - started)
"""


def seconds(code: str) -> list[float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return [float(value) for value in result.stdout.split()] or [wall]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        for label, code in SNIPPETS.items():
            if "cupy" in code and args.device != "gpu":
                continue
            rows.append((label, seconds(code)[0]))
        rows.append((f"bare LocalCluster, first of {args.workers} worker(s)",
                     seconds(CLUSTER.format(workers=args.workers))[0]))
        ready, capacity = seconds(DSUB_CLUSTER.format(workers=args.workers, device=args.device))
        rows.append((f"dsub's local cluster ({args.device}), first worker", ready))
        rows.append(("  ... and each worker's device and memory (client.run)", capacity))
    print("| step (fresh process) | wall s |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.2f} |")


if __name__ == "__main__":
    main()
