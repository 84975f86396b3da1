"""``fvt.save``: atomic single-file and sharded safetensors writes."""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import ctypes
import ctypes.util
import json
import os
from pathlib import Path
import re
import secrets
import shutil

import torch

from fvtransform.errors import FormatError
from fvtransform.io._load import ALIASES_KEY
from fvtransform.io._safetensors import TMP_MARK, atomic_path, clean_stale_temps, fsync_dir, write_safetensors
from fvtransform.tree._paramtree import ParamTree

__all__ = ["save", "parse_size"]

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
            raise FormatError(f"max_shard_size {size!r} is not a size such as 5GB, 500MiB or 1000000")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise FormatError(f"max_shard_size must be positive; found {size!r}")
    return value


def _dedupe(tree: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    first: dict[int, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in tree.items():
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
) -> None:
    """Save a tree as safetensors, atomically. The tree is not mutated.

    Without ``max_shard_size``, ``path`` is a file: the bytes go to a
    temporary file beside it, are flushed and fsynced, and the file is renamed
    into place, so a crash leaves the old file or the new one, never a part.
    With ``max_shard_size`` (bytes or ``"5GB"``), ``path`` is a folder that
    receives ``{weights_name}-00001-of-0000N.safetensors`` shards and
    ``{weights_name}.safetensors.index.json`` in the Hugging Face layout (one
    shard: a plain ``{weights_name}.safetensors``). The new folder is built
    beside the old one (other files, such as ``config.json``, are carried
    over) and swapped in with one atomic exchange: never a mix of versions.
    Tied tensors are written once and come back tied from :func:`load`.

    >>> import torch, tempfile, os, fvtransform as fvt
    >>> d = tempfile.mkdtemp()
    >>> t = fvt.ParamTree({"a": torch.zeros(100), "b": torch.ones(100)})
    >>> fvt.save(t, os.path.join(d, "ckpt"), max_shard_size=500)
    >>> sorted(os.listdir(os.path.join(d, "ckpt")))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> fvt.load(os.path.join(d, "ckpt")) == t
    True
    """
    if not isinstance(tree, Mapping):
        raise FormatError(f"save takes a ParamTree or a mapping of str -> Tensor; found {type(tree).__name__}")
    if not isinstance(tree, ParamTree):
        tree = ParamTree(tree)
    path = Path(path)
    unique, aliases = _dedupe(tree)
    meta = _meta(metadata, aliases, list(tree))
    if max_shard_size is None:
        if path.is_dir():
            raise FormatError(f"{path} is a folder; pass a file path, or max_shard_size= to write shards into it")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write_safetensors(f, unique, meta)
            f.flush()
            os.fsync(f.fileno())
        return
    _save_sharded(unique, path, parse_size(max_shard_size), meta, weights_name)


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


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, limit: int, meta: dict[str, str], name: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise FormatError(f"{folder} is a file; a sharded save writes a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder.parent, folder.name)
    tmp = folder.parent / f".{folder.name}{TMP_MARK}{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        if folder.is_dir():
            _carry_other_files(folder, tmp, name)
        groups = _plan_shards(tensors, limit)
        n = len(groups)
        weight_map: dict[str, str] = {}
        total = 0
        for i, keys in enumerate(groups, 1):
            fname = f"{name}.safetensors" if n == 1 else f"{name}-{i:05d}-of-{n:05d}.safetensors"
            with open(tmp / fname, "wb") as f:
                write_safetensors(f, {k: tensors[k] for k in keys}, {"format": "pt"} if n > 1 else meta)
                f.flush()
                os.fsync(f.fileno())
            for k in keys:
                weight_map[k] = fname
                total += tensors[k].numel() * tensors[k].element_size()
        if n > 1:
            index_meta: dict[str, object] = {"total_size": total}
            index_meta.update({k: v for k, v in meta.items() if k != "format"})
            with open(tmp / f"{name}.safetensors.index.json", "w", encoding="utf-8") as f:
                json.dump({"metadata": index_meta, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _carry_other_files(old: Path, new: Path, name: str) -> None:
    for entry in old.iterdir():
        n = entry.name
        is_weights = n.startswith(name) and (n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))
        if is_weights or TMP_MARK in n:
            continue
        target = new / n
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True)
        else:
            try:
                os.link(entry, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, target, follow_symlinks=False)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _swap_in(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.rename(tmp, folder)
    elif not _exchange(tmp, folder):
        # Fallback without an atomic exchange: a crash between the renames leaves
        # the old version under the temporary name, where the next write removes it.
        old = folder.parent / f".{folder.name}{TMP_MARK}old-{secrets.token_hex(4)}"
        os.rename(folder, old)
        os.rename(tmp, folder)
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
    fsync_dir(folder.parent)
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
