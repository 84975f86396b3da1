"""Oracles: peft's merge_and_unload, diffusers' LoRA loading and Wan conversion."""

import pytest
import torch

import fvtransform as fvt

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

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
    ours, record = fvt.lora.merge(base_tree, adapter, return_record=True)
    theirs = fvt.ParamTree.from_module(model.merge_and_unload())
    for k in adapter:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0), k
    assert fvt.lora.restore(ours, record) == base_tree
    # kohya's dora_scale holds the same magnitudes
    back = fvt.lora.load(fvt.lora.save(adapter, tmp_path / "kohya", format="kohya"), base=base_tree)
    assert all(torch.equal(back[k].magnitude, adapter[k].magnitude) for k in adapter)
