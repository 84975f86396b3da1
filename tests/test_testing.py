"""fvtransform.testing: its strategies draw valid values, and each law helper fails on a broken law."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fvtransform as fvt
from fvtransform.errors import UsageError
from fvtransform.lora import FullDelta, LoraAdapter, LowRank
from fvtransform.testing import (
    DTYPES, adapters, assert_no_mutation, assert_order_independent, assert_restores_exactly, trees,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=15, deadline=None, database=None)


@FAST
@given(trees())
def test_trees_draw_valid_trees(tree):
    assert isinstance(tree, fvt.ParamTree) and len(tree) >= 1
    first = next(iter(tree))
    assert first.endswith(".weight") and tree[first].numel() > 0
    for key, t in tree.items():
        assert t.dtype in DTYPES
        assert t.dim() == (2 if key.endswith(".weight") else 1)
        assert all(part for part in key.split("."))


def test_trees_cover_dtypes_zero_size_ties_and_nesting():
    seen: dict[str, bool] = {"zero": False, "tied": False, "nested": False, **{str(d): False for d in DTYPES}}

    @settings(max_examples=60, deadline=None, database=None)
    @given(trees())
    def collect(tree):
        ids = [id(t) for t in tree.values()]
        seen["tied"] |= len(set(ids)) < len(ids)
        for key, t in tree.items():
            seen["zero"] |= t.numel() == 0
            seen["nested"] |= key.count(".") >= 2
            seen[str(t.dtype)] = True

    collect()
    assert all(seen.values()), seen


def test_trees_use_a_drawn_seed_not_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()

    @settings(max_examples=5, deadline=None, database=None)
    @given(trees())
    def draw(tree):
        pass

    draw()
    assert torch.equal(torch.get_rng_state(), state)


@FAST
@given(trees(), st.data())
def test_adapters_fit_their_tree(tree, data):
    adapter = data.draw(adapters(tree, full_deltas=True))
    assert len(adapter) >= 1
    for key, delta in adapter.items():
        assert delta.fits(tuple(tree[key].shape))
        delta.validate(key)
    fvt.lora.merge(tree, adapter)  # merges without error


def test_adapters_refuse_a_tree_without_targets():
    with pytest.raises(UsageError, match=r"0 targetable tensors.*min_targets=1"):
        adapters(fvt.ParamTree({"l.weight": torch.zeros(0, 3)}))


def test_trees_refuse_integer_dtypes():
    with pytest.raises(UsageError, match=r"trees\(dtypes=...\) takes floating"):
        trees(dtypes=(torch.int32,))


def _tree_and_adapter():
    tree = fvt.ParamTree({"l.weight": torch.ones(2, 2)})
    return tree, LoraAdapter({"l.weight": LowRank(torch.ones(1, 2), torch.ones(2, 1), 0.5)})


def test_assert_restores_exactly_passes_and_fails_on_a_non_exact_restore(monkeypatch):
    import fvtransform.testing._laws as testing

    tree, adapter = _tree_and_adapter()
    assert_restores_exactly(tree, adapter)
    # a restore that recomputes W - delta instead of putting back the saved tensors is not exact
    monkeypatch.setattr(testing, "restore", lambda merged, record: fvt.update(
        merged, {"l.weight": merged["l.weight"] - 0.5 + 1e-3}))
    with pytest.raises(AssertionError, match=r"'l.weight': values differ bitwise"):
        assert_restores_exactly(tree, adapter)


def test_assert_no_mutation_passes_and_catches_in_place_writes():
    tree, adapter = _tree_and_adapter()
    assert assert_no_mutation(fvt.lora.merge, tree, adapter)["l.weight"][0, 0] == 1.5

    def merge_in_place(t, a):
        t["l.weight"].add_(1.0)
        return t

    with pytest.raises(AssertionError, match=r"merge_in_place mutated its input args\[0\]\[0\]\['l.weight'\]"):
        assert_no_mutation(merge_in_place, tree, adapter)

    def same_values_in_place(t, a):
        a["l.weight"].A.copy_(a["l.weight"].A)  # same values, still a write
        return t

    tree, adapter = _tree_and_adapter()
    with pytest.raises(AssertionError, match=r"mutated its input args\[0\]\[1\]\['l.weight'\]"):
        assert_no_mutation(same_values_in_place, tree, adapter)


def test_assert_order_independent_passes_and_fails_on_an_order_dependent_merge(monkeypatch):
    import fvtransform.testing._laws as testing

    tree = fvt.ParamTree({"w": torch.ones(3)})
    pairs = [(LoraAdapter({"w": FullDelta(torch.full((3,), v))}), 1.0) for v in (0.1, 1e8, -1e8)]
    assert_order_independent(tree, pairs)

    def sequential(t, ps):  # merges one after another, rounding in between: order matters
        for a, s in ps:
            t = fvt.lora.merge(t, a, s)
        return t

    monkeypatch.setattr(testing, "merge", sequential)
    with pytest.raises(AssertionError, match=r"merging in order \[.*\] differs.*'w'"):
        assert_order_independent(tree, pairs)


def test_assert_order_independent_refuses_many_pairs():
    tree, adapter = _tree_and_adapter()
    with pytest.raises(UsageError, match=r"at most 5"):
        assert_order_independent(tree, [(adapter, 1.0)] * 6)


def test_import_without_hypothesis_names_the_extra():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hypothesis' or name.startswith('hypothesis.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fvtransform.errors import MissingDependencyError\n"
        "try:\n"
        "    import fvtransform.testing\n"
        "except MissingDependencyError as e:\n"
        "    print('OK', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.startswith("OK") and "fvtransform[test]" in out.stdout, out.stderr


def test_a_counterexample_shows_the_tree_values():
    @settings(max_examples=20, deadline=None, database=None)
    @given(trees(dtypes=(torch.float32,), tied=False))
    def always_fails(tree):
        raise ValueError("broken law")

    with pytest.raises(ValueError, match="broken law") as info:
        always_fails()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert re.search(r"\.weight: float32\[\d+, \d+\] \[-?\d", notes), notes
