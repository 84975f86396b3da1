"""Helpers: run a method in a fresh subprocess and report its time and peak resident memory.

Peak memory is the kernel's own high-water mark (``VmHWM`` in ``/proc/self/status``),
reset just before the measured work by writing ``5`` to ``/proc/self/clear_refs``, so
imports and set-up that peaked earlier do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def measure_child(script: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(script: Path, method: str, folder: Path, repeats: int) -> dict:
    """Run ``method`` ``repeats`` times, each in a fresh process: the fastest time and the highest peaks.

    A 2-core machine shares its cores with everything else, so one run can be
    several times slower than the next; the minimum is the repeatable number.
    """
    runs = [measure_child(script, "method", method, str(folder)) for _ in range(repeats)]
    best = {"method": method, "seconds": min(r["seconds"] for r in runs), "runs": repeats}
    for field in ("peak_rss_mb", "extra_rss_mb"):
        best[field] = max(r[field] for r in runs)
    return best


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


class PeakPrivate:
    """The peak of private memory (``RssAnon``, MiB) while the block runs, sampled every 2 ms.

    File-backed pages of a memory map are not private, so a lazily mapped checkpoint does not count.
    """

    def __enter__(self) -> PeakPrivate:
        self.base = self.peak = _status_mb("RssAnon")
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _status_mb("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _status_mb("RssAnon"))


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def warm_up() -> None:
    """Start the BLAS and conversion thread pools so no method pays their start-up."""
    x = torch.randn(512, 512)
    for _ in range(3):
        (x @ x).to(torch.bfloat16).float()


def report(seconds: float, *, runtime_mb: float, before_mb: float) -> None:
    """Print time, peak RSS above the bare runtime (imports only) and above the state just before the work."""
    peak = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak - runtime_mb, "extra_rss_mb": peak - before_mb}))


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def interleaved(fns: dict, repeats: int) -> dict:
    """Best time of each function, timed in rounds (one call of each per round) so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with Timer() as t:
                fn()
            best[name] = min(best[name], t.seconds)
    return best
