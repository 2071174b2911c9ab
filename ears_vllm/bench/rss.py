"""A server's resident memory over time: the sum of RSS over a process and its children, sampled on a thread.

``vllm serve`` runs its engine core in a child process (and the plugin's per-request history and counters
live there), so the whole tree is summed; a child that exits between listing and reading is skipped.
"""

from __future__ import annotations

import contextlib
import csv
import threading
import time
from pathlib import Path


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it has exited)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


class RssSampler:
    """Samples :func:`tree_rss_bytes` every ``interval_s`` seconds between ``start()`` and ``stop()``.

    ``samples`` holds ``(seconds since start, resident MiB)``.
    """

    def __init__(self, pid: int, interval_s: float = 5.0) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ears-vllm-rss", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - start, tree_rss_bytes(self.pid) / 2**20))
            if self._stop.wait(self.interval_s):
                return

    def write_csv(self, path: Path) -> Path:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seconds", "rss_mib"])
            writer.writerows((f"{t:.1f}", f"{mib:.1f}") for t, mib in self.samples)
        return path


def summary(samples: list[tuple[float, float]]) -> dict[str, float | None]:
    """Start, end and peak RSS, and the growth from the first quarter of the run to the last (medians, so one
    garbage-collection swing does not decide it); a flat server grows by about 0%."""
    if not samples:
        return {"rss_start_mib": None, "rss_end_mib": None, "rss_peak_mib": None, "rss_growth": None}
    values = [mib for _, mib in samples]
    quarter = max(1, len(values) // 4)
    first, last = sorted(values[:quarter]), sorted(values[-quarter:])
    first_median, last_median = first[len(first) // 2], last[len(last) // 2]
    return {
        "rss_start_mib": values[0],
        "rss_end_mib": values[-1],
        "rss_peak_mib": max(values),
        "rss_growth": last_median / first_median - 1 if first_median else None,
    }
