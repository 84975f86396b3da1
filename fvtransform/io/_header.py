"""Safetensors headers: parsed and validated before any tensor byte is touched.

Every file is treated as hostile: sizes are checked against the file, offsets
against each other, and the JSON shape against the format, so a broken file
gives a :class:`FormatError` naming the file and key instead of a crash or a
huge allocation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import struct
from typing import Any

import attrs
import torch

from fvtransform._json import JsonLimits, loads_json
from fvtransform.errors import FormatError, NotFoundError
from fvtransform.io._open import MAX_JSON_BYTES, open_regular

__all__ = ["TensorInfo", "Header", "read_header", "DTYPES", "DTYPE_NAMES", "MAX_HEADER_BYTES", "MAX_RANK", "MAX_INT_DIGITS",
           "OBJECT_BYTES", "MAX_TENSORS", "HEADER_JSON"]

#: safetensors dtype names -> torch dtypes (those this torch has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: The largest header we accept: the same 64 MiB cap as every JSON file we read (``MAX_JSON_BYTES``);
#: safetensors' own limit is 100 MB, real headers are well under 10 MB.
MAX_HEADER_BYTES = MAX_JSON_BYTES
#: The most tensors one file may hold: ten times what real files hold (Wan 14B in one file: 1,095; a LyCORIS
#: or LoRA file of a large model: a few thousand; a shard: under 10,000). At this bound fvt.load takes about
#: 2 s (2 busy CPU cores), where a 64 MiB header of a million 1-byte tensors took half a minute and 1.4 GB.
#: Counted on the raw header before parsing (each tensor entry is one JSON object), then exactly.
MAX_TENSORS = 100_000
#: The most dims a tensor may have (torch's kernels handle up to 25; real weights have at most 5).
MAX_RANK = 16
#: The most digits of an integer in a header (offsets and sizes fit in 20).
MAX_INT_DIGITS = 20
#: At most one JSON object (and two lists) per this many bytes of a header or index: the smallest real
#: header entry, ``"a":{"dtype":"F32","shape":[],"data_offsets":[0,0]},``, is 48 bytes.
OBJECT_BYTES = 40
#: The JSON bounds of a header (and of JSON held in its metadata): 64 MiB, integers of 20 digits, at most
#: one object and two lists per ``OBJECT_BYTES`` bytes (each parsed ``{}`` costs Python about 60 bytes);
#: the number of objects is bounded by ``MAX_TENSORS`` before parsing.
HEADER_JSON = JsonLimits(
    max_bytes=MAX_HEADER_BYTES, max_depth=8, max_int_digits=MAX_INT_DIGITS, max_containers=3 * MAX_TENSORS + 16,
    max_values=MAX_HEADER_BYTES, object_bytes=OBJECT_BYTES,
)


@attrs.frozen
class TensorInfo:
    """Where one tensor lives in a file: dtype, shape and absolute byte range.

    What :meth:`fvtransform.io.Checkpoint.info` returns (public for that: the way to look into a file
    without loading it is ``fvt.io.open_checkpoint(path).info(key)``).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@attrs.frozen
class Header:
    """A validated safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]  # in header order
    metadata: dict[str, str]
    data_start: int
    file_size: int
    #: (device, inode, size, mtime_ns) of the file the header was read from: a later map checks it is the same file
    identity: tuple[int, ...] = ()


def _check_lookalikes(path: Path, names: list[str]) -> None:
    """Refuse two keys that are the same text in another Unicode normal form (NFC vs NFD): they print alike."""
    import unicodedata

    if all(name.isascii() for name in names):
        return
    seen: dict[str, str] = {}
    for name in names:
        norm = unicodedata.normalize("NFC", name)
        other = seen.setdefault(norm, name)
        if other != name:
            raise FormatError(
                f"{path}: keys {other!r} and {name!r} are the same text in two Unicode normal forms; "
                "refusing an ambiguous file"
            )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file (no tensor bytes are read).

    Raises:
        FormatError: the file is truncated, empty or malformed; the message
            names the file and, where there is one, the key.
    """
    path = path if isinstance(path, Path) else Path(path)  # a DerivedPath keeps its root
    try:
        with open_regular(path, "safetensors file") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size < 8:
                raise FormatError(
                    f"{path}: {size} bytes is too short for a safetensors file (at least 8 needed); "
                    "the file is empty or truncated — download or save it again"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte (64 MiB) limit; not a real "
                    "safetensors header (real ones are a few MB) — the file is corrupt or hostile"
                )
            if n > size - 8:
                raise FormatError(
                    f"{path}: header length {n} is larger than the {size - 8} bytes after it; "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
            if len(raw) != n:
                raise FormatError(f"{path}: the file shrank while its header was read; it is being written — try again")
    except NotFoundError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e}") from e
    objects = raw.count(b"{")
    # the header itself and '__metadata__' are objects too; a header denser than real ones is loads_json's to refuse
    if MAX_TENSORS + 2 < objects <= len(raw) // OBJECT_BYTES + 16:
        raise FormatError(
            f"{path}: the header holds {objects} JSON objects, so up to {objects - 1} tensors, over the limit of "
            f"{MAX_TENSORS} tensors per file (real files hold under 10,000); refusing to parse it — the file is "
            "corrupt or hostile, or save it sharded"
        )
    doc = loads_json(
        raw, source=str(path), limits=HEADER_JSON, what="header",
        duplicate=lambda k: FormatError(f"{path}: the header lists the key {k!r} twice; the file is corrupt"),
    )
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: the header is JSON {type(doc).__name__}, expected an object of tensors")
    data_start = 8 + n
    data_size = size - data_start
    metadata_raw = doc.pop("__metadata__", None)
    metadata_raw = {} if metadata_raw is None else metadata_raw  # an empty list or string is not "no metadata"
    if not isinstance(metadata_raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()):
        raise FormatError(f"{path}: '__metadata__' must map str to str")
    if len(doc) > MAX_TENSORS:
        raise FormatError(f"{path}: the header lists {len(doc)} tensors, over the limit of {MAX_TENSORS} tensors per file "
                          "(real files hold under 10,000); the file is corrupt or hostile, or save it sharded")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_overlaps(path, tensors, data_start, size)
    _check_lookalikes(path, list(tensors))
    return Header(path, tensors, dict(metadata_raw), data_start, size, (st.st_dev, st.st_ino, size, st.st_mtime_ns))


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise FormatError(f"{where}: expected an object with 'dtype', 'shape' and 'data_offsets'; found {str(entry)[:80]}")
    dt = entry["dtype"]
    if not isinstance(dt, str) or dt not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dt!r}; known: {sorted(DTYPES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative ints; found {str(shape)[:80]}")
    if len(shape) > MAX_RANK:
        raise FormatError(f"{where}: shape has {len(shape)} dims, over the limit of {MAX_RANK}; the file is corrupt")
    # torch sizes and strides are int64: each dim, and the product of the dims taken as >= 1 (a
    # zero-size tensor still has strides), must fit, whatever the byte count says
    if math.prod(max(d, 1) for d in shape) * DTYPES[dt].itemsize >= 2**63:
        raise FormatError(f"{where}: shape {str(shape)[:80]} overflows a 64-bit size; the file is corrupt")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; found {str(offsets)[:80]}")
    begin, end = offsets
    if end > data_size:
        raise FormatError(
            f"{where}: data ends at byte {end} but the file holds {data_size} data bytes; the file is truncated"
        )
    dtype = DTYPES[dt]
    expected = math.prod(shape) * dtype.itemsize
    if expected != end - begin:
        raise FormatError(
            f"{where}: shape {shape} of {dt} needs {expected} bytes, but data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """Tensors tile the data exactly, as the safetensors format requires: no overlap, no gap, nothing after."""
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file; the file is corrupt")
        if s1 > e0:
            raise FormatError(
                f"{path}: bytes {e0 - data_start}..{s1 - data_start} of the data, between tensors {n0!r} and {n1!r}, "
                "belong to no tensor; safetensors files hold their tensors back to back — the file is corrupt"
            )
    first, last = (spans[0][0], spans[-1][1]) if spans else (data_start, data_start)
    if first != data_start or last != file_size:
        raise FormatError(
            f"{path}: the tensors cover data bytes {first - data_start}..{last - data_start} of "
            f"{file_size - data_start}; the rest belongs to no tensor — the file is corrupt or carries hidden bytes"
        )
