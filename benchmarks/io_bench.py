"""Issue 3 benchmark: loading a Wan2.1-1.3B-shaped bf16 transformer (diffusers layout, sharded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _util import Timer, best_of, current_rss_mb, report, reset_peak, warm_up  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
              eps=1e-6, image_dim=None, rope_max_seq_len=1024)


def make(folder: Path, layers: int) -> None:
    if (folder / "config.json").exists():
        return
    import diffusers

    torch.manual_seed(0)
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(num_layers=layers, **CONFIG)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="1GB")


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=g, dtype=torch.bfloat16), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 8, 4096, generator=g, dtype=torch.bfloat16), return_dict=False)


def method(name: str, folder: Path) -> None:
    import diffusers  # noqa: F401  (imports are not part of the measurement)

    import fvtransform as fvt

    files = sorted(folder.glob("*.safetensors"))
    warm_up()
    base = current_rss_mb()
    reset_peak()
    with Timer() as t:
        if name == "load_file":
            from safetensors.torch import load_file

            tree = {}
            for f in files:
                tree.update(load_file(f))
        elif name == "fvt_lazy":
            tree = fvt.load(folder)
        elif name == "fvt_materialized":
            tree = fvt.load(folder)
            for v in tree.values():
                v.sum()
        elif name == "fvt_load_model":
            module, tree = fvt.load_model(folder)
        elif name == "fvt_load_model_call":
            module, tree = fvt.load_model(folder)
            with torch.no_grad():
                fvt.call(module, tree, **inputs())
        elif name == "diffusers_from_pretrained":
            import diffusers

            model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
        elif name == "diffusers_from_pretrained_call":
            import diffusers

            model = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
            with torch.no_grad():
                model(**inputs())
    report(t.seconds, runtime_mb=base, before_mb=base)


METHODS = ["load_file", "fvt_lazy", "fvt_materialized", "fvt_load_model", "diffusers_from_pretrained",
           "fvt_load_model_call", "diffusers_from_pretrained_call"]


def run(folder: Path, repeats: int) -> None:
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    for f in folder.glob("*.safetensors"):
        f.read_bytes()  # warm page cache
    rows = [best_of(Path(__file__), m, folder, repeats) for m in METHODS]
    r = {row["method"]: row for row in rows}
    ratios = {
        "(b) fvt.load lazy / load_file time (target <= 1.5)": r["fvt_lazy"]["seconds"] / r["load_file"]["seconds"],
        "load_model / diffusers from_pretrained time (target <= 1.0)": r["fvt_load_model"]["seconds"] / r["diffusers_from_pretrained"]["seconds"],
        "(d)/(e) load_model+call / from_pretrained+call (target <= 1.05)": r["fvt_load_model_call"]["seconds"] / r["diffusers_from_pretrained_call"]["seconds"],
        "(c) materialized peak RSS / checkpoint size (target <= 1.1)": r["fvt_materialized"]["peak_rss_mb"] * 2**20 / size,
    }
    print(json.dumps({"checkpoint_bytes": size, "rows": rows, "ratios": ratios}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(Path(sys.argv[2]), int(sys.argv[3]))
    elif cmd == "method":
        method(sys.argv[2], Path(sys.argv[3]))
    else:
        run(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
