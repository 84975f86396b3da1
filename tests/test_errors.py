"""Each error class has one meaning: one representative call per class raises exactly that class.

Where a value came from decides the class: a caller's own argument that is wrong is a UsageError,
the same kind of value read from a file is a FormatError, a hub's nonsense answer is a HubError.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.lora import FullDelta, LoraAdapter, LowRank


def _tree() -> fvt.ParamTree:
    return fvt.ParamTree({"w": torch.ones(4, 3)})


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _set_item() -> None:
    tree = _tree()
    tree["w"] = torch.zeros(1)  # type: ignore[index]


def _grown_checkpoint(tmp: Path) -> None:
    fvt.save(_tree(), tmp / "g.safetensors")
    ckpt = fvt.io.open_checkpoint(tmp / "g.safetensors")
    with open(tmp / "g.safetensors", "ab") as f:
        f.write(b"more")
    ckpt.tensor("w")


def _pickle(tmp: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp / "w.bin")
    fvt.load(tmp / "w.bin")


def _missing_extra(monkeypatch: pytest.MonkeyPatch) -> Callable[[], object]:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    registry = fvt.registry.Registry()
    registry.register("needs-peft", "peft:LoraConfig")
    return lambda: registry.resolve("needs-peft")


#: class -> (what the call gets wrong, the call, a piece of the message). Each call is the kind of
#: mistake the class stands for; the test asserts the class exactly, not a subclass or a parent.
CASES: dict[type[E.FvTransformError], tuple[str, Callable[[Path, pytest.MonkeyPatch], object], str]] = {
    E.UsageError: ("a caller's argument: rank=-1", lambda tmp, mp: fvt.lora.extract(_tree(), fvt.ParamTree({"w": torch.zeros(4, 3)}), rank=-1),
                   r"rank=-1; a rank is a whole number of at least 1, e.g. fvt.lora.extract\(base, tuned, rank=16\)"),
    E.FormatError: ("a file: a safetensors header that is not one", lambda tmp, mp: fvt.load(_safetensors(tmp / "f.safetensors", {"w": [1]})),
                    r"f\.safetensors.*'w'"),
    E.KeyMismatchError: ("a key the tree lacks", lambda tmp, mp: _tree()["nope"], r"key 'nope' is not in this tree"),
    E.ShapeMismatchError: ("factors whose ranks disagree", lambda tmp, mp: LoraAdapter({"w": LowRank(torch.zeros(2, 3), torch.zeros(4, 1), 1.0)}),
                           r"rank mismatch"),
    E.NotFoundError: ("a path that does not exist", lambda tmp, mp: fvt.load(tmp / "missing.safetensors"), r"missing\.safetensors: no such file"),
    E.RegistryError: ("an unregistered architecture name", lambda tmp, mp: fvt.resolve("no-such-model"), r"unknown architecture 'no-such-model'"),
    E.ImmutableError: ("item assignment on a ParamTree", lambda tmp, mp: _set_item(), r"ParamTree is immutable.*fvt\.update\(tree"),
    E.PlanError: ("a fuse rule with one source", lambda tmp, mp: fvt.KeyMap.of(fvt.tree.Fuse(("a",), "b", dim=0)), r"needs at least two sources"),
    E.MissingDependencyError: ("an optional package that is not installed", lambda tmp, mp: _missing_extra(mp)(), r"pip install 'fvtransform\[peft\]'"),
    E.UnsafeFileError: ("a pickle file without allow_pickle=True", lambda tmp, mp: _pickle(tmp), r"w\.bin: pickle-based weights can run code"),
    E.IntegrityError: ("a file that grew after its header was read", lambda tmp, mp: _grown_checkpoint(tmp), r"g\.safetensors: the file is \d+ bytes now"),
    E.NumericError: ("a LoRA factor holding NaN", lambda tmp, mp: LoraAdapter({"w": LowRank(torch.full((1, 3), float("nan")), torch.zeros(4, 1), 1.0)}),
                     r"holds NaN or Inf"),
    E.WriteError: ("a destination that is a folder where a file goes", lambda tmp, mp: fvt.save(_tree(), tmp), r"is a folder; pass a file path"),
}


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_each_class_is_raised_for_its_one_meaning(cls, tmp_path, monkeypatch):
    what, call, match = CASES[cls]
    with pytest.raises(E.FvTransformError, match=match) as e:
        call(tmp_path, monkeypatch)
    assert type(e.value) is cls, f"{what}: {type(e.value).__name__}, expected {cls.__name__}: {e.value}"


def test_a_hub_answering_nonsense_is_a_hub_error_not_a_format_error(fake_hub):
    from fvtransform.hub import maybe_download_model

    fake_hub.add_commit("org/tiny", {"config.json": b"{}"})
    entry = {"type": "file", "oid": "0" * 40, "size": -1, "path": "junk.json"}
    fake_hub.listing_extra = [entry]
    with pytest.raises(E.HubError, match=r"org/tiny@main: tree listing entry 'junk.json': size -1 is not a non-negative integer") as e:
        maybe_download_model("org/tiny", allow_patterns=["*"])
    assert type(e.value) is E.HubError


def test_the_table_covers_every_class_but_the_base_and_hub():
    classes = {getattr(E, n) for n in E.__all__} - {E.FvTransformError}
    assert classes - set(CASES) == {E.HubError}  # HubError needs a server: the test above


def test_a_missing_module_inside_an_installed_extra_is_a_registry_error_not_a_missing_dependency():
    registry = fvt.registry.Registry()
    registry.register("typo", "diffusers.no_such_module:X")
    with pytest.raises(E.RegistryError, match=r"registry entry 'typo': cannot import 'diffusers\.no_such_module'") as e:
        registry.resolve("typo")
    assert type(e.value) is E.RegistryError


def test_a_usage_error_is_caught_as_type_error_and_as_value_error():
    assert issubclass(E.UsageError, TypeError) and issubclass(E.UsageError, ValueError)
    with pytest.raises(TypeError, match="rank=0"):
        fvt.lora.compress(LoraAdapter({"w": LowRank(torch.ones(1, 3), torch.ones(4, 1), 1.0)}), 0)
    with pytest.raises(ValueError, match="rank=0"):
        fvt.lora.compress(LoraAdapter({"w": LowRank(torch.ones(1, 3), torch.ones(4, 1), 1.0)}), 0)


def test_the_same_bad_dtype_is_usage_from_the_caller_and_format_from_a_file(tmp_path):
    fvt.save(_tree(), tmp_path / "b.safetensors")
    adapter = LoraAdapter({"w": LowRank(torch.ones(1, 3), torch.ones(4, 1), 1.0)})
    with pytest.raises(E.UsageError, match=r"dtype 'nope': expected a floating torch.dtype") as caller:
        fvt.lora.merge_checkpoint(tmp_path / "b.safetensors", adapter, tmp_path / "o.safetensors", dtype="nope")
    bad = _safetensors(tmp_path / "h.safetensors", {"w": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(E.FormatError, match=r"h\.safetensors.*unknown dtype 'NOPE'") as file:
        fvt.load(bad)
    assert type(caller.value) is E.UsageError and type(file.value) is E.FormatError


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, r"rank=0; a rank is a whole number of at least 1"),
    ({"rank": True}, r"rank=True; a rank is a whole number"),
    ({"rank": 2.5}, r"rank=2\.5; a rank is a whole number"),
    ({}, r"pass exactly one of rank= .* or energy= .*found rank=None, energy=None"),
    ({"rank": 2, "energy": 0.9}, r"pass exactly one of rank= .*found rank=2, energy=0\.9"),
    ({"energy": 1.5}, r"energy=1\.5; the energy is a fraction in \(0, 1\], e\.g\. fvt\.lora\.extract\(base, tuned, energy=0\.9\)"),
])
def test_extract_refuses_a_bad_rank_or_energy_naming_the_right_call(kwargs, match):
    base, tuned = _tree(), fvt.ParamTree({"w": torch.zeros(4, 3)})
    with pytest.raises(E.UsageError, match=match):
        fvt.lora.extract(base, tuned, **kwargs)


@pytest.mark.parametrize(("call", "match"), [
    (lambda t, a: fvt.lora.merge(t, a, return_record=True), r"merge\(\) has no return_record=.*fvt\.lora\.merge_with_record"),
    (lambda t, a: fvt.lora.merge(fvt.ParamTree({"w": t["w"], "tied": t["w"]}), a, donate=True), r"donate=True would write .*tied to other keys"),
])
def test_caller_mistakes_from_round_one_are_usage_errors(call, match):
    tree = fvt.ParamTree({"w": torch.ones(4, 3)})
    adapter = LoraAdapter({"w": LowRank(torch.ones(1, 3), torch.ones(4, 1), 1.0)})
    with pytest.raises(E.UsageError, match=match) as e:
        call(tree, adapter)
    assert type(e.value) is E.UsageError


def _saved(path: Path) -> Path:
    fvt.save(_tree(), path)
    return path


def _two_unrelated_files(tmp: Path) -> Path:
    for name in ("a", "b"):
        fvt.save(_tree(), tmp / f"{name}.safetensors")
    return tmp


@pytest.mark.parametrize(("call", "match"), [
    (lambda tmp: LoraAdapter({"w": FullDelta(torch.ones(4, 3), 0.5, replaces=True)}), r"'w': a replacing FullDelta .* its scale must be 1, not 0\.5"),
    (lambda tmp: fvt.lora.save(LoraAdapter({"m.bias": LowRank(torch.ones(1, 3), torch.ones(4, 1), 1.0)}), tmp / "x.safetensors"),
     r"'m\.bias': a low-rank delta must target a weight"),
    (lambda tmp: fvt.load(_two_unrelated_files(tmp)), r"several unrelated safetensors files .*e\.g\. fvt\.load\('.*a\.safetensors'\)"),
], ids=["replacing-scale", "low-rank-on-a-bias", "ambiguous-folder"])
def test_values_the_caller_built_or_chose_are_usage_errors(call, match, tmp_path):
    with pytest.raises(E.UsageError, match=match) as e:
        call(tmp_path)
    assert type(e.value) is E.UsageError


def test_every_class_documents_its_meaning_an_example_and_what_it_is_not_for():
    for name in E.__all__:
        cls = getattr(E, name)
        if cls is E.FvTransformError:
            continue
        doc = cls.__doc__ or ""
        assert "Example:" in doc and "Not for" in doc, name


def test_the_message_helpers_are_private():
    assert not hasattr(E, "format_keys") and not hasattr(E, "close_matches")
    assert set(E.__all__) == {n for n in vars(E) if isinstance(vars(E)[n], type) and issubclass(vars(E)[n], E.FvTransformError)}
