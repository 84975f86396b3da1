"""LyCORIS LoHa / LoKr / DoRA files against LyCORIS' own merged weights (tests/fixtures/lycoris, see its README)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fvtransform as fvt
from fvtransform.errors import FormatError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import DORA_EPS, LoHa, LoKr, LowRank

FIX = Path(__file__).parent / "fixtures" / "lycoris"
EXACT = ["loha", "loha_tucker", "lokr", "lokr_both", "lokr_full", "lokr_tucker", "lokr_dora_out", "locon_dora_out"]
INPUT_AXIS = ["loha_dora_in", "locon_dora_in"]
KIND = {"loha": LoHa, "lokr": LoKr, "locon": LowRank}


@pytest.fixture(scope="module")
def base():
    return fvt.ParamTree(load_file(FIX / "base.safetensors"))


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(12, 8), torch.nn.Linear(12, 12)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _Attn()
        self.ffn = torch.nn.Sequential(torch.nn.Linear(12, 16))


class Tiny(torch.nn.Module):
    """The fixtures' model (tests/fixtures/lycoris/make_fixtures.py)."""

    def __init__(self):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(4, 12, (1, 2, 2))
        self.blocks = torch.nn.ModuleList([_Block()])
        self.conv = torch.nn.Conv2d(4, 6, 3)

    def forward(self, video, image):
        h = self.patch_embedding(video).flatten(2).transpose(1, 2)  # [b, tokens, 12]
        a = self.blocks[0].self_attn
        return a.q(h).sum() + a.k(h).sum() + self.blocks[0].ffn(h).sum() + self.conv(image).sum()


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@pytest.mark.parametrize("name", EXACT)
def test_merge_equals_lycoris_bit_for_bit(base, name):
    adapter = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
    gold = load_file(FIX / f"{name}.merged.safetensors")
    assert set(adapter) == set(gold) and len(gold) == 5  # every module, linear and conv
    assert all(type(d) is KIND[name.split("_")[0]] for d in adapter.values())
    merged = fvt.lora.merge(base, adapter)
    for k, g in gold.items():
        assert torch.equal(merged[k], g), (k, (merged[k] - g).abs().max())


@pytest.mark.parametrize("name", INPUT_AXIS)
def test_dora_on_the_input_axis_equals_lycoris_within_two_float32_ulps(base, name):
    """``dora_scale`` ``[1, in]`` (LyCORIS ``wd_on_output=False``), square and non-square weights, linear and conv.

    Not bit for bit: the column norms are summed over row tiles (so the merge
    streams), LyCORIS takes ``norm`` of the whole transposed weight; the
    reduction order differs, measured at most 2 float32 ulps (well inside one
    bf16 ulp). Before the fix every element of the square weight was wrong.
    """
    adapter = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
    assert all(d.magnitude.dim() == 2 and d.magnitude.shape[0] == 1 for d in adapter.values())
    assert all(d.dora_eps == DORA_EPS for d in adapter.values())
    gold = load_file(FIX / f"{name}.merged.safetensors")
    merged = fvt.lora.merge(base, adapter)
    for k, g in gold.items():
        assert _ulps(merged[k], g) <= 2, k
        assert not torch.equal(merged[k], base[k])


def test_scale_rules_of_lycoris(base):
    loha = fvt.lora.load(FIX / "loha.safetensors", base=base)
    d = loha["blocks.0.self_attn.q.weight"]
    assert (d.rank, d.alpha, d.scale) == (4, 2.0, 0.5)  # alpha / hada_w1_b.shape[0]
    full = fvt.lora.load(FIX / "lokr_full.safetensors", base=base)
    f = full["blocks.0.self_attn.q.weight"]
    assert f.w1 is not None and f.w2 is not None and f.rank is None
    assert f.alpha != 1.0 and f.scale == 1.0  # both sides full: scale 1 whatever the alpha
    both = fvt.lora.load(FIX / "lokr_both.safetensors", base=base)
    b = both["blocks.0.ffn.0.weight"]
    assert b.w1_a is not None and b.w2_a is not None and b.scale == b.alpha / b.w1_b.shape[0] == 3.0


def test_comfy_prefixed_keys_merge_the_same(tmp_path, base):
    sd = load_file(FIX / "lokr_tucker.safetensors")
    names = {k[: -len(".weight")].replace(".", "_"): k[: -len(".weight")] for k in base if k.endswith(".weight")}
    renamed = {}
    for k, v in sd.items():
        module, role = k.split(".", 1)
        renamed[f"diffusion_model.{names[module[len('lora_unet_'):]]}.{role}"] = v
    save_file(renamed, tmp_path / "comfy.safetensors")
    a = fvt.lora.load(tmp_path / "comfy.safetensors", base=base)
    assert a.format == "comfy"
    assert fvt.lora.merge(base, a) == fvt.lora.merge(base, fvt.lora.load(FIX / "lokr_tucker.safetensors", base=base))


@pytest.mark.parametrize("name", ["loha_tucker", "lokr", "loha_dora_in", "locon_dora_out"])
def test_unmerge_and_exact_restore(base, name):
    adapter = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
    merged, record = fvt.lora.merge_with_record(base, adapter)
    assert fvt.lora.restore(merged, record) == base
    if "dora" in name:
        with pytest.raises(UsageError, match="DoRA merges are undone with the record"):
            fvt.lora.unmerge(merged, adapter)
        return
    back = fvt.lora.unmerge(merged, adapter)
    for k in adapter:
        torch.testing.assert_close(back[k], base[k], rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(merged[k].abs().max()))


@pytest.mark.parametrize("name", ["loha", "lokr_tucker", "loha_dora_in", "locon_dora_in", "lokr_dora_out"])
def test_on_the_fly_call_matches_merge(base, name):
    adapter = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
    model = Tiny()
    g = torch.Generator().manual_seed(0)
    video, image = torch.randn(2, 4, 1, 4, 4, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    got = fvt.lora.call(model, base, adapter, video, image)
    want = torch.func.functional_call(model, dict(fvt.lora.merge(base, adapter)), (video, image))
    plain = torch.func.functional_call(model, dict(base), (video, image))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("name", ["lokr_both", "loha_dora_in", "lokr_dora_out", "locon_dora_in"])
def test_merge_checkpoint_and_cli_stream_the_same_bits(tmp_path, base, name):
    from fvtransform.cli._main import main

    adapter = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
    out = fvt.lora.merge_checkpoint(FIX / "base.safetensors", adapter, tmp_path / "out.safetensors")
    assert fvt.load(out) == fvt.lora.merge(base, adapter)
    assert main(["merge", str(FIX / "base.safetensors"), str(FIX / f"{name}.safetensors"), "-o", str(tmp_path / "cli.safetensors"), "--quiet"]) == 0
    assert fvt.load(tmp_path / "cli.safetensors") == fvt.load(out)  # the headers differ only in the label


def test_lycoris_deltas_save_back_as_kohya_and_comfy(tmp_path, base):
    for name in ("loha_tucker", "lokr_both", "loha_dora_in"):
        a = fvt.lora.load(FIX / f"{name}.safetensors", base=base)
        for fmt in ("kohya", "comfy"):
            path = fvt.lora.save(a, tmp_path / f"{name}.{fmt}.safetensors", format=fmt)
            assert fvt.lora.merge(base, fvt.lora.load(path, base=base)) == fvt.lora.merge(base, a)
        with pytest.raises(UsageError, match="cannot hold"):
            fvt.lora.save(a, tmp_path / f"{name}.peft", format="peft")


def test_loha_and_lokr_are_pytrees_and_refused_where_they_cannot_go(base):
    from fvtransform.tree._pytree import tree_flatten, tree_map

    a = fvt.lora.load(FIX / "loha_dora_in.safetensors", base=base)
    leaves, _ = tree_flatten(a)
    assert len(leaves) == sum(len(d.tensors()) for d in a.values())
    doubled = tree_map(lambda t: t.double(), a)
    assert all(type(doubled[k]) is type(a[k]) and doubled[k].dora_eps == a[k].dora_eps for k in a)
    assert all(t.dtype == torch.float64 for d in doubled.values() for t in d.tensors())
    assert all(torch.equal(doubled[k].magnitude.float(), a[k].magnitude) for k in a)
    k = fvt.lora.load(FIX / "lokr_tucker.safetensors", base=base)
    assert fvt.lora.merge(base, fvt.lora.scale_adapter(k, 0.0)) == base
    assert fvt.lora.merge(base, fvt.lora.scale_adapter(k, 2.0)) == fvt.lora.merge(base, k, 2.0)
    with pytest.raises(UsageError, match="do not combine"):
        fvt.lora.combine([(a, 1.0)])
    with pytest.raises(UsageError, match="LoHa/LoKr"):
        fvt.lora.factors(a)


def _lokr_file(tmp_path, **tensors):
    path = tmp_path / "x.safetensors"
    save_file({f"lora_unet_blocks_0_self_attn_q.{k}": v for k, v in tensors.items()}, path)
    return path


def test_lycoris_error_paths(tmp_path, base):
    ok = dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4))  # [8, 12]
    assert fvt.lora.load(_lokr_file(tmp_path, **ok), base=base)["blocks.0.self_attn.q.weight"].scale == 1.0
    cases = [
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 5)), ShapeMismatchError, r"x\.safetensors.*blocks\.0\.self_attn\.q\.weight.*does not fit"),
        (dict(lokr_w1=torch.ones(2, 3)), ShapeMismatchError, r"lokr_w2.*lokr_w1"),
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4), alpha=torch.tensor(0.0)), FormatError, r"x\.safetensors.*alpha' is 0"),
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4), alpha=torch.tensor(float("nan"))), NumericError, r"alpha' is nan"),
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4), alpha=torch.ones(2)), FormatError, r"alpha' must be one real number"),
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4), hada_w1_a=torch.ones(8, 2)), FormatError, r"both LoHa .* and LoKr"),
        (dict(lokr_w1=torch.ones(2, 3, dtype=torch.complex64), lokr_w2=torch.ones(4, 4)), ShapeMismatchError, r"lokr_w1 is complex"),
        (dict(lokr_w1=torch.ones(2, 3), lokr_w2=torch.ones(4, 4), dora_scale=torch.ones(1, 5)), ShapeMismatchError, r"dora_scale.*fits neither"),
        (dict(hada_w1_a=torch.ones(8, 2), hada_w1_b=torch.ones(2, 12), hada_w2_a=torch.ones(8, 3), hada_w2_b=torch.ones(2, 12)), ShapeMismatchError, r"rank mismatch: hada_w1_a"),
        (dict(hada_w1_a=torch.ones(8, 2), hada_w1_b=torch.ones(2, 12)), FormatError, r"lacks \['hada_w2_a', 'hada_w2_b'\]"),
    ]
    for tensors, err, match in cases:
        with pytest.raises(err, match=match):
            fvt.lora.load(_lokr_file(tmp_path, **tensors), base=base)
