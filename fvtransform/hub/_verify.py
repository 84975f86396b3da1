"""Content checks for downloaded files: every file against the hub's hash, safetensors headers against sizes.

``huggingface_hub`` checks only sizes. In its cache every snapshot file is a
symlink to ``blobs/<etag>``, and the etag is what the hub announced for the
file: the sha256 for LFS files (all weights), the git blob sha1
(``sha1(b"blob <size>\0" + bytes)``) for small ones (configs, tokenizers).
This module hashes the bytes actually on disk and compares, for every file
the library reads afterwards, not only weights: a tampered
``adapter_config.json`` changes a LoRA's scale as surely as a tampered
weight changes the model. Online, the blob name is also compared with the
repo listing's hash and size (``trees/<commit>.json``, the same metadata
``snapshot_download`` caches), so a ``HEAD`` answer that disagrees with the
listing is caught too. A file that
passed is remembered in ``<repo cache>/.fvt-verified/<etag>.json`` with its
size, device, inode, modification and change times (``os.utime`` cannot set
the change time back), so later loads do not hash it again; a file whose
bytes do not hash to its blob's name is removed from the cache (its snapshot
link and its blob) so no later load can pick it up. A blob whose *name*
disagrees with the listing is refused but left alone: it may be another
file's, of another snapshot, and a download never deletes what it did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
import re

from fvtransform._json import JsonLimits, read_json_file
from fvtransform.errors import FormatError, FvTransformError, IntegrityError
from fvtransform.io._open import open_regular

__all__ = ["verify_snapshot", "verify_file", "resolved_commit", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_CHUNK = 8 * 1024 * 1024
#: A verification record is one small object of numbers (size, device, inode, times).
_RECORD_JSON = JsonLimits(max_bytes=65536, max_depth=2, max_containers=16, max_values=64)


def resolved_commit(path: str | os.PathLike[str]) -> str | None:
    """The 40-hex commit of a path inside a hub cache snapshot, or ``None`` for other paths.

    >>> resolved_commit("/cache/models--org--m/snapshots/" + "a" * 40 + "/transformer")
    'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
    >>> resolved_commit("/data/my-model") is None
    True
    """
    parts = Path(path).parts
    for i in range(len(parts) - 1):
        if parts[i] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


def _blob_of(file: Path) -> Path | None:
    """The cache blob a snapshot file links to (first hop only), or ``None`` if it is not a link."""
    if not file.is_symlink():
        return None
    return Path(os.path.normpath(file.parent / os.readlink(file)))


def _hash(path: Path, algo: str, size: int) -> str:
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with open_regular(path, "downloaded file") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    # ctime cannot be set back (os.utime restores only atime and mtime): a blob rewritten in place is re-hashed
    return {"size": st.st_size, "dev": st.st_dev, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _remove(file: Path, blob: Path | None) -> None:
    for p in (file, blob):
        if p is not None:
            with contextlib.suppress(OSError):
                p.unlink()


def verify_file(file: Path, *, label: str, expected: tuple[str, int] | None = None) -> None:
    """Check one snapshot file of the hub cache; remove it from the cache and raise if it is bad.

    ``expected`` is the repo listing's ``(hash, size)`` for the file, when known.

    Raises:
        IntegrityError: the bytes do not hash to what the hub announced (or
            not to what its listing says, or have another size), or the file
            cannot be checked (not a link into the cache's blobs).
        FormatError: a safetensors file whose header does not fit its size.
    """
    blob = _blob_of(file)
    if blob is None or not _HEX.fullmatch(blob.name):
        raise IntegrityError(
            f"{label}: {file} cannot be verified: it is not a link to a hash-named blob of the hub cache "
            "(a cache without symlinks, or a file copied in by hand); download into the standard cache, or pass verify=False"
        )
    if not file.exists():
        _remove(file, None)
        raise IntegrityError(f"{label}: {file.name}: its blob {blob.name} is missing from the cache; download again")
    stamp = _stamp(file)
    if expected is not None:
        want, size = expected
        if blob.name != want:  # the blob may be another file's, of another snapshot: nothing is removed
            raise IntegrityError(
                f"{label}: {file.name}: the hub announced hash {blob.name} when downloading it, but its repo listing says "
                f"{want}; refused, nothing removed (the blob may be another file's). Download again; if this repeats, "
                "the server is not consistent"
            )
        if stamp["size"] != size:
            _remove(file, blob)
            raise IntegrityError(
                f"{label}: {file.name}: {stamp['size']} bytes arrived, but the repo listing announced {size}; "
                "the file was removed from the cache. Download again"
            )
    record = blob.parent.parent / ".fvt-verified" / f"{blob.name}.json"
    with contextlib.suppress(OSError, FvTransformError):  # no record, or a broken one: the file is hashed again
        if read_json_file(record, limits=_RECORD_JSON, expect=dict, what="verification record") == stamp:
            return
    algo = "sha256" if len(blob.name) == 64 else "git-sha1"
    got = _hash(file, algo, stamp["size"])
    if got != blob.name:
        _remove(file, blob)
        raise IntegrityError(
            f"{label}: {file.name}: the {algo} of the downloaded bytes is {got}, but the hub announced {blob.name}; "
            "the file was removed from the cache. Download again; if this repeats, a proxy or mirror serves other bytes"
        )
    if file.name.endswith(".safetensors"):
        from fvtransform.io._header import read_header

        try:
            read_header(file)
        except FormatError as e:
            _remove(file, blob)
            raise FormatError(f"{label}: {file.name} matches its hash but is not a valid safetensors file ({e}); removed from the cache") from None
    with contextlib.suppress(OSError):  # remembering is an optimisation; a read-only cache only costs a re-hash
        record.parent.mkdir(exist_ok=True)
        tmp = record.with_name(record.name + f".fvt-tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, record)


def verify_snapshot(folder: Path, *, label: str) -> list[Path]:
    """Verify every file under a snapshot folder (weights, configs, tokenizers); returns the files checked (sorted)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    for f in files:
        verify_file(f, label=label)
    return files
