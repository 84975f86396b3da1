"""Real checkpoints load like their libraries load them (issue 15, items 4 and 5).

Each checkpoint is made here with a tiny config in the layout that matters
(older transformers keys, tied weights saved once or twice, buffers saved as
persistent, keys a class declares ignorable), then loaded by transformers' or
diffusers' own ``from_pretrained`` and by ``fvt.load_model``: same tensors,
same dtypes and the same forward output, bit for bit. Oracles: transformers
5.24.0 and diffusers 0.42.1 (the venv's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from test_oracles_models import WAN_CONFIG, wan_inputs

IDS = torch.tensor([[2, 7, 11, 3]])


def _bert_cfg(arch: str, **kw) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=12, architectures=[arch], **kw)


def _edit(folder: Path, fn, name: str = "model.safetensors") -> Path:
    """Rewrite the folder's one weights file as ``fn(state dict)`` (the layout an older library wrote)."""
    sd = load_file(folder / name)
    save_file(fn(sd), folder / name, metadata={"format": "pt"})
    return folder


def _same_tree(tree: fvt.ParamTree, ref: torch.nn.Module) -> None:
    """The tree holds the reference's state, tensor for tensor (dtype and bits)."""
    sd = ref.state_dict()
    assert sorted(tree) == sorted(sd)
    for k, v in sd.items():
        assert fvt.tensors_equal(tree[k], v), k


def _saved(tmp_path: Path, model: torch.nn.Module, name: str) -> Path:
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


# ---- item 4: transformers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return transformers.BertModel(_bert_cfg("BertModel")).eval()


def test_old_bert_with_persistent_position_ids_loads_like_transformers(tmp_path, bert):
    folder = _edit(_saved(tmp_path, bert, "bert"),
                   lambda sd: {**sd, "embeddings.position_ids": torch.arange(12).unsqueeze(0)})
    ref = transformers.BertModel.from_pretrained(folder).eval()
    result = fvt.load_model(folder)
    module, tree = result
    _same_tree(tree, ref)
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, input_ids=IDS).last_hidden_state, ref(input_ids=IDS).last_hidden_state)
    assert result.report.keys("ignored") == ("embeddings.position_ids",)
    assert "old position_ids buffer key, which transformers ignores" in str(result.report)
    assert not result.report.exact


def test_old_bert_layer_norm_gamma_beta_names_load_like_transformers(tmp_path, bert):
    def old_names(sd):
        return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in sd.items()}

    folder = _edit(_saved(tmp_path, bert, "bert"), old_names)
    assert "embeddings.LayerNorm.gamma" in load_file(folder / "model.safetensors")
    ref = transformers.BertModel.from_pretrained(folder).eval()
    result = fvt.load_model(folder)
    _same_tree(result.tree, ref)
    with torch.no_grad():
        out = fvt.call(result.module, result.tree, input_ids=IDS).last_hidden_state
        assert torch.equal(out, ref(input_ids=IDS).last_hidden_state)
    assert "embeddings.LayerNorm.gamma" in result.report.keys("renamed")
    assert "an old name of 'embeddings.LayerNorm.weight' (transformers' legacy rename)" in str(result.report)


def test_other_unexpected_keys_still_raise(tmp_path, bert):
    folder = _edit(_saved(tmp_path, bert, "bert"), lambda sd: {
        **sd, "embeddings.position_ids": torch.arange(12).unsqueeze(0), "pooler.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyMismatchError, match=r"bert: the weights do not fit BertModel.*\nunexpected \(1\): \['pooler.extra.weight'\]"):
        fvt.load_model(folder)
    result = fvt.load_model(folder, strict=False)  # no warning (warnings are errors here): the report lists it
    assert result.report.unexpected == ("pooler.extra.weight",)
    assert result.report.keys("ignored") == ("embeddings.position_ids",)


def test_exact_checkpoint_has_an_exact_report(tmp_path, bert):
    result = fvt.load_model(_saved(tmp_path, bert, "bert"))
    assert result.report.exact and "every key loaded as saved" in str(result.report)
    with pytest.raises(fvt.errors.UsageError, match=r"unknown load action 'dropped'; actions: \['filled'"):
        result.report.keys("dropped")
    assert result.module is result[0] and result.tree is result[1]


@pytest.fixture(scope="module")
def bert_mlm():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(_bert_cfg("BertForMaskedLM")).eval()


def _logits_match(folder: Path, **kw) -> fvt.io.LoadReport:
    ref = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    result = fvt.load_model(folder, **kw)
    module, tree = result
    _same_tree(tree, ref)
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, input_ids=IDS).logits, ref(input_ids=IDS).logits)
    return result.report


def test_tied_lm_head_saved_once_is_tied_like_transformers(tmp_path, bert_mlm):
    folder = _saved(tmp_path, bert_mlm, "mlm")
    assert "cls.predictions.decoder.weight" not in load_file(folder / "model.safetensors")
    report = _logits_match(folder)
    assert set(report.keys("tied")) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert "not in the checkpoint; BertForMaskedLM ties it to 'bert.embeddings.word_embeddings.weight'" in str(report)


def test_tie_saved_under_the_other_name_only(tmp_path, bert_mlm):
    def swap(sd):
        sd["cls.predictions.decoder.weight"] = sd.pop("bert.embeddings.word_embeddings.weight")
        return sd

    report = _logits_match(_edit(_saved(tmp_path, bert_mlm, "mlm"), swap))
    assert "bert.embeddings.word_embeddings.weight" in report.keys("tied")


def test_tie_saved_twice_with_equal_values(tmp_path, bert_mlm):
    def twice(sd):
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
        return sd

    report = _logits_match(_edit(_saved(tmp_path, bert_mlm, "mlm"), twice))
    assert "saved again with equal values" in str(report)


def test_tie_saved_twice_with_different_values_is_untied_like_transformers(tmp_path, bert_mlm):
    def differ(sd):
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"] * 2
        return sd

    folder = _edit(_saved(tmp_path, bert_mlm, "mlm"), differ)
    with pytest.warns(UserWarning, match="loaded separately, as transformers does"):
        report = _logits_match(folder)
    assert report.keys("untied") == ("cls.predictions.decoder.weight",)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_umt5_keep_in_fp32_follows_transformers(tmp_path, dtype):
    cfg = transformers.UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, architectures=["UMT5EncoderModel"])
    torch.manual_seed(0)
    folder = _saved(tmp_path, transformers.UMT5EncoderModel(cfg), "te")
    ref = transformers.UMT5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
    result = fvt.load_model(folder, dtype=dtype)
    module, tree = result
    _same_tree(tree, ref)
    kept = {k for k, v in ref.state_dict().items() if v.dtype == torch.float32}
    assert set(result.report.keys("float32")) == kept
    assert bool(kept) == (dtype == torch.float16)  # _keep_in_fp32_modules ("wo") applies to float16 only
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


def test_llama_bf16_buffers_are_built_as_transformers_builds_them(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   architectures=["LlamaModel"])
    torch.manual_seed(0)
    folder = _saved(tmp_path, transformers.LlamaModel(cfg), "llama")
    ref = transformers.LlamaModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    module, tree = fvt.load_model(folder, dtype=torch.bfloat16)
    _same_tree(tree, ref)
    # the rotary tables stay float32 (transformers builds under the default dtype; a blanket .to() would round them)
    assert {k: v.dtype for k, v in module.named_buffers()} == {k: v.dtype for k, v in ref.named_buffers()}
    assert ref.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


def test_missing_buffer_allowed_by_the_class_gets_its_initial_value(tmp_path):
    cfg = transformers.BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                  decoder_ffn_dim=16, max_position_embeddings=16,
                                  architectures=["BartForConditionalGeneration"])
    torch.manual_seed(0)
    folder = _saved(tmp_path, transformers.BartForConditionalGeneration(cfg), "bart")
    _edit(folder, lambda sd: {k: v for k, v in sd.items() if k != "final_logits_bias"})
    ref = transformers.BartForConditionalGeneration.from_pretrained(folder).eval()
    result = fvt.load_model(folder)
    module, tree = result
    _same_tree(tree, ref)
    assert result.report.keys("filled") == ("final_logits_bias",)
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        out = fvt.call(module, tree, input_ids=ids, decoder_input_ids=ids).logits
        assert torch.equal(out, ref(input_ids=ids, decoder_input_ids=ids).logits)


# ---- items 4 and 5: diffusers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wan") / "wan"
    diffusers.WanTransformer3DModel(**WAN_CONFIG).save_pretrained(folder)
    return folder


def _wan_bf16_inputs():
    inp = wan_inputs()
    inp["hidden_states"] = inp["hidden_states"].bfloat16()
    inp["encoder_hidden_states"] = inp["encoder_hidden_states"].bfloat16()
    return inp


def test_wan_bf16_keeps_fp32_modules_like_diffusers(wan_folder):
    ref = diffusers.WanTransformer3DModel.from_pretrained(wan_folder, torch_dtype=torch.bfloat16).eval()
    result = fvt.load_model(wan_folder, dtype=torch.bfloat16)
    module, tree = result
    _same_tree(tree, ref)
    kept = {k for k, v in ref.state_dict().items() if v.dtype == torch.float32}
    assert "condition_embedder.time_embedder.linear_1.weight" in kept and "blocks.0.norm2.weight" in kept
    assert set(result.report.keys("float32")) == kept
    assert {k: v.dtype for k, v in module.named_parameters()} == {k: v.dtype for k, v in ref.named_parameters()}
    assert {k: v.dtype for k, v in module.named_buffers()} == {k: v.dtype for k, v in ref.named_buffers()}
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, **_wan_bf16_inputs())[0], ref(**_wan_bf16_inputs())[0])


def test_keep_fp32_false_casts_everything(wan_folder):
    result = fvt.load_model(wan_folder, dtype=torch.bfloat16, keep_fp32=False)
    assert {v.dtype for v in result.tree.values()} == {torch.bfloat16}
    assert result.report.keys("float32") == ()
    with torch.no_grad():
        assert fvt.call(result.module, result.tree, **_wan_bf16_inputs())[0].dtype == torch.bfloat16


def test_diffusers_ignore_unexpected_pattern(tmp_path, wan_folder):
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text((wan_folder / "config.json").read_text())
    sd = load_file(wan_folder / "diffusion_pytorch_model.safetensors")
    sd["blocks.0.attn2.norm_added_q.weight"] = torch.ones(16)
    save_file(sd, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    ref = diffusers.WanTransformer3DModel.from_pretrained(folder).eval()
    result = fvt.load_model(folder)
    _same_tree(result.tree, ref)
    assert result.report.keys("ignored") == ("blocks.0.attn2.norm_added_q.weight",)
    assert "WanTransformer3DModel._keys_to_ignore_on_load_unexpected pattern 'norm_added_q'" in str(result.report)


def test_vae_with_deprecated_attention_names_loads_like_diffusers(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    folder = _saved(tmp_path, vae, "vae")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def deprecated(sd):
        out = {}
        for k, v in sd.items():
            for new, was in old.items():
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
            out[k] = v
        return out

    _edit(folder, deprecated, "diffusion_pytorch_model.safetensors")
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in load_file(folder / "diffusion_pytorch_model.safetensors")
    ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    result = fvt.load_model(folder)
    _same_tree(result.tree, ref)
    assert len(result.report.keys("renamed")) == 16  # 4 linears x weight and bias, in encoder and decoder
    assert "(diffusers' rename of a deprecated attention block)" in str(result.report)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fvt.call(result.module, result.tree, x).sample, ref(x).sample)


# ---- any module: buffers saved as persistent, ties the class does not declare ------------------------


class _Rotary(torch.nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.out.weight = self.proj.weight
        self.register_buffer("table", torch.arange(dim, dtype=torch.float32) / dim, persistent=False)

    def forward(self, x):
        return self.out(self.proj(x) * self.table)


@pytest.fixture
def rotary(tmp_path):
    fvt.register("test-compat-rotary", _Rotary, override=True)
    yield tmp_path / "rot"
    fvt.REGISTRY.unregister("test-compat-rotary")


def _write(folder: Path, tensors: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "test-compat-rotary", "dim": 4}))
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_saved_non_persistent_buffer_is_ignored_and_reported(rotary):
    w, b = torch.randn(4, 4), torch.randn(4)
    folder = _write(rotary, {"proj.weight": w, "proj.bias": b, "table": torch.full((4,), 7.0)})
    result = fvt.load_model(folder)
    module, tree = result
    assert sorted(tree) == ["out.weight", "proj.bias", "proj.weight"] and tree["out.weight"] is tree["proj.weight"]
    assert result.report.keys("ignored") == ("table",) and result.report.keys("tied") == ("out.weight",)
    assert "a non-persistent buffer of _Rotary" in str(result.report)
    x = torch.ones(1, 4)
    assert torch.equal(fvt.call(module, tree, x), ((x @ w.T + b) * torch.arange(4) / 4) @ w.T)


def test_undeclared_tie_with_different_values_is_refused(rotary):
    folder = _write(rotary, {"proj.weight": torch.zeros(4, 4), "proj.bias": torch.zeros(4), "out.weight": torch.ones(4, 4)})
    with pytest.raises(KeyMismatchError, match=r"rot: _Rotary ties \['proj.weight', 'out.weight'\].*different values for 'proj.weight' and 'out.weight'"):
        fvt.load_model(folder)
