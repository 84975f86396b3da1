"""``maybe_download_model`` / ``maybe_download_lora`` on huggingface_hub, with safe defaults.

A local path is returned as it is (a local folder shadows a repo id of the
same name). Anything else is a repo id, optionally with a subfolder
(``org/repo/sub/dir``); every segment is checked before any request.
"""

from __future__ import annotations

import os
from pathlib import Path
import re

from fvtransform.errors import FormatError, HubError, NotFoundError, UnsafeFileError

__all__ = ["maybe_download_model", "maybe_download_lora", "split_repo_id", "DEFAULT_PATTERNS"]

#: Configs, tokenizers and safetensors weights; never ONNX, Flax, TF or pickles by default.
DEFAULT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
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
        raise UnsafeFileError(f"repo id {name!r}: absolute paths or backslashes are not allowed")
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
    if isinstance(e, hf.EntryNotFoundError):
        return NotFoundError(f"{where}: file not found: {e}")
    if isinstance(e, hf.LocalEntryNotFoundError):
        if offline:
            return NotFoundError(f"{where}: not in the local cache and offline mode is on; download it once online first")
        return HubError(f"{where}: the hub is unreachable and nothing is cached ({e}); check the network or use offline mode")
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
) -> Path:
    """A local folder for a model: the path itself, or a snapshot of a Hub repo.

    Default patterns take configs, tokenizer files and safetensors weights;
    pickle weights only with ``allow_pickle=True``. ``components=[...]`` on a
    pipeline repo fetches ``model_index.json`` and those component folders
    only. Offline (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) the
    cache is used and nothing touches the network. A commit hash as
    ``revision`` pins the download; a branch name follows the branch.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    repo, sub = split_repo_id(str(name_or_path))
    patterns = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_PATTERNS)
    if allow_pickle:
        patterns += PICKLE_PATTERNS
    if sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    if components:
        for c in components:
            split_repo_id(f"x/y/{c}")
        base = [f"{c}/{p}" for c in components for p in patterns] + ["model_index.json"]
        patterns = base
    offline = _offline(local_files_only)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,
            ignore_patterns=["*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite"] + ([] if allow_pickle else PICKLE_PATTERNS),
            local_files_only=offline,
            cache_dir=cache_dir,
            token=token,
        )
    except Exception as e:  # mapped to our typed errors, keeping repo and revision
        raise _translate(e, repo, revision, offline) from e
    return _inside(Path(folder), sub)


def maybe_download_lora(
    name_or_path: str | os.PathLike[str],
    *,
    weight_name: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> Path:
    """The path of one LoRA weights file: a file as is, or found in a folder or repo.

    ``weight_name`` when given, else a known name
    (``pytorch_lora_weights.safetensors``, ``adapter_model.safetensors``), else
    the only ``*.safetensors``; several candidates is an error listing them.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        return _pick(path, sorted(p.name for p in path.iterdir() if p.is_file()), weight_name, str(path))
    repo, sub = split_repo_id(str(name_or_path))
    offline = _offline(local_files_only)
    from huggingface_hub import HfApi, hf_hub_download

    try:
        if weight_name is None:
            if offline:
                folder = Path(
                    maybe_download_model(str(name_or_path), revision=revision, local_files_only=True, cache_dir=cache_dir, token=token)
                )
                return _pick(folder, sorted(p.name for p in folder.iterdir() if p.is_file()), None, repo)
            files = HfApi().list_repo_files(repo, revision=revision, token=token)
            prefix = f"{sub}/" if sub else ""
            names = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
            weight_name = _pick(Path("."), names, None, repo).name
        filename = f"{sub}/{weight_name}" if sub else weight_name
        out = hf_hub_download(repo, filename, revision=revision, local_files_only=offline, cache_dir=cache_dir, token=token)
        config = f"{sub}/adapter_config.json" if sub else "adapter_config.json"
        try:
            hf_hub_download(repo, config, revision=revision, local_files_only=offline, cache_dir=cache_dir, token=token)
        except Exception:  # an adapter_config.json is optional
            pass
    except (FormatError, NotFoundError, UnsafeFileError):
        raise
    except Exception as e:
        raise _translate(e, repo, revision, offline) from e
    return Path(out)


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
