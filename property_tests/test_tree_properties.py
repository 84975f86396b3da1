import hypothesis.strategies as st
import torch
from hypothesis import example, given

import fvtransform as fvt
from _helpers import assert_unchanged, snapshot
from strategies import trees


def _clone(x):
    return x.clone()


_DOTTED = [("{a}.{b*}", "x.{a}.{b}")]

#: (eager call, the factory's step, keeps names and shares untouched tensors). Several raise on some trees
#: (a pattern that matches nothing, an unused rename rule, a new key): both forms must raise alike.
OPS = [
    (lambda t: fvt.select(t, "*a*"), fvt.transforms.select("*a*"), True),
    (lambda t: fvt.select(t, "*a*", allow_empty=True), fvt.transforms.select("*a*", allow_empty=True), True),
    (lambda t: fvt.drop(t, "*a*"), fvt.transforms.drop("*a*"), True),
    (lambda t: fvt.drop(t, "*a*", allow_empty=True), fvt.transforms.drop("*a*", allow_empty=True), True),
    (lambda t: fvt.cast(t, torch.float16), fvt.transforms.cast(torch.float16), True),
    (lambda t: fvt.cast(t, torch.bfloat16, only="*.*"), fvt.transforms.cast(torch.bfloat16, only="*.*"), True),
    (lambda t: fvt.to(t, "cpu"), fvt.transforms.to("cpu"), True),
    (lambda t: fvt.map_tensors(t, _clone), fvt.transforms.map_tensors(_clone), False),
    (lambda t: fvt.rename(t, _DOTTED), fvt.transforms.rename(_DOTTED), False),
    (lambda t: fvt.rename(t, _DOTTED, strict=False), fvt.transforms.rename(_DOTTED, strict=False), False),
    (lambda t: fvt.update(t, {"new": torch.zeros(1)}), fvt.transforms.update({"new": torch.zeros(1)}), False),
    (lambda t: fvt.update(t, {"new": torch.zeros(1)}, allow_new=True),
     fvt.transforms.update({"new": torch.zeros(1)}, allow_new=True), False),
]


def outcome(fn, tree):
    """The tree ``fn`` returns, or the class and message of the library error it raises."""
    try:
        return fn(tree)
    except fvt.errors.FvTransformError as e:
        return (type(e), str(e))


def assert_same_outcome(got, want):
    assert type(got) is type(want), (got, want)
    if isinstance(want, fvt.ParamTree):
        assert got == want and got.same_order(want)
    else:
        assert got == want  # the same error class and message


@given(trees(), st.integers(0, len(OPS) - 1))
def test_no_operation_mutates_and_untouched_are_shared(tree, i):
    eager, _, shares = OPS[i]
    snap = snapshot(tree)
    out = outcome(eager, tree)
    assert_unchanged(tree, snap)
    if shares and isinstance(out, fvt.ParamTree):
        for k, v in out.items():
            if v.dtype == tree[k].dtype:
                assert v is tree[k]


_NO_A = fvt.ParamTree({"zz": torch.zeros(1)})


def test_error_outcomes_are_compared_not_skipped():
    got = outcome(OPS[0][1], _NO_A)
    assert got[0] is fvt.errors.KeyMismatchError and "matched no key" in got[1]
    chained = outcome(fvt.chain(OPS[4][1], OPS[0][1]), _NO_A)
    assert chained == outcome(lambda t: OPS[0][0](OPS[4][0](t)), _NO_A) and chained[0] is fvt.errors.KeyMismatchError


@example(_NO_A, 0)
@given(trees(), st.integers(0, len(OPS) - 1))
def test_factory_step_equals_the_eager_call_errors_included(tree, i):
    eager, step, _ = OPS[i]
    assert_same_outcome(outcome(step, tree), outcome(eager, tree))


@given(trees())
def test_partition_combine_is_identity(tree):
    yes, no = fvt.partition(tree, "*.*")
    back = fvt.combine(yes, no)
    assert back == tree
    assert all(back[k] is tree[k] for k in tree)


@given(trees())
def test_invertible_rename_round_trips(tree):
    rules = fvt.KeyMap.of([("{a}.{rest*}", "{a}.inner.{rest}"), ("{a}", "top.{a}")], keep_rest=False)
    plan = rules.plan(tree, strict=False)  # a tree without dotted (or undotted) keys leaves a rule unused
    assert plan.unclaimed == ()  # the two rules claim every key
    renamed = fvt.rename(tree, rules, strict=False)
    assert renamed == plan.apply(tree)
    back = fvt.rename(renamed, rules.inverse(), strict=False)
    assert back == tree and back.same_order(tree)
    assert all(back[k] is tree[k] for k in tree)


@given(trees())
def test_pytree_flatten_unflatten_round_trips(tree):
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    back = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert back == tree and back.same_order(tree) and back.aliases() == tree.aliases()


@example(_NO_A, 4, 0)
@example(_NO_A, 10, 8)
@given(trees(), st.integers(0, len(OPS) - 1), st.integers(0, len(OPS) - 1))
def test_chain_is_composition_errors_included(tree, i, j):
    (f, f_step, _), (g, g_step, _) = OPS[i], OPS[j]
    assert_same_outcome(outcome(fvt.chain(f_step, g_step), tree), outcome(lambda t: g(f(t)), tree))


@given(st.integers(1, 3), st.integers(0, 1000))
def test_call_on_from_module_equals_forward(layers, seed):
    with torch.random.fork_rng():  # the module's own init draws from torch's RNG: seeded, and left as it was
        torch.manual_seed(seed)
        m = fvt.build("fvt-video-dit", {"num_layers": layers}, device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([seed]), torch.randn(1, 3, 16, generator=g))
    assert torch.equal(fvt.call(m, fvt.ParamTree.from_module(m), *x), m(*x))
