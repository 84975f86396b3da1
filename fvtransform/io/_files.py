"""Finding the weight files of a path: a file, a sharded index, or a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from fvtransform.errors import FormatError, KeyMismatchError, NotFoundError, UnsafeFileError, format_keys

__all__ = ["WeightFiles", "find_weight_files", "read_index", "PICKLE_SUFFIXES", "INDEX_SUFFIX"]

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


def _inside(folder: Path, name: str, index: Path) -> Path:
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (".", "..") or "\x00" in name:
        raise UnsafeFileError(
            f"{index}: shard name {name!r} is not a plain file name in the index's folder; refusing to follow it"
        )
    candidate = folder / name
    real = candidate.resolve()
    root = _allowed_root(folder)
    if not str(real).startswith(str(root) + os.sep):
        raise UnsafeFileError(f"{index}: shard {name!r} resolves to {real}, outside {root}; refusing to follow it")
    return candidate


def _allowed_root(folder: Path) -> Path:
    """Where a shard may resolve: the index's folder, or the whole repo folder of a hub cache snapshot.

    In the huggingface_hub cache, ``<repo>/snapshots/<commit>/x`` is a link to
    ``<repo>/blobs/<hash>``: links into the same repo's cache are its layout.
    """
    real = folder.resolve()
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and len(parts[i + 1]) == 40 and (Path(*parts[:i]) / "blobs").is_dir():
            return Path(*parts[:i])
    return real


def read_index(index: Path) -> WeightFiles:
    """Parse a ``*.safetensors.index.json`` strictly (duplicates, escapes, missing shards)."""

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in pairs:
            if k in out:
                raise KeyMismatchError(f"{index}: key {k!r} is listed twice; the index is corrupt")
            out[k] = v
        return out

    try:
        doc = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=hook)
    except KeyMismatchError:
        raise
    except FileNotFoundError:
        raise NotFoundError(f"{index}: no such index file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{index}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise FormatError(f"{index}: expected an object with a 'weight_map' object of key -> shard file name")
    folder = index.parent
    weight_map: dict[str, Path] = {}
    files: dict[Path, None] = {}
    checked: dict[object, Path] = {}  # each shard name is checked once, not once per key
    for key, name in doc["weight_map"].items():
        path = checked.get(name) if isinstance(name, str) else None
        if path is None:
            path = checked[name] = _inside(folder, name, index)  # type: ignore[arg-type]
        weight_map[key] = path
        files[path] = None
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise NotFoundError(f"{index}: shard files listed in the index are missing: {format_keys(missing)}")
    meta = doc.get("metadata") or {}
    return WeightFiles(tuple(files), index, weight_map, metadata=dict(meta) if isinstance(meta, dict) else {})


def find_weight_files(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> WeightFiles:
    """Resolve a path to the weight files of one checkpoint, never mixing unrelated files.

    Folders prefer an index, then ``diffusion_pytorch_model.safetensors`` or
    ``model.safetensors``, then a lone ``*.safetensors``. Pickle files are
    considered only when no safetensors exist, and only with ``allow_pickle``.
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(INDEX_SUFFIX):
            return read_index(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle(path, allow_pickle)
        return WeightFiles((path,))
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise FormatError(f"{path}: not a file or folder")
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    for stem in _PREFERRED:
        if f"{stem}{INDEX_SUFFIX}" in indexes:
            return read_index(path / f"{stem}{INDEX_SUFFIX}")
    if len(indexes) == 1:
        return read_index(path / indexes[0])
    if len(indexes) > 1:
        raise FormatError(f"{path}: several index files {indexes}; pass the one to load")
    singles = [n for n in names if n.endswith(".safetensors")]
    for stem in _PREFERRED:
        if f"{stem}.safetensors" in singles:
            return WeightFiles((path / f"{stem}.safetensors",))
    if len(singles) == 1:
        return WeightFiles((path / singles[0],))
    if len(singles) > 1:
        raise FormatError(
            f"{path}: several unrelated safetensors files and no index: {format_keys(singles)}; "
            "pass the file to load, or save the checkpoint with an index"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if len(pickles) == 1:
        return _pickle(path / pickles[0], allow_pickle)
    if pickles:
        raise FormatError(f"{path}: several pickle files {format_keys(pickles)} and no safetensors; pass one")
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
