"""Issue 4 benchmark: rank-32 LoRA merge on the bf16 Wan-shaped transformer, fvt vs peft, with yardsticks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import Timer, best_of, current_rss_mb, report, reset_peak, warm_up  # noqa: E402


def adapter(tree):
    import fvtransform as fvt

    pattern = ["blocks.*.attn*.to_*.weight", "blocks.*.ffn.net.0.proj.weight", "blocks.*.ffn.net.2.weight"]
    return fvt.lora.random_adapter(tree, targets=pattern, rank=32, seed=0, dtype=torch.bfloat16)


def _peft_model(folder: Path, a):
    import diffusers
    import peft

    model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    targets = sorted({k.rsplit(".", 1)[0] for k in a})
    pm = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets))
    sd = {f"base_model.model.{k[:-7]}.lora_A.default.weight": d.A for k, d in a.items()}
    sd.update({f"base_model.model.{k[:-7]}.lora_B.default.weight": d.B for k, d in a.items()})
    missing = pm.load_state_dict(sd, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"peft did not take {missing.unexpected_keys[:3]}")
    return pm


def _diffusers_model(folder: Path, a):
    import diffusers

    model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    sd = {f"{k[:-7]}.lora_A.weight": d.A for k, d in a.items()}
    sd.update({f"{k[:-7]}.lora_B.weight": d.B for k, d in a.items()})
    targets = sorted({k.rsplit(".", 1)[0] for k in a})
    model.load_lora_adapter(sd, adapter_name="a", prefix=None, metadata={"r": 32, "lora_alpha": 32, "target_modules": targets})
    return model


def method(name: str, folder: Path) -> None:
    import fvtransform as fvt

    warm_up()
    runtime = current_rss_mb()
    tree = fvt.map_tensors(fvt.load(folder), torch.clone)  # in memory, as a model would be
    a = adapter(tree)
    if name == "peft_merge_and_unload":
        model, tree = _peft_model(folder, a), None
    elif name == "diffusers_fuse_lora":
        model, tree = _diffusers_model(folder, a), None
    before = current_rss_mb()
    reset_peak()
    with Timer() as t:
        if name == "fvt_merge":
            fvt.lora.merge(tree, a)
        elif name == "fvt_merge_donate":
            fvt.lora.merge(tree, a, donate=True)
        elif name == "copy_targets":
            copies = [tree[k].clone() for k in a]  # kept, as a merge that returns a new tree keeps its output
            del copies
        elif name == "fp32_products":
            for d in a.values():
                d.B.float() @ d.A.float()  # each product made and dropped, as a merge would
        elif name == "peft_merge_and_unload":
            model.merge_and_unload()
        elif name == "diffusers_fuse_lora":
            model.fuse_lora(lora_scale=1.0)
    report(t.seconds, runtime_mb=runtime, before_mb=before)


METHODS = ["fvt_merge", "fvt_merge_donate", "peft_merge_and_unload", "diffusers_fuse_lora", "copy_targets", "fp32_products"]


def run(folder: Path, repeats: int) -> None:
    rows = [best_of(Path(__file__), m, folder, repeats) for m in METHODS]
    r = {row["method"]: row for row in rows}
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    yard = max(r["copy_targets"]["seconds"], r["fp32_products"]["seconds"])
    ratios = {
        "peft merge_and_unload / fvt merge time (target >= 5)": r["peft_merge_and_unload"]["seconds"] / r["fvt_merge"]["seconds"],
        # peft merges in place; fvt's in-place counterpart is donate=True
        "peft merge_and_unload / fvt merge donate time (in place, both)": r["peft_merge_and_unload"]["seconds"] / r["fvt_merge_donate"]["seconds"],
        # a merge that returns a new tree writes new memory: this copy alone bounds its speed-up over peft
        "peft merge_and_unload / copy of the targets into new memory": r["peft_merge_and_unload"]["seconds"] / r["copy_targets"]["seconds"],
        "diffusers fuse_lora / fvt merge time": r["diffusers_fuse_lora"]["seconds"] / r["fvt_merge"]["seconds"],
        "fvt merge / larger yardstick time (target <= 2)": r["fvt_merge"]["seconds"] / yard,
        "fvt merge donate / larger yardstick time": r["fvt_merge_donate"]["seconds"] / yard,
        "donate: peak RSS above the runtime / model size (target <= 1.1)": r["fvt_merge_donate"]["peak_rss_mb"] * 2**20 / size,
    }
    print(json.dumps({"rows": rows, "ratios": ratios}))


def compare(folder: Path, repeats: int, before: str) -> None:
    """Issue 18: the in-memory merge with this code and with ``before`` (a checkout's PYTHONPATH), side by side.

    Runs interleaved (each repeat runs every method once, each in a fresh process); medians count.
    """
    import os
    import statistics
    import subprocess

    here = str(Path(__file__).resolve().parents[1])
    runs = {f"{who}: {m}": (m, path) for who, path in (("after", here), ("before", before))
            for m in ("fvt_merge", "fvt_merge_donate")}
    runs.update({m: (m, here) for m in ("peft_merge_and_unload", "copy_targets", "fp32_products")})
    secs: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, (m, path) in runs.items():
            out = subprocess.run([sys.executable, __file__, "method", m, str(folder)], check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=path))
            secs[key].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    med = {k: statistics.median(v) for k, v in secs.items()}
    peft = med["peft_merge_and_unload"]
    yard = max(med["copy_targets"], med["fp32_products"])
    ratios = {f"peft merge_and_unload / {who} fvt merge donate (target >= 5)": peft / med[f"{who}: fvt_merge_donate"]
              for who in ("after", "before")}
    ratios.update({f"{who} fvt merge / max(copy, fp32 products) (target <= 1.5)": med[f"{who}: fvt_merge"] / yard
                   for who in ("after", "before")})
    print(json.dumps({"seconds": secs, "median": med, "ratios": ratios, "load": os.getloadavg()}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "method":
        method(sys.argv[2], Path(sys.argv[3]))
    elif cmd == "compare":
        compare(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        run(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
