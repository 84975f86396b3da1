"""Reading tensors lazily (copy-on-write memory maps) and the one safetensors writer.

:func:`write_safetensors` is the only code in the library that writes the safetensors format:
``fvt.save`` (one file or shards), ``fvt.lora.save`` and the streaming merge
(``fvt.lora.merge_checkpoint``, the CLI's ``merge``) all write through it. It is our own rather
than ``safetensors.torch.save_file`` because:

- it **streams**: the header is written from each tensor's dtype and shape (a :class:`TensorSpec`),
  then ``produce(name)`` makes one tensor at a time, whose bytes are written and dropped, so a merge
  of a model larger than memory peaks at about one tensor. ``save_file`` takes every tensor at once;
- it needs **no numpy** (torch does not depend on it): a tensor's bytes are read in place;
- every error names the **file and the key** (a meta tensor, a dtype safetensors has no name for,
  a produced tensor that is not what the header declared);
- it writes into an open file, so the callers keep the **atomic units** of :mod:`fvtransform.io._atomic`
  (a temporary file fsynced and renamed, or a folder swapped in whole), which ``save_file``'s own
  ``open(path, "wb")`` would bypass.

The ``safetensors`` package stays a test dependency: the tests read our files with it, as an oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import concurrent.futures
import contextlib
import ctypes
import errno
import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import torch

from fvtransform.errors import FormatError, UsageError
from fvtransform.io._header import DTYPE_NAMES, Header, TensorInfo, read_header

__all__ = ["MappedFile", "TensorSpec", "FileRange", "tensor_specs", "write_safetensors", "TMP_MARK", "fsync_dir"]

#: Every temporary file or folder fvtransform writes has this in its name.
TMP_MARK = ".fvt-tmp-"


class MappedFile:
    """A safetensors file mapped privately: tensors are views read on first touch.

    The mapping is ``MAP_PRIVATE``: writing to a returned tensor never
    reaches the file (the page is copied first). Only the header is read
    when the object is made.
    """

    def __init__(self, path: str | os.PathLike[str], header: Header | None = None) -> None:
        self.header = header if header is not None else read_header(path)
        self.path = self.header.path
        self._storage: torch.UntypedStorage | None = None

    def _mapped(self) -> torch.UntypedStorage:
        if self._storage is None:
            from fvtransform.io._open import map_checked

            self._storage = map_checked(self.path, self.header.file_size, self.header.identity)
        return self._storage

    def _all_bytes(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8).set_(self._mapped(), 0, (self.header.file_size,), (1,))

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        return self.tensor_from_info(info)

    def tensor_from_info(self, info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        itemsize = info.dtype.itemsize
        if info.start % itemsize:
            # Unaligned in the file: this tensor alone is copied.
            return self._all_bytes()[info.start : info.end].clone().view(info.dtype).view(info.shape)
        # one view straight onto the mapped storage (offsets count elements of the dtype)
        return torch.empty(0, dtype=info.dtype).set_(self._mapped(), info.start // itemsize, info.shape, _strides(info.shape))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0, touching only their pages."""
        info = self.header.tensors[name]
        if not info.shape:
            raise FormatError(f"{self.path}: tensor {name!r} is a scalar; it has no rows")
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        sub = TensorInfo(name, info.dtype, (stop - start, *info.shape[1:]), info.start + start * row, info.start + stop * row)
        return self.tensor_from_info(sub)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (moved to CPU, made contiguous), without a copy where possible.

    No numpy: torch does not depend on it. The view reads the tensor's memory in place
    (``ctypes``); the returned memoryview keeps the tensor alive. Any dtype works (bf16, fp8,
    bool: the bytes are those of the storage) and a 0-element tensor gives ``b""``.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    buf = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    buf._fvt_owner = t  # type: ignore[attr-defined]  # the memory lives as long as the view
    return memoryview(buf).cast("B")


@attrs.frozen
class TensorSpec:
    """What a safetensors header says of one tensor before its bytes exist: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_specs(tensors: Mapping[str, torch.Tensor], where: object) -> dict[str, TensorSpec]:
    """The :class:`TensorSpec` of each tensor, refusing what a safetensors file cannot hold (naming file and key)."""
    check_names(tensors, where)
    out: dict[str, TensorSpec] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise UsageError(f"{where}: cannot save {name!r}: it is on the meta device and holds no values")
        out[name] = TensorSpec(t.dtype, tuple(t.shape))
    return out


@attrs.frozen
class FileRange:
    """A tensor's bytes as they lie in an open source file: what ``produce`` returns to have them copied by the kernel.

    ``fd`` is a descriptor the caller opened (through :mod:`fvtransform.io._open`) and keeps open
    while the writer runs; ``start`` is the absolute offset of the bytes; ``dtype`` and ``shape``
    are checked against the spec like a tensor's. The fallback where the kernel cannot copy
    between the two files is ``tensor()`` (the same bytes, read in place).
    """

    fd: int
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    tensor: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


#: ``os.copy_file_range`` where the platform has it (Linux 4.5+, Python 3.8+); None elsewhere (the fallback writes).
_COPY_FILE_RANGE: Callable[..., int] | None = getattr(os, "copy_file_range", None)
#: errnos after which the kernel copy is given up for the rest of a file and the bytes are written instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM, errno.ETXTBSY}
#: Bytes per ``copy_file_range`` call (the call may also copy fewer).
_COPY_CHUNK = 1 << 30


#: ``sync_file_range``'s flag that starts writeback of a byte range without waiting for it (Linux).
_SYNC_FILE_RANGE_WRITE = 2
#: Written bytes after which a streaming writer asks the kernel to start writing them to the disk.
WRITEBACK_CHUNK = 64 << 20


def _find_sync_file_range() -> Callable[[int, int, int], Any] | None:
    """libc's ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, n: int) -> Any:
        return fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


class _Writeback:
    """Starts the disk writes of what a writer wrote, a chunk at a time, so that its final ``fsync`` waits
    for the last chunk only (the rest went to the disk while later tensors were made). Advisory: where the
    platform has no ``sync_file_range`` or the call fails, nothing happens and ``fsync`` does it all."""

    _fn: Callable[[int, int, int], Any] | None | bool = False  # False: not looked up yet

    def __init__(self, fd: int, start: int) -> None:
        if _Writeback._fn is False:
            _Writeback._fn = _find_sync_file_range() if os.name == "posix" else None
        self.fd, self.done, self.pos = fd, start, start

    def wrote(self, n: int) -> None:
        self.pos += n
        fn = _Writeback._fn
        if callable(fn) and self.pos - self.done >= WRITEBACK_CHUNK:
            fn(self.fd, self.done, self.pos - self.done)  # a failure only means fsync writes these bytes itself
            self.done = self.pos


#: Bytes per ``os.write`` call. One call of a whole large tensor measured 8-9x slower than the same bytes in
#: 1-4 MiB calls (Linux 6.18 ext4, a 27 MB bf16 tensor: 1.6-2.2 s vs 0.18-0.20 s per GB; benchmarks/merge_disk_bench.py).
WRITE_CHUNK = 2 << 20


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` at ``fd``'s position, :data:`WRITE_CHUNK` bytes per call (a call may also write fewer)."""
    done, n = 0, len(data)
    while done < n:
        done += os.write(fd, data[done : done + WRITE_CHUNK])


def _copy_range(fd: int, src: FileRange, where: object, name: str) -> bool:
    """Copy ``src``'s bytes to ``fd`` with the kernel; False (nothing copied) where the kernel cannot.

    Raises:
        FormatError: the source file ends before the range does (it shrank while the merge ran).
    """
    copy = _COPY_FILE_RANGE
    if copy is None:
        return False
    done, n = 0, src.nbytes
    while done < n:
        try:
            got = copy(src.fd, fd, min(n - done, _COPY_CHUNK), src.start + done)
        except OSError as e:
            if done == 0 and e.errno in _NO_KERNEL_COPY:
                return False
            raise
        if got == 0:
            raise FormatError(f"{where}: tensor {name!r}: its source file ended {n - done} bytes early; "
                              "the source changed while it was read")
        done += got
    return True


def check_names(names: Iterable[str], where: object) -> None:
    """Refuse a tensor name a safetensors file cannot hold (``__metadata__``, the header's metadata slot).

    Raises:
        UsageError: naming the file, the key and why, before a byte is written.
    """
    from fvtransform.io._load import _RESERVED_NAMES

    for name in names:
        if name in _RESERVED_NAMES:
            raise UsageError(
                f"{where}: cannot save a tensor named {name!r}: {_RESERVED_NAMES[name]}, no tensor can take it (the file "
                "would lose its metadata= and be refused by every reader). Fix: give the tensor another name "
                "(rename={..., 'other_name'}), and file metadata as metadata={...}"
            )


def write_safetensors(
    f: BinaryIO,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor | FileRange],
    metadata: Mapping[str, str] | None = None,
    *,
    where: object = None,
    overlap: bool = False,
) -> int:
    """Write a safetensors file to the open ``f``, one tensor at a time; return the bytes written.

    The header is made from ``specs`` (in their order); then each tensor is made by ``produce(name)``,
    checked against its spec, written and dropped. ``where`` names the file in errors (default ``f.name``).

    Bytes go from the tensor's memory to the file descriptor (``os.write`` of a view, no copy
    in user space, :data:`WRITE_CHUNK` bytes per call); every :data:`WRITEBACK_CHUNK` bytes the
    kernel is asked to start writing them to the disk (Linux ``sync_file_range``, advisory).
    ``produce`` may return a :class:`FileRange` instead of a tensor: those bytes are moved by the
    kernel (``os.copy_file_range``), or written from ``FileRange.tensor()`` where the platform or
    file systems cannot. With ``overlap=True`` the next tensor is produced
    on a second thread while the previous one is written (a pipeline of depth one: at most two
    tensors exist at once); ``produce`` is then always called from that one thread, in order.

    Raises:
        UsageError: a dtype safetensors has no name for.
        FormatError: a produced tensor other than its spec.
    """
    where = where if where is not None else getattr(f, "name", "safetensors file")
    check_names(specs, where)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in DTYPE_NAMES:
            raise UsageError(f"{where}: cannot save {name!r}: dtype {spec.dtype} has no safetensors name")
        n = spec.nbytes
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    f.flush()  # from here on the bytes go straight to the descriptor, at its position
    try:
        fd: int | None = f.fileno()
    except (AttributeError, OSError):  # an in-memory file (io.UnsupportedOperation is an OSError): its own write
        fd = None
    kernel = [fd is not None]
    writeback = _Writeback(fd, 8 + len(raw)) if fd is not None else None

    def put(name: str, spec: TensorSpec, t: torch.Tensor | FileRange) -> None:
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise FormatError(
                f"{where}: tensor {name!r} came out as {t.dtype} {tuple(t.shape)}, but the header declares "
                f"{spec.dtype} {spec.shape}; the file is not written"
            )
        if isinstance(t, FileRange):
            if kernel[0] and fd is not None and _copy_range(fd, t, where, name):
                if writeback is not None:
                    writeback.wrote(spec.nbytes)
                return
            kernel[0] = False  # the kernel cannot copy between these files: the rest is written
            t = t.tensor()
        if fd is None:
            f.write(_tensor_bytes(t))
        else:
            _write_all(fd, _tensor_bytes(t))
            if writeback is not None:
                writeback.wrote(spec.nbytes)

    names = list(specs)
    if not overlap or len(names) < 2:
        for name in names:
            put(name, specs[name], produce(name))
        return 8 + len(raw) + offset
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fvt-produce") as pool:
        ahead = pool.submit(produce, names[0])
        try:
            for i, name in enumerate(names):
                t = ahead.result()
                if i + 1 < len(names):
                    ahead = pool.submit(produce, names[i + 1])  # computed while this one is written
                put(name, specs[name], t)
                del t
        except BaseException:
            ahead.cancel()
            raise
    return 8 + len(raw) + offset


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
