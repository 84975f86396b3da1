"""Issue 18 benchmark: ``fvtransform merge`` disk to disk, whole process, side by side with diffusers' path and the floor.

``python benchmarks/merge_disk_bench.py run DATA_FOLDER REPEATS [BEFORE_PYTHONPATH]``

Every method is a fresh process, timed from its start to its exit (imports included), runs
interleaved (method after method, repeat after repeat) so a noisy shared machine hits them alike;
the median counts. Peak private (anonymous) memory is sampled from ``/proc/PID/status`` (``RssAnon``)
every 10 ms. ``BEFORE_PYTHONPATH`` (a checkout of the code before the change) adds the same merge
run with that code. The LoRAs are rank-32 PEFT adapters (float32 factors, as peft's ``save_pretrained``
writes them) on every attention and feed-forward linear.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import statistics
import subprocess
import sys
import time

HERE = Path(__file__).parent
PATTERN = ["blocks.*.attn*.to_*.weight", "blocks.*.ffn.net.0.proj.weight", "blocks.*.ffn.net.2.weight"]
SCALES = {"a": 0.7, "b": 0.5, "c": 1.0}


def make_loras(data: Path, work: Path) -> dict[str, Path]:
    """Three PEFT LoRA folders for the checkpoint at ``data`` (made once)."""
    import torch

    import fvtransform as fvt

    tree = fvt.load(data)
    out = {}
    for i, name in enumerate(SCALES):
        folder = work / f"lora-{name}"
        if not (folder / "adapter_model.safetensors").exists():
            a = fvt.lora.random_adapter(tree, targets=PATTERN, rank=32, seed=i, dtype=torch.float32)
            fvt.lora.save(a, folder, format="peft")
        out[name] = folder
    return out


_DIFFUSERS = r"""
import json, sys, torch, diffusers
from safetensors.torch import load_file
base, out, *loras = sys.argv[1:]
model = diffusers.WanTransformer3DModel.from_pretrained(base, torch_dtype=torch.bfloat16)
names, weights = [], []
for arg in loras:
    path, scale = arg.rsplit(":", 1)
    name = f"l{len(names)}"
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(path + "/adapter_model.safetensors").items()}
    cfg = json.load(open(path + "/adapter_config.json"))
    meta = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "target_modules": cfg["target_modules"]}
    model.load_lora_adapter(sd, adapter_name=name, prefix=None, metadata=meta)
    names.append(name); weights.append(float(scale))
for name, w in zip(names, weights):  # diffusers fuses one adapter at a time at its own scale
    model.fuse_lora(lora_scale=w, adapter_names=[name])
model.unload_lora()
model.save_pretrained(out, max_shard_size="1GB")
"""

_PRODUCTS = r"""
import sys, time, torch
from safetensors.torch import load_file
t0 = time.perf_counter()
for folder_scale in sys.argv[1:]:
    folder, s = folder_scale.rsplit(":", 1)
    sd = load_file(folder + "/adapter_model.safetensors")
    for k, A in sd.items():
        if ".lora_A." in k:
            B = sd[k.replace(".lora_A.", ".lora_B.")]
            (B.float() * float(s)) @ A.float()
print(time.perf_counter() - t0)
"""


def _timed(cmd: list[str], env: dict[str, str], shell: bool, cwd: Path) -> tuple[float, float, str]:
    """Wall seconds of the whole process, its peak RssAnon in MiB, and its stdout.

    ``cwd`` is outside the checkout: ``python -c``/``-m`` put the working folder first on ``sys.path``,
    which would shadow ``PYTHONPATH`` (the code before the change) with the checkout's package.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(" ".join(cmd) if shell else cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, shell=shell,
                         cwd=cwd)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{cmd[:4]} failed: {err.decode()[-2000:]}")
    return wall, peak / 1024, out.decode()


def _env(pythonpath: str) -> dict[str, str]:
    """The environment of a measured process: ``pythonpath`` first, with bytecode as an installed package has it.

    pip writes ``.pyc`` files at install (torch's and diffusers' are there); a checkout run with
    ``PYTHONDONTWRITEBYTECODE`` would compile every module of ours on every start (0.1-0.2 s here), so
    the code under test is compiled once first and bytecode writing is left on.
    """
    import compileall

    for root in pythonpath.split(os.pathsep):
        compileall.compile_dir(str(Path(root) / "fvtransform"), quiet=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = pythonpath
    return env


def run(data: Path, repeats: int, before: str | None) -> dict:
    work = data.parent / f"{data.name}-merge-disk"
    work.mkdir(exist_ok=True)
    env = _env(str(HERE.parent))
    loras = make_loras(data, work)
    one_arg = [f"{loras['a']}:1.0"]
    three_arg = [f"{loras[n]}:{s}" for n, s in SCALES.items()]
    out = work / "out"
    py = sys.executable
    methods: dict[str, tuple[list[str], dict[str, str], bool]] = {
        "import torch": ([py, "-c", "import torch"], env, False),
        "cp -r + sync (floor I/O)": ([f"cp -r {data} {out} && sync {out}/*"], env, True),
        "fvtransform merge (1 LoRA)": ([py, "-m", "fvtransform", "merge", str(data), *one_arg, "-o", str(out), "--quiet"], env, False),
        "fvtransform merge (3 LoRAs)": ([py, "-m", "fvtransform", "merge", str(data), *three_arg, "-o", str(out), "--quiet"], env, False),
        "diffusers (1 LoRA)": ([py, "-c", _DIFFUSERS, str(data), str(out), *one_arg], env, False),
        "diffusers (3 LoRAs)": ([py, "-c", _DIFFUSERS, str(data), str(out), *three_arg], env, False),
        "fp32 products alone (1 LoRA)": ([py, "-c", _PRODUCTS, *one_arg], env, False),
        "fp32 products alone (3 LoRAs)": ([py, "-c", _PRODUCTS, *three_arg], env, False),
    }
    if before:
        benv = _env(before)
        methods["before: fvtransform merge (1 LoRA)"] = (methods["fvtransform merge (1 LoRA)"][0], benv, False)
        methods["before: fvtransform merge (3 LoRAs)"] = (methods["fvtransform merge (3 LoRAs)"][0], benv, False)
    walls: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = {m: 0.0 for m in methods}
    inner: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for name, (cmd, e, shell) in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, stdout = _timed(cmd, e, shell, work)
            walls[name].append(wall)
            peaks[name] = max(peaks[name], peak)
            if name.startswith("fp32 products"):
                inner[name].append(float(stdout.strip().splitlines()[-1]))
    shutil.rmtree(out, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in walls.items()}
    rows = [{"method": m, "seconds": med[m], "runs": walls[m], "peak_anon_mb": peaks[m]} for m in methods]
    largest = max(os.path.getsize(f) for f in data.glob("*.safetensors"))  # an upper bound of the largest tensor
    ratios = {}
    for n in ("1 LoRA", "3 LoRAs"):
        prod = statistics.median(inner[f"fp32 products alone ({n})"])
        floor = med["import torch"] + max(med["cp -r + sync (floor I/O)"], prod)
        ratios[f"{n}: diffusers / fvtransform merge (target >= 4)"] = med[f"diffusers ({n})"] / med[f"fvtransform merge ({n})"]
        ratios[f"{n}: fvtransform merge / floor (target <= 1.2)"] = med[f"fvtransform merge ({n})"] / floor
        ratios[f"{n}: floor seconds (import torch + max(cp+sync, products {prod:.2f} s))"] = floor
        if before:
            ratios[f"{n}: before / after"] = med[f"before: fvtransform merge ({n})"] / med[f"fvtransform merge ({n})"]
    size = sum(f.stat().st_size for f in data.glob("*.safetensors"))
    return {"rows": rows, "ratios": ratios, "checkpoint_bytes": size, "largest_file_bytes": largest,
            "load": os.getloadavg()}


_SPLIT = r"""
import cProfile, json, pstats, sys, time
t0 = time.perf_counter()
import torch
from fvtransform.cli._main import main
import fvtransform.lora, fvtransform.hub  # what the merge command imports (lazily, after the change)
imports = time.perf_counter() - t0
prof = cProfile.Profile()
t1 = time.perf_counter()
prof.runcall(main, sys.argv[1:])
wall = time.perf_counter() - t1
st = pstats.Stats(prof).stats
def tot(*names):
    return sum(v[2] for k, v in st.items() if k[2] in names)
def cum(*names):
    return sum(v[3] for k, v in st.items() if k[2] in names)
write = tot("<built-in method posix.write>", "<method 'write' of '_io.BufferedWriter' objects>", "<built-in method posix.copy_file_range>")
fsync = tot("<built-in method posix.fsync>") + cum("start_writeback")  # the writeback started as the file grows, and the final fsync
wait = tot("<method 'acquire' of '_thread.lock' objects>")
print(json.dumps({"imports": imports, "write": write, "fsync": fsync, "waiting for the merge thread": wait,
                  "read + merge (main thread)": max(0.0, wall - write - fsync - wait)}))
"""


def split(data: Path, repeats: int, before: str) -> dict:
    """The time split of one ``fvtransform merge`` (1 LoRA), before and after, from a profile of the main thread (medians)."""
    work = data.parent / f"{data.name}-merge-disk"
    loras = make_loras(data, work)
    out = work / "out"
    parts: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(repeats):
        for who, path in (("before", before), ("after", str(HERE.parent))):
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-c", _SPLIT, "merge", str(data), f"{loras['a']}:1.0", "-o", str(out), "--quiet"]
            got = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env(path), cwd=work)
            parts[who].append(json.loads(got.stdout.strip().splitlines()[-1]))
    shutil.rmtree(out, ignore_errors=True)
    return {who: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for who, runs in parts.items()}


def plot_split(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    whos = list(doc)[::-1]
    left = [0.0] * len(whos)
    for part in doc[whos[0]]:
        vals = [doc[w][part] for w in whos]
        ax.barh(whos, vals, left=left, label=part)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds (median), main thread")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1] == "split":
        doc = split(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        if len(sys.argv) > 5:
            plot_split(doc, Path(sys.argv[5]))
        print(json.dumps(doc))
    elif sys.argv[1] == "run":
        doc = run(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3, sys.argv[4] if len(sys.argv) > 4 else None)
        print(json.dumps(doc))
