"""Original single-file layouts (Wan-AI / ComfyUI, HunyuanVideo) loaded through invertible KeyMaps (issue 16).

The oracle is diffusers itself: tiny ``WanTransformer3DModel`` and
``HunyuanVideoTransformer3DModel`` with random weights give the diffusers
state dicts; this file writes the original-layout files by inverting
diffusers' own converters (``diffusers.loaders.single_file_utils``,
``convert_wan_transformer_to_diffusers`` and
``convert_hunyuan_video_transformer_to_diffusers``), and checks that applying
those converters to the files gives the diffusers state dicts back: that
proves the test's original files are right. Then fvtransform's load must equal
diffusers' result bit for bit, and original -> diffusers -> original must give
the same bytes back.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
import re
from typing import Any, Callable

import pytest
import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.io._original import detect_layout, original_key_map
from fvtransform.registry import LAYOUTS, layout

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

WAN_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
HY_HEADS, HY_HEAD_DIM, HY_MLP_RATIO = 2, 8, 3.0  # hidden 16, mlp 48: linear1 splits [16, 16, 16, 48]
HY_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, num_attention_heads=HY_HEADS, attention_head_dim=HY_HEAD_DIM, num_layers=1,
    num_single_layers=2, num_refiner_layers=1, mlp_ratio=HY_MLP_RATIO, patch_size=1, patch_size_t=1, text_embed_dim=16,
    pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
)
HIDDEN, MLP = HY_HEADS * HY_HEAD_DIM, int(HY_HEADS * HY_HEAD_DIM * HY_MLP_RATIO)


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.state_dict().items()}


# ---- the test's inverses of diffusers' converters (diffusers -> original), written from the forward code


def wan_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``convert_wan_transformer_to_diffusers``: its substring replacements, reversed (norm2/norm3 swap back)."""
    pairs = [
        ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
        (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("attn2", "cross_attn"), ("attn1", "self_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."),
        (".to_k.", ".k."), (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
        ("proj_out", "head.head"), (".norm2.", ".norm3."),
    ]
    out = {}
    for k, v in sd.items():
        new = k
        for a, b in pairs:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        out[new] = v.clone()
    return out


def hunyuan_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``convert_hunyuan_video_transformer_to_diffusers``: fuse what it splits, rename what it renames."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for p in ("weight", "bias"):
        for i in range(HY_CONFIG["num_layers"]):
            b = f"transformer_blocks.{i}.attn"
            out[f"double_blocks.{i}.img_attn_qkv.{p}"] = torch.cat([sd.pop(f"{b}.to_{x}.{p}") for x in "qkv"])
            out[f"double_blocks.{i}.txt_attn_qkv.{p}"] = torch.cat([sd.pop(f"{b}.add_{x}_proj.{p}") for x in "qkv"])
        for i in range(HY_CONFIG["num_single_layers"]):
            b = f"single_transformer_blocks.{i}"
            pieces = [sd.pop(f"{b}.attn.to_{x}.{p}") for x in "qkv"] + [sd.pop(f"{b}.proj_mlp.{p}")]
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(pieces)
        for i in range(HY_CONFIG["num_refiner_layers"]):
            b = f"context_embedder.token_refiner.refiner_blocks.{i}.attn"
            out[f"txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv.{p}"] = torch.cat(
                [sd.pop(f"{b}.to_{x}.{p}") for x in "qkv"])
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    pairs = [  # diffusers name -> original name, applied in this order
        ("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_", "txt_in.t_embedder.mlp.L"),
        ("context_embedder.time_text_embed.text_embedder", "txt_in.c_embedder"),
        ("context_embedder.proj_in", "txt_in.input_embedder"),
        ("time_text_embed.timestep_embedder.linear_", "time_in.mlp.L"),
        ("time_text_embed.guidance_embedder.linear_", "guidance_in.mlp.L"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("single_transformer_blocks", "single_blocks"), ("transformer_blocks", "double_blocks"),
        ("x_embedder", "img_in"), ("norm1_context.linear", "txt_mod.linear"), ("norm1.linear", "img_mod.linear"),
        ("attn.norm_added_q", "txt_attn_q_norm"), ("attn.norm_added_k", "txt_attn_k_norm"),
        ("attn.to_add_out", "txt_attn_proj"), ("ff_context.net.0.proj", "txt_mlp.fc1"), ("ff_context.net.2", "txt_mlp.fc2"),
        ("norm_out.linear", "adaLN_modulation.1"),
    ]
    for k, v in sd.items():
        new = k
        for a, b in pairs:
            new = new.replace(a, b)
        new = re.sub(r"mlp\.L1", "mlp.0", re.sub(r"mlp\.L2", "mlp.2", new))
        if new.startswith("txt_in."):
            new = new.replace("attn.to_out.0", "self_attn_proj").replace("ff.net.0.proj", "mlp.fc1").replace("ff.net.2", "mlp.fc2")
        elif new.startswith("single_blocks."):
            new = (new.replace("attn.norm_q", "q_norm").replace("attn.norm_k", "k_norm").replace("proj_out", "linear2")
                   .replace("norm.linear", "modulation.linear"))
        elif new.startswith("double_blocks."):
            new = (new.replace("attn.norm_q", "img_attn_q_norm").replace("attn.norm_k", "img_attn_k_norm")
                   .replace("attn.to_out.0", "img_attn_proj").replace("ff.net.0.proj", "img_mlp.fc1")
                   .replace("ff.net.2", "img_mlp.fc2"))
        elif new == f"proj_out.{new.rsplit('.', 1)[-1]}":
            new = "final_layer.linear." + new.rsplit(".", 1)[-1]
        out[new] = v.clone()
    return out


def _hunyuan_converter() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """diffusers' HunyuanVideo converter, with its fixed ``hidden_size = 3072`` set to the tiny model's size.

    The converter hard-codes the released model's hidden size for the
    ``linear1`` split; nothing else is changed (the source is read from the
    installed diffusers at test time, not copied).
    """
    src = inspect.getsource(single_file_utils.convert_hunyuan_video_transformer_to_diffusers)
    assert src.count("hidden_size = 3072") == 1, "diffusers changed its HunyuanVideo converter; revisit this oracle"
    namespace = dict(vars(single_file_utils))
    exec(src.replace("hidden_size = 3072", f"hidden_size = {HIDDEN}"), namespace)  # noqa: S102
    return namespace["convert_hunyuan_video_transformer_to_diffusers"]


# ---- fixtures: tiny models, their diffusers folders and original-layout files


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _make_wan(tmp_path_factory.mktemp("wan"), WAN_CONFIG)


@pytest.fixture(scope="module")
def wan_i2v(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Wan image-to-video: the image cross-attention and image embedder (the map's optional rules)."""
    return _make_wan(tmp_path_factory.mktemp("wan_i2v"), {**WAN_CONFIG, "image_dim": 12, "added_kv_proj_dim": 16})


def _make_wan(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    model = WanTransformer3DModel(**config)
    sd = _random_state(model, 0)
    model.load_state_dict(sd)
    model.save_pretrained(root / "transformer")
    original = wan_to_original(sd)
    save_file(original, root / "wan_original.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, root / "wan_comfy.safetensors")
    return {"root": root, "sd": sd, "original": original, "model": model}


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hunyuan")
    model = HunyuanVideoTransformer3DModel(**HY_CONFIG)
    sd = _random_state(model, 1)
    model.load_state_dict(sd)
    model.save_pretrained(root / "transformer")
    original = hunyuan_to_original(sd)
    save_file(original, root / "hy_original.safetensors")
    return {"root": root, "sd": sd, "original": original, "model": model}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---- the test's original files are right (diffusers' converters give the diffusers state dicts back)


@pytest.mark.parametrize("fixture", ["wan", "wan_i2v"])
def test_wan_original_file_is_what_diffusers_converts(request: pytest.FixtureRequest, fixture: str) -> None:
    wan = request.getfixturevalue(fixture)
    converted = single_file_utils.convert_wan_transformer_to_diffusers(dict(wan["original"]))
    _equal(converted, wan["sd"])
    assert ("blocks.0.cross_attn.k_img.weight" in wan["original"]) == (fixture == "wan_i2v")


def test_hunyuan_original_file_is_what_diffusers_converts(hunyuan: dict[str, Any]) -> None:
    converted = _hunyuan_converter()(dict(hunyuan["original"]))
    _equal(converted, hunyuan["sd"])
    assert hunyuan["original"]["single_blocks.0.linear1.weight"].shape[0] == 3 * HIDDEN + MLP != 4 * HIDDEN


# ---- layout detection, the registry's layouts


@pytest.mark.parametrize(("fixture", "name", "convert"), [
    ("wan", "wan-original", True), ("wan", "wan-diffusers", False),
    ("hunyuan", "hunyuan-video-original", True), ("hunyuan", "hunyuan-video-diffusers", False),
])
def test_detects_each_layout(request: pytest.FixtureRequest, fixture: str, name: str, convert: bool) -> None:
    data = request.getfixturevalue(fixture)
    keys = list(data["original"] if convert else data["sd"])
    found = detect_layout(keys)
    assert found.name == name and found.prefix == ""
    assert found.layout.class_name == type(data["model"]).__name__
    assert detect_layout([f"model.diffusion_model.{k}" for k in keys]).prefix == "model.diffusion_model."


def test_registry_knows_the_layouts_and_lists_close_names() -> None:
    assert sorted(LAYOUTS) == ["hunyuan-video-diffusers", "hunyuan-video-original", "wan-diffusers", "wan-original"]
    assert layout("hunyuan-video-original").class_name == "HunyuanVideoTransformer3DModel"
    with pytest.raises(E.RegistryError, match=r"unknown checkpoint layout 'hunyuan-orignal'; close names: "
                                             r"\['hunyuan-video-original'.*converts these layouts"):
        layout("hunyuan-orignal")
    with pytest.raises(E.RegistryError, match=r"unknown architecture 'wan-original'.*checkpoint layouts of that name: "
                                             r"\['wan-original'.*fvt.load_model\(file, config=\.\.\., layout=\.\.\.\)"):
        fvt.resolve("wan-original")


# ---- loading: equals diffusers, bit for bit


@pytest.mark.parametrize(("fixture", "name"), [("wan", "wan_original.safetensors"), ("wan", "wan_comfy.safetensors"),
                                               ("wan_i2v", "wan_original.safetensors")])
def test_wan_load_equals_from_single_file(request: pytest.FixtureRequest, fixture: str, name: str) -> None:
    wan = request.getfixturevalue(fixture)
    path = wan["root"] / name
    module, tree = loaded = fvt.load_model(path, config=wan["root"] / "transformer")
    assert type(module).__name__ == "WanTransformer3DModel" and loaded.report.layout == "wan-original"
    oracle = WanTransformer3DModel.from_single_file(str(path), config=str(wan["root"]), subfolder="transformer")
    _equal(dict(tree), oracle.state_dict())
    x, t, text = torch.randn(1, 4, 1, 4, 4), torch.tensor([3]), torch.randn(1, 5, 16)
    image = {"encoder_hidden_states_image": torch.randn(1, 3, 12)} if fixture == "wan_i2v" else {}
    with torch.no_grad():
        ours = fvt.call(module, tree, x, t, text, return_dict=False, **image)[0]
        theirs = oracle(x, t, text, return_dict=False, **image)[0]
    assert torch.equal(ours, theirs)


def test_hunyuan_load_equals_diffusers_converter_and_splits_lazily(hunyuan: dict[str, Any]) -> None:
    path = hunyuan["root"] / "hy_original.safetensors"
    loaded = fvt.load_model(path, config=hunyuan["root"] / "transformer")
    _equal(dict(loaded.tree), _hunyuan_converter()(load_file(path)))
    _equal(dict(loaded.tree), hunyuan["sd"])
    # the unequal pieces of linear1: q, k, v of `hidden` rows and the MLP input of `mlp` rows, views of one mapping
    tree = loaded.tree
    pieces = [tree[f"single_transformer_blocks.1.attn.to_{x}.weight"] for x in "qkv"] + \
        [tree["single_transformer_blocks.1.proj_mlp.weight"]]
    assert [p.shape[0] for p in pieces] == [HIDDEN, HIDDEN, HIDDEN, MLP]
    base = pieces[0].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in pieces)  # one storage: split as views, not copied
    start = pieces[0].storage_offset()
    assert [p.storage_offset() - start for p in pieces] == [0, HIDDEN * HIDDEN, 2 * HIDDEN * HIDDEN, 3 * HIDDEN * HIDDEN]


def test_hunyuan_forward_equals_diffusers(hunyuan: dict[str, Any]) -> None:
    module, tree = fvt.load_model(hunyuan["root"] / "hy_original.safetensors", config=hunyuan["root"] / "transformer")
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(1, 4, 1, 2, 2, generator=g), torch.tensor([5]), torch.randn(1, 3, 16, generator=g),
            torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8, generator=g))
    with torch.no_grad():
        ours = fvt.call(module, tree, *args, guidance=torch.tensor([1000.0]), return_dict=False)[0]
        theirs = hunyuan["model"](*args, guidance=torch.tensor([1000.0]), return_dict=False)[0]
    assert torch.equal(ours, theirs)


# ---- back to the original layout: the same bytes


@pytest.mark.parametrize(("fixture", "name"), [("wan", "wan_original.safetensors"), ("wan", "wan_comfy.safetensors"),
                                               ("wan_i2v", "wan_original.safetensors"), ("hunyuan", "hy_original.safetensors")])
def test_original_to_diffusers_to_original_gives_the_same_bytes(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, name: str
) -> None:
    data = request.getfixturevalue(fixture)
    path = data["root"] / name
    loaded = fvt.load_model(path, config=data["root"] / "transformer")
    back = fvt.rename(loaded.tree, loaded.report.key_map.inverse())
    assert back.keys() == load_file(path).keys()
    fvt.save(back, tmp_path / "back.safetensors")
    before, after = load_file(path), load_file(tmp_path / "back.safetensors")
    assert list(before) == sorted(after)  # safetensors stores keys sorted
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape, k
        assert before[k].numpy().tobytes() == after[k].numpy().tobytes(), k
    assert original_key_map(path, data["root"] / "transformer") == loaded.report.key_map


def test_hunyuan_unequal_pieces_fuse_back_in_order(hunyuan: dict[str, Any]) -> None:
    key_map = original_key_map(hunyuan["root"] / "hy_original.safetensors", hunyuan["root"] / "transformer")
    assert key_map is not None
    sd = hunyuan["sd"]
    back = fvt.rename(fvt.ParamTree(sd), key_map.inverse())
    fused = back["single_blocks.0.linear1.bias"]
    b = "single_transformer_blocks.0"
    assert torch.equal(fused, torch.cat([sd[f"{b}.attn.to_q.bias"], sd[f"{b}.attn.to_k.bias"],
                                         sd[f"{b}.attn.to_v.bias"], sd[f"{b}.proj_mlp.bias"]]))
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(back["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


def test_config_from_file_metadata(wan: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "with_config.safetensors"
    config = json.loads((wan["root"] / "transformer" / "config.json").read_text())
    save_file(wan["original"], path, metadata={"config": json.dumps(config)})
    module, tree = fvt.load_model(path)
    _equal(dict(tree), wan["sd"])


# ---- bad input: typed errors naming the file, the keys and the fix


def test_unknown_layout(tmp_path: Path, wan: dict[str, Any]) -> None:
    path = tmp_path / "unknown.safetensors"
    save_file({"encoder.layer.0.weight": torch.ones(2), "decoder.out.bias": torch.ones(2)}, path)
    with pytest.raises(E.KeyMismatchError, match=r"unknown\.safetensors: unknown layout \(no known layout\); its keys "
                                                 r"look like \['decoder.out.bias', 'encoder.layer.0.weight'\].*Fix:"):
        fvt.load_model(path, config=wan["root"] / "transformer")


def test_mixed_layout(tmp_path: Path, wan: dict[str, Any]) -> None:
    path = tmp_path / "mixed.safetensors"
    mixed = dict(wan["original"])
    mixed["blocks.1.attn1.to_q.weight"] = mixed.pop("blocks.1.self_attn.q.weight")
    save_file(mixed, path)
    with pytest.raises(E.KeyMismatchError, match=r"mixed\.safetensors: mixed layout: its keys name 2 layouts "
                                                 r"\(wan-original: .*; wan-diffusers: \['blocks.1.attn1.to_q.weight'\]\).*Fix:"):
        fvt.load_model(path, config=wan["root"] / "transformer")
    half = tmp_path / "half_prefixed.safetensors"
    save_file({("model.diffusion_model." + k if k.startswith("blocks") else k): v
               for k, v in wan["original"].items()}, half)
    with pytest.raises(E.KeyMismatchError, match=r"half_prefixed\.safetensors: mixed layout: \d+ keys carry the prefix "
                                                 r"'model.diffusion_model.'.*Fix:"):
        fvt.load_model(half, config=wan["root"] / "transformer")


def test_config_from_another_family(wan: dict[str, Any], hunyuan: dict[str, Any]) -> None:
    with pytest.raises(E.FormatError, match=r"wan_original\.safetensors: the file is in the wan-original layout, a "
                                            r"WanTransformer3DModel, but the config .*config.json\) is for "
                                            r"'HunyuanVideoTransformer3DModel' \(the family of the hunyuan-video-original, "
                                            r"hunyuan-video-diffusers layouts\).*Fix: pass config="):
        fvt.load_model(wan["root"] / "wan_original.safetensors", config=hunyuan["root"] / "transformer")


def test_fused_key_of_the_wrong_total_size(tmp_path: Path, hunyuan: dict[str, Any]) -> None:
    path = tmp_path / "hy_wide.safetensors"
    bad = dict(hunyuan["original"])
    bad["single_blocks.1.linear1.weight"] = torch.cat([bad["single_blocks.1.linear1.weight"], torch.zeros(4, HIDDEN)])
    save_file(bad, path)
    with pytest.raises(E.ShapeMismatchError, match=r"hy_wide\.safetensors: in the hunyuan-video-original layout.*"
                                                   r"split 'single_blocks.1.linear1.weight': size 100 along dim 0, "
                                                   r"sizes \[16, 16, 16, 48\] sum to 96.*Fix: check that the config"):
        fvt.load_model(path, config=hunyuan["root"] / "transformer")


def test_no_config_and_bad_arguments(wan: dict[str, Any]) -> None:
    path = wan["root"] / "wan_original.safetensors"
    with pytest.raises(E.NotFoundError, match=r"wan_original\.safetensors: no config: .*Fix: pass config="):
        fvt.load_model(path)
    with pytest.raises(E.UsageError, match=r"component= picks a pipeline's component"):
        fvt.load_model(path, "transformer", config=wan["root"] / "transformer")
    with pytest.raises(E.RegistryError, match=r"unknown checkpoint layout 'wan-orignal'; close names: \['wan-original'"):
        fvt.load_model(path, config=wan["root"] / "transformer", layout="wan-orignal")


def test_a_keymap_whose_stages_compose_into_no_plan_still_applies() -> None:
    """Split a tensor, then fuse its halves in the other order: two stages, applied one by one (and inverted)."""
    swap = fvt.KeyMap.of([fvt.Split("m.{p}", ["a.{p}", "b.{p}"])], keep_rest=False).then(
        [fvt.Fuse(["b.{p}", "a.{p}"], "n.{p}")])
    tree = fvt.ParamTree({"m.w": torch.arange(4.0), "other": torch.zeros(1)})
    with pytest.raises(E.PlanError, match="cannot compose a fuse"):
        swap.plan(fvt.ParamTree({"m.w": torch.arange(4.0)}))  # one plan cannot say it: the map applies stage by stage
    with pytest.raises(E.KeyMismatchError, match=r"no rule claims 1 keys: \['other'\]"):
        swap(tree)  # the first stage is strict
    out = swap(fvt.ParamTree({"m.w": torch.arange(4.0)}))
    assert out["n.w"].tolist() == [2.0, 3.0, 0.0, 1.0]
    assert swap.inverse()(out)["m.w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_stray_key_is_an_error_or_with_strict_false_a_listed_leftover(tmp_path: Path, wan: dict[str, Any]) -> None:
    path = tmp_path / "stray.safetensors"
    save_file({**wan["original"], "blocks.0.self_attn.extra": torch.ones(2)}, path)
    with pytest.raises(E.KeyMismatchError, match=r"stray\.safetensors: in the wan-original layout.*no rule claims 1 keys: "
                                                 r"\['blocks.0.self_attn.extra'\].*Fix: check that the config"):
        fvt.load_model(path, config=wan["root"] / "transformer")
    loaded = fvt.load_model(path, config=wan["root"] / "transformer", strict=False)  # no warning: the report lists it
    assert loaded.report.unexpected == ("blocks.0.self_attn.extra",)
    _equal({k: v for k, v in loaded.tree.items() if k in wan["sd"]}, wan["sd"])


def test_wan_dtype_loads_as_the_diffusers_folder_would(wan: dict[str, Any]) -> None:
    """dtype= means what it means for a folder (from_pretrained keeps _keep_in_fp32_modules in float32);
    from_single_file casts every tensor (its final model.to(torch_dtype)): keep_fp32=False matches it."""
    path, folder = wan["root"] / "wan_comfy.safetensors", wan["root"] / "transformer"
    _, tree = fvt.load_model(path, config=folder, dtype=torch.bfloat16)
    _equal(dict(tree), WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).state_dict())
    assert tree["blocks.0.scale_shift_table"].dtype == torch.float32 and tree["proj_out.weight"].dtype == torch.bfloat16
    _, flat = fvt.load_model(path, config=folder, dtype=torch.bfloat16, keep_fp32=False)
    oracle = WanTransformer3DModel.from_single_file(str(path), config=str(wan["root"]), subfolder="transformer",
                                                    torch_dtype=torch.bfloat16)
    _equal(dict(flat), oracle.state_dict())


def test_config_from_a_pipeline_repo_fetches_configs_only(fake_hub: Any, wan: dict[str, Any]) -> None:
    folder = wan["root"] / "transformer"
    files = {f"transformer/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    files["model_index.json"] = json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers",
                                                                                          "WanTransformer3DModel"]}).encode()
    fake_hub.add_commit("org/tiny-wan-pipe", files)
    module, tree = fvt.load_model(wan["root"] / "wan_original.safetensors", config="org/tiny-wan-pipe")
    _equal(dict(tree), wan["sd"])
    fetched = {p.rsplit("/", 1)[-1] for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {"model_index.json", "config.json"}  # the config only: no weights downloaded


@pytest.mark.parametrize(("fixture", "name"), [("wan_i2v", "wan_original.safetensors"), ("wan", "wan_comfy.safetensors"),
                                               ("hunyuan", "hy_original.safetensors")])
def test_save_with_rename_writes_the_same_file_as_rename_then_save(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, name: str
) -> None:
    data = request.getfixturevalue(fixture)
    loaded = fvt.load_model(data["root"] / name, config=data["root"] / "transformer")
    back = loaded.report.key_map.inverse()
    fvt.save(fvt.rename(loaded.tree, back), tmp_path / "eager.safetensors")
    fvt.save(loaded.tree, tmp_path / "streamed.safetensors", rename=back)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "eager.safetensors").read_bytes()
    before, after = load_file(data["root"] / name), load_file(tmp_path / "streamed.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_save_with_rename_fuses_each_key_only_when_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hunyuan: dict[str, Any]
) -> None:
    """At most one fused tensor is alive at a time: a split tree is never fused as a whole."""
    import gc
    import weakref

    import fvtransform.io._mapped as mapped

    alive: list[weakref.ref[torch.Tensor]] = []
    most = [0]
    real_cat = torch.cat

    def cat(tensors: Any, dim: int = 0) -> torch.Tensor:
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        out = real_cat(tensors, dim=dim)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(mapped.torch, "cat", cat)
    tree = fvt.load(hunyuan["root"] / "transformer")  # the diffusers layout, mapped lazily
    key_map = original_key_map(hunyuan["root"] / "hy_original.safetensors", hunyuan["root"] / "transformer")
    assert key_map is not None
    fvt.save(tree, tmp_path / "original.safetensors", rename=key_map.inverse())
    monkeypatch.undo()
    assert len(alive) >= 8 and most[0] == 0  # every fused key was made, and each was gone before the next
    _equal(load_file(tmp_path / "original.safetensors"), hunyuan["original"])
    with pytest.raises(E.UsageError, match=r"save\(\.\.\., rename=\) writes one file; for shards call"):
        fvt.save(tree, tmp_path / "shards", max_shard_size="1MB", rename=key_map.inverse())
