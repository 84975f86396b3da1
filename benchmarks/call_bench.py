"""Issue 5 benchmark: forward time with a rank-32 LoRA on the fly vs merged vs peft's unmerged forward.

Wan2.1-1.3B block shapes (dim 1536, ffn 8960, 12 heads), a few blocks, bf16 and fp32; the adapter targets
every attention and feed-forward linear. All methods run in one process, side by side; each is warmed up
once and timed as the best of several forwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import interleaved, warm_up  # noqa: E402
from io_bench import CONFIG  # noqa: E402
from merge_bench import adapter  # noqa: E402


def inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 4, 32, 32, generator=g).to(dtype),  # 1024 tokens
                timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 64, 4096, generator=g).to(dtype),
                return_dict=False)


def run(blocks: int, repeats: int) -> None:
    import diffusers
    import peft

    import fvtransform as fvt

    warm_up()
    rows, ratios = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = diffusers.WanTransformer3DModel(num_layers=blocks, **CONFIG).to(dtype).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        tree = fvt.map_tensors(fvt.ParamTree.from_module(model), lambda t: t.detach().clone())
        a = adapter(tree)
        a = fvt.lora.LoraAdapter({k: fvt.lora.LowRank(d.A.to(dtype), d.B.to(dtype), d.scale) for k, d in a.items()})
        module = fvt.build({**dict(model.config), "_class_name": "WanTransformer3DModel"})
        merged = fvt.lora.merge(tree, a)
        x = inputs(dtype)
        name = str(dtype).removeprefix("torch.")
        targets = sorted({k.rsplit(".", 1)[0] for k in a})
        pm = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets))
        sd = {f"base_model.model.{k[:-7]}.lora_A.default.weight": d.A for k, d in a.items()}
        sd.update({f"base_model.model.{k[:-7]}.lora_B.default.weight": d.B for k, d in a.items()})
        pm.load_state_dict(sd, strict=False)
        with torch.no_grad():
            t = interleaved({"base": lambda: fvt.call(module, tree, **x), "merged": lambda: fvt.call(module, merged, **x),
                             "fly": lambda: fvt.lora.call(module, tree, a, **x), "peft": lambda: pm(**x)}, repeats)
        t_base, t_merged, t_fly, t_peft = t["base"], t["merged"], t["fly"], t["peft"]
        rows += [{"method": f"{m} {name}", "seconds": s} for m, s in
                 (("fvt.call base", t_base), ("fvt.call merged", t_merged), ("fvt.lora.call", t_fly), ("peft unmerged", t_peft))]
        ratios[f"{name}: lora.call / merged forward (target <= 1.10)"] = t_fly / t_merged
        ratios[f"{name}: lora.call / peft unmerged forward (target < 1)"] = t_fly / t_peft
    print(json.dumps({"rows": rows, "ratios": ratios, "blocks": blocks}))


if __name__ == "__main__":
    # python call_bench.py run <data folder, unused> <repeats> <blocks>
    run(int(sys.argv[4]) if len(sys.argv) > 4 else 2, int(sys.argv[3]) if len(sys.argv) > 3 else 5)
