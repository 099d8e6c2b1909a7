"""The peak of this process's mapped (VmSize) and resident (RSS) memory over a block, sampled every 2 ms.

Used by ``report_memory.py`` and ``tests/test_report.py`` alike::

    with PeakMemory() as peak:
        write_report(outdir)
    peak.mapped, peak.resident   # bytes added at their peak, beyond what the process held before the block
"""

from __future__ import annotations

import threading
import time


class PeakMemory:
    """Samples psutil's memory figures of this process in a thread while the block runs.

    The figures before the block are taken once the sampling thread runs, so its own
    stack is not counted. ``mapped`` and ``resident``: bytes above them at their peak.
    """

    INTERVAL_S = 0.002

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        now = self._process.memory_info()
        self._peak = [now.vms, now.rss]
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        time.sleep(25 * self.INTERVAL_S)
        self._start = self._process.memory_info()
        return self

    def _watch(self):
        while not self._stop.is_set():
            now = self._process.memory_info()
            self._peak = [max(self._peak[0], now.vms), max(self._peak[1], now.rss)]
            time.sleep(self.INTERVAL_S)

    def __exit__(self, *exc):
        self._stop.set()
        self._watcher.join()
        self.mapped = self._peak[0] - self._start.vms
        self.resident = self._peak[1] - self._start.rss
        return False
