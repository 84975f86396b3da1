"""Issue 17 benchmark: merging a rank-32 LoRA into a float8 checkpoint vs into the same checkpoint in bf16.

``python benchmarks/fp8_merge_bench.py DATA_FOLDER [LAYERS] [REPEATS] [stochastic]``

The Wan2.1-1.3B-shaped transformer of ``io_bench.py make`` (``LAYERS`` blocks, default 30 = the real model;
fewer on a loaded machine) in bf16, and the same weights in the scaled-fp8 layout (every 2-D linear weight of
the blocks as float8_e4m3fn with a float32 ``scale_weight``, the ``scaled_fp8`` marker). The LoRA is rank 32 on
every attention and feed-forward linear (float32 factors). Measured in one process, side by side, interleaved
(bf16, fp8, bf16, fp8, ...) so a noisy shared machine hits both alike; the median counts:

* in memory: ``fvt.lora.merge(tree, lora)`` (nearest rounding, kept scales; with ``stochastic``, also
  stochastic rounding, whose rounding in _fp8.py takes several passes per tile);
* disk to disk: ``fvt.lora.merge_checkpoint(folder, lora, out)`` (the page cache warm for both).

Target (issue 17): fp8 / bf16 <= 1.3 for each. The load average is printed with the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from io_bench import make  # noqa: E402

PATTERN = ["blocks.*.attn*.to_*.weight", "blocks.*.ffn.net.0.proj.weight", "blocks.*.ffn.net.2.weight"]


def fp8_layout(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scaled-fp8 layout of ``tree``'s block linears (ComfyUI's keys), everything else as it is."""
    from fvtransform._fp8 import amax_scale, quantize_tensor, scale_key

    out: dict[str, torch.Tensor] = {}
    for k, w in tree.items():
        if k.startswith("blocks.") and k.endswith(".weight") and w.dim() == 2:
            s = amax_scale(w, torch.float8_e4m3fn) * 2  # headroom for the LoRA's growth of the largest value
            out[k], out[scale_key(k)] = quantize_tensor(w, torch.float8_e4m3fn, s, saturate=True), s
        else:
            out[k] = w
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def interleaved(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(data: Path, layers: int, repeats: int, stochastic: bool = False) -> dict[str, object]:
    import fvtransform as fvt

    torch.set_num_threads(max(1, torch.get_num_threads()))
    bf16_dir = data / f"wan-1.3b-{layers}"
    make(bf16_dir, layers)
    bf16 = fvt.load(bf16_dir)
    fp8 = fvt.ParamTree(fp8_layout(dict(bf16.items())))
    fp8_dir = data / f"wan-1.3b-{layers}-fp8"
    if not fp8_dir.exists():
        fvt.save(fp8, fp8_dir, max_shard_size="1GB")
    lora = fvt.lora.random_adapter(bf16, targets=PATTERN, rank=32, seed=0, dtype=torch.float32)
    out = data / "fp8-bench-out"

    def disk(src: Path) -> Callable[[], object]:
        def run() -> object:
            shutil.rmtree(out, ignore_errors=True)
            return fvt.lora.merge_checkpoint(src, lora, out)
        return run

    methods: dict[str, Callable[[], object]] = {
        "memory bf16": lambda: fvt.lora.merge(bf16, lora),
        "memory fp8": lambda: fvt.lora.merge(fp8, lora),
        "disk bf16": disk(bf16_dir),
        "disk fp8": disk(fp8_dir),
    }
    if stochastic:
        methods["memory fp8 stochastic"] = lambda: fvt.lora.merge(fp8, lora, rounding="stochastic", seed=0)
    for fn in methods.values():  # warm: page cache, thread pools, allocator
        fn()
    med = interleaved(methods, repeats)
    shutil.rmtree(out, ignore_errors=True)
    targets = sum(1 for k in lora)
    result: dict[str, object] = {
        "layers": layers, "targets": targets, "repeats": repeats, "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "ratio memory fp8/bf16": round(med["memory fp8"] / med["memory bf16"], 3),
        "ratio disk fp8/bf16": round(med["disk fp8"] / med["disk bf16"], 3),
        "loadavg": os.getloadavg(), "torch": torch.__version__,
    }
    if stochastic:
        result["ratio memory fp8 stochastic/bf16"] = round(med["memory fp8 stochastic"] / med["memory bf16"], 3)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30, int(sys.argv[3]) if len(sys.argv) > 3 else 5,
         stochastic=len(sys.argv) > 4 and sys.argv[4] == "stochastic")
