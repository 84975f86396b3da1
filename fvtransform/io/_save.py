"""``fvt.save``: atomic single-file and sharded safetensors writes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from fvtransform._json import read_json_file
from fvtransform.errors import FvTransformError, UsageError, WriteError
from fvtransform.io._atomic import (
    LOCK_MARK,
    OLD_MARK,
    atomic_file,
    check_destination,
    check_path,
    exchange,
    swap_in,
    write_folder,
)
from fvtransform.io._files import INDEX_JSON
from fvtransform.io._load import ALIASES_KEY
from fvtransform.io._mapped import mapped_tree_bytes
from fvtransform.io._safetensors import TMP_MARK, check_names, tensor_specs, write_safetensors
from fvtransform.tree._keymap import KeyMap, KeyMapLike
from fvtransform.tree._paramtree import ParamTree

__all__ = ["save", "parse_size", "tree_bytes", "previous_save"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` or ``"500MiB"``.

    >>> parse_size("2KB"), parse_size("1MiB"), parse_size(7)
    (2000, 1048576, 7)
    """
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise UsageError(f"max_shard_size {size!r} is not a size such as 5GB, 500MiB or 1000000")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"max_shard_size must be positive; found {size!r}")
    return value


#: The longest ``weights_name`` (bytes): with ``-00001-of-00002.safetensors.index.json`` it stays a valid file name.
_MAX_WEIGHTS_NAME = 150


def _check_weights_name(name: object) -> str:
    """``name`` if it is a plain file-name stem (no folder part, no NUL, not hidden, not one of the writers' marks)."""
    if not isinstance(name, str):
        raise UsageError(f"weights_name must be a str file-name stem such as 'model'; found {type(name).__name__}")
    bad = (not name or name != os.path.basename(name) or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
           or len(os.fsencode(name)) > _MAX_WEIGHTS_NAME or any(m in name for m in (TMP_MARK, LOCK_MARK, OLD_MARK)))
    if bad:
        raise UsageError(
            f"weights_name {name!r} is not a plain file-name stem: the shards go inside the folder as "
            f"'<weights_name>-00001-of-0000N.safetensors'; pass a name such as 'model' or 'diffusion_pytorch_model' "
            f"(no '/', '\\', NUL or leading '.', at most {_MAX_WEIGHTS_NAME} bytes)"
        )
    return name


def _dedupe(tree: Mapping[str, torch.Tensor], where: object = "save") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_names(tree, where)  # a tied alias is a name too
    first: dict[int, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            raise UsageError(f"{k!r}: a {v.layout} tensor cannot be saved as safetensors (dense tensors only); "
                              "convert it with .to_dense() first")
        if id(v) in first:
            aliases[k] = first[id(v)]
        else:
            first[id(v)] = k
            unique[k] = v
    return unique, aliases


def _meta(metadata: Mapping[str, str] | None, aliases: dict[str, str], order: list[str]) -> dict[str, str]:
    meta = {"format": "pt"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
        meta["fvt.order"] = json.dumps(order)
    return meta


def save(
    tree: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
    weights_name: str = "model",
    rename: KeyMapLike | None = None,
) -> None:
    """Save a tree as safetensors, atomically. The tree is not mutated.

    ``rename=`` (a :class:`~fvtransform.KeyMap`, as :func:`load` takes) writes
    the mapped keys without building the mapped tree: each fused key is made
    when its bytes are written, then dropped (one file; ``fvt.save(fvt.rename(tree, m), ...)`` for shards).

    Without ``max_shard_size``, ``path`` is a file: the bytes go to a
    temporary file beside it, are flushed and fsynced, and the file is renamed
    into place, so a crash leaves the old file or the new one, never a part.
    With ``max_shard_size`` (bytes or ``"5GB"``), ``path`` is a folder that
    receives ``{weights_name}-00001-of-0000N.safetensors`` shards and
    ``{weights_name}.safetensors.index.json`` in the Hugging Face layout (one
    shard: a plain ``{weights_name}.safetensors``). The new folder is built
    beside the old one (other files, such as ``config.json``, are carried
    over as hard links) and swapped in with one atomic exchange: never a mix of
    versions. Only the files of the previous save of the same ``weights_name``
    (its index and the shards it names, or its single file) are replaced;
    every other file of the folder, ``model_ema.safetensors`` included, is kept.
    Like ``torch.save`` and ``safetensors.torch.save_file``, the file at
    ``path`` (or, sharded, a file of one of the names written) is replaced:
    naming it is the consent (``fvt.lora.save`` and the CLI ask for ``overwrite``).
    Concurrent writers of one path, and of a folder and the files saved into
    it, are serialised by lock files.
    Tied tensors are written once and come back tied from :func:`load`.

    >>> import torch, tempfile, os, fvtransform as fvt
    >>> d = tempfile.mkdtemp()
    >>> t = fvt.ParamTree({"a": torch.zeros(100), "b": torch.ones(100)})
    >>> fvt.save(t, os.path.join(d, "ckpt"), max_shard_size=500)
    >>> sorted(os.listdir(os.path.join(d, "ckpt")))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> fvt.load(os.path.join(d, "ckpt")) == t
    True

    Raises:
        UsageError: not a tree, a bad size, a ``weights_name`` that is not a plain file-name stem, a sparse
            tensor, a NUL in ``path``.
        WriteError: a folder where a file goes (or back: a folder named like one of the shards, the index or
            the single file is refused, never removed).
        UnsafeFileError: ``path`` is a symlink, FIFO, device or socket.
        WriteError: a full disk, a read-only destination, a lock held too long (the old data is intact).
    """
    from fvtransform.lora._adapter import LoraAdapter

    if isinstance(tree, LoraAdapter):
        raise UsageError(
            "fvt.save(tree, path) writes a tree of tensors; found a LoraAdapter. "
            "Save an adapter with fvt.lora.save(adapter, path)"
        )
    if not isinstance(tree, Mapping):
        raise UsageError(f"save takes a ParamTree or a mapping of str -> Tensor; found {type(tree).__name__}")
    if not isinstance(tree, ParamTree):
        tree = ParamTree(tree)
    path = check_path(path)
    if max_shard_size is not None:
        _check_weights_name(weights_name)
    if max_shard_size is None:
        if path.is_dir():
            raise WriteError(f"{path} is a folder; pass a file path, or max_shard_size= to write shards into it")
        write = tree_bytes(tree, metadata, where=path) if rename is None else \
            mapped_tree_bytes(tree, KeyMap.of(rename), _meta(metadata, {}, []), where=path)
        with atomic_file(path) as tmp, open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return
    if rename is not None:
        raise UsageError(f"{path}: save(..., rename=) writes one file; for shards call "
                         "fvt.save(fvt.rename(tree, key_map), folder, max_shard_size=...)")
    unique, aliases = _dedupe(tree, path)
    _save_sharded(unique, path, parse_size(max_shard_size), _meta(metadata, aliases, list(tree)), weights_name)


def tree_bytes(
    tree: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, where: object = None
) -> Callable[[BinaryIO], int]:
    """A writer of ``tree`` as one safetensors file, exactly as :func:`save` writes it (for multi-file units).

    Tied tensors are written once; ``where`` names the destination in errors (default: the open file's name).
    """
    if not isinstance(tree, ParamTree):
        tree = ParamTree(tree)
    unique, aliases = _dedupe(tree, where if where is not None else "save")
    meta = _meta(metadata, aliases, list(tree))
    specs = tensor_specs(unique, where if where is not None else "save")
    return lambda f: write_safetensors(f, specs, unique.__getitem__, meta, where=where)


def _plan_shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def previous_save(folder: Path, name: str) -> set[str]:
    """The files of ``folder`` that a previous save of ``name`` wrote: its index, the shards it names, its single file.

    Only names of the save's own shape count (``{name}.safetensors``,
    ``{name}-00001-of-00003.safetensors``, the index), so a broken or hostile
    index cannot make a re-save drop ``config.json`` or ``model_ema.safetensors``.
    """
    shard = re.compile(re.escape(name) + r"-\d{5,}-of-\d{5,}\.safetensors")
    single, index = f"{name}.safetensors", f"{name}.safetensors.index.json"
    mine = {n for n in (single, index) if (folder / n).is_file() and not (folder / n).is_symlink()}
    if index in mine:
        try:
            doc = read_json_file(folder / index, limits=INDEX_JSON, expect=None, what="index file")
        except FvTransformError:  # a broken previous index names nothing: only the save's own names are replaced
            doc = None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if isinstance(weight_map, dict):
            mine.update(v for v in weight_map.values() if isinstance(v, str) and shard.fullmatch(v))
    return mine


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, limit: int, meta: dict[str, str], name: str) -> None:
    check_destination(folder, folder=True)  # a file, a FIFO, a symlink: refused before any work
    groups = _plan_shards(tensors, limit)
    n = len(groups)
    fnames = [f"{name}.safetensors" if n == 1 else f"{name}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index_name = f"{name}.safetensors.index.json"

    def build(tmp: Path) -> None:
        weight_map: dict[str, str] = {}
        total = 0
        for fname, keys in zip(fnames, groups, strict=True):
            with open(tmp / fname, "xb") as f:
                specs = tensor_specs({k: tensors[k] for k in keys}, folder / fname)
                write_safetensors(f, specs, tensors.__getitem__, {"format": "pt"} if n > 1 else meta, where=folder / fname)
                f.flush()
                os.fsync(f.fileno())
            for k in keys:
                weight_map[k] = fname
                total += tensors[k].numel() * tensors[k].element_size()
        if n > 1:
            index_meta: dict[str, object] = {"total_size": total}
            index_meta.update({k: v for k, v in meta.items() if k != "format"})
            with open(tmp / index_name, "x", encoding="utf-8") as f:
                json.dump({"metadata": index_meta, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())

    names = fnames + ([index_name] if n > 1 else [])
    # the save's own names are replaced (save semantics); everything else in the folder is kept
    write_folder(folder, names, build, owned=lambda d: previous_save(d, name), overwrite=True, what="sharded save")


# kept for callers that swap folders themselves
_exchange = exchange
_swap_in = swap_in


save.__fvt_eager__ = "save"  # type: ignore[attr-defined]
