"""LoRA file formats: the format table, the layouts real tools write, strictness and hostile configs.

The key layouts and merge formulas of tools that cannot run here are encoded from their source
(read at the commits named in tests/fixtures/lora/README.md): VideoX-Fun ``merge_lora``
(``lora_unet__`` names, ``alpha / r`` or 1 without alpha), FastVideo ``merge_lora.py``
(``W + (B @ A) * alpha / lora_rank`` in float32, rounded once), ComfyUI (``diff`` adds the
tensor times the strength; Wan ``modulation`` is ``scale_shift_table``).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.lora._format_table import BY_NAME, FORMATS, TABLE
from fvtransform.lora._patterns import check_pattern, compile_patterns, pattern_value


def _wan_base() -> fvt.ParamTree:
    """A two-block tree with diffusers' Wan names (the shapes do not matter for names)."""
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for i in range(2):
        for a in ("attn1", "attn2"):
            for m in ("to_q", "to_k", "to_v", "to_out.0"):
                t[f"blocks.{i}.{a}.{m}.weight"] = torch.randn(8, 8, generator=g)
                t[f"blocks.{i}.{a}.{m}.bias"] = torch.randn(8, generator=g)
        t[f"blocks.{i}.ffn.net.0.proj.weight"] = torch.randn(16, 8, generator=g)
        t[f"blocks.{i}.ffn.net.2.weight"] = torch.randn(8, 16, generator=g)
        t[f"blocks.{i}.scale_shift_table"] = torch.randn(1, 6, 8, generator=g)
    t["scale_shift_table"] = torch.randn(1, 2, 8, generator=g)
    t["proj_out.weight"] = torch.randn(4, 8, generator=g)
    return fvt.ParamTree(t)


def _ab(rank: int = 2, out: int = 8, inp: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def _file(tmp_path, tensors: dict[str, torch.Tensor], name: str = "lora.safetensors", metadata: dict | None = None):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------- the table
def test_every_format_is_one_frozen_table_entry_and_formats_lists_them():
    assert FORMATS == tuple(f.name for f in TABLE)
    assert {"peft", "diffusers", "diffusers-model", "kohya", "comfy", "plain", "fastvideo"} == set(FORMATS)
    assert fvt.lora.FORMATS == FORMATS
    import attrs

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        BY_NAME["peft"].name = "x"  # type: ignore[misc]
    writable = {f.name for f in TABLE if f.write_roles}
    assert writable == {"peft", "diffusers", "diffusers-model", "kohya", "comfy"}


def test_save_refuses_a_format_that_is_only_read(tmp_path):
    a = fvt.lora.LoraAdapter({"w.weight": fvt.lora.LowRank(*_ab(), scale=1.0)})
    with pytest.raises(UsageError, match=r"unknown LoRA format 'fastvideo'; write one of"):
        fvt.lora.save(a, tmp_path / "x.safetensors", format="fastvideo")


# ----------------------------------------------------------------------------- item 1: diffusers model-level files
def test_model_level_diffusers_file_reads_its_unprefixed_header(tmp_path):
    base = _wan_base()
    A, B = _ab(4)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {}})}
    path = _file(tmp_path, {"blocks.0.attn1.to_q.lora_A.weight": A, "blocks.0.attn1.to_q.lora_B.weight": B}, metadata=meta)
    adapter = fvt.lora.load(path, base=base)
    assert adapter.format == "diffusers-model"
    assert adapter["blocks.0.attn1.to_q.weight"].scale == 2.0  # was 1.0 as format 'plain', silently


def test_diffusers_model_writer_round_trips(tmp_path):
    base = _wan_base()
    a = fvt.lora.LoraAdapter({"blocks.0.attn1.to_q.weight": fvt.lora.LowRank(*_ab(4), scale=0.75),
                              "blocks.1.attn2.to_v.weight": fvt.lora.LowRank(*_ab(2, seed=2), scale=3.0)})
    path = fvt.lora.save(a, tmp_path / "m", format="diffusers-model")
    assert path.name == "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_B.weight",
                                 "blocks.1.attn2.to_v.lora_A.weight", "blocks.1.attn2.to_v.lora_B.weight"}
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["r"] in (2, 4) and not any(k.startswith("transformer.") for k in header)
    back = fvt.lora.load(path, base=base)
    assert back.format == "diffusers-model" and back.scales == a.scales


# ----------------------------------------------------------------------------- item 4: VideoX-Fun names
def test_videox_fun_double_underscore_names_resolve_with_its_scale():
    base = _wan_base()
    A, B = _ab(4)
    A2, B2 = _ab(2, 16, 8, seed=3)
    sd = {
        "lora_unet__blocks_0_self_attn_q.lora_down.weight": A, "lora_unet__blocks_0_self_attn_q.lora_up.weight": B,
        "lora_unet__blocks_0_self_attn_q.alpha": torch.tensor(2.0),
        "lora_unet__blocks_1_ffn_0.lora_down.weight": A2, "lora_unet__blocks_1_ffn_0.lora_up.weight": B2,
    }
    adapter = fvt.lora.load(sd, base=base)
    assert adapter.format == "kohya"
    merged = fvt.lora.merge(base, adapter)
    # VideoX-Fun merge_lora: W += multiplier * (alpha / up.shape[1] if alpha else 1.0) * up @ down (float32 here)
    want_q = base["blocks.0.attn1.to_q.weight"] + (2.0 / 4) * (B @ A)
    want_f = base["blocks.1.ffn.net.0.proj.weight"] + 1.0 * (B2 @ A2)
    assert torch.allclose(merged["blocks.0.attn1.to_q.weight"], want_q, rtol=0, atol=4e-6)
    assert torch.allclose(merged["blocks.1.ffn.net.0.proj.weight"], want_f, rtol=0, atol=4e-6)


# ----------------------------------------------------------------------------- item 5: modulation deltas
@pytest.mark.parametrize("suffix", [".modulation.diff", ".diff_m"])
def test_modulation_deltas_target_scale_shift_table(suffix):
    # ComfyUI: diffusion_model.<param>.diff patches that parameter; lightx2v's extractor writes <module>.diff_m
    # for <module>.modulation (and ComfyUI-WanVideoWrapper reads it so)
    base = _wan_base()
    g = torch.Generator().manual_seed(5)
    d_block, d_head = torch.randn(1, 6, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    sd = {f"diffusion_model.blocks.1{suffix}": d_block, f"diffusion_model.head{suffix}": d_head}
    adapter = fvt.lora.load(sd, base=base)
    assert set(adapter) == {"blocks.1.scale_shift_table", "scale_shift_table"}
    merged = fvt.lora.merge(base, adapter, scale=0.5)
    # ComfyUI's "diff" patch: weight += strength * diff
    assert torch.equal(merged["blocks.1.scale_shift_table"], base["blocks.1.scale_shift_table"] + 0.5 * d_block)
    assert torch.equal(merged["scale_shift_table"], base["scale_shift_table"] + 0.5 * d_head)


def test_modulation_delta_written_as_comfy_reads_back(tmp_path):
    base = _wan_base()
    d = torch.randn(1, 6, 8)
    a = fvt.lora.LoraAdapter({"blocks.0.scale_shift_table": fvt.lora.FullDelta(d)})
    path = fvt.lora.save(a, tmp_path / "c.safetensors", format="comfy")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["diffusion_model.blocks.0.modulation.diff"]
    assert torch.equal(fvt.lora.load(path, base=base)["blocks.0.scale_shift_table"].D, d)


def test_diff_m_names_the_module_not_the_modulation():
    with pytest.raises(KeyMismatchError, match=r"diffusion_model.blocks.1.modulation.diff_m: no base module matches"):
        fvt.lora.load({"diffusion_model.blocks.1.modulation.diff_m": torch.zeros(1, 6, 8)}, base=_wan_base())


def test_modulation_delta_of_the_wrong_shape_is_refused():
    with pytest.raises(ShapeMismatchError, match=r"scale_shift_table.*does not fit"):
        fvt.lora.load({"diffusion_model.blocks.1.modulation.diff": torch.zeros(1, 5, 8)}, base=_wan_base())


# ----------------------------------------------------------------------------- item 6: FastVideo
def _fastvideo(rank: int = 4, alpha: float = 8.0, stored_rank: int | None = None) -> dict[str, torch.Tensor]:
    A, B = _ab(rank)
    m = "blocks.0.attn2.to_k"
    return {f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B,
            f"{m}.lora_rank": torch.tensor([stored_rank or rank], dtype=torch.int32),
            f"{m}.lora_alpha": torch.tensor([alpha], dtype=torch.float32)}


def test_fastvideo_files_load_strictly_and_merge_as_its_merge_script_in_bf16():
    base = fvt.cast(_wan_base(), torch.bfloat16)
    sd = _fastvideo()
    adapter = fvt.lora.load(sd, base=base)
    assert adapter.format == "fastvideo" and adapter["blocks.0.attn2.to_k.weight"].scale == 2.0
    ours = fvt.lora.merge(base, adapter)["blocks.0.attn2.to_k.weight"]
    # FastVideo scripts/lora_extraction/merge_lora.py: float32 W + (B @ A) * (alpha / rank), then the base dtype
    w = base["blocks.0.attn2.to_k.weight"]
    A, B = sd["blocks.0.attn2.to_k.lora_A.weight"], sd["blocks.0.attn2.to_k.lora_B.weight"]
    theirs = (w.float() + (B @ A) * (8.0 / 4)).to(torch.bfloat16)
    ulp = torch.finfo(torch.bfloat16).eps * theirs.float().abs().clamp_min(1e-30)
    assert bool(((ours.float() - theirs.float()).abs() <= ulp).all())  # within one bf16 ulp (fp32 sums rounded once)


def test_fastvideo_rank_tensor_that_disagrees_is_refused():
    with pytest.raises(ShapeMismatchError, match=r"'blocks.0.attn2.to_k.lora_rank' says rank 3, but the factors have rank 4"):
        fvt.lora.load(_fastvideo(stored_rank=3), base=_wan_base())


@pytest.mark.parametrize("alpha", [0.0, 2.5])
def test_fastvideo_alpha_its_two_mergers_disagree_on_is_refused(alpha):
    with pytest.raises(FormatError, match=r"lora_alpha' is .*whole, non-zero alpha"):
        fvt.lora.load(_fastvideo(alpha=alpha), base=_wan_base())


# ----------------------------------------------------------------------------- item 7: modules_to_save
def test_peft_modules_to_save_replace_merge_and_restore(tmp_path):
    base = _wan_base()
    A, B = _ab(2)
    new = torch.randn(4, 8)
    folder = tmp_path / "a"
    folder.mkdir()
    _file(folder, {"base_model.model.blocks.0.attn1.to_q.lora_A.weight": A, "base_model.model.blocks.0.attn1.to_q.lora_B.weight": B,
                   "base_model.model.proj_out.weight": new}, name="adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "modules_to_save": ["proj_out"]}))
    adapter = fvt.lora.load(folder, base=base)
    assert isinstance(adapter["proj_out.weight"], fvt.lora.FullDelta) and adapter["proj_out.weight"].replaces
    merged, record = fvt.lora.merge_with_record(base, adapter)
    assert torch.equal(merged["proj_out.weight"], new)
    assert fvt.lora.restore(merged, record) == base
    with pytest.raises(UsageError, match=r"'proj_out.weight': a full replacement .* scale 1, not 0.5"):
        fvt.lora.merge(base, adapter, scale=0.5)
    with pytest.raises(UsageError, match=r"'proj_out.weight': full-replacement \(modules_to_save\) merges are undone with the record"):
        fvt.lora.unmerge(merged, adapter)
    # written back as peft writes it
    path = fvt.lora.save(adapter, tmp_path / "out", format="peft")
    cfg = json.loads((path.parent / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["proj_out"]
    assert torch.equal(fvt.lora.load(path.parent, base=base)["proj_out.weight"].D, new)
    with pytest.raises(UsageError, match=r"full replacement \(modules_to_save\), which format 'kohya' cannot hold"):
        fvt.lora.save(adapter, tmp_path / "k.safetensors", format="kohya")


def test_a_full_tensor_without_modules_to_save_is_not_a_lora_key(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    A, B = _ab(2)
    _file(folder, {"base_model.model.blocks.0.attn1.to_q.lora_A.weight": A, "base_model.model.blocks.0.attn1.to_q.lora_B.weight": B,
                   "base_model.model.proj_out.weight": torch.zeros(4, 8)}, name="adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    with pytest.raises(KeyMismatchError, match=r"base_model.model.proj_out.weight: not a LoRA key"):
        fvt.lora.load(folder, base=_wan_base())


# ----------------------------------------------------------------------------- item 8: kohya writes original Wan names
def test_kohya_output_for_wan_uses_original_names(tmp_path):
    base = _wan_base()
    a = fvt.lora.LoraAdapter({"blocks.0.attn1.to_q.weight": fvt.lora.LowRank(*_ab(2), scale=0.5),
                              "blocks.1.ffn.net.0.proj.weight": fvt.lora.LowRank(*_ab(2, 16, 8), scale=1.0),
                              "blocks.0.attn2.to_out.0.bias": fvt.lora.FullDelta(torch.ones(8))})
    path = fvt.lora.save(a, tmp_path / "k.safetensors", format="kohya")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight",
                    "lora_unet_blocks_0_self_attn_q.alpha", "lora_unet_blocks_1_ffn_0.lora_down.weight",
                    "lora_unet_blocks_1_ffn_0.lora_up.weight", "lora_unet_blocks_1_ffn_0.alpha",
                    "lora_unet_blocks_0_cross_attn_o.diff_b"}
    back = fvt.lora.load(path, base=base)
    assert set(back) == set(a) and back.scales == a.scales


# ----------------------------------------------------------------------------- S1: one target given twice
@pytest.mark.parametrize("first,second", [
    ("blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_A.default.weight"),
    ("blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_down.weight"),
])
def test_one_factor_given_twice_is_refused_naming_both(first, second):
    A, B = _ab(2)
    sd = {first: A, second: A * 2, "blocks.0.attn1.to_q.lora_B.weight": B}
    with pytest.raises(KeyMismatchError, match=rf"keys '{re.escape(first)}' and '{re.escape(second)}' both give the A"):
        fvt.lora.load(sd, base=_wan_base())


@pytest.mark.parametrize("one,two", [
    ("lora_unet_blocks_0_self_attn_q", "lora_transformer_blocks_0_self_attn_q"),
    ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_attn1_to_q"),
    ("lora_unet_blocks_0_self_attn_q", "lora_unet__blocks_0_self_attn_q"),
])
def test_two_kohya_names_for_one_module_are_refused_naming_both(one, two):
    A, B = _ab(2)
    sd = {f"{one}.lora_down.weight": A, f"{one}.lora_up.weight": B, f"{two}.lora_down.weight": A, f"{two}.lora_up.weight": B}
    with pytest.raises(KeyMismatchError, match=rf"keys '{one}\.lora_down\.weight' and '{two}\.lora_down\.weight' both (give the A|target)"):
        fvt.lora.load(sd, base=_wan_base())


def test_comfy_original_and_diffusers_names_for_one_module_are_refused():
    A, B = _ab(2)
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": A, "diffusion_model.blocks.0.self_attn.q.lora_B.weight": B,
          "diffusion_model.blocks.0.attn1.to_q.lora_A.weight": A, "diffusion_model.blocks.0.attn1.to_q.lora_B.weight": B}
    with pytest.raises(KeyMismatchError, match=r"both target 'blocks.0.attn1.to_q.weight'"):
        fvt.lora.load(sd, base=_wan_base())


# ----------------------------------------------------------------------------- S2: PEFT patterns, bounded
_NAMES = ["blocks.1.attn1.to_q", "blocks.0.attn1.to_k", "blocks.10.ffn.net.0.proj", "x.q", "q", "blocks.0.attn2.to_v",
          "ab.c", "abc", "blocks_0", "blocks.0", "a.b.c.d"]
_PATTERNS = [r"blocks.1.attn1.to_q", r"^blocks\.0\..*", r"to_(q|k)", r"attn[12]\.to_[qkv]", r"blocks\.\d+\.ffn.*", r".*",
             r"q", r"net\.0\.proj", r"(a|b)*c?", r"blocks.{1,3}0", r"[^.]+\.to_q", r"\w+", r"b.c$", r"(?:x|a)\.", r"a+?b"]


@pytest.mark.parametrize("pattern", _PATTERNS)
def test_patterns_match_exactly_as_peft_get_pattern_key(pattern):
    compiled = compile_patterns({pattern: 1}, "cfg")
    for name in _NAMES:
        want = bool(re.match(rf"(.*\.)?({pattern})$", name))  # peft.utils.other.get_pattern_key
        assert (pattern_value(name, compiled, 0) == 1) == want, (pattern, name)


def test_the_first_matching_pattern_wins_as_in_peft():
    compiled = compile_patterns({"to_q": 2, r"blocks\.1\..*": 3}, "cfg")
    assert pattern_value("blocks.1.attn1.to_q", compiled, 8) == 2
    assert pattern_value("blocks.1.attn1.to_k", compiled, 8) == 3
    assert pattern_value("blocks.0.attn1.to_k", compiled, 8) == 8


@pytest.mark.parametrize("pattern", ["(a|a)" * 40 + "b", "(a+)+b", "(.*)*x", ".*" * 40 + "x", "(a*)*" * 20 + "b", "((a|aa)+)+b"])
def test_catastrophic_patterns_finish_fast(tmp_path, pattern):
    folder = tmp_path / "p"
    folder.mkdir()
    name = "a" * 40  # a module name the patterns nearly match
    base = fvt.ParamTree({f"{name}.weight": torch.zeros(4, 3)})
    _file(folder, {f"base_model.model.{name}.lora_A.weight": torch.ones(2, 3), f"base_model.model.{name}.lora_B.weight": torch.ones(4, 2)},
          name="adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "rank_pattern": {pattern: 7}}))
    t0 = time.perf_counter()
    adapter = fvt.lora.load(folder, base=base)
    assert time.perf_counter() - t0 < 1.0
    assert adapter[f"{name}.weight"].scale == 2.0  # no pattern matches: r=2, alpha=4


@pytest.mark.parametrize("pattern,why", [(r"(a)\1", "groupref"), (r"(?=a)b", "assert"), (r"(?i)a", "flags"), ("a" * 300, "longer than"),
                                         (r"\bq", "uses at"), ("a{1000}", "repeats more than"), ("(", "not a valid")])
def test_unsupported_patterns_are_refused(pattern, why):
    with pytest.raises(FormatError, match=re.escape(why)):
        check_pattern(pattern, "cfg")


# ----------------------------------------------------------------------------- S3 (more in tests/_corpus_lora_formats.py)
def test_rank_zero_lora_is_refused():
    sd = {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(0, 8), "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 0)}
    with pytest.raises(ShapeMismatchError, match=r"'blocks.0.attn1.to_q.lora_A.weight': rank 0"):
        fvt.lora.load(sd, base=_wan_base())


def test_lycoris_keys_reach_the_lycoris_reader():
    sd = {"lora_unet_blocks_0_self_attn_q.hada_w1_a": torch.zeros(8, 2), "lora_unet_blocks_0_self_attn_q.hada_w1_b": torch.zeros(2, 8)}
    with pytest.raises(FormatError, match=r"<mapping>: 'lora_unet_blocks_0_self_attn_q.hada_w1_a': LoHa module 'blocks.0.attn1.to_q' lacks \['hada_w2_a', 'hada_w2_b'\]"):
        fvt.lora.load(sd, base=_wan_base())


# ----------------------------------------------------------------------------- item 9: inspect's exit code
def test_inspect_with_a_base_that_matches_nothing_exits_1(tmp_path, capsys):
    from fvtransform.cli._main import main

    A, B = _ab(2)
    lora = _file(tmp_path, {"blocks.0.attn1.to_q.lora_A.weight": A, "blocks.0.attn1.to_q.lora_B.weight": B})
    fvt.save(_wan_base(), tmp_path / "base.safetensors")
    fvt.save(fvt.ParamTree({"other.weight": torch.zeros(3, 3)}), tmp_path / "other.safetensors")
    assert main(["inspect", str(lora), "--base", str(tmp_path / "base.safetensors")]) == 0
    assert main(["--json", "inspect", str(lora), "--base", str(tmp_path / "other.safetensors")]) == 1
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["key"] for s in doc["skipped"]] == ["blocks.0.attn1.to_q.lora_A.weight", "blocks.0.attn1.to_q.lora_B.weight"]


def test_convert_lora_to_kohya_writes_wan_names(tmp_path, capsys):
    from fvtransform.cli._main import main

    A, B = _ab(2)
    lora = _file(tmp_path, {"transformer.blocks.1.attn2.to_v.lora_A.weight": A, "transformer.blocks.1.attn2.to_v.lora_B.weight": B})
    fvt.save(_wan_base(), tmp_path / "base.safetensors")
    assert main(["convert-lora", str(lora), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya", "--base", str(tmp_path / "base.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["lora_unet_blocks_1_cross_attn_v.alpha", "lora_unet_blocks_1_cross_attn_v.lora_down.weight",
                                    "lora_unet_blocks_1_cross_attn_v.lora_up.weight"]


def test_modules_to_save_on_the_fly_uses_the_replacement():
    lin = torch.nn.Linear(3, 4)
    tree = fvt.ParamTree({"weight": torch.randn(4, 3), "bias": torch.randn(4)})
    new_w, new_b = torch.randn(4, 3), torch.randn(4)
    adapter = fvt.lora.LoraAdapter({"weight": fvt.lora.FullDelta(new_w, replaces=True), "bias": fvt.lora.FullDelta(new_b, replaces=True)})
    x = torch.randn(2, 3)
    assert torch.equal(fvt.lora.call(lin, tree, adapter, x), torch.nn.functional.linear(x, new_w, new_b))
    assert torch.equal(fvt.lora.call(lin, tree, adapter, x), fvt.call(lin, fvt.lora.merge(tree, adapter), x))
    with pytest.raises(UsageError, match=r"'weight': a full replacement .* at scale 1 \(found scale 0.5\)"):
        fvt.lora.call(lin, tree, [(adapter, 0.5)], x)


def test_merge_checkpoint_writes_modules_to_save_replacements(tmp_path):
    base = _wan_base()
    fvt.save(base, tmp_path / "base.safetensors")
    adapter = fvt.lora.LoraAdapter({"proj_out.weight": fvt.lora.FullDelta(torch.randn(4, 8), replaces=True),
                                    "blocks.0.attn1.to_q.weight": fvt.lora.LowRank(*_ab(2), scale=0.5),
                                    "blocks.1.scale_shift_table": fvt.lora.FullDelta(torch.randn(1, 6, 8))})
    out = fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "merged.safetensors")
    assert fvt.load(out) == fvt.lora.merge(base, adapter)


def test_replacements_are_refused_where_a_scale_or_factors_are_needed():
    adapter = fvt.lora.LoraAdapter({"proj_out.weight": fvt.lora.FullDelta(torch.zeros(4, 8), replaces=True)})
    with pytest.raises(UsageError, match=r"'proj_out.weight': a replacing FullDelta \(modules_to_save\) target does not combine linearly"):
        fvt.lora.combine([(adapter, 1.0)])
    with pytest.raises(UsageError, match=r"'proj_out.weight': a replacing FullDelta has no scale to change"):
        fvt.lora.scale_adapter(adapter, 2.0)
    with pytest.raises(UsageError, match=r"'proj_out.weight': factors\(\) takes plain low-rank targets"):
        fvt.lora.factors(adapter)
