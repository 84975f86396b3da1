"""What a LoRA file or PEFT config may claim: peft's module selection, DoRA flags, ambiguous alphas, bounds.

Complements tests/test_attack_lora.py (the outside findings) with the accepted cases, the strict=False
reports, and the decisions taken for the findings that were not filed.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fvtransform as fvt
from fvtransform.errors import FormatError, UsageError
from fvtransform.io._atomic import atomic_file

W = torch.zeros(4, 3)


def _peft(path: Path, cfg: dict, module: str = "l", magnitude: bool = False) -> Path:
    path.mkdir()
    t = {f"base_model.model.{module}.lora_A.weight": torch.ones(2, 3), f"base_model.model.{module}.lora_B.weight": torch.ones(4, 2)}
    if magnitude:
        t[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(4)
    save_file(t, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **cfg}))
    return path


@pytest.mark.parametrize("module, cfg", [
    ("blocks.0.attn.q", {"target_modules": ".*attn\\.q"}),
    ("blocks.0.attn.q", {"target_modules": "all-linear"}),
    ("blocks.0.attn.q", {"target_modules": ["q"], "exclude_modules": ["k"]}),
    ("blocks.0.attn.q", {"target_modules": ["q"], "exclude_modules": ".*k"}),
    ("blocks.0.attn.q", {"target_modules": ["attn.q"], "layers_to_transform": [0, 2], "layers_pattern": "blocks"}),
    ("model.blocks.3.q", {"target_modules": ["q"], "layers_to_transform": 3}),  # no pattern: the first index after a segment
    ("blocks.0.attn.q", {"target_modules": ".*q", "layers_to_transform": [5]}),  # peft: layers only with a list of targets
], ids=["regex", "all-linear", "exclude-other", "exclude-regex-other", "layer-listed", "layer-no-pattern", "layers-ignored-for-regex"])
def test_peft_configs_that_target_the_module_load(tmp_path, module, cfg):
    folder = _peft(tmp_path / "a", cfg, module)
    a = fvt.lora.load(folder, base=fvt.ParamTree({module + ".weight": W}))
    assert list(a) == [module + ".weight"] and a[module + ".weight"].scale == 1.0


@pytest.mark.parametrize("module, cfg, match", [
    ("blocks.0.attn.q", {"target_modules": ["k", "v"]}, r"'target_modules' \(\['k', 'v'\]\) does not match 'blocks.0.attn.q'"),
    ("blocks.0.attn.q", {"target_modules": ["q"], "exclude_modules": "blocks\\.0\\..*"}, r"'exclude_modules' .* excludes 'blocks.0.attn.q'"),
    ("blocks.0.attn.q", {"target_modules": ["q"], "layers_to_transform": [0]}, r"'layers_to_transform' \[0\] .*layer None"),
    ("blocks.1.attn.q", {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": ["layers", "blocks"]},
     r"'layers_to_transform' \[0\] .*'blocks.1.attn.q' \(layer 1\)"),
], ids=["list-misses", "exclude-regex", "no-segment-before-index", "other-layer"])
def test_peft_configs_that_do_not_target_the_module_are_refused_naming_config_and_key(tmp_path, module, cfg, match):
    folder = _peft(tmp_path / "a", cfg, module)
    with pytest.raises(FormatError, match=match) as e:
        fvt.lora.load(folder, base=fvt.ParamTree({module + ".weight": W}))
    assert "adapter_config.json" in str(e.value) and f"base_model.model.{module}.lora_A.weight" in str(e.value)


def test_strict_false_skips_untargeted_modules_with_the_reason(tmp_path):
    folder = _peft(tmp_path / "a", {"target_modules": ["k"]})
    adapter = fvt.lora.load(folder, base=fvt.ParamTree({"l.weight": W}), strict=False)
    assert len(adapter) == 0
    assert any("does not match 'l'" in why for _, why in adapter.report.skipped)


def test_a_hostile_target_regex_is_matched_in_bounded_time(tmp_path):
    import time

    long = "l" * 60
    folder = _peft(tmp_path / "a", {"target_modules": "(l|l)" * 45 + "x"}, long)
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="does not match"):
        fvt.lora.load(folder, base=fvt.ParamTree({long + ".weight": W}))
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("cfg, magnitude, match", [
    ({"use_dora": False}, True, r"DoRA magnitude .*lora_magnitude_vector', but 'use_dora' is not true"),
    ({}, True, r"'use_dora' is not true"),
    ({"use_dora": "yes"}, False, r"'use_dora' must be true or false"),
    ({"peft_type": "LOKR"}, False, r"'peft_type' is 'LOKR'"),
])
def test_dora_and_type_flags_that_contradict_the_file_are_refused(tmp_path, cfg, magnitude, match):
    folder = _peft(tmp_path / "a", cfg, magnitude=magnitude)
    with pytest.raises(FormatError, match=match):
        fvt.lora.load(folder, base=fvt.ParamTree({"l.weight": W}))


def test_peft_dora_with_its_magnitude_loads(tmp_path):
    folder = _peft(tmp_path / "a", {"use_dora": True}, magnitude=True)
    d = fvt.lora.load(folder, base=fvt.ParamTree({"l.weight": W}))["l.weight"]
    assert d.magnitude is not None and d.dora_eps == 0.0


def test_kohya_dora_saved_as_peft_keeps_its_eps_in_fvtransform_metadata(tmp_path):
    from fvtransform.io._header import read_header

    a = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5, None, torch.ones(4), 1e-7)})
    path = fvt.lora.save(a, tmp_path / "p", format="peft")
    assert json.loads(read_header(path).metadata["fvt.dora_eps"]) == {"l.weight": 1e-7}
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_dora"] is True
    assert fvt.lora.load(tmp_path / "p", base=fvt.ParamTree({"l.weight": W}))["l.weight"].dora_eps == 1e-7


def test_a_dora_eps_out_of_range_in_the_header_is_refused(tmp_path):
    a = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5, None, torch.ones(4), 1e-7)})
    path = fvt.lora.save(a, tmp_path / "p", format="peft")
    from safetensors.torch import load_file

    save_file(load_file(str(path)), str(path), metadata={"fvt.scales": '{"l.weight": 0.5}', "fvt.dora_eps": '{"l.weight": 5.0}'})
    with pytest.raises(FormatError, match=r"header 'fvt.dora_eps'\['l.weight'\]: DoRA eps 5.0 is out of range"):
        fvt.lora.load(tmp_path / "p", base=fvt.ParamTree({"l.weight": W}))


def test_a_partly_dora_adapter_is_not_saved_as_peft(tmp_path):
    low = fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 1.0)
    a = fvt.lora.LoraAdapter({"l.weight": low, "m.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 1.0, None, torch.ones(4))})
    with pytest.raises(UsageError, match=r"one use_dora for all modules.*\['m.weight'\] are DoRA.*save as 'kohya'"):
        fvt.lora.save(a, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_kohya_alpha_zero_is_refused_but_an_own_file_with_scale_zero_reads_back(tmp_path):
    p = tmp_path / "k.safetensors"
    save_file({"lora_unet_l.lora_down.weight": torch.ones(2, 3), "lora_unet_l.lora_up.weight": torch.ones(4, 2),
               "lora_unet_l.alpha": torch.tensor(0.0)}, str(p))
    with pytest.raises(FormatError, match=r"k.safetensors: 'lora_unet_l.alpha' is 0: sd-scripts .* diffusers and ComfyUI as scale 0"):
        fvt.lora.load(p, base=fvt.ParamTree({"l.weight": W}))
    zero = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.0)})
    out = fvt.lora.save(zero, tmp_path / "own.safetensors", format="kohya")
    assert fvt.lora.load(out, base=fvt.ParamTree({"l.weight": W}))["l.weight"].scale == 0.0


@pytest.mark.parametrize("rank, ok", [(torch.tensor(2.0), True), (torch.tensor([2], dtype=torch.int32), True), (torch.tensor(2.5), False)])
def test_fastvideo_lora_rank_must_be_whole(tmp_path, rank, ok):
    p = tmp_path / "fv.safetensors"
    save_file({"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.ones(4, 2), "l.lora_rank": rank}, str(p))
    if ok:
        assert fvt.lora.load(p, base=fvt.ParamTree({"l.weight": W}), format="fastvideo").ranks == {"l.weight": 2}
    else:
        with pytest.raises(FormatError, match=r"'l.lora_rank' is 2.5; a LoRA rank is a whole number"):
            fvt.lora.load(p, base=fvt.ParamTree({"l.weight": W}), format="fastvideo")


@pytest.mark.parametrize("alpha", [1e308, -1e7])
def test_a_scale_beyond_any_trained_lora_is_refused(tmp_path, alpha):
    p = tmp_path / "k.safetensors"
    save_file({"lora_unet_l.lora_down.weight": torch.ones(2, 3), "lora_unet_l.lora_up.weight": torch.ones(4, 2),
               "lora_unet_l.alpha": torch.tensor(alpha, dtype=torch.float64)}, str(p))
    with pytest.raises(FormatError, match=r"'lora_unet_l.alpha': alpha .* with rank 2 gives scale .* beyond 1e\+06"):
        fvt.lora.load(p, base=fvt.ParamTree({"l.weight": W}))


@pytest.mark.parametrize("rank", [0, -1, True, 2.0, (1 << 16) + 1, 10**9])
def test_pad_rank_out_of_range_is_refused_before_allocating(rank):
    a = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 1.0)})
    with pytest.raises(UsageError, match=r"pad_rank: rank must be a whole number from 1 to 65536"):
        fvt.lora.pad_rank(a, rank)
    with pytest.raises(UsageError, match=r"factors: rank must be a whole number from 1 to 65536"):
        fvt.lora.factors(a, rank=rank)


def test_pad_rank_may_pad_a_small_target_past_its_dims_for_a_common_rank():
    a = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(1, 1), torch.ones(1, 1), 1.0)})
    assert fvt.lora.pad_rank(a, 8)["l.weight"].rank == 8


def test_a_dora_merged_with_another_adapter_is_refused_before_any_output_exists(tmp_path):
    base = tmp_path / "base.safetensors"
    fvt.save(fvt.ParamTree({"l.weight": torch.ones(4, 3)}), base)
    dora = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 1.0, None, torch.ones(4))})
    plain = fvt.lora.LoraAdapter({"l.weight": fvt.lora.LowRank(torch.ones(2, 3), torch.ones(4, 2), 1.0)})
    out = tmp_path / "new" / "deeper"
    with pytest.raises(UsageError, match=r"base.safetensors: 'l.weight': 2 adapters target this weight and one is DoRA"):
        fvt.lora.merge_checkpoint(base, [(dora, 1.0), (plain, 1.0)], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def test_a_failed_write_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="boom"), atomic_file(tmp_path / "kept" / "a" / "b" / "f.bin"):
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    # a folder that gained a user's file meanwhile is not removed
    with pytest.raises(RuntimeError, match="boom"), atomic_file(tmp_path / "x" / "f.bin"):
        (tmp_path / "x" / "user.txt").write_text("mine")
        raise RuntimeError("boom")
    assert (tmp_path / "x" / "user.txt").read_text() == "mine"


def test_a_peft_config_reference_check_against_peft_for_a_regex_target(tmp_path):
    """Oracle: peft 0.21 itself adapts exactly what the regex selects; the merges agree."""
    peft = pytest.importorskip("peft")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"q": torch.nn.Linear(3, 4, bias=False),
                                                                    "k": torch.nn.Linear(3, 4, bias=False)})])

    g = torch.Generator().manual_seed(0)
    m = M()
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g)
    tree = fvt.ParamTree({k: v.detach().clone() for k, v in m.state_dict().items()})
    folder = tmp_path / "a"
    folder.mkdir()
    save_file({"base_model.model.blocks.0.q.lora_A.weight": torch.randn(2, 3, generator=g),
               "base_model.model.blocks.0.q.lora_B.weight": torch.randn(4, 2, generator=g)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": r".*\.q"}))
    ours = fvt.lora.merge(tree, fvt.lora.load(folder, base=tree))
    theirs = peft.PeftModel.from_pretrained(m, str(folder)).merge_and_unload().state_dict()
    for k in tree:
        assert torch.allclose(ours[k], theirs[k], atol=1e-6), k
    assert not torch.equal(ours["blocks.0.q.weight"], tree["blocks.0.q.weight"])
    assert math.isfinite(float(ours["blocks.0.q.weight"].sum()))
