"""A generated corpus of hostile and broken inputs (no binaries are committed).

``make_corpus(folder)`` writes every case under ``folder`` and returns a list of :class:`Case`:
what to load, how, and which fvtransform error (class and message) it must give.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

import fvtransform as fvt
from fvtransform import errors as E


@attrs.frozen
class Case:
    name: str
    path: Path
    error: type
    match: str  # a regex the message must contain (the file or key is named where there is one)
    action: Callable[[Path], Any] = fvt.load


def _st(path: Path, header: Any, data: bytes = b"", *, raw_header: bytes | None = None, length: int | None = None) -> Path:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}


def _good(path: Path) -> Path:
    fvt.save(fvt.ParamTree({"a": torch.ones(2), "b": torch.zeros(2)}), path)
    return path


def _index(folder: Path, weight_map: Any, raw: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "model.safetensors.index.json"
    p.write_text(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _lora_load(base: dict[str, torch.Tensor]) -> Callable[[Path], Any]:
    return lambda p: fvt.lora.load(p, base=fvt.ParamTree(base))


def make_corpus(root: Path) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def st(name: str, error: type, match: str, header: Any = None, data: bytes = b"", **kw: Any) -> None:
        path = _st(root / f"{name}.safetensors", header, data, **kw)
        cases.append(Case(name, path, error, match))

    eight = b"\0" * 8
    # ---- the file as a whole
    (root / "empty.safetensors").write_bytes(b"")
    cases.append(Case("empty file", root / "empty.safetensors", E.FormatError, r"empty\.safetensors: 0 bytes is too short"))
    (root / "short.safetensors").write_bytes(b"\x01\x02\x03")
    cases.append(Case("shorter than the length prefix", root / "short.safetensors", E.FormatError, "short.safetensors: 3 bytes"))
    st("header_longer_than_file", E.FormatError, "header length 1000 is larger than", {"a": _entry()}, length=1000)
    st("absurd_header_length", E.FormatError, "header length 9223372036854775808 exceeds", {"a": _entry()}, length=2**63)
    st("header_not_utf8", E.FormatError, "header_not_utf8.safetensors", raw_header=b"\xff\xfe{}")
    st("header_not_json", E.FormatError, "header_not_json.safetensors.*not valid JSON|header_not_json.safetensors.*JSON", raw_header=b"{nope")
    st("header_json_array", E.FormatError, "header_json_array.safetensors", [1, 2, 3])
    st("header_deeply_nested", E.FormatError, "header_deeply_nested.safetensors", raw_header=b"[" * 100000 + b"]" * 100000)
    st("entry_not_object", E.FormatError, r"tensor 'a'", {"a": [1, 2]})
    st("entry_missing_dtype", E.FormatError, r"tensor 'a'.*'dtype'", {"a": {"shape": [2], "data_offsets": [0, 8]}}, eight)
    st("unknown_dtype", E.FormatError, r"tensor 'a': unknown dtype 'F128'", {"a": _entry("F128")}, eight)
    st("negative_shape", E.FormatError, r"tensor 'a': shape must be a list of non-negative ints", {"a": _entry(shape=[-2])}, eight)
    st("shape_not_list", E.FormatError, r"tensor 'a': shape must be a list", {"a": _entry(shape="2")}, eight)  # type: ignore[arg-type]
    st("offsets_wrong_length", E.FormatError, r"tensor 'a': data_offsets must be \[begin, end\]", {"a": _entry(offsets=[0])}, eight)
    st("offsets_reversed", E.FormatError, r"tensor 'a': data_offsets must be", {"a": _entry(offsets=[8, 0])}, eight)
    st("offsets_out_of_range", E.FormatError, r"tensor 'a': data ends at byte 800 but the file holds 8", {"a": _entry(offsets=[792, 800])}, eight)
    st("offsets_size_mismatch", E.FormatError, r"tensor 'a': shape \[2\] of F32 needs 8 bytes, but data_offsets span 4", {"a": _entry(offsets=[0, 4])}, eight)
    st("offsets_overlap", E.FormatError, r"overlap", {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])}, b"\0" * 12)
    st("duplicate_keys", E.FormatError, r"duplicate_keys.safetensors.*'a'", raw_header=b'{"a":' + json.dumps(_entry()).encode() + b',"a":' + json.dumps(_entry()).encode() + b"}", data=eight)
    st("metadata_not_strings", E.FormatError, r"__metadata__", {"__metadata__": {"x": 1}, "a": _entry()}, eight)
    st("data_truncated", E.FormatError, r"tensor 'b': data ends at byte 16 but the file holds 12", {"a": _entry(), "b": _entry(offsets=[8, 16])}, b"\0" * 12)
    st("huge_shape_small_file", E.FormatError, r"tensor 'a': .*needs", {"a": _entry(shape=[2**40, 2**20])}, eight)

    # ---- sharded checkpoints (index files)
    good = root / "good"
    good.mkdir()
    _good(good / "model-00001-of-00001.safetensors")
    idx = _index(root / "idx_not_json", None, raw="{broken")
    _good(idx / "model-00001-of-00001.safetensors")
    cases.append(Case("index not JSON", idx, E.FormatError, r"idx_not_json/model.safetensors.index.json: not valid JSON"))
    idx = _index(root / "idx_no_weight_map", None, raw=json.dumps({"metadata": {}}))
    cases.append(Case("index without weight_map", idx, E.FormatError, r"expected an object with a 'weight_map'"))
    idx = _index(root / "idx_missing_shard", {"a": "model-00001-of-00002.safetensors"})
    cases.append(Case("index naming a missing shard", idx, E.NotFoundError, r"missing: \['model-00001-of-00002.safetensors'\]"))
    idx = _index(root / "idx_dotdot", {"a": "../good/model-00001-of-00001.safetensors"})
    cases.append(Case("index shard outside the folder (..)", idx, E.UnsafeFileError, r"'../good/model-00001-of-00001.safetensors' is not a plain file name"))
    idx = _index(root / "idx_absolute", {"a": str((good / "model-00001-of-00001.safetensors").resolve())})
    cases.append(Case("index shard as an absolute path", idx, E.UnsafeFileError, r"is not a plain file name"))
    idx = _index(root / "idx_symlink_escape", {"a": "model-00001-of-00001.safetensors"})
    os.symlink(good / "model-00001-of-00001.safetensors", idx / "model-00001-of-00001.safetensors")
    cases.append(Case("index shard that is a symlink escaping the folder", idx, E.UnsafeFileError, r"resolves to .*outside"))
    idx = _index(root / "idx_nul_name", {"a": "model\x00.safetensors"})
    cases.append(Case("index shard name with a NUL byte (found by the index fuzzer)", idx, E.UnsafeFileError, r"not a plain file name"))
    idx = _index(root / "idx_dup_key", None, raw='{"weight_map": {"a": "s.safetensors", "a": "s.safetensors"}}')
    cases.append(Case("a key listed twice in the index", idx, E.KeyMismatchError, r"key 'a' is listed twice"))
    idx = _index(root / "idx_key_in_two_shards", {"a": "one.safetensors", "b": "two.safetensors"})
    _good(idx / "one.safetensors")
    _good(idx / "two.safetensors")
    cases.append(Case("a key held by two shards", idx, E.KeyMismatchError, r"index does not list|'a'"))
    idx = _index(root / "idx_key_not_in_shard", {"a": "one.safetensors", "zzz": "one.safetensors"})
    _good(idx / "one.safetensors")
    cases.append(Case("an index key its shard does not hold", idx, E.KeyMismatchError, r"'zzz'"))

    # ---- model folders
    folder = root / "config_invalid"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    _good(folder / "model.safetensors")
    cases.append(Case("config.json that is not JSON", folder, E.FormatError, r"config_invalid/config.json", fvt.load_model))
    folder = root / "config_unknown_class"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel3000"}))
    _good(folder / "model.safetensors")
    cases.append(Case("config.json naming an unknown class", folder, E.RegistryError, r"NoSuchModel3000", fvt.load_model))
    folder = root / "model_index_invalid"
    folder.mkdir()
    (folder / "model_index.json").write_text("[1, 2")
    cases.append(Case("model_index.json that is not JSON", folder, E.FormatError, r"model_index.json",
                      lambda p: fvt.load_model(p, component="transformer")))
    folder = root / "model_index_unknown_class"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "NoSuchTransformer"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "NoSuchTransformer"}))
    _good(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    cases.append(Case("model_index.json naming an unknown class", folder, E.RegistryError, r"NoSuchTransformer",
                      lambda p: fvt.load_model(p, component="transformer")))
    folder = root / "no_weights"
    folder.mkdir()
    (folder / "README.md").write_text("nothing")
    cases.append(Case("a folder with no weights", folder, E.NotFoundError, r"no_weights"))

    # ---- LoRA files
    base = {"l.weight": torch.zeros(4, 3)}
    def lora(name: str, tensors: dict[str, torch.Tensor], error: type, match: str) -> None:
        path = root / f"{name}.safetensors"
        fvt.save(fvt.ParamTree(tensors), path)
        cases.append(Case(name, path, error, match, _lora_load(base)))

    lora("lora_rank_mismatch", {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 3)}, E.ShapeMismatchError, r"rank mismatch")
    lora("lora_shape_misfit", {"l.lora_A.weight": torch.zeros(2, 5), "l.lora_B.weight": torch.zeros(4, 2)}, E.ShapeMismatchError, r"lora_shape_misfit.safetensors: target .l\.weight.*A \[2, 5\], B \[4, 2\] does not fit the base weight \[4, 3\]")
    lora("lora_nan", {"l.lora_A.weight": torch.full((2, 3), float("nan")), "l.lora_B.weight": torch.zeros(4, 2)}, E.NumericError, r"NaN or Inf")
    lora("lora_inf", {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.full((4, 2), float("inf"))}, E.NumericError, r"NaN or Inf")
    lora("lora_unmatched_key", {"nothing.here.lora_A.weight": torch.zeros(2, 3), "nothing.here.lora_B.weight": torch.zeros(4, 2)}, E.KeyMismatchError, r"nothing\.here")
    lora("lora_unknown_format", {"some.random.tensor": torch.zeros(2)}, E.FormatError, r"some\.random\.tensor|format")
    cases.extend(_more_cases(root))
    return cases


def _more_cases(root: Path) -> list[Case]:
    """Cases from the area files ``tests/_corpus_<area>.py``: each defines ``cases(root) -> list[Case]``.

    One file per area (readers, writers, registry, hub, LoRA), so that growing the corpus in one area
    never touches another's file.
    """
    import importlib

    found: list[Case] = []
    for path in sorted(Path(__file__).parent.glob("_corpus_*.py")):
        module = importlib.import_module(path.stem)
        sub = root / path.stem.removeprefix("_corpus_")
        sub.mkdir(parents=True, exist_ok=True)
        found.extend(module.cases(sub))
    return found
