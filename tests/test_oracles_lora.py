"""Oracles: peft's merge_and_unload, diffusers' LoRA loading and Wan conversion."""

import pytest
import torch

import fvtransform as fvt

import diffusers  # the test extra installs both: a missing one is an error, not a skip
import peft

from test_oracles_models import WAN_CONFIG, wan_inputs  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]


def make_peft(tmp_path, rank=4, alpha=8, use_rslora=False):
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    base_tree = fvt.map_tensors(fvt.ParamTree.from_module(base), lambda t: t.detach().clone())
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, use_rslora=use_rslora)
    model = peft.get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "adapter")
    return model, base_tree


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_matches_peft_merge_and_unload(tmp_path, use_rslora):
    model, base_tree = make_peft(tmp_path, use_rslora=use_rslora)
    with torch.no_grad():
        unmerged_out = model(**wan_inputs())[0]
    adapter = fvt.lora.load(tmp_path / "adapter", base=base_tree)
    assert adapter.format == "peft" and len(adapter) == 2 * 4 * 2 + 2 * 2
    ours = fvt.lora.merge(base_tree, adapter)
    module = fvt.build({**dict(model.base_model.model.config), "_class_name": "WanTransformer3DModel"})
    with torch.no_grad():
        fly = fvt.lora.call(module, base_tree, adapter, **wan_inputs())[0]
    assert torch.allclose(fly, unmerged_out, atol=1e-5)
    merged_model = model.merge_and_unload()
    theirs = fvt.ParamTree.from_module(merged_model)
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k


def test_merge_matches_diffusers_fuse_lora_in_bf16(tmp_path):
    _, base_tree = make_peft(tmp_path)
    adapter = fvt.lora.load(tmp_path / "adapter", base=base_tree)
    path = fvt.lora.save(adapter, tmp_path / "dlora", format="diffusers")
    torch.manual_seed(0)
    pipe_model = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval().to(torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(path)
    sd = {k[len("transformer."):]: v for k, v in sd.items()}
    pipe_model.load_lora_adapter(sd, adapter_name="a", prefix=None, network_alphas=None,
                                 metadata={"r": 4, "lora_alpha": 8, "target_modules": sorted({k.rsplit(".", 2)[0] for k in sd})})
    pipe_model.fuse_lora(lora_scale=1.0)
    theirs = {k.replace(".base_layer", ""): v for k, v in pipe_model.state_dict().items() if "lora_" not in k}
    ours = fvt.lora.merge(fvt.cast(base_tree, torch.bfloat16), fvt.lora.load(path, base=base_tree))
    eps = torch.finfo(torch.bfloat16).eps
    for k in adapter:
        # diffusers rounds the bf16 delta before adding it; ours rounds once: a few bf16 ulps apart at most
        scale = float(ours[k].float().abs().max())
        assert torch.allclose(ours[k].float(), theirs[k].float(), rtol=4 * eps, atol=4 * eps * scale), k


def test_comfy_wan_file_converts_like_diffusers(tmp_path):
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**WAN_CONFIG)
    tree = fvt.ParamTree.from_module(base)
    g = torch.Generator().manual_seed(3)
    comfy = {}
    for i in range(2):
        for attn, names in (("self_attn", "qkvo"), ("cross_attn", "qkvo")):
            for n in names:
                comfy[f"diffusion_model.blocks.{i}.{attn}.{n}.lora_A.weight"] = torch.randn(4, 16, generator=g)
                comfy[f"diffusion_model.blocks.{i}.{attn}.{n}.lora_B.weight"] = torch.randn(16, 4, generator=g)
        comfy[f"diffusion_model.blocks.{i}.ffn.0.lora_A.weight"] = torch.randn(4, 16, generator=g)
        comfy[f"diffusion_model.blocks.{i}.ffn.0.lora_B.weight"] = torch.randn(32, 4, generator=g)
        comfy[f"diffusion_model.blocks.{i}.ffn.2.lora_A.weight"] = torch.randn(4, 32, generator=g)
        comfy[f"diffusion_model.blocks.{i}.ffn.2.lora_B.weight"] = torch.randn(16, 4, generator=g)
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    theirs = _convert_non_diffusers_wan_lora_to_diffusers(dict(comfy))
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    ours = fvt.lora.load(comfy, base=tree)
    assert ours.format == "comfy"
    mine = {}
    for key, d in ours.items():
        module = key[: -len(".weight")]
        mine[f"{module}.lora_A.weight"] = d.A
        mine[f"{module}.lora_B.weight"] = d.B
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_dora_merge_and_on_the_fly_match_peft(tmp_path):
    torch.manual_seed(0)
    base = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    base_tree = fvt.map_tensors(fvt.ParamTree.from_module(base), lambda t: t.detach().clone())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "net.0.proj"], init_lora_weights=False, use_dora=True)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # magnitudes away from the initial norms, so DoRA's rescaling matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "dora")
    with torch.no_grad():
        unmerged_out = model(**wan_inputs())[0]
    adapter = fvt.lora.load(tmp_path / "dora", base=base_tree)
    assert all(d.magnitude is not None for d in adapter.values()) and len(adapter) == 10
    module = fvt.build({**dict(model.base_model.model.config), "_class_name": "WanTransformer3DModel"})
    with torch.no_grad():
        fly = fvt.lora.call(module, base_tree, adapter, **wan_inputs())[0]
    assert torch.allclose(fly, unmerged_out, atol=1e-5)
    ours, record = fvt.lora.merge_with_record(base_tree, adapter)
    theirs = fvt.ParamTree.from_module(model.merge_and_unload())
    for k in adapter:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
    assert fvt.lora.restore(ours, record) == base_tree
    # kohya's dora_scale holds the same magnitudes
    back = fvt.lora.load(fvt.lora.save(adapter, tmp_path / "kohya", format="kohya"), base=base_tree)
    assert all(torch.equal(back[k].magnitude, adapter[k].magnitude) for k in adapter)


# ----------------------------------------------------------------------------- golden fixtures (issue 14)
from pathlib import Path

FIX = Path(__file__).parent / "fixtures" / "lora"


def _ulps(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, d) -> float:
    """The largest difference in float32 ulps of the operands' magnitude ``|W| + |s| |B| @ |A|``.

    That is the scale of the rounding errors of any order of the float32 sums (a rounded product
    of a nearly cancelling sum is off by ulps of its terms, not of its tiny result).
    """
    terms = abs(d.scale) * (d.B.abs().reshape(d.B.shape[0], -1) @ d.A.abs().reshape(d.A.shape[0], -1)).reshape(base.shape)
    ref = (base.abs() + terms).clamp_min(torch.finfo(theirs.dtype).tiny)
    return float(((ours - theirs).abs() / (torch.finfo(theirs.dtype).eps * ref)).max())


def _agrees(ours, theirs, base, adapter, keys, ulps: float = 2.0) -> None:
    # the tools (peft's get_delta_weight + add, diffusers' fuse_lora) round B@A, the scaled product and the
    # sum in float32 (three roundings, <= 1.5 ulp); ours rounds a fused W + (sB)@A once (<= 0.5 ulp): the same
    # float32 math in another order, so not bit for bit but within 2 ulps of the operands (measured: <= 1.43)
    for k in keys:
        assert _ulps(ours[k], theirs[k], base[k], adapter[k]) <= ulps, (k, _ulps(ours[k], theirs[k], base[k], adapter[k]))


@pytest.mark.parametrize("name,weights,fmt,scales", [
    ("diffusers_model", "pytorch_lora_weights.safetensors", "diffusers-model", {2.0, 3.0}),
    ("diffusers_pipeline", "pytorch_lora_weights.safetensors", "diffusers", {0.5}),
    ("peft_modules_to_save", "adapter_model.safetensors", "peft", {2.0, 1.0}),
])
def test_golden_fixture_loads_strictly_and_merges_as_its_tool(name, weights, fmt, scales):
    base = fvt.load(FIX / name / "base.safetensors")
    adapter = fvt.lora.load(FIX / name / weights, base=base)
    assert adapter.format == fmt and set(adapter.scales.values()) == scales
    theirs = fvt.load(FIX / name / "merged.safetensors")
    assert set(theirs) == set(adapter)
    ours = fvt.lora.merge(base, adapter)
    _agrees(ours, theirs, base, adapter, [k for k in theirs if not k.startswith("proj_out.")])
    for k in ("proj_out.weight", "proj_out.bias"):  # modules_to_save: replaced bit for bit
        if k in theirs:
            assert torch.equal(ours[k], theirs[k]), k


def _random_wan_adapter(tree, ranks=(4, 2)):
    a = fvt.lora.random_adapter(tree, targets="blocks.*.attn[12].to_*.weight", rank=ranks[0], alpha=8, seed=1, scale_b=0.3)
    b = fvt.lora.random_adapter(tree, targets="blocks.*.ffn.net.*.weight", rank=ranks[1], alpha=3, seed=2, scale_b=0.3)
    return fvt.lora.LoraAdapter({**a, **b})


def _diffusers_fused(model, keys):
    model.fuse_lora(lora_scale=1.0)
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    return {k: sd[k] for k in keys}


@pytest.mark.parametrize("fmt", ["diffusers-model", "diffusers", "kohya", "comfy"])
def test_every_file_we_write_loads_in_its_tool_with_the_same_merge(tmp_path, fmt):
    """diffusers reads its own layouts and, through its converters, musubi-tuner (kohya) and ComfyUI files."""
    torch.manual_seed(0)
    tree = fvt.ParamTree.from_module(diffusers.WanTransformer3DModel(**WAN_CONFIG))
    tree = fvt.map_tensors(tree, lambda t: t.detach().clone())
    adapter = _random_wan_adapter(tree)
    path = fvt.lora.save(adapter, tmp_path / ("out" if fmt.startswith("diffusers") else "out.safetensors"), format=fmt)
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    if fmt == "diffusers-model":
        model.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None, adapter_name="x")
        assert model.peft_config["x"].lora_alpha == 8  # the header was read
    else:  # what WanPipeline.load_lora_weights does: lora_state_dict (with its format converters), then the transformer
        state, meta = diffusers.WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        diffusers.WanPipeline.load_lora_into_transformer(state, transformer=model, adapter_name="x", metadata=meta)
    theirs = _diffusers_fused(model, list(adapter))
    ours = fvt.lora.merge(tree, adapter)
    _agrees(ours, theirs, tree, adapter, list(adapter))


def test_peft_reads_our_peft_file_with_modules_to_save(tmp_path):
    torch.manual_seed(0)
    tree = fvt.map_tensors(fvt.ParamTree.from_module(diffusers.WanTransformer3DModel(**WAN_CONFIG)), lambda t: t.detach().clone())
    g = torch.Generator().manual_seed(4)
    adapter = fvt.lora.LoraAdapter({**_random_wan_adapter(tree), "proj_out.weight": fvt.lora.FullDelta(torch.randn(tree["proj_out.weight"].shape, generator=g), replaces=True),
                                    "proj_out.bias": fvt.lora.FullDelta(torch.randn(tree["proj_out.bias"].shape, generator=g), replaces=True)})
    path = fvt.lora.save(adapter, tmp_path / "p", format="peft")
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(diffusers.WanTransformer3DModel(**WAN_CONFIG).eval(), str(path.parent))
    theirs = fvt.ParamTree.from_module(model.merge_and_unload())
    ours = fvt.lora.merge(tree, adapter)
    _agrees(ours, theirs, tree, adapter, [k for k in adapter if not k.startswith("proj_out.")])
    assert torch.equal(ours["proj_out.weight"], theirs["proj_out.weight"]) and torch.equal(ours["proj_out.bias"], theirs["proj_out.bias"])
