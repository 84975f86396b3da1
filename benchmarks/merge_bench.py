"""Issue 4 benchmark: rank-32 LoRA merge on the bf16 Wan-shaped transformer, fvt vs peft, with yardsticks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import Timer, current_rss_mb, measure_child, report  # noqa: E402



def adapter(tree):
    import fvtransform as fvt

    pattern = ["blocks.*.attn*.to_*.weight", "blocks.*.ffn.net.0.proj.weight", "blocks.*.ffn.net.2.weight"]
    return fvt.lora.random_adapter(tree, targets=pattern, rank=32, seed=0, dtype=torch.bfloat16)


def method(name: str, folder: Path) -> None:
    import fvtransform as fvt

    tree = fvt.map_tensors(fvt.load(folder), torch.clone)  # in memory, as a model would be
    a = adapter(tree)
    base = current_rss_mb()
    with Timer() as t:
        if name == "fvt_merge":
            fvt.lora.merge(tree, a)
        elif name == "fvt_merge_donate":
            fvt.lora.merge(tree, a, donate=True)
        elif name == "copy_targets":
            for k in a:
                tree[k].clone()
        elif name == "fp32_products":
            for d in a.values():
                d.B.float() @ d.A.float()
        elif name == "peft_merge_and_unload":
            import diffusers
            import peft

            module, _ = fvt.load_model(folder)
            model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
            targets = sorted({k.rsplit(".", 1)[0] for k in a})
            cfg = peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets)
            pm = peft.get_peft_model(model, cfg)
            sd = {f"base_model.model.{k[:-7]}.lora_A.default.weight": d.A for k, d in a.items()}
            sd.update({f"base_model.model.{k[:-7]}.lora_B.default.weight": d.B for k, d in a.items()})
            pm.load_state_dict(sd, strict=False)
            with Timer() as t2:
                pm.merge_and_unload()
            report(t2.seconds, base)
            return
    report(t.seconds, base)


METHODS = ["fvt_merge", "fvt_merge_donate", "peft_merge_and_unload", "copy_targets", "fp32_products"]


def run(folder: Path) -> None:
    rows = [{"method": m, **measure_child(Path(__file__), "method", m, str(folder))} for m in METHODS]
    r = {row["method"]: row for row in rows}
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    yard = max(r["copy_targets"]["seconds"], r["fp32_products"]["seconds"])
    ratios = {
        "peft merge_and_unload / fvt merge time (target >= 5)": r["peft_merge_and_unload"]["seconds"] / r["fvt_merge"]["seconds"],
        "fvt merge / larger yardstick time (target <= 2)": r["fvt_merge"]["seconds"] / yard,
        "donate extra peak RSS / model size (target <= 0.1 over the model)": r["fvt_merge_donate"]["peak_rss_mb"] * 2**20 / size,
    }
    print(json.dumps({"rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "method":
        method(sys.argv[2], Path(sys.argv[3]))
    else:
        run(Path(sys.argv[2]))
