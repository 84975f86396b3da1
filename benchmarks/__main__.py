"""Run the benchmarks: ``python -m benchmarks [--quick] [--scale F]``.

Each benchmark runs every method in its own subprocess (fresh peak RSS),
side by side in one run, and prints ratios. Results go to
``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import subprocess
import sys

import torch

HERE = Path(__file__).parent


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--quick", action="store_true", help="a small smoke size (CI)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per method; the fastest counts")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of Wan2.1-1.3B's 30 blocks (1.0 = full)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md and its plots")
    p.add_argument("--only", nargs="*", default=None, help="run only these benchmarks (io, merge, call, dist)")
    args = p.parse_args()
    layers = 2 if args.quick else max(1, round(30 * args.scale))
    data = HERE / "_data" / f"wan-{layers}"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, str(HERE / "io_bench.py"), "make", str(data), str(layers)], check=True, env=env)
    machine = {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    results: dict = {"layers": layers}
    benches = ("io_bench.py", "merge_bench.py", "call_bench.py", "dist_bench.py")
    for bench in benches:
        if args.only is not None and bench.removesuffix("_bench.py") not in args.only:
            continue
        extra = [str(2 if args.quick else 4)] if bench == "call_bench.py" else []  # blocks of the forward benchmark
        cmd = [sys.executable, str(HERE / bench), "run", str(data), str(max(args.repeats, 5) if extra else args.repeats), *extra]
        out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        results[bench.removesuffix(".py")] = doc
        print(f"\n== {bench} ({doc.get('blocks', layers)} blocks) ==")
        for row in doc["rows"]:
            rss = (f"  peak RSS {row['peak_rss_mb']:8.1f} MB  (+{row['extra_rss_mb']:.1f} MB over its inputs)"
                   if "peak_rss_mb" in row else "")
            if "private_peak_mb_max_rank" in row:
                rss = f"  peak private memory per rank {row['private_peak_mb_per_rank']} MB"
            name = f"{row['method']} ({row['world']} ranks)" if "world" in row else row["method"]
            print(f"{name:<44} {row['seconds']:8.3f} s{rss}")
        for name, value in doc["ratios"].items():
            print(f"  {name:<72} {value:7.3f}")
    # results.json keeps one run per model size (the page plots how they grow); this run replaces its size
    path = HERE / "results.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    runs = doc.get("runs", {}) if isinstance(doc.get("runs"), dict) else {}
    runs[str(layers)] = {**runs.get(str(layers), {}), **results}  # --only keeps the other benchmarks of this size
    doc = {"machine": machine, "runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0])))}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if not args.no_report:
        from benchmarks._report import write_report

        write_report(doc, HERE.parent / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
