"""Issue 16 benchmark: ``fvt.load_pipeline`` next to ``WanPipeline.from_pretrained``, same folder, same dtype.

Two pipelines, written by diffusers/transformers ``save_pretrained`` with random weights made here:

- ``tiny``: the test suite's tiny Wan2.2-style pipeline (tests/_wan_pipeline.py; two transformers);
- ``1.3b``: Wan2.1-T2V-1.3B-shaped: the transformer of the real config with ``--blocks`` of its 30 blocks,
  the real Wan2.1 VAE (diffusers' default ``AutoencoderKLWan``), and a UMT5-XXL-shaped text encoder
  (d_model 4096, d_ff 10240, 64 heads, the real 256384-token vocabulary) with ``--te-blocks`` of its 24
  blocks; all bf16 (``dtype=torch.bfloat16`` on both sides).

Methods, each in a fresh process (best time of ``--repeats``; highest peaks):

- ``fvt_load_pipeline``: ``fvt.load_pipeline(folder, dtype=bf16)`` as it returns (tensors may be mapped lazily);
- ``fvt_load_pipeline_read``: the same, then every tensor read once (``t.sum()``): all weights in memory;
- ``diffusers_from_pretrained`` / ``diffusers_from_pretrained_read``: ``WanPipeline.from_pretrained(folder,
  dtype=bf16)``, then the same read.

Memory: peak RSS (the kernel's high-water mark, reset before the work; file pages of a memory map count)
and peak private memory (``RssAnon`` sampled every 2 ms; mapped file pages do not count), both above the
process just before the work. Run: ``python benchmarks/bench_load_pipeline.py [--blocks 30] [--te-blocks 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _util import PeakPrivate, Timer, current_rss_mb, peak_rss_mb, reset_peak, warm_up  # noqa: E402

METHODS = ["fvt_load_pipeline", "diffusers_from_pretrained", "fvt_load_pipeline_read", "diffusers_from_pretrained_read"]
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _random(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Weights of the module's shapes, N(0, 0.02), in ``dtype`` (no slow initialisers: built on meta)."""
    g = torch.Generator().manual_seed(seed)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.to(dtype)


def make(folder: Path, size: str, blocks: int, te_blocks: int) -> None:
    if (folder / "model_index.json").exists():
        return
    import diffusers
    import transformers

    import _wan_pipeline as w

    if size == "tiny":
        w.make_pipeline(folder, two_experts=True, dtype=torch.bfloat16)
        return
    with torch.device("meta"):
        transformer = diffusers.WanTransformer3DModel(**dict(w.TRANSFORMER_1_3B, num_layers=blocks))
        text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_XXL, num_layers=te_blocks))
    vae = diffusers.AutoencoderKLWan()  # the Wan2.1 VAE's config (diffusers' defaults)
    text_encoder = _random(text_encoder, torch.bfloat16, 1)
    text_encoder.encoder.embed_tokens.weight = text_encoder.shared.weight  # tied, as the class declares
    pipe = diffusers.WanPipeline(
        tokenizer=w.tokenizer(), text_encoder=text_encoder, vae=vae.to(torch.bfloat16),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_random(transformer, torch.bfloat16, 0),
    )
    pipe.save_pretrained(folder)


def method(name: str, folder: Path) -> None:
    import diffusers  # noqa: F401  (imports are not part of the measurement)
    import transformers  # noqa: F401

    import fvtransform as fvt

    warm_up()
    base = current_rss_mb()
    reset_peak()
    with PeakPrivate() as mem, Timer() as t:
        if name.startswith("fvt_load_pipeline"):
            pipe = fvt.load_pipeline(folder, dtype=torch.bfloat16)
            trees = [pipe[c].tree for c in pipe]
        else:
            ref = diffusers.WanPipeline.from_pretrained(folder, dtype=torch.bfloat16)
            trees = [m.state_dict() for m in ref.components.values() if isinstance(m, torch.nn.Module)]
        if name.endswith("_read"):
            for tree in trees:
                for v in tree.values():
                    v.sum()
    print(json.dumps({"seconds": t.seconds, "peak_rss_mb": peak_rss_mb() - base, "private_peak_mb": mem.peak - mem.base}))


def _child(*args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _largest_mb(folder: Path) -> tuple[float, float]:
    """The largest tensor of the pipeline and the bytes of all its weights files, in MiB."""
    from fvtransform.io import read_header

    largest, total = 0, 0
    for f in folder.glob("*/*.safetensors"):
        total += f.stat().st_size
        for info in read_header(f).tensors.values():
            largest = max(largest, info.nbytes)
    return largest / 2**20, total / 2**20


def run(folder: Path, repeats: int) -> dict[str, Any]:
    for f in folder.glob("*/*.safetensors"):
        f.read_bytes()  # warm page cache: both sides read from memory
    rows = []
    for m in METHODS:
        runs = [_child("method", m, str(folder)) for _ in range(repeats)]
        rows.append({"method": m, "seconds": min(r["seconds"] for r in runs), "runs": repeats,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                     "private_peak_mb": max(r["private_peak_mb"] for r in runs)})
    r = {row["method"]: row for row in rows}
    largest, total = _largest_mb(folder)
    ratios = {
        "load_pipeline / from_pretrained time (target <= 1)": r["fvt_load_pipeline"]["seconds"] / r["diffusers_from_pretrained"]["seconds"],
        "load_pipeline+read / from_pretrained+read time (target <= 1)": r["fvt_load_pipeline_read"]["seconds"] / r["diffusers_from_pretrained_read"]["seconds"],
        "(private peak, load+read: fvt - diffusers) / largest tensor (target <= 1)":
            (r["fvt_load_pipeline_read"]["private_peak_mb"] - r["diffusers_from_pretrained_read"]["private_peak_mb"]) / largest,
    }
    return {"weights_mb": total, "largest_tensor_mb": largest, "rows": rows, "ratios": ratios}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=30, help="transformer blocks of the 1.3B-shaped pipeline (30 = full)")
    p.add_argument("--te-blocks", type=int, default=1, help="UMT5-XXL-shaped text encoder blocks (24 = full)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["tiny", "1.3b"], default=None)
    p.add_argument("--data", type=Path, default=HERE / "_data")
    args = p.parse_args()
    import diffusers
    import transformers

    out: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                                       "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                                       "python": platform.python_version(),
                                       "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    sizes = [args.only] if args.only else ["tiny", "1.3b"]
    for size in sizes:
        name = "pipe-tiny" if size == "tiny" else f"pipe-1.3b-{args.blocks}-te{args.te_blocks}"
        folder = args.data / name
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "make", str(folder), size, str(args.blocks), str(args.te_blocks)],
            check=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        doc = run(folder, args.repeats)
        out[name] = doc
        print(f"\n== {name}: {doc['weights_mb']:.0f} MiB of weights, largest tensor {doc['largest_tensor_mb']:.1f} MiB ==")
        for row in doc["rows"]:
            print(f"{row['method']:<34} {row['seconds']:8.3f} s  peak RSS {row['peak_rss_mb']:8.1f} MB  "
                  f"peak private {row['private_peak_mb']:8.1f} MB")
        for k, v in doc["ratios"].items():
            print(f"  {k:<80} {v:7.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        make(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "method":
        method(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(main())
