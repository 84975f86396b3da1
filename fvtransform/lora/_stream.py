"""Merging adapters into a checkpoint on disk, tensor by tensor: models larger than memory merge too.

The input's layout is kept (one file, or the same shard files and index; other
files of the folder are copied). Each tensor is read from the memory map,
merged (float32, one rounding, as :func:`fvtransform.lora.merge`), written and
dropped, so the peak memory is about the largest tensor plus the adapters.
The output is written atomically and records what was merged at what scale
in its metadata; the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import secrets
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fvtransform.errors import FormatError
from fvtransform.io._files import find_weight_files
from fvtransform.io._header import DTYPE_NAMES
from fvtransform.io._load import Checkpoint
from fvtransform.io._open import read_text
from fvtransform.io._safetensors import TMP_MARK, _tensor_bytes, atomic_path, clean_stale_temps, fsync_dir
from fvtransform.lora._merge import Workspace, _collect, _digest, delta_rows, normalize_adapters

__all__ = ["merge_checkpoint", "MERGED_KEY"]

#: Metadata key listing what was merged: ``[{"adapter": label, "scale": s, "digest": hex}, ...]``.
MERGED_KEY = "fvt.merged"


def _write_file(path: Path, keys: Sequence[str], ckpt: Checkpoint, produce: Callable[[str], torch.Tensor],
                dtype_of: Callable[[str], torch.dtype], metadata: dict[str, str]) -> int:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in keys:
        info = ckpt.info(k)
        dt = dtype_of(k)
        n = info.nbytes // info.dtype.itemsize * dt.itemsize if info.dtype.itemsize else 0
        header[k] = {"dtype": DTYPE_NAMES[dt], "shape": list(info.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            t = produce(k)
            f.write(_tensor_bytes(t))
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapters: Any,
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Merge ``adapters`` (an adapter or ``[(adapter, scale), ...]``) into the checkpoint at ``base``; write ``out``.

    ``base`` is a ``.safetensors`` file, an index or a folder; ``out`` is then a
    file or a folder of the same layout. ``dtype`` casts floating tensors of
    the output. ``labels`` name the adapters in the metadata (default: their
    position). ``progress(done, total)`` is called after each tensor. Returns
    ``out``. The base is never modified; ``out`` must not be ``base``.

    Raises:
        KeyMismatchError / ShapeMismatchError: an adapter that does not fit the base.
        FormatError: ``out`` is the base, or the base holds no safetensors.
    """
    base_path, out_path = Path(base), Path(out)
    files = find_weight_files(base_path)
    if files.pickle:
        raise FormatError(f"{base_path}: merging streams safetensors only; convert the pickle checkpoint first")
    src = files.index.parent if files.index is not None else (base_path if base_path.is_dir() else files.files[0].parent)
    if out_path.resolve() in {base_path.resolve(), src.resolve()} or out_path.resolve() in {f.resolve() for f in files.files}:
        raise FormatError(f"{out_path}: the output must differ from the base checkpoint (it is read while writing)")
    ckpt = Checkpoint(files)
    if ckpt.aliases:
        raise FormatError(f"{base_path}: checkpoints with tied (aliased) keys are merged in memory: fvt.lora.merge + fvt.save")
    pairs = normalize_adapters(adapters)

    shapes = {k: torch.empty(ckpt.info(k).shape, device="meta") for k in ckpt.keys()}  # what _collect checks
    per_key = _collect(shapes, pairs)
    labels = list(labels) if labels is not None else [f"adapter{i}" for i in range(len(pairs))]
    merged_meta = json.dumps(
        [{"adapter": lab, "scale": s, "digest": b"".join(_digest(t) for d in a.values() for t in d.tensors()).hex()[:32]}
         for lab, (a, s) in zip(labels, pairs)],
        sort_keys=True,
    )
    work = Workspace()
    total, done = len(ckpt.keys()), [0]

    def dtype_of(k: str) -> torch.dtype:
        dt = ckpt.info(k).dtype
        return dtype if dtype is not None and dt.is_floating_point else dt

    def produce(k: str) -> torch.Tensor:
        t = ckpt.tensor(k)
        dt = dtype_of(k)
        if k in per_key:  # rounded once, straight into the output dtype
            t = delta_rows(per_key[k], t, work=work, out=torch.empty(t.shape, dtype=dt))
        elif t.dtype != dt:
            t = t.to(dt)
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return t

    if files.index is None and not base_path.is_dir():  # a lone file -> one file
        meta = dict(ckpt.headers[files.files[0]].metadata)
        meta[MERGED_KEY] = merged_meta
        target = out_path if out_path.suffix == ".safetensors" else out_path / files.files[0].name
        with atomic_path(target) as tmp:
            _write_file(tmp, ckpt.keys(), ckpt, produce, dtype_of, meta)
        return target
    # a folder (sharded or one file): the same weight files, index and other files, in a temporary folder
    # swapped in at the end
    from fvtransform.io._save import _swap_in

    out_path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_path.parent, out_path.name)
    tmp_dir = out_path.parent / f".{out_path.name}{TMP_MARK}{secrets.token_hex(6)}"
    tmp_dir.mkdir()
    try:
        for entry in sorted(src.iterdir()):
            if entry.is_file() and entry not in files.files and entry != files.index and TMP_MARK not in entry.name:
                shutil.copy2(entry, tmp_dir / entry.name)
        total_size = 0
        for f in files.files:
            keys = [k for k in ckpt.keys() if ckpt.file_of(k) == f]
            meta = dict(ckpt.headers[f].metadata)
            meta[MERGED_KEY] = merged_meta
            total_size += _write_file(tmp_dir / f.name, keys, ckpt, produce, dtype_of, meta)
        if files.index is not None:
            doc = json.loads(read_text(files.index, "index file"))
            doc.setdefault("metadata", {})
            doc["metadata"]["total_size"] = total_size
            doc["metadata"][MERGED_KEY] = merged_meta
            index_out = tmp_dir / files.index.name
            index_out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        fsync_dir(tmp_dir)
        _swap_in(tmp_dir, out_path)
    finally:
        if tmp_dir.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp_dir)
    return out_path

