import hypothesis.strategies as st
import torch
from hypothesis import given

import fvtransform as fvt
from _helpers import assert_unchanged, snapshot
from strategies import trees

OPS = [
    lambda t: fvt.select(t, "*a*", allow_empty=True),
    lambda t: fvt.drop(t, "*a*", allow_empty=True),
    lambda t: fvt.cast(t, torch.float16),
    lambda t: fvt.cast(t, torch.bfloat16, only="*.*"),
    lambda t: fvt.to(t, "cpu"),
    lambda t: fvt.map_tensors(t, lambda x: x.clone()),
    lambda t: fvt.rename(t, [("{a}.{b*}", "x.{a}.{b}")], strict=False),
    lambda t: fvt.combine(*fvt.partition(t, "*b*")),
    lambda t: fvt.update(t, {next(iter(t)): torch.zeros(1)}) if len(t) else t,  # a chain may empty the tree
]


@given(trees(), st.integers(0, len(OPS) - 1))
def test_no_operation_mutates_and_untouched_are_shared(tree, i):
    snap = snapshot(tree)
    out = OPS[i](tree)
    assert_unchanged(tree, snap)
    for k, v in out.items():
        if k in tree and out[k].dtype == tree[k].dtype and fvt.tensors_equal(v, tree[k]) and i not in (5, 8):
            assert v is tree[k]


@given(trees())
def test_partition_combine_is_identity(tree):
    yes, no = fvt.partition(tree, "*.*")
    back = fvt.combine(yes, no)
    assert back == tree
    assert all(back[k] is tree[k] for k in tree)


@given(trees())
def test_invertible_rename_round_trips(tree):
    rules = fvt.RenameRules.of([("{a}.{rest*}", "{a}.inner.{rest}"), ("{a}", "top.{a}")])
    renamed = fvt.rename(tree, rules, strict=False)
    back = fvt.rename(renamed, rules.inverse(), strict=False)
    assert back == tree and back.same_order(tree)


@given(trees())
def test_pytree_flatten_unflatten_round_trips(tree):
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    back = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert back == tree and back.same_order(tree) and back.aliases() == tree.aliases()


@given(trees(), st.integers(0, len(OPS) - 1), st.integers(0, len(OPS) - 1))
def test_chain_is_composition(tree, i, j):
    f, g = OPS[i], OPS[j]
    try:
        expected = g(f(tree))
    except fvt.errors.FvTransformError:
        return
    assert fvt.chain(f, g)(tree) == expected


@given(st.integers(1, 3), st.integers(0, 1000))
def test_call_on_from_module_equals_forward(layers, seed):
    with torch.random.fork_rng():  # the module's own init draws from torch's RNG: seeded, and left as it was
        torch.manual_seed(seed)
        m = fvt.build("fvt-video-dit", {"num_layers": layers}, device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([seed]), torch.randn(1, 3, 16, generator=g))
    assert torch.equal(fvt.call(m, fvt.ParamTree.from_module(m), *x), m(*x))
