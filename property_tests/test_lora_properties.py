import tempfile
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import given

import fvtransform as fvt
from fvtransform.lora import LoraAdapter, LowRank
from fvtransform.testing import adapters, assert_no_mutation, assert_order_independent, assert_restores_exactly, trees
from _helpers import assert_unchanged, snapshot

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
#: Seeds for torch.Generator: every random tensor of a test comes from one drawn by Hypothesis.
seeds = st.integers(0, 2**16)


@st.composite
def setups(draw, n_adapters=1):
    dtype = draw(st.sampled_from(FLOATS))
    out_f, in_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tree = fvt.ParamTree({"l.weight": torch.randn(out_f, in_f, generator=g).to(dtype), "l.bias": torch.randn(out_f, generator=g).to(dtype)})
    pairs = []
    for _ in range(n_adapters):
        r = draw(st.integers(1, 4))
        scale = draw(st.floats(-2, 2, allow_nan=False, width=32))
        a = LoraAdapter({"l.weight": LowRank(torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3, scale)})
        pairs.append((a, draw(st.floats(-1.5, 1.5, allow_nan=False, width=32))))
    return tree, pairs


def ulp(x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    a = x.double().abs()
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    return torch.clamp(2.0 ** torch.floor(torch.log2(torch.clamp(a, min=tiny))), min=tiny) * eps


@given(setups())
def test_zero_b_leaves_tree_unchanged(setup):
    tree, [(a, s)] = setup
    d = a["l.weight"]
    zero = LoraAdapter({"l.weight": LowRank(d.A, torch.zeros_like(d.B), d.scale)})
    assert fvt.lora.merge(tree, zero, s) == tree


@given(setups())
def test_merge_matches_float64_reference(setup):
    tree, [(a, s)] = setup
    snap = snapshot(tree)
    merged = fvt.lora.merge(tree, a, s)
    assert_unchanged(tree, snap)
    assert merged["l.bias"] is tree["l.bias"]
    d = a["l.weight"]
    ref = tree["l.weight"].double() + s * d.scale * (d.B.double() @ d.A.double())
    err = (merged["l.weight"].double() - ref).abs()
    fp32_acc = (abs(s * d.scale) * (d.B.double().abs() @ d.A.double().abs()) + ref.abs()) * 4 * 2.0**-24
    assert (err <= 0.5 * ulp(merged["l.weight"]) + fp32_acc).all()


@given(trees(), st.data())
def test_merging_a_set_is_order_independent(tree, data):
    pairs = data.draw(st.lists(st.tuples(adapters(tree, full_deltas=True), st.floats(-1.5, 1.5, width=32)),
                               min_size=2, max_size=3))
    assert_order_independent(tree, pairs)


@given(trees(), st.data(), st.integers(1, 10))
def test_restore_after_cycles_is_bit_exact(tree, data, cycles):
    a = data.draw(adapters(tree, full_deltas=True))
    s = data.draw(st.floats(-1.5, 1.5, width=32))
    t = tree
    for _ in range(cycles - 1):
        merged, record = fvt.lora.merge_with_record(t, a, s)
        t = fvt.lora.restore(merged, record)
    assert t == tree
    assert_restores_exactly(t, a, s)


@given(trees(), st.data())
def test_merge_never_mutates_its_inputs(tree, data):
    a = data.draw(adapters(tree, full_deltas=True))
    assert_no_mutation(fvt.lora.merge, tree, a, data.draw(st.floats(-1.5, 1.5, width=32)))


@given(setups())
def test_unmerge_within_one_ulp(setup):
    tree, [(a, s)] = setup
    merged = fvt.lora.merge(tree, a, s)
    back = fvt.lora.unmerge(merged, a, s)
    w, wm = tree["l.weight"], merged["l.weight"]
    bound = torch.maximum(ulp(w), ulp(wm))
    # merge and unmerge each round W +- s*B@A once in float32, but the BLAS sums that form the product include W,
    # so each side's product carries its own float32 accumulation error, a few eps of |s|*|B|@|A| (the long
    # profile found an 8x8 rank-4 case, 6.5e-9 off, where |W| terms alone bounded 5.4e-9).
    d = a["l.weight"]
    product = (d.B.double().abs() @ d.A.double().abs()) * abs(s * d.scale)
    fp32 = (w.double().abs() + wm.double().abs() + product) * 2.0**-22
    assert ((back["l.weight"].double() - w.double()).abs() <= bound + fp32).all()


@given(setups())
def test_combine_single_is_scaled_adapter(setup):
    tree, [(a, s)] = setup
    c = fvt.lora.combine([(a, s)])
    x = fvt.lora.merge(fvt.cast(tree, torch.float32), c)["l.weight"]
    y = fvt.lora.merge(fvt.cast(tree, torch.float32), a, s)["l.weight"]
    assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


@given(setups(), st.sampled_from(["peft", "diffusers", "kohya", "comfy"]))
def test_format_round_trip(setup, fmt):
    tree, [(a, _)] = setup
    with tempfile.TemporaryDirectory() as d:
        path = fvt.lora.save(a, Path(d) / ("x" if fmt in ("peft", "diffusers") else "x.safetensors"), format=fmt)
        back = fvt.lora.load(path.parent if fmt == "peft" else path, base=tree, format=fmt)
    assert back["l.weight"].scale == a["l.weight"].scale
    assert torch.equal(back["l.weight"].A, a["l.weight"].A) and torch.equal(back["l.weight"].B, a["l.weight"].B)


@given(setups(n_adapters=2), seeds)
def test_on_the_fly_matches_merge_and_padding_changes_nothing(setup, seed):
    tree, pairs = setup
    tree = fvt.cast(tree, torch.float32)
    module = _linear(tree)
    x = _inputs(tree, seed)
    fly = fvt.lora.call(module, tree, pairs, x)
    merged = fvt.call(module, fvt.lora.merge(tree, pairs), x)
    assert torch.allclose(fly, merged, atol=1e-4, rtol=1e-4)
    a, s = pairs[0]
    d = a["l.weight"]
    padded = LoraAdapter({"l.weight": LowRank(torch.cat([d.A, torch.zeros(2, d.A.shape[1])]), torch.cat([d.B, torch.zeros(d.B.shape[0], 2)], dim=1), d.scale)})
    # zero rows add exact zeros; only the BLAS summation grouping may differ (float32 rounding)
    assert torch.allclose(fvt.lora.call(module, tree, [(padded, s)], x), fvt.lora.call(module, tree, [(a, s)], x), atol=1e-6, rtol=1e-6)


def _linear(tree):
    """``l``: a Linear of the tree's shape, on meta (its values come from the tree; no draw from torch's RNG)."""
    module = torch.nn.Sequential()
    module.add_module("l", torch.nn.Linear(tree["l.weight"].shape[1], tree["l.weight"].shape[0], device="meta"))
    return module


def _inputs(tree, seed):
    """Three input rows for ``l``, from a Hypothesis-drawn seed (a failure reproduces from its seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, tree["l.weight"].shape[1], generator=g).to(tree["l.weight"].dtype)


@given(setups(n_adapters=2), seeds)
def test_zero_scale_is_exact(setup, seed):
    tree, pairs = setup
    tree = fvt.cast(tree, torch.float32)
    module = _linear(tree)
    x = _inputs(tree, seed)
    snap = snapshot(tree)
    assert torch.equal(fvt.lora.call(module, tree, [(a, 0.0) for a, _ in pairs], x), fvt.call(module, tree, x))
    assert fvt.lora.merge(tree, [(a, 0.0) for a, _ in pairs]) == tree
    assert_unchanged(tree, snap)


@given(setups(n_adapters=2), st.integers(1, 3))
def test_merging_a_padded_adapter_is_bit_exact(setup, extra):
    """pad_rank appends zero ranks; merge drops all-zero ranks before the product, so a padded adapter
    merges (alone, in a set, or unmerged) to the very bits of the unpadded one, whatever the dtype.

    Without the drop the bound is not even one ulp: a longer BLAS sum may be grouped differently,
    and where ``W + s * B @ A`` cancels the last float32 bits are a larger relative error.
    """
    tree, pairs = setup
    snap = snapshot(tree)
    (a, s), (b, t) = pairs
    d = a["l.weight"]
    padded = fvt.lora.pad_rank(a, d.rank + extra)
    p = padded["l.weight"]
    assert p.rank == d.rank + extra and p.scale == d.scale
    assert torch.equal(p.A[: d.rank], d.A) and torch.equal(p.B[:, : d.rank], d.B)
    assert not p.A[d.rank :].any() and not p.B[:, d.rank :].any()
    assert fvt.lora.merge(tree, padded, s) == fvt.lora.merge(tree, a, s)
    assert fvt.lora.merge(tree, [(padded, s), (b, t)]) == fvt.lora.merge(tree, [(b, t), (a, s)])
    merged = fvt.lora.merge(tree, a, s)
    assert fvt.lora.unmerge(merged, padded, s) == fvt.lora.unmerge(merged, a, s)
    assert_unchanged(tree, snap)


def test_padded_merge_is_bit_exact_where_the_product_length_changes_the_bits():
    """Regression (issue 15): rank 4 padded to 5 on a [8, 1] weight; MKL's addmm of inner size 5 rounds
    differently from inner size 4 (measured here: up to 2 float32 ulps where the sum cancels)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 1, generator=g)
    a = LoraAdapter({"w": LowRank(torch.randn(4, 1, generator=g) * 0.3, torch.randn(8, 4, generator=g) * 0.5, 1.0)})
    tree = fvt.ParamTree({"w": w})
    assert fvt.lora.merge(tree, fvt.lora.pad_rank(a, 5)) == fvt.lora.merge(tree, a)


@given(setups(), st.integers(0, 2))
def test_extract_reproduces_the_delta_when_rank_suffices(setup, extra):
    tree, pairs = setup
    a, s = pairs[0]
    base = fvt.cast(tree, torch.float32)
    tuned = fvt.lora.merge(base, a, s)
    if fvt.tensors_equal(tuned["l.weight"], base["l.weight"]):
        return  # a delta below float32 resolution: nothing to extract
    r = a["l.weight"].rank + extra
    ex = fvt.lora.extract(base, tuned, rank=r)
    want = tuned["l.weight"].double() - base["l.weight"].double()
    got = ex["l.weight"].scale * ex["l.weight"].B.double() @ ex["l.weight"].A.double()
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol


@given(setups(n_adapters=2))
def test_compress_to_the_full_rank_is_lossless(setup):
    (a, s), (b, t) = setup[1]
    c = fvt.lora.combine([(a, s), (b, t)])
    full = c["l.weight"].rank
    small, report = fvt.lora.compress_with_report(c, full)
    want = c["l.weight"].scale * c["l.weight"].B.double() @ c["l.weight"].A.double()
    got = small["l.weight"].scale * small["l.weight"].B.double() @ small["l.weight"].A.double()
    assert torch.allclose(got, want, atol=1e-5 * max(1.0, float(want.abs().max())))
    assert report.errors["l.weight"] <= 1e-5


@given(setups(), st.integers(1, 4), seeds)
def test_dora_on_the_fly_matches_merge_and_restore_is_exact(setup, cycles, seed):
    tree, pairs = setup
    a, s = pairs[0]
    d = a["l.weight"]
    w = tree["l.weight"]
    norms = (w.float() + d.scale * (d.B @ d.A)).norm(dim=1)
    mag = norms * (1.0 + 0.1 * torch.randn(norms.shape, generator=torch.Generator().manual_seed(0)))
    dora = LoraAdapter({"l.weight": LowRank(d.A, d.B, d.scale, magnitude=mag)})
    snap = snapshot(tree)
    merged, record = fvt.lora.merge_with_record(tree, dora)
    current = merged
    for _ in range(cycles - 1):  # restore, merge again: the record of the last merge restores it
        current, record = fvt.lora.merge_with_record(fvt.lora.restore(current, record), dora)
    assert fvt.lora.restore(current, record) == tree
    f32 = fvt.cast(tree, torch.float32)
    module = _linear(f32)
    x = _inputs(f32, seed)
    fly = fvt.lora.call(module, f32, dora, x)
    ref = fvt.call(module, fvt.lora.merge(f32, dora), x)
    assert torch.allclose(fly, ref, atol=1e-4, rtol=1e-4)
    assert_unchanged(tree, snap)


LORA_OPS = [
    lambda t, p: fvt.lora.merge(t, p),
    lambda t, p: fvt.lora.unmerge(t, p),
    lambda t, p: fvt.lora.restore(*fvt.lora.merge_with_record(t, p)),
    lambda t, p: fvt.lora.combine(p),
    lambda t, p: fvt.lora.scale_adapter(p[0][0], 0.5),
    lambda t, p: fvt.lora.pad_rank(p[0][0], 6),
    lambda t, p: fvt.lora.factors(p, rank=8),
    lambda t, p: fvt.lora.compress(fvt.lora.combine(p), 1),
    lambda t, p: fvt.lora.extract(fvt.cast(t, torch.float32), fvt.lora.merge(fvt.cast(t, torch.float32), p), rank=2, select="l.weight"),
    lambda t, p: fvt.transforms.merge_lora(p[0][0], scale=p[0][1])(t),
    lambda t, p: fvt.lora.call(_linear(fvt.cast(t, torch.float32)), fvt.cast(t, torch.float32), p, torch.ones(2, t["l.weight"].shape[1])),
    lambda t, p: fvt.lora.call_factors(_linear(t), t, fvt.lora.factors(p), torch.ones(2, t["l.weight"].shape[1], dtype=t["l.weight"].dtype)),
    lambda t, p: fvt.save(t, Path(tempfile.mkdtemp()) / "m.safetensors"),
]


@given(setups(n_adapters=2))
def test_no_public_function_mutates_its_inputs(setup):
    """Trees and every adapter factor keep their values, storage and version counters, whatever runs on them."""
    tree, pairs = setup
    snap = snapshot(tree)
    factor_trees = [fvt.ParamTree({f"{n}": x for n, x in enumerate(a["l.weight"].tensors())}) for a, _ in pairs]
    factor_snaps = [snapshot(f) for f in factor_trees]
    for op in LORA_OPS:
        op(tree, pairs)
        assert_unchanged(tree, snap)
        for f, s in zip(factor_trees, factor_snaps):
            assert_unchanged(f, s)


# ---- LyCORIS LoHa / LoKr (and DoRA on either axis over them)
@st.composite
def lycoris_setups(draw):
    """A linear weight ``[a*b, c*d]`` with a random LoHa or LoKr delta (any LoKr layout), maybe DoRA on either axis."""
    from fvtransform.lora._adapter import LoHa, LoKr

    dtype = draw(st.sampled_from(FLOATS))
    a, b, c, d = (draw(st.integers(1, 4)) for _ in range(4))
    out_f, in_f = a * b, c * d
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    r = draw(st.integers(1, 3))
    alpha = draw(st.floats(0.25, 4, allow_nan=False, width=32))

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    if draw(st.booleans()):
        kw = dict(w1_a=rnd(out_f, r), w1_b=rnd(r, in_f), w2_a=rnd(out_f, r), w2_b=rnd(r, in_f))
        cls, rank = LoHa, r
    else:
        kw = dict(w1=rnd(a, c)) if draw(st.booleans()) else dict(w1_a=rnd(a, r), w1_b=rnd(r, c))
        kw.update(dict(w2=rnd(b, d)) if draw(st.booleans()) else dict(w2_a=rnd(b, r), w2_b=rnd(r, d)))
        cls, rank = LoKr, (r if ("w1_a" in kw or "w2_a" in kw) else None)
    scale = alpha / rank if rank is not None else 1.0
    w = torch.randn(out_f, in_f, generator=g)
    axis = draw(st.sampled_from([None, 0, 1]))
    mag = None
    if axis is not None:
        full = w + scale * cls(**kw, scale=1.0).row_source(torch.device("cpu"))(0, out_f)
        n = full.norm(dim=1) if axis == 0 else full.norm(dim=0).reshape(1, -1)
        mag = n * (1.0 + 0.1 * torch.rand(n.shape, generator=g))
    delta = cls(**kw, scale=scale, alpha=alpha, magnitude=mag)
    tree = fvt.ParamTree({"l.weight": w.to(dtype), "l.bias": torch.randn(out_f, generator=g).to(dtype)})
    return tree, LoraAdapter({"l.weight": delta}), draw(st.floats(-1.5, 1.5, allow_nan=False, width=32))


@given(lycoris_setups(), st.integers(1, 3))
def test_lycoris_restore_is_exact_and_unmerge_within_one_ulp(setup, cycles):
    tree, a, s = setup
    snap = snapshot(tree)
    t = tree
    for _ in range(cycles):
        merged, record = fvt.lora.merge_with_record(t, a, s)
        t = fvt.lora.restore(merged, record)
    assert t == tree
    if a["l.weight"].magnitude is None:
        back = fvt.lora.unmerge(merged, a, s)
        w, wm = tree["l.weight"], merged["l.weight"]
        bound = torch.maximum(ulp(w), ulp(wm))
        fp32 = (w.double().abs() + wm.double().abs()) * 2.0**-22
        assert ((back["l.weight"].double() - w.double()).abs() <= bound + fp32).all()
    assert_unchanged(tree, snap)


@given(lycoris_setups())
def test_lycoris_on_the_fly_matches_merge(setup):
    tree, a, s = setup
    f32 = fvt.cast(tree, torch.float32)
    module = _linear(f32)
    x = torch.randn(3, f32["l.weight"].shape[1], generator=torch.Generator().manual_seed(1))
    fly = fvt.lora.call(module, f32, [(a, s)], x)
    ref = fvt.call(module, fvt.lora.merge(f32, a, s), x)
    assert torch.allclose(fly, ref, atol=1e-4, rtol=1e-4)
