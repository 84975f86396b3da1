"""A fake Hugging Face Hub on 127.0.0.1: in-memory repos served the way the hub's HTTP API serves them.

The real ``huggingface_hub`` client talks to it end to end. It answers:

- ``GET /api/models/{repo}/revision/{rev}``: ``id``, ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: file entries with ``oid``, ``size`` and, for large
  files, ``lfs.oid`` (the sha256);
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the bytes, with ``X-Repo-Commit``, ``ETag`` and for
  LFS files ``X-Linked-Etag`` / ``X-Linked-Size`` (byte ranges honoured);
- errors with the ``X-Error-Code`` header the client maps to its typed exceptions.

Faults are injected per file: ``"corrupt"`` (same size, other bytes), ``"short"`` (announced and served
shorter, the hash of the full file kept), ``"drop"`` (the connection closes mid-body), or an int ``n``
(answer 500 to the first ``n`` GETs of the file, then serve it). A hostile or broken server:
``("tamper", data)`` serves ``data`` instead, announcing the hash and size of the real file;
``"drip"`` sends the headers, then one body byte every ``drip_s`` seconds; ``"stall"`` sends the
headers, then nothing; ``"endless"`` sends a body without a length, without end; ``"endless_headers"``
drips header lines without end (HEAD and GET); ``("etag", value)`` announces ``value`` as the ETag;
``("commit", value)`` announces ``value`` as X-Repo-Commit. ``("gzip", layers, n)`` sends ``n`` zero bytes gzipped ``layers`` times (a decompression bomb).
The key ``(repo, "/api")`` makes the
API answers (revision, tree) ``"stall"``, ``"endless"`` or ``"endless_headers"``. ``listing_extra`` adds raw entries to
every tree listing (hostile names), ``listing_size`` overrides the size the listing announces for a
path. Every request is logged in ``requests``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from urllib.parse import parse_qs, unquote, urlparse

import attrs

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@attrs.define
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = attrs.field(factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = attrs.field(factory=dict)  # branch or tag -> sha
    gated: bool = False


class FakeHub:
    """Start with :meth:`start`; ``url`` is then the endpoint. ``token`` opens gated repos."""

    token = "hf_fake_token"

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.faults: dict[tuple[str, str], object] = {}
        self.listing_extra: list[dict[str, object]] = []
        self.listing_size: dict[str, int] = {}
        self.drip_s = 0.2
        self.stopping = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- content ------------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main", gated: bool = False) -> str:
        """Add a commit holding ``files`` and point ``ref`` at it; returns the 40-hex commit sha."""
        repo = self.repos.setdefault(repo_id, FakeRepo())
        repo.gated = repo.gated or gated
        h = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        h.update(str(len(repo.commits)).encode())
        sha = h.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha

    # -- server -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # ends dripping and stalled answers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def paths_requested(self) -> list[str]:
        return [p for _, p in self.requests]


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # -- helpers ------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, *, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, head=head)

    def _json(self, doc: object, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(200, json.dumps(doc).encode(), headers)

    def _repo(self, repo_id: str, rev: str, *, head: bool = False) -> tuple[FakeRepo, str] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            return None
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._error(401, "GatedRepo", f"Access to {repo_id} is restricted", head=head)
            return None
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            return None
        return repo, sha

    # -- routes -------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.fake.requests.append(("HEAD" if head else "GET", path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            fault = self.fake.faults.get((repo_id, "/api"))
            if fault == "endless_headers":
                self._endless_headers()
                return
            if fault in ("stall", "endless"):
                self._slow(200, {"Content-Type": "application/json"}, b"[]", fault)
                return
            found = self._repo(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            if kind == "revision":
                self._json({"id": repo_id, "sha": sha, "private": False, "siblings": [{"rfilename": p} for p in sorted(files)]})
                return
            under = "/".join(parts[6:])
            recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
            tree = _tree(files, under, recursive)
            for entry in tree:
                if entry["path"] in self.fake.listing_size:
                    entry["size"] = self.fake.listing_size[entry["path"]]
                    if "lfs" in entry:
                        entry["lfs"] = dict(entry["lfs"], size=entry["size"])  # type: ignore[arg-type]
            self._json(tree + self.fake.listing_extra, sha)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            found = self._repo(repo_id, rev, head=head)
            if found is None:
                return
            repo, sha = found
            if filename not in repo.commits[sha]:
                self._error(404, "EntryNotFound", f"{filename} does not exist at {rev}", head=head)
                return
            self._serve_file(repo_id, sha, filename, repo.commits[sha][filename], head=head)
            return
        self._error(404, "NotFound", f"no route for {path}", head=head)

    def _serve_file(self, repo_id: str, sha: str, filename: str, data: bytes, *, head: bool) -> None:
        fault = self.fake.faults.get((repo_id, filename))
        lfs = filename.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        if fault == "endless_headers":
            self._endless_headers()
            return
        real = data
        if isinstance(fault, tuple) and fault[0] == "tamper":
            data = fault[1]
        if fault == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        elif fault == "short":
            data = data[: len(data) // 2]
        size = len(data) if not (isinstance(fault, tuple) and fault[0] == "tamper") else len(real)
        if isinstance(fault, tuple) and fault[0] == "etag":
            etag = fault[1]
        if isinstance(fault, tuple) and fault[0] == "commit":
            sha = fault[1]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        if not head and isinstance(fault, int) and fault > 0:
            self.fake.faults[(repo_id, filename)] = fault - 1
            self._error(500, "InternalError", "temporary failure")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
        body = data[start:]
        if head:  # the size of the body a GET would send
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fault in ("drip", "stall", "endless"):
            self._slow(status, headers, body, fault)
            return
        if isinstance(fault, tuple) and fault[0] == "gzip":  # ("gzip", n_layers, decoded size)
            import gzip

            bomb = b"\0" * fault[2]
            for _ in range(fault[1]):
                bomb = gzip.compress(bomb, compresslevel=9)
            self._send(status, bomb, dict(headers, **{"Content-Encoding": ", ".join(["gzip"] * fault[1])}))
            return
        if fault == "drop":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers)

    def _slow(self, status: int, headers: dict[str, str], body: bytes, fault: object) -> None:
        """Headers, then the body one byte at a time (drip), nothing (stall) or without end (endless)."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if fault != "endless":
            self.send_header("Content-Length", str(len(body)))
        self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        try:
            if fault == "stall":
                self.fake.stopping.wait(60)
            elif fault == "drip":
                for i in range(len(body)):
                    if self.fake.stopping.wait(self.fake.drip_s):
                        return
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
            else:
                chunk = b"\0" * 65536
                while not self.fake.stopping.is_set():
                    self.wfile.write(chunk)
        except OSError:
            pass  # the client hung up: what it should do

    def _endless_headers(self) -> None:
        """A status line, then one header line every ``drip_s`` seconds, without end."""
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            i = 0
            while not self.fake.stopping.wait(self.fake.drip_s):
                self.wfile.write(b"X-Pad-%d: x\r\n" % i)
                self.wfile.flush()
                i += 1
        except OSError:
            pass
        self.close_connection = True


def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict[str, object]]:
    prefix = f"{under}/" if under else ""
    entries: dict[str, dict[str, object]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            d = prefix + rest.split("/", 1)[0]
            entries.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
            continue
        if recursive:  # the parent folders are listed too, as the hub does
            segs = rest.split("/")[:-1]
            for i in range(1, len(segs) + 1):
                d = prefix + "/".join(segs[:i])
                entries.setdefault(d, {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
        entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries[path] = entry
    return list(entries.values())
