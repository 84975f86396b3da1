"""Issue 21 benchmark: a batch of 4 samples, each with its own rank-32 LoRA, in one forward.

Wan2.1-1.3B block shapes (dim 1536, ffn 8960, 12 heads; ``blocks`` of its 30 blocks), bf16, 1024 video tokens
and 64 text tokens per sample; 4 different rank-32 adapters on every attention and feed-forward linear. Side by
side in one process, timed in interleaved rounds (best of ``repeats``):

- ``base``: one forward of the base model on the batch of 4 (``fvt.call``), the floor;
- ``batched``: ``fvt.lora.call_batched`` with index ``[0, 1, 2, 3]`` (gathered factors, ``bmm`` / ``baddbmm``);
- ``grouped``: the same call with one low-rank product per adapter's samples (PEFT's mixed-batch layout);
- ``one by one``: 4 forwards of one sample, each ``fvt.lora.call`` with its own adapter;
- ``peft mixed``: PEFT's ``model(..., adapter_names=[...])`` with the 4 adapters loaded (optional, ``--peft``).

Prints JSON: rows, ratios (targets: one by one / batched >= 2, batched / base <= 1.3), and the machine load.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import interleaved, warm_up  # noqa: E402
from io_bench import CONFIG  # noqa: E402

#: Attention and feed-forward linears of every block (as merge_bench.py's adapter targets).
PATTERN = ["blocks.*.attn*.to_*.weight", "blocks.*.ffn.net.0.proj.weight", "blocks.*.ffn.net.2.weight"]
BATCH = 4


def inputs(dtype: torch.dtype, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 16, 4, 32, 32, generator=g).to(dtype),  # 1024 tokens per sample
                timestep=torch.full((batch,), 500), encoder_hidden_states=torch.randn(batch, 64, 4096, generator=g).to(dtype),
                return_dict=False)


def one(x: dict, i: int) -> dict:
    return {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def run(blocks: int, repeats: int, with_peft: bool) -> None:
    import diffusers

    import fvtransform as fvt
    from fvtransform.lora._batched import _run

    warm_up()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(num_layers=blocks, **CONFIG).to(dtype).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    tree = fvt.map_tensors(fvt.ParamTree.from_module(model), lambda t: t.detach().clone())
    adapters = [fvt.lora.random_adapter(tree, targets=PATTERN, rank=32, seed=i, dtype=dtype, scale_b=0.02) for i in range(BATCH)]
    module = fvt.build({**dict(model.config), "_class_name": "WanTransformer3DModel"})
    stack = fvt.lora.stack(adapters)
    x = inputs(dtype, BATCH)
    index = torch.arange(BATCH)
    load = os.getloadavg()
    fns = {
        "base": lambda: fvt.call(module, tree, **x),
        "batched": lambda: fvt.lora.call_batched(module, tree, stack, index=index, **x),
        "grouped": lambda: _run(module, tree, stack, (), x, index, None, grouped=True),
        "one by one": lambda: [fvt.lora.call(module, tree, a, **one(x, i)) for i, a in enumerate(adapters)],
    }
    if with_peft:
        import peft

        targets = sorted({k.rsplit(".", 1)[0] for k in adapters[0]})
        pm = None
        for i, a in enumerate(adapters):
            cfg = peft.LoraConfig(r=32, lora_alpha=32, target_modules=targets)
            pm = peft.get_peft_model(model, cfg, adapter_name=f"s{i}") if pm is None else (pm.add_adapter(f"s{i}", cfg) or pm)
            sd = {f"base_model.model.{k[:-7]}.lora_A.s{i}.weight": d.A for k, d in a.items()}
            sd.update({f"base_model.model.{k[:-7]}.lora_B.s{i}.weight": d.B * d.scale for k, d in a.items()})
            pm.load_state_dict(sd, strict=False)
        names = [f"s{i}" for i in range(BATCH)]
        pm.eval()
        fns["peft mixed"] = lambda: pm(**x, adapter_names=names)
    with torch.no_grad():
        check = (fns["batched"]()[0][1].float() - fvt.lora.call(module, tree, adapters[1], **one(x, 1))[0][0].float()).abs().max()
        t = interleaved(fns, repeats)
    rows = [{"method": m, "seconds": s} for m, s in t.items()]
    ratios = {
        "one by one / batched (target >= 2)": t["one by one"] / t["batched"],
        "batched / base forward (target <= 1.3)": t["batched"] / t["base"],
        "grouped / batched (>1: gathering is faster)": t["grouped"] / t["batched"],
    }
    if "peft mixed" in t:
        ratios["peft mixed / batched"] = t["peft mixed"] / t["batched"]
    print(json.dumps({"rows": rows, "ratios": ratios, "blocks": blocks, "batch": BATCH, "dtype": "bfloat16",
                      "device": "cpu", "threads": torch.get_num_threads(), "loadavg_before": load,
                      "loadavg_after": os.getloadavg(), "max_abs_diff_sample1_vs_lora_call": float(check)}))


if __name__ == "__main__":
    # python batched_lora_bench.py run <data folder, unused> <repeats> <blocks> [--peft]
    argv = [a for a in sys.argv if a != "--peft"]
    run(int(argv[4]) if len(argv) > 4 else 2, int(argv[3]) if len(argv) > 3 else 3, "--peft" in sys.argv)
