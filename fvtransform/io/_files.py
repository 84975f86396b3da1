"""Finding the weight files of a path: a file, a sharded index, or a folder."""

from __future__ import annotations

import os
from pathlib import Path
import stat

import attrs

from fvtransform._json import JsonLimits, read_json_file
from fvtransform.errors import (
    FormatError,
    KeyMismatchError,
    NotFoundError,
    UnsafeFileError,
    UsageError,
)
from fvtransform._messages import format_keys
from fvtransform.io._header import MAX_INT_DIGITS, OBJECT_BYTES
from fvtransform.io._open import MAX_JSON_BYTES, allowed_root, check_regular, contained, no_such_path

__all__ = ["WeightFiles", "find_weight_files", "file_entries", "read_index", "PICKLE_SUFFIXES", "INDEX_SUFFIX", "MAX_SHARDS", "INDEX_JSON"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"
_PREFERRED = ("diffusion_pytorch_model", "model")


@attrs.frozen
class WeightFiles:
    """The files that make up one checkpoint.

    ``weight_map`` is None for a single file; for an index it maps each key
    to the file that holds it, in the index's order.
    """

    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, Path] | None = None
    pickle: bool = False
    metadata: dict[str, object] = attrs.field(factory=dict)


#: The most shard files an index may name (the largest public checkpoints have a few hundred).
MAX_SHARDS = 4096
#: The JSON bounds of a ``*.safetensors.index.json`` (the one reader, :mod:`fvtransform._json`): 64 MiB,
#: integers of 20 digits (sizes), two million entries, and no denser in objects than a header.
INDEX_JSON = JsonLimits(max_bytes=MAX_JSON_BYTES, max_depth=8, max_int_digits=MAX_INT_DIGITS, max_values=2_000_000,
                        object_bytes=OBJECT_BYTES)


def read_index(index: Path) -> WeightFiles:
    """Parse a ``*.safetensors.index.json`` strictly (duplicates, escapes, missing shards, size caps)."""

    index = index if isinstance(index, Path) else Path(index)  # a DerivedPath keeps its root
    doc = read_json_file(index, limits=INDEX_JSON, expect=None, what="index file",
                         duplicate=lambda k: KeyMismatchError(f"{index}: key {k!r} is listed twice; the index is corrupt"))
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise FormatError(f"{index}: expected an object with a 'weight_map' object of key -> shard file name")
    if not doc["weight_map"]:
        raise FormatError(f"{index}: the index's 'weight_map' lists no tensors; the index is broken — save the checkpoint again")
    folder = index.parent
    shards = {name for name in doc["weight_map"].values() if isinstance(name, str)}
    if len(shards) > MAX_SHARDS:
        raise FormatError(
            f"{index}: the index names {len(shards)} shard files, over the limit of {MAX_SHARDS}; "
            "refusing an index that large — it is corrupt or hostile"
        )
    root = allowed_root(folder)
    weight_map: dict[str, Path] = {}
    files: dict[Path, None] = {}
    checked: dict[object, Path] = {}  # each shard name is checked once, not once per key
    for key, name in doc["weight_map"].items():
        path = checked.get(name) if isinstance(name, str) else None
        if path is None:
            path = checked[name] = contained(folder, name, "shard", index, root=root)
        weight_map[key] = path
        files[path] = None
    missing = []
    for p in files:
        try:
            check_regular(p, "shard")
        except NotFoundError:
            missing.append(p.name)
    if missing:
        raise NotFoundError(f"{index}: shard files listed in the index are missing: {format_keys(missing)}")
    meta = doc.get("metadata") or {}
    return WeightFiles(tuple(files), index, weight_map, metadata=dict(meta) if isinstance(meta, dict) else {})


def file_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not folders (FIFOs and dangling links included: picking one is an error)."""
    with os.scandir(folder) as it:
        names = []
        for e in it:
            try:
                if not e.is_dir():
                    names.append(e.name)
            except OSError:
                names.append(e.name)
    return sorted(names)


def _pick(folder: Path, name: str, what: str) -> Path:
    path = contained(folder, name, what)
    check_regular(path, what)
    return path


def find_weight_files(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> WeightFiles:
    """Resolve a path to the weight files of one checkpoint, never mixing unrelated files.

    Folders prefer an index, then ``diffusion_pytorch_model.safetensors`` or
    ``model.safetensors``, then a lone ``*.safetensors``. Pickle files are
    considered only when no safetensors exist, and only with ``allow_pickle``.
    """
    path = path if isinstance(path, Path) else Path(path)  # a DerivedPath (component folder) keeps its root
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise no_such_path(path) from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISDIR(mode):
        check_regular(path, "weights file")  # a FIFO, socket or device: refused before any open
        if path.name.endswith(INDEX_SUFFIX):
            return read_index(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle(path, allow_pickle)
        return WeightFiles((path,))
    names = file_entries(path)
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    for stem in _PREFERRED:
        if f"{stem}{INDEX_SUFFIX}" in indexes:
            return read_index(_pick(path, f"{stem}{INDEX_SUFFIX}", "index file"))
    if len(indexes) == 1:
        return read_index(_pick(path, indexes[0], "index file"))
    if len(indexes) > 1:
        raise UsageError(f"{path}: several index files {indexes}; pass the one to load, e.g. fvt.load({str(path / indexes[0])!r})")
    singles = [n for n in names if n.endswith(".safetensors")]
    for stem in _PREFERRED:
        if f"{stem}.safetensors" in singles:
            return WeightFiles((_pick(path, f"{stem}.safetensors", "weights file"),))
    if len(singles) == 1:
        return WeightFiles((_pick(path, singles[0], "weights file"),))
    if len(singles) > 1:
        raise UsageError(
            f"{path}: several unrelated safetensors files and no index: {format_keys(singles)}; "
            f"pass the file to load, e.g. fvt.load({str(path / sorted(singles)[0])!r}), or save the checkpoint with an index"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if len(pickles) == 1:
        return _pickle(_pick(path, pickles[0], "weights file"), allow_pickle)
    if pickles:
        raise UsageError(f"{path}: several pickle files {format_keys(pickles)} and no safetensors; pass one, "
                         f"e.g. fvt.load({str(path / sorted(pickles)[0])!r}, allow_pickle=True)")
    raise NotFoundError(
        f"{path}: no weights found (expected *.safetensors, an *.safetensors.index.json, or with allow_pickle=True a .bin/.pt)"
    )


def _pickle(path: Path, allow: bool) -> WeightFiles:
    if not allow:
        raise UnsafeFileError(
            f"{path}: pickle-based weights can run code when loaded; refused. Convert the file to "
            "safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)."
        )
    return WeightFiles((path,), pickle=True)
