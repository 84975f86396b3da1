"""``maybe_download_model`` / ``maybe_download_lora`` on huggingface_hub, with safe defaults.

A local path is returned as it is (a local folder shadows a repo id of the
same name). Anything else is a repo id, optionally with a subfolder
(``org/repo/sub/dir``); every segment is checked before any request.
Online, the repo's listing is checked and files are fetched one by one
(:mod:`fvtransform.hub._snapshot`) under one deadline for the whole download
(:mod:`fvtransform.hub._guard`); every downloaded file is verified against
the hub's hash (:mod:`fvtransform.hub._verify`); the commit a download
resolved to is the snapshot folder's name, read back with
:func:`resolved_commit`.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

import logging
import time
from typing import Callable, TypedDict, TypeVar

from fvtransform.errors import FvTransformError, HubError, NotFoundError, UnsafeFileError, UsageError
from fvtransform._messages import format_keys
from fvtransform.hub import _guard, _snapshot
from fvtransform.hub._verify import resolved_commit, verify_file, verify_snapshot
from fvtransform.io._files import file_entries
from fvtransform.io._pipeline import pipeline_components, require_components

__all__ = ["maybe_download_model", "maybe_download_lora", "split_repo_id", "check_revision", "DEFAULT_PATTERNS",
           "ANY_PICKLE_PATTERNS", "NEVER_PATTERNS"]

log = logging.getLogger("fvtransform.hub")
T = TypeVar("T")

#: Attempts for a download that fails with a server error (5xx, 429) or a dropped connection, and the
#: first back-off in seconds (doubled each time). huggingface_hub retries refused connections itself.
RETRIES = 4
BACKOFF_S = 1.0


class _CacheArgs(TypedDict):
    """The cache arguments every ``huggingface_hub`` call here passes (``cache_dir`` as a ``str``, as it types it)."""

    revision: str | None
    cache_dir: str | None
    token: str | None


class _OfflineArgs(_CacheArgs):
    """:class:`_CacheArgs` for a call that must not touch the network."""

    local_files_only: bool


class _FetchArgs(TypedDict):
    """The keyword arguments of :func:`fvtransform.hub._snapshot.fetch_files` besides repo, commit and files."""

    cache_dir: str | os.PathLike[str] | None
    token: str | None
    label: str
    verify: bool


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> str | None:
    """``cache_dir`` as ``huggingface_hub`` types it (``str | Path``): a path-like as its string."""
    return None if cache_dir is None else os.fspath(cache_dir)


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
            left = _guard.remaining()
            if left is not None and left <= delay:
                raise _guard.Abort("timeout", "the download deadline passed") from e
            log.warning("download failed (%s: %s); retrying in %.1f s", type(e).__name__, str(e).splitlines()[0], delay)
            time.sleep(delay)
    return fn()


#: Configs, tokenizers and safetensors weights; never ONNX, Flax, TF or pickles by default.
DEFAULT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
#: PyTorch pickle weights: added to the default patterns with ``allow_pickle=True``.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
#: Every pickle format (torch, pickle, joblib, dill, numpy object arrays, and the archives picklescan opens,
#: NeMo/TorchServe ones too): never downloaded without ``allow_pickle=True``, whatever the patterns.
ANY_PICKLE_PATTERNS = PICKLE_PATTERNS + [
    "*.pkl", "*.pickle", "*.joblib", "*.dill", "*.dat", "*.data", "*.npy", "*.npz", "*.pt2", "*.tar", "*.zip",
    "*.7z", "*.nemo", "*.mar",
]
#: Never downloaded, whatever the patterns and ``allow_pickle``: other frameworks' weights, and code
#: (Python, native libraries, executables, scripts, TensorRT engines) that fvtransform never runs.
NEVER_PATTERNS = [
    "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.keras", "*.tflite", "*.pb", "*.ot", "*.gguf", "*.ggml",
    "*.mlmodel", "*.engine", "*.plan", "*.trt",
    "*.py", "*.pyc", "*.pyo", "*.pyd", "*.pyw", "*.pyz", "*.ipynb", "*.so", "*.so.*", "*.dylib", "*.dll", "*.exe",
    "*.sh", "*.bash", "*.bat", "*.cmd", "*.ps1", "*.jar", "*.whl", "*.egg",
]
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Names written as local paths, never taken for repo ids (test, why): their absence is a NotFoundError.
_PATH_FORMS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (os.path.isabs, "an absolute path: it is never taken for a repo id"),
    (lambda n: n in (".", "..") or n.startswith(("./", "../")), "a path starting with '.' or '..': it is never taken for a repo id"),
    (lambda n: n.startswith("~"), "'~' is not expanded: pass os.path.expanduser(path); it is never taken for a repo id"),
    (lambda n: "\\" in n, "a repo id has no backslashes, so it is taken for a local path"),
)


def _not_local(repo: str) -> str:
    """How to tell a repo id from a mistyped relative path, for errors of a name taken for a repo id."""
    return (f"; {repo!r} was taken for a repo id because no local file or folder of that name exists in {os.getcwd()} "
            f"(for a local path, check the spelling, or write './{repo}' or an absolute path, which is never taken for a repo id)")


_ADAPTER_CONFIG = "adapter_config.json"


def split_repo_id(name: str) -> tuple[str, str | None]:
    """``"org/repo/sub/dir"`` -> ``("org/repo", "sub/dir")``, checking every segment.

    >>> split_repo_id("org/tiny-wan/transformer")
    ('org/tiny-wan', 'transformer')
    >>> split_repo_id("org/../x")
    Traceback (most recent call last):
    ...
    fvtransform.errors.UnsafeFileError: repo id 'org/../x': segment '..' is not allowed (no '.', '..', absolute parts, empty parts or glob characters)

    A name written as a path (absolute, ``./``, ``../``, ``~``, a backslash) is never a repo id: that it
    does not exist is a :class:`NotFoundError` naming it, not a security error.

    >>> split_repo_id("/no/such/dir")
    Traceback (most recent call last):
    ...
    fvtransform.errors.NotFoundError: /no/such/dir: no such file or folder (an absolute path: it is never taken for a repo id)
    """
    for test, why in _PATH_FORMS:
        if test(name):
            raise NotFoundError(f"{name}: no such file or folder ({why})")
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


def check_revision(revision: object) -> str | None:
    """``revision`` if it is ``None`` or a safe branch, tag or commit name; checked before any request.

    It names ``refs/<revision>`` in the cache, so it is held to repo-path rules:
    relative, no ``.``, ``..`` or empty segments, no control characters or
    backslashes.

    >>> check_revision("refs/pr/1")
    'refs/pr/1'
    >>> check_revision("..")
    Traceback (most recent call last):
    ...
    fvtransform.errors.UnsafeFileError: revision '..' is not allowed: segment '..' (a branch, tag or commit name is relative, with no '.', '..' or empty segments, no control characters or backslashes); nothing was requested
    """
    if revision is None:
        return None
    if not isinstance(revision, str):
        raise UsageError(f"revision={str(revision)[:100]!r} is a {type(revision).__name__}; pass a branch, tag or commit hash as a string")
    shown = revision[:200]
    if not revision or revision.startswith("/") or len(revision) > _guard.MAX_PATH_CHARS:
        raise UnsafeFileError(f"revision {shown!r} is not allowed (empty, absolute or over {_guard.MAX_PATH_CHARS} characters); nothing was requested")
    for seg in revision.split("/"):
        if seg in ("", ".", "..") or "\\" in seg or _CONTROL.search(seg) or len(seg.encode("utf-8", "surrogatepass")) > _guard.MAX_SEGMENT_BYTES:
            raise UnsafeFileError(
                f"revision {shown!r} is not allowed: segment {seg[:100]!r} (a branch, tag or commit name is relative, with no "
                "'.', '..' or empty segments, no control characters or backslashes); nothing was requested"
            )
    return revision


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
        return NotFoundError(f"{where}: repository not found (or private: pass token=){_not_local(repo)}")
    if isinstance(e, hf.RevisionNotFoundError):
        return NotFoundError(f"{where}: revision {revision!r} not found")
    if isinstance(e, hf.IncompleteSnapshotError):
        return NotFoundError(
            f"{where}: offline, and the cached snapshot lacks some of the files asked for ({e}); "
            "download them once online (or ask for the patterns that were cached)"
        )
    if isinstance(e, hf.LocalEntryNotFoundError):
        if offline:
            return NotFoundError(f"{where}: not in the local cache and offline mode is on; download it once online first{_not_local(repo)}")
        return HubError(
            f"{where}: the hub is unreachable and nothing is cached ({str(e).splitlines()[0]}); "
            f"check the network, or run offline (HF_HUB_OFFLINE=1) from a cache filled earlier{_not_local(repo)}"
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
    timeout: float | None = None,
) -> Path:
    """A local folder for a model: the path itself, or a snapshot of a Hub repo.

    Default patterns take configs, tokenizer files and safetensors weights;
    whatever the patterns, pickles of any kind only with ``allow_pickle=True``
    (``*.bin``, ``*.pt``, ``*.ckpt``, ...), code and other frameworks' weights never
    (``*.py``, ``*.onnx``, ...). ``components=[...]`` on a pipeline repo fetches
    ``model_index.json`` first, checks the components are in it, then fetches
    those folders only. Offline (``local_files_only=True`` or
    ``HF_HUB_OFFLINE=1``) the cache is used and nothing touches the network.
    A full commit hash as ``revision`` pins the download (a hub answering
    another commit is refused); a branch name follows the branch, and :func:`resolved_commit` of the returned path says which commit
    it was. With ``verify=True`` every weights file is checked against the
    hub's sha256, every other file (configs, tokenizers) against its git blob
    sha1 (once; remembered in the cache), and every safetensors header against
    the file's size; a bad file is removed from the cache and named in the
    error. Every path, hash and size the server lists is checked before
    anything is fetched (see :mod:`fvtransform.hub._snapshot`), and the whole
    download has a deadline of ``timeout`` seconds (default ``FVT_HUB_TIMEOUT``,
    else 4 hours), enforced even against a server that drips bytes.

    Raises:
        UnsafeFileError: a repo id segment or revision that could escape the download folder.
        NotFoundError: repo, revision, file or component not found; nothing cached offline.
        HubError: gated or unauthorized repo, unreachable hub, other HTTP errors, the deadline passed.
        UsageError: a ``timeout`` or ``revision`` that is not one.
        IntegrityError: downloaded bytes that do not match the hub's hash, listing or announced size;
            response headers naming another commit or blob than the listing; another commit than pinned.
        HubError: a listing that is not one (too many files, bad hashes), a file over its size cap.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    repo, sub = split_repo_id(str(name_or_path))
    check_revision(revision)
    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_PATTERNS)
    if allow_pickle:
        patterns += PICKLE_PATTERNS
    for c in components or []:
        split_repo_id(f"x/y/{c}")
    ignore = NEVER_PATTERNS + ([] if allow_pickle else ANY_PICKLE_PATTERNS)
    offline = _offline(local_files_only)
    where = f"{repo}@{revision or 'main'}"
    if offline:
        folder = _offline_model(repo, sub, revision, patterns, ignore, components, cache_dir, token)
    else:
        seconds = _guard.timeout_from_env(timeout)
        _guard.install()
        try:
            folder = _bounded(lambda: _online_model(repo, sub, revision, patterns, ignore, components, cache_dir, token, verify), where, seconds)
        except _Unreachable as e:  # as snapshot_download does: the cache serves what it holds
            try:
                folder = _offline_model(repo, sub, revision, patterns, ignore, components, cache_dir, token)
            except NotFoundError:
                raise e.error from None
    label = f"{repo}@{resolved_commit(folder) or revision or 'main'}"
    if verify:
        verify_snapshot(folder, label=label)
    log.info("%s: snapshot %s", label, folder)
    return _inside(folder, sub)


class _Unreachable(Exception):
    """The hub could not be reached for the listing; ``error`` is the typed error to raise if nothing is cached."""

    def __init__(self, error: HubError) -> None:
        super().__init__(str(error))
        self.error = error


def _listing(repo: str, revision: str | None, token: str | None) -> tuple[str, dict[str, _snapshot.Entry]]:
    """:func:`_snapshot.list_repo`, retried; a hub that cannot be reached is :class:`_Unreachable`."""
    import httpx2

    where = f"{repo}@{revision or 'main'}"
    try:
        return _retrying(lambda: _snapshot.list_repo(repo, revision, token, where))
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
        raise _Unreachable(HubError(
            f"{where}: the hub is unreachable and nothing is cached ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"check the network, or run offline (HF_HUB_OFFLINE=1) from a cache filled earlier{_not_local(repo)}"
        )) from None


def _bounded(fn: Callable[[], T], where: str, seconds: float) -> T:
    """``fn()`` under the download deadline; the guard's aborts as typed errors."""
    try:
        return _guard.run_with_deadline(fn, seconds, on_timeout=lambda abandoned: _timed_out(where, seconds, abandoned))
    except _guard.Abort as e:
        raise _snapshot.translate_abort(e, where) from None


def _timed_out(where: str, seconds: float, abandoned: bool) -> HubError:
    left = ("it was abandoned and removes its partial files when it ends" if abandoned
            else "its partial files were removed")
    return HubError(
        f"{where}: the download did not finish within its deadline of {seconds:g} s (timeout=, or FVT_HUB_TIMEOUT); "
        f"the server is too slow, stalled or sends without end, and {left}. Try again later, or raise the deadline"
    )


def _offline_model(repo: str, sub: str | None, revision: str | None, patterns: list[str], ignore: list[str],
                   components: list[str] | None, cache_dir: str | os.PathLike[str] | None, token: str | None) -> Path:
    """The cached snapshot for a model, without touching the network."""
    from huggingface_hub import hf_hub_download, snapshot_download

    prefix = f"{sub}/" if sub else ""
    common = _OfflineArgs(revision=revision, local_files_only=True, cache_dir=_cache_dir(cache_dir), token=token)
    try:
        if components:
            index = Path(hf_hub_download(repo, f"{prefix}model_index.json", **common))
            verify_file(index, label=f"{repo}@{resolved_commit(index) or revision or 'main'}")
            _check_components(index, components, f"{repo}@{revision or 'main'}")
            patterns = [f"{prefix}{c}/{p}" for c in components for p in patterns] + [f"{prefix}model_index.json"]
        elif sub:
            patterns = [f"{prefix}{p}" for p in patterns]
        return Path(snapshot_download(repo, allow_patterns=patterns, ignore_patterns=ignore, **common))
    except FvTransformError:
        raise
    except Exception as e:  # mapped to our typed errors, keeping repo and revision
        raise _translate(e, repo, revision, True) from e


def _online_model(repo: str, sub: str | None, revision: str | None, patterns: list[str], ignore: list[str],
                  components: list[str] | None, cache_dir: str | os.PathLike[str] | None, token: str | None,
                  verify: bool) -> Path:
    """List the repo, check it, then fetch and verify the files asked for (runs under the download deadline)."""
    prefix = f"{sub}/" if sub else ""
    try:
        commit, entries = _listing(repo, revision, token)
        label = f"{repo}@{commit}"
        fetch = _FetchArgs(cache_dir=cache_dir, token=token, label=label, verify=verify)
        if components:
            name = f"{prefix}model_index.json"
            if name not in entries:
                raise NotFoundError(f"{label}: {name} not found; the repo is not a pipeline (pass the component's folder as repo id instead)")
            index = _retrying(lambda: _snapshot.fetch_files(repo, commit, [entries[name]], **fetch))[name]
            _check_components(index, components, label)
            patterns = [f"{prefix}{c}/{p}" for c in components for p in patterns] + [name]
        elif sub:
            patterns = [f"{prefix}{p}" for p in patterns]
        files = _snapshot.select(entries, patterns, ignore)
        _retrying(lambda: _snapshot.fetch_files(repo, commit, files, **fetch))
        _snapshot.write_ref_and_tree(repo, revision, commit, entries, cache_dir)
        return _snapshot.snapshot_folder(repo, commit, cache_dir)
    except (FvTransformError, _Unreachable, _guard.Abort):
        raise
    except Exception as e:  # mapped to our typed errors, keeping repo and revision
        raise _translate(e, repo, revision, False) from e


def _check_components(index: Path, components: list[str], label: str) -> None:
    """Check the components asked for against ``model_index.json`` (:mod:`fvtransform.io._pipeline`, as local pipelines)."""
    source = f"{label}: model_index.json"
    require_components(pipeline_components(index.parent, source=source), components, source=source)


def maybe_download_lora(
    name_or_path: str | os.PathLike[str],
    *,
    weight_name: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    verify: bool = True,
    timeout: float | None = None,
) -> Path:
    """The path of one LoRA weights file: a file as is, or found in a folder or repo.

    ``weight_name`` when given, else the file ``fvt.lora.load`` picks in a
    folder, in diffusers' order (``pytorch_lora_weights.safetensors``, then
    PEFT's ``adapter_model.safetensors``, then the only ``*.safetensors``
    that is no scheduler, optimizer or checkpoint file); several candidates
    is an error listing them and naming ``weight_name=``; none is an error too. From a repo only that
    file and ``adapter_config.json`` (when there is one) are downloaded,
    both verified like :func:`maybe_download_model`'s files (a tampered
    ``adapter_config.json`` would change the scale), under the same deadline
    ``timeout``; offline, the cache serves them the same way.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return _pick(path, file_entries(path), weight_name, str(path))  # a FIFO is picked, then refused when opened
    repo, sub = split_repo_id(str(name_or_path))
    check_revision(revision)
    if weight_name is not None:
        split_repo_id(f"x/y/{weight_name}")  # the same checks as every repo path segment
    prefix = f"{sub}/" if sub else ""
    where = f"{repo}@{revision or 'main'}"
    if _offline(local_files_only):
        out, config = _offline_lora(repo, prefix, weight_name, revision, cache_dir, token)
        label = f"{repo}@{resolved_commit(out) or revision or 'main'}"
        if verify:
            for f in (out, config):
                if f is not None:
                    verify_file(f, label=label)
    else:
        seconds = _guard.timeout_from_env(timeout)
        _guard.install()
        try:
            out = _bounded(lambda: _online_lora(repo, prefix, weight_name, revision, cache_dir, token, verify), where, seconds)
        except _Unreachable as e:  # the cache serves what it holds
            try:
                out, _ = _offline_lora(repo, prefix, weight_name, revision, cache_dir, token)
            except NotFoundError:
                raise e.error from None
        label = f"{repo}@{resolved_commit(out) or revision or 'main'}"
    log.info("%s: LoRA file %s", label, out)
    return out


def _online_lora(repo: str, prefix: str, weight_name: str | None, revision: str | None,
                 cache_dir: str | os.PathLike[str] | None, token: str | None, verify: bool) -> Path:
    """List the repo, pick the LoRA file, fetch it and its ``adapter_config.json``, each verified."""
    where = f"{repo}@{revision or 'main'}"
    try:
        commit, entries = _listing(repo, revision, token)
        label = f"{repo}@{commit}"
        names = sorted(p[len(prefix):] for p in entries if p.startswith(prefix))
        if weight_name is None:
            weight_name = _pick(Path("."), [n for n in names if "/" not in n], None, repo).name
        elif weight_name not in names:
            raise NotFoundError(f"{where}: file not found: {prefix}{weight_name!r} is not in the repo; files: {format_keys(names)}")
        wanted = [f"{prefix}{weight_name}"] + [f"{prefix}{_ADAPTER_CONFIG}"] * (f"{prefix}{_ADAPTER_CONFIG}" in entries)
        fetch = _FetchArgs(cache_dir=cache_dir, token=token, label=label, verify=verify)
        got = _retrying(lambda: _snapshot.fetch_files(repo, commit, [entries[w] for w in wanted], **fetch))
        _snapshot.write_ref_and_tree(repo, revision, commit, entries, cache_dir)
        return got[wanted[0]]
    except (FvTransformError, _Unreachable, _guard.Abort):
        raise
    except Exception as e:
        raise _translate(e, repo, revision, False) from e


def _offline_lora(repo: str, prefix: str, weight_name: str | None, revision: str | None,
                  cache_dir: str | os.PathLike[str] | None, token: str | None) -> tuple[Path, Path | None]:
    """The cached LoRA file and its cached ``adapter_config.json`` (if any), without touching the network."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf

    common = _OfflineArgs(revision=revision, cache_dir=_cache_dir(cache_dir), token=token, local_files_only=True)
    try:
        if weight_name is None:
            weight_name = _cached_lora_name(repo, prefix, _CacheArgs(revision=revision, cache_dir=_cache_dir(cache_dir), token=token))
        out = Path(hf_hub_download(repo, f"{prefix}{weight_name}", **common))
        try:
            config: Path | None = Path(hf_hub_download(repo, f"{prefix}{_ADAPTER_CONFIG}", **common))
        except (hf.EntryNotFoundError, hf.LocalEntryNotFoundError):
            config = None  # an adapter_config.json is optional
    except FvTransformError:
        raise
    except Exception as e:
        raise _translate(e, repo, revision, True) from e
    return out, config


def _cached_lora_name(repo: str, prefix: str, common: _CacheArgs) -> str:
    """Offline: the LoRA file name to use, from what the cache holds."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    from fvtransform.lora._pick import LORA_FILE_NAMES

    for known in LORA_FILE_NAMES:
        hit = try_to_load_from_cache(repo, f"{prefix}{known}", cache_dir=common["cache_dir"], revision=common["revision"])
        if isinstance(hit, str):
            return known
    folder = Path(snapshot_download(repo, allow_patterns=[f"{prefix}*.safetensors"], local_files_only=True, **common))
    folder = _inside(folder, prefix.rstrip("/") or None)
    return _pick(folder, sorted(p.name for p in folder.iterdir() if p.is_file()), None, repo).name


def _pick(folder: Path, names: list[str], weight_name: str | None, label: str) -> Path:
    """``folder`` / the LoRA file among ``names``, in the one order ``fvt.lora.load`` uses too (see ``pick_lora_file``)."""
    from fvtransform.lora._pick import pick_lora_file

    return folder / pick_lora_file(names, label, weight_name)
