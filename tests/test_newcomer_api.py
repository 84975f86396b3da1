"""A newcomer's pass over the consolidated API (issue 20): each test is one place where the promise
("one eager function + one factory per operation, one KeyMap, one meaning of strict, return types that
never change with a flag, caller mistakes raise UsageError showing the right call") is broken.

Written from README.md, docs/ and docstrings only; every test fails on the commit it was written on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import types
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def _tree() -> fvt.ParamTree:
    return fvt.ParamTree(
        {
            "blocks.0.attn.to_q.weight": torch.randn(4, 4),
            "blocks.0.attn.to_k.weight": torch.randn(4, 4),
            "head.weight": torch.randn(2, 4),
            "head.bias": torch.zeros(2),
        }
    )


def _adapter(tree: fvt.ParamTree) -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(tree, targets="blocks.*.weight", rank=2)


# --- names: one meaning each, listed once -------------------------------------------------------


def test_call_is_not_both_a_module_and_a_function() -> None:
    """`fvtransform.call` is a subpackage (sys.modules, import_module) *and* `fvt.call` is a function:
    `import fvtransform.call as c` binds the function, `importlib.import_module("fvtransform.call")`
    the module."""
    clashes = []
    for name in fvt.__all__:
        if name.startswith("__"):
            continue
        spec = importlib.util.find_spec(f"fvtransform.{name}")
        if spec is not None and not isinstance(getattr(fvt, name), types.ModuleType):
            clashes.append(name)
    assert clashes == [], (
        f"public names that are also a submodule of another meaning: {clashes}"
    )


def test_every_top_level_public_name_is_on_the_api_page() -> None:
    """`fvt.shard` / `fvt.unshard` are in `fvt.__all__`, used by docs/guides/sharding.md and named by
    `fvt.load`'s docstring, yet api.md ("every public name once") lists only `fvt.distributed.shard`:
    two public spellings, one of them undocumented."""
    page = (ROOT / "docs" / "api.md").read_text()
    missing = [
        name
        for name in fvt.__all__
        if not name.startswith("__")
        and not isinstance(getattr(fvt, name), types.ModuleType)
        and f"[`fvt.{name}`]" not in page
    ]
    assert missing == [], f"public names of fvt missing from docs/api.md: {missing}"


def test_api_page_gives_every_name_a_meaning() -> None:
    """api.md says `fvt.tree.Pattern` is "a `_UnionGenericAlias` value" and `fvt.lora.Delta` "a
    `UnionType` value": a private typing class, not a meaning (and Pattern has no docstring, so its
    reference entry is empty, though every select/only=/targets= argument is one)."""
    page = (ROOT / "docs" / "api.md").read_text()
    meaningless = re.findall(
        r"^\| \[`([^`]+)`\][^|]*\| a `_?(?:UnionGenericAlias|UnionType|_\w+)` value \|$",
        page,
        re.MULTILINE,
    )
    assert meaningless == [], f"api.md rows without a meaning: {meaningless}"


def test_docstrings_name_only_public_things() -> None:
    """`fvt.lora.load`'s docstring sends the reader to `fvtransform.hub.pick_lora_file`, which does not
    exist publicly (plain AttributeError, no redirect); others cite `DTYPES`, `OTHER_FILE_LIMIT`,
    `MAX_PAD_RANK`, `fvtransform.lora._dora.canonical_magnitude`."""
    broken = []
    for modname in [
        "fvtransform",
        "fvtransform.io",
        "fvtransform.lora",
        "fvtransform.hub",
        "fvtransform.transforms",
    ]:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType):
                continue
            doc = inspect.getdoc(obj) or ""
            for ref in re.findall(
                r":(?:func|data|class):`~?(fvtransform\.[\w.]+|[A-Z][A-Z_]+)`", doc
            ):
                path = ref if ref.startswith("fvtransform.") else f"{modname}.{ref}"
                parts = path.split(".")
                target: object = importlib.import_module("fvtransform")
                ok = not any(p.startswith("_") for p in parts)
                for part in parts[1:]:
                    if not ok:
                        break
                    try:
                        target = getattr(target, part)
                    except AttributeError:
                        ok = False
                if not ok:
                    broken.append(f"{modname}.{name} -> {ref}")
    assert broken == [], f"docstrings that cite non-public names: {broken}"


def test_lora_adapter_targets_has_one_meaning() -> None:
    """`LoraAdapter(targets=...)` takes a mapping key -> delta, `adapter.targets` is a list of keys
    (and `adapter.report.targets` a mapping key -> file key): `LoraAdapter(a.targets)` fails with a raw
    ValueError."""
    adapter = _adapter(_tree())
    again = fvt.lora.LoraAdapter(adapter.targets)  # type: ignore[arg-type]
    assert list(again) == list(adapter)


# --- eager function vs factory ------------------------------------------------------------------


def test_chain_refuses_the_eager_lora_merge() -> None:
    """`fvt.chain(fvt.lora.merge)` is accepted; the pipeline then fails with a raw TypeError
    ("merge() missing 1 required positional argument: 'adapters'"). fvt.select/cast/... are refused
    with the factory's name; lora.merge (whose factory is fvt.transforms.merge_lora) is not."""
    with pytest.raises(UsageError, match=r"fvt\.transforms\.merge_lora"):
        fvt.chain(fvt.lora.merge)


def test_chain_of_a_list_is_a_usage_error_showing_the_call() -> None:
    """`fvt.chain([f, g])` (nn.Sequential / a list of steps) raises FormatError "a transform is a
    callable ParamTree -> ParamTree; found list", not a UsageError showing `fvt.chain(f, g)`."""
    steps = [fvt.transforms.select("blocks.*"), fvt.transforms.cast(torch.bfloat16)]
    with pytest.raises(UsageError, match=r"fvt\.chain\(\*"):
        fvt.chain(steps)  # type: ignore[arg-type]


def test_swapped_eager_arguments_show_a_valid_call() -> None:
    """`fvt.select("blocks.*", tree)` raises UsageError, but the call it shows is
    `fvt.transforms.select('blocks.*', ParamTree(...))`: a factory given a tree, itself an error."""
    tree = _tree()
    with pytest.raises(UsageError) as info:
        fvt.select("blocks.*", tree)  # type: ignore[arg-type]
    message = str(info.value)
    assert "fvt.transforms.select('blocks.*', ParamTree" not in message
    assert "fvt.select(tree, 'blocks.*')" in message


# --- flags and old spellings --------------------------------------------------------------------


def test_merge_return_record_is_a_usage_error() -> None:
    """`fvt.lora.merge(..., return_record=True)` names the right call but raises FormatError ("a file
    or mapping is not in its format"), not UsageError: `except UsageError` does not catch it."""
    tree = _tree()
    with pytest.raises(UsageError, match="merge_with_record"):
        fvt.lora.merge(tree, _adapter(tree), return_record=True)  # type: ignore[call-arg]


def test_merge_takes_one_scale_spelling() -> None:
    """`fvt.lora.merge(tree, [(adapter, 0.5)], 2.0)` silently multiplies the pair's scale by the
    positional one: two ways to give a scale, and mixing them is accepted without a word."""
    tree = _tree()
    with pytest.raises(UsageError):
        fvt.lora.merge(tree, [(_adapter(tree), 0.5)], 2.0)


def test_to_with_a_dtype_points_to_cast() -> None:
    """`fvt.to(tree, torch.float16)` (torch's `module.to(dtype)`) raises torch's raw
    "device() received an invalid combination of arguments"."""
    with pytest.raises(UsageError, match=r"fvt\.cast\("):
        fvt.to(_tree(), torch.float16)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "how",
    ["fvt.cast", "fvt.transforms.cast", "fvt.load"],
)
def test_a_dtype_name_works_or_shows_the_torch_dtype(how: str, tmp_path: Path) -> None:
    """A str dtype raises torch's "Invalid device string: 'bfloat16'" (fvt.cast, fvt.load,
    fvt.load_model); `fvt.transforms.cast("bfloat16")` is even built and printed as a valid step. Yet
    `fvt.lora.merge_checkpoint(dtype="bf16")` accepts names."""
    tree = _tree()
    fvt.save(tree, tmp_path / "m.safetensors")
    calls = {
        "fvt.cast": lambda: fvt.cast(tree, "bfloat16"),  # type: ignore[arg-type]
        "fvt.transforms.cast": lambda: fvt.transforms.cast("bfloat16")(tree),  # type: ignore[arg-type]
        "fvt.load": lambda: fvt.load(tmp_path / "m.safetensors", dtype="bfloat16"),  # type: ignore[arg-type]
    }
    try:
        out = calls[how]()
    except UsageError as e:
        assert "torch.bfloat16" in str(e)
    else:
        assert out["head.weight"].dtype == torch.bfloat16


# --- key maps -----------------------------------------------------------------------------------


def test_keymap_constructor_refuses_a_dict() -> None:
    """`fvt.KeyMap({"a": "b"})` builds a broken map silently (printed as `KeyMap(['a'])`, the dict's
    characters taken as stages) and fails later with "'str' object has no attribute 'source'"."""
    with pytest.raises(UsageError, match=r"KeyMap\.of\("):
        fvt.KeyMap({"head.bias": "head.b"})  # type: ignore[arg-type]


def test_fuse_refuses_a_string_of_sources() -> None:
    """`fvt.Fuse("attn.q.{p}", "attn.qkv.{p}")` iterates the string: "the templates ['a', 't', 't', 'n',
    ...] use different fields"."""
    with pytest.raises(UsageError, match=r"Fuse\(\["):
        fvt.Fuse("attn.q.{p}", "attn.qkv.{p}")


# --- strict: everything named is found ----------------------------------------------------------


def test_select_list_finds_every_name() -> None:
    """`fvt.select(tree, ["head.weight", "head.bais"])` silently returns only head.weight: a named key
    that is not there is dropped, though "everything the caller named is found" (concepts, Strictness)
    and a pattern matching nothing is an error."""
    with pytest.raises(KeyMismatchError, match="head.bais"):
        fvt.select(_tree(), ["head.weight", "head.bais"])


@pytest.mark.parametrize("how", ["cast", "to", "map_tensors"])
def test_only_pattern_that_matches_nothing_is_an_error(how: str) -> None:
    """`only="haed.*"` (a typo) makes cast / to / map_tensors a silent no-op, while the same pattern
    given to select raises "matched no key ... pass allow_empty=True"."""
    tree = _tree()
    calls = {
        "cast": lambda: fvt.cast(tree, torch.float16, only="haed.*"),
        "to": lambda: fvt.to(tree, "cpu", only="haed.*"),
        "map_tensors": lambda: fvt.map_tensors(tree, lambda t: t * 2, only="haed.*"),
    }
    with pytest.raises(KeyMismatchError, match="haed"):
        calls[how]()


def test_check_strict_false_does_not_excuse_shapes() -> None:
    """`strict` means "both sides account" (keys); load_model(strict=False) still raises on shapes.
    `fvt.check(..., strict=False)` instead returns a report for shape (and dtype) mismatches too:
    there strict means "raise or report"."""
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ShapeMismatchError):
        fvt.check(
            {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, lin, strict=False
        )


def test_shard_plan_non_strict_lists_unused_rules() -> None:
    """`ShardPlan.resolve(..., strict=False)` drops an unused rule without a trace (a plain dict comes
    back; no report, no warning), and its strictness has a second spelling (`every_rule_used=`,
    `strict=None`)."""
    from torch.distributed.tensor import Replicate, Shard

    plan = fvt.distributed.ShardPlan(
        (("*.weight", (Shard(0),)), ("nope.*", (Shard(0),))), default=(Replicate(),)
    )
    resolved = plan.resolve(_tree(), mesh_shape=(2,), strict=False)
    assert "nope.*" in repr(getattr(resolved, "unused_rules", None))


# --- the wrong object in the right place --------------------------------------------------------


@pytest.mark.parametrize("how", ["lora.merge swapped", "fvt.save(adapter)"])
def test_an_adapter_where_a_tree_goes_shows_the_right_call(
    how: str, tmp_path: Path
) -> None:
    """An adapter where a tree goes: "ParamTree values must be torch.Tensor; key ... holds LowRank.
    Convert it with torch.as_tensor first" -- a fix that is wrong."""
    tree = _tree()
    adapter = _adapter(tree)
    calls = {
        "lora.merge swapped": (
            lambda: fvt.lora.merge(adapter, tree),
            r"fvt\.lora\.merge\(tree",
        ),  # type: ignore[arg-type]
        "fvt.save(adapter)": (
            lambda: fvt.save(adapter, tmp_path / "a.safetensors"),
            r"fvt\.lora\.save\(",
        ),  # type: ignore[arg-type]
    }
    call, right = calls[how]
    with pytest.raises(UsageError, match=right):
        call()


@pytest.mark.parametrize(
    "how", ["lora.call", "lora.restore", "check", "lora.scale_adapter"]
)
def test_swapped_arguments_are_named(how: str) -> None:
    """fvt.call names swapped module/tree; its siblings give raw errors: lora.call(tree, module, ...)
    "'ParamTree' object has no attribute 'named_modules'", restore(record, tree) "'MergeRecord' object
    is not iterable", check(module, tree) "argument of type 'Linear' is not iterable",
    scale_adapter(0.5, a) "'float' object has no attribute 'items'"."""
    lin = torch.nn.Linear(4, 2)
    tree = fvt.ParamTree({"weight": torch.randn(2, 4), "bias": torch.zeros(2)})
    adapter = fvt.lora.random_adapter(tree, targets="weight", rank=1)
    merged, record = fvt.lora.merge_with_record(tree, adapter)
    calls = {
        "lora.call": lambda: fvt.lora.call(tree, lin, adapter, torch.zeros(1, 4)),  # type: ignore[arg-type]
        "lora.restore": lambda: fvt.lora.restore(record, merged),  # type: ignore[arg-type]
        "check": lambda: fvt.check(lin, tree),  # type: ignore[arg-type]
        "lora.scale_adapter": lambda: fvt.lora.scale_adapter(0.5, adapter),  # type: ignore[arg-type]
    }
    with pytest.raises(UsageError):
        calls[how]()


def test_param_tree_of_a_module_points_to_from_module() -> None:
    """`fvt.ParamTree(module)` raises "'Linear' object is not iterable"."""
    with pytest.raises(UsageError, match=r"ParamTree\.from_module"):
        fvt.ParamTree(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_call_with_meta_weights_names_the_cause() -> None:
    """`fvt.call(module, fvt.ParamTree.from_module(fvt.build(...)), ...)` (the module is on meta) gives
    torch's "Tensor on device meta is not on the expected device cpu!"; tree == tree names meta."""
    lin = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(UsageError, match="meta"):
        fvt.call(lin, fvt.ParamTree.from_module(lin), torch.zeros(1, 2))
