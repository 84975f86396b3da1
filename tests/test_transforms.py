"""One convention: eager ``fvt.X(tree, ...)``, factories ``fvt.transforms.X(...)``, mix-ups that show the right call."""

import re

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FvTransformError, UsageError

from _helpers import assert_unchanged, snapshot


def small():
    return fvt.ParamTree({"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3), "b.weight": torch.ones(2, 2), "ids": torch.arange(3)})


#: name -> (eager call on a tree, the factory's step). fvt.transforms.X(args)(tree) == fvt.X(tree, args).
PAIRS = {
    "select": (lambda t: fvt.select(t, "a.*"), fvt.transforms.select("a.*")),
    "select_empty": (lambda t: fvt.select(t, "z*", allow_empty=True), fvt.transforms.select("z*", allow_empty=True)),
    "drop": (lambda t: fvt.drop(t, ["ids", "b.*"]), fvt.transforms.drop(["ids", "b.*"])),
    "rename": (lambda t: fvt.rename(t, {"ids": "position_ids"}), fvt.transforms.rename({"ids": "position_ids"})),
    "rename_keymap": (
        lambda t: fvt.rename(t, fvt.KeyMap.of([("{m}.weight", "{m}.w")])),
        fvt.transforms.rename(fvt.KeyMap.of([("{m}.weight", "{m}.w")])),
    ),
    "cast": (lambda t: fvt.cast(t, torch.float16, only="a.*"), fvt.transforms.cast(torch.float16, only="a.*")),
    "to": (lambda t: fvt.to(t, "cpu"), fvt.transforms.to("cpu")),
    "map_tensors": (lambda t: fvt.map_tensors(t, torch.neg), fvt.transforms.map_tensors(torch.neg)),
    "update": (lambda t: fvt.update(t, {"ids": torch.zeros(3)}), fvt.transforms.update({"ids": torch.zeros(3)})),
    "quantize_fp8": (lambda t: fvt.quantize_fp8(t, only="a.weight"), fvt.transforms.quantize_fp8(only="a.weight")),
    "dequantize": (lambda t: fvt.dequantize(t, torch.float32), fvt.transforms.dequantize(torch.float32)),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_factory_applied_equals_the_eager_call(name):
    eager, step = PAIRS[name]
    t = small()
    snap = snapshot(t)
    got, want = step(t), eager(t)
    assert isinstance(step, fvt.Transform)
    assert got == want and got.same_order(want)
    assert [k for k in got if k in t and got[k] is t[k]] == [k for k in want if k in t and want[k] is t[k]]
    assert_unchanged(t, snap)


def test_every_factory_has_its_eager_function():
    factories = set(fvt.transforms.__all__) - {"Transform", "chain", "merge_lora", "unmerge_lora"}
    assert factories == {"select", "drop", "rename", "cast", "to", "map_tensors", "update", "add", "subtract", "scale", "lerp", "dequantize", "quantize_fp8"}
    assert all(callable(getattr(fvt, n)) for n in factories)


def test_chain_composes_left_to_right_and_prints():
    t = small()
    f, g = fvt.transforms.select("a.*"), fvt.transforms.cast(torch.float16)
    ch = fvt.chain(f, g)
    assert ch(t) == g(f(t)) == fvt.cast(fvt.select(t, "a.*"), torch.float16)
    assert repr(ch) == "chain(select('a.*'), cast(torch.float16))"
    assert repr(fvt.transforms.rename({"ids": "pos"})) == "rename(KeyMap([ids -> pos, {key*} -> {key} (optional)]))"
    assert fvt.chain(lambda x: fvt.drop(x, "ids"))(t) == fvt.drop(t, "ids")  # any tree -> tree function is a step
    with pytest.raises(UsageError, match="must return a ParamTree"):
        fvt.chain(lambda x: dict(x))(t)
    with pytest.raises(UsageError, match="callable"):
        fvt.chain(3)


def test_lora_merge_and_unmerge_are_factories_in_transforms():
    t = small()
    a = fvt.lora.random_adapter(t, targets="a.weight", rank=1, seed=3)
    step = fvt.transforms.merge_lora(a, 0.5)
    assert repr(step) == "merge_lora(scale=0.5)"
    merged = fvt.lora.merge(t, a, 0.5)
    assert step(t) == merged
    assert fvt.transforms.unmerge_lora(a, 0.5)(merged) == fvt.lora.unmerge(merged, a, 0.5)
    assert fvt.chain(step, fvt.transforms.select("a.*"))(t) == fvt.select(merged, "a.*")
    with pytest.raises(UsageError, match=re.escape("use fvt.lora.merge(tree, ")):
        fvt.transforms.merge_lora(t, a)
    for old in ("merge_transform", "unmerge_transform"):
        assert not hasattr(fvt.lora, old)


# ----- mix-ups between the two forms: typed errors that show the right call -----------------------------------


def test_eager_call_without_a_tree_shows_the_factory():
    with pytest.raises(UsageError, match=re.escape("fvt.select(tree, pattern) runs now, on a tree; inside chain use fvt.transforms.select('a.*')")):
        fvt.chain(fvt.select("a.*"))
    with pytest.raises(UsageError, match=re.escape("fvt.cast(tree, dtype) runs now, on a tree; inside chain use fvt.transforms.cast(torch.float16, only='a.*')")):
        fvt.cast(torch.float16, only="a.*")
    with pytest.raises(UsageError, match=re.escape("inside chain use fvt.transforms.rename({'a': 'b'})")):
        fvt.rename({"a": "b"})  # a mapping, but of names: the tree is missing
    with pytest.raises(UsageError, match=re.escape("fvt.update(tree, other) runs now")):
        fvt.update({"a": torch.zeros(1)})
    with pytest.raises(UsageError, match=re.escape("fvt.partition(tree, pattern) runs now, on a tree; it has no transform form")):
        fvt.partition("a.*")
    with pytest.raises(UsageError, match=re.escape("fvt.combine(*trees) joins trees; found str 'a.*'")):
        fvt.combine(small(), "a.*")


def test_mixups_are_typed_errors_of_the_library():
    with pytest.raises(UsageError) as info:
        fvt.select("a.*")
    assert isinstance(info.value, FvTransformError) and isinstance(info.value, TypeError)


def test_factory_given_a_tree_shows_the_eager_call():
    t = small()
    with pytest.raises(UsageError, match=re.escape("fvt.transforms.select(pattern) builds a step for fvt.chain and takes no tree; to run it now on the tree use fvt.select(tree, ...)")):
        fvt.transforms.select(t)
    with pytest.raises(UsageError, match=re.escape("use fvt.cast(tree, torch.float16)")):
        fvt.transforms.cast(t, torch.float16)
    with pytest.raises(UsageError, match=re.escape("use fvt.update(tree, {'ids': tensor([0., 0., 0.])})")):
        fvt.transforms.update(t, {"ids": torch.zeros(3)})
    with pytest.raises(UsageError, match=re.escape("use fvt.rename(tree, ...)")):
        fvt.transforms.rename(dict(t))  # a plain dict of tensors is a tree too
    assert fvt.transforms.update({"ids": torch.zeros(3)})(t)["ids"].sum() == 0  # update's argument is a mapping of tensors


def test_eager_function_or_uncalled_factory_passed_to_chain_shows_the_factory_call():
    with pytest.raises(UsageError, match=re.escape("fvt.select is an eager call: fvt.select(tree, pattern) runs now, on a tree; inside chain use fvt.transforms.select(...)")):
        fvt.chain(fvt.select)
    with pytest.raises(UsageError, match=re.escape("fvt.map_tensors is an eager call: fvt.map_tensors(tree, fn, *others) runs now, on a tree; inside chain use fvt.transforms.map_tensors(...)")):
        fvt.chain(fvt.transforms.cast(torch.float16), fvt.map_tensors)
    with pytest.raises(UsageError, match="fvt.partition is an eager call: .* it has no transform form"):
        fvt.chain(fvt.partition)
    with pytest.raises(UsageError, match=re.escape("fvt.transforms.select is a factory: call it to make the step, fvt.transforms.select(pattern)")):
        fvt.chain(fvt.transforms.select)
    with pytest.raises(UsageError, match=re.escape("fvt.transforms.merge_lora is a factory: call it to make the step, fvt.transforms.merge_lora(adapters)")):
        fvt.chain(fvt.transforms.merge_lora)


@pytest.mark.parametrize(
    ("method", "call"),
    [("select", "select"), ("drop", "drop"), ("partition", "partition"), ("rename", "rename"), ("cast", "cast"),
     ("to", "to"), ("map", "map_tensors"), ("update", "update"), ("combine", "combine")],
)
def test_paramtree_has_no_operation_methods_and_names_the_function(method, call):
    t = small()
    with pytest.raises(AttributeError, match=re.escape(f"ParamTree has no method {method!r}: tree operations are functions. Use fvt.{call}(tree, ...)")) as info:
        getattr(t, method)
    assert isinstance(info.value, UsageError)
    assert not hasattr(t, method)
    with pytest.raises(AttributeError, match="has no attribute 'nonsense'"):
        t.nonsense
