"""Golden fixtures written by the real tools: ComfyUI, VideoX-Fun, FastVideo (issue 14).

Each folder under ``tests/fixtures/`` holds a LoRA file (written by the tool where it has a
writer, else in its layout), the tool's own merged tensors and a README saying how they were
made (``make_fixtures.py``, run by hand against the tool's source; never at test time). The
tests load each file strictly with ``base=``, merge with :func:`fvtransform.lora.merge` and
compare with the tool's tensors. The tools use original Wan names; the base is diffusers' tiny
Wan, so their tensors are renamed with ``fvt.io.WAN_ORIGINAL_TO_DIFFUSERS`` (every key must map).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fvtransform as fvt
from fvtransform.errors import FormatError

FIX = Path(__file__).parent / "fixtures"


def _base(folder: str) -> fvt.ParamTree:
    return fvt.ParamTree(load_file(FIX / folder / "base.safetensors"))


def _diffusers_names(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    assert all(k.startswith(prefix) for k in tensors)
    stripped = {k[len(prefix):]: v for k, v in tensors.items()}
    out = dict(fvt.io.WAN_ORIGINAL_TO_DIFFUSERS.plan(stripped).apply(stripped))
    assert len(out) == len(stripped)
    return out


def _changed(ours: fvt.ParamTree, base: fvt.ParamTree, dtype: torch.dtype) -> set[str]:
    return {k for k in ours if not torch.equal(ours[k], base[k].to(dtype))}


def _assert_matches(ours: fvt.ParamTree, base: fvt.ParamTree, theirs: dict[str, torch.Tensor], dtype: torch.dtype,
                    exact: bool = True) -> None:
    """The tool changed exactly the tensors fvtransform changed, to the same values."""
    assert set(theirs) == _changed(ours, base, dtype)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype == dtype, k
        if exact:
            assert torch.equal(ours[k], t), k
        else:
            # one float32 ulp at the tensor's scale (see the ComfyUI kohya case)
            atol = torch.finfo(dtype).eps * float(t.abs().max())
            assert torch.allclose(ours[k], t, rtol=0, atol=atol), k


# ---------------------------------------------------------------- VideoX-Fun


@pytest.mark.parametrize("case, dtype", [("lora_r4_a2", torch.float32), ("lora_r4_a2_bf16", torch.bfloat16)])
def test_videox_fun_merge_lora_matches_ours_bit_for_bit(case, dtype):
    # VideoX-Fun merges in float32 and casts back once: the same as ours, so bit for bit in both dtypes
    base = _base("videox_fun")
    adapter = fvt.lora.load(FIX / "videox_fun" / "lora_r4_a2.safetensors", base=base)
    assert adapter.format == "kohya" and len(adapter) == 26  # every Linear VideoX-Fun's LoRANetwork wraps
    ours = fvt.lora.merge(fvt.cast(base, dtype), adapter)
    theirs = _diffusers_names(load_file(FIX / "videox_fun" / f"{case}.merged.safetensors"))
    only_changed = {k: v for k, v in theirs.items() if not torch.equal(v, base[k].to(dtype))}
    assert set(theirs) == set(base)  # the tool's whole state dict
    _assert_matches(ours, base, only_changed, dtype)


# ---------------------------------------------------------------- FastVideo


@pytest.mark.parametrize("case, dtype", [
    ("extracted", torch.float32), ("alpha2", torch.float32), ("alpha2_bf16", torch.bfloat16),
])
def test_fastvideo_merge_script_matches_ours_bit_for_bit(case, dtype):
    # merge_lora.py: float32 ``base + (B @ A) * (alpha / lora_rank)``, cast to the base dtype once
    base = _base("fastvideo")
    adapter = fvt.lora.load(FIX / "fastvideo" / f"{case.removesuffix('_bf16')}.safetensors", base=base)
    assert adapter.format == "fastvideo" and len(adapter) == 10
    ours = fvt.lora.merge(fvt.cast(base, dtype), adapter)
    _assert_matches(ours, base, load_file(FIX / "fastvideo" / f"{case}.merged.safetensors"), dtype)


def test_fastvideo_lora_layer_merge_matches_ours_bit_for_bit():
    # BaseLayerWithLoRA.set_lora_weights (what LoRAPipeline runs): rank = A.shape[0], int(alpha)
    base = _base("fastvideo")
    ours = fvt.lora.merge(base, fvt.lora.load(FIX / "fastvideo" / "alpha2.safetensors", base=base))
    _assert_matches(ours, base, load_file(FIX / "fastvideo" / "alpha2.layer.safetensors"), torch.float32)


def test_fastvideo_fractional_alpha_is_refused_because_fastvideo_disagrees_with_itself():
    script = load_file(FIX / "fastvideo" / "alpha2p5.merged.safetensors")
    layer = load_file(FIX / "fastvideo" / "alpha2p5.layer.safetensors")
    assert set(script) == set(layer)
    # the merge script scales by 2.5 / 4, the LoRA layers by int(2.5) / 4: no single right answer
    assert all(not torch.allclose(script[k], layer[k]) for k in script)
    with pytest.raises(FormatError, match=r"alpha2p5\.safetensors.*lora_alpha' is 2\.5.*Fix"):
        fvt.lora.load(FIX / "fastvideo" / "alpha2p5.safetensors", base=_base("fastvideo"))


# ---------------------------------------------------------------- ComfyUI

_COMFY = json.loads((FIX / "comfyui" / "cases.json").read_text())["cases"]
#: exact unless noted: the kohya files have alpha 3 / rank 4 = 0.75. ComfyUI scales the product
#: (0.75 * (up @ down)), fvtransform folds the scale into B before the matmul ((0.75 * B) @ A):
#: a different float32 rounding, within one float32 ulp at the tensor's scale. With a power-of-two
#: scale (the other files) or a bf16 base (one rounding of the float32 sum) both are bit for bit.
_COMFY_EXACT = {"kohya": False, "fvt_to_kohya": False}


@pytest.mark.parametrize("tag", sorted(_COMFY))
def test_comfyui_merge_matches_ours(tag):
    case = _COMFY[tag]
    dtype = torch.bfloat16 if case["base_dtype"] == "torch.bfloat16" else torch.float32
    base = _base("comfyui")
    adapter = fvt.lora.load(FIX / "comfyui" / case["file"], base=base)
    ours = fvt.lora.merge(fvt.cast(base, dtype), adapter)
    theirs = _diffusers_names(load_file(FIX / "comfyui" / f"{tag}.merged.safetensors"), "diffusion_model.")
    assert len(theirs) == case["merged_keys"]
    _assert_matches(ours, base, theirs, dtype, exact=_COMFY_EXACT.get(tag.removesuffix("_bf16"), True))


def test_comfyui_maps_wan_modulation_diffs_onto_scale_shift_table():
    # ComfyUI's key map holds every non-weight parameter under its own name, so
    # ``diffusion_model.blocks.N.modulation.diff`` patches ``blocks.N.modulation`` (ours: scale_shift_table)
    theirs = _diffusers_names(load_file(FIX / "comfyui" / "native.merged.safetensors"), "diffusion_model.")
    assert {"blocks.0.scale_shift_table", "blocks.1.scale_shift_table", "scale_shift_table"} <= set(theirs)
    assert {"proj_out.bias", "blocks.1.ffn.net.2.bias"} <= set(theirs)  # .diff_b


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_comfyui_applies_every_key_fvtransform_writes(fmt):
    # ComfyUI's load_lora logs "lora key not loaded" for each key it skips: none for our writers' files
    case = _COMFY[f"fvt_to_{fmt}"]
    assert case["comfy_warnings"] == []
    written = load_file(FIX / "comfyui" / case["file"])
    base = _base("comfyui")
    targets = set(fvt.lora.load(FIX / "comfyui" / case["file"], base=base))
    theirs = _diffusers_names(load_file(FIX / "comfyui" / f"fvt_to_{fmt}.merged.safetensors"), "diffusion_model.")
    assert set(theirs) == targets and len(targets) == case["merged_keys"]
    prefix = "diffusion_model." if fmt == "comfy" else "lora_unet_"
    assert all(k.startswith(prefix) for k in written)
