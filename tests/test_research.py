"""Tree tools for research (issue 19, item 4): map over several trees, soup and task-vector arithmetic,
adapters as trees, a LoRA initialiser for training (checked against PEFT's initial factors)."""

from __future__ import annotations

import math
import re

from hypothesis import given, settings, strategies as st
import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora import FullDelta, LoraAdapter, LowRank
from fvtransform.lora._adapter import LoHa
from fvtransform.testing import adapters, assert_no_mutation, trees


def _t(seed: int = 0, dtype: torch.dtype = torch.float32) -> fvt.ParamTree:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, generator=g).to(dtype)
    return fvt.ParamTree({"a.weight": w, "a.bias": torch.randn(3, generator=g).to(dtype), "tied": w,
                          "ids": torch.arange(3)})


# --- map_tensors over several trees -------------------------------------------------------------------------------


def test_map_tensors_over_several_aligned_trees_in_the_first_trees_order() -> None:
    a, b = _t(0), _t(1)
    shuffled = dict(reversed(list(b.items())))  # aligned by key, not by order
    got = assert_no_mutation(fvt.map_tensors, a, lambda x, y, z: x + y * z, shuffled, b)
    assert list(got) == list(a)
    for k in a:
        assert torch.equal(got[k], a[k] + b[k] * b[k])
    assert got["tied"] is got["a.weight"]  # tied in every tree: one call, still tied
    keyed = fvt.map_tensors(a, lambda k, x, y: y if k == "ids" else x, b, with_keys=True)
    assert keyed["ids"] is b["ids"] and keyed["a.bias"] is a["a.bias"]


def test_map_tensors_of_several_trees_with_only_keeps_the_first_trees_other_tensors() -> None:
    a, b = _t(0), _t(1)
    got = fvt.map_tensors(a, torch.sub, b, only="a.*")
    assert torch.equal(got["a.bias"], a["a.bias"] - b["a.bias"]) and got["ids"] is a["ids"]
    with pytest.raises(KeyMismatchError, match=r"only='nope\.\*' matched no key of the tree \(4 keys"):
        fvt.map_tensors(a, torch.sub, b, only="nope.*")
    with pytest.raises(KeyMismatchError, match=r"only='nope\.\*' matched no key"):
        fvt.map_tensors(a, torch.neg, only="nope.*")  # one tree: as select does


def test_map_tensors_misaligned_keys_list_each_trees_missing_and_extra_keys() -> None:
    a = _t(0)
    b = {**dict(_t(1)), "extra.w": torch.zeros(1)}
    c = {k: v for k, v in _t(2).items() if k != "ids"}
    msg = (r"map_tensors: the trees' keys are not aligned with tree 0 \(4 keys\): tree 1 lacks \[\] and has extra "
           r"\['extra.w'\]; tree 2 lacks \['ids'\] and has extra \[\]")
    with pytest.raises(KeyMismatchError, match=msg):
        fvt.map_tensors(a, lambda x, y, z: x, b, c)


def test_map_tensors_mistakes_show_the_right_call() -> None:
    a, b = _t(0), _t(1)
    with pytest.raises(UsageError, match=r"takes the tree first; found builtin_function_or_method first. "
                                         r"Call fvt.map_tensors\(tree, add, <ParamTree>\)"):
        fvt.map_tensors(torch.add, a, b)  # JAX's tree_map order
    with pytest.raises(UsageError, match=r"tree 1 is int, not a tree"):
        fvt.map_tensors(a, torch.add, 3)
    with pytest.raises(UsageError, match=r"fn must be callable; found ParamTree"):
        fvt.map_tensors(a, b)


def test_map_tensors_factory_takes_the_other_trees() -> None:
    a, b = _t(0), _t(1)
    step = fvt.transforms.map_tensors(torch.add, b, only="a.*")
    assert step(a) == fvt.map_tensors(a, torch.add, b, only="a.*")
    assert repr(step) == "map_tensors(add, <4 keys>)"


# --- arithmetic --------------------------------------------------------------------------------------------------


def test_add_subtract_scale_lerp_round_once_from_float32() -> None:
    a, b = _t(0, torch.bfloat16), _t(1, torch.bfloat16)
    f = {k: v.float() for k, v in a.items()}
    g = {k: v.float() for k, v in b.items()}
    for k in ("a.weight", "a.bias"):
        assert torch.equal(fvt.add(a, b, alpha=0.3)[k], (f[k] + 0.3 * g[k]).bfloat16())
        assert torch.equal(fvt.subtract(a, b)[k], (f[k] - g[k]).bfloat16())
        assert torch.equal(fvt.subtract(a, b, dtype="float32")[k], f[k] - g[k])  # a task vector, exact
        assert torch.equal(fvt.scale(a, 0.7)[k], (0.7 * f[k]).bfloat16())
        assert torch.equal(fvt.lerp(a, b, 0.3)[k], torch.lerp(f[k], g[k], 0.3).bfloat16())
        assert torch.equal(fvt.lerp(a, b, 0.0)[k], a[k]) and torch.equal(fvt.lerp(a, b, 1.0)[k], b[k])
    out = fvt.add(a, b)
    assert out["tied"] is out["a.weight"] and out["ids"] is a["ids"]  # ties kept; integer tensors kept
    assert out["a.weight"].dtype == torch.bfloat16


def test_float64_inputs_accumulate_in_float64() -> None:
    one = {"w": torch.ones(1, dtype=torch.float64)}
    tiny = {"w": torch.full((1,), 1e-12, dtype=torch.float64)}
    assert fvt.add(one, tiny)["w"].item() == 1.0 + 1e-12  # float32 would lose the 1e-12
    assert fvt.add(fvt.cast(one, torch.float32), fvt.cast(tiny, torch.float32), dtype="float64")["w"].item() == 1.0 + float(
        torch.tensor(1e-12, dtype=torch.float32))


def test_task_arithmetic_adds_a_float32_task_vector_to_a_bfloat16_base_with_one_rounding() -> None:
    base, tuned = _t(0, torch.bfloat16), _t(1, torch.bfloat16)
    tau = fvt.subtract(tuned, base, dtype="float32")
    with pytest.raises(ShapeMismatchError, match=r"add: 'a.weight' has different dtypes \(tree 0: torch.bfloat16, tree 1: "
                                                 r"torch.float32\). Fix: pass dtype= for the result"):
        fvt.add(base, tau, alpha=0.5)
    got = fvt.add(base, tau, alpha=0.5, dtype=torch.bfloat16)
    assert torch.equal(got["a.weight"], (base["a.weight"].float() + 0.5 * tau["a.weight"]).bfloat16())
    assert torch.equal(fvt.add(base, tau, alpha=1.0, dtype="bf16")["a.bias"], tuned["a.bias"])  # exact round trip


def test_weighted_mean_is_a_soup_of_n_trees() -> None:
    ts = [_t(i, torch.bfloat16) for i in range(3)]
    got = assert_no_mutation(fvt.weighted_mean, ts, weights=[1.0, 2.0, 1.0])
    want = (ts[0]["a.weight"].float() + 2 * ts[1]["a.weight"].float() + ts[2]["a.weight"].float()) / 4
    assert torch.equal(got["a.weight"], want.bfloat16())
    assert fvt.weighted_mean([ts[0]] * 3) == ts[0]  # the mean of equal trees is the tree
    assert torch.equal(fvt.weighted_mean(ts[:2])["a.bias"], fvt.lerp(ts[0], ts[1], 0.5)["a.bias"])


def test_learned_soup_weights_get_gradients() -> None:
    a, b = _t(0), _t(1)
    w = torch.tensor(0.25)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return fvt.lerp(a, b, w)["a.bias"].sum()

    assert torch.allclose(torch.func.grad(loss)(w), (b["a.bias"] - a["a.bias"]).sum())


@pytest.mark.parametrize("call, error, match", [
    (lambda a, b: fvt.add(a, {**b, "x": b["ids"]}), KeyMismatchError, r"add: the trees' keys are not aligned .* extra \['x'\]"),
    (lambda a, b: fvt.add(a, {**b, "a.bias": torch.zeros(4)}), ShapeMismatchError,
     r"add: 'a.bias' has shape \[3\] in tree 0 and \[4\] in tree 1"),
    (lambda a, b: fvt.add(a, {**b, "ids": torch.arange(3) + 1}), ShapeMismatchError,
     r"add: 'ids' is torch.int64 in tree 0 and torch.int64 in tree 1 with other values"),
    (lambda a, b: fvt.add(a, b, alpha=True), UsageError, r"fvt.add: alpha must be a real number; found bool"),
    (lambda a, b: fvt.add(a, b, alpha=torch.ones(2)), UsageError, r"alpha must be a number or a 0-d floating tensor"),
    (lambda a, b: fvt.scale(a, math.nan), NumericError, r"fvt.scale: factor=nan is not finite"),
    (lambda a, b: fvt.lerp(a, b, "half"), UsageError, r"fvt.lerp: weight must be a real number"),
    (lambda a, b: fvt.add(fvt.cast(a, torch.float8_e4m3fn), fvt.cast(b, torch.float8_e4m3fn)), UsageError,
     r"fvt.add: 'a.weight' is torch.float8_e4m3fn; .* Dequantize the tree first"),
    (lambda a, b: fvt.add(a, b, dtype=torch.float8_e5m2), UsageError, r"dtype=torch.float8_e5m2 is float8"),
    (lambda a, b: fvt.add(a, b, dtype=torch.int8), UsageError, r"expected a floating torch.dtype"),
    (lambda a, b: fvt.add(a, b, only="zz*"), KeyMismatchError, r"only='zz\*' matched no key"),
    (lambda a, b: fvt.add(0.5, a), UsageError, r"fvt.add\(tree, other\) takes the tree first"),
    (lambda a, b: fvt.add(a, b, alpha=math.inf), NumericError, r"alpha=inf is not finite"),
    (lambda a, b: fvt.weighted_mean(a, b), UsageError, r"takes a list of one or more trees; found <ParamTree>"),
    (lambda a, b: fvt.weighted_mean([]), UsageError, r"takes a list of one or more trees"),
    (lambda a, b: fvt.weighted_mean([a, b], weights=[1.0]), UsageError, r"weights must be a list of one number per tree \(2\)"),
    (lambda a, b: fvt.weighted_mean([a, b], weights=[1.0, -1.0]), UsageError, r"sum to 0"),
    (lambda a, b: fvt.weighted_mean([a, {"x": b["ids"]}]), KeyMismatchError, r"weighted_mean: the trees' keys are not aligned"),
    (lambda a, b: fvt.chain(fvt.weighted_mean), UsageError, r"fvt.weighted_mean is an eager call: .* it has no transform form"),
    (lambda a, b: fvt.transforms.add(a, b), UsageError, r"takes no tree; to run it now on the tree use fvt.add\(tree, "),
    (lambda a, b: fvt.transforms.lerp(b, math.nan), NumericError, r"weight=nan is not finite"),
    (lambda a, b: fvt.add(b), UsageError, r"fvt.add\(tree, other\) runs now, on a tree; inside chain use fvt.transforms.add\("),
    (lambda a, b: fvt.transforms.scale(a, 2.0), UsageError, r"use fvt.scale\(tree, 2.0\)"),
    (lambda a, b: fvt.add(a, fvt.to(b, "meta")), UsageError, r"fvt.add: 'a.weight' is on cpu in tree 0 and on meta in tree 1"),
])
def test_arithmetic_errors_are_typed_and_name_the_key(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(_t(0), _t(1))


def test_arithmetic_factories_equal_the_eager_calls() -> None:
    a, b = _t(0), _t(1)
    assert fvt.transforms.add(b, alpha=0.5)(a) == fvt.add(a, b, alpha=0.5)
    assert fvt.transforms.subtract(b)(a) == fvt.subtract(a, b)
    assert fvt.transforms.scale(2.0, only="a.*")(a) == fvt.scale(a, 2.0, only="a.*")
    assert fvt.transforms.lerp(b, 0.25)(a) == fvt.lerp(a, b, 0.25)
    step = fvt.chain(fvt.transforms.lerp(b, 0.5), fvt.transforms.cast("bf16"))
    assert repr(step) == "chain(lerp(0.5), cast(torch.bfloat16))"
    assert step(a) == fvt.cast(fvt.lerp(a, b, 0.5), "bf16")


@settings(max_examples=25, deadline=None, database=None)
@given(trees(dtypes=(torch.bfloat16, torch.float16)), st.floats(-2, 2, allow_nan=False, width=16))
def test_soup_laws_on_drawn_trees(tree: fvt.ParamTree, w: float) -> None:
    assert assert_no_mutation(fvt.lerp, tree, tree, w) == tree
    assert fvt.weighted_mean([tree, tree, tree]) == tree
    assert fvt.subtract(fvt.add(tree, tree, dtype="float32"), tree, dtype="float32") == fvt.cast(tree, "float32")
    assert fvt.add(tree, tree).aliases() == tree.aliases()


# --- adapters as trees -------------------------------------------------------------------------------------------


def _adapter() -> LoraAdapter:
    g = torch.Generator().manual_seed(3)
    return LoraAdapter({
        "a.weight": LowRank(torch.randn(2, 2, generator=g), torch.randn(3, 2, generator=g), 0.5,
                            magnitude=torch.rand(3, generator=g) + 0.5),
        "b.weight": FullDelta(torch.randn(3, 2, generator=g), 0.25),
        "c.weight": LoHa(*(torch.randn(s, generator=g) for s in ((3, 2), (2, 2), (3, 2), (2, 2))), scale=0.75),
    }, format="peft", metadata={"k": "v"})


def test_select_drop_rename_take_an_adapter_and_return_an_adapter() -> None:
    a = _adapter()
    s = fvt.select(a, "a.*")
    assert isinstance(s, LoraAdapter) and list(s) == ["a.weight"] and s["a.weight"] is a["a.weight"]
    assert s.format == "peft" and dict(s.metadata) == {"k": "v"}
    assert list(fvt.select(a, lambda k, d: isinstance(d, FullDelta))) == ["b.weight"]  # a predicate sees the delta
    assert list(fvt.drop(a, ["a.weight", "c.*"])) == ["b.weight"]
    r = fvt.rename(a, [("{m}.weight", "blocks.{m}.weight")])
    assert list(r) == ["blocks.a.weight", "blocks.b.weight", "blocks.c.weight"] and r["blocks.b.weight"] is a["b.weight"]
    assert fvt.rename(r, fvt.KeyMap.of([("{m}.weight", "blocks.{m}.weight")]).inverse()) == a
    assert fvt.select(a, "zz*", allow_empty=True) == LoraAdapter({})


@pytest.mark.parametrize("call, error, match", [
    (lambda a: fvt.select(a, "zz*"), KeyMismatchError, r"pattern='zz\*' matched no target of the adapter \(3 targets"),
    (lambda a: fvt.select(a, ["a.weigth"]), KeyMismatchError, r"named keys not in the tree: 'a.weigth' \(did you mean \['a.weight'"),
    (lambda a: fvt.drop(a, "zz*"), KeyMismatchError, r"pattern='zz\*' matched no target"),
    (lambda a: fvt.rename(a, {"zz": "y"}), KeyMismatchError, r"rules matched no key: zz -> y"),
    (lambda a: fvt.rename(a, [fvt.Fuse(["a.weight", "b.weight"], "ab.weight")]), UsageError,
     r"fuses or splits keys; an adapter's deltas are renamed, not fused or split"),
    (lambda a: fvt.map_tensors(a, torch.neg, only="zz*"), KeyMismatchError, r"only='zz\*' matched no target"),
    (lambda a: fvt.map_tensors(a, torch.add, {"a.weight": torch.zeros(1)}), UsageError,
     r"argument 1 of others is dict; with an adapter first, the others are adapters too"),
    (lambda a: fvt.map_tensors(a, torch.add, fvt.select(a, "a.*")), KeyMismatchError,
     r"adapter 1 lacks targets \['b.weight', 'c.weight'\] and has extra targets \[\]"),
    (lambda a: fvt.map_tensors(fvt.select(a, "a.*"), torch.add, LoraAdapter({"a.weight": FullDelta(torch.zeros(3, 2))})),
     ShapeMismatchError, r"target 'a.weight' is LowRank\(r=2, scale=0.5\) in adapter 0 and FullDelta\(\[3, 2\], scale=1\)"),
    (lambda a: fvt.map_tensors(a, lambda t: t * math.inf), NumericError, r"holds NaN or Inf"),
])
def test_adapter_tree_operation_errors(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(_adapter())


def test_map_tensors_over_adapters_maps_every_factor() -> None:
    a = _adapter()
    half = assert_no_mutation(fvt.map_tensors, a, lambda t: t.to(torch.bfloat16))
    assert isinstance(half, LoraAdapter) and half.scales == a.scales
    assert all(t.dtype == torch.bfloat16 for d in half.values() for t in d.tensors())
    assert half["a.weight"].magnitude is not None and half["a.weight"].magnitude.dtype == torch.bfloat16
    mid = fvt.map_tensors(a, lambda x, y: torch.lerp(x, y, 0.5), fvt.map_tensors(a, torch.neg))
    assert all(torch.equal(t, torch.zeros_like(t)) for d in mid.values() for t in d.tensors())
    seen = []
    fvt.map_tensors(a, lambda k, t: seen.append(k) or t, with_keys=True, only="a.*")
    assert seen == ["a.weight"] * 3  # A, B, magnitude of the one matching target
    tree = fvt.ParamTree({"a.weight": torch.randn(3, 2), "b.weight": torch.randn(3, 2), "c.weight": torch.randn(3, 2)})
    assert torch.allclose(fvt.lora.merge(tree, half)["c.weight"].float(), fvt.lora.merge(tree, a)["c.weight"], atol=0.05)


def test_from_factors_inverts_factors() -> None:
    tree = fvt.ParamTree({"l.weight": torch.randn(4, 3), "m.weight": torch.randn(5, 4)})
    a = fvt.lora.random_adapter(tree, targets="*.weight", rank=2, alpha=1.0)  # scale 0.5: exact in float32
    f = fvt.lora.factors(a)
    b = fvt.lora.from_factors(f)
    assert isinstance(b, LoraAdapter) and list(b) == list(a)
    for k in a:
        assert b[k].A is a[k].A and b[k].B is a[k].B and b[k].scale == a[k].scale
    again = fvt.lora.factors(b)
    assert all(all(torch.equal(x, y) for x, y in zip(again[k], f[k])) for k in f)
    assert fvt.lora.merge(tree, b) == fvt.lora.merge(tree, a)
    assert fvt.lora.from_factors({"w": (torch.ones(1, 2), torch.ones(2, 1), 0.3)})["w"].scale == 0.3


@pytest.mark.parametrize("value, error, match", [
    ([("w", 1)], UsageError, r"takes the mapping key -> \(A, B, scale\) that fvt.lora.factors returns; found list"),
    ({"w": (torch.ones(1, 2), torch.ones(2, 1))}, UsageError, r"factors\['w'\] must be \(A, B, scale\)"),
    ({"w": (torch.ones(1, 2), torch.ones(2, 1), torch.ones(2))}, UsageError, r"the scale of 'w' is a tensor of shape \[2\]"),
    ({"w": (torch.ones(1, 2), torch.ones(2, 1), "1")}, UsageError, r"the scale of 'w' is str"),
    ({"w": (torch.ones(1, 2), torch.ones(2, 1), torch.tensor(math.inf))}, NumericError, r"the scale of 'w' is inf"),
    ({"w": (torch.ones(1, 2), torch.ones(2, 3), 1.0)}, ShapeMismatchError, r"adapter target 'w': rank mismatch"),
])
def test_from_factors_errors(value, error, match) -> None:
    with pytest.raises(error, match=match):
        fvt.lora.from_factors(value)


# --- the initialiser ---------------------------------------------------------------------------------------------


def test_init_adapter_is_kaiming_uniform_A_and_zero_B_seeded() -> None:
    w = torch.randn(8, 16)
    tree = fvt.ParamTree({"l.weight": w, "tied.weight": w, "c.weight": torch.randn(6, 4, 3, 3), "l.bias": torch.zeros(8)})
    a = fvt.lora.init_adapter(tree, targets="*.weight", rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert list(a) == ["l.weight", "c.weight"]  # a tied weight is targeted once
    lin, conv = a["l.weight"], a["c.weight"]
    assert isinstance(lin, LowRank) and isinstance(conv, LowRank)
    assert lin.A.shape == (4, 16) and lin.B.shape == (8, 4) and conv.A.shape == (4, 4, 3, 3) and conv.B.shape == (6, 4, 1, 1)
    assert lin.scale == 2.0 and lin.alpha == 8.0 and lin.A.dtype == torch.float32
    assert lin.A.abs().max() <= 1 / math.sqrt(16) and conv.A.abs().max() <= 1 / math.sqrt(36)
    assert lin.A.abs().max() > 0.5 / math.sqrt(16)
    assert not lin.B.any() and not lin.A.requires_grad
    assert fvt.lora.merge(tree, a) == tree  # B = 0: the adapter starts as the identity
    again = fvt.lora.init_adapter(tree, targets="*.weight", rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["c.weight"].A, conv.A)
    bf = fvt.lora.init_adapter(tree, targets="l.weight", rank=4, dtype="bf16", generator=torch.Generator().manual_seed(0))
    assert torch.equal(bf["l.weight"].A, lin.A.bfloat16())  # drawn in float32, rounded once


def test_init_adapter_gives_peft_initial_factors_for_the_same_generator_state() -> None:
    """PEFT draws A with ``nn.init.kaiming_uniform_(A, a=sqrt(5))`` on torch's global generator, after the draws that
    building its ``nn.Linear``/``nn.Conv2d`` layers make. So the order of draws across layers cannot match one
    generator; per layer, the global RNG state just before PEFT's draw, given to ``init_adapter``, must give the
    same bits."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Conv2d(3, 4, 3))
    states: list[torch.Tensor] = []
    original = torch.nn.init.kaiming_uniform_

    def record(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        states.append(torch.get_rng_state())
        return original(tensor, *args, **kwargs)  # type: ignore[arg-type]

    torch.nn.init.kaiming_uniform_ = record  # type: ignore[assignment]
    try:
        states.clear()
        lora = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "1"]))
    finally:
        torch.nn.init.kaiming_uniform_ = original
    ours = fvt.ParamTree({"0.weight": model[0].base_layer.weight, "1.weight": model[1].base_layer.weight})
    checked = 0
    for key, layer in (("0.weight", lora.base_model.model[0]), ("1.weight", lora.base_model.model[1])):
        want_A, want_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for state in states:  # PEFT's own layer constructions draw too; one recorded state is the lora_A draw
            g = torch.Generator().set_state(state)
            got = fvt.lora.init_adapter(fvt.select(ours, key), targets=key, rank=3, alpha=6, generator=g)[key]
            if torch.equal(got.A, want_A.detach()):
                assert torch.equal(got.B, want_B.detach()) and got.scale == layer.scaling["default"]
                checked += 1
                break
    assert checked == 2


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 0}, UsageError, r"fvt.lora.init_adapter: rank must be a whole number from 1 to 65536"),
    ({"rank": 2, "alpha": math.nan}, UsageError, r"alpha must be a finite, non-zero number or None; found nan"),
    ({"rank": 2, "generator": 0}, UsageError, r"generator must be a torch.Generator; found int"),
    ({"rank": 2, "dtype": torch.float8_e4m3fn}, UsageError, r"dtype=torch.float8_e4m3fn is float8"),
    ({"rank": 2, "targets": "*.bias"}, KeyMismatchError, r"targets='\*.bias' matched no weight with 2 or more dims "
                                                         r"\(weights look like \['l.weight'\]\)"),
])
def test_init_adapter_errors(kwargs, error, match) -> None:
    tree = fvt.ParamTree({"l.weight": torch.zeros(2, 3), "l.bias": torch.zeros(2)})
    with pytest.raises(error, match=match):
        fvt.lora.init_adapter(tree, **{"targets": "*.weight", **kwargs})


def test_an_initialised_adapter_trains_with_torch_func_grad() -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    tree = fvt.ParamTree.from_module(module)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    adapter = fvt.lora.init_adapter(tree, targets="weight", rank=2, generator=torch.Generator().manual_seed(1))

    def loss(a: LoraAdapter) -> torch.Tensor:
        return torch.nn.functional.mse_loss(fvt.lora.call(module, tree, a, x), y)

    first = loss(adapter).item()
    for _ in range(20):
        g = torch.func.grad(loss)(adapter)
        adapter = fvt.map_tensors(adapter, lambda p, d: p - 0.3 * d, g)
    assert loss(adapter).item() < 0.9 * first
    assert re.fullmatch(r"LoraAdapter\(1 targets, ranks \{2\}, format 'memory'\)", repr(adapter))


# --- strategies for every adapter kind ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, database=None)
@given(trees(conv=True, zero_size=False, dtypes=(torch.float32, torch.bfloat16)), st.data())
def test_adapters_of_every_kind_restore_exactly_on_conv_trees(tree: fvt.ParamTree, data: st.DataObject) -> None:
    adapter = data.draw(adapters(tree, full_deltas=True, dora=True, lycoris=True))
    assert all(d.fits(tuple(tree[k].shape)) for k, d in adapter.items())
    from fvtransform.testing import assert_restores_exactly

    assert_restores_exactly(tree, adapter)


def test_the_strategies_reach_conv_dora_loha_lokr_and_float8() -> None:
    from fvtransform.lora._adapter import LoKr

    seen: set[str] = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(trees(conv=True, zero_size=False, min_modules=3), st.data())
    def collect(tree: fvt.ParamTree, data: st.DataObject) -> None:
        for k, d in data.draw(adapters(tree, dora=True, lycoris=True)).items():
            seen.add(type(d).__name__ + ("+dora" if d.magnitude is not None else "") + ("+conv" if tree[k].dim() == 4 else ""))

    collect()
    assert {"LowRank", "LowRank+dora", "LowRank+conv", "LoHa", LoKr.__name__} <= seen

    @settings(max_examples=10, deadline=None, database=None)
    @given(trees(dtypes=(torch.float8_e4m3fn,)))
    def fp8(tree: fvt.ParamTree) -> None:
        assert {t.dtype for t in tree.values()} == {torch.float8_e4m3fn}

    fp8()


def test_a_tree_only_operation_on_an_adapter_names_the_ones_that_take_it() -> None:
    a = _adapter()
    for call in (lambda: fvt.cast(a, "bf16"), lambda: fvt.transforms.select("a.*")(a), lambda: fvt.add(a, a)):
        with pytest.raises(UsageError, match=r"A LoRA adapter is not a tree: .* fvt.select, fvt.drop, fvt.rename and "
                                             r"fvt.map_tensors take an adapter and return one"):
            call()
