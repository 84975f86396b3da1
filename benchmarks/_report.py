"""Render ``benchmarks/results.json`` as ``docs/benchmarks.md`` with plots (matplotlib, PNG).

The page is for users: each benchmark says what it measures, against which peer, on which machine, and what
the numbers mean for them (the takeaway is computed from this run's numbers, so it cannot go stale). The
benchmarks' own ratio names may carry the goals they were written against (``(target <= 1.5)``) and item
letters (``(a)``); :func:`ratio_label` drops both.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Any, Callable

TITLES = {
    "io_bench": "Loading a Wan2.1-1.3B-shaped bf16 checkpoint",
    "merge_bench": "Merging a rank-32 LoRA into it",
    "call_bench": "Forward with a rank-32 LoRA on the fly",
    "dist_bench": "Sharded loading on gloo ranks",
}
#: What each benchmark measures, and the peers it runs next to.
ABOUT = {
    "io_bench": ("the time and peak memory to open the checkpoint (`fvt.load`, lazy; then materialized), to build "
                 "the model from its folder (`fvt.load_model`), and to load and run one forward pass",
                 "safetensors' `load_file` and diffusers' `WanTransformer3DModel.from_pretrained` (+ the same forward)"),
    "merge_bench": ("the time and peak memory to merge a rank-32 LoRA on every attention and feed-forward linear "
                    "into the loaded checkpoint (`fvt.lora.merge`, and with `donate=True`: in place)",
                    "peft's `merge_and_unload` and diffusers' `fuse_lora`; two yardsticks: copying the targeted "
                    "weights into new memory, and computing the float32 products alone"),
    "call_bench": ("the time of one forward pass with the LoRA applied on the fly (`fvt.lora.call`), nothing merged",
                   "the same forward with the LoRA merged (`fvt.call`, the floor) and peft's unmerged LoRA layers"),
    "dist_bench": ("the time and peak private memory per rank to load the checkpoint sharded over 2 and 4 gloo "
                   "processes (`fvt.load(path, mesh=...)`: each rank reads only its shard)",
                   "a full load on every rank then distributing, and torch's `set_model_state_dict` broadcast"),
}
_GB = 2**30


def ratio_label(name: str) -> str:
    """A ratio's name for readers: without goals (``(target <= 1.5)``) or item letters (``(a)``).

    >>> ratio_label("2 ranks: (c) broadcast / (a) fvt time (target >= 2)")
    '2 ranks: broadcast / fvt time'
    """
    name = re.sub(r"\s*\(target [^)]*\)", "", name)
    name = re.sub(r"\((?:[a-e])\)(?:/\([a-e]\))?\s*", "", name)
    return re.sub(r"\s+", " ", name).strip()


def _ratio(bench: dict[str, Any], start: str) -> float | None:
    """The ratio whose reader's label starts with ``start``."""
    return next((v for k, v in bench["ratios"].items() if ratio_label(k).startswith(start)), None)


def _row(bench: dict[str, Any], method: str, field: str = "seconds") -> float | None:
    return next((r.get(field) for r in bench["rows"] if r["method"] == method), None)


def _io_takeaway(b: dict[str, Any]) -> str:
    lazy, load, call, mem = (_ratio(b, "fvt.load lazy"), _ratio(b, "load_model / diffusers"),
                             _ratio(b, "load_model+call"), _ratio(b, "materialized peak RSS"))
    return (f"`fvt.load` opens the checkpoint in {lazy:.2f}x the time of safetensors' `load_file` with "
            f"{_row(b, 'fvt_lazy', 'peak_rss_mb'):.0f} MB of memory (`load_file`: "
            f"{_row(b, 'load_file', 'peak_rss_mb'):.0f} MB); nothing is read until a tensor is used, and reading "
            f"them all takes {mem:.2f}x the checkpoint's size (no copy beyond the weights). `fvt.load_model` builds "
            f"the model in {load:.2f}x the time of diffusers' `from_pretrained` ({call:.2f}x with a forward pass).")


def _merge_takeaway(b: dict[str, Any]) -> str:
    peft, donate, diffusers = (_ratio(b, "peft merge_and_unload / fvt merge time"),
                               _ratio(b, "peft merge_and_unload / fvt merge donate"), _ratio(b, "diffusers fuse_lora / fvt merge"))
    mem = _ratio(b, "donate: peak RSS")
    return (f"a merge with fvtransform is {peft:.1f}x faster than peft's `merge_and_unload` and {diffusers:.1f}x faster "
            f"than diffusers' `fuse_lora`, and it returns a new tree (the base stays usable); merged in place "
            f"(`donate=True`) it is {donate:.1f}x faster than peft and needs {mem:.2f}x the model's size in memory.")


def _call_takeaway(b: dict[str, Any]) -> str:
    bf, bp = _ratio(b, "bfloat16: lora.call / merged"), _ratio(b, "bfloat16: lora.call / peft")
    ff, fp = _ratio(b, "float32: lora.call / merged"), _ratio(b, "float32: lora.call / peft")
    return (f"running a LoRA on the fly costs {100 * (bf - 1):.0f}% over a merged model in bfloat16 "
            f"({100 * (ff - 1):.0f}% in float32) and takes {bp:.2f}x (bfloat16) and {fp:.2f}x (float32) the time of "
            f"peft's unmerged layers: switch or scale LoRAs per call without merging.")


def _dist_takeaway(b: dict[str, Any]) -> str:
    parts = []
    for world in (2, 4):
        r = _ratio(b, f"{world} ranks: broadcast / fvt time")
        if r is not None:
            parts.append(f"{r:.0f}x faster than a broadcast on {world} ranks")
    mem = _row(b, "fvt_sharded_load", "private_peak_mb_max_rank")
    return (f"each rank reads only its own shard from the memory-mapped file: {' and '.join(parts)}, with "
            f"{mem:.1f} MB of private memory per rank (the weights stay in the shared page cache).")


#: The takeaway of each benchmark, from its numbers.
TAKEAWAYS: dict[str, Callable[[dict[str, Any]], str]] = {
    "io_bench": _io_takeaway, "merge_bench": _merge_takeaway, "call_bench": _call_takeaway, "dist_bench": _dist_takeaway,
}
_GB = 2**30
#: Everything from this line on in docs/benchmarks.md is kept when the page is rewritten.
KEEP = "<!-- kept by benchmarks/_report.py -->"


def _table(bench: dict[str, Any]) -> list[str]:
    rows = bench["rows"]
    mem_col = "peak_rss_mb" if any("peak_rss_mb" in r for r in rows) else ("private_peak_mb_max_rank" if any("private_peak_mb_max_rank" in r for r in rows) else None)
    head = "| method | seconds |" + (" peak memory (MB) |" if mem_col else "")
    lines = [head, "|---|---:|" + ("---:|" if mem_col else "")]
    for r in rows:
        name = r["method"] + (f" ({r['world']} ranks)" if "world" in r else "")
        lines.append(f"| {name} | {r['seconds']:.3f} |" + (f" {r.get(mem_col, float('nan')):.1f} |" if mem_col else ""))
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {ratio_label(k)} | {v:.2f} |" for k, v in bench["ratios"].items()]
    return lines


def _bar_plot(bench: dict[str, Any], field: str, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in bench["rows"] if field in r]
    names = [r["method"] + (f" ({r['world']})" if "world" in r else "") for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(names[::-1], [r[field] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _growth_plot(runs: dict[str, Any], bench: str, methods: list[str], field: str, label: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted((int(k), v) for k, v in runs.items() if bench in v)
    if len(sizes) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in methods:
        xs, ys = [], []
        for layers, run in sizes:
            row = next((r for r in run[bench]["rows"] if r["method"] == m), None)
            if row is not None and field in row:
                size = run.get("io_bench", {}).get("checkpoint_bytes")
                xs.append(size / _GB if size else layers)
                ys.append(row[field])
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("checkpoint size (GiB)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(doc: dict[str, Any], docs: Path) -> Path:
    """Write ``docs/benchmarks.md`` and ``docs/img/bench-*.png``; returns the page's path."""
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    m = doc["machine"]
    machine = f"{m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, Python {m['python']}"
    runs = doc["runs"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (`--quick` for the CI smoke size, `--scale F` for a fraction of "
        "Wan2.1-1.3B's 30 blocks). Every method runs side by side with its peers in the same run, in fresh "
        "processes, warm page cache; times are the best of several runs and memory the kernel's peak RSS "
        "(reset before the measured work) or, for the distributed benchmark, the peak anonymous (private) memory "
        "per rank.",
        "",
        f"Machine: {machine}. Model sizes run: {', '.join(f'{k} blocks' for k in runs)}.",
        "",
    ]
    largest = max(runs, key=int)
    run = runs[largest]
    size = run.get("io_bench", {}).get("checkpoint_bytes")
    lines.append(f"## At {largest} blocks" + (f" ({size / _GB:.2f} GiB checkpoint)" if size else ""))
    for bench, title in TITLES.items():
        if bench not in run:
            continue
        measures, peers = ABOUT[bench]
        shape = (f"{run[bench]['blocks']} Wan2.1-1.3B-shaped blocks" if "blocks" in run[bench]
                 else f"the {largest}-block checkpoint")
        lines += ["", f"### {title}", "", f"- **Measures**: {measures}.", f"- **Peers**: {peers}.",
                  f"- **Machine**: {machine}; {shape}.", ""]
        try:
            lines += [f"**Takeaway**: {TAKEAWAYS[bench](run[bench])}", ""]
        except (TypeError, KeyError):  # a ratio this run did not make: no takeaway rather than a wrong one
            pass
        lines += _table(run[bench])
        _bar_plot(run[bench], "seconds", "seconds", img / f"bench-{bench}-time.png")
        lines += ["", f"![time per method](img/bench-{bench}-time.png)"]
        if any("peak_rss_mb" in r for r in run[bench]["rows"]):
            _bar_plot(run[bench], "peak_rss_mb", "peak RSS above the bare runtime (MB)", img / f"bench-{bench}-memory.png")
            lines += ["", f"![peak memory per method](img/bench-{bench}-memory.png)"]
    growth = [
        ("io_bench", ["load_file", "fvt_lazy", "fvt_materialized", "fvt_load_model", "diffusers_from_pretrained"], "seconds", "seconds"),
        ("io_bench", ["fvt_materialized", "fvt_load_model_call", "diffusers_from_pretrained_call"], "peak_rss_mb", "peak RSS (MB)"),
        ("merge_bench", ["fvt_merge", "fvt_merge_donate", "peft_merge_and_unload", "diffusers_fuse_lora", "copy_targets", "fp32_products"], "seconds", "seconds"),
        ("merge_bench", ["fvt_merge", "fvt_merge_donate", "peft_merge_and_unload", "diffusers_fuse_lora"], "peak_rss_mb", "peak RSS (MB)"),
    ]
    made = []
    for bench, methods, field, label in growth:
        name = f"bench-growth-{bench}-{field}.png"
        if _growth_plot(runs, bench, methods, field, label, img / name):
            made.append((bench, field, name))
    if made:
        lines += ["", "## How they grow with model size", ""]
        for bench, field, name in made:
            lines += [f"{TITLES[bench]}, {field.replace('_', ' ')}:", "", f"![{bench} {field}](img/{name})", ""]
    page = docs / "benchmarks.md"
    old = page.read_text() if page.exists() else ""
    kept = "\n\n" + old[old.index(KEEP):].rstrip() if KEEP in old else ""  # sections other benchmarks write
    page.write_text("\n".join(lines).rstrip() + kept + "\n")
    return page
