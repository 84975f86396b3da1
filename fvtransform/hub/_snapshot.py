"""Online snapshot downloads: list the repo, check every name and size, fetch and verify file by file.

``huggingface_hub.snapshot_download`` does the same steps (``repo_info`` for
the commit, ``list_repo_tree`` for the files, ``hf_hub_download`` per file)
but hands the names and sizes it is sent straight to the cache, in a worker
pool that the download deadline of :mod:`fvtransform.hub._guard` cannot
follow. Here every listed path is checked before anything is fetched (see
:func:`~fvtransform.hub._guard.check_repo_path`), the listing is bounded
(:data:`MAX_REPO_FILES` entries), each file's announced size is checked
against a cap by kind (configs at most :data:`MAX_CONFIG_BYTES`) and bounds
what the socket may deliver for it, and each file is verified against the
listing's hash as soon as it is in the cache. The cache is left exactly as
``snapshot_download`` leaves it (blobs, snapshot links, ``refs/<revision>``
and the ``trees/<commit>.json`` listing), so offline calls read it the same way.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import re
import attrs

from fvtransform.errors import HubError, IntegrityError, UnsafeFileError
from fvtransform.hub import _guard
from fvtransform.hub._verify import WEIGHT_SUFFIXES, resolved_commit, verify_file

__all__ = ["Entry", "list_repo", "select", "fetch_files", "snapshot_folder", "write_ref_and_tree", "translate_abort", "MAX_REPO_FILES", "MAX_CONFIG_BYTES", "MAX_OTHER_BYTES"]

#: A listing with more files than this is refused (a hostile or broken server; model repos hold hundreds).
MAX_REPO_FILES = 10_000
#: Configs and indexes (``config.json``, ``model_index.json``, ``adapter_config.json``, ``*.index.json``).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: Other small files (tokenizers: a T5 ``tokenizer.json`` is 16-35 MB).
MAX_OTHER_BYTES = 256 * 1024 * 1024
#: The bytes a listing (``repo_info`` + the tree pages) may take on the wire.
MAX_LISTING_BYTES = 64 * 1024 * 1024
#: Headers, redirects and error bodies a file's download may add to its announced size.
SLACK_BYTES = 1024 * 1024
#: Parallel file downloads (``snapshot_download``'s default).
WORKERS = 8

_CONFIG_NAMES = re.compile(r"(.*/)?([^/]*config\.json|model_index\.json|[^/]*\.index\.json)")


@attrs.frozen
class Entry:
    """One file of a repo listing: its path, size, git blob sha1 and (LFS files) sha256."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None
    xet_hash: str | None = None

    @property
    def etag(self) -> str:
        """The hash the cache names this file's blob after."""
        return self.lfs_sha256 or self.blob_id


def size_cap(path: str) -> int | None:
    """The most bytes a file of this name may have (``None``: weights, bounded by their announced size only)."""
    if path.endswith(WEIGHT_SUFFIXES):
        return None
    return MAX_CONFIG_BYTES if _CONFIG_NAMES.fullmatch(path) else MAX_OTHER_BYTES


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**53:
        raise HubError(f"{what}: size {v!r} is not a non-negative integer; the server is not a trustworthy hub")
    return v


def list_repo(repo: str, revision: str | None, token: str | None, label: str) -> tuple[str, dict[str, Entry]]:
    """The commit ``revision`` resolves to and its files, every path and hash checked.

    Raises:
        UnsafeFileError: a listed path that could escape the cache (``..``, absolute, NUL, too long).
        IntegrityError: ``revision`` is a full commit hash and the hub answered another commit.
        HubError: more than :data:`MAX_REPO_FILES` files, a size or hash that is not one.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    with _guard.budget(MAX_LISTING_BYTES, f"{label}: the repo listing"):
        commit = api.repo_info(repo, revision=revision or "main").sha
        if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise HubError(f"{label}: the hub answered commit {str(commit)[:100]!r}, not a 40-hex commit hash")
        if revision is not None and re.fullmatch(r"[0-9a-fA-F]{40}", revision) and commit != revision.lower():
            raise IntegrityError(
                f"{label}: asked for commit {revision} (a full hash pins the download), but the hub answered commit "
                f"{commit}; refused before any file was fetched. The server or a proxy ignores the revision"
            )
        entries: dict[str, Entry] = {}
        for n, f in enumerate(api.list_repo_tree(repo, revision=commit, recursive=True)):
            if n >= MAX_REPO_FILES:
                raise HubError(
                    f"{label}: the repo lists more than {MAX_REPO_FILES} files; refused (a model repo holds hundreds). "
                    "Download the files you need with hf_hub_download and pass the local folder"
                )
            path = _guard.check_repo_path(getattr(f, "path", None), what=f"{label}: tree listing")
            if not isinstance(f, RepoFile):
                continue
            what = f"{label}: tree listing entry {path!r}"
            lfs = getattr(f, "lfs", None)
            sha256 = lfs.sha256 if lfs is not None else None
            if not isinstance(f.blob_id, str) or not re.fullmatch(r"[0-9a-f]{40}", f.blob_id):
                raise HubError(f"{what}: blob id {str(f.blob_id)[:100]!r} is not a 40-hex git sha1")
            if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
                raise HubError(f"{what}: LFS sha256 {str(sha256)[:100]!r} is not 64 hex digits")
            size = _int(lfs.size if lfs is not None else f.size, what)
            if path in entries:
                raise HubError(f"{what}: listed twice; the server is not a trustworthy hub")
            entries[path] = Entry(path, size, f.blob_id, sha256, getattr(f, "xet_hash", None))
    return commit, entries


def select(entries: dict[str, Entry], allow: list[str], ignore: list[str]) -> list[Entry]:
    """The entries whose paths match one of ``allow`` (``snapshot_download``'s own filter) and none of ``ignore``.

    ``ignore`` is matched case-insensitively (``X.PKL`` is a pickle too).
    """
    from fnmatch import fnmatchcase

    from huggingface_hub.utils import filter_repo_objects

    lowered = [i.lower() for i in ignore]
    return [entries[p] for p in filter_repo_objects(sorted(entries), allow_patterns=allow)
            if not any(fnmatchcase(p.lower(), i) for i in lowered)]


def _storage(repo: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    return root / repo_folder_name(repo_id=repo, repo_type="model")


def snapshot_folder(repo: str, commit: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """``<cache>/models--org--name/snapshots/<commit>``, as ``snapshot_download`` returns it."""
    return _storage(repo, cache_dir) / "snapshots" / commit


def _incomplete(storage: Path) -> set[Path]:
    with contextlib.suppress(OSError):
        return set((storage / "blobs").glob("*.incomplete"))
    return set()


def _remove_partial(storage: Path, before: set[Path]) -> None:
    """Remove ``.incomplete`` blobs that appeared during this download and that no one else is writing."""
    from filelock import FileLock, Timeout

    for p in _incomplete(storage) - before:
        lock = storage.parent / ".locks" / storage.name / (p.name.removesuffix(".incomplete") + ".lock")
        try:
            with FileLock(str(lock), timeout=0):
                p.unlink(missing_ok=True)
        except (Timeout, OSError):
            pass  # another download holds it: its file, not ours


def fetch_files(
    repo: str,
    commit: str,
    files: list[Entry],
    *,
    cache_dir: str | os.PathLike[str] | None,
    token: str | None,
    label: str,
    verify: bool,
) -> dict[str, Path]:
    """Download ``files`` of ``commit`` into the cache (in parallel), each checked; their snapshot paths.

    Raises:
        HubError: a file announced larger than its cap (:func:`size_cap`); nothing is fetched then.
        IntegrityError: bytes or sizes that do not match the listing (the file is removed from the cache).
    """
    for e in files:
        cap = size_cap(e.path)
        if cap is not None and e.size > cap:
            raise HubError(
                f"{label}: {e.path} is announced as {e.size} bytes, more than the {cap}-byte cap for such files; "
                "refused before downloading. Download it yourself if you trust it, and pass the local folder"
            )
    storage = _storage(repo, cache_dir)
    before = _incomplete(storage)
    hub_cache = None if cache_dir is None else os.fspath(cache_dir)  # huggingface_hub types it str | Path

    def one(e: Entry) -> Path:
        from huggingface_hub import hf_hub_download

        with _guard.budget(e.size + SLACK_BYTES, f"{label}: {e.path} (announced {e.size} bytes)"), \
                _guard.expect(commit, e.etag, e.path):
            out = Path(hf_hub_download(repo, e.path, revision=commit, cache_dir=hub_cache, token=token))
        if resolved_commit(out) != commit or not out.as_posix().endswith(f"/{commit}/{e.path}"):
            raise IntegrityError(  # nothing removed: the file is not this download's
                f"{label}: {e.path} landed at {out}, not in the snapshot of commit {commit}; refused, nothing removed. "
                "The server is not consistent; download again later"
            )
        if verify:
            verify_file(out, label=label, expected=(e.etag, e.size))
        return out

    try:
        if len(files) <= 1:
            paths = [one(e) for e in files]
        else:
            with ThreadPoolExecutor(max_workers=min(WORKERS, len(files))) as pool:
                futures = [pool.submit(_guard.bounded(functools.partial(one, e))) for e in files]
                try:
                    paths = [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    except BaseException:
        _remove_partial(storage, before)
        raise
    return {e.path: p for e, p in zip(files, paths)}


def write_ref_and_tree(repo: str, revision: str | None, commit: str, entries: dict[str, Entry],
                       cache_dir: str | os.PathLike[str] | None) -> None:
    """Record ``refs/<revision> -> commit`` and the listing, as ``snapshot_download`` does (best effort)."""
    storage = _storage(repo, cache_dir)
    revision = revision or "main"
    if revision != commit:
        ref = storage / "refs" / revision
        refs = (storage / "refs").resolve()
        if refs not in ref.resolve().parents:
            raise UnsafeFileError(f"{repo}: revision {revision!r} would write its ref outside {refs}")
        with contextlib.suppress(OSError):
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not (ref.is_file() and ref.read_text() == commit):
                tmp = ref.with_name(ref.name + f".fvt-tmp-{os.getpid()}")
                tmp.write_text(commit)
                os.replace(tmp, ref)
    try:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    except ImportError:  # older huggingface_hub: no listing cache; offline calls then trust the folder
        return
    write_tree_cache(
        str(storage),
        commit,
        {
            p: TreeCacheEntry(size=e.size, blob_id=e.blob_id, lfs_sha256=e.lfs_sha256,
                              lfs_size=e.size if e.lfs_sha256 else None, xet_hash=e.xet_hash)
            for p, e in entries.items()
        },
    )


def translate_abort(e: _guard.Abort, label: str) -> Exception:
    """A typed error for a download the guard ended."""
    if e.kind == "size":
        return IntegrityError(f"{e}")
    if e.kind == "header":
        return UnsafeFileError(f"{label}: {e}; the server is not a trustworthy hub (nothing was written for it)")
    if e.kind == "listing":
        return IntegrityError(
            f"{label}: {e}; refused before anything was written or removed (the server is not consistent, or not a "
            "trustworthy hub). Download again later; other snapshots in the cache are untouched"
        )
    return HubError(f"{label}: {e}")
