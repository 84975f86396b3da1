"""Oracles: diffusers and transformers models, built and run through fvtransform."""

import json

import pytest
import torch

import fvtransform as fvt

import diffusers  # the test extra installs both: a missing one is an error, not a skip
import transformers

WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, rope_max_seq_len=32,
)


def wan_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([250]),
        encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def wan_model():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()


def test_build_from_wan_config_and_call_reproduces_diffusers(wan_model):
    config = dict(wan_model.config)
    config["_class_name"] = "WanTransformer3DModel"
    module = fvt.build(config)
    assert all(p.device.type == "meta" for p in module.parameters())
    with torch.no_grad():
        ref = wan_model(**wan_inputs())[0]
        out = fvt.call(module, fvt.ParamTree.from_module(wan_model), **wan_inputs())[0]
    assert torch.equal(out, ref)


def test_wan_save_pretrained_sharded_loads_and_runs(tmp_path, wan_model):
    wan_model.save_pretrained(tmp_path / "wan", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "wan").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(n.endswith(".safetensors") for n in files) > 2
    module, tree = fvt.load_model(tmp_path / "wan")
    assert tree == fvt.ParamTree.from_module(wan_model)
    with torch.no_grad():
        ref = wan_model(**wan_inputs())[0]
        out = fvt.call(module, tree, **wan_inputs())[0]
    assert torch.equal(out, ref)
    # the rotary tables were computed for real, not left on meta
    assert all(b.device.type == "cpu" for b in module.buffers())


def test_wan_original_names_round_trip_against_diffusers_keys(wan_model):
    tree = fvt.ParamTree.from_module(wan_model)
    orig = fvt.io.WAN_DIFFUSERS_TO_ORIGINAL(tree)
    assert "blocks.0.cross_attn.k.weight" in orig and "time_projection.1.weight" in orig
    assert fvt.io.WAN_ORIGINAL_TO_DIFFUSERS(orig) == tree


def _t5_config():
    return transformers.UMT5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        architectures=["UMT5EncoderModel"],
    )


def test_umt5_encoder_folder_loads_and_runs(tmp_path):
    torch.manual_seed(0)
    ref_model = transformers.UMT5EncoderModel(_t5_config()).eval()
    ref_model.save_pretrained(tmp_path / "te", max_shard_size="20KB")
    module, tree = fvt.load_model(tmp_path / "te")
    ids = torch.tensor([[1, 5, 9, 3, 0]])
    with torch.no_grad():
        ref = ref_model(input_ids=ids).last_hidden_state
        out = fvt.call(module, tree, input_ids=ids).last_hidden_state
    assert torch.equal(out, ref)


def test_bert_position_ids_are_real_after_load_model(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=20, architectures=["BertModel"])
    torch.manual_seed(0)
    ref_model = transformers.BertModel(cfg).eval()
    ref_model.save_pretrained(tmp_path / "bert")
    module, tree = fvt.load_model(tmp_path / "bert")
    ids = torch.tensor([[2, 7, 11]])
    with torch.no_grad():
        ref = ref_model(input_ids=ids).last_hidden_state
        out = fvt.call(module, tree, input_ids=ids).last_hidden_state
    assert torch.equal(out, ref)
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert fvt.resolve(config) is transformers.BertModel


def test_call_on_state_dict_of_tied_bert_mlm():
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=8)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    module = fvt.build(dict(cfg.to_dict(), architectures=["BertForMaskedLM"]))
    ids = torch.tensor([[1, 4, 7]])
    with torch.no_grad():
        out = fvt.call(module.eval(), fvt.ParamTree(ref.state_dict()), input_ids=ids).logits
        assert torch.equal(out, ref(input_ids=ids).logits)
