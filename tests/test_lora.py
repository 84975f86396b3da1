import json

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora import FullDelta, LoraAdapter, LowRank

from _helpers import assert_unchanged, snapshot

TARGETS = "blocks.*.attn*.to_*.weight"


def adapter_for(tree, rank=4, seed=1, alpha=None):
    return fvt.lora.random_adapter(tree, targets=TARGETS, rank=rank, seed=seed, alpha=alpha, scale_b=0.1)


def same_adapter(a, b):
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert type(x) is type(y)
        assert x.scale == pytest.approx(y.scale, rel=1e-12)
        for s, t in zip(x.tensors(), y.tensors()):
            assert fvt.tensors_equal(s, t), k


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "comfy"])
def test_format_round_trip(tmp_path, tree, fmt):
    a = adapter_for(tree, alpha=3.0)
    path = fvt.lora.save(a, tmp_path / ("out" if fmt in ("peft", "diffusers") else "out.safetensors"), format=fmt)
    back = fvt.lora.load(path.parent if fmt == "peft" else path, base=tree)
    assert back.format == fmt
    same_adapter(a, back)


def test_full_deltas_round_trip_through_comfy(tmp_path, tree):
    a = LoraAdapter({
        "blocks.0.ffn.net.2.weight": FullDelta(torch.randn(16, 64)),
        "blocks.0.ffn.net.2.bias": FullDelta(torch.randn(16)),
    })
    p = fvt.lora.save(a, tmp_path / "c.safetensors", format="comfy")
    from safetensors import safe_open

    with safe_open(p, "pt") as f:
        assert set(f.keys()) == {"diffusion_model.blocks.0.ffn.2.diff", "diffusion_model.blocks.0.ffn.2.diff_b"}
    same_adapter(a, fvt.lora.load(p, base=tree))
    with pytest.raises(UsageError, match="cannot hold"):
        fvt.lora.save(a, tmp_path / "p", format="peft")


def test_peft_config_patterns_and_rslora(tmp_path, tree):
    A, B = torch.randn(2, 16), torch.randn(16, 2)
    A4, B4 = torch.randn(4, 16), torch.randn(16, 4)
    files = {
        "base_model.model.blocks.0.attn1.to_q.lora_A.weight": A,
        "base_model.model.blocks.0.attn1.to_q.lora_B.weight": B,
        "base_model.model.blocks.1.attn1.to_q.lora_A.weight": A4,
        "base_model.model.blocks.1.attn1.to_q.lora_B.weight": B4,
    }
    folder = tmp_path / "p"
    folder.mkdir()
    fvt.save(files, folder / "adapter_model.safetensors")
    cfg = {"r": 2, "lora_alpha": 8, "rank_pattern": {"blocks.1.attn1.to_q": 4}, "alpha_pattern": {"blocks.1.attn1.to_q": 2}}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    a = fvt.lora.load(folder, base=tree)
    assert a["blocks.0.attn1.to_q.weight"].scale == 4.0 and a["blocks.1.attn1.to_q.weight"].scale == 0.5
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    a = fvt.lora.load(folder, base=tree)
    assert a["blocks.0.attn1.to_q.weight"].scale == pytest.approx(8 / 2**0.5)


def test_kohya_needs_base_and_resolves_underscores(tmp_path, tree):
    a = adapter_for(tree)
    p = fvt.lora.save(a, tmp_path / "k.safetensors", format="kohya")
    with pytest.raises(UsageError, match="pass base="):
        fvt.lora.load(p)
    # musubi-style original Wan names resolve against the diffusers-named base too
    raw = fvt.load(p)
    renamed = {k.replace("_attn1_to_q", "_self_attn_q").replace("_attn2_to_k", "_cross_attn_k"): v for k, v in raw.items()}
    back = fvt.lora.load(renamed, base=tree)
    assert set(back) == set(a)


def test_strict_resolution_lists_unmatched_keys(tree):
    good = {"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 16), "blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 2)}
    bad = {**good, "blocks.0.attn1.to_qq.lora_A.weight": torch.randn(2, 16), "blocks.0.attn1.to_qq.lora_B.weight": torch.randn(16, 2)}
    with pytest.raises(KeyMismatchError, match=r"(?s)2 LoRA keys do not resolve.*to_qq.*closest base names"):
        fvt.lora.load(bad, base=tree)
    adapter = fvt.lora.load(bad, base=tree, strict=False)
    assert isinstance(adapter, fvt.lora.LoraAdapter)
    assert list(adapter) == ["blocks.0.attn1.to_q.weight"]
    assert sorted(k for k, _ in adapter.report.skipped) == ["blocks.0.attn1.to_qq.lora_A.weight", "blocks.0.attn1.to_qq.lora_B.weight"]
    assert all("no base module matches" in why for _, why in adapter.report.skipped)
    assert dict(adapter.report.targets) == {"blocks.0.attn1.to_q.weight": "blocks.0.attn1.to_q.lora_A.weight"}
    assert not adapter.report.ok and "skipped blocks.0.attn1.to_qq.lora_A.weight" in str(adapter.report)
    strict = fvt.lora.load(good, base=tree)
    assert strict.report.ok and strict.report.skipped == () and strict.report.format == adapter.report.format
    with pytest.raises(KeyMismatchError, match="not a LoRA key"):
        fvt.lora.load({**good, "blocks.0.weird": torch.zeros(1)}, base=tree)


def test_error_paths(tree):
    with pytest.raises(ShapeMismatchError, match="rank mismatch"):
        fvt.lora.load({"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 16), "blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 3)})
    with pytest.raises(ShapeMismatchError, match="does not fit the base weight"):
        fvt.lora.load({"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 7), "blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 2)}, base=tree)
    nan = torch.randn(2, 16)
    nan[0, 0] = float("nan")
    with pytest.raises(NumericError, match="to_q.weight.*NaN or Inf"):
        fvt.lora.load({"blocks.0.attn1.to_q.lora_A.weight": nan, "blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 2)})
    with pytest.raises(FormatError, match="no LoRA format recognises"):
        fvt.lora.load({"foo": torch.zeros(1)})
    with pytest.raises(UsageError, match="unknown LoRA format 'nope'"):
        fvt.lora.load({"a.lora_A.weight": torch.zeros(1, 1), "a.lora_B.weight": torch.zeros(1, 1)}, format="nope")
    with pytest.raises(FormatError, match="no matching B factor"):
        fvt.lora.load({"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 16)})
    with pytest.raises(KeyMismatchError, match="not in the tree"):
        fvt.lora.merge(tree, LoraAdapter({"nope.weight": LowRank(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}))


def test_merge_basics_and_sharing(tree):
    a = adapter_for(tree)
    snap = snapshot(tree)
    merged = fvt.lora.merge(tree, a, 0.5)
    assert_unchanged(tree, snap)
    for k in tree:
        if k in a:
            d = a[k]
            expect = (tree[k].double() + 0.5 * d.scale * (d.B.double() @ d.A.double())).float()
            assert torch.allclose(merged[k], expect, atol=1e-6)
        else:
            assert merged[k] is tree[k]
    zero = fvt.lora.merge(tree, a, 0.0)
    assert zero == tree
    step = fvt.transforms.merge_lora(a, 0.5)
    assert fvt.chain(step)(tree) == merged


def test_merge_set_order_independent_and_combine_exact(tree):
    bf = fvt.cast(tree, torch.bfloat16)
    a, b, c = (adapter_for(tree, rank=r, seed=s) for r, s in ((2, 1), (4, 2), (3, 3)))
    one = fvt.lora.merge(bf, [(a, 1.0), (b, -0.7), (c, 0.3)])
    two = fvt.lora.merge(bf, [(c, 0.3), (a, 1.0), (b, -0.7)])
    assert one == two
    combined = fvt.lora.combine([(a, 1.0), (b, -0.7), (c, 0.3)])
    assert combined["blocks.0.attn1.to_q.weight"].rank == 9
    via = fvt.lora.merge(tree, combined)
    direct = fvt.lora.merge(tree, [(a, 1.0), (b, -0.7), (c, 0.3)])
    for k in a:
        assert torch.allclose(via[k], direct[k], atol=1e-6)


def test_unmerge_and_exact_restore(tree):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = fvt.cast(tree, dtype)
        a = adapter_for(tree)
        merged, record = fvt.lora.merge_with_record(t, a)
        assert record.nbytes < record.targets_nbytes
        assert fvt.lora.restore(merged, record) == t
        un = fvt.lora.unmerge(merged, a)
        for k in a:
            assert torch.allclose(un[k].float(), t[k].float(), atol=float(torch.finfo(dtype).eps) * 8, rtol=0)
    with pytest.raises(UsageError, match="not the merged weight"):
        fvt.lora.restore(tree, record)


def test_donate_reuses_storage(tree):
    t = fvt.map_tensors(tree, torch.clone)
    a = adapter_for(tree)
    ptr = t["blocks.0.attn1.to_q.weight"].data_ptr()
    expect = fvt.lora.merge(t, a)
    merged = fvt.lora.merge(t, a, donate=True)
    assert merged["blocks.0.attn1.to_q.weight"].data_ptr() == ptr
    assert merged == expect


def test_donation_consumes_the_donated_tensors_so_a_parent_tree_sees_the_merge(tree):
    parent = fvt.map_tensors(tree, torch.clone)
    child = fvt.select(parent, "blocks.0.*")
    a = fvt.lora.random_adapter(child, targets="blocks.0.attn1.to_q.weight", rank=2, seed=3, scale_b=0.1)
    before = parent["blocks.0.attn1.to_q.weight"].clone()
    merged = fvt.lora.merge(child, a, donate=True)
    # documented: the donated tensors are consumed; the parent holds the same tensor and sees the merged weight
    assert torch.equal(parent["blocks.0.attn1.to_q.weight"], merged["blocks.0.attn1.to_q.weight"])
    assert not torch.equal(parent["blocks.0.attn1.to_q.weight"], before)


def test_donation_is_refused_for_tied_keys_and_for_views_of_one_storage():
    w = torch.randn(4, 3)
    tied = fvt.ParamTree({"embed.weight": w, "head.weight": w, "other.weight": torch.randn(4, 3)})
    a = LoraAdapter({"head.weight": LowRank(torch.randn(1, 3), torch.randn(4, 1), 0.5)})
    snap = snapshot(tied)
    with pytest.raises(UsageError, match=r"tied to other keys: \[\['embed.weight', 'head.weight'\]\].*merge without donate=True"):
        fvt.lora.merge(tied, a, donate=True)
    with pytest.raises(UsageError, match=r"tied to other keys"):
        fvt.lora.unmerge(tied, a, donate=True)
    assert_unchanged(tied, snap)
    assert torch.equal(fvt.lora.merge(tied, a)["embed.weight"], fvt.lora.merge(tied, a)["head.weight"])  # without donation: fine
    qkv = torch.randn(8, 3)
    views = fvt.ParamTree({"q.weight": qkv[:4], "k.weight": qkv[4:]})
    b = LoraAdapter({"q.weight": LowRank(torch.randn(1, 3), torch.randn(4, 1), 0.5)})
    k_before = views["k.weight"].clone()
    with pytest.raises(UsageError, match=r"storage that other keys view: \[\['q.weight', 'k.weight'\]\].*fvt.map_tensors\(tree, torch.clone\)"):
        fvt.lora.merge(views, b, donate=True)
    assert torch.equal(views["k.weight"], k_before)
    own = fvt.map_tensors(views, torch.clone)  # the fix the message names: targets that own their storage
    ptr = own["q.weight"].data_ptr()
    assert fvt.lora.merge(own, b, donate=True)["q.weight"].data_ptr() == ptr


def test_flags_that_changed_the_return_type_are_gone_and_name_the_call_to_make(tree):
    a = adapter_for(tree)
    with pytest.raises(UsageError, match=r"merge\(\) has no return_record=.*Call fvt.lora.merge_with_record\(tree, adapters, scale\)"):
        fvt.lora.merge(tree, a, return_record=True)
    with pytest.raises(UsageError, match=r"extract\(\) has no return_report=.*Call fvt.lora.extract_with_report\("):
        fvt.lora.extract(tree, tree, rank=2, return_report=True)
    with pytest.raises(UsageError, match=r"compress\(\) has no return_report=.*Call fvt.lora.compress_with_report\(adapter, rank\)"):
        fvt.lora.compress(a, 2, return_report=True)
    merged, record = fvt.lora.merge_with_record(tree, a)
    assert isinstance(fvt.lora.merge(tree, a), fvt.ParamTree) and merged == fvt.lora.merge(tree, a)
    assert isinstance(record, fvt.lora.MergeRecord) and fvt.lora.restore(merged, record) == tree
    with pytest.raises(TypeError, match="donate"):
        fvt.lora.merge_with_record(tree, a, donate=True)  # the record needs the original weights: nothing to donate
    c = fvt.lora.compress(a, 2)
    c2, report = fvt.lora.compress_with_report(a, 2)
    assert isinstance(c, LoraAdapter) and set(report.errors) == set(a) and c.ranks == c2.ranks


def test_conv_lora_on_patch_embedding(tree, model, inputs):
    w = tree["patch_embedding.weight"]  # [16, 4, 1, 2, 2]
    A, B = torch.randn(2, 4, 1, 2, 2) * 0.1, torch.randn(16, 2, 1, 1, 1) * 0.1
    a = LoraAdapter({"patch_embedding.weight": LowRank(A, B, 0.5)})
    merged = fvt.lora.merge(tree, a)
    expect = w + 0.5 * (B.reshape(16, 2) @ A.reshape(2, -1)).reshape(w.shape)
    assert torch.allclose(merged["patch_embedding.weight"], expect, atol=1e-6)
    fly = fvt.lora.call(model, tree, a, *inputs)
    assert torch.allclose(fly, fvt.call(model, merged, *inputs), atol=1e-5)
    # DoRA on the Conv3d: rows are output channels; on the fly, merged and restored agree
    norms = (w.reshape(16, -1) + 0.5 * B.reshape(16, 2) @ A.reshape(2, -1)).norm(dim=1)
    dora = LoraAdapter({"patch_embedding.weight": LowRank(A, B, 0.5, magnitude=norms * 1.3)})
    merged_dora, record = fvt.lora.merge_with_record(tree, dora)
    assert torch.allclose(merged_dora["patch_embedding.weight"].reshape(16, -1).norm(dim=1), norms * 1.3, rtol=1e-5)
    fly_dora = fvt.lora.call(model, tree, dora, *inputs)
    assert torch.allclose(fly_dora, fvt.call(model, merged_dora, *inputs), atol=1e-5)
    assert fvt.lora.restore(merged_dora, record) == tree


def test_on_the_fly_call_matches_merge_and_leaves_module_alone(model, tree, inputs):
    a, b = adapter_for(tree, seed=1), adapter_for(tree, rank=2, seed=2)
    bias = LoraAdapter({"blocks.0.ffn.net.2.bias": FullDelta(torch.randn(16) * 0.1)})
    snap = snapshot(tree)
    modules_before = [id(m) for m in model.modules()]
    fly = fvt.lora.call(model, tree, [(a, 0.7), (b, -0.4), (bias, 1.0)], *inputs)
    merged = fvt.call(model, fvt.lora.merge(tree, [(a, 0.7), (b, -0.4), (bias, 1.0)]), *inputs)
    assert torch.allclose(fly, merged, atol=1e-5)
    assert torch.equal(fvt.lora.call(model, tree, a.__class__({}), *inputs), fvt.call(model, tree, *inputs))
    assert torch.equal(fvt.lora.call(model, tree, [(a, 0.0)], *inputs), fvt.call(model, tree, *inputs))
    assert modules_before == [id(m) for m in model.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert_unchanged(tree, snap)
    unused = LoraAdapter({"blocks.0.scale_shift_table": FullDelta(torch.zeros(1, 6, 16))})
    with pytest.raises(KeyMismatchError, match="not used by any linear"):
        fvt.lora.call(model, tree, unused, *inputs)


def test_extract_and_compress(tree):
    a = adapter_for(tree, rank=3)
    merged = fvt.lora.merge(fvt.cast(tree, torch.float64), a)
    calls = []
    ex, report = fvt.lora.extract_with_report(fvt.cast(tree, torch.float64), merged, rank=3,
                                  progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(tree), len(tree)) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert set(ex) == set(a)
    for k, d in a.items():
        want = d.scale * d.B.double() @ d.A.double()
        got = ex[k].B.double() @ ex[k].A.double()
        assert torch.allclose(got, want, atol=1e-5)
        assert report.errors[k] < 1e-5
    c = fvt.lora.combine([(a, 1.0), (a, 0.5)])
    small, rep = fvt.lora.compress_with_report(c, 3)
    for k, d in c.items():
        assert small[k].rank == 3
        assert torch.allclose(small[k].B.double() @ small[k].A.double(), d.B.double() @ d.A.double(), atol=1e-5)
    e, _ = fvt.lora.extract_with_report(tree, fvt.cast(merged, torch.float32), energy=0.999)
    assert all(d.rank <= 16 for d in e.values())


def test_factors_compile_to_one_graph_for_every_adapter_of_a_rank(model, tree, inputs):
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, f, *x: fvt.lora.call_factors(model, t, f, *x), backend=counter)
    for seed, rank, scale in ((1, 4, 1.0), (2, 2, 0.5), (3, 8, -2.0)):
        a = adapter_for(tree, rank=rank, seed=seed)
        fac = fvt.lora.factors([(a, scale)], rank=8)
        out = compiled(tree, fac, *inputs)
        assert torch.allclose(out, fvt.lora.call(model, tree, [(a, scale)], *inputs), atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_factors_fold_several_adapters_on_one_key(model, tree, inputs):
    a, b = adapter_for(tree, rank=4, seed=1), adapter_for(tree, rank=2, seed=2)
    fac = fvt.lora.factors([(a, 0.7), (b, -1.5)], rank=8)
    assert {A.shape[0] for A, _, _ in fac.values()} == {8}
    got = fvt.lora.call_factors(model, tree, fac, *inputs)
    assert torch.allclose(got, fvt.lora.call(model, tree, [(a, 0.7), (b, -1.5)], *inputs), atol=1e-5)
    with pytest.raises(ShapeMismatchError, match="more than 4"):
        fvt.lora.factors([(a, 1.0), (b, 1.0)], rank=4)  # 4 + 2 concatenated does not fit rank 4


def test_factors_and_pad_rank_errors(model, tree, inputs):
    a = adapter_for(tree, rank=4)
    with pytest.raises(ShapeMismatchError, match="has rank 4, more than 2; compress it first"):
        fvt.lora.pad_rank(a, 2)
    key = next(iter(a))
    d = a[key]
    dora = LoraAdapter({key: LowRank(d.A, d.B, d.scale, magnitude=torch.ones(d.B.shape[0]))})
    with pytest.raises(UsageError, match="factors\\(\\) takes plain low-rank targets"):
        fvt.lora.factors(dora)
    with pytest.raises(UsageError, match="a DoRA target takes one adapter alone"):
        fvt.lora.call(model, tree, [dora, a], *inputs)


# ---- numeric and shape safety (issue 13): each a typed error naming the key
def test_conv_lora_whose_kernel_does_not_fit_is_refused(tmp_path):
    tree = fvt.ParamTree({"c.weight": torch.zeros(4, 2, 3, 3)})
    bad = LoraAdapter({"c.weight": LowRank(torch.ones(2, 2, 1, 9), torch.ones(4, 2, 1, 1), 1.0)})  # 18 elements, not 3x3
    with pytest.raises(ShapeMismatchError, match=r"'c\.weight'.*A \[2, 2, 1, 9\].*does not fit the weight \[4, 2, 3, 3\]"):
        fvt.lora.merge(tree, bad)
    fvt.lora.save(bad, tmp_path / "bad.safetensors", format="comfy")
    with pytest.raises(ShapeMismatchError, match=r"bad\.safetensors.*c\.weight.*does not fit"):
        fvt.lora.load(tmp_path / "bad.safetensors", base=tree)
    flat = LoraAdapter({"c.weight": LowRank(torch.ones(2, 18), torch.ones(4, 2, 1, 1), 1.0)})  # a flat A is fine
    assert fvt.lora.merge(tree, flat)["c.weight"].shape == (4, 2, 3, 3)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int8])
def test_complex_and_integer_factors_are_refused(dtype):
    with pytest.raises(ShapeMismatchError, match=rf"'w' A .*{str(dtype).split('.')[1]}.*floating point"):
        LoraAdapter({"w": LowRank(torch.ones(2, 3, dtype=dtype), torch.ones(4, 2), 1.0)})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_are_checked_for_nan_after_upcast(dtype):
    A = torch.full((2, 3), float("nan")).to(dtype)
    with pytest.raises(NumericError, match=r"'w' A holds NaN or Inf"):
        LoraAdapter({"w": LowRank(A, torch.ones(4, 2), 1.0)})
    ok = LoraAdapter({"w": LowRank(torch.ones(2, 3).to(dtype), torch.ones(4, 2).to(dtype), 1.0)})
    assert torch.equal(fvt.lora.merge({"w": torch.zeros(4, 3)}, ok)["w"], torch.full((4, 3), 2.0))


def test_fp16_overflow_is_a_numeric_error_naming_the_key(tmp_path):
    tree = fvt.ParamTree({"a.weight": torch.full((4, 3), 60000.0, dtype=torch.float16), "b.weight": torch.zeros(4, 3, dtype=torch.float16)})
    big = LoraAdapter({"a.weight": LowRank(torch.full((1, 3), 100.0), torch.full((4, 1), 100.0), 1.0)})
    with pytest.raises(NumericError, match=r"'a\.weight'.*Inf/NaN in torch\.float16"):
        fvt.lora.merge(tree, big)
    fvt.save(tree, tmp_path / "base.safetensors")
    with pytest.raises(NumericError, match=r"'a\.weight'.*overflow"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", big, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # the same merge into float32 is fine
    assert torch.isfinite(fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", big, tmp_path / "f32.safetensors", dtype=torch.float32)
                          and fvt.load(tmp_path / "f32.safetensors")["a.weight"]).all()


def test_dora_magnitude_of_the_wrong_length_and_zero_norm_rows(model, tree, inputs):
    A, B = torch.ones(2, 3), torch.ones(4, 2)
    for mag in (torch.ones(5), torch.ones(1, 4), torch.ones(2, 2)):
        with pytest.raises(ShapeMismatchError, match=r"'w'.*DoRA magnitude of shape .* fits neither"):
            LoraAdapter({"w": LowRank(A, B, 1.0, magnitude=mag)})
    key = "blocks.0.attn1.to_q.weight"
    w = tree[key].clone()
    w[1] = 0
    zero = fvt.ParamTree({**tree, key: w})
    d = LowRank(torch.ones(1, w.shape[1]), torch.zeros(w.shape[0], 1), 1.0, magnitude=torch.ones(w.shape[0]))
    adapter = LoraAdapter({key: d})
    with pytest.raises(NumericError, match=rf"'{key}'.*row 1 has norm 0"):
        fvt.lora.merge(zero, adapter)
    with pytest.raises(NumericError, match=rf"'{key}'.*row 1 has norm 0"):
        fvt.lora.call(model, zero, adapter, *inputs)
    col = LowRank(torch.ones(1, w.shape[1]), torch.zeros(w.shape[0], 1), 1.0, magnitude=torch.ones(1, w.shape[1]))
    w2 = tree[key].clone()
    w2[:, 2] = 0
    with pytest.raises(NumericError, match=rf"'{key}'.*input column 2 has norm 0"):
        fvt.lora.merge(fvt.ParamTree({**tree, key: w2}), LoraAdapter({key: col}))


def test_dora_on_the_input_axis_merges_calls_and_restores(model, tree, inputs):
    """A ``[1, in]`` magnitude scales columns: ``W' = (W + sBA) * m / ||W + sBA||_col`` (LyCORIS wd_on_output=False)."""
    key = "blocks.0.attn1.to_q.weight"
    w = tree[key]
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g) * 0.1
    m = torch.rand(1, w.shape[1], generator=g) + 0.5
    adapter = LoraAdapter({key: LowRank(A, B, 0.5, magnitude=m)})
    full = w.double() + 0.5 * (B.double() @ A.double())
    want = full * (m.double() / full.norm(dim=0, keepdim=True))
    merged, record = fvt.lora.merge_with_record(tree, adapter)
    torch.testing.assert_close(merged[key].double(), want, rtol=1e-6, atol=1e-6)
    assert fvt.lora.restore(merged, record) == tree
    got = fvt.lora.call(model, tree, adapter, *inputs)
    ref = torch.func.functional_call(model, dict(merged), inputs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_cli_merge_streams_peft_dora_as_fvt_lora_merge(tmp_path, tree):
    """``fvtransform merge`` used to refuse every DoRA file; it streams them now, row tile by row tile."""
    from fvtransform.cli._main import main

    base = adapter_for(tree, rank=2)
    norms = {k: (tree[k].float() + d.scale * (d.B @ d.A)).norm(dim=1) for k, d in base.items()}
    dora = LoraAdapter({k: LowRank(d.A, d.B, d.scale, magnitude=norms[k] * 1.2) for k, d in base.items()})
    fvt.lora.save(dora, tmp_path / "dora", format="peft")
    fvt.save(tree, tmp_path / "base.safetensors")
    args = ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "dora"), "--quiet", "-o"]
    assert main([*args, str(tmp_path / "out.safetensors")]) == 0
    loaded = fvt.lora.load(tmp_path / "dora", base=tree)
    assert all(d.dora_eps == 0.0 for d in loaded.values())  # PEFT adds no epsilon to the norms
    assert fvt.load(tmp_path / "out.safetensors") == fvt.lora.merge(tree, loaded)
    assert main([*args, str(tmp_path / "bf16.safetensors"), "--dtype", "bf16"]) == 0
    merged = fvt.lora.merge(fvt.cast(tree, torch.float32), loaded)
    for k in dora:  # rounded once from float32 into bf16
        assert torch.equal(fvt.load(tmp_path / "bf16.safetensors")[k], merged[k].to(torch.bfloat16))


def test_load_renames_file_modules_with_a_keymap_before_matching_the_base(tree):
    from fvtransform import Fuse, KeyMap

    file = {"net.blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 16), "net.blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 2)}
    with pytest.raises(KeyMismatchError, match="no base module matches"):
        fvt.lora.load(file, base=tree)
    a = fvt.lora.load(file, base=tree, rename=KeyMap.of([("net.{rest*}", "{rest}")]))
    assert list(a) == ["blocks.0.attn1.to_q.weight"]
    assert a.report.targets["blocks.0.attn1.to_q.weight"] == "net.blocks.0.attn1.to_q.lora_A.weight"
    assert list(fvt.lora.load(file, base=tree, rename=[("net.{rest*}", "{rest}")])) == list(a)  # what KeyMap.of takes
    unused = KeyMap.of([("net.{rest*}", "{rest}"), ("other.{rest*}", "{rest}")])
    with pytest.raises(KeyMismatchError, match=r"rules matched no key: other.\{rest\*\} -> \{rest\}"):
        fvt.lora.load(file, base=tree, rename=unused)  # strict: every rule the caller named is used
    assert list(fvt.lora.load(file, base=tree, rename=unused, strict=False)) == list(a)
    with pytest.raises(UsageError, match="a key map is a KeyMap, a dict of names"):
        fvt.lora.load(file, base=tree, rename=3)
    two = {**file, "net.blocks.0.attn1.to_k.lora_A.weight": torch.randn(2, 16), "net.blocks.0.attn1.to_k.lora_B.weight": torch.randn(16, 2)}
    fuse = KeyMap.of([Fuse(["net.blocks.0.attn1.to_q", "net.blocks.0.attn1.to_k"], "blocks.0.attn1.qk", dim=0)])
    with pytest.raises(UsageError, match=r"fuses or splits .*a LoRA.s modules are only renamed"):
        fvt.lora.load(two, base=tree, rename=fuse)


def test_the_report_names_the_scale_convention_of_the_format(tmp_path, tree):
    a = adapter_for(tree, alpha=3.0)
    kohya = fvt.lora.load(fvt.lora.save(a, tmp_path / "k.safetensors", format="kohya"), base=tree)
    assert kohya.report.format == "kohya" and "alpha / rank" in kohya.report.convention and "fvt.scales" in kohya.report.convention
    peft = fvt.lora.load(fvt.lora.save(a, tmp_path / "p", format="peft").parent, base=tree)
    assert "adapter_config.json" in peft.report.convention and set(peft.report.targets) == set(a)
    assert "scale:" in str(peft.report)


def test_every_adapter_carries_a_report_through_tree_map_and_replace(tree):
    import torch.utils._pytree as pytree

    made = adapter_for(tree)
    assert made.report.ok and dict(made.report.targets) == {k: k for k in made} and made.report.format == "memory"
    file = {"blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 16), "blocks.0.attn1.to_q.lora_B.weight": torch.randn(16, 2),
            "junk": torch.zeros(1)}
    loaded = fvt.lora.load(file, base=tree, strict=False)
    assert [k for k, _ in loaded.report.skipped] == ["junk"]
    mapped = pytree.tree_map(lambda t: t * 2, loaded)
    assert isinstance(mapped, LoraAdapter) and mapped.report == loaded.report
    assert loaded.replace(format="renamed").report == loaded.report  # same targets: the same account
    fewer = loaded.replace({})
    assert fewer.report.ok and dict(fewer.report.targets) == {}  # new targets: a new (empty) account


def test_random_adapter_on_a_weight_without_rows():
    # seen by an outside tester: a bare IndexError (the fan-in was read from row 0)
    tree = fvt.ParamTree({"a.weight": torch.zeros(0, 5), "b.weight": torch.zeros(3, 5)})
    adapter = fvt.lora.random_adapter(tree, targets="*.weight", rank=2, seed=0)
    assert adapter["a.weight"].B.shape == (0, 2) and adapter["a.weight"].A.shape == (2, 5)
    assert torch.equal(fvt.lora.merge(tree, adapter)["a.weight"], tree["a.weight"])


def test_an_adapter_whose_factors_are_all_zero_merges_to_the_base():
    # every rank is padding: dropped before the merge, which then had a rank-0 factor it could not reshape
    g = torch.Generator().manual_seed(1)
    tree = {"w": torch.randn(4, 3, generator=g), "c": torch.randn(5, 2, 3, 3, generator=g)}
    a = LoraAdapter({"w": LowRank(torch.zeros(2, 3), torch.zeros(4, 2), 1.0),
                     "c": LowRank(torch.zeros(2, 2, 3, 3), torch.zeros(5, 2, 1, 1), 0.5)})
    for donate in (False, True):
        t = {k: v.clone() for k, v in tree.items()}
        merged = fvt.lora.merge(t, a, donate=donate)
        assert all(torch.equal(merged[k], tree[k]) for k in tree)
    w = tree["w"].clone().requires_grad_()
    assert torch.equal(fvt.lora.merge({"w": w, "c": tree["c"]}, a)["w"].detach(), tree["w"])  # the differentiable path
