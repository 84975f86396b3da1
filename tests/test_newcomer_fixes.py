"""The fixes for the newcomer's defects (tests/test_newcomer_api.py), beyond the one test per defect there:
the frictions they ranked, the decisions' other sides (what still works), and each new error path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError, PlanError, ShapeMismatchError, UsageError


def _tree() -> fvt.ParamTree:
    return fvt.ParamTree({"blocks.0.q.weight": torch.randn(4, 4), "head.weight": torch.randn(2, 4), "head.bias": torch.zeros(2)})


def _adapter(tree: fvt.ParamTree) -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(tree, targets="blocks.*.weight", rank=2)


# --- transforms: the right factory, the right object -------------------------------------------


@pytest.mark.parametrize("old, new", [("merge", "merge_lora"), ("unmerge", "unmerge_lora")])
def test_transforms_merge_lookup_names_the_lora_factory(old: str, new: str) -> None:
    with pytest.raises(UsageError, match=rf"fvt\.transforms\.{new}\(adapters, scale\)"):
        getattr(fvt.transforms, old)


@pytest.mark.parametrize(
    "fn, shown",
    [
        (fvt.lora.unmerge, r"fvt\.transforms\.unmerge_lora"),
        (fvt.lora.restore, r"no transform form"),
        (fvt.save, r"no transform form.*fvt\.save\(tree, path\)"),
        (fvt.shard, r"no transform form"),
    ],
)
def test_chain_refuses_eager_calls_that_are_not_steps(fn: object, shown: str) -> None:
    with pytest.raises(UsageError, match=shown):
        fvt.chain(fn)  # type: ignore[arg-type]


def test_chain_of_a_tuple_shows_the_unpacked_call() -> None:
    with pytest.raises(UsageError, match=r"found a tuple of 1\. Unpack it: fvt\.chain\(\*steps\)"):
        fvt.chain((fvt.transforms.select("head.*"),))  # type: ignore[arg-type]


def test_a_step_applied_to_a_non_tree_is_a_usage_error() -> None:
    step = fvt.chain(fvt.transforms.select("head.*"))
    with pytest.raises(UsageError, match=r"runs on a tree .*found Linear"):
        step(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    assert list(step(_tree())) == ["head.weight", "head.bias"]


def test_swapped_eager_call_shows_the_tree_first() -> None:
    with pytest.raises(UsageError, match=r"fvt\.cast\(tree, torch\.float16\)"):
        fvt.cast(torch.float16, _tree())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"inside chain use fvt\.transforms\.rename\(\{'a': 'b'\}\)"):
        fvt.rename({"a": "b"})  # type: ignore[call-arg]  # a dict of names is not a tree


# --- dtypes: one converter ----------------------------------------------------------------------


def test_dtype_names_are_accepted_and_checked_when_the_step_is_built() -> None:
    step = fvt.transforms.cast("bf16")
    assert repr(step) == "cast(torch.bfloat16)"
    assert step(_tree())["head.weight"].dtype == torch.bfloat16
    assert fvt.cast(_tree(), "torch.float16")["head.weight"].dtype == torch.float16
    for bad in ("bf17", torch.int8):
        with pytest.raises(UsageError, match=r"expected a floating torch\.dtype .*e\.g\. torch\.bfloat16"):
            fvt.transforms.cast(bad)  # refused at build time, not when the pipeline runs


def test_to_a_dtype_name_points_to_cast() -> None:
    with pytest.raises(UsageError, match=r"is a dtype\. Change dtypes with fvt\.cast\(tree, 'bfloat16'\)"):
        fvt.to(_tree(), "bfloat16")
    assert fvt.to(_tree(), "cpu", only="head.*")["head.bias"].device.type == "cpu"


def test_load_takes_a_dtype_name_and_strict(tmp_path: Path) -> None:
    fvt.save(_tree(), tmp_path / "m.safetensors")
    assert fvt.load(tmp_path / "m.safetensors", dtype="fp16")["head.weight"].dtype == torch.float16
    rules = [("head.{p}", "out.{p}"), ("nothing.{p}", "x.{p}")]
    with pytest.raises(KeyMismatchError, match=r"nothing\.\{p\}"):
        fvt.load(tmp_path / "m.safetensors", rename=rules)
    loose = fvt.load(tmp_path / "m.safetensors", rename=rules, strict=False)
    assert sorted(loose) == ["blocks.0.q.weight", "out.bias", "out.weight"]


# --- patterns: everything named is found --------------------------------------------------------


def test_select_list_names_a_typo_with_its_close_match_and_allows_globs() -> None:
    with pytest.raises(KeyMismatchError, match=r"'head\.bais' \(did you mean \['head\.bias'"):
        fvt.select(_tree(), ["head.weight", "head.bais"])
    assert list(fvt.select(_tree(), ["head.weight", "tail.*"])) == ["head.weight"]  # a glob may match nothing


def test_a_one_argument_predicate_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"takes \(key, tensor\).*lambda key, tensor"):
        fvt.select(_tree(), lambda key: key.startswith("head"))  # type: ignore[arg-type,misc]
    assert list(fvt.select(_tree(), lambda key, t: t.ndim == 1)) == ["head.bias"]


def test_only_that_matches_something_still_restricts() -> None:
    out = fvt.map_tensors(_tree(), lambda t: t * 0, only="head.bias")
    assert out["head.weight"] is not None and torch.equal(out["head.bias"], torch.zeros(2))


# --- LoRA: one scale spelling, tree first, one meaning of targets ---------------------------------


def test_merge_scale_is_given_one_way_and_is_a_number() -> None:
    tree = _tree()
    a = _adapter(tree)
    with pytest.raises(UsageError, match=r"two scales given.*fvt\.lora\.merge\(tree, \[\(adapter, 1\), \.\.\.\]\)"):
        fvt.lora.merge(tree, [(a, 0.5)], 2.0)
    with pytest.raises(UsageError, match=r"scale must be a number; found str '0\.5'"):
        fvt.lora.merge(tree, a, "0.5")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"a pair's scale must be a number"):
        fvt.lora.merge(tree, [(a, "0.5")])  # type: ignore[list-item]
    for build in (fvt.transforms.merge_lora, fvt.transforms.unmerge_lora):
        with pytest.raises(UsageError, match=r"scale must be a number"):
            build(a, "0.5")  # type: ignore[arg-type]  # checked when the step is built
    assert fvt.lora.merge(tree, [(a, 0.5)]) == fvt.lora.merge(tree, a, 0.5)
    assert fvt.lora.merge(tree, [a], 0.5) == fvt.lora.merge(tree, a, 0.5)  # bare adapters take the scale


def test_unmerge_and_restore_name_swapped_arguments() -> None:
    tree = _tree()
    a = _adapter(tree)
    with pytest.raises(UsageError, match=r"fvt\.lora\.unmerge\(tree, adapter\)"):
        fvt.lora.unmerge(a, tree)  # type: ignore[arg-type]
    merged, record = fvt.lora.merge_with_record(tree, a)
    with pytest.raises(UsageError, match=r"fvt\.lora\.restore\(tree, record\)"):
        fvt.lora.restore(record, merged)  # type: ignore[arg-type]
    assert fvt.lora.restore(merged, record) == tree


def test_adapter_targets_is_the_constructor_mapping() -> None:
    a = _adapter(_tree())
    assert dict(a.targets) == dict(a) and list(a) == ["blocks.0.q.weight"]
    assert fvt.lora.LoraAdapter(a.targets).targets == a.targets
    with pytest.raises(UsageError, match=r"the target keys are list\(adapter\)"):
        fvt.lora.LoraAdapter(list(a))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.targets["x"] = a["blocks.0.q.weight"]  # type: ignore[index]  # read-only


def test_a_tree_holding_adapter_deltas_names_the_lora_functions() -> None:
    a = _adapter(_tree())
    with pytest.raises(fvt.errors.UsageError, match=r"holds LowRank\. A LoRA adapter is not a tree: use the fvt\.lora"):
        fvt.ParamTree(dict(a))  # type: ignore[arg-type]
    with pytest.raises(fvt.errors.UsageError, match=r"Convert it with torch\.as_tensor"):
        fvt.ParamTree({"x": [1.0]})  # type: ignore[dict-item]


# --- key maps ------------------------------------------------------------------------------------


def test_keymap_stages_must_be_rules_and_split_targets_a_list() -> None:
    with pytest.raises(UsageError, match=r"KeyMap\.of\(\{'a': 'b'\}\)"):
        fvt.KeyMap((("a", "b"),))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"Split\(source, \['attn\.q\.\{p\}', \.\.\.\]\)"):
        fvt.Split("attn.qkv.{p}", "attn.q.{p}")  # type: ignore[arg-type]
    assert fvt.KeyMap.of({"a": "b"})(fvt.ParamTree({"a": torch.zeros(1)})).keys() == {"b"}


# --- check and shard plans: strict concerns keys / rules -------------------------------------------


def test_check_returns_the_report_for_keys_and_raises_on_shapes_with_it() -> None:
    lin = torch.nn.Linear(3, 2)
    report = fvt.check({"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, lin, strict=False)
    assert report.missing == ("bias",) and report.unexpected == ("extra",) and not report.shape_mismatches
    with pytest.raises(ShapeMismatchError, match=r"shape of 'weight'") as info:
        fvt.check({"weight": torch.zeros(2, 4)}, lin, strict=False)
    assert info.value.report.missing == ("bias",)  # type: ignore[attr-defined]
    with pytest.raises(KeyMismatchError, match="missing"):
        fvt.check({"weight": torch.zeros(2, 4)}, lin)  # keys first when strict


def test_shard_plan_optional_rules_and_unused_rules() -> None:
    from torch.distributed.tensor import Replicate, Shard

    rules = (("*.weight", (Shard(0),)), ("nope.*", (Shard(0),)))
    tree = _tree()
    with pytest.raises(PlanError, match=r"rules that match no key: \['nope\.\*'\].*strict=False"):
        fvt.distributed.ShardPlan(rules, default=(Replicate(),)).resolve(tree, mesh_shape=(2,))
    optional = fvt.distributed.ShardPlan(rules, default=(Replicate(),), optional={1})
    resolved = optional.resolve(tree, mesh_shape=(2,))
    assert isinstance(resolved, fvt.distributed.ResolvedPlan) and resolved.unused_rules == ()
    assert resolved["head.bias"] == (Replicate(),) and "(optional)" in repr(optional)
    assert fvt.distributed.fsdp_plan().resolve(tree, mesh_shape=(2,)).unused_rules == ()


# --- calls ---------------------------------------------------------------------------------------


def test_meta_tree_with_meta_inputs_still_runs_and_lora_call_names_swaps() -> None:
    lin = torch.nn.Linear(2, 2, device="meta")
    out = fvt.call(lin, fvt.ParamTree.from_module(lin), torch.zeros(1, 2, device="meta"))
    assert out.shape == (1, 2) and out.is_meta  # shape inference on meta is fine
    real = torch.nn.Linear(2, 2)
    tree = fvt.ParamTree.from_module(real)
    a = fvt.lora.random_adapter(tree, targets="weight", rank=1)
    with pytest.raises(UsageError, match=r"fvt\.lora\.call\(module, tree, adapters, \*args"):
        fvt.lora.call(tree, real, a, torch.zeros(1, 2))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="meta"):
        fvt.lora.call(lin, fvt.ParamTree.from_module(lin), a, torch.zeros(1, 2))
