"""Draw the LoRA guide's picture (docs/img/lora-update-norms.png) from a generated model and LoRA.

The reference video DiT with 12 blocks (random weights, seed 0) and a LoRA made for the picture: rank 4 on
the self-attention of every block, rank 8 on the feed-forward layers of blocks 6 to 11 only (stronger), the
cross-attention untouched. Both are saved to a temporary folder and drawn by the command the guide shows,
``fvtransform inspect LORA --base BASE --plot OUT.png`` (matplotlib: the ``plot`` extra).

Usage: ``python scripts/plot_lora_example.py [OUT.png]`` (default: docs/img/lora-update-norms.png).
tests/test_plot.py runs it into a temporary folder, so it keeps working.
"""

from __future__ import annotations

from pathlib import Path
import sys
import tempfile

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "docs" / "img" / "lora-update-norms.png"


def main(argv: list[str]) -> int:
    import fvtransform as fvt
    from fvtransform.cli import main as cli
    from fvtransform.models import init_weights

    out = Path(argv[0]) if argv else DEFAULT
    tree = fvt.ParamTree(init_weights(fvt.build("fvt-video-dit", config={"num_layers": 12}), seed=0))
    attn = fvt.lora.random_adapter(tree, targets="blocks.*.attn1.to_*.weight", rank=4, seed=1, scale_b=0.02)
    late = [f"blocks.{i}.ffn.net.*.weight" for i in range(6, 12)]
    ffn = fvt.lora.random_adapter(tree, targets=late, rank=8, seed=2, scale_b=0.05)
    adapter = fvt.lora.LoraAdapter({**attn, **ffn})
    with tempfile.TemporaryDirectory() as tmp:
        fvt.save(tree, f"{tmp}/base")
        fvt.lora.save(adapter, f"{tmp}/my_lora.safetensors", format="kohya")
        return cli(["inspect", f"{tmp}/my_lora.safetensors", "--base", f"{tmp}/base", "--plot", str(out)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
