"""Corpus cases of the readers (issue 13): non-regular files, escaping links, overflowing sizes, caps, aliases.

Each case is written under ``root`` when :func:`cases` runs; nothing binary is committed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.io import open_checkpoint

from _corpus import Case, _entry, _good, _st

_LORA = {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}


def _lora_load(p: Path) -> Any:
    return fvt.lora.load(p, base=fvt.ParamTree({"l.weight": torch.zeros(4, 3)}))


def _dir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _changed_after_open(change: Callable[[Path], None]) -> Callable[[Path], Any]:
    """An action that writes a fresh file, reads its header, changes the file, then reads a tensor."""

    def action(folder: Path) -> Any:
        path = folder / "c.safetensors"
        fvt.save(fvt.ParamTree({"a": torch.ones(1024), "b": torch.full((1024,), 2.0)}), path)
        ckpt = open_checkpoint(path)
        change(path)
        return ckpt.tensor("b")

    return action


def _replace(path: Path) -> None:
    fvt.save(fvt.ParamTree({"b": torch.full((1024,), 7.0), "a": torch.ones(1024)}), path)


def cases(root: Path) -> list[Case]:
    out: list[Case] = []

    def add(name: str, path: Path, error: type, match: str, action: Callable[[Path], Any] = fvt.load) -> None:
        out.append(Case(f"readers: {name}", path, error, match, action))

    # ---- FIFOs, sockets, devices: refused before any open, never a hang
    d = _dir(root, "fifo_file")
    os.mkfifo(d / "w.safetensors")
    add("a FIFO given as the weights file", d, E.UnsafeFileError, r"w\.safetensors: the weights file is a FIFO",
        lambda p: fvt.load(p / "w.safetensors"))
    d = _dir(root, "fifo_in_folder")
    os.mkfifo(d / "model.safetensors")
    add("a FIFO as the weights file of a folder", d, E.UnsafeFileError, r"model\.safetensors: the weights file is a FIFO")
    d = _dir(root, "fifo_shard")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s.safetensors"}}))
    os.mkfifo(d / "s.safetensors")
    add("a FIFO as a shard", d, E.UnsafeFileError, r"s\.safetensors: the shard is a FIFO")
    d = _dir(root, "fifo_index")
    os.mkfifo(d / "model.safetensors.index.json")
    add("a FIFO as the index", d, E.UnsafeFileError, r"model\.safetensors\.index\.json: the index file is a FIFO")
    d = _dir(root, "fifo_pickle")
    os.mkfifo(d / "pytorch_model.bin")
    add("a FIFO as pickle weights", d, E.UnsafeFileError, r"pytorch_model\.bin: the weights file is a FIFO",
        lambda p: fvt.load(p, allow_pickle=True))
    d = _dir(root, "fifo_config")
    _good(d / "model.safetensors")
    os.mkfifo(d / "config.json")
    add("a FIFO as config.json", d, E.UnsafeFileError, r"config\.json: the JSON file is a FIFO", fvt.load_model)
    d = _dir(root, "fifo_model_index")
    os.mkfifo(d / "model_index.json")
    add("a FIFO as model_index.json", d, E.UnsafeFileError, r"model_index\.json: the JSON file is a FIFO",
        lambda p: fvt.load_model(p, component="transformer"))
    d = _dir(root, "fifo_lora")
    os.mkfifo(d / "adapter_model.safetensors")
    add("a FIFO as the LoRA file of a folder", d, E.UnsafeFileError, r"adapter_model\.safetensors: the safetensors file is a FIFO", _lora_load)
    d = _dir(root, "fifo_adapter_config")
    fvt.save(fvt.ParamTree(_LORA), d / "adapter_model.safetensors")
    os.mkfifo(d / "adapter_config.json")
    add("a FIFO as adapter_config.json", d, E.UnsafeFileError, r"adapter_config\.json: the JSON file is a FIFO", _lora_load)
    d = _dir(root, "socket_file")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "model.safetensors"))  # the socket file stays after close
    add("a socket as the weights file", d, E.UnsafeFileError, r"model\.safetensors: the weights file is a socket")
    d = _dir(root, "device_file")
    add("a character device as the weights file", d, E.UnsafeFileError, r"/dev/null: the weights file is a character device",
        lambda p: fvt.load("/dev/null"))

    # ---- derived paths stay inside their folder (one rule)
    outside = _dir(root, "outside")
    _good(outside / "secret.safetensors")
    (outside / "config.json").write_text(json.dumps({"_class_name": "Nope"}))
    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "secret.safetensors"}}))
    fvt.save(fvt.ParamTree(_LORA), outside / "adapter_model.safetensors")
    (outside / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 64}))
    d = _dir(root, "link_model")
    (d / "model.safetensors").symlink_to(outside / "secret.safetensors")
    add("a model file linking out of its folder", d, E.UnsafeFileError, r"weights file 'model\.safetensors' resolves to .*outside")
    d = _dir(root, "link_index")
    (d / "model.safetensors.index.json").symlink_to(outside / "model.safetensors.index.json")
    add("an index linking out of its folder", d, E.UnsafeFileError, r"index file 'model\.safetensors\.index\.json' resolves to .*outside")
    d = _dir(root, "link_device")
    (d / "model.safetensors").symlink_to("/dev/zero")
    add("a model file linking to a device", d, E.UnsafeFileError, r"'model\.safetensors' resolves to /dev/zero")
    d = _dir(root, "link_loop")
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    add("a model file that is a symlink loop", d, E.UnsafeFileError, r"link_loop: weights file .model\.safetensors. cannot be resolved \(Symlink loop")
    d = _dir(root, "link_dangling")
    (d / "model.safetensors").symlink_to(d / "gone.safetensors")
    add("a model file that is a dangling link", d, E.NotFoundError, r"model\.safetensors: no such weights file")
    d = _dir(root, "link_config")
    _good(d / "model.safetensors")
    (d / "config.json").symlink_to(outside / "config.json")
    add("config.json linking out of the model folder", d, E.UnsafeFileError, r"model config 'config\.json' resolves to .*outside",
        fvt.load_model)
    d = _dir(root, "link_component")
    (d / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "Nope"]}))
    (d / "transformer").symlink_to(outside, target_is_directory=True)
    add("a pipeline component folder linking out of the pipeline", d, E.UnsafeFileError,
        r"model_index\.json: pipeline component folder 'transformer' resolves to .*outside",
        lambda p: fvt.load_model(p, component="transformer"))
    d = _dir(root, "link_lora")
    (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    add("a LoRA file linking out of its folder", d, E.UnsafeFileError, r"LoRA file 'adapter_model\.safetensors' resolves to .*outside",
        _lora_load)
    d = _dir(root, "link_adapter_config")
    fvt.save(fvt.ParamTree(_LORA), d / "adapter_model.safetensors")
    (d / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    add("adapter_config.json linking out of its folder", d, E.UnsafeFileError,
        r"LoRA config 'adapter_config\.json' resolves to .*outside", _lora_load)

    # ---- sizes that overflow, caps on ranks, digits, shards and JSON bytes
    def st(name: str, header: Any, match: str, data: bytes = b"", error: type = E.FormatError, **kw: Any) -> None:
        add(name, _st(root / f"{name}.safetensors", header, data, **kw), error, match)

    st("shape_0_by_2_63", {"a": _entry(shape=[0, 2**63], offsets=[0, 0])}, r"shape_0_by_2_63\.safetensors: tensor 'a': shape .* overflows")
    st("shape_2_62_squared_by_0", {"a": _entry(shape=[2**62, 2**62, 0], offsets=[0, 0])},
       r"shape_2_62_squared_by_0\.safetensors: tensor 'a': shape .* overflows")
    st("rank_17", {"a": _entry(shape=[1] * 17, offsets=[0, 4])}, r"rank_17\.safetensors: tensor 'a': shape has 17 dims", b"\0" * 4)
    st("rank_20000", {"a": _entry(shape=[1] * 20000, offsets=[0, 4])}, r"rank_20000\.safetensors: tensor 'a': shape has 20000 dims",
       b"\0" * 4)
    st("int_5000_digits", None, r"int_5000_digits\.safetensors: an integer of 5000 digits",
       raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"1" * 5000 + b"]}}")
    st("nan_in_header", None, r"nan_in_header\.safetensors: NaN is not JSON",
       raw_header=b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', data=b"\0" * 4)
    st("nfc_nfd_lookalike_keys", {"caf\u00e9": _entry(shape=[1], offsets=[0, 4]), "cafe\u0301": _entry(shape=[1], offsets=[4, 8])},
       r"nfc_nfd_lookalike_keys\.safetensors: keys 'caf", b"\0" * 8)
    st("kelvin_sign_lookalike_keys", {"K": _entry(shape=[1], offsets=[0, 4]), "\u212a": _entry(shape=[1], offsets=[4, 8])},
       r"kelvin_sign_lookalike_keys\.safetensors: keys 'K' and", b"\0" * 8)
    st("metadata_empty_list", {"__metadata__": [], "a": _entry(shape=[1], offsets=[0, 4])}, r"metadata_empty_list\.safetensors: '__metadata__' must map",
       b"\0" * 4)
    bomb = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":[' + b",".join([b"[]"] * 1_500_000) + b"]}"
    st("header_full_of_empty_lists", None, r"header_full_of_empty_lists\.safetensors: the header holds \d+ JSON objects and \d+ lists",
       b"\0" * 4, raw_header=bomb)
    bomb = b'{"__metadata__":{},' + b",".join(b'"%d":{}' % i for i in range(400_000)) + b"}"
    st("header_full_of_empty_objects", None, r"header_full_of_empty_objects\.safetensors: the header holds \d+ JSON objects and \d+ lists",
       raw_header=bomb)
    d = _dir(root, "idx_bomb")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s.safetensors"}, "metadata": {"x": [' + ",".join(["[]"] * 1_500_000) + "]}}")
    add("an index full of empty lists", d, E.FormatError, r"model\.safetensors\.index\.json: the index file holds \d+ JSON objects and \d+ lists")
    st("data_gap_between_tensors", {"a": _entry(shape=[1], offsets=[0, 4]), "b": _entry(shape=[1], offsets=[8, 12])},
       r"data_gap_between_tensors\.safetensors: bytes 4\.\.8 of the data, between tensors 'a' and 'b', belong to no tensor",
       b"\0" * 12)
    st("data_hidden_after_tensors", {"a": _entry(shape=[1], offsets=[0, 4])},
       r"data_hidden_after_tensors\.safetensors: the tensors cover data bytes 0\.\.4 of 1028", b"\0" * 1028)
    st("data_hidden_before_tensors", {"a": _entry(shape=[1], offsets=[4, 8])},
       r"data_hidden_before_tensors\.safetensors: the tensors cover data bytes 4\.\.8 of 8", b"\0" * 8)
    d = _dir(root, "idx_empty")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    add("an index listing no tensors", d, E.FormatError, r"idx_empty/model\.safetensors\.index\.json: the index's 'weight_map' lists no tensors")
    d = _dir(root, "idx_digits")
    (d / "model.safetensors.index.json").write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    add("an index with a 5000-digit integer", d, E.FormatError, r"idx_digits/model\.safetensors\.index\.json: key 'total_size': an integer of 5000 digits")
    d = _dir(root, "idx_infinity")
    (d / "model.safetensors.index.json").write_text('{"metadata": {"total_size": Infinity}, "weight_map": {}}')
    add("an index with Infinity", d, E.FormatError, r"idx_infinity/model\.safetensors\.index\.json: key 'total_size': Infinity is not JSON")
    d = _dir(root, "idx_30000_shards")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {f"k{i}": f"s{i}.safetensors" for i in range(30000)}}))
    add("an index naming 30000 shards", d, E.FormatError, r"model\.safetensors\.index\.json: the index names 30000 shard files, over")
    d = _dir(root, "idx_over_64MB")
    with open(d / "model.safetensors.index.json", "wb") as f:  # sparse: no disk, no time
        f.truncate(65 * 2**20)
    add("an index over the JSON size cap", d, E.FormatError, r"model\.safetensors\.index\.json: the index file is \d+ bytes, over")
    d = _dir(root, "idx_shard_slash")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "sub/s.safetensors"}}))
    add("an index shard name with a folder", d, E.UnsafeFileError, r"shard name 'sub/s\.safetensors' is not a plain file name")

    # ---- aliases never shadow, chain or go missing
    def aliased(name: str, aliases: str, match: str, order: str | None = None) -> None:
        meta = {"fvt.aliases": aliases, **({"fvt.order": order} if order else {})}
        header = {"__metadata__": meta, "a": _entry(shape=[1], offsets=[0, 4]), "b": _entry(shape=[1], offsets=[4, 8])}
        st(name, header, rf"{name}\.safetensors: " + match, b"\0" * 8)

    aliased("alias_shadows_stored", '{"b": "a"}', r"metadata 'fvt.aliases' makes 'b' an alias of 'a', but the file stores 'b'")
    aliased("alias_chain", '{"c": "d", "d": "a"}', r"alias 'c' points to missing key 'd': another alias")
    aliased("alias_cycle", '{"c": "d", "d": "c"}', r"alias 'c' points to missing key 'd': another alias")
    aliased("alias_self", '{"c": "c"}', r"alias 'c' points to missing key 'c'")
    aliased("alias_listed_twice", '{"c": "a", "c": "b"}', r"metadata 'fvt.aliases' lists 'c' twice")
    aliased("alias_long_integer", '{"c": ' + "7" * 5000 + "}", r"metadata 'fvt.aliases': key 'c': an integer of 5000 digits")
    aliased("alias_not_strings", '{"c": ["a"]}', r"metadata 'fvt.aliases' must map alias -> key")
    aliased("alias_named_metadata", '{"__metadata__": "a"}', r"metadata 'fvt.aliases' declares an alias named '__metadata__'")
    aliased("alias_named_empty", '{"": "a"}', r"metadata 'fvt.aliases' declares an alias named ''")
    many = b"{" + b",".join(b'"%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(100_002)) + b"}"
    st("header_of_100002_tensors", None, r"header_of_100002_tensors\.safetensors: the header holds 100003 JSON objects, "
       r"so up to 100002 tensors, over the limit of 100000", b"\0" * 100_002, raw_header=many)
    st("header_length_over_64MiB", None, r"header_length_over_64MiB\.safetensors: header length 67108865 exceeds",
       raw_header=b"{}", length=64 * 2**20 + 1)

    # ---- builds: one config number may not make a meta build allocate GBs (issue 13 follow-up)
    d = _dir(root, "t5_buckets_1e9")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["T5EncoderModel"], "model_type": "t5", "num_layers": 1, "d_model": 8, "d_kv": 4, "d_ff": 8,
        "num_heads": 2, "vocab_size": 10, "relative_attention_num_buckets": 10**9}))
    _good(d / "model.safetensors")
    add("a T5 config asking for an 8 GB relative-attention table", d, E.FormatError,
        r"t5_buckets_1e9/config\.json: building T5EncoderModel: .*8000000000 bytes.*BuildLimits\.max_tensor_bytes.*"
        r"'relative_attention_num_buckets': 1000000000", fvt.load_model)

    # ---- files that change under the reader
    d = _dir(root, "truncated_after_open")
    add("a file truncated after its header was read", d, E.IntegrityError, r"c\.safetensors: the file is 100 bytes now",
        _changed_after_open(lambda p: os.truncate(p, 100)))
    d = _dir(root, "replaced_after_open")
    add("a file replaced after its header was read", d, E.IntegrityError, r"c\.safetensors: the file was replaced or rewritten",
        _changed_after_open(_replace))
    return out
