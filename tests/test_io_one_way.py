"""One way to read and write files (issue 20): one JSON reader, one safetensors writer, one pipeline check,
and a path that does not exist is a not-found error, never a security error."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
import re
import struct
import sys

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, KeyMismatchError, NotFoundError, UnsafeFileError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fvtransform"


def _calls(attr: str, module: str) -> list[str]:
    """``module.attr(...)`` calls in the package, as ``file:line``."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            f = node.func if isinstance(node, ast.Call) else None
            if isinstance(f, ast.Attribute) and f.attr == attr and isinstance(f.value, ast.Name) and f.value.id == module:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


# ----------------------------------------------------------------------------- one JSON reader
#: Every module of the package.
_READERS = ("fvtransform/",)


def test_untrusted_json_is_parsed_only_by_fvtransform_json():
    calls = [c for c in _calls("loads", "json") + _calls("load", "json")
             if c.startswith(_READERS) and not c.startswith("fvtransform/_json.py")]
    assert calls == [], f"json.loads outside fvtransform/_json.py (route it through loads_json / read_json_file): {calls}"


def _header_file(path: Path, raw: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("raw", "error", "match"), [
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     FormatError, r"h\.safetensors: the header lists the key 'a' twice"),
    (b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', FormatError, r"h\.safetensors: Infinity is not JSON"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', FormatError, r"h\.safetensors: not valid JSON \("),
    (b"[" * 12 + b"]" * 12, FormatError, r"h\.safetensors: nesting deeper than 8 levels"),
    (b'{"x": ' + b"[]," * 200 + b"[]}", FormatError, r"h\.safetensors: the header holds 1 JSON objects and 201 lists"),
])
def test_a_header_is_read_by_the_one_reader_with_its_own_bounds_and_errors(tmp_path, raw, error, match):
    path = _header_file(tmp_path / "h.safetensors", raw, b"\0" * 4)
    with pytest.raises(error, match=match):
        fvt.load(path)


def test_an_index_keeps_its_error_class_for_a_key_listed_twice(tmp_path):
    fvt.save({"a": torch.zeros(2), "b": torch.ones(2)}, tmp_path / "c", max_shard_size=8)
    index = tmp_path / "c" / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text.replace('"weight_map": {', '"weight_map": {\n    "a": "model-00002-of-00002.safetensors",', 1))
    with pytest.raises(KeyMismatchError, match=r"model\.safetensors\.index\.json: key 'a' is listed twice; the index is corrupt"):
        fvt.load(tmp_path / "c")


def test_json_in_lora_metadata_is_read_by_the_one_reader_naming_file_and_field(tmp_path):
    from fvtransform.io._safetensors import tensor_specs, write_safetensors

    tensors = {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}
    path = tmp_path / "l.safetensors"
    with open(path, "wb") as f:
        write_safetensors(f, tensor_specs(tensors, path), tensors.__getitem__, {"fvt.scales": '{"l": 1, "l": 2}'})
    with pytest.raises(FormatError, match=r"l\.safetensors: header 'fvt\.scales': key 'l' appears twice"):
        fvt.lora.load(path)


# ----------------------------------------------------------------------------- one safetensors writer
def _writers() -> list[str]:
    """Functions that write a safetensors header: they pack the 8-byte length (``to_bytes(8, "little")``)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if re.search(r"to_bytes\(8,\s*\"little\"\)|struct\.pack\(\"<Q\"", path.read_text()):
            found.append(str(path.relative_to(ROOT)))
    return found


def test_one_safetensors_writer_serves_save_lora_save_and_the_streaming_merge():
    from fvtransform.io import _safetensors, _save
    from fvtransform.lora import _stream

    assert _writers() == ["fvtransform/io/_safetensors.py"]
    assert _stream.write_safetensors is _safetensors.write_safetensors is _save.write_safetensors


def test_the_streaming_merge_writes_what_save_writes(tmp_path):
    """The merge's output file holds, key for key, the bytes fvt.save writes for the in-memory merge."""
    g = torch.Generator().manual_seed(0)
    base = fvt.ParamTree({f"b.{i}.w": torch.randn(8, 6, generator=g) for i in range(3)})
    fvt.save(base, tmp_path / "base.safetensors")
    adapter = fvt.lora.random_adapter(base, targets="b.*.w", rank=2)
    out = fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")
    merged = fvt.lora.merge(base, adapter)
    fvt.save(merged, tmp_path / "mem.safetensors")
    from safetensors import safe_open  # the oracle

    with safe_open(str(out), "pt") as a, safe_open(str(tmp_path / "mem.safetensors"), "pt") as b:
        assert list(a.keys()) == list(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_the_writer_names_file_and_key(tmp_path):
    from fvtransform.io._safetensors import TensorSpec, write_safetensors

    with pytest.raises(UsageError, match=r"m\.safetensors: cannot save 'w': it is on the meta device"):
        fvt.save({"w": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with open(tmp_path / "x.safetensors", "wb") as f, pytest.raises(
        FormatError, match=r"out\.safetensors: tensor 'w' came out as torch\.float16 \(2,\), but the header declares torch\.float32 \(2,\)"
    ):
        write_safetensors(f, {"w": TensorSpec(torch.float32, (2,))}, lambda k: torch.zeros(2, dtype=torch.float16),
                          where=tmp_path / "out.safetensors")
    with open(tmp_path / "y.safetensors", "wb") as f, pytest.raises(UsageError, match=r"y\.safetensors: cannot save 'q': dtype"):
        write_safetensors(f, {"q": TensorSpec(torch.complex32, (1,))}, lambda k: torch.zeros(1, dtype=torch.complex32))


def test_safetensors_is_a_test_oracle_not_a_library_dependency():
    imported = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "level", 0) == 0}
    assert "safetensors" not in imported
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[ \[<>=!~;]", r.strip(), maxsplit=1)[0] for r in reqs}  # noqa: E731
    assert "safetensors" not in names(meta["dependencies"])
    assert "safetensors" in names(meta["optional-dependencies"]["test"])


# ----------------------------------------------------------------------------- one pipeline check
def _pipeline(root: Path, index: dict[str, object]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


_PIPE = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"], "vae": [None, None],
         "scheduler": ["diffusers", "UniPCMultistepScheduler"]}


@pytest.mark.parametrize(("component", "error", "match"), [
    ("text_encoder", NotFoundError, r"model_index\.json: the pipeline has no component 'text_encoder'; components: \['scheduler', 'transformer'\]"),
    ("vae", NotFoundError, r"model_index\.json: component 'vae' is absent in this pipeline \(its entry is null\); components: \['scheduler', 'transformer'\]"),
])
def test_local_and_hub_pipelines_refuse_a_component_with_one_wording(tmp_path, component, error, match):
    from fvtransform.hub._download import _check_components

    folder = _pipeline(tmp_path / "pipe", _PIPE)
    with pytest.raises(error, match=match):
        fvt.load_model(folder, component=component)
    with pytest.raises(error, match=r"org/pipe@main: " + match):
        _check_components(folder / "model_index.json", [component], "org/pipe@main")


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "a\\b", "", "x\x00y", ".hidden", "a" * 300])
def test_a_hostile_component_name_refuses_the_pipeline_locally_and_on_the_hub(tmp_path, name):
    from fvtransform.hub._download import _check_components

    folder = _pipeline(tmp_path / "pipe", {**_PIPE, name: ["diffusers", "AutoencoderKLWan"]})
    with pytest.raises(UnsafeFileError, match=r"model_index\.json names component .*, which is not a plain folder name"):
        fvt.load_model(folder, component="transformer")
    with pytest.raises(UnsafeFileError, match=r"org/pipe@main: model_index\.json names component"):
        _check_components(folder / "model_index.json", ["transformer"], "org/pipe@main")
    with pytest.raises(UnsafeFileError, match=r"names component"):
        fvt.io.pipeline_components(folder)


def test_pipeline_components_reads_entries_and_absent_ones(tmp_path):
    folder = _pipeline(tmp_path / "pipe", _PIPE)
    assert fvt.io.pipeline_components(folder) == {
        "transformer": ("diffusers", "WanTransformer3DModel"), "vae": None, "scheduler": ("diffusers", "UniPCMultistepScheduler")}
    bad = _pipeline(tmp_path / "bad", {"transformer": ["diffusers"]})
    with pytest.raises(FormatError, match=r"bad/model_index\.json: key 'transformer' must be \[library, class\]"):
        fvt.io.pipeline_components(bad)


# ----------------------------------------------------------------------------- paths that do not exist
_MISSING_ENTRIES = {
    "fvt.load": lambda p: fvt.load(p),
    "fvt.load_model": lambda p: fvt.load_model(p),
    "fvt.lora.load": lambda p: fvt.lora.load(p),
    "fvt.open_checkpoint": lambda p: fvt.io.open_checkpoint(p),
}


@pytest.mark.parametrize("entry", sorted(_MISSING_ENTRIES))
@pytest.mark.parametrize(("name", "why"), [
    ("/no/such/file.safetensors", r""),
    ("./no/such.safetensors", r""),
    ("~/no-such-fvt-file.safetensors", r"'~' is not expanded"),
])
def test_a_path_that_does_not_exist_is_not_found_naming_it(fake_hub, entry, name, why):
    with pytest.raises(NotFoundError, match=re.escape(str(Path(name))) + r": no such file or folder.*" + why) as info:
        _MISSING_ENTRIES[entry](name)
    assert not isinstance(info.value, UnsafeFileError)
    assert fake_hub.requests == []  # a path is never looked up on the hub


@pytest.mark.parametrize("argv", [["inspect", "/no/such/base"], ["merge", "/no/such/base", "/no/such/l.safetensors", "-o", "/tmp/fvt-never"],
                                  ["convert-lora", "/no/such/base", "-o", "/tmp/fvt-never", "--to", "peft"]])
def test_the_cli_says_not_found_for_a_missing_absolute_path(capsys, argv):
    from fvtransform.cli._main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fvtransform: error: /no/such/base: no such file or folder (an absolute path"), err


def test_a_relative_name_taken_for_a_repo_id_says_how_to_mean_a_local_path(fake_hub):
    with pytest.raises(NotFoundError, match=r"org/missing@main: repository not found .*'org/missing' was taken for a repo id "
                                            r"because no local file or folder of that name exists in .*write './org/missing'"):
        fvt.load_model("org/missing")
    with pytest.raises(NotFoundError, match=r"no local file or folder of that name exists"):
        fvt.lora.load("org/missing")


def test_unsafe_stays_for_what_is_unsafe(tmp_path):
    """A repo id that would climb out of the cache, a pickle and a symlink out of a folder stay security errors."""
    with pytest.raises(UnsafeFileError, match=r"repo id 'org/\.\./x': segment '\.\.' is not allowed"):
        fvt.load_model("org/../x")
    torch.save({"a": torch.zeros(1)}, tmp_path / "m.bin")
    with pytest.raises(UnsafeFileError, match=r"m\.bin: pickle-based weights can run code"):
        fvt.load(tmp_path / "m.bin")
    outside = tmp_path / "outside.safetensors"
    fvt.save({"a": torch.zeros(1)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(outside, folder / "model.safetensors")
    with pytest.raises(UnsafeFileError, match=r"resolves to .*outside"):
        fvt.load(folder)
