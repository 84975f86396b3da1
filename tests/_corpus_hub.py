"""Hostile inputs of the download area: a hub cache whose files do not match their hashes, hostile indexes.

Each case builds its hub-cache layout afresh when it runs (verification removes a bad file from the
cache, and the corpus test runs every case twice).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _corpus import Case

from fvtransform import errors as E
from fvtransform.hub._download import _check_components
from fvtransform.hub._verify import verify_file

_COMMIT = "c" * 40


def _sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _cached(root: Path, name: str, announced: bytes, served: bytes, *, blob: str | None = None) -> Path:
    """``root/snapshots/<commit>/<name>`` -> ``../../blobs/<hash of announced>``, holding ``served``."""
    blob = blob or _sha1(announced)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / blob).write_bytes(served)
    link = root / "snapshots" / _COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(f"../../blobs/{blob}", link)
    for record in (root / ".fvt-verified").glob("*.json") if (root / ".fvt-verified").is_dir() else []:
        record.unlink()
    return link


def _verify(name: str, announced: bytes, served: bytes, **kw: Any) -> Callable[[Path], Any]:
    expected = kw.pop("expected", None)
    return lambda p: verify_file(_cached(p, name, announced, served, **kw), label="org/m@main", expected=expected)


def _rewritten_in_place(name: str, data: bytes) -> Callable[[Path], Any]:
    """A verified blob rewritten in place (same inode and size) with its mtime put back: ctime tells."""

    def run(p: Path) -> Any:
        import time

        from fvtransform.hub._verify import _stamp

        link = _cached(p, name, data, data)
        blob = link.resolve()
        record = p / ".fvt-verified" / f"{blob.name}.json"
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps(_stamp(link)))  # as a verification leaves it
        st = blob.stat()
        time.sleep(0.02)  # past the file system's coarse clock tick, so the rewrite gets a later ctime
        with open(blob, "r+b") as f:
            f.write(bytes([data[0] ^ 0xFF]))
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        return verify_file(link, label="org/m@main")

    return run


def _index(doc: str) -> Callable[[Path], Any]:
    def run(p: Path) -> Any:
        p.mkdir(parents=True, exist_ok=True)
        (p / "model_index.json").write_text(doc)
        return _check_components(p / "model_index.json", ["transformer"], "org/pipe@main")

    return run


def cases(root: Path) -> list[Case]:
    config = b'{\n  "lora_alpha": 8,\n  "r": 4\n}'
    tampered = config.replace(b"8", b"9")
    pipe = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    out = [
        Case("hub: tampered adapter_config.json (git blob sha1)", root / "tampered", E.IntegrityError,
             r"adapter_config\.json: the git-sha1 of the downloaded bytes is [0-9a-f]{40}, but the hub announced",
             _verify("adapter_config.json", config, tampered)),
        Case("hub: snapshot file whose blob is not named by a hash", root / "unhashed", E.IntegrityError,
             r"config\.json cannot be verified: it is not a link to a hash-named blob",
             _verify("config.json", config, config, blob="not-a-hash")),
        Case("hub: blob name disagrees with the repo listing", root / "listing", E.IntegrityError,
             r"config\.json: the hub announced hash [0-9a-f]{40} when downloading it, but its repo listing says 0{40}",
             _verify("config.json", config, config, expected=("0" * 40, len(config)))),
        Case("hub: size disagrees with the repo listing", root / "size", E.IntegrityError,
             rf"config\.json: {len(config)} bytes arrived, but the repo listing announced {len(config) + 1}",
             _verify("config.json", config, config, expected=(_sha1(config), len(config) + 1))),
        Case("hub: verified blob rewritten in place, its mtime put back", root / "inplace", E.IntegrityError,
             r"adapter_config\.json: the git-sha1 of the downloaded bytes is [0-9a-f]{40}, but the hub announced",
             _rewritten_in_place("adapter_config.json", config)),
        Case("hub: model_index.json names component '../../x'", root / "index-escape", E.UnsafeFileError,
             r"org/pipe@main: model_index\.json names component '\.\./\.\./x'",
             _index(json.dumps(dict(pipe, **{"../../x": ["diffusers", "AutoencoderKLWan"]})))),
        Case("hub: model_index.json names component '..'", root / "index-dotdot", E.UnsafeFileError,
             r"org/pipe@main: model_index\.json names component '\.\.', which is not a plain folder name",
             _index(json.dumps(dict(pipe, **{"..": ["diffusers", "AutoencoderKLWan"]})))),
        Case("hub: model_index.json with a 5000-digit integer", root / "index-digits", E.FormatError,
             r"model_index\.json: key '_n': an integer of 5000 digits, more than 64",
             _index('{"transformer": ["diffusers", "WanTransformer3DModel"], "_n": ' + "9" * 5000 + "}")),
    ]
    for case in out:
        case.path.mkdir(parents=True, exist_ok=True)
    return out
