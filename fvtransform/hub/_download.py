"""``maybe_download_model`` / ``maybe_download_lora`` on huggingface_hub, with safe defaults.

A local path is returned as it is (a local folder shadows a repo id of the
same name). Anything else is a repo id, optionally with a subfolder
(``org/repo/sub/dir``); every segment is checked before any request.
Downloaded weights are verified against the hub's sha256 (see
:mod:`fvtransform.hub._verify`); the commit a download resolved to is the
snapshot folder's name, read back with :func:`resolved_commit`.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

import json
import logging
import time
from typing import Callable, TypeVar

from fvtransform.errors import FormatError, FvTransformError, HubError, NotFoundError, UnsafeFileError
from fvtransform.hub._verify import resolved_commit, verify_file, verify_snapshot
from fvtransform.io._open import read_text

__all__ = ["maybe_download_model", "maybe_download_lora", "split_repo_id", "DEFAULT_PATTERNS", "NEVER_PATTERNS"]

log = logging.getLogger("fvtransform.hub")
T = TypeVar("T")

#: Attempts for a download that fails with a server error (5xx, 429) or a dropped connection, and the
#: first back-off in seconds (doubled each time). huggingface_hub retries refused connections itself.
RETRIES = 4
BACKOFF_S = 1.0


def _transient(e: Exception) -> bool:
    from huggingface_hub import errors as hf

    if isinstance(e, hf.HfHubHTTPError) and not isinstance(e, (hf.RepositoryNotFoundError, hf.EntryNotFoundError)):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    name = type(e).__name__
    return name in ("RemoteProtocolError", "ReadError", "ReadTimeout", "ChunkedEncodingError", "IncompleteRead")


def _retrying(fn: Callable[[], T]) -> T:
    """``fn()``, retried with exponential back-off while it fails transiently (``RETRIES`` attempts in all)."""
    for attempt in range(RETRIES - 1):
        try:
            return fn()
        except Exception as e:
            if not _transient(e):
                raise
            delay = BACKOFF_S * 2**attempt
            log.warning("download failed (%s: %s); retrying in %.1f s", type(e).__name__, str(e).splitlines()[0], delay)
            time.sleep(delay)
    return fn()


#: Configs, tokenizers and safetensors weights; never ONNX, Flax, TF or pickles by default.
DEFAULT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
#: Never downloaded, whatever the patterns: other frameworks' weights.
NEVER_PATTERNS = ["*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.ot"]
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LORA_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def split_repo_id(name: str) -> tuple[str, str | None]:
    """``"org/repo/sub/dir"`` -> ``("org/repo", "sub/dir")``, checking every segment.

    >>> split_repo_id("org/tiny-wan/transformer")
    ('org/tiny-wan', 'transformer')
    >>> split_repo_id("org/../x")
    Traceback (most recent call last):
    ...
    fvtransform.errors.UnsafeFileError: repo id 'org/../x': segment '..' is not allowed (no '.', '..', absolute parts, empty parts or glob characters)
    """
    if name.startswith("/") or "\\" in name:
        raise UnsafeFileError(f"{name!r} is not an existing path, and as a repo id absolute paths or backslashes are not allowed")
    parts = name.split("/")
    for p in parts:
        if p in ("", ".", "..") or not _SEGMENT.fullmatch(p) or ".." in p:
            raise UnsafeFileError(
                f"repo id {name!r}: segment {p!r} is not allowed (no '.', '..', absolute parts, empty parts or glob characters)"
            )
    if len(parts) < 2:
        raise NotFoundError(f"{name!r} is neither an existing path nor a repo id of the form 'org/name'")
    sub = "/".join(parts[2:]) or None
    return "/".join(parts[:2]), sub


def _offline(local_files_only: bool) -> bool:
    if local_files_only:
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _translate(e: Exception, repo: str, revision: str | None, offline: bool) -> Exception:
    from huggingface_hub import errors as hf

    where = f"{repo}@{revision or 'main'}"
    if isinstance(e, hf.GatedRepoError):
        return HubError(f"{where}: the repo is gated or needs authorization; pass token= or set HF_TOKEN")
    if isinstance(e, hf.RepositoryNotFoundError):
        return NotFoundError(f"{where}: repository not found (or private: pass token=)")
    if isinstance(e, hf.RevisionNotFoundError):
        return NotFoundError(f"{where}: revision {revision!r} not found")
    if isinstance(e, hf.IncompleteSnapshotError):
        return NotFoundError(
            f"{where}: offline, and the cached snapshot lacks some of the files asked for ({e}); "
            "download them once online (or ask for the patterns that were cached)"
        )
    if isinstance(e, hf.LocalEntryNotFoundError):
        if offline:
            return NotFoundError(f"{where}: not in the local cache and offline mode is on; download it once online first")
        return HubError(
            f"{where}: the hub is unreachable and nothing is cached ({str(e).splitlines()[0]}); "
            "check the network, or run offline (HF_HUB_OFFLINE=1) from a cache filled earlier"
        )
    if isinstance(e, hf.EntryNotFoundError):
        return NotFoundError(f"{where}: file not found: {e}")
    if isinstance(e, hf.HfHubHTTPError):
        return HubError(f"{where}: HTTP error: {e}")
    return HubError(f"{where}: download failed: {type(e).__name__}: {e}")


def _inside(root: Path, sub: str | None) -> Path:
    target = (root / sub).resolve() if sub else root.resolve()
    if target != root.resolve() and not str(target).startswith(str(root.resolve()) + os.sep):
        raise UnsafeFileError(f"{sub!r} resolves outside the download folder {root}")
    return root / sub if sub else root


def maybe_download_model(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    components: list[str] | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
) -> Path:
    """A local folder for a model: the path itself, or a snapshot of a Hub repo.

    Default patterns take configs, tokenizer files and safetensors weights;
    pickle weights only with ``allow_pickle=True``; ONNX, Flax and TF files
    never. ``components=[...]`` on a pipeline repo fetches
    ``model_index.json`` first, checks the components are in it, then fetches
    those folders only. Offline (``local_files_only=True`` or
    ``HF_HUB_OFFLINE=1``) the cache is used and nothing touches the network.
    A commit hash as ``revision`` pins the download; a branch name follows the
    branch, and :func:`resolved_commit` of the returned path says which commit
    it was. With ``verify=True`` every weights file is checked against the
    hub's sha256 (once; remembered in the cache) and every safetensors header
    against the file's size; a bad file is removed from the cache and named in
    the error.

    Raises:
        UnsafeFileError: a repo id segment that could escape the download folder.
        NotFoundError: repo, revision, file or component not found; nothing cached offline.
        HubError: gated or unauthorized repo, unreachable hub, other HTTP errors.
        IntegrityError: downloaded bytes that do not match the hub's hash.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    repo, sub = split_repo_id(str(name_or_path))
    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_PATTERNS)
    if allow_pickle:
        patterns += PICKLE_PATTERNS
    prefix = f"{sub}/" if sub else ""
    offline = _offline(local_files_only)
    common = dict(revision=revision, local_files_only=offline, cache_dir=cache_dir, token=token)
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if components:
            for c in components:
                split_repo_id(f"x/y/{c}")
            index = Path(_retrying(lambda: hf_hub_download(repo, f"{prefix}model_index.json", **common)))
            _check_components(index, components, f"{repo}@{revision or 'main'}")
            patterns = [f"{prefix}{c}/{p}" for c in components for p in patterns] + [f"{prefix}model_index.json"]
        elif sub:
            patterns = [f"{prefix}{p}" for p in patterns]
        ignore = NEVER_PATTERNS + ([] if allow_pickle else PICKLE_PATTERNS)
        folder = Path(_retrying(lambda: snapshot_download(repo, allow_patterns=patterns, ignore_patterns=ignore, **common)))
    except FvTransformError:
        raise
    except Exception as e:  # mapped to our typed errors, keeping repo and revision
        raise _translate(e, repo, revision, offline) from e
    label = f"{repo}@{resolved_commit(folder) or revision or 'main'}"
    if verify:
        verify_snapshot(folder, label=label)
    log.info("%s: snapshot %s", label, folder)
    return _inside(folder, sub)


def _check_components(index: Path, components: list[str], label: str) -> None:
    try:
        doc = json.loads(read_text(index, "model_index.json"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{label}: model_index.json is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{label}: model_index.json must be an object of component -> [library, class]")
    def absent(v: object) -> bool:  # diffusers writes an unused component as null or [null, null]
        return v is None or (isinstance(v, list) and None in v)

    present = sorted(k for k, v in doc.items() if not k.startswith("_") and not absent(v))
    for c in components:
        if c not in doc or c.startswith("_"):
            raise NotFoundError(f"{label}: the pipeline has no component {c!r}; components: {present}")
        if absent(doc[c]):
            raise NotFoundError(f"{label}: component {c!r} is absent in this pipeline (its entry is null)")


def maybe_download_lora(
    name_or_path: str | os.PathLike[str],
    *,
    weight_name: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    verify: bool = True,
) -> Path:
    """The path of one LoRA weights file: a file as is, or found in a folder or repo.

    ``weight_name`` when given, else a known name
    (``pytorch_lora_weights.safetensors``, ``adapter_model.safetensors``), else
    the only ``*.safetensors``; several candidates is an error listing them
    and naming ``weight_name=``; none is an error too. From a repo only that
    file and ``adapter_config.json`` (when there is one) are downloaded,
    verified like :func:`maybe_download_model`'s weights; offline, the cache
    serves them the same way.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return _pick(path, sorted(p.name for p in path.iterdir() if p.is_file()), weight_name, str(path))
    repo, sub = split_repo_id(str(name_or_path))
    if weight_name is not None:
        split_repo_id(f"x/y/{weight_name}")  # the same checks as every repo path segment
    prefix = f"{sub}/" if sub else ""
    offline = _offline(local_files_only)
    common = dict(revision=revision, cache_dir=cache_dir, token=token)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hf

    try:
        if weight_name is None:
            if offline:
                weight_name = _cached_lora_name(repo, prefix, common)
            else:
                files = _retrying(lambda: HfApi(token=token).list_repo_files(repo, revision=revision))
                names = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
                weight_name = _pick(Path("."), names, None, repo).name
        name = f"{prefix}{weight_name}"
        out = Path(_retrying(lambda: hf_hub_download(repo, name, local_files_only=offline, **common)))
        try:
            _retrying(lambda: hf_hub_download(repo, f"{prefix}adapter_config.json", local_files_only=offline, **common))
        except (hf.EntryNotFoundError, hf.LocalEntryNotFoundError):
            pass  # an adapter_config.json is optional
    except FvTransformError:
        raise
    except Exception as e:
        raise _translate(e, repo, revision, offline) from e
    label = f"{repo}@{resolved_commit(out) or revision or 'main'}"
    if verify:
        verify_file(out, label=label)
    log.info("%s: LoRA file %s", label, out)
    return out


def _cached_lora_name(repo: str, prefix: str, common: dict) -> str:
    """Offline: the LoRA file name to use, from what the cache holds."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    for known in _LORA_NAMES:
        hit = try_to_load_from_cache(repo, f"{prefix}{known}", cache_dir=common["cache_dir"], revision=common["revision"])
        if isinstance(hit, str):
            return known
    folder = Path(snapshot_download(repo, allow_patterns=[f"{prefix}*.safetensors"], local_files_only=True, **common))
    folder = _inside(folder, prefix.rstrip("/") or None)
    return _pick(folder, sorted(p.name for p in folder.iterdir() if p.is_file()), None, repo).name


def _pick(folder: Path, names: list[str], weight_name: str | None, label: str) -> Path:
    if weight_name is not None:
        if weight_name not in names:
            raise NotFoundError(f"{label}: no file {weight_name!r}; files: {names}")
        return folder / weight_name
    for known in _LORA_NAMES:
        if known in names:
            return folder / known
    st = [n for n in names if n.endswith(".safetensors")]
    if len(st) == 1:
        return folder / st[0]
    if st:
        raise FormatError(f"{label}: several LoRA candidates {st}; pass weight_name= to choose one")
    raise NotFoundError(f"{label}: no LoRA weights (*.safetensors) found")
