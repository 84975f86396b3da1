"""Key naming is one layer: KeyMap (rename, fuse, split rules), MappingPlan, and every ``rename=`` that takes them."""

import re

import pytest
import torch

import fvtransform as fvt
from fvtransform import Fuse, KeyMap, Rename, Split
from fvtransform.errors import KeyMismatchError, PlanError, ShapeMismatchError, UsageError
from fvtransform.io import REFERENCE_QKV_FUSE, WAN_DIFFUSERS_TO_ORIGINAL, WAN_ORIGINAL_TO_DIFFUSERS


def qkvo():
    g = torch.Generator().manual_seed(0)
    return fvt.ParamTree({"q.w": torch.randn(4, 3, generator=g), "k.w": torch.randn(2, 3, generator=g),
                          "v.w": torch.randn(2, 3, generator=g), "o.w": torch.randn(3, 3, generator=g)})


def test_of_takes_dicts_pairs_and_rules_and_returns_a_keymap_as_it_is():
    m = KeyMap.of([("a.{x}", "b.{x}"), Rename("c", "d", optional=True), Fuse(["e", "f"], "ef"), Split("g", ["h", "i"])])
    assert repr(m) == "KeyMap([a.{x} -> b.{x}, c -> d (optional), fuse(e, f) -> ef dim=0, split(g) -> h, i dim=0, {key*} -> {key} (optional)])"
    assert str(m).splitlines()[0] == "a.{x} -> b.{x}"
    assert KeyMap.of(m) is m
    assert KeyMap.of({"a": "b"}) == KeyMap.of([("a", "b")]) == KeyMap.of([Rename("a", "b")])
    assert KeyMap.of({"a": "b"}, keep_rest=False).rules == (Rename("a", "b"),)
    with pytest.raises(UsageError, match=r"a key map rule is a \(source, target\) pair of strings, Rename, Fuse or Split; found \('a',\)"):
        KeyMap.of([("a",)])
    with pytest.raises(UsageError, match="a key map is a KeyMap, a dict of names, or a list"):
        KeyMap.of("a")
    with pytest.raises(PlanError, match="needs at least two sources"):
        Fuse(["a"], "b")
    with pytest.raises(PlanError, match="use different fields"):
        Split("a.{x}", ["b.{x}", "c.{y}"])


def test_every_rename_accepts_the_same_values(tmp_path):
    t = fvt.ParamTree({"blocks.0.q.weight": torch.ones(2), "head.w": torch.zeros(1)})
    fvt.save(t, tmp_path / "m.safetensors")
    rules = [("blocks.{i}.q.{p}", "layers.{i}.to_q.{p}")]
    want = ["layers.0.to_q.weight", "head.w"]
    complete = KeyMap.of([*rules, ("head.w", "head.w")], keep_rest=False)
    composed = KeyMap.of({"blocks.0.q.weight": "x"}).then([("x", "layers.0.to_q.weight")])
    for given in (rules, dict(rules), KeyMap.of(rules), complete, composed):
        assert list(fvt.rename(t, given)) == want, given
        assert list(fvt.transforms.rename(given)(t)) == want, given
        assert list(fvt.load(tmp_path / "m.safetensors", rename=given)) == want, given
        assert list(KeyMap.of(given)(t)) == want, given


def test_strict_means_every_key_claimed_and_every_rule_used():
    t = qkvo()
    complete = KeyMap.of([Fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}"), ("o.{p}", "out.{p}")], keep_rest=False)
    extra = fvt.update(t, {"extra.w": torch.zeros(1)}, allow_new=True)
    with pytest.raises(KeyMismatchError, match=re.escape("no rule claims 1 keys: ['extra.w']")):
        complete.plan(extra)
    with pytest.raises(KeyMismatchError, match=re.escape("rules matched no key: o.{p} -> out.{p}")):
        complete.plan(fvt.drop(t, "o.w"))
    with pytest.raises(KeyMismatchError, match=re.escape("no rule claims 1 keys: ['extra.w']; rules matched no key: o.{p} -> out.{p}")):
        complete.plan(fvt.drop(extra, "o.w"))
    loose = complete.plan(fvt.drop(extra, "o.w"), strict=False)  # the same type, leftovers listed and kept
    assert isinstance(loose, fvt.MappingPlan)
    assert loose.unclaimed == ("extra.w",) and loose.unused_rules == ("o.{p} -> out.{p}",)
    out = loose.apply(fvt.drop(extra, "o.w"))
    assert list(out) == ["qkv.w", "extra.w"] and out["extra.w"] is extra["extra.w"]
    assert "unclaimed (kept): ['extra.w']" in str(loose) and "unused rules: o.{p} -> out.{p}" in str(loose)
    assert list(fvt.rename(extra, complete, strict=False)) == ["qkv.w", "out.w", "extra.w"]
    optional = KeyMap.of([("o.{p}", "out.{p}"), Rename("nope.{p}", "x.{p}", optional=True)])
    assert optional.plan(t).unused_rules == ()  # an optional rule may match nothing, strictly
    with pytest.raises(KeyMismatchError, match="incomplete fuse group for 'qkv.w'"):
        complete.plan(fvt.drop(t, "k.w"), strict=False)  # a broken group is an error either way


def test_plan_records_fuse_sizes_so_its_inverse_splits_exactly():
    t = qkvo()
    m = KeyMap.of([Fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}")])
    plan = m.plan(t)
    assert str(plan) == "fuse(q.w, k.w, v.w) -> qkv.w dim=0 sizes=[4, 2, 2]"
    fused = plan.apply(t)
    assert fused["qkv.w"].shape == (8, 3) and fused["o.w"] is t["o.w"]
    assert plan.inverse().apply(fused) == t and plan.inverse().apply(fused).same_order(t)
    with pytest.raises(ShapeMismatchError, match="does not divide"):
        m.inverse()(fused)  # the map alone does not know the sizes ...
    sized = KeyMap.of([Fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}", sizes=(4, 2, 2))])
    assert sized.inverse()(sized(t)) == t  # ... unless the rule says them
    with pytest.raises(ShapeMismatchError, match="cannot fuse"):
        KeyMap.of([Fuse(["a", "b"], "ab")]).plan({"a": (2, 3), "b": (2, 4)})
    with pytest.raises(KeyMismatchError, match="the plan reads"):
        plan.apply(fvt.drop(t, "q.w"))


def test_then_composes_into_one_keymap_and_one_plan():
    t = qkvo()
    first = KeyMap.of([("{m}.w", "{m}.weight")])
    both = first.then(KeyMap.of([Fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}")])).then({"qkv.weight": "attn.qkv.weight"})
    assert isinstance(both, KeyMap) and len(both.stages) == 3
    assert repr(both).count(" then ") == 2
    plan = both.plan(t)
    assert str(plan) == "fuse(q.w, k.w, v.w) -> attn.qkv.weight dim=0 sizes=[4, 2, 2]\no.w -> o.weight"
    out = both(t)
    assert out == plan.apply(t) and list(out) == ["attn.qkv.weight", "o.weight"]
    assert plan.inverse().apply(out) == t
    sized = first.then([Fuse(["q.{p}", "k.{p}", "v.{p}"], "qkv.{p}", sizes=(4, 2, 2))])
    assert sized.inverse()(sized(t)) == t  # the map's inverse: stages reversed, each rule inverted
    assert repr(sized.inverse()).startswith("KeyMap([split(qkv.{p}) -> q.{p}, k.{p}, v.{p} dim=0 sizes=[4, 2, 2]")
    split_back = KeyMap.of([Split("attn.qkv.{p}", ["a.{p}", "b.{p}"], sizes=(4, 4))])
    with pytest.raises(PlanError, match=re.escape("cannot compose a split of ['attn.qkv.weight'] with the fuse")):
        both.then(split_back).plan(t)  # a split of a fused key cannot be one step: said so


def test_rename_collisions_name_both_keys():
    t = qkvo()
    with pytest.raises(KeyMismatchError, match="maps two keys to 'q.w': 'q.w' and 'k.w'"):
        fvt.rename(t, {"k.w": "q.w"})  # k.w renamed onto a kept key
    assert list(fvt.rename(t, {"k.w": "q.w", "q.w": "k.w"})) == ["k.w", "q.w", "v.w", "o.w"]


def test_wan_mapping_round_trip_on_reference_model(tree):
    orig = WAN_DIFFUSERS_TO_ORIGINAL(tree)
    assert "blocks.0.self_attn.q.weight" in orig and "blocks.1.ffn.0.weight" in orig
    assert "blocks.0.norm3.weight" in orig and "head.modulation" in orig and "head.head.weight" in orig
    back = WAN_ORIGINAL_TO_DIFFUSERS(orig)
    assert back == tree and back.same_order(tree)
    plan = REFERENCE_QKV_FUSE.plan(tree)
    assert plan.inverse().apply(plan.apply(tree)) == tree


def _diffusers_wan_keys(**extra):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    with torch.device("meta"):
        return fvt.ParamTree.from_module(diffusers.WanTransformer3DModel(**kw, **extra))


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_shipped_wan_maps_are_strict_on_t2v_and_i2v(variant):
    tree = _diffusers_wan_keys(**({"image_dim": 12, "added_kv_proj_dim": 16} if variant == "i2v" else {}))
    plan = WAN_DIFFUSERS_TO_ORIGINAL.plan(tree)  # strict: every key claimed, every required rule used
    assert plan.unclaimed == () and plan.unused_rules == ()
    orig = plan.apply(tree)
    assert ("blocks.1.cross_attn.k_img.weight" in orig) == (variant == "i2v")
    assert ("img_emb.proj.1.weight" in orig) == (variant == "i2v")
    back = WAN_ORIGINAL_TO_DIFFUSERS(orig)
    assert list(back) == list(tree) and all(back[k] is tree[k] for k in tree)
    with pytest.raises(KeyMismatchError, match=re.escape("rules matched no key: head.head.{p} -> proj_out.{p}")):
        WAN_ORIGINAL_TO_DIFFUSERS(fvt.drop(orig, "head.head.*"))  # a required layer missing is named
    with pytest.raises(KeyMismatchError, match=re.escape("no rule claims 1 keys: ['img_emb.emb_pos']")):
        WAN_ORIGINAL_TO_DIFFUSERS(fvt.update(orig, {"img_emb.emb_pos": torch.zeros(1)}, allow_new=True))
