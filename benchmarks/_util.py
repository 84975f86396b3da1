"""Helpers: run a function in a fresh subprocess and report time and peak RSS."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure_child(script: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def report(seconds: float, baseline_mb: float = 0.0) -> None:
    """Print time and peak RSS above ``baseline_mb`` (the RSS after imports, before the work)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak - baseline_mb}))


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
