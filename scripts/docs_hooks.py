"""mkdocs hooks of the docs site (mkdocs.yml ``hooks:``), and the fetch of its one third-party script.

- ``on_config``: the footer shows the package's version (read from pyproject.toml, the one place it is set).
- ``on_post_build``: the built site serves mermaid itself (``js/mermaid.min.js``), so diagrams render with no
  network at view time. The theme loads mermaid from a CDN only when no ``mermaid`` global exists; mkdocs.yml's
  ``extra_javascript`` loads this copy first.

The mermaid bundle (2.7 MB minified) is not committed: ``python scripts/docs_hooks.py fetch`` (run by the docs
build when the cache lacks it, and by scripts/fresh_check.sh) gets the pinned npm package once, with ``npm pack``
when npm is installed or else straight from the npm registry over HTTPS, checks it against the pinned sha512
integrity, and keeps ``dist/mermaid.min.js`` in a cache folder: ``$FVT_DOCS_CACHE``, else
``$XDG_CACHE_HOME/fvtransform-docs``, else ``~/.cache/fvtransform-docs``. Later builds are offline.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Any
import urllib.request

ROOT = Path(__file__).resolve().parents[1]
#: The mermaid release the site serves: material 9.x drives the mermaid 11 API.
MERMAID_VERSION = "11.12.2"
#: npm's ``dist.integrity`` of that release's tarball (``npm view mermaid@11.12.2 dist.integrity``).
MERMAID_INTEGRITY = "sha512-n34QPDPEKmaeCG4WDMGy0OT6PSyxKCfy2pJgShP+Qow2KLrvWjclwbc3yXfSIf4BanqWEhQEpngWwNp/XhZt6w=="
#: sha256 of ``package/dist/mermaid.min.js`` inside it (checks the cached copy on every build).
MERMAID_JS_SHA256 = "d0830a6c05546e9edb8fe20a8f545f3e0dc7c4c3134d584bad9c13a99d7a71e0"
_MEMBER = "package/dist/mermaid.min.js"
_TARBALL_URL = f"https://registry.npmjs.org/mermaid/-/mermaid-{MERMAID_VERSION}.tgz"
_MAX_TARBALL = 64 * 2**20
#: Where the built site serves it (mkdocs.yml ``extra_javascript``).
SITE_PATH = "js/mermaid.min.js"


def cache_dir() -> Path:
    """The folder that keeps the fetched bundle between builds."""
    if os.environ.get("FVT_DOCS_CACHE"):
        return Path(os.environ["FVT_DOCS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fvtransform-docs"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tarball() -> bytes:
    """The pinned release's tarball, by ``npm pack`` or from the registry; checked against its integrity."""
    with tempfile.TemporaryDirectory() as tmp:
        data = b""
        if shutil.which("npm"):
            out = subprocess.run(["npm", "pack", f"mermaid@{MERMAID_VERSION}", "--pack-destination", tmp, "--silent"],
                                 capture_output=True, text=True, timeout=300, cwd=tmp)
            got = Path(tmp) / f"mermaid-{MERMAID_VERSION}.tgz"
            if out.returncode == 0 and got.is_file():
                data = got.read_bytes()
        if not data:
            with urllib.request.urlopen(_TARBALL_URL, timeout=120) as resp:  # noqa: S310 (a fixed https URL)
                data = resp.read(_MAX_TARBALL + 1)
    if len(data) > _MAX_TARBALL:
        raise SystemExit(f"docs_hooks: {_TARBALL_URL} is larger than {_MAX_TARBALL} bytes; refusing it")
    algo, _, want = MERMAID_INTEGRITY.partition("-")
    got_digest = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got_digest != want:
        raise SystemExit(f"docs_hooks: mermaid {MERMAID_VERSION}'s tarball has {algo} {got_digest}, expected {want}")
    return data


def mermaid_js() -> Path:
    """The cached, checked ``mermaid.min.js``; fetched once when the cache lacks it."""
    path = cache_dir() / f"mermaid-{MERMAID_VERSION}.min.js"
    if path.is_file() and _sha256(path.read_bytes()) == MERMAID_JS_SHA256:
        return path
    with tarfile.open(fileobj=io.BytesIO(_tarball()), mode="r:gz") as tar:
        member = tar.getmember(_MEMBER)
        handle = tar.extractfile(member) if member.isfile() else None
        if handle is None:
            raise SystemExit(f"docs_hooks: {_MEMBER} is not a regular file in mermaid {MERMAID_VERSION}'s tarball")
        js = handle.read()
    if _sha256(js) != MERMAID_JS_SHA256:
        raise SystemExit(f"docs_hooks: {_MEMBER} has sha256 {_sha256(js)}, expected {MERMAID_JS_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(js)
    os.replace(tmp, path)
    return path


def version() -> str:
    """The package's version, from pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the test extra's tomli
        import tomli as tomllib  # type: ignore[no-redef]
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def on_config(config: Any, **kwargs: Any) -> Any:
    """The footer names the version the pages document."""
    config["copyright"] = f"fvtransform {version()} · Apache-2.0"
    return config


def on_post_build(config: Any, **kwargs: Any) -> None:
    """Copy the checked mermaid bundle into the built site."""
    target = Path(config["site_dir"]) / SITE_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mermaid_js(), target)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        raise SystemExit("usage: python scripts/docs_hooks.py fetch")
    print(mermaid_js())
