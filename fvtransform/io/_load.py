"""``fvt.load``: a file, sharded index or folder -> a lazily memory-mapped ParamTree."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fvtransform._args import check_strict
from fvtransform._json import loads_json
from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._messages import format_keys
from fvtransform.errors import FormatError, FvTransformError, KeyMismatchError, UsageError
from fvtransform.io._files import WeightFiles, find_weight_files
from fvtransform.io._header import HEADER_JSON, Header, TensorInfo, _check_lookalikes, read_header
from fvtransform.io._open import fd_path, open_regular
from fvtransform.io._safetensors import MappedFile
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._keymap import KeyMap, KeyMapLike
from fvtransform.tree._paramtree import ParamTree

if TYPE_CHECKING:  # torch.distributed and the plans load only when a mesh is passed
    from torch.distributed.device_mesh import DeviceMesh

    from fvtransform.distributed._plan import PlanLike

__all__ = ["load", "open_checkpoint", "Checkpoint", "ALIASES_KEY"]

#: Metadata key under which ``fvt.save`` records tied tensors (alias -> canonical key).
ALIASES_KEY = "fvt.aliases"


class Checkpoint:
    """The headers of a checkpoint's files, read once; tensors come on demand.

    ``keys()`` is in the checkpoint's order (the index's ``weight_map`` order
    for sharded files, the header's order for one file); aliased keys (tied
    weights saved once) are included. Made by :func:`open_checkpoint`, the
    public way to look into a checkpoint without loading it.
    """

    def __init__(self, files: WeightFiles) -> None:
        self.files = files
        self._mapped: dict[Path, MappedFile] = {}
        self._where: dict[str, Path] = {}
        self.aliases: dict[str, str] = {}
        headers: dict[Path, Header] = {f: read_header(f) for f in files.files}
        if files.weight_map is None:
            (path,) = files.files
            self._where = {k: path for k in headers[path].tensors}
            self.aliases = _aliases(headers[path].metadata.get(ALIASES_KEY), path, headers[path].tensors)
        else:
            index = files.index
            owners: dict[str, list[Path]] = {}
            for f, h in headers.items():
                for k in h.tensors:
                    owners.setdefault(k, []).append(f)
            twice = {k: v for k, v in owners.items() if len(v) > 1}
            if twice:
                k, fs = next(iter(twice.items()))
                raise KeyMismatchError(
                    f"{index}: key {k!r} is in two shards ({', '.join(p.name for p in fs)}); the checkpoint is corrupt"
                )
            for key, f in files.weight_map.items():
                if key not in headers[f].tensors:
                    raise KeyMismatchError(f"{index}: maps {key!r} to {f.name}, but that shard does not hold it")
                self._where[key] = f
            extra = [k for k in owners if k not in files.weight_map]
            if extra:
                raise KeyMismatchError(
                    f"{index}: shards hold keys the index does not list: {format_keys(extra)}; the index is stale"
                )
            self.aliases = _aliases(files.metadata.get(ALIASES_KEY), index, self._where)
        self.headers = headers
        _check_lookalikes(files.index or files.files[0], [*self._where, *self.aliases])  # across shards and aliases
        if self.aliases:
            meta = headers[files.files[0]].metadata if files.weight_map is None else files.metadata
            self._order = _order(meta.get("fvt.order"), list(self._where), self.aliases, files.index or files.files[0])
        else:
            self._order = list(self._where)

    def keys(self) -> list[str]:
        return list(self._order)

    def info(self, key: str) -> TensorInfo:
        """Where ``key`` lives: its dtype, shape and byte range (from the header; nothing is read)."""
        canon = self.aliases.get(key, key)
        return self.headers[self._where[canon]].tensors[canon]

    def mapped(self, key: str) -> MappedFile:
        f = self._where[self.aliases.get(key, key)]
        if f not in self._mapped:
            self._mapped[f] = MappedFile(f, self.headers[f])
        return self._mapped[f]

    def file_of(self, key: str) -> Path:
        """The file that holds ``key``'s bytes."""
        return self._where[self.aliases.get(key, key)]

    def tensor(self, key: str) -> torch.Tensor:
        canon = self.aliases.get(key, key)
        return self.mapped(canon).tensor(canon)

    @property
    def metadata(self) -> dict[str, str]:
        if self.files.weight_map is None:
            return dict(self.headers[self.files.files[0]].metadata)
        return {k: str(v) for k, v in self.files.metadata.items()}


class _LazyKeys(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by key, each mapped only when asked for (the float8 layout check reads scales only)."""

    def __init__(self, ckpt: Checkpoint, keys: list[str]) -> None:
        self._ckpt, self._keys = ckpt, keys
        self.dtypes = {k: ckpt.info(k).dtype for k in keys}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.dtypes:
            raise KeyError(key)
        return self._ckpt.tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


#: Names no alias may take, and why (a safetensors file can store no tensor under them).
_RESERVED_NAMES: dict[str, str] = {
    "__metadata__": "'__metadata__' is the header's metadata slot",
    "": "an empty name names nothing",
}

#: The most aliases a checkpoint may declare (tied groups are few; a map this large is hostile).
MAX_ALIASES = 100_000


def _json_value(raw: str, where: object, field: str) -> Any:
    """A metadata field's JSON value, read with the header's bounds (:data:`HEADER_JSON`)."""
    return loads_json(raw, source=f"{where}: metadata {field!r}", limits=HEADER_JSON,
                      duplicate=lambda k: FormatError(f"{where}: metadata {field!r} lists {k!r} twice"))


def _aliases(raw: object, where: Path | None, stored: Mapping[str, object]) -> dict[str, str]:
    """The alias map (alias -> stored key), checked against the keys the file really stores.

    An alias must not name a stored key (it would shadow real bytes), and must
    point straight at a stored key (no chains, no cycles, nothing missing).
    """
    if raw is None:
        return {}
    value = _json_value(raw, where, ALIASES_KEY) if isinstance(raw, str) else raw
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{where}: metadata {ALIASES_KEY!r} must map alias -> key (strings)")
    if len(value) > MAX_ALIASES:
        raise FormatError(f"{where}: metadata {ALIASES_KEY!r} declares {len(value)} aliases, over the limit of {MAX_ALIASES}")
    for alias, canon in value.items():
        if alias in _RESERVED_NAMES:
            raise FormatError(
                f"{where}: metadata {ALIASES_KEY!r} declares an alias named {alias!r} (of {canon!r}): "
                f"{_RESERVED_NAMES[alias]}, so it can be no tensor's name; the file is corrupt or hostile — save it again"
            )
        if alias in stored:
            raise FormatError(
                f"{where}: metadata {ALIASES_KEY!r} makes {alias!r} an alias of {canon!r}, but the file stores "
                f"{alias!r} itself; refusing a file whose metadata would hide a stored tensor"
            )
        if canon not in stored:
            what = "another alias (aliases must point to a stored key)" if canon in value else "a key the file does not store"
            raise FormatError(f"{where}: alias {alias!r} points to missing key {canon!r}: {what}")
    return dict(value)


def _order(raw: object, keys: list[str], aliases: dict[str, str], where: object) -> list[str]:
    """The saved key order (``fvt.order``) when it lists exactly the keys and aliases; else stored keys, then aliases."""
    default = keys + list(aliases)
    if not isinstance(raw, str):
        return default
    try:
        order = _json_value(raw, where, "fvt.order")
    except FormatError:
        return default  # only the order is lost; every key is still there
    if isinstance(order, list) and len(order) == len(default) and all(isinstance(k, str) for k in order) \
            and set(order) == set(default):
        return order
    return default


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Read the headers of a checkpoint (no tensor bytes)."""
    files = find_weight_files(path, allow_pickle=allow_pickle)
    if files.pickle:
        raise UsageError("open_checkpoint reads safetensors only; use fvt.load(..., allow_pickle=True)")
    return Checkpoint(files)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open_regular(path, "pickle weights file") as f:  # the very file checked is the one read
            obj = torch.load(fd_path(f.fileno()) or path, map_location="cpu", weights_only=True, mmap=True)
    except FvTransformError:
        raise
    except Exception as e:  # the weights-only unpickler refuses code; say so
        from fvtransform.errors import UnsafeFileError

        raise UnsafeFileError(f"{path}: torch.load(weights_only=True) refused the file: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FormatError(f"{path}: expected a dict of name -> tensor")
    return obj


def load(
    path: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = None,
    device: torch.device | str = "cpu",
    select: Pattern | None = None,
    rename: KeyMapLike | None = None,
    strict: bool = True,
    mesh: DeviceMesh | None = None,
    plan: PlanLike = None,
    allow_pickle: bool = False,
) -> ParamTree:
    """Load a checkpoint as a ParamTree, lazily and memory-mapped.

    ``path`` is a ``.safetensors`` file, a ``*.safetensors.index.json``, or a
    folder (an index is preferred; unrelated files are never mixed). Building
    the tree reads only headers; a tensor's bytes are read when it is used.
    The mapping is private: writing to a returned tensor never changes the
    file. ``select`` keeps only matching keys (the rest stay on disk);
    ``rename`` (anything :meth:`KeyMap.of <fvtransform.KeyMap.of>` takes, as
    :func:`fvtransform.rename` does) renames, fuses or splits keys, strictly
    unless ``strict=False`` (then keys no rule claims keep their names and
    unused rules are allowed, as in :meth:`KeyMap.plan <fvtransform.KeyMap.plan>`;
    ``strict`` concerns the rename only); ``dtype`` (a ``torch.dtype`` or its
    name, ``"bfloat16"``) casts floating tensors one by one; ``device`` moves them one by one. With ``mesh`` (a
    ``DeviceMesh``) and ``plan`` (``None``/``"fsdp"``, ``"tp"`` or a
    :class:`~fvtransform.distributed.ShardPlan`) every rank reads only the
    bytes of its own slices and gets a tree of DTensors, as
    :func:`fvtransform.shard` would make from the full tree.

    Pickle-based files (``.bin``, ``.pt``) are refused unless
    ``allow_pickle=True`` and then read with ``torch.load(weights_only=True)``.

    >>> import torch, tempfile, os, fvtransform as fvt
    >>> d = tempfile.mkdtemp()
    >>> fvt.save(fvt.ParamTree({"w": torch.ones(2)}), os.path.join(d, "m.safetensors"))
    >>> fvt.load(os.path.join(d, "m.safetensors"))["w"]
    tensor([1., 1.])
    """
    strict = check_strict(strict, "fvt.load")
    key_map = None if rename is None else KeyMap.of(rename)
    dtype = None if dtype is None else as_dtype(dtype)
    if mesh is not None:
        if torch.device(device).type != "cpu":
            raise UsageError("load(..., mesh=) reads slices on the CPU; move the sharded tree with fvt.to afterwards")
        from fvtransform.distributed import shard
        from fvtransform.distributed._shard import shard_mapped

        # the lazy tree only maps the files; shard slices views of it, so each rank reads its own slices
        lazy = load(path, select=select, allow_pickle=allow_pickle)
        if key_map is not None:  # fused targets are built from each rank's slices of their pieces
            return shard_mapped(lazy, key_map.plan(lazy, strict=strict), mesh, plan, dtype=dtype)
        return shard(lazy, mesh, plan, dtype=dtype)
    if plan is not None:
        raise UsageError("plan= needs mesh=: pass the DeviceMesh to shard over")
    files = find_weight_files(path, allow_pickle=allow_pickle)
    if files.pickle:
        data = _load_pickle(files.files[0])
        keys = list(data)
        get = data.__getitem__
    else:
        ckpt = Checkpoint(files)
        keys = ckpt.keys()
        get = ckpt.tensor
    all_keys = keys
    if select is not None:
        m = matcher(select)
        keys = [k for k in keys if m(k, None)]  # type: ignore[arg-type]
        if not keys:
            raise KeyMismatchError(f"{path}: select={select!r} matched no key")
    if not files.pickle:  # a float8 checkpoint: its scaled-fp8 layout checked, naming the file
        from fvtransform.tree._fp8 import check_file

        on_disk = _LazyKeys(ckpt, all_keys)
        check_file(on_disk, on_disk.dtypes, keys, dtype, path)
    memo: dict[str, torch.Tensor] = {}
    canon_of: dict[str, str] = {} if files.pickle else ckpt.aliases
    data_out: dict[str, torch.Tensor] = {}
    dev = torch.device(device)
    for k in keys:
        canon = canon_of.get(k, k)
        if canon in memo:
            data_out[k] = memo[canon]
            continue
        t = get(canon)
        if dtype is not None and t.dtype.is_floating_point and t.dtype != dtype:
            t = t.to(dtype)
        if t.device != dev:
            t = t.to(dev)
        memo[canon] = t
        data_out[k] = t
    tree = ParamTree._wrap(data_out)
    if not files.pickle:  # float8 tensors remember their file: a NaN found when one is used names it
        from fvtransform.tree._fp8 import note_sources

        note_sources(data_out, path)
    return tree if key_map is None else key_map(tree, strict=strict)
