"""Findings of an outside test of LoRA loading and merging (branch attack-lora).

Each test asserts the documented / reference behaviour and fails on the code as found.
"""
import pytest
import torch
from safetensors.torch import save_file

import fvtransform as fvt
from fvtransform.errors import FormatError, FvTransformError
from fvtransform.models import init_weights

Q = "blocks.0.attn1.to_q.weight"
HK = "lora_unet_blocks_0_self_attn_q"


@pytest.fixture(scope="module")
def tree():
    model = fvt.build("fvt-video-dit")
    return fvt.ParamTree(init_weights(model, seed=0))


def _delta(tree, adapter):
    merged = fvt.lora.merge(tree, adapter)
    return merged[Q].double() - tree[Q].double()


def test_lokr_with_both_factors_decomposed_of_different_ranks_is_refused_as_ambiguous(tree, tmp_path):
    # ComfyUI (weight_adapter/lokr.py), Forge and kin: dim = w1_b.shape[0], then overridden by
    # w2_b.shape[0] when w2 is decomposed; scale = alpha / dim. Here w1 rank 1, w2 rank 2, alpha 2:
    # ComfyUI's scale is 2 / 2 = 1. fvtransform took w1's rank and merged twice the delta.
    # Adjusted by fix-lora: LyCORIS 4.1.3 itself divides by w1's rank (kernels/autograd/lokr.py
    # rank_scale: w1a.shape[1]; LokrModule.make_module_from_state_dict: lora_dim = w1a.size(1)), so
    # the two reference tools disagree here: refused (like alpha 0), naming file, key and both ranks.
    g = torch.Generator().manual_seed(0)
    w1a, w1b = torch.randn(4, 1, generator=g), torch.randn(1, 4, generator=g)
    w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 4, generator=g)
    p = tmp_path / "lokr.safetensors"
    save_file({HK + ".lokr_w1_a": w1a, HK + ".lokr_w1_b": w1b, HK + ".lokr_w2_a": w2a,
               HK + ".lokr_w2_b": w2b, HK + ".alpha": torch.tensor(2.0)}, str(p))
    with pytest.raises(FvTransformError, match=r"ranks 1 .*and 2 .*LyCORIS divides alpha by 1, ComfyUI by 2") as e:
        fvt.lora.load(str(p), base=tree)
    assert str(p) in str(e.value) and HK in str(e.value)


def test_lokr_with_both_factors_decomposed_of_equal_ranks_scales_by_that_rank(tree, tmp_path):
    # Equal ranks (what LyCORIS writes): LyCORIS and ComfyUI agree, scale = alpha / rank.
    g = torch.Generator().manual_seed(0)
    w1a, w1b = torch.randn(4, 2, generator=g), torch.randn(2, 4, generator=g)
    w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(2, 4, generator=g)
    p = tmp_path / "lokr.safetensors"
    save_file({HK + ".lokr_w1_a": w1a, HK + ".lokr_w1_b": w1b, HK + ".lokr_w2_a": w2a,
               HK + ".lokr_w2_b": w2b, HK + ".alpha": torch.tensor(3.0)}, str(p))
    adapter = fvt.lora.load(str(p), base=tree)
    expected = torch.kron(w1a @ w1b, w2a @ w2b).double() * (3.0 / 2)
    assert torch.allclose(_delta(tree, adapter), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_rank_zero_lycoris_factors_are_refused_like_rank_zero_lora(tree, tmp_path, kind):
    # docs/guides/lora.md: "a rank-0 factor ... [is an error] naming the file and key" on every format.
    # Plain LoRA obeys; LoHa / LoKr factors of rank 0 load as 'rank 0, scale 1.0' and inspect exits 0.
    if kind == "loha":
        t = {HK + ".hada_w1_a": torch.randn(16, 0), HK + ".hada_w1_b": torch.randn(0, 16),
             HK + ".hada_w2_a": torch.randn(16, 0), HK + ".hada_w2_b": torch.randn(0, 16)}
    else:
        t = {HK + ".lokr_w1": torch.randn(4, 4), HK + ".lokr_w2_a": torch.randn(4, 0),
             HK + ".lokr_w2_b": torch.randn(0, 4)}
    p = tmp_path / f"{kind}0.safetensors"
    save_file(t, str(p))
    with pytest.raises(FvTransformError) as e:
        fvt.lora.load(str(p), base=tree)
    assert str(p) in str(e.value) and HK in str(e.value)


def test_kohya_dora_converted_to_peft_merges_identically(tree, tmp_path):
    # convert-lora: "a round trip gives back the same adapter". A kohya file with dora_scale
    # converted to PEFT loads back with PEFT's DoRA eps (0) instead of the source's (float32 eps),
    # so the merged weight differs (by about one ulp) from merging the source file.
    g = torch.Generator().manual_seed(1)
    src = tmp_path / "dora.safetensors"
    save_file({HK + ".lora_down.weight": torch.randn(2, 16, generator=g),
               HK + ".lora_up.weight": torch.randn(16, 2, generator=g),
               HK + ".dora_scale": torch.rand(16, generator=g) + 0.5}, str(src))
    a = fvt.lora.load(str(src), base=tree)
    out = tmp_path / "dora-peft"
    fvt.lora.save(a, str(out), format="peft")
    b = fvt.lora.load(str(out), base=tree)
    assert torch.equal(fvt.lora.merge(tree, a)[Q], fvt.lora.merge(tree, b)[Q])


# --- PEFT folders whose adapter_config.json contradicts the weights -------------------------------

def _peft_folder(path, cfg, tensors):
    import json
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return str(path)


def _peft_tensors(with_magnitude=False):
    g = torch.Generator().manual_seed(3)
    t = {"base_model.model.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 16, generator=g),
         "base_model.model.blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 4, generator=g)}
    if with_magnitude:
        t["base_model.model.blocks.0.attn1.to_q.lora_magnitude_vector"] = torch.rand(16, generator=g) + 0.5
    return t


@pytest.mark.parametrize("extra, refusal", [
    ({"target_modules": ".*to_k"},                                 # a regex string that does not match to_q
     r"'target_modules' \(\.\*to_k\) does not match 'blocks\.0\.attn1\.to_q'"),
    ({"layers_to_transform": [1], "layers_pattern": "blocks"},     # the file's module is in block 0
     r"'layers_to_transform' \[1\] \(layers_pattern \['blocks'\]\) does not include 'blocks\.0\.attn1\.to_q' \(layer 0\)"),
    ({"peft_type": "LOHA"},                                        # LoRA keys under a LoHa config
     r"'peft_type' is 'LOHA', but the file holds LoRA \(lora_A/lora_B\) weights"),
], ids=["target_modules_regex_excludes_it", "layers_to_transform_excludes_it", "peft_type_loha"])
def test_peft_weights_the_config_does_not_target_are_refused(tree, tmp_path, extra, refusal):
    # PEFT does not adapt blocks.0.attn1.to_q under these configs, so its merge leaves the weight as it
    # is; merging the delta would be a silent other result. Strictness: an error naming the file and key.
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"], **extra}
    folder = _peft_folder(tmp_path / "lora", cfg, _peft_tensors())
    with pytest.raises(FormatError, match=r"lora/adapter_config\.json: " + refusal + r".*peft would"):
        fvt.lora.load(folder, base=tree)


def test_peft_exclude_modules_naming_the_only_module_is_refused(tree, tmp_path):
    # PEFT refuses this folder (NoMatchingPeftModuleError); merging the excluded module would be a silent other result.
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "exclude_modules": ["to_q"]}
    folder = _peft_folder(tmp_path / "lora", cfg, _peft_tensors())
    with pytest.raises(FormatError, match=r"adapter_config\.json: 'exclude_modules' \(\['to_q'\]\) excludes "
                       r"'blocks\.0\.attn1\.to_q', whose weights .* are in the file; peft would not load them"):
        fvt.lora.load(folder, base=tree)


def test_peft_use_dora_without_magnitude_is_not_silently_plain_lora(tree, tmp_path):
    # adapter_config.json says use_dora=true but the file holds no lora_magnitude_vector. PEFT then
    # keeps the magnitude it initialised (the base rows' norms), which is not plain LoRA; merging plain
    # LoRA would be a silent other result. Strictness: an error naming the missing magnitude.
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"], "use_dora": True}
    folder = _peft_folder(tmp_path / "lora", cfg, _peft_tensors())
    with pytest.raises(FormatError, match=r"adapter_config\.json: 'use_dora' is true, but the file has no "
                       r"lora_magnitude_vector for 'blocks\.0\.attn1\.to_q'"):
        fvt.lora.load(folder, base=tree)


def test_a_refused_merge_leaves_no_output_folder_behind(tree, tmp_path):
    # `fvtransform merge` that fails (here: the merged weight overflows to Inf) exits 2 as documented,
    # but leaves an empty output folder it created. Writers promise "the old data stays and no
    # temporary is left": a refused merge should leave the destination as it was (absent).
    import os
    import subprocess
    import sys
    base = tmp_path / "base.safetensors"
    fvt.save(tree, str(base))
    lora = tmp_path / "k.safetensors"
    save_file({HK + ".lora_down.weight": torch.randn(2, 16), HK + ".lora_up.weight": torch.randn(16, 2)},
              str(lora))
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "fvtransform", "merge", str(base), f"{lora}:1e308",
                           "-o", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert not out.exists(), f"left behind: {out} ({os.listdir(out)})"


def test_pad_rank_to_an_absurd_rank_is_a_typed_error_before_allocating(tree):
    # pad_rank(adapter, 10**9) on a 16x16 target tries to allocate ~64 GB and fails with a raw
    # allocator RuntimeError (or, with overcommit, may take the memory). A rank beyond anything a
    # LoRA can use (the config reader caps ranks at 65536) should be refused up front.
    adapter = fvt.lora.random_adapter(tree, targets=Q, rank=2)
    with pytest.raises(FvTransformError, match=r"pad_rank: rank must be a whole number from 1 to 65536 .*found 1000000000"):
        fvt.lora.pad_rank(adapter, 10**9)
