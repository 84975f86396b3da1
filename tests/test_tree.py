import re

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import ImmutableError, KeyMismatchError, PlanError, UsageError

from _helpers import TiedEmbedding, assert_unchanged, snapshot


def small():
    w = torch.randn(3, 2)
    return fvt.ParamTree({"a.weight": w, "a.bias": torch.zeros(3), "b.weight": torch.ones(2, 2), "ids": torch.arange(3)})


def test_paramtree_is_immutable():
    t = small()
    with pytest.raises(ImmutableError, match=r"cannot set 'x'. .*fvt\.update\(tree, \{'x': value\}\)"):
        t["x"] = torch.zeros(1)
    with pytest.raises(ImmutableError, match=r"cannot delete 'a.weight'. .*fvt\.drop\(tree, 'a.weight'\)"):
        del t["a.weight"]
    with pytest.raises(ImmutableError, match="attribute"):
        t.foo = 1


def test_paramtree_validates_keys_and_values():
    with pytest.raises(UsageError, match="keys must be str"):
        fvt.ParamTree({1: torch.zeros(1)})
    with pytest.raises(UsageError, match="must be torch.Tensor"):
        fvt.ParamTree({"a": [1, 2]})


def test_missing_key_names_close_matches():
    with pytest.raises(KeyMismatchError, match=r"close matches: \['a.weight'"):
        small()["a.weigth"]


def test_repr_is_short():
    r = repr(small())
    assert r.startswith("ParamTree(4 tensors") and "float32: 3" in r and "int64: 1" in r and "cpu" in r


def test_from_module_records_tied_weights_and_skips_nonpersistent():
    m = TiedEmbedding()
    t = fvt.ParamTree.from_module(m)
    assert list(t) == ["stat", "emb.weight", "head.weight"]  # the module's own state first, then its children in order
    assert t.aliases() == (("emb.weight", "head.weight"),)
    assert t["emb.weight"] is t["head.weight"] is m.emb.weight
    assert "table" not in t


def test_select_drop_partition_combine():
    t = small()
    s = fvt.select(t, "a.*")
    assert list(s) == ["a.weight", "a.bias"] and s["a.weight"] is t["a.weight"]
    assert list(fvt.select(t, re.compile(r"a\.(weight|bias)"))) == ["a.weight", "a.bias"]
    assert list(fvt.select(t, lambda k, v: v.dim() == 2)) == ["a.weight", "b.weight"]
    assert list(fvt.select(t, ["ids", "b.*"])) == ["b.weight", "ids"]
    assert list(fvt.drop(t, "a.*")) == ["b.weight", "ids"]
    yes, no = fvt.partition(t, "a.*")
    assert fvt.combine(yes, no) == t
    with pytest.raises(KeyMismatchError, match="matched no key"):
        fvt.select(t, "zzz*")
    assert len(fvt.select(t, "zzz*", allow_empty=True)) == 0
    with pytest.raises(KeyMismatchError, match="matched no key"):
        fvt.drop(t, "zzz*")
    with pytest.raises(KeyMismatchError, match="combine: key 'ids' is in tree 0 and tree 1"):
        fvt.combine(t, fvt.select(t, "ids"))
    with pytest.raises(UsageError, match="expected a glob"):
        fvt.select(t, 3)


def test_cast_to_map_update_share_untouched():
    t = small()
    snap = snapshot(t)
    c = fvt.cast(t, torch.bfloat16)
    assert c["a.weight"].dtype == torch.bfloat16 and c["ids"] is t["ids"]
    c2 = fvt.cast(t, torch.float16, only="b.*")
    assert c2["a.weight"] is t["a.weight"] and c2["b.weight"].dtype == torch.float16
    assert fvt.cast(t, torch.float32)["a.weight"] is t["a.weight"]
    assert fvt.to(t, "cpu")["a.weight"] is t["a.weight"]
    m = fvt.map_tensors(t, lambda x: x + 1, only="a.bias")
    assert torch.equal(m["a.bias"], torch.ones(3)) and m["a.weight"] is t["a.weight"]
    mk = fvt.map_tensors(t, lambda k, x: x * 0 if k == "ids" else x, with_keys=True)
    assert mk["a.weight"] is t["a.weight"]
    u = fvt.update(t, {"ids": torch.zeros(3, dtype=torch.long)})
    assert list(u) == list(t) and u["a.weight"] is t["a.weight"]
    with pytest.raises(KeyMismatchError, match="keys not in the tree"):
        fvt.update(t, {"new": torch.zeros(1)})
    assert list(fvt.update(t, {"new": torch.zeros(1)}, allow_new=True))[-1] == "new"
    assert_unchanged(t, snap)


def test_ops_keep_tied_tensors_tied():
    w = torch.randn(2, 2)
    t = fvt.ParamTree({"x": w, "y": w})
    assert fvt.cast(t, torch.float16).aliases() == (("x", "y"),)
    assert fvt.map_tensors(t, lambda v: v * 2).aliases() == (("x", "y"),)


def test_rename_keeps_order_identity_and_inverts():
    t = small()
    rules = fvt.KeyMap.of([("a.{p}", "layer.0.{p}"), ("b.{p}", "layer.1.{p}")])
    r = fvt.rename(t, rules)
    assert list(r) == ["layer.0.weight", "layer.0.bias", "layer.1.weight", "ids"]
    assert r["layer.0.weight"] is t["a.weight"]
    back = fvt.rename(r, rules.inverse())
    assert back == t and back.same_order(t)
    assert list(fvt.rename(t, {"ids": "position_ids"})) == ["a.weight", "a.bias", "b.weight", "position_ids"]
    with pytest.raises(KeyMismatchError, match=r"rules matched no key: nope\.\{p\} -> x\.\{p\}"):
        fvt.rename(t, [("nope.{p}", "x.{p}")])
    with pytest.raises(KeyMismatchError, match="maps two keys to 'same': 'a.weight' and 'b.weight'"):
        fvt.rename(t, {"a.weight": "same", "b.weight": "same"})
    with pytest.raises(PlanError, match="use different fields"):
        fvt.Rename("a.{x}", "b.{y}")
    with pytest.raises(UsageError, match="pair"):
        fvt.rename(t, [("a",)])


def test_equality_is_exact_and_bitwise():
    t = small()
    assert t == fvt.ParamTree(dict(t))
    assert t == fvt.ParamTree(dict(reversed(list(t.items()))))  # a mapping: order is same_order's business
    assert not fvt.ParamTree(dict(reversed(list(t.items())))).same_order(t)
    assert t != fvt.ParamTree({**t, "ids": torch.arange(3) + 1})
    assert t != fvt.select(t, "a.*")
    assert t != fvt.cast(t, torch.float64)  # same values, another dtype
    nan = fvt.ParamTree({"w": torch.tensor([float("nan"), 1.0])})
    assert nan == fvt.ParamTree({"w": torch.tensor([float("nan"), 1.0])})  # bitwise: the same NaN is equal
    assert fvt.ParamTree({"w": torch.tensor([0.0])}) != fvt.ParamTree({"w": torch.tensor([-0.0])})
    assert not fvt.tensors_equal(torch.zeros(1), torch.zeros(2))
    assert fvt.tensors_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


def test_equality_on_meta_trees_is_a_usage_error_that_says_what_to_do():
    real = fvt.ParamTree({"w": torch.zeros(2)})
    meta = fvt.ParamTree({"w": torch.zeros(2, device="meta")})
    with pytest.raises(UsageError, match=r"'w' is on the meta device .* fvt\.check\(tree, other\)"):
        real == meta
    with pytest.raises(UsageError, match="meta"):
        meta == fvt.ParamTree({"w": torch.zeros(2, device="meta")})
    assert meta == meta  # the same tensors: nothing to read
    assert meta != fvt.ParamTree({"w": torch.zeros(3, device="meta")})  # shapes differ: answered without values
    with pytest.raises(UsageError, match="meta device"):
        fvt.tensors_equal(torch.zeros(1, device="meta"), torch.zeros(1))


def test_pytree_grad_and_vmap():
    w = torch.randn(3, 2)
    t = fvt.ParamTree({"w": w, "w_tied": w, "b": torch.zeros(3)})
    leaves, spec = torch.utils._pytree.tree_flatten(t)
    assert len(leaves) == 2  # tied tensor is one leaf
    again = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, fvt.ParamTree) and again.aliases() == (("w", "w_tied"),)
    doubled = torch.utils._pytree.tree_map(lambda x: x * 2, t)
    assert isinstance(doubled, fvt.ParamTree) and torch.equal(doubled["w"], w * 2)

    lin = torch.nn.Linear(2, 3)
    lt = fvt.rename(fvt.select(t, ["w", "b"]), {"w": "weight", "b": "bias"})
    x = torch.randn(4, 2)
    grads = torch.func.grad(lambda p: fvt.call(lin, p, x).sum())(lt)
    assert isinstance(grads, fvt.ParamTree) and torch.allclose(grads["bias"], torch.full((3,), 4.0))
    batched = fvt.ParamTree({"weight": torch.randn(5, 3, 2), "bias": torch.randn(5, 3)})
    outs = torch.func.vmap(lambda p: fvt.call(lin, p, x))(batched)
    assert outs.shape == (5, 4, 3)
