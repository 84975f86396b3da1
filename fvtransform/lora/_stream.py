"""Merging adapters into a checkpoint on disk, tensor by tensor: models larger than memory merge too.

The input's layout is kept (one file, or the same shard files and index; other
files of the folder are copied). Each tensor is read from the memory map,
merged (float32, one rounding, as :func:`fvtransform.lora.merge`) into a reused
output buffer, written and dropped, so the peak memory is about one of the largest
tensors plus the adapters (two with a device). On the CPU the merge (torch on every core) and
the writes take turns: a writer thread beside it measured slower, the two fighting
for the same cores. With ``device=`` (a GPU) the next tensor is merged on a second
thread while the previous one is written (a pipeline of depth one). The kernel
starts writing the output to the disk as it grows (``sync_file_range``), so the
final ``fsync`` waits for the last chunk only. Tensors no adapter touches are
copied by the kernel from the base file's byte range (``os.copy_file_range``) where it can.
The output is written atomically and records what was merged at what scale
in its metadata; the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from fvtransform._json import loads_json, read_json_file
from fvtransform.errors import FvTransformError, IntegrityError, UnsafeFileError, UsageError, WriteError
from fvtransform.io._atomic import (
    LOCK_MARK, OLD_MARK, atomic_file, check_destination, check_path, file_writer, is_any_temp, typed_os_errors, write_folder,
)
from fvtransform._dtypes import DTypeLike, as_dtype
from fvtransform.io._files import INDEX_JSON, find_weight_files
from fvtransform.io._header import HEADER_JSON, read_header
from fvtransform.io._load import Checkpoint
from fvtransform.io._open import open_regular
from fvtransform.io._safetensors import FileRange, TensorSpec, _tensor_bytes, write_safetensors
from fvtransform.lora._adapter import FullDelta, LoraAdapter
from fvtransform.lora._dora import merge_dora
from fvtransform.lora._fp8_merge import Fp8Plan, fp8_options
from fvtransform.lora._functorch import concrete
from fvtransform.lora._merge import AdapterSet, Workspace, _collect, _is_dora, _is_replace, delta_rows, normalize_adapters

__all__ = ["merge_checkpoint", "MERGED_KEY", "FILES_KEY", "OTHER_FILE_LIMIT", "as_device", "check_not_input"]

#: Metadata key listing what was merged: ``[{"adapter": label, "scale": s, "digest": hex}, ...]``.
MERGED_KEY = "fvt.merged"
#: Metadata key (index, or the weights file of a one-file folder) listing every file a merge wrote into its folder.
FILES_KEY = "fvt.files"

def _write_file(path: Path, keys: Sequence[str], ckpt: Checkpoint, produce: Callable[[str], torch.Tensor | FileRange],
                dtype_of: Callable[[str], torch.dtype], metadata: dict[str, str], where: Path, overlap: bool) -> int:
    """Write ``keys`` to ``path`` through the one safetensors writer, a tensor at a time; return the data bytes."""
    specs = {k: TensorSpec(dtype_of(k), ckpt.info(k).shape) for k in keys}
    file_writer(lambda f: write_safetensors(f, specs, produce, metadata, where=where, overlap=overlap))(path)
    return sum(spec.nbytes for spec in specs.values())


def adapter_digest(adapter: LoraAdapter) -> str:
    """A digest of every target name, dtype, shape and factor byte of ``adapter`` (sha256, 32 hex digits).

    One pass over the factors' bytes (sha256 runs at about twice blake2b's speed where the CPU has SHA
    instructions); it names the adapter in the output's metadata, so any changed byte changes it.
    """
    h = hashlib.sha256()
    for key, d in adapter.items():
        h.update(f"{key}\0{type(d).__name__}\0{getattr(d, 'scale', None)!r}\0".encode())
        for t in d.tensors():
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            h.update(_tensor_bytes(concrete(t)))
    return h.hexdigest()[:32]


class _Sources:
    """Read descriptors of the base's files for the kernel copy: opened once each (through io/_open), checked
    to be the very files whose headers were read, closed by :meth:`close`."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._open: dict[Path, Any] = {}
        self._seen: dict[Path, tuple[int, int, int]] = {}  # size, mtime, ctime when opened

    def fd(self, path: Path) -> int:
        if path not in self._open:
            f = open_regular(path, "safetensors file")
            try:
                st = os.fstat(f.fileno())
                identity = self._ckpt.headers[path].identity
                if identity and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != identity:
                    raise IntegrityError(f"{path}: the file was replaced or rewritten after its header was read; "
                                         "merge again once it stays as it is")
            except BaseException:
                f.close()
                raise
            self._open[path] = f
            self._seen[path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return int(self._open[path].fileno())

    def hold_all(self) -> None:
        """Open every base file now, before a byte is read: :meth:`check_unchanged` compares them at the end."""
        for path in self._ckpt.headers:
            self.fd(path)

    def check_unchanged(self) -> None:
        """Refuse to commit an output read from a base file that was written to while the merge read it.

        The open descriptor is the file whose bytes were read; its size, modification and change times
        must be those seen when it was opened. The change time cannot be set back by a writer, so a
        rewrite in place that restores the modification time is caught too; it also moves when the file
        is renamed over or linked (the bytes read may then be whole, but no longer what the path holds).

        Raises:
            IntegrityError: naming the file.
        """
        for path, f in self._open.items():
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self._seen[path]:
                raise IntegrityError(f"{path}: the file changed while the merge read it (written to, renamed over or "
                                     "relinked: its size, modification or change time moved); its tensors may mix two versions, "
                                     "so the output is not written. Merge again once the base stays as it is")

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class _OutBuffer:
    """One output buffer the merged tensors are made in, reused from tensor to tensor.

    Only for a writer that writes each tensor before it makes the next (no pipeline). Reusing it
    spares the page faults of fresh memory for every tensor (a new large allocation is new pages
    from the OS).
    """

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes
        self._buf: torch.Tensor | None = None

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self._nbytes, dtype=torch.uint8)
        return self._buf[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def as_device(device: object) -> torch.device | None:
    """``device`` (a name or ``torch.device``) as a device a merge can compute on; None stays None.

    Raises:
        UsageError: not a device name, the ``meta`` device (it holds no values), or a device this machine lacks.
    """
    if device is None:
        return None
    fix = "pass device='cpu', or device='cuda' on a machine with a GPU (the CLI's --device)"
    try:
        found = device if isinstance(device, torch.device) else torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"device {device!r}: not a device name; {fix}") from None
    if found.type == "meta":
        raise UsageError(f"device {device!r}: the meta device holds no values and cannot merge; {fix}")
    try:
        torch.empty(1, device=found)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:
        raise UsageError(f"device {device!r}: not available here ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {fix}") from None
    return found


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapters: AdapterSet,
    out: str | os.PathLike[str],
    *,
    dtype: DTypeLike | None = None,
    labels: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
    device: str | torch.device | None = None,
    fp8_scale: str = "keep",
    rounding: str = "nearest",
    seed: int | None = None,
    saturate: bool = False,
) -> Path:
    """Merge ``adapters`` (an adapter or ``[(adapter, scale), ...]``) into the checkpoint at ``base``; write ``out``.

    ``base`` is a ``.safetensors`` file, an index or a folder; ``out`` is then a
    file or a folder of the same layout. ``dtype`` casts floating tensors of
    the output. ``labels`` name the adapters in the metadata (default: their
    position). ``progress(done, total)`` is called after each tensor. Returns
    ``out``. The base is never modified; ``out`` must not be, contain or lie
    in place of the base or its files.

    A folder ``out`` must be new, empty, or a previous merge output (its index
    or weights file records the files the merge wrote, under ``fvt.files``);
    only those files are replaced, every other file is kept. ``overwrite=True``
    also writes into another folder, replacing files of the names it writes and
    still keeping every other file. A previous output's record is trusted only
    for regular files named like what this merge writes now or like a shard
    (``<name>-00001-of-00002.safetensors``): a forged record never makes a merge
    drop a user's other file or a folder. The other files of a base folder are copied
    only when they are regular files (or links to regular files) inside the
    base folder and at most 256 MiB, and have one link
    only (a hard link may be a second name of a file outside the folder, which
    cannot be told cheaply, so it is skipped); each file skipped is
    reported to ``on_skip(name, why)`` (default: a warning), never opened.
    ``dtype`` is a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``).
    ``device`` (e.g. ``"cuda"``) computes the merged tensors there, tile by tile, while the CPU
    reads and writes (default: on the CPU); the bytes are those of a CPU merge up to the
    device's float32 matrix product.
    Float8 targets merge as in :func:`fvtransform.lora.merge` (``fp8_scale``, ``rounding``, ``seed``,
    ``saturate`` mean the same): they stay float8, a recomputed ``scale_weight`` is written, the
    ``scaled_fp8`` marker and every untouched tensor are copied; the bytes equal those of the
    in-memory merge saved. ``dtype=`` is refused with a float8 target (dequantise first).

    Raises:
        KeyMismatchError / ShapeMismatchError: an adapter that does not fit the base.
        UsageError: ``out`` is (or holds, or lies inside a base folder of) the base, the base holds no
            safetensors, an unknown ``dtype``.
        WriteError: a folder where an output file goes; ``out`` holds files the merge did not write, a full disk, a read-only destination.
        UnsafeFileError: ``out`` is a symlink, FIFO, device or socket.
        UsageError: a ``device`` that is not one, is ``meta``, or is not on this machine.
        NumericError: a float8 merge overflowing the float8 range (without ``saturate``), a NaN/Inf scale.
        FormatError: a scale of the wrong shape or dtype, a scale key without its weight.
    """
    fp8 = fp8_options(fp8_scale, rounding, seed, saturate)
    base_path, out_path = check_path(base, "base"), check_path(out, "output")
    dtype = None if dtype is None else as_dtype(dtype)
    on = as_device(device)
    files = find_weight_files(base_path)
    if files.pickle:
        raise UsageError(f"{base_path}: merging streams safetensors only; convert the pickle checkpoint first")
    src = files.index.parent if files.index is not None else (base_path if base_path.is_dir() else files.files[0].parent)
    lone = files.index is None and not base_path.is_dir()
    check_not_input(out_path, [base_path, *files.files, *([files.index] if files.index else [])] + ([] if lone else [src]))
    ckpt = Checkpoint(files)
    if ckpt.aliases:
        raise UsageError(f"{base_path}: checkpoints with tied (aliased) keys are merged in memory: fvt.lora.merge + fvt.save")
    pairs = normalize_adapters(adapters)

    shapes = {k: torch.empty(ckpt.info(k).shape, device="meta") for k in ckpt.keys()}  # what _collect checks
    per_key = _collect(shapes, pairs)
    _plan(per_key, ckpt)
    fp8_plan = Fp8Plan(ckpt, per_key, fp8, dtype, base_path, on)
    labels = list(labels) if labels is not None else [f"adapter{i}" for i in range(len(pairs))]
    merged_meta = json.dumps([{"adapter": lab, "scale": s, "digest": adapter_digest(a)} for lab, (a, s) in zip(labels, pairs)],
                             sort_keys=True)
    work = Workspace()
    total, done = len(ckpt.keys()), [0]

    def dtype_of(k: str) -> torch.dtype:
        dt = ckpt.info(k).dtype
        return dtype if dtype is not None and dt.is_floating_point else dt

    sources = _Sources(ckpt)
    away = on is not None and on.type != "cpu"
    # on the CPU each tensor is written before the next is made (overlap=away): one buffer serves them all
    reused = _OutBuffer(max([math.prod(ckpt.info(k).shape) * dtype_of(k).itemsize for k in per_key], default=0))

    def produce(k: str) -> torch.Tensor | FileRange:
        info, dt = ckpt.info(k), dtype_of(k)
        t: torch.Tensor | FileRange
        if fp8_plan.owns(k):  # a float8 target or its recomputed scale
            t = fp8_plan.produce(k, work)
        elif k not in per_key and info.dtype == dt:  # untouched: the kernel copies its bytes, file to file
            t = FileRange(sources.fd(ckpt.file_of(k)), info.start, info.dtype, tuple(info.shape), lambda: ckpt.tensor(k))
        elif k not in per_key:
            t = ckpt.tensor(k).to(dt)
        elif _is_replace(k, per_key[k]):  # PEFT modules_to_save: the replacement itself
            full = per_key[k][0].delta
            assert isinstance(full, FullDelta)  # _is_replace: a replacing FullDelta, alone on its key
            t = full.D.to(dtype=dt)
        else:
            w = ckpt.tensor(k)
            w = w.to(on, non_blocking=True) if away else w
            out = torch.empty(w.shape, dtype=dt, device=w.device) if away else reused.take(w.shape, dt)  # a device pipelines
            where = f"{ckpt.file_of(k)}: {k!r}"
            if _is_dora(per_key[k]):  # row tiles; input-axis norms take a first pass over the tiles
                t = merge_dora(w, per_key[k], out=out, where=where)[0]
            else:  # rounded once, straight into the output dtype
                t = delta_rows(per_key[k], w, work=work, out=out, where=where)
            t = t.cpu() if away else t
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return t

    try:
        sources.hold_all()  # every base file open before a byte is read: checked unchanged before the output is committed
        with typed_os_errors(out_path):  # a destination the OS refuses (a file in the path, a name too long) is a WriteError
            if files.index is None and not base_path.is_dir():  # a lone file -> one file (in a folder: as one unit)
                meta = dict(ckpt.headers[files.files[0]].metadata)
                meta[MERGED_KEY] = merged_meta
                into_folder = out_path.suffix != ".safetensors"
                if into_folder and os.path.lexists(out_path) and stat.S_ISREG(os.lstat(out_path).st_mode):
                    raise WriteError(f"{out_path}: exists and is a file; a merge of one .safetensors file writes into a folder at an "
                                     "output without the .safetensors suffix. Name the output file like NAME.safetensors, or "
                                     "choose a folder")
                target = out_path / files.files[0].name if into_folder else out_path
                meta[FILES_KEY] = json.dumps([target.name])  # the record that makes a folder holding it a merge output
                check_not_input(target, [base_path])
                check_destination(target, folder=False)  # a FIFO, device or link: refused before it is read
                if not into_folder:
                    if not overwrite and _is_file(target) and _merge_record(target) is None:
                        raise WriteError(f"{target}: exists and is not a previous merge output; refusing to replace it. "
                                         "Choose another output, or pass --overwrite (overwrite=True)")
                    with atomic_file(target) as tmp:
                        _write_file(tmp, ckpt.keys(), ckpt, produce, dtype_of, meta, target, away)
                        sources.check_unchanged()
                    return target

                def build_one(tmp_dir: Path) -> None:
                    _write_file(tmp_dir / target.name, ckpt.keys(), ckpt, produce, dtype_of, meta, target, away)
                    sources.check_unchanged()

                # a previous merge's index and shards in the folder are dropped with the swap: what loads is this merge
                write_folder(out_path, [target.name], build_one, owned=_owned_by_merge([target.name]), overwrite=overwrite,
                             require_own=True, what="merge output")
                return target
            # a folder (sharded or one file): the same weight files, index and other files, built in a temporary
            # folder and swapped in at the end; the index (or the weights file) records every file written
            others, skipped = _other_files(src, {f.name for f in files.files} | ({files.index.name} if files.index else set()))
            for name, why in skipped:
                if on_skip is None:
                    warnings.warn(f"{src / name}: not copied to {out_path}: {why}", stacklevel=2)
                else:
                    on_skip(name, why)
            written = sorted([f.name for f in files.files] + ([files.index.name] if files.index else []) + list(others))
            merged_meta_files = json.dumps(written)

            def build(tmp_dir: Path) -> None:
                for name, path in others.items():
                    _copy_regular(path, tmp_dir / name)
                total_size = 0
                for f in files.files:
                    keys = [k for k in ckpt.keys() if ckpt.file_of(k) == f]
                    meta = dict(ckpt.headers[f].metadata)
                    meta[MERGED_KEY] = merged_meta
                    if files.index is None:
                        meta[FILES_KEY] = merged_meta_files
                    total_size += _write_file(tmp_dir / f.name, keys, ckpt, produce, dtype_of, meta, out_path / f.name, away)
                sources.check_unchanged()
                if files.index is not None:
                    doc = read_json_file(files.index, limits=INDEX_JSON, expect=dict, what="index file")
                    doc.setdefault("metadata", {})
                    doc["metadata"]["total_size"] = total_size
                    doc["metadata"][MERGED_KEY] = merged_meta
                    doc["metadata"][FILES_KEY] = merged_meta_files
                    with open(tmp_dir / files.index.name, "x", encoding="utf-8") as fh:
                        fh.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())

            write_folder(out_path, written, build, owned=_owned_by_merge(written), overwrite=overwrite, require_own=True,
                         what="merge output")
            return out_path
    finally:
        sources.close()


def _owned_by_merge(written: Collection[str]) -> Callable[[Path], set[str] | None]:
    """``owned`` for :func:`write_folder`: the files a previous merge's record names that a merge writing ``written`` may replace or drop.

    Trusted only for names this merge writes, the record's own file and shard
    names; write_folder drops regular files only.
    """

    def owned(folder: Path) -> set[str] | None:
        found = _merge_record_of(folder)
        if found is None:
            return None
        recorded, record_file = found  # the record's own file (its index or weights file) is the merge's
        return {n for n in recorded if n in written or n == record_file or _SHARD.fullmatch(n)}

    return owned


def _plan(per_key: dict[str, Any], ckpt: Checkpoint) -> None:
    """Refuse, before any output exists, what ``produce`` would refuse half-way (a DoRA or replacement that merges alone)."""
    for k, contribs in per_key.items():
        if not _is_replace(k, contribs) and _is_dora(contribs) and len(contribs) != 1:
            raise UsageError(
                f"{ckpt.file_of(k)}: {k!r}: {len(contribs)} adapters target this weight and one is DoRA; a DoRA target "
                "merges alone (its magnitude rescales the whole weight). Fix: merge the DoRA adapter on its own, then the others"
            )


#: The shape of a shard name: what a merge of a sharded base writes (``<name>-00001-of-00002.safetensors``).
_SHARD = re.compile(r"[^/\0]+-\d{5,}-of-\d{5,}\.safetensors")


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def check_not_input(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is an input, holds one, or lies inside an input folder.

    Paths are compared by their real paths (symlinked parents resolved) and by
    inode (a hard link to an input is that input). An output inside an input
    folder is refused, ``--overwrite`` or not: the reader would see it change.

    Raises:
        UsageError: naming the output and the input.
    """
    real = Path(os.path.realpath(out))
    ident = _identity(real)
    held = _held_files(real)  # a folder output's files by inode: a hard link of an input among them is that input
    for p in inputs:
        rp = Path(os.path.realpath(p))
        inside = rp.is_dir() and rp in real.parents
        linked = held.get(_identity(rp) or (-1, -1)) if rp.is_file() else None
        if real == rp or real in rp.parents or inside or (ident is not None and ident == _identity(rp)) or linked:
            how = "lies inside" if inside else f"holds {linked}, a hard link of" if linked else "is or holds"
            raise UsageError(f"{out}: the output must differ from the base checkpoint and the other inputs and must not contain them "
                              f"or lie inside an input folder (it {how} {p}, which is read while writing and must stay as it is); "
                              "choose another output")


def _held_files(folder: Path) -> dict[tuple[int, int], str]:
    """The regular files directly in ``folder`` by (device, inode) -> name; empty when it is no folder."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    held: dict[tuple[int, int], str] = {}
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            held[(st.st_dev, st.st_ino)] = e.name
    return held


_check_not_input = check_not_input  # the former private name


def _is_file(p: Path) -> bool:
    return os.path.lexists(p) and not p.is_dir()


def _merge_record(weights: Path) -> dict[str, Any] | None:
    """The metadata of a previous merge output's weights file or index; None if it is not one (or unreadable).

    Only a regular file is opened (a FIFO named like weights would block a reader forever).
    """
    try:
        if not stat.S_ISREG(os.lstat(weights).st_mode):
            return None
        if weights.name.endswith(".safetensors.index.json"):
            doc = read_json_file(weights, limits=INDEX_JSON, expect=None, what="index file")
            meta = doc.get("metadata") if isinstance(doc, dict) else None
        else:
            meta = dict(read_header(weights).metadata)
    except (FvTransformError, OSError):
        return None
    return meta if isinstance(meta, dict) and MERGED_KEY in meta else None


def _merged_folder_files(folder: Path) -> set[str] | None:
    """The files a previous merge wrote into ``folder``, from its record (None when it is not a merge output)."""
    found = _merge_record_of(folder)
    return None if found is None else found[0]


def _merge_record_of(folder: Path) -> tuple[set[str], str] | None:
    """The names a previous merge's record in ``folder`` lists and the file holding the record (None: no record)."""
    entries = sorted(folder.iterdir())
    candidates = [p for p in entries if p.name.endswith(".safetensors.index.json")] or \
        [p for p in entries if p.name.endswith(".safetensors")]
    for c in candidates:
        meta = _merge_record(c)
        try:
            names = (loads_json(meta[FILES_KEY], source=f"{c}: metadata {FILES_KEY!r}", limits=HEADER_JSON)
                     if meta is not None and isinstance(meta.get(FILES_KEY), str) else None)
        except FvTransformError:  # a broken record is no record
            names = None
        if isinstance(names, list):
            plain = {n for n in names if isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..") and "\0" not in n}
            return plain | {c.name}, c.name
    return None


#: Other files of a base folder larger than this are not copied into a merge output (they are reported).
OTHER_FILE_LIMIT = 256 * 2**20


def _other_files(src: Path, weights: set[str]) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The other files of ``src`` to copy (name -> real path) and those skipped, with why.

    Copied: regular files, and symbolic links that resolve to a regular file inside ``src``.
    Skipped (never opened): links leaving the folder, FIFOs, devices, sockets, folders, files over the limit.
    """
    root = Path(os.path.realpath(src))
    copy: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name in weights or is_any_temp(name):  # a writer's temporary, exactly of the shape it makes: not data
            continue
        if re.fullmatch(r"\..+(" + re.escape(LOCK_MARK) + "|" + re.escape(OLD_MARK) + r"[0-9a-f]{8})", name, flags=re.DOTALL):
            skipped.append((name, "a writer's lock file or old folder, not data"))
            continue
        real = Path(os.path.realpath(entry))
        if entry.is_symlink() and root not in real.parents:
            skipped.append((name, f"a symbolic link to {real}, outside the base folder"))
            continue
        try:
            st = os.stat(real)
        except OSError as e:
            skipped.append((name, f"cannot be read ({e.strerror})"))
            continue
        if stat.S_ISDIR(st.st_mode):
            skipped.append((name, "a folder (only the files of the base folder are copied)"))
        elif not stat.S_ISREG(st.st_mode):
            skipped.append((name, "not a regular file (a FIFO, device or socket is never opened)"))
        elif st.st_nlink > 1:
            skipped.append((name, f"a file with {st.st_nlink} hard links: another link may lie outside the base folder"))
        elif st.st_size > OTHER_FILE_LIMIT:
            skipped.append((name, f"{st.st_size} bytes, over the {OTHER_FILE_LIMIT}-byte limit for copied files"))
        else:
            copy[name] = real
    return copy, skipped


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy a regular file with its permission bits, not following a link planted after the check, never blocking on a FIFO."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > OTHER_FILE_LIMIT or st.st_nlink > 1:
            change = "a non-regular file" if not stat.S_ISREG(st.st_mode) else "a hard link" if st.st_nlink > 1 else "a larger file"
            raise UnsafeFileError(f"{src}: changed into {change} while the merge ran; refusing to copy it")
        with os.fdopen(os.dup(fd), "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, 2**20)
            os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode) & 0o777)  # the source's bits, never set-id bits
            fout.flush()
            os.fsync(fout.fileno())
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)
